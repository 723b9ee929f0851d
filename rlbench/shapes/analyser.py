"""The gold analyser: read a shapes-world image back into a scene description and check captions.

:func:`analyse` (one image) and :func:`analyse_batch` (vectorised over a batch) work in four steps:

1. snap each pixel to the nearest palette colour; a pixel farther than ``SNAP_MAX_DISTANCE`` (RGB,
   Euclidean) from every palette colour is *unknown* (blurred edges, noise) and belongs to nothing;
2. background = the most common snapped colour;
3. objects = 4-connected components of pixels of one object colour other than the background, of at
   least ``MIN_OBJECT_AREA`` pixels (smaller ones are noise); gray pixels are never objects (gray is
   a background colour only);
4. each object's shape from its geometry: triangles (apex up) hold little of their area in the top
   half of their box, squares fill their box, circles fill about pi/4 of it; components much longer
   than wide are shape "other", which matches no caption.

On renders of :mod:`rlbench.shapes.world` all four steps are exact; on blurry or noisy generated
images they degrade gracefully. :func:`gold_score` is the fraction of a caption's facts
(:func:`~rlbench.shapes.grammar.parse_prompt`) that the image satisfies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import numpy as np

from rlbench.shapes.grammar import Background, Count, Exists, Fact, Kind, Relation, Total, parse_prompt
from rlbench.shapes.vocab import OBJECT_COLORS, PALETTE, SHAPES
from rlbench.shapes.world import Scene, shape_masks

SNAP_MAX_DISTANCE: Final = 64.0  # RGB units; the closest palette pair is 105 apart
MIN_OBJECT_AREA: Final = 16  # px: half the smallest rendered object (a size-8 triangle, 32 px)
TRIANGLE_MAX_TOP_FRACTION: Final = 0.35  # renders: triangles <= 0.25, circles and squares >= 0.43
TRIANGLE_MAX_FILL: Final = 0.62  # renders: triangles <= 0.58, circles >= 0.77
SQUARE_MIN_FILL: Final = 0.9  # renders: squares 1.0, circles <= 0.86
MAX_ASPECT: Final = 1.5  # longer/shorter box side; renders <= 8/7
RELATION_MARGIN: Final = 3.0  # px between centroids along the axis; renders keep >= 10
OTHER_SHAPE: Final = "other"

_RGB: Final = np.array(list(PALETTE.values()), dtype=np.float32)
_NAMES: Final = list(PALETTE)
_IS_OBJECT_COLOR: Final = np.array([c in OBJECT_COLORS for c in PALETTE])
_UNKNOWN: Final = -1


class ParsedObject(NamedTuple):
    """One detected object: (cx, cy) is the centroid of its pixels' centres, bbox (x0, y0, x1, y1) is
    end exclusive, area in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]
    area: int

    @property
    def kind(self) -> Kind:
        return Kind(self.color, self.shape)


@dataclass(frozen=True)
class Parsed:
    """What an image shows: its background colour (None if no pixel is near the palette) and objects."""

    background: str | None
    objects: list[ParsedObject] = field(default_factory=list)


# -- image -> Parsed --------------------------------------------------------------------------------


def _as_uint8(images: np.ndarray) -> np.ndarray:
    """(…, H, W, 3) uint8, or float in [0, 1] quantised as round(x * 255)."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"images must be uint8 or float in [0, 1], got {arr.dtype}")
    return np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)


def snap(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H, W) palette indices (order of PALETTE), -1 where no colour is near."""
    x = images.reshape(-1, 3).astype(np.float32)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2 as one matmul (exact in float32: all terms are integers < 2^24).
    d2 = (x * x).sum(1, keepdims=True) - 2.0 * (x @ _RGB.T) + (_RGB * _RGB).sum(1)
    index = d2.argmin(1)
    near = d2[np.arange(len(x)), index] <= SNAP_MAX_DISTANCE**2
    return np.where(near, index, _UNKNOWN).reshape(images.shape[:-1])


def _label_components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative ``cls`` values, batched: (B, H, W) labels, each the
    smallest flat pixel index inside its component; -1 outside components."""
    b, h, w = cls.shape
    fg = cls >= 0
    big = np.iinfo(np.int64).max
    padded_cls = np.full((b, h + 2, w + 2), _UNKNOWN, dtype=cls.dtype)
    padded_cls[:, 1:-1, 1:-1] = cls
    offsets = ((0, 1), (0, -1), (1, 0), (-1, 0))
    window = lambda a, dy, dx: a[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # noqa: E731
    joined = [fg & (window(padded_cls, dy, dx) == cls) for dy, dx in offsets]  # same-class neighbours
    labels = np.where(fg, np.arange(b * h * w, dtype=np.int64).reshape(b, h, w), big)
    padded = np.full((b, h + 2, w + 2), big, dtype=np.int64)
    while True:
        # Min-label propagation over same-class neighbours ...
        padded[:, 1:-1, 1:-1] = labels
        new = labels.copy()
        for (dy, dx), same in zip(offsets, joined):
            np.minimum(new, np.where(same, window(padded, dy, dx), big), out=new)
        # ... plus pointer jumping: a label is a pixel of the same component; take that pixel's label.
        flat = new.reshape(-1)
        new = np.where(fg, np.minimum(new, flat[np.where(fg, new, 0)]), big)
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def classify_shape(area: np.ndarray, width: np.ndarray, height: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Shape names from component geometry (arrays): ``top`` = pixels above the box's middle line."""
    fill = area / (width * height)
    top_fraction = top / area
    aspect = np.maximum(width, height) / np.minimum(width, height)
    shape = np.where(fill >= SQUARE_MIN_FILL, "square", "circle").astype(object)
    shape[(top_fraction < TRIANGLE_MAX_TOP_FRACTION) | (fill < TRIANGLE_MAX_FILL)] = "triangle"
    shape[aspect > MAX_ASPECT] = OTHER_SHAPE
    return shape


def analyse_batch(images: np.ndarray) -> list[Parsed]:
    """Analyse (B, H, W, 3) images (uint8, or float in [0, 1]); one :class:`Parsed` per image."""
    imgs = _as_uint8(images)
    if imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"images must have shape (B, H, W, 3), got {imgs.shape}")
    b, h, w, _ = imgs.shape
    snapped = snap(imgs)
    n_colors = len(_NAMES)
    per_image = (snapped + 1) + (n_colors + 1) * np.arange(b)[:, None, None]  # unknown -> column 0
    counts = np.bincount(per_image.reshape(-1), minlength=b * (n_colors + 1)).reshape(b, n_colors + 1)[:, 1:]
    bg = np.where(counts.max(1) > 0, counts.argmax(1), _UNKNOWN)
    is_obj = (snapped >= 0) & _IS_OBJECT_COLOR[snapped] & (snapped != bg[:, None, None])
    labels = _label_components(np.where(is_obj, snapped, _UNKNOWN))

    parsed = [Parsed(_NAMES[i] if i >= 0 else None, []) for i in bg]
    mask = labels >= 0
    if not mask.any():
        return parsed
    roots, comp = np.unique(labels[mask], return_inverse=True)
    ys, xs = np.nonzero(mask.reshape(b * h, w))
    ys = ys % h
    n = len(roots)
    area = np.bincount(comp, minlength=n)
    keep = area >= MIN_OBJECT_AREA
    x0, y0 = np.full(n, w), np.full(n, h)
    x1, y1 = np.zeros(n, np.int64), np.zeros(n, np.int64)
    np.minimum.at(x0, comp, xs)
    np.minimum.at(y0, comp, ys)
    np.maximum.at(x1, comp, xs + 1)
    np.maximum.at(y1, comp, ys + 1)
    cx = np.bincount(comp, xs + 0.5, n) / area
    cy = np.bincount(comp, ys + 0.5, n) / area
    top = np.bincount(comp, (ys + 0.5 < (y0 + y1)[comp] / 2).astype(np.float64), n)
    shapes = classify_shape(area, x1 - x0, y1 - y0, top)
    colors = snapped.reshape(-1)[roots]
    for k in np.flatnonzero(keep):  # components in order of their first pixel: row-major per image
        parsed[int(roots[k] // (h * w))].objects.append(ParsedObject(
            str(shapes[k]), _NAMES[colors[k]], float(cx[k]), float(cy[k]),
            (int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])), int(area[k])))
    return parsed


def analyse(image: np.ndarray) -> Parsed:
    """Analyse one (H, W, 3) image (uint8, or float in [0, 1])."""
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {arr.shape}")
    return analyse_batch(arr[None])[0]


def scene_truth(scene: Scene) -> Parsed:
    """The ground truth of a scene as a :class:`Parsed`: shapes and colours from the scene, centroids
    and boxes from each object's own render mask (what the analyser measures on an exact render)."""
    objects = []
    for o in scene.objects:
        m = shape_masks(np.array(SHAPES.index(o.shape)), np.array(o.cx), np.array(o.cy),
                        np.array(float(o.size)))
        ys, xs = np.nonzero(m)
        objects.append(ParsedObject(o.shape, o.color, float((xs + 0.5).mean()), float((ys + 0.5).mean()),
                                    (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                                    int(m.sum())))
    return Parsed(scene.background, objects)


# -- facts ------------------------------------------------------------------------------------------


def _related(a: ParsedObject, relation: str, b: ParsedObject) -> bool:
    """Whether ``a`` lies ``relation`` ``b``: centroids RELATION_MARGIN or more px apart along the axis."""
    if relation == "left_of":
        return b.cx - a.cx >= RELATION_MARGIN
    if relation == "right_of":
        return a.cx - b.cx >= RELATION_MARGIN
    if relation == "above":  # image y grows downwards
        return b.cy - a.cy >= RELATION_MARGIN
    if relation == "below":
        return a.cy - b.cy >= RELATION_MARGIN
    raise ValueError(f"unknown relation {relation!r}")


def fact_holds(fact: Fact, parsed: Parsed) -> bool:
    """Whether ``parsed`` satisfies one fact."""
    if isinstance(fact, Exists):
        return any(o.kind == fact.kind for o in parsed.objects)
    if isinstance(fact, Count):
        return sum(o.kind == fact.kind for o in parsed.objects) == fact.n
    if isinstance(fact, Total):
        return len(parsed.objects) == fact.n
    if isinstance(fact, Background):
        return parsed.background == fact.color
    if isinstance(fact, Relation):
        subjects = [o for o in parsed.objects if o.kind == fact.subject]
        others = [o for o in parsed.objects if o.kind == fact.other]
        return any(a is not b and _related(a, fact.relation, b) for a in subjects for b in others)
    raise TypeError(f"not a fact: {fact!r}")


def check_facts(parsed: Parsed, facts: Sequence[Fact]) -> list[bool]:
    """Which of ``facts`` ``parsed`` satisfies."""
    return [fact_holds(f, parsed) for f in facts]


def score_facts(parsed: Parsed, facts: Sequence[Fact]) -> float:
    """The fraction of ``facts`` satisfied (1.0 for no facts)."""
    held = check_facts(parsed, facts)
    return sum(held) / len(held) if held else 1.0


def gold_score(image: np.ndarray, prompt: str) -> float:
    """The fraction of the prompt's facts the image satisfies, in [0, 1] (PromptParseError if the
    prompt is not a shapes-world caption)."""
    return score_facts(analyse(image), parse_prompt(prompt))


def gold_scores(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """:func:`gold_score` of a batch: (B, H, W, 3) images and B prompts -> float64 (B,)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    facts = [parse_prompt(p) for p in prompts]  # parse first: a bad prompt fails before any work
    return np.array([score_facts(p, f) for p, f in zip(analyse_batch(images), facts)], dtype=np.float64)
