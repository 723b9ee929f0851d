"""``pickscore``: PickScore v1 on tiny seeded CLIP weights, checked against the PickScore README's code."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from helpers import block_network, empty_hf_cache, pil_image_processor

from rlbench.checker import check_reward
from rlbench.errors import ConfigError, WeightsNotAvailable
from rlbench.nets.clip import PixelSpec
from rlbench.nets.preprocess import clip_pixels_exact
from rlbench.registry import make_reward
from rlbench.rewards.pickscore import PickScore
from rlbench.testing import (OPENAI_MEAN, OPENAI_STD, PREPROCESSOR_CONFIG, smooth_images, tiny_clip_processor,
                             tiny_hf_clip)

PROMPTS = ["a photo of a cat", "two red circles left of a blue square", "a " + "very long " * 100 + "prompt",
           "a photo of a cat", "an oil painting of a lighthouse at dusk"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickscore")
    model = tiny_hf_clip(root / "PickScore_v1", projection_dim=16, seed=1, tokenizer=False)
    # LAION's tokenizer pads with "!" (id 0), as open_clip; its config.json makes AutoProcessor a CLIPProcessor
    processor = tiny_clip_processor(root / "CLIP-ViT-H-14-laion2B-s32B-b79K", pad_token="!")
    return {"weights": str(model), "processor": str(processor)}


@pytest.fixture(scope="module")
def reward(folders) -> PickScore:
    return PickScore(**folders)


def _readme_scores(folders, images, prompts, backend="pil"):
    """PickScore README "Inference with PickScore", one prompt and its image at a time (transformers 5
    returns an output object from get_*_features: its pooler_output is the projected embedding)."""
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(folders["processor"], backend=backend)
    model = CLIPModel.from_pretrained(folders["weights"]).eval()
    pil = [Image.fromarray(a) for a in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    out = []
    with torch.no_grad():
        for image, prompt in zip(pil, prompts):
            image_inputs = processor(images=[image], padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            image_embs = getattr(image_embs, "pooler_output", image_embs)
            image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = getattr(text_embs, "pooler_output", text_embs)
            text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
            out.append((model.logit_scale.exp() * (text_embs @ image_embs.T)[0])[0])
    return torch.stack(out)


# -- contract, card, options -------------------------------------------------------------------------


def test_check_reward_passes(folders, reward) -> None:
    check_reward(reward)
    check_reward(make_reward("pickscore", batch_size=2, **folders), batch_size=5, image_size=96)


def test_card() -> None:
    card = make_reward("pickscore").card  # construction loads nothing
    assert card.name == "pickscore" and card.version == "1"
    assert card.higher_is_better and card.deterministic and card.differentiable
    assert "yuvalkirstain/PickScore_v1" in card.weights and "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in card.weights
    assert "2305.01569" in card.paper and "logit_scale" in card.score_range and "MIT" in card.license
    model_spec, proc_spec = PickScore.weights_spec
    assert (model_spec.option, proc_spec.option) == ("weights", "processor")
    assert model_spec.allow_patterns == ("config.json", "model.safetensors")  # not the duplicate .bin
    assert {"config.json", "preprocessor_config.json", "tokenizer.json"} <= set(proc_spec.allow_patterns)
    assert not any(
        p.endswith((".bin", ".safetensors")) for p in proc_spec.allow_patterns)  # not LAION's CLIP-H weights


def test_card_names_the_weights_in_use(folders, reward) -> None:
    assert folders["weights"] in make_reward("pickscore", **folders).card.weights
    assert [s.source for s in reward.weights_in_use] == [folders["weights"], folders["processor"]]


@pytest.mark.parametrize("bad", [{"dtype": "float64"}, {"batch_size": 0}, {"device": "nonsense"}, {"colour": 1}])
def test_bad_options_are_config_errors(bad) -> None:
    with pytest.raises(ConfigError):
        make_reward("pickscore", **bad)


# -- the score -----------------------------------------------------------------------------------------


def test_score_equals_the_readme_computation(folders, reward) -> None:
    images = smooth_images(5, (131, 97), seed=2)  # non-square, odd crop offsets
    out = reward(images, PROMPTS)
    expected = _readme_scores(folders, images, PROMPTS)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (5,)
    torch.testing.assert_close(out.scores, expected, atol=2e-4, rtol=1e-5)
    scale = torch.tensor(4.0).exp()  # the fixture's logit_scale
    torch.testing.assert_close(out.info["cosine"] * scale, out.scores, atol=1e-4, rtol=1e-5)


def test_transformers5_default_processor_backend_is_close(folders, reward) -> None:
    """transformers 5's torchvision processor resizes slightly differently from the PIL one rlbench matches."""
    images = smooth_images(4, 256, seed=3)
    tv = _readme_scores(folders, images, PROMPTS[:4], backend="torchvision")
    torch.testing.assert_close(reward(images, PROMPTS[:4]).scores, tv, atol=0.1, rtol=0)


def test_text_is_truncated_to_77_tokens_keeping_the_end_token(reward, folders) -> None:
    reward(smooth_images(1, 64), PROMPTS[:1])  # loads
    ids = reward.tokenize(PROMPTS[1:3])["input_ids"]
    assert ids.shape == (2, 77)
    assert int(ids[1, -1]) == 49407 and int(ids[0, 0]) == 49406  # <|endoftext|> kept, <|startoftext|> first
    assert int(ids[0, -1]) == 0  # LAION's processor pads with "!" (id 0)


def test_preprocessing_constants_follow_the_processor_config(folders) -> None:
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    spec = PixelSpec.from_folder(folders["processor"], "processor")
    assert spec == PixelSpec(224, tuple(OPENAI_MEAN), tuple(OPENAI_STD))
    assert spec.mean == tuple(OPENAI_CLIP_MEAN) and spec.std == tuple(OPENAI_CLIP_STD)
    assert PREPROCESSOR_CONFIG["resample"] == Image.BICUBIC == 3


def test_exact_pixels_are_the_pil_processors(folders) -> None:
    spec = PixelSpec.from_folder(folders["processor"], "processor")
    images = smooth_images(3, (225, 301), seed=4)  # (301 - 224) / 2 = 38.5: floor crop (HF), not round
    uint8 = [torch.from_numpy(a) for a in (images * 255).round().to(torch.uint8).numpy()]
    pil = pil_image_processor(folders["processor"])
    expected = pil(images=uint8, return_tensors="pt")["pixel_values"]
    assert expected.shape == (3, 3, 224, 224)
    torch.testing.assert_close(spec.exact(images), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(clip_pixels_exact(images, hf=False), expected)  # the test sees the crop offset
    # the differentiable float path differs by resampling only
    assert float((spec.differentiable(images) - expected).abs().mean()) < 0.02


@pytest.mark.parametrize("change, match", [({"resample": 2}, "resample"), ({"crop_size": 200}, "crop_size"),
                                            ({"do_center_crop": False}, "do_center_crop")])
def test_unsupported_processor_configs_raise(tmp_path, change, match) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR_CONFIG, **change}))
    with pytest.raises(ConfigError, match=match):
        PixelSpec.from_folder(tmp_path, "processor")


def test_new_style_processor_config_parses(tmp_path) -> None:
    cfg = {**PREPROCESSOR_CONFIG, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert PixelSpec.from_folder(tmp_path, "processor").size == 224


# -- batching -------------------------------------------------------------------------------------------


def test_batch_size_invariance_and_chunked_forwards(folders, reward) -> None:
    images = smooth_images(5, 80, seed=5)
    ref = reward(images, PROMPTS).scores
    small = PickScore(batch_size=2, **folders)
    small(images[:1], PROMPTS[:1])  # load
    text_rows, image_rows = [], []
    hooks = [
        small._model.text_model.register_forward_pre_hook(
            lambda m, a, kw: text_rows.append(kw["input_ids"].shape[0]), with_kwargs=True),
        small._model.vision_model.register_forward_pre_hook(
            lambda m, a, kw: image_rows.append(kw["pixel_values"].shape[0]), with_kwargs=True),
    ]
    try:
        got = small(images, PROMPTS).scores
    finally:
        for h in hooks:
            h.remove()
    assert text_rows == [2, 2] and image_rows == [2, 2, 1]  # 4 distinct prompts, 5 images
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reward(images[1:4], PROMPTS[1:4]).scores, ref[1:4], atol=1e-4, rtol=1e-5)


def test_bfloat16_runs_and_returns_float32(folders) -> None:
    images = smooth_images(3, 64, seed=6)
    ref = PickScore(**folders)(images, PROMPTS[:3]).scores
    half = PickScore(dtype="bfloat16", **folders)(images, PROMPTS[:3]).scores
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, atol=1.5, rtol=0)  # bf16 has ~3 significant digits


# -- gradients ------------------------------------------------------------------------------------------


def test_differentiable_path_gives_pixel_gradients(reward) -> None:
    images = smooth_images(3, 64, seed=7)
    x = images.clone().requires_grad_(True)
    scores = reward(x, PROMPTS[:3]).scores
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    exact = reward(images, PROMPTS[:3]).scores
    torch.testing.assert_close(scores.detach(), exact, atol=0.2, rtol=0)  # resampling differences only
    with torch.no_grad():  # no grad mode: the exact path even for images that require grad
        torch.testing.assert_close(reward(x, PROMPTS[:3]).scores, exact)
    assert not any(p.requires_grad for p in reward._model.parameters())


# -- weights --------------------------------------------------------------------------------------------


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch) -> None:
    empty_hf_cache(monkeypatch, tmp_path)
    attempts = block_network(monkeypatch)
    r = make_reward("pickscore")  # constructs offline
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download pickscore") as info:
        r(smooth_images(1, 32), ["a cat"])
    assert "yuvalkirstain/PickScore_v1" in str(info.value) and "--reward-opt weights=PATH" in str(info.value)
    assert attempts == []


def test_missing_processor_names_its_option(tmp_path, monkeypatch, folders) -> None:
    empty_hf_cache(monkeypatch, tmp_path)
    with pytest.raises(WeightsNotAvailable, match=r"laion/CLIP-ViT-H-14-laion2B-s32B-b79K.*--reward-opt processor=PATH"):
        PickScore(weights=folders["weights"])(smooth_images(1, 32), ["a cat"])


def test_bin_fallback_loads_the_same_model(tmp_path, folders, reward) -> None:
    tiny_hf_clip(tmp_path / "bin", projection_dim=16, seed=1, tokenizer=False, safetensors=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    images = smooth_images(2, 64, seed=8)
    torch.testing.assert_close(PickScore(weights=str(tmp_path / "bin"), processor=folders["processor"])(
        images, PROMPTS[:2]).scores, reward(images, PROMPTS[:2]).scores)


def test_weights_that_do_not_fit_the_config_raise(tmp_path, folders) -> None:
    bad = tiny_hf_clip(tmp_path / "bad", projection_dim=16, seed=1, tokenizer=False)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["projection_dim"] = 24
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsNotAvailable, match="do not match"):
        PickScore(weights=str(bad), processor=folders["processor"])(smooth_images(1, 32), ["a cat"])
    from safetensors.torch import load_file, save_file

    partial = tiny_hf_clip(tmp_path / "partial", projection_dim=16, seed=1, tokenizer=False)
    state = load_file(partial / "model.safetensors")
    del state["visual_projection.weight"]
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsNotAvailable, match="missing keys: visual_projection.weight"):
        PickScore(weights=str(partial), processor=folders["processor"])(smooth_images(1, 32), ["a cat"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotAvailable, match="not a transformers CLIPModel folder"):
        PickScore(weights=str(empty), processor=folders["processor"])(smooth_images(1, 32), ["a cat"])
