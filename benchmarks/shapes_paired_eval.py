"""Paired before/after evaluation of shapes-world policies on a fixed prompt set.

Every model samples the same prompts with the same initial and per-step noise (one seed), so
differences between models are not differences of luck. Each image is scored with the alignment
proxy and gold and the aesthetic proxy and gold; one line per model: mean and standard error.

    python benchmarks/shapes_paired_eval.py base RUN_DIR RUN_DIR@15 [--prompts shapes-demo]
        [--images-per-prompt 16] [--steps 10] [--seed 123]
"""

from __future__ import annotations

import argparse
import sys

import torch
from rlbench import make_reward
from rlbench.errors import RLBenchError
from rlbench.diffusion.policy import load_policy
from rlbench.train.rundir import load_trained_policy
from rlbench.prompts import load_prompts
from rlbench.shapes.quality import sample_images

REWARDS = ("shapes-clip", "shapes-gold", "shapes-aesthetic", "shapes-aesthetic-gold")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="'base' (the shipped model), RUN_DIR or RUN_DIR@CHECKPOINT")
    parser.add_argument("--prompts", default="shapes-demo", help="prompt set name or file")
    parser.add_argument("--images-per-prompt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    try:
        ps = load_prompts(args.prompts)
        policies = [(model, _load(model)) for model in args.models]  # every name checked before sampling
    except RLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompts = [p for p in ps.prompts for _ in range(args.images_per_prompt)]
    metadata = [dict(m) for m in ps.metadata for _ in range(args.images_per_prompt)]
    rewards = {name: make_reward(name) for name in REWARDS}
    print(f"{len(prompts)} images: {len(ps)} prompts of {ps.name} x {args.images_per_prompt}, {args.steps} DDIM steps, "
          f"seed {args.seed}; mean ± standard error")
    for model, policy in policies:
        images = sample_images(policy, prompts, num_steps=args.steps, seed=args.seed)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        cells = []
        for name, reward in rewards.items():
            s = reward(x, prompts, metadata).scores.float()
            cells.append(f"{name} {s.mean():.4f} ± {s.std() / len(s) ** 0.5:.4f}")
        print(f"{model}: " + "  ".join(cells), flush=True)
    return 0


def _load(model: str):
    if model == "base":
        return load_policy("shapes")
    run, _, checkpoint = model.partition("@")
    if checkpoint and not checkpoint.isdigit():
        raise RLBenchError(f"{model!r}: the checkpoint after '@' must be an epoch number, e.g. {run}@15.")
    return load_trained_policy(run, int(checkpoint) if checkpoint else None)


if __name__ == "__main__":
    raise SystemExit(main())
