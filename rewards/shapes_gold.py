"""``shapes-gold``: the exact gold reward of the shapes world (rlbench's embedded default).

The score of an image is the fraction of its caption's atomic facts that the image satisfies —
object existence (colour + shape), exact counts, relations (left of / right of / above / below),
the total number of objects and the background colour — read off the image by the deterministic
gold analyser :mod:`rlbench.shapes.analyser` (GenEval's idea, made exact by a procedural world).

Pre-processing: images of another size than 32x32 are first resized to 32x32 by area averaging
(``torch.nn.functional.adaptive_avg_pool2d``: a k-times nearest upscale of a render maps back to the
render exactly), then quantised as ``(x * 255).round().clamp(0, 255)`` to uint8
(:func:`rlbench.utils.images.to_uint8`).

Prompts must be shapes-world captions (``rlbench.shapes.grammar``); any other prompt is an
:class:`~rlbench.errors.InputError` naming it, not a silent 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlbench.errors import InputError
from rlbench.reward import Reward, RewardOutput
from rlbench.shapes.analyser import analyse_batch, check_facts
from rlbench.shapes.grammar import Fact, PromptParseError, parse_prompt
from rlbench.shapes.vocab import IMAGE_SIZE
from rlbench.shapes.world import render_batch, sample_scene_and_caption
from rlbench.utils.images import to_uint8

MISMATCH_EVERY = 3  # example_inputs: every third image gets another image's caption (a low score)


def to_world_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, 32, 32, 3) uint8: area-resize to 32x32 if needed, quantise."""
    x = images.detach().to("cpu", torch.float32)
    if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.adaptive_avg_pool2d(x, IMAGE_SIZE)
    return to_uint8(x, layout="hwc")


def _facts(prompt: str) -> list[Fact]:
    try:
        return parse_prompt(prompt)
    except PromptParseError as exc:
        raise InputError(
            f"reward 'shapes-gold' only understands shapes-world captions; {exc} "
            "Use the prompt sets shapes-train / shapes-heldout-* (rlbench.shapes)."
        ) from None


class ShapesGold(Reward):
    """Fraction of the caption's facts the image satisfies, read by the exact shapes-world analyser."""

    name = "shapes-gold"
    version = "1"
    summary = ("Shapes-world gold reward: fraction of the caption's facts (objects, counts, relations, "
               "background) that the 32x32 image satisfies, by an exact analyser.")
    higher_is_better = True
    deterministic = True
    differentiable = False
    score_range = "[0, 1]"
    paper = ("rlbench shapes world (rlbench.shapes); fact-wise scoring after GenEval, Ghosh et al. 2023, "
             "arXiv:2310.11513")

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        facts = [_facts(p) for p in prompts]  # a bad prompt fails before any image work
        parsed = analyse_batch(to_world_uint8(images))
        held = [check_facts(p, f) for p, f in zip(parsed, facts)]
        scores = torch.tensor([sum(h) / len(h) for h in held], dtype=torch.float32)
        info = {"facts": [{str(f): ok for f, ok in zip(fs, h)} for fs, h in zip(facts, held)]}
        return RewardOutput(scores, info)

    @classmethod
    def example_inputs(cls, batch_size: int = 3, image_size: int = IMAGE_SIZE, seed: int = 0
                       ) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Shapes-world renders (nearest-upscaled to ``image_size``) with their captions; every
        MISMATCH_EVERY-th image is paired with the next image's caption, so scores vary."""
        rng = np.random.default_rng(seed)
        samples = [sample_scene_and_caption(rng) for _ in range(batch_size)]
        images = torch.from_numpy(render_batch([s for s, _, _ in samples])).permute(0, 3, 1, 2).float() / 255
        if image_size != IMAGE_SIZE:
            images = F.interpolate(images, size=(image_size, image_size), mode="nearest-exact")
        captions = [c for _, c, _ in samples]
        prompts = [captions[(i + 1) % batch_size] if i % MISMATCH_EVERY == MISMATCH_EVERY - 1 else captions[i]
                   for i in range(batch_size)]
        return images.contiguous(), prompts, [{} for _ in range(batch_size)]
