"""Small statistics shared by the proxy-reward measurements (no scipy dependency)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two 1-D sequences (average ranks for ties, as scipy.stats.spearmanr)."""
    import pandas as pd

    ra = pd.Series(np.asarray(a, dtype=np.float64)).rank(method="average").to_numpy()
    rb = pd.Series(np.asarray(b, dtype=np.float64)).rank(method="average").to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])
