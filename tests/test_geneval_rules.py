"""GenEval's rule engine (rlbench/rewards/geneval_rules.py) on synthetic detections: hand-worked cases of every rule
(thresholds, the 16-object cap, IoU suppression, counts with their exclude clause, colours, positions with the 0.1
margin, the unweighted overall) and Flow-GRPO's partial credit with its quirks; then every prompt of the real
GenEval file (../shared/data) scored correct on detections built to satisfy it and incorrect on none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlbench.rewards.geneval_rules import (COUNTING_THRESHOLD, Detection, evaluate, partial_credit,
                                           relative_position, select_objects, summary)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"


def box(x1, y1, x2, y2, score=0.95):
    return Detection((x1, y1, x2, y2), score)


def colours(*names):
    """A colour classifier that answers ``names`` in order, whatever the crops."""
    def color_of(found, cls):
        return list(names)[: len(found)]
    return color_of


def no_colour(found, cls):
    raise AssertionError("no colour clause here")


# -- positions ----------------------------------------------------------------------------------------------

def test_relative_position_hand_worked():
    a, b = box(0, 0, 10, 10), box(30, 0, 40, 10)
    # centres 5 vs 35: offset -30, shrunk by 0.1 x (10 + 10) = 2 -> -28 / 30 = -0.93 < -0.5
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position(box(0, 0, 10, 10), box(0, 30, 10, 40)) == {"above"}
    # diagonal: (-28, -28) / 42.4 = -0.66 on both axes
    assert relative_position(box(0, 0, 10, 10), box(30, 30, 40, 40)) == {"left of", "above"}
    # offset 1 shrunk by 2 -> 0: overlapping boxes have no relation
    assert relative_position(box(0, 0, 10, 10), box(1, 0, 11, 10)) == set()
    # the margin matters: centres 5 and 12 (offset -7) against 0.1 x (10 + 100) = 11: no relation
    assert relative_position(box(0, 0, 10, 10), box(-38, 0, 62, 10)) == set()


# -- selection ----------------------------------------------------------------------------------------------

def test_select_objects_thresholds_cap_and_suppression():
    dets = {"dog": [box(0, 0, 5, 5, 0.5), box(0, 0, 5, 5, 0.95), box(0, 0, 5, 5, 0.3), box(0, 0, 5, 5, 0.2)],
            "cat": [box(0, 0, 5, 5, 0.1)]}
    got = select_objects(dets, "two_object")
    assert [d.score for d in got["dog"]] == [0.95, 0.5]  # sorted; 0.3 is not > 0.3
    assert "cat" not in got  # a class with nothing kept is left out
    assert [d.score for d in select_objects(dets, "counting")["dog"]] == [0.95]  # counting: > 0.9
    assert COUNTING_THRESHOLD == 0.9
    many = {"clock": [box(i, 0, i + 1, 1, 0.99 - i * 1e-3) for i in range(20)]}
    assert len(select_objects(many, "single_object")["clock"]) == 16
    # IoU suppression only when max_overlap < 1 (1.0 by default: duplicates stay)
    twins = {"car": [box(0, 0, 9, 9, 0.9), box(0, 0, 9, 9, 0.8), box(50, 50, 59, 59, 0.7)]}
    assert len(select_objects(twins, "single_object")["car"]) == 3
    assert len(select_objects(twins, "single_object", max_overlap=0.5)["car"]) == 2


# -- the verdict --------------------------------------------------------------------------------------------

COUNT2 = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
RED_CAR = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                            {"class": "bench", "count": 1, "color": "blue"}]}
DOG_RIGHT = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                            {"class": "dog", "count": 1, "position": ["right of", 0]}]}


def test_counting_means_exactly_n():
    two = {"clock": [box(0, 0, 5, 5), box(20, 0, 25, 5)]}
    assert evaluate(COUNT2, two, no_colour) == (True, "")
    three = {"clock": two["clock"] + [box(40, 0, 45, 5)]}
    ok, why = evaluate(COUNT2, three, no_colour)
    assert not ok and why == "expected clock<3, found 3"
    ok, why = evaluate(COUNT2, {"clock": two["clock"][:1]}, no_colour)
    assert not ok and why == "expected clock>=2, found 1"


def test_colour_is_judged_on_the_most_confident_instances():
    seen = []

    def color_of(found, cls):
        seen.append((cls, len(found)))
        return ["red"] if cls == "car" else ["blue"]

    objs = {"car": [box(0, 0, 5, 5, 0.9), box(20, 0, 25, 5, 0.8)], "bench": [box(40, 0, 45, 5)]}
    assert evaluate(RED_CAR, objs, color_of) == (True, "")
    assert seen == [("car", 1), ("bench", 1)]  # count 1: only the top car's colour is asked
    ok, why = evaluate(RED_CAR, objs, colours("green"))
    assert not ok and why.startswith("expected red car>=1, found 0 red; and 1 green")


def test_position_against_the_target_group():
    teddy = box(40, 40, 60, 60)
    assert evaluate(DOG_RIGHT, {"teddy bear": [teddy], "dog": [box(80, 40, 100, 60)]}, no_colour)[0]
    ok, why = evaluate(DOG_RIGHT, {"teddy bear": [teddy], "dog": [box(0, 40, 20, 60)]}, no_colour)
    assert not ok and why == "expected dog right of target, found left of target"
    ok, why = evaluate(DOG_RIGHT, {"dog": [box(80, 40, 100, 60)]}, no_colour)
    assert not ok and why == "expected teddy bear>=1, found 0\nno target for dog to be right of"


# -- Flow-GRPO's partial credit -----------------------------------------------------------------------------

def test_partial_credit_terms_and_quirks():
    clocks = lambda n: {"clock": [box(20 * i, 0, 20 * i + 5, 5) for i in range(n)]}  # noqa: E731
    assert partial_credit(COUNT2, clocks(2), no_colour) == (1.0, True)
    assert partial_credit(COUNT2, clocks(3), no_colour) == (0.5, False)  # 1 - 1/2; the exclude clause is ignored
    assert partial_credit(COUNT2, clocks(5), no_colour) == (-0.5, False)  # N > 2n: negative
    objs = {"car": [box(0, 0, 5, 5)], "bench": [box(40, 0, 45, 5)]}
    assert partial_credit(RED_CAR, objs, colours("green")) == (pytest.approx(0.5), False)  # (1 + 0 + 1 + 0) / 4
    teddy = box(40, 40, 60, 60)
    assert partial_credit(DOG_RIGHT, {"teddy bear": [teddy], "dog": [box(80, 40, 100, 60)]}, no_colour) == (1.0, True)
    # a failed position check appends 0 and then 1: (1 + 1 + 0 + 1) / 4
    assert partial_credit(DOG_RIGHT, {"teddy bear": [teddy], "dog": [box(0, 40, 20, 60)]}, no_colour) == (0.75, False)
    # the dog's count is off: its count term 0 and one 0 for the position: (1 + 0 + 0) / 3
    score, strict = partial_credit(DOG_RIGHT, {"teddy bear": [teddy]}, no_colour)
    assert score == pytest.approx(1 / 3) and not strict


def test_overall_is_the_unweighted_mean_of_the_tag_means():
    got = summary(["single_object", "single_object", "counting"], [True, False, True])
    assert got == {"single_object": 0.5, "counting": 1.0, "overall": 0.75}  # not 2/3 (the image mean)


# -- the real prompt file -----------------------------------------------------------------------------------

OFFSETS = {"left of": (-60, 0), "right of": (60, 0), "above": (0, -60), "below": (0, 60)}


def _satisfying(meta):
    """Detections that satisfy ``meta``: each clause's objects spread out, positioned ones offset from their target."""
    objs, where = {}, []
    for i, req in enumerate(meta["include"]):
        if "position" in req:
            dx, dy = OFFSETS[req["position"][0]]
            x, y = where[req["position"][1]]
            x, y = x + dx, y + dy
        else:
            x, y = 200 + 300 * i, 200
        where.append((x, y))
        objs[req["class"]] = [box(x + 25 * k, y, x + 25 * k + 10, y + 10) for k in range(req["count"])]
    return objs


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/data is not on this machine")
def test_every_geneval_prompt_passes_on_detections_built_from_it_and_fails_on_none():
    records = [json.loads(x) for x in SHARED.read_text().splitlines() if x.strip()]
    assert len(records) == 553
    for meta in records:
        wanted = {req["class"]: req.get("color") for req in meta["include"]}
        color_of = lambda found, cls: [wanted[cls]] * len(found)  # noqa: E731
        objs = select_objects(_satisfying(meta), meta["tag"])
        if meta["tag"] == "counting" or any(req["count"] > 1 for req in meta["include"]):
            # several instances of one class side by side: fine for counts (no position clause there)
            assert not any("position" in req for req in meta["include"])
        assert evaluate(meta, objs, color_of) == (True, ""), meta["prompt"]
        assert partial_credit(meta, objs, color_of) == (1.0, True), meta["prompt"]
        ok, why = evaluate(meta, {}, color_of)
        assert not ok and why.startswith(f"expected {meta['include'][0]['class']}>="), meta["prompt"]
    assert summary([m["tag"] for m in records], [True] * 553)["overall"] == 1.0
