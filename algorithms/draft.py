"""``draft``: direct reward fine-tuning, backpropagating a differentiable reward through the last sampling steps.

DRaFT (Clark, Vicol, Swersky & Fleet 2023, arXiv 2309.17400) and AlignProp (Prabhudesai et al. 2023,
arXiv 2310.03739; mihirp1998/AlignProp, trl ``AlignPropTrainer``):

* **DRaFT-K** (``k``): sample x_T -> x_0 with the current weights, gradients off for the first T - K
  steps and on for the last K; decode (through the VAE decoder for latent models); loss =
  ``-reward_scale * mean(reward(image))``; backpropagate through those K UNet calls. ``k = T`` is full
  DRaFT (backprop through the whole sampler). No gradient reaches the steps before the truncation: the
  latent entering step T - K + 1 is computed without a graph.
* **DRaFT-LV** (``k = 1``, ``lv_copies = n > 0``): sample x_0 without gradients, then n times: noise it
  back to the last step's timestep with the forward process, ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``,
  denoise that one step with gradients and score it; the n reward gradients are averaged (lower variance
  than K = 1 on the sampled trajectory at the cost of n - 1 extra last steps). The logged reward is the
  chain's own sample.
* **AlignProp's randomised truncation** (``truncation = "random"``): K is drawn per micro-batch uniformly
  from ``[k_min, k]`` (trl ``truncated_backprop_rand``; AlignProp draws its start step around 42 of 50).
* Each step is reparameterised, ``x_{t-1} = mu_theta(x_t) + sigma_t z`` with z drawn from the run's
  training generator, so gradients flow through the mean and, from step to step, through x_t. With
  ``gradient_checkpointing`` (AlignProp, trl) each grad-enabled UNet call stores only its inputs and is
  recomputed in the backward pass: K UNet activations' memory for one extra forward per step.

The reward must declare ``differentiable = True`` (its float pre-processing keeps the graph: the zoo's
``shapes-clip``, ``shapes-aesthetic``, ``aesthetic``, ``pickscore``, ``hpsv2``, ``clipscore``,
``imagereward``); any other is rejected when the configuration resolves, before a model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rlbench.algorithm import Algorithm, UpdateContext, option
from rlbench.diffusion.conditioning import as_conditioning
from rlbench.diffusion.trajectory import sample_trajectory
from rlbench.errors import ConfigError


def reward_is_differentiable(spec: str) -> tuple[bool, list[str]]:
    """(all components differentiable, the names that are not) for a reward name or combination spec."""
    from rlbench.combine import is_combination, parse_spec
    from rlbench.registry import REWARDS
    from rlbench.reward import reward_card

    names = [n for n, _ in parse_spec(spec)] if is_combination(spec) else [spec]
    bad = []
    for name in names:
        if name not in REWARDS:
            continue  # the reward lookup names an unknown reward, with suggestions
        if not reward_card(REWARDS.load(name), name=name).differentiable:
            bad.append(name)
    return not bad, bad


class DRaFT(Algorithm):
    """DRaFT-K / DRaFT-LV / AlignProp: maximise a differentiable reward by backprop through the last K steps."""

    name = "draft"
    direct = True
    trains_on_trajectory = False

    @dataclass
    class Options:
        k: int = option(1, "Sampling steps (the last ones) that gradients flow through; sample.num_steps = full "
                           "backprop (DRaFT-K; the paper favours K = 1)")
        lv_copies: int = option(0, "DRaFT-LV (needs k = 1): re-noised copies of the final sample whose last step is "
                                   "redone with gradients, their reward gradients averaged (the paper uses n = 2); "
                                   "0 = off")
        truncation: str = option("fixed", "'fixed': always k steps; 'random': K drawn per micro-batch uniformly "
                                          "from [k_min, k] (AlignProp's randomised truncation)")
        k_min: int = option(1, "Smallest K with truncation = 'random'")
        reward_scale: float = option(1.0, "loss = -reward_scale * mean reward (AlignProp's loss_coeff)")
        gradient_checkpointing: bool = option(True, "Recompute each grad-enabled UNet call in the backward pass "
                                                    "(memory of K steps' inputs instead of their activations)")

        def __post_init__(self) -> None:
            if self.k < 1:
                raise ValueError(f"k must be >= 1, got {self.k}")
            if self.lv_copies < 0:
                raise ValueError(f"lv_copies must be >= 0, got {self.lv_copies}")
            if self.lv_copies and self.k != 1:
                raise ValueError(f"lv_copies (DRaFT-LV) needs k = 1, got k = {self.k}")
            if self.truncation not in ("fixed", "random"):
                raise ValueError(f"truncation must be 'fixed' or 'random', got {self.truncation!r}")
            if not 1 <= self.k_min <= self.k:
                raise ValueError(f"k_min must be in [1, k = {self.k}], got {self.k_min}")
            if self.lv_copies and self.truncation == "random":
                raise ValueError("lv_copies (DRaFT-LV, K = 1) and truncation = 'random' exclude each other")

    @classmethod
    def validate(cls, config, options) -> None:
        ok, bad = reward_is_differentiable(config.reward.name)
        if not ok:
            raise ConfigError(
                f"draft backpropagates the reward into the model, but {', '.join(repr(b) for b in bad)} "
                "is not differentiable (differentiable = False on its card); choose a differentiable reward "
                "(`rlbench rewards list` shows the column), e.g. shapes-clip or shapes-aesthetic, or a "
                "policy-gradient algorithm (ddpo-is, grpo)."
            )
        if options.k > config.sample.num_steps:
            raise ConfigError(f"algorithm.k ({options.k}) exceeds sample.num_steps ({config.sample.num_steps}).")
        if config.advantage.aggregate != "sum":
            raise ConfigError("draft maximises the weighted sum of the rewards directly: advantage.aggregate must "
                              "be 'sum'.")

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise RuntimeError("draft has no advantages: it trains through train_direct()")

    # -- sampling with gradients through the last steps -------------------------------------------------
    def __init__(self, options, config) -> None:
        super().__init__(options, config)
        self.sampler = config.sampler()  # the policy's sampler: DDIM eta, or a flow SDE/ODE

    def _step(self, policy, x, t, embeds, neg, guidance, noise, grad: bool) -> torch.Tensor:
        """One reparameterised step ``mu(x_t) + sigma_t z``; with ``grad``, differentiable (checkpointed)."""
        if grad and self.options.gradient_checkpointing:
            mean, std = checkpoint(policy.transition, x, t, embeds, neg, guidance, self.sampler, use_reentrant=False)
        else:
            mean, std = policy.transition(x, t, embeds, neg, guidance, self.sampler)
        return mean + std * noise

    def sample_with_grad(self, policy, prompts: list[str], neg_embeds, k: int, generator: torch.Generator,
                         embeds=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(final latents x_0 differentiable through the last ``k`` steps, x_0 detached): the one trajectory loop
        with gradients on its last ``k`` steps, each reparameterised (``mean + std * z``)."""
        cfg = self.config
        embeds = policy.encode_prompts(prompts) if embeds is None else embeds
        traj = sample_trajectory(policy, as_conditioning(embeds), as_conditioning(neg_embeds),
                                 num_steps=cfg.sample.num_steps, sampler=self.sampler,
                                 guidance_scale=cfg.sample.guidance_scale, generator=generator, record=False,
                                 grad_steps=k, checkpointing=self.options.gradient_checkpointing)
        return traj.final, traj.final.detach()

    def _lv_latents(self, policy, x0: torch.Tensor, embeds, neg_embeds, generator) -> list[torch.Tensor]:
        """DRaFT-LV: ``lv_copies`` re-noisings of x_0 to the last step's noise level (the forward process), each
        denoised once with gradients."""
        cfg = self.config
        key = policy.last_key()
        out = []
        for _ in range(self.options.lv_copies):
            eps = policy.initial_noise(x0.shape[0], generator)
            x_t = policy.noised(x0, eps, key)
            noise = policy.initial_noise(x0.shape[0], generator)
            out.append(self._step(policy, x_t, key, embeds, neg_embeds, cfg.sample.guidance_scale, noise, grad=True))
        return out

    def _draw_k(self, generator: torch.Generator) -> int:
        o = self.options
        if o.truncation == "fixed":
            return o.k
        return int(torch.randint(o.k_min, o.k + 1, (1,), generator=generator))

    def train_direct(self, policy, batches, ctx: UpdateContext) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
        cfg = self.config
        mb, acc = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
        neg = policy.encode_prompts([cfg.sample.negative_prompt])
        drawn, losses, ks = [], [], []
        micro = 0
        n_micro = sum(len(p) for p, _ in batches) // mb
        for prompts, metadata in batches:
            images_b, scores_b = [], []
            for s in range(0, len(prompts), mb):
                p, m = prompts[s:s + mb], metadata[s:s + mb]
                k = 1 if self.options.lv_copies else self._draw_k(ctx.generator)
                embeds = policy.encode_prompts(p)
                x0, x0_detached = self.sample_with_grad(policy, p, neg, 0 if self.options.lv_copies else k,
                                                        ctx.generator, embeds)
                if self.options.lv_copies:
                    with torch.no_grad():
                        images = policy.decode(x0_detached)
                        scores = ctx.reward(images, p, m).scores
                    rewards = [ctx.reward(policy.decode_differentiable(x), p, m).scores
                               for x in self._lv_latents(policy, x0_detached, embeds, neg, ctx.generator)]
                    reward = torch.stack(rewards).mean(dim=0)
                else:
                    images = policy.decode_differentiable(x0)
                    reward = ctx.reward(images, p, m).scores
                    scores = reward
                loss = -self.options.reward_scale * reward.mean()
                micro += 1
                group = min(acc, n_micro - ((micro - 1) // acc) * acc)
                ctx.backward(loss / group, sync=micro % acc == 0 or micro == n_micro)
                losses.append(float(loss.detach()))
                ks.append(k)
                images_b.append(images.detach())
                scores_b.append(scores.detach().float().cpu())
            drawn.append({"images": torch.cat(images_b), "scores": torch.cat(scores_b)})
        metrics: dict[str, float | None] = {"loss": sum(losses) / len(losses), "approx_kl": None, "clipfrac": None,
                                            "k_mean": sum(ks) / len(ks)}
        return drawn, metrics
