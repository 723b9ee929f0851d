"""What the suite analyses share (:mod:`rlbench.bench.analysis`, :mod:`rlbench.bench.stats`, the runner's main
table): the spec table, the summary joined with it, the gold rewards the models declare, the mean ± sd cell and each
run's last checkpoint."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def spec_info(specs: Sequence[Any]) -> pd.DataFrame:
    """spec id -> algorithm, trained reward (one row per spec)."""
    return pd.DataFrame([{"spec": s.id, "algorithm": s.train["algorithm"]["name"], "trained": s.reward}
                         for s in specs])


def _msd(values: Sequence[float], digits: int = 3, signed: bool = True) -> str:
    """``+0.123 ± 0.045`` over seeds (sd, ddof 1); one value alone without the ±."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return "–"
    m = float(np.mean(v))
    head = f"{m:+.{digits}g}" if signed else f"{m:.{digits}g}"
    return head if len(v) < 2 else f"{head} ± {float(np.std(v, ddof=1)):.2g}"


def _frame(summary: pd.DataFrame, specs: Sequence[Any]) -> pd.DataFrame:
    return summary.merge(spec_info(specs), on="spec", how="inner")


def _golds(summary: pd.DataFrame, specs: Sequence[Any]) -> list[str]:
    """The gold rewards the specs' models declare (``eval_defaults``) that the evaluations scored."""
    from rlbench.eval.plan import model_eval_defaults

    declared = {g for s in specs for g in model_eval_defaults(s.train["model"]["name"]).get("gold_rewards", [])}
    return sorted(declared & set(summary["reward"].unique()))


def at_last_checkpoint(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of each run's (spec, seed) last evaluated checkpoint."""
    return frame[frame["checkpoint"] == frame.groupby(["spec", "seed"])["checkpoint"].transform("max")]
