"""Run directories with real checkpoints for the evaluation tests, built in seconds (no training).

A checkpoint's trainable weights are the base model's plus deterministic noise growing with the
epoch, saved with the policy's own ``save_state`` (what training writes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def make_eval_run(
    path: str | Path,
    *,
    model: str = "shapes",
    reward: str = "shapes-clip",
    prompts: str = "shapes-demo",
    epochs: Sequence[int] = (1, 2),
    train_mode: str = "full",
    seed: int = 0,
    steps: int = 2,
    eta: float = 1.0,
    guidance: float = 5.0,
    watch: Sequence[str] = (),
    scale: float = 0.02,
    algorithm: str = "ddpo-is",
):
    """A run directory whose checkpoints ``epochs`` hold perturbed weights; returns its RunDir."""
    import tomli_w

    from rlbench.diffusion.policy import load_policy
    from rlbench.train.rundir import RunDir

    run = RunDir.create(path)
    cfg: dict[str, Any] = {
        "run": {"seed": seed, "epochs": max(epochs)},
        "model": {"name": model, "train_mode": train_mode},
        "prompts": {"name": prompts},
        "reward": {"name": reward},
        "sample": {"num_steps": steps, "eta": eta, "guidance_scale": guidance},
        "algorithm": {"name": algorithm},
        "logging": {"watch": list(watch)},
    }
    run.write_config(tomli_w.dumps(cfg))
    policy = load_policy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy.setup_training(train_mode)
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    base = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(1000 + seed)
    noise = [torch.randn(p.shape, generator=gen) for p in params]
    for e in epochs:
        with torch.no_grad():
            for p, b, n in zip(params, base, noise):
                p.copy_(b + scale * e * n * (b.abs().mean() + 1e-3))

        def write(folder: Path, e=e) -> None:
            policy.save_state(folder)
            (folder / "trainer_state.json").write_text(json.dumps({"epoch": e, "reward_queries": 64 * e}))

        run.save_checkpoint(e, write)
    return run
