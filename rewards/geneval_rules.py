"""GenEval's rule engine (djghosh13/geneval ``evaluation/evaluate_images.py`` and ``summary_scores.py``), detector-free.

The engine turns one image's detections into GenEval's per-image verdict; the detector (GenEval's mmdet Mask2Former,
or a transformers stand-in) and the colour classifier (CLIP ViT-L-14 zero-shot over :data:`COLORS`) sit behind two
callables, so the rules are tested on synthetic detections (tests/test_geneval_rules.py) and the same code scores
any detector's output. Every constant is the official one, each an option as in the official ``--options``:

* :func:`select_objects` (``evaluate_image`` L223-244): per class, detections sorted by score, those with score
  ``> threshold`` (0.3; 0.9 for ``counting`` prompts) kept, at most 16, greedy IoU suppression only when
  ``max_overlap < 1`` (1.0 by default: none).
* :func:`relative_position` (L140-157): A's position relative to B from box centres, the offset shrunk by
  ``0.1 x`` the two boxes' summed sizes; no relation when both shrunk components are under 1e-3.
* :func:`evaluate` (L160-220): ``correct`` iff every ``include`` clause finds ``count`` objects (the most confident),
  ``count`` of them of its ``color`` and all of them in ``position`` to every object of the clause group they
  refer to, and no ``exclude`` clause finds ``count`` objects.
* :func:`summary` (``summary_scores.py`` L26-45): per tag the mean of ``correct``; overall = the unweighted mean of
  the tag means.
* :func:`partial_credit`: Flow-GRPO's training reward on the same detections (``reward_server/gen_eval.py``
  ``evaluate_reward`` L201-264), quirks included: the count term ``1 - |n - N| / n`` over all N detections (negative
  when N > 2n), one colour/position term 0 when the count is off, the colour term ``1 - |n - hits| / n``, no
  position term after a colour miss, a failed position check appends 0 *and* 1, and ``exclude`` clauses are
  ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

THRESHOLD = 0.3  # evaluate_images.py L286 ('threshold')
COUNTING_THRESHOLD = 0.9  # L287 ('counting_threshold'), for tag == "counting"
MAX_OBJECTS = 16  # L288 ('max_objects'), per class
MAX_OVERLAP = 1.0  # L289 ('max_overlap'): IoU suppression only below 1
POSITION_THRESHOLD = 0.1  # L290 ('position_threshold')
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")  # L76
POSITIONS = ("left of", "right of", "above", "below")  # prompts/create_prompts.py L104
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class Detection:
    """One detected instance: its box ``(x1, y1, x2, y2)`` in pixels, its score and its mask (None: box only)."""

    box: tuple[float, float, float, float]
    score: float
    mask: Any = None


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with the official inclusive-pixel areas (``+ 1``), as its ``compute_iou``."""
    def area(x):
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(detections: Mapping[str, Sequence[Detection]], tag: str, *, threshold: float = THRESHOLD,
                   counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                   max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
    """The detections GenEval keeps per class (most confident first); classes with none are left out."""
    cut = counting_threshold if tag == "counting" else threshold
    out: dict[str, list[Detection]] = {}
    for name, dets in detections.items():
        order = sorted(dets, key=lambda d: -float(d.score))  # stable for ties, as argsort of a reversed order is not
        order = [d for d in order if float(d.score) > cut][:max_objects]
        kept: list[Detection] = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if max_overlap != 1:
                order = [d for d in order if _iou(best.box, d.box) < max_overlap]
        if kept:
            out[name] = kept
    return out


def relative_position(a: Detection, b: Detection, margin: float = POSITION_THRESHOLD) -> set[str]:
    """The relations of A to B (image coordinates, y down): "left of", "right of", "above", "below"."""
    boxes = np.array([a.box[:4], b.box[:4]], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - margin * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


ColorOf = Callable[[Sequence[Detection], str], Sequence[str]]  # (instances, class name) -> one colour each


def evaluate(metadata: Mapping[str, Any], objects: Mapping[str, Sequence[Detection]], color_of: ColorOf,
             margin: float = POSITION_THRESHOLD) -> tuple[bool, str]:
    """GenEval's verdict for one image: (correct, the reasons it is not, one a line)."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        name, n = req["class"], int(req["count"])
        matched = True
        found = list(objects.get(name, []))[:n]
        if len(found) < n:
            correct = matched = False
            reasons.append(f"expected {name}>={n}, found {len(found)}")
        else:
            if "color" in req:
                colors = list(color_of(found, name))
                if colors.count(req["color"]) < n:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {name}>={n}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and " + ", ".join(f"{colors.count(c)} {c}" for c in COLORS
                                                                         if c in colors))
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {rel}")
                else:
                    for obj in found:
                        for other in groups[target]:
                            got = relative_position(obj, other, margin)
                            if rel not in got:
                                correct = matched = False
                                reasons.append(f"expected {name} {rel} target, found {' and '.join(sorted(got))} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name = req["class"]
        if len(objects.get(name, [])) >= int(req["count"]):
            correct = False
            reasons.append(f"expected {name}<{req['count']}, found {len(objects[name])}")
    return correct, "\n".join(reasons)


def partial_credit(metadata: Mapping[str, Any], objects: Mapping[str, Sequence[Detection]], color_of: ColorOf,
                   margin: float = POSITION_THRESHOLD) -> tuple[float, bool]:
    """Flow-GRPO's GenEval training reward and its strict verdict: (mean of the clause terms, every clause exact)."""
    terms: list[float] = []
    strict = True
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, n = req["class"], int(req["count"])
        dets = list(objects.get(name, []))
        big_n = len(dets)
        terms.append(1 - abs(n - big_n) / n)
        found = dets[:n]
        matched = big_n == n
        if not matched:
            strict = False
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                hits = list(color_of(found, name)).count(req["color"])
                terms.append(1 - abs(n - hits) / n)
                if hits != n:
                    strict = matched = False
            if "position" in req and matched:  # a colour miss skips the position term
                rel, target = req["position"]
                if groups[target] is None:
                    strict = matched = False
                    terms.append(0.0)
                else:
                    failed = False
                    for obj in found:
                        for other in groups[target]:
                            if rel not in relative_position(obj, other, margin):
                                failed = True
                                break
                        if failed:
                            break
                    if failed:
                        strict = matched = False
                        terms.append(0.0)
                    terms.append(1.0)  # appended whether or not the check failed (the reference's quirk)
        groups.append(found if matched else None)
    return (float(np.mean(terms)) if terms else 0.0), strict


def summary(tags: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """Per tag the fraction of correct images, and ``overall``: the unweighted mean of the tag means (of the tags
    present)."""
    by: dict[str, list[bool]] = {}
    for t, c in zip(tags, correct):
        by.setdefault(t, []).append(bool(c))
    out = {t: float(np.mean(v)) for t, v in sorted(by.items(), key=lambda kv: TAGS.index(kv[0])
                                                     if kv[0] in TAGS else len(TAGS))}
    out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out
