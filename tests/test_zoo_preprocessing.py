"""Issue 18's audit of the other CLIP-family rewards: ``pickscore``, ``clipscore`` and ``imagereward`` pre-process
non-square images as their official code does (short side to 224, then a centre crop whose offset the
transformers processors floor and torchvision's ``CenterCrop`` rounds). ``aesthetic`` and ``hpsv2`` are
checked in their own test files.

The shapes are chosen so that the two offset rules disagree (``(resized long side - 224) / 2 = k + 0.5``
with ``k`` odd: Python's ``round`` goes half to even), which the older tests' shapes did not (their
offsets 38.5, 18.5, 140.5 round and floor alike), plus an even offset and a square.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from helpers import pil_image_processor

from rlbench.rewards.imagereward import ImageReward
from rlbench.testing import smooth_images, tiny_reward, tiny_reward_options

# (H, W): 640x427 and its transpose (resized 224x335: offset 55.5), 224x339 (no resize: 57.5), 166x400
# (resized 224x539: 157.5), 768x512 (even: 56), square.
SHAPES = [(427, 640), (640, 427), (224, 339), (166, 400), (768, 512), (256, 256)]
ODD = {(427, 640), (640, 427), (224, 339), (166, 400)}
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

pytestmark = pytest.mark.usefixtures("one_thread")


def _pil_images(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def _torchvision_clip_transform(images: torch.Tensor) -> torch.Tensor:
    """ImageReward/ImageReward.py ``_transform(224)`` (L30-37; OpenAI CLIP's ``_transform``), from its
    definition: torchvision on the PIL image, Resize(224, BICUBIC), CenterCrop(224), RGB, ToTensor, Normalize."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    transform = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                         lambda im: im.convert("RGB"), ToTensor(), Normalize(OPENAI_MEAN, OPENAI_STD)])
    return torch.stack([transform(im) for im in _pil_images(images)])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.parametrize("name, folder_option", [("pickscore", "processor"), ("clipscore", "weights")])
def test_hf_processor_rewards_follow_the_transformers_processor(root, name, folder_option) -> None:
    """PickScore (README: ``AutoProcessor`` of the LAION repo) and torchmetrics' CLIPScore (``CLIPProcessor``)
    both run transformers' CLIP image processor: short side 224, floored crop offset."""
    reward = tiny_reward(name, root)
    reward(smooth_images(1, 32), ["a"])  # loads the model and the processor settings
    pixels = reward._pixels
    assert pixels.crop == "floor"
    processor = pil_image_processor(tiny_reward_options(name, root)[folder_option])
    for shape in SHAPES:
        images = smooth_images(2, shape, seed=sum(shape))
        expected = processor(images=_pil_images(images), return_tensors="pt")["pixel_values"]
        got = pixels(images)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)  # float32 rescale/normalise rounding only
        rounded = _torchvision_clip_transform(images)  # the other rule: must differ exactly on the odd offsets
        assert torch.allclose(got, rounded, atol=1e-6) == (shape not in ODD)


def test_imagereward_follows_its_torchvision_transform() -> None:
    r = ImageReward()  # default 224 px; nothing is loaded to pre-process
    for shape in SHAPES:
        images = smooth_images(2, shape, seed=sum(shape))
        torch.testing.assert_close(r.pixel_values(images), _torchvision_clip_transform(images), atol=1e-6, rtol=0)
