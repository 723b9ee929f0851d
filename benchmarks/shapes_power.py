"""Statistical power of a shapes-world evaluation: how many prompts and images make the standard error of a
change small enough to rank algorithms (shapes suite v2, issue 20).

    python benchmarks/shapes_power.py --out results/shapes-v2/power.json

For each model (``shapes`` with DDIM eta 1, ``shapes-flow`` with flow-sde a = 0.7; 10 steps, each model's
guidance: the suite's evaluation settings) the base model samples every prompt set twice, with two eval seeds
(independent noise), ``--images`` images per prompt. The difference of the two evaluations is what a change
looks like when training has decorrelated the images from the base model's (the worst case of the harness's
paired noise: v1's trained checkpoints kept an image correlation of 0.04 to 0.44 with the base, median per
reward): paired by prompt, independent in noise. Its standard error at ``P`` prompts and ``m`` images a prompt
is ``sd_p(d_m) / sqrt(P)``, with ``d_m`` a prompt's mean difference over its first ``m`` images; the script
prints it for each set, reward and size, and the smallest size that meets the targets (0.02 on the [0, 1]
golds and the aesthetic proxy, 0.2 on shapes-clip). It also times sampling and scoring per image, from which
the suite's evaluation budget follows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

TARGETS = {"shapes-gold": 0.02, "shapes-aesthetic-gold": 0.02, "shapes-aesthetic": 0.02, "shapes-clip": 0.2}
SETS = ["shapes-train", "shapes-heldout-combos", "shapes-heldout-counts", "shapes-heldout-relations"]
MODELS = {  # the v2 specs' evaluation settings
    "shapes": {"steps": 10, "guidance": 5.0, "sampler": None, "eta": 1.0},
    "shapes-flow": {"steps": 10, "guidance": 4.5, "sampler": ("flow-sde", 0.7), "eta": 1.0},
}


def measure(model: str, prompts: int, images: int) -> dict:
    from rlbench.diffusion.policy import load_policy
    from rlbench.diffusion.sampler import Sampler
    from rlbench.eval.evaluator import evaluate_policy
    from rlbench.eval.plan import subset
    from rlbench.prompts import PromptSet, load_prompts

    cfg = MODELS[model]
    sets = []  # the same prompts in both evaluations (the harness's subset of eval seed 0), noise of its own each
    for name in SETS:
        ps = load_prompts(name)
        idx = subset(len(ps.prompts), prompts, 0, ps.name)
        sets.append(PromptSet(ps.name, [ps.prompts[i] for i in idx], [ps.metadata[i] for i in idx]))
    policy = load_policy(model)
    sampler = Sampler(*cfg["sampler"]) if cfg["sampler"] else None
    frames, seconds = [], 0.0
    for seed in (0, 1):
        t = time.perf_counter()
        got = evaluate_policy(policy, sets, list(TARGETS), seed=seed, steps=cfg["steps"], eta=cfg["eta"],
                              guidance=cfg["guidance"], images_per_prompt=images, prompts_per_set=0,
                              batch_size=64, sampler=sampler)
        seconds += time.perf_counter() - t
        frames.append(got.scores.assign(eval_seed=seed))
    n_images = sum(len(f) for f in frames) // len(TARGETS)
    out: dict = {"model": model, "settings": {k: v for k, v in cfg.items()}, "images_per_prompt": images,
                 "seconds_per_image": seconds / n_images, "sets": {}}
    a, b = frames
    for name in SETS:
        out["sets"][name] = {}
        for reward in TARGETS:
            pa = a[(a.prompt_set == name) & (a.reward == reward)].pivot_table(index="prompt", columns="image_index",
                                                                             values="score")
            pb = b[(b.prompt_set == name) & (b.reward == reward)].pivot_table(index="prompt", columns="image_index",
                                                                             values="score")
            common = pa.index.intersection(pb.index)
            pa, pb = pa.loc[common].to_numpy(), pb.loc[common].to_numpy()
            row = {"prompts": int(len(common)), "sd_image": float(np.concatenate([pa, pb]).std(ddof=1)),
                   "sd_within_prompt": float(math.sqrt(np.mean(np.concatenate([pa, pb], 1).var(1, ddof=1)))),
                   "se_change": {}}
            for m in range(1, images + 1):
                d = pa[:, :m].mean(1) - pb[:, :m].mean(1)
                row["se_change"][m] = float(d.std(ddof=1) / math.sqrt(len(d)))  # at all measured prompts
                row.setdefault("sd_prompt_diff", {})[m] = float(d.std(ddof=1))
            out["sets"][name][reward] = row
    return out


def smallest(result: dict, set_name: str, images: int, pool: int) -> int | None:
    """The fewest prompts of a set that meet every reward's target at ``images`` a prompt (None: not within ``pool``)."""
    need = 0
    for reward, target in TARGETS.items():
        sd = result["sets"][set_name][reward]["sd_prompt_diff"][images]
        need = max(need, math.ceil((sd / target) ** 2))
    return need if need <= pool else None


def render(data: dict) -> str:
    """The measurement as Markdown (what the script prints)."""
    sizes, out = data["set_sizes"], []
    for model, r in data["results"].items():
        images = int(r["images_per_prompt"])
        out.append(f"\n## {model} ({r['seconds_per_image'] * 1000:.0f} ms an image: sampling, scoring "
                   f"{len(data['targets'])} rewards)\n")
        out.append("| set | reward | prompts measured | sd an image | sd within a prompt | "
                   + " | ".join(f"SE of a change, {m} img/prompt" for m in range(1, images + 1)) + " |")
        out.append("|---|---|---|---|---|" + "---|" * images)
        for name in SETS:
            for reward in data["targets"]:
                row = r["sets"][name][reward]
                se = row["se_change"]
                out.append(f"| {name} | {reward} | {row['prompts']} | {row['sd_image']:.3g} | "
                           f"{row['sd_within_prompt']:.3g} | "
                           + " | ".join(f"{se[str(m)] if str(m) in se else se[m]:.3g}" for m in range(1, images + 1))
                           + " |")
        out.append("\nprompts needed (every target met) at m images a prompt:")
        for name in SETS:
            need = r["prompts_needed"][name]
            out.append(f"  {name} ({sizes[name]} prompts): "
                       + ", ".join(f"m={m}: {need[str(m)] if str(m) in need else need[m]}" for m in range(1, images + 1)))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="shapes,shapes-flow")
    parser.add_argument("--prompts", type=int, default=128, help="prompts a set (fewer in a smaller set: all of it)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--render", action="store_true", help="print the Markdown of an existing --out; measure nothing")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.out.read_text())), end="")
        return
    from rlbench.prompts import load_prompts

    sizes = {name: len(load_prompts(name).prompts) for name in SETS}
    results = {}
    for model in args.models.split(","):
        r = measure(model, args.prompts, args.images)
        r["prompts_needed"] = {name: {m: smallest(r, name, m, 10**6) for m in range(1, args.images + 1)}
                               for name in SETS}
        results[model] = r
    data = {"targets": TARGETS, "set_sizes": sizes, "results": results}
    print(render(json.loads(json.dumps(data))), end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
