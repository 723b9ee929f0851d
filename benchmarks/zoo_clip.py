"""Throughput of the CLIP-family rewards (aesthetic, pickscore, hpsv2, clipscore): batched vs one image a call.

    python benchmarks/zoo_clip.py [--n 64] [--size 256] [--batch-size 32] [--threads 1] [--rewards aesthetic,...]

Runs on the tiny seeded stand-ins of the tests (``rlbench.testing``: the real architecture
classes with tiny configs, same pre-processing at 224 px), so it needs no downloads; it measures the
reward's own overhead (pre-processing, tokenisation, chunking, per-call work) rather than the speed
of the real ViT-L/H towers. "batched" is one reward call on all images (chunks of ``--batch-size``);
"loop" is one call per image, as a per-image scoring function would do. Both use the exact (PIL)
path; the text tower runs once per distinct prompt in both.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from rlbench.benchmarks.timing import best_of
from rlbench.registry import make_reward
from rlbench.testing import (
    TINY_OPEN_CLIP_NAME,
    aesthetic_mlp_state_dict,
    smooth_images,
    tiny_hf_clip,
    tiny_hps_checkpoint,
)

PROMPTS = ["a photo of a cat", "two red circles left of a blue square", "an oil painting of a lighthouse",
           "a bowl of soup on a wooden table", "an astronaut riding a horse", "a neon sign that says hello",
           "a watercolor of a fox in the snow", "a city skyline at night"]


def tiny_options(root: Path) -> dict[str, dict]:
    clip768 = tiny_hf_clip(root / "clip768", projection_dim=768, seed=0)
    clip16 = tiny_hf_clip(root / "clip16", projection_dim=16, seed=1)
    torch.save(aesthetic_mlp_state_dict(), root / "head.pth")
    ckpt = tiny_hps_checkpoint(root / "hps" / "HPS_v2.1_compressed.pt")
    return {
        "aesthetic": {"weights": str(root / "head.pth"), "clip": str(clip768)},
        "pickscore": {"weights": str(clip16), "processor": str(clip16)},
        "hpsv2": {"weights": str(ckpt), "arch": TINY_OPEN_CLIP_NAME},
        "clipscore": {"weights": str(clip16)},
    }


def images_per_second(fn, n: int, repeats: int) -> float:
    return n / best_of(fn, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a busy CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rewards", default="aesthetic,pickscore,hpsv2,clipscore")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = smooth_images(args.n, args.size, seed=0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        options = tiny_options(Path(tmp))
        print(f"{args.n} images {args.size}x{args.size}, batch_size {args.batch_size}, {args.threads} thread(s), "
              f"tiny models, best of {args.repeats}")
        print(f"{'reward':10s} {'batched img/s':>14s} {'loop img/s':>11s} {'ratio':>6s}")
        for name in args.rewards.split(","):
            reward = make_reward(name, batch_size=args.batch_size, **options[name])
            with torch.no_grad():
                reward(images[:2], prompts[:2])  # load + warm up
                batched = images_per_second(lambda: reward(images, prompts), args.n, args.repeats)
                loop = images_per_second(
                    lambda: [reward(images[i : i + 1], prompts[i : i + 1]) for i in range(args.n)], args.n, args.repeats)
            print(f"{name:10s} {batched:14.1f} {loop:11.1f} {batched / loop:6.2f}")


if __name__ == "__main__":
    main()
