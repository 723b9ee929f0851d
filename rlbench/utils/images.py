"""Image files <-> the reward contract's tensors (float32, (B,3,H,W), [0,1])."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rlbench.errors import InputError


def load_image(path: str | Path) -> torch.Tensor:
    """One image file -> (3,H,W) float32 in [0,1] (RGB; alpha and palettes are converted)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image file {str(p)!r} does not exist.")
    try:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read image {str(p)!r}: {exc}") from exc
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def load_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """Several image files of one size -> (B,3,H,W) float32 in [0,1]."""
    if not paths:
        raise InputError("no image files given.")
    tensors = [load_image(p) for p in paths]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise InputError(
            f"images have different sizes {sorted(shapes)}; score them in separate calls or resize them first."
        )
    return torch.stack(tensors)


LAYOUTS = ("hwc", "chw")


def quantize(images: torch.Tensor) -> torch.Tensor:
    """The uint8 levels of float images in [0, 1] as a float32 tensor on their device (detached):
    ``(x * 255).round().clamp(0, 255)``, rounding half to even. What :func:`to_uint8` computes, for
    pipelines that go on in float (HPSv2's ``ToTensor`` of a PIL image is ``quantize(x) / 255``)."""
    return (images.detach().float() * 255).round_().clamp_(0, 255)


def to_uint8(images: torch.Tensor | np.ndarray, layout: str = "hwc") -> np.ndarray:
    """Float images in [0, 1] -> uint8 numpy, quantised as ``(x * 255).round().clamp(0, 255)`` in float32.

    rlbench's one float -> uint8 conversion: ddpo-pytorch's (``rewards.py``), which is what the
    official reward pipelines get from ``PIL.Image.fromarray``; rounding is half to even
    (``torch.round`` / ``np.rint``), out-of-range values clamp to 0 and 255.

    Args:
        images: channel-first ``(3, H, W)`` or ``(B, 3, H, W)``; a torch tensor (any device or float
            dtype, detached; quantised on its device, returned on the CPU) or a numpy float array
            (quantised with numpy only, no torch op: safe in worker threads, see ``rewards/jpeg.py``).
            Both give the same bytes.
        layout: ``"hwc"``: channels last, ``(H, W, 3)`` / ``(B, H, W, 3)`` (what PIL and numpy image code
            take); ``"chw"``: the input's channel-first order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(images, np.ndarray):
        q = np.multiply(images, np.float32(255), dtype=np.float32)  # float32 as torch: same products
        np.rint(q, out=q)
        np.clip(q, 0, 255, out=q)
        if layout == "hwc":
            q = np.moveaxis(q, -3, -1)
        return q.astype(np.uint8, order="C")
    q = quantize(images).to(torch.uint8)
    if layout == "hwc":
        q = q.movedim(-3, -1)
    return q.contiguous().cpu().numpy()


def save_png(image: torch.Tensor, path: str | Path) -> None:
    Image.fromarray(to_uint8(image)).save(path, format="PNG")


def make_grid(images: torch.Tensor, columns: int = 8, pad: int = 2) -> np.ndarray:
    """(B,3,H,W) -> one (rows*H, columns*W, 3) uint8 grid with white padding."""
    b, _, h, w = images.shape
    columns = max(1, min(columns, b))
    rows = math.ceil(b / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = to_uint8(img)
    return grid


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 8) -> None:
    Image.fromarray(make_grid(images, columns)).save(path, format="PNG")
