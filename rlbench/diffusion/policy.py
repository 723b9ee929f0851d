"""The diffusion policy: what every model family shares (:class:`Policy`) and the UNet + DDIM family.

:class:`Policy` holds what does not depend on the family: the trainable denoiser (LoRA through peft or
the full module, trainables in float32), placement and dtypes, the rollout through the one trajectory
loop (:mod:`rlbench.diffusion.trajectory`), the step log-prob and transition the algorithms replay, and
exact save/load for resume. A family supplies its schedule, conditioning, model call, transition formula
and decoder.

:class:`DiffusionPolicy` is the UNet + DDIM family: the embedded default, any Stable Diffusion 1.x/2.x
checkpoint in diffusers format (hub id or local folder), and the tiny random pipelines of the tests. The
DDIM step with log-prob lives in :mod:`rlbench.diffusion.ddim`. The flow-matching family (SD3/SD3.5,
FLUX.1) is :class:`rlbench.diffusion.flow_policy.FlowPolicy`.

Trainable parts: LoRA adapters through peft (``train_mode="lora"``, default rank 4 on
to_q/to_k/to_v/to_out.0, as ddpo-pytorch and trl) or the full UNet. Frozen weights may be fp16/bf16
on a GPU; trainable parameters are always float32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlbench.diffusion.base import BaseWeights, Policy, Rollout, _missing_weights_message  # noqa: F401 (re-exported)
from rlbench.diffusion.conditioning import Conditioning, as_conditioning
from rlbench.diffusion.ddim import ddim_transition
from rlbench.diffusion.sampler import Sampler
from rlbench.errors import ConfigError, UnknownNameError, WeightsNotAvailable
from rlbench.registry import MODELS
from rlbench.utils.hf import quiet_hf
from rlbench.weights import is_offline


RLBENCH_MODEL_FILE = "rlbench.json"  # optional model-folder metadata: pixel_shuffle, default_prompts


class DiffusionPolicy(Policy):
    """The UNet + DDIM family: SD 1.x/2.x, the shapes model, any UNet2DConditionModel pipeline."""

    family = "ddim"
    default_sampler = "ddim"

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

        # DDPO's policy is the stochastic DDIM step; any scheduler config converts to DDIM.
        self.scheduler = scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(scheduler.config)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        if pixel_shuffle < 1 or (pixel_shuffle > 1 and vae is not None):
            raise ConfigError(f"pixel_shuffle must be >= 1 and only applies to models without a VAE, got {pixel_shuffle}.")
        self.pixel_shuffle = pixel_shuffle
        self._init_common(unet, name, default_prompts)

    def _frozen_modules(self) -> list[Any]:
        return [m for m in (self.text_encoder, self.vae) if m is not None]

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
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning: (B, L, D) text embeddings as ``embeds``; each distinct prompt is encoded
        once per call."""
        unique = list(dict.fromkeys(prompts))
        ids = self.tokenizer(
            unique, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        embeds = self.text_encoder(ids)[0].to(self.dtype)
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        return Conditioning({"embeds": embeds[index]})

    # -- denoising --------------------------------------------------------------------------------------
    def guided_eps(self, latents: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor,
                   neg_embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Model output with classifier-free guidance ``u + w (c - u)`` in one UNet pass (float32).

        This guided output is what DDPO trains (paper App. E.1). Gradients flow when enabled.
        """
        b = latents.shape[0]
        embeds, neg_embeds = as_conditioning(embeds)["embeds"], as_conditioning(neg_embeds)["embeds"]
        t = torch.as_tensor(t, device=latents.device)
        t = t.expand(b) if t.ndim == 0 else t
        x = latents.to(self.dtype)
        if guidance_scale == 1.0:
            return self._forward(x, t, encoder_hidden_states=embeds).sample.float()
        out = self._forward(torch.cat([x, x]), torch.cat([t, t]),
                         encoder_hidden_states=torch.cat([neg_embeds.expand(b, -1, -1), embeds])).sample.float()
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def model_output(self, latents: torch.Tensor, t: torch.Tensor, cond: Any, neg: Any,
                     guidance_scale: float) -> torch.Tensor:
        """The trajectory loop's model call: the guided epsilon (:meth:`guided_eps`)."""
        return self.guided_eps(latents, t, cond, neg, guidance_scale)

    # -- the DDIM schedule and step ---------------------------------------------------------------------
    def schedule(self, num_steps: int) -> torch.Tensor:
        """Set the DDIM schedule for ``num_steps`` steps; the step keys are its timesteps (T,) int64, x_T first."""
        self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.timesteps

    def start_latents(self, n: int, generator: Any, initial_noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_T: standard-normal draws (or ``initial_noise``) times the scheduler's ``init_noise_sigma``."""
        noise = self.initial_noise(n, generator) if initial_noise is None else initial_noise
        return noise.to(device=self.device, dtype=torch.float32) * self.scheduler.init_noise_sigma

    def step_from_output(self, out: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
                         sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """The DDIM transition's mean and std from the guided epsilon (:func:`~rlbench.diffusion.ddim.ddim_transition`)."""
        return ddim_transition(self.scheduler, out, t, latents, sampler.noise)

    @contextmanager
    def keeping_schedule(self) -> Iterator[None]:
        steps = self.scheduler.num_inference_steps
        try:
            yield
        finally:
            if steps:
                self.scheduler.set_timesteps(steps, device=self.device)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process at timestep(s) ``t``: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
        return self.scheduler.add_noise(x0, noise, t.reshape(-1) if torch.as_tensor(t).ndim == 0 else t)

    def last_key(self) -> torch.Tensor:
        """The key of the schedule's last step (DRaFT-LV re-noises x_0 to it)."""
        return self.scheduler.timesteps[-1]

    def predict_x0(self, out: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The clean latents the model output predicts at timestep(s) ``t`` (float32; affine in ``out``):
        epsilon ``(x - sqrt(1 - a_t) eps) / sqrt(a_t)``, v ``sqrt(a_t) x - sqrt(1 - a_t) v``, or the sample
        itself (``DDIMScheduler.step`` step 3)."""
        a = self.scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float32)[torch.as_tensor(t).long()]
        a = a.reshape(-1, *([1] * (x_t.ndim - 1))) if a.ndim else a
        out, x = out.float(), x_t.float()
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (x - (1 - a) ** 0.5 * out) / a**0.5
        if kind == "v_prediction":
            return a**0.5 * x - (1 - a) ** 0.5 * out
        return out

    def regression_pair(self, x0: torch.Tensor, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target) of the denoising loss on clean latents ``x0`` (RWR): t uniform over the training
        timesteps (jannerm/ddpo), target the noise (or the velocity for v-prediction models)."""
        sched = self.scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        return x_t, t, target

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with gradients (when enabled) flowing back into ``latents``, through the VAE
        decoder for latent models (direct reward fine-tuning trains through it)."""
        if self.vae is None:
            x = torch.nn.functional.pixel_shuffle(latents, self.pixel_shuffle) if self.pixel_shuffle > 1 else latents
        else:
            x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def save_trained(self, folder: Path) -> None:
        """Write the trained weights in the format plain diffusers loads.

        LoRA: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``).
        Full fine-tuning: ``unet/`` (``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``).
        """
        if self.train_mode == "lora":
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=self._lora_layers_for_saving(),
                                                      safe_serialization=True)
        else:
            self.denoiser.save_pretrained(folder / "unet", safe_serialization=True)


# -- the model registry's front door -----------------------------------------------------------------


def load_policy(name: str, revision: str = "") -> Policy:
    """A registered model name, a local diffusers folder, or a hub id (``org/name``).

    The family follows the folder's ``model_index.json``: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` loads
    as a :class:`~rlbench.diffusion.flow_policy.FlowPolicy`, anything else as a UNet :class:`DiffusionPolicy`.
    """
    from rlbench.diffusion.sampler import pipeline_kind

    if name in MODELS:
        return MODELS.make(name, {"revision": revision} if revision else {}, returns=Policy)
    path = Path(name).expanduser()
    if path.exists():
        kind = pipeline_kind(path)
        if kind in ("sd3", "flux"):
            from rlbench.diffusion.flow_policy import FlowPolicy

            return FlowPolicy.from_pretrained(path, kind, name=str(path))
        return DiffusionPolicy.from_pretrained(path, name=str(path))
    if _looks_like_hub_id(name):
        kind = pipeline_kind(name) or _hub_kind(name, revision)
        if kind in ("sd3", "flux"):
            from rlbench.diffusion.flow_policy import FlowPolicy

            return FlowPolicy.from_pretrained(name, kind, revision=revision or None)
        return DiffusionPolicy.from_pretrained(name, revision=revision or None)
    raise UnknownNameError(
        MODELS.unknown_message(name) + " Or give a diffusers folder (with unet/ or transformer/, scheduler/, "
        "text encoders, tokenizers) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
    )


def _hub_kind(name: str, revision: str) -> str | None:
    """The pipeline kind of a hub id not in the cache, from its model_index.json when online (None offline)."""
    if is_offline():
        return None
    try:
        from huggingface_hub import hf_hub_download

        from rlbench.diffusion.sampler import pipeline_kind

        folder = Path(hf_hub_download(name, "model_index.json", revision=revision or None)).parent
        return pipeline_kind(folder)
    except Exception:  # no such repo or no network: the loader names it
        return None


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
