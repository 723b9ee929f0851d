"""``make demo``: the main job end to end — train with DDPO, then evaluate — on this machine.

The demo trains the embedded ``shapes`` model (shipped with rlbench, no download) with DDPO-IS
and the model's CPU presets against the learned alignment proxy ``shapes-clip``, keeping a
checkpoint every 5 epochs, then runs ``rlbench eval`` on the run: the base model and the
checkpoints sample the training prompts and the three held-out splits with the same noise, scored
by both proxies and both exact gold rewards, with the KL from the base model and within-prompt
diversity. It prints the over-optimisation table (the proxy rises; the gold shows what that is
worth) and the path of ``report.html``. A few CPU minutes in all.
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

    from rlbench.utils.hf import quiet_hf
    from rlbench.eval.evaluate import evaluate, markdown_table
    from rlbench.train.trainer import train

    quiet_hf()
    try:
        print("training the embedded shapes model with DDPO-IS on shapes-clip (offline, CPU presets)")
        run = train(
            overrides=["model.device=cpu", "logging.num_samples=32"],  # the presets checkpoint every 5 epochs
            values={
                "algorithm": {"name": "ddpo-is"}, "model": {"name": "shapes"}, "reward": {"name": "shapes-clip"},
                "run": {"epochs": args.epochs, "out": str(out / "run"), "seed": 0},
            },
            overwrite=True,
            progress=True,
        )
        print("evaluating the base model and the checkpoints on training and held-out prompts (rlbench eval)")
        result = evaluate([run], out=out / "eval", overwrite=True, cache=out / "eval-cache", log=print)
    except RLBenchError as exc:
        print(f"error: {exc}")
        return 2
    for name in ("overoptimisation", "generalisation"):
        table = result.tables[name]
        print(f"\n{table.title}\n")
        print(markdown_table(table.display), end="")
    print(f"\nrun directory: {run}  (config.toml, metrics.jsonl, samples/, checkpoints/, tb/)")
    print(f"evaluation:    {result.out}  (scores.parquet, kl.parquet, diversity.parquet, tables/, plots/)")
    print(f"report:        {result.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
