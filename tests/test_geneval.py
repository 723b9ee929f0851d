"""``geneval`` / ``geneval-partial`` (rewards/geneval.py): tiny random weights through the normal loading path
(check_reward); hand-worked GenEval cases end to end through the reward on real prompts of the GenEval file
(../shared/data) with an injected detector and colour classifier; the colour classifier against an independent
open_clip computation and its #999 crops; the Mask2Former adapter (label index -> GenEval name, boxes from masks);
the metadata and offline-weights errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import block_network, empty_hf_cache
from PIL import Image

from rlbench import suitedata
from rlbench.checker import check_output_contract, check_reward
from rlbench.errors import InputError, RewardContractError, WeightsNotAvailable
from rlbench.prompts import load_prompts
from rlbench.registry import make_reward
from rlbench.rewards.geneval import (ColorClassifier, GenEval, GenEvalPartial, Mask2FormerDetector,
                                     detections_from_instances, load_object_names)
from rlbench.rewards.geneval_rules import COLORS, Detection
from rlbench.testing import (TINY_OPEN_CLIP_NAME, smooth_images, tiny_mask2former, tiny_reward,
                             tiny_reward_options)
from rlbench.utils.images import to_uint8
from rlbench.weights import specs_of

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "geneval").is_dir(), reason="../shared/data is not on this machine")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("geneval-zoo")


@pytest.fixture(scope="module")
def opts(zoo) -> dict:
    return tiny_reward_options("geneval", zoo)


@pytest.fixture
def geneval(monkeypatch):
    """The real GenEval prompt set (553 records), read from the shared copy as CI has it."""
    if not (SHARED / "geneval").is_dir():
        pytest.skip("../shared/data is not on this machine")
    monkeypatch.setenv(suitedata.DATA_DIR_ENV, str(SHARED))
    return load_prompts("geneval")


def record(prompts, text: str) -> dict:
    (meta,) = [m for m in prompts.metadata if m["prompt"] == text]
    return dict(meta)


# -- injected parts -----------------------------------------------------------------------------------------


def det(x1, y1, x2, y2, score=0.95, colour=None):
    d = Detection((float(x1), float(y1), float(x2), float(y2)), score)
    if colour is not None:
        COLOUR_OF[id(d)] = colour
    return d


COLOUR_OF: dict[int, str] = {}  # id(detection) -> its colour (Detection compares by value)


class FakeDetector:
    """Answers preset detections per image (in call order) and records the images it was given."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def detect(self, images):
        self.seen.extend(images)
        return [self.answers.pop(0) for _ in images]


class FakeColours:
    """The colour preset for each detection (``det(..., colour=...)``); records its calls."""

    def __init__(self):
        self.calls = []

    def classify(self, image, detections, classname):
        self.calls.append((classname, len(detections)))
        return [COLOUR_OF[id(d)] for d in detections]


def score_both(metas, answers, size=(64, 80)):
    """Scores of GenEval and GenEvalPartial for the same preset detections (images of ``size`` H x W)."""
    images = smooth_images(len(metas), size, seed=1)
    prompts = [m["prompt"] for m in metas]
    a = GenEval(detector=FakeDetector(answers), color_classifier=FakeColours())(images, prompts, metas)
    b = GenEvalPartial(detector=FakeDetector(answers), color_classifier=FakeColours())(images, prompts, metas)
    return a.scores.tolist(), b.scores.tolist(), a, b


# -- tiny weights through the normal path ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["geneval", "geneval-partial"])
def test_tiny_weights_load_through_the_normal_path_and_pass_check_reward(name, zoo, opts):
    reward = tiny_reward(name, zoo)
    check_reward(reward)
    detector, colours = reward.reward._load()
    assert isinstance(detector, Mask2FormerDetector) and isinstance(colours, ColorClassifier)
    assert reward.card.weights == f"{opts['detector']} + {opts['clip']}"
    assert reward.card.license == "other; MIT"


def test_tiny_detector_finds_its_favoured_class_on_images_of_any_size(zoo, opts):
    # a tiny Mask2Former whose class head favours "dog" only: every image has dogs above 0.3, nothing else
    folder = tiny_mask2former(zoo / "dog-only", seed=1, favoured={"dog": 8.0})
    reward = make_reward("geneval", **{**opts, "detector": str(folder)})
    metas = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
             {"tag": "single_object", "include": [{"class": "giraffe", "count": 1}], "prompt": "a photo of a giraffe"}]
    for size in [(48, 80), (96, 64)]:
        out = reward(smooth_images(2, size, seed=3), [m["prompt"] for m in metas], metas)
        assert out.scores.tolist() == [1.0, 0.0]
        assert out.info["counts"][0]["dog"] >= 1 and "giraffe" not in out.info["counts"][1]
    detector = reward.reward._load()[0]
    image = Image.fromarray(to_uint8(smooth_images(1, (48, 80), seed=3))[0])
    found = detector.detect([image])[0]
    assert set(found) == {"dog"}
    for d in found["dog"]:
        assert d.mask.shape == (48, 80) and d.mask.dtype == bool
        ys, xs = np.nonzero(d.mask)  # the box is the mask's, with mmdet's +1 on x2, y2
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


# -- hand-worked GenEval cases end to end --------------------------------------------------------------------


def test_counting_with_its_exclude_clause(geneval):
    meta = record(geneval, "a photo of two clocks")
    assert meta["exclude"] == [{"class": "clock", "count": 3}]
    two = [det(0, 0, 10, 10), det(20, 0, 30, 10)]
    answers = [
        {"clock": two},                                       # exactly two
        {"clock": two + [det(40, 0, 50, 10)]},                # three: the exclude clause fails
        {"clock": two + [det(40, 0, 50, 10, score=0.85)]},    # the third is under the counting threshold 0.9
        {"clock": two[:1]},                                   # one
        {"clock": two + [det(40 + 20 * i, 0, 50 + 20 * i, 10) for i in range(3)]},  # five: 1 - 3/2 < 0
    ]
    official, partial, out, _ = score_both([meta] * 5, answers)
    assert official == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert partial == [1.0, 0.5, 1.0, 0.5, -0.5]  # Flow-GRPO ignores exclude; 1 - |n - N| / n over all N
    assert "expected clock<3, found 3" in out.info["reason"][1]


def test_colour(geneval):
    meta = record(geneval, "a photo of a blue fire hydrant")
    answers = [{"fire hydrant": [det(0, 0, 20, 30, colour="blue")]},
               {"fire hydrant": [det(0, 0, 20, 30, colour="red")]},
               # the colour of the most confident instance decides; the second is not classified
               {"fire hydrant": [det(0, 0, 20, 30, 0.6, colour="red"), det(30, 0, 50, 30, 0.9, colour="blue")]}]
    official, partial, out, partial_out = score_both([meta] * 3, answers)
    assert official == [1.0, 0.0, 1.0]
    # Flow-GRPO: count term 1, colour term 1 - |1 - hits| / 1; two hydrants: count term 0, colour term 0
    assert partial == [1.0, 0.5, 0.0]
    assert partial_out.info["strict"].tolist() == [1.0, 0.0, 0.0]
    assert partial_out.info["correct"].tolist() == official


def test_position(geneval):
    meta = record(geneval, "a photo of a dog right of a teddy bear")
    bear = det(100, 100, 140, 140)
    answers = [{"teddy bear": [bear], "dog": [det(180, 100, 220, 140)]},   # right of: correct
               {"teddy bear": [bear], "dog": [det(20, 100, 60, 140)]},     # left of
               {"teddy bear": [bear], "dog": [det(105, 100, 145, 140)]},   # overlapping: no relation
               {"dog": [det(180, 100, 220, 140)]}]                         # no target
    official, partial, out, _ = score_both([meta] * 4, answers, size=(256, 256))
    assert official == [1.0, 0.0, 0.0, 0.0]
    # Flow-GRPO's quirk: a failed position check appends 0 *and* 1: (1 + 1 + 0 + 1) / 4; no bear: (0 + 1 + 0) / 3
    assert partial == pytest.approx([1.0, 0.75, 0.75, 1 / 3])
    assert "expected dog right of target, found left of target" in out.info["reason"][1]
    assert "no target for dog to be right of" in out.info["reason"][3]


def test_two_object_and_threshold(geneval):
    meta = record(geneval, "a photo of a bench and a sports ball")
    bench, ball = det(0, 0, 30, 20), det(40, 0, 50, 10)
    answers = [{"bench": [bench], "sports ball": [ball]},
               {"bench": [bench]},
               {"bench": [bench], "sports ball": [det(40, 0, 50, 10, score=0.3)]},  # 0.3 is not > 0.3
               {"bench": [bench, det(60, 0, 90, 20)], "sports ball": [ball]}]       # two benches
    official, partial, _, _ = score_both([meta] * 4, answers)
    assert official == [1.0, 0.0, 0.0, 1.0]  # at least one of each
    assert partial == [1.0, 0.5, 0.5, 0.5]   # Flow-GRPO: exactly one of each (1 - 1/1 = 0 for two benches)


def test_colour_attribute_binding_classifies_each_class_once(geneval):
    meta = record(geneval, "a photo of a purple wine glass and a black apple")
    answers = [{"wine glass": [det(0, 0, 10, 30, colour="purple")], "apple": [det(20, 0, 40, 20, colour="black")]},
               {"wine glass": [det(0, 0, 10, 30, colour="purple")], "apple": [det(20, 0, 40, 20, colour="red")]}]
    colours = FakeColours()
    reward = GenEvalPartial(detector=FakeDetector(answers), color_classifier=colours)
    out = reward(smooth_images(2, 64), [meta["prompt"]] * 2, [meta] * 2)
    assert out.scores.tolist() == [1.0, 0.75] and out.info["correct"].tolist() == [1.0, 0.0]
    # GenEval's and Flow-GRPO's verdicts share one classification per (image, class)
    assert colours.calls == [("wine glass", 1), ("apple", 1)] * 2


def test_the_detector_sees_the_quantised_images_and_jpeg_quality_reproduces_flow_grpo_transport(geneval):
    meta = record(geneval, "a photo of a bench")
    images = smooth_images(1, (40, 56), seed=5)
    plain = FakeDetector([{}])
    GenEval(detector=plain, color_classifier=FakeColours())(images, [meta["prompt"]], [meta])
    expected = to_uint8(images)[0]
    assert plain.seen[0].size == (56, 40) and np.array_equal(np.asarray(plain.seen[0]), expected)
    jpeg = FakeDetector([{}])
    GenEvalPartial(detector=jpeg, color_classifier=FakeColours(), jpeg_quality=75)(images, [meta["prompt"]], [meta])
    buf = io.BytesIO()
    Image.fromarray(expected).save(buf, format="JPEG")  # flow_grpo/rewards.py geneval_score: PIL's default quality
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    got = np.asarray(jpeg.seen[0])
    assert np.array_equal(got, decoded) and not np.array_equal(got, expected)


def test_an_injected_detector_is_named_on_the_card():
    reward = make_reward("geneval", detector=FakeDetector([]), color_classifier=FakeColours())
    assert reward.card.version == "1+geneval-style-hf-mask2former+detector-FakeDetector"
    assert reward.card.weights == "python:FakeDetector + python:FakeColours"


# -- the colour classifier --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def independent_clip(opts):
    """The tiny open_clip checkpoint loaded without rlbench: open_clip's own model, tokenizer and eval transform."""
    import open_clip
    from safetensors.torch import load_file

    model = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None, force_quick_gelu=True)
    model.load_state_dict(load_file(opts["clip"]), strict=True)
    transform = open_clip.image_transform(224, is_train=False)
    return model.eval(), open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME), transform


def test_zero_shot_weights_equal_an_independent_computation(opts, independent_clip):
    model, tokenizer, _ = independent_clip
    classifier = GenEval(**opts)._load()[1]
    for cls in ("dog", "fire hydrant"):
        columns = []
        with torch.no_grad():
            for c in COLORS:
                texts = [f"a photo of a {c} {cls}", f"a photo of a {c}-colored {cls}", f"a photo of a {c} object"]
                e = model.encode_text(tokenizer(texts))
                e = (e / e.norm(dim=-1, keepdim=True)).mean(dim=0)
                columns.append(e / e.norm())
        torch.testing.assert_close(classifier.zero_shot_weights(cls), torch.stack(columns, dim=1), atol=1e-6, rtol=0)
    assert not torch.allclose(classifier.zero_shot_weights("dog"), classifier.zero_shot_weights("fire hydrant"))


def test_classification_is_the_argmax_over_masked_crops(opts, independent_clip):
    model, tokenizer, transform = independent_clip
    classifier = GenEval(**opts)._load()[1]
    image = Image.fromarray(to_uint8(smooth_images(1, (72, 96), seed=9))[0])
    dets = []
    for k in range(6):
        mask = np.zeros((72, 96), dtype=bool)
        mask[5 + 6 * k: 40 + 4 * k, 3 + 10 * k: 30 + 9 * k] = True
        dets.append(Detection((2.0 + 10 * k, 4.0 + 6 * k, 33.6 + 9 * k, 41.4 + 4 * k), 0.9, mask))
    grey = Image.new("RGB", image.size, (153, 153, 153))
    crops = [Image.composite(image, grey, Image.fromarray(d.mask)).crop(d.box) for d in dets]
    weights = classifier.zero_shot_weights("dog")
    with torch.no_grad():
        feats = model.encode_image(torch.stack([transform(c) for c in crops]))
    logits = 100 * (feats / feats.norm(dim=-1, keepdim=True)) @ weights
    got = classifier.classify(image, dets, "dog")
    assert got == [COLORS[i] for i in logits.argmax(dim=1).tolist()]


def test_crops_paste_the_instance_on_999_grey_and_cut_its_box():
    image = Image.new("RGB", (40, 30), (255, 0, 0))
    mask = np.zeros((30, 40), dtype=bool)
    mask[10:20, 10:20] = True
    d = Detection((5.0, 5.0, 25.4, 24.6), 0.9, mask)  # PIL rounds the box: (5, 5, 25, 25)
    classifier = ColorClassifier(None, None, None)
    crop = np.asarray(classifier.crops(image, [d])[0])
    assert crop.shape == (20, 20, 3)
    assert (crop[5:15, 5:15] == (255, 0, 0)).all()  # the instance
    assert (crop[:5] == (153, 153, 153)).all() and (crop[:, 15:] == (153, 153, 153)).all()  # #999 around it
    original = np.asarray(ColorClassifier(None, None, None, bgcolor="original").crops(image, [d])[0])
    assert (original == (255, 0, 0)).all()
    unmasked = np.asarray(classifier.crops(image, [Detection(d.box, 0.9, None)])[0])
    assert (unmasked == (255, 0, 0)).all()


# -- the Mask2Former adapter -------------------------------------------------------------------------------------


def test_labels_map_to_geneval_names_by_index_and_boxes_come_from_masks(monkeypatch):
    if not (SHARED / "geneval").is_dir():
        pytest.skip("../shared/data is not on this machine")
    monkeypatch.setenv(suitedata.DATA_DIR_ENV, str(SHARED))
    names = load_object_names()
    assert len(names) == 80 and names[64] == "computer mouse" and names[0] == "person"
    maps = torch.zeros(3, 30, 40)
    maps[0, 2:5, 3:9] = 1      # rows 2-4, columns 3-8
    maps[1, 10:30, 0:1] = 1
    maps[2, 7, 20] = 1
    info = [{"id": 0, "label_id": 64, "score": 0.91}, {"id": 1, "label_id": 0, "score": 0.42},
            {"id": 2, "label_id": 64, "score": 0.33}]
    found = detections_from_instances(maps, info, names)
    assert sorted(found) == ["computer mouse", "person"]
    mouse = found["computer mouse"]
    assert [d.score for d in mouse] == [0.91, 0.33]
    assert mouse[0].box == (3.0, 2.0, 9.0, 5.0) and mouse[1].box == (20.0, 7.0, 21.0, 8.0)
    assert found["person"][0].box == (0.0, 10.0, 1.0, 30.0)
    assert np.array_equal(mouse[0].mask, maps[0].numpy() > 0.5) and mouse[0].mask.dtype == bool
    assert detections_from_instances(torch.full((30, 40), -1.0), [], names) == {}  # nothing found


def test_the_adapter_asks_for_binary_maps_at_image_size_and_the_lower_threshold(opts, monkeypatch):
    names = load_object_names(opts["object_names"])
    detector = Mask2FormerDetector(opts["detector"], names, min_score=0.25, batch_size=2)
    calls = []

    def post(outputs, threshold, target_sizes, return_binary_maps):
        calls.append((threshold, list(target_sizes), return_binary_maps, outputs.class_queries_logits.shape[0]))
        maps = torch.zeros(1, *target_sizes[0])
        maps[0, 1:3, 2:6] = 1
        return [{"segmentation": maps, "segments_info": [{"id": 0, "label_id": 66, "score": 0.5}]}
                for _ in target_sizes]

    monkeypatch.setattr(detector.processor, "post_process_instance_segmentation", post)
    images = [Image.fromarray(a) for a in to_uint8(smooth_images(3, (24, 40), seed=2))]
    found = detector.detect(images)
    assert calls == [(0.25, [(24, 40), (24, 40)], True, 2), (0.25, [(24, 40)], True, 1)]
    assert len(found) == 3 and found[0]["computer keyboard"][0].box == (2.0, 1.0, 6.0, 3.0)
    # the reward builds its detector with the lower of its two thresholds
    reward = GenEval(**opts, threshold=0.4, counting_threshold=0.2)
    assert reward._load()[0].min_score == 0.2


# -- errors ------------------------------------------------------------------------------------------------------


def test_metadata_without_the_geneval_fields_is_one_clear_input_error(tmp_path, monkeypatch):
    empty_hf_cache(monkeypatch, tmp_path)
    reward = make_reward("geneval")  # no weights anywhere: the metadata check comes first
    with pytest.raises(InputError) as info:
        reward(smooth_images(2, 32), ["a cat", "a dog"], [{"tag": "single_object"}, {}])
    msg = str(info.value)
    assert "\n" not in msg and "GenEval prompts only" in msg and "'include'" in msg and "image 0" in msg
    assert "`rlbench prompts download geneval`" in msg and "prompt set `geneval`" in msg
    with pytest.raises(RewardContractError, match="GenEval prompts only"):  # what check_reward reports without them
        check_output_contract(reward, smooth_images(1, 32), ["a cat"], [{}])


def test_classes_outside_the_detector_names_are_refused(opts):
    meta = {"tag": "single_object", "include": [{"class": "mouse", "count": 1}], "prompt": "a photo of a mouse"}
    with pytest.raises(InputError, match="'mouse', not among the detector's 80 class names.*'computer mouse'"):
        make_reward("geneval", **opts)(smooth_images(1, 32), [meta["prompt"]], [meta])


def test_offline_without_weights_names_the_download_command(tmp_path, monkeypatch, opts, geneval):
    empty_hf_cache(monkeypatch, tmp_path)
    attempts = block_network(monkeypatch)
    meta = record(geneval, "a photo of a bench")
    for name in ("geneval", "geneval-partial"):
        with pytest.raises(WeightsNotAvailable, match=rf"rlbench rewards download {name}.*--reward-opt detector=PATH"):
            make_reward(name)(smooth_images(1, 32), [meta["prompt"]], [meta])
    with pytest.raises(WeightsNotAvailable, match=r"timm/vit_large_patch14_clip_224\.openai.*rlbench rewards download "
                                                  r"geneval.*--reward-opt clip=PATH") as info:
        make_reward("geneval", detector=opts["detector"])(smooth_images(1, 32), [meta["prompt"]], [meta])
    assert "\n" not in str(info.value)
    assert attempts == []


def test_the_card_says_geneval_style_and_declares_both_weights():
    for cls in (GenEval, GenEvalPartial):
        assert "GenEval-style (transformers Mask2Former), not the official mmdet weights" in cls.summary
        assert "geneval-style-hf-mask2former" in cls.version
        specs = specs_of(cls)
        assert [(s.source, s.filename, s.license, s.option) for s in specs] == [
            ("facebook/mask2former-swin-small-coco-instance", None, "other", "detector"),
            ("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors", "MIT", "clip")]
        assert not cls.differentiable and cls.deterministic
