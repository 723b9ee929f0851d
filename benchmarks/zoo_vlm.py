"""Throughput of the VLM+BERTScore rewards: batched path vs a one-image-at-a-time loop, and agreement.

    python benchmarks/zoo_vlm.py [--n 64] [--size 256] [--batch-size 32] [--agreement 512] [--threads 1]

Measures, on this CPU, images/s of

* ``shapes-vlm-bertscore`` (shipped shapes CLIP retrieval + offline MiniLM BERTScore) on shapes-world
  renders nearest-upscaled to ``--size``;
* the BERTScore step alone (``rlbench.nets.bertscore.BERTScorer``, MiniLM, recall of answer vs
  "The image contains {prompt}");
* the in-process VLM describer on a tiny random LLaVA (``rlbench.testing.write_tiny_llava``);

each batched (``batch_size``) and in a loop over single images, with the BERTScore token-state
cache off so both paths encode every sentence. Then the Spearman correlation of
``shapes-vlm-bertscore`` (and, for context, ``shapes-clip``) with ``shapes-gold`` on ``--agreement``
fresh renders, half scored against their own caption and half against a random other caption.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from rlbench.benchmarks.timing import best_of


def report(label: str, n: int, batched_s: float, loop_s: float) -> None:
    print(f"{label:34s} batched {n / batched_s:9.1f} img/s   loop {n / loop_s:9.1f} img/s   "
          f"speed-up x{loop_s / batched_s:5.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--agreement", type=int, default=512, help="renders for the gold agreement (0: skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from rlbench.nets.bertscore import BERTScorer
    from rlbench.rewards.shapes_vlm_bertscore import ShapesVLMBERTScore, agreement_pairs, gold_agreement
    from rlbench.rewards.vlm_bertscore import QUESTION
    from rlbench.nets.vlm import TransformersDescriber
    from rlbench.testing import write_tiny_llava

    n, bs = args.n, args.batch_size
    images, prompts, _ = agreement_pairs(n, seed=123)
    images = F.interpolate(images, size=(args.size, args.size), mode="nearest-exact")
    print(f"{n} images of {args.size}x{args.size}, batch_size {bs}, torch threads {torch.get_num_threads()}")

    reward = ShapesVLMBERTScore(batch_size=bs)
    reward.scorer.cache_size = 0  # encode every sentence on both paths
    reward(images[:2], prompts[:2])  # load both models, build the caption bank
    batched = best_of(lambda: reward(images, prompts))
    loop = best_of(lambda: [reward(images[i : i + 1], prompts[i : i + 1]) for i in range(n)])
    report("shapes-vlm-bertscore", n, batched, loop)
    warm = ShapesVLMBERTScore(batch_size=bs)  # default: LRU cache of token states on
    warm(images, prompts)
    batched = best_of(lambda: warm(images, prompts))
    loop = best_of(lambda: [warm(images[i : i + 1], prompts[i : i + 1]) for i in range(n)])
    report("shapes-vlm-bertscore, warm cache", n, batched, loop)

    answers = reward(images, prompts).info["answers"]
    references = [f"The image contains {p}" for p in prompts]
    scorer = BERTScorer(batch_size=bs, cache_size=0)
    scorer.recall(answers[:1], references[:1])
    batched = best_of(lambda: scorer.recall(answers, references))
    loop = best_of(lambda: [scorer.recall(answers[i : i + 1], references[i : i + 1]) for i in range(n)])
    report("BERTScore step (MiniLM, recall)", n, batched, loop)

    with tempfile.TemporaryDirectory() as tmp:
        describer = TransformersDescriber(write_tiny_llava(tmp), max_new_tokens=16, batch_size=bs)
        describer.describe(images[:1], QUESTION)
        batched = best_of(lambda: describer.describe(images, QUESTION))
        loop = best_of(lambda: [describer.describe(images[i : i + 1], QUESTION) for i in range(n)])
        report("tiny-LLaVA describer (16 tokens)", n, batched, loop)

    if args.agreement:
        from rlbench.rewards.shapes_clip import ShapesCLIP
        from rlbench.utils.stats import spearman

        for seed in (0, 1):
            rho = gold_agreement(ShapesVLMBERTScore(), args.agreement, seed)
            imgs, ps, gold = agreement_pairs(args.agreement, seed)
            rho_clip = spearman(ShapesCLIP()(imgs, ps).scores.numpy(), gold)
            print(f"Spearman vs shapes-gold, {args.agreement} renders, seed {seed}: "
                  f"shapes-vlm-bertscore {rho:.3f}   shapes-clip {rho_clip:.3f}")


if __name__ == "__main__":
    main()
