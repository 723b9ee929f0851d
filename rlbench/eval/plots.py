"""Plots derived from the evaluation tables (matplotlib, Agg): PNG bytes by file name."""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np
import pandas as pd

from rlbench.eval.tables import Table, golds_for


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _title(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (a one-panel figure would clip a long one)."""
    import textwrap

    fig.suptitle(textwrap.fill(text, max(30, int(fig.get_figwidth() * 15))), fontsize=9)


def _int_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _grid(n: int, width: float = 3.6, height: float = 2.9, max_cols: int = 4):
    plt = _plt()
    cols = min(max_cols, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=100, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def reward_curves(summary: pd.DataFrame, meta: dict[str, Any]) -> dict[str, bytes]:
    """Per reward: mean against epochs (top row) and reward queries (bottom row), a panel per prompt set.

    Runs of one configuration (several seeds) are drawn as their mean with a ± sd band; single runs with
    error bars of the paired standard error of the change from the base model.
    """
    plt = _plt()
    configs = {r["name"]: r["config"] for r in meta["runs"]}
    labels = {r["name"]: f"{r['name']} ({r['algorithm']}, {r['trained_reward']}, seed {r['seed']})" for r in meta["runs"]}
    multi = {c for c in configs.values() if list(configs.values()).count(c) > 1}
    sets = list(dict.fromkeys(summary["prompt_set"]))
    out = {}
    for reward, part in summary.groupby("reward", sort=False):
        fig, axes = plt.subplots(2, len(sets), figsize=(3.4 * len(sets), 5.6), dpi=100, squeeze=False)
        for j, s in enumerate(sets):
            sub = part[part["prompt_set"] == s]
            for row, xcol, xlabel in ((0, "checkpoint", "epoch"), (1, "reward_queries", "reward queries")):
                ax = axes[row][j]
                for config in dict.fromkeys(configs[r] for r in sub["run"]):
                    runs = [r for r in dict.fromkeys(sub["run"]) if configs[r] == config]
                    if config in multi:
                        d = sub[sub["run"].isin(runs)].groupby("checkpoint").agg(
                            mean=("mean", "mean"), sd=("mean", "std"), x=(xcol, "mean")).reset_index().fillna(0)
                        ax.plot(d["x"], d["mean"], marker="o", ms=3, label=f"{config} ({len(runs)} seeds)")
                        ax.fill_between(d["x"], d["mean"] - d["sd"], d["mean"] + d["sd"], alpha=0.2)
                    else:
                        for r in runs:
                            d = sub[sub["run"] == r].sort_values("checkpoint")
                            ax.errorbar(d[xcol], d["mean"], yerr=d["delta_se"], marker="o", ms=3, capsize=2,
                                        label=labels.get(r, r))
                ax.set_xlabel(xlabel, fontsize=8)
                ax.tick_params(labelsize=7)
                _int_ticks(ax)
                ax.grid(alpha=0.3)
                if row == 0:
                    ax.set_title(s, fontsize=9)
                if j == 0:
                    ax.set_ylabel(reward, fontsize=8)
        axes[0][0].legend(fontsize=6)
        _title(fig, f"{reward}: mean per checkpoint (error bars: paired s.e. of the change from base)")
        fig.tight_layout()
        out[f"reward_curve_{safe_name(reward)}.png"] = _png(fig)
    return out


def proxy_vs_gold(table: Table, meta: dict[str, Any]) -> dict[str, bytes]:
    """Per run: the trained proxy (left axis) and the gold or held-out rewards (right axis) per checkpoint."""
    data = table.data
    if not len(data):
        return {}
    runs = [r for r in meta["runs"] if r["name"] in set(data["run"])]
    fig, axes = _grid(len(runs), width=4.2, height=3.0, max_cols=3)
    scored = [c for c in data.columns if c not in ("run", "trained_reward", "checkpoint", "reward_queries", "sqrt_kl")
              and not c.endswith((" change", " change_se"))]
    for ax, run in zip(axes, runs):
        d = data[data["run"] == run["name"]].sort_values("checkpoint")
        proxy = run["trained_reward"]
        ax.plot(d["checkpoint"], d[proxy], color="C0", marker="o", ms=3, label=f"{proxy} (trained)")
        ax.set_ylabel(proxy, color="C0", fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        _int_ticks(ax)
        golds, kind = golds_for(proxy, meta, scored)
        ax2 = ax.twinx()
        for i, g in enumerate(golds[:4]):
            ax2.plot(d["checkpoint"], d[g], color=f"C{i + 1}", marker="s", ms=3, ls="--", label=f"{g} ({kind})")
        ax2.tick_params(labelsize=7)
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=6, loc="best")
        ax.set_title(run["name"], fontsize=9)
        ax.grid(alpha=0.3)
    _title(fig, "Proxy (left axis) against gold / held-out rewards (right axis), training prompts")
    fig.tight_layout()
    return {"proxy_vs_gold.png": _png(fig)}


def reward_vs_sqrt_kl(table: Table, meta: dict[str, Any]) -> dict[str, bytes]:
    """Change from base of the proxy and the gold rewards against sqrt(KL) (Gao et al. 2022's axes)."""
    data = table.data
    if not len(data) or data["sqrt_kl"].isna().all():
        return {}
    scored = [c for c in data.columns if c not in ("run", "trained_reward", "checkpoint", "reward_queries", "sqrt_kl")
              and not c.endswith((" change", " change_se"))]
    rewards: list[str] = []
    for run in meta["runs"]:
        golds, _ = golds_for(run["trained_reward"], meta, scored)
        rewards += [run["trained_reward"], *golds[:3]]
    rewards = [r for r in dict.fromkeys(rewards) if f"{r} change" in data.columns]
    fig, axes = _grid(len(rewards), width=3.8, height=3.0, max_cols=4)
    for ax, r in zip(axes, rewards):
        for i, run in enumerate(dict.fromkeys(data["run"])):
            d = data[data["run"] == run].sort_values("checkpoint")
            if d[f"{r} change"].isna().all():
                continue
            ax.errorbar(d["sqrt_kl"], d[f"{r} change"], yerr=d[f"{r} change_se"], marker="o", ms=3, capsize=2,
                        color=f"C{i}", label=run)
            for x, y, c in zip(d["sqrt_kl"], d[f"{r} change"], d["checkpoint"]):
                ax.annotate(str(int(c)), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(r, fontsize=9)
        ax.set_xlabel("√KL from base (nats^½)", fontsize=8)
        ax.set_ylabel("change from base", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    _title(fig, "Reward against √KL (points labelled by epoch; training prompts)")
    fig.tight_layout()
    return {"reward_vs_sqrt_kl.png": _png(fig)}


def generalisation(table: Table, meta: dict[str, Any]) -> dict[str, bytes]:
    """Per run: change from base at the last checkpoint on each prompt set, a bar per reward."""
    data = table.data
    if not len(data):
        return {}
    runs = list(dict.fromkeys(data["run"]))
    fig, axes = _grid(len(runs), width=5.0, height=3.2, max_cols=2)
    for ax, run in zip(axes, runs):
        d = data[data["run"] == run]
        d = d[d["checkpoint"] == d["checkpoint"].max()]
        sets = list(dict.fromkeys(d["prompt_set"]))
        rewards = list(dict.fromkeys(d["reward"]))
        width = 0.8 / max(1, len(rewards))
        for i, r in enumerate(rewards):
            x = d[d["reward"] == r].set_index("prompt_set").reindex(sets)
            ax.bar(np.arange(len(sets)) + i * width, x["change"], width, yerr=x["change_se"], capsize=2, label=r)
        ax.set_xticks(np.arange(len(sets)) + width * (len(rewards) - 1) / 2)
        roles = d.groupby("prompt_set")["set_role"].first()
        ax.set_xticklabels([f"{s}\n(train)" if roles.get(s) == "train" else s for s in sets], fontsize=6, rotation=15)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_ylabel("change from base", fontsize=8)
        ax.set_title(f"{run} (epoch {int(d['checkpoint'].max())})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, axis="y")
    _title(fig, "Generalisation: change from base (± paired s.e.) on training and held-out prompts")
    fig.tight_layout()
    return {"generalisation.png": _png(fig)}


def diversity(table: Table) -> dict[str, bytes]:
    """Vendi score per checkpoint, a panel per prompt set, a line per run."""
    data = table.data
    if not len(data):
        return {}
    sets = list(dict.fromkeys(data["prompt_set"]))
    fig, axes = _grid(len(sets), width=3.4, height=2.8, max_cols=4)
    for ax, s in zip(axes, sets):
        d = data[data["prompt_set"] == s]
        for run in dict.fromkeys(d["run"]):
            x = d[d["run"] == run].sort_values("checkpoint")
            ax.errorbar(x["checkpoint"], x["vendi"], yerr=x["vendi_se"], marker="o", ms=3, capsize=2, label=run)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("Vendi score", fontsize=8)
        _int_ticks(ax)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    _title(fig, "Within-prompt diversity (Vendi score, mean ± s.e. over prompts)")
    fig.tight_layout()
    return {"diversity.png": _png(fig)}


def all_plots(tables: dict[str, Table], meta: dict[str, Any]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    out.update(proxy_vs_gold(tables["proxy_vs_gold"], meta))
    out.update(reward_vs_sqrt_kl(tables["proxy_vs_gold"], meta))
    out.update(generalisation(tables["generalisation"], meta))
    out.update(diversity(tables["diversity"]))
    out.update(reward_curves(tables["summary"].data, meta))
    return out
