"""The evaluation cache: work is never done twice, and a killed evaluation resumes where it stopped.

One SQLite file (``<cache>/eval-cache.sqlite``; default cache folder ``$RLBENCH_CACHE_DIR``, else
``$XDG_CACHE_HOME/rlbench/eval``, else ``~/.cache/rlbench/eval``) with three tables:

* ``samples``: key = hash of (policy identity: model, and for a fine-tuned checkpoint the run, the
  checkpoint and its weights file's size and mtime; sampler settings: steps, eta, guidance, negative
  prompt, KL eta; prompt; image index; seed) -> the PNG, its content hash and the trajectory's KL.
  The base model's samples are keyed by the model alone, so runs of one model share them.
* ``scores``: key = hash of (image content hash, reward name, options, reward version, prompt,
  prompt metadata) -> score. Only rewards that declare themselves deterministic are stored.
* ``features``: (image content hash, feature model) -> the diversity feature vector.

Every batch is committed as soon as it is computed (SQLite's journal makes a kill harmless), so an
evaluation that is killed recomputes at most one batch when run again.

The file records the rlbench version that wrote it. A cache written by another version is an error
naming the fix (another ``--cache`` folder, or deleting it): sampling or scoring code may have
changed between versions, and mixing results silently would be wrong. A file that is not a valid
cache (corrupt, or not SQLite) is an error naming the file and the fix too; nothing is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlbench.errors import InputError

CACHE_FILE = "eval-cache.sqlite"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    if os.environ.get("RLBENCH_CACHE_DIR"):
        return Path(os.environ["RLBENCH_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rlbench" / "eval"


def key_of(*parts: Any) -> str:
    """A stable hex key of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def image_hash(image: np.ndarray) -> str:
    """Content hash of a uint8 (H, W, 3) image (shape included)."""
    a = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _rlbench_version() -> str:
    import rlbench

    return rlbench.__version__


class NoCache:
    """The cache interface with nothing stored (``cache=False``; training-time evaluation)."""

    path: Path | None = None

    def get_samples(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {}

    def put_samples(self, rows: Iterable[dict[str, Any]]) -> None:
        pass

    def get_scores(self, keys: Sequence[str]) -> dict[str, float]:
        return {}

    def put_scores(self, items: Iterable[tuple[str, float]]) -> None:
        pass

    def get_features(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return {}

    def put_features(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        pass

    def close(self) -> None:
        pass


class EvalCache(NoCache):
    """The SQLite cache in ``folder`` (created if needed)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()
        self.path = self.folder / CACHE_FILE
        version = _rlbench_version()
        fix = (f"delete it (rm {self.path}) to recompute everything, or pass --cache with another folder")
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"eval cache {str(self.folder)!r} is not a folder; pass --cache with a folder.")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=60)
        except (OSError, sqlite3.Error) as exc:
            raise InputError(f"cannot open the eval cache {str(self.path)!r} ({exc}); pass --cache with a "
                             "writable folder, or --no-cache.") from exc
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            rows = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
            if not rows:
                with self.db:
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                                        [("format", str(CACHE_FORMAT)), ("rlbench", version)])
                rows = {"format": str(CACHE_FORMAT), "rlbench": version}
            if rows.get("format") != str(CACHE_FORMAT) or rows.get("rlbench") != version:
                self.db.close()
                raise InputError(
                    f"the eval cache {str(self.path)!r} was written by rlbench {rows.get('rlbench', '?')} "
                    f"(cache format {rows.get('format', '?')}), this is rlbench {version} (format {CACHE_FORMAT}): "
                    f"samples and scores may differ between versions; {fix}."
                )
            with self.db:
                self.db.execute("CREATE TABLE IF NOT EXISTS samples (key TEXT PRIMARY KEY, png BLOB NOT NULL, "
                                "hash TEXT NOT NULL, kl REAL, kl_steps INTEGER NOT NULL)")
                self.db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL)")
                self.db.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
            self.db.execute("SELECT count(*) FROM samples").fetchone()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise InputError(f"the eval cache {str(self.path)!r} is not a valid cache ({exc}); {fix}.") from exc

    def _get(self, sql: str, keys: Sequence[str]) -> list[tuple]:
        out: list[tuple] = []
        keys = list(keys)
        try:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                out += self.db.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"the eval cache {str(self.path)!r} cannot be read ({exc}); delete it "
                             f"(rm {self.path}) to recompute everything, or pass --cache with another folder.") from exc
        return out

    def _put(self, sql: str, rows: list[tuple]) -> None:
        if rows:
            with self.db:
                self.db.executemany(sql, rows)

    def get_samples(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = self._get("SELECT key, png, hash, kl, kl_steps FROM samples WHERE key IN ({})", keys)
        return {k: {"png": bytes(png), "hash": h, "kl": kl, "kl_steps": n} for k, png, h, kl, n in rows}

    def put_samples(self, rows: Iterable[dict[str, Any]]) -> None:
        self._put("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?)",
                  [(r["key"], r["png"], r["hash"], r["kl"], r["kl_steps"]) for r in rows])

    def get_scores(self, keys: Sequence[str]) -> dict[str, float]:
        return dict(self._get("SELECT key, score FROM scores WHERE key IN ({})", keys))

    def put_scores(self, items: Iterable[tuple[str, float]]) -> None:
        self._put("INSERT OR REPLACE INTO scores VALUES (?, ?)", [(k, float(v)) for k, v in items])

    def get_features(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        rows = self._get("SELECT key, vec FROM features WHERE key IN ({})", keys)
        return {k: np.frombuffer(v, dtype=np.float32).copy() for k, v in rows}

    def put_features(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        self._put("INSERT OR REPLACE INTO features VALUES (?, ?)",
                  [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items])

    def close(self) -> None:
        self.db.close()
