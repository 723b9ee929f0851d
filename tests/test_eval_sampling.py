"""Paired sampling and the exact KL, against an independent computation with diffusers' own
``DDIMScheduler.step`` and two separate UNets (tiny random SD pipeline, a few steps)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rlbench.diffusion.policy import load_policy
from rlbench.diffusion.policy import BaseWeights
from rlbench.eval.sampling import sample_paired
from rlbench.utils.images import to_uint8
from rlbench.testing import save_tiny_sd_pipeline

STEPS, GUIDANCE = 3, 3.0
PROMPTS = ["a cat", "a dog", "a cat"]
SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    path = save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny") / "sd", sample_size=8)
    policy = load_policy(str(path))
    policy.setup_training("full")
    return policy


def _perturbed(policy):
    """(policy with perturbed trainable weights, a separate copy of the base UNet, its BaseWeights)."""
    base_unet = copy.deepcopy(policy.unet)
    base = BaseWeights(policy)
    g = torch.Generator().manual_seed(5)
    saved = [p.detach().clone() for p in policy.trainable_parameters()]
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1e-3))
    return base_unet, base, saved


def _restore(policy, saved):
    with torch.no_grad():
        for p, s in zip(policy.trainable_parameters(), saved):
            p.copy_(s)


def _independent(policy, base_unet, prompts, seeds, eta, kl_eta):
    """Sampling and KL written out with diffusers' scheduler: means are ``step(..., variance_noise=0)``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(policy.scheduler.config)
    sched.set_timesteps(STEPS)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    shape = (1, *policy.latent_shape)
    x = torch.cat([torch.randn(shape, generator=g) for g in gens]) * sched.init_noise_sigma
    emb = policy.encode_prompts(prompts)["embeds"]
    neg = policy.encode_prompts([""])["embeds"].expand(len(prompts), -1, -1)

    def eps(unet, x, t):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, emb])).sample
        u, c = out.chunk(2)
        return u + GUIDANCE * (c - u)

    kl = torch.zeros(len(prompts), dtype=torch.float64)
    with torch.no_grad():
        for t in sched.timesteps:
            e1, e0 = eps(policy.unet, x, t), eps(base_unet, x, t)
            prev_t = t - sched.config.num_train_timesteps // STEPS
            sigma = kl_eta * sched._get_variance(t, prev_t) ** 0.5
            zero = torch.zeros_like(x)
            m1 = sched.step(e1, t, x, eta=kl_eta, variance_noise=zero).prev_sample
            m0 = sched.step(e0, t, x, eta=kl_eta, variance_noise=zero).prev_sample
            kl += ((m1.double() - m0.double()) ** 2).flatten(1).sum(1) / (2 * float(sigma) ** 2)
            noise = torch.cat([torch.randn(shape, generator=g) for g in gens])
            x = sched.step(e1, t, x, eta=eta, variance_noise=noise).prev_sample
        images = to_uint8(policy.decode(x), layout="hwc")
    return images, kl.numpy()


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_kl_and_images_match_an_independent_computation(tiny, eta) -> None:
    policy = tiny
    base_unet, base, saved = _perturbed(policy)
    try:
        neg = policy.encode_prompts([""])
        got = sample_paired(policy, PROMPTS, SEEDS, num_steps=STEPS, eta=eta, guidance_scale=GUIDANCE, neg_embeds=neg,
                            base=base, kl_eta=1.0)
        want_images, want_kl = _independent(policy, base_unet, PROMPTS, SEEDS, eta=eta, kl_eta=1.0)
    finally:
        _restore(policy, saved)
    assert got.kl_steps == STEPS
    assert (got.kl > 0).all()
    np.testing.assert_allclose(got.kl, want_kl, rtol=1e-4)
    assert np.abs(got.images.astype(int) - want_images.astype(int)).max() <= 1


def test_kl_is_zero_at_the_base_model_and_weights_are_left_alone(tiny) -> None:
    policy = tiny
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    neg = policy.encode_prompts([""])
    got = sample_paired(policy, PROMPTS, SEEDS, num_steps=STEPS, eta=1.0, guidance_scale=GUIDANCE, neg_embeds=neg,
                        base=BaseWeights(policy), kl_eta=1.0)
    assert got.kl.tolist() == [0.0, 0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))


def test_noise_is_fixed_per_image_whatever_the_batch(tiny) -> None:
    policy = tiny
    neg = policy.encode_prompts([""])
    kw = dict(num_steps=STEPS, eta=1.0, guidance_scale=GUIDANCE, neg_embeds=neg)
    a = sample_paired(policy, ["a cat", "a dog"], [1, 2], **kw).images
    b = sample_paired(policy, ["a bird", "a fish", "a dog"], [7, 8, 2], **kw).images
    assert np.abs(a[1].astype(int) - b[2].astype(int)).max() <= 1  # same (prompt, seed), another batch
    assert np.abs(a[0].astype(int) - a[1].astype(int)).max() > 1
    # The deterministic sampler: only the initial noise matters, and it still follows the seed.
    c = sample_paired(policy, ["a cat", "a cat"], [1, 1], num_steps=STEPS, eta=0.0, guidance_scale=GUIDANCE,
                      neg_embeds=neg).images
    assert np.array_equal(c[0], c[1])


def test_lora_base_weights_are_the_base_model(tmp_path, one_thread) -> None:
    path = save_tiny_sd_pipeline(tmp_path / "sd", sample_size=8)
    plain = load_policy(str(path))
    lora = load_policy(str(path))
    lora.setup_training("lora")
    neg = plain.encode_prompts([""])
    kw = dict(num_steps=2, eta=1.0, guidance_scale=GUIDANCE, neg_embeds=neg)
    x = sample_paired(plain, ["a cat"], [3], **kw).images
    base = BaseWeights(lora)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.add_(0.5)
    y = sample_paired(lora, ["a cat"], [3], base=base, kl_eta=1.0, **kw)
    assert y.kl[0] > 0
    with base.active():
        z = sample_paired(lora, ["a cat"], [3], **kw).images
    assert np.abs(x.astype(int) - z.astype(int)).max() <= 1


def test_hub_clip_features_load_from_a_folder_and_missing_weights_are_named(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from rlbench.errors import WeightsNotAvailable
    from rlbench.eval.diversity import load_feature_model

    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    fm = load_feature_model(str(tmp_path / "clip"))
    images = np.random.default_rng(0).integers(0, 255, size=(3, 16, 16, 3), dtype=np.uint8)
    feats = fm.embed(images)
    assert feats.shape == (3, 8) and np.isfinite(feats).all()
    with pytest.raises(WeightsNotAvailable, match="not in the local Hugging Face cache.*--features"):
        load_feature_model("nobody/no-such-clip")
