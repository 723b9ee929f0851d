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


def _preprocess_val():
    """HPSv2's preprocess_val (its open_clip fork, transform.py image_transform, is_train=False)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([lambda im: im.convert("RGB"), ToTensor(), Resize(224, interpolation=InterpolationMode.BICUBIC),
                    CenterCrop(224), Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])


def _hpsv2_scores(ckpt: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """hpsv2/img_score.py score(): one PIL image and its prompt at a time through model(image, text)."""
    import open_clip

    model = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(ckpt, map_location="cpu")["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
    preprocess_val = _preprocess_val()
    out = []
    with torch.no_grad():
        for arr, prompt in zip((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), prompts):
            image = preprocess_val(Image.fromarray(arr)).unsqueeze(0)
            outputs = model(image, tokenizer([prompt]))
            logits_per_image = outputs["image_features"] @ outputs["text_features"].T
            out.append(torch.diagonal(logits_per_image)[0])
    return torch.stack(out)


# -- contract, card, options -------------------------------------------------------------------------


def test_check_reward_passes(opts) -> None:
    check_reward(make_reward("hpsv2", batch_size=2, **opts), batch_size=5, image_size=72)


def test_card() -> None:
    card = make_reward("hpsv2").card
    assert card.name == "hpsv2" and card.version == "1"
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
    images = smooth_images(5, (225, 301), seed=1)  # non-square: crop offset 38.5, rounded by CenterCrop
    scores = reward(images, PROMPTS).scores
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, _hpsv2_scores(ckpt, images, PROMPTS), atol=1e-5, rtol=1e-5)
    assert scores.abs().max() <= 1.0  # a raw cosine: no logit scale although the checkpoint has one


def test_preprocessing_is_hpsv2_preprocess_val() -> None:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert tuple(OPENAI_DATASET_MEAN) == CLIP_MEAN and tuple(OPENAI_DATASET_STD) == CLIP_STD
    images = smooth_images(3, (97, 260), seed=2)
    preprocess_val = _preprocess_val()
    expected = torch.stack([preprocess_val(Image.fromarray(a))
                            for a in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()])
    assert expected.shape == (3, 3, 224, 224)
    torch.testing.assert_close(hps_pixels(images), expected, atol=1e-6, rtol=0)


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
