"""Run directories: the contract between ``rlbench train`` and ``rlbench eval``.

::

    runs/<run>/config.toml            the resolved configuration
    runs/<run>/metrics.jsonl          one JSON object per epoch (see METRIC_KEYS)
    runs/<run>/samples/<epoch>/       images (PNG) + records.jsonl (file, prompt, seed, reward, score)
    runs/<run>/checkpoints/<epoch>/   weights (safetensors), optimizer, RNG and trainer state,
                                      manifest.json (every file's size and sha256, written last)
    runs/<run>/tb/                    TensorBoard events

Writes are atomic (temporary file or directory, then rename), so a kill at any moment leaves the
last good state intact. A new run never writes into an existing non-empty directory unless asked.

Files can still be damaged after they were written (a full disk, a bad copy, a crash of the
machine). Every file rlbench reads back turns a decoding failure into a :class:`RunDirError` that
names the file and the fix, and :meth:`RunDir.latest_intact_checkpoint` checks checkpoints against
their manifest, so a resume skips a damaged checkpoint (with a notice) instead of loading it.
Nothing here ever deletes a damaged file: it is left for the user to inspect.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlbench.errors import ConfigError, RunDirError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from rlbench.diffusion.policy import DiffusionPolicy

# Keys every metrics.jsonl record carries (DESIGN.md); algorithms may add more.
METRIC_KEYS = (
    "epoch", "samples", "reward_queries", "reward_mean", "reward_std",
    "loss", "approx_kl", "clipfrac", "seconds",
)
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# What a training checkpoint must hold to be resumed from (the trainer's write puts more beside them).
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json")


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


def _brief(exc: BaseException) -> str:
    """An exception as one short line (decoders' messages can run to paragraphs)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def checkpoint_read_error(folder: str | Path, name: str, exc: BaseException) -> RunDirError:
    """The error for a checkpoint file that does not decode: names the file and the way out."""
    folder = Path(folder)
    return RunDirError(
        f"checkpoint {folder}: {name} cannot be read ({_brief(exc)}); the checkpoint is damaged. Move "
        f"{folder.name} out of {folder.parent} to resume from the checkpoint before it, or start the run over "
        "(a new --out, or --overwrite)."
    )


# -- checkpoint manifests -------------------------------------------------------------------------------

def _hash_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in 1 MiB chunks; ``fsync`` also flushes it to disk."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return size, digest.hexdigest()


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Fsync every file under ``folder`` (subfolders included) and record its size and sha256 in
    ``manifest.json``, written last: a checkpoint with a manifest was complete when it was written.
    """
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.rglob("*")):
        name = f.relative_to(folder).as_posix()
        if f.is_dir():
            _fsync_dir(f)
        elif name == MANIFEST_FILE:
            raise ValueError(f"a checkpoint's own files may not be called {MANIFEST_FILE}")
        elif f.is_file():
            size, sha = _hash_file(f, fsync=True)
            files[name] = {"size": size, "sha256": sha}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


@dataclass(frozen=True)
class CheckpointCheck:
    """What :func:`verify_checkpoint` found. ``problems`` is empty for an intact checkpoint;
    ``legacy`` means it has no manifest (written by rlbench before manifests existed)."""

    folder: Path
    problems: tuple[str, ...]
    legacy: bool

    @property
    def intact(self) -> bool:
        return not self.problems


def _read_manifest(path: Path) -> dict[str, tuple[int, str]]:
    """``{relative name: (size, sha256)}`` from a manifest; ValueError (or OSError) if it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in data["files"].items()}
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(_brief(exc)) from exc
    for name in files:  # only names inside the checkpoint folder
        if name.startswith("/") or ".." in name.split("/") or not name:
            raise ValueError(f"bad file name {name!r}")
    return files


def verify_checkpoint(folder: str | Path, required: Iterable[str] = CHECKPOINT_FILES,
                      hashes: bool = True) -> CheckpointCheck:
    """Check a checkpoint folder against its manifest: every listed file present, of its size and
    (with ``hashes``) its sha256, and every ``required`` file present.

    Without a manifest (a legacy checkpoint) only the ``required`` files are checked: present and
    not empty. Each problem names the file; nothing is changed on disk.
    """
    folder = Path(folder)
    problems: list[str] = []
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        for name in required:
            f = folder / name
            if not f.is_file():
                problems.append(f"{name} is missing")
            elif f.stat().st_size == 0:
                problems.append(f"{name} is empty")
        return CheckpointCheck(folder, tuple(problems), legacy=True)
    try:
        entries = _read_manifest(manifest_path)
    except (OSError, ValueError) as exc:
        return CheckpointCheck(folder, (f"{MANIFEST_FILE} is unreadable ({_brief(exc)})",), legacy=False)
    problems += [f"{name} is missing" for name in required if name not in entries and not (folder / name).is_file()]
    for name, (size, sha) in entries.items():
        f = folder / name
        try:
            if not f.is_file():
                problems.append(f"{name} is missing")
                continue
            actual = f.stat().st_size
            if actual != size:
                problems.append(f"{name} is truncated ({actual} of {size} bytes)" if actual < size
                                else f"{name} has {actual} bytes instead of {size}")
            elif hashes and _hash_file(f)[1] != sha:
                problems.append(f"{name} is corrupt (its sha256 differs from the manifest's)")
        except OSError as exc:
            problems.append(f"{name} cannot be read ({_brief(exc)})")
    return CheckpointCheck(folder, tuple(problems), legacy=False)


def fresh_dir(path: str | Path, overwrite: bool = False, *, what: str = "output directory",
              fix: str = "choose another --out or pass --overwrite to replace it", create: bool = True,
              error: type[Exception] = RunDirError) -> Path:
    """An empty directory at ``path`` for a new run or evaluation: one that holds anything is an ``error``
    naming ``fix``, unless ``overwrite`` (then it is replaced; with ``create=False`` only checked, nothing
    touched). Shared by train, eval and pretraining."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        if not overwrite:
            state = "exists and is not a directory" if not p.is_dir() else "already exists and is not empty"
            raise error(f"{what} {str(p)!r} {state}; {fix}.")
        if create:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p


class RunDir:
    """A run directory on disk. Create with :meth:`create` (new run) or :meth:`open` (existing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- creation -------------------------------------------------------------------------------------
    @staticmethod
    def check_fresh(path: str | Path) -> None:
        """Raise the standard error when ``path`` holds anything (before any model is loaded)."""
        fresh_dir(path, overwrite=False, what="run directory", create=False,
                  fix=f"continue it with --resume {path}, choose another --out, or pass --overwrite to replace it")

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> RunDir:
        """Start a new run at ``path``; an existing non-empty directory is an error unless ``overwrite``."""
        p = fresh_dir(path, overwrite, what="run directory",
                      fix=f"continue it with --resume {path}, choose another --out, or pass --overwrite to replace it")
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
        run = cls(p)
        run.read_config()  # a damaged config.toml is reported here, before anything else reads the run
        return run

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
        """The run's config.toml as a dict; a file that does not decode is a :class:`RunDirError`."""
        try:
            return tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RunDirError(
                f"{self.config_path} is damaged: it does not read as TOML ({_brief(exc)}). It holds the run's "
                "resolved configuration: repair it (`rlbench config` prints every key and its default), or start "
                "the run over (a new --out, or --overwrite)."
            ) from exc

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

    def read_metrics(self, notices: list[str] | None = None) -> list[dict[str, Any]]:
        """All complete records.

        A torn last line (no newline at its end: a kill while the record was appended) is dropped,
        with a notice appended to ``notices``. Any other line that is not a JSON object with an
        integer ``epoch`` is a :class:`RunDirError` naming the line.
        """
        path = self.metrics_path
        if not path.exists():
            return []
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RunDirError(f"{path} cannot be read ({_brief(exc)}).") from exc
        lines = data.split(b"\n")
        records = []
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict) or type(record.get("epoch")) is not int:
                    raise ValueError("not a JSON object with an integer 'epoch'")
            except (UnicodeDecodeError, ValueError) as exc:
                if number == len(lines):  # the last line, with no newline after it: torn
                    if notices is not None:
                        notices.append(
                            f"{path}: dropped a torn last line (line {number}, {len(raw)} bytes), the record of an "
                            "epoch interrupted while it was written; that epoch is run again."
                        )
                    break
                raise RunDirError(
                    f"{path} is damaged at line {number}: {_brief(exc)}. Repair or delete that line, or start the "
                    "run over (a new --out, or --overwrite)."
                ) from exc
            records.append(record)
        return records

    def truncate_metrics(self, last_epoch: int) -> list[str]:
        """Keep only records with epoch <= last_epoch (resume from that epoch's checkpoint).

        Returns notices (a dropped torn line); a damaged earlier line raises before anything is written.
        """
        notices: list[str] = []
        kept = [r for r in self.read_metrics(notices) if r["epoch"] <= last_epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        return notices

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
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{path} cannot be read ({_brief(exc)}).") from exc
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                raise RunDirError(
                    f"{path} is damaged at line {number}: {_brief(exc)}. Delete {path.parent} to drop that "
                    "epoch's samples, or repair the line."
                ) from exc
            records.append(record)
        return records

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_dir(self, epoch: int) -> Path:
        return self.path / "checkpoints" / epoch_dirname(epoch)

    def checkpoint_epochs(self) -> list[int]:
        """Epochs with a checkpoint folder (temporary directories of interrupted writes are skipped).

        The list includes damaged checkpoints: :meth:`latest_intact_checkpoint` picks one to load.
        """
        root = self.path / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())

    def latest_checkpoint(self) -> int | None:
        """The newest checkpoint folder, unverified (see :meth:`latest_intact_checkpoint`)."""
        epochs = self.checkpoint_epochs()
        return epochs[-1] if epochs else None

    def verify_checkpoint(self, epoch: int, required: Iterable[str] = CHECKPOINT_FILES,
                          hashes: bool = True) -> CheckpointCheck:
        return verify_checkpoint(self.checkpoint_dir(epoch), required, hashes)

    def latest_intact_checkpoint(self, required: Iterable[str] = CHECKPOINT_FILES) -> tuple[int | None, list[str]]:
        """The newest checkpoint that verifies against its manifest, and notices for the user.

        A damaged checkpoint (a file missing, truncated, corrupt or unreadable) is named in a notice,
        left in place, and the one before it is tried. A legacy checkpoint (no manifest.json: written
        by rlbench before manifests existed) is accepted when its ``required`` files are present and
        not empty, with a notice that it was not verified; a damaged file in it then fails to load
        with an error naming the file. Returns ``(None, [])`` for a run without checkpoints and
        raises :class:`RunDirError` when it has checkpoints but none is intact.
        """
        required = tuple(required)
        damaged: list[CheckpointCheck] = []
        for epoch in reversed(self.checkpoint_epochs()):
            check = self.verify_checkpoint(epoch, required)
            if check.intact:
                notices = [
                    f"checkpoint {c.folder} is damaged ({'; '.join(c.problems)}); it is left in place and "
                    f"checkpoint {epoch_dirname(epoch)} is used instead."
                    for c in damaged
                ]
                if check.legacy:
                    notices.append(
                        f"checkpoint {check.folder} has no {MANIFEST_FILE} (written by an older rlbench): its files "
                        "are present but could not be verified; using it as it is."
                    )
                return epoch, notices
            damaged.append(check)
        if damaged:
            found = "; ".join(f"{c.folder.name}: {', '.join(c.problems)}" for c in damaged)
            raise RunDirError(
                f"run {self.path} has no intact checkpoint ({found}). Nothing was deleted. Start the run over: "
                f"`rlbench train --config {self.config_path} --out NEW_DIR` (or the same --out with --overwrite, "
                "which deletes this run)."
            )
        return None, []

    def save_checkpoint(self, epoch: int, write: Callable[[Path], None], keep: int = 0) -> Path:
        """Call ``write(tmpdir)`` to fill a temporary directory, add its manifest, then rename it into place.

        A kill during ``write`` leaves only a ``.tmp-*`` directory, which is ignored and cleaned up
        by the next save; the previous checkpoint stays intact. An existing checkpoint of the same
        epoch (e.g. a damaged one a resume skipped) is replaced: it is swapped out by renames, so
        ``checkpoints/<epoch>`` is at every moment the old folder, absent, or the new one.
        ``keep > 0``: see :meth:`prune_checkpoints`.
        """
        root = self.path / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{epoch_dirname(epoch)}-", dir=root))
        write(tmp)
        write_manifest(tmp)  # last: fsyncs every file, then records it
        _fsync_dir(tmp)
        final = self.checkpoint_dir(epoch)
        _replace_dir(tmp, final)
        if keep > 0:
            self.prune_checkpoints(keep)
        return final

    def prune_checkpoints(self, keep: int) -> None:
        """Keep the newest ``keep`` intact checkpoints and remove every checkpoint older than them.

        Damaged checkpoints do not count towards ``keep``, so they never push an intact one out; one
        newer than the oldest kept stays in place. "Intact" here is the quick check (every manifest
        file present at its size): hashing each checkpoint at every save would cost too much.
        """
        epochs = self.checkpoint_epochs()
        intact = [e for e in epochs if self.verify_checkpoint(e, required=(), hashes=False).intact]
        if len(intact) <= keep:
            return
        oldest_kept = intact[-keep]
        for old in epochs:
            if old < oldest_kept:
                shutil.rmtree(self.checkpoint_dir(old), ignore_errors=True)

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



def _stderr(text: str) -> None:
    print(f"notice: {text}", file=sys.stderr)


def load_trained_policy(run_dir: str | Path, checkpoint: int | None = None,
                        log: Callable[[str], None] | None = None) -> DiffusionPolicy:
    """The policy of a run at checkpoint ``checkpoint`` (default: the newest intact one): base model +
    trained weights. Notices about skipped damaged checkpoints go to ``log`` (default: stderr)."""
    from rlbench.config import load_config
    from rlbench.diffusion.policy import load_policy

    run = RunDir.open(run_dir)
    epochs = run.checkpoint_epochs()
    weights = ("trainable.safetensors",)
    explicit = checkpoint is not None
    if checkpoint is None:
        checkpoint, notices = run.latest_intact_checkpoint(required=weights)
        for notice in notices:
            (log or _stderr)(notice)
    if checkpoint is None or checkpoint not in epochs:
        raise ConfigError(f"run {run.path} has no checkpoint {checkpoint}; it has {epochs or 'none'}.")
    check = run.verify_checkpoint(checkpoint, required=weights) if explicit else None
    if check is not None and not check.intact:
        raise RunDirError(
            f"checkpoint {check.folder} is damaged ({'; '.join(check.problems)}); nothing was deleted. "
            "Choose another checkpoint, or leave it out to use the newest intact one."
        )
    cfg = load_config(run.config_path)
    policy = load_policy(cfg.model.name, cfg.model.revision)
    policy.setup_training(cfg.model.train_mode, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
    policy.load_state(run.checkpoint_dir(checkpoint))
    return policy
