"""Image pre-processing shared by the CLIP-family rewards (aesthetic, PickScore, HPSv2, CLIPScore, ImageReward).

Two geometries, each reward following its own official code (the module docstring of each reward names
the official function behind each step):

* **short side + centre crop** (aesthetic, PickScore, CLIPScore, ImageReward): resize the short side to
  224 with bicubic interpolation (the long side truncated, ``int(224 * long / short)``), centre-crop
  224x224, normalise with the CLIP mean/std (OpenAI CLIP ``clip/clip.py`` ``_transform``; HF
  ``CLIPImageProcessor`` of ``openai/clip-vit-large-patch14`` and ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``:
  ``size 224, crop_size 224, resample 3 (bicubic)``; open_clip ``OPENAI_DATASET_MEAN/STD``). The crop
  offset is where the official codes differ: torchvision's ``CenterCrop`` (OpenAI CLIP, ImageReward, LAION's
  ``simple_inference.py``) rounds it, ``int(round((H - 224) / 2))`` (Python ``round``: half to even),
  transformers' image processors (PickScore, ddpo-pytorch, torchmetrics) floor it, ``(H - 224) // 2``
  (:func:`center_crop`, ``hf=True``).
* **long side + letterbox** (HPSv2, :func:`letterbox_shape`, :func:`letterbox_padding`): HPSv2's
  ``ResizeMaxSize``, the longer side resized to 224 and the shorter side zero-padded, no crop.

Two paths, the same arithmetic up to resampling:

* :func:`clip_pixels_exact` quantises to uint8 and resizes with PIL, exactly as the official pipelines
  do on PIL images (use it for scores that must match published numbers);
* :func:`clip_pixels` stays in float torch ops (antialiased bicubic) so gradients flow to the input
  pixels: the differentiable path for reward-backprop algorithms. Its output differs from the exact path
  by resampling and uint8 rounding only (well under 1 % of the normalised range on natural images).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rlbench.utils.images import to_uint8

# OpenAI CLIP normalisation (clip/clip.py _transform; open_clip constants OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Short side to ``size``, aspect kept, the long side truncated as torchvision/HF do (int())."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def letterbox_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Longer side to ``size``, aspect kept: HPSv2's ``ResizeMaxSize`` (tgxs002/HPSv2
    ``hpsv2/src/open_clip/transform.py`` L42-44): ``scale = size / float(max(h, w))``, each side
    ``round(side * scale)`` (Python ``round``, half to even), unchanged when ``scale == 1``."""
    scale = size / float(max(h, w))
    if scale == 1.0:
        return h, w
    return round(h * scale), round(w * scale)


def letterbox_padding(h: int, w: int, size: int) -> list[int]:
    """``[left, top, right, bottom]`` zero padding of an ``h x w`` image to ``size x size``, half (floored)
    before and the rest after (HPSv2 ``ResizeMaxSize`` L46-48, torchvision ``pad`` order)."""
    pad_h, pad_w = size - h, size - w
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"a {h}x{w} image does not fit a {size}x{size} letterbox")
    return [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]


def center_crop(x: torch.Tensor, size: int, hf: bool = False) -> torch.Tensor:
    """Centre crop: torchvision's ``CenterCrop`` rounds the offset (``int(round((H - size) / 2))``, used by
    OpenAI CLIP, open_clip, ImageReward); HF image processors floor it (``(H - size) // 2``: ``hf=True``)."""
    h, w = x.shape[-2:]
    if hf:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def clip_pixels(images: torch.Tensor, size: int = CLIP_SIZE, mean=CLIP_MEAN, std=CLIP_STD, *,
                hf: bool = False) -> torch.Tensor:
    """Differentiable CLIP pre-processing of float images ``(B, 3, H, W)`` in [0, 1]."""
    h, w = images.shape[-2:]
    nh, nw = resized_shape(h, w, size)
    x = images.float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    x = center_crop(x, size, hf).clamp(0.0, 1.0)
    return _normalise(x, mean, std)


def clip_pixels_exact(images: torch.Tensor, size: int = CLIP_SIZE, mean=CLIP_MEAN, std=CLIP_STD, *,
                      hf: bool = False) -> torch.Tensor:
    """The official pipelines' pre-processing: uint8 PIL images (:func:`rlbench.utils.images.to_uint8`), PIL
    bicubic resize, centre crop, normalise."""
    from PIL import Image

    out = []
    for arr in to_uint8(images, layout="hwc"):
        img = Image.fromarray(arr)
        nh, nw = resized_shape(img.height, img.width, size)
        if (nh, nw) != (img.height, img.width):
            img = img.resize((nw, nh), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = center_crop(torch.stack(out), size, hf).to(images.device)
    return _normalise(x, mean, std)
