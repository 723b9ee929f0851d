"""JPEG (in)compressibility against an independent PIL reference (ddpo-pytorch's definition)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import random_images
from rlbench.registry import make_reward
from rlbench.rewards.jpeg import jpeg_size
from rlbench.utils.images import to_uint8


def reference_kb(image_chw: np.ndarray) -> float:
    """Hand-computed reference: numpy quantisation, PIL JPEG quality 95, bytes / 1000."""
    x = np.asarray(image_chw, dtype=np.float32)
    q = np.clip(np.round(x * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def ddpo_pytorch_quantize(images: torch.Tensor) -> np.ndarray:
    """kvablack/ddpo-pytorch rewards.py, verbatim: (B,3,H,W) -> (B,H,W,3) uint8."""
    images = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return images.transpose(0, 2, 3, 1)


def boundary_values() -> np.ndarray:
    """float32 values x in [0, 1] with x * 255 == k + 0.5 exactly (in float32), k = 0..254."""
    out = []
    for k in range(255):
        target = np.float32(k + 0.5)
        x = np.float32(target / np.float32(255))
        for direction in (np.float32(np.inf), np.float32(-np.inf)):
            y = x
            for _ in range(40):
                if y * np.float32(255) == target:
                    break
                y = np.nextafter(y, direction)
            if y * np.float32(255) == target:
                out.append(y)
                break
    return np.array(out, dtype=np.float32)


def boundary_image() -> torch.Tensor:
    """One (1,3,H,W) image made of every exact half-way value (and exact 0 and 1)."""
    values = np.concatenate([boundary_values(), np.float32([0.0, 1.0])])
    n = len(values)
    side = int(np.ceil(np.sqrt(n)))
    flat = np.resize(values, 3 * side * side)  # repeats to fill, every value present
    return torch.from_numpy(flat.reshape(1, 3, side, side).copy())


def smooth_gradient(h: int, w: int) -> torch.Tensor:
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    return torch.stack([xs, ys, (xs + ys) / 2]).unsqueeze(0).contiguous()


IMAGES = {
    "random-4x37x53": lambda: random_images(4, 37, 53, seed=1),
    "random-64": lambda: random_images(3, 64, seed=2),
    "gradient-48x80": lambda: smooth_gradient(48, 80),
    "gradient-odd-13x7": lambda: smooth_gradient(13, 7),
    "one-pixel": lambda: random_images(2, 1, 1, seed=3),
    "odd-1x300": lambda: random_images(1, 1, 300, seed=4),
    "odd-17x1": lambda: random_images(2, 17, 1, seed=5),
    "constant-black-white": lambda: torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)]),
    "half-way-values": boundary_image,
}


def test_boundary_values_cover_every_level_and_round_half_to_even() -> None:
    values = boundary_values()
    assert len(values) == 255  # every k + 0.5 for k in 0..254 is reachable exactly in float32
    assert np.array_equal(values * np.float32(255), np.arange(255, dtype=np.float32) + np.float32(0.5))
    q = np.round(values * np.float32(255))
    assert np.all(q % 2 == 0)  # half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, ...
    assert torch.equal(torch.from_numpy(values).mul(255).round(), torch.from_numpy(q))
    # Sanity of the premise: round-half-up would differ on half of them.
    assert not np.array_equal(q, np.floor(values * np.float32(255) + np.float32(0.5)))


@pytest.mark.parametrize("kind", list(IMAGES))
def test_quantisation_matches_ddpo_pytorch_exactly(kind) -> None:
    images = IMAGES[kind]()
    reference = ddpo_pytorch_quantize(images)
    # rlbench's one conversion, on tensors (PNGs of samples, the CLIP-family pre-processing, the VLM
    # describers, shapes-gold) and on numpy arrays (the JPEG rewards' encoding threads): the same bytes.
    assert np.array_equal(to_uint8(images, layout="hwc"), reference)
    assert np.array_equal(to_uint8(images.numpy(), layout="hwc"), reference)
    assert np.array_equal(to_uint8(images, layout="chw"), reference.transpose(0, 3, 1, 2))
    for i in range(images.shape[0]):
        assert np.array_equal(to_uint8(images[i]), reference[i])
        assert np.array_equal(to_uint8(images[i].numpy()), reference[i])
        ours_numpy = np.clip(np.round(images[i].numpy() * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        assert np.array_equal(ours_numpy, reference[i])


def test_to_uint8_clamps_out_of_range_values_and_keeps_its_input() -> None:
    x = torch.tensor([-0.3, -1e-9, 1.0 + 1e-6, 7.0, 0.5]).reshape(1, 1, 1, 5).repeat(1, 3, 1, 1)
    before = x.clone()
    for images in (x, x.numpy(), x.double(), x.numpy().astype(np.float64)):
        got = to_uint8(images, layout="hwc")
        assert got.dtype == np.uint8 and got.shape == (1, 1, 5, 3) and got.flags.c_contiguous
        assert got[0, 0, :, 0].tolist() == [0, 0, 255, 255, 128]
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="layout"):
        to_uint8(x, layout="nhwc")


@pytest.mark.parametrize("kind", ["random-4x37x53", "half-way-values", "odd-17x1"])
def test_jpeg_size_of_a_float_image_equals_that_of_its_uint8_image(kind) -> None:
    for image in IMAGES[kind]().numpy():
        assert jpeg_size(image) == jpeg_size(to_uint8(image)) == round(reference_kb(image) * 1000)


@pytest.mark.parametrize("kind", list(IMAGES))
def test_incompressibility_equals_pil_reference_exactly(kind) -> None:
    images = IMAGES[kind]()
    prompts = ["x"] * images.shape[0]
    scores, info = make_reward("incompressibility")(images, prompts)
    expected = torch.tensor([reference_kb(img) for img in images.numpy()], dtype=torch.float32)
    assert scores.dtype == torch.float32 and scores.shape == (images.shape[0],)
    assert torch.equal(scores, expected), (scores, expected)
    assert info == {}
    neg, _ = make_reward("compressibility")(images, prompts)
    assert torch.equal(neg, -scores)


def test_incompressibility_orders_noise_above_flat() -> None:
    images = torch.stack([torch.full((3, 64, 64), 0.5), random_images(1, 64, seed=7)[0]])
    scores, _ = make_reward("incompressibility")(images, ["x", "x"])
    assert scores[1] > 5 * scores[0]
    comp, _ = make_reward("compressibility")(images, ["x", "x"])
    assert comp[0] > comp[1]


def test_single_worker_equals_default_workers() -> None:
    images = random_images(9, 24, seed=11)
    prompts = ["x"] * 9
    default = make_reward("incompressibility")
    assert default.num_workers >= 1
    one = make_reward("incompressibility", num_workers=1)
    four = make_reward("incompressibility", num_workers=4)
    a, b, c = (r(images, prompts).scores for r in (default, one, four))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_batch_invariance() -> None:
    images = random_images(6, 20, seed=12)
    reward = make_reward("incompressibility")
    batched = reward(images, ["x"] * 6).scores
    singles = torch.cat([reward(images[i : i + 1], ["x"]).scores for i in range(6)])
    reversed_ = reward(images.flip(0), ["x"] * 6).scores.flip(0)
    assert torch.equal(batched, singles)
    assert torch.equal(batched, reversed_)


def test_prompt_and_metadata_do_not_matter() -> None:
    images = random_images(2, 16, seed=13)
    reward = make_reward("compressibility")
    a = reward(images, ["a cat", "a dog"]).scores
    b = reward(images, ["", "x" * 1000], [{"k": 1}, {}]).scores
    assert torch.equal(a, b)


def test_cards() -> None:
    inc, comp = make_reward("incompressibility"), make_reward("compressibility")
    assert inc.card.deterministic and not inc.card.differentiable
    assert inc.card.higher_is_better and comp.card.higher_is_better
    assert "2305.13301" in inc.card.paper
    assert inc.card.weights == "none"


def test_the_encoding_threads_get_numpy_views_not_tensors() -> None:
    """The threads quantise with numpy (torch ops in extra threads slow later torch ops on small CPUs), and
    CPU images reach them without a copy of the batch."""
    from rlbench.rewards.jpeg import _per_image

    images = random_images(3, 16, seed=14)
    arrays = _per_image(images)
    assert isinstance(arrays, np.ndarray) and arrays.dtype == np.float32
    assert np.shares_memory(arrays, images.numpy())
