"""Statistics of a benchmark suite with three or more seeds per spec (:mod:`rlbench.bench.analysis` adds them
when every spec with results has at least :data:`MIN_SEEDS` seeds).

* ``intervals``: per spec, the trained reward's gain and each gold reward's change on the training prompts at
  the last checkpoint, with the 95 % t interval over seeds; per trained reward the spec with the highest change
  of that reward's gold is ``best`` and the specs a Welch test cannot tell from it are ``≈ best``.
* ``significance``: per trained reward, every pair of its specs: the differences of those means and Welch's
  t-test over seeds (two-sided, Welch–Satterthwaite degrees of freedom).
* ``equal_time``: the same runs at equal wall time, from ``train/metrics.jsonl``: the trained and the watched
  gold rewards on the training samples of the epochs ending in (0.8 T, T] of cumulative training time, minus
  epoch 0 (the base model's samples); T is the smallest median training time among the specs of a reward.
  When every run recorded its machine's speed (``state.json`` ``machines``), the clocks are first put on the
  median machine's, so runs made on machines of different speeds compare.
* ``ratio_by_step``: the mean PPO importance ratio per denoising step (DDPO-IS and GRPO runs log it), to see
  whether it drifts below 1 at the low-noise steps (GRPO-Guard's diagnosis).

Plots: ``gain_vs_gold.png`` (one point per run) and ``ratio_by_step.png``.

The t distribution is computed here (the regularized incomplete beta function by its continued fraction), so
the module needs no SciPy; tests check it against SciPy's and against the printed t tables.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlbench.bench.common import _frame, _golds, _msd, at_last_checkpoint
from rlbench.eval.tables import Table

MIN_SEEDS = 3
ALPHA = 0.05
WINDOW = (0.8, 1.0)  # equal_time: the epochs whose cumulative training time lies in (0.8 T, T]
# The suite report's order of these tables, each with the plot shown after it (None: none).
REPORT = (("intervals", "gain_vs_gold.png"), ("significance", None), ("equal_time", None),
          ("ratio_by_step", "ratio_by_step.png"))


# -- the t distribution ------------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (not necessarily whole) degrees of freedom."""
    if not math.isfinite(t):
        return 0.0 if math.isinf(t) else math.nan
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (q in (0.5, 1)), by bisection on :func:`t_two_sided_p`;
    e.g. t_{0.975, 2} = 4.303, t_{0.975, 30} = 2.042."""
    p = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p else (lo, mid)
    return (lo + hi) / 2.0


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray([float(x) for x in values if x is not None], dtype=float)
    return v[np.isfinite(v)]


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t interval of the mean, mean ± t_{(1+level)/2, n-1} · sd / √n (sd with ddof 1);
    the bounds are NaN with fewer than two values."""
    v = _finite(values)
    if not len(v):
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    half = t_quantile((1.0 + level) / 2.0, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - half, m + half


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), Welch–Satterthwaite df, two-sided p) of Welch's unequal-variance t-test;
    df and p are NaN with fewer than two values on a side. Both sides constant: p = 1 when the means are
    equal, else 0."""
    a, b = _finite(a), _finite(b)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b)
    if va + vb == 0.0:
        return diff, math.inf, 1.0 if diff == 0.0 else 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, df, t_two_sided_p(diff / math.sqrt(va + vb), df)


# -- which suites, specs and runs ------------------------------------------------------------------------------

def applies(summary: pd.DataFrame | None, specs: Sequence[Any]) -> bool:
    """True when some spec has results and every spec declares at least MIN_SEEDS seeds (a suite run part of the
    way gets its statistics over the seeds finished so far: intervals need two, so one seed shows the mean alone)."""
    if summary is None or summary.empty:
        return False
    ids = set(summary["spec"].unique())
    return any(s.id in ids for s in specs) and all(len(s.seeds) >= MIN_SEEDS for s in specs)


def family(spec: Any) -> str:
    """The spec's model family ("ddim", "flow"; "–" when it cannot be told)."""
    from rlbench.diffusion.sampler import model_family
    from rlbench.errors import RLBenchError

    try:
        return model_family(spec.train["model"]["name"]) or "–"
    except RLBenchError:
        return "–"


def gold_of(trained: str, specs: Sequence[Any], golds: Sequence[str]) -> str | None:
    """The gold reward that judges ``trained``: itself when it is a gold, else the gold whose ``gold_of`` entry
    (the specs' models' eval_defaults) names it; None when no model declares one."""
    from rlbench.eval.plan import model_eval_defaults

    if trained in golds:
        return trained
    for model in sorted({s.train["model"]["name"] for s in specs if s.reward == trained}):
        for gold, proxies in sorted((model_eval_defaults(model).get("gold_of") or {}).items()):
            if gold in golds and trained in proxies:
                return gold
    return None


def label(spec: Any) -> str:
    """The spec's row name without its trained reward and version: ``clip-flow-grpo-v2`` -> ``flow-grpo``."""
    name = re.sub(r"-v\d+$", "", spec.id)
    return name.split("-", 1)[1] if "-" in name else name


def last_deltas(summary: pd.DataFrame, specs: Sequence[Any]) -> pd.DataFrame:
    """Per run and reward: the change from the base model on the training prompts at the run's last checkpoint
    (columns spec, seed, algorithm, trained, reward, delta)."""
    train = _frame(summary, specs)
    train = train[train["set_role"] == "train"]
    last = at_last_checkpoint(train)
    return last[["spec", "seed", "algorithm", "trained", "reward", "delta"]].sort_values(["spec", "seed", "reward"])


def _per_seed(last: pd.DataFrame, spec: str, reward: str) -> list[float]:
    d = last[(last["spec"] == spec) & (last["reward"] == reward)].sort_values("seed")
    return d["delta"].astype(float).tolist()


def _keys(trained: str, golds: Sequence[str]) -> list[tuple[str, str, str]]:
    """(data column, display column, reward) of the trained reward and each gold other than it."""
    return [("proxy_gain", "trained-reward gain", trained)] + [
        (f"{g}:change", f"{g} change", g) for g in golds if g != trained]


# -- intervals and significance --------------------------------------------------------------------------------

def _ci_cell(m: float, lo: float, hi: float) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{m:+.3g}" if not math.isfinite(lo) else f"{m:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def intervals(summary: pd.DataFrame, specs: Sequence[Any]) -> Table:
    """Per spec: the mean gain and gold changes with their 95 % t intervals over seeds, and the best-on-gold marker."""
    last = last_deltas(summary, specs)
    golds = _golds(summary, specs)
    by_id = {s.id: s for s in specs}
    data_rows, display_rows = [], []
    for (trained, spec_id), g in last.groupby(["trained", "spec"], sort=True):
        spec = by_id[spec_id]
        data: dict[str, Any] = {"spec": spec_id, "algorithm": spec.train["algorithm"]["name"],
                                "family": family(spec), "trained": trained, "seeds": int(g["seed"].nunique())}
        disp: dict[str, Any] = {"trained on": trained, "spec": spec_id, "algorithm": data["algorithm"],
                                "family": data["family"], "seeds": data["seeds"]}
        for col, shown, reward in _keys(trained, golds):
            m, lo, hi = t_interval(_per_seed(last, spec_id, reward))
            data.update({col: m, f"{col}:lo": lo, f"{col}:hi": hi})
            disp[shown] = _ci_cell(m, lo, hi)
        data_rows.append(data)
        display_rows.append(disp)
    if not data_rows:
        empty = pd.DataFrame()
        return Table("intervals", "Confidence intervals over seeds", "No finished runs.", empty, empty)
    data, display = pd.DataFrame(data_rows), pd.DataFrame(display_rows)
    marks = _best_marks(last, specs, golds)
    data["best"] = display["best on gold"] = [marks.get(s, "") for s in data["spec"]]
    n = sorted(data["seeds"].unique())
    return Table(
        "intervals", "Confidence intervals over seeds",
        "On the training prompts, at each run's last checkpoint: the trained reward's and each gold reward's mean "
        "change from the base model over seeds, with its 95 % t interval over seeds in brackets (mean ± "
        f"t_{{0.975, n-1}} · sd / √n, n = seeds = {', '.join(map(str, n))}). 'best on gold': per trained reward, "
        "the spec with the highest mean change of that reward's gold is 'best', and every spec a two-sided Welch "
        f"t-test over seeds cannot tell from it (p ≥ {ALPHA}) is '≈ best'.",
        data, display.fillna("–"))


def _best_marks(last: pd.DataFrame, specs: Sequence[Any], golds: Sequence[str]) -> dict[str, str]:
    """spec -> "best" / "≈ best" / "" on the gold of its trained reward."""
    marks: dict[str, str] = {}
    for trained, g in last.groupby("trained", sort=True):
        gold = gold_of(trained, specs, golds)
        if gold is None:
            continue
        values = {s: _per_seed(g, s, gold) for s in sorted(g["spec"].unique())}
        values = {s: v for s, v in values.items() if _finite(v).size}
        if not values:
            continue
        best = max(values, key=lambda s: float(_finite(values[s]).mean()))  # the first of ties, in sorted order
        for s, v in values.items():
            p = welch(values[best], v)[2]
            marks[s] = "best" if s == best else ("≈ best" if math.isfinite(p) and p >= ALPHA else "")
    return marks


def significance(summary: pd.DataFrame, specs: Sequence[Any]) -> Table:
    """Per trained reward, every pair of its specs: the difference of the means (A - B) and Welch's p."""
    last = last_deltas(summary, specs)
    golds = _golds(summary, specs)
    data_rows, display_rows = [], []
    for trained, g in last.groupby("trained", sort=True):
        for a, b in itertools.combinations(sorted(g["spec"].unique()), 2):
            data: dict[str, Any] = {"trained": trained, "spec_a": a, "spec_b": b,
                                    "seeds_a": int(g[g["spec"] == a]["seed"].nunique()),
                                    "seeds_b": int(g[g["spec"] == b]["seed"].nunique())}
            disp: dict[str, Any] = {"trained on": trained, "spec A": a, "spec B": b}
            for col, shown, reward in _keys(trained, golds):
                diff, df, p = welch(_per_seed(g, a, reward), _per_seed(g, b, reward))
                data.update({f"{col}:diff": diff, f"{col}:df": df, f"{col}:p": p})
                disp[f"Δ {shown}"] = "–" if not math.isfinite(diff) else (
                    f"{diff:+.3g}" + ("*" if math.isfinite(p) and p < ALPHA else ""))
            data_rows.append(data)
            display_rows.append(disp)
    return Table(
        "significance", "Pairwise differences between specs",
        "Per trained reward, every pair of specs trained on it: spec A's mean minus spec B's of the trained "
        "reward's gain and of each gold reward's change (training prompts, last checkpoint), * where a two-sided "
        f"Welch t-test over seeds (Welch–Satterthwaite degrees of freedom) gives p < {ALPHA}. The p-values are in "
        "significance.csv; they are not corrected for the number of pairs (at 5 %, about one pair in twenty "
        "differs by chance).",
        pd.DataFrame(data_rows), pd.DataFrame(display_rows).fillna("–"))


# -- training metrics -----------------------------------------------------------------------------------------

def read_metrics(root: Path, summary: pd.DataFrame) -> pd.DataFrame:
    """``train/metrics.jsonl`` of every run with results (spec, seed, epoch, ... one row per epoch; the last line
    of an epoch logged twice wins). Runs without the file are left out; unreadable lines are skipped."""
    frames = []
    for spec, seed in sorted(set(zip(summary["spec"], summary["seed"]))):
        path = root / "runs" / spec / f"seed-{seed}" / "train" / "metrics.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "epoch" in row:
                rows.append(row)
        if rows:
            df = pd.DataFrame(rows).drop_duplicates("epoch", keep="last").sort_values("epoch")
            speed = machine_speed(root / "runs" / spec / f"seed-{seed}" / "state.json")
            frames.append(df.assign(spec=spec, seed=int(seed), machine_seconds_per_image_step=speed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["spec", "seed", "epoch"])


def machine_speed(state_file: Path) -> float:
    """A run's machine speed from its ``state.json`` (``machines``, one record per training attempt, written by
    :func:`rlbench.bench.runner.run`): seconds per image-step of the speed probe, averaged over the attempts
    weighted by their training time; NaN where any attempt (or the whole run, made before the record existed)
    has no timing."""
    try:
        attempts = json.loads(state_file.read_text(encoding="utf-8")).get("machines")
    except (OSError, ValueError, AttributeError):
        return math.nan
    if not isinstance(attempts, list) or not attempts:
        return math.nan
    speeds, weights = [], []
    for a in attempts:
        v = a.get("seconds_per_image_step") if isinstance(a, dict) else None
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return math.nan
        speeds.append(float(v))
        weights.append(max(float(a.get("train_seconds") or 0.0), 0.0))
    return float(np.average(speeds, weights=weights)) if sum(weights) > 0 else float(np.mean(speeds))


def _column(run: pd.DataFrame, key: str) -> np.ndarray:
    return pd.to_numeric(run[key], errors="coerce").to_numpy(float) if key in run else np.full(len(run), np.nan)


def equal_time(metrics: pd.DataFrame, specs: Sequence[Any], golds: Sequence[str]) -> Table:
    """Per spec: the trained and watched gold rewards over the training samples at equal wall time T."""
    by_id = {s.id: s for s in specs}
    runs: dict[str, list[dict[str, Any]]] = {}
    for (spec_id, seed), run in metrics.groupby(["spec", "seed"], sort=True):
        if spec_id not in by_id:
            continue
        cum = np.cumsum(_column(run, "seconds"))
        if not len(cum) or not np.all(np.isfinite(cum)) or 0 not in set(run["epoch"]):
            continue
        speed = _column(run, "machine_seconds_per_image_step")[0]
        runs.setdefault(spec_id, []).append({"seed": seed, "run": run, "cum": cum, "speed": speed})
    # Machines of different speeds: every run's clock is put on the median machine's (a run on a machine half as
    # fast counts half its seconds). Only when every run was timed: a partly normalised clock compares nothing.
    speeds = [r["speed"] for rs in runs.values() for r in rs]
    timed = sum(math.isfinite(v) for v in speeds)
    normalised = bool(speeds) and timed == len(speeds)
    reference = float(np.median(speeds)) if normalised else math.nan
    for rs in runs.values():
        for r in rs:
            if normalised:
                r["cum"] = r["cum"] * (reference / r["speed"])
            r["total"] = float(r["cum"][-1])
    by_reward: dict[str, list[str]] = {}
    for spec_id in sorted(runs):
        by_reward.setdefault(by_id[spec_id].reward, []).append(spec_id)
    data_rows, display_rows, times = [], [], {}
    for trained, ids in sorted(by_reward.items()):
        T = min(float(np.median([r["total"] for r in runs[s]])) for s in ids)
        times[trained] = T
        keys = [("proxy_change", "trained-reward change", "reward_mean")] + [
            (f"{g}:change", f"{g} change", f"watch_mean/{g}") for g in golds if g != trained]
        for spec_id in ids:
            spec = by_id[spec_id]
            values: dict[str, list[float]] = {col: [] for col, _, _ in keys}
            epochs = []
            for r in runs[spec_id]:
                window = (r["cum"] > WINDOW[0] * T) & (r["cum"] <= WINDOW[1] * T)
                if not window.any():
                    continue
                epochs.append(int(window.sum()))
                base = r["run"]["epoch"].to_numpy() == 0
                for col, _, key in keys:
                    v = _column(r["run"], key)
                    change = float(np.nanmean(v[window]) - v[base][0]) if np.isfinite(v[window]).any() else math.nan
                    if math.isfinite(change):
                        values[col].append(change)
            data = {"trained": trained, "spec": spec_id, "algorithm": spec.train["algorithm"]["name"],
                    "family": family(spec), "seconds": T, "runs": len(epochs),
                    "epochs": float(np.mean(epochs)) if epochs else math.nan}
            if normalised:  # the runs' machines: seconds per image-step of the speed probe, mean over seeds
                data["machine_seconds_per_image_step"] = float(np.mean([r["speed"] for r in runs[spec_id]]))
            disp = {"trained on": trained, "spec": spec_id, "algorithm": data["algorithm"], "family": data["family"],
                    "runs": len(epochs), "epochs in window": ", ".join(map(str, epochs)) or "–"}
            for col, shown, _ in keys:
                v = values[col]
                data[col] = float(np.mean(v)) if v else math.nan
                data[f"{col}:sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
                disp[shown] = _msd(v)
            data_rows.append(data)
            display_rows.append(disp)
    t_text = "; ".join(f"T = {T:.0f} s for {r}" for r, T in times.items()) or "no run logged its training time"
    if normalised:
        clock = (f" Times are on one clock: each run's seconds are scaled by the median machine speed over its own "
                 f"({reference * 1000:.2f} ms per image-step of the speed probe; state.json 'machines'), so runs "
                 "made on machines of different speeds compare as if made on one.")
    elif speeds:
        missing = ("No run recorded its machine's speed" if not timed else
                   f"{len(speeds) - timed} of the {len(speeds)} runs recorded no machine speed")
        clock = (f" {missing} (state.json 'machines'), so the times are as measured: they compare only runs made "
                 "on one machine.")
    else:
        clock = ""
    return Table(
        "equal_time", "At equal wall time",
        "The same runs compared at equal training time, from their training logs (metrics.jsonl): per trained "
        "reward, T is the smallest median (over seeds) total training time among its specs "
        f"({t_text}). Per run, the trained reward and each watched gold reward on the epoch's training samples, "
        f"averaged over the epochs whose cumulative training time falls in ({WINDOW[0]:g} T, T], minus the run's "
        "epoch 0 (samples of the base model); mean ± sd over seeds. 'runs' counts the seeds with an epoch in the "
        "window (the others are left out), 'epochs in window' lists how many epochs each averaged." + clock,
        pd.DataFrame(data_rows), pd.DataFrame(display_rows).fillna("–"))


def ratio_by_step(metrics: pd.DataFrame, specs: Sequence[Any]) -> Table | None:
    """Per spec and stored denoising step: the mean importance ratio over every epoch of every seed that trained
    the step (nulls ignored); None when no run logged ``ratio_by_step``."""
    if "ratio_by_step" not in metrics:
        return None
    by_id = {s.id: s for s in specs}
    data_rows, display_rows = [], []
    for spec_id, g in metrics.groupby("spec", sort=True):
        lists = [r for r in g["ratio_by_step"] if isinstance(r, list)]
        if spec_id not in by_id or not lists:
            continue
        spec = by_id[spec_id]
        head = {"spec": spec_id, "algorithm": spec.train["algorithm"]["name"], "family": family(spec),
                "trained": spec.reward}
        disp = {"spec": spec_id, "algorithm": head["algorithm"], "family": head["family"],
                "runs": int(g[g["ratio_by_step"].map(lambda r: isinstance(r, list))]["seed"].nunique())}
        for step in range(max(len(r) for r in lists)):
            v = _finite([r[step] for r in lists if step < len(r)])
            ratio = float(v.mean()) if len(v) else math.nan
            minus = float((v - 1.0).mean()) if len(v) else math.nan
            data_rows.append({**head, "step": step, "n": len(v), "ratio": ratio, "ratio_minus_1": minus})
            disp[f"step {step}"] = f"{minus:+.2e}" if len(v) else "–"
        display_rows.append(disp)
    if not data_rows:
        return None
    return Table(
        "ratio_by_step", "Importance ratio per denoising step",
        "Per spec (the PPO-clipped algorithms log it), the mean of the importance ratio π/π_old minus 1 over the "
        "trained (sample, step) pairs at each stored denoising step (step 0 = the noisiest), over every epoch of every "
        "seed that trained the step ('–': never trained). GRPO-Guard (Wang et al. 2025) found the mean drifting "
        "below 1 (negative here) at the low-noise steps, where the clip then fails to bound the update. "
        "ratio_by_step.csv holds the ratio itself and the number of epochs averaged.",
        pd.DataFrame(data_rows), pd.DataFrame(display_rows).fillna("–"))


# -- tables and plots -----------------------------------------------------------------------------------------

def all_tables(root: Path, summary: pd.DataFrame, specs: Sequence[Any],
               metrics: pd.DataFrame | None = None) -> dict[str, Table]:
    """``intervals``, ``significance``, ``equal_time`` and (when logged) ``ratio_by_step``; ``metrics``: the
    runs' training logs when already read (:func:`read_metrics`)."""
    metrics = read_metrics(root, summary) if metrics is None else metrics
    tables = [intervals(summary, specs), significance(summary, specs),
              equal_time(metrics, specs, _golds(summary, specs)), ratio_by_step(metrics, specs)]
    return {t.name: t for t in tables if t is not None}


FAMILY_MARKERS = {"ddim": "o", "flow": "^"}


def plots(summary: pd.DataFrame, specs: Sequence[Any], extras: pd.DataFrame | None,
          ratios: Table | None = None) -> dict[str, bytes]:
    """``gain_vs_gold.png`` (per trained reward: each run's gain against its gold's change, and against
    √KL from the base model; ``extras``: :func:`rlbench.bench.analysis.run_extras`) and, when ``ratios`` (the
    ratio_by_step table) is given, ``ratio_by_step.png``."""
    from rlbench.eval.plots import _png

    out: dict[str, bytes] = {}
    last = last_deltas(summary, specs)
    if len(last):
        out["gain_vs_gold.png"] = _png(_gain_vs_gold(last, summary, specs, extras))
    if ratios is not None and len(ratios.data):
        out["ratio_by_step.png"] = _png(_ratio_figure(ratios.data))
    return out


def _gain_vs_gold(last: pd.DataFrame, summary: pd.DataFrame, specs: Sequence[Any], extras: pd.DataFrame | None):
    """A row per trained reward: gain against the gold's change (left; none for a gold-trained reward, x = y)
    and against √KL (right); a point per run, coloured by row (:func:`label`), shaped by model family."""
    from matplotlib.lines import Line2D

    from rlbench.eval.plots import _grid, _title

    golds = _golds(summary, specs)
    by_id = {s.id: s for s in specs}
    labels = sorted({label(by_id[s]) for s in last["spec"].unique()})
    colours = {lab: f"C{i}" if len(labels) <= 10 else _tab20(i) for i, lab in enumerate(labels)}
    kl = ({(r["spec"], int(r["seed"])): r.get("kl", math.nan) for r in extras.to_dict("records")}
          if extras is not None and len(extras) else {})
    trained_rewards = sorted(last["trained"].unique())
    fig, axes = _grid(2 * len(trained_rewards), width=4.2, height=3.4, max_cols=2)
    for row, trained in enumerate(trained_rewards):
        gold = gold_of(trained, specs, golds)
        ax_gold, ax_kl = axes[2 * row], axes[2 * row + 1]
        points = []  # (label, family, gain, gold change, sqrt KL) per run
        for (spec_id, seed), run in last[last["trained"] == trained].groupby(["spec", "seed"], sort=True):
            deltas = dict(zip(run["reward"], run["delta"].astype(float)))
            k = kl.get((spec_id, int(seed)), math.nan)
            points.append((label(by_id[spec_id]), family(by_id[spec_id]), deltas.get(trained, math.nan),
                           deltas.get(gold, math.nan), math.sqrt(k) if math.isfinite(k) and k >= 0 else math.nan))
        show_gold = gold is not None and gold != trained
        for lab, fam, gain, change, root_kl in points:
            style = dict(color=colours[lab], marker=FAMILY_MARKERS.get(fam, "s"), ms=5, ls="none", alpha=0.8)
            if show_gold:
                ax_gold.plot(gain, change, **style)
            ax_kl.plot(root_kl, gain, **style)
        handles = [Line2D([], [], color=colours[lab], marker="o", ls="none", label=lab)
                   for lab in sorted({p[0] for p in points})]
        handles += [Line2D([], [], color="grey", marker=m, ls="none", label=f)
                    for f, m in FAMILY_MARKERS.items() if any(p[1] == f for p in points)]
        panels = [(ax_gold, f"{trained} gain", f"{gold} change", "gain against gold")] if show_gold else []
        panels.append((ax_kl, "√KL from base (√nats)", f"{trained} gain", "gain against √KL"))
        for ax, xlabel, ylabel, what in panels:
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"trained on {trained}: {what}", fontsize=8)
            ax.axhline(0, color="grey", lw=0.6)
            ax.tick_params(labelsize=7)
            ax.legend(handles=handles, fontsize=6)
        if show_gold:
            ax_gold.axvline(0, color="grey", lw=0.6)
        else:
            ax_gold.set_visible(False)
        if not any(math.isfinite(p[4]) for p in points):
            ax_kl.text(0.5, 0.5, "no KL in the runs' evaluations", transform=ax_kl.transAxes, ha="center",
                       fontsize=8, color="grey")
    _title(fig, "Each run at its last checkpoint on the training prompts (colour: algorithm; marker: model "
                "family, o = DDIM, ^ = flow)")
    fig.tight_layout()
    return fig


def _ratio_figure(data: pd.DataFrame):
    """Mean ratio − 1 against the step index, a line per spec, a panel per model family."""
    from rlbench.eval.plots import _grid, _int_ticks, _title

    families = sorted(data["family"].unique())
    fig, axes = _grid(len(families), width=5.2, height=3.4, max_cols=2)
    for ax, fam in zip(axes, families):
        for spec_id, s in data[data["family"] == fam].groupby("spec", sort=True):
            s = s.sort_values("step")  # NaN where never trained: the line breaks there
            ax.plot(s["step"], s["ratio_minus_1"], marker="o", ms=3, label=spec_id)
        ax.axhline(0, color="grey", lw=0.6)
        _int_ticks(ax)
        ax.set_title(f"{fam} family", fontsize=8)
        ax.set_xlabel("denoising step (0 = noisiest)", fontsize=8)
        ax.set_ylabel("mean ratio − 1", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    _title(fig, "Mean importance ratio − 1 per denoising step (over epochs and seeds)")
    fig.tight_layout()
    return fig


def _tab20(i: int) -> tuple[float, ...]:
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20)
