"""Losses of the DDPO family (Black et al. 2023): ``ddpo-is`` (PPO-clip) and ``ddpo-sf`` (REINFORCE).

Pure tensor functions over per-sample log-probs of one denoising step; the caller runs them once
per trained timestep and accumulates gradients, as kvablack/ddpo-pytorch scripts/train.py does.
"""

from __future__ import annotations

import torch

# kvablack/ddpo-pytorch config/base.py `train.clip_range` (also trl DDPOConfig, paper Table D.5).
CLIP_RANGE = 1e-4
# kvablack/ddpo-pytorch config/base.py `train.adv_clip_max` (trl: 5.0; jannerm/ddpo JAX uses 10).
ADV_CLIP_MAX = 5.0


def _check_shapes(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 1 or any(t.shape != shape for t in tensors):
        raise ValueError(f"expected equal 1-D (batch,) tensors, got {[tuple(t.shape) for t in tensors]}")


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = CLIP_RANGE,
    adv_clip_max: float = ADV_CLIP_MAX,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, exactly ddpo-pytorch scripts/train.py L538-567.

    ``A = clamp(adv, ±adv_clip_max)``, ``ratio = exp(log_prob - old_log_prob)``,
    ``loss = mean(max(-A·ratio, -A·clamp(ratio, 1-ε, 1+ε)))``. Gradient flows only through
    ``log_prob``; ``old_log_prob`` and ``advantages`` are detached (they are sampling-time data).

    ``info`` (detached): ``approx_kl = 0.5·mean((log_prob - old)^2)`` (the reference's estimator,
    not Schulman's k3) and ``clipfrac = mean(|ratio - 1| > ε)``.
    """
    _check_shapes(log_prob, old_log_prob, advantages)
    adv = torch.clamp(advantages.detach(), -adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * torch.mean(log_ratio**2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
        }
    return loss, info


def score_function_loss(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    adv_clip_max: float = ADV_CLIP_MAX,
) -> torch.Tensor:
    """REINFORCE surrogate ``mean(-A·log_prob)`` with ``A = clamp(adv, ±adv_clip_max)``.

    DDPO-SF takes one optimizer step per sampled batch, so every micro-step sees ratio ≡ 1 and
    the PPO gradient ``-A·ratio·∇log_prob`` reduces to ``-A·∇log_prob``: this loss has the same
    gradient as :func:`ppo_clip_loss` at ratio 1 (its *value* differs; only the gradient matters).
    The reference has no separate SF code path; it gets SF from the PPO loss with that schedule.
    """
    _check_shapes(log_prob, advantages)
    adv = torch.clamp(advantages.detach(), -adv_clip_max, adv_clip_max)
    return torch.mean(-adv * log_prob)
