"""``rlbench eval``: score the images that runs logged, with any rewards, into one long table.

Results are data: ``<out>/scores.parquet`` holds one row per (run, checkpoint, image, reward) with
the columns ``run, checkpoint, prompt_split, prompt, seed, reward, score``. Everything else —
``tables/`` (Markdown, CSV, LaTeX) and ``plots/`` — is derived from that file alone.

Scoring a reward the run was not trained on is how reward over-optimisation shows up (train on A,
watch B), so ``rewards`` may name any registered rewards.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rlbench.errors import InputError, RunDirError
from rlbench.train.rundir import RunDir, atomic_write_bytes, atomic_write_text

SCORE_COLUMNS = ["run", "checkpoint", "prompt_split", "prompt", "seed", "reward", "score"]


@dataclass
class EvalResult:
    out: Path
    scores: pd.DataFrame
    summary: pd.DataFrame


def _run_reward_spec(run: RunDir) -> tuple[str, dict[str, Any]]:
    reward = run.read_config().get("reward", {})
    name = reward.get("name")
    if not name:
        raise RunDirError(f"{run.path}: config.toml names no reward; pass --rewards NAME[,NAME...].")
    options = {k: v for k, v in reward.items() if k not in ("name", "options")}
    options.update(reward.get("options", {}))
    return name, options


def score_runs(
    runs: Sequence[RunDir],
    rewards: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: Any = None,
) -> pd.DataFrame:
    """Score every logged sample image of ``runs`` with ``rewards`` (default: each run's own reward)."""
    from rlbench.utils.images import load_images
    from rlbench.registry import make_reward

    cache: dict[tuple[str, str], Any] = {}
    rows: list[dict[str, Any]] = []
    for run in runs:
        epochs = run.sample_epochs()
        if not epochs:
            raise RunDirError(
                f"{run.path} has no logged samples (samples/<epoch>/records.jsonl); train with "
                "logging.samples_every > 0."
            )
        specs = [(r, {}) for r in rewards] if rewards else [_run_reward_spec(run)]
        for name, options in specs:
            key = (name, repr(sorted(options.items())))
            if key not in cache:
                cache[key] = make_reward(name, **options)
            reward = cache[key]
            for epoch in epochs:
                records = run.read_sample_records(epoch)
                folder = run.samples_dir(epoch)
                for start in range(0, len(records), batch_size):
                    chunk = records[start : start + batch_size]
                    images = load_images([folder / r["file"] for r in chunk])
                    prompts = [r["prompt"] for r in chunk]
                    metadata = [r.get("metadata", {}) for r in chunk]
                    scores = reward(images, prompts, metadata).scores.detach().cpu().tolist()
                    for rec, s in zip(chunk, scores):
                        rows.append({
                            "run": run.name, "checkpoint": epoch, "prompt_split": rec.get("split", "train"),
                            "prompt": rec["prompt"], "seed": rec.get("seed", -1), "reward": name, "score": s,
                        })
                if progress is not None:
                    progress()
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def summarize(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean, std, standard error and n per (run, checkpoint, prompt_split, reward)."""
    keys = ["run", "checkpoint", "prompt_split", "reward"]
    g = scores.groupby(keys, sort=True)["score"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["stderr"] = out["std"] / out["n"].pow(0.5)
    return out[keys + ["mean", "stderr", "std", "n"]]


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(summary: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "summary.md", markdown_table(summary))
    atomic_write_text(folder / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(folder / "summary.tex", summary.to_latex(index=False, float_format="%.4g"))


def plot_curves(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """One plot per reward: mean score (± standard error) against checkpoint, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for reward, part in summary.groupby("reward"):
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
        for (run, split), line in part.groupby(["run", "prompt_split"]):
            line = line.sort_values("checkpoint")
            ax.errorbar(line["checkpoint"], line["mean"], yerr=line["stderr"], marker="o", capsize=2,
                        label=f"{run} ({split})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{reward} (mean ± s.e.)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = folder / f"reward_curve_{reward}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def prepare_out(out: str | Path, overwrite: bool = False) -> Path:
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        if not overwrite:
            raise InputError(
                f"output directory {str(p)!r} already exists and is not empty; choose another --out or "
                "pass --overwrite to replace it."
            )
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    p.mkdir(parents=True, exist_ok=True)
    return p


def evaluate(
    run_dirs: Sequence[str | Path],
    rewards: Sequence[str] | None = None,
    out: str | Path = "eval",
    overwrite: bool = False,
    batch_size: int = 32,
    progress: Any = None,
) -> EvalResult:
    """Score the runs' logged samples with ``rewards`` and write scores, tables and plots to ``out``.

    Args:
        run_dirs: run directories made by ``rlbench train``.
        rewards: reward names; default each run's own training reward.
        out: output directory (must be new or empty unless ``overwrite``).
        batch_size: images per reward call.
    """
    if not run_dirs:
        raise InputError("give at least one run directory.")
    runs = [RunDir.open(p) for p in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise InputError(f"run directories share a name ({names}); runs are identified by folder name.")
    out_path = prepare_out(out, overwrite)
    scores = score_runs(runs, rewards, batch_size=batch_size, progress=progress)
    buf = io.BytesIO()
    scores.to_parquet(buf, index=False)
    atomic_write_bytes(out_path / "scores.parquet", buf.getvalue())
    summary = summarize(scores)
    write_tables(summary, out_path / "tables")
    plot_curves(summary, out_path / "plots")
    return EvalResult(out_path, scores, summary)
