"""``nft`` (DiffusionNFT): the loss against a hand computation, the implicit policies and the old-policy swap on
real tiny models of both families, the gradient's direction, the old policy's decay and its save/load, the
configuration rules and the CLI end to end (CPU, offline)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rlbench.algorithm import TrainBatch, UpdateContext, make_algorithm
from rlbench.algorithms.nft import (
    OLD_WEIGHTS_FILE,
    WEIGHT_MIN,
    implicit_policies,
    nft_loss,
    old_decay,
)
from rlbench.config import TrainConfig, load_config
from rlbench.diffusion.policy import BaseWeights, load_policy
from rlbench.errors import ConfigError, RunDirError
from rlbench.testing import save_tiny_sd3_pipeline, save_tiny_sd_pipeline

STEPS = 3
PROMPTS = ["a cat", "a cat", "a dog", "a dog"]  # two groups of k = 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nft-models")
    return {"ddim": save_tiny_sd_pipeline(root / "tiny-sd", sample_size=16),
            "flow": save_tiny_sd3_pipeline(root / "tiny-sd3")}


def _sample_values(family: str, guidance: float) -> dict:
    sample = {"batch_size": 4, "num_batches_per_epoch": 1, "num_steps": STEPS, "guidance_scale": guidance,
              "images_per_prompt": 2}
    # DiffusionNFT's deterministic sampling: DDIM eta = 0, the flow ODE.
    sample.update({"eta": 0.0} if family == "ddim" else {"sampler": "ode", "noise_level": 0.0})
    return sample


def _config(model: Path, family: str, *, guidance: float = 1.0, acc: int = 1, train: dict | None = None,
            **options) -> TrainConfig:
    return load_config(values={
        "model": {"name": str(model), "device": "cpu"},
        "algorithm": {"name": "nft", **options},
        "reward": {"name": "incompressibility"},
        "sample": _sample_values(family, guidance),
        "train": {"batch_size": 2, "gradient_accumulation_steps": acc, "num_inner_epochs": 1, "learning_rate": 1e-2,
                  "timestep_window": 1.0, **(train or {})},
    })


def _policy(model: Path, cfg: TrainConfig, seed: int = 0):
    from accelerate import Accelerator

    policy = load_policy(str(model))
    policy.check_config(cfg)
    torch.manual_seed(seed)
    policy.setup_training("lora", cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
    policy.prepare(Accelerator(cpu=True))
    return policy


def _perturb(params, scale: float = 0.3, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


class Setup:
    """A tiny LoRA policy, one deterministic rollout of PROMPTS as a TrainBatch (final latents only), and an
    UpdateContext with the base model as reference (taken before any change, as the trainer does)."""

    def __init__(self, model: Path, family: str, cfg: TrainConfig) -> None:
        from accelerate import Accelerator

        self.cfg, self.algo = cfg, make_algorithm(cfg)
        self.policy = policy = _policy(model, cfg)
        self.base = BaseWeights(policy)
        self.params = policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.learning_rate)
        self.neg = policy.encode_prompts([""])
        ro = policy.sample(PROMPTS, num_steps=STEPS, sampler=policy.as_sampler(cfg.sampler()),
                           guidance_scale=cfg.sample.guidance_scale, generator=torch.Generator().manual_seed(0),
                           neg_embeds=self.neg)
        assert ro.latents is None  # a deterministic sampler stores no transitions
        rewards = torch.tensor([0.5, -1.0, 2.0, 0.25])
        self.batch = TrainBatch(latents=None, log_probs=None, timesteps=None, prompt_embeds=ro.prompt_embeds,
                                neg_embeds=self.neg, rewards=rewards, advantages=self.algo.advantages(rewards, PROMPTS),
                                prompts=list(PROMPTS), final=ro.final)
        self.ctx = UpdateContext(cfg, self.optimizer, Accelerator(cpu=True), torch.Generator().manual_seed(7),
                                 self.params, policy, reference=self.base if self.algo.uses_reference() else None)

    def update(self, epoch: int = 0) -> dict:
        self.ctx.epoch, self.ctx.steps = epoch, 0
        return self.algo.update(self.policy, self.batch, self.ctx)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.policy.denoiser.named_parameters() if p.requires_grad}


# -- 1. the loss on hand-made tensors ---------------------------------------------------------------------


def _hand_loss(x0, x_t, sigma, out, old, ref, adv, beta, a_max, kl_beta):
    """DiffusionNFT train_nft_sd3.py L910-970 in numpy float64, for the flow family (x0_hat = x_t - sigma v)."""
    s = sigma.reshape(-1, 1, 1, 1)
    r = np.clip(np.clip(adv, -a_max, a_max) / a_max / 2 + 0.5, 0, 1)
    x0p = x_t - s * (beta * out + (1 - beta) * old)
    x0n = x_t - s * ((1 + beta) * old - beta * out)
    wp = np.maximum(np.abs(x0p - x0).mean(axis=(1, 2, 3)), WEIGHT_MIN)
    wn = np.maximum(np.abs(x0n - x0).mean(axis=(1, 2, 3)), WEIGHT_MIN)
    lp = ((x0p - x0) ** 2).mean(axis=(1, 2, 3)) / wp
    ln = ((x0n - x0) ** 2).mean(axis=(1, 2, 3)) / wn
    policy = (a_max * (r * lp / beta + (1 - r) * ln / beta)).mean()
    kl = ((out - ref) ** 2).mean(axis=(1, 2, 3)).mean()
    return policy + kl_beta * kl, policy, kl


def _tensors(seed: int = 0, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 2, 3, 3)
    x0, eps, out, old, ref = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(5))
    sigma = torch.tensor([0.2, 0.5, 0.9, 1.0], dtype=torch.float64)[:b]
    x_t = (1 - sigma.reshape(-1, 1, 1, 1)) * x0 + sigma.reshape(-1, 1, 1, 1) * eps
    return x0, x_t, sigma, out, old, ref


@pytest.mark.parametrize("beta", [1.0, 0.1, 0.7])
def test_nft_loss_matches_a_hand_computation_in_float64(beta):
    x0, x_t, sigma, out, old, ref = _tensors()
    adv = torch.tensor([-7.0, -0.4, 1.3, 9.0], dtype=torch.float64)  # the outer two are clipped to +-5
    loss, info = nft_loss(x0, out, old, adv, lambda o: x_t - sigma.reshape(-1, 1, 1, 1) * o, beta=beta,
                          adv_clip_max=5.0, out_ref=ref, kl_beta=0.01)
    want, policy, kl = _hand_loss(*(t.numpy() for t in (x0, x_t, sigma, out, old, ref)), adv.numpy(), beta, 5.0, 0.01)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(info["policy_loss"]) == pytest.approx(policy, rel=1e-12)
    assert float(info["kl"]) == pytest.approx(kl, rel=1e-12)
    assert float(info["old_deviate"]) == pytest.approx(float(((out - old) ** 2).mean()), rel=1e-12)


def test_nft_loss_gradient_stops_at_the_weights_and_the_old_output():
    x0, x_t, sigma, out, old, ref = _tensors(1)
    out = out.clone().requires_grad_(True)
    old = old.clone().requires_grad_(True)
    adv = torch.tensor([-2.0, 0.0, 1.0, 4.0], dtype=torch.float64)
    beta, a_max, kl_beta = 0.5, 5.0, 0.1
    s = sigma.reshape(-1, 1, 1, 1)
    loss, _ = nft_loss(x0, out, old, adv, lambda o: x_t - s * o, beta=beta, adv_clip_max=a_max, out_ref=ref,
                       kl_beta=kl_beta)
    loss.backward()
    assert old.grad is None  # the old policy is a constant (sg)
    # d/d out with the weights w+- held fixed (sg): x0+ = x_t - s(beta o + ...), x0- = x_t - s(... - beta o).
    with torch.no_grad():
        b, d = out.shape[0], out[0].numel()
        r = (adv.clamp(-a_max, a_max) / a_max / 2 + 0.5).reshape(-1, 1, 1, 1)
        ep = x_t - s * (beta * out + (1 - beta) * old) - x0
        en = x_t - s * ((1 + beta) * old - beta * out) - x0
        wp = ep.abs().mean(dim=(1, 2, 3), keepdim=True)
        wn = en.abs().mean(dim=(1, 2, 3), keepdim=True)
        grad = a_max / b * (r / beta * 2 * ep * (-s * beta) / (wp * d)
                            + (1 - r) / beta * 2 * en * (s * beta) / (wn * d))
        grad += kl_beta / b * 2 * (out - ref) / d
    torch.testing.assert_close(out.grad, grad, rtol=1e-12, atol=1e-14)


def test_nft_loss_weights_are_clipped_below_and_shapes_checked():
    x0 = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    out = torch.zeros_like(x0)
    # A perfect prediction: the error is 0, the weight 1e-5, the loss exactly 0 (no 0/0).
    loss, _ = nft_loss(x0, out, out, torch.tensor([1.0, -1.0], dtype=torch.float64), lambda o: x0 + o)
    assert float(loss) == 0.0
    with pytest.raises(ValueError):
        nft_loss(x0, out, out, torch.zeros(3), lambda o: o)
    with pytest.raises(ValueError):
        nft_loss(x0, out[:, :, :1], out, torch.zeros(2), lambda o: o)


def test_implicit_policies_are_the_reference_combinations():
    out, old = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    pos, neg = implicit_policies(out, old, 0.25)
    torch.testing.assert_close(pos, 0.25 * out + 0.75 * old)
    torch.testing.assert_close(neg, 1.25 * old - 0.25 * out)
    pos, neg = implicit_policies(out, old, 1.0)
    assert torch.equal(pos, out) and torch.equal(neg, 2 * old - out)


def test_old_decay_schedules():
    assert [old_decay(s, 0) for s in (0, 10, 10_000)] == [0.0, 0.0, 0.0]
    assert [old_decay(s, 1) for s in (0, 1, 2, 250)] == [0.0, 0.001, 0.002, 0.25]
    assert old_decay(500, 1) == 0.5 and old_decay(5000, 1) == 0.5  # capped at 0.5
    assert [old_decay(s, 2) for s in (0, 74, 75)] == [0.0, 0.0, 0.0]
    assert old_decay(76, 2) == pytest.approx(0.0075) and old_decay(175, 2) == pytest.approx(0.75)
    assert old_decay(10_000, 2) == 0.999


# -- 2. the families' x_0 predictions and the old policy on real tiny models -----------------------------


@pytest.mark.parametrize("family", ["ddim", "flow"])
def test_predict_x0_recovers_x0_from_the_true_target(models, family):
    cfg = _config(models[family], family)
    policy = _policy(models[family], cfg)
    g = torch.Generator().manual_seed(3)
    keys = policy.schedule(STEPS)
    x0 = torch.randn((len(keys), *policy.latent_shape), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = policy.noised(x0, eps, keys)
    target = eps if family == "ddim" else eps - x0  # epsilon; the flow velocity
    torch.testing.assert_close(policy.predict_x0(target, keys, x_t), x0, rtol=0, atol=1e-4)
    if family == "ddim":  # a v-prediction scheduler: x0 = sqrt(a) x_t - sqrt(1 - a) v
        from diffusers import DDIMScheduler

        policy.scheduler = DDIMScheduler.from_config(policy.scheduler.config, prediction_type="v_prediction")
        v = policy.scheduler.get_velocity(x0, eps, keys)
        torch.testing.assert_close(policy.predict_x0(v, keys, x_t), x0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["ddim", "flow"])
def test_at_beta_one_and_theta_old_the_implicit_policies_are_current_and_old(models, family):
    s = Setup(models[family], family, _config(models[family], family, beta=1.0))
    _perturb(s.params)  # LoRA B != 0, so the adapters matter
    policy, algo = s.policy, s.algo
    x0 = s.batch.final[:2]
    keys = policy.schedule(STEPS)[torch.tensor([0, 1])]
    x_t = policy.noised(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), keys)
    cond = s.batch.prompt_embeds[torch.tensor([0, 2])]
    with torch.no_grad():
        algo._old_for(policy)  # the old policy starts as the current weights
        with algo._old_active(policy):
            v_old = policy.model_output(x_t, keys, cond, s.neg, 1.0)
        v = policy.model_output(x_t, keys, cond, s.neg, 1.0)
    assert torch.equal(v_old, v)
    pos, neg = implicit_policies(v, v_old, 1.0)
    assert torch.equal(pos, v) and torch.equal(neg, v_old)

    # The current weights move; the old policy keeps the weights it copied, and the swap is undone.
    _perturb(s.params, seed=9)
    moved = s.trainable()
    with torch.no_grad():
        with algo._old_active(policy):
            assert torch.equal(policy.model_output(x_t, keys, cond, s.neg, 1.0), v_old)
        with algo.sampling_weights(policy):  # what the trainer will sample with (DiffusionNFT samples with old)
            assert torch.equal(policy.model_output(x_t, keys, cond, s.neg, 1.0), v_old)
        v_new = policy.model_output(x_t, keys, cond, s.neg, 1.0)
    assert all(torch.equal(t, moved[n]) for n, t in s.trainable().items())
    assert float((v_new - v_old).abs().max()) > 1e-4


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_direction_positive_advantage_lowers_the_positive_loss(models, sign):
    """At theta = theta_old (beta 1): r = 1 descends L+ (the sample's x_0 regression); r = 0 descends L-, whose
    gradient there is minus L+'s, so L+ rises."""
    s = Setup(models["ddim"], "ddim", _config(models["ddim"], "ddim"))
    policy, algo = s.policy, s.algo
    x0 = s.batch.final[:1]
    key = policy.schedule(STEPS)[1:2]
    x_t = policy.noised(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)), key)
    cond = s.batch.prompt_embeds[torch.tensor([0])]
    algo._old_for(policy)
    with torch.no_grad(), algo._old_active(policy):
        v_old = policy.model_output(x_t, key, cond, s.neg, 1.0)

    def losses():
        out = policy.model_output(x_t, key, cond, s.neg, 1.0)
        to_x0 = lambda o: policy.predict_x0(o, key, x_t)  # noqa: E731
        plus, _ = nft_loss(x0, out, v_old, torch.tensor([5.0]), to_x0)  # r = 1: A_max L+ / beta
        minus, _ = nft_loss(x0, out, v_old, torch.tensor([-5.0]), to_x0)  # r = 0: A_max L- / beta
        return plus, minus

    plus0, minus0 = losses()
    before = float(plus0.detach()), float(minus0.detach())
    assert before[0] == pytest.approx(before[1], rel=1e-9)  # theta = theta_old: o+ = o- = o
    loss = plus0 if sign > 0 else minus0
    opt = torch.optim.SGD(s.params, lr=1e-3)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        plus1, minus1 = losses()
    if sign > 0:
        assert float(plus1) < before[0]
    else:
        assert float(minus1) < before[1] and float(plus1) > before[0]


# -- 3. the update, the old policy's decay, save/load ------------------------------------------------------


@pytest.mark.parametrize("family,options", [
    ("ddim", {}), ("ddim", {"kl_beta": 0.0, "decay_type": 0}), ("flow", {}),
])
def test_update_trains_and_blends_the_old_policy(models, family, options):
    s = Setup(models[family], family, _config(models[family], family, **options))
    theta0 = s.trainable()
    m = s.update(0)
    assert s.ctx.steps == 2 and s.algo.global_step == 2  # 4 samples / micro-batch 2 / accumulation 1
    for key in ("loss", "policy_loss", "unweighted_policy_loss", "old_deviate"):
        assert math.isfinite(m[key]), key
    assert ("kl" in m) == (s.algo.options.kl_beta > 0)
    assert m["approx_kl"] is None and m["clipfrac"] is None
    theta1 = s.trainable()
    assert any(not torch.equal(theta0[n], theta1[n]) for n in theta0), "the update trained nothing"
    d = old_decay(2, s.algo.options.decay_type)
    assert m["old_decay"] == d
    for n, t in s.algo.old.items():  # old <- d old + (1 - d) theta, old = theta0 during epoch 0
        assert torch.equal(t, theta0[n] * d + theta1[n] * (1.0 - d)), n
    old1 = {n: t.clone() for n, t in s.algo.old.items()}
    s.update(1)
    assert s.algo.global_step == 4
    d2 = old_decay(4, s.algo.options.decay_type)
    theta2 = s.trainable()
    for n, t in s.algo.old.items():
        assert torch.equal(t, old1[n] * d2 + theta2[n] * (1.0 - d2)), n


def test_guided_nft_trains_the_guided_output(models):
    s = Setup(models["ddim"], "ddim", _config(models["ddim"], "ddim", guidance=3.0, guided=True))
    seen = []
    inner = s.policy.model_output

    def spy(x, t, cond, neg, guidance_scale):
        seen.append(guidance_scale)
        return inner(x, t, cond, neg, guidance_scale)

    s.policy.model_output = spy
    m = s.update(0)
    assert math.isfinite(m["loss"]) and set(seen) == {3.0}
    assert len(seen) == 3 * 2  # old, reference, current per chunk; 2 micro-batches of one chunk (CPU: 3 steps/call)


def test_old_weights_save_and_load_round_trip(models, tmp_path):
    cfg = _config(models["ddim"], "ddim")
    s = Setup(models["ddim"], "ddim", cfg)
    fresh = make_algorithm(cfg)
    fresh.save_tensors(tmp_path)  # nothing before the first update
    assert not (tmp_path / OLD_WEIGHTS_FILE).exists()
    s.update(0)
    _perturb(s.params, seed=11)  # the current weights differ from the old ones
    s.algo.save_tensors(tmp_path)
    state = json.loads(json.dumps(s.algo.state_dict()))  # trainer_state.json: JSON only
    assert state == {"global_step": 2, "old_weights": True}

    back = make_algorithm(cfg)
    back.load_state_dict(state)
    back.load_tensors(tmp_path)
    assert back.global_step == 2 and set(back.old) == set(s.algo.old)
    assert all(torch.equal(back.old[n].to(t.device), t) for n, t in s.algo.old.items())
    policy, x0 = s.policy, s.batch.final[:2]
    keys = policy.schedule(STEPS)[:2]
    x_t = policy.noised(x0, torch.zeros_like(x0), keys)
    cond = s.batch.prompt_embeds[torch.tensor([0, 1])]
    with torch.no_grad():
        with s.algo._old_active(policy):
            want = policy.model_output(x_t, keys, cond, s.neg, 1.0)
        with back._old_active(policy):
            got = policy.model_output(x_t, keys, cond, s.neg, 1.0)
    assert torch.equal(got, want)

    # A checkpoint that says it holds old weights but lost the file, or was never given them, is an error.
    empty = tmp_path / "empty"
    empty.mkdir()
    lost = make_algorithm(cfg)
    lost.load_state_dict(state)
    with pytest.raises(RunDirError, match=OLD_WEIGHTS_FILE):
        lost.load_tensors(empty)
    unloaded = make_algorithm(cfg)
    unloaded.load_state_dict(state)
    with pytest.raises(RunDirError, match="load_tensors"):
        unloaded.update(policy, s.batch, s.ctx)


# -- 4. configuration --------------------------------------------------------------------------------


def test_configuration_rules(models, tmp_path):
    tiny = models["ddim"]
    cfg = _config(tiny, "ddim")  # a deterministic sampler is fine
    assert cfg.sampler().stochastic is False
    o = cfg.algorithm.options
    assert (o["beta"], o["kl_beta"], o["adv_clip_max"], o["decay_type"], o["global_std"], o["guided"]) == \
        (1.0, 1e-4, 5.0, 1, True, False)
    with pytest.raises(ConfigError, match="sample.guidance_scale = 1"):
        _config(tiny, "ddim", guidance=5.0)
    with pytest.raises(ConfigError, match="sample.guidance_scale = 1"):
        _config(models["flow"], "flow", guidance=4.5)  # SD3's guidance is CFG too
    _config(tiny, "ddim", guidance=5.0, guided=True)
    with pytest.raises(ConfigError, match="train.cfg = true"):
        _config(tiny, "ddim", guidance=5.0, guided=True, train={"cfg": False})
    with pytest.raises(ConfigError, match="images_per_prompt >= 2"):
        load_config(values={"model": {"name": str(tiny)}, "algorithm": {"name": "nft"},
                            "sample": {"guidance_scale": 1.0, "images_per_prompt": 1}})
    # FLUX's sample.guidance_scale is its guidance embedding, not CFG; its true CFG is refused.
    from rlbench.testing import save_tiny_flux_pipeline

    flux = save_tiny_flux_pipeline(tmp_path / "tiny-flux")
    _config(flux, "flow", guidance=3.5)
    with pytest.raises(ConfigError, match="true_cfg_scale = 1"):
        load_config(values={"model": {"name": str(flux)}, "algorithm": {"name": "nft"},
                            "sample": {**_sample_values("flow", 3.5), "true_cfg_scale": 2.0,
                                       "negative_prompt": "blurry"},
                            "train": {"batch_size": 2, "gradient_accumulation_steps": 1}})
    for bad in ({"beta": 0.0}, {"kl_beta": -1.0}, {"adv_clip_max": 0.0}, {"decay_type": 3}):
        with pytest.raises(ConfigError, match="algorithm 'nft'"):
            _config(tiny, "ddim", **bad)


# -- 5. the CLI end to end -----------------------------------------------------------------------------

RLBENCH = str(Path(sys.executable).parent / "rlbench")
SMALL = [
    "--set", "sample.num_steps=3", "--set", "sample.batch_size=4", "--set", "sample.num_batches_per_epoch=1",
    "--set", "sample.images_per_prompt=2", "--set", "train.batch_size=2", "--set",
    "train.gradient_accumulation_steps=1", "--set", "logging.tensorboard=false", "--set", "model.device=cpu",
    "--set", "eval.every=0", "--set", "sample.guidance_scale=1",
]


def _train(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([RLBENCH, "train", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family", ["ddim", "flow"])
def test_cli_nft_trains_two_epochs(models, tmp_path, family):
    from safetensors.torch import load_file

    out = tmp_path / "nft"
    sampler = ["--set", "sample.eta=0"] if family == "ddim" else \
        ["--set", "sample.sampler=ode", "--set", "sample.noise_level=0"]
    proc = _train("--model", str(models[family]), "--algo", "nft", "--reward", "incompressibility", "--epochs", "2",
                  "--out", str(out), *SMALL, *sampler)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for r, decay in zip(rows, (0.002, 0.004)):
        assert r["optimizer_steps"] == 2 and r["old_decay"] == pytest.approx(decay)
        assert math.isfinite(r["loss"]) and math.isfinite(r["kl"]) and r["kl"] >= 0
        assert r["approx_kl"] is None and r["clipfrac"] is None
    ckpt = out / "checkpoints" / "0002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["algorithm"] == {"global_step": 4, "old_weights": True}
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert any(".lora_B." in k and bool((v != 0).any()) for k, v in weights.items()), "the run trained nothing"
