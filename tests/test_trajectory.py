"""The one trajectory loop reproduces the DDIM family bit for bit.

Training rollouts (``policy.sample``), evaluation (``sample_paired`` with the KL hook) and DRaFT's sampling with
gradients all walk the chain through :func:`rlbench.diffusion.trajectory.sample_trajectory` now. Before, each had
its own loop over ``DDIMScheduler.timesteps`` calling the DDIM step directly; these tests keep those loops, written
out here against ``ddim_step_with_logprob`` / ``ddim_transition``, and require exact equality (``torch.equal``) of
trajectories, log-probs, images, KLs and DRaFT gradients on the tiny SD pipeline and the shapes model. The CLI
runs of every algorithm and an evaluation were also compared against the commit before the refactor (same
metrics.jsonl and checkpoint hashes; see the session note).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from rlbench.diffusion.ddim import ddim_step_with_logprob, ddim_transition
from rlbench.diffusion.gaussian import transition_kl
from rlbench.diffusion.policy import BaseWeights, load_policy
from rlbench.testing import save_tiny_sd_pipeline

PROMPTS = ["a cat", "a dog", "a red circle", "two blue squares"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=["tiny-sd", "shapes"])
def policy_and_base(request, tmp_path_factory):
    if request.param == "tiny-sd":
        policy = load_policy(str(save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny") / "sd")))
    else:
        policy = load_policy("shapes")
    torch.manual_seed(0)
    policy.setup_training("lora", 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    base = BaseWeights(policy)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a policy away from the base, so the KL is not 0
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, base


def _embeds(policy, prompts):
    return policy.encode_prompts(prompts)["embeds"]


def _old_sample(policy, prompts, steps, eta, guidance, generator):
    """The training rollout as it was: x_T * init_noise_sigma, then ddim_step_with_logprob per timestep."""
    embeds, neg = _embeds(policy, prompts), _embeds(policy, [""])
    sched = policy.scheduler
    sched.set_timesteps(steps)
    x = randn_tensor((len(prompts), *policy.latent_shape), generator=generator, dtype=torch.float32)
    x = x * sched.init_noise_sigma
    xs, lps = [x], []
    for t in sched.timesteps:
        eps = policy.guided_eps(x, t, embeds, neg, guidance)
        x, lp = ddim_step_with_logprob(sched, eps, t, x, eta=eta, generator=generator)
        xs.append(x)
        lps.append(lp)
    return torch.stack(xs, 1), torch.stack(lps, 1), sched.timesteps.clone(), policy.decode(x)


@torch.no_grad()
def test_training_rollout_is_bit_identical_to_the_ddim_loop(policy_and_base):
    policy, _ = policy_and_base
    latents, log_probs, timesteps, images = _old_sample(policy, PROMPTS, 4, 1.0, 5.0, torch.Generator().manual_seed(1))
    ro = policy.sample(PROMPTS, num_steps=4, eta=1.0, guidance_scale=5.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ro.latents, latents) and torch.equal(ro.log_probs, log_probs)
    assert torch.equal(ro.timesteps, timesteps) and torch.equal(ro.images, images)
    assert torch.equal(ro.final, latents[:, -1])


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
@torch.no_grad()
def test_paired_eval_sampling_and_kl_are_bit_identical_to_the_ddim_loop(policy_and_base, eta):
    from rlbench.eval.sampling import sample_paired
    from rlbench.utils.images import to_uint8

    policy, base = policy_and_base
    seeds = [11, 12, 13, 14]
    embeds, neg = _embeds(policy, PROMPTS), _embeds(policy, [""])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    sched = policy.scheduler
    sched.set_timesteps(4)
    x = randn_tensor((4, *policy.latent_shape), generator=gens, dtype=torch.float32) * sched.init_noise_sigma
    kl = torch.zeros(4, dtype=torch.float64)
    for t in sched.timesteps:  # the evaluation loop as it was: KL at the training eta (1.0), then the step
        eps = policy.guided_eps(x, t, embeds, neg, 5.0)
        with base.active():
            eps_base = policy.guided_eps(x, t, embeds, neg, 5.0)
        mean, std = ddim_transition(sched, eps, t, x, 1.0)
        mean_b, _ = ddim_transition(sched, eps_base, t, x, 1.0)
        kl += transition_kl(mean, mean_b, std)
        x = ddim_step_with_logprob(sched, eps, t, x, eta=eta, generator=gens)[0] if eta > 0 else \
            ddim_transition(sched, eps, t, x, 0.0)[0]
    images = to_uint8(policy.decode(x), layout="hwc")
    got = sample_paired(policy, PROMPTS, seeds, num_steps=4, eta=eta, guidance_scale=5.0,
                        neg_embeds=policy.encode_prompts([""]), base=base, kl_eta=1.0)
    assert np.array_equal(got.images, images)
    assert np.array_equal(got.kl, kl.numpy()) and got.kl_steps == 4


def test_draft_sampling_with_gradients_is_bit_identical_to_the_ddim_loop(policy_and_base):
    from rlbench.algorithm import make_algorithm
    from rlbench.config import load_config

    policy, _ = policy_and_base
    cfg = load_config(values={"model": {"name": "shapes"}, "algorithm": {"name": "draft", "options": {"k": 2}},
                              "reward": {"name": "shapes-aesthetic"}, "sample": {"num_steps": 4, "guidance_scale": 5.0}})
    algo = make_algorithm(cfg)
    prompts = PROMPTS[:2]
    neg = _embeds(policy, [""])
    params = policy.trainable_parameters()

    def grads(x0):
        for p in params:
            p.grad = None
        x0.pow(2).mean().backward()
        return [p.grad.clone() for p in params]

    x0, _ = algo.sample_with_grad(policy, prompts, neg, 2, torch.Generator().manual_seed(5))
    new = grads(x0)
    # The DRaFT loop as it was: noise for x_T and each step from the generator, reparameterised steps, the last
    # two with gradients (checkpointed transitions).
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(5)
    embeds = _embeds(policy, prompts)
    sched = policy.scheduler
    sched.set_timesteps(4)
    x = policy.initial_noise(2, gen) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        grad = i >= 2
        z = policy.initial_noise(2, gen)
        with torch.set_grad_enabled(grad):
            mean, std = checkpoint(policy.transition, x, t, embeds, neg, 5.0, 1.0, use_reentrant=False) if grad \
                else policy.transition(x, t, embeds, neg, 5.0, 1.0)
            x = mean + std * z
    assert torch.equal(x0.detach(), x.detach())
    old = grads(x)
    assert all(torch.equal(a, b) for a, b in zip(new, old))


def test_ddpo_update_gradient_equals_the_old_per_step_ddim_replay(policy_and_base):
    """The DDPO-IS update (TrainBatch with a Conditioning record, per-sample step keys, the shared step schedule)
    gives the gradient of the loop it replaced: every stored step re-scored with ``ddim_step_with_logprob`` on the
    stored action, the PPO loss averaged over steps (ratio 1 before the first optimizer step)."""
    from accelerate import Accelerator

    from rlbench.algorithm import TrainBatch, UpdateContext, make_algorithm
    from rlbench.algorithms.ddpo import ppo_clip_loss
    from rlbench.config import load_config

    policy, _ = policy_and_base
    cfg = load_config(values={"model": {"name": "shapes"}, "algorithm": {"name": "ddpo-is"},
                              "sample": {"num_steps": 3, "batch_size": 4, "num_batches_per_epoch": 1,
                                         "guidance_scale": 5.0, "images_per_prompt": 1},
                              "train": {"batch_size": 4, "gradient_accumulation_steps": 1, "steps_per_forward": 1,
                                        "timestep_window": 1.0, "max_grad_norm": 0.0}})
    neg = policy.encode_prompts([""])
    ro = policy.sample(PROMPTS, num_steps=3, eta=1.0, guidance_scale=5.0, generator=torch.Generator().manual_seed(2),
                       neg_embeds=neg)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    batch = TrainBatch(latents=ro.latents, log_probs=ro.log_probs, timesteps=ro.timesteps, prompt_embeds=ro.prompt_embeds,
                       neg_embeds=neg, rewards=torch.zeros(4), advantages=adv, prompts=list(PROMPTS))
    params = policy.trainable_parameters()
    for p in params:  # the module-scoped policy may carry another test's gradients
        p.grad = None
    captured: list[torch.Tensor] = []

    class Capture(torch.optim.SGD):
        def step(self, closure=None):  # keep the gradient instead of applying it
            captured.extend(p.grad.clone() for p in params)

    ctx = UpdateContext(cfg, Capture(params, lr=0.0), Accelerator(cpu=True), torch.Generator().manual_seed(7), params,
                        policy)
    make_algorithm(cfg).update(policy, batch, ctx)
    assert len(captured) == len(params)

    for p in params:
        p.grad = None
    sched = policy.scheduler
    sched.set_timesteps(3)
    embeds, neg_e = _embeds(policy, PROMPTS), _embeds(policy, [""])
    loss = 0.0
    for k, t in enumerate(sched.timesteps):
        eps = policy.guided_eps(ro.latents[:, k], t, embeds, neg_e, 5.0)
        _, lp = ddim_step_with_logprob(sched, eps, t, ro.latents[:, k], eta=1.0, prev_sample=ro.latents[:, k + 1])
        loss = loss + ppo_clip_loss(lp, ro.log_probs[:, k], adv)[0] / 3
    loss.backward()
    scale = max(float(g.abs().max()) for g in captured)
    assert scale > 0
    for got, p in zip(captured, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6 * scale)
