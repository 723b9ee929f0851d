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


# -- the algorithm plugins ---------------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402

from rlbench.train.advantages import batch_normalize  # noqa: E402
from rlbench.algorithm import Algorithm, TrainBatch, UpdateContext, option  # noqa: E402
from rlbench.errors import ConfigError  # noqa: E402


class _DDPO(Algorithm):
    """Shared update loop of DDPO-IS and DDPO-SF (kvablack/ddpo-pytorch scripts/train.py L444-590).

    Per inner epoch: shuffle samples; give each sample its own random permutation of the denoising
    steps (of the first ``int(T * timestep_window)``, all by default) and train the first
    ``int(window * timestep_fraction)`` of them; for each micro-batch and each
    trained step, recompute the log-prob of the stored action under the current weights and
    accumulate the loss's gradient. One optimizer step = ``gradient_accumulation_steps``
    micro-batches x all trained steps.
    """

    @classmethod
    def validate(cls, config, options) -> list[str]:
        if config.sample.eta <= 0:
            raise ConfigError(
                f"{cls.name} needs a stochastic policy: sample.eta must be > 0 (paper: 1.0), got {config.sample.eta}."
            )
        return []

    def advantages(self, rewards: torch.Tensor, prompts: list[str], tracker) -> torch.Tensor:
        if self.config.advantage.per_prompt:
            return tracker.update(prompts, rewards)
        return batch_normalize(rewards)

    def loss(self, log_prob, old_log_prob, advantages):
        raise NotImplementedError

    def update(self, policy, batch: TrainBatch, ctx: UpdateContext) -> dict[str, float | None]:
        cfg = self.config
        n, steps = len(batch), batch.log_probs.shape[1]
        window = max(1, int(steps * cfg.train.timestep_window))  # the first (noisiest) steps; all by default
        n_train = max(1, int(window * cfg.train.timestep_fraction))
        mb, acc = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        sums = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
        count = 0
        for _ in range(cfg.train.num_inner_epochs):
            order = torch.randperm(n, generator=ctx.generator)
            # Each sample gets its own random order of denoising steps (reference L455-471).
            tperm = torch.stack([torch.randperm(window, generator=ctx.generator) for _ in range(n)])
            n_micro = n // mb
            for m in range(n_micro):
                idx = order[m * mb : (m + 1) * mb]
                perm = tperm[m * mb : (m + 1) * mb].to(batch.latents.device)
                rows = idx.to(batch.latents.device)[:, None]
                x_t = batch.latents[rows, perm]  # (mb, T, C, h, w)
                x_next = batch.latents[rows, perm + 1]
                old_lp = batch.log_probs[rows, perm]
                ts = batch.timesteps[perm]
                embeds = batch.prompt_embeds[idx.to(batch.prompt_embeds.device)]
                adv = batch.advantages[idx.to(batch.advantages.device)]
                for j in range(n_train):
                    log_prob = policy.step_log_prob(
                        x_t[:, j], ts[:, j], x_next[:, j], embeds, batch.neg_embeds,
                        cfg.sample.guidance_scale if cfg.train.cfg else 1.0, cfg.sample.eta,
                    )
                    loss, info = self.loss(log_prob, old_lp[:, j], adv)
                    sync = (m + 1) % acc == 0 and j == n_train - 1
                    ctx.backward(loss / (acc * n_train), sync=sync)
                    sums["loss"] += float(loss.detach())
                    sums["approx_kl"] += float(info["approx_kl"])
                    sums["clipfrac"] += float(info["clipfrac"])
                    count += 1
        return {k: v / max(count, 1) for k, v in sums.items()}


class DDPOIS(_DDPO):
    """DDPO-IS: importance-sampled policy gradient with the PPO clipped objective (Black et al. 2023)."""

    name = "ddpo-is"

    @dataclass
    class Options:
        clip_range: float = option(CLIP_RANGE, "PPO clip range epsilon on the per-step ratio (reference 1e-4)")
        adv_clip_max: float = option(ADV_CLIP_MAX, "Advantages are clipped to [-adv_clip_max, adv_clip_max] (reference 5)")

        def __post_init__(self) -> None:
            if not self.clip_range > 0:
                raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
            if not self.adv_clip_max > 0:
                raise ValueError(f"adv_clip_max must be > 0, got {self.adv_clip_max}")

    def loss(self, log_prob, old_log_prob, advantages):
        return ppo_clip_loss(log_prob, old_log_prob, advantages, self.options.clip_range, self.options.adv_clip_max)


class DDPOSF(_DDPO):
    """DDPO-SF: score-function (REINFORCE) policy gradient, one optimizer step per epoch (Black et al. 2023)."""

    name = "ddpo-sf"

    @dataclass
    class Options:
        adv_clip_max: float = option(ADV_CLIP_MAX, "Advantages are clipped to [-adv_clip_max, adv_clip_max] (reference 5)")

        def __post_init__(self) -> None:
            if not self.adv_clip_max > 0:
                raise ValueError(f"adv_clip_max must be > 0, got {self.adv_clip_max}")

    @classmethod
    def validate(cls, config, options) -> list[str]:
        super().validate(config, options)
        # The score-function estimator is only unbiased on fresh samples: one step per epoch, ratio = 1.
        if config.train.num_inner_epochs != 1:
            raise ConfigError(
                f"ddpo-sf takes exactly one gradient step per epoch on fresh samples: set "
                f"train.num_inner_epochs = 1 (got {config.train.num_inner_epochs}), or use ddpo-is."
            )
        need = config.samples_per_epoch // config.train.batch_size
        if config.train.gradient_accumulation_steps != need:
            config.train.gradient_accumulation_steps = need
            return [f"ddpo-sf: train.gradient_accumulation_steps set to {need} so that one optimizer step "
                    f"uses all {config.samples_per_epoch} samples of the epoch (paper Table D.5: 256 x 1)."]
        return []

    def loss(self, log_prob, old_log_prob, advantages):
        loss = score_function_loss(log_prob, advantages, self.options.adv_clip_max)
        with torch.no_grad():
            log_ratio = log_prob - old_log_prob
            info = {"approx_kl": 0.5 * torch.mean(log_ratio**2),
                    "clipfrac": torch.zeros(())}  # no clipping in the score-function estimator
        return loss, info
