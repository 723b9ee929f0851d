"""Compatibility front door: ``rlbench.evaluate`` and the names older code imported from here.

The harness lives in :mod:`rlbench.eval.evaluator` (see its docstring for the outputs); tables in
:mod:`rlbench.eval.tables`.
"""

from __future__ import annotations

from rlbench.eval.evaluator import (  # noqa: F401
    SCORE_COLUMNS, EvalResult, PolicyEval, check_out, evaluate, evaluate_policy, rebuild,
)
from rlbench.eval.tables import markdown_table  # noqa: F401

__all__ = ["SCORE_COLUMNS", "EvalResult", "PolicyEval", "evaluate", "evaluate_policy", "rebuild", "markdown_table"]
