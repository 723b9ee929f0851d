"""The DDPO successors: ``grpo`` (group advantages, zero-signal filter, KL to the base model, shared
initial noise), ``draft`` (DRaFT-K / AlignProp backprop through the sampler) and GDPO reward aggregation,
each against an independent computation, plus the CLI end to end (CPU, offline)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlbench.algorithm import TrainBatch, UpdateContext, make_algorithm
from rlbench.config import TrainConfig, load_config
from rlbench.diffusion.ddim import ddim_transition
from rlbench.diffusion.policy import BaseWeights, DiffusionPolicy, load_policy
from rlbench.errors import ConfigError
from rlbench.testing import save_tiny_sd_pipeline
from rlbench.train.advantages import GROUP_STD_EPS, gdpo_aggregate, group_normalize

GUIDANCE = 5.0
STEPS = 3
PROMPTS = ["a cat", "a cat", "a dog", "a dog"]  # two groups of k = 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("successor-models") / "tiny-sd", sample_size=16)


def _config(model: str | Path, algo: str, *, reward: str = "incompressibility", steps: int = STEPS,
            samples: int = 4, k: int = 2, mb: int = 2, acc: int = 1, per_call: int = 0, **options) -> TrainConfig:
    return load_config(values={
        "model": {"name": str(model), "device": "cpu"},
        "algorithm": {"name": algo, **options},
        "reward": {"name": reward},
        "sample": {"batch_size": samples, "num_batches_per_epoch": 1, "num_steps": steps, "eta": 1.0,
                   "guidance_scale": GUIDANCE, "images_per_prompt": k},
        "train": {"batch_size": mb, "gradient_accumulation_steps": acc, "num_inner_epochs": 1,
                  "learning_rate": 1e-2, "steps_per_forward": per_call},
    })


def _lora_policy(tiny: Path, seed: int = 0) -> DiffusionPolicy:
    from accelerate import Accelerator

    policy = load_policy(str(tiny))
    torch.manual_seed(seed)
    policy.setup_training("lora")
    policy.prepare(Accelerator(cpu=True))
    return policy


def _perturb(params, scale: float = 0.3, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


class Setup:
    """A tiny LoRA policy, one real rollout of PROMPTS as a TrainBatch, and an UpdateContext whose reference
    is the base model (BaseWeights taken before any change, as the trainer does)."""

    def __init__(self, tiny: Path, cfg: TrainConfig, advantages: torch.Tensor | None = None) -> None:
        from accelerate import Accelerator

        self.cfg, self.algo = cfg, make_algorithm(cfg)
        self.policy = policy = _lora_policy(tiny)
        self.base = BaseWeights(policy)
        self.params = policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.learning_rate)
        self.steps_taken = 0
        step = self.optimizer.step

        def counting_step(*args, **kwargs):
            self.steps_taken += 1
            return step(*args, **kwargs)

        self.optimizer.step = counting_step
        self.neg = policy.encode_prompts([""])
        n = cfg.samples_per_epoch
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        ro = policy.sample(prompts, num_steps=cfg.sample.num_steps, eta=cfg.sample.eta,
                           guidance_scale=cfg.sample.guidance_scale, generator=torch.Generator().manual_seed(0),
                           neg_embeds=self.neg)
        self.rollout = ro
        if advantages is None:
            advantages = torch.linspace(-1.5, 2.0, n)
        self.batch = TrainBatch(latents=ro.latents, log_probs=ro.log_probs, timesteps=ro.timesteps,
                                prompt_embeds=ro.prompt_embeds, neg_embeds=self.neg, rewards=torch.zeros(n),
                                advantages=advantages, prompts=prompts)
        self.ctx = UpdateContext(cfg, self.optimizer, Accelerator(cpu=True), torch.Generator().manual_seed(7),
                                 self.params, policy, reference=self.base if self.algo.uses_reference() else None)


# -- 1. the KL penalty ---------------------------------------------------------------------------------


@pytest.mark.parametrize("std_shape", ["per-sample", "scalar"])
def test_kl_penalty_equals_torch_gaussian_kl(std_shape):
    from torch.distributions import Normal, kl_divergence

    from rlbench.algorithms.grpo import kl_penalty

    g = torch.Generator().manual_seed(0)
    b = 5
    mean = torch.randn(b, 4, 6, 7, generator=g, dtype=torch.float64)
    mean_ref = (mean + 0.3 * torch.randn(b, 4, 6, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    std = (torch.rand(b, 1, 1, 1, generator=g, dtype=torch.float64) + 0.05) if std_shape == "per-sample" \
        else torch.tensor(0.37, dtype=torch.float64)
    mean.requires_grad_(True)
    ours = kl_penalty(mean, mean_ref, std)
    full = std.expand_as(mean) if std.ndim else torch.full_like(mean, float(std))
    expected = kl_divergence(Normal(mean.detach(), full), Normal(mean_ref.detach(), full)).mean(dim=(1, 2, 3))
    assert ours.shape == (b,)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-6, atol=0)
    assert float(expected.min()) > 0
    # The reference is fixed: no gradient reaches mean_ref, and d/dmean is (mean - ref) / (D sigma^2).
    ours.sum().backward()
    assert mean_ref.grad is None
    d = mean[0].numel()
    torch.testing.assert_close(mean.grad, (mean - mean_ref).detach() / (d * full**2), rtol=1e-9, atol=0)
    # float32 inputs give the same numbers to float32 precision.
    ours32 = kl_penalty(mean.detach().float(), mean_ref.detach().float(), std.float())
    torch.testing.assert_close(ours32.double(), expected, rtol=1e-5, atol=0)


def _rows(batch: TrainBatch, steps: list[int]):
    """One (x_t, t, x_next, embeds, old log-prob) row per sample, sample i at denoising step steps[i]."""
    i = torch.arange(len(batch))
    k = torch.tensor(steps)
    return (batch.latents[i, k], batch.timesteps[k], batch.latents[i, k + 1], batch.prompt_embeds,
            batch.log_probs[i, k])


def test_grpo_kl_is_zero_at_the_base_and_matches_hand_computation_after_a_change(tiny):
    s = Setup(tiny, _config(tiny, "grpo", beta=0.04))
    assert s.algo.uses_reference() and s.ctx.reference is s.base
    x_t, ts, x_next, embeds, old = _rows(s.batch, [0, 1, 2, 1])
    adv = torch.zeros(4)  # isolate the KL term: the PPO part is 0 with value and gradient
    loss, info = s.algo.step_loss(s.policy, x_t, ts, x_next, embeds, s.neg, old, adv, s.ctx)
    assert float(info["kl"]) == 0.0  # LoRA B = 0: base and policy compute bit-identical means
    assert float(loss.detach()) == 0.0

    _perturb(s.params)
    moved = [p.detach().clone() for p in s.params]
    loss, info = s.algo.step_loss(s.policy, x_t, ts, x_next, embeds, s.neg, old, adv, s.ctx)
    kl = float(info["kl"])
    assert kl > 0
    # The reference swap is undone: the policy holds its own (moved) weights again.
    assert all(torch.equal(p, m) for p, m in zip(s.params, moved))

    # By hand: the policy's mean with its weights, the base's under BaseWeights.active() and, independently
    # of BaseWeights, with peft's adapters disabled.
    mean, std = s.policy.transition(x_t, ts, embeds, s.neg, GUIDANCE, 1.0)
    assert std.shape == (4, 1, 1, 1) and len(set(std.flatten().tolist())) == 3  # per-sample sigma_t
    with torch.no_grad():
        with s.base.active():
            mean_ref, std_ref = s.policy.transition(x_t, ts, embeds, s.neg, GUIDANCE, 1.0)
        s.policy.unet.disable_adapters()
        try:
            mean_plain, _ = s.policy.transition(x_t, ts, embeds, s.neg, GUIDANCE, 1.0)
        finally:
            s.policy.unet.enable_adapters()
    assert torch.equal(std_ref, std)
    torch.testing.assert_close(mean_ref, mean_plain, rtol=0, atol=1e-6)
    assert float((mean.detach() - mean_ref).abs().max()) > 1e-4  # the perturbation really moved the mean
    hand = (((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std.reshape(-1) ** 2)).mean()
    assert kl == pytest.approx(float(hand.detach()), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(0.04 * float(hand.detach()), rel=1e-6)

    # The loss's gradient is beta times the KL's, flowing only through the policy's mean.
    got = torch.autograd.grad(loss, s.params)
    want = torch.autograd.grad(0.04 * hand, s.params)
    ref = torch.cat([w.flatten() for w in want]).double()
    assert float(ref.norm()) > 0
    assert float((torch.cat([g.flatten() for g in got]).double() - ref).norm() / ref.norm()) < 1e-5


# -- 2. group advantages and the zero-signal filter ------------------------------------------------------


def test_group_normalize_matches_numpy_and_zeroes_flat_groups():
    prompts = ["a", "b", "c", "a", "b", "c", "a", "b", "c"]
    r = np.array([1.0, 5.0, 0.1, 2.0, -3.0, 0.1, 4.5, 0.25, 0.1])  # "c" is flat (0.1 is not a float sum's fixpoint)
    p = np.array(prompts)
    assert np.mean(r[p == "c"]) != 0.1  # in float64, so "exactly 0" needs the explicit zeroing
    for global_std, given in ((True, r), (False, r), (True, torch.tensor(r, dtype=torch.float32))):
        adv, flat = group_normalize(prompts, given, global_std)
        assert adv.dtype == torch.float32 and adv.shape == (9,)
        r32 = np.asarray(given, dtype=np.float64)  # what the function sees
        expected = np.zeros(9)
        for q in "ab":
            m = p == q
            std = r32.std() if global_std else r32[m].std()
            expected[m] = (r32[m] - r32[m].mean()) / (std + 1e-4)
        np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(adv[torch.from_numpy(p == "c")], torch.zeros(3))  # exactly 0
        assert flat.tolist() == [q == "c" for q in prompts]
    assert GROUP_STD_EPS == 1e-4
    # The two modes really differ (the global std is not a group's).
    assert not torch.allclose(group_normalize(prompts, r, True)[0], group_normalize(prompts, r, False)[0])


def test_grpo_advantages_report_the_zero_std_ratio():
    cfg = _config("shapes", "grpo", reward="shapes-gold", samples=6, k=2, mb=2)
    algo = make_algorithm(cfg)
    prompts = ["x", "x", "y", "y", "z", "z"]
    adv = algo.advantages(torch.tensor([0.3, 0.3, 1.0, 0.0, 2.0, 5.0]), prompts)
    assert algo.zero_std_ratio == pytest.approx(1 / 3)
    assert torch.equal(adv[:2], torch.zeros(2)) and bool((adv[2:] != 0).all())
    torch.testing.assert_close(adv, group_normalize(prompts, torch.tensor([0.3, 0.3, 1.0, 0.0, 2.0, 5.0]))[0])
    algo.advantages(torch.tensor([1.0, 1.0, 2.0, 2.0, 0.0, 0.0]), prompts)
    assert algo.zero_std_ratio == 1.0
    algo.advantages(torch.tensor([1.0, 2.0, 3.0, 2.0, 0.0, 1.0]), prompts)
    assert algo.zero_std_ratio == 0.0
    # global_std = false: each group's own std.
    local = make_algorithm(_config("shapes", "grpo", reward="shapes-gold", samples=6, k=2, mb=2, global_std=False))
    r = torch.tensor([0.0, 2.0, 1.0, 0.0, 2.0, 5.0])
    torch.testing.assert_close(local.advantages(r, prompts), group_normalize(prompts, r, False)[0])


def _index_batch(adv: torch.Tensor) -> TrainBatch:
    n = len(adv)
    return TrainBatch(latents=torch.zeros(n, 2, 1, 1, 1), log_probs=torch.zeros(n, 1), timesteps=torch.zeros(1),
                      prompt_embeds=torch.zeros(n, 1, 1), neg_embeds=torch.zeros(1, 1, 1), rewards=torch.zeros(n),
                      advantages=adv, prompts=[""] * n)


def test_grpo_train_indices_keep_signal_and_pad_to_full_micro_batches():
    cfg = _config("shapes", "grpo", reward="shapes-gold", samples=12, k=2, mb=4)
    algo = make_algorithm(cfg)
    adv = torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 1.2, 0.0, 0.0, -1.2, 0.0, 0.0, 0.0])
    nonzero = {0, 2, 5, 8}
    zero = set(range(12)) - nonzero
    pads = set()
    for seed in range(6):
        ctx = SimpleNamespace(generator=torch.Generator().manual_seed(seed))
        keep = algo.train_indices(_index_batch(adv), ctx)
        assert keep.tolist() == sorted(nonzero)  # 4 kept: already a full micro-batch, no padding
        three = adv.clone()
        three[8] = 0.0  # 3 kept -> padded with one zero-advantage sample
        keep = algo.train_indices(_index_batch(three), ctx).tolist()
        assert len(keep) == 4 and keep == sorted(set(keep))
        assert {0, 2, 5} <= set(keep)
        (pad,) = set(keep) - {0, 2, 5}
        assert three[pad] == 0
        pads.add(pad)
        five = adv.clone()
        five[1] = 3.0  # 5 kept -> 8
        keep = algo.train_indices(_index_batch(five), ctx).tolist()
        assert len(keep) == 8 and nonzero | {1} <= set(keep) and len(set(keep)) == 8
    assert len(pads) > 1, "the padding sample should be drawn at random"
    # Nothing to learn: nothing trained.
    assert len(algo.train_indices(_index_batch(torch.zeros(12)), SimpleNamespace(generator=torch.Generator()))) == 0
    # filter_zero_std = false keeps every sample.
    keep_all = make_algorithm(_config("shapes", "grpo", reward="shapes-gold", samples=12, k=2, mb=4,
                                      filter_zero_std=False))
    assert torch.equal(keep_all.train_indices(_index_batch(adv), SimpleNamespace(generator=torch.Generator())),
                       torch.arange(12))


def test_grpo_update_trains_only_the_kept_samples(tiny):
    """A real update with one flat group: only the other group's samples reach the UNet, and the metrics say so."""
    cfg = _config(tiny, "grpo", beta=0.04, mb=2)
    s = Setup(tiny, cfg, advantages=torch.tensor([0.0, 0.0, 0.7, -0.7]))
    s.algo.zero_std_ratio = 0.5
    trained = []
    original = s.policy.step_log_prob_and_mean

    def spy(x_t, *args):
        trained.extend(i for row in x_t for i in range(4) for k in range(STEPS)
                       if torch.equal(s.batch.latents[i, k], row))
        return original(x_t, *args)

    s.policy.step_log_prob_and_mean = spy
    metrics = s.algo.update(s.policy, s.batch, s.ctx)
    assert set(trained) == {2, 3}
    assert metrics["trained_fraction"] == 0.5 and metrics["zero_std_ratio"] == 0.5
    assert s.steps_taken == 1 and {"kl", "policy_loss", "loss", "clipfrac"} <= set(metrics)


# -- 3. the first micro-step is on-policy: ratio 1 -------------------------------------------------------


def test_recomputed_log_probs_equal_the_sampled_ones(tiny):
    """Re-scoring the stored trajectory before any update: bit-identical when the UNet call has the sampling
    call's batch size (per step, scalar or per-sample t); with the steps batched into one larger call only
    float32 rounding separates them (observed |log-prob difference| <= 1e-6 on a CPU, 100x inside the 1e-4
    clip range)."""
    s = Setup(tiny, _config(tiny, "grpo"))
    b = s.batch
    with torch.no_grad():
        for k in range(STEPS):
            for t in (b.timesteps[k], b.timesteps[k].expand(len(b))):
                lp = s.policy.step_log_prob(b.latents[:, k], t, b.latents[:, k + 1], b.prompt_embeds,
                                            s.neg, GUIDANCE, 1.0)
                assert torch.equal(lp, b.log_probs[:, k]), k
            lp2, _, _ = s.policy.step_log_prob_and_mean(b.latents[:, k], b.timesteps[k].expand(len(b)),
                                                        b.latents[:, k + 1], b.prompt_embeds, s.neg, GUIDANCE, 1.0)
            assert torch.equal(lp2, b.log_probs[:, k])
        x_t, x_next = b.latents[:, :STEPS].flatten(0, 1), b.latents[:, 1:].flatten(0, 1)
        ts = b.timesteps.repeat(len(b))
        lp = s.policy.step_log_prob(x_t, ts, x_next, b.prompt_embeds.repeat_interleave(STEPS, 0), s.neg,
                                    GUIDANCE, 1.0)
        assert float((torch.exp(lp - b.log_probs.flatten()) - 1).abs().max()) < 1e-5


@pytest.mark.parametrize("algo", ["grpo", "ddpo-is"])
@pytest.mark.parametrize("per_call", [1, 0], ids=["one-step-per-call", "auto"])
def test_first_micro_step_ratio_is_one_and_clipfrac_zero(tiny, monkeypatch, algo, per_call):
    import rlbench.algorithms.ddpo as ddpo_mod
    import rlbench.algorithms.grpo as grpo_mod

    # One micro-batch of all 4 samples, one optimizer step: every ratio is computed before it.
    cfg = _config(tiny, algo, mb=4, acc=1, per_call=per_call)
    s = Setup(tiny, cfg, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    log_ratios = []
    for mod in (ddpo_mod, grpo_mod):
        original = mod.ppo_clip_loss

        def spy(log_prob, old_log_prob, *args, _original=original, **kwargs):
            assert s.steps_taken == 0
            log_ratios.append((log_prob - old_log_prob).detach())
            return _original(log_prob, old_log_prob, *args, **kwargs)

        monkeypatch.setattr(mod, "ppo_clip_loss", spy)
    metrics = s.algo.update(s.policy, s.batch, s.ctx)
    assert s.steps_taken == 1
    lr = torch.cat(log_ratios)
    assert lr.numel() == 4 * STEPS  # every (sample, step) pair
    worst = float((torch.exp(lr) - 1).abs().max())
    if per_call == 1:
        # Each UNet call has the sampling call's 4 rows (at mixed timesteps): the ratio is exactly 1.
        assert len(log_ratios) == STEPS and worst == 0.0
        assert metrics["approx_kl"] == 0.0
    else:
        # All 3 steps in one 12-row call: float32 rounding only.
        assert len(log_ratios) == 1 and worst < 1e-5
        assert metrics["approx_kl"] < 1e-10
    assert metrics["clipfrac"] == 0.0
    if algo == "grpo":
        assert metrics["kl"] == 0.0  # the first step's policy is the base model


# -- 4. GDPO -----------------------------------------------------------------------------------------------


def test_gdpo_aggregate_matches_hand_computation():
    a1 = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 2.0])
    a2 = torch.tensor([0.2, 0.1, -3.0, 1.0, 0.0, -0.4])
    out = gdpo_aggregate([(1.0, a1), (0.5, a2)])
    total = a1.double().numpy() + 0.5 * a2.double().numpy()
    expected = (total - total.mean()) / (total.std() + 1e-8)  # population std
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-6) and float(out.std(unbiased=False)) == pytest.approx(1.0)
    # Scale-free: doubling every weight changes nothing.
    torch.testing.assert_close(gdpo_aggregate([(2.0, a1), (1.0, a2)]), out)
    with pytest.raises(ValueError):
        gdpo_aggregate([])


@pytest.mark.parametrize("algo", ["ddpo-is", "grpo"])
def test_trainer_gdpo_normalises_each_component_then_the_weighted_sum(algo):
    """Trainer._advantages with advantage.aggregate = 'gdpo' equals gdpo_aggregate over each component's
    own advantages (computed here independently) - not the advantages of the weighted total."""
    from accelerate import Accelerator

    from rlbench.train.trainer import Sampled, Trainer

    values = {"model": {"name": "shapes"}, "algorithm": {"name": algo},
              "reward": {"name": "incompressibility:1+compressibility:0.5"},
              "sample": {"batch_size": 4, "num_batches_per_epoch": 2, "images_per_prompt": 2},
              "train": {"batch_size": 2}, "advantage": {"aggregate": "gdpo", "per_prompt": False}}
    cfg = load_config(values=values)
    algorithm = make_algorithm(cfg)
    c1 = [torch.tensor([1.0, 3.0, 0.0, 2.0]), torch.tensor([5.0, -1.0, 0.5, 0.25])]
    c2 = [torch.tensor([0.0, 1.0, 4.0, 4.5]), torch.tensor([2.0, 2.5, -1.0, 3.0])]
    prompts = [["p", "p", "q", "q"], ["r", "r", "s", "s"]]
    sampled = [Sampled(None, prompts[b], [{}] * 4, scores=c1[b] + 0.5 * c2[b],
                       components={"incompressibility": c1[b], "compressibility": c2[b]}) for b in range(2)]
    fake = SimpleNamespace(cfg=cfg, algorithm=algorithm, accelerator=Accelerator(cpu=True), world=1, rank=0,
                           device=torch.device("cpu"),
                           reward=SimpleNamespace(components=[("incompressibility", 1.0, None),
                                                              ("compressibility", 0.5, None)]))
    rewards, all_rewards, adv = Trainer._advantages(fake, sampled)
    flat = [p for b in prompts for p in b]
    r1, r2 = torch.cat(c1), torch.cat(c2)
    if algo == "grpo":
        parts = [group_normalize(flat, r1)[0], group_normalize(flat, r2)[0]]
    else:  # per_prompt = false: batch z-scores
        parts = [(r - r.mean()) / (r.std(unbiased=False) + 1e-8) for r in (r1.double(), r2.double())]
    total = parts[0].double() + 0.5 * parts[1].double()
    expected = (total - total.mean()) / (total.std(unbiased=False) + 1e-8)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rewards, r1 + 0.5 * r2)
    summed = algorithm.advantages(r1 + 0.5 * r2, flat)
    assert not torch.allclose(adv, summed, atol=1e-3), "gdpo and sum coincide here: the test would be vacuous"


def test_grpo_gdpo_keeps_flat_groups_at_exactly_zero():
    from accelerate import Accelerator

    from rlbench.train.trainer import Sampled, Trainer

    cfg = load_config(values={"model": {"name": "shapes"}, "algorithm": {"name": "grpo"},
                              "reward": {"name": "incompressibility:1+compressibility:0.5"},
                              "sample": {"batch_size": 32, "num_batches_per_epoch": 1, "images_per_prompt": 4},
                              "train": {"batch_size": 4}, "advantage": {"aggregate": "gdpo"}})
    algorithm = make_algorithm(cfg)
    g = torch.Generator().manual_seed(0)
    c1, c2 = torch.rand(32, generator=g), torch.rand(32, generator=g)
    c1[:4], c2[:4] = 0.3, 0.7  # group "a" is flat in both rewards: no signal
    prompts = [p for p in "abcdefgh" for _ in range(4)]
    sampled = [Sampled(None, prompts, [{}] * 32, scores=c1 + 0.5 * c2,
                       components={"incompressibility": c1, "compressibility": c2})]
    fake = SimpleNamespace(cfg=cfg, algorithm=algorithm, accelerator=Accelerator(cpu=True), world=1, rank=0,
                           device=torch.device("cpu"),
                           reward=SimpleNamespace(components=[("incompressibility", 1.0, None),
                                                              ("compressibility", 0.5, None)]))
    _, _, adv = Trainer._advantages(fake, sampled)
    assert algorithm.zero_std_ratio == pytest.approx(1 / 8)
    assert torch.equal(adv[:4], torch.zeros(4))


def test_gdpo_and_group_configuration_errors():
    base = {"model": {"name": "shapes"}, "sample": {"batch_size": 4, "num_batches_per_epoch": 1,
                                                  "images_per_prompt": 2}, "train": {"batch_size": 2}}

    def cfg(algo, reward, **sections):
        values = {**base, "algorithm": {"name": algo}, "reward": {"name": reward}}
        for key, value in sections.items():
            values[key] = {**values.get(key, {}), **value}
        return load_config(values=values)

    gdpo = {"advantage": {"aggregate": "gdpo"}}
    with pytest.raises(ConfigError, match="single reward"):
        cfg("ddpo-is", "shapes-gold", **gdpo)
    with pytest.raises(ConfigError, match="single reward"):
        cfg("grpo", "shapes-aesthetic", **gdpo)
    # A combination is fine for the policy-gradient algorithms...
    assert cfg("grpo", "shapes-gold:1+shapes-aesthetic:0.5", **gdpo).advantage.aggregate == "gdpo"
    assert cfg("ddpo-is", "shapes-gold+shapes-aesthetic", **gdpo).advantage.aggregate == "gdpo"
    # ... and refused by the others.
    for algo in ("rwr", "rwr-sparse"):
        with pytest.raises(ConfigError, match="aggregate"):
            cfg(algo, "shapes-gold:1+shapes-aesthetic:0.5", **gdpo)
    with pytest.raises(ConfigError, match="aggregate"):
        cfg("draft", "shapes-clip:1+shapes-aesthetic:0.5", **gdpo)
    assert cfg("draft", "shapes-clip:1+shapes-aesthetic:0.5").algorithm.name == "draft"
    # GRPO needs groups.
    with pytest.raises(ConfigError, match="images_per_prompt"):
        cfg("grpo", "shapes-gold", sample={"images_per_prompt": 1})
    # draft needs differentiable rewards (every component of a combination).
    with pytest.raises(ConfigError, match="'shapes-gold' is not differentiable"):
        cfg("draft", "shapes-aesthetic:1+shapes-gold:1")
    with pytest.raises(ConfigError, match="algorithm.k"):
        cfg("draft", "shapes-aesthetic", algorithm={"k": 4}, sample={"num_steps": 3})


# -- 5. DRaFT: gradients through the sampler ---------------------------------------------------------------


def _brightness(policy: DiffusionPolicy, x0: torch.Tensor) -> torch.Tensor:
    return policy.decode_differentiable(x0).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("checkpointing", [True, False])
def test_draft_full_backprop_equals_hand_written_sampler(tiny, checkpointing):
    cfg = load_config(values={"model": {"name": str(tiny), "device": "cpu"},
                              "algorithm": {"name": "draft", "k": 2, "gradient_checkpointing": checkpointing},
                              "reward": {"name": "shapes-aesthetic"},
                              "sample": {"num_steps": 2, "eta": 1.0, "guidance_scale": GUIDANCE, "batch_size": 2,
                                         "num_batches_per_epoch": 1},
                              "train": {"batch_size": 2, "gradient_accumulation_steps": 1}})
    draft = make_algorithm(cfg)
    policy = _lora_policy(tiny)
    params = policy.trainable_parameters()
    _perturb(params, scale=0.2)  # lora_B != 0, so every adapter tensor gets a gradient
    neg = policy.encode_prompts([""])
    prompts = ["a cat", "a dog"]

    x0, x0_detached = draft.sample_with_grad(policy, prompts, neg, 2, torch.Generator().manual_seed(11))
    assert not x0_detached.requires_grad and torch.equal(x0_detached, x0.detach())
    got = torch.autograd.grad(-_brightness(policy, x0).mean(), params)

    g = torch.Generator().manual_seed(11)
    shape = (2, *policy.latent_shape)
    sched = policy.scheduler
    sched.set_timesteps(2)
    embeds = policy.encode_prompts(prompts)
    x = torch.randn(shape, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        z = torch.randn(shape, generator=g)
        mean, std = ddim_transition(sched, policy.guided_eps(x, t, embeds, neg, GUIDANCE), t, x, 1.0)
        x = mean + std * z
    assert torch.equal(x.detach(), x0.detach())
    want = torch.autograd.grad(-_brightness(policy, x).mean(), params)
    ref = torch.cat([w.flatten() for w in want]).double()
    got_flat = torch.cat([w.flatten() for w in got]).double()
    assert all(float(w.abs().max()) > 0 for w in want), "some adapter got no gradient: degenerate test"
    assert float((got_flat - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("checkpointing", [True, False])
def test_draft_k1_runs_one_grad_unet_call_and_no_gradient_reaches_earlier_steps(tiny, monkeypatch, checkpointing):
    cfg = load_config(values={"model": {"name": str(tiny), "device": "cpu"},
                              "algorithm": {"name": "draft", "k": 1, "gradient_checkpointing": checkpointing},
                              "reward": {"name": "shapes-aesthetic"},
                              "sample": {"num_steps": 3, "eta": 1.0, "guidance_scale": GUIDANCE, "batch_size": 2,
                                         "num_batches_per_epoch": 1},
                              "train": {"batch_size": 2, "gradient_accumulation_steps": 1}})
    draft = make_algorithm(cfg)
    policy = _lora_policy(tiny)
    params = policy.trainable_parameters()
    _perturb(params, scale=0.2)
    calls: list[bool] = []
    hook = policy.unet.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    leaves: list[torch.Tensor] = []
    original = policy.initial_noise

    def noise(n, generator):  # x_T and every step's z as leaves that require grad
        z = original(n, generator).requires_grad_(True)
        leaves.append(z)
        return z

    original_step = policy.step_noise

    def step_noise(x, generator):  # every step's z, drawn by the trajectory loop
        z = original_step(x, generator).requires_grad_(True)
        leaves.append(z)
        return z

    monkeypatch.setattr(policy, "initial_noise", noise)
    monkeypatch.setattr(policy, "step_noise", step_noise)
    try:
        x0, _ = draft.sample_with_grad(policy, ["a cat", "a dog"], policy.encode_prompts([""]), 1,
                                       torch.Generator().manual_seed(3))
        assert calls == [False, False, True]  # one (guidance-batched) UNet call per step; only the last with grad
        assert len(leaves) == 4  # x_T, z_1, z_2, z_3
        grads = torch.autograd.grad(_brightness(policy, x0).sum(), [*leaves, *params], allow_unused=True)
        backward_calls = calls[3:]
    finally:
        hook.remove()
    assert grads[0] is None and grads[1] is None and grads[2] is None  # x_T and the truncated steps' noise
    assert grads[3] is not None and float(grads[3].abs().max()) > 0  # the last step's z
    assert all(g is not None and float(g.abs().max()) > 0 for g in grads[4:])
    # Checkpointing recomputes the one grad-enabled call in the backward pass; without it nothing reruns.
    assert backward_calls == ([True] if checkpointing else [])
    # The graph of x0 w.r.t. its last step's noise is d x0 / d z = sigma_last.
    x0_again, _ = draft.sample_with_grad(policy, ["a cat"], policy.encode_prompts([""]), 1,
                                         torch.Generator().manual_seed(3))
    (dz,) = torch.autograd.grad(x0_again.sum(), [leaves[-1]])
    t_last = policy.scheduler.timesteps[-1]
    _, sigma = ddim_transition(policy.scheduler, torch.zeros_like(x0_again), t_last, x0_again.detach(), 1.0)
    torch.testing.assert_close(dz, torch.full_like(dz, float(sigma)))


# -- 6. init_same_noise ------------------------------------------------------------------------------------


@pytest.mark.parametrize("same", [True, False])
def test_init_same_noise_shares_x_T_within_groups_only(tiny, tmp_path, same):
    from rlbench.train.trainer import prepare

    trainer = prepare(values={
        "run": {"out": str(tmp_path / "run"), "seed": 1},
        "model": {"name": str(tiny), "device": "cpu"},
        "algorithm": {"name": "grpo", "init_same_noise": same, "beta": 0.0},
        "reward": {"name": "incompressibility"},
        # 6 samples in 2 batches of 3, groups of 2: the middle group straddles the two batches.
        "sample": {"batch_size": 3, "num_batches_per_epoch": 2, "images_per_prompt": 2, "num_steps": 2,
                   "async_reward": False},
        "train": {"batch_size": 3, "gradient_accumulation_steps": 1},
    }, log=None)
    assert trainer.algorithm.shares_initial_noise() is same
    sampled = trainer._sample()
    x_T = torch.cat([s.rollout.latents[:, 0] for s in sampled])
    x_0 = torch.cat([s.rollout.latents[:, -1] for s in sampled])
    prompts = [p for s in sampled for p in s.prompts]
    assert x_T.shape[0] == 6 and len(set(prompts)) == 3
    for g in range(3):
        a, b = 2 * g, 2 * g + 1
        assert prompts[a] == prompts[b]
        assert torch.equal(x_T[a], x_T[b]) is same
        assert not torch.equal(x_0[a], x_0[b])  # the steps' noise still differs within a group
        for other in range(6):
            if other // 2 != g:
                assert not torch.equal(x_T[a], x_T[other])


# -- 7. the CLI end to end ---------------------------------------------------------------------------------

RLBENCH = str(Path(sys.executable).parent / "rlbench")
SMALL = [
    "--set", "sample.num_steps=3", "--set", "sample.batch_size=4", "--set", "sample.num_batches_per_epoch=1",
    "--set", "sample.images_per_prompt=2", "--set", "train.batch_size=2", "--set",
    "train.gradient_accumulation_steps=1", "--set", "logging.tensorboard=false", "--set", "logging.num_samples=4",
    "--set", "model.device=cpu", "--set", "eval.every=0",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLBENCH, "train", *args], env=_env(), capture_output=True, text=True, timeout=300)


def _metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_grpo_logs_kl_and_group_metrics(tiny, tmp_path):
    out = tmp_path / "grpo"
    proc = _train("--algo", "grpo", "--reward", "incompressibility", "--model", str(tiny), "--epochs", "2",
                  "--out", str(out), "--set", "algorithm.beta=0.04", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = _metric_rows(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert {"kl", "zero_std_ratio", "trained_fraction", "policy_loss", "loss", "clipfrac"} <= set(r)
        assert math.isfinite(r["kl"]) and r["kl"] >= 0
        assert r["zero_std_ratio"] in (0.0, 0.5, 1.0)  # 2 groups of 2
        assert 0 < r["trained_fraction"] <= 1
        assert r["optimizer_steps"] == round(2 * r["trained_fraction"])
    assert rows[1]["kl"] > 0  # after the first epoch's updates the policy has left the base model
    from rlbench.config import load_config as load

    assert load(out / "config.toml").algorithm.options["beta"] == 0.04


@pytest.mark.parametrize("model", ["shapes", "tiny-sd"])
def test_cli_draft_trains_one_epoch(tiny, tmp_path, model):
    from safetensors.torch import load_file

    out = tmp_path / "draft"
    proc = _train("--algo", "draft", "--reward", "shapes-aesthetic", "--model",
                  "shapes" if model == "shapes" else str(tiny), "--epochs", "1", "--out", str(out),
                  "--set", "algorithm.k=2", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (row,) = _metric_rows(out)
    assert row["optimizer_steps"] == 2 and row["k_mean"] == 2.0
    assert math.isfinite(row["loss"]) and math.isfinite(row["reward_mean"])
    assert row["approx_kl"] is None and row["clipfrac"] is None
    state = load_file(str(out / "checkpoints" / "0001" / "trainable.safetensors"))
    if model == "shapes":  # full fine-tuning (the shapes model's default): the UNet moved off its weights
        assert all(".lora_" not in k for k in state)
        base = load_policy("shapes").unet.state_dict()
        assert any(not torch.equal(v, base[k]) for k, v in state.items()), "the reward trained nothing"
    else:  # LoRA: the adapters' B matrices start at 0
        assert any(".lora_B." in k and bool((v != 0).any()) for k, v in state.items()), "the reward trained nothing"
    records = (out / "samples" / "0000" / "records.jsonl").read_text().splitlines()
    assert len(records) == 4


def test_cli_draft_rejects_a_non_differentiable_reward_before_loading(tmp_path, monkeypatch):
    out = tmp_path / "run"
    proc = _train("--algo", "draft", "--reward", "shapes-gold", "--model", "shapes", "--out", str(out), *SMALL)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not differentiable" in errors[0] and "shapes-gold" in errors[0]
    assert not out.exists()
    # In-process: the error comes before any model loads.
    import rlbench.diffusion.policy
    from rlbench.train.trainer import train

    monkeypatch.setattr(rlbench.diffusion.policy, "load_policy",
                        lambda *a, **k: pytest.fail("a model was loaded for an invalid config"))
    with pytest.raises(ConfigError, match="not differentiable"):
        train(values={"algorithm": {"name": "draft"}, "reward": {"name": "shapes-gold"}, "model": {"name": "shapes"},
                      "run": {"out": str(out)}}, log=None)


def test_draft_lv_redoes_the_last_step_once_per_copy_with_gradients(tiny):
    cfg = load_config(values={"model": {"name": str(tiny), "device": "cpu"},
                              "algorithm": {"name": "draft", "k": 1, "lv_copies": 2},
                              "reward": {"name": "shapes-aesthetic"},
                              "sample": {"num_steps": 3, "eta": 1.0, "guidance_scale": GUIDANCE, "batch_size": 2,
                                         "num_batches_per_epoch": 1},
                              "train": {"batch_size": 2, "gradient_accumulation_steps": 1}})
    draft = make_algorithm(cfg)
    policy = _lora_policy(tiny)
    params = policy.trainable_parameters()
    _perturb(params, scale=0.2)
    neg, embeds = policy.encode_prompts([""]), policy.encode_prompts(["a cat", "a dog"])
    _, x0 = draft.sample_with_grad(policy, ["a cat", "a dog"], neg, 0, torch.Generator().manual_seed(3), embeds)
    calls: list[bool] = []
    hook = policy.unet.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    try:
        copies = draft._lv_latents(policy, x0, embeds, neg, torch.Generator().manual_seed(4))
    finally:
        hook.remove()
    assert len(copies) == 2 and all(c.requires_grad for c in copies) and calls == [True, True]
    assert not torch.equal(copies[0], copies[1])  # independent re-noisings
    grads = torch.autograd.grad(-sum(_brightness(policy, c).mean() for c in copies), params)
    assert any(float(g.abs().max()) > 0 for g in grads)
