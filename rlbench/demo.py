"""``make demo``: the main job end to end — train with DDPO, then evaluate — on this machine.

Until the embedded ``shapes`` model ships, the demo trains a tiny random-weight Stable-Diffusion-
shaped pipeline (built from configs, saved in the diffusers format, no download) with DDPO-IS
against JPEG incompressibility, then scores its logged samples with incompressibility and
compressibility. Its images are noise-like (the weights are random); what it shows is the
whole pipeline: sampling with log-probs, rewards, PPO updates, checkpoints, metrics, eval tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlbench.errors import RLBenchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlbench.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="output folder (replaced if it exists)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs")
    args = parser.parse_args(argv)
    out = Path(args.out)

    from rlbench.evaluate import evaluate, markdown_table
    from rlbench.policy import quiet_hf
    from rlbench.testing import save_tiny_sd_pipeline
    from rlbench.training import train

    quiet_hf()
    try:
        model = save_tiny_sd_pipeline(out / "tiny-sd-random")
        print(f"built a tiny random-weight SD pipeline in {model} (diffusers format, no download)")
        run = train(
            overrides=[
                "sample.num_steps=10", "sample.batch_size=8", "sample.num_batches_per_epoch=2",
                "train.batch_size=4", "train.gradient_accumulation_steps=2", "train.learning_rate=1e-3",
                "advantage.per_prompt=false", "logging.num_samples=8", "model.device=cpu",
            ],
            values={
                "algorithm": {"name": "ddpo-is"}, "reward": {"name": "incompressibility"},
                "model": {"name": str(model)}, "prompts": {"name": "simple-animals"},
                "run": {"epochs": args.epochs, "out": str(out / "run"), "seed": 0},
            },
            overwrite=True,
            progress=True,
        )
        result = evaluate([run], rewards=["incompressibility", "compressibility"], out=out / "eval", overwrite=True)
    except RLBenchError as exc:
        print(f"error: {exc}")
        return 2
    print(markdown_table(result.summary[result.summary["checkpoint"].isin([0, args.epochs - 1])]))
    print(f"run directory: {run}  (config.toml, metrics.jsonl, samples/, checkpoints/, tb/)")
    print(f"evaluation:    {result.out}  (scores.parquet, tables/, plots/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
