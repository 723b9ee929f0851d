"""Cross-run tables, plots and report of a benchmark suite, derived from its runs' evaluation summaries.

Input: ``summary.csv`` rows (one per spec, seed, checkpoint, prompt set and reward: the mean score and its
paired change from the base model, ``delta``) and the specs (algorithm, trained reward). Every table is
data first (CSV) with a formatted view (Markdown, LaTeX); seeds are aggregated as mean ± sd.

* ``overoptimisation``: per spec, the trained reward's gain on the training prompts at the last checkpoint
  against each gold reward's change, the checkpoint where the gold peaked (base = 0) and how much of that
  peak is lost by the last checkpoint.
* ``transfer``: per spec, the trained reward's gain on the training prompts and on each held-out set.
* ``comparison``: every spec side by side at its last checkpoint: reward queries, training minutes, trained
  gain, gold changes, KL from the base model, diversity change (issue 14's families at equal wall time).
* ``efficiency``: per trained reward, the algorithms ranked by the area under their gain-vs-reward-queries
  curve (the mean gain over the budget, trapezoids from the base model at 0 queries), with the gain at
  half and at the full budget (linear between checkpoints).

With three or more seeds per spec, :mod:`rlbench.bench.stats` adds confidence intervals, pairwise Welch tests,
the comparison at equal wall time and the importance ratio per denoising step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlbench.bench.common import _frame, _golds, _msd, at_last_checkpoint
from rlbench.errors import RunDirError
from rlbench.eval.tables import Table, num, write_table


def _curve(d: pd.DataFrame) -> pd.DataFrame:
    """One run's (checkpoint, reward_queries, mean, delta) on one prompt set and reward, sorted."""
    return d.sort_values("checkpoint")[["checkpoint", "reward_queries", "mean", "delta"]]


def overoptimisation(summary: pd.DataFrame, specs: Sequence[Any]) -> Table:
    df = _frame(summary, specs)
    train = df[df["set_role"] == "train"]
    golds = _golds(df, specs)
    rows = []
    for (spec, algo, trained), g in train.groupby(["spec", "algorithm", "trained"], sort=True):
        seeds = sorted(g["seed"].unique())
        row: dict[str, Any] = {"spec": spec, "algorithm": algo, "trained": trained, "seeds": len(seeds)}
        gains = []
        for seed in seeds:
            c = _curve(g[(g["seed"] == seed) & (g["reward"] == trained)])
            gains.append(float(c["delta"].iloc[-1]) if len(c) else math.nan)
        row["proxy_gain"] = gains
        for gold in golds:
            if gold == trained:
                continue
            change, peak, drop = [], [], []
            for seed in seeds:
                c = _curve(g[(g["seed"] == seed) & (g["reward"] == gold)])
                if not len(c):
                    continue
                change.append(float(c["delta"].iloc[-1]))
                best = int(c["mean"].to_numpy().argmax())
                peak.append(int(c["reward_queries"].iloc[best]))
                drop.append(float(c["mean"].iloc[best] - c["mean"].iloc[-1]))
            row[f"{gold}:change"] = change
            row[f"{gold}:peak"] = peak
            row[f"{gold}:drop"] = drop
        rows.append(row)
    data_rows, display_rows = [], []
    for row in rows:
        data = {k: (float(np.mean(v)) if isinstance(v, list) and v else v) for k, v in row.items()}
        data.update({f"{k}:sd": float(np.std(v, ddof=1)) for k, v in row.items() if isinstance(v, list) and len(v) > 1})
        data_rows.append(data)
        disp = {"spec": row["spec"], "algorithm": row["algorithm"], "trained on": row["trained"],
                "seeds": row["seeds"], "trained-reward gain": _msd(row["proxy_gain"])}
        for gold in golds:
            if f"{gold}:change" not in row:
                continue
            disp[f"{gold} change"] = _msd(row[f"{gold}:change"])
            disp[f"{gold} peak at (queries)"] = ", ".join(str(p) for p in row[f"{gold}:peak"]) or "–"
            disp[f"{gold} lost from peak"] = _msd(row[f"{gold}:drop"], signed=False)
        display_rows.append(disp)
    return Table(
        "overoptimisation", "Over-optimisation across the suite",
        "On the training prompts, at each run's last checkpoint: the trained reward's change from the base "
        "model against each exact gold reward's change (mean ± sd over seeds). 'peak at' is the reward queries "
        "of the checkpoint where that gold was highest (0 = the base model), one per seed; 'lost from peak' is how much of that "
        "best gold value the last checkpoint gave back. Runs trained on a gold have no row for it.",
        pd.DataFrame(data_rows), pd.DataFrame(display_rows).fillna("–"))


def transfer(summary: pd.DataFrame, specs: Sequence[Any]) -> Table:
    df = _frame(summary, specs)
    sets = [s for s in df.sort_values("set_role", ascending=False)["prompt_set"].unique()]
    data_rows, display_rows = [], []
    for (spec, algo, trained), g in df.groupby(["spec", "algorithm", "trained"], sort=True):
        last = at_last_checkpoint(g)
        last = last[last["reward"] == trained]
        data: dict[str, Any] = {"spec": spec, "algorithm": algo, "trained": trained}
        disp: dict[str, Any] = {"spec": spec, "algorithm": algo, "trained on": trained}
        for s in sets:
            d = last[last["prompt_set"] == s]["delta"].tolist()
            data[s] = float(np.mean(d)) if d else math.nan
            disp[s] = _msd(d)
        data_rows.append(data)
        display_rows.append(disp)
    return Table(
        "transfer", "Transfer to unseen prompts",
        "The trained reward's change from the base model at the last checkpoint, on the training prompt set "
        "and on each held-out set (mean ± sd over seeds); the held-out sets hold prompts never trained on.",
        pd.DataFrame(data_rows), pd.DataFrame(display_rows))


def _interp(c: pd.DataFrame, q: float) -> float:
    x, y = c["reward_queries"].to_numpy(float), c["delta"].to_numpy(float)
    return float(np.interp(q, x, y)) if len(x) else math.nan


def efficiency(summary: pd.DataFrame, specs: Sequence[Any]) -> Table:
    df = _frame(summary, specs)
    train = df[df["set_role"] == "train"]
    data_rows = []
    for (spec, algo, trained), g in train.groupby(["spec", "algorithm", "trained"], sort=True):
        aucs, halves, fulls, budgets = [], [], [], []
        for seed, gs in g[g["reward"] == trained].groupby("seed"):
            c = _curve(gs)
            budget = float(c["reward_queries"].max())
            if budget <= 0:
                continue
            x, y = c["reward_queries"].to_numpy(float), c["delta"].to_numpy(float)
            aucs.append(float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / budget))
            halves.append(_interp(c, budget / 2))
            fulls.append(float(y[-1]))
            budgets.append(budget)
        data_rows.append({"trained": trained, "algorithm": algo, "spec": spec, "seeds": len(aucs),
                          "budget": max(budgets) if budgets else math.nan,
                          "auc": float(np.mean(aucs)) if aucs else math.nan, "auc_list": aucs,
                          "half": halves, "full": fulls})
    data = pd.DataFrame(data_rows)
    if data.empty:
        return Table("efficiency", "Sample efficiency", "No finished runs.", data, data)
    data["rank"] = data.groupby("trained")["auc"].rank(ascending=False, method="min").astype(int)
    data = data.sort_values(["trained", "rank"])
    display = pd.DataFrame([{
        "trained on": r.trained, "rank": r.rank, "spec": r.spec, "algorithm": r.algorithm, "seeds": r.seeds,
        "reward queries": num(int(r.budget)) if math.isfinite(r.budget) else "–",
        "mean gain over the budget": _msd(r.auc_list), "gain at half": _msd(r.half), "gain at the end": _msd(r.full),
    } for r in data.itertuples()])
    out = data.drop(columns=["auc_list", "half", "full"]).assign(
        half=[float(np.mean(h)) if h else math.nan for h in data["half"]],
        full=[float(np.mean(f)) if f else math.nan for f in data["full"]])
    return Table(
        "efficiency", "Sample efficiency per trained reward",
        "Algorithms ranked by the mean gain of the trained reward over the reward-query budget (the area under "
        "its change-from-base curve on the training prompts divided by the budget: trapezoids over the "
        "checkpoints, from the base model at 0 queries); mean ± sd over seeds.",
        out, display)


def _read_table(path: Path) -> pd.DataFrame | None:
    """A run's derived CSV table, or None when it is missing or empty (e.g. no KL: an eta = 0 run)."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError):
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} is damaged ({exc}); regenerate it with `rlbench eval --from {path.parents[1]}`.") from exc
    return df if len(df) else None


def run_extras(root: Path, specs: Sequence[Any]) -> pd.DataFrame:
    """Per finished run: training seconds (state.json), the KL from the base model and the diversity change on
    the training prompts at the last checkpoint (the run's eval/tables/kl.csv and diversity.csv)."""
    import json

    rows = []
    for spec in specs:
        for seed in spec.seeds:
            folder = root / "runs" / spec.id / f"seed-{seed}"
            try:
                state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if state.get("status") != "done":
                continue
            row: dict[str, Any] = {"spec": spec.id, "seed": seed, "train_seconds": state.get("train_seconds")}
            kl_file, div_file = folder / "eval" / "tables" / "kl.csv", folder / "eval" / "tables" / "diversity.csv"
            kl, div = _read_table(kl_file), _read_table(div_file)
            if kl is not None and "kl" in kl:
                row["kl"] = float(kl.sort_values("checkpoint")["kl"].iloc[-1])
            if div is not None and "delta" in div:
                div = div[div["checkpoint"] == div["checkpoint"].max()]
                train_set = spec.train.get("prompts", {}).get("name")
                div = div[div["prompt_set"] == train_set] if train_set in set(div["prompt_set"]) else div
                if len(div):
                    row["vendi_delta"] = float(div["delta"].mean())
            rows.append(row)
    return pd.DataFrame(rows)


def comparison(summary: pd.DataFrame, specs: Sequence[Any], extras: pd.DataFrame | None) -> Table:
    """Every spec side by side: budget, time, trained gain, gold changes, KL from the base model, diversity."""
    oo = overoptimisation(summary, specs).data.set_index("spec")
    df = _frame(summary, specs)
    golds = _golds(df, specs)
    queries = df.groupby("spec")["reward_queries"].max()
    data_rows, display_rows = [], []
    for spec in sorted(oo.index):
        r = oo.loc[spec]
        ex = extras[extras["spec"] == spec] if extras is not None and len(extras) else pd.DataFrame()
        minutes = (ex["train_seconds"].dropna() / 60).tolist() if "train_seconds" in ex else []
        kl = ex["kl"].dropna().tolist() if "kl" in ex else []
        vendi = ex["vendi_delta"].dropna().tolist() if "vendi_delta" in ex else []
        data = {"spec": spec, "algorithm": r["algorithm"], "trained": r["trained"], "reward_queries": int(queries[spec]),
                "train_minutes": float(np.mean(minutes)) if minutes else math.nan, "proxy_gain": r["proxy_gain"],
                **{f"{g}:change": r.get(f"{g}:change", math.nan) for g in golds},
                "kl": float(np.mean(kl)) if kl else math.nan, "vendi_delta": float(np.mean(vendi)) if vendi else math.nan}
        data_rows.append(data)
        gold_cells = {}
        for g in golds:
            v = r.get(f"{g}:change", math.nan)
            sd = r.get(f"{g}:change:sd", math.nan)
            gold_cells[f"{g} change"] = "–" if not isinstance(v, float) or not math.isfinite(v) else (
                f"{v:+.3g}" + (f" ± {sd:.2g}" if isinstance(sd, float) and math.isfinite(sd) else ""))
        sd = r.get("proxy_gain:sd", math.nan)
        display_rows.append({
            "spec": spec, "algorithm": r["algorithm"], "trained on": r["trained"],
            "reward queries": f"{int(queries[spec]):,}",
            "training min": _msd(minutes, signed=False) if minutes else "–",
            "trained-reward gain": f"{r['proxy_gain']:+.3g}" + (f" ± {sd:.2g}" if math.isfinite(sd) else ""),
            **gold_cells,
            "KL from base (nats)": _msd(kl, signed=False) if kl else "–",
            "diversity change (Vendi)": _msd(vendi) if vendi else "–",
        })
    return Table(
        "comparison", "Every experiment side by side",
        "At each run's last checkpoint, on the training prompts: reward queries and training time spent, the "
        "trained reward's change from the base model, each gold reward's change, the exact KL of the policy from "
        "the base model (summed over denoising steps and latent dimensions) and the change in the Vendi score of "
        "each prompt's images (mean ± sd over seeds).",
        pd.DataFrame(data_rows), pd.DataFrame(display_rows))


def all_tables(summary: pd.DataFrame, specs: Sequence[Any], extras: pd.DataFrame | None = None) -> dict[str, Table]:
    return {t.name: t for t in (efficiency(summary, specs), overoptimisation(summary, specs),
                                transfer(summary, specs), comparison(summary, specs, extras))}


# -- plots ----------------------------------------------------------------------------------------------

def _err(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def plots(summary: pd.DataFrame, specs: Sequence[Any], oo: Table | None = None) -> dict[str, bytes]:
    """``curves.png`` and ``proxy_vs_gold.png``; ``oo``: the over-optimisation table when already made."""
    from rlbench.eval.plots import _grid, _png, _title

    df = _frame(summary, specs)
    train = df[df["set_role"] == "train"]
    out: dict[str, bytes] = {}
    trained_rewards = sorted(train["trained"].unique())
    golds = _golds(df, specs)
    panels = [(t, r) for t in trained_rewards for r in [t, *[g for g in golds if g != t]]]
    if panels:
        fig, axes = _grid(len(panels), max_cols=3)
        for ax, (t, r) in zip(axes, panels):
            # A line per spec, not per algorithm: v2 trains grpo in three rows on one reward.
            for spec_id, g in train[(train["trained"] == t) & (train["reward"] == r)].groupby("spec"):
                curves = [_curve(gs) for _, gs in g.groupby("seed")]
                x = np.unique(np.concatenate([c["reward_queries"].to_numpy(float) for c in curves]))
                ys = np.stack([np.interp(x, c["reward_queries"].to_numpy(float), c["delta"].to_numpy(float))
                               for c in curves])
                line, = ax.plot(x, ys.mean(0), marker="o", ms=3, label=spec_id)
                if len(curves) > 1:
                    ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_title(f"trained on {t}\n{r}" + (" (trained)" if r == t else ""), fontsize=8)
            ax.set_xlabel("reward queries", fontsize=8)
            ax.set_ylabel("change from base", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        _title(fig, "Change from the base model on the training prompts against reward queries "
                    "(mean over seeds, band = min..max)")
        fig.tight_layout()
        out["curves.png"] = _png(fig)
    oo = (oo or overoptimisation(summary, specs)).data
    pairs = [(t, gd) for t in trained_rewards for gd in golds if gd != t and f"{gd}:change" in oo]
    if pairs:
        fig, axes = _grid(len(pairs), max_cols=3)
        for ax, (t, gd) in zip(axes, pairs):
            for r in oo[oo["trained"] == t].to_dict("records"):
                ax.errorbar(r["proxy_gain"], r[f"{gd}:change"], xerr=_err(r.get("proxy_gain:sd")),
                            yerr=_err(r.get(f"{gd}:change:sd")), fmt="o", capsize=2, label=r["spec"])
            ax.axhline(0, color="grey", lw=0.6)
            ax.axvline(0, color="grey", lw=0.6)
            ax.set_xlabel(f"{t} gain", fontsize=8)
            ax.set_ylabel(f"{gd} change", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        _title(fig, "Proxy gain against gold change at the last checkpoint (mean over seeds)")
        fig.tight_layout()
        out["proxy_vs_gold.png"] = _png(fig)
    return out


# -- writing --------------------------------------------------------------------------------------------

def write(root: Path, summary: pd.DataFrame | None, specs: Sequence[Any]) -> dict[str, Table]:
    """``<root>/tables/`` (md, csv, tex), ``<root>/plots/`` and ``<root>/report.html``; returns the tables."""
    from rlbench.bench import stats
    from rlbench.eval.report import CSS, img_html, table_html
    from rlbench.train.rundir import atomic_write_bytes, atomic_write_text

    if summary is None or summary.empty:
        return {}
    extras = run_extras(root, specs)
    tables = all_tables(summary, specs, extras)
    figs = plots(summary, specs, tables["overoptimisation"])
    if stats.applies(summary, specs):  # three or more seeds per spec: intervals, tests, equal time, ratios
        more = stats.all_tables(root, summary, specs)
        tables.update(more)
        figs.update(stats.plots(summary, specs, extras, more.get("ratio_by_step")))
    for t in tables.values():
        write_table(t, root / "tables")
    (root / "plots").mkdir(parents=True, exist_ok=True)
    for name, data in figs.items():
        atomic_write_bytes(root / "plots" / name, data)
    suite = ", ".join(sorted({s.suite for s in specs}))
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">", '<link rel="icon" href="data:,">',
             f"<title>rlbench bench: {suite}</title><style>{CSS}</style></head><body>",
             f"<h1>rlbench benchmark: {suite}</h1>",
             "<p class=\"caption\">Derived from every run's evaluation (runs/&lt;spec&gt;/seed-&lt;s&gt;/eval/); "
             "summary.csv holds every number.</p>",
             table_html(tables["efficiency"]), img_html(figs["curves.png"], "curves") if "curves.png" in figs else "",
             table_html(tables["overoptimisation"]),
             img_html(figs["proxy_vs_gold.png"], "proxy vs gold") if "proxy_vs_gold.png" in figs else "",
             table_html(tables["transfer"]), table_html(tables["comparison"])]
    for name, plot in stats.REPORT:  # the statistics of a suite with three or more seeds, when made
        if name in tables:
            parts.append(table_html(tables[name]))
        if plot in figs:
            parts.append(img_html(figs[plot], plot.removesuffix(".png").replace("_", " ")))
    parts.append("</body></html>")
    atomic_write_text(root / "report.html", "\n".join(parts))
    return tables
