"""DiffusionPolicy on tiny random SD pipelines (CPU, offline): loading, prompts, sampling with CFG,
log-probs, LoRA / full fine-tuning, and the saved formats plain diffusers loads."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

from rlbench.errors import ConfigError, UnknownNameError, WeightsNotAvailable
from rlbench.diffusion.policy import DiffusionPolicy, Rollout, load_policy
from rlbench.testing import TINY_TEXT_HIDDEN_SIZE, save_tiny_sd_pipeline

STEPS = 3  # DDIM steps in these tests


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_latent(tmp_path_factory) -> Path:
    """Latent model: 4x16x16 latents, VAE to 3x32x32 images."""
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("policy-models") / "tiny-sd", sample_size=16)


@pytest.fixture(scope="session")
def tiny_pixel(tmp_path_factory) -> Path:
    """Pixel-space model: the UNet denoises 3x16x16 images, no VAE."""
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("policy-models") / "tiny-px", sample_size=16, latent=False)


@pytest.fixture(params=["latent", "pixel"])
def tiny_any(request, tiny_latent, tiny_pixel) -> Path:
    return tiny_latent if request.param == "latent" else tiny_pixel


def _lora_policy(path: Path, seed: int = 0, **kw) -> DiffusionPolicy:
    policy = load_policy(str(path))
    torch.manual_seed(seed)
    policy.setup_training("lora", **kw)
    return policy


def _perturb_trainable(policy: DiffusionPolicy, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _unet_inputs(policy: DiffusionPolicy, batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *policy.latent_shape, generator=g)
    t = torch.tensor([900, 41][:batch])
    e = torch.randn(batch, 77, TINY_TEXT_HIDDEN_SIZE, generator=g)
    return x, t, e


# -- loading ---------------------------------------------------------------------------------------


def test_from_pretrained_loads_latent_folder(tiny_latent):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    policy = DiffusionPolicy.from_pretrained(tiny_latent)
    assert isinstance(policy.unet, UNet2DConditionModel)
    assert isinstance(policy.vae, AutoencoderKL)
    assert isinstance(policy.scheduler, DDIMScheduler)
    assert policy.latent_shape == (4, 16, 16)
    assert policy.image_size == 32
    assert policy.train_mode == "frozen"
    assert policy.dtype == torch.float32 and policy.device.type == "cpu"
    for module in (policy.unet, policy.text_encoder, policy.vae):
        assert not any(p.requires_grad for p in module.parameters())
    assert policy.trainable_parameters() == []


def test_from_pretrained_loads_pixel_folder(tiny_pixel):
    policy = DiffusionPolicy.from_pretrained(tiny_pixel)
    assert policy.vae is None
    assert policy.latent_shape == (3, 16, 16)
    assert policy.image_size == 16


def test_load_policy_accepts_a_folder(tiny_latent):
    for source in (str(tiny_latent), tiny_latent):
        policy = load_policy(source)
        assert isinstance(policy, DiffusionPolicy)
        assert policy.name == str(tiny_latent)


def test_load_policy_unknown_name_suggests():
    with pytest.raises(UnknownNameError) as info:
        load_policy("sd-1.6")
    msg = str(info.value)
    assert "Did you mean" in msg and "'sd-1.5'" in msg
    assert "diffusers folder" in msg


def test_folder_without_unet_is_config_error(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match="unet/"):
        load_policy(str(tmp_path))


def test_broken_folder_is_config_error(tmp_path):
    (tmp_path / "unet").mkdir()  # has unet/ but no weights and no other parts
    with pytest.raises(ConfigError, match="cannot load"):
        load_policy(str(tmp_path))


def test_uncached_hub_id_offline_names_the_download_command(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    attempts: list = []

    def no_network(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    fake = "rlbench-tests/no-such-model-4f2a"
    start = time.monotonic()
    with pytest.raises(WeightsNotAvailable) as info:
        load_policy(fake)
    assert f"`hf download {fake}`" in str(info.value)
    with pytest.raises(WeightsNotAvailable) as info:
        load_policy(fake, revision="abc123")
    assert f"`hf download {fake} --revision abc123`" in str(info.value)
    assert time.monotonic() - start < 30
    assert attempts == []


# -- prompts ---------------------------------------------------------------------------------------


class _CountingEncoder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.batch_sizes: list[int] = []

    def forward(self, ids):
        self.batch_sizes.append(ids.shape[0])
        return self.inner(ids)


def test_encode_prompts_encodes_each_distinct_prompt_once(tiny_latent):
    policy = load_policy(str(tiny_latent))
    prompts = ["a cat", "a dog", "a cat", "a cat", "a bird riding a bike", "a dog"]
    singles = {p: policy.encode_prompts([p])["embeds"] for p in set(prompts)}
    counter = _CountingEncoder(policy.text_encoder)
    policy.text_encoder = counter
    embeds = policy.encode_prompts(prompts)["embeds"]
    assert counter.batch_sizes == [3]
    assert embeds.shape == (len(prompts), 77, TINY_TEXT_HIDDEN_SIZE)
    assert embeds.dtype == torch.float32
    for i, p in enumerate(prompts):
        torch.testing.assert_close(embeds[i], singles[p][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(embeds[0], embeds[2]) and torch.equal(embeds[0], embeds[3])
    assert not torch.allclose(embeds[0], embeds[1])


# -- sampling --------------------------------------------------------------------------------------


def _sample(policy: DiffusionPolicy, prompts, seed=0, steps=STEPS, guidance=5.0) -> Rollout:
    return policy.sample(prompts, num_steps=steps, eta=1.0, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(seed))


def test_sample_shapes_range_and_reproducibility(tiny_any):
    policy = _lora_policy(tiny_any)
    prompts = ["a cat", "a dog", "a cat"]
    ro = _sample(policy, prompts)
    c, h, w = policy.latent_shape
    size = policy.image_size
    assert ro.images.shape == (3, 3, size, size) and ro.images.dtype == torch.float32
    assert float(ro.images.min()) >= 0.0 and float(ro.images.max()) <= 1.0
    assert ro.latents.shape == (3, STEPS + 1, c, h, w) and ro.latents.dtype == torch.float32
    assert ro.log_probs.shape == (3, STEPS) and ro.log_probs.dtype == torch.float32
    assert torch.isfinite(ro.log_probs).all()
    assert ro.timesteps.shape == (STEPS,) and ro.timesteps.dtype == torch.int64
    assert bool((ro.timesteps[:-1] > ro.timesteps[1:]).all())  # x_T first
    assert ro.prompt_embeds["embeds"].shape == (3, 77, TINY_TEXT_HIDDEN_SIZE)
    # The images are the decoded final latents.
    assert torch.equal(policy.decode(ro.latents[:, -1]), ro.images)

    again = _sample(policy, prompts)
    for name in ("images", "latents", "log_probs", "timesteps", "final"):
        assert torch.equal(getattr(ro, name), getattr(again, name)), name
    assert torch.equal(ro.prompt_embeds["embeds"], again.prompt_embeds["embeds"])
    other = _sample(policy, prompts, seed=1)
    assert not torch.equal(ro.latents, other.latents)


def test_stored_log_probs_equal_recomputed(tiny_any):
    policy = _lora_policy(tiny_any)
    _perturb_trainable(policy)  # a non-trivial LoRA: the recomputation must go through it too
    prompts = ["a cat", "a dog", "a cat"]
    ro = _sample(policy, prompts)
    neg = policy.encode_prompts([""])
    b = len(prompts)
    with torch.no_grad():
        for k, t in enumerate(ro.timesteps):
            for tt in (t, t.expand(b)):  # a scalar timestep and one per sample (the training layout)
                lp = policy.step_log_prob(ro.latents[:, k], tt, ro.latents[:, k + 1], ro.prompt_embeds, neg, 5.0, 1.0)
                assert lp.dtype == torch.float32
                assert torch.equal(lp, ro.log_probs[:, k])
                assert torch.equal(torch.exp(lp - ro.log_probs[:, k]), torch.ones(b))


def test_stored_log_probs_equal_recomputed_with_bf16_frozen_weights(tiny_latent):
    policy = _lora_policy(tiny_latent)
    _perturb_trainable(policy)
    policy.to("cpu", torch.bfloat16)
    assert policy.dtype == torch.bfloat16
    assert policy.text_encoder.dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    ro = _sample(policy, ["a cat", "a dog"])
    assert ro.images.dtype == torch.float32 and ro.log_probs.dtype == torch.float32
    assert torch.isfinite(ro.log_probs).all()
    neg = policy.encode_prompts([""])
    with torch.no_grad():
        for k, t in enumerate(ro.timesteps):
            lp = policy.step_log_prob(ro.latents[:, k], t.expand(2), ro.latents[:, k + 1], ro.prompt_embeds, neg, 5.0, 1.0)
            assert torch.equal(lp, ro.log_probs[:, k])


def test_to_keeps_trainable_weights_exact(tiny_latent):
    policy = _lora_policy(tiny_latent)
    _perturb_trainable(policy)
    before = {n: t.clone() for n, t in policy.named_trainable_state().items()}
    policy.to("cpu", torch.bfloat16)
    after = policy.named_trainable_state()
    assert before.keys() == after.keys()
    for n in before:
        assert after[n].dtype == torch.float32
        assert torch.equal(after[n], before[n]), n


def test_guided_eps_matches_separate_unet_calls(tiny_latent):
    policy = _lora_policy(tiny_latent)
    _perturb_trainable(policy)
    x, t, embeds = _unet_inputs(policy)
    neg = policy.encode_prompts([""])
    with torch.no_grad():
        cond = policy.unet(x, t, encoder_hidden_states=embeds).sample
        uncond = policy.unet(x, t, encoder_hidden_states=neg["embeds"].expand(2, -1, -1)).sample
        assert torch.equal(policy.guided_eps(x, t, embeds, neg, 1.0), cond)
        for w in (5.0, 0.5):
            torch.testing.assert_close(policy.guided_eps(x, t, embeds, neg, w), uncond + w * (cond - uncond),
                                       rtol=1e-4, atol=1e-5)
        # An int timestep is broadcast over the batch.
        torch.testing.assert_close(policy.guided_eps(x, 41, embeds, neg, 1.0),
                                   policy.unet(x, torch.tensor([41, 41]), encoder_hidden_states=embeds).sample)


def test_guided_eps_gradients_reach_lora(tiny_latent):
    policy = _lora_policy(tiny_latent)
    x, t, embeds = _unet_inputs(policy)
    neg = policy.encode_prompts([""])
    policy.guided_eps(x, t, embeds, neg, 5.0).square().mean().backward()
    grads = {n: p.grad for n, p in policy.unet.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # B = 0 at init, so A gets no gradient yet but B does.
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)


# -- trainable parameters --------------------------------------------------------------------------


def test_lora_setup_trains_only_float32_adapters(tiny_latent):
    from diffusers import UNet2DConditionModel

    policy = _lora_policy(tiny_latent, rank=2, alpha=4.0)
    assert policy.train_mode == "lora"
    assert policy.lora_config == {"r": 2, "lora_alpha": 4.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    named = dict(policy.unet.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    lora = {n for n in named if ".lora_" in n}
    assert trainable == lora and len(lora) > 0
    assert len(policy.trainable_parameters()) == len(lora)
    for n in lora:
        assert named[n].dtype == torch.float32
        assert any(f".{target}.lora_" in n for target in ("to_q", "to_k", "to_v", "to_out.0")), n
        assert 2 in named[n].shape  # rank 2
    for module in (policy.text_encoder, policy.vae):
        assert not any(p.requires_grad for p in module.parameters())

    # LoRA B starts at zero: the adapted UNet computes exactly the base UNet.
    base = UNet2DConditionModel.from_pretrained(tiny_latent, subfolder="unet")
    x, t, e = _unet_inputs(policy)
    with torch.no_grad():
        assert torch.equal(policy.unet(x, t, encoder_hidden_states=e).sample, base(x, t, encoder_hidden_states=e).sample)
        _perturb_trainable(policy)
        assert not torch.allclose(policy.unet(x, t, encoder_hidden_states=e).sample,
                                  base(x, t, encoder_hidden_states=e).sample)


def test_setup_training_rejects_bad_settings(tiny_latent):
    policy = load_policy(str(tiny_latent))
    with pytest.raises(ConfigError, match="train_mode"):
        policy.setup_training("qlora")
    with pytest.raises(ConfigError, match="lora_targets"):
        load_policy(str(tiny_latent)).setup_training("lora", targets=["no_such_module"])


def test_full_setup_trains_the_whole_unet(tiny_latent):
    policy = load_policy(str(tiny_latent))
    policy.setup_training("full")
    assert policy.train_mode == "full"
    assert all(p.requires_grad and p.dtype == torch.float32 for p in policy.unet.parameters())
    assert len(policy.trainable_parameters()) == len(list(policy.unet.parameters()))
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    assert not any(p.requires_grad for p in policy.vae.parameters())


# -- saving ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (2, 8.0)])
def test_saved_lora_loads_in_plain_diffusers(tiny_latent, tmp_path, rank, alpha):
    from diffusers import StableDiffusionPipeline

    policy = _lora_policy(tiny_latent, rank=rank, alpha=alpha)
    _perturb_trainable(policy)
    policy.save_trained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_lora_weights.safetensors"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_latent, safety_checker=None)
    x, t, e = _unet_inputs(policy)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=e).sample
        pipe.load_lora_weights(tmp_path)
        ours = policy.unet(x, t, encoder_hidden_states=e).sample
        assert not torch.allclose(ours, base, atol=1e-3)  # the adapters really change the output
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=e).sample, ours, rtol=1e-4, atol=1e-5)
        pipe.fuse_lora()
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=e).sample, ours, rtol=1e-4, atol=1e-4)


def test_saved_full_unet_loads_in_plain_diffusers(tiny_latent, tmp_path):
    from diffusers import UNet2DConditionModel

    policy = load_policy(str(tiny_latent))
    policy.setup_training("full")
    _perturb_trainable(policy, scale=0.01)
    policy.save_trained(tmp_path)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    loaded = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    fresh = UNet2DConditionModel.from_pretrained(tiny_latent, subfolder="unet")
    x, t, e = _unet_inputs(policy)
    with torch.no_grad():
        ours = policy.unet(x, t, encoder_hidden_states=e).sample
        assert torch.equal(loaded(x, t, encoder_hidden_states=e).sample, ours)
        assert not torch.allclose(fresh(x, t, encoder_hidden_states=e).sample, ours)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_save_state_load_state_round_trip(tiny_latent, tmp_path, mode):
    src = load_policy(str(tiny_latent))
    torch.manual_seed(0)
    src.setup_training(mode)
    _perturb_trainable(src, scale=0.05)
    src.save_state(tmp_path)
    assert (tmp_path / "trainable.safetensors").is_file()
    expected_file = "pytorch_lora_weights.safetensors" if mode == "lora" else "unet"
    assert (tmp_path / expected_file).exists()

    dst = load_policy(str(tiny_latent))
    torch.manual_seed(123)  # a different LoRA init: load_state must overwrite it
    dst.setup_training(mode)
    assert any(not torch.equal(a, dst.named_trainable_state()[n]) for n, a in src.named_trainable_state().items())
    dst.load_state(tmp_path)
    got, want = dst.named_trainable_state(), src.named_trainable_state()
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    x, t, e = _unet_inputs(src)
    with torch.no_grad():
        assert torch.equal(dst.unet(x, t, encoder_hidden_states=e).sample, src.unet(x, t, encoder_hidden_states=e).sample)


def test_load_state_rejects_other_train_mode_or_rank(tiny_latent, tmp_path):
    lora_dir, full_dir = tmp_path / "lora", tmp_path / "full"
    lora_dir.mkdir()
    full_dir.mkdir()
    _lora_policy(tiny_latent).save_state(lora_dir)
    full = load_policy(str(tiny_latent))
    full.setup_training("full")
    full.save_state(full_dir)

    other_full = load_policy(str(tiny_latent))
    other_full.setup_training("full")
    with pytest.raises(ConfigError, match="train_mode"):
        other_full.load_state(lora_dir)
    with pytest.raises(ConfigError, match="train_mode"):
        _lora_policy(tiny_latent).load_state(full_dir)
    with pytest.raises(ConfigError, match="lora_rank"):
        _lora_policy(tiny_latent, rank=2).load_state(lora_dir)  # same names, other shapes
