"""The Gaussian transition's density and KL, shared by every stochastic sampler of every family.

Each stochastic step of a policy is ``x_next ~ N(mean, std^2 I)`` with ``std`` fixed by the schedule and the
sampler (only the mean depends on the weights), so one log-density and one KL serve DDIM and the flow SDEs.
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``-(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)`` averaged over all non-batch dims (B,), float32.

    ``x`` is the action and is detached: the gradient flows only through ``mean`` (ddpo-pytorch; flow_grpo
    ``sde_step_with_logprob`` L61-68 averages over the non-batch dims the same way).
    """
    x = x.detach().float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def transition_kl(mean_a: torch.Tensor, mean_b: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor | None:
    """Per-sample ``KL(N(mean_a, std^2 I) || N(mean_b, std^2 I)) = ||mean_a - mean_b||^2 / (2 std^2)`` summed over
    all dims, float64; None where std is 0 (a deterministic step has no density).

    ``std`` is a scalar (one step for the batch) or broadcasts as ``(B, 1, ..., 1)``.
    """
    std = torch.as_tensor(std, device=mean_a.device, dtype=torch.float64)
    if bool((std <= 0).any()):
        return None
    diff = (mean_a.double() - mean_b.double()).flatten(1)
    sq = diff.pow(2).sum(dim=1)
    return sq / (2 * std.reshape(-1) ** 2) if std.ndim else sq / (2 * std**2)


def kl_penalty(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per sample ``((mean - mean_ref)^2).mean(over non-batch dims) / (2 std^2)``: the exact per-dim KL between
    the two Gaussian steps (equal std), averaged over dims like the log-prob (GRPO's KL anchor; flow_grpo
    train_sd3.py L884 divides by ``2 std_dev_t^2`` without the step size, see rlbench.algorithms.grpo).
    ``mean_ref`` is detached (the reference is fixed)."""
    sq = (mean - mean_ref.detach()) ** 2
    per_sample = sq.mean(dim=tuple(range(1, sq.ndim)))
    std = torch.as_tensor(std, device=mean.device)
    return per_sample / (2 * std.reshape(-1) ** 2) if std.ndim else per_sample / (2 * std**2)
