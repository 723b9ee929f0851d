"""A grid of samples of a shapes-world model: one row per prompt, ``--per-prompt`` seeds per row.

    python benchmarks/shapes_grid.py --out docs/shapes-base-samples.png [--model shapes] [--run RUN_DIR]
    python benchmarks/shapes_grid.py --out docs/shapes-flow-samples.png --model shapes-flow --steps 10 \
        --sampler ode --guidance 4.5

Prints each row's prompt with its mean gold score, in the markdown the README uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

PROMPTS = [  # all from shapes-train
    "a red circle",
    "a blue square on a white background",
    "a green triangle",
    "three red squares",
    "three purple squares on a black background",
    "a red circle left of a blue circle",
    "a red circle below a yellow square",
    "a red circle right of a purple square on a black background",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--run", type=Path, default=None, help="a training run: its latest checkpoint")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=int, default=3, help="pixel upscaling of the 32x32 images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default=None, help="flow models: ode, flow-sde, dance-sde, cps (default flow-sde)")
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args()

    from PIL import Image

    from rlbench.diffusion.policy import load_policy

    from rlbench.train.rundir import load_trained_policy
    from rlbench.shapes.analyser import gold_scores
    from rlbench.shapes.quality import sample_images

    policy = load_trained_policy(args.run) if args.run else load_policy(args.model)
    k = args.per_prompt
    prompts = [p for p in PROMPTS for _ in range(k)]
    sampler = None
    if policy.family == "flow":
        from rlbench.diffusion.sampler import DEFAULT_NOISE, Sampler

        name = args.sampler or policy.default_sampler
        sampler = Sampler(name, DEFAULT_NOISE[name])
    images = sample_images(policy, prompts, num_steps=args.steps, seed=args.seed, guidance_scale=args.guidance,
                           sampler=sampler)
    gold = gold_scores(images, prompts).reshape(len(PROMPTS), k).mean(1)
    rows, size = len(PROMPTS), images.shape[1]
    pad = 2
    canvas = np.full((rows * (size + pad) - pad, k * (size + pad) - pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, k)
        canvas[r * (size + pad) : r * (size + pad) + size, c * (size + pad) : c * (size + pad) + size] = img
    grid = Image.fromarray(canvas).resize((canvas.shape[1] * args.scale, canvas.shape[0] * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, optimize=True)
    print("| row | prompt | mean gold |\n|---|---|---|")
    for i, (p, g) in enumerate(zip(PROMPTS, gold)):
        print(f"| {i + 1} | {p} | {g:.2f} |")


if __name__ == "__main__":
    main()
