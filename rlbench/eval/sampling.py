"""Deterministic, paired sampling for evaluation, with the exact KL from the base model on the way.

Every image's noise — the initial latent and the noise of every DDIM step — comes from its own
generator seeded by :func:`sample_seed` ``(eval seed, prompt, image index)``. The same image of the
same prompt therefore gets the same noise at every checkpoint of every run and in any batch, so a
difference between two checkpoints is the weights', not luck, and statistics can be paired.

While a fine-tuned policy samples, the base model's guided epsilon is evaluated on the same states
``x_t`` (the trainable weights are swapped for the base ones, :class:`~rlbench.diffusion.policy.BaseWeights`) and the exact KL
between the two Gaussian DDIM transitions is summed over steps (:mod:`rlbench.eval.kl`).

Everything here runs on the calling thread (torch is never used from worker threads).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlbench.diffusion.ddim import ddim_step_with_logprob, ddim_transition
from rlbench.diffusion.policy import BaseWeights
from rlbench.eval.kl import transition_kl
from rlbench.utils.images import to_uint8


def sample_seed(eval_seed: int, prompt: str, index: int) -> int:
    """The seed of image ``index`` of ``prompt``: a hash of (eval seed, prompt, index), 63 bits.

    Independent of the checkpoint, the run, the prompt set and the batch the image is sampled in.
    """
    digest = hashlib.sha256(f"rlbench-eval\x00{int(eval_seed)}\x00{prompt}\x00{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class SampledBatch:
    """Images (uint8, (B, H, W, 3)) and, when a base model was given, the KL of each trajectory.

    ``kl``: (B,) float64, sum over steps of the exact per-step Gaussian KL at ``kl_eta``;
    ``kl_steps``: how many steps entered the sum (steps whose sigma is 0 have no density and are left out).
    """

    images: np.ndarray
    kl: np.ndarray | None = None
    kl_steps: int = 0


@torch.no_grad()
def sample_paired(
    policy: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    neg_embeds: torch.Tensor,
    base: BaseWeights | None = None,
    kl_eta: float | None = None,
) -> SampledBatch:
    """Sample one image per (prompt, seed) with per-image generators; optionally the KL from ``base``.

    ``eta > 0``: the stochastic DDIM policy (:func:`~rlbench.diffusion.ddim.ddim_step_with_logprob`,
    per-step noise from each image's generator); ``eta = 0``: the deterministic DDIM (ODE) sampler.
    With ``base`` and ``kl_eta > 0``, at every step the KL between ``N(mu_policy, s^2 I)`` and
    ``N(mu_base, s^2 I)`` with ``s = sigma_t(kl_eta)`` is added, both means taken at the current state.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = policy.device
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    embeds = policy.encode_prompts(list(prompts))
    scheduler = policy.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    latents = randn_tensor((len(prompts), *policy.latent_shape), generator=generators, device=device,
                           dtype=torch.float32) * scheduler.init_noise_sigma
    with_kl = base is not None and kl_eta is not None and kl_eta > 0
    kl = torch.zeros(len(prompts), dtype=torch.float64, device=device) if with_kl else None
    kl_steps = 0
    for t in scheduler.timesteps:
        eps = policy.guided_eps(latents, t, embeds, neg_embeds, guidance_scale)
        if with_kl:
            with base.active():
                eps_base = policy.guided_eps(latents, t, embeds, neg_embeds, guidance_scale)
            mean, std = ddim_transition(scheduler, eps, t, latents, kl_eta)
            mean_base, _ = ddim_transition(scheduler, eps_base, t, latents, kl_eta)
            step = transition_kl(mean, mean_base, std)
            if step is not None:
                kl += step
                kl_steps += 1
        if eta > 0:
            latents, _ = ddim_step_with_logprob(scheduler, eps, t, latents, eta=eta, generator=generators)
        else:
            latents, _ = ddim_transition(scheduler, eps, t, latents, 0.0)
    images = to_uint8(policy.decode(latents), layout="hwc")
    return SampledBatch(images, kl.cpu().numpy() if kl is not None else None, kl_steps)
