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
