"""The shapes-world text-to-image model: tokenizer, pretraining loop, loading, quality table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlbench.errors import WeightsNotAvailable
from rlbench.shapes import model as shapes_model
from rlbench.shapes.grammar import all_prompts


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "model"
    batches = shapes_model.world_batches(steps=3, batch_size=8, seed=0)
    shapes_model.pretrain(out, batches, shapes_model.vocabulary(), steps=3, batch_size=8, warmup=2, log=None)
    return out


def test_every_world_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    shapes_model.write_tokenizer(tmp_path, shapes_model.vocabulary())
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=shapes_model.MAX_TOKENS)
    for word in shapes_model.vocabulary():
        assert len(tok(word).input_ids) == 3, word  # BOS, the word, EOS
    longest = max(all_prompts(), key=lambda p: len(p.split()))
    assert len(tok(longest).input_ids) <= shapes_model.MAX_TOKENS
    assert len(tok("a pink hexagon, übrigens").input_ids) > 3  # other text still encodes (bytes)


def test_world_batches_are_the_same_with_worker_processes():
    a = list(shapes_model.world_batches(steps=2, batch_size=4, seed=7, workers=0))
    b = list(shapes_model.world_batches(steps=2, batch_size=4, seed=7, workers=2))
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


def test_pretraining_writes_a_loadable_diffusers_folder(pretrained):
    from rlbench.diffusion.policy import load_policy

    meta = json.loads((pretrained / "pretrain.json").read_text())
    assert meta["steps"] == 3
    policy = load_policy(str(pretrained))
    assert policy.vae is None and policy.image_size == 32
    out = policy.sample(["a red circle", "two blue squares"], num_steps=2, eta=1.0, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.log_probs).all()


def test_quality_table_reports_matching_and_mismatched(pretrained):
    from rlbench.diffusion.policy import load_policy
    from rlbench.shapes.quality import quality_table

    table = quality_table(load_policy(str(pretrained)), splits=["train"], n=4, num_steps=2)
    assert set(table.columns) == {"split", "template", "n", "matching", "mismatched", "aesthetic_gold"}
    assert table.loc[table.template == "all", "n"].item() == 4
    assert table[["matching", "mismatched", "aesthetic_gold"]].apply(lambda c: c.between(0, 1)).all().all()


def test_missing_shipped_weights_name_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(shapes_model, "shipped_weights", lambda: tmp_path / "absent")
    with pytest.raises(WeightsNotAvailable, match="rlbench shapes pretrain"):
        shapes_model.load_shapes_model()


def test_tokenizer_files_are_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shapes_model.write_tokenizer(a, shapes_model.vocabulary())
    shapes_model.write_tokenizer(b, list(reversed(shapes_model.vocabulary())))
    for name in ("vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


# -- the shipped model --------------------------------------------------------------------------------


def test_shipped_model_loads_offline_and_follows_prompts():
    """A quick gold check: samples satisfy their own prompts' facts far more often than others'.

    (A mismatched single-object prompt still shares the "exactly one object" fact, so ~0.35 is its floor.)"""
    from rlbench import load_policy
    from rlbench.shapes.analyser import gold_scores
    from rlbench.shapes.quality import sample_images

    policy = load_policy("shapes")
    assert policy.name == "shapes" and policy.default_prompts == "shapes-train"
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"] * 8
    images = sample_images(policy, prompts, num_steps=20, seed=0)
    own = gold_scores(images, prompts).mean()
    other = gold_scores(images, prompts[1:] + prompts[:1]).mean()
    assert own > other + 0.12, (own, other)  # measured 0.625 vs 0.391 (seed 0), 0.578 vs 0.359 (seed 1)


def test_shipped_weights_fit_the_size_budget_and_are_safetensors():
    folder = shapes_model.shipped_weights()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
    meta = json.loads((folder / "pretrain.json").read_text())
    assert meta["batch_size"] > 0 and meta["steps"] > 0


def test_default_train_then_quality_of_the_run(tmp_path):
    """`rlbench train` with (almost) no options uses the shapes model and its presets; `shapes quality
    --run` measures the trained policy."""
    from helpers import run_cli

    out = tmp_path / "run"
    small = ["--set", "sample.num_steps=3", "--set", "sample.batch_size=4", "--set", "sample.num_batches_per_epoch=1",
             "--set", "train.batch_size=4", "--set", "logging.tensorboard=false", "--set", "sample.images_per_prompt=2"]
    proc = run_cli(["train", "--epochs", "1", "--out", str(out), *small])
    assert proc.returncode == 0, proc.stderr
    config = (out / "config.toml").read_text()
    assert 'name = "shapes"' in config and 'name = "shapes-clip"' in config and 'name = "shapes-demo"' in config
    assert "watch_mean/shapes-gold" in (out / "metrics.jsonl").read_text()
    proc = run_cli(["shapes", "quality", "--run", str(out), "--n", "4", "--steps", "2", "--splits", "heldout-counts"])
    assert proc.returncode == 0, proc.stderr
    assert "| heldout-counts | all | 4 |" in proc.stdout
    bad = run_cli(["shapes", "quality", "--run", str(out), "--splits", "heldout-colours"])
    assert bad.returncode == 2 and "unknown shapes split" in bad.stderr


def test_zero_snr_schedule_is_lin_et_als_and_its_v_target_is_diffusers():
    """Lin et al. 2023's fixes: zero terminal SNR, sampling from t = 999, and the v target (diffusers' get_velocity);
    the shipped schedule keeps its flaw (terminal alpha-bar 4.0e-5, sampling from t = 901)."""
    from diffusers import DDIMScheduler

    old, new = (DDIMScheduler(**shapes_model.SCHEDULES[k]) for k in ("ddpm", "zero-snr"))
    assert float(old.alphas_cumprod[-1]) == pytest.approx(4.036e-5, rel=1e-3) and float(new.alphas_cumprod[-1]) == 0.0
    assert float(new.alphas_cumprod[0]) == pytest.approx(float(old.alphas_cumprod[0]))  # Algorithm 1 keeps t = 0
    old.set_timesteps(10)
    new.set_timesteps(10)
    assert int(old.timesteps[0]) == 901 and int(new.timesteps[0]) == 999
    x0, noise = torch.randn(3, 12, 16, 16), torch.randn(3, 12, 16, 16)
    t = torch.tensor([0, 500, 999])
    a = new.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(shapes_model.training_target(x0, noise, a, True), new.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.equal(shapes_model.training_target(x0, noise, a, False), noise)


def test_zero_snr_pretraining_samples_from_pure_noise(tmp_path):
    from rlbench.diffusion.policy import load_policy

    out = tmp_path / "m"
    shapes_model.pretrain(out, shapes_model.world_batches(steps=2, batch_size=4, seed=0), shapes_model.vocabulary(),
                          steps=2, batch_size=4, warmup=1, log=None, schedule="zero-snr")
    assert json.loads((out / "pretrain.json").read_text())["schedule"] == "zero-snr"
    policy = load_policy(str(out))
    assert policy.scheduler.config.prediction_type == "v_prediction"
    ro = policy.sample(["a red circle"], num_steps=3, eta=1.0, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ro.images).all() and torch.isfinite(ro.log_probs).all()
    neg = policy.encode_prompts([""])
    for k in range(3):  # the first step starts at alpha-bar 0: its log-probability replays exactly
        lp = policy.step_log_prob(ro.latents[:, k], ro.timesteps[k], ro.latents[:, k + 1], ro.prompt_embeds, neg, 5.0,
                                  1.0)
        assert torch.equal(lp, ro.log_probs[:, k])


def test_pretrain_cli_refuses_a_schedule_it_does_not_know_before_writing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    rlbench = str(Path(sys.executable).parent / "rlbench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for args, message in ((["--schedule", "cosine"], "--schedule must be one of ddpm, zero-snr"),
                          (["--family", "flow", "--schedule", "zero-snr"], "--schedule is for --family ddim")):
        proc = subprocess.run([rlbench, "shapes", "pretrain", "--out", str(tmp_path / "m"), "--steps", "1", *args],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "m").exists()
