"""The shapes world's aesthetic pair: the exact rule ``shapes-aesthetic-gold`` and its learned proxy
``shapes-aesthetic`` (shipped weights, training, differentiability, missing weights)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from rlbench.checker import check_reward
from rlbench.errors import WeightsNotAvailable
from rlbench.registry import make_reward
from rlbench.reward import reward_card
from rlbench.rewards.shapes_aesthetic import ShapesAesthetic, ShapesAestheticGold
from rlbench.shapes import aesthetic
from rlbench.shapes.train_proxies import main as train_main
from rlbench.shapes.train_proxies import train_aesthetic
from rlbench.shapes.world import Obj, Scene, render_batch, sample_batch
from rlbench.utils.stats import spearman

N_FRESH = 500
FRESH_SEED = 4242  # neither the training seed (0) nor the config's evaluation seed
MIN_SPEARMAN = 0.8  # documented floor; the shipped proxy measures ~0.92 on 2,000 fresh renders


def _tensor(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255


def _scenes(*scenes: Scene) -> torch.Tensor:
    return _tensor(render_batch(list(scenes)))


@pytest.fixture(scope="module")
def gold():
    return ShapesAestheticGold()


@pytest.fixture(scope="module")
def proxy():
    return ShapesAesthetic()


# -- contract -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shapes-aesthetic", "shapes-aesthetic-gold"])
@pytest.mark.parametrize("image_size", [32, 64])
def test_both_rewards_pass_check_reward(name, image_size) -> None:
    reward = make_reward(name)
    check_reward(reward, image_size=image_size)
    assert reward.card.name == name and reward.card.version == "1"


def test_cards() -> None:
    assert ShapesAesthetic.differentiable and not ShapesAestheticGold.differentiable
    assert ShapesAesthetic.deterministic and ShapesAestheticGold.deterministic
    assert ShapesAestheticGold.score_range == "[0, 1]"


# -- the gold rule --------------------------------------------------------------------------------------


def test_gold_hand_checked_scenes(gold) -> None:
    images = _scenes(
        Scene("black", (Obj("square", "white", 16, 16, 16),)),  # big, centred, max contrast: every term 1
        Scene("gray", (Obj("triangle", "purple", 5, 5, 8),)),  # small, in the corner, low contrast
        Scene("black", ()),  # no objects
        Scene("white", ()),
    )
    scores, info = gold(images, [""] * 4)
    assert scores.dtype == torch.float32
    assert scores[0] == pytest.approx(1.0)
    assert info["terms"][0] == pytest.approx({"centre": 1.0, "size": 1.0, "contrast": 1.0, "margin": 1.0})
    assert 0.0 < float(scores[1]) < 0.3
    assert scores[2] == 0.0 and scores[3] == 0.0


def test_gold_terms_by_hand(gold) -> None:
    # A 10 px white square centred at (21, 16) on black: 5 px off centre, 100 px, gap 6 px from the edges.
    _, info = gold(_scenes(Scene("black", (Obj("square", "white", 21, 16, 10),))), [""])
    t = info["terms"][0]
    assert t["centre"] == pytest.approx(np.exp(-25 / (2 * aesthetic.CENTRE_SIGMA**2)))
    assert t["size"] == pytest.approx(100 / aesthetic.AREA_CAP)
    assert t["contrast"] == 1.0 and t["margin"] == 1.0
    # Yellow on white: luma contrast 1 - L(yellow) ~ 0.14, a fraction of the cap.
    _, info = gold(_scenes(Scene("white", (Obj("square", "yellow", 16, 16, 10),))), [""])
    assert info["terms"][0]["contrast"] == pytest.approx((1 - aesthetic.LUMA["yellow"]) / aesthetic.CONTRAST_CAP)


def test_gold_prefers_centred_large_high_contrast_clear_of_edges(gold) -> None:
    def score(*objs, bg="black"):
        return float(gold(_scenes(Scene(bg, objs)), [""]).scores[0])

    centred = score(Obj("circle", "white", 16, 16, 12))
    assert score(Obj("circle", "white", 8, 8, 12)) < centred  # off centre
    assert score(Obj("circle", "white", 16, 16, 8)) < centred  # smaller
    assert score(Obj("circle", "red", 16, 16, 12)) < centred  # lower contrast on black
    assert score(Obj("circle", "white", 7, 16, 12)) < score(Obj("circle", "white", 9, 16, 12))  # nearer the edge
    # A symmetric pair is as centred as one object.
    pair = gold(_scenes(Scene("black", (Obj("square", "white", 10, 16, 10), Obj("square", "white", 22, 16, 10)))),
                [""])
    assert pair.info["terms"][0]["centre"] == pytest.approx(1.0)


def test_gold_maximisers_are_a_family_and_bounded(gold) -> None:
    """Score 1 for many different images; an over-large object turns into the background instead."""
    tops = _scenes(*[Scene("black", (Obj("square", c, 16, 16, s),)) for c in ("white", "yellow") for s in (16, 20, 22)],
                   *[Scene("white", (Obj("circle", c, 16, 16, d),)) for c in ("black", "red") for d in (18, 24)])
    assert torch.allclose(gold(tops, [""] * len(tops)).scores, torch.ones(len(tops)))
    too_big = gold(_scenes(Scene("black", (Obj("square", "white", 16, 16, 24),))), [""]).scores
    assert float(too_big[0]) < 0.9


def test_gold_ignores_the_prompt_and_is_in_range(gold) -> None:
    images, captions, _ = sample_batch(np.random.default_rng(1), 64)
    x = _tensor(images)
    a = gold(x, captions).scores
    b = gold(x, ["anything at all"] * 64).scores
    assert torch.equal(a, b)
    assert float(a.min()) > 0.0 and float(a.max()) <= 1.0
    assert np.allclose(a.numpy(), aesthetic.aesthetic_gold(images), atol=1e-6)


# -- the shipped proxy --------------------------------------------------------------------------------


def test_shipped_proxy_loads_strictly_and_matches_its_card(proxy) -> None:
    folder = aesthetic.shipped_folder()
    digest = hashlib.sha256((folder / aesthetic.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert digest == ShapesAesthetic.weights_spec.sha256
    model = proxy.model()
    config = json.loads((folder / aesthetic.CONFIG_FILE).read_text())
    assert aesthetic.n_params(model) == config["architecture"]["params"] < 100_000
    assert config["gold"]["version"] == ShapesAestheticGold.version
    assert MIN_SPEARMAN <= config["metrics"]["eval_spearman"] < 0.99


def test_shipped_proxy_rank_correlates_with_gold_on_fresh_renders(gold, proxy) -> None:
    images, captions, _ = sample_batch(np.random.default_rng(FRESH_SEED), N_FRESH)
    x = _tensor(images)
    g = gold(x, captions).scores.numpy()
    p = proxy(x, captions).scores.numpy()
    rho = spearman(p, g)
    print(f"\nshapes-aesthetic vs gold, Spearman on {N_FRESH} fresh renders: {rho:.4f}")
    assert rho >= MIN_SPEARMAN
    assert 0.0 < p.min() and p.max() < 1.0


def test_proxy_is_differentiable_and_chunked(proxy) -> None:
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    scores = proxy(x, [""] * 3).scores
    assert scores.requires_grad
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert grad.shape == x.shape and float(grad.abs().sum()) > 0
    with torch.no_grad():
        assert not proxy(x, [""] * 3).scores.requires_grad
    small = ShapesAesthetic(batch_size=2)
    assert torch.allclose(small(x.detach(), [""] * 3).scores, scores.detach(), atol=1e-6)


def test_proxy_area_resizes_without_quantising(proxy) -> None:
    images, _, _ = sample_batch(np.random.default_rng(3), 4)
    x = _tensor(images)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 2x nearest upscale
    assert torch.allclose(proxy(up, [""] * 4).scores, proxy(x, [""] * 4).scores, atol=1e-6)
    nudged = (x + 0.001).clamp(0, 1)  # below the uint8 step: the gold cannot see it, the proxy does
    assert not torch.equal(proxy(nudged, [""] * 4).scores, proxy(x, [""] * 4).scores)


# -- training and missing weights ---------------------------------------------------------------------


def test_training_runs_a_few_steps_and_writes_a_loadable_folder(tmp_path) -> None:
    metrics = train_aesthetic(tmp_path / "proxy", n_train=64, steps=3, n_eval=32, batch_size=16, log_every=0)
    assert {"eval_spearman", "eval_mse", "train_seconds"} <= set(metrics)
    reward = ShapesAesthetic(weights=tmp_path / "proxy")
    check_reward(reward)
    assert str(tmp_path / "proxy") in reward_card(reward).weights
    config = json.loads((tmp_path / "proxy" / "config.json").read_text())
    assert config["training"]["n_train"] == 64 and config["metrics"] == metrics


def test_training_cli(tmp_path, capsys) -> None:
    assert train_main(["aesthetic", "--out", str(tmp_path / "cli"), "--n-train", "32", "--steps", "2",
                       "--n-eval", "16"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert "eval_spearman=" in capsys.readouterr().out


def test_missing_weights_names_the_training_command(tmp_path) -> None:
    with pytest.raises(WeightsNotAvailable) as info:
        ShapesAesthetic(weights=tmp_path / "nowhere")
    assert "python -m rlbench.shapes.train_proxies aesthetic --out DIR" in str(info.value)
    with pytest.raises(WeightsNotAvailable):
        make_reward("shapes-aesthetic", weights=str(tmp_path))
