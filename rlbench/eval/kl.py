"""The exact KL between a fine-tuned and the base model's DDIM transitions.

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


def kl_note(eval_eta: float, kl_eta: float | None) -> str:
    """One line for tables: what the KL column means for these settings."""
    if kl_eta is None:
        return "no KL: the run trained a deterministic sampler (eta = 0), whose transitions have no density"
    if abs(eval_eta - kl_eta) < 1e-12:
        return (f"exact KL of the eta={kl_eta:g} DDIM policy from the base model, summed over steps on its own "
                "trajectories (one sample per image)")
    return (f"KL of the run's eta={kl_eta:g} policy from the base model, summed over steps at the states of the "
            f"eta={eval_eta:g} eval trajectories (not on-policy)")
