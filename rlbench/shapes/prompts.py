"""The shapes world's bundled prompt sets: ``shapes-train``, the held-out splits and ``shapes-demo``.

Each set is read from ``benchmarks/prompts/shapes-<split>.txt`` (written by
:func:`rlbench.shapes.grammar.write_split_files`; a test keeps the files equal to the generator).
Every prompt's metadata: ``{"template": "single" | "count" | "relation", "split": <split>}``.
"""

from __future__ import annotations

from importlib import resources

from rlbench.prompts import PromptSet, read_prompt_file
from rlbench.shapes.grammar import parse_caption, split_file_name

PROMPTS_PACKAGE = "rlbench.benchmarks"  # benchmarks/ is installed under this name
PROMPTS_FOLDER = "prompts"

_DESCRIPTIONS = {
    "train": "shapes world: RL training prompts (no held-out combination, count or relation)",
    "heldout-combos": "shapes world: prompts with colour-shape combinations absent from shapes-train",
    "heldout-counts": "shapes world: count prompts with (count, shape) pairs absent from shapes-train",
    "heldout-relations": ("shapes world: relation prompts with (relation, subject shape) pairs absent "
                          "from shapes-train"),
}


def shapes_split(split: str) -> PromptSet:
    """The bundled prompt set of one split, with per-prompt template and split metadata."""
    if split not in _DESCRIPTIONS:
        raise ValueError(f"unknown shapes split {split!r}; known: {', '.join(_DESCRIPTIONS)}")
    ref = resources.files(PROMPTS_PACKAGE).joinpath(PROMPTS_FOLDER, split_file_name(split))
    with resources.as_file(ref) as path:
        ps = read_prompt_file(path, f"shapes-{split}")
    ps.description = _DESCRIPTIONS[split]
    ps.metadata = [{"template": parse_caption(p).template, "split": split} for p in ps.prompts]
    return ps


def shapes_train() -> PromptSet:
    """Shapes-world RL training prompts (registered as ``shapes-train``)."""
    return shapes_split("train")


def shapes_heldout_combos() -> PromptSet:
    """Prompts with held-out colour-shape combinations (``shapes-heldout-combos``)."""
    return shapes_split("heldout-combos")


def shapes_heldout_counts() -> PromptSet:
    """Count prompts with held-out (count, shape) pairs (``shapes-heldout-counts``)."""
    return shapes_split("heldout-counts")


def shapes_heldout_relations() -> PromptSet:
    """Relation prompts with held-out (relation, subject shape) pairs (``shapes-heldout-relations``)."""
    return shapes_split("heldout-relations")


# Eight training prompts, every template: what the default run trains on, so that each epoch can
# sample every prompt 8 times and its mean reward is comparable from epoch to epoch.
DEMO_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "three red squares",
    "two red triangles",
    "a red circle left of a blue circle",
    "a red circle below a yellow square",
    "a red circle right of a green triangle",
)


def shapes_demo() -> PromptSet:
    """Eight prompts of ``shapes-train`` (3 single, 2 count, 3 relation): the default run's set."""
    return PromptSet(
        "shapes-demo", list(DEMO_PROMPTS),
        [{"template": parse_caption(p).template, "split": "train"} for p in DEMO_PROMPTS],
        description="shapes world: 8 training prompts (3 single, 2 count, 3 relation), the default run's set",
    )
