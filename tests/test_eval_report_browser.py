"""The evaluation report in a real browser: headless Chromium loads report.html with no console
errors, the page loads nothing from outside itself, and a screenshot shows it rendered (not blank).

The results folder is synthetic (two seeds of one configuration and a second configuration, three
checkpoints, random images) and the report is derived from it with ``rebuild``, the code path of
``rlbench eval --from``. Needs Debian's ``chromium``: skipped when it is absent, except in CI
(``CI=true``), where ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlbench.eval.evaluator import DIVERSITY_COLUMNS, KL_COLUMNS, SCORE_COLUMNS, rebuild
from rlbench.eval.scoring import encode_png

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed; CI must install it (.ci/run: apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); the browser test runs in CI")
    return exe


def load(exe: str, page: Path, shot: Path, tmp: Path, size: str = "1300,3200") -> tuple[int, list[str]]:
    """Open ``page`` headless, screenshot it; (exit code, the console messages Chromium logged)."""
    proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--screenshot={shot}",
                           f"--window-size={size}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.returncode, console


def synthetic_results(folder: Path) -> None:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    runs = [("clip-s0", "shapes-clip", 0), ("clip-s1", "shapes-clip", 1), ("aes-s0", "shapes-aesthetic", 0)]
    sets = [("shapes-demo", "train"), ("shapes-heldout-counts", "held-out")]
    rewards = ["shapes-clip", "shapes-aesthetic", "shapes-gold", "shapes-aesthetic-gold"]
    scores, kls, divs = [], [], []
    for run, trained, seed in runs:
        for c in (0, 5, 10):
            for s, role in sets:
                for p in range(3):
                    prompt = f"{s} prompt {p}"
                    for k in range(4):
                        img = (rng.random((32, 32, 3)) * 255 * (1 - c / 20)).astype(np.uint8)
                        name = f"{run}-{c}-{s}-{p}-{k}.png"
                        (folder / "images" / name).write_bytes(encode_png(img))
                        for r in rewards:
                            scores.append({"run": run, "algorithm": "ddpo-is", "trained_reward": trained, "seed": seed,
                                           "config": f"ddpo-is · {trained} · shapes · shapes-demo", "checkpoint": c,
                                           "reward_queries": 64 * c, "prompt_set": s, "set_role": role,
                                           "prompt": prompt, "image_index": k, "sample_seed": 1000 * p + k,
                                           "reward": r, "score": float(rng.normal(c / 10 if r == trained else -c / 20)),
                                           "image": f"images/{name}"})
                        kls.append({"run": run, "checkpoint": c, "prompt_set": s, "prompt": prompt, "image_index": k,
                                    "sample_seed": 1000 * p + k, "kl": 0.0 if c == 0 else float(c * rng.random()),
                                    "kl_steps": 10, "kl_eta": 1.0, "eval_eta": 1.0, "on_policy": True})
                    divs.append({"run": run, "checkpoint": c, "prompt_set": s, "prompt": prompt, "n_images": 4,
                                 "vendi": float(4 - c / 5 * rng.random()), "mean_pairwise_distance": float(rng.random()),
                                 "features": "shapes-clip vision tower"})
    pd.DataFrame(scores, columns=SCORE_COLUMNS).to_parquet(folder / "scores.parquet", index=False)
    pd.DataFrame(kls, columns=KL_COLUMNS).to_parquet(folder / "kl.parquet", index=False)
    pd.DataFrame(divs, columns=DIVERSITY_COLUMNS).to_parquet(folder / "diversity.parquet", index=False)
    meta = {
        "rlbench": "test", "settings": {"images_per_prompt": 4, "seed": 0, "features": "shapes-clip",
                                        "prompt_sets": [s for s, _ in sets], "rewards": rewards},
        "runs": [{"name": run, "algorithm": "ddpo-is", "trained_reward": trained, "seed": seed, "model": "shapes",
                  "train_prompts": "shapes-demo", "checkpoints": [0, 5, 10], "available": [5, 10], "steps": 10,
                  "eta": 1.0, "guidance": 5.0, "train_eta": 1.0, "config": f"ddpo-is · {trained} · shapes · shapes-demo"}
                 for run, trained, seed in runs],
        "rewards": [{"label": r, "name": r, "options": {}, "version": "1", "higher_is_better": True,
                     "deterministic": True, "role": "gold" if "gold" in r else "model", "components": []}
                    for r in rewards],
        "gold": {"shapes-gold": ["shapes-clip"], "shapes-aesthetic-gold": ["shapes-aesthetic"]},
        "prompt_sets": [{"name": s, "total": 74, "used": 3, "prompts": [f"{s} prompt {p}" for p in range(3)]}
                        for s, _ in sets],
        "features": "shapes-clip vision tower", "kl_notes": {run: "exact KL" for run, _, _ in runs},
        "notices": [], "timings": {},
    }
    (folder / "meta.json").write_text(json.dumps(meta))


def test_report_renders_in_chromium_without_console_errors(tmp_path) -> None:
    exe = chromium()
    # The console check works: a page with an error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom')</script></body></html>")
    _, console = load(exe, bad, tmp_path / "bad.png", tmp_path, size="300,200")
    assert any("boom" in line for line in console), "Chromium no longer logs console messages to stderr"

    folder = tmp_path / "eval"
    synthetic_results(folder)
    result = rebuild(folder)
    html = result.report.read_text(encoding="utf-8")
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html), "the report must not load anything from outside"
    assert "<script" not in html
    for heading in ("Runs and settings", "Over-optimisation", "Generalisation", "Cross-reward", "KL from the base",
                    "Diversity", "Reward curves", "Images", "Seeds of one configuration"):
        assert heading in html, heading

    shot = tmp_path / "report.png"
    code, console = load(exe, result.report, shot, tmp_path)
    assert code == 0 and shot.is_file()
    assert console == [], console
    from PIL import Image

    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] >= 3000 and pixels.shape[1] >= 1200
    gray = pixels.mean(axis=2)
    assert gray.std() > 20, "blank screenshot"
    assert (gray < 200).mean() > 0.02  # text, tables and plots
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 80
    assert saturated.mean() > 0.002, "no coloured plot lines or images rendered"
