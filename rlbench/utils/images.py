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


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) float in [0,1] -> (H,W,3) uint8, quantised as (x*255).round()."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


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
