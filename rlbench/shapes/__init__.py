"""The shapes world: rlbench's embedded, procedural text-to-image world with an exact gold reward.

32x32 images of one to three coloured circles, squares and triangles on a plain background, each with
a caption it matches exactly ("two red circles", "a blue square left of a yellow triangle on a white
background"). Modules:

* :mod:`~rlbench.shapes.vocab`: palette, shapes, counts, relations, image size;
* :mod:`~rlbench.shapes.grammar`: captions <-> facts, the caption space and its train/held-out splits;
* :mod:`~rlbench.shapes.world`: scenes, their sampling and (vectorised) rendering;
* :mod:`~rlbench.shapes.analyser`: the gold analyser and :func:`gold_score`;
* :mod:`~rlbench.shapes.prompts`: the bundled prompt sets (``shapes-train``, ``shapes-heldout-*``).

Only numpy is needed (no torch) except by :mod:`~rlbench.shapes.prompts` and the reward plugin.
"""

from __future__ import annotations

from rlbench.shapes.analyser import Parsed, ParsedObject, analyse, analyse_batch, gold_score, gold_scores
from rlbench.shapes.grammar import (
    Background,
    CaptionSpec,
    Count,
    Exists,
    Fact,
    Kind,
    PromptParseError,
    Relation,
    Total,
    all_prompts,
    parse_caption,
    parse_prompt,
    split_prompts,
)
from rlbench.shapes.vocab import BACKGROUND_COLORS, IMAGE_SIZE, OBJECT_COLORS, PALETTE, RELATIONS, SHAPES
from rlbench.shapes.world import (
    Obj,
    Scene,
    render,
    render_batch,
    sample_batch,
    sample_scene_and_caption,
    scene_for_prompt,
)

__all__ = [
    "BACKGROUND_COLORS", "IMAGE_SIZE", "OBJECT_COLORS", "PALETTE", "RELATIONS", "SHAPES",
    "Background", "CaptionSpec", "Count", "Exists", "Fact", "Kind", "Obj", "Parsed", "ParsedObject",
    "PromptParseError", "Relation", "Scene", "Total", "all_prompts", "analyse", "analyse_batch",
    "gold_score", "gold_scores", "parse_caption", "parse_prompt", "render", "render_batch",
    "sample_batch", "sample_scene_and_caption", "scene_for_prompt", "split_prompts",
]
