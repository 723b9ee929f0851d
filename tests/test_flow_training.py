"""The flow-matching family end to end from the CLI, on tiny random SD3 and FLUX pipelines (offline): every
algorithm trains, an SDE window trains only its steps, SIGKILL + --resume ends bit-identical, `rlbench eval`
reports a flow run (its own sampler and --sampler ode), and bad input is one `error:` line (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from rlbench.testing import save_tiny_flux_pipeline, save_tiny_sd3_pipeline

RLBENCH = str(Path(sys.executable).parent / "rlbench")
SMALL = [
    "--set", "sample.num_steps=3", "--set", "sample.batch_size=4", "--set", "sample.num_batches_per_epoch=1",
    "--set", "sample.images_per_prompt=2", "--set", "train.batch_size=2", "--set", "train.gradient_accumulation_steps=1",
    "--set", "logging.tensorboard=false", "--set", "logging.num_samples=4", "--set", "model.device=cpu",
    "--set", "eval.every=0", "--set", "train.timestep_window=1.0",
]
FLUX = ["--set", "sample.resolution=16"]  # FluxPipeline's default 1024 px is too big for a test


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow-models")
    return {"sd3": save_tiny_sd3_pipeline(root / "sd3"), "flux": save_tiny_flux_pipeline(root / "flux")}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLBENCH, *args], env=_env(), capture_output=True, text=True, timeout=600)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


ALGOS = {
    "ddpo-is": ["--reward", "incompressibility"],
    "ddpo-sf": ["--reward", "incompressibility"],
    "grpo": ["--reward", "incompressibility", "--set", "algorithm.beta=0.04"],
    "rwr": ["--reward", "incompressibility"],
    "draft": ["--reward", "shapes-aesthetic", "--set", "algorithm.k=2"],
    "nft": ["--reward", "incompressibility", "--set", "sample.sampler=ode", "--set", "sample.guidance_scale=1"],
}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_every_algorithm_trains_two_epochs_from_the_cli(models, kind, tmp_path):
    for algo, extra in ALGOS.items():
        out = tmp_path / algo
        proc = _run("train", "--model", str(models[kind]), "--algo", algo, "--epochs", "2", "--out", str(out),
                    *SMALL, *(FLUX if kind == "flux" else []), *extra)
        assert proc.returncode == 0, f"{algo}: {proc.stderr[-2000:]}"
        rows = _metrics(out)
        assert [r["epoch"] for r in rows] == [0, 1], algo
        assert all(r["loss"] is not None and r["optimizer_steps"] > 0 for r in rows), algo
        trained = load_file(str(out / "checkpoints" / "0002" / "trainable.safetensors"))
        assert any(float(t.abs().max()) > 0 for k, t in trained.items() if "lora_B" in k), algo  # B left 0
        cfg = (out / "config.toml").read_text()
        assert 'sampler = "' in cfg and "noise_level" in cfg
        if algo in ("ddpo-is", "grpo"):  # the first micro-step's ratio is exactly 1: tests/test_flow_policy.py
            assert 0.0 <= rows[0]["clipfrac"] <= 1.0 and rows[0]["approx_kl"] >= 0.0


def test_sde_window_trains_only_the_window(models, tmp_path):
    out = tmp_path / "fast"
    proc = _run("train", "--model", str(models["sd3"]), "--algo", "grpo", "--reward", "incompressibility",
                "--epochs", "1", "--out", str(out), *SMALL, "--set", "sample.num_steps=4",
                "--set", "sample.sde_window=2", "--set", "sample.sde_window_range=[0, 3]",
                "--set", "sample.sampler=cps", "--set", "algorithm.clip_range=1e-5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _metrics(out)
    assert rows[0]["optimizer_steps"] == 2 and rows[0]["loss"] is not None


def test_resume_after_sigkill_is_bit_identical_on_the_flow_family(models, tmp_path):
    # A random SDE window (Flow-GRPO-Fast) makes the stored keys differ per batch: the hardest case for resume.
    args = ["train", "--model", str(models["sd3"]), "--algo", "grpo", "--reward", "incompressibility",
            "--epochs", "4", *SMALL, "--set", "sample.num_batches_per_epoch=2", "--set", "sample.num_steps=4",
            "--set", "sample.sde_window=2", "--set", "sample.sde_window_range=[0, 4]"]
    full = tmp_path / "full"
    assert _run(*args, "--out", str(full)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([RLBENCH, *args, "--out", str(killed)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "0002").is_dir():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < "0004", f"the kill came too late to test anything: {done}"
    resumed = _run("train", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _metrics(killed) == _metrics(full)
    a = load_file(str(full / "checkpoints" / "0004" / "trainable.safetensors"))
    b = load_file(str(killed / "checkpoints" / "0004" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_reports_a_flow_run_with_its_sampler_and_the_ode(models, tmp_path):
    run = tmp_path / "run"
    proc = _run("train", "--model", str(models["sd3"]), "--algo", "grpo", "--reward", "incompressibility",
                "--epochs", "2", "--out", str(run), *SMALL, "--set", "eval.every=2", "--set", "eval.prompts_per_set=2",
                "--set", "eval.images_per_prompt=1", "--set", 'eval.prompts=["simple-animals"]')
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = _metrics(run)[-1]  # eval.every: the harness during training, with the flow-SDE policy's exact KL
    assert "eval/incompressibility/simple-animals" in last and last["eval/kl/simple-animals"] > 0
    for extra, has_kl in (([], True), (["--sampler", "ode"], False)):
        out = tmp_path / f"eval{len(extra)}"
        proc = _run("eval", str(run), "--out", str(out), "--images-per-prompt", "1", "--prompts-per-set", "2",
                    "--prompts", "simple-animals", "--no-cache", "--features", "pixels", "--checkpoints", "last", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        scores = pd.read_parquet(out / "scores.parquet")
        assert set(scores["checkpoint"]) == {0, 2} and scores["score"].notna().all()
        kl = pd.read_parquet(out / "kl.parquet")
        trained = kl[kl["checkpoint"] == 2]["kl"]
        if has_kl:  # the exact per-step KL of the flow-SDE policy from the base model
            assert (trained > 0).all() and (kl[kl["checkpoint"] == 0]["kl"] == 0).all()
        assert (out / "report.html").is_file()
    meta = json.loads((tmp_path / "eval0" / "meta.json").read_text())
    assert "flow-sde" in json.dumps(meta["runs"])


@pytest.mark.parametrize("args, fragment", [
    (["--model", "shapes", "--set", "sample.sampler=flow-sde"], "is a flow sampler, but model 'shapes' is a ddim"),
    (["--set", "sample.sampler=flow-sd"], "Did you mean 'flow-sde'?"),
    (["--set", "sample.eta=0.5"], "sample.eta is the DDIM sampler's noise"),
    (["--set", "sample.noise_level=-1"], "noise level must be >= 0"),
    (["--set", "sample.sampler=cps", "--set", "sample.noise_level=2"], "must be in [0, 1] for the cps sampler"),
    (["--set", "sample.sde_window=5"], "does not fit"),
    (["--set", "sample.resolution=33"], "must be a multiple of"),
    (["--algo", "ddpo-is", "--set", "sample.sampler=ode"], "deterministic and has no density"),
])
def test_bad_flow_settings_are_one_error_line(models, tmp_path, args, fragment):
    model = [] if "--model" in args else ["--model", str(models["sd3"])]
    proc = _run("train", *model, *args, "--out", str(tmp_path / "bad"), *SMALL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and fragment in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_true_cfg_on_flux_needs_a_negative_prompt(models, tmp_path):
    proc = _run("train", "--model", str(models["flux"]), "--set", "sample.true_cfg_scale=3", "--out",
                str(tmp_path / "bad"), *SMALL, *FLUX)
    assert proc.returncode == 2 and "needs a negative prompt" in proc.stderr


def test_a_flow_alias_offline_without_weights_names_the_download_command(tmp_path):
    env = dict(_env(), HF_HOME=str(tmp_path / "empty-hf-home"))
    proc = subprocess.run([RLBENCH, "train", "--model", "flux.1-dev", "--out", str(tmp_path / "run"), *SMALL],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "hf download black-forest-labs/FLUX.1-dev" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_models_list_shows_the_flow_models():
    proc = _run("models", "list")
    assert proc.returncode == 0, proc.stderr
    for name in ("sd-3.5-medium", "sd-3.5-large", "flux.1-dev", "flux.1-schnell"):
        assert name in proc.stdout
