"""JPEG (in)compressibility, exactly as in the DDPO paper (Black et al. 2023, §5.1).

The image is quantised as ``(x * 255).round().clamp(0, 255)`` to uint8 (:func:`rlbench.utils.images.to_uint8`),
encoded by PIL as JPEG at quality 95 (PIL's other defaults: 4:2:0 chroma subsampling, no optimisation),
and the reward is the file size in kB (bytes / 1000): ``incompressibility``. ``compressibility`` is its
negative.
Source: kvablack/ddpo-pytorch ``ddpo_pytorch/rewards.py::jpeg_incompressibility``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from rlbench.reward import Reward, RewardOutput
from rlbench.utils.images import to_uint8

JPEG_QUALITY = 95  # ddpo-pytorch rewards.py: image.save(buffer, format="JPEG", quality=95)
BYTES_PER_KB = 1000  # ddpo-pytorch: buffer.tell() / 1000


def jpeg_size(image: np.ndarray) -> int:
    """Bytes of the quality-95 JPEG encoding of one image: (3, H, W) float in [0, 1] (quantised here, with
    numpy only, by :func:`rlbench.utils.images.to_uint8`) or (H, W, 3) uint8 (quantised already)."""
    if image.dtype != np.uint8:
        image = to_uint8(image, layout="hwc")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell()


def _per_image(images: torch.Tensor) -> np.ndarray:
    """What the encoding threads get, prepared on the calling thread so that they run no torch op (torch ops
    in extra threads slow every later torch op of the process on small CPUs): CPU images as a float32 numpy
    view, quantised per image inside the threads (quantising a 256x3x512x512 batch at once allocates
    several 800 MB temporaries and took longer than encoding); images on an accelerator quantised there,
    then copied over as uint8."""
    if images.device.type == "cpu":
        return images.detach().to(torch.float32).numpy()
    return to_uint8(images, layout="hwc")


class _JpegSize(Reward):
    sign = 1.0
    version = "1"
    deterministic = True
    differentiable = False
    paper = "Black et al. 2023, Training Diffusion Models with Reinforcement Learning, arXiv:2305.13301, §5.1"

    def __init__(self, num_workers: int | None = None) -> None:
        """Args:
        num_workers: threads that encode in parallel (PIL releases the GIL while encoding);
            default: the number of CPUs, at most 8.
        """
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        self._pool: ThreadPoolExecutor | None = None

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> RewardOutput:
        arrays = _per_image(images)
        if self.num_workers == 1 or len(arrays) == 1:
            sizes = [jpeg_size(a) for a in arrays]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="rlbench-jpeg")
            sizes = list(self._pool.map(jpeg_size, arrays))
        kb = torch.tensor(sizes, dtype=torch.float64) / BYTES_PER_KB
        return RewardOutput((self.sign * kb).to(torch.float32), {})


class Incompressibility(_JpegSize):
    """JPEG file size of the image in kB (PIL, quality 95): bigger files score higher."""

    name = "incompressibility"
    summary = "JPEG size in kB at quality 95 (DDPO's incompressibility); rewards detail and noise."
    higher_is_better = True
    score_range = "[0, inf) kB"


class Compressibility(_JpegSize):
    """Negative JPEG file size of the image in kB (PIL, quality 95): smaller files score higher."""

    name = "compressibility"
    summary = "Negative JPEG size in kB at quality 95 (DDPO's compressibility); rewards flat, smooth images."
    sign = -1.0
    higher_is_better = True
    score_range = "(-inf, 0] kB"
