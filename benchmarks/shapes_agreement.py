"""Agreement of the shapes world's learned proxies with their gold counterparts (Spearman rank correlation).

On fresh renders (the world's own images) and on samples of a model (default: the shipped base
model), so the numbers say how well each proxy tracks its gold where a policy actually starts.
Alignment proxies (shapes-clip, shapes-vlm-bertscore) vs shapes-gold are measured on pairs where
half the images are scored against their own caption and half against another caption of the
batch; the aesthetic proxy vs shapes-aesthetic-gold on the images alone.

    python benchmarks/shapes_agreement.py [--model shapes] [--n 256] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch
from rlbench import make_reward
from rlbench.eval.evaluate import markdown_table
from rlbench.utils.stats import spearman

ALIGNMENT = ("shapes-clip", "shapes-vlm-bertscore")


def paired_prompts(prompts: list[str], rng: np.random.Generator) -> list[str]:
    """First half: own caption; second half: another image's caption (resampled until different)."""
    n = len(prompts)
    out = list(prompts)
    for i in range(n // 2, n):
        j = int(rng.integers(0, n))
        while prompts[j] == prompts[i]:
            j = int(rng.integers(0, n))
        out[i] = prompts[j]
    return out


def agreement(images_u8: np.ndarray, prompts: list[str], seed: int) -> dict[str, float]:
    images = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
    scored = paired_prompts(prompts, np.random.default_rng(seed))
    gold = make_reward("shapes-gold")(images, scored).scores.numpy()
    row = {}
    for name in ALIGNMENT:
        proxy = make_reward(name)(images, scored).scores.numpy()
        row[f"{name} vs shapes-gold"] = spearman(proxy, gold)
    aes = make_reward("shapes-aesthetic")(images, prompts).scores.numpy()
    aes_gold = make_reward("shapes-aesthetic-gold")(images, prompts).scores.numpy()
    row["shapes-aesthetic vs shapes-aesthetic-gold"] = spearman(aes, aes_gold)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from rlbench.diffusion.policy import load_policy
    from rlbench.shapes.grammar import split_prompts
    from rlbench.shapes.quality import sample_images
    from rlbench.shapes.world import sample_batch

    rows = {}
    renders, captions, _ = sample_batch(np.random.default_rng([args.seed, 1]), args.n, exclude_heldout=True)
    rows["fresh renders (train caption space)"] = agreement(renders, captions, args.seed)
    pool = split_prompts()["train"]
    prompts = [pool[i] for i in np.random.default_rng([args.seed, 2]).integers(0, len(pool), args.n)]
    samples = sample_images(load_policy(args.model), prompts, num_steps=args.steps, seed=args.seed)
    rows[f"{args.model} samples (train prompts, {args.steps} steps)"] = agreement(samples, prompts, args.seed)
    table = pd.DataFrame(rows).T.reset_index(names="images")
    print(markdown_table(table, floatfmt="{:.3f}"), end="")


if __name__ == "__main__":
    main()
