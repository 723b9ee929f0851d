"""Stable Diffusion XL in the DDIM family, on diffusers' own tiny SDXL test components (CPU, offline): the
builder, the conditioning (two encoders, pooled, micro-conditioning, force_zeros_for_empty_prompt), DDIM
sampling against ``StableDiffusionXLPipeline`` itself, exact stored log-probs, the saved LoRA in plain diffusers,
and training from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlbench.diffusion.conditioning import Conditioning
from rlbench.diffusion.policy import DiffusionPolicy, load_policy
from rlbench.diffusion.sampler import Sampler, model_family, pipeline_kind
from rlbench.testing import SDXL_VAE_SCALING_FACTOR, TINY_SDXL_IMAGE_SIZE, save_tiny_sdxl_pipeline

RLBENCH = str(Path(sys.executable).parent / "rlbench")
STEPS = 3
PROMPTS = ["a painting of a squirrel", "a dog", "a painting of a squirrel"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-models") / "tiny-sdxl")


@pytest.fixture(scope="module")
def policy(tiny) -> DiffusionPolicy:
    return load_policy(str(tiny))


def _pipe(policy: DiffusionPolicy):
    """A StableDiffusionXLPipeline over the policy's own modules, with the same DDIM scheduler config."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**policy.pipe.components, add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_inputs(policy: DiffusionPolicy, batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *policy.latent_shape, generator=g)
    t = torch.tensor([900, 41][:batch])
    cond = policy.encode_prompts(["a cat", "a dog"][:batch])
    added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    return x, t, cond["embeds"], added


# -- the builder and loading ---------------------------------------------------------------------------


def test_the_builder_saves_a_folder_that_loads_by_path(tiny):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.model_max_length == 77
    assert pipe.vae.config.scaling_factor == SDXL_VAE_SCALING_FACTOR and pipe.vae.config.force_upcast
    assert pipeline_kind(tiny) == "sdxl" and model_family(str(tiny)) == "ddim"

    policy = load_policy(str(tiny))
    assert isinstance(policy, DiffusionPolicy) and policy.kind == "sdxl" and policy.family == "ddim"
    assert isinstance(policy.scheduler, DDIMScheduler) and policy.pipe.scheduler is policy.scheduler
    assert not policy.scheduler.config.clip_sample and not policy.scheduler.config.set_alpha_to_one
    assert policy.latent_shape == (4, 32, 32) and policy.image_size == TINY_SDXL_IMAGE_SIZE
    frozen = policy._frozen_modules()
    assert policy.text_encoder_2 in frozen and not any(p.requires_grad for m in frozen for p in m.parameters())
    # The same weights again from the same seed; another seed differs.
    again = save_tiny_sdxl_pipeline(tiny.parent / "again")
    other = save_tiny_sdxl_pipeline(tiny.parent / "other", seed=1)
    for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder_2", "model.safetensors")):
        assert (tiny / sub / name).read_bytes() == (again / sub / name).read_bytes()
        assert (tiny / sub / name).read_bytes() != (other / sub / name).read_bytes()


def test_load_policy_on_a_broken_sdxl_folder_is_a_config_error(tiny, tmp_path):
    import shutil

    from rlbench.errors import ConfigError

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match="StableDiffusionXLPipeline"):
        load_policy(str(broken))


# -- the conditioning ----------------------------------------------------------------------------------


def test_conditioning_is_the_pipelines_encode_prompt_plus_micro_conditioning(policy):
    cond = policy.encode_prompts(PROMPTS)
    assert isinstance(cond, Conditioning) and set(cond.batched) == {"embeds", "pooled", "time_ids"}
    assert cond["embeds"].shape == (3, 77, 64)  # 32 + 32 (real SDXL: 768 + 1280 = 2048)
    assert cond["pooled"].shape == (3, 32)  # text_encoder_2's projection (real SDXL: 1280)
    h = w = TINY_SDXL_IMAGE_SIZE
    assert torch.equal(cond["time_ids"], torch.tensor([[h, w, 0, 0, h, w]] * 3, dtype=torch.float32))
    embeds, _, pooled, _ = policy.pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(cond["embeds"], embeds) and torch.equal(cond["pooled"], pooled)
    add = policy.pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=torch.float32,
                                        text_encoder_projection_dim=policy.text_encoder_2.config.projection_dim)
    assert torch.equal(cond["time_ids"][:1], add)
    # Rows index, repeat and concatenate like any conditioning.
    assert torch.equal(cond[[1]]["pooled"], cond["pooled"][1:2])
    assert Conditioning.pair(policy.encode_prompts([""]), cond)["time_ids"].shape == (6, 6)


def test_the_empty_prompt_is_zeros_when_force_zeros_for_empty_prompt(policy):
    neg = policy.encode_prompts([""])
    assert torch.equal(neg["embeds"], torch.zeros(1, 77, 64)) and torch.equal(neg["pooled"], torch.zeros(1, 32))
    # What the pipeline uses as the unconditional input when no negative prompt is given.
    _, uncond, _, uncond_pooled = policy.pipe.encode_prompt(["a dog"], device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(uncond, neg["embeds"]) and torch.equal(uncond_pooled, neg["pooled"])
    mixed = policy.encode_prompts(["a dog", ""])
    assert torch.equal(mixed["embeds"][1], neg["embeds"][0]) and mixed["embeds"][0].abs().sum() > 0
    policy.pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        encoded = policy.encode_prompts([""])
        _, want, _, want_pooled = policy.pipe.encode_prompt(["a dog"], device="cpu", negative_prompt="",
                                                             do_classifier_free_guidance=True)
        assert encoded["embeds"].abs().sum() > 0
        assert torch.equal(encoded["embeds"], want) and torch.equal(encoded["pooled"], want_pooled)
    finally:
        policy.pipe.register_to_config(force_zeros_for_empty_prompt=True)


def test_guided_eps_passes_the_added_conditioning(policy):
    x, t, e, added = _unet_inputs(policy)
    cond, neg = policy.encode_prompts(["a cat", "a dog"]), policy.encode_prompts([""])
    with torch.no_grad():
        want_c = policy.unet(x, t, encoder_hidden_states=e, added_cond_kwargs=added).sample
        assert torch.equal(policy.guided_eps(x, t, cond, neg, 1.0), want_c)
        n = neg.expand(2)
        want_u = policy.unet(x, t, encoder_hidden_states=n["embeds"],
                             added_cond_kwargs={"text_embeds": n["pooled"], "time_ids": n["time_ids"]}).sample
        got = policy.guided_eps(x, t, cond, neg, 5.0)
        torch.testing.assert_close(got, want_u + 5.0 * (want_c - want_u), rtol=0, atol=1e-5)
        # The micro-conditioning reaches the UNet: other sizes give another output.
        other = Conditioning({**cond.batched, "time_ids": cond["time_ids"] * 2})
        assert not torch.allclose(policy.guided_eps(x, t, other, neg, 1.0), want_c, atol=1e-4)


# -- sampling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_deterministic_ddim_reproduces_the_diffusers_sdxl_pipeline(policy, negative):
    prompts = PROMPTS[:2]
    noise = policy.initial_noise(2, torch.Generator().manual_seed(7))
    ro = policy.sample(prompts, num_steps=STEPS, guidance_scale=5.0, eta=0.0, generator=torch.Generator(),
                       initial_noise=noise, negative_prompt=negative)
    pipe = _pipe(policy)
    kw = {"negative_prompt": [negative] * 2} if negative else {}  # "" = no negative prompt: the zeros
    want = pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, latents=noise.clone(), output_type="latent",
                **kw).images
    assert want.shape == (2, 4, 32, 32)
    torch.testing.assert_close(ro.final, want, rtol=0, atol=1e-5)
    images = pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, latents=noise.clone(), output_type="pt",
                  **kw).images
    torch.testing.assert_close(ro.images, images, rtol=0, atol=1e-5)  # decoded with scaling_factor 0.13025
    assert ro.images.shape == (2, 3, TINY_SDXL_IMAGE_SIZE, TINY_SDXL_IMAGE_SIZE)


def test_stored_log_probs_equal_recomputed(policy):
    ro = policy.sample(PROMPTS, num_steps=STEPS, guidance_scale=5.0, eta=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert ro.latents.shape == (3, STEPS + 1, 4, 32, 32) and ro.log_probs.shape == (3, STEPS)
    neg = policy.encode_prompts([""])
    with torch.no_grad():
        for k in range(STEPS):
            lp = policy.step_log_prob(ro.latents[:, k], ro.timesteps[k], ro.latents[:, k + 1], ro.prompt_embeds,
                                      neg, 5.0, Sampler("ddim", 1.0))
            assert torch.equal(lp, ro.log_probs[:, k])
            assert torch.equal(torch.exp(lp - ro.log_probs[:, k]), torch.ones(3))


def test_fp16_frozen_weights_keep_a_force_upcast_vae_in_float32(tiny):
    policy = load_policy(str(tiny))
    policy.setup_training("lora")
    policy.to("cpu", torch.float16)
    assert policy.vae.dtype == torch.float32 and policy.text_encoder_2.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    policy.to("cpu", torch.bfloat16)  # the pipeline upcasts fp16 only
    assert policy.vae.dtype == torch.bfloat16


# -- the saved LoRA ---------------------------------------------------------------------------------------


def test_saved_lora_loads_with_the_sdxl_pipeline(tiny, tmp_path):
    policy = load_policy(str(tiny))
    torch.manual_seed(0)
    policy.setup_training("lora", rank=4, alpha=8.0)  # alpha / r = 2, folded into B
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    policy.save_trained(tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    base, ours, loaded = _lora_outputs(policy, tiny, tmp_path)
    assert not torch.allclose(ours, base, atol=1e-3)
    torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-5)


def _lora_outputs(policy, tiny, adapter):
    """UNet outputs on one input: the base pipeline's, the policy's, and the pipeline's after load_lora_weights."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny)
    x, t, e, added = _unet_inputs(policy)
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=e, added_cond_kwargs=added).sample
        pipe.load_lora_weights(adapter)
        ours = policy.unet(x, t, encoder_hidden_states=e, added_cond_kwargs=added).sample
        return base, ours, pipe.unet(x, t, encoder_hidden_states=e, added_cond_kwargs=added).sample


# -- the CLI ------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLBENCH, *args], env=_env(), capture_output=True, text=True, timeout=600)


def test_cli_trains_sdxl_and_the_checkpoint_loads_in_diffusers(tiny, tmp_path):
    from rlbench.train.rundir import load_trained_policy

    out = tmp_path / "run"
    proc = _run("train", "--model", str(tiny), "--algo", "ddpo-is", "--reward", "incompressibility", "--epochs", "2",
                "--set", "sample.num_steps=3", "--set", "sample.batch_size=4",
                "--set", "sample.num_batches_per_epoch=1", "--set", "train.batch_size=2",
                "--set", "train.gradient_accumulation_steps=1", "--set", "logging.tensorboard=false",
                "--set", "model.device=cpu", "--set", "eval.every=0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["loss"] == r["loss"] for r in rows)
    ckpt = out / "checkpoints" / "0002"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    policy = load_trained_policy(out)
    assert policy.kind == "sdxl"
    base, ours, loaded = _lora_outputs(policy, tiny, ckpt)
    assert not torch.equal(ours, base)  # two epochs moved the adapters
    torch.testing.assert_close(loaded, ours, rtol=0, atol=1e-5)


def test_models_list_shows_sd_xl():
    proc = _run("models", "list")
    assert proc.returncode == 0, proc.stderr
    assert "sd-xl" in proc.stdout
    from rlbench.registry import MODELS

    factory = MODELS.load("sd-xl")
    assert factory.eval_defaults["prompt_sets"] == ["unseen-animals", "everyday-objects"]
    assert model_family("sd-xl") == "ddim"
