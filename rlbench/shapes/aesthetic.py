"""The shapes world's "aesthetic": an exact programmatic beauty rule and the small CNN that learns it.

The pair mirrors the LAION aesthetic predictor in the real reward zoo: :func:`aesthetic_gold` is the
exact, prompt-independent rule (the reward ``shapes-aesthetic-gold``), :class:`AestheticNet` is a
small learned regressor trained on a *limited* number of renders to predict it (the reward
``shapes-aesthetic``; trained by :mod:`rlbench.shapes.train_proxies`). The learned proxy agrees with
the rule well on renders but not perfectly, and nothing constrains it off the render distribution:
optimising it hard (DDPO) and watching the gold measures reward over-optimisation exactly.

The gold rule, from the analyser's parse (:func:`rlbench.shapes.analyser.analyse_batch`) of a 32x32
uint8 image with objects i (pixel area a_i, centroid (x_i, y_i), box (x0_i, y0_i, x1_i, y1_i),
palette colour c_i) on background colour b; L(c) = (0.2126 R + 0.7152 G + 0.0722 B) / 255 is the
Rec. 709 luma of a palette colour::

    A        = sum_i a_i                                           total object area (px)
    (X, Y)   = sum_i a_i (x_i, y_i) / A                            joint (area-weighted) centroid
    centre   = exp(-((X - 16)^2 + (Y - 16)^2) / (2 CENTRE_SIGMA^2))
    size     = min(A / AREA_CAP, 1)
    contrast = min(sum_i a_i |L(c_i) - L(b)| / A / CONTRAST_CAP, 1)
    margin   = min(min_i min(x0_i, y0_i, 32 - x1_i, 32 - y1_i) / MARGIN_CAP, 1)
    gold     = W_CENTRE centre + W_SIZE size + W_CONTRAST contrast + W_MARGIN margin

An image with no objects scores 0. Each term lies in [0, 1] and the weights sum to 1, so gold lies
in [0, 1].

What maximises it: gold = 1 exactly when the objects' joint centroid is the image centre, they
cover at least AREA_CAP px, their mean luma contrast with the background is at least CONTRAST_CAP and
every object keeps MARGIN_CAP px from the edges. That is a large family, not one image: a centred
square of 16-22 px or disc of 18-24 px (rendered sides), or any symmetric arrangement of two or
three objects of enough total area; white or yellow on black, or black or red on white (purple on
white reaches 0.998 of the contrast term, blue 0.95; on gray no object colour reaches more than
0.67). Growing an object past half the image does not pay: the analyser takes the most common
colour as the background, so a centred 24 px white square on black turns into a white background
with a black frame "object" that touches the edges (gold 0.85). The renders of the world never
reach 1: a rendered object covers at most 196 px (a 14 px square) and several objects are rarely
centred jointly (best of 4,000 renders: 0.96; median 0.60).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

import torch
import torch.nn as nn

from rlbench.shapes.analyser import Parsed, analyse_batch
from rlbench.shapes.vocab import IMAGE_SIZE, PALETTE

# -- the gold rule ----------------------------------------------------------------------------------

GOLD_VERSION: Final = "1"  # bump with any change of the rule below (and retrain the proxy)
CENTRE_SIGMA: Final = 6.0  # px: the centring term falls to exp(-1/2) = 0.61 at 6 px off centre
AREA_CAP: Final = 240.0  # px: total object area that earns the full size term (renders: <= 363)
CONTRAST_CAP: Final = 0.75  # luma difference that earns the full contrast term
MARGIN_CAP: Final = 4.0  # px: distance from the image edge that earns the full margin term
W_CENTRE: Final = 0.30
W_SIZE: Final = 0.30
W_CONTRAST: Final = 0.25
W_MARGIN: Final = 0.15

LUMA: Final[dict[str, float]] = {
    name: (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255.0 for name, (r, g, b) in PALETTE.items()
}


def gold_terms(parsed: Parsed) -> dict[str, float]:
    """The four terms of the rule (all 0 for an image without objects) and the total ``gold``."""
    objects = parsed.objects
    if not objects or parsed.background is None:
        return {"centre": 0.0, "size": 0.0, "contrast": 0.0, "margin": 0.0, "gold": 0.0}
    area = np.array([o.area for o in objects], dtype=np.float64)
    total = float(area.sum())
    x = float((area * [o.cx for o in objects]).sum() / total)
    y = float((area * [o.cy for o in objects]).sum() / total)
    half = IMAGE_SIZE / 2
    centre = float(np.exp(-((x - half) ** 2 + (y - half) ** 2) / (2 * CENTRE_SIGMA**2)))
    size = min(total / AREA_CAP, 1.0)
    bg = LUMA[parsed.background]
    contrast = min(float((area * [abs(LUMA[o.color] - bg) for o in objects]).sum() / total) / CONTRAST_CAP, 1.0)
    gap = min(min(x0, y0, IMAGE_SIZE - x1, IMAGE_SIZE - y1) for x0, y0, x1, y1 in (o.bbox for o in objects))
    margin = min(gap / MARGIN_CAP, 1.0)
    gold = W_CENTRE * centre + W_SIZE * size + W_CONTRAST * contrast + W_MARGIN * margin
    return {"centre": centre, "size": size, "contrast": contrast, "margin": margin, "gold": gold}


def aesthetic_gold(images: np.ndarray) -> np.ndarray:
    """The gold rule of (B, 32, 32, 3) uint8 images (or float in [0, 1], quantised): float64 (B,)."""
    return np.array([gold_terms(p)["gold"] for p in analyse_batch(images)], dtype=np.float64)


# -- the learned proxy ------------------------------------------------------------------------------

DEFAULT_ARCH: Final[dict[str, Any]] = {"channels": [16, 32, 32], "hidden": 64, "image_size": IMAGE_SIZE}


class AestheticNet(nn.Module):
    """A small CNN regressor: (B, 3, 32, 32) float in [0, 1] -> (B,) in (0, 1).

    Per stage a 3x3 conv (zero padding) + SiLU + 2x2 average pooling (32 -> 16 -> 8 -> 4 px), then an
    MLP over the flattened 4x4 maps (which keeps where things are: the rule rewards centring) and a
    sigmoid. SiLU and average pooling keep the input gradient smooth for differentiable use. Inputs
    are centred as ``2 x - 1``. No batch norm or dropout: scores never depend on the batch.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 32), hidden: int = 64, image_size: int = IMAGE_SIZE):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.features(images * 2 - 1))).squeeze(1)

    @classmethod
    def from_config(cls, arch: dict[str, Any]) -> AestheticNet:
        return cls(channels=tuple(arch["channels"]), hidden=int(arch["hidden"]), image_size=int(arch["image_size"]))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


WEIGHTS_FILE: Final = "model.safetensors"
CONFIG_FILE: Final = "config.json"
TRAIN_COMMAND: Final = "python -m rlbench.shapes.train_proxies aesthetic --out DIR"


def shipped_folder() -> Path:
    """Folder of the shipped proxy weights inside the installed package."""
    from importlib import resources

    return Path(str(resources.files("rlbench.shapes").joinpath("proxies", "aesthetic")))


def save_model(folder: Path, model: AestheticNet, config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[AestheticNet, dict[str, Any]]:
    """Load a proxy folder (strict state dict); the model is frozen, in eval mode, on ``device``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = AestheticNet.from_config(config["architecture"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    model.requires_grad_(False).eval()
    return model.to(device), config


# -- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: AestheticNet, images_u8: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The proxy's scores of (B, 32, 32, 3) uint8 renders: float64 (B,)."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
    dev = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).double().numpy()
