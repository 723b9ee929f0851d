"""ImageReward throughput: the batched path vs one image a time (as ImageReward's ``inference_rank`` loops).

    python benchmarks/zoo_imagereward.py [--n 64] [--size 256] [--batch-size 32] [--config tiny|small224]

The real checkpoint is not needed: a randomly initialised model of the same structure is written in the
official ``ImageReward.pt`` layout and loaded through the reward's normal path. ``tiny`` is the tests'
model (32 px input); ``small224`` keeps the real 224 px input and 16 px patches (197 image tokens) with
narrow, 2-layer encoders, so attention and pre-processing costs are those of the real input size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from rlbench.benchmarks.timing import best_of
from rlbench.nets.blip import BlipRewardConfig, ImageRewardModel, model_to_official_state_dict
from rlbench.rewards.imagereward import ImageReward

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "on", "the"]
CONFIGS = {
    "tiny": dict(image_size=32, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2,
                 vision_intermediate=64, text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
                 max_position_embeddings=40, projection_dim=16),
    "small224": dict(image_size=224, patch_size=16, vision_hidden=64, vision_layers=2, vision_heads=4,
                     vision_intermediate=256, text_hidden=64, text_layers=2, text_heads=4, text_intermediate=256,
                     max_position_embeddings=40, projection_dim=16),
}


def build(folder: Path, config: dict) -> dict:
    """Write a random checkpoint (official layout) and a tokenizer folder; return the config used."""
    config = {**config, "vocab_size": len(VOCAB) + 2}
    torch.manual_seed(0)
    model = ImageRewardModel(BlipRewardConfig.from_options(config))
    torch.save(model_to_official_state_dict(model), folder / "ImageReward.pt")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = build(folder, CONFIGS[args.config])
        reward = ImageReward(weights=str(folder / "ImageReward.pt"), tokenizer=str(folder / "tokenizer"),
                             config=config, batch_size=args.batch_size)
        images = torch.rand(args.n, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        prompts = [("a photo of a cat", "a red dog on the blue photo")[i % 2] for i in range(args.n)]
        batched = reward(images, prompts).scores  # loads the model once, outside the timings
        loop = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]).scores for i in range(args.n)])
        torch.testing.assert_close(loop, batched, atol=1e-4, rtol=1e-4)
        t_batch = best_of(lambda: reward(images, prompts))
        t_loop = best_of(lambda: [reward(images[i : i + 1], prompts[i : i + 1]) for i in range(args.n)])
    print(f"imagereward ({args.config} model), {args.n} images {args.size}x{args.size}, batch_size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  batched      {args.n / t_batch:8.1f} img/s  ({t_batch:.3f} s)")
    print(f"  one-by-one   {args.n / t_loop:8.1f} img/s  ({t_loop:.3f} s)")
    print(f"  speed-up     {t_loop / t_batch:8.2f}x")


if __name__ == "__main__":
    main()
