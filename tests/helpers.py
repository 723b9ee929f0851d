"""Shared test helpers: fake plugin distributions, a configurable test reward, run directories.

Imported by the tests as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rlbench.reward import Reward

REPO_ROOT = Path(__file__).resolve().parents[1]
# The venv's console script, exactly as a user runs it.
RLBENCH_EXE = Path(sys.executable).parent / "rlbench"


# -- fake plugin distributions ----------------------------------------------------------------------


def make_fake_distribution(
    root: str | Path,
    name: str = "fakepkg",
    version: str = "0.1",
    entry_points: Mapping[str, Mapping[str, str]] | None = None,
    modules: Mapping[str, str] | None = None,
) -> Path:
    """Write an installed-looking distribution into ``root`` (a folder to put on ``sys.path``).

    Creates ``<root>/<name>-<version>.dist-info/{METADATA,entry_points.txt}`` — what pip writes —
    plus one ``<module>.py`` per item of ``modules`` (module name -> source). ``entry_points`` maps a
    group (e.g. ``"rlbench.rewards"``) to ``{entry name: "module:attr"}``.

    Returns ``root``; add it to ``sys.path`` (``monkeypatch.syspath_prepend``) or ``PYTHONPATH``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: a fake rlbench plugin for tests\n",
        encoding="utf-8",
    )
    lines = []
    for group, eps in (entry_points or {}).items():
        lines.append(f"[{group}]")
        lines += [f"{ep_name} = {target}" for ep_name, target in eps.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return root


# -- a reward whose behaviour each test chooses -----------------------------------------------------


ScoreFn = Callable[[torch.Tensor, Sequence[str], Sequence[Mapping[str, Any]]], Any]


class GenericTestReward(Reward):
    """A :class:`Reward` whose ``score`` is ``score_fn(images, prompts, metadata)``.

    ``deterministic`` and ``name`` are set per instance, so one class covers every broken reward.
    """

    def __init__(self, score_fn: ScoreFn, *, deterministic: bool = True, name: str = "generic-test") -> None:
        self.score_fn = score_fn
        self.deterministic = deterministic
        self.name = name

    def score(self, images, prompts, metadata):
        return self.score_fn(images, prompts, metadata)


def mean_pixel(images: torch.Tensor, prompts=None, metadata=None) -> torch.Tensor:
    """A well-behaved score: mean pixel value per image, float32 (B,)."""
    return images.mean(dim=(1, 2, 3))


# -- images -------------------------------------------------------------------------------------


def random_images(batch: int, height: int = 32, width: int | None = None, seed: int = 0) -> torch.Tensor:
    """(B,3,H,W) float32 uniform in [0, 1], seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width or height, generator=g)


def write_png(path: str | Path, array_hwc_uint8: np.ndarray) -> Path:
    """Save an (H,W,3) uint8 array as a PNG and return its path."""
    path = Path(path)
    Image.fromarray(np.asarray(array_hwc_uint8, dtype=np.uint8)).save(path, format="PNG")
    return path


# -- offline and reference helpers of the zoo tests --------------------------------------------------


def empty_hf_cache(monkeypatch, root: Path) -> None:
    """Point the Hugging Face cache (and rlbench's URL cache under HF_HOME) at an empty folder, offline."""
    import huggingface_hub.constants as hub_constants

    hf_home = root / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HOME", str(hf_home), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)


def block_network(monkeypatch) -> list:
    """Make every socket connection fail; returns the list of attempted connections (to assert empty)."""
    import socket

    attempts: list = []

    def no_network(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return attempts


def pil_image_processor(folder):
    """The folder's CLIP image processor with PIL arithmetic: ``CLIPImageProcessorPil`` in transformers 5,
    ``CLIPImageProcessor`` in 4 (its only, PIL-based implementation) — the processor of the published numbers."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as cls
    return cls.from_pretrained(str(folder))


# -- run directories ------------------------------------------------------------------------------


def make_run_dir(
    path: str | Path,
    *,
    reward: str = "incompressibility",
    reward_options: Mapping[str, Any] | None = None,
    epochs: Sequence[int] = (1, 2),
    num_images: int = 4,
    size: int = 32,
    seed: int = 0,
):
    """A run directory built by hand with :class:`RunDir`: config.toml + sample images at ``epochs``.

    Images are random (different per epoch); records carry prompt, seed, split, reward and score.
    Returns the :class:`RunDir`.
    """
    from rlbench.config import TrainConfig
    from rlbench.train.rundir import RunDir

    cfg = TrainConfig.from_dict({"reward": {"name": reward, **dict(reward_options or {})}})
    run = RunDir.create(path)
    run.write_config(cfg.to_toml())
    for k, epoch in enumerate(epochs):
        images = random_images(num_images, size, seed=seed + 100 * k)
        # Make epochs differ in compressibility too: the second epoch's images are smoother.
        images = images * (0.5 ** k) + 0.25 * (1 - 0.5 ** k)
        records = [
            {"prompt": f"prompt {i % 2}", "seed": 1000 * epoch + i, "split": "train" if i % 2 == 0 else "test",
             "reward": reward, "score": 0.0}
            for i in range(num_images)
        ]
        run.write_samples(epoch, images, records)
    return run


# -- subprocesses ---------------------------------------------------------------------------------


def subprocess_env(*pythonpath: str | Path) -> dict[str, str]:
    """The current environment, offline, with ``pythonpath`` folders in front of ``PYTHONPATH``."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    parts = [str(p) for p in pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if parts:
        env["PYTHONPATH"] = os.pathsep.join(parts)
    else:
        env.pop("PYTHONPATH", None)
    return env


def run_cli(args: Sequence[str], *pythonpath: str | Path, cwd: str | Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed ``rlbench`` console script as a real subprocess."""
    return subprocess.run(
        [str(RLBENCH_EXE), *map(str, args)], capture_output=True, text=True, env=subprocess_env(*pythonpath),
        cwd=cwd, timeout=timeout,
    )


# -- CLI results (typer's CliRunner) -------------------------------------------------------------------


def ok(result):
    """Exit 0 and no traceback; returns stdout."""
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    return result.stdout


def user_error(result, *fragments: str) -> str:
    """Exit 2, one line ``error: ...`` on stderr, no traceback, holding every fragment; returns that line."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_weights_missing_offline(monkeypatch, root: Path, name: str, source: str, images, prompts) -> None:
    """With an empty offline cache, reward ``name`` (default options) fails on its first call and in an evaluation's
    pre-flight check (``rlbench.eval.plan.check_weights``) with the one-line WeightsNotAvailable that names
    ``source``, ``rlbench rewards download NAME`` and ``--reward-opt weights=PATH``."""
    import pytest

    from rlbench.errors import WeightsNotAvailable
    from rlbench.eval.plan import check_weights
    from rlbench.registry import make_reward

    empty_hf_cache(monkeypatch, root)
    reward = make_reward(name)
    pattern = rf"rlbench rewards download {re.escape(name)}.*--reward-opt weights=PATH"
    with pytest.raises(WeightsNotAvailable, match=pattern) as info:
        reward(images, prompts)
    assert "\n" not in str(info.value) and source in str(info.value)
    with pytest.raises(WeightsNotAvailable, match=pattern):
        check_weights(reward, name, {})
