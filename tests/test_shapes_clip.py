"""``shapes-clip``: the learned CLIP-style proxy reward of the shapes world, and its training script."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlbench.checker import check_reward
from rlbench.errors import WeightsNotAvailable
from rlbench.registry import make_reward
from rlbench.reward import reward_card
from rlbench.rewards import shapes_clip as shapes_clip_module
from rlbench.rewards.shapes_clip import ShapesCLIP
from rlbench.shapes import clip_train
from rlbench.shapes.clip_train import agreement_pairs, prompt_pool, shipped_clip, uint8_to_float
from rlbench.utils.stats import spearman

# Floor of the rank correlation with shapes-gold on CORRELATION_PAIRS fresh pairs (half the prompts
# the image's own caption, half another caption of the pool). The shipped weights measure ~0.86
# (train prompts) and ~0.84 (held-out) on 2,000 pairs (metrics.json): the floor leaves room for
# sampling noise of 300 pairs but fails a proxy that has stopped following its prompts.
CORRELATION_PAIRS = 300
CORRELATION_SEED = 7
MIN_SPEARMAN_TRAIN = 0.7
MIN_SPEARMAN_HELDOUT = 0.6
MAX_WEIGHTS_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def reward() -> ShapesCLIP:
    return ShapesCLIP()


def _scorer(reward):
    return lambda images, prompts: reward(images, prompts).scores.numpy()


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with the projection (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# -- contract and card --------------------------------------------------------------------------------


def test_check_reward_passes_on_world_inputs_at_32_and_64_px(reward) -> None:
    check_reward(reward, image_size=32, batch_size=4)
    check_reward(reward)  # 64 x 64: area-resized to 32 x 32


def test_registered_and_card() -> None:
    r = make_reward("shapes-clip")
    check_reward(r)
    card = r.card
    assert card.name == "shapes-clip" and card.version == "1"
    assert card.deterministic and card.differentiable and card.higher_is_better
    assert "logit_scale" in card.score_range and "PickScore" in card.paper


def test_shipped_weights_are_a_small_hf_clip_folder_with_metrics() -> None:
    folder = shipped_clip()
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert total < MAX_WEIGHTS_BYTES, total
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == ShapesCLIP.weights_spec.sha256, "shipped weights changed: update the card's sha256 and bump version"
    metrics = json.loads((folder / "metrics.json").read_text())
    for split in ("train", "heldout"):
        assert 0.5 <= metrics["evaluation"][split]["spearman"] < 0.95
        assert metrics["evaluation"][split]["retrieval_top1"] > 0.5
    assert metrics["training"]["n_pairs"] <= 50_000


# -- the score ----------------------------------------------------------------------------------------


def test_score_is_logit_scale_times_cosine_of_the_raw_towers(reward) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    folder = shipped_clip()
    model = CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    images, prompts, _ = ShapesCLIP.example_inputs(batch_size=6, image_size=64, seed=3)
    with torch.no_grad():
        pixels = F.adaptive_avg_pool2d(images, 32) * 2 - 1  # area resize, [0, 1] -> [-1, 1]
        ids = tokenizer(prompts, padding="max_length", max_length=20, truncation=True, return_tensors="pt").input_ids
        img = _features(model.get_image_features(pixel_values=pixels))
        txt = _features(model.get_text_features(input_ids=ids))
        expected = model.logit_scale.exp() * F.cosine_similarity(img, txt, dim=-1)
    out = reward(images, prompts)
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.info["cosine"] * model.logit_scale.exp(), expected, atol=1e-4, rtol=1e-5)


def test_own_caption_scores_above_another_caption(reward) -> None:
    from rlbench.shapes.world import sample_batch

    images, captions, _ = sample_batch(np.random.default_rng(1), 12, exclude_heldout=True)
    x = uint8_to_float(images)
    others = captions[5:] + captions[:5]
    assert (reward(x, captions).scores > reward(x, others).scores).float().mean() >= 0.9


def test_batch_size_invariance(reward) -> None:
    images, prompts, _ = ShapesCLIP.example_inputs(batch_size=7, image_size=48, seed=5)
    ref = reward(images, prompts).scores
    for batch_size in (1, 3, 256):
        got = ShapesCLIP(batch_size=batch_size)(images, prompts).scores
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    # a score does not depend on its neighbours either
    torch.testing.assert_close(reward(images[2:5], prompts[2:5]).scores, ref[2:5], atol=1e-4, rtol=1e-5)


def test_prompts_are_encoded_once_each_and_images_in_chunks() -> None:
    r = ShapesCLIP(batch_size=4)
    images, captions, _ = ShapesCLIP.example_inputs(batch_size=10, seed=2)
    prompts = [captions[i % 3] for i in range(10)]
    assert len(set(prompts)) == 3
    ref = r(images, prompts).scores  # loads the model
    text_rows, image_rows = [], []
    hooks = [
        r._model.text_model.register_forward_pre_hook(
            lambda m, args, kw: text_rows.append(kw["input_ids"].shape[0]), with_kwargs=True),
        r._model.vision_model.register_forward_pre_hook(
            lambda m, args, kw: image_rows.append(kw["pixel_values"].shape[0]), with_kwargs=True),
    ]
    try:
        again = r(images, prompts).scores
    finally:
        for h in hooks:
            h.remove()
    assert text_rows == [3]  # one text forward, one row per distinct prompt
    assert image_rows == [4, 4, 2]
    torch.testing.assert_close(again, ref)
    # identical prompts score identically against identical images
    twice = r(images[:1].repeat(3, 1, 1, 1), [prompts[0]] * 3).scores
    assert torch.equal(twice, twice[:1].expand(3))


def test_other_image_sizes_are_area_resized_in_float(reward) -> None:
    images, prompts, _ = ShapesCLIP.example_inputs(batch_size=4, seed=4)
    up = F.interpolate(images, scale_factor=4, mode="nearest-exact")  # area-pooling maps it back exactly
    torch.testing.assert_close(reward(up, prompts).scores, reward(images, prompts).scores, atol=1e-4, rtol=1e-5)
    # no uint8 quantisation on this path: a sub-quantum change moves the score
    nudged = (images + 0.4 / 255 * (1 - 2 * images)).clamp(0, 1)
    assert not torch.equal(reward(nudged, prompts).scores, reward(images, prompts).scores)


def test_differentiable_wrt_the_image(reward) -> None:
    images, prompts, _ = ShapesCLIP.example_inputs(batch_size=3, image_size=64, seed=6)
    x = images.clone().requires_grad_(True)
    scores = reward(x, prompts).scores
    assert scores.requires_grad
    scores.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # one signed-gradient step raises the proxy score (what DDPO/gradient methods exploit)
    stepped = (images + 2 / 255 * x.grad.sign()).clamp(0, 1)
    with torch.no_grad():
        assert (reward(stepped, prompts).scores > scores.detach()).all()


def test_correlates_with_gold_on_fresh_pairs(reward) -> None:
    for split, floor in (("train", MIN_SPEARMAN_TRAIN), ("heldout", MIN_SPEARMAN_HELDOUT)):
        images, prompts, gold = agreement_pairs(prompt_pool(split), CORRELATION_PAIRS, CORRELATION_SEED)
        assert 0.3 < (gold >= 1).mean() < 0.7  # half own captions: the gold varies
        proxy = reward(uint8_to_float(images), prompts).scores.numpy()
        rho = spearman(proxy, gold)
        print(f"\nshapes-clip vs shapes-gold, {split} prompts, {CORRELATION_PAIRS} pairs: Spearman {rho:.3f}")
        assert rho >= floor, (split, rho)


def test_spearman_matches_a_hand_computation() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])


# -- training -----------------------------------------------------------------------------------------


def test_contrastive_loss_is_clip_loss_on_distinct_captions_and_handles_duplicates() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.t()
    labels = torch.arange(5)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(clip_train.contrastive_loss(img, txt, labels, scale), clip)
    # images 0 and 1 share caption 0: image -> text over 2 distinct captions, text -> image soft targets
    index = torch.tensor([0, 0, 1])
    logits = scale * img[:3] @ txt[:2].t()
    i2t = F.cross_entropy(logits, index)
    lp = logits.log_softmax(dim=0)
    t2i = (-(lp[0, 0] + lp[1, 0]) / 2 - lp[2, 1]) / 2
    torch.testing.assert_close(clip_train.contrastive_loss(img[:3], txt[:2], index, scale), (i2t + t2i) / 2)


def test_training_runs_a_few_steps_and_writes_a_loadable_folder(tmp_path) -> None:
    out = tmp_path / "clip"
    metrics = clip_train.train_clip(out, n_pairs=48, steps=2, batch_size=16, eval_pairs=0, log=None)
    assert metrics["training"]["steps"] == 2 and np.isfinite(metrics["training"]["final_loss"])
    assert json.loads((out / "metrics.json").read_text())["training"]["n_pairs"] == 48
    r = ShapesCLIP(weights=out)
    assert reward_card(r).weights.startswith(str(out))  # the card names the weights in use
    images, prompts, _ = ShapesCLIP.example_inputs(batch_size=3)
    scores = r(images, prompts).scores
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert float(r._model.logit_scale.exp()) <= 100.0


def test_missing_weights_name_the_training_command(tmp_path, monkeypatch) -> None:
    with pytest.raises(WeightsNotAvailable, match=r"python -m rlbench\.shapes\.clip_train --out"):
        ShapesCLIP(weights=tmp_path / "absent")
    with pytest.raises(WeightsNotAvailable, match="missing config.json"):
        make_reward("shapes-clip", weights=str(tmp_path))
    monkeypatch.setattr("rlbench.shapes.clip_train.shipped_clip", lambda: tmp_path / "not-installed")
    with pytest.raises(WeightsNotAvailable, match=r"not in this installation.*rlbench\.shapes\.clip_train"):
        ShapesCLIP()
