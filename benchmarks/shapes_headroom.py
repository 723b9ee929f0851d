"""Where a shapes-world model's gold is lost, fact by fact, and how much a group of samples could gain.

    python benchmarks/shapes_headroom.py --model shapes --prompts 48 --k 16
    python benchmarks/shapes_headroom.py --model shapes-flow --sampler flow-sde --guidance 4.5
    python benchmarks/shapes_headroom.py --model shapes --run RUN_DIR --checkpoint 32   # a trained policy

Samples ``k`` images for each of ``prompts`` training prompts (drawn without replacement, fixed seed) at the
training sampler (DDIM eta 1 or a flow sampler, 10 steps) and prints, from the gold analyser's parse of each image:

* the mean gold and the mean of the best of the ``k`` images of each prompt (what a policy that always drew
  its group's best sample would score: the room sharpening can use), per caption template;
* the success rate of each kind of fact (an object kind exists, the exact count of a kind, the total number of
  objects, the relation, the background) and, for the background, what was asked against what was drawn;
* the histogram of the number of objects the analyser finds.

``--json PATH`` writes the same numbers as data.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


def headroom(policy, prompts: list[str], k: int, *, steps: int, guidance: float, seed: int, sampler=None) -> dict:
    from rlbench.shapes.analyser import analyse_batch, check_facts
    from rlbench.shapes.grammar import Background, parse_caption, parse_prompt
    from rlbench.shapes.quality import sample_images

    repeated = [p for p in prompts for _ in range(k)]
    images = sample_images(policy, repeated, num_steps=steps, guidance_scale=guidance, seed=seed, sampler=sampler)
    parsed = analyse_batch(images)
    facts = [parse_prompt(p) for p in repeated]
    held = [check_facts(pp, f) for pp, f in zip(parsed, facts)]
    gold = np.array([sum(h) / len(h) for h in held]).reshape(len(prompts), k)
    templates = np.array([parse_caption(p).template for p in prompts])
    out: dict = {"n_prompts": len(prompts), "k": k, "gold": float(gold.mean()),
                 "best_of_k": float(gold.max(1).mean()), "templates": {}, "facts": {}}
    for t in sorted(set(templates)):
        g = gold[templates == t]
        out["templates"][t] = {"prompts": int(len(g)), "gold": float(g.mean()), "best_of_k": float(g.max(1).mean()),
                               "within_prompt_sd": float(g.std(1, ddof=1).mean())}
    by_kind: dict[str, list[bool]] = defaultdict(list)
    asked_drawn: Counter = Counter()
    for pp, fs, hs in zip(parsed, facts, held):
        for f, h in zip(fs, hs):
            by_kind[type(f).__name__].append(h)
            if isinstance(f, Background):
                asked_drawn[f"{f.color}->{pp.background}"] += 1
    out["facts"] = {name: {"n": len(v), "held": float(np.mean(v))} for name, v in sorted(by_kind.items())}
    out["background_asked_drawn"] = dict(asked_drawn.most_common())
    counts = np.bincount([len(pp.objects) for pp in parsed])
    out["objects_found"] = {str(i): float(c / len(parsed)) for i, c in enumerate(counts) if c}
    return out


def render(r: dict, label: str) -> str:
    lines = [f"## {label}: {r['n_prompts']} prompts x {r['k']} images",
             f"gold {r['gold']:.3f}; best of {r['k']} per prompt {r['best_of_k']:.3f}", "",
             "| template | prompts | gold | best of k | within-prompt sd |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {v['prompts']} | {v['gold']:.3f} | {v['best_of_k']:.3f} | {v['within_prompt_sd']:.3f} |"
              for t, v in r["templates"].items()]
    lines += ["", "| fact | n | held |", "|---|---|---|"]
    lines += [f"| {name} | {v['n']} | {v['held']:.3f} |" for name, v in r["facts"].items()]
    top = ", ".join(f"{k} {v}" for k, v in list(r["background_asked_drawn"].items())[:8])
    found = ", ".join(f"{k}: {v:.2f}" for k, v in r["objects_found"].items())
    lines += ["", f"background asked->drawn (most common): {top}", f"objects found: {found}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--run", type=Path, default=None, help="a training run: measure its checkpoint instead")
    parser.add_argument("--checkpoint", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=None, help="default: 5 (shapes), 4.5 (shapes-flow)")
    parser.add_argument("--sampler", default=None, help="flow models: ode, flow-sde, dance-sde (default: the model's own)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from rlbench.diffusion.policy import load_policy
    from rlbench.diffusion.sampler import DEFAULT_NOISE, Sampler
    from rlbench.shapes.grammar import split_prompts

    if args.run is not None:
        from rlbench.train.rundir import load_trained_policy

        policy = load_trained_policy(args.run, args.checkpoint)
        label = f"{args.run.name} checkpoint {args.checkpoint}"
    else:
        policy = load_policy(args.model)
        label = args.model
    sampler = None
    if policy.family == "flow":
        name = args.sampler or policy.default_sampler
        sampler = policy.as_sampler(Sampler(name, DEFAULT_NOISE[name]))
        label += f", {name}"
    guidance = args.guidance if args.guidance is not None else (4.5 if policy.family == "flow" else 5.0)
    pool = split_prompts()["train"]
    rng = np.random.default_rng(0)
    prompts = [pool[i] for i in rng.choice(len(pool), args.prompts, replace=False)]
    r = headroom(policy, prompts, args.k, steps=args.steps, guidance=guidance, seed=args.seed, sampler=sampler)
    r.update({"label": label, "steps": args.steps, "guidance": guidance, "seed": args.seed})
    print(render(r, label))
    if args.json is not None:
        from rlbench.train.rundir import atomic_write_text

        atomic_write_text(args.json, json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
