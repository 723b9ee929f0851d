"""Evaluation: paired sampling of checkpoints on held-out prompts, scoring, KL, diversity, report.

Modules by role: :mod:`~rlbench.eval.plan` (what to evaluate, checked first), :mod:`~rlbench.eval.sampling`
(deterministic paired sampling), :mod:`~rlbench.eval.kl`, :mod:`~rlbench.eval.cache`,
:mod:`~rlbench.eval.scoring`, :mod:`~rlbench.eval.diversity`, :mod:`~rlbench.eval.tables`,
:mod:`~rlbench.eval.plots`, :mod:`~rlbench.eval.report` and :mod:`~rlbench.eval.evaluator`
(``evaluate``, ``evaluate_policy``, ``rebuild``). Importing this package imports none of them.
"""
