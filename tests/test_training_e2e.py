"""End-to-end training through real subprocesses: the CLI, exact resume after SIGKILL, and
gradient synchronisation across 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlbench.testing import save_tiny_sd_pipeline

RLBENCH = str(Path(sys.executable).parent / "rlbench")
SMALL = [
    "--set", "sample.num_steps=3", "--set", "sample.batch_size=4", "--set", "sample.num_batches_per_epoch=1",
    "--set", "train.batch_size=2", "--set", "train.gradient_accumulation_steps=1",
    "--set", "logging.tensorboard=false", "--set", "logging.num_samples=4", "--set", "model.device=cpu",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


def _train(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([RLBENCH, "train", *args], env=_env(), capture_output=True, text=True, timeout=600, **kw)


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def test_cli_train_writes_run_directory(tiny, tmp_path):
    out = tmp_path / "run"
    proc = _train("--algo", "ddpo-is", "--reward", "incompressibility:1,compressibility:0.25", "--model", str(tiny),
                  "--epochs", "2", "--out", str(out), "--set", 'logging.watch=["compressibility"]', *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"samples", "reward_queries", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac"} <= set(rows[0])
    assert rows[1]["samples"] == 8 and rows[1]["reward_queries"] == 8
    # A combined reward logs each component beside the weighted total.
    for r in rows:
        total = r["reward_mean/incompressibility"] + 0.25 * r["reward_mean/compressibility"]
        assert r["reward_mean"] == pytest.approx(total, rel=1e-5)
        # A watched reward is scored on the same samples without being trained on.
        assert r["watch_mean/compressibility"] == pytest.approx(r["reward_mean/compressibility"], rel=1e-6)
    assert (out / "config.toml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0001", "0002"]
    assert (out / "checkpoints" / "0002" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples" / "0001" / "records.jsonl").is_file()
    # The same --out again is refused and the run is left as it was.
    before = (out / "metrics.jsonl").read_bytes()
    again = _train("--model", str(tiny), "--out", str(out), *SMALL)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_after_sigkill_matches_uninterrupted_run(tiny, tmp_path):
    args = ["--algo", "ddpo-is", "--reward", "incompressibility", "--model", str(tiny), "--epochs", "4", *SMALL]
    full = tmp_path / "full"
    assert _train(*args, "--out", str(full)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([RLBENCH, "train", *args, "--out", str(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "0002").is_dir():  # kill somewhere in epoch 3
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < "0004", f"the kill came too late to test anything: {done}"

    resumed = _train("--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(killed) == _metrics(full)
    a = load_file(str(full / "checkpoints" / "0004" / "trainable.safetensors"))
    b = load_file(str(killed / "checkpoints" / "0004" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Only --epochs may change on resume.
    bad = _train("--resume", str(killed), "--reward", "compressibility")
    assert bad.returncode == 2 and "only --epochs may change" in bad.stderr


@pytest.mark.parametrize("algo,port", [("ddpo-is", 29513), ("grpo", 29514)])
def test_two_process_gradients_are_synchronised(tiny, tmp_path, algo, port):
    # grpo: process 0's rewards are flat, so its filter keeps nothing; GRPO pads every process to the same
    # number of micro-batches (each ends in an all-reduce), else this run hangs.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).parent / "ddp_worker.py"), str(tiny), str(tmp_path), algo]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rewards0.json").read_text())
    r1 = json.loads((tmp_path / "rewards1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["rewards"] != r1["rewards"], "replicas sampled identical data: the sync check would be vacuous"
    init = load_file(str(tmp_path / "initial0.safetensors"))
    a = load_file(str(tmp_path / "replica0.safetensors"))
    b = load_file(str(tmp_path / "replica1.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in a), "no parameter changed: nothing was trained"
    assert all(torch.equal(a[k], b[k]) for k in a), "replicas diverged: gradients were not all-reduced"


def test_eval_every_logs_held_out_curves_equal_to_the_harness(tiny, tmp_path):
    """eval.every: the held-out evaluation runs with the weights after the epoch and logs what the
    harness computes for the saved checkpoint (same noise, same rewards), KL 0 at the start."""
    from rlbench.eval.evaluator import evaluate_policy
    from rlbench.train.rundir import load_trained_policy

    prompts = tmp_path / "held.txt"
    prompts.write_text("a red cat\na blue dog\na green fish\n")
    out = tmp_path / "run"
    proc = _train("--model", str(tiny), "--reward", "incompressibility", "--epochs", "2", "--out", str(out), *SMALL,
                  "--set", "eval.every=2", "--set", f'eval.prompts=["{prompts}"]', "--set", "eval.images_per_prompt=2",
                  "--set", 'eval.rewards=["incompressibility","compressibility"]', "--set", "checkpoint.every=1")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("eval/") for k in rows[0])  # every 2 epochs: only after the second
    logged = {k: v for k, v in rows[1].items() if k.startswith("eval/")}
    assert set(logged) == {"eval/incompressibility/held", "eval/compressibility/held", "eval/kl/held"}
    assert logged["eval/incompressibility/held"] == pytest.approx(-logged["eval/compressibility/held"])
    assert logged["eval/kl/held"] > 0  # the LoRA moved the policy away from the base model
    policy = load_trained_policy(out, 2)
    again = evaluate_policy(policy, [str(prompts)], ["incompressibility"], seed=0, steps=3, eta=1.0, guidance=5.0,
                            images_per_prompt=2, prompts_per_set=8, batch_size=4).metrics()
    assert again["eval/incompressibility/held"] == pytest.approx(logged["eval/incompressibility/held"], rel=1e-4)
