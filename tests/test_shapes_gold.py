"""The shapes-world gold analyser and the ``shapes-gold`` reward plugin."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlbench.checker import check_reward
from rlbench.errors import InputError
from rlbench.reward import CheckedReward, reward_card
from rlbench.rewards.shapes_gold import ShapesGold
from rlbench.shapes import world
from rlbench.shapes.analyser import (
    MIN_OBJECT_AREA,
    analyse,
    analyse_batch,
    check_facts,
    gold_score,
    gold_scores,
    scene_truth,
)
from rlbench.shapes.grammar import parse_prompt
from rlbench.shapes.vocab import PALETTE

N_SCENES = 1500  # fresh renders for the agreement measurements (>= 1000)
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def renders():
    """N_SCENES fresh renders, their captions and scenes, plus the analyser's reading of them."""
    images, captions, scenes = world.sample_batch(np.random.default_rng(2024), N_SCENES)
    return images, captions, scenes, analyse_batch(images)


def _agreement(parsed, scenes, captions) -> float:
    """Fraction of the captions' facts on which the analysed image and the scene's truth agree."""
    agree = total = 0
    for p, scene, caption in zip(parsed, scenes, captions):
        facts = parse_prompt(caption)
        got, truth = check_facts(p, facts), check_facts(scene_truth(scene), facts)
        agree += sum(g == t for g, t in zip(got, truth))
        total += len(facts)
    return agree / total


def test_analyser_agrees_with_the_ground_truth_on_fresh_renders(renders) -> None:
    images, captions, scenes, parsed = renders
    matched = _agreement(parsed, scenes, captions)
    # Another scene's caption: a mix of true and false facts, so both kinds of error are measured.
    others = captions[1:] + captions[:1]
    mismatched = _agreement(parsed, scenes, others)
    print(f"\nanalyser fact agreement on {N_SCENES} renders: own captions {matched:.4f}, "
          f"other captions {mismatched:.4f}")
    assert matched >= MIN_AGREEMENT and mismatched >= MIN_AGREEMENT


def test_analyser_recovers_renders_exactly(renders) -> None:
    _, _, scenes, parsed = renders
    exact = 0
    for p, scene in zip(parsed, scenes):
        truth = scene_truth(scene)
        exact += (p.background == truth.background
                  and Counter(o[:2] for o in p.objects) == Counter(o[:2] for o in truth.objects)
                  and sorted(p.objects) == sorted(truth.objects))  # centroids, boxes, areas too
    assert exact / len(scenes) >= MIN_AGREEMENT, exact / len(scenes)


def test_mismatched_captions_score_far_lower(renders) -> None:
    images, captions, _, _ = renders
    own = gold_scores(images, captions)
    other = gold_scores(images, captions[7:] + captions[:7])
    print(f"\ngold on own captions {own.mean():.4f}, on other captions {other.mean():.4f}")
    assert own.mean() >= MIN_AGREEMENT
    assert other.mean() <= 0.4 and own.mean() - other.mean() >= 0.5
    assert ((0 <= other) & (other <= 1)).all()


def test_gold_score_of_hand_made_scenes() -> None:
    def obj(shape, color, x0, y0, size=10):
        return world.Obj(shape, color, x0 + size / 2, y0 + size / 2, size)

    scene = world.Scene("black", (obj("circle", "red", 2, 11), obj("square", "blue", 20, 11)))
    image = world.render(scene)
    assert gold_score(image, "a red circle left of a blue square on a black background") == 1.0
    assert gold_score(image, "a blue square right of a red circle") == 1.0
    assert gold_score(image, "a red circle right of a blue square") == 0.75  # only the relation fails
    assert gold_score(image, "a red circle") == 0.5  # exists, but total=1 fails
    assert gold_score(image, "two red circles") == pytest.approx(2 / 3)  # the count fails
    assert gold_score(image, "a green triangle on a white background") == 0.0
    assert gold_score(image.astype(np.float32) / 255, "a red circle above a blue square") == 0.75
    three = world.Scene("gray", tuple(obj("triangle", "yellow", x, 2, size=8) for x in (1, 12, 23)))
    assert gold_score(world.render(three), "three yellow triangles on a gray background") == 1.0
    assert gold_score(world.render(three), "two yellow triangles") == pytest.approx(1 / 3)


def test_noise_specks_and_off_palette_pixels_are_ignored() -> None:
    image = world.render(world.Scene("white", (world.Obj("square", "red", 16.0, 16.0, 10),)))
    image[0:3, 0:3] = PALETTE["blue"]  # a 9-px speck: below MIN_OBJECT_AREA
    image[28:32, 0:4] = (200, 100, 150)  # off-palette: belongs to nothing
    assert 9 < MIN_OBJECT_AREA
    parsed = analyse(image)
    assert parsed.background == "white" and [o[:2] for o in parsed.objects] == [("square", "red")]
    nothing = analyse(np.full((32, 32, 3), (200, 100, 150), np.uint8))
    assert nothing.background is None and nothing.objects == []
    assert gold_score(np.full((32, 32, 3), 255, np.uint8), "a red circle on a white background") == 1 / 3


def test_touching_or_elongated_blobs_match_no_shape() -> None:
    """Two touching red squares are one 20x10 component: shape "other", which no caption matches."""
    squares = tuple(world.Obj("square", "red", cx, 16.0, 10) for cx in (11.0, 21.0))
    pair = world.Scene("white", squares)
    parsed = analyse(world.render(pair))
    assert [(o.shape, o.bbox) for o in parsed.objects] == [("other", (6, 11, 26, 21))]
    assert gold_score(world.render(pair), "two red squares") == 0.0


def _box_blur(images: np.ndarray) -> np.ndarray:
    pad = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(pad[:, dy:dy + 32, dx:dx + 32] for dy in range(3) for dx in range(3)) / 9
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _noisy(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)


def test_gold_degrades_gracefully_on_noisy_and_blurred_renders(renders) -> None:
    images, captions, _, _ = renders
    images, captions = images[:500], captions[:500]
    clean = gold_scores(images, captions).mean()
    light_noise = gold_scores(_noisy(images, 10), captions).mean()
    heavy_noise = gold_scores(_noisy(images, 40), captions).mean()
    blurred = gold_scores(_box_blur(images), captions).mean()
    static = np.random.default_rng(1).integers(0, 256, images.shape, dtype=np.uint8)
    random = gold_scores(static, captions).mean()
    print(f"\ngold: clean {clean:.3f}, noise sd 10 {light_noise:.3f}, sd 40 {heavy_noise:.3f}, "
          f"3x3 box blur {blurred:.3f}, uniform noise {random:.3f}")
    assert clean == 1.0 and light_noise >= 0.98
    assert 0.8 <= blurred < clean
    assert random < 0.2 < heavy_noise < blurred


# -- the reward plugin ------------------------------------------------------------------------------


def test_shapes_gold_passes_check_reward() -> None:
    check_reward(ShapesGold())
    check_reward(CheckedReward(ShapesGold(), "shapes-gold"))
    check_reward(ShapesGold(), image_size=32, batch_size=5, seed=3)


def test_shapes_gold_card() -> None:
    card = reward_card(ShapesGold())
    assert card.name == "shapes-gold" and card.version == "1" and card.score_range == "[0, 1]"
    assert card.higher_is_better and card.deterministic and card.summary and card.paper


def test_shapes_gold_scores_and_info(renders) -> None:
    images, captions, _, _ = renders
    x = torch.from_numpy(images[:8]).permute(0, 3, 1, 2).float() / 255
    out = ShapesGold()(x, captions[:8])
    assert out.scores.dtype == torch.float32 and out.scores.shape == (8,)
    assert torch.equal(out.scores, torch.ones(8))
    assert out.info["facts"][0] == {str(f): True for f in parse_prompt(captions[0])}
    # Other sizes are area-resized to 32x32: a nearest upscale of a render scores as the render.
    for size in (64, 96):
        big = F.interpolate(x, size=(size, size), mode="nearest-exact")
        assert torch.equal(ShapesGold()(big, captions[:8]).scores, out.scores)
    wrong = ShapesGold()(x, captions[1:9]).scores
    np.testing.assert_allclose(wrong.numpy(), gold_scores(images[:8], captions[1:9]), rtol=0, atol=1e-6)


def test_shapes_gold_rejects_prompts_outside_the_world() -> None:
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputError, match="only understands shapes-world captions") as info:
        ShapesGold()(x, ["a red circle", "a photo of a cat"])
    assert "'a photo of a cat'" in str(info.value)
