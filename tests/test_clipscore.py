"""``clipscore``: per-image CLIPScore on tiny seeded CLIP weights, checked against torchmetrics itself."""

from __future__ import annotations

import pytest
import torch
from helpers import block_network, empty_hf_cache, pil_image_processor

from rlbench.checker import check_reward
from rlbench.errors import ConfigError, WeightsNotAvailable
from rlbench.nets.clip import PixelSpec
from rlbench.registry import make_reward
from rlbench.rewards.clipscore import CLIPScore
from rlbench.testing import OPENAI_MEAN, OPENAI_STD, smooth_images, tiny_hf_clip

PROMPTS = ["a photo of a cat", "two red circles left of a blue square", "a " + "very long " * 100 + "prompt",
           "a photo of a cat", "an oil painting of a lighthouse at dusk", "x", "the word 'hello' in neon",
           "a bowl of soup"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    # torchmetrics only loads local folders whose name contains "openai" (clip_score.py
    # _get_clip_model_and_processor); the fixture mirrors the openai/clip-vit-* repo layout.
    return str(tiny_hf_clip(tmp_path_factory.mktemp("clipscore") / "openai-clip-tiny", projection_dim=16, seed=2))


@pytest.fixture(scope="module")
def reward(folder) -> CLIPScore:
    return CLIPScore(weights=folder)


def _torchmetrics(folder: str, pil: bool = True):
    """torchmetrics' CLIPScore on the folder. Two adaptations to transformers 5, neither touching the math:
    get_*_features' output object is unwrapped to its pooler_output (torchmetrics PR #3428 does the same),
    and with ``pil`` the processor's image part is the PIL one torchmetrics was written against
    (transformers 4's CLIPImageProcessor; transformers 5 defaults to a torchvision backend)."""
    from torchmetrics.multimodal import CLIPScore as TMCLIPScore

    metric = TMCLIPScore(model_name_or_path=folder)
    for name in ("get_image_features", "get_text_features"):
        fn = getattr(metric.model, name)
        setattr(metric.model, name, lambda *a, _fn=fn, **k: getattr(_fn(*a, **k), "pooler_output", None))
    if pil:
        metric.processor.image_processor = pil_image_processor(folder)
    return metric


def _per_image(metric, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    out = []
    for image, prompt in zip(images, prompts):
        metric.reset()
        metric.update((image * 255).round().to(torch.uint8), [prompt])  # uint8-range, as torchmetrics expects
        out.append(metric.compute().detach().float())
    return torch.stack(out)


# -- contract, card, options -------------------------------------------------------------------------


def test_check_reward_passes(folder, reward) -> None:
    check_reward(reward)
    check_reward(make_reward("clipscore", weights=folder, batch_size=2), batch_size=5, image_size=80)


def test_card() -> None:
    card = make_reward("clipscore").card
    assert card.name == "clipscore" and card.version == "1"
    assert card.higher_is_better and card.deterministic and card.differentiable
    assert card.weights == "openai/clip-vit-large-patch14" and card.license == "MIT"
    assert "[0, 100]" in card.score_range and "2104.08718" in card.paper
    assert CLIPScore.weights_spec.allow_patterns and "model.safetensors" in CLIPScore.weights_spec.allow_patterns
    assert not any(p.endswith((".bin", ".h5", ".msgpack")) for p in CLIPScore.weights_spec.allow_patterns)


@pytest.mark.parametrize("bad", [{"dtype": "fp8"}, {"batch_size": -1}, {"model": "x"}])
def test_bad_options_are_config_errors(bad) -> None:
    with pytest.raises(ConfigError):
        make_reward("clipscore", **bad)


# -- the score -----------------------------------------------------------------------------------------


def test_per_image_score_equals_torchmetrics(folder, reward) -> None:
    # plus a black image captioned "x": a negative cosine for this seed, so the clamp is exercised
    images = torch.cat([smooth_images(len(PROMPTS), (120, 90), seed=1), torch.zeros(1, 3, 120, 90)])
    prompts = PROMPTS + ["x"]
    out = reward(images, prompts)
    expected = _per_image(_torchmetrics(folder), images, prompts)
    torch.testing.assert_close(out.scores, expected, atol=2e-4, rtol=1e-5)
    assert (out.scores == 0).any() and (out.scores > 0).any()  # both sides of the clamp are exercised
    torch.testing.assert_close(out.info["unclamped"].clamp(min=0), out.scores, atol=1e-5, rtol=0)


def test_batch_value_of_torchmetrics_clamps_the_mean(folder, reward) -> None:
    """torchmetrics over a batch is max(mean(100 cos), 0): info['unclamped'] reproduces it; the mean of the
    per-image (clamped) rewards differs when some cosines are negative."""
    images = smooth_images(len(PROMPTS), 64, seed=1)
    out = reward(images, PROMPTS)
    metric = _torchmetrics(folder)
    metric.update((images * 255).round().to(torch.uint8), PROMPTS)
    batch_value = metric.compute().float()
    torch.testing.assert_close(out.info["unclamped"].mean().clamp(min=0), batch_value, atol=2e-4, rtol=1e-5)
    assert float(out.scores.mean()) >= float(batch_value) - 1e-4


def test_transformers5_default_processor_backend_is_close(folder, reward) -> None:
    images = smooth_images(4, 256, seed=3)
    expected = _per_image(_torchmetrics(folder, pil=False), images, PROMPTS[:4])
    torch.testing.assert_close(reward(images, PROMPTS[:4]).scores, expected, atol=0.5, rtol=0)


def test_long_prompts_are_cut_as_torchmetrics_cuts_them(reward) -> None:
    reward(smooth_images(1, 32), PROMPTS[:1])  # loads
    tokens = reward.tokenize(PROMPTS[:3])
    assert tokens["input_ids"].shape == (3, 77) and tokens["attention_mask"].shape == (3, 77)
    assert int(tokens["input_ids"][2, -1]) != 49407  # no end token re-appended: torchmetrics slices the ids
    # <|startoftext|> a photo of a cat <|endoftext|>, then padding (the openai tokenizer pads with <|endoftext|>)
    assert int(tokens["input_ids"][0, 6]) == 49407 and tokens["attention_mask"][0, :8].tolist() == [1] * 7 + [0]


def test_preprocessing_is_the_openai_processor(folder) -> None:
    spec = PixelSpec.from_folder(folder, "weights")
    assert spec == PixelSpec(224, tuple(OPENAI_MEAN), tuple(OPENAI_STD))
    images = smooth_images(2, (97, 260), seed=6)
    uint8 = list((images * 255).round().to(torch.uint8))
    expected = pil_image_processor(folder)(images=uint8, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(spec.exact(images), expected, atol=1e-6, rtol=0)


# -- batching and gradients ------------------------------------------------------------------------------


def test_batch_size_invariance_and_chunking(folder, reward) -> None:
    images = smooth_images(len(PROMPTS), 72, seed=7)
    ref = reward(images, PROMPTS).scores
    small = CLIPScore(weights=folder, batch_size=3)
    small(images[:1], PROMPTS[:1])
    rows = []
    hook = small._model.vision_model.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["pixel_values"].shape[0]), with_kwargs=True)
    try:
        got = small(images, PROMPTS).scores
    finally:
        hook.remove()
    assert rows == [3, 3, 2]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_differentiable_path(reward) -> None:
    images = smooth_images(4, 64, seed=8)
    x = images.clone().requires_grad_(True)
    out = reward(x, PROMPTS[:4]).scores
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()
    positive = out.detach() > 0
    assert positive.any() and (grad[positive].abs().sum() > 0)
    assert (grad[~positive] == 0).all()  # the clamp passes no gradient below 0
    torch.testing.assert_close(out.detach(), reward(images, PROMPTS[:4]).scores, atol=0.5, rtol=0)


# -- weights --------------------------------------------------------------------------------------------


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch) -> None:
    empty_hf_cache(monkeypatch, tmp_path)
    attempts = block_network(monkeypatch)
    r = make_reward("clipscore")
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download clipscore.*--reward-opt weights=PATH"):
        r(smooth_images(1, 32), ["a cat"])
    assert attempts == []


def test_folder_without_processor_files_is_named(tmp_path) -> None:
    bare = tiny_hf_clip(tmp_path / "bare", projection_dim=16, tokenizer=False)
    with pytest.raises(WeightsNotAvailable, match="preprocessor_config.json"):
        CLIPScore(weights=str(bare))(smooth_images(1, 32), ["a cat"])
