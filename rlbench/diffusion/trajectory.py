"""The one trajectory loop: training rollouts, evaluation and reward backpropagation all walk the chain here.

Per step ``i`` of the schedule the policy gives the model output at the state (the guided epsilon of a UNet or
the guided velocity of a flow transformer), the sampler's transition ``N(mean, std^2 I)`` from it, and the next
state ``mean + std * z`` (``z`` from the generator(s)) or ``mean`` on a deterministic step. Options:

* ``generator``: one generator for the batch (training) or one per image (evaluation: every image's noise,
  the initial latent and every step's, is its own, whatever the batch);
* ``record``: keep the states, log-probs and step keys of the stochastic steps (the SDE window's only) for
  the policy-gradient update;
* ``grad_steps``: the last ``grad_steps`` steps run with gradients (DRaFT-K, AlignProp), optionally
  gradient-checkpointed; the earlier ones without a graph;
* ``base`` + ``kl_sampler``: at every step the base model's output at the same state too, and the exact KL
  between the two transitions of ``kl_sampler`` (evaluation's KL from the base model; the base weights are
  swapped in, :class:`~rlbench.diffusion.policy.BaseWeights`).

The family-specific parts are the policy's methods (``schedule``, ``start_latents``, ``model_output``,
``step_from_output``, ``log_prob``, ``step_noise``); everything runs on the calling thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from rlbench.diffusion.conditioning import Conditioning
from rlbench.diffusion.gaussian import transition_kl
from rlbench.diffusion.sampler import Sampler


@dataclass
class Trajectory:
    """What :func:`sample_trajectory` returns.

    final: x_0 (B, ...) float32 (differentiable through the grad steps); latents: (B, W+1, ...) the states
    entering and leaving the W recorded (stochastic) steps; log_probs: (B, W); keys: (W, ...) the step keys
    (DDIM timesteps; flow sigma triples); kl: (B,) float64 summed over ``kl_steps`` steps.
    """

    final: torch.Tensor
    latents: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    kl_steps: int = 0


def sample_trajectory(
    policy: Any,
    cond: Conditioning,
    neg: Conditioning,
    *,
    num_steps: int,
    sampler: Sampler,
    guidance_scale: float,
    generator: torch.Generator | list[torch.Generator],
    initial_noise: torch.Tensor | None = None,
    window_start: int = 0,
    record: bool = True,
    grad_steps: int = 0,
    checkpointing: bool = False,
    base: Any = None,
    kl_sampler: Sampler | None = None,
    noise_every_step: bool = False,
) -> Trajectory:
    """Walk ``num_steps`` denoising steps from x_T (``initial_noise``, or drawn from ``generator``).

    ``noise_every_step``: draw a step's noise even where the step is deterministic (outside an SDE window), so
    per-image noise streams stay aligned across samplers (evaluation's pairing).
    """
    n = len(cond)
    keys = policy.schedule(num_steps)
    x = policy.start_latents(n, generator, initial_noise)
    stochastic = set(sampler.stochastic_steps(num_steps, window_start))
    kl_steps_set = set(kl_sampler.stochastic_steps(num_steps, window_start)) if kl_sampler is not None else set()
    with_kl = base is not None and kl_sampler is not None and kl_sampler.stochastic
    ode = sampler.deterministic()
    states, log_probs, stored = [], [], []
    kl = torch.zeros(n, dtype=torch.float64, device=x.device) if with_kl else None
    kl_count = 0
    for i in range(len(keys)):
        key = keys[i]
        grad = grad_steps > 0 and i >= len(keys) - grad_steps
        stoch = i in stochastic
        with torch.set_grad_enabled(grad):
            if grad and checkpointing:
                out = checkpoint(policy.model_output, x, key, cond, neg, guidance_scale, use_reentrant=False)
            else:
                out = policy.model_output(x, key, cond, neg, guidance_scale)
            if with_kl and i in kl_steps_set:
                with torch.no_grad():
                    with base.active():
                        out_base = policy.model_output(x, key, cond, neg, guidance_scale)
                    mean_k, std_k = policy.step_from_output(out, key, x, kl_sampler)
                    mean_b, _ = policy.step_from_output(out_base, key, x, kl_sampler)
                    step_kl = transition_kl(mean_k, mean_b, std_k)
                if step_kl is not None:
                    kl += step_kl
                    kl_count += 1
            mean, std = policy.step_from_output(out, key, x, sampler if stoch else ode)
            if stoch or noise_every_step:
                z = policy.step_noise(x, generator)
            if stoch:
                x_next = mean + std * z
                if record:
                    if not states:
                        states.append(x.detach())
                    log_probs.append(policy.log_prob(x_next.detach(), mean.detach(), std, sampler))
                    states.append(x_next.detach())
                    stored.append(key)
            else:
                x_next = mean
        x = x_next
    if record and states:
        return Trajectory(x, torch.stack(states, dim=1), torch.stack(log_probs, dim=1), torch.stack(stored), kl,
                          kl_count)
    return Trajectory(x, kl=kl, kl_steps=kl_count)
