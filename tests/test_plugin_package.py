"""A real third-party reward plugin package (examples/rlbench-brightness), installed with pip."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO_ROOT, run_cli, subprocess_env, write_png

EXAMPLE = REPO_ROOT / "examples" / "rlbench-brightness"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """examples/rlbench-brightness pip-installed into a temporary --target folder (not the venv)."""
    target = tmp_path_factory.mktemp("plugin-site")
    build = tmp_path_factory.mktemp("plugin-src")
    # Build from a copy, so setuptools' build/ and *.egg-info never land in the repository.
    import shutil

    src = build / "rlbench-brightness"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(target.glob("rlbench_brightness-0.1.0.dist-info"))
    return target


def test_installed_plugin_is_listed_with_its_distribution(site) -> None:
    out = run_cli(["rewards", "list"], site)
    assert out.returncode == 0, out.stderr
    table = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.split()}
    row = table["brightness"]
    assert row[:5] == ["brightness", "1", "higher", "none", "rlbench-brightness==0.1.0"]
    assert "Mean image brightness" in " ".join(row)
    assert "incompressibility" in table and "compressibility" in table  # built-ins still there


def test_installed_plugin_scores_grey_pngs(site, tmp_path) -> None:
    greys = [0, 77, 128, 255]
    paths = [write_png(tmp_path / f"grey{g}.png", np.full((10, 14, 3), g, dtype=np.uint8)) for g in greys]
    out = run_cli(["rewards", "score", "brightness", "--prompt", "x", *paths], site)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    # BT.601 weights sum to 1: a grey level g has brightness g / 255.
    scores = [float(line.split("\t")[1]) for line in lines]
    assert scores == pytest.approx([g / 255 for g in greys], abs=1e-6)
    assert lines[2].split("\t")[1] == "0.501961"


def test_installed_plugin_passes_check_reward(site) -> None:
    out = run_cli(["rewards", "check", "brightness"], site)
    assert out.returncode == 0, out.stderr
    assert "reward 'brightness' passes check_reward" in out.stdout


def test_plugin_is_absent_without_the_package() -> None:
    out = run_cli(["rewards", "info", "brightness"])
    assert out.returncode == 2
    assert "unknown reward 'brightness'" in out.stderr and "Traceback" not in out.stderr


def test_readme_embeds_example_plugin() -> None:
    """The README's plugin walkthrough is the tested example, character for character."""
    path = REPO_ROOT / "README.md"
    assert path.is_file(), "README.md is missing"
    readme = path.read_text(encoding="utf-8")
    for rel in ("pyproject.toml", "rlbench_brightness/__init__.py"):
        text = (EXAMPLE / rel).read_text(encoding="utf-8").strip()
        assert text in readme, f"README.md does not contain examples/rlbench-brightness/{rel} verbatim"
