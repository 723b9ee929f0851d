"""Losses of the DDPO family (Black et al. 2023): ``ddpo-is`` (PPO-clip) and ``ddpo-sf`` (REINFORCE).

Pure tensor functions over per-sample log-probs of one denoising step; the caller runs them once
per trained timestep and accumulates gradients, as kvablack/ddpo-pytorch scripts/train.py does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlbench.algorithm import Algorithm, TrainBatch, UpdateContext, option
from rlbench.errors import ConfigError
from rlbench.train.advantages import PerPromptStatTracker, batch_normalize

# kvablack/ddpo-pytorch config/base.py `train.clip_range` (also trl DDPOConfig, paper Table D.5).
CLIP_RANGE = 1e-4
# kvablack/ddpo-pytorch config/base.py `train.adv_clip_max` (trl: 5.0; jannerm/ddpo JAX uses 10).
ADV_CLIP_MAX = 5.0


def require_stochastic(name: str, config) -> None:
    """A policy-gradient algorithm needs a sampler with a density: DDIM eta > 0, a flow SDE with noise > 0."""
    sampler = config.sampler()
    if sampler.stochastic:
        return
    if sampler.family == "ddim":
        raise ConfigError(
            f"{name} needs a stochastic policy: sample.eta must be > 0 (paper: 1.0), got {config.sample.eta}.")
    raise ConfigError(
        f"{name} needs a stochastic policy: sample.sampler = {sampler.name!r} with noise level {sampler.noise:g} is "
        "deterministic and has no density; use flow-sde, dance-sde or cps with sample.noise_level > 0.")


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
    not Schulman's k3), ``clipfrac = mean(|ratio - 1| > ε)`` and ``ratios``, the per-element ratio (the update
    loop averages it per denoising step: ``ratio_by_step``, GRPO-Guard's diagnostic).
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
            RATIOS: ratio.detach(),
        }
    return loss, info


# The per-element importance ratios a step loss may return in its info; the update loop pops them and logs their
# mean per trained denoising step (`ratio_by_step` in metrics.jsonl): GRPO-Guard (Wang et al. 2025) found the mean
# drifting below 1 at the low-noise steps of Flow-GRPO, which the PPO clip then fails to bound.
RATIOS = "ratios"


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

class _DDPO(Algorithm):
    """Shared update loop of DDPO-IS and DDPO-SF (kvablack/ddpo-pytorch scripts/train.py L444-590).

    Per inner epoch: shuffle samples; give each sample its own random permutation of the denoising
    steps (of the first ``int(T * timestep_window)``, all by default) and train the first
    ``int(window * timestep_fraction)`` of them; for each micro-batch and each
    trained step, recompute the log-prob of the stored action under the current weights and
    accumulate the loss's gradient. One optimizer step = ``gradient_accumulation_steps``
    micro-batches x all trained steps.
    """

    def __init__(self, options, config) -> None:
        super().__init__(options, config)
        adv = config.advantage
        # The [advantage] section configures this tracker; it lives here because only DDPO reads it.
        self.tracker = PerPromptStatTracker(adv.buffer_size, adv.min_count) if adv.per_prompt else None
        self.part_trackers: dict[str, PerPromptStatTracker] = {}  # advantage.aggregate = "gdpo": one per reward
        self.sampler = config.sampler()  # the policy's sampler (DDIM eta; flow SDE, noise level, window)

    @classmethod
    def validate(cls, config, options) -> None:
        require_stochastic(cls.name, config)

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.tracker is not None:
            return self.tracker.update(prompts, rewards)
        return batch_normalize(rewards)

    def state_dict(self) -> dict:
        if self.tracker is None:
            return {}
        state = {"tracker": self.tracker.state_dict()}
        if self.part_trackers:
            state["part_trackers"] = {name: t.state_dict() for name, t in self.part_trackers.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
            adv = self.config.advantage
            self.part_trackers = {}
            for name, saved in state.get("part_trackers", {}).items():
                self.part_trackers[name] = PerPromptStatTracker(adv.buffer_size, adv.min_count)
                self.part_trackers[name].load_state_dict(saved)

    def loss(self, log_prob, old_log_prob, advantages):
        raise NotImplementedError

    def part_advantages(self, name: str, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """advantage.aggregate = 'gdpo': one component reward normalised as :meth:`advantages` would,
        with its own per-prompt tracker."""
        if self.tracker is None:
            return batch_normalize(rewards)
        adv = self.config.advantage
        tracker = self.part_trackers.setdefault(name, PerPromptStatTracker(adv.buffer_size, adv.min_count))
        return tracker.update(prompts, rewards)

    def train_indices(self, batch: TrainBatch, ctx: UpdateContext) -> torch.Tensor:
        """The samples the update trains on (all of them; GRPO drops groups without signal)."""
        return torch.arange(len(batch))

    def step_loss(self, policy, x_t, ts, x_next, embeds, neg_embeds, old_log_prob, advantages, ctx: UpdateContext
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one UNet call's (sample, step) pairs under the current weights, and what it logs."""
        cfg = self.config
        guidance = cfg.sample.guidance_scale if cfg.train.cfg else 1.0
        log_prob = policy.step_log_prob(x_t, ts, x_next, embeds, neg_embeds, guidance, self.sampler)
        return self.loss(log_prob, old_log_prob, advantages)

    def update(self, policy, batch: TrainBatch, ctx: UpdateContext, keep: torch.Tensor | None = None
               ) -> dict[str, float | None]:
        cfg = self.config
        keep = self.train_indices(batch, ctx) if keep is None else keep
        steps = batch.log_probs.shape[1]
        window = max(1, int(steps * cfg.train.timestep_window))  # the first (noisiest) steps; all by default
        n_train = max(1, int(window * cfg.train.timestep_fraction))
        mb, acc = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        sums: dict[str, float] = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
        count = 0
        dev = batch.latents.device
        ratio_sum = torch.zeros(steps, dtype=torch.float64)
        ratio_count = torch.zeros(steps, dtype=torch.float64)
        for idx, perm, k, weight, sync in trained_steps(keep, window, n_train, mb, acc,
                                                        steps_per_forward(cfg, policy.device, policy.family),
                                                        cfg.train.num_inner_epochs, ctx.generator):
            rows, perm = idx.to(dev)[:, None], perm.to(dev)
            loss, info = self.step_loss(
                policy, batch.latents[rows, perm].flatten(0, 1), batch.step_keys(rows, perm).flatten(0, 1),
                batch.latents[rows, perm + 1].flatten(0, 1),
                batch.prompt_embeds[idx.to(batch.prompt_embeds.device)].repeat_interleave(k, dim=0),
                batch.neg_embeds, batch.log_probs[rows, perm].flatten(),
                batch.advantages[idx.to(batch.advantages.device)].repeat_interleave(k), ctx,
            )
            ctx.backward(loss * weight, sync=sync)
            ratios = info.pop(RATIOS, None)
            if ratios is not None:  # element i * k + j is sample i's step perm[i, j] (the flatten above)
                at = perm.flatten().cpu()
                ratio_sum.index_add_(0, at, ratios.detach().double().cpu())
                ratio_count.index_add_(0, at, torch.ones(len(at), dtype=torch.float64))
            # Per-step means, as the reference logs them: a chunk's mean stands for its k steps.
            sums["loss"] += float(loss.detach()) * k
            for key, value in info.items():
                sums[key] = sums.get(key, 0.0) + float(value) * k
            count += k
        metrics: dict[str, Any] = {k: v / max(count, 1) for k, v in sums.items()}
        if ratio_count.any():  # the mean ratio of each stored step (null where none was trained)
            metrics["ratio_by_step"] = [float(s / c) if c else None for s, c in zip(ratio_sum, ratio_count)]
        return metrics


# Auto steps per denoiser call on a CPU. UNet (issue 12's settings: micro-batch 2, 20 trained steps, 2 cores): one
# step per call 9.1 s of training per epoch, 4 steps 7.6 s, 10 steps 7.6 s at 1.7x the activation memory, 20 steps
# 8.5 s (benchmarks/speed.py --steps-per-forward N). The flow transformer's cost is attention, linear in the batch, so
# fuller batches gain little and cost memory: tiny SD3, ddpo-is, 10 steps, training/bare-call ratio 0.93-1.12 at 1,
# 0.90-0.97 at 2, 1.10-1.15 at 4 (two runs each, `python benchmarks/speed.py --model tiny-sd3 --steps-per-forward N`).
CPU_STEPS_PER_FORWARD = {"ddim": 4, "flow": 2}


def steps_per_forward(cfg, device, family: str = "ddim") -> int:
    """``train.steps_per_forward``, or when 0 (auto) on a CPU 4 (UNet) or 2 (flow transformer), 1 on an
    accelerator (memory)."""
    k = cfg.train.steps_per_forward
    if k > 0:
        return k
    return CPU_STEPS_PER_FORWARD.get(family, 1) if torch.device(device).type == "cpu" else 1


def trained_steps(rows: torch.Tensor, window: int, n_train: int, mb: int, acc: int, per_call: int,
                  inner_epochs: int, generator: torch.Generator):
    """The update schedule shared by the per-step algorithms (DDPO, GRPO, NFT), as kvablack/ddpo-pytorch
    scripts/train.py L444-590 draws it: per inner epoch a shuffle of ``rows`` and, per sample, its own random
    order of the first ``window`` steps (reference L455-471), of which the first ``n_train`` are trained.

    Yields, per model call, ``(idx (mb,), steps (mb, k), k, weight, sync)``: the micro-batch's samples, the k of its
    trained steps that share the call (:func:`step_chunks`), the loss weight ``k / (group * n_train)`` and whether
    the call closes an optimizer step. An optimizer step closes every ``acc`` micro-batches and the last (maybe
    shorter) group of an inner epoch (GRPO's filter may leave a number of micro-batches ``acc`` does not divide).
    The weights do not change within a micro-batch and each call's loss is a mean over its rows, so the weighted
    chunk losses sum to exactly the per-step losses' sum / n_train: the reference's gradient, fuller batches
    (tests/test_algorithms.py).
    """
    n = len(rows)
    n_micro = n // mb
    chunks = step_chunks(n_train, per_call)
    for _ in range(inner_epochs):
        order = rows[torch.randperm(n, generator=generator)]
        tperm = torch.stack([torch.randperm(window, generator=generator) for _ in range(n)])
        for m in range(n_micro):
            idx = order[m * mb : (m + 1) * mb]
            perm = tperm[m * mb : (m + 1) * mb, :n_train]
            group = min(acc, n_micro - (m // acc) * acc)
            for c, (j0, k) in enumerate(chunks):
                sync = ((m + 1) % acc == 0 or m + 1 == n_micro) and c == len(chunks) - 1
                yield idx, perm[:, j0 : j0 + k], k, k / (group * n_train), sync


def step_chunks(n_train: int, per_call: int) -> list[tuple[int, int]]:
    """Split ``n_train`` trained steps into (first step, steps) chunks of at most ``per_call`` steps, as even
    as possible."""
    per_call = max(1, min(n_train, per_call))
    n_chunks = -(-n_train // per_call)
    base, extra = divmod(n_train, n_chunks)
    out, j0 = [], 0
    for c in range(n_chunks):
        k = base + (c < extra)
        out.append((j0, k))
        j0 += k
    return out


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
    def adjust(cls, config, options) -> tuple[dict, list[str]]:
        # One optimizer step per epoch: accumulate over every micro-batch of the epoch.
        if config.train.batch_size <= 0 or config.samples_per_epoch <= 0:
            return {}, []  # invalid sizes: validation names them
        need = config.samples_per_epoch // config.train.batch_size
        if config.train.gradient_accumulation_steps == need:
            return {}, []
        return ({"train.gradient_accumulation_steps": need},
                [f"ddpo-sf: train.gradient_accumulation_steps set to {need} so that one optimizer step "
                 f"uses all {config.samples_per_epoch} samples of the epoch (paper Table D.5: 256 x 1)."])

    @classmethod
    def validate(cls, config, options) -> None:
        super().validate(config, options)
        # The score-function estimator is only unbiased on fresh samples: one step per epoch, ratio = 1.
        if config.train.num_inner_epochs != 1:
            raise ConfigError(
                f"ddpo-sf takes exactly one gradient step per epoch on fresh samples: set "
                f"train.num_inner_epochs = 1 (got {config.train.num_inner_epochs}), or use ddpo-is."
            )

    def loss(self, log_prob, old_log_prob, advantages):
        loss = score_function_loss(log_prob, advantages, self.options.adv_clip_max)
        with torch.no_grad():
            log_ratio = log_prob - old_log_prob
            info = {"approx_kl": 0.5 * torch.mean(log_ratio**2),
                    "clipfrac": torch.zeros(())}  # no clipping in the score-function estimator
        return loss, info
