"""Test-wide setup: no network, fake plugin distributions, in-process registrations, a CLI runner."""

from __future__ import annotations

import os

# No test may touch the network: the Hugging Face hub (and libraries built on it) stays offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from helpers import make_fake_distribution  # noqa: E402
from rlbench.registry import ALGORITHMS, MODELS, PROMPTS, REWARDS  # noqa: E402

REGISTRIES = (REWARDS, ALGORITHMS, MODELS, PROMPTS)


def _refresh_all() -> None:
    for registry in REGISTRIES:
        registry.refresh()


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Factory: install a fake distribution on ``sys.path`` for this test only.

    ``fake_dist(name, version, entry_points={group: {name: "mod:attr"}}, modules={mod: source})``
    returns the folder it put on ``sys.path`` (also usable as ``PYTHONPATH`` of a subprocess).
    Registries are refreshed before and after, and the fake modules are unimported afterwards.
    """
    made_modules: list[str] = []
    counter = iter(range(1000))

    def make(name="fakepkg", version="0.1", entry_points=None, modules=None, folder: Path | None = None) -> Path:
        root = folder if folder is not None else tmp_path / f"site-{next(counter)}"
        make_fake_distribution(root, name, version, entry_points=entry_points, modules=modules)
        made_modules.extend(modules or {})
        monkeypatch.syspath_prepend(str(root))
        _refresh_all()
        return root

    yield make
    for module in made_modules:
        sys.modules.pop(module, None)
    _refresh_all()


@pytest.fixture
def register_reward():
    """Factory: ``register_reward(name, obj)`` registers in-process; unregistered after the test."""
    names: list[str] = []

    def register(name: str, obj) -> str:
        REWARDS.register(name, obj)
        names.append(name)
        return name

    yield register
    for name in names:
        REWARDS.unregister(name)


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: one intra-op thread is as fast, and immune to a busy machine
    (contended intra-op threads cost up to ~100x in waits). Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
