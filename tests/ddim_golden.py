"""A fingerprint of the DDIM path: a shapes-model rollout (trajectory, log-probs) and the gradients and metrics of a
DDPO-IS and a GRPO (KL anchor) update on it, two optimizer steps each (so the second micro-batch's ratios are not 1
and the clip and the per-step ratio logging are exercised).

``tests/data/ddim_golden_3432769.safetensors`` was written by this file run against commit 3432769 (the code before
the issue 20-22 sessions changed the DDPO update loop to log ``ratio_by_step``)::

    git worktree add /tmp/base 3432769
    mkdir /tmp/basepkg && cp -r /tmp/base/rlbench /tmp/basepkg/ && for d in algorithms rewards benchmarks; do
        ln -s /tmp/base/$d /tmp/basepkg/rlbench/$d; done
    PYTHONPATH=/tmp/basepkg python tests/ddim_golden.py tests/data/ddim_golden_3432769.safetensors

``tests/test_ddim_regression.py`` recomputes it with the current code and compares. Only APIs present at that
commit are used.
"""

from __future__ import annotations

import sys

import torch

# two prompts, two images each (GRPO's groups); the rewards differ within each group
PROMPTS = ["a red circle", "a red circle", "a green triangle left of a blue square", "a green triangle left of a blue square"]
STEPS = 4
ADVANTAGES = (1.0, -0.5, 2.0, -1.5)
METRIC_KEYS = ("loss", "approx_kl", "clipfrac", "policy_loss", "kl")


def fingerprint() -> dict[str, torch.Tensor]:
    from accelerate import Accelerator

    from rlbench.algorithm import TrainBatch, UpdateContext, make_algorithm
    from rlbench.config import load_config
    from rlbench.diffusion.policy import BaseWeights, load_policy

    policy = load_policy("shapes")
    torch.manual_seed(0)
    policy.setup_training("lora", 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    base = BaseWeights(policy)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the base, so GRPO's KL is not 0
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    start = [p.detach().clone() for p in policy.trainable_parameters()]
    neg = policy.encode_prompts([""])
    ro = policy.sample(PROMPTS, num_steps=STEPS, eta=1.0, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(2), neg_embeds=neg)
    out = {"latents": ro.latents.detach().clone(), "log_probs": ro.log_probs.detach().clone()}
    params = policy.trainable_parameters()
    for algo, options in (("ddpo-is", {}), ("grpo", {"beta": 0.04})):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
                p.grad = None
        cfg = load_config(values={
            "model": {"name": "shapes"}, "algorithm": {"name": algo, **options},
            "sample": {"num_steps": STEPS, "batch_size": 4, "num_batches_per_epoch": 1, "guidance_scale": 5.0,
                       "images_per_prompt": 2},
            "train": {"batch_size": 2, "gradient_accumulation_steps": 1, "steps_per_forward": 1,
                      "timestep_window": 1.0, "max_grad_norm": 0.0}})
        batch = TrainBatch(latents=ro.latents, log_probs=ro.log_probs, timesteps=ro.timesteps,
                           prompt_embeds=ro.prompt_embeds, neg_embeds=neg, rewards=torch.tensor(ADVANTAGES),
                           advantages=torch.tensor(ADVANTAGES), prompts=list(PROMPTS))
        grads: list[torch.Tensor] = []

        class Capture(torch.optim.SGD):
            def step(self, closure=None):  # record each optimizer step's gradient, then take the step
                grads.append(torch.cat([q.grad.detach().flatten() for q in params]))
                return super().step(closure)

        ctx = UpdateContext(cfg, Capture(params, lr=1e-2), Accelerator(cpu=True), torch.Generator().manual_seed(7),
                            params, policy, reference=base if options else None)
        metrics = make_algorithm(cfg).update(policy, batch, ctx)
        out[f"{algo}/grads"] = torch.stack(grads)
        out[f"{algo}/metrics"] = torch.tensor([float(metrics[k]) if metrics.get(k) is not None else float("nan")
                                               for k in METRIC_KEYS], dtype=torch.float64)
    return out


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in fingerprint().items()}, sys.argv[1])
