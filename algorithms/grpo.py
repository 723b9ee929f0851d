"""``grpo``: group-relative policy optimisation with a KL anchor to the base model, on either model family.

The loss of Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; yifan123/flow_grpo ``scripts/train_sd3.py``
L872-897) and DanceGRPO (Xue et al. 2025, arXiv 2505.07818), on the per-step policy of the model's sampler (the
DDIM step DDPO trains, or a flow SDE: ``flow-sde`` is Flow-GRPO, ``dance-sde`` DanceGRPO, ``cps`` with a window
Flow-GRPO-Fast):

* **Group advantages.** Every prompt of an epoch is drawn with ``sample.images_per_prompt = k`` images;
  ``A = (r - mean of its group) / (std + 1e-4)`` with the std of the group or, as Flow-GRPO's default
  (``global_std``), of all the epoch's rewards (``flow_grpo/stat_tracking.py``; statistics of this
  epoch only, no buffer across epochs).
* **Zero-signal filter.** A group whose rewards are all equal has advantage 0; Flow-GRPO trains only the
  samples whose advantage is not 0 and pads the kept set with dropped ones up to full micro-batches
  (L796-816). The fraction of such groups is logged as ``zero_std_ratio``, the trained fraction as
  ``trained_fraction``.
* **Objective per trained step.** DDPO's PPO clip (clip range 1e-4, advantages clipped to 5) plus
  ``beta * mean_b( ||mu_theta - mu_ref||^2 / (2 sigma_t^2) )`` with the norm averaged over the latent
  dims like the log-prob: the exact KL between the two Gaussian steps (equal sigma), per dim. For the flow SDEs
  sigma_t is the transition's std ``s_i sqrt(-dt_i)``; Flow-GRPO's ``kl_loss`` divides by ``2 s_i^2`` without the
  step size, i.e. it is ``(-dt_i)`` times this exact KL, so its beta corresponds to ``beta (-dt_i)`` here. The
  reference is the base model, computed under ``no_grad``: for LoRA the adapters at their initial values
  (B = 0: exactly the base UNet; Flow-GRPO's ``disable_adapter()``), costing a copy of the adapter
  tensors; for full fine-tuning a frozen copy of the UNet's trainable weights (4 bytes x parameters:
  13 MB for the shapes UNet, 3.4 GB for SD 1.x's), swapped in for the reference forward. With
  ``beta > 0`` every trained step costs one extra forward pass (no backward).
* Optional ``init_same_noise`` (DanceGRPO): the k images of a prompt start from the same x_T, so the
  group compares the policy's stochastic steps rather than initial noises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlbench.algorithms.ddpo import ADV_CLIP_MAX, CLIP_RANGE, _DDPO, ppo_clip_loss
from rlbench.algorithm import TrainBatch, UpdateContext, option
from rlbench.errors import ConfigError
from rlbench.diffusion.gaussian import kl_penalty
from rlbench.train.advantages import flat_group_fraction, group_normalize

# flow_grpo config/grpo.py: train.beta = 0.04 for geneval_sd3 and general_ocr_sd3 (0.01 for pickscore_sd3).
BETA = 0.04


class GRPO(_DDPO):
    """GRPO (Flow-GRPO / DanceGRPO): group-normalised advantages, PPO clip, KL penalty to the base model."""

    name = "grpo"

    @dataclass
    class Options:
        beta: float = option(BETA, "Weight of the KL penalty to the base model (Flow-GRPO: 0.04 GenEval/OCR, "
                                   "0.01 PickScore; 0 = none, DanceGRPO)")
        clip_range: float = option(CLIP_RANGE, "PPO clip range on the per-step ratio (Flow-GRPO, DanceGRPO: 1e-4)")
        adv_clip_max: float = option(ADV_CLIP_MAX, "Advantages are clipped to [-adv_clip_max, adv_clip_max] (5)")
        global_std: bool = option(True, "Divide by the std of all the epoch's rewards (Flow-GRPO) instead of "
                                        "each group's own")
        filter_zero_std: bool = option(True, "Train only samples with a non-zero advantage (groups with equal "
                                             "rewards carry no signal), padded to full micro-batches (Flow-GRPO)")
        init_same_noise: bool = option(False, "The images of one prompt start from the same initial noise "
                                              "(DanceGRPO init_same_noise)")

        def __post_init__(self) -> None:
            if not self.beta >= 0:
                raise ValueError(f"beta must be >= 0, got {self.beta}")
            if not self.clip_range > 0:
                raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
            if not self.adv_clip_max > 0:
                raise ValueError(f"adv_clip_max must be > 0, got {self.adv_clip_max}")

    def __init__(self, options, config) -> None:
        super().__init__(options, config)
        self.tracker = None  # group statistics of each epoch, no buffer (flow_grpo clears its tracker every epoch)
        self.zero_std_ratio: float | None = None
        self._part_flat = None  # advantage.aggregate = "gdpo": samples flat in every component so far

    @classmethod
    def validate(cls, config, options) -> None:
        super().validate(config, options)
        k = config.sample.images_per_prompt
        if k < 2:
            raise ConfigError(
                f"grpo normalises rewards within groups of images of one prompt: set sample.images_per_prompt "
                f">= 2 (got {k}; Flow-GRPO uses 8-24)."
            )

    def uses_reference(self) -> bool:
        return self.options.beta > 0

    def shares_initial_noise(self) -> bool:
        return self.options.init_same_noise

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        adv, flat = group_normalize(prompts, rewards, self.options.global_std)
        self.zero_std_ratio = flat_group_fraction(prompts, flat)
        return adv

    def part_advantages(self, name: str, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        adv, flat = group_normalize(prompts, rewards, self.options.global_std)
        self._part_flat = flat if self._part_flat is None else self._part_flat & flat
        return adv

    def finish_gdpo(self, advantages: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # GDPO's final batch normalisation shifts every sample; a group flat in every reward carries no signal
        # and stays at exactly 0 (so the filter drops it), and zero_std_ratio counts those groups.
        flat, self._part_flat = self._part_flat, None
        if flat is None:
            return advantages
        advantages = advantages.clone()
        advantages[torch.from_numpy(flat).to(advantages.device)] = 0.0
        self.zero_std_ratio = flat_group_fraction(prompts, flat)
        return advantages

    def train_indices(self, batch: TrainBatch, ctx: UpdateContext) -> torch.Tensor:
        n = len(batch)
        if not self.options.filter_zero_std:
            return torch.arange(n)
        adv = batch.advantages.detach().cpu()
        kept = torch.nonzero(adv != 0).flatten()
        dropped = torch.nonzero(adv == 0).flatten()
        mb = self.config.train.batch_size
        # Every process must run the same number of micro-batches (each ends in a gradient all-reduce): pad
        # to the largest kept count of any process, rounded up to full micro-batches, with zero-advantage
        # samples (flow_grpo L801-810 pads to full batches the same way).
        target = len(kept)
        accelerator = getattr(ctx, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            count = torch.tensor([target], device=accelerator.device)
            target = int(accelerator.gather(count).max())
        target = -(-target // mb) * mb
        pad = target - len(kept)
        if pad:
            extra = dropped[torch.randperm(len(dropped), generator=ctx.generator)[:pad]]
            kept = torch.cat([kept, extra])
        return kept.sort().values

    def step_loss(self, policy, x_t, ts, x_next, embeds, neg_embeds, old_log_prob, advantages, ctx: UpdateContext):
        cfg, beta = self.config, self.options.beta
        guidance = cfg.sample.guidance_scale if cfg.train.cfg else 1.0
        eta = self.sampler
        mean_ref = None
        if beta > 0:
            # The base model's mean first, under no_grad, so the swap is undone before the graph is built.
            with torch.no_grad(), ctx.reference.active():
                mean_ref, _ = policy.transition(x_t, ts, embeds, neg_embeds, guidance, eta)
        log_prob, mean, std = policy.step_log_prob_and_mean(x_t, ts, x_next, embeds, neg_embeds, guidance, eta)
        policy_loss, info = ppo_clip_loss(log_prob, old_log_prob, advantages, self.options.clip_range,
                                          self.options.adv_clip_max)
        info["policy_loss"] = policy_loss.detach()
        if mean_ref is None:
            return policy_loss, info
        kl = kl_penalty(mean, mean_ref, std).mean()
        info["kl"] = kl.detach()
        return policy_loss + beta * kl, info

    def update(self, policy, batch: TrainBatch, ctx: UpdateContext) -> dict[str, float | None]:
        if self.options.beta > 0 and ctx.reference is None:
            raise RuntimeError("grpo with beta > 0 needs the base model: UpdateContext.reference is None")
        keep = self.train_indices(batch, ctx)
        if len(keep) == 0:  # every group had equal rewards: nothing to learn from this epoch
            metrics: dict[str, float | None] = {"loss": None, "approx_kl": None, "clipfrac": None}
        else:
            metrics = super().update(policy, batch, ctx, keep=keep)
        metrics["zero_std_ratio"] = self.zero_std_ratio
        metrics["trained_fraction"] = len(keep) / max(len(batch), 1)
        return metrics
