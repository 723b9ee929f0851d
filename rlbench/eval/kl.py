"""The exact KL between a fine-tuned and the base model's stochastic transitions (DDIM, or a flow SDE).

The flow samplers' steps are Gaussian in the same way (``rlbench.diffusion.flow``: Flow-SDE, Dance-SDE, CPS with
their own std), so the same KL applies with their std; the deterministic ``ode`` has none, like eta = 0.

DDPO's policy step is Gaussian: ``p(x_{t-1} | x_t) = N(mu(x_t, t), sigma_t^2 I)`` with
``sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t) * (1 - a_t / a_{t-1}))`` fixed by the scheduler and
``eta``, and only the mean depends on the weights. Two such policies at the same state differ by::

    KL(N(mu_1, s^2 I) || N(mu_2, s^2 I)) = ||mu_1 - mu_2||^2 / (2 s^2)     (summed over all dims)

and by the chain rule the KL of whole trajectories is the expectation, over the fine-tuned policy's
own trajectories, of the per-step KLs summed over steps. Evaluation sums them along its sampled
trajectories (one sample of that expectation per image; tables average over images).

Which ``sigma``: the run's own stochastic policy, i.e. its training ``eta`` (:func:`kl_eta_for`).
With ``eta = 0`` (the deterministic ODE sampler) ``sigma = 0`` and the transitions are point masses
whose KL is infinite or undefined, so the KL always uses the training eta; when evaluation samples
with another eta, the KL is that policy's per-step KL evaluated at the states the eval sampler
visits (``on_policy = False`` in the tables). A run trained with ``eta = 0`` has no stochastic
policy and no KL (reported as missing). Steps whose ``sigma_t`` is 0 (the last step of a scheduler
with ``set_alpha_to_one``) have no density and are left out of the sum (counted in ``kl_steps``).
"""

from __future__ import annotations

from rlbench.diffusion.gaussian import transition_kl  # noqa: F401  (the one Gaussian KL; re-exported)


def kl_eta_for(train_eta: float) -> float | None:
    """The eta whose policy the KL is measured for: the run's training eta; None when it is 0."""
    return float(train_eta) if train_eta and train_eta > 0 else None


def kl_note(eval_eta: float, kl_eta: float | None, sampler: str = "ddim", eval_sampler: str | None = None) -> str:
    """One line for tables: what the KL column means for these settings (``sampler``: the run's; ``eval_sampler``:
    the evaluation's, default the same)."""
    eval_sampler = eval_sampler or sampler
    if kl_eta is None:
        what = "eta = 0" if sampler == "ddim" else f"{sampler}, noise 0"
        return f"no KL: the run trained a deterministic sampler ({what}), whose transitions have no density"
    level = "eta" if sampler == "ddim" else "noise level"
    policy = "DDIM" if sampler == "ddim" else sampler
    if abs(eval_eta - kl_eta) < 1e-12 and eval_sampler == sampler:
        return (f"exact KL of the {level}={kl_eta:g} {policy} policy from the base model, summed over steps on its "
                "own trajectories (one sample per image)")
    other = f"eta={eval_eta:g}" if eval_sampler == "ddim" else f"{eval_sampler} ({level} {eval_eta:g})"
    return (f"KL of the run's {level}={kl_eta:g} {policy} policy from the base model, summed over steps at the states "
            f"of the {other} eval trajectories (not on-policy)")
