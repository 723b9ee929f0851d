"""Train the shapes world's learned proxy rewards (reproducible; CPU minutes).

    python -m rlbench.shapes.train_proxies aesthetic --out DIR [--n-train 4000] [--steps 600] [--seed 0] [--threads 1]

``aesthetic``: the small CNN of :mod:`rlbench.shapes.aesthetic` (reward ``shapes-aesthetic``), fitted
with MSE to the exact gold rule (reward ``shapes-aesthetic-gold``) on a *limited* set of renders from
:func:`rlbench.shapes.world.sample_batch` (no augmentation): good on the render distribution,
exploitable off it, like the LAION aesthetic predictor. The shipped weights
(``rlbench/shapes/proxies/aesthetic/``) were made with the defaults. Output: ``model.safetensors`` +
``config.json`` (architecture, training settings, measured rank correlation with the gold on fresh
renders of another seed). With the same torch version and ``--threads`` the weights come out
bit-identical (the shipped ones: ``--threads 1``, ~35 s of training on one CPU core).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlbench.shapes import aesthetic
from rlbench.shapes.world import sample_batch
from rlbench.utils.stats import spearman

EVAL_SEED = 20240601  # fresh renders for the reported correlation: another seed than any training seed
EVAL_SIZE = 2000


def train_aesthetic(
    out_folder: str | Path | None,
    n_train: int = 4000,
    steps: int = 600,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    n_eval: int = EVAL_SIZE,
    eval_seed: int = EVAL_SEED,
    arch: dict[str, Any] | None = None,
    log_every: int = 500,
) -> dict[str, Any]:
    """Fit the aesthetic proxy to the gold rule; save it to ``out_folder`` (None: don't save).

    Data: ``n_train`` renders of ``sample_batch(default_rng(seed), n_train)`` and their gold scores.
    Optimiser: AdamW (``lr``, ``weight_decay``) with cosine decay to 0 over ``steps`` minibatches of
    ``batch_size`` drawn with replacement by a generator seeded with ``seed`` (torch weights too), on
    CPU. Reported: Spearman and Pearson correlation and MSE against the gold on ``n_eval`` fresh renders
    of ``eval_seed`` and on the training set.

    Returns the metrics dict (also written into ``config.json`` under ``"metrics"``).
    """
    arch = dict(aesthetic.DEFAULT_ARCH if arch is None else arch)
    t0 = time.perf_counter()
    images, _, _ = sample_batch(np.random.default_rng(seed), n_train)
    gold = aesthetic.aesthetic_gold(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(gold).float()
    t_data = time.perf_counter() - t0

    torch.manual_seed(seed)
    model = aesthetic.AestheticNet.from_config(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t1 = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (min(batch_size, n_train),), generator=gen)
        loss = F.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if log_every and step % log_every == 0:
            print(f"  step {step}/{steps}  train mse {running / log_every:.5f}", flush=True)
            running = 0.0
    t_train = time.perf_counter() - t1
    model.requires_grad_(False).eval()

    pred_train = aesthetic.predict(model, images)
    eval_images, _, _ = sample_batch(np.random.default_rng(eval_seed), n_eval)
    eval_gold = aesthetic.aesthetic_gold(eval_images)
    pred_eval = aesthetic.predict(model, eval_images)
    metrics = {
        "eval_spearman": round(spearman(pred_eval, eval_gold), 4),
        "eval_pearson": round(float(np.corrcoef(pred_eval, eval_gold)[0, 1]), 4),
        "eval_mse": round(float(np.mean((pred_eval - eval_gold) ** 2)), 6),
        "eval_n": n_eval,
        "eval_seed": eval_seed,
        "train_spearman": round(spearman(pred_train, gold), 4),
        "train_mse": round(float(np.mean((pred_train - gold) ** 2)), 6),
        "gold_std_eval": round(float(eval_gold.std()), 4),
        "data_seconds": round(t_data, 1),
        "train_seconds": round(t_train, 1),
    }
    if out_folder is not None:
        config = {
            "reward": "shapes-aesthetic",
            "gold": {"reward": "shapes-aesthetic-gold", "version": aesthetic.GOLD_VERSION},
            "architecture": {"class": "AestheticNet", **arch, "params": aesthetic.n_params(model)},
            "training": {
                "data": f"rlbench.shapes.world.sample_batch(numpy.random.default_rng({seed}), {n_train}), "
                        "no augmentation",
                "n_train": n_train, "seed": seed, "steps": steps, "batch_size": batch_size,
                "optimizer": "AdamW", "lr": lr, "weight_decay": weight_decay, "schedule": "cosine to 0",
                "loss": "MSE against the gold rule",
                "command": f"python -m rlbench.shapes.train_proxies aesthetic --out DIR --n-train {n_train} "
                           f"--steps {steps} --seed {seed} --threads {torch.get_num_threads()}",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__, "python": platform.python_version(),
                "reproducibility": "bit-identical weights on the same torch version and thread count",
            },
            "metrics": metrics,
        }
        aesthetic.save_model(Path(out_folder), model, config)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlbench.shapes.train_proxies",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="proxy", required=True)
    p = sub.add_parser("aesthetic", help="the shapes-aesthetic CNN, fitted to shapes-aesthetic-gold")
    p.add_argument("--out", required=True, type=Path, help="folder for model.safetensors + config.json")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=EVAL_SIZE, help="fresh renders for the reported correlation")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.proxy == "aesthetic":
        metrics = train_aesthetic(args.out, n_train=args.n_train, steps=args.steps, seed=args.seed,
                                  n_eval=args.n_eval)
        print(" ".join(f"{k}={v}" for k, v in metrics.items()))
        print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
