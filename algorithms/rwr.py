"""Pieces of reward-weighted regression (``rwr``) and its sparse variant (``rwr-sparse``).

After jannerm/ddpo: RWR regresses the usual ε-MSE on the model's own samples, weighted by an
exponentiated reward (``ddpo/utils/hdf5.py::make_weights``, ``ddpo/training/diffusion.py``);
RWR-sparse keeps only samples at or above a reward percentile and trains them unweighted
(``Masker.mask = xs >= np.percentile(batch, 90)``). Paper App. D.3: both are normalised per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rlbench.algorithm import Algorithm, TrainBatch, UpdateContext, option
from rlbench.errors import ConfigError
from rlbench.train.advantages import RewardsLike, as_float64, to_output

# Paper Table D.5 "inverse temperature 0.2"; jannerm/ddpo finetune.py `temperature=1/5`, applied
# as `softmax_ref(x * temperature)` so it multiplies the reward (an inverse temperature).
BETA = 0.2
# Paper Table D.5 "percentile 0.9"; jannerm/ddpo config `mask_mode="percentile", mask_param=90`.
PERCENTILE = 90.0


def _groups(n: int, prompts: Sequence[str] | None) -> list[np.ndarray]:
    """Index arrays of the samples sharing a prompt (one group of all samples if no prompts)."""
    if prompts is None:
        return [np.arange(n)]
    labels = list(prompts)
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} prompts for {n} rewards")
    _, inverse = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(int(inverse.max()) + 1)] if n else []


def rwr_weights(
    rewards: RewardsLike, prompts: Sequence[str] | None = None, beta: float = BETA
) -> torch.Tensor:
    """``softmax(beta·r)·N`` over the batch, or ``softmax(beta·r_p)·N_p`` within each prompt.

    jannerm/ddpo ``make_weights``: the ``·N`` makes the weights average 1, so a weighted loss
    stays on the scale of the plain MSE. Returns float32 weights (no grad), summing to N (to N_p
    per prompt).
    """
    r = as_float64(rewards)
    w = np.empty_like(r)
    for idx in _groups(r.size, prompts):
        z = beta * r[idx]
        e = np.exp(z - z.max())  # max-shift as in jannerm's softmax_ref: overflow-safe
        w[idx] = e / e.sum() * idx.size
    return to_output(w, rewards)


def sparse_mask(
    rewards: RewardsLike, prompts: Sequence[str] | None = None, percentile: float = PERCENTILE
) -> torch.Tensor:
    """Bool mask ``r >= np.percentile(r_p, percentile)`` per prompt (over the batch if no prompts).

    Uses numpy's default (linear) interpolation, as the reference does. Because the threshold is
    interpolated, "top 10%" is approximate: 10 samples keep 1, 16 keep 2 (0.9·15 = 13.5), and
    ties at the threshold are all kept (a group of equal rewards keeps everything).
    """
    r = as_float64(rewards)
    mask = np.zeros(r.shape, dtype=bool)
    for idx in _groups(r.size, prompts):
        mask[idx] = r[idx] >= np.percentile(r[idx], percentile)
    mask_t = torch.from_numpy(mask)
    return mask_t.to(rewards.device) if isinstance(rewards, torch.Tensor) else mask_t


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


# -- the algorithm plugins ---------------------------------------------------------------------------

class _RWRBase(Algorithm):
    """Shared update of the RWR family: weighted denoising regression on the epoch's own samples.

    Each sample's final latent x_0 is re-noised at a uniformly random training timestep
    (t in [0, num_train_timesteps), jannerm/ddpo ddpo/training/diffusion.py) and the guided model
    output is regressed onto the noise (or the velocity for v-prediction models), weighted per sample.
    """

    trains_on_trajectory = False

    @classmethod
    def validate(cls, config, options) -> None:
        # The loss needs only the final samples, so any sampler serves (a deterministic one too).
        if config.advantage.aggregate != "sum":
            raise ConfigError(
                f"{cls.name} weights samples by exp(reward / temperature) of the combined reward; advantage.aggregate "
                f"= {config.advantage.aggregate!r} applies to policy-gradient algorithms (ddpo-is, ddpo-sf, grpo): "
                "use advantage.aggregate = 'sum'."
            )

    def update(self, policy, batch: TrainBatch, ctx: UpdateContext) -> dict[str, float | None]:
        cfg = self.config
        n, mb, acc = len(batch), cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        x0_all = batch.final
        total, count = 0.0, 0
        for _ in range(cfg.train.num_inner_epochs):
            order = torch.randperm(n, generator=ctx.generator)
            for m in range(n // mb):
                idx = order[m * mb : (m + 1) * mb]
                dev_idx = idx.to(x0_all.device)
                x0 = x0_all[dev_idx]
                # The family's denoising regression: DDIM noise (or v) prediction at a uniform timestep;
                # flow matching's velocity eps - x0 at a uniform training sigma.
                x_t, t, target = policy.regression_pair(x0, ctx.generator)
                pred = policy.model_output(x_t, t, batch.prompt_embeds[dev_idx], batch.neg_embeds,
                                           cfg.sample.guidance_scale if cfg.train.cfg else 1.0)
                loss = weighted_denoising_loss(pred, target, batch.advantages[dev_idx])
                ctx.backward(loss / acc, sync=(m + 1) % acc == 0)
                total += float(loss.detach())
                count += 1
        return {"loss": total / max(count, 1), "approx_kl": None, "clipfrac": None}


class RWR(_RWRBase):
    """Reward-weighted regression: denoising loss weighted by softmax(beta * r) * N (Black et al. 2023, §4.1)."""

    name = "rwr"

    @dataclass
    class Options:
        beta: float = option(BETA, "Inverse temperature of the softmax weights (paper Table D.5: 0.2)")
        per_prompt: bool = option(True, "Softmax within each prompt's samples (paper App. D.3), else over the batch")

        def __post_init__(self) -> None:
            if not self.beta >= 0:
                raise ValueError(f"beta must be >= 0, got {self.beta}")

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return rwr_weights(rewards, prompts if self.options.per_prompt else None, self.options.beta).float()


class SparseRWR(_RWRBase):
    """Sparse RWR: plain denoising loss on the samples at or above a reward percentile (Black et al. 2023)."""

    name = "rwr-sparse"

    @dataclass
    class Options:
        percentile: float = option(PERCENTILE, "Keep samples with reward >= this percentile (paper: 90, the top 10 %)")
        per_prompt: bool = option(True, "Threshold within each prompt's samples (paper App. D.3), else over the batch")

        def __post_init__(self) -> None:
            if not 0.0 <= self.percentile <= 100.0:
                raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # Kept samples get weight N / n_kept, dropped ones 0: the weighted loss then equals the plain
        # mean loss over kept samples, while every process runs the same number of micro-steps (DDP).
        mask = sparse_mask(rewards, prompts if self.options.per_prompt else None, self.options.percentile)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        return mask * (mask.numel() / mask.sum().clamp(min=1.0))
