"""``hpsv2``: HPS v2.1 / v2.0 on a tiny seeded open_clip model, checked against HPSv2's own scoring code path."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from helpers import block_network, empty_hf_cache

from rlbench.checker import check_reward
from rlbench.errors import ConfigError, WeightsNotAvailable
from rlbench.nets.preprocess import CLIP_MEAN, CLIP_STD
from rlbench.registry import make_reward
from rlbench.rewards.hpsv2 import HPS_FILES, HPSv2, hps_pixels
from rlbench.testing import TINY_OPEN_CLIP_NAME, smooth_images, tiny_hps_checkpoint

PROMPTS = ["a photo of a cat", "two red circles left of a blue square", "a " + "very long " * 100 + "prompt",
           "a photo of a cat", "an oil painting of a lighthouse at dusk"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return str(tiny_hps_checkpoint(tmp_path_factory.mktemp("hps") / HPS_FILES["v2.1"], seed=5))


@pytest.fixture(scope="module")
def opts(ckpt) -> dict:
    return {"weights": ckpt, "arch": TINY_OPEN_CLIP_NAME}


@pytest.fixture(scope="module")
def reward(opts) -> HPSv2:
    return HPSv2(**opts)


# Image shapes (H, W) that exercise every branch of HPSv2's ResizeMaxSize: portrait and landscape
# 512x768 / 768x512, 640x427 (odd padding: 75 = 37 + 38), 448x225 (225 * 0.5 = 112.5: Python's round gives
# 112, half-up would give 113), long side already 224 (224x160, 96x224: no resize, padding only),
# upscaling (150x100), square (224x224 untouched, 72x72 upscaled, 256x256 downscaled).
SHAPES = [(768, 512), (512, 768), (427, 640), (225, 448), (224, 160), (96, 224), (100, 150), (224, 224),
          (72, 72), (256, 256)]


def _official_resize_max_size(t: torch.Tensor, max_size: int = 224) -> torch.Tensor:
    """HPSv2's ResizeMaxSize (hpsv2/src/open_clip/transform.py L26-49), from its definition: the longer side
    to max_size (each side scaled and rounded with Python's round, bicubic tensor resize), then zero padding
    of the shorter side, half before and the rest after; an image whose longer side is max_size already is
    returned as it is (unpadded)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    h, w = t.shape[1:]
    scale = max_size / float(max(h, w))
    if scale == 1.0:
        return t
    new_h, new_w = round(h * scale), round(w * scale)
    t = TF.resize(t, [new_h, new_w], InterpolationMode.BICUBIC)
    extra_h, extra_w = max_size - new_h, max_size - new_w
    left, top = extra_w // 2, extra_h // 2
    return TF.pad(t, [left, top, extra_w - left, extra_h - top], fill=0)


def _preprocess_val():
    """HPSv2's preprocess_val as hpsv2.score builds it (light_augmentation=True -> image_transform(...,
    resize_longest_max=True), transform.py L141-157): RGB, ToTensor, ResizeMaxSize(224), Normalize."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import Compose, Normalize, ToTensor

    return Compose([lambda im: im.convert("RGB"), ToTensor(), _official_resize_max_size,
                    Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])


def _pad_to_224(x: torch.Tensor) -> torch.Tensor:
    """What rlbench does where the official transform passes an image through unpadded (long side 224):
    zero padding in pixel space, i.e. -mean/std after normalisation, half before and the rest after."""
    h, w = x.shape[-2:]
    fill = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)
    out = fill.expand(3, 224, 224).clone()
    top, left = (224 - h) // 2, (224 - w) // 2
    out[:, top : top + h, left : left + w] = x
    return out


def _official_pixels(images: torch.Tensor) -> torch.Tensor:
    """preprocess_val of each image as a PIL image (what hpsv2.score receives), one at a time."""
    preprocess_val = _preprocess_val()
    out = []
    for arr in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        x = preprocess_val(Image.fromarray(arr))
        out.append(x if x.shape[-2:] == (224, 224) else _pad_to_224(x))
    return torch.stack(out)


def _hpsv2_scores(ckpt: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """hpsv2/img_score.py score(): one PIL image and its prompt at a time through model(image, text)."""
    import open_clip

    model = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(ckpt, map_location="cpu")["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
    out = []
    with torch.no_grad():
        for image, prompt in zip(_official_pixels(images), prompts):
            outputs = model(image.unsqueeze(0), tokenizer([prompt]))
            logits_per_image = outputs["image_features"] @ outputs["text_features"].T
            out.append(torch.diagonal(logits_per_image)[0])
    return torch.stack(out)


# -- contract, card, options -------------------------------------------------------------------------


def test_check_reward_passes(opts) -> None:
    check_reward(make_reward("hpsv2", batch_size=2, **opts), batch_size=5, image_size=72)


def test_card() -> None:
    card = make_reward("hpsv2").card
    assert card.name == "hpsv2" and card.version == "2"  # 2: the letterbox of issue 18
    assert card.higher_is_better and card.deterministic and card.differentiable
    assert card.weights == "xswu/HPSv2/HPS_v2.1_compressed.pt" and card.license == "Apache-2.0"
    assert "2306.09341" in card.paper and "cosine" in card.score_range
    assert make_reward("hpsv2", version="v2.0").card.weights == "xswu/HPSv2/HPS_v2_compressed.pt"
    assert HPS_FILES == {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}  # hpsv2/utils.py


@pytest.mark.parametrize("bad, match", [({"version": "v3"}, "version"), ({"arch": "ViT-Q-99"}, "open_clip"),
                                        ({"dtype": "int8"}, "dtype"), ({"batch_size": 0}, "batch_size")])
def test_bad_options_are_config_errors(bad, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make_reward("hpsv2", **bad)


def test_default_arch_is_vit_h_14() -> None:
    import open_clip

    r = HPSv2()
    assert r.arch == "ViT-H-14" and r._model is None  # nothing built at construction
    cfg = open_clip.get_model_config("ViT-H-14")
    assert cfg["vision_cfg"]["image_size"] == 224 and cfg["text_cfg"]["context_length"] == 77


# -- the score -----------------------------------------------------------------------------------------


def test_score_equals_hpsv2_score(ckpt, reward) -> None:
    images = smooth_images(5, (225, 301), seed=1)  # non-square: 168x224 letterboxed, padding 28 + 28
    scores = reward(images, PROMPTS).scores
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, _hpsv2_scores(ckpt, images, PROMPTS), atol=1e-6, rtol=0)
    assert scores.abs().max() <= 1.0  # a raw cosine: no logit scale although the checkpoint has one


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocessing_is_hpsv2_preprocess_val(shape) -> None:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert tuple(OPENAI_DATASET_MEAN) == CLIP_MEAN and tuple(OPENAI_DATASET_STD) == CLIP_STD
    images = smooth_images(2, shape, seed=sum(shape))
    expected = _official_pixels(images)
    assert expected.shape == (2, 3, 224, 224)
    # The same torchvision tensor ops on the same float32 values: equal to float32 rounding of the batched
    # vs per-image calls (observed 0 on this machine; 1e-6 is a few ulps of the normalised range).
    torch.testing.assert_close(hps_pixels(images), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, content", [((427, 640), (149, 224)), ((768, 512), (224, 149)),
                                            ((225, 448), (112, 224)), ((224, 160), (224, 160))])
def test_letterbox_geometry(shape, content) -> None:
    """The longer side fills 224, the shorter side is centred between black (zero pixel) bars; no crop."""
    from rlbench.nets.preprocess import letterbox_padding, letterbox_shape

    assert letterbox_shape(*shape, 224) == content
    left, top, right, bottom = letterbox_padding(*content, 224)
    assert (top + content[0] + bottom, left + content[1] + right) == (224, 224)
    assert (top, left) == ((224 - content[0]) // 2, (224 - content[1]) // 2)  # half (floored) before
    x = hps_pixels(torch.full((1, 3, *shape), 0.5))[0]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    inside = torch.zeros(224, 224, dtype=torch.bool)
    inside[top : 224 - bottom, left : 224 - right] = True
    torch.testing.assert_close(x[:, ~inside], (-mean / std).view(3, 1).expand(3, int((~inside).sum())),
                               atol=1e-6, rtol=0)  # the bars: pixel 0, normalised
    grey = (128 / 255 - mean) / std  # 0.5 * 255 = 127.5 rounds (half to even) to the uint8 level 128
    torch.testing.assert_close(x[:, inside], grey.view(3, 1).expand(3, int(inside.sum())), atol=1e-5, rtol=0)


def test_official_transform_passes_long_side_224_unpadded_and_the_model_rejects_it(ckpt) -> None:
    """Why rlbench pads where ResizeMaxSize does not: hpsv2.score would hand the ViT a 224x160 image.
    (``ckpt`` registers the tiny open_clip config.)"""
    import open_clip

    image = Image.fromarray((smooth_images(1, (224, 160))[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    official = _preprocess_val()(image)
    assert official.shape == (3, 224, 160)
    model = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None)
    with pytest.raises(RuntimeError):
        model.encode_image(official.unsqueeze(0))


@pytest.mark.parametrize("shape", [(768, 512), (427, 640), (225, 448), (224, 160)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_scores_equal_hpsv2_score_on_non_square_images(ckpt, reward, shape) -> None:
    images = smooth_images(2, shape, seed=sum(shape))
    torch.testing.assert_close(reward(images, PROMPTS[:2]).scores, _hpsv2_scores(ckpt, images, PROMPTS[:2]),
                               atol=1e-6, rtol=0)


def test_differentiable_pixels_are_the_exact_ones_without_quantisation() -> None:
    levels = (smooth_images(2, (427, 640), seed=8) * 255).round() / 255  # already uint8 levels
    x = levels.clone().requires_grad_(True)
    pixels = hps_pixels(x, exact=False)
    torch.testing.assert_close(pixels.detach(), hps_pixels(levels), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(pixels.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_tokenizer_keeps_the_end_token_of_long_prompts(reward) -> None:
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-H-14")(PROMPTS[2:3])
    assert tokens.shape == (1, 77) and int(tokens[0, -1]) == 49407


def test_v2_0_reads_its_own_file(tmp_path, ckpt) -> None:
    folder = tmp_path / "snapshot"  # a hub repo given as weights= resolves to a folder holding both files
    folder.mkdir()
    (folder / HPS_FILES["v2.0"]).write_bytes(open(ckpt, "rb").read())
    images = smooth_images(2, 64, seed=3)
    v20 = HPSv2(weights=str(folder), version="v2.0", arch=TINY_OPEN_CLIP_NAME)(images, PROMPTS[:2]).scores
    torch.testing.assert_close(v20, _hpsv2_scores(ckpt, images, PROMPTS[:2]), atol=1e-5, rtol=1e-5)
    with pytest.raises(WeightsNotAvailable, match=HPS_FILES["v2.1"].replace(".", r"\.")):
        HPSv2(weights=str(folder), arch=TINY_OPEN_CLIP_NAME)(images, PROMPTS[:2])


def test_plain_state_dict_also_loads_but_wrong_keys_raise(tmp_path, ckpt, reward) -> None:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    images = smooth_images(2, 64, seed=4)
    torch.testing.assert_close(HPSv2(weights=str(plain), arch=TINY_OPEN_CLIP_NAME)(images, PROMPTS[:2]).scores,
                               reward(images, PROMPTS[:2]).scores)
    broken = tmp_path / "broken.pt"
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "text_projection"}}, broken)
    with pytest.raises(WeightsNotAvailable, match="does not fit the open_clip architecture.*text_projection"):
        HPSv2(weights=str(broken), arch=TINY_OPEN_CLIP_NAME)(images, PROMPTS[:2])


# -- batching and gradients ------------------------------------------------------------------------------


def test_batch_size_invariance_and_chunking(opts, reward) -> None:
    images = smooth_images(5, 80, seed=5)
    ref = reward(images, PROMPTS).scores
    small = HPSv2(batch_size=2, **opts)
    small(images[:1], PROMPTS[:1])
    text_rows, image_rows = [], []
    hooks = [small._model.visual.register_forward_pre_hook(lambda m, a: image_rows.append(a[0].shape[0])),
             small._model.token_embedding.register_forward_pre_hook(lambda m, a: text_rows.append(a[0].shape[0]))]
    try:
        got = small(images, PROMPTS).scores
    finally:
        for h in hooks:
            h.remove()
    assert image_rows == [2, 2, 1] and text_rows == [2, 2]  # 4 distinct prompts
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_differentiable_path(reward) -> None:
    images = smooth_images(3, 64, seed=6)
    x = images.clone().requires_grad_(True)
    scores = reward(x, PROMPTS[:3]).scores
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(scores.detach(), reward(images, PROMPTS[:3]).scores, atol=0.01, rtol=0)
    assert not any(p.requires_grad for p in reward._model.parameters())


def test_bfloat16_returns_float32(opts, reward) -> None:
    images = smooth_images(2, 64, seed=7)
    half = HPSv2(dtype="bfloat16", **opts)(images, PROMPTS[:2]).scores
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reward(images, PROMPTS[:2]).scores, atol=0.03, rtol=0)


# -- weights --------------------------------------------------------------------------------------------


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch) -> None:
    empty_hf_cache(monkeypatch, tmp_path)
    attempts = block_network(monkeypatch)
    r = make_reward("hpsv2")
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download hpsv2.*--reward-opt weights=PATH"):
        r(smooth_images(1, 32), ["a cat"])
    with pytest.raises(WeightsNotAvailable, match=r"hf download xswu/HPSv2 HPS_v2_compressed\.pt"):
        make_reward("hpsv2", version="v2.0")(smooth_images(1, 32), ["a cat"])
    assert attempts == []
