"""``shapes-aesthetic`` and ``shapes-aesthetic-gold``: the shapes world's learned aesthetic proxy and
the exact rule it learned (rlbench's CPU-sized analogue of the LAION aesthetic predictor).

``shapes-aesthetic-gold`` scores an image's "beauty" by a fixed programmatic rule of the gold
analyser's parse: objects jointly centred, large, in high luma contrast with the background and
clear of the image edges (formula in :class:`ShapesAestheticGold` and
:mod:`rlbench.shapes.aesthetic`). ``shapes-aesthetic`` is a ~47k-parameter CNN trained with MSE to
predict that rule from 4,000 renders only: good on the world's renders (rank correlation ~0.9 with
the gold on fresh renders, see its ``config.json``), exploitable off them. Train DDPO on the proxy
and watch the gold to measure reward over-optimisation exactly. Both ignore the prompt.

Pre-processing differs on purpose:

* the gold, like ``shapes-gold``, area-resizes images of another size than 32x32 (adaptive average
  pooling) and quantises to uint8 as ``(x * 255).round()`` before the (discrete) analyser;
* the proxy area-resizes the same way but does **not** quantise: it scores the float image, so that
  its scores are differentiable with respect to the input. On exact renders (uint8 / 255) the two see
  the same pixels; on generated float images the proxy sees each pixel up to 1/510 away from what the
  gold sees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlbench.errors import WeightsNotAvailable
from rlbench.nets.options import parse_batch_size
from rlbench.reward import Reward, RewardOutput
from rlbench.weights import WeightsSpec
from rlbench.rewards.shapes_gold import to_world_uint8
from rlbench.shapes import aesthetic
from rlbench.shapes.analyser import analyse_batch
from rlbench.shapes.vocab import IMAGE_SIZE
from rlbench.shapes.world import Scene, render_batch, sample_scene_and_caption

BLANK_EVERY = 3  # example_inputs: every third image is a plain background (no objects: gold 0)


def _example_inputs(batch_size: int, image_size: int, seed: int) -> tuple[torch.Tensor, list[str], list[dict]]:
    rng = np.random.default_rng(seed)
    samples = [sample_scene_and_caption(rng) for _ in range(batch_size)]
    scenes = [Scene(s.background, ()) if i % BLANK_EVERY == BLANK_EVERY - 1 else s
              for i, (s, _, _) in enumerate(samples)]
    images = torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 255
    if image_size != IMAGE_SIZE:
        images = F.interpolate(images, size=(image_size, image_size), mode="nearest-exact")
    return images.contiguous(), [c for _, c, _ in samples], [{} for _ in range(batch_size)]


class ShapesAestheticGold(Reward):
    """Exact shapes-world "beauty": objects centred, large, high-contrast and clear of the edges.

    Prompt-independent (like an aesthetic predictor). From the gold analyser's parse of the 32x32
    uint8 image, with objects i (area a_i px, centroid (x_i, y_i), box (x0_i, y0_i, x1_i, y1_i),
    colour c_i) on background b, and L(c) = (0.2126 R + 0.7152 G + 0.0722 B) / 255 (Rec. 709 luma)::

        A        = sum_i a_i,   (X, Y) = sum_i a_i (x_i, y_i) / A
        centre   = exp(-((X - 16)^2 + (Y - 16)^2) / (2 * CENTRE_SIGMA^2))     CENTRE_SIGMA = 6 px
        size     = min(A / AREA_CAP, 1)                                        AREA_CAP = 240 px
        contrast = min(sum_i a_i |L(c_i) - L(b)| / A / CONTRAST_CAP, 1)        CONTRAST_CAP = 0.75
        margin   = min(min_i min(x0_i, y0_i, 32 - x1_i, 32 - y1_i) / MARGIN_CAP, 1)   MARGIN_CAP = 4 px
        score    = 0.30 centre + 0.30 size + 0.25 contrast + 0.15 margin

    An image without objects scores 0. Maximisers (score 1) form a family, not one image: any
    objects whose joint centroid is exactly the centre, covering >= 240 px, each >= 4 px from the
    edges, with mean luma contrast >= 0.75 (e.g. a centred 16-22 px white or yellow square on black,
    a centred 18-24 px black or red disc on white, or symmetric groups); an object of more than half
    the image becomes the background instead. Renders of the world score 0.1-0.96 (median 0.60).
    Constants live in :mod:`rlbench.shapes.aesthetic`. ``info["terms"]`` holds the four terms per
    image.
    """

    name = "shapes-aesthetic-gold"
    version = aesthetic.GOLD_VERSION
    summary = ("Shapes-world exact aesthetic rule (prompt-independent): objects centred, large, "
               "high luma contrast with the background, clear of the edges; the gold of shapes-aesthetic.")
    higher_is_better = True
    deterministic = True
    differentiable = False
    score_range = "[0, 1]"
    paper = "rlbench shapes world (rlbench.shapes.aesthetic); the gold rule behind the shapes-aesthetic proxy"

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        terms = [aesthetic.gold_terms(p) for p in analyse_batch(to_world_uint8(images))]
        scores = torch.tensor([t["gold"] for t in terms], dtype=torch.float32)
        return RewardOutput(scores, {"terms": [{k: v for k, v in t.items() if k != "gold"} for t in terms]})

    @classmethod
    def example_inputs(cls, batch_size: int = 3, image_size: int = IMAGE_SIZE, seed: int = 0
                       ) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Shapes-world renders (nearest-upscaled to ``image_size``) with their captions; every
        BLANK_EVERY-th image is its plain background (no objects, score 0)."""
        return _example_inputs(batch_size, image_size, seed)


class ShapesAesthetic(Reward):
    """Learned shapes-world aesthetic proxy: a small CNN trained on limited renders to predict
    ``shapes-aesthetic-gold``; good on renders, exploitable off them.

    Options:
        weights: folder holding ``model.safetensors`` + ``config.json`` (default: the weights shipped
            in ``rlbench/shapes/proxies/aesthetic``); train your own with
            ``python -m rlbench.shapes.train_proxies aesthetic --out DIR``.
        device: where the network runs ("cpu" by default; moved there on the first call).
        batch_size: images per forward pass (larger batches are chunked).

    Images of another size than 32x32 are area-resized (adaptive average pooling) and never
    quantised, so the score is differentiable with respect to the float input: call it with grad
    enabled on images that require grad and backpropagate (scores come back on the images' device).
    Without grad it runs under ``torch.no_grad``.

    Known gap, by construction (it never saw such an image): a plain background without any object
    scores about 0.35 where the gold gives 0.
    """

    name = "shapes-aesthetic"
    version = "1"
    summary = ("Shapes-world learned aesthetic proxy: a ~47k-parameter CNN fitted to shapes-aesthetic-gold "
               "on 4,000 renders (the LAION-aesthetic analogue: good but exploitable).")
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = "(0, 1)"
    paper = ("rlbench shapes world (rlbench.shapes.aesthetic); the role of the LAION aesthetic predictor, "
             "Schuhmann et al. 2022, in DDPO's over-optimisation study (Black et al. 2023, arXiv:2305.13301)")
    weights_spec = WeightsSpec(source="rlbench", filename="shapes/proxies/aesthetic/model.safetensors",
                               sha256="a9de5044bcf44d93f6f08d65c8ad7de8d5582897d2002c01250048f7eac19684",
                               license="MIT")

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 256) -> None:
        self.batch_size = parse_batch_size(batch_size)
        folder = Path(weights) if weights is not None else aesthetic.shipped_folder()
        missing = [f for f in (aesthetic.WEIGHTS_FILE, aesthetic.CONFIG_FILE) if not (folder / f).is_file()]
        if missing:
            raise WeightsNotAvailable(
                f"shapes-aesthetic: no {' or '.join(missing)} in {folder}. Train the proxy with "
                f"`{aesthetic.TRAIN_COMMAND}` and pass weights=DIR (option `weights`)."
            )
        self.folder = folder
        if weights is not None:  # the card names the weights actually used
            self.weights_in_use = WeightsSpec(source=str(folder), filename=aesthetic.WEIGHTS_FILE)
        self.device = device
        self._model: aesthetic.AestheticNet | None = None
        self.config: dict[str, Any] | None = None

    def model(self) -> aesthetic.AestheticNet:
        """The network, loaded (strictly) and moved to ``device`` on first use."""
        if self._model is None:
            self._model, self.config = aesthetic.load_model(self.folder, self.device)
        return self._model

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> torch.Tensor:
        model = self.model()
        grad = torch.is_grad_enabled() and images.requires_grad
        with torch.set_grad_enabled(grad):
            x = images.to(torch.float32)
            if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
                x = F.adaptive_avg_pool2d(x, IMAGE_SIZE)
            if x.shape[0] == 0:
                return torch.zeros(0, dtype=torch.float32, device=images.device)
            out = [model(x[i : i + self.batch_size].to(self.device)) for i in range(0, x.shape[0], self.batch_size)]
            return torch.cat(out).to(device=images.device, dtype=torch.float32)

    @classmethod
    def example_inputs(cls, batch_size: int = 3, image_size: int = IMAGE_SIZE, seed: int = 0
                       ) -> tuple[torch.Tensor, list[str], list[dict]]:
        """As :meth:`ShapesAestheticGold.example_inputs`."""
        return _example_inputs(batch_size, image_size, seed)
