"""DDIM step that also returns the log-density of the sampled transition (the DDPO policy).

Provenance: adapted from kvablack/ddpo-pytorch (MIT),
``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``, which itself copies
``diffusers.DDIMScheduler.step``. Modifications relative to ddpo-pytorch:

1. ``eta <= 0`` raises ``ValueError``; with ``sigma_t = 0`` the transition is deterministic
   and has no density (ddpo-pytorch returns NaN/-inf there).
2. ``timestep`` may be a Python int, a 0-dim tensor or a per-sample tensor of shape ``(B,)``;
   every per-timestep quantity is gathered and broadcast over the non-batch dims.
3. ``final_alpha_cumprod`` is used when ``prev_t < 0``. ddpo-pytorch clamps ``prev_t`` to
   ``>= 0`` *before* its ``torch.where``, so it never used ``final_alpha_cumprod``; that is
   harmless for SD (``set_alpha_to_one=False``) but wrong for ``set_alpha_to_one=True``.
4. All arithmetic runs in float32 whatever the input dtype; ``prev_sample`` is cast back.
   When the step samples ``prev_sample`` itself, the log-prob is evaluated at the sample
   *after* that cast, so re-scoring the stored (half-precision) latent with the same
   parameters later gives exactly the same log-prob (PPO ratio == 1 before an update).
5. ``use_clipped_model_output`` is not exposed (ddpo-pytorch never sets it).
6. Functional API: the scheduler is an argument rather than a monkey-patched ``self``.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from rlbench.diffusion.gaussian import gaussian_log_prob

__all__ = ["ddim_step_with_logprob", "ddim_transition", "gaussian_log_prob"]


def _timesteps_as_tensor(
    scheduler: DDIMScheduler, timestep: int | torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """Validate ``timestep`` and return it as an int64 tensor of shape ``()`` or ``(B,)``."""
    t = torch.as_tensor(timestep, device=sample.device)
    if t.is_floating_point() or t.is_complex():
        if not torch.equal(t, t.round()):
            raise ValueError(f"timestep must hold integer values, got {timestep!r}")
    t = t.long()
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, sample.shape[0])):
        raise ValueError(
            f"timestep must be an int or a tensor of shape (B,) with B={sample.shape[0]}, "
            f"got shape {tuple(t.shape)}"
        )
    # Negative indices would silently wrap around in the gather below.
    n_train = scheduler.config.num_train_timesteps
    if bool(((t < 0) | (t >= n_train)).any()):
        raise ValueError(f"timestep must lie in [0, {n_train - 1}], got {timestep!r}")
    return t


def _ddim_mean_and_std(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the DDIM transition ``p(x_{t-1} | x_t)``, in float32.

    Follows ``DDIMScheduler.step`` formula by formula (eqs. 12 and 16 of the DDIM paper).
    With ``eta=0`` the mean is exactly the deterministic DDIM update. The returned std has
    shape ``(B, 1, ..., 1)`` (or ``()`` for a scalar timestep) and broadcasts against the mean.
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"expected a diffusers DDIMScheduler, got {type(scheduler).__name__}")
    if scheduler.num_inference_steps is None:
        raise ValueError(
            "scheduler.num_inference_steps is None: call scheduler.set_timesteps(...) first"
        )
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}"
        )
    config = scheduler.config
    t = _timesteps_as_tensor(scheduler, timestep, sample)

    # 1. previous timestep (diffusers uses this fixed stride whatever `timestep_spacing` is).
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps

    # 2. alphas. `where` is taken before clamping the index, so prev_t < 0 really selects
    # final_alpha_cumprod (ddpo-pytorch clamps first; see the module docstring).
    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    final_alpha_cumprod = torch.as_tensor(
        scheduler.final_alpha_cumprod, device=sample.device, dtype=torch.float32
    )
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = torch.where(
        prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], final_alpha_cumprod
    )
    # Per-sample scalars -> (B, 1, ..., 1) so they broadcast over C, H, W.
    bshape = (-1,) + (1,) * (sample.ndim - 1) if t.ndim == 1 else ()
    alpha_prod_t = alpha_prod_t.reshape(bshape)
    alpha_prod_t_prev = alpha_prod_t_prev.reshape(bshape)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    # float32 math: fp16 loses the small variances of late steps and the log-prob cancels badly.
    model_output = model_output.float()
    sample = sample.float()

    # 3. predicted x_0 and epsilon.
    if config.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    elif config.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    elif config.prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    else:
        raise ValueError(
            f"prediction_type {config.prediction_type!r} must be 'epsilon', 'sample' or 'v_prediction'"
        )

    # 4. clip or threshold x_0 exactly as the scheduler would.
    if config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(
            -config.clip_sample_range, config.clip_sample_range
        )

    # 5. sigma_t (eq. 16), same as DDIMScheduler._get_variance but batched.
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5

    # 6-7. direction pointing to x_t, then the mean of x_{t-1}. At eta = 1 from a zero-terminal-SNR step
    # (alpha_prod_t = 0, Lin et al. 2023) the coefficient is exactly 0 and rounds to about -1e-8, where
    # DDIMScheduler.step returns NaN; clamping at 0 changes nothing wherever the scheduler's value is defined.
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0) ** 0.5 * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
    return prev_sample_mean, std_dev_t


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step ``x_t -> x_{t-1}`` and its log-density under the policy.

    The transition is ``x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I)`` with ``mu`` and
    ``sigma_t = eta * sqrt(var_t)`` exactly as in ``DDIMScheduler.step`` (epsilon,
    v_prediction and sample prediction types; ``clip_sample`` / ``thresholding`` as the
    scheduler config says). This is kvablack/ddpo-pytorch's ``ddim_step_with_logprob``
    with these differences:

    * ``eta <= 0`` raises ``ValueError``: a deterministic step has no density.
    * ``timestep`` may be an int or a per-sample tensor of shape ``(B,)`` (the training loop
      passes one timestep per sample); all schedule terms are gathered per sample.
    * ``prev_t = t - num_train_timesteps // num_inference_steps``; where ``prev_t < 0`` the
      scheduler's ``final_alpha_cumprod`` is used (ddpo-pytorch clamped the index first and
      so never used it). If that gives ``sigma_t = 0`` (final step of a scheduler with
      ``set_alpha_to_one=True``) the step is deterministic and ``log_prob`` is not finite:
      leave such steps out of training.
    * The log-prob is the elementwise Gaussian density
      ``-(x - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)`` of ``prev_sample``
      (detached), **averaged** over all non-batch dims. The mean, not the sum, is what
      ddpo-pytorch, jannerm/ddpo, trl and Flow-GRPO use: summed over the 4*64*64 = 16,384
      SD latent dims, log-prob differences are large enough that the importance ratio
      ``exp(logp - logp_old)`` overflows float32 and training NaNs at once (jannerm/ddpo#10).
      The mean rescales the per-step objective by 1/D; PPO clip ranges (1e-4) are tuned to it.
    * Everything is computed in float32, also for fp16/bf16 inputs; the returned
      ``prev_sample`` has ``sample``'s dtype and, when sampled here, the log-prob is that
      of the returned (cast) tensor, so re-scoring it later reproduces the value exactly.

    Args:
        scheduler: a ``DDIMScheduler`` on which ``set_timesteps`` has been called.
        model_output: UNet output for ``sample`` (after any classifier-free guidance),
            shape ``(B, C, H, W)``. Gradients flow from ``log_prob`` to it through the mean.
        timestep: current timestep ``t``; int, 0-dim tensor, or shape ``(B,)`` tensor.
        sample: current latent ``x_t``, same shape as ``model_output``.
        eta: DDIM noise scale; DDPO uses 1.0 (DDPM-like variance). Must be > 0.
        prev_sample: if given, the action ``x_{t-1}`` to score (e.g. the stored next latent
            during training); it is detached, so no gradient flows into it. If ``None``, it
            is sampled as ``mu + sigma * z`` with ``z`` drawn like ``DDIMScheduler.step``
            (``randn_tensor(model_output.shape, generator, dtype=model_output.dtype)``), so
            a seeded call matches ``DDIMScheduler.step(..., eta=eta, generator=...)``.
        generator: RNG(s) for the noise; must be ``None`` when ``prev_sample`` is given.

    Returns:
        ``(prev_sample, log_prob)``: ``prev_sample`` in ``sample.dtype`` with
        ``sample``'s shape, and ``log_prob`` float32 of shape ``(B,)``.

    Raises:
        ValueError: ``eta <= 0``; ``set_timesteps`` not called; both ``prev_sample`` and
            ``generator`` given; bad timestep values or shapes; unknown prediction type.
        TypeError: ``scheduler`` is not a ``DDIMScheduler``.
    """
    if not eta > 0:  # also rejects NaN
        raise ValueError(
            f"eta must be > 0, got {eta}: with eta <= 0 the DDIM step is deterministic "
            "(sigma_t = 0) and has no log-density"
        )
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either prev_sample or generator, not both")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}"
        )

    mean, std_dev_t = _ddim_mean_and_std(scheduler, model_output, timestep, sample, eta)

    if prev_sample is None:
        noise = randn_tensor(
            model_output.shape,
            generator=generator,
            device=model_output.device,
            dtype=model_output.dtype,
        )
        prev_sample = (mean + std_dev_t * noise.float()).to(sample.dtype)
    else:
        prev_sample = prev_sample.to(sample.dtype)

    return prev_sample, gaussian_log_prob(prev_sample, mean, std_dev_t)


def ddim_transition(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the DDIM transition ``p(x_{t-1} | x_t) = N(mean, std^2 I)``.

    The same formulas as :func:`ddim_step_with_logprob` (and ``DDIMScheduler.step``), float32.
    ``eta = 0`` is allowed: the mean is then the deterministic DDIM (ODE) update and ``std`` is 0.
    ``std`` has shape ``(B, 1, ..., 1)`` for a per-sample timestep, else ``()``; it broadcasts
    against the mean. Used by evaluation for the exact KL between two policies' transitions.
    """
    if not eta >= 0:  # also rejects NaN
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _ddim_mean_and_std(scheduler, model_output, timestep, sample, eta)
