"""Checkpoints that survive corruption: manifests, resume from the newest intact checkpoint, and a
clear one-line error (never a traceback) for every run file that does not decode."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import user_error
from rlbench.cli import app
from rlbench.errors import RunDirError
from rlbench.testing import save_tiny_sd_pipeline
from rlbench.train.rundir import CHECKPOINT_FILES, MANIFEST_FILE, METRIC_KEYS, RunDir, verify_checkpoint

FILES = {
    "trainable.safetensors": b"t" * 64,
    "optimizer.pt": b"o" * 48,
    "rng.safetensors": b"r" * 32,
    "trainer_state.json": b'{"epoch": 1}',
    "unet/diffusion_pytorch_model.safetensors": b"u" * 80,
    "unet/config.json": b"{}",
}


def write_files(files: dict[str, bytes]):
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)

    return write


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def run_with_checkpoints(tmp_path: Path, epochs=(1, 2, 3), **kw) -> RunDir:
    run = RunDir.create(tmp_path / "run")
    run.write_config('[run]\nepochs = 3\n')
    for e in epochs:
        run.save_checkpoint(e, write_files(FILES), **kw)
    return run


# -- manifests ------------------------------------------------------------------------------------------

def test_manifest_lists_every_file_with_size_and_sha256_and_is_written_last(tmp_path) -> None:
    run = run_with_checkpoints(tmp_path, epochs=(1,))
    folder = run.checkpoint_dir(1)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format"] == 1
    assert set(manifest["files"]) == set(FILES)  # subfolders included, the manifest itself not
    for name, data in FILES.items():
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    last = (folder / MANIFEST_FILE).stat().st_mtime_ns
    assert all((folder / name).stat().st_mtime_ns <= last for name in FILES)
    check = verify_checkpoint(folder)
    assert check.intact and not check.legacy and check.problems == ()


def test_a_writer_may_not_write_its_own_manifest(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    with pytest.raises(ValueError, match="manifest.json"):
        run.save_checkpoint(1, write_files({MANIFEST_FILE: b"{}"}))
    assert run.checkpoint_epochs() == []


@pytest.mark.parametrize("damage, name, problem", [
    (truncate, "trainable.safetensors", "is truncated (32 of 64 bytes)"),
    (Path.unlink, "unet/diffusion_pytorch_model.safetensors", "is missing"),
    (flip_byte, "optimizer.pt", "is corrupt"),
    (lambda p: p.write_bytes(p.read_bytes() + b"x"), "rng.safetensors", "has 33 bytes instead of 32"),
    (lambda p: p.write_text('{"files": [1, 2'), MANIFEST_FILE, "is unreadable"),
    (lambda p: p.write_text('{"files": {"../../config.toml": {"size": 1, "sha256": "x"}}}'), MANIFEST_FILE,
     "is unreadable"),
])
def test_verify_names_the_damaged_file(tmp_path, damage, name, problem) -> None:
    run = run_with_checkpoints(tmp_path, epochs=(1,))
    damage(run.checkpoint_dir(1) / name)
    check = run.verify_checkpoint(1)
    assert not check.intact and not check.legacy
    assert len(check.problems) == 1 and check.problems[0].startswith(f"{name} {problem}"), check.problems


def test_the_quick_check_sees_sizes_but_not_flipped_bytes(tmp_path) -> None:
    run = run_with_checkpoints(tmp_path, epochs=(1,))
    flip_byte(run.checkpoint_dir(1) / "optimizer.pt")
    assert run.verify_checkpoint(1, hashes=False).intact
    assert not run.verify_checkpoint(1).intact


# -- choosing the checkpoint to resume from ---------------------------------------------------------------

def test_latest_intact_checkpoint_skips_damaged_ones_names_them_and_deletes_nothing(tmp_path) -> None:
    run = run_with_checkpoints(tmp_path)
    assert run.latest_intact_checkpoint() == (3, [])
    truncate(run.checkpoint_dir(3) / "trainable.safetensors")
    before = snapshot(run.path)
    epoch, notices = run.latest_intact_checkpoint()
    assert epoch == 2 and len(notices) == 1
    assert "0003" in notices[0] and "trainable.safetensors is truncated" in notices[0] and "0002" in notices[0]
    flip_byte(run.checkpoint_dir(2) / "rng.safetensors")
    epoch, notices = run.latest_intact_checkpoint()
    assert epoch == 1 and len(notices) == 2 and "rng.safetensors is corrupt" in notices[1]
    (run.checkpoint_dir(1) / "optimizer.pt").unlink()
    before = snapshot(run.path)
    with pytest.raises(RunDirError) as info:
        run.latest_intact_checkpoint()
    msg = str(info.value)
    assert "no intact checkpoint" in msg and "--overwrite" in msg and "--out" in msg and "\n" not in msg
    for part in ("0001: optimizer.pt is missing", "0002: rng.safetensors is corrupt", "0003: trainable.safetensors"):
        assert part in msg
    assert snapshot(run.path) == before  # nothing deleted or changed
    assert run.checkpoint_epochs() == [1, 2, 3]


def test_a_run_without_checkpoints_resumes_from_the_start(tmp_path) -> None:
    assert RunDir.create(tmp_path / "run").latest_intact_checkpoint() == (None, [])


def test_legacy_checkpoints_without_manifest_are_accepted_when_complete(tmp_path) -> None:
    run = run_with_checkpoints(tmp_path, epochs=(1, 2))
    for e in (1, 2):
        (run.checkpoint_dir(e) / MANIFEST_FILE).unlink()
    epoch, notices = run.latest_intact_checkpoint()
    assert epoch == 2 and len(notices) == 1 and "no manifest.json" in notices[0] and "older rlbench" in notices[0]
    assert run.verify_checkpoint(2).legacy
    (run.checkpoint_dir(2) / "trainer_state.json").write_bytes(b"")
    epoch, notices = run.latest_intact_checkpoint()
    assert epoch == 1 and "trainer_state.json is empty" in notices[0]
    (run.checkpoint_dir(1) / "rng.safetensors").unlink()
    with pytest.raises(RunDirError, match="rng.safetensors is missing"):
        run.latest_intact_checkpoint()
    assert set(CHECKPOINT_FILES) <= set(FILES)


def test_saving_an_epoch_again_replaces_a_damaged_checkpoint(tmp_path) -> None:
    run = run_with_checkpoints(tmp_path)
    truncate(run.checkpoint_dir(3) / "optimizer.pt")
    (run.path / "checkpoints" / ".old-0003-123").mkdir()  # a swap interrupted by a kill
    assert run.latest_intact_checkpoint()[0] == 2
    run.save_checkpoint(3, write_files(FILES))
    assert run.latest_intact_checkpoint() == (3, [])
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["0001", "0002", "0003"]


def test_keep_counts_only_intact_checkpoints(tmp_path) -> None:
    run = run_with_checkpoints(tmp_path, keep=3)
    truncate(run.checkpoint_dir(3) / "trainable.safetensors")
    run.save_checkpoint(5, write_files(FILES), keep=2)
    # The intact 2 and 5 are kept; the damaged 3 (newer than 2) is left in place; 1 is pruned.
    assert run.checkpoint_epochs() == [2, 3, 5]
    run.save_checkpoint(6, write_files(FILES), keep=2)
    assert run.checkpoint_epochs() == [5, 6]


# -- files read back --------------------------------------------------------------------------------------

def metrics(epoch: int) -> dict:
    return {**{k: 0.0 for k in METRIC_KEYS}, "epoch": epoch}


def test_metrics_torn_last_line_is_dropped_with_a_notice(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    for e in range(3):
        run.append_metrics(metrics(e))
    with open(run.metrics_path, "ab") as fh:
        fh.write(json.dumps(metrics(3)).encode()[:20])
    notices: list[str] = []
    assert [r["epoch"] for r in run.read_metrics(notices)] == [0, 1, 2]
    assert len(notices) == 1 and "torn last line (line 4" in notices[0]
    notices = run.truncate_metrics(1)
    assert len(notices) == 1 and "metrics.jsonl" in notices[0]
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1]


@pytest.mark.parametrize("line", ['{"epoch": 1, "loss": 0.', "[1, 2]", '{"loss": 1.0}', "\xff\xfe garbage"])
def test_metrics_damaged_earlier_line_names_the_line(tmp_path, line) -> None:
    run = RunDir.create(tmp_path / "run")
    run.append_metrics(metrics(0))
    with open(run.metrics_path, "ab") as fh:
        fh.write(line.encode("latin-1") + b"\n")
    run.append_metrics(metrics(2))
    before = run.metrics_path.read_bytes()
    for call in (run.read_metrics, lambda: run.truncate_metrics(0)):
        with pytest.raises(RunDirError, match=r"metrics.jsonl is damaged at line 2") as info:
            call()
        assert "\n" not in str(info.value)
    assert run.metrics_path.read_bytes() == before


def test_a_damaged_last_line_with_its_newline_is_not_torn(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    run.append_metrics(metrics(0))
    with open(run.metrics_path, "ab") as fh:
        fh.write(b"\x00\x00\x00\n")
    with pytest.raises(RunDirError, match="line 2"):
        run.read_metrics()


def test_damaged_config_and_sample_records_name_the_file(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run")
    run.write_config("[run]\nepochs = 3\n[sample")
    with pytest.raises(RunDirError, match=r"config.toml is damaged.*TOML") as info:
        RunDir.open(run.path)
    assert "\n" not in str(info.value)
    (run.path / "samples" / "0000").mkdir()
    (run.path / "samples" / "0000" / "records.jsonl").write_text('{"file": "0000.png"}\n{"file": "00')
    with pytest.raises(RunDirError, match=r"records.jsonl is damaged at line 2"):
        run.read_sample_records(0)


# -- training runs ------------------------------------------------------------------------------------------

SMALL = [
    "sample.num_steps=2", "sample.batch_size=2", "sample.num_batches_per_epoch=1", "sample.async_reward=false",
    "train.batch_size=1", "train.gradient_accumulation_steps=2", "logging.num_samples=2",
    "logging.tensorboard=false", "advantage.buffer_size=4", "advantage.min_count=2", "model.device=cpu",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 3-epoch run of the tiny random SD pipeline, checkpoints 1, 2, 3 (never modified)."""
    from rlbench.train.trainer import train

    root = tmp_path_factory.mktemp("integrity")
    tiny = save_tiny_sd_pipeline(root / "tiny-sd", sample_size=16)
    out = root / "run"
    values = {"run": {"epochs": 3, "out": str(out), "seed": 3}, "model": {"name": str(tiny)},
              "algorithm": {"name": "ddpo-is"}, "reward": {"name": "incompressibility"}}
    train(values=values, overrides=SMALL, log=None)
    return out


@pytest.fixture
def copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "copy"))


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def _weights(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"{epoch:04d}" / "trainable.safetensors"))


def test_resume_after_a_truncated_checkpoint_matches_the_uninterrupted_run(trained, copy) -> None:
    from rlbench.train.trainer import train

    last = copy / "checkpoints" / "0003"
    truncate(last / "trainable.safetensors")
    with open(copy / "metrics.jsonl", "a") as fh:  # and a torn metrics line, as a kill mid-append leaves
        fh.write('{"epoch": 3, "samp')
    lines: list[str] = []
    train(resume=copy, log=lines.append)
    text = "\n".join(lines)
    assert "0003" in text and "trainable.safetensors is truncated" in text and "left in place" in text
    assert "torn last line" in text and "resuming after epoch 2" in text

    a, b = _weights(trained, 3), _weights(copy, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = _weights(trained, 2)
    assert any(not torch.equal(a[k], before[k]) for k in a)  # epoch 3 did change the weights
    assert _rows(copy) == _rows(trained)
    assert RunDir(copy).verify_checkpoint(3).intact  # the damaged checkpoint was replaced by a good one
    assert (last / "optimizer.pt").read_bytes() == (trained / "checkpoints" / "0003" / "optimizer.pt").read_bytes()


def test_resume_accepts_legacy_checkpoints(copy) -> None:
    from rlbench.train.trainer import train

    for e in (1, 2, 3):
        (copy / "checkpoints" / f"{e:04d}" / MANIFEST_FILE).unlink()
    lines: list[str] = []
    train(resume=copy, log=lines.append)  # nothing to train: the checkpoint is still loaded
    assert any("no manifest.json" in line for line in lines) and any("nothing to do" in line for line in lines)


def _legacy(name: str, damage):
    def apply(run: Path) -> None:
        folder = run / "checkpoints" / "0003"
        (folder / MANIFEST_FILE).unlink()  # no manifest: only decoding can find the damage
        damage(folder / name)

    return apply


def _damage_all(run: Path) -> None:
    for e in (1, 2, 3):
        truncate(run / "checkpoints" / f"{e:04d}" / "trainable.safetensors")


@pytest.mark.parametrize("damage, fragments", [
    (_damage_all, ["no intact checkpoint", "0001: trainable.safetensors is truncated", "0003:", "--overwrite"]),
    (lambda run: (run / "config.toml").write_text("[run\nepochs = 3\n"), ["config.toml is damaged", "TOML"]),
    (lambda run: flip_byte(run / "metrics.jsonl"), ["metrics.jsonl is damaged at line"]),
    (_legacy("trainer_state.json", lambda p: p.write_text('{"epoch": 3, "world_')),
     ["trainer_state.json cannot be read", "0003"]),
    (_legacy("trainer_state.json", lambda p: p.write_text('{"epoch": 3, "world_size": 1}')),
     ["trainer_state.json cannot be read (KeyError"]),
    (_legacy("optimizer.pt", truncate), ["optimizer.pt cannot be read", "0003"]),
    (_legacy("rng.safetensors", truncate), ["rng.safetensors cannot be read"]),
    (_legacy("trainable.safetensors", truncate), ["trainable.safetensors cannot be read"]),
], ids=["none-intact", "config", "metrics", "state-json", "state-keys", "optimizer", "rng", "trainable"])
def test_cli_resume_of_a_damaged_run_is_one_error_line(runner, copy, damage, fragments) -> None:
    damage(copy)
    before = snapshot(copy)
    user_error(runner.invoke(app, ["train", "--resume", str(copy)]), *fragments)
    assert snapshot(copy) == before  # a failed resume deletes and changes nothing
