"""The shapes world: scenes of 1-3 coloured shapes on a plain background, their renders and captions.

A :class:`Scene` is a background colour and up to three :class:`Obj` (shape, colour, centre, size).
:func:`render_batch` draws many scenes at once with numpy (crisp: a pixel belongs to a shape when its
centre does, no antialiasing), so every pixel's colour is exactly a palette colour and the gold
analyser (:mod:`rlbench.shapes.analyser`) recovers the scene exactly.

Data generation::

    rng = np.random.default_rng(0)
    scene, caption, facts = sample_scene_and_caption(rng)          # a random caption and a scene for it
    images, captions, scenes = sample_batch(rng, 4096)            # (4096, 32, 32, 3) uint8, thousands/s
    scene = scene_for_prompt("two red circles on a gray background", rng)   # a scene for a given prompt

Geometry (pixel units; pixel (x, y) covers [x, x+1) x [y, y+1), so its centre is (x+0.5, y+0.5)):
an object of ``size`` s occupies the s x s box with integer top-left corner (cx - s/2, cy - s/2).
Squares fill the box, circles are the inscribed disc, triangles point up (apex at the top middle,
base along the bottom). Objects keep ``BORDER`` px from the image edge and ``OBJECT_GAP`` px from
each other's boxes, so no two objects touch. In a relation scene the two boxes are ``RELATION_GAP``
or more px apart along the relation's axis and their centres at most ``RELATION_SLACK`` px apart across
it: "left of" is never also "above".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from rlbench.shapes.grammar import CaptionSpec, Fact, Kind, parse_caption
from rlbench.shapes.vocab import (
    BACKGROUND_COLORS,
    COUNT_WORDS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    OBJECT_COLORS,
    PALETTE,
    RELATIONS,
    SHAPES,
    TEMPLATES,
)

MIN_SIZE: Final = 8  # px: below this a triangle and a circle start to look alike at 32x32
MAX_SIZE_BY_COUNT: Final = {1: 14, 2: 12, 3: 11}  # px: smaller when more objects must fit
BORDER: Final = 1  # px kept free at the image edge (no shape is cropped)
OBJECT_GAP: Final = 2  # px between two objects' boxes (either horizontally or vertically)
RELATION_GAP: Final = 2  # px between the two boxes along a relation's axis: centres >= 10 px apart
RELATION_SLACK: Final = 3  # px: most the two centres may differ across a relation's axis
BACKGROUND_CLAUSE_PROB: Final = 0.5  # chance that a sampled caption names its background
_PLACEMENT_TRIES: Final = 200  # random positions tried per object before shrinking the objects

_RGB: Final = np.array([PALETTE[c] for c in PALETTE], dtype=np.uint8)
_COLOR_INDEX: Final = {c: i for i, c in enumerate(PALETTE)}
_SHAPE_INDEX: Final = {s: i for i, s in enumerate(SHAPES)}


@dataclass(frozen=True)
class Obj:
    """One object: ``shape`` in SHAPES, ``color`` in OBJECT_COLORS, box centre (cx, cy), side ``size``.

    Sampled objects have integer box corners (cx - size/2 integer); render() accepts any floats.
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: int

    @property
    def kind(self) -> Kind:
        return Kind(self.color, self.shape)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the object's square box, end exclusive."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    """A background colour (in BACKGROUND_COLORS) and 1-3 objects, none of the background's colour."""

    background: str
    objects: tuple[Obj, ...]


# -- rendering --------------------------------------------------------------------------------------


def _object_arrays(scenes: Sequence[Scene]) -> tuple[np.ndarray, ...]:
    """Per-slot object parameters, (B, MAX_OBJECTS) each; empty slots have size 0."""
    b = len(scenes)
    shape = np.zeros((b, MAX_OBJECTS), np.int64)
    color = np.zeros((b, MAX_OBJECTS), np.int64)
    geom = np.zeros((3, b, MAX_OBJECTS), np.float64)  # cx, cy, size
    for i, scene in enumerate(scenes):
        if len(scene.objects) > MAX_OBJECTS:
            raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, got {len(scene.objects)}")
        for k, o in enumerate(scene.objects):
            shape[i, k] = _SHAPE_INDEX[o.shape]
            color[i, k] = _COLOR_INDEX[o.color]
            geom[:, i, k] = (o.cx, o.cy, o.size)
    return shape, color, geom[0], geom[1], geom[2]


def shape_masks(shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: np.ndarray,
                image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean masks (..., H, W) of objects given as broadcastable arrays (shape codes index SHAPES)."""
    centres = np.arange(image_size, dtype=np.float64) + 0.5
    px = centres[None, :]  # (1, W)
    py = centres[:, None]  # (H, 1)
    cx, cy, half = (a[..., None, None] for a in (cx, cy, size / 2.0))
    shape = shape[..., None, None]
    dx, dy = px - cx, py - cy
    in_box = (np.abs(dx) < half) & (np.abs(dy) < half)
    circle = dx * dx + dy * dy < half * half
    # Apex at the top middle, base on the bottom edge: half-width grows by 1/2 px per px down.
    triangle = in_box & (np.abs(dx) <= (dy + half) / 2.0)
    return np.where(shape == _SHAPE_INDEX["square"], in_box,
                    np.where(shape == _SHAPE_INDEX["circle"], circle, triangle)) & (half > 0)


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """Render scenes to a (B, 32, 32, 3) uint8 array (vectorised: thousands of scenes per second)."""
    shape, color, cx, cy, size = _object_arrays(scenes)
    masks = shape_masks(shape, cx, cy, size)  # (B, K, H, W)
    bg = np.array([_COLOR_INDEX[s.background] for s in scenes], dtype=np.int64)
    index = np.broadcast_to(bg[:, None, None], (len(scenes), IMAGE_SIZE, IMAGE_SIZE)).copy()
    for k in range(MAX_OBJECTS):  # objects never overlap, so the order does not matter
        index = np.where(masks[:, k], color[:, k, None, None], index)
    return _RGB[index]


def render(scene: Scene) -> np.ndarray:
    """Render one scene to a (32, 32, 3) uint8 array."""
    return render_batch([scene])[0]


# -- sampling ---------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _boxes_apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two (x0, y0, size) boxes are at least OBJECT_GAP px apart horizontally or vertically."""
    (ax, ay, sa), (bx, by, sb) = a, b
    return (ax + sa + OBJECT_GAP <= bx or bx + sb + OBJECT_GAP <= ax
            or ay + sa + OBJECT_GAP <= by or by + sb + OBJECT_GAP <= ay)


def _place_apart(rng: np.random.Generator, sizes: list[int]) -> list[tuple[int, int, int]]:
    """Random non-touching boxes (x0, y0, size) for objects of ``sizes``; shrinks them if crowded."""
    while True:
        placed: list[tuple[int, int, int]] = []
        for size in sizes:
            hi = IMAGE_SIZE - BORDER - size + 1
            for _ in range(_PLACEMENT_TRIES):
                box = (int(rng.integers(BORDER, hi)), int(rng.integers(BORDER, hi)), size)
                if all(_boxes_apart(box, other) for other in placed):
                    placed.append(box)
                    break
            else:
                break
        if len(placed) == len(sizes):
            return placed
        if max(sizes) <= MIN_SIZE:  # cannot happen for <= 3 objects of MIN_SIZE in 32x32
            raise RuntimeError(f"cannot place {len(sizes)} objects of size {MIN_SIZE}")
        sizes = [max(MIN_SIZE, s - 1) for s in sizes]


def _place_relation(rng: np.random.Generator, relation: str, size_a: int, size_b: int
                    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Boxes (x0, y0, size) for a subject A and an other B such that "A <relation> B" holds clearly."""
    first, second = (size_a, size_b) if relation in ("left_of", "above") else (size_b, size_a)
    span = IMAGE_SIZE - 2 * BORDER
    gap = int(rng.integers(RELATION_GAP, span - first - second + 1))
    start = int(rng.integers(BORDER, IMAGE_SIZE - BORDER - (first + gap + second) + 1))
    along = (start, start + first + gap)
    # Across the axis: the first box anywhere, the second's centre within RELATION_SLACK of it.
    a0 = int(rng.integers(BORDER, IMAGE_SIZE - BORDER - first + 1))
    centre = a0 + first / 2
    lo = max(BORDER, int(np.ceil(centre - RELATION_SLACK - second / 2)))
    hi = min(IMAGE_SIZE - BORDER - second, int(np.floor(centre + RELATION_SLACK - second / 2)))
    across = (a0, int(rng.integers(lo, hi + 1)))
    horizontal = relation in ("left_of", "right_of")
    boxes = [(along[i], across[i]) if horizontal else (across[i], along[i]) for i in range(2)]
    box_first, box_second = ((*boxes[0], first), (*boxes[1], second))
    return (box_first, box_second) if relation in ("left_of", "above") else (box_second, box_first)


def _obj(kind: Kind, box: tuple[int, int, int]) -> Obj:
    x0, y0, size = box
    return Obj(kind.shape, kind.color, x0 + size / 2, y0 + size / 2, size)


def scene_for_spec(spec: CaptionSpec, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies every fact of ``spec`` (and shows only the objects it describes)."""
    kinds = spec.kinds
    used = {k.color for k in kinds}
    background = spec.background or _choice(rng, [b for b in BACKGROUND_COLORS if b not in used])
    max_size = MAX_SIZE_BY_COUNT[len(kinds)]
    sizes = [int(rng.integers(MIN_SIZE, max_size + 1)) for _ in kinds]
    if spec.template == "relation":
        assert spec.relation is not None
        boxes = list(_place_relation(rng, spec.relation, sizes[0], sizes[1]))
    else:
        boxes = _place_apart(rng, sizes)
    return Scene(background, tuple(_obj(k, b) for k, b in zip(kinds, boxes)))


def scene_for_prompt(prompt: str, rng: np.random.Generator) -> Scene:
    """A random scene satisfying a shapes-world caption (PromptParseError, a ValueError, if none)."""
    return scene_for_spec(parse_caption(prompt), rng)


def sample_spec(rng: np.random.Generator, template: str | None = None, *,
                background_clause: bool | None = None, exclude_heldout: bool = False) -> CaptionSpec:
    """A random caption structure: uniform template, kinds, count, relation; background named with
    probability BACKGROUND_CLAUSE_PROB. ``exclude_heldout`` resamples captions that fall in a held-out
    space of :func:`~rlbench.shapes.grammar.split_prompts` (for a base model that never saw them)."""
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
    while True:
        tpl = template or _choice(rng, TEMPLATES)
        subject = Kind(_choice(rng, OBJECT_COLORS), _choice(rng, SHAPES))
        count, relation, other = 1, None, None
        if tpl == "count":
            count = _choice(rng, list(COUNT_WORDS))
        elif tpl == "relation":
            relation = _choice(rng, list(RELATIONS))
            while other is None or other == subject:
                other = Kind(_choice(rng, OBJECT_COLORS), _choice(rng, SHAPES))
        named = rng.random() < BACKGROUND_CLAUSE_PROB if background_clause is None else background_clause
        background = None
        if named:
            used = {subject.color} | ({other.color} if other else set())
            background = _choice(rng, [b for b in BACKGROUND_COLORS if b not in used])
        spec = CaptionSpec(tpl, subject, count=count, relation=relation, other=other, background=background)
        if not (exclude_heldout and spec.heldout_reason()):
            return spec


def sample_scene_and_caption(rng: np.random.Generator, template: str | None = None, *,
                             background_clause: bool | None = None, exclude_heldout: bool = False
                             ) -> tuple[Scene, str, list[Fact]]:
    """A random caption, a scene matching it, and the caption's facts (deterministic given ``rng``).

    Args:
        rng: the only source of randomness.
        template: "single", "count" or "relation"; None draws one uniformly.
        background_clause: whether the caption names its background; None: with probability 1/2.
        exclude_heldout: never produce a caption of a held-out split's space.
    """
    spec = sample_spec(rng, template, background_clause=background_clause, exclude_heldout=exclude_heldout)
    return scene_for_spec(spec, rng), spec.caption(), spec.facts()


def sample_batch(rng: np.random.Generator, n: int, template: str | None = None, *,
                 background_clause: bool | None = None, exclude_heldout: bool = False
                 ) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random (image, caption) pairs: images (n, 32, 32, 3) uint8, captions, and their scenes."""
    scenes, captions = [], []
    for _ in range(n):
        scene, caption, _facts = sample_scene_and_caption(
            rng, template, background_clause=background_clause, exclude_heldout=exclude_heldout)
        scenes.append(scene)
        captions.append(caption)
    return render_batch(scenes), captions, scenes
