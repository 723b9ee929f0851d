"""``shapes-flow``: the shapes world's flow-matching model (SD3 MMDiT, rectified flow, pixel shuffle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rlbench.diffusion.policy import load_policy
from rlbench.diffusion.sampler import Sampler
from rlbench.shapes.flow_model import (SCHEDULER_CONFIG, TRANSFORMER_CONFIG, new_components, pretrain,
                                       save_components, training_sigmas)
from rlbench.shapes.model import vocabulary, world_batches

RLBENCH = str(Path(sys.executable).parent / "rlbench")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    words = vocabulary()
    return save_components(tmp_path_factory.mktemp("shapes-flow") / "model", new_components(words), words)


def test_architecture_is_sd3_sized_for_a_cpu():
    comps = new_components(vocabulary())
    n = sum(p.numel() for p in comps["transformer"].parameters())
    assert 3e6 <= n <= 5e6  # issue 20: of the order of 3-5 M parameters
    assert TRANSFORMER_CONFIG["caption_projection_dim"] == 4 * 32  # heads x head_dim (JointTransformerBlock)
    assert SCHEDULER_CONFIG == {"num_train_timesteps": 1000, "shift": 3.0}  # SD3.5-Medium's


def test_folder_loads_as_a_pixel_flow_policy_and_replays_exactly(random_model):
    policy = load_policy(str(random_model))
    assert type(policy).__name__ == "PixelFlowPolicy" and policy.family == "flow"
    assert policy.latent_shape == (12, 16, 16) and policy.image_size == 32
    policy.setup_training("full")
    sampler = Sampler("flow-sde", 0.7)
    ro = policy.sample(["a red circle", "two blue squares"], num_steps=4, guidance_scale=4.5, sampler=sampler,
                       generator=torch.Generator().manual_seed(0))
    assert ro.images.shape == (2, 3, 32, 32) and float(ro.images.min()) >= 0 and float(ro.images.max()) <= 1
    # The "VAE" is the lossless pixel shuffle: decode(unshuffle(image)) is the image.
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(policy.decode(torch.nn.functional.pixel_unshuffle(x * 2 - 1, 2)), x, atol=1e-6)
    neg = policy.encode_prompts([""])
    for k in range(4):
        lp = policy.step_log_prob(ro.latents[:, k], ro.timesteps[k], ro.latents[:, k + 1], ro.prompt_embeds, neg,
                                  4.5, sampler)
        assert torch.equal(lp, ro.log_probs[:, k])


def test_training_sigmas_are_sd3_logit_normal_on_the_shifted_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    s = training_sigmas(sched, 20_000, torch.Generator().manual_seed(0)).numpy()
    assert s.min() > 0 and s.max() <= 1
    # u = sigmoid(N(0, 1)) has median 0.5; the shifted sigma there is 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert abs(float(np.median(s)) - 0.75) < 0.01


def test_pretraining_runs_and_saves_a_loadable_model(tmp_path):
    out = pretrain(tmp_path / "m", world_batches(3, 4, seed=0), vocabulary(), steps=3, batch_size=4, warmup=1,
                   log=None)
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["steps"] == 3 and meta["sigma_sampling"].startswith("logit-normal")
    assert json.loads((out / "rlbench.json").read_text())["kind"] == "pixel-sd3"
    assert type(load_policy(str(out))).__name__ == "PixelFlowPolicy"


def test_grpo_trains_it_from_the_cli(random_model, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([RLBENCH, "train", "--model", str(random_model), "--algo", "grpo", "--reward",
                           "shapes-clip", "--epochs", "1", "--out", str(tmp_path / "run"),
                           "--set", "sample.num_steps=3", "--set", "sample.batch_size=4",
                           "--set", "sample.num_batches_per_epoch=1", "--set", "sample.images_per_prompt=2",
                           "--set", "train.batch_size=4", "--set", "train.gradient_accumulation_steps=1", "--set", "logging.tensorboard=false",
                           "--set", "model.device=cpu", "--set", "eval.every=0", "--set", "sample.sampler=flow-sde",
                           "--set", "sample.noise_level=0.7", "--set", "model.train_mode=full"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] is not None and rows[0]["optimizer_steps"] >= 1
    # full fine-tuning saves the transformer in diffusers' format
    from diffusers import SD3Transformer2DModel

    SD3Transformer2DModel.from_pretrained(tmp_path / "run" / "checkpoints" / "0001", subfolder="transformer")


def test_models_list_shows_shapes_flow():
    proc = subprocess.run([RLBENCH, "models", "list"], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "shapes-flow" in proc.stdout


def test_continued_pretraining_starts_from_the_init_folders_weights(random_model, tmp_path):
    from safetensors.torch import load_file

    # lr 0: the EMA of unchanged weights is those weights, so the saved model must equal --init's exactly
    out = pretrain(tmp_path / "m", world_batches(2, 4, seed=1), vocabulary(), steps=2, batch_size=4, warmup=1,
                   lr=0.0, log=None, init=random_model)
    for sub, name in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = load_file(random_model / sub / name), load_file(out / sub / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["init"] == str(random_model) and meta["steps"] == 2


def test_continued_pretraining_refuses_another_familys_folder(tmp_path):
    from rlbench.shapes.model import shipped_weights

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([RLBENCH, "shapes", "pretrain", "--family", "flow", "--init", str(shipped_weights()),
                           "--out", str(tmp_path / "m"), "--steps", "1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no transformer/config.json" in proc.stderr and not (tmp_path / "m").exists()
