"""What every model family's policy shares: :class:`Policy`, the :class:`Rollout` it samples, and
:class:`BaseWeights` (the base model swapped in for eval's KL and GRPO's reference).

:class:`Policy` holds what does not depend on the family: the trainable denoiser (LoRA through peft or
the full module, trainables in float32), placement and dtypes, the rollout through the one trajectory
loop (:mod:`rlbench.diffusion.trajectory`), the step log-prob and transition the algorithms replay, and
exact save/load for resume. A family (:mod:`rlbench.diffusion.policy` for UNet + DDIM,
:mod:`rlbench.diffusion.flow_policy` for SD3/FLUX) supplies its schedule, conditioning, model call,
transition formula and decoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlbench.diffusion.conditioning import as_conditioning
from rlbench.diffusion.gaussian import gaussian_log_prob
from rlbench.diffusion.sampler import FAMILY_SAMPLERS, Sampler
from rlbench.diffusion.trajectory import sample_trajectory
from rlbench.errors import ConfigError, WeightsNotAvailable


@dataclass
class Rollout:
    """What sampling returns: images plus the stored trajectory (per-process, on the policy device).

    Shapes: images (B,3,H,W) float32 in [0,1]; latents (B,W+1,...) float32, the states entering and leaving
    the W stochastic steps (all T steps unless an SDE window is set: x_T ... x_0); log_probs (B,W) float32;
    timesteps (W,...) the step keys (DDIM: int64 timesteps; flow: float32 sigma triples); prompt_embeds the
    prompts' :class:`~rlbench.diffusion.conditioning.Conditioning`; final (B,...) x_0.
    """

    images: torch.Tensor
    latents: torch.Tensor | None
    log_probs: torch.Tensor | None
    timesteps: torch.Tensor | None
    prompt_embeds: Any
    final: torch.Tensor | None = None


class BaseWeights:
    """The base model's values of a policy's trainable tensors, swapped in and out without copies.

    Made right after ``setup_training`` (before any checkpoint is loaded): for full fine-tuning these
    are the pretrained UNet weights; for LoRA the fresh adapters, whose B matrices are zero, so the
    adapted UNet computes exactly the base model. :meth:`active` swaps the tensors' storage
    (``param.data``) in O(1) per tensor, so evaluating the base model at every step costs only its
    forward pass.
    """

    def __init__(self, policy: Any, state: dict[str, torch.Tensor] | None = None) -> None:
        params = dict(policy.denoiser.named_parameters())
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



class Policy:
    """A text-to-image model viewed as a policy over denoising steps: what every family shares.

    A family sets ``denoiser`` (the trainable network), ``family`` ("ddim" or "flow"), and implements
    ``schedule``, ``start_latents``, ``encode_prompts``, ``model_output``, ``step_from_output``,
    ``decode_differentiable``, ``latent_shape``, ``noised`` (the forward process) and ``save_trained``.
    """

    family: str = ""
    default_sampler: str = ""
    # LoRA targets when the config names none of its own (model.lora_targets = [] or the UNet default).
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def _init_common(self, denoiser: Any, name: str, default_prompts: str) -> None:
        self.denoiser = denoiser
        self.name = name
        self.default_prompts = default_prompts
        self.train_mode = "frozen"
        self.lora_config: dict[str, Any] | None = None
        self._forward = denoiser  # what forward passes call: the denoiser, or its DDP wrapper after prepare()
        self._dtype: torch.dtype | None = None
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.denoiser.requires_grad_(False)

    @property
    def unet(self) -> Any:
        """The trainable denoiser (a UNet, or a flow transformer): ``.train()``, ``.eval()``, parameters."""
        return self.denoiser

    def _frozen_modules(self) -> list[Any]:
        raise NotImplementedError

    # -- trainable parameters -----------------------------------------------------------------------
    def setup_training(self, train_mode: str = "lora", rank: int = 4, alpha: float = 4.0,
                       targets: list[str] | tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> None:
        """Make LoRA adapters (peft) or the full denoiser trainable, in float32."""
        if train_mode == "lora":
            from peft import LoraConfig

            targets = list(targets) or list(self.default_lora_targets)
            config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
            try:
                self.denoiser.add_adapter(config)
            except ValueError as exc:
                raise ConfigError(f"model.lora_targets {targets} do not match {type(self.denoiser).__name__} "
                                  f"modules: {exc}") from exc
            self.lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
        elif train_mode == "full":
            self.denoiser.requires_grad_(True)
        else:
            raise ConfigError(f"model.train_mode must be 'lora' or 'full', got {train_mode!r}.")
        for p in self.denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.train_mode = train_mode
        self._dtype = None

    def prepare(self, accelerator: Any) -> None:
        """Let ``accelerator`` wrap the denoiser (DDP when distributed); forward passes go through the wrapper,
        so gradients of every process are really all-reduced (early ddpo-pytorch and trl bypassed it)."""
        self._forward = accelerator.prepare(self.denoiser)

    @property
    def forward_module(self) -> Any:
        """The module forward passes run through (the DDP wrapper after :meth:`prepare`), for ``no_sync``."""
        return self._forward

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def named_trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.denoiser.named_parameters() if p.requires_grad}

    # -- placement ----------------------------------------------------------------------------------
    def to(self, device: torch.device | str, frozen_dtype: torch.dtype = torch.float32) -> Policy:
        """Move to ``device``; frozen weights in ``frozen_dtype``, trainable ones stay float32."""
        for module in [*self._frozen_modules(), self.denoiser]:
            module.to(device=device)
        # Keep the trainable tensors aside so a cast of the denoiser does not round them through
        # frozen_dtype (trained LoRA weights would lose precision on a fp16/bf16 round trip).
        trainable = [(p, p.data) for p in self.denoiser.parameters() if p.requires_grad]
        for module in [*self._frozen_modules(), self.denoiser]:
            if module.dtype != frozen_dtype:
                module.to(dtype=frozen_dtype)
        for p, data in trainable:
            p.data = data.float()
        self._dtype = None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen denoiser weights (inputs are cast to it); the first frozen parameter decides,
        found without walking every parameter (this is read on every model call)."""
        if self._dtype is None:  # cached: read on every call; to() and setup_training() reset it
            frozen = next((p for p in self.denoiser.parameters() if not p.requires_grad), None)
            self._dtype = (frozen if frozen is not None else next(self.denoiser.parameters())).dtype
        return self._dtype

    # -- the sampler ----------------------------------------------------------------------------------
    def as_sampler(self, sampler: Sampler | float | None) -> Sampler:
        """A :class:`Sampler`; a bare number is the family's default sampler at that noise level (DDIM eta)."""
        if isinstance(sampler, Sampler):
            if sampler.family != self.family:
                raise ConfigError(
                    f"the {sampler.name} sampler belongs to the {sampler.family} family, but {self.name} is a "
                    f"{self.family} model; its samplers: {', '.join(FAMILY_SAMPLERS[self.family])}.")
            return sampler
        return Sampler(self.default_sampler, float(1.0 if sampler is None else sampler))

    def initial_noise(self, n: int, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """``n`` standard-normal x_T draws (before any scaling), as sampling draws them."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((n, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)

    def step_noise(self, x: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """One step's standard-normal noise z (float32, ``x``'s shape), drawn like ``DDIMScheduler.step``."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(tuple(x.shape), generator=generator, device=x.device, dtype=torch.float32)

    def log_prob(self, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        """Log-prob of a step's action, averaged over the non-batch dims (the Gaussian density; CPS overrides)."""
        return gaussian_log_prob(x_next, mean, std)

    def check_config(self, cfg: Any) -> None:
        """Raise ConfigError for settings of a resolved config that this loaded model cannot run (before compute)."""

    @contextmanager
    def keeping_schedule(self) -> Iterator[None]:
        """Within the block sampling may reset the schedule (another step count); it is put back after."""
        yield

    @torch.no_grad()
    def sample(self, prompts: list[str], *, num_steps: int, guidance_scale: float, generator: torch.Generator,
               eta: float | None = None, sampler: Sampler | None = None, negative_prompt: str = "",
               prompt_embeds: Any = None, neg_embeds: Any = None, initial_noise: torch.Tensor | None = None,
               window_start: int | None = None) -> Rollout:
        """Sample images for ``prompts`` with the stochastic policy, keeping the trajectory.

        ``sampler`` (or for the DDIM family ``eta``) chooses the transition. Noise comes from ``generator``
        (a CPU generator makes runs reproducible across devices); ``initial_noise`` (B, ...), if given, is
        x_T's standard-normal draw instead (e.g. shared within a GRPO group), and only the steps' noise comes
        from ``generator``. With an SDE window, ``window_start`` is its first step (default: drawn from
        ``generator`` as the sampler says).
        """
        sampler = self.as_sampler(sampler if sampler is not None else eta)
        cond = self.encode_prompts(prompts) if prompt_embeds is None else as_conditioning(prompt_embeds)
        neg = self.encode_prompts([negative_prompt]) if neg_embeds is None else as_conditioning(neg_embeds)
        if initial_noise is not None and tuple(initial_noise.shape) != (len(prompts), *self.latent_shape):
            raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected "
                             f"{(len(prompts), *self.latent_shape)}")
        if window_start is None:
            window_start = sampler.window_start(num_steps, 0, lambda lo, hi: torch.randint(
                lo, hi + 1, (1,), generator=generator)) if sampler.window else 0
        traj = sample_trajectory(self, cond, neg, num_steps=num_steps, sampler=sampler,
                                 guidance_scale=guidance_scale, generator=generator, initial_noise=initial_noise,
                                 window_start=window_start)
        return Rollout(images=self.decode(traj.final), latents=traj.latents, log_probs=traj.log_probs,
                       timesteps=traj.keys, prompt_embeds=cond, final=traj.final)

    # -- replaying a stored step ------------------------------------------------------------------------
    def transition(self, latents: torch.Tensor, t: torch.Tensor, embeds: Any, neg_embeds: Any,
                   guidance_scale: float, eta: Sampler | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the policy's step ``p(x_next | x) = N(mean, std^2 I)`` under the current weights
        (gradients flow into the mean when enabled). ``t`` is the step key (DDIM: timestep; flow: sigmas)."""
        out = self.model_output(latents, t, embeds, neg_embeds, guidance_scale)
        return self.step_from_output(out, t, latents, self.as_sampler(eta))

    def step_log_prob(self, latents: torch.Tensor, t: torch.Tensor, next_latents: torch.Tensor, embeds: Any,
                      neg_embeds: Any, guidance_scale: float, eta: Sampler | float) -> torch.Tensor:
        """Log-prob of the stored action ``next_latents`` at (latents, t) under the current weights."""
        sampler = self.as_sampler(eta)
        mean, std = self.transition(latents, t, embeds, neg_embeds, guidance_scale, sampler)
        return self.log_prob(next_latents.to(latents.dtype), mean, std, sampler)

    def step_log_prob_and_mean(self, latents: torch.Tensor, t: torch.Tensor, next_latents: torch.Tensor,
                               embeds: Any, neg_embeds: Any, guidance_scale: float, eta: Sampler | float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of ``next_latents``, the step's mean, its std): :meth:`step_log_prob` plus what a KL
        penalty needs; the same numbers."""
        sampler = self.as_sampler(eta)
        mean, std = self.transition(latents, t, embeds, neg_embeds, guidance_scale, sampler)
        if bool((torch.as_tensor(std) <= 0).any()):
            raise ValueError("a trained step has std 0 (eta or the noise level is 0, or the last step of a "
                             "deterministic schedule end): it has no density")
        return self.log_prob(next_latents.to(latents.dtype), mean, std, sampler), mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> images (B,3,H,W) float32 in [0,1]."""
        return self.decode_differentiable(latents)

    # -- saving ---------------------------------------------------------------------------------------
    def save_state(self, folder: Path) -> None:
        """Exact trainable state for resume (safetensors), plus :meth:`save_trained`'s files."""
        from safetensors.torch import save_file

        save_file({n: t.contiguous().cpu() for n, t in self.named_trainable_state().items()},
                  str(folder / "trainable.safetensors"))
        self.save_trained(folder)

    def _lora_layers_for_saving(self) -> dict[str, torch.Tensor]:
        """The adapters in diffusers' key format, with peft's scale alpha / r folded into B: the saved file
        carries no lora_alpha and loaders then use alpha = rank (scale 1), so every loader computes what this
        model computes."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.denoiser)
        scale = self.lora_config["lora_alpha"] / self.lora_config["r"] if self.lora_config else 1.0
        if scale != 1.0:
            state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
        return convert_state_dict_to_diffusers(state)

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
        params = dict(self.denoiser.named_parameters())
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


def load_cached_first(load: Any, source: str, revision: str | None, what: str) -> Any:
    """``load(local_files_only)`` from the local files first: a folder that does not load is one ConfigError naming
    it; a hub id not in the cache is, offline, the ``hf download`` command that fixes it, online a download."""
    from rlbench.weights import is_offline

    try:
        return load(True)
    except (OSError, ValueError) as first:
        if Path(source).is_dir():
            raise ConfigError(f"cannot load the {what} in {source!r}: {first}") from first
        if is_offline():
            raise WeightsNotAvailable(_missing_weights_message(source, revision)) from first
        try:
            return load(False)
        except Exception as exc:
            raise WeightsNotAvailable(_missing_weights_message(source, revision) + f" ({exc})") from exc


def none_components(folder: str | Path) -> dict[str, None]:
    """The components a pipeline folder saved as None (``[null, null]`` in model_index.json): diffusers reloads it
    only when they are passed as None again."""
    import json

    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return {}
    return {k: None for k, v in json.loads(index.read_text(encoding="utf-8")).items()
            if isinstance(v, list) and v and v[0] is None}
