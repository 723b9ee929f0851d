"""Run directories: safe creation, metrics, atomic checkpoints and sample records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import random_images
from rlbench.config import TrainConfig
from rlbench.errors import RunDirError
from rlbench.utils.images import load_image, load_images
from rlbench.train.rundir import METRIC_KEYS, RunDir, atomic_write_text


def metrics(epoch: int, **extra) -> dict:
    record = {k: 0.0 for k in METRIC_KEYS}
    record.update(epoch=epoch, samples=32 * epoch, reward_queries=32 * epoch, reward_mean=float(epoch), **extra)
    return record


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_create_makes_the_layout(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    assert (run.path / "samples").is_dir() and (run.path / "checkpoints").is_dir()
    assert run.name == "run"
    assert run.read_metrics() == [] and run.checkpoint_epochs() == [] and run.latest_checkpoint() is None
    RunDir.create(tmp_path / "empty-existing")  # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    RunDir.create(tmp_path / "empty")


def test_create_refuses_a_non_empty_directory_and_touches_nothing(tmp_path) -> None:
    path = tmp_path / "run"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(path)
    with pytest.raises(RunDirError) as info:
        RunDir.create(path)
    msg = str(info.value)
    assert "--resume" in msg and "--overwrite" in msg and str(path) in msg
    assert snapshot(path) == before


def test_create_refuses_a_file(tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        RunDir.create(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_overwrite_replaces(tmp_path) -> None:
    path = tmp_path / "run"
    old = RunDir.create(path)
    old.write_config("old = 1\n")
    (path / "stray.txt").write_text("x")
    run = RunDir.create(path, overwrite=True)
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoints", "samples"]


def test_open(tmp_path) -> None:
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    with pytest.raises(RunDirError, match="not an rlbench run directory.*config.toml"):
        RunDir.open(tmp_path / "plain")
    run = RunDir.create(tmp_path / "run")
    cfg = TrainConfig()
    run.write_config(cfg.to_toml())
    opened = RunDir.open(tmp_path / "run")
    assert TrainConfig.from_dict(opened.read_config()) == cfg


def test_metrics_append_read_and_required_keys(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    run.append_metrics(metrics(1, extra_key=3))
    run.append_metrics(metrics(2))
    records = run.read_metrics()
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["extra_key"] == 3  # algorithms may add keys
    assert records[1] == metrics(2)
    bad = metrics(3)
    del bad["approx_kl"]
    with pytest.raises(ValueError, match="approx_kl"):
        run.append_metrics(bad)
    assert len(run.read_metrics()) == 2  # nothing written


def test_nan_metrics_survive(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    run.append_metrics(metrics(1, approx_kl=float("nan")))
    assert np.isnan(run.read_metrics()[0]["approx_kl"])


def test_torn_last_line_is_ignored(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    run.append_metrics(metrics(1))
    run.append_metrics(metrics(2))
    with open(run.metrics_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(metrics(3))[:25])  # killed mid-write
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_truncate_metrics(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    for e in range(1, 6):
        run.append_metrics(metrics(e))
    with open(run.metrics_path, "a", encoding="utf-8") as fh:
        fh.write('{"epoch": 6, "sam')
    run.truncate_metrics(3)
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    assert run.metrics_path.read_text().endswith("}\n")  # torn line gone
    run.append_metrics(metrics(4))
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3, 4]


def write_files(files: dict[str, bytes]):
    def write(folder):
        for name, data in files.items():
            (folder / name).write_bytes(data)

    return write


def test_save_checkpoint(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    final = run.save_checkpoint(1, write_files({"weights.safetensors": b"w1", "state.json": b"{}"}))
    assert final == run.checkpoint_dir(1)
    assert (final / "weights.safetensors").read_bytes() == b"w1"
    assert run.checkpoint_epochs() == [1] and run.latest_checkpoint() == 1
    # Saving the same epoch again replaces it.
    run.save_checkpoint(1, write_files({"weights.safetensors": b"w1b"}))
    assert sorted(p.name for p in run.checkpoint_dir(1).iterdir()) == ["manifest.json", "weights.safetensors"]
    assert (run.checkpoint_dir(1) / "weights.safetensors").read_bytes() == b"w1b"


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    run.save_checkpoint(1, write_files({"weights.safetensors": b"good"}))

    def crashing(folder):
        (folder / "weights.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        run.save_checkpoint(2, crashing)
    assert run.checkpoint_epochs() == [1] and run.latest_checkpoint() == 1
    with pytest.raises(RuntimeError):
        run.save_checkpoint(1, crashing)  # a failed re-save of the same epoch
    assert (run.checkpoint_dir(1) / "weights.safetensors").read_bytes() == b"good"
    assert run.checkpoint_epochs() == [1]
    assert not run.checkpoint_dir(2).exists()


def test_stale_temporary_dirs_are_ignored_and_cleaned(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    run.save_checkpoint(1, write_files({"w": b"1"}))
    stale = run.path / "checkpoints" / ".tmp-0002-abc123"
    stale.mkdir()
    (stale / "w").write_bytes(b"partial")
    assert run.checkpoint_epochs() == [1]
    run.save_checkpoint(2, write_files({"w": b"2"}))
    assert not stale.exists()
    assert run.checkpoint_epochs() == [1, 2]
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["0001", "0002"]


def test_keep_prunes_old_checkpoints(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    for e in range(1, 6):
        run.save_checkpoint(e, write_files({"w": str(e).encode()}), keep=2)
    assert run.checkpoint_epochs() == [4, 5]
    assert (run.checkpoint_dir(5) / "w").read_bytes() == b"5"
    run.save_checkpoint(6, write_files({"w": b"6"}), keep=0)
    assert run.checkpoint_epochs() == [4, 5, 6]


def test_write_samples_round_trips_pixels(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    images = random_images(5, 12, 9, seed=3)
    records = [{"prompt": f"p{i}", "seed": i, "reward": "incompressibility", "score": float(i)} for i in range(5)]
    folder = run.write_samples(3, images, records, grid_columns=2)
    assert folder == run.samples_dir(3)
    assert run.sample_epochs() == [3]
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png", "grid.png", "records.jsonl"]
    back = run.read_sample_records(3)
    assert [r["file"] for r in back] == [f"{i:04d}.png" for i in range(5)]
    assert [{k: v for k, v in r.items() if k != "file"} for r in back] == records
    loaded = load_images([folder / r["file"] for r in back])
    expected = (images * 255).round().clamp(0, 255) / 255  # PNG is lossless after uint8 quantisation
    assert loaded.dtype == torch.float32 and loaded.shape == images.shape
    assert torch.equal(loaded, expected)
    assert (loaded - images).abs().max() <= 0.5 / 255 + 1e-7
    with Image.open(folder / "grid.png") as grid:
        # 3 rows x 2 columns of 12x9 images with 2-pixel white padding
        assert grid.size == (2 * (9 + 2) + 2, 3 * (12 + 2) + 2)
        assert grid.getpixel((0, 0)) == (255, 255, 255)
    assert torch.equal(load_image(folder / "0000.png"), expected[0])


def test_write_samples_replaces_and_ignores_temporaries(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    run.write_samples(1, random_images(2, 4), [{"prompt": "a"}, {"prompt": "b"}])
    run.write_samples(1, random_images(1, 4), [{"prompt": "c"}])
    assert [r["prompt"] for r in run.read_sample_records(1)] == ["c"]
    (run.path / "samples" / ".0002.tmpxyz").mkdir()
    (run.path / "samples" / "0003").mkdir()  # no records.jsonl: incomplete
    assert run.sample_epochs() == [1]


def test_atomic_write_text(tmp_path) -> None:
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["b.txt"]
