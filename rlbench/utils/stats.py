"""Small statistics shared by the proxy-reward measurements (no scipy dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two 1-D sequences (average ranks for ties, as scipy.stats.spearmanr);
    NaN when it is undefined: fewer than two values, or either sequence constant."""
    import pandas as pd

    if len(a) < 2 or np.ptp(np.asarray(a, dtype=np.float64)) == 0 or np.ptp(np.asarray(b, dtype=np.float64)) == 0:
        return float("nan")
    ra = pd.Series(np.asarray(a, dtype=np.float64)).rank(method="average").to_numpy()
    rb = pd.Series(np.asarray(b, dtype=np.float64)).rank(method="average").to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


class PairCounts(NamedTuple):
    """The ``n (n - 1) / 2`` pairs of two paired sequences: ordered the same way by both (``concordant``), the
    opposite way (``discordant``), tied in ``a`` only, in ``b`` only, or in both."""

    concordant: int
    discordant: int
    ties_a: int
    ties_b: int
    ties_both: int

    @property
    def pairs(self) -> int:
        return sum(self)

    @property
    def tau_b(self) -> float:
        """Kendall's tau-b, ``(C - D) / sqrt((C + D + T_b) (C + D + T_a))`` (pairs tied in both count in neither
        factor); NaN when either sequence is constant (as scipy.stats.kendalltau)."""
        c, d, ta, tb, _ = self
        den = math.sqrt((c + d + tb) * (c + d + ta))
        return (c - d) / den if den > 0 else float("nan")

    @property
    def agreement(self) -> float:
        """The fraction of pairs the two order alike: a concordant pair or one tied in both counts 1, a pair tied in
        exactly one of them 1/2, a discordant pair 0 (PickScore's calc_score); NaN without pairs."""
        c, _, ta, tb, both = self
        n = self.pairs
        return (c + both + 0.5 * (ta + tb)) / n if n else float("nan")


def pair_counts(a: Sequence[float], b: Sequence[float], chunk: int = 1024) -> PairCounts:
    """:class:`PairCounts` of two paired 1-D sequences, by the signs of all pairwise differences (O(n^2), in row
    chunks of ``chunk`` so that memory stays O(chunk * n))."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pair_counts needs two 1-D sequences of one length, got {x.shape} and {y.shape}")
    n = len(x)
    totals = np.zeros(5, dtype=np.int64)
    cols = np.arange(n)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        upper = cols[None, :] > rows[:, None]  # each pair once: j > i
        sx = np.sign(x[rows, None] - x[None, :])
        sy = np.sign(y[rows, None] - y[None, :])
        prod = sx * sy
        zx, zy = (sx == 0) & upper, (sy == 0) & upper
        totals += [np.sum((prod > 0) & upper), np.sum((prod < 0) & upper), np.sum(zx & ~zy), np.sum(zy & ~zx),
                   np.sum(zx & zy)]
    return PairCounts(*(int(t) for t in totals))


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two paired 1-D sequences (ties handled as scipy.stats.kendalltau's default); NaN when
    either is constant or has fewer than two values."""
    return pair_counts(a, b).tau_b
