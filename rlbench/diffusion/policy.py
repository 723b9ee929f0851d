"""The diffusion policy: what every model family shares (:class:`Policy`) and the UNet + DDIM family.

:class:`Policy` holds what does not depend on the family: the trainable denoiser (LoRA through peft or
the full module, trainables in float32), placement and dtypes, the rollout through the one trajectory
loop (:mod:`rlbench.diffusion.trajectory`), the step log-prob and transition the algorithms replay, and
exact save/load for resume. A family supplies its schedule, conditioning, model call, transition formula
and decoder.

:class:`DiffusionPolicy` is the UNet + DDIM family: the embedded default, any Stable Diffusion 1.x/2.x
checkpoint in diffusers format (hub id or local folder), Stable Diffusion XL (a ``StableDiffusionXLPipeline``
folder or hub id: its two text encoders through the pipeline's own ``encode_prompt``, the pooled embedding
and the micro-conditioning time ids as the UNet's ``added_cond_kwargs``), and the tiny random pipelines of
the tests. The DDIM step with log-prob lives in :mod:`rlbench.diffusion.ddim`. The flow-matching family
(SD3/SD3.5, FLUX.1) is :class:`rlbench.diffusion.flow_policy.FlowPolicy`.

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

from rlbench.diffusion.base import (BaseWeights, Policy, Rollout, _missing_weights_message,  # noqa: F401 (re-exported)
                                   load_cached_first, none_components)
from rlbench.diffusion.conditioning import Conditioning, as_conditioning
from rlbench.diffusion.ddim import ddim_transition
from rlbench.diffusion.sampler import Sampler
from rlbench.errors import ConfigError, UnknownNameError
from rlbench.registry import MODELS
from rlbench.utils.hf import quiet_hf


RLBENCH_MODEL_FILE = "rlbench.json"  # optional model-folder metadata: pixel_shuffle, default_prompts


class DiffusionPolicy(Policy):
    """The UNet + DDIM family: SD 1.x/2.x, SDXL, the shapes model, any UNet2DConditionModel pipeline.

    ``kind`` is "sd" (one text encoder; the conditioning is ``embeds``) or "sdxl" (``pipe``, the
    ``StableDiffusionXLPipeline`` whose ``encode_prompt`` conditions the UNet: ``embeds``, ``pooled`` and
    ``time_ids``, see :meth:`encode_prompts`).
    """

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
        pipe: Any | None = None,
    ) -> None:
        """Args:
        pixel_shuffle: for pixel-space models (no VAE) whose UNet works on space-to-depth
            images: the UNet's (C*r*r, H/r, W/r) sample is ``pixel_shuffle``-d by r to (C, H, W).
            A lossless reshaping that makes a small UNet r*r times cheaper per step.
        pipe: an SDXL model's ``StableDiffusionXLPipeline`` (its ``text_encoder_2``/``tokenizer_2`` and
            ``encode_prompt``); None for SD 1.x/2.x-style models. See :meth:`from_sdxl_pipeline`.
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
        self.pipe = pipe
        self.kind = "sd" if pipe is None else "sdxl"
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        if pipe is not None:  # the pipeline's modules are the policy's (one copy; encode_prompt reads them)
            pipe.scheduler = self.scheduler
        self._init_common(unet, name, default_prompts)

    def _frozen_modules(self) -> list[Any]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.vae) if m is not None]

    @classmethod
    def from_sdxl_pipeline(cls, pipe: Any, *, name: str = "model",
                           default_prompts: str = "simple-animals") -> DiffusionPolicy:
        """An SDXL policy over a loaded ``StableDiffusionXLPipeline`` (its scheduler converted to DDIM)."""
        return cls(pipe.unet, pipe.scheduler, pipe.text_encoder, pipe.tokenizer, pipe.vae, name=name,
                   default_prompts=default_prompts, pipe=pipe)

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype = torch.float32) -> DiffusionPolicy:
        """:meth:`Policy.to`; an SDXL VAE whose config says ``force_upcast`` stays float32 under fp16 frozen
        weights (SDXL base's VAE overflows in fp16: the pipeline upcasts it to decode), bf16 is kept."""
        super().to(device, frozen_dtype)
        if self.kind == "sdxl" and frozen_dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(dtype=torch.float32)
        return self

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, source: str | Path, *, revision: str | None = None, name: str | None = None,
        default_prompts: str = "simple-animals", kind: str | None = None,
    ) -> DiffusionPolicy:
        """Load from a local diffusers folder or a hub id (cache first; weights load on CPU, fp32).

        ``kind`` "sdxl" (or None with a ``model_index.json`` naming ``StableDiffusionXLPipeline``) loads through
        the SDXL pipeline (:meth:`_from_sdxl`); anything else component by component.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from rlbench.diffusion.sampler import pipeline_kind

        quiet_hf()
        source = str(source)
        if (kind or pipeline_kind(source)) == "sdxl":
            return cls._from_sdxl(source, revision=revision, name=name, default_prompts=default_prompts)
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

        return load_cached_first(load_all, source, revision, "diffusers model")

    @classmethod
    def _from_sdxl(cls, source: str, *, revision: str | None, name: str | None,
                   default_prompts: str) -> DiffusionPolicy:
        """``StableDiffusionXLPipeline.from_pretrained`` (cache first; CPU, fp32), as a DDIM-family policy."""
        from diffusers import StableDiffusionXLPipeline

        local = Path(source).is_dir()
        kw: dict[str, Any] = {"add_watermarker": False} if local else {"add_watermarker": False,
                                                                       "revision": revision or None}
        if local:
            kw.update(none_components(source))  # saved as None: pass None again

        def load(local_files_only: bool) -> DiffusionPolicy:
            pipe = StableDiffusionXLPipeline.from_pretrained(source, local_files_only=local_files_only, **kw)
            return cls.from_sdxl_pipeline(pipe, name=name or source, default_prompts=default_prompts)

        return load_cached_first(load, source, revision, "diffusers StableDiffusionXLPipeline")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @property
    def image_size(self) -> int:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else self.pixel_shuffle
        return self.latent_shape[1] * factor

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the images in pixels (SDXL's micro-conditioning sizes)."""
        _, h, w = self.latent_shape
        factor = self.image_size // h  # the VAE's (or pixel shuffle's) scale factor
        return h * factor, w * factor

    # -- text -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning: (B, L, D) text embeddings as ``embeds``; each distinct prompt is encoded
        once per call.

        SDXL (:meth:`_encode_sdxl`): ``embeds`` (B, 77, 768 + 1280), ``pooled`` (B, 1280) and ``time_ids`` (B, 6).
        """
        unique = list(dict.fromkeys(prompts))
        if self.kind == "sdxl":
            return self._encode_sdxl(prompts, unique)
        ids = self.tokenizer(
            unique, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        embeds = self.text_encoder(ids)[0].to(self.dtype)
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        return Conditioning({"embeds": embeds[index]})

    def _encode_sdxl(self, prompts: list[str], unique: list[str]) -> Conditioning:
        """SDXL's conditioning by the pipeline's own ``encode_prompt`` (``prompt_2`` = ``prompt``, no CFG pair):

        * ``embeds`` (B, 77, D1 + D2): both encoders' penultimate hidden states side by side (SDXL 768 + 1280);
        * ``pooled`` (B, P): ``text_encoder_2``'s projected pooled output (SDXL 1280), the UNet's ``text_embeds``;
        * ``time_ids`` (B, 6): the micro-conditioning ``original_size + crops_coords_top_left + target_size`` =
          (H, W, 0, 0, H, W) of the model's default image size, as ``_get_add_time_ids`` builds it when the
          pipeline is called without sizes.

        With ``force_zeros_for_empty_prompt`` (SDXL base: true) the empty prompt "" is zeros (``embeds`` and
        ``pooled``), as the pipeline's unconditional input when no negative prompt is given.
        """
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            unique, prompt_2=None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        if self.pipe.config.force_zeros_for_empty_prompt and "" in unique:
            empty = torch.tensor([p == "" for p in unique], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        h, w = self.image_hw
        projection = (self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None
                      else int(pooled.shape[-1]))
        time_ids = self.pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=self.dtype,
                                               text_encoder_projection_dim=projection)
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        return Conditioning({"embeds": embeds[index].to(self.dtype), "pooled": pooled[index].to(self.dtype),
                             "time_ids": time_ids.to(self.device).repeat(len(prompts), 1)})

    # -- denoising --------------------------------------------------------------------------------------
    def guided_eps(self, latents: torch.Tensor, t: torch.Tensor | int, embeds: torch.Tensor,
                   neg_embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Model output with classifier-free guidance ``u + w (c - u)`` in one UNet pass (float32).

        This guided output is what DDPO trains (paper App. E.1). Gradients flow when enabled. A conditioning
        with ``pooled`` and ``time_ids`` (SDXL) also goes to the UNet as ``added_cond_kwargs`` (``text_embeds``,
        ``time_ids``), concatenated [negative, positive] like the embeddings under guidance.
        """
        b = latents.shape[0]
        cond, neg = as_conditioning(embeds), as_conditioning(neg_embeds)
        embeds, neg_embeds = cond["embeds"], neg["embeds"]
        added = "pooled" in cond.batched
        t = torch.as_tensor(t, device=latents.device)
        t = t.expand(b) if t.ndim == 0 else t
        x = latents.to(self.dtype)
        if guidance_scale == 1.0:
            kw = {"added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}} if added else {}
            return self._forward(x, t, encoder_hidden_states=embeds, **kw).sample.float()
        kw = {}
        if added:
            kw["added_cond_kwargs"] = {
                "text_embeds": torch.cat([neg["pooled"].expand(b, -1), cond["pooled"]]),
                "time_ids": torch.cat([neg["time_ids"].expand(b, -1), cond["time_ids"]])}
        out = self._forward(torch.cat([x, x]), torch.cat([t, t]),
                         encoder_hidden_states=torch.cat([neg_embeds.expand(b, -1, -1), embeds]), **kw).sample.float()
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

        LoRA: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``; SDXL:
        ``StableDiffusionXLPipeline.load_lora_weights``, the UNet's adapters only).
        Full fine-tuning: ``unet/`` (``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``).
        """
        if self.train_mode == "lora":
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

            pipe_cls = StableDiffusionXLPipeline if self.kind == "sdxl" else StableDiffusionPipeline
            pipe_cls.save_lora_weights(folder, unet_lora_layers=self._lora_layers_for_saving(),
                                       safe_serialization=True)
        else:
            self.denoiser.save_pretrained(folder / "unet", safe_serialization=True)


# -- the model registry's front door -----------------------------------------------------------------


def load_policy(name: str, revision: str = "") -> Policy:
    """A registered model name, a local diffusers folder, or a hub id (``org/name``).

    The family follows the folder's ``model_index.json``: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` loads
    as a :class:`~rlbench.diffusion.flow_policy.FlowPolicy`, a ``StableDiffusionXLPipeline`` as an SDXL
    :class:`DiffusionPolicy` (through the pipeline), anything else as a UNet :class:`DiffusionPolicy`.
    """
    from rlbench.diffusion.sampler import _hub_pipeline_kind, pipeline_kind

    if name in MODELS:
        return MODELS.make(name, {"revision": revision} if revision else {}, returns=Policy)
    path = Path(name).expanduser()
    if path.exists():
        kind = pipeline_kind(path)
        if kind == "pixel-sd3":  # rlbench's pixel-space flow models (shapes-flow)
            from rlbench.diffusion.flow_policy import PixelFlowPolicy

            return PixelFlowPolicy.from_folder(path, name=str(path))
        if kind in ("sd3", "flux"):
            from rlbench.diffusion.flow_policy import FlowPolicy

            return FlowPolicy.from_pretrained(path, kind, name=str(path))
        return DiffusionPolicy.from_pretrained(path, name=str(path), kind="sdxl" if kind == "sdxl" else "sd")
    if _looks_like_hub_id(name):
        kind = pipeline_kind(name) or _hub_pipeline_kind(name, revision)
        if kind in ("sd3", "flux"):
            from rlbench.diffusion.flow_policy import FlowPolicy

            return FlowPolicy.from_pretrained(name, kind, revision=revision or None)
        return DiffusionPolicy.from_pretrained(name, revision=revision or None,
                                               kind="sdxl" if kind == "sdxl" else "sd")
    raise UnknownNameError(
        MODELS.unknown_message(name) + " Or give a diffusers folder (with unet/ or transformer/, scheduler/, "
        "text encoders, tokenizers) or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
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


def sdxl(revision: str = "") -> DiffusionPolicy:
    """Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0), DDIM, 1024 px."""
    return DiffusionPolicy.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", revision=revision or None,
                                           name="sd-xl", kind="sdxl")


# What `rlbench eval` uses by default for the DDPO paper's models (rlbench.eval.plan.model_eval_defaults):
# the paper's held-out prompt sets and a Hugging Face CLIP for diversity (skipped when not cached).
SD_EVAL_DEFAULTS: dict[str, Any] = {
    "prompt_sets": ["unseen-animals", "everyday-objects"],
    "features": "openai/clip-vit-base-patch32",
}
sd14.eval_defaults = SD_EVAL_DEFAULTS
sd15.eval_defaults = SD_EVAL_DEFAULTS
sdxl.eval_defaults = SD_EVAL_DEFAULTS
