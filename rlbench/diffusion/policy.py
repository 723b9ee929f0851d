"""The diffusion policy: UNet + DDIM scheduler + text encoder (+ VAE for latent models).

One class, :class:`DiffusionPolicy`, serves every model: the embedded default, any Stable
Diffusion 1.x/2.x checkpoint in diffusers format (hub id or local folder), and the tiny random
pipelines of the tests. The DDIM step with log-prob lives in :mod:`rlbench.diffusion.ddim`; this
module only calls it.

Trainable parts: LoRA adapters through peft (``train_mode="lora"``, default rank 4 on
to_q/to_k/to_v/to_out.0, as ddpo-pytorch and trl) or the full UNet. Frozen weights may be fp16/bf16
on a GPU; trainable parameters are always float32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlbench.diffusion.ddim import ddim_step_with_logprob, ddim_transition, gaussian_log_prob
from rlbench.errors import ConfigError, UnknownNameError, WeightsNotAvailable
from rlbench.registry import MODELS
from rlbench.utils.hf import quiet_hf
from rlbench.weights import is_offline


RLBENCH_MODEL_FILE = "rlbench.json"  # optional model-folder metadata: pixel_shuffle, default_prompts


@dataclass
class Rollout:
    """What sampling returns: images plus the whole trajectory (per-process, on the policy device).

    Shapes: images (B,3,H,W) float32 in [0,1]; latents (B,T+1,C,h,w) float32 (x_T ... x_0);
    log_probs (B,T) float32; timesteps (T,) int64; prompt_embeds (B,L,D).
    """

    images: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor


class BaseWeights:
    """The base model's values of a policy's trainable tensors, swapped in and out without copies.

    Made right after ``setup_training`` (before any checkpoint is loaded): for full fine-tuning these
    are the pretrained UNet weights; for LoRA the fresh adapters, whose B matrices are zero, so the
    adapted UNet computes exactly the base model. :meth:`active` swaps the tensors' storage
    (``param.data``) in O(1) per tensor, so evaluating the base model at every step costs only its
    forward pass.
    """

    def __init__(self, policy: Any, state: dict[str, torch.Tensor] | None = None) -> None:
        params = dict(policy.unet.named_parameters())
        names = [n for n, p in params.items() if p.requires_grad] if state is None else list(state)
        if state is None:
            state = {n: params[n].detach().clone() for n in names}
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"base state names parameters the policy lacks: {missing[:3]}")
        self.policy = policy
        self.params = [params[n] for n in names]
        self.tensors = [state[n].to(device=params[n].device, dtype=params[n].dtype) for n in names]

    def restore(self) -> None:
        """Copy the base values into the policy (make the policy the base model)."""
        with torch.no_grad():
            for p, t in zip(self.params, self.tensors):
                p.copy_(t)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the policy computes the base model (its own tensors are put back after)."""
        for p, t in zip(self.params, self.tensors):
            p.data, t.data = t.data, p.data
        try:
            yield
        finally:
            for p, t in zip(self.params, self.tensors):
                p.data, t.data = t.data, p.data



class DiffusionPolicy:
    """A text-to-image diffusion model viewed as a policy over denoising steps."""

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        text_encoder: Any,
        tokenizer: Any,
        vae: Any | None = None,
        *,
        name: str = "model",
        default_prompts: str = "simple-animals",
        pixel_shuffle: int = 1,
    ) -> None:
        """Args:
        pixel_shuffle: for pixel-space models (no VAE) whose UNet works on space-to-depth
            images: the UNet's (C*r*r, H/r, W/r) sample is ``pixel_shuffle``-d by r to (C, H, W).
            A lossless reshaping that makes a small UNet r*r times cheaper per step.
        """
        from diffusers import DDIMScheduler

        self.unet = unet
        # DDPO's policy is the stochastic DDIM step; any scheduler config converts to DDIM.
        self.scheduler = scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(scheduler.config)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.name = name
        self.default_prompts = default_prompts
        if pixel_shuffle < 1 or (pixel_shuffle > 1 and vae is not None):
            raise ConfigError(f"pixel_shuffle must be >= 1 and only applies to models without a VAE, got {pixel_shuffle}.")
        self.pixel_shuffle = pixel_shuffle
        self.train_mode = "frozen"
        self.lora_config: dict[str, Any] | None = None
        self._forward = unet  # what forward passes call: the UNet, or its DDP wrapper after prepare()
        self._dtype: torch.dtype | None = None
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.unet.requires_grad_(False)

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, source: str | Path, *, revision: str | None = None, name: str | None = None,
        default_prompts: str = "simple-animals",
    ) -> DiffusionPolicy:
        """Load from a local diffusers folder or a hub id (cache first; weights load on CPU, fp32)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        quiet_hf()
        source = str(source)
        local = Path(source).is_dir()
        if local and not (Path(source) / "unet").is_dir():
            raise ConfigError(
                f"{source!r} is not a diffusers model folder: it has no unet/ subfolder "
                "(expected unet/, scheduler/, text_encoder/, tokenizer/ and optionally vae/)."
            )
        kw: dict[str, Any] = {} if local else {"revision": revision or None}
        # Optional rlbench metadata of a model folder (the shapes model writes it).
        extra = json.loads((Path(source) / RLBENCH_MODEL_FILE).read_text()) if local and (
            Path(source) / RLBENCH_MODEL_FILE).is_file() else {}

        def load_all(local_files_only: bool) -> DiffusionPolicy:
            lk = dict(kw, local_files_only=local_files_only)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **lk)
            scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", **lk)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **lk)
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **lk)
            has_vae = (Path(source) / "vae").is_dir() if local else True
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **lk) if has_vae else None
            return cls(unet, scheduler, text_encoder, tokenizer, vae, name=name or source,
                       default_prompts=extra.get("default_prompts", default_prompts),
                       pixel_shuffle=int(extra.get("pixel_shuffle", 1)))

        try:
            return load_all(local_files_only=True)
        except (OSError, ValueError) as first:
            if local:
                raise ConfigError(f"cannot load the diffusers model in {source!r}: {first}") from first
            if is_offline():
                raise WeightsNotAvailable(_missing_weights_message(source, revision)) from first
            try:
                return load_all(local_files_only=False)
            except Exception as exc:
                raise WeightsNotAvailable(_missing_weights_message(source, revision) + f" ({exc})") from exc

    # -- trainable parameters -----------------------------------------------------------------------
    def setup_training(self, train_mode: str = "lora", rank: int = 4, alpha: float = 4.0,
                       targets: list[str] | tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> None:
        """Make LoRA adapters (peft) or the full UNet trainable, in float32."""
        if train_mode == "lora":
            from peft import LoraConfig

            config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
            try:
                self.unet.add_adapter(config)
            except ValueError as exc:
                raise ConfigError(f"model.lora_targets {list(targets)} do not match UNet modules: {exc}") from exc
            self.lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
        elif train_mode == "full":
            self.unet.requires_grad_(True)
        else:
            raise ConfigError(f"model.train_mode must be 'lora' or 'full', got {train_mode!r}.")
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.train_mode = train_mode
        self._dtype = None

    def prepare(self, accelerator: Any) -> None:
        """Let ``accelerator`` wrap the UNet (DDP when distributed); forward passes go through the wrapper,
        so gradients of every process are really all-reduced (early ddpo-pytorch and trl bypassed it)."""
        self._forward = accelerator.prepare(self.unet)

    @property
    def forward_module(self) -> Any:
        """The module forward passes run through (the DDP wrapper after :meth:`prepare`), for ``no_sync``."""
        return self._forward

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def named_trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.unet.named_parameters() if p.requires_grad}

    # -- placement ----------------------------------------------------------------------------------
    def _frozen_modules(self) -> list[Any]:
        return [m for m in (self.text_encoder, self.vae) if m is not None]

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype = torch.float32) -> DiffusionPolicy:
        """Move to ``device``; frozen weights in ``frozen_dtype``, trainable ones stay float32."""
        for module in [*self._frozen_modules(), self.unet]:
            module.to(device=device)
        # Keep the trainable tensors aside so a cast of the UNet does not round them through
        # frozen_dtype (trained LoRA weights would lose precision on a fp16/bf16 round trip).
        trainable = [(p, p.data) for p in self.unet.parameters() if p.requires_grad]
        for module in [*self._frozen_modules(), self.unet]:
            if module.dtype != frozen_dtype:
                module.to(dtype=frozen_dtype)
        for p, data in trainable:
            p.data = data.float()
        self._dtype = None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen UNet weights (inputs are cast to it); the first frozen parameter decides,
        found without walking every parameter (this is read on every UNet call)."""
        if self._dtype is None:  # cached: read on every UNet call; to() and setup_training() reset it
            frozen = next((p for p in self.unet.parameters() if not p.requires_grad), None)
            self._dtype = (frozen if frozen is not None else next(self.unet.parameters())).dtype
        return self._dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @property
    def image_size(self) -> int:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else self.pixel_shuffle
        return self.latent_shape[1] * factor

    # -- text -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text embeddings; each distinct prompt is encoded once per call."""
        unique = list(dict.fromkeys(prompts))
        ids = self.tokenizer(
            unique, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        embeds = self.text_encoder(ids)[0].to(self.dtype)
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        return embeds[index]

    # -- denoising --------------------------------------------------------------------------------------
    def guided_eps(self, latents: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor,
                   neg_embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Model output with classifier-free guidance ``u + w (c - u)`` in one UNet pass (float32).

        This guided output is what DDPO trains (paper App. E.1). Gradients flow when enabled.
        """
        b = latents.shape[0]
        t = torch.as_tensor(t, device=latents.device)
        t = t.expand(b) if t.ndim == 0 else t
        x = latents.to(self.dtype)
        if guidance_scale == 1.0:
            return self._forward(x, t, encoder_hidden_states=embeds).sample.float()
        out = self._forward(torch.cat([x, x]), torch.cat([t, t]),
                         encoder_hidden_states=torch.cat([neg_embeds.expand(b, -1, -1), embeds])).sample.float()
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> images (B,3,H,W) float32 in [0,1]."""
        return self.decode_differentiable(latents)

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with gradients (when enabled) flowing back into ``latents``, through the VAE
        decoder for latent models (direct reward fine-tuning trains through it)."""
        if self.vae is None:
            x = torch.nn.functional.pixel_shuffle(latents, self.pixel_shuffle) if self.pixel_shuffle > 1 else latents
        else:
            x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def sample(self, prompts: list[str], *, num_steps: int, eta: float, guidance_scale: float,
               generator: torch.Generator, negative_prompt: str = "", prompt_embeds: torch.Tensor | None = None,
               neg_embeds: torch.Tensor | None = None, initial_noise: torch.Tensor | None = None) -> Rollout:
        """Sample images for ``prompts`` with the stochastic DDIM policy, keeping the trajectory.

        Noise comes from ``generator`` (a CPU generator makes runs reproducible across devices);
        ``initial_noise`` (B, C, h, w), if given, is x_T's standard-normal draw instead (e.g. shared
        within a GRPO group), and only the steps' noise comes from ``generator``.
        """
        embeds = self.encode_prompts(prompts) if prompt_embeds is None else prompt_embeds
        neg = self.encode_prompts([negative_prompt]) if neg_embeds is None else neg_embeds
        self.scheduler.set_timesteps(num_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if initial_noise is None:
            initial_noise = self.initial_noise(len(prompts), generator)
        elif tuple(initial_noise.shape) != (len(prompts), *self.latent_shape):
            raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected "
                             f"{(len(prompts), *self.latent_shape)}")
        latents = initial_noise.to(device=self.device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        all_latents, all_log_probs = [latents], []
        for t in timesteps:
            eps = self.guided_eps(latents, t, embeds, neg, guidance_scale)
            latents, log_prob = ddim_step_with_logprob(self.scheduler, eps, t, latents, eta=eta, generator=generator)
            all_latents.append(latents)
            all_log_probs.append(log_prob)
        return Rollout(
            images=self.decode(latents),
            latents=torch.stack(all_latents, dim=1),
            log_probs=torch.stack(all_log_probs, dim=1),
            timesteps=timesteps.clone(),
            prompt_embeds=embeds,
        )

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` standard-normal x_T draws (before ``init_noise_sigma``), as :meth:`sample` draws them."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((n, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)

    def transition(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, neg_embeds: torch.Tensor,
                   guidance_scale: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the policy's step ``p(x_{t-1} | x_t) = N(mean, std^2 I)`` under the current weights
        (gradients flow into the mean when enabled)."""
        eps = self.guided_eps(latents, t, embeds, neg_embeds, guidance_scale)
        return ddim_transition(self.scheduler, eps, t, latents, eta)

    def step_log_prob(self, latents: torch.Tensor, t: torch.Tensor, next_latents: torch.Tensor,
                      embeds: torch.Tensor, neg_embeds: torch.Tensor, guidance_scale: float, eta: float) -> torch.Tensor:
        """Log-prob of the stored action ``next_latents`` at (latents, t) under the current weights."""
        eps = self.guided_eps(latents, t, embeds, neg_embeds, guidance_scale)
        _, log_prob = ddim_step_with_logprob(self.scheduler, eps, t, latents, eta=eta, prev_sample=next_latents)
        return log_prob

    def step_log_prob_and_mean(self, latents: torch.Tensor, t: torch.Tensor, next_latents: torch.Tensor,
                               embeds: torch.Tensor, neg_embeds: torch.Tensor, guidance_scale: float, eta: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of ``next_latents``, the step's mean, its std): :meth:`step_log_prob` plus what a KL
        penalty needs; the same numbers (one formula, :func:`~rlbench.diffusion.ddim.gaussian_log_prob`)."""
        mean, std = self.transition(latents, t, embeds, neg_embeds, guidance_scale, eta)
        if bool((std <= 0).any()):
            raise ValueError("a trained step has sigma_t = 0 (eta = 0 or the last step of a set_alpha_to_one "
                             "scheduler): it has no density")
        return gaussian_log_prob(next_latents.to(latents.dtype), mean, std), mean, std

    # -- saving ---------------------------------------------------------------------------------------
    def save_trained(self, folder: Path) -> None:
        """Write the trained weights in the format plain diffusers loads.

        LoRA: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``).
        Full fine-tuning: ``unet/`` (``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``).
        """
        if self.train_mode == "lora":
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.unet)
            # The file carries no lora_alpha, and loaders then use alpha = rank (scale 1): fold the
            # peft scale alpha / r into B so every loader computes what this model computes.
            scale = self.lora_config["lora_alpha"] / self.lora_config["r"] if self.lora_config else 1.0
            if scale != 1.0:
                state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
            layers = convert_state_dict_to_diffusers(state)
            StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
        else:
            self.unet.save_pretrained(folder / "unet", safe_serialization=True)

    def save_state(self, folder: Path) -> None:
        """Exact trainable state for resume (safetensors), plus :meth:`save_trained`'s files."""
        from safetensors.torch import save_file

        save_file({n: t.contiguous().cpu() for n, t in self.named_trainable_state().items()},
                  str(folder / "trainable.safetensors"))
        self.save_trained(folder)

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        from rlbench.errors import RunDirError

        path = Path(folder) / "trainable.safetensors"
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises SafetensorError on a damaged file, OSError on a missing one
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise RunDirError(
                f"{path} cannot be read ({type(exc).__name__}: {first}); the checkpoint is damaged. Move "
                f"{Path(folder).name} out of {Path(folder).parent} to use the checkpoint before it."
            ) from exc
        params = dict(self.unet.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(
                f"checkpoint {folder} does not match the model's trainable parameters "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); was it trained with another model or train_mode?"
            )
        wrong = sorted(n for n, t in state.items() if t.shape != params[n].shape)
        if wrong:
            raise ConfigError(
                f"checkpoint {folder} has trainable parameters of other shapes than the model's "
                f"(e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(params[wrong[0]].shape)}); "
                "was it trained with another model or model.lora_rank?"
            )
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device))


def _missing_weights_message(source: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"model weights for '{source}' are not in the local Hugging Face cache and cannot be downloaded "
        f"(offline). Fetch them on a connected machine with `hf download {source}{rev}` (the same cache "
        "is used), or pass --model /path/to/a/diffusers-folder."
    )


# -- the model registry's front door -----------------------------------------------------------------


def load_policy(name: str, revision: str = "") -> DiffusionPolicy:
    """A registered model name, a local diffusers folder, or a hub id (``org/name``)."""
    if name in MODELS:
        return MODELS.make(name, {"revision": revision} if revision else {}, returns=DiffusionPolicy)
    path = Path(name).expanduser()
    if path.exists():
        return DiffusionPolicy.from_pretrained(path, name=str(path))
    if _looks_like_hub_id(name):
        return DiffusionPolicy.from_pretrained(name, revision=revision or None)
    raise UnknownNameError(
        MODELS.unknown_message(name) + " Or give a diffusers folder (with unet/, scheduler/, text_encoder/, "
        "tokenizer/) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


# Aliases for the DDPO paper's checkpoints (paper: SD 1.4; ddpo-pytorch base config: SD 1.5).
def sd14(revision: str = "") -> DiffusionPolicy:
    """Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4), the DDPO paper's base model."""
    return DiffusionPolicy.from_pretrained("CompVis/stable-diffusion-v1-4", revision=revision or None, name="sd-1.4")


def sd15(revision: str = "") -> DiffusionPolicy:
    """Stable Diffusion v1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5, formerly runwayml/...)."""
    return DiffusionPolicy.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", revision=revision or None, name="sd-1.5"
    )


# What `rlbench eval` uses by default for the DDPO paper's models (rlbench.eval.plan.model_eval_defaults):
# the paper's held-out prompt sets and a Hugging Face CLIP for diversity (skipped when not cached).
SD_EVAL_DEFAULTS: dict[str, Any] = {
    "prompt_sets": ["unseen-animals", "everyday-objects"],
    "features": "openai/clip-vit-base-patch32",
}
sd14.eval_defaults = SD_EVAL_DEFAULTS
sd15.eval_defaults = SD_EVAL_DEFAULTS
