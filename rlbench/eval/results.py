"""The evaluation's data files: their columns, writing and reading (the contract of ``--from``).

Everything derived — tables, plots, the report — reads a results folder through :func:`load_results`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from rlbench.errors import InputError

SCORE_COLUMNS = ["run", "algorithm", "trained_reward", "seed", "config", "checkpoint", "reward_queries",
                 "prompt_set", "set_role", "prompt", "image_index", "sample_seed", "reward", "score", "image"]
KL_COLUMNS = ["run", "checkpoint", "prompt_set", "prompt", "image_index", "sample_seed", "kl", "kl_steps",
              "kl_eta", "eval_eta", "on_policy"]
DIVERSITY_COLUMNS = ["run", "checkpoint", "prompt_set", "prompt", "n_images", "vendi", "mean_pairwise_distance",
                     "features"]


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def load_results(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """scores, kl, diversity and meta of a results folder; a clear error when it is not one."""
    folder = Path(folder)
    need = ["scores.parquet", "kl.parquet", "diversity.parquet", "meta.json"]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise InputError(f"{str(folder)!r} is not an rlbench eval folder (missing {', '.join(missing)}); pass --from "
                         "a folder written by `rlbench eval`.")
    try:
        scores = pd.read_parquet(folder / "scores.parquet")
        kl = pd.read_parquet(folder / "kl.parquet")
        div = pd.read_parquet(folder / "diversity.parquet")
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except Exception as exc:  # pyarrow, JSON: any decoding failure
        raise InputError(f"the results in {str(folder)!r} cannot be read ({type(exc).__name__}: {exc}); run the "
                         "evaluation again.") from exc
    return scores, kl, div, meta
