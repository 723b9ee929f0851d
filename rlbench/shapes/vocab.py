"""The shapes world's vocabulary: image size, palette, shapes, counts, relations.

One place for every constant that both the renderer and the caption grammar use, so that a caption
word and what the renderer draws for it can never drift apart.
"""

from __future__ import annotations

from typing import Final

IMAGE_SIZE: Final = 32  # images are IMAGE_SIZE x IMAGE_SIZE RGB

# RGB values chosen far apart: the closest pair (yellow-orange) is 105 apart in RGB (Euclidean),
# so nearest-palette snapping of a noisy pixel is unambiguous up to ~50 units of noise.
PALETTE: Final[dict[str, tuple[int, int, int]]] = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (255, 230, 0),
    "purple": (140, 30, 180),
    "orange": (255, 125, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
COLOR_NAMES: Final = tuple(PALETTE)

# Gray is a background colour only: a blurred edge between white and black is exactly gray, so a
# gray *object* would be hallucinated around every white-on-black shape of a blurry generated image.
OBJECT_COLORS: Final = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUND_COLORS: Final = ("white", "black", "gray")

SHAPES: Final = ("circle", "square", "triangle")
PLURALS: Final = {shape: shape + "s" for shape in SHAPES}

COUNT_WORDS: Final = {2: "two", 3: "three"}  # count 1 is the single-object template ("a red circle")
MAX_OBJECTS: Final = 3

# Relation fact name -> caption words. "a X left of a Y": X's centre lies left of Y's.
RELATIONS: Final = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}

TEMPLATES: Final = ("single", "count", "relation")


def article(word: str) -> str:
    """The indefinite article for ``word`` ("an orange circle", "a red square")."""
    return "an" if word[0] in "aeiou" else "a"
