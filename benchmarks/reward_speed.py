"""Reward throughput: images/s of a reward on a batch, against the reference implementation.

    python benchmarks/reward_speed.py [--n 256] [--size 512] [--rewards incompressibility,compressibility]

For the JPEG rewards the reference is ddpo-pytorch's loop (quantise the whole batch, then encode
one image after another, rewards.py::jpeg_incompressibility), timed in the same run.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
from PIL import Image

import rlbench
from rlbench.benchmarks.timing import best_of


def reference_jpeg_kb(images: torch.Tensor) -> np.ndarray:
    """ddpo-pytorch's jpeg_incompressibility, for timing and equality."""
    arr = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return np.array(sizes)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Image-like test data: low-frequency colour fields plus mild noise (JPEG time depends on content)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rewards", default="incompressibility,compressibility")
    args = ap.parse_args()
    images = smooth_images(args.n, args.size)
    prompts = ["a photo"] * args.n
    print(f"{args.n} images of {args.size}x{args.size}, torch threads {torch.get_num_threads()}")
    ref_s = best_of(lambda: reference_jpeg_kb(images))
    print(f"{'ddpo-pytorch jpeg loop':28s} {ref_s:7.3f} s  {args.n / ref_s:8.1f} img/s")
    for name in args.rewards.split(","):
        reward = rlbench.make_reward(name)
        s = best_of(lambda: reward(images, prompts))
        scores = reward(images, prompts).scores.numpy()
        line = f"{name:28s} {s:7.3f} s  {args.n / s:8.1f} img/s"
        if name in ("incompressibility", "compressibility"):
            sign = 1 if name == "incompressibility" else -1
            exact = np.array_equal(scores, (sign * reference_jpeg_kb(images)).astype(np.float32))
            line += f"  {ref_s / s:5.2f}x the reference, identical scores: {exact}"
        print(line)


if __name__ == "__main__":
    main()
