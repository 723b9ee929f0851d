"""How many samples one DDPO gradient step needs before its signal beats its noise, per window of steps.

Samples one batch from a policy (default: the shipped shapes model), turns its rewards into
per-prompt group advantages, and computes the score-function gradient ``sum_i A_i grad log p_t(i)``
on disjoint chunks of the batch, separately for windows of denoising steps. With chunk gradients
``G_c`` (each a sum over ``m`` samples), ``|E g|^2`` is estimated without bias from the off-diagonal
mean of ``<G_c, G_c'>`` and the per-sample noise ``tr Cov(g)`` from the diagonal; their ratio
``n* = tr Cov(g) / |E g|^2`` is the batch size at which one step's gradient has SNR 1 ("inf": no
signal detected above the noise). Prints one line per window.

    python benchmarks/ddpo_gradient_snr.py [--reward shapes-clip] [--prompts shapes-demo]
        [--prompt-count 8] [--images-per-prompt 32] [--steps 10] [--chunks 16] [--threads 1]
"""

from __future__ import annotations

import argparse

import sys

import numpy as np
import torch
from rlbench import make_reward
from rlbench.train.advantages import PerPromptStatTracker
from rlbench.algorithms.ddpo import score_function_loss
from rlbench.errors import RLBenchError
from rlbench.diffusion.policy import load_policy
from rlbench.prompts import load_prompts
from rlbench.train.trainer import epoch_prompts


def samples_for_snr_one(chunks: list[torch.Tensor], per_chunk: int) -> tuple[float, float]:
    """(n*, |E g|^2) from chunk gradients, each the sum of ``per_chunk`` i.i.d. per-sample gradients."""
    x = torch.stack(chunks).double()
    gram = x @ x.T
    c = len(chunks)
    off = (gram.sum() - gram.diag().sum()) / (c * (c - 1))  # E<G_c, G_c'> = m^2 |mu|^2
    mu2 = float(off) / per_chunk**2
    trace = float(gram.diag().mean() - off) / per_chunk  # E|G_c|^2 - |E G_c|^2 = m tr(Cov)
    return (trace / mu2 if mu2 > 0 else float("inf")), mu2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--reward", default="shapes-clip")
    parser.add_argument("--prompts", default="shapes-demo")
    parser.add_argument("--prompt-count", type=int, default=8, help="distinct prompts in the batch")
    parser.add_argument("--images-per-prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    try:
        policy = load_policy(args.model)
        reward = make_reward(args.reward)
        prompt_set = load_prompts(args.prompts)
    except RLBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    policy.setup_training("full")
    params = policy.trainable_parameters()
    k, n_prompts = args.images_per_prompt, args.prompt_count
    # One epoch of the trainer's grouped sampler: n_prompts different prompts, k images each.
    [(prompts, metadata)] = epoch_prompts(prompt_set, np.random.default_rng(args.seed), n_prompts * k, 1, k)
    neg = policy.encode_prompts([""])
    policy.unet.eval()
    with torch.no_grad():
        ro = policy.sample(prompts, num_steps=args.steps, eta=1.0, guidance_scale=args.guidance,
                           generator=torch.Generator().manual_seed(args.seed), neg_embeds=neg)
    # Each prompt normalised against its own group, as training with advantage.min_count = k does.
    adv = PerPromptStatTracker(buffer_size=k, min_count=k).update(prompts, reward(ro.images, prompts, metadata).scores)
    policy.unet.train()

    n, steps = len(prompts), args.steps
    per = n // args.chunks
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 1))
    fifth, half = max(1, steps // 5), max(1, steps // 2)
    parts = {"a": range(0, fifth), "b": range(fifth, half), "c": range(half, steps)}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in parts}
    for c in range(args.chunks):
        idx = order[c * per:(c + 1) * per]
        for name, window in parts.items():
            for p in params:
                p.grad = None
            for j in window:
                lp = policy.step_log_prob(ro.latents[idx, j], ro.timesteps[j].expand(per), ro.latents[idx, j + 1],
                                          ro.prompt_embeds[idx], neg, args.guidance, 1.0)
                (score_function_loss(lp, adv[idx]) * per).backward()  # sum over the chunk
            grads[name].append(torch.cat([p.grad.flatten() for p in params]))

    def total(*names: str) -> list[torch.Tensor]:
        return [sum(grads[name][c] for name in names) for c in range(args.chunks)]

    print(f"{args.reward} on {n_prompts} prompts of {args.prompts} x {k} images, {steps} DDIM steps, "
          f"{args.chunks} chunks of {per}")
    for label, names in [(f"steps 1-{fifth} (first 20%)", ("a",)), (f"steps 1-{half} (first half)", ("a", "b")),
                         (f"steps {half + 1}-{steps} (last half)", ("c",)), (f"all {steps} steps", ("a", "b", "c"))]:
        nstar, mu2 = samples_for_snr_one(total(*names), per)
        print(f"  {label:28s} samples per step for SNR 1: {nstar:8.0f}   |E g|^2 = {mu2:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
