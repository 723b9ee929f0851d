"""The shapes world: renderer, sampler, caption grammar, prompt splits and their bundled files."""

from __future__ import annotations

import itertools
from importlib import resources

import numpy as np
import pytest

from rlbench.errors import InputError
from rlbench.shapes import world
from rlbench.shapes.analyser import check_facts, scene_truth
from rlbench.shapes.grammar import (
    HELDOUT_COMBOS,
    HELDOUT_COUNTS,
    HELDOUT_RELATIONS,
    SPLITS,
    Background,
    Count,
    Exists,
    Kind,
    PromptParseError,
    Relation,
    Total,
    all_prompts,
    all_specs,
    parse_caption,
    parse_prompt,
    split_file_name,
    split_file_text,
    split_prompts,
    split_specs,
    write_split_files,
)
from rlbench.shapes.prompts import (
    shapes_demo,
    shapes_heldout_combos,
    shapes_heldout_counts,
    shapes_heldout_relations,
    shapes_split,
    shapes_train,
)
from rlbench.shapes.vocab import BACKGROUND_COLORS, IMAGE_SIZE, MAX_OBJECTS, OBJECT_COLORS, PALETTE, TEMPLATES


def _samples(seed: int, n: int, **kw):
    rng = np.random.default_rng(seed)
    return [world.sample_scene_and_caption(rng, **kw) for _ in range(n)]


# -- renderer and sampler ---------------------------------------------------------------------------


def test_sampling_and_rendering_are_deterministic_given_the_seed() -> None:
    a, b, c = (world.sample_batch(np.random.default_rng(s), 64) for s in (7, 7, 8))
    assert a[1] == b[1] and a[2] == b[2] and np.array_equal(a[0], b[0])
    assert a[1] != c[1] and not np.array_equal(a[0], c[0])
    assert a[0].shape == (64, IMAGE_SIZE, IMAGE_SIZE, 3) and a[0].dtype == np.uint8
    assert np.array_equal(world.render(a[2][5]), a[0][5])  # one scene renders as in its batch


def test_renders_are_crisp_palette_images_of_separated_objects() -> None:
    images, _, scenes = world.sample_batch(np.random.default_rng(1), 300)
    palette = {tuple(v) for v in PALETTE.values()}
    assert {tuple(p) for p in images.reshape(-1, 3)} <= palette  # no antialiasing: palette colours only
    for image, scene in zip(images, scenes):
        assert scene.background in BACKGROUND_COLORS and 1 <= len(scene.objects) <= MAX_OBJECTS
        for o in scene.objects:
            assert o.color in OBJECT_COLORS and o.color != scene.background
            x0, y0, x1, y1 = o.box
            assert x0 == int(x0) and y0 == int(y0)  # integer boxes: exact rasterisation
            assert world.BORDER <= x0 and x1 <= IMAGE_SIZE - world.BORDER
            assert world.BORDER <= y0 and y1 <= IMAGE_SIZE - world.BORDER
            assert world.MIN_SIZE <= o.size <= world.MAX_SIZE_BY_COUNT[1]
        for a, b in itertools.combinations(scene.objects, 2):
            apart_x = max(a.box[0], b.box[0]) - min(a.box[2], b.box[2])
            apart_y = max(a.box[1], b.box[1]) - min(a.box[3], b.box[3])
            assert max(apart_x, apart_y) >= world.OBJECT_GAP
        # The background fills every pixel outside the objects' boxes.
        outside = np.ones((IMAGE_SIZE, IMAGE_SIZE), bool)
        for o in scene.objects:
            x0, y0, x1, y1 = (int(v) for v in o.box)
            outside[y0:y1, x0:x1] = False
        assert (image[outside] == PALETTE[scene.background]).all()


def test_each_shape_is_drawn_as_documented() -> None:
    """A size-8 square fills its box, a circle is the inscribed disc, a triangle points up."""
    for shape, expected_area in (("square", 64), ("circle", 52), ("triangle", 32)):
        scene = world.Scene("white", (world.Obj(shape, "black", 16.0, 16.0, 8),))
        mask = (world.render(scene) == 0).all(-1)
        assert mask.sum() == expected_area, shape
        ys, xs = np.nonzero(mask)
        assert xs.min() == 12 and xs.max() == 19 and ys.max() == 19
    tri = (world.render(world.Scene("white", (world.Obj("triangle", "black", 16.0, 16.0, 8),))) == 0).all(-1)
    assert tri[13].sum() < tri[19].sum()  # narrow top row, full-width base


def test_every_sampled_scene_satisfies_its_caption() -> None:
    for scene, caption, facts in _samples(2, 600):
        spec = parse_caption(caption)
        assert facts == spec.facts() == parse_prompt(caption)
        assert sorted(o.kind for o in scene.objects) == sorted(spec.kinds)  # every object described
        assert all(check_facts(scene_truth(scene), facts)), caption
        if spec.background:
            assert scene.background == spec.background


def test_relation_scenes_are_unambiguous() -> None:
    for scene, caption, _facts in _samples(3, 300, template="relation"):
        spec = parse_caption(caption)
        a, b = scene.objects
        horizontal = spec.relation in ("left_of", "right_of")
        along, across = (b.cx - a.cx, b.cy - a.cy) if horizontal else (b.cy - a.cy, b.cx - a.cx)
        assert abs(along) >= (a.size + b.size) / 2 + world.RELATION_GAP
        assert abs(across) <= world.RELATION_SLACK
        assert (along > 0) == (spec.relation in ("left_of", "above")), caption


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_is_sampled_and_matched(template: str) -> None:
    samples = _samples(4, 100, template=template)
    assert {parse_caption(c).template for _, c, _ in samples} == {template}
    named = [parse_caption(c).background is not None for _, c, _ in samples]
    assert 0 < sum(named) < len(named)  # the background clause is optional
    for scene, caption, facts in samples:
        assert all(check_facts(scene_truth(scene), facts)), caption


def test_default_sampling_covers_all_templates_counts_relations_and_colours() -> None:
    specs = [parse_caption(c) for _, c, _ in _samples(5, 500)]
    assert {s.template for s in specs} == set(TEMPLATES)
    assert {s.count for s in specs} == {1, 2, 3}
    assert {s.relation for s in specs if s.relation} == {"left_of", "right_of", "above", "below"}
    assert {k.color for s in specs for k in s.kinds} == set(OBJECT_COLORS)
    assert {s.background for s in specs} == {None, *BACKGROUND_COLORS}
    with pytest.raises(ValueError, match="unknown template"):
        world.sample_scene_and_caption(np.random.default_rng(0), template="grid")


def test_background_clauses_can_be_forced() -> None:
    assert all(parse_caption(c).background for _, c, _ in _samples(6, 50, background_clause=True))
    assert not any(parse_caption(c).background for _, c, _ in _samples(6, 50, background_clause=False))


def test_scene_for_prompt_satisfies_any_caption_of_the_space() -> None:
    rng = np.random.default_rng(9)
    prompts = all_prompts()[::7]  # ~1150 captions spread over every template
    scenes = [world.scene_for_prompt(p, rng) for p in prompts]
    for prompt, scene in zip(prompts, scenes):
        assert all(check_facts(scene_truth(scene), parse_prompt(prompt))), prompt
    a = world.scene_for_prompt("two red circles", np.random.default_rng(1))
    assert a == world.scene_for_prompt("two red circles", np.random.default_rng(1))
    with pytest.raises(ValueError, match="a photo of a cat"):
        world.scene_for_prompt("a photo of a cat", rng)


def test_exclude_heldout_never_samples_a_heldout_caption() -> None:
    specs = [parse_caption(c) for _, c, _ in _samples(10, 400, exclude_heldout=True)]
    assert not any(s.heldout_reason() for s in specs)


# -- grammar ----------------------------------------------------------------------------------------


def test_parse_prompt_facts() -> None:
    red_circle, blue_square = Kind("red", "circle"), Kind("blue", "square")
    assert parse_prompt("a red circle") == [Exists(red_circle), Total(1)]
    assert parse_prompt("two blue squares on a gray background") == [
        Exists(blue_square), Count(blue_square, 2), Total(2), Background("gray")]
    assert parse_prompt("a red circle left of a blue square") == [
        Exists(red_circle), Exists(blue_square), Relation(red_circle, "left_of", blue_square), Total(2)]
    assert parse_prompt("  An ORANGE triangle   below a white circle. ") == [
        Exists(Kind("orange", "triangle")), Exists(Kind("white", "circle")),
        Relation(Kind("orange", "triangle"), "below", Kind("white", "circle")), Total(2)]
    assert str(Relation(red_circle, "above", blue_square)) == "above(red circle, blue square)"


def test_parse_round_trips_over_the_whole_caption_space() -> None:
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 8046
    for p in prompts:
        spec = parse_caption(p)
        assert spec.caption() == p
        assert parse_caption(p.upper() + ".") == spec
    assert {parse_caption(p).template for p in all_prompts(("count",))} == {"count"}
    n_plain = 24 + 24 * 2 + 24 * 23 * 4  # single, count (two/three), relation (ordered pairs x 4)
    assert len(all_prompts(with_background=False)) == len(all_specs(with_background=False)) == n_plain


@pytest.mark.parametrize("prompt, why", [
    ("a photo of a cat", "cannot parse"),
    ("a gray circle", "cannot parse"),  # gray is a background colour only
    ("four red circles", "cannot parse"),
    ("a red circle next to a blue square", "cannot parse"),
    ("a white circle on a white background", "unsatisfiable"),
    ("a red circle left of a red circle", "must differ"),
])
def test_unparseable_prompts_raise_a_clear_value_error(prompt: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        parse_prompt(prompt)
    assert repr(prompt) in str(info.value)
    assert isinstance(info.value, PromptParseError) and isinstance(info.value, InputError)


# -- splits and their files -------------------------------------------------------------------------


def test_splits_are_disjoint_and_sized() -> None:
    splits = split_prompts()
    assert tuple(splits) == SPLITS
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes["train"] >= 400
    assert all(50 <= sizes[k] <= 200 for k in SPLITS if k != "train"), sizes
    space = set(all_prompts())
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(splits[a]) & set(splits[b]), (a, b)
    for name, prompts in splits.items():
        assert len(prompts) == len(set(prompts)) and set(prompts) <= space
    assert {parse_caption(p).template for p in splits["train"]} == set(TEMPLATES)


def test_heldout_splits_hold_out_what_they_say() -> None:
    specs = split_specs()
    train_kinds = {(k.color, k.shape) for s in specs["train"] for k in s.kinds}
    assert not train_kinds & HELDOUT_COMBOS
    assert {c for c, _ in train_kinds} == set(OBJECT_COLORS)  # yet every colour and shape is trained
    assert all(any((k.color, k.shape) in HELDOUT_COMBOS for k in s.kinds) for s in specs["heldout-combos"])
    train_counts = {(s.count, s.subject.shape) for s in specs["train"] if s.template == "count"}
    assert not train_counts & HELDOUT_COUNTS and {n for n, _ in train_counts} == {2, 3}
    assert all((s.count, s.subject.shape) in HELDOUT_COUNTS for s in specs["heldout-counts"])
    train_rel = {(s.relation, s.subject.shape) for s in specs["train"] if s.template == "relation"}
    assert not train_rel & HELDOUT_RELATIONS
    assert all((s.relation, s.subject.shape) in HELDOUT_RELATIONS for s in specs["heldout-relations"])
    assert all(s.heldout_reason() is None for s in specs["train"])


def test_bundled_split_files_equal_the_generator(tmp_path) -> None:
    folder = resources.files("rlbench.benchmarks").joinpath("prompts")
    for split in SPLITS:
        text = folder.joinpath(split_file_name(split)).read_text(encoding="utf-8")
        assert text == split_file_text(split), (
            f"{split_file_name(split)} is stale: regenerate with "
            "python -c 'from rlbench.shapes.grammar import write_split_files; write_split_files()'")
    written = write_split_files(tmp_path)
    assert [p.read_text(encoding="utf-8") for p in written] == [split_file_text(s) for s in SPLITS]


def test_prompt_set_factories() -> None:
    splits = split_prompts()
    factories = {"train": shapes_train, "heldout-combos": shapes_heldout_combos,
                 "heldout-counts": shapes_heldout_counts, "heldout-relations": shapes_heldout_relations}
    for split, factory in factories.items():
        ps = factory()
        assert ps.name == f"shapes-{split}" and ps.prompts == splits[split] and ps.description
        assert ps.metadata == [{"template": parse_caption(p).template, "split": split} for p in ps.prompts]
    with pytest.raises(ValueError, match="unknown shapes split"):
        shapes_split("test")


def test_demo_set_is_eight_training_prompts_of_every_template() -> None:
    demo, train = shapes_demo(), shapes_train()
    assert len(demo) == len(set(demo.prompts)) == 8 and set(demo.prompts) <= set(train.prompts)
    assert {m["template"] for m in demo.metadata} == {"single", "count", "relation"}
    assert demo.metadata == [{"template": parse_caption(p).template, "split": "train"} for p in demo.prompts]
