"""``make demo``: the main job end to end — train with DDPO, then evaluate — on this machine.

The demo trains the embedded ``shapes`` model (shipped with rlbench, no download) with DDPO-IS
and the model's CPU presets against the learned alignment proxy ``shapes-clip``, then scores its
logged samples with the proxy, the exact ``shapes-gold`` and ``shapes-aesthetic`` and prints the
first-vs-last-epoch table (the proxy rises; the gold shows what that is worth): sampling with
log-probs, rewards, PPO updates, checkpoints, metrics and evaluation tables, in a few CPU minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlbench.errors import RLBenchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlbench.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="output folder (replaced if it exists)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the model's preset)")
    args = parser.parse_args(argv)
    out = Path(args.out)

    from rlbench.eval.evaluate import evaluate, markdown_table
    from rlbench.diffusion.policy import quiet_hf
    from rlbench.train.trainer import train

    quiet_hf()
    try:
        print("training the embedded shapes model with DDPO-IS on shapes-clip (offline, CPU presets)")
        run = train(
            overrides=["model.device=cpu", "logging.num_samples=32"],
            values={
                "algorithm": {"name": "ddpo-is"}, "model": {"name": "shapes"}, "reward": {"name": "shapes-clip"},
                "run": {"epochs": args.epochs, "out": str(out / "run"), "seed": 0},
            },
            overwrite=True,
            progress=True,
        )
        result = evaluate([run], rewards=["shapes-clip", "shapes-gold", "shapes-aesthetic"], out=out / "eval",
                          overwrite=True)
    except RLBenchError as exc:
        print(f"error: {exc}")
        return 2
    last = int(result.summary["checkpoint"].max())
    print(markdown_table(result.summary[result.summary["checkpoint"].isin([0, last])]))
    print(f"run directory: {run}  (config.toml, metrics.jsonl, samples/, checkpoints/, tb/)")
    print(f"evaluation:    {result.out}  (scores.parquet, tables/, plots/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
