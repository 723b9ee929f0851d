"""Summarise the shapes suite v2 probes: short training runs on seed 100 (not a suite seed) that chose or tested
the suite's settings (the gold upper reference, DRaFT's learning rate, the flow family's learning rate).

    python benchmarks/shapes_v2_probes.py results/shapes-v2/probes            # the Markdown table
    python benchmarks/shapes_v2_probes.py results/shapes-v2/probes --ratios   # + mean ratio - 1 per step
    python benchmarks/shapes_v2_probes.py results/shapes-v2/probes --plot docs/ratio-by-step-probes.png

Each probe folder holds the run's ``config.toml``, ``metrics.jsonl`` and ``command.txt`` (the `rlbench train` line
that made it). The table reads the trained reward and the watched gold on each epoch's own training samples
(64 a epoch; epoch 1's come from the base model): the mean of the first and of the last quarter of the epochs
and their difference, with the per-epoch standard error of that difference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import numpy as np


def summarise(folder: Path) -> dict:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cfg = tomllib.loads((folder / "config.toml").read_text())
    n = len(lines)
    q = max(1, n // 4)
    out = {"probe": folder.name, "model": cfg["model"]["name"], "algorithm": cfg["algorithm"]["name"],
           "reward": cfg["reward"]["name"], "lr": cfg["train"]["learning_rate"],
           "window": cfg["train"]["timestep_window"], "prompts": cfg["prompts"]["name"],
           "k": cfg["sample"]["images_per_prompt"], "epochs": n,
           "minutes": sum(x["seconds"] for x in lines) / 60}
    series = {"trained": [x["reward_mean"] for x in lines]}
    series.update({k.split("/", 1)[1]: [x[k] for x in lines] for k in lines[0] if k.startswith("watch_mean/")})
    for name, values in series.items():
        v = np.asarray(values, dtype=float)
        first, last = v[:q], v[-q:]
        se = math.sqrt(first.var(ddof=1) / q + last.var(ddof=1) / q) if q > 1 else math.nan
        out[name] = (float(first.mean()), float(last.mean()), float(last.mean() - first.mean()), se)
    ratios = [x["ratio_by_step"] for x in lines if x.get("ratio_by_step")]
    if ratios:
        a = np.array([[math.nan if r is None else r for r in row] for row in ratios], dtype=float)
        with np.errstate(invalid="ignore"):
            out["ratio_minus_1"] = [None if np.isnan(c).all() else float(np.nanmean(c) - 1) for c in a.T]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--ratios", action="store_true")
    parser.add_argument("--plot", type=Path, default=None, help="write the ratio-per-step plot (PNG) here")
    args = parser.parse_args()
    rows = [summarise(p) for p in sorted(args.folder.iterdir()) if (p / "metrics.jsonl").is_file()]
    print("| probe | model | algorithm | trained on | prompts | k | lr | window | epochs | min | trained reward: "
          "first -> last quarter (change ± se) | watched gold: first -> last quarter (change ± se) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def cell(t):
            return f"{t[0]:.3f} -> {t[1]:.3f} ({t[2]:+.3f} ± {t[3]:.3f})"
        golds = "; ".join(f"{k}: {cell(v)}" for k, v in r.items()
                          if isinstance(v, tuple) and k != "trained")
        print(f"| {r['probe']} | {r['model']} | {r['algorithm']} | {r['reward']} | {r['prompts']} | {r['k']} | "
              f"{r['lr']:g} | {r['window']:g} | {r['epochs']} | {r['minutes']:.1f} | {cell(r['trained'])} | {golds} |")
    if args.plot is not None:
        plot(rows, args.plot)
    if args.ratios:
        print("\nMean importance ratio - 1 per stored denoising step (0 = noisiest; – = not trained):\n")
        for r in rows:
            if "ratio_minus_1" in r:
                print(f"- {r['probe']}: " + ", ".join("–" if x is None else f"{x:+.1e}" for x in r["ratio_minus_1"]))


def plot(rows: list[dict], path: Path) -> None:
    """|mean ratio - 1| per stored step, log scale, one line per probe that logged ratios; a panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {"shapes": "DDIM (shapes)", "shapes-flow": "flow (shapes-flow)"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (model, title) in zip(axes, families.items()):
        for r in rows:
            if r["model"] != model or "ratio_minus_1" not in r or not any(r["ratio_minus_1"]):
                continue
            xs = [i for i, v in enumerate(r["ratio_minus_1"]) if v is not None]
            ys = [max(abs(r["ratio_minus_1"][i]), 1e-9) for i in xs]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{r['probe']} (lr {r['lr']:g})")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("denoising step (0 = noisiest)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("|mean importance ratio - 1|", fontsize=8)
    fig.suptitle("GRPO: the mean importance ratio per step drifts below 1 at the low-noise steps (seed-100 probes)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
