"""DDIM-with-log-prob step (rlbench.diffusion.ddim) and the tiny offline SD fixtures."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from rlbench.diffusion import ddim_step_with_logprob
from rlbench.diffusion.ddim import _ddim_mean_and_std
from rlbench.testing import save_tiny_sd_pipeline, tiny_ddim_scheduler

SHAPE = (3, 4, 8, 8)
NUM_STEPS = 10


def _scheduler(num_steps: int = NUM_STEPS, **overrides) -> DDIMScheduler:
    scheduler = tiny_ddim_scheduler(**overrides)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model_output = torch.randn(SHAPE, generator=g).to(dtype)
    sample = torch.randn(SHAPE, generator=g).to(dtype)
    return model_output, sample


def _hand_mean_std(
    scheduler: DDIMScheduler, eps: torch.Tensor, t: int, x: torch.Tensor, eta: float
) -> tuple[torch.Tensor, float]:
    """Epsilon-prediction DDIM transition written out from alphas_cumprod (DDIM eqs. 12, 16)."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t].item()
    a_prev = scheduler.alphas_cumprod[prev_t].item() if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
    return mean, std


# --- (a) mean / sampling agree with diffusers -------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "epsilon"},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"prediction_type": "sample", "clip_sample": True},
        {"prediction_type": "epsilon", "thresholding": True, "sample_max_value": 2.0},
        # prev_t < 0 on the last step must use final_alpha_cumprod (= 1 here, != alphas_cumprod[0]).
        {"prediction_type": "epsilon", "set_alpha_to_one": True},
    ],
    ids=["epsilon", "v_prediction", "sample", "sample-clip", "epsilon-threshold", "alpha-to-one"],
)
def test_mean_at_eta0_equals_scheduler_step(config: dict) -> None:
    scheduler = _scheduler(**config)
    model_output, sample = _inputs()
    assert int(scheduler.timesteps[-1]) - 1000 // NUM_STEPS < 0  # the last step is covered
    for t in scheduler.timesteps:
        mean, _ = _ddim_mean_and_std(scheduler, model_output, t, sample, eta=0.0)
        expected = scheduler.step(model_output, t, sample, eta=0.0).prev_sample
        torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_seeded_sample_equals_scheduler_step(prediction_type: str) -> None:
    scheduler = _scheduler(prediction_type=prediction_type)
    model_output, sample = _inputs()
    for t in scheduler.timesteps:
        ours, _ = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7)
        )
        ref = scheduler.step(
            model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7)
        ).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# --- (b) log-prob is the closed-form Gaussian density -----------------------------------------


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_matches_closed_form(eta: float) -> None:
    scheduler = _scheduler()
    model_output, sample = _inputs()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    dims = tuple(range(1, len(SHAPE)))
    for t in scheduler.timesteps.tolist():
        # Reference in float64 from alphas_cumprod, independent of the code under test.
        mean, std = _hand_mean_std(scheduler, model_output.double(), t, sample.double(), eta)
        normal = torch.distributions.Normal(mean, std)

        # Scoring a given action (off the policy's typical set: 1.5 sigma per dim).
        action = (mean + 1.5 * std * z).float()
        prev, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, prev_sample=action
        )
        assert log_prob.shape == (SHAPE[0],) and log_prob.dtype == torch.float32
        assert torch.equal(prev, action)
        expected = normal.log_prob(action.double()).mean(dims).float()
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-4)

        # Sampling: the density is evaluated at the returned sample.
        prev, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, sample, eta=eta, generator=torch.Generator().manual_seed(t)
        )
        expected = normal.log_prob(prev.double()).mean(dims).float()
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-4)


# --- (c) input validation ----------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, -1.0, float("nan")])
def test_nonpositive_eta_raises(eta: float) -> None:
    model_output, sample = _inputs()
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(_scheduler(), model_output, 901, sample, eta=eta)


def test_requires_set_timesteps() -> None:
    model_output, sample = _inputs()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(tiny_ddim_scheduler(), model_output, 901, sample)


def test_rejects_bad_arguments() -> None:
    scheduler = _scheduler()
    model_output, sample = _inputs()
    with pytest.raises(ValueError, match="not both"):
        ddim_step_with_logprob(
            scheduler, model_output, 901, sample, prev_sample=sample, generator=torch.Generator()
        )
    for bad_t in (-1, 1000, torch.tensor([901, 801])):  # out of range; wrong batch size
        with pytest.raises(ValueError, match="timestep"):
            ddim_step_with_logprob(scheduler, model_output, bad_t, sample)


# --- (d) per-sample timesteps ----------------------------------------------------------------


def test_batched_timesteps_match_per_sample_calls() -> None:
    scheduler = _scheduler()
    model_output, sample = _inputs()
    action = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    timesteps = torch.tensor([901, 1, 401])  # includes the final step (prev_t < 0)
    prev, log_prob = ddim_step_with_logprob(
        scheduler, model_output, timesteps, sample, prev_sample=action
    )
    mean, std = _ddim_mean_and_std(scheduler, model_output, timesteps, sample, eta=1.0)
    assert std.shape == (SHAPE[0], 1, 1, 1)
    for i, t in enumerate(timesteps.tolist()):
        sl = slice(i, i + 1)
        prev_i, log_prob_i = ddim_step_with_logprob(
            scheduler, model_output[sl], t, sample[sl], prev_sample=action[sl]
        )
        mean_i, _ = _ddim_mean_and_std(scheduler, model_output[sl], t, sample[sl], eta=1.0)
        torch.testing.assert_close(prev[sl], prev_i)
        torch.testing.assert_close(log_prob[sl], log_prob_i)
        torch.testing.assert_close(mean[sl], mean_i)


def test_scalar_tensor_timestep_equals_int() -> None:
    scheduler = _scheduler()
    model_output, sample = _inputs()
    _, a = ddim_step_with_logprob(scheduler, model_output, 501, sample, prev_sample=sample)
    _, b = ddim_step_with_logprob(scheduler, model_output, torch.tensor(501), sample, prev_sample=sample)
    _, c = ddim_step_with_logprob(
        scheduler, model_output, torch.full((SHAPE[0],), 501), sample, prev_sample=sample
    )
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


# --- (e) gradients -------------------------------------------------------------------------


def test_gradient_flows_to_model_output_not_prev_sample() -> None:
    scheduler = _scheduler()
    model_output, sample = _inputs()
    model_output.requires_grad_(True)
    action = torch.randn(SHAPE, requires_grad=True)
    _, log_prob = ddim_step_with_logprob(
        scheduler, model_output, torch.tensor([901, 501, 1]), sample, prev_sample=action
    )
    log_prob.sum().backward()
    assert model_output.grad is not None
    assert torch.isfinite(model_output.grad).all() and model_output.grad.abs().sum() > 0
    assert action.grad is None


# --- (f) reduced precision -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    scheduler = _scheduler()
    model_output, sample = _inputs(dtype=dtype)
    for t in scheduler.timesteps.tolist():
        prev, log_prob = ddim_step_with_logprob(
            scheduler, model_output, t, sample, generator=torch.Generator().manual_seed(t)
        )
        assert prev.dtype == dtype and log_prob.dtype == torch.float32
        assert torch.isfinite(log_prob).all()
        # Re-scoring the stored half-precision action reproduces the sampling-time log-prob,
        # so the PPO ratio is exactly 1 before the first update.
        _, rescored = ddim_step_with_logprob(scheduler, model_output, t, sample, prev_sample=prev)
        torch.testing.assert_close(rescored, log_prob, rtol=0, atol=0)


# --- (g) tiny offline SD pipeline ---------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode plus a hard guard: any attempt to open a network connection fails."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time

    def _no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


@pytest.fixture(scope="module")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"), seed=0, sample_size=16)


def test_tiny_pipeline_round_trip(tiny_sd_path: Path, offline: None) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a photo of a cat", "ünïcödé prompt 🐱 ≠ 猫"],
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 32, 32)  # sample_size 16 x vae_scale_factor 2
    assert torch.isfinite(images).all()


def test_tiny_components_load_individually(tiny_sd_path: Path, offline: None) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_sd_path, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    assert (tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_sd_path / "tokenizer" / "vocab.json").is_file()
    assert unet.config.in_channels == vae.config.latent_channels == 4
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert scheduler.config.beta_schedule == "scaled_linear"

    texts = ["", "a photo of a cat", "ÜNÏCÖDÉ 🐱 猫 \t\n  tabs", "x" * 500, "<|endoftext|> in text"]
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (len(texts), tokenizer.model_max_length)
    assert (ids < text_encoder.config.vocab_size).all()
    # Every byte has a token, so nothing maps to unk (= eos) except the real eos/padding.
    decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert decoded[1] == "a photo of a cat"
    assert decoded[2] == "ünïcödé 🐱 猫 tabs"  # CLIP normalisation: lowercase, collapse whitespace
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
    assert hidden.shape == (len(texts), tokenizer.model_max_length, text_encoder.config.hidden_size)
    assert torch.isfinite(hidden).all()


def test_pixel_space_components(tmp_path: Path, offline: None) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = save_tiny_sd_pipeline(tmp_path, seed=1, sample_size=8, latent=False)
    assert not (path / "vae").exists() and not (path / "model_index.json").exists()
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    assert unet.config.in_channels == unet.config.out_channels == 3
    x = torch.randn(2, 3, 8, 8)
    cond = torch.randn(2, 77, text_encoder.config.hidden_size)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500]), cond).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
