"""Run directories: the contract between ``rlbench train`` and ``rlbench eval``.

::

    runs/<run>/config.toml            the resolved configuration
    runs/<run>/metrics.jsonl          one JSON object per epoch (see METRIC_KEYS)
    runs/<run>/samples/<epoch>/       images (PNG) + records.jsonl (file, prompt, seed, reward, score)
    runs/<run>/checkpoints/<epoch>/   weights (safetensors), optimizer, RNG and tracker state
    runs/<run>/tb/                    TensorBoard events

Writes are atomic (temporary file or directory, then rename), so a kill at any moment leaves the
last good state intact. A new run never writes into an existing non-empty directory unless asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlbench.errors import ConfigError, RunDirError

if TYPE_CHECKING:
    from rlbench.diffusion.policy import DiffusionPolicy

# Keys every metrics.jsonl record carries (DESIGN.md); algorithms may add more.
METRIC_KEYS = (
    "epoch", "samples", "reward_queries", "reward_mean", "reward_std",
    "loss", "approx_kl", "clipfrac", "seconds",
)
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def epoch_dirname(epoch: int) -> str:
    return f"{epoch:04d}"


class RunDir:
    """A run directory on disk. Create with :meth:`create` (new run) or :meth:`open` (existing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- creation -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> RunDir:
        """Start a new run at ``path``; an existing non-empty directory is an error unless ``overwrite``."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise RunDirError(f"run directory {str(p)!r} exists and is not a directory; choose another --out.")
        if p.is_dir() and any(p.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"run directory {str(p)!r} already exists and is not empty; continue it with "
                    f"--resume {p}, choose another --out, or pass --overwrite to replace it."
                )
            shutil.rmtree(p)
        for sub in ("samples", "checkpoints"):
            (p / sub).mkdir(parents=True, exist_ok=True)
        return cls(p)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """Open an existing run (for resume or evaluation)."""
        p = Path(path)
        if not p.is_dir():
            raise RunDirError(f"run directory {str(p)!r} does not exist.")
        if not (p / CONFIG_FILE).is_file():
            raise RunDirError(
                f"{str(p)!r} is not an rlbench run directory: it has no {CONFIG_FILE} "
                "(runs are made by `rlbench train`)."
            )
        return cls(p)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    # -- config ---------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def write_config(self, toml_text: str) -> None:
        atomic_write_text(self.config_path, toml_text)

    def read_config(self) -> dict[str, Any]:
        from rlbench.config import read_toml

        return read_toml(self.config_path)

    # -- metrics --------------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record (must carry METRIC_KEYS) and fsync, so a kill loses no epoch."""
        missing = [k for k in METRIC_KEYS if k not in record]
        if missing:
            raise ValueError(f"metrics record lacks {missing}")
        line = json.dumps(record, sort_keys=False, allow_nan=True) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete records; a torn last line (killed mid-write) is ignored."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep only records with epoch <= last_epoch (resume from that epoch's checkpoint)."""
        kept = [r for r in self.read_metrics() if r["epoch"] <= last_epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # -- samples --------------------------------------------------------------------------------------
    def samples_dir(self, epoch: int) -> Path:
        return self.path / "samples" / epoch_dirname(epoch)

    def write_samples(self, epoch: int, images, records: Sequence[dict[str, Any]], grid_columns: int = 8) -> Path:
        """Save images (B,3,H,W in [0,1]) as PNGs plus a grid and ``records.jsonl``, atomically.

        Each record gets ``file``; callers give ``prompt``, ``seed``, ``reward`` and ``score``.
        """
        from rlbench.utils.images import save_grid, save_png

        final = self.samples_dir(epoch)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        lines = []
        for i, (img, rec) in enumerate(zip(images, records)):
            fname = f"{i:04d}.png"
            save_png(img, tmp / fname)
            lines.append(json.dumps({"file": fname, **rec}) + "\n")
        (tmp / "records.jsonl").write_text("".join(lines), encoding="utf-8")
        save_grid(images, tmp / "grid.png", columns=grid_columns)
        _replace_dir(tmp, final)
        return final

    def sample_epochs(self) -> list[int]:
        root = self.path / "samples"
        if not root.is_dir():
            return []
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "records.jsonl").is_file())

    def read_sample_records(self, epoch: int) -> list[dict[str, Any]]:
        path = self.samples_dir(epoch) / "records.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_dir(self, epoch: int) -> Path:
        return self.path / "checkpoints" / epoch_dirname(epoch)

    def checkpoint_epochs(self) -> list[int]:
        """Epochs with a complete checkpoint (temporary directories of interrupted writes are skipped)."""
        root = self.path / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())

    def latest_checkpoint(self) -> int | None:
        epochs = self.checkpoint_epochs()
        return epochs[-1] if epochs else None

    def save_checkpoint(self, epoch: int, write: Callable[[Path], None], keep: int = 0) -> Path:
        """Call ``write(tmpdir)`` to fill a temporary directory, then rename it into place.

        A kill during ``write`` leaves only a ``.tmp-*`` directory, which is ignored and cleaned up
        by the next save; the previous checkpoint stays intact.
        """
        root = self.path / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{epoch_dirname(epoch)}-", dir=root))
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        final = self.checkpoint_dir(epoch)
        _replace_dir(tmp, final)
        if keep > 0:
            for old in self.checkpoint_epochs()[:-keep]:
                shutil.rmtree(self.checkpoint_dir(old), ignore_errors=True)
        return final

    def tb_dir(self) -> Path:
        return self.path / "tb"


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is swapped out first, then removed."""
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def iter_run_dirs(paths: Iterable[str | Path]) -> list[RunDir]:
    return [RunDir.open(p) for p in paths]


def load_trained_policy(run_dir: str | Path, checkpoint: int | None = None) -> DiffusionPolicy:
    """The policy of a run at checkpoint ``checkpoint`` (default: the latest): base model + trained weights."""
    from rlbench.config import load_config
    from rlbench.diffusion.policy import load_policy

    run = RunDir.open(run_dir)
    epochs = run.checkpoint_epochs()
    if checkpoint is None:
        checkpoint = epochs[-1] if epochs else None
    if checkpoint is None or checkpoint not in epochs:
        raise ConfigError(f"run {run.path} has no checkpoint {checkpoint}; it has {epochs or 'none'}.")
    cfg = load_config(run.config_path)
    policy = load_policy(cfg.model.name, cfg.model.revision)
    policy.setup_training(cfg.model.train_mode, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
    policy.load_state(run.checkpoint_dir(checkpoint))
    return policy
