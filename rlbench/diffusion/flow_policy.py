"""The flow-matching family: SD3/SD3.5 (``SD3Transformer2DModel``) and FLUX.1 (``FluxTransformer2DModel``).

A :class:`FlowPolicy` wraps a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (a local folder or a hub
id whose ``model_index.json`` names one): the pipeline's own ``encode_prompt`` (SD3: CLIP-L + CLIP-G (+ T5),
embeddings and pooled; FLUX: T5 embeddings, CLIP pooled, text ids), its latent packing (FLUX's 2x2 patches),
its VAE decode (``z / scaling_factor + shift_factor``) and its sigma schedule
(:func:`~rlbench.diffusion.flow.flow_sigmas`). Sampling and replay feed the transformer the same timestep
computed from the stored fp32 sigma (SD3: ``1000 sigma``, exactly ``scheduler.timesteps``; FLUX: ``1000 sigma /
1000``, what the pipeline passes), so the on-policy ratio is exactly 1.

Latents are kept unpacked, (B, C, h, w), as the pipelines draw them; FLUX packs them for each transformer call.
Classifier-free guidance (SD3) is one batched call ``u + w (c - u)``; FLUX-dev's distilled guidance is the
guidance embedding (``sample.guidance_scale``), and true CFG (``sample.true_cfg_scale`` > 1, a negative prompt
needed, as ``FluxPipeline``) a second call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlbench.diffusion.conditioning import Conditioning, as_conditioning
from rlbench.diffusion.flow import flow_log_prob, flow_sigmas, flow_transition, step_keys
from rlbench.diffusion.base import Policy, load_cached_first, none_components
from rlbench.diffusion.sampler import Sampler
from rlbench.errors import ConfigError
from rlbench.utils.hf import quiet_hf

# Flow-GRPO's LoRA targets: SD3 (scripts/train_sd3.py L417-434; DiffusionNFT L419-439), FLUX adds the
# feed-forwards (scripts/train_flux.py @74db691; Flow-Factory flux1.py L77-84).
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
FLUX_LORA_TARGETS = SD3_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# T5 prompt length: Flow-GRPO and DiffusionNFT encode with max_sequence_length = 128 (train_sd3.py L540-545);
# FluxPipeline's default is 512, Flow-GRPO's FLUX script keeps it.
SD3_MAX_SEQUENCE_LENGTH = 128
FLUX_MAX_SEQUENCE_LENGTH = 512

# Training presets per kind, from the reference recipes (applied under the user's settings; `rlbench config
# --set model.name=...` shows them).
FLOW_PRESETS: dict[str, dict[str, Any]] = {
    "sd3": {
        "sample.sampler": "flow-sde",
        "sample.noise_level": 0.7,       # flow_grpo config/base.py L54
        "sample.num_steps": 10,          # config/grpo.py geneval_sd3 L76 (eval: 40)
        "sample.guidance_scale": 4.5,    # L78
        "train.timestep_window": 0.9,    # timestep_fraction 0.99 of 10 -> 9: the last step is never trained (L90)
        "train.learning_rate": 3e-4,     # config/base.py L63-76
        "train.weight_decay": 1e-4,
        "model.lora_rank": 32,           # train_sd3.py L417-434: r = 32, alpha = 64
        "model.lora_alpha": 64.0,
        "model.lora_targets": list(SD3_LORA_TARGETS),
    },
    "flux": {
        "sample.sampler": "flow-sde",
        "sample.noise_level": 0.9,       # config/grpo.py pickscore_flux: noise level 0.9
        "sample.num_steps": 6,           # pickscore_flux: 6 training steps (eval 28)
        "sample.guidance_scale": 3.5,    # the guidance embedding, no CFG
        "train.timestep_window": 0.84,   # int(6 * 0.84) = 5: the last step is never trained
        "train.learning_rate": 3e-4,
        "train.weight_decay": 1e-4,
        "model.lora_rank": 64,           # scripts/train_flux.py: r = 64, alpha = 128
        "model.lora_alpha": 128.0,
        "model.lora_targets": list(FLUX_LORA_TARGETS),
    },
}


class FlowPolicy(Policy):
    """A flow-matching transformer pipeline viewed as a policy over its sampler's steps."""

    family = "flow"
    default_sampler = "flow-sde"

    def __init__(self, pipe: Any, kind: str, *, name: str = "model", default_prompts: str = "simple-animals",
                 resolution: int = 0) -> None:
        if kind not in ("sd3", "flux"):
            raise ValueError(f"kind must be 'sd3' or 'flux', got {kind!r}")
        self.pipe = pipe
        self.kind = kind
        self.scheduler = pipe.scheduler
        self.vae = pipe.vae
        self.default_lora_targets = SD3_LORA_TARGETS if kind == "sd3" else FLUX_LORA_TARGETS
        self.true_cfg_scale = 1.0
        self._keys: torch.Tensor | None = None
        self._train_sigmas = self.scheduler.sigmas.clone().float()  # the 1000 training sigmas, before any schedule
        self._init_common(pipe.transformer, name, default_prompts)
        self.set_resolution(resolution)

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str | Path, kind: str, *, revision: str | None = None, name: str | None = None,
                        default_prompts: str = "simple-animals") -> FlowPolicy:
        """Load a diffusers SD3 or FLUX pipeline from a folder or a hub id (cache first; CPU, fp32).

        A folder saved without T5 (``text_encoder_3`` null in ``model_index.json``) loads without it, as diffusers
        allows (the T5 part of the prompt embeddings is then zeros).
        """
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        quiet_hf()
        source = str(source)
        local = Path(source).is_dir()
        pipe_cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
        kw: dict[str, Any] = {} if local else {"revision": revision or None}
        if local:
            kw.update(none_components(source))  # components saved as None must be passed as None again

        def load(local_files_only: bool) -> FlowPolicy:
            pipe = pipe_cls.from_pretrained(source, local_files_only=local_files_only, **kw)
            return cls(pipe, kind, name=name or source, default_prompts=default_prompts)

        return load_cached_first(load, source, revision, f"diffusers {pipe_cls.__name__}")

    def _frozen_modules(self) -> list[Any]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        """What the image size must be divisible by in latent pixels: the patch (SD3) or FLUX's 2x2 packing."""
        return int(self.denoiser.config.patch_size) if self.kind == "sd3" else 2

    def default_resolution(self) -> int:
        size = self.denoiser.config.sample_size if self.kind == "sd3" else None
        if self.kind == "flux":  # FluxPipeline: default_sample_size 128 latents -> 1024 px; tiny models set theirs
            size = getattr(self.pipe, "default_sample_size", 128)
        return int(size) * self.vae_scale_factor

    def set_resolution(self, resolution: int) -> None:
        """Sample ``resolution`` x ``resolution`` images (0 = the model's default); refused when the VAE and the
        transformer's patching cannot take it (the pipelines' ``check_inputs``)."""
        res = int(resolution) or self.default_resolution()
        step = self.vae_scale_factor * self.patch_size
        if res <= 0 or res % step:
            lower = max(step, res - res % step)
            raise ConfigError(
                f"sample.resolution = {res} px does not fit {self.name}: the image size must be a multiple of "
                f"{step} (VAE factor {self.vae_scale_factor} x {'patch' if self.kind == 'sd3' else 'packing'} "
                f"{self.patch_size}); e.g. {lower}.")
        if self.kind == "sd3":
            limit = getattr(self.denoiser.config, "pos_embed_max_size", None)
            tokens = res // step
            if limit and tokens > limit:
                raise ConfigError(f"sample.resolution = {res} px is {tokens} patches a side, more than {self.name}'s "
                                  f"pos_embed_max_size ({limit}); use at most {limit * step} px.")
        self.resolution = res
        self._img_ids = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        channels = self.denoiser.config.in_channels if self.kind == "sd3" else self.denoiser.config.in_channels // 4
        return (int(channels), side, side)

    @property
    def image_size(self) -> int:
        return self.resolution

    def check_config(self, cfg: Any) -> None:
        self.set_resolution(cfg.sample.resolution)
        s = cfg.sample
        if self.kind == "sd3" and s.true_cfg_scale != 1.0:
            raise ConfigError("sample.true_cfg_scale is FLUX's true classifier-free guidance; SD3 guides with "
                              "sample.guidance_scale (set true_cfg_scale to 1).")
        self.true_cfg_scale = float(s.true_cfg_scale)

    # -- text -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The pipeline's own prompt encoding, each distinct prompt once: SD3 ``embeds`` + ``pooled``; FLUX
        ``embeds`` + ``pooled`` + the shared ``text_ids``."""
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        if self.kind == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=unique, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=SD3_MAX_SEQUENCE_LENGTH)
            return Conditioning({"embeds": embeds[index].to(self.dtype), "pooled": pooled[index].to(self.dtype)})
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=unique, prompt_2=None, device=self.device, max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH)
        return Conditioning({"embeds": embeds[index].to(self.dtype), "pooled": pooled[index].to(self.dtype)},
                            {"text_ids": text_ids})

    # -- the transformer call -----------------------------------------------------------------------------
    def _sigma(self, key: torch.Tensor, n: int, device: Any) -> torch.Tensor:
        key = torch.as_tensor(key, device=device, dtype=torch.float32)
        sigma = key[..., 0]
        return sigma.expand(n) if sigma.ndim == 0 else sigma

    def _image_ids(self) -> torch.Tensor:
        if self._img_ids is None:
            from diffusers import FluxPipeline

            _, h, w = self.latent_shape
            self._img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
        return self._img_ids

    def _call(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """One transformer call on unpacked latents; the velocity, float32, unpacked."""
        t = sigma * 1000  # fp32, bit-identical to scheduler.timesteps (= sigmas * num_train_timesteps)
        if self.kind == "sd3":
            out = self._forward(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=cond["embeds"],
                                pooled_projections=cond["pooled"], return_dict=False)[0]
            return out.float()
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x.to(self.dtype), b, c, h, w)
        guidance = None
        if self.denoiser.config.guidance_embeds:  # FLUX-dev's distilled guidance (pipeline L845-849)
            guidance = torch.full((b,), float(guidance_scale), device=x.device, dtype=torch.float32)
        out = self._forward(hidden_states=packed, timestep=(t / 1000).to(self.dtype), guidance=guidance,
                            pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"],
                            txt_ids=cond["text_ids"], img_ids=self._image_ids(), return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor).float()

    def model_output(self, latents: torch.Tensor, t: torch.Tensor, cond: Any, neg: Any,
                     guidance_scale: float) -> torch.Tensor:
        """The guided velocity at step key ``t`` (float32; gradients flow when enabled)."""
        cond, neg = as_conditioning(cond), as_conditioning(neg)
        b = latents.shape[0]
        sigma = self._sigma(t, b, latents.device)
        if self.kind == "flux":
            v = self._call(latents, sigma, cond, guidance_scale)
            if self.true_cfg_scale > 1.0:
                v_neg = self._call(latents, sigma, neg.expand(b), guidance_scale)
                v = v_neg + self.true_cfg_scale * (v - v_neg)
            return v
        if guidance_scale == 1.0:
            return self._call(latents, sigma, cond, guidance_scale)
        both = self._call(torch.cat([latents, latents]), torch.cat([sigma, sigma]), Conditioning.pair(neg, cond),
                          guidance_scale)
        uncond, text = both.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    # -- the schedule and the step --------------------------------------------------------------------------
    def schedule(self, num_steps: int) -> torch.Tensor:
        """The pipeline's sigma schedule for ``num_steps`` steps as (N, 3) step keys (sigma, sigma_next, sigma~)."""
        _, h, w = self.latent_shape
        tokens = (h // self.patch_size) * (w // self.patch_size)
        sigmas = flow_sigmas(self.scheduler, num_steps, image_seq_len=tokens, flux_sigmas=self.kind == "flux",
                             device=self.device)
        self._keys = step_keys(sigmas)
        return self._keys

    def start_latents(self, n: int, generator: Any, initial_noise: torch.Tensor | None = None) -> torch.Tensor:
        """x at sigma = 1: standard-normal draws (FlowMatchEulerDiscreteScheduler's init sigma is 1)."""
        noise = self.initial_noise(n, generator) if initial_noise is None else initial_noise
        return noise.to(device=self.device, dtype=torch.float32)

    def step_from_output(self, out: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
                         sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
        return flow_transition(sampler.name, sampler.noise, out, latents, t)

    def log_prob(self, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        return flow_log_prob(sampler.name, x_next, mean, std)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process ``(1 - sigma) x0 + sigma noise`` at the key's sigma."""
        sigma = self._sigma(t, x0.shape[0], x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - sigma) * x0 + sigma * noise

    def predict_x0(self, out: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The clean latents the velocity predicts: ``x - sigma v`` (float32)."""
        sigma = self._sigma(t, x_t.shape[0], x_t.device).reshape(-1, *([1] * (x_t.ndim - 1)))
        return x_t.float() - sigma * out.float()

    def last_key(self) -> torch.Tensor:
        if self._keys is None:
            raise RuntimeError("no schedule set: sample first")
        return self._keys[-1]

    def regression_pair(self, x0: torch.Tensor, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_sigma, key, target) of the flow-matching loss on clean latents ``x0``: sigma uniform over the
        scheduler's 1000 training sigmas (``compute_density_for_timestep_sampling("none")``), x_sigma =
        (1 - sigma) x0 + sigma eps, target the velocity eps - x0 (train_dreambooth_sd3.py L1593, L1632)."""
        idx = torch.randint(0, len(self._train_sigmas), (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        sigma = self._train_sigmas[idx].to(x0.device)
        key = torch.stack([sigma, torch.zeros_like(sigma), sigma], dim=-1)
        return self.noised(x0, noise, key), key, noise - x0

    # -- images -----------------------------------------------------------------------------------------
    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]: ``vae.decode(z / scaling_factor + shift_factor)`` (both pipelines)."""
        shift = self.vae.config.shift_factor or 0.0
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        x = self.vae.decode(z, return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # -- saving ---------------------------------------------------------------------------------------
    def save_trained(self, folder: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` (``StableDiffusion3Pipeline``/``FluxPipeline``
        ``.load_lora_weights(folder)``); full fine-tuning: ``transformer/``."""
        if self.train_mode == "lora":
            from diffusers import FluxPipeline, StableDiffusion3Pipeline
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.denoiser)  # diffusers' SD3/FLUX LoRA scripts save this format
            scale = self.lora_config["lora_alpha"] / self.lora_config["r"] if self.lora_config else 1.0
            if scale != 1.0:  # no lora_alpha in the file: fold alpha / r into B (loaders use scale 1)
                state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
            pipe_cls = StableDiffusion3Pipeline if self.kind == "sd3" else FluxPipeline
            pipe_cls.save_lora_weights(folder, transformer_lora_layers=state, safe_serialization=True)
        else:
            self.denoiser.save_pretrained(folder / "transformer", safe_serialization=True)


class PixelFlowPolicy(FlowPolicy):
    """A pixel-space SD3 transformer (no VAE: a lossless pixel shuffle of ``pixel_shuffle``) with its own CLIP text
    encoder (``CLIPTextModelWithProjection``): the shapes world's ``shapes-flow``. Folder: ``transformer/``,
    ``scheduler/``, ``text_encoder/``, ``tokenizer/`` and ``rlbench.json`` with ``"kind": "pixel-sd3"``."""

    def __init__(self, transformer: Any, scheduler: Any, text_encoder: Any, tokenizer: Any, *, name: str = "model",
                 default_prompts: str = "simple-animals", pixel_shuffle: int = 2) -> None:
        self.pipe = None
        self.kind = "sd3"
        self.scheduler = scheduler
        self.vae = None
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.pixel_shuffle = pixel_shuffle
        self.default_lora_targets = SD3_LORA_TARGETS
        self.true_cfg_scale = 1.0
        self._keys = None
        self._train_sigmas = scheduler.sigmas.clone().float()
        self._init_common(transformer, name, default_prompts)
        self.set_resolution(0)

    @classmethod
    def from_folder(cls, folder: str | Path, *, name: str | None = None) -> PixelFlowPolicy:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from rlbench.errors import ConfigError
        from rlbench.utils.hf import quiet_hf

        quiet_hf()
        folder = Path(folder)
        try:
            meta = json.loads((folder / "rlbench.json").read_text(encoding="utf-8"))
            return cls(SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True),
                       FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
                       CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder",
                                                                   local_files_only=True),
                       CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
                       name=name or str(folder), default_prompts=meta.get("default_prompts", "simple-animals"),
                       pixel_shuffle=int(meta.get("pixel_shuffle", 2)))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the shapes-flow model in {str(folder)!r}: {exc}") from exc

    def _frozen_modules(self) -> list[Any]:
        return [self.text_encoder]

    @property
    def vae_scale_factor(self) -> int:
        return self.pixel_shuffle

    def default_resolution(self) -> int:
        return int(self.denoiser.config.sample_size) * self.pixel_shuffle

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """``embeds``: the text encoder's hidden states (B, L, D); ``pooled``: its projected EOS state (B, P)."""
        unique = list(dict.fromkeys(prompts))
        ids = self.tokenizer(unique, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoder(ids)
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        return Conditioning({"embeds": out.last_hidden_state[index].to(self.dtype),
                             "pooled": out.text_embeds[index].to(self.dtype)})

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pixel_shuffle(latents.float(), self.pixel_shuffle)
        return (x / 2 + 0.5).clamp(0, 1)


# -- hub aliases (`rlbench models list`) ----------------------------------------------------------------

def _alias(hub_id: str, kind: str, name: str, doc: str):
    def factory(revision: str = "") -> FlowPolicy:
        return FlowPolicy.from_pretrained(hub_id, kind, revision=revision or None, name=name)

    factory.__doc__ = doc
    factory.family = "flow"
    factory.train_defaults = dict(FLOW_PRESETS[kind])
    factory.eval_defaults = {"prompt_sets": ["unseen-animals", "everyday-objects"],
                             "features": "openai/clip-vit-base-patch32"}
    return factory


sd35_medium = _alias("stabilityai/stable-diffusion-3.5-medium", "sd3", "sd-3.5-medium",
                     "Stable Diffusion 3.5 Medium (stabilityai/stable-diffusion-3.5-medium), Flow-GRPO's base model.")
sd35_large = _alias("stabilityai/stable-diffusion-3.5-large", "sd3", "sd-3.5-large",
                    "Stable Diffusion 3.5 Large (stabilityai/stable-diffusion-3.5-large).")
flux1_dev = _alias("black-forest-labs/FLUX.1-dev", "flux", "flux.1-dev",
                   "FLUX.1-dev (black-forest-labs/FLUX.1-dev): guidance-distilled, guidance embedding 3.5.")
flux1_schnell = _alias("black-forest-labs/FLUX.1-schnell", "flux", "flux.1-schnell",
                       "FLUX.1-schnell (black-forest-labs/FLUX.1-schnell): timestep-distilled, no guidance.")
flux1_schnell.train_defaults.update({"sample.num_steps": 4, "sample.guidance_scale": 1.0})  # schnell: 4 steps, no CFG
