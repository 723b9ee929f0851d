"""The flow-matching family's schedule and samplers: each stochastic step and its exact Gaussian transition.

Convention (diffusers): ``x_sigma = (1 - sigma) x_0 + sigma eps``, the transformer predicts the velocity
``v = eps - x_0``, sigma runs from 1 (noise) to 0 over the schedule ``sigma_0 = 1 > ... > sigma_N = 0`` of
``FlowMatchEulerDiscreteScheduler.set_timesteps``. Step i maps x_i -> x_{i+1} with ``dt = sigma_{i+1} -
sigma_i < 0``; ``x0_hat = x - sigma v`` and ``x1_hat = x + (1 - sigma) v`` are the predicted clean image and
noise. Every step is ``x_{i+1} = mean + std * z``:

* ``ode`` (the scheduler's Euler step): ``mean = x + dt v``, ``std = 0``.
* ``flow-sde`` (Flow-GRPO; yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``,
  ``sde_step_with_logprob`` L34-68): ``s = a sqrt(sigma / (1 - sigma~))`` with ``sigma~ = sigma_1`` where
  ``sigma = 1`` (the clamp, L44/L47), ``mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt``,
  ``std = s sqrt(-dt)``.
* ``dance-sde`` (DanceGRPO; XueZeyue/DanceGRPO ``fastvideo/train_grpo_flux.py`` ``flux_step`` L131-170):
  ``mean = x + dt v - dt eta^2 / 2 * score`` with ``score = -(x - (1 - sigma) x0_hat) / sigma^2``,
  ``std = eta sqrt(sigma - sigma_next)``: Flow-SDE with a constant diffusion eta.
* ``cps`` (coefficients-preserving; flow_grpo ``sde_type == 'cps'``): ``s^ = sigma_next sin(a pi / 2)``,
  ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^^2) x1_hat``, ``std = s^``; its log-prob is the
  reference's unnormalised ``-mean((x_next - mean)^2)`` ("remove all constants"), not a density, so
  ``exp`` of its differences is not a likelihood ratio (the reference's clip range 1e-5 is tuned to it).

Every quantity is float32 (the reference casts the model output and the sample to fp32: "bf16 can overflow
here"). A step is identified by its **key**, the fp32 triple ``(sigma_i, sigma_{i+1}, sigma~_i)`` taken from
the schedule when sampling and stored with the trajectory, so a replayed step uses bit-identical sigmas
(the reference looks them up by float equality in the scheduler, which another step count resets).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlbench.diffusion.gaussian import gaussian_log_prob


def flow_sigmas(scheduler: Any, num_steps: int, *, image_seq_len: int, flux_sigmas: bool,
                device: Any = None) -> torch.Tensor:
    """The N + 1 fp32 sigmas the diffusers pipelines sample with (``sigma_N = 0``).

    SD3 (``StableDiffusion3Pipeline.__call__``): ``set_timesteps(N)`` (linspace of the training sigmas, then the
    static shift), with ``mu`` from the image length only when the scheduler shifts dynamically. FLUX
    (``FluxPipeline.__call__``): ``sigmas = linspace(1, 1/N, N)`` and ``mu = calculate_shift(image_seq_len)``
    (``pipeline_flux.py`` L73-85, L821-840); a ``use_flow_sigmas`` scheduler takes no sigmas.
    """
    import numpy as np

    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler.config
    mu = None
    if cfg.get("use_dynamic_shifting", False):
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    sigmas = None
    if flux_sigmas and not cfg.get("use_flow_sigmas", False):
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    else:
        scheduler.set_timesteps(num_steps, device=device, mu=mu)
    return scheduler.sigmas.to(torch.float32)


def step_keys(sigmas: torch.Tensor) -> torch.Tensor:
    """(N, 3) fp32 keys ``(sigma_i, sigma_{i+1}, sigma~_i)``; ``sigma~_i = sigma_1`` where ``sigma_i == 1``
    (Flow-GRPO's clamp of ``1 - sigma`` at the schedule's start, ``sigma_max = self.sigmas[1]``)."""
    s = sigmas.to(torch.float32)
    clamp_to = s[1] if len(s) > 2 else s[0]
    tilde = torch.where(s[:-1] == 1, clamp_to, s[:-1])
    return torch.stack([s[:-1], s[1:], tilde], dim=-1)


def _split(key: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigma, sigma_next, sigma~ shaped to broadcast against ``like`` ((B, 1, ..., 1) for per-sample keys)."""
    key = key.to(device=like.device, dtype=torch.float32)
    if key.ndim == 1:
        return key[0], key[1], key[2]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return key[:, 0].reshape(shape), key[:, 1].reshape(shape), key[:, 2].reshape(shape)


def flow_transition(name: str, noise: float, velocity: torch.Tensor, sample: torch.Tensor,
                    key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of step ``key`` of sampler ``name`` at noise level ``noise`` (float32; std broadcasts).

    ``noise = 0`` (or ``ode``) is the deterministic Euler step ``x + dt v`` for every sampler (std 0).
    """
    v = velocity.float()
    x = sample.float()
    sigma, sigma_next, tilde = _split(key, x)
    dt = sigma_next - sigma
    if name == "ode" or noise == 0:
        return x + dt * v, torch.zeros_like(sigma)
    if name == "flow-sde":
        s = torch.sqrt(sigma / (1 - tilde)) * noise
        mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, s * torch.sqrt(-dt)
    if name == "dance-sde":
        x0_hat = x - sigma * v
        score = -(x - x0_hat * (1 - sigma)) / sigma**2
        mean = x + dt * v + (-0.5 * noise**2 * score) * dt
        return mean, noise * torch.sqrt(sigma - sigma_next)
    if name == "cps":
        s_hat = sigma_next * math.sin(noise * math.pi / 2)
        x0_hat = x - sigma * v
        x1_hat = x + v * (1 - sigma)
        mean = x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt(sigma_next**2 - s_hat**2)
        return mean, s_hat
    raise ValueError(f"unknown flow sampler {name!r}")


def flow_log_prob(name: str, x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log-prob averaged over the non-batch dims: the Gaussian density for the SDEs; for CPS the
    reference's unnormalised ``-mean((x_next - mean)^2)``."""
    if name == "cps":
        sq = -((x_next.detach().float() - mean) ** 2)
        return sq.mean(dim=tuple(range(1, sq.ndim)))
    return gaussian_log_prob(x_next, mean, std)


def velocity_kl_factor(name: str, noise: float, key: torch.Tensor) -> torch.Tensor:
    """``c`` with ``mean_theta - mean_ref = c (v_theta - v_ref)`` at step ``key`` (the means are affine in v):
    Flow-SDE ``dt (1 + s^2 (1 - sigma) / (2 sigma))``, Dance-SDE ``dt (1 + eta^2 (1 - sigma) / (2 sigma))``,
    CPS ``-sigma (1 - sigma') + (1 - sigma) sqrt(sigma'^2 - s^^2)``, ODE ``dt``. Used by the tests' independent
    check of the exact KL ``c^2 ||dv||^2 / (2 std^2)``."""
    sigma, sigma_next, tilde = (key[..., 0], key[..., 1], key[..., 2])
    dt = sigma_next - sigma
    if name == "ode" or noise == 0:
        return dt
    if name == "flow-sde":
        s2 = sigma / (1 - tilde) * noise**2
        return dt * (1 + s2 * (1 - sigma) / (2 * sigma))
    if name == "dance-sde":
        return dt * (1 + noise**2 * (1 - sigma) / (2 * sigma))
    if name == "cps":
        s_hat = sigma_next * math.sin(noise * math.pi / 2)
        return -sigma * (1 - sigma_next) + (1 - sigma) * torch.sqrt(sigma_next**2 - s_hat**2)
    raise ValueError(f"unknown flow sampler {name!r}")
