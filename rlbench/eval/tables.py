"""Tables derived from the evaluation's data files (scores, KL, diversity, meta) alone.

Statistics are paired: every checkpoint sampled the same prompts with the same noise as the base
model, so the change from the base model is the mean of per-image differences
``score(checkpoint, prompt, k) - score(base, prompt, k)`` and its standard error is
``std(differences) / sqrt(n)`` — far smaller than the unpaired one when images are correlated.
Several seeds of one configuration are summarised as mean ± standard deviation over the runs.

Each table is written as Markdown, CSV (numbers, full precision) and LaTeX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

IMAGE_KEYS = ["run", "prompt_set", "prompt", "image_index", "reward"]


@dataclass
class Table:
    """A derived table: ``data`` holds numbers (CSV), ``display`` formatted cells (Markdown, LaTeX, HTML)."""

    name: str
    title: str
    caption: str
    data: pd.DataFrame
    display: pd.DataFrame


# -- formatting -------------------------------------------------------------------------------------


def num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.{digits}g}"


def pm(mean: float, se: float, signed: bool = True) -> str:
    """``+0.123 ± 0.045`` (the ± part left out when the error is missing)."""
    if mean is None or not math.isfinite(mean):
        return "–"
    head = f"{mean:+.3g}" if signed else f"{mean:.4g}"
    return head if se is None or not math.isfinite(se) else f"{head} ± {se:.2g}"


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: Table, folder: Path) -> None:
    from rlbench.train.rundir import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    md = f"**{table.title}.** {table.caption}\n\n" + markdown_table(table.display)
    atomic_write_text(folder / f"{table.name}.md", md)
    atomic_write_text(folder / f"{table.name}.csv", table.data.to_csv(index=False))
    tex = table.display.to_latex(index=False, escape=True, caption=f"{table.title}. {table.caption}",
                                 label=f"tab:{table.name}")
    atomic_write_text(folder / f"{table.name}.tex", tex)


# -- paired statistics ---------------------------------------------------------------------------------


def with_base(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` plus ``base_score`` (the same image's score at checkpoint 0) and ``diff``."""
    base = scores[scores["checkpoint"] == 0][IMAGE_KEYS + ["score"]].rename(columns={"score": "base_score"})
    base = base.drop_duplicates(IMAGE_KEYS)
    m = scores.merge(base, on=IMAGE_KEYS, how="left")
    m["diff"] = m["score"] - m["base_score"]
    return m


def paired_stats(m: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Per group: mean, stderr, std, n, and the paired change from base ``delta`` ± ``delta_se``."""
    g = m.groupby(list(keys), sort=True)
    out = g.agg(mean=("score", "mean"), std=("score", "std"), n=("score", "size"),
                delta=("diff", "mean"), diff_std=("diff", "std")).reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["stderr"] = out["std"] / np.sqrt(out["n"])
    out["delta_se"] = (out["diff_std"] / np.sqrt(out["n"])).fillna(0.0)
    if "checkpoint" in out:
        out.loc[out["checkpoint"] == 0, ["delta", "delta_se"]] = 0.0
    return out.drop(columns=["diff_std"])


def summary_table(scores: pd.DataFrame) -> Table:
    """Mean ± s.e. and the paired change from base per (run, checkpoint, prompt set, reward): the curves' data."""
    m = with_base(scores)
    out = paired_stats(m, ["run", "checkpoint", "prompt_set", "reward"])
    extra = m.groupby(["run", "checkpoint", "prompt_set"], sort=True).agg(
        reward_queries=("reward_queries", "first"), set_role=("set_role", "first")).reset_index()
    out = out.merge(extra, on=["run", "checkpoint", "prompt_set"], how="left")
    cols = ["run", "checkpoint", "reward_queries", "prompt_set", "set_role", "reward", "mean", "stderr", "std", "n",
            "delta", "delta_se"]
    out = out[cols]
    disp = pd.DataFrame({
        "run": out["run"], "checkpoint": out["checkpoint"], "reward queries": out["reward_queries"],
        "prompt set": out["prompt_set"] + np.where(out["set_role"] == "train", " (train)", ""),
        "reward": out["reward"], "mean ± s.e.": [pm(a, b, signed=False) for a, b in zip(out["mean"], out["stderr"])],
        "change from base ± paired s.e.": [pm(a, b) if c else "" for a, b, c in
                                           zip(out["delta"], out["delta_se"], out["checkpoint"])],
        "n": out["n"]})
    return Table("summary", "Reward curves",
                 "Mean score per run, checkpoint (0 = the base model), prompt set and reward, with its standard "
                 "error, and the change from the base model with the paired standard error (same prompts, same "
                 "noise).", out, disp)


# -- over-optimisation --------------------------------------------------------------------------------


def _reward_info(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in meta.get("rewards", [])}


def golds_for(proxy: str, meta: dict[str, Any], scored: Sequence[str]) -> tuple[list[str], str]:
    """The rewards a proxy is judged against, and what they are: the model's declared gold rewards (the
    one declared for this proxy first), else every other scored reward ("held-out")."""
    gold = meta.get("gold") or {}
    info = _reward_info(meta)
    comps = {c for c, _ in info.get(proxy, {}).get("components", [])}
    declared = [g for g in gold if g in scored and g != proxy]
    if declared:
        declared.sort(key=lambda g: 0 if proxy in gold[g] or comps & set(gold[g]) else 1)
        return declared, "gold"
    others = [r for r in scored if r != proxy and r not in comps and info.get(r, {}).get("role") != "component"]
    return others, "held-out"


def _run_sets(scores: pd.DataFrame, run: str) -> pd.DataFrame:
    """The run's rows on its training prompt set (all its sets when the training set was not evaluated)."""
    part = scores[scores["run"] == run]
    train = part[part["set_role"] == "train"]
    return train if len(train) else part


def _better(info: dict[str, Any], reward: str) -> float:
    return 1.0 if info.get(reward, {}).get("higher_is_better", True) else -1.0


def overoptimisation_table(scores: pd.DataFrame, meta: dict[str, Any]) -> Table:
    """Per run and gold (or held-out) reward: proxy gain, gold at its best checkpoint, at the last, the drop."""
    info = _reward_info(meta)
    scored = list(dict.fromkeys(scores["reward"]))
    rows = []
    for run in meta["runs"]:
        name, proxy = run["name"], run["trained_reward"]
        part = _run_sets(scores, name)
        if not len(part):
            continue
        st = paired_stats(with_base(part), ["checkpoint", "reward"]).set_index(["checkpoint", "reward"])
        cks = sorted(part["checkpoint"].unique())
        last = cks[-1]
        golds, kind = golds_for(proxy, meta, scored)
        for gold in golds:
            g = st.xs(gold, level="reward")["mean"]
            sign = _better(info, gold)
            signed = g * sign  # ties (within rounding) go to the earliest checkpoint
            best = int(min(c for c, v in signed.items() if v >= signed.max() - 1e-9 * max(1.0, abs(signed.max()))))
            rows.append({
                "run": name, "config": run["config"], "seed": run["seed"], "prompt_set": ", ".join(
                    sorted(part["prompt_set"].unique())), "proxy": proxy, "gold": gold, "gold_kind": kind,
                "last_checkpoint": int(last),
                "proxy_base": st.loc[(0, proxy), "mean"], "proxy_last": st.loc[(last, proxy), "mean"],
                "proxy_gain": st.loc[(last, proxy), "delta"], "proxy_gain_se": st.loc[(last, proxy), "delta_se"],
                "gold_base": g.loc[0], "best_checkpoint": best, "gold_best": g.loc[best], "gold_last": g.loc[last],
                "drop_best_to_last": (g.loc[best] - g.loc[last]) * sign,
                "gold_change": st.loc[(last, gold), "delta"], "gold_change_se": st.loc[(last, gold), "delta_se"],
            })
    data = pd.DataFrame(rows)
    if not len(data):
        return Table("overoptimisation", "Over-optimisation", "No run has a reward to judge its proxy by.",
                     data, data)
    disp = pd.DataFrame({
        "run": data["run"], "trained on (proxy)": data["proxy"],
        "proxy gain (last − base)": [pm(a, b) for a, b in zip(data["proxy_gain"], data["proxy_gain_se"])],
        "judged by": data["gold"] + np.where(data["gold_kind"] == "gold", " (gold)", " (held-out)"),
        "base": data["gold_base"].map(num),
        "at best checkpoint": [f"{num(v)} (ckpt {int(c)})" for v, c in zip(data["gold_best"], data["best_checkpoint"])],
        "at last checkpoint": [f"{num(v)} (ckpt {int(c)})" for v, c in zip(data["gold_last"], data["last_checkpoint"])],
        "drop best → last": data["drop_best_to_last"].map(lambda x: f"{x:.3g}"),
        "change last − base": [pm(a, b) for a, b in zip(data["gold_change"], data["gold_change_se"])],
    })
    groups = data.groupby(["config", "gold"], sort=False)
    if any(len(g["run"].unique()) > 1 for _, g in groups):
        extra = []
        for (config, gold), g in groups:
            if len(g) < 2:
                continue
            def ms(col: str, signed: bool = True, g=g) -> str:
                return f"{g[col].mean():{'+' if signed else ''}.4g} ± {g[col].std(ddof=1):.2g} sd"

            extra.append({"run": f"{config} (mean ± sd of {len(g)} seeds)", "trained on (proxy)": g["proxy"].iloc[0],
                          "proxy gain (last − base)": ms("proxy_gain"), "judged by": gold,
                          "base": ms("gold_base", False), "at best checkpoint": ms("gold_best", False),
                          "at last checkpoint": ms("gold_last", False), "drop best → last": ms("drop_best_to_last"),
                          "change last − base": ms("gold_change")})
        disp = pd.concat([disp, pd.DataFrame(extra)], ignore_index=True)
    caption = ("On each run's training prompts. The proxy is the trained reward; it is judged by the model's exact gold "
               "rewards where it declares them (else by every other reward). 'Best' is the checkpoint (0 = base) where "
               "the gold reward is best — chosen after the fact, so an optimistic number; 'drop' is how much of it is "
               "lost by the last checkpoint (positive = worse). Changes carry paired standard errors.")
    return Table("overoptimisation", "Over-optimisation: proxy against gold", caption, data, disp)


def proxy_vs_gold_table(scores: pd.DataFrame, kl: pd.DataFrame, meta: dict[str, Any]) -> Table:
    """Per run and checkpoint: the trained reward beside every other reward (training prompts), and sqrt(KL)."""
    rows, disp_rows = [], []
    kl_by = kl.groupby(["run", "checkpoint"])["kl"].mean() if len(kl) else pd.Series(dtype=float)
    trained = [r["trained_reward"] for r in meta["runs"]]
    rewards = list(dict.fromkeys(trained + list(dict.fromkeys(scores["reward"]))))
    for run in meta["runs"]:
        name, proxy = run["name"], run["trained_reward"]
        part = _run_sets(scores, name)
        if not len(part):
            continue
        st = paired_stats(with_base(part), ["checkpoint", "reward"])
        for c in sorted(part["checkpoint"].unique()):
            sc = st[st["checkpoint"] == c].set_index("reward")
            k = kl_by.get((name, c), np.nan)
            row = {"run": name, "trained_reward": proxy, "checkpoint": int(c),
                   "reward_queries": int(part[part["checkpoint"] == c]["reward_queries"].iloc[0]),
                   "sqrt_kl": math.sqrt(k) if k == k and k >= 0 else np.nan}
            drow = {"run": name, "trained on": proxy, "checkpoint": int(c), "reward queries": row["reward_queries"],
                    "√KL": num(row["sqrt_kl"], 3)}
            for r in rewards:
                if r not in sc.index:
                    continue
                row[r] = sc.loc[r, "mean"]
                row[f"{r} change"] = sc.loc[r, "delta"]
                row[f"{r} change_se"] = sc.loc[r, "delta_se"]
                drow[r] = num(sc.loc[r, "mean"]) + ("" if c == 0 else f" ({pm(sc.loc[r, 'delta'], sc.loc[r, 'delta_se'])})")
            rows.append(row)
            disp_rows.append(drow)
    return Table("proxy_vs_gold", "Every reward per checkpoint",
                 "Mean on each run's training prompts; in brackets the change from the base model ± paired s.e. "
                 "Checkpoint 0 is the base model; √KL is the square root of the mean KL from it.",
                 pd.DataFrame(rows), pd.DataFrame(disp_rows).fillna(""))


def cross_reward_table(scores: pd.DataFrame, meta: dict[str, Any]) -> Table:
    """Rows: trained-on reward; columns: evaluated-with reward; cells: change from base at the last checkpoint."""
    cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    rewards = list(dict.fromkeys(scores["reward"]))
    trained_order: list[str] = []
    for run in meta["runs"]:
        part = _run_sets(scores, run["name"])
        if not len(part):
            continue
        last = part["checkpoint"].max()
        st = paired_stats(with_base(part[part["checkpoint"].isin([0, last])]), ["checkpoint", "reward"])
        st = st[st["checkpoint"] == last].set_index("reward")
        trained_order.append(run["trained_reward"])
        for r in rewards:
            cells.setdefault((run["trained_reward"], r), []).append((st.loc[r, "delta"], st.loc[r, "delta_se"]))
    rows, disp = [], []
    for t in dict.fromkeys(trained_order):
        drow = {"trained on ↓ / evaluated with →": t}
        for r in rewards:
            vals = cells.get((t, r), [])
            if not vals:
                continue
            mean = float(np.mean([v for v, _ in vals]))
            se = float(math.sqrt(sum(s * s for _, s in vals)) / len(vals))
            rows.append({"trained_reward": t, "reward": r, "change": mean, "change_se": se, "runs": len(vals)})
            drow[r] = pm(mean, se)
        disp.append(drow)
    return Table("cross_reward", "Cross-reward matrix",
                 "Change from the base model at each run's last checkpoint, on its training prompts, ± paired s.e. "
                 "(several runs with one trained reward: the mean of their changes). The diagonal is the reward "
                 "trained on; off-diagonal cells show what that did to the others.",
                 pd.DataFrame(rows), pd.DataFrame(disp).fillna(""))


def generalisation_table(scores: pd.DataFrame, meta: dict[str, Any]) -> Table:
    """Change from base on the training set against each held-out set, per run, reward and checkpoint."""
    scored = list(dict.fromkeys(scores["reward"]))
    st = paired_stats(with_base(scores), ["run", "checkpoint", "prompt_set", "reward"])
    roles = scores.groupby(["run", "prompt_set"])["set_role"].first()
    sets = list(dict.fromkeys(scores["prompt_set"]))
    rows, disp = [], []
    for run in meta["runs"]:
        name, proxy = run["name"], run["trained_reward"]
        golds, _ = golds_for(proxy, meta, scored)
        part = st[st["run"] == name]
        if not len(part):
            continue
        last = part["checkpoint"].max()
        run_sets = sorted(part["prompt_set"].unique(), key=lambda s: (roles.get((name, s)) != "train", sets.index(s)))
        for r in [proxy] + golds:
            for c in sorted(part["checkpoint"].unique()):
                if c == 0:
                    continue
                for s in run_sets:
                    x = part[(part["checkpoint"] == c) & (part["prompt_set"] == s) & (part["reward"] == r)]
                    if len(x):
                        rows.append({"run": name, "reward": r, "checkpoint": int(c), "prompt_set": s,
                                     "set_role": roles.get((name, s)), "change": x["delta"].iloc[0],
                                     "change_se": x["delta_se"].iloc[0], "base": None})
            drow = {"run": name, "reward": f"{r} (trained)" if r == proxy else r, "checkpoint": int(last)}
            for s in run_sets:
                x = part[(part["checkpoint"] == last) & (part["prompt_set"] == s) & (part["reward"] == r)]
                label = f"{s} (train)" if roles.get((name, s)) == "train" else s
                drow[label] = pm(x["delta"].iloc[0], x["delta_se"].iloc[0]) if len(x) else ""
            disp.append(drow)
    data = pd.DataFrame(rows).drop(columns=["base"], errors="ignore")
    return Table("generalisation", "Generalisation: training prompts against held-out prompts",
                 "Change from the base model at the last checkpoint, ± paired s.e., on the run's training prompt set "
                 "and on each held-out set (the CSV has every checkpoint). A reward that rises on held-out prompts as "
                 "on the training ones has generalised; one that rises only on the training set has memorised them.",
                 data, pd.DataFrame(disp).fillna(""))


def kl_table(kl: pd.DataFrame, scores: pd.DataFrame, meta: dict[str, Any]) -> Table:
    """Mean KL from the base model per run and checkpoint (all prompt sets), its s.e., and sqrt of the mean."""
    if not len(kl):
        empty = pd.DataFrame()
        return Table("kl", "KL from the base model", "No samples.", empty, empty)
    g = kl.groupby(["run", "checkpoint"], sort=True)
    out = g.agg(kl=("kl", "mean"), kl_std=("kl", "std"), n=("kl", "size"), kl_steps=("kl_steps", "max"),
                kl_eta=("kl_eta", "first"), eval_eta=("eval_eta", "first"), on_policy=("on_policy", "first")).reset_index()
    out["kl_se"] = (out["kl_std"] / np.sqrt(out["n"])).fillna(0.0)
    out["sqrt_kl"] = np.sqrt(out["kl"].clip(lower=0))
    order = {r["name"]: i for i, r in enumerate(meta["runs"])}
    out = out.sort_values(["run", "checkpoint"], key=lambda col: col.map(order) if col.name == "run" else col,
                          ignore_index=True)
    rq = scores.groupby(["run", "checkpoint"])["reward_queries"].first()
    out["reward_queries"] = [int(rq.get((r, c), -1)) for r, c in zip(out["run"], out["checkpoint"])]
    out = out[["run", "checkpoint", "reward_queries", "kl", "kl_se", "sqrt_kl", "n", "kl_steps", "kl_eta", "eval_eta",
               "on_policy"]]
    notes = meta.get("kl_notes", {})
    disp = pd.DataFrame({
        "run": out["run"], "checkpoint": out["checkpoint"], "reward queries": out["reward_queries"],
        "KL ± s.e. (nats)": [pm(a, b, signed=False) for a, b in zip(out["kl"], out["kl_se"])],
        "√KL": out["sqrt_kl"].map(lambda x: num(x, 3)),
        "policy eta": out["kl_eta"].map(lambda x: num(x, 3)), "eval eta": out["eval_eta"].map(lambda x: num(x, 3)),
        "on-policy": out["on_policy"].map(lambda x: "yes" if x else "no"),
    })
    caption = ("Sum over denoising steps of the exact KL between the fine-tuned and the base model's Gaussian DDIM "
               "transitions, ||μθ − μbase||² / (2σt²) summed over dimensions, at the states of each eval trajectory, "
               "averaged over images. σt is that of the run's own stochastic policy (its training eta); with the "
               "deterministic sampler (eta = 0) the transitions have no density, so the KL is always measured for the "
               "training eta, on-policy when the eval eta equals it. "
               + " ".join(f"{', '.join(r for r, n in notes.items() if n == note)}: {note}."
                          for note in dict.fromkeys(notes.values())))
    return Table("kl", "KL from the base model", caption, out, disp)


def diversity_table(div: pd.DataFrame, meta: dict[str, Any]) -> Table:
    """Within-prompt Vendi score and mean pairwise distance per run, checkpoint and prompt set."""
    if not len(div):
        note = "; ".join(n for n in meta.get("notices", []) if n.startswith("diversity")) or "not measured"
        empty = pd.DataFrame()
        return Table("diversity", "Diversity", f"Diversity was not measured ({note}).", empty, empty)
    base = div[div["checkpoint"] == 0][["run", "prompt_set", "prompt", "vendi"]].rename(columns={"vendi": "base"})
    m = div.merge(base, on=["run", "prompt_set", "prompt"], how="left")
    m["d"] = m["vendi"] - m["base"]
    g = m.groupby(["run", "checkpoint", "prompt_set"], sort=True)
    out = g.agg(vendi=("vendi", "mean"), vendi_std=("vendi", "std"), prompts=("vendi", "size"),
                n_images=("n_images", "first"), delta=("d", "mean"), d_std=("d", "std"),
                distance=("mean_pairwise_distance", "mean"), features=("features", "first")).reset_index()
    out["vendi_se"] = (out["vendi_std"] / np.sqrt(out["prompts"])).fillna(0.0)
    out["delta_se"] = (out["d_std"] / np.sqrt(out["prompts"])).fillna(0.0)
    out.loc[out["checkpoint"] == 0, ["delta", "delta_se"]] = 0.0
    out = out.drop(columns=["vendi_std", "d_std"])
    order = {r["name"]: i for i, r in enumerate(meta["runs"])}
    out = out.sort_values(["run", "checkpoint"], key=lambda col: col.map(order) if col.name == "run" else col,
                          kind="stable", ignore_index=True)
    disp = pd.DataFrame({
        "run": out["run"], "checkpoint": out["checkpoint"], "prompt set": out["prompt_set"],
        "Vendi ± s.e.": [pm(a, b, signed=False) for a, b in zip(out["vendi"], out["vendi_se"])],
        "change from base": [pm(a, b) if c else "" for a, b, c in zip(out["delta"], out["delta_se"], out["checkpoint"])],
        "mean pairwise distance": out["distance"].map(lambda x: num(x, 3)),
    })
    features = ", ".join(sorted(set(out["features"].dropna())))
    k = int(out["n_images"].max())
    return Table("diversity", "Diversity within a prompt",
                 f"Vendi score (Friedman & Dieng 2023: exp of the entropy of the eigenvalues of K/n, K the cosine "
                 f"kernel of image features; 1 = all {k} images of a prompt alike, {k} = all different) and mean "
                 f"pairwise cosine distance, averaged over prompts; change from base ± paired s.e. over prompts. "
                 f"Features: {features}.", out, disp)


def config_curves(summary: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
    """Mean and sd over the seeds of each configuration, per checkpoint, prompt set and reward."""
    configs = {r["name"]: r["config"] for r in meta["runs"]}
    s = summary.assign(config=summary["run"].map(configs))
    g = s.groupby(["config", "checkpoint", "prompt_set", "reward"], sort=True)
    out = g.agg(mean=("mean", "mean"), sd=("mean", "std"), delta=("delta", "mean"), delta_sd=("delta", "std"),
                runs=("run", "nunique"), reward_queries=("reward_queries", "mean")).reset_index()
    return out.fillna({"sd": 0.0, "delta_sd": 0.0})


def all_tables(scores: pd.DataFrame, kl: pd.DataFrame, div: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Table]:
    # The suites' own prompt sets appear in their tables alone (rlbench.eval.suites, added by report.derive) and in
    # the summary; every other table is about the runs' training and held-out sets.
    suite_sets = {p["name"] for p in meta.get("prompt_sets", []) if p.get("role") == "suite"}
    all_scores = scores
    if suite_sets:
        scores = scores[scores["set_role"] != "suite"]
        kl = kl[~kl["prompt_set"].isin(suite_sets)]
        div = div[~div["prompt_set"].isin(suite_sets)]
    summary = summary_table(all_scores)
    tables = {
        "overoptimisation": overoptimisation_table(scores, meta),
        "proxy_vs_gold": proxy_vs_gold_table(scores, kl, meta),
        "generalisation": generalisation_table(scores, meta),
        "cross_reward": cross_reward_table(scores, meta),
        "kl": kl_table(kl, scores, meta),
        "diversity": diversity_table(div, meta),
        "summary": summary,
    }
    if any(len(g) > 1 for _, g in pd.Series([r["config"] for r in meta["runs"]]).groupby(
            [r["config"] for r in meta["runs"]])):
        data = config_curves(summary.data, meta)
        shown = data[data["runs"] > 1]
        disp = pd.DataFrame({"configuration": shown["config"], "checkpoint": shown["checkpoint"],
                             "prompt set": shown["prompt_set"], "reward": shown["reward"],
                             "mean ± sd over seeds": [f"{a:.4g} ± {b:.2g}" for a, b in zip(shown["mean"], shown["sd"])],
                             "change ± sd": [f"{a:+.3g} ± {b:.2g}" for a, b in zip(shown["delta"], shown["delta_sd"])],
                             "seeds": shown["runs"]})
        tables["seeds"] = Table("seeds", "Seeds of one configuration",
                                "Mean ± standard deviation over the runs (seeds) of each configuration that has "
                                "several (the CSV has every configuration).", data, disp)
    return tables
