"""Pieces of reward-weighted regression (``rwr``) and its sparse variant (``rwr-sparse``).

After jannerm/ddpo: RWR regresses the usual ε-MSE on the model's own samples, weighted by an
exponentiated reward (``ddpo/utils/hdf5.py::make_weights``, ``ddpo/training/diffusion.py``);
RWR-sparse keeps only samples at or above a reward percentile and trains them unweighted
(``Masker.mask = xs >= np.percentile(batch, 90)``). Paper App. D.3: both are normalised per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Paper Table D.5 "inverse temperature 0.2"; jannerm/ddpo finetune.py `temperature=1/5`, applied
# as `softmax_ref(x * temperature)` so it multiplies the reward (an inverse temperature).
BETA = 0.2
# Paper Table D.5 "percentile 0.9"; jannerm/ddpo config `mask_mode="percentile", mask_param=90`.
PERCENTILE = 90.0

RewardsLike = torch.Tensor | np.ndarray | Sequence[float]


def _as_float64(rewards: RewardsLike) -> np.ndarray:
    if isinstance(rewards, torch.Tensor):
        arr = rewards.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(rewards, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("rewards contain NaN or inf")
    return arr


def _groups(n: int, prompts: Sequence[str] | None) -> list[np.ndarray]:
    """Index arrays of the samples sharing a prompt (one group of all samples if no prompts)."""
    if prompts is None:
        return [np.arange(n)]
    labels = list(prompts)
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} prompts for {n} rewards")
    _, inverse = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(int(inverse.max()) + 1)] if n else []


def _device(like: RewardsLike) -> torch.device:
    return like.device if isinstance(like, torch.Tensor) else torch.device("cpu")


def rwr_weights(
    rewards: RewardsLike, prompts: Sequence[str] | None = None, beta: float = BETA
) -> torch.Tensor:
    """``softmax(beta·r)·N`` over the batch, or ``softmax(beta·r_p)·N_p`` within each prompt.

    jannerm/ddpo ``make_weights``: the ``·N`` makes the weights average 1, so a weighted loss
    stays on the scale of the plain MSE. Returns float32 weights (no grad), summing to N (to N_p
    per prompt).
    """
    r = _as_float64(rewards)
    w = np.empty_like(r)
    for idx in _groups(r.size, prompts):
        z = beta * r[idx]
        e = np.exp(z - z.max())  # max-shift as in jannerm's softmax_ref: overflow-safe
        w[idx] = e / e.sum() * idx.size
    return torch.from_numpy(w.astype(np.float32)).to(_device(rewards))


def sparse_mask(
    rewards: RewardsLike, prompts: Sequence[str] | None = None, percentile: float = PERCENTILE
) -> torch.Tensor:
    """Bool mask ``r >= np.percentile(r_p, percentile)`` per prompt (over the batch if no prompts).

    Uses numpy's default (linear) interpolation, as the reference does. Because the threshold is
    interpolated, "top 10%" is approximate: 10 samples keep 1, 16 keep 2 (0.9·15 = 13.5), and
    ties at the threshold are all kept (a group of equal rewards keeps everything).
    """
    r = _as_float64(rewards)
    mask = np.zeros(r.shape, dtype=bool)
    for idx in _groups(r.size, prompts):
        mask[idx] = r[idx] >= np.percentile(r[idx], percentile)
    return torch.from_numpy(mask).to(_device(rewards))


def weighted_denoising_loss(
    eps_pred: torch.Tensor, eps_target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``Σ_i w_i · mean_dims((ε̂_i - ε_i)^2) / B`` (jannerm/ddpo training/diffusion.py).

    With all weights 1 this is the plain MSE. Computed in float32 so fp16/bf16 predictions do not
    lose the small squared errors; the weights are data and are detached.
    """
    if eps_pred.shape != eps_target.shape or eps_pred.ndim < 2:
        raise ValueError(
            f"eps_pred {tuple(eps_pred.shape)} and eps_target {tuple(eps_target.shape)} must match, (B, ...)"
        )
    if weights.shape != eps_pred.shape[:1]:
        raise ValueError(f"weights must have shape ({eps_pred.shape[0]},), got {tuple(weights.shape)}")
    per_sample = ((eps_pred.float() - eps_target.float()) ** 2).mean(dim=tuple(range(1, eps_pred.ndim)))
    return (weights.detach().to(per_sample) * per_sample).sum() / eps_pred.shape[0]
