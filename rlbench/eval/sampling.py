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

from rlbench.diffusion.conditioning import as_conditioning
from rlbench.diffusion.policy import BaseWeights
from rlbench.diffusion.sampler import Sampler
from rlbench.diffusion.trajectory import sample_trajectory
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
    eta: float | None = None,
    guidance_scale: float,
    neg_embeds: Any,
    base: BaseWeights | None = None,
    kl_eta: float | None = None,
    sampler: Sampler | None = None,
    kl_sampler: Sampler | None = None,
) -> SampledBatch:
    """Sample one image per (prompt, seed) with per-image generators; optionally the KL from ``base``.

    ``sampler`` (or for the DDIM family ``eta``; 0 = the deterministic sampler) chooses the transition, through
    the one trajectory loop (:func:`~rlbench.diffusion.trajectory.sample_trajectory`). With ``base`` and a
    stochastic ``kl_sampler`` (or ``kl_eta > 0``), at every stochastic step of it the KL between its transitions
    under the policy and under the base model, both taken at the current state, is added. A windowed sampler
    evaluates with its window at the first allowed step, and every step draws its noise, so images stay paired.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sampler = policy.as_sampler(sampler if sampler is not None else eta)
    if kl_sampler is None and kl_eta is not None and kl_eta > 0:
        kl_sampler = policy.as_sampler(kl_eta)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    cond = policy.encode_prompts(list(prompts))
    with_kl = base is not None and kl_sampler is not None and kl_sampler.stochastic
    windowed = sampler.window or (kl_sampler is not None and kl_sampler.window)
    traj = sample_trajectory(policy, cond, as_conditioning(neg_embeds), num_steps=num_steps, sampler=sampler,
                             guidance_scale=guidance_scale, generator=generators, record=False,
                             window_start=sampler.window_start(num_steps, 0) if sampler.window else (
                                 kl_sampler.window_start(num_steps, 0) if with_kl and kl_sampler.window else 0),
                             base=base if with_kl else None, kl_sampler=kl_sampler if with_kl else None,
                             noise_every_step=bool(windowed))
    images = to_uint8(policy.decode(traj.final), layout="hwc")
    return SampledBatch(images, traj.kl.cpu().numpy() if traj.kl is not None else None, traj.kl_steps)
