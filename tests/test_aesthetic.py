"""``aesthetic``: the LAION aesthetic predictor v2 on a tiny seeded CLIP and a random head with the real shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from helpers import block_network, empty_hf_cache, pil_image_processor

from rlbench.checker import check_reward
from rlbench.errors import ConfigError, WeightsNotAvailable
from rlbench.registry import make_reward
from rlbench.rewards.aesthetic import MLP_SHA256, Aesthetic, AestheticMLP, load_mlp
from rlbench.testing import aesthetic_mlp_state_dict, smooth_images, tiny_hf_clip
from rlbench.weights import url_cache_path

PROMPTS = ["a photo of a cat", "", "a " + "very long " * 100 + "prompt", "x"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    clip = tiny_hf_clip(root / "clip-vit-large-patch14", projection_dim=768, seed=3)  # ViT-L/14's 768-d projection
    head = root / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(aesthetic_mlp_state_dict(seed=4), head)
    return {"weights": str(head), "clip": str(clip)}


@pytest.fixture(scope="module")
def reward(paths) -> Aesthetic:
    return Aesthetic(**paths)


# (H, W): 640x427 and its transpose (resized long side 335: offset 55.5, floored 55, rounded 56), 224x339
# (no resize; offset 57.5: 57 vs 58), 224x301 (offset 38.5: Python's round gives 38, as the floor; half-up
# would give 39), 768x512 (even offset 56), 160x224 (long side 224 -> 313), upscaling 100x150, square.
SHAPES = [(427, 640), (640, 427), (224, 339), (224, 301), (768, 512), (160, 224), (100, 150), (256, 256)]
DIFFERENT = {(427, 640), (640, 427), (224, 339)}  # the shapes where the two crop rules disagree
# OpenAI CLIP clip/clip.py _transform L85 (= HF OPENAI_CLIP_MEAN/STD)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _laion_pixels(images: torch.Tensor) -> torch.Tensor:
    """simple_inference.py's preprocess = OpenAI CLIP clip/clip.py _transform(224) (L79-86), from its
    definition: torchvision on the PIL image, Resize(224, BICUBIC) (short side), CenterCrop(224) (rounded
    offset), RGB, ToTensor, Normalize."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    preprocess = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                          lambda im: im.convert("RGB"), ToTensor(), Normalize(OPENAI_MEAN, OPENAI_STD)])
    return torch.stack([preprocess(Image.fromarray(a)) for a in _uint8(images)])


def _ddpo_pixels(images: torch.Tensor) -> torch.Tensor:
    """ddpo-pytorch's processor (transformers CLIPImageProcessor, PIL arithmetic), from its definition:
    short side to 224 with the long side int(224 * long / short) (image_transforms.get_resize_output_image_size),
    PIL bicubic resize, crop at the floored offset (image_transforms.center_crop), rescale 1/255, normalise."""
    out = []
    for a in _uint8(images):
        img = Image.fromarray(a)
        w, h = img.size
        size = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)  # (width, height)
        arr = np.asarray(img.resize(size, Image.BICUBIC), dtype=np.float32) / 255
        top, left = (arr.shape[0] - 224) // 2, (arr.shape[1] - 224) // 2
        arr = (arr[top : top + 224, left : left + 224] - np.float32(OPENAI_MEAN)) / np.float32(OPENAI_STD)
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


def _head(paths) -> nn.Module:
    mlp = nn.Sequential(  # improved-aesthetic-predictor simple_inference.py, ReLUs commented out as upstream
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    state = torch.load(paths["weights"], weights_only=True)
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return mlp.eval()


def _ddpo_pytorch_scores(paths, images: torch.Tensor) -> torch.Tensor:
    """ddpo-pytorch: rewards.py aesthetic_score quantises, aesthetic_scorer.py runs CLIPProcessor +
    CLIPModel.get_image_features, divides by the norm, applies the improved-aesthetic-predictor MLP."""
    from transformers import CLIPModel, CLIPProcessor

    mlp = _head(paths)
    clip = CLIPModel.from_pretrained(paths["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(paths["clip"])
    processor.image_processor = pil_image_processor(paths["clip"])  # transformers 4's (PIL) processor
    uint8 = (images * 255).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        inputs = processor(images=list(uint8), return_tensors="pt")
        embed = clip.get_image_features(**inputs)
        embed = getattr(embed, "pooler_output", embed)
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        return mlp(embed).squeeze(1)


def _laion_scores(paths, images: torch.Tensor) -> torch.Tensor:
    """simple_inference.py: preprocess, encode_image, numpy L2 normalisation (its ``normalized``), MLP; with
    the HF port of the CLIP (the OpenAI ``clip`` package is not a dependency) and the images as one batch
    (the script scores one; batching changes nothing but float rounding)."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(paths["clip"]).eval()
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=_laion_pixels(images))
        feats = getattr(feats, "pooler_output", feats).numpy()
        l2 = np.atleast_1d(np.linalg.norm(feats, 2, -1))
        l2[l2 == 0] = 1
        return _head(paths)(torch.from_numpy(feats / np.expand_dims(l2, -1))).squeeze(1)


# -- contract, card, options -------------------------------------------------------------------------


def test_check_reward_passes(paths) -> None:
    check_reward(make_reward("aesthetic", batch_size=2, **paths), batch_size=5, image_size=72)


def test_card_and_weight_sources() -> None:
    card = make_reward("aesthetic").card
    assert card.name == "aesthetic" and card.version == "1"
    assert card.higher_is_better and card.deterministic and card.differentiable
    assert "sac%2Blogos%2Bava1-l14-linearMSE.pth" in card.weights and "openai/clip-vit-large-patch14" in card.weights
    assert card.license == "Apache-2.0; MIT" and "2305.13301" in card.paper and "1-10" in card.score_range
    head, clip = Aesthetic.weights_spec
    assert head.source.startswith("https://github.com/christophschuhmann/improved-aesthetic-predictor/")
    assert head.sha256 == MLP_SHA256 == "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    assert (head.option, clip.option) == ("weights", "clip")
    assert url_cache_path(head).name == "sac%2Blogos%2Bava1-l14-linearMSE.pth"
    assert "model.safetensors" in clip.allow_patterns and "preprocessor_config.json" in clip.allow_patterns


def test_construction_loads_nothing(paths) -> None:
    r = Aesthetic(weights="/nowhere/head.pth", clip="/nowhere/clip")
    assert r._clip is None and [s.source for s in r.weights_in_use] == ["/nowhere/head.pth", "/nowhere/clip"]
    with pytest.raises(WeightsNotAvailable, match="neither an existing local path nor a hub id"):
        r(smooth_images(1, 32), ["a cat"])


@pytest.mark.parametrize("bad", [{"dtype": "half"}, {"batch_size": 1.5}, {"device": 3.5}])
def test_bad_options_are_config_errors(bad) -> None:
    with pytest.raises(ConfigError):
        make_reward("aesthetic", **bad)


# -- the head ------------------------------------------------------------------------------------------


def test_head_is_the_original_768_1024_128_64_16_1_without_activations() -> None:
    mlp = AestheticMLP()
    linears = [m for m in mlp.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [m.p for m in mlp.layers if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    assert all(isinstance(m, (nn.Linear, nn.Dropout)) for m in mlp.layers)  # no ReLU: an affine head
    assert sorted(mlp.state_dict()) == sorted(aesthetic_mlp_state_dict())
    assert sum(p.numel() for p in mlp.parameters()) == 927_969  # = the .pth file size / 4 (reference)


def test_head_with_other_shapes_or_keys_is_refused(tmp_path) -> None:
    small = tmp_path / "small.pth"
    torch.save(aesthetic_mlp_state_dict(in_dim=512), small)
    with pytest.raises(WeightsNotAvailable, match=r"768-1024-128-64-16-1.*layers\.0\.weight \(1024, 512\)"):
        load_mlp(small)
    relu = tmp_path / "relu.pth"  # ava+logos-l14-reluMSE.pth style keys (ReLUs shift the indices)
    state = aesthetic_mlp_state_dict()
    torch.save({k.replace("layers.7", "layers.8"): v for k, v in state.items()}, relu)
    with pytest.raises(WeightsNotAvailable, match="expected the keys"):
        load_mlp(relu)


def test_a_folder_holding_one_head_is_accepted(tmp_path, paths) -> None:
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "aesthetic-model.pth").write_bytes(open(paths["weights"], "rb").read())  # trl-lib's file name
    images = smooth_images(2, 64, seed=1)
    torch.testing.assert_close(Aesthetic(weights=str(folder), clip=paths["clip"])(images, PROMPTS[:2]).scores,
                               Aesthetic(**paths)(images, PROMPTS[:2]).scores)


def test_clip_with_another_projection_is_a_clear_error(tmp_path, paths) -> None:
    clip512 = tiny_hf_clip(tmp_path / "clip512", projection_dim=512)
    with pytest.raises(ConfigError, match="768-d OpenAI CLIP ViT-L/14 image embeddings.*512-d"):
        Aesthetic(weights=paths["weights"], clip=str(clip512))(smooth_images(1, 32), ["a cat"])


# -- the score -----------------------------------------------------------------------------------------


def test_score_equals_ddpo_pytorch(paths, reward) -> None:
    images = smooth_images(4, (150, 113), seed=2)
    scores = reward(images, PROMPTS).scores
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    torch.testing.assert_close(scores, _ddpo_pytorch_scores(paths, images), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocessing_follows_ddpo_pytorch_and_laion(paths, shape) -> None:
    images = smooth_images(2, shape, seed=sum(shape))
    ddpo = Aesthetic(preprocess="ddpo", **paths)
    laion = Aesthetic(preprocess="laion", **paths)
    ddpo._load(), laion._load()
    got_ddpo, got_laion = ddpo._pixels(images), laion._pixels(images)
    # Same uint8 pixels through the same PIL resize; only float32 rescale/normalise rounding can differ
    # (transformers rescales in float64): a few ulps of the normalised range.
    torch.testing.assert_close(got_ddpo, _ddpo_pixels(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(got_laion, _laion_pixels(images), atol=1e-6, rtol=0)
    hf = pil_image_processor(paths["clip"])(images=list(torch.from_numpy(_uint8(images)).permute(0, 3, 1, 2)),
                                            return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got_ddpo, hf, atol=1e-6, rtol=0)  # and the processor itself
    assert torch.equal(got_ddpo, got_laion) == (shape not in DIFFERENT)


@pytest.mark.parametrize("shape", [(427, 640), (224, 339), (256, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_scores_of_both_modes_equal_their_reference(paths, shape) -> None:
    images = smooth_images(3, shape, seed=sum(shape))
    ddpo = Aesthetic(preprocess="ddpo", **paths)(images, PROMPTS[:3]).scores
    laion = Aesthetic(preprocess="laion", **paths)(images, PROMPTS[:3]).scores
    torch.testing.assert_close(ddpo, _ddpo_pytorch_scores(paths, images), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(laion, _laion_scores(paths, images), atol=1e-6, rtol=1e-6)
    assert (ddpo - laion).abs().max() > 1e-4 if shape != (256, 256) else torch.equal(ddpo, laion)


@pytest.mark.parametrize("preprocess, left", [("ddpo", 57), ("laion", 58)])
def test_differentiable_path_crops_like_the_exact_path(paths, preprocess, left) -> None:
    """224x339: no resize, only the crop (offset 57.5): on uint8 levels the float path equals the exact one."""
    r = Aesthetic(preprocess=preprocess, **paths)
    r._load()
    levels = (smooth_images(2, (224, 339), seed=11) * 255).round() / 255
    exact = r._pixels.exact(levels)
    torch.testing.assert_close(r._pixels.differentiable(levels.requires_grad_(True)).detach(), exact,
                               atol=1e-6, rtol=0)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(exact, (levels.detach()[..., left : left + 224] - mean) / std, atol=1e-6, rtol=0)


def test_preprocess_option() -> None:
    assert Aesthetic().preprocess == "ddpo"
    assert make_reward("aesthetic", preprocess="laion").reward.preprocess == "laion"
    with pytest.raises(ConfigError, match="preprocess"):
        make_reward("aesthetic", preprocess="openai")


def test_prompts_do_not_matter(reward) -> None:
    images = smooth_images(2, 64, seed=3)
    assert torch.equal(reward(images, ["a", "b"]).scores, reward(images, ["c", "d " * 200]).scores)


def test_batch_size_invariance_and_chunking(paths, reward) -> None:
    images = smooth_images(5, 64, seed=5)
    ref = reward(images, ["p"] * 5).scores
    small = Aesthetic(batch_size=2, **paths)
    small(images[:1], ["p"])
    rows = []
    hook = small._clip.vision_model.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["pixel_values"].shape[0]), with_kwargs=True)
    try:
        got = small(images, ["p"] * 5).scores
    finally:
        hook.remove()
    assert rows == [2, 2, 1]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_differentiable_path(reward) -> None:
    images = smooth_images(3, 64, seed=6)
    x = images.clone().requires_grad_(True)
    scores = reward(x, ["p"] * 3).scores
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(scores.detach(), reward(images, ["p"] * 3).scores, atol=0.05, rtol=0)
    assert not any(p.requires_grad for p in reward._mlp.parameters())


# -- weights --------------------------------------------------------------------------------------------


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch) -> None:
    empty_hf_cache(monkeypatch, tmp_path)
    attempts = block_network(monkeypatch)
    r = make_reward("aesthetic")
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download aesthetic.*--reward-opt weights=PATH"):
        r(smooth_images(1, 32), ["a cat"])
    assert attempts == []


def test_missing_clip_names_its_option(tmp_path, monkeypatch, paths) -> None:
    empty_hf_cache(monkeypatch, tmp_path)
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download aesthetic.*--reward-opt clip=PATH"):
        Aesthetic(weights=paths["weights"])(smooth_images(1, 32), ["a cat"])


def test_cached_url_download_is_used_offline(tmp_path, monkeypatch, paths) -> None:
    """A head fetched by `rlbench rewards download aesthetic` lives in the URL cache under HF_HOME."""
    empty_hf_cache(monkeypatch, tmp_path)
    target = url_cache_path(Aesthetic.weights_spec[0])
    target.parent.mkdir(parents=True)
    target.write_bytes(open(paths["weights"], "rb").read())
    images = smooth_images(1, 48, seed=9)
    torch.testing.assert_close(Aesthetic(clip=paths["clip"])(images, ["p"]).scores,
                               Aesthetic(**paths)(images, ["p"]).scores)
