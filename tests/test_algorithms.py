"""The algorithm plugins (ddpo-is, ddpo-sf, rwr, rwr-sparse) on real rollouts of a tiny LoRA policy,
and ``rlbench.train.trainer.train`` end to end in-process (CPU, offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlbench.algorithm import TrainBatch, UpdateContext, make_algorithm
from rlbench.config import TrainConfig, build_options, load_config
from rlbench.errors import ConfigError, RunDirError
from rlbench.diffusion.policy import DiffusionPolicy, load_policy
from rlbench.testing import save_tiny_sd_pipeline

ALGOS = ("ddpo-is", "ddpo-sf", "rwr", "rwr-sparse")
STEPS = 3
GUIDANCE = 5.0
PROMPTS = ["a cat", "a dog", "a cat", "a dog"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("algo-models") / "tiny-sd", sample_size=16)


def _config(tiny: Path, algo: str, *, acc: int = 1, inner: int = 1, lr: float = 1e-2, weight_decay: float = 1e-4,
            **options) -> TrainConfig:
    return load_config(values={
        "model": {"name": str(tiny), "device": "cpu"},
        "algorithm": {"name": algo, **options},
        "sample": {"batch_size": 4, "num_batches_per_epoch": 1, "num_steps": STEPS, "eta": 1.0,
                   "guidance_scale": GUIDANCE},
        "train": {"batch_size": 2, "gradient_accumulation_steps": acc, "num_inner_epochs": inner,
                  "learning_rate": lr, "weight_decay": weight_decay},
    })


class Setup:
    """A LoRA policy prepared by accelerate, its optimizer, and one epoch's real rollout as a TrainBatch."""

    def __init__(self, tiny: Path, cfg: TrainConfig, advantages: torch.Tensor | None = None, seed: int = 0) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.algo, self.notices = make_algorithm(cfg), cfg.notices
        policy = load_policy(str(tiny))
        torch.manual_seed(seed)
        policy.setup_training("lora")
        self.accelerator = Accelerator(cpu=True)
        policy.prepare(self.accelerator)
        self.policy = policy
        self.params = policy.trainable_parameters()
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.steps_taken = 0
        step = self.optimizer.step

        def counting_step(*args, **kwargs):
            self.steps_taken += 1
            return step(*args, **kwargs)

        self.optimizer.step = counting_step
        ro = policy.sample(PROMPTS, num_steps=cfg.sample.num_steps, eta=cfg.sample.eta,
                           guidance_scale=cfg.sample.guidance_scale, generator=torch.Generator().manual_seed(seed))
        rewards = torch.tensor([0.5, -1.0, 2.0, 0.25])
        if advantages is None:
            advantages = self.algo.advantages(rewards, PROMPTS) if cfg.algorithm.name.startswith("rwr") \
                else torch.tensor([1.0, -0.5, 2.0, -1.5])
        self.batch = TrainBatch(
            latents=ro.latents, log_probs=ro.log_probs, timesteps=ro.timesteps, prompt_embeds=ro.prompt_embeds,
            neg_embeds=policy.encode_prompts([""]), rewards=rewards, advantages=advantages, prompts=list(PROMPTS),
        )
        self.ctx = UpdateContext(cfg, self.optimizer, self.accelerator, torch.Generator().manual_seed(7),
                                 self.params, policy)

    def update(self) -> dict:
        return self.algo.update(self.policy, self.batch, self.ctx)


def _snapshot(policy: DiffusionPolicy) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    trainable, frozen = {}, {}
    for n, p in policy.unet.named_parameters():
        (trainable if p.requires_grad else frozen)[f"unet.{n}"] = p.detach().clone()
    for n, b in policy.unet.named_buffers():
        frozen[f"unet.buffer.{n}"] = b.clone()
    for prefix, module in (("text_encoder", policy.text_encoder), ("vae", policy.vae)):
        for n, t in module.state_dict().items():
            frozen[f"{prefix}.{n}"] = t.clone()
    return trainable, frozen


# -- one update per algorithm ------------------------------------------------------------------------


@pytest.mark.parametrize("algo,acc,inner", [
    ("ddpo-is", 1, 1), ("ddpo-is", 2, 2), ("ddpo-sf", 1, 1), ("rwr", 2, 1), ("rwr-sparse", 1, 2),
])
def test_update_trains_only_lora_and_takes_the_expected_steps(tiny, algo, acc, inner):
    s = Setup(tiny, _config(tiny, algo, acc=acc, inner=inner))
    cfg = s.cfg
    trainable_before, frozen_before = _snapshot(s.policy)
    metrics = s.update()
    trainable_after, frozen_after = _snapshot(s.policy)

    # Only the LoRA adapters moved; base UNet, text encoder and VAE are bit-identical.
    assert all(".lora_" in n for n in trainable_before)
    assert frozen_after.keys() == frozen_before.keys()
    for n, t in frozen_before.items():
        assert torch.equal(frozen_after[n], t), n
    changed = [n for n, t in trainable_before.items() if not torch.equal(trainable_after[n], t)]
    lora_b = [n for n in trainable_before if ".lora_B." in n]
    assert set(lora_b) <= set(changed)
    assert all(p.dtype == torch.float32 for p in s.params)

    assert {"loss", "approx_kl", "clipfrac"} <= set(metrics)
    for key in ("loss", "approx_kl", "clipfrac"):
        value = metrics[key]
        if value is None:
            assert algo.startswith("rwr") and key != "loss"
        else:
            assert isinstance(value, float) and math.isfinite(value), (key, value)
    if algo.startswith("ddpo"):
        assert metrics["approx_kl"] >= 0 and 0 <= metrics["clipfrac"] <= 1

    samples_per_epoch = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
    expected = samples_per_epoch // (cfg.train.batch_size * cfg.train.gradient_accumulation_steps) \
        * cfg.train.num_inner_epochs
    assert s.steps_taken == s.ctx.steps == expected == cfg.updates_per_epoch


def test_ddpo_sf_takes_one_step_per_epoch(tiny):
    cfg = _config(tiny, "ddpo-sf", acc=1)  # resolution adjusts the accumulation and says so
    assert cfg.train.gradient_accumulation_steps == 2  # 4 samples / micro-batch 2
    assert len(cfg.notices) == 1 and "gradient_accumulation_steps" in cfg.notices[0]
    cfg8 = load_config(values={"algorithm": {"name": "ddpo-sf"}, "sample": {"batch_size": 4, "num_batches_per_epoch": 2},
                               "train": {"batch_size": 2, "gradient_accumulation_steps": 1}})
    assert cfg8.train.gradient_accumulation_steps == 4 and cfg8.updates_per_epoch == 1
    # Already right: no notice.
    assert _config(tiny, "ddpo-sf", acc=2).notices == ()

    s = Setup(tiny, _config(tiny, "ddpo-sf", acc=1))
    s.update()
    assert s.steps_taken == 1 == s.ctx.steps


def test_ddpo_sf_rejects_several_inner_epochs(tiny):
    with pytest.raises(ConfigError, match="num_inner_epochs"):
        _config(tiny, "ddpo-sf", inner=2)


@pytest.mark.parametrize("algo", ["ddpo-is", "ddpo-sf"])
def test_ddpo_rejects_deterministic_sampling(tiny, algo):
    with pytest.raises(ConfigError, match="sample.eta"):
        _config(tiny, algo).with_changes({"sample.eta": 0.0})


def test_zero_advantages_leave_lora_unchanged(tiny):
    s = Setup(tiny, _config(tiny, "ddpo-is", acc=1, weight_decay=0.0), advantages=torch.zeros(4))
    before, _ = _snapshot(s.policy)
    metrics = s.update()
    after, _ = _snapshot(s.policy)
    assert s.steps_taken == 2
    for n, t in before.items():
        assert torch.equal(after[n], t), n
    assert metrics["loss"] == 0.0


# -- options -----------------------------------------------------------------------------------------


def test_build_options_validates_names_and_types():
    from rlbench.algorithms.ddpo import DDPOIS, DDPOSF
    from rlbench.algorithms.rwr import RWR, SparseRWR

    opts = build_options(DDPOIS, {"clip_range": 1, "adv_clip_max": 2.5}, "ddpo-is")
    assert opts.clip_range == 1.0 and isinstance(opts.clip_range, float) and opts.adv_clip_max == 2.5
    assert build_options(DDPOSF, {}, "ddpo-sf").adv_clip_max == 5.0
    assert build_options(RWR, {}, "rwr").beta == 0.2
    assert build_options(SparseRWR, {}, "rwr-sparse").percentile == 90.0

    with pytest.raises(ConfigError, match=r"Did you mean 'algorithm\.clip_range'"):
        build_options(DDPOIS, {"clip_rnage": 0.1}, "ddpo-is")
    with pytest.raises(ConfigError, match="has no option 'temperature'"):
        build_options(RWR, {"temperature": 5}, "rwr")
    for bad in ({"clip_range": "big"}, {"clip_range": True}, {"clip_range": [0.1]}):
        with pytest.raises(ConfigError, match="must be a number"):
            build_options(DDPOIS, bad, "ddpo-is")
    with pytest.raises(ConfigError, match="true or false"):
        build_options(RWR, {"per_prompt": "yes"}, "rwr")
    with pytest.raises(ConfigError, match="clip_range must be > 0"):
        build_options(DDPOIS, {"clip_range": 0.0}, "ddpo-is")
    with pytest.raises(ConfigError, match="percentile"):
        build_options(SparseRWR, {"percentile": 150}, "rwr-sparse")


def test_resolution_writes_back_resolved_options(tiny):
    cfg = _config(tiny, "ddpo-is", clip_range=0.2)
    algo = make_algorithm(cfg)
    assert algo.options.clip_range == 0.2
    assert cfg.algorithm.options == {"clip_range": 0.2, "adv_clip_max": 5.0}
    with pytest.raises(ConfigError, match="Did you mean"):
        _config(tiny, "rwr", bta=0.1)


# -- gradients against independent formulas -----------------------------------------------------------


class _Stop(Exception):
    pass


def _first_micro_step(s: Setup, spy_name: str) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
    """Run the update until its first backward; return the spied call, the grads, and the loss passed."""
    seen: dict = {}
    obj = s.policy.scheduler if spy_name == "add_noise" else s.policy
    original = getattr(obj, spy_name)

    def spy(*args, **kwargs):
        seen.setdefault("args", args)
        return original(*args, **kwargs)

    setattr(obj, spy_name, spy)
    grads: dict[str, torch.Tensor] = {}
    losses: list[torch.Tensor] = []
    backward = s.ctx.backward

    def first_backward(loss, sync):
        assert not sync, "choose settings whose first micro-step does not step the optimizer"
        backward(loss, sync)
        losses.append(loss.detach())
        grads.update({n: p.grad.clone() for n, p in s.policy.unet.named_parameters() if p.requires_grad})
        raise _Stop

    s.ctx.backward = first_backward
    with pytest.raises(_Stop):
        s.update()
    return seen, grads, losses[0]


def _match_rows(batch: TrainBatch, x: torch.Tensor, column: int | None = None) -> list[tuple[int, int]]:
    """(sample, step) of each row of ``x`` in the stored trajectories (x_t at step k is latents[:, k])."""
    found = []
    for row in x:
        hits = [(i, k) for i in range(len(batch)) for k in range(batch.latents.shape[1])
                if (column is None or k == column % batch.latents.shape[1]) and torch.equal(batch.latents[i, k], row)]
        assert len(hits) == 1, "the update trained on a latent that is not in the batch"
        found.append(hits[0])
    return found


def _guided(policy: DiffusionPolicy, x, t, embeds, neg) -> torch.Tensor:
    """u + w (c - u) with two separate calls of the underlying UNet."""
    embeds, neg = (e["embeds"] if hasattr(e, "batched") else e for e in (embeds, neg))
    c = policy.unet(x, t, encoder_hidden_states=embeds).sample
    u = policy.unet(x, t, encoder_hidden_states=neg.expand(x.shape[0], -1, -1)).sample
    return u + GUIDANCE * (c - u)


def _my_log_prob(policy: DiffusionPolicy, eps, x_t, t, x_next, eta=1.0) -> torch.Tensor:
    """Gaussian log-density of the stored action under the DDIM step (Black et al. / ddpo-pytorch), mean over dims."""
    sched = policy.scheduler
    ac = sched.alphas_cumprod.double()
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    out = []
    for b in range(x_t.shape[0]):
        tb, prev = int(t[b]), int(t[b]) - stride
        a = ac[tb].item()
        a_prev = ac[prev].item() if prev >= 0 else float(sched.final_alpha_cumprod)
        x0 = (x_t[b] - math.sqrt(1 - a) * eps[b]) / math.sqrt(a)
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        std = eta * math.sqrt(var)
        mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps[b]
        lp = -((x_next[b] - mu) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
        out.append(lp.mean())
    return torch.stack(out)


def _assert_grads_match(policy: DiffusionPolicy, my_loss: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
    names = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    mine = torch.autograd.grad(my_loss, [dict(policy.unet.named_parameters())[n] for n in names])
    total = sum(float(g.abs().sum()) for g in mine)
    assert total > 0, "degenerate test: zero gradient"
    scale = max(float(g.abs().max()) for g in mine)
    for n, g in zip(names, mine):
        torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=1e-4 * scale, msg=n)


@pytest.mark.parametrize("algo,perturb", [("ddpo-is", False), ("ddpo-is", True), ("ddpo-sf", False)])
@pytest.mark.parametrize("per_call", [3, 1], ids=["steps-batched", "one-step-per-call"])
def test_ddpo_gradient_equals_hand_written_formula(tiny, algo, perturb, per_call):
    clip = 0.02
    options = {"clip_range": clip} if algo == "ddpo-is" else {}
    cfg = _config(tiny, algo, acc=2, **options).with_changes({"train.steps_per_forward": per_call})
    s = Setup(tiny, cfg, advantages=torch.tensor([1.0, -0.5, 7.0, -1.5]))
    if perturb:  # move away from the sampling weights so that the ratio leaves the clip range for some rows
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in s.params:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    seen, grads, algo_loss = _first_micro_step(s, "step_log_prob")
    x_t, t, x_next, embeds, neg, w, eta = seen["args"]
    assert w == GUIDANCE and getattr(eta, "noise", eta) == 1.0 and getattr(eta, "name", "ddim") == "ddim"
    batch = s.batch
    rows = _match_rows(batch, x_t)
    idx = [i for i, _ in rows]
    for (i, k), row_next, row_t, row_e in zip(rows, x_next, t, embeds["embeds"]):
        assert torch.equal(batch.latents[i, k + 1], row_next)  # the stored action of that step
        assert int(row_t) == int(batch.timesteps[k])
        assert torch.equal(batch.prompt_embeds["embeds"][i], row_e)
    old = torch.stack([batch.log_probs[i, k] for i, k in rows])
    adv = torch.clamp(batch.advantages[idx], -5.0, 5.0)

    lp = _my_log_prob(s.policy, _guided(s.policy, x_t, t, embeds, neg), x_t, t, x_next).float()
    n_train, acc, mb = STEPS, 2, 2
    k = len(rows) // mb  # trained steps in this UNet call: all 3 batched, or 1 per call
    assert k == per_call
    if algo == "ddpo-is":
        ratio = torch.exp(lp - old)
        loss = torch.mean(torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)))
        if not perturb:
            torch.testing.assert_close(ratio.detach(), torch.ones(len(rows)), rtol=0, atol=1e-5)
        else:
            outside = (ratio.detach() - 1).abs() > clip
            assert outside.any(), "perturbation too small to exercise clipping"
    else:
        loss = torch.mean(-adv * lp)
    # The per-step losses' mean over the k steps of this call, each step weighted 1 / (acc * n_train).
    _assert_grads_match(s.policy, loss * k / (acc * n_train), grads)
    torch.testing.assert_close(algo_loss, (loss * k / (acc * n_train)).detach(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("algo", ["ddpo-is", "ddpo-sf"])
def test_batched_steps_update_equals_the_per_step_loop(tiny, algo):
    """The speed-up (several trained steps per UNet call) changes no loss, metric or weight: a whole
    update with the steps batched ends where the reference's one-step-per-call loop ends."""
    results = []
    for per_call in (1, 3, 2):  # one step per call (the reference), all steps, chunks of 2 + 1
        cfg = _config(tiny, algo, acc=2, inner=1 if algo == "ddpo-sf" else 2).with_changes(
            {"train.steps_per_forward": per_call})
        s = Setup(tiny, cfg, advantages=torch.tensor([1.0, -0.5, 2.0, -1.5]))
        grads: list[dict[str, torch.Tensor]] = []  # the accumulated gradient at every optimizer step
        step = s.optimizer.step

        def recording_step(*args, _step=step, _s=s, _grads=grads, **kwargs):
            _grads.append({n: p.grad.clone() for n, p in _s.policy.unet.named_parameters() if p.requires_grad})
            return _step(*args, **kwargs)

        s.optimizer.step = recording_step
        metrics = s.update()
        results.append((metrics, grads))
    (m_ref, g_ref), *others = results
    assert len(g_ref) >= (1 if algo == "ddpo-sf" else 2) and max(float(g.abs().max()) for g in g_ref[0].values()) > 0
    for metrics, grads in others:
        assert len(grads) == len(g_ref)
        for key in ("loss", "approx_kl", "clipfrac"):
            assert metrics[key] == pytest.approx(m_ref[key], rel=1e-4, abs=1e-7), key
        # Every optimizer step (the second after an AdamW update, inner epochs included) sees the same
        # gradient; the weights then follow (AdamW magnifies rounding only where a gradient is ~0).
        # Float32 sums in another order: compare the whole gradient vector, relative to its norm.
        for g, r in zip(grads, g_ref):
            ref = torch.cat([t.flatten() for t in r.values()]).double()
            got = torch.cat([g[name].flatten() for name in r]).double()
            assert float((got - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("algo", ["rwr", "rwr-sparse"])
def test_rwr_gradient_equals_weighted_denoising_formula(tiny, algo):
    s = Setup(tiny, _config(tiny, algo, acc=2))
    seen, grads, _ = _first_micro_step(s, "add_noise")
    x0, noise, t = seen["args"]
    batch = s.batch
    idx = [i for i, _ in _match_rows(batch, x0, column=-1)]  # the final latents x_0 are re-noised
    ac = s.policy.scheduler.alphas_cumprod
    a = ac[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = _guided(s.policy, x_t, t, batch.prompt_embeds[idx], batch.neg_embeds)
    per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    weights = batch.advantages[idx]
    loss = (weights * per_sample).sum() / len(idx)
    if float(weights.abs().sum()) == 0:  # rwr-sparse may draw a micro-batch with no kept sample
        assert all(float(g.abs().max()) == 0 for g in grads.values())
    else:
        _assert_grads_match(s.policy, loss / 2, grads)


# -- RWR weights ---------------------------------------------------------------------------------------


def test_rwr_weights_are_softmax_times_count_per_prompt(tiny):
    rewards = torch.tensor([1.0, 4.0, -2.0, 3.0, 0.5, 10.0])
    prompts = ["a", "b", "a", "b", "a", "c"]
    algo = make_algorithm(_config(tiny, "rwr", beta=0.5))
    w = algo.advantages(rewards, prompts)
    expected = torch.zeros(6, dtype=torch.float64)
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        e = torch.exp(0.5 * rewards[idx].double())
        expected[idx] = e / e.sum() * len(idx)
    assert w.dtype == torch.float32 and w.shape == (6,)
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=1e-6)
    assert float(w[5]) == pytest.approx(1.0)  # a prompt with one sample gets weight 1
    assert float(w.sum()) == pytest.approx(6.0)

    algo_batch = make_algorithm(_config(tiny, "rwr", beta=0.5, per_prompt=False))
    e = torch.exp(0.5 * rewards.double())
    torch.testing.assert_close(algo_batch.advantages(rewards, prompts).double(), e / e.sum() * 6,
                               rtol=1e-6, atol=1e-6)


def test_rwr_sparse_weights_keep_top_decile_per_prompt(tiny):
    algo = make_algorithm(_config(tiny, "rwr-sparse"))
    # prompt a: 90th percentile of 1..5 is 4.6 -> keeps 5; prompt b: of [0,5,7,7,10] is 8.8 -> keeps 10.
    rewards = torch.tensor([1.0, 10.0, 2.0, 0.0, 3.0, 5.0, 4.0, 7.0, 5.0, 7.0])
    prompts = ["a", "b"] * 5
    w = algo.advantages(rewards, prompts)
    expected = torch.zeros(10)
    expected[1] = expected[8] = 10 / 2
    assert w.dtype == torch.float32
    assert torch.equal(w, expected)

    # Over the whole batch (per_prompt = false) only the single best sample survives.
    algo_batch = make_algorithm(_config(tiny, "rwr-sparse", per_prompt=False))
    w = algo_batch.advantages(rewards, prompts)
    assert torch.equal(w, torch.tensor([0.0, 10.0] + [0.0] * 8))

    # Ties at the threshold are all kept; a lower percentile keeps more.
    assert torch.equal(algo.advantages(torch.full((4,), 3.0), ["p"] * 4), torch.ones(4))
    algo50 = make_algorithm(_config(tiny, "rwr-sparse", percentile=50.0))
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    kept = r >= float(np.percentile(r.numpy(), 50))
    assert torch.equal(algo50.advantages(r, ["p"] * 4), kept.float() * 4 / int(kept.sum()))


# -- the trainer end to end, in-process ----------------------------------------------------------------

SMALL = [
    "sample.num_steps=2", "sample.batch_size=2", "sample.num_batches_per_epoch=1", "sample.async_reward=true",
    "train.batch_size=1", "train.gradient_accumulation_steps=2", "logging.num_samples=2",
    "advantage.buffer_size=4", "advantage.min_count=2", "model.device=cpu",
]


def _values(tiny: Path, out: Path, epochs: int, **model) -> dict:
    return {"run": {"epochs": epochs, "out": str(out), "seed": 3},
            "model": {"name": str(tiny), **model},
            "algorithm": {"name": "ddpo-is"}, "reward": {"name": "incompressibility"}}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_end_to_end_refuses_existing_out_and_resumes(tiny, tmp_path, monkeypatch):
    from rlbench.train.trainer import train

    out = tmp_path / "run"
    path = train(values=_values(tiny, out, 2), overrides=[*SMALL, "logging.tensorboard=true"], log=None)
    assert Path(path) == out

    cfg = load_config(out / "config.toml")
    assert cfg.sample.num_steps == 2 and cfg.model.name == str(tiny) and cfg.run.epochs == 2
    assert cfg.prompts.name == "simple-animals"  # the model's default set, resolved and recorded
    assert cfg.algorithm.options == {"clip_range": 1e-4, "adv_clip_max": 5.0}

    rows = _rows(out)
    assert len(rows) == 2
    keys = ("epoch", "samples", "reward_queries", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "seconds")
    for r in rows:
        assert set(keys) <= set(r)
        for k in keys:
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r[k])
        assert r["optimizer_steps"] == 1
    assert [r["epoch"] for r in rows] == [0, 1]
    assert [r["samples"] for r in rows] == [2, 4] == [r["reward_queries"] for r in rows]

    for epoch in (0, 1):
        folder = out / "samples" / f"{epoch:04d}"
        records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
        assert len(records) == 2
        for rec in records:
            assert (folder / rec["file"]).is_file()
            assert {"prompt", "seed", "reward", "score"} <= set(rec) and rec["reward"] == "incompressibility"
    for epoch in (1, 2):
        ckpt = out / "checkpoints" / f"{epoch:04d}"
        for name in ("pytorch_lora_weights.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json",
                     "trainable.safetensors"):
            assert (ckpt / name).is_file(), (epoch, name)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["epoch"] == epoch and state["samples"] == 2 * epoch and state["train_mode"] == "lora"
    assert any((out / "tb").iterdir())

    # The same --out again: refused before any model is loaded, and the run is left alone.
    import rlbench.diffusion.policy

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the run directory was checked")

    before = (out / "metrics.jsonl").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(rlbench.diffusion.policy, "load_policy", no_loading)
        with pytest.raises(RunDirError, match="already exists"):
            train(values=_values(tiny, out, 2), overrides=SMALL, log=None)
    assert (out / "metrics.jsonl").read_bytes() == before

    # Resume with more epochs continues to the new count.
    train(values={"run": {"epochs": 3}}, resume=out, log=None)
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["samples"] for r in rows] == [2, 4, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["0001", "0002", "0003"]
    assert load_config(out / "config.toml").run.epochs == 3
    assert json.loads((out / "checkpoints" / "0003" / "trainer_state.json").read_text())["epoch"] == 3


def test_train_full_unet_writes_unet_checkpoints(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    from rlbench.train.trainer import train

    out = tmp_path / "full"
    train(values=_values(tiny, out, 1, train_mode="full"),
          overrides=[*SMALL, "logging.tensorboard=false", "train.learning_rate=1e-5"], log=None)
    ckpt = out / "checkpoints" / "0001"
    assert (ckpt / "unet" / "config.json").is_file()
    assert not (ckpt / "pytorch_lora_weights.safetensors").exists()
    unet = UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    changed = [n for (n, p), (_, q) in zip(unet.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed  # the whole UNet was trained
    assert json.loads((ckpt / "trainer_state.json").read_text())["train_mode"] == "full"


@pytest.mark.parametrize("algo", ["rwr", "rwr-sparse"])
def test_rwr_trains_on_deterministic_samples_too(tiny, tmp_path, algo):
    """RWR regresses onto the final samples only: the deterministic DDIM sampler (eta = 0, no density) is fine
    (the trajectory loop stores no transitions then), unlike the policy-gradient algorithms."""
    from rlbench.train.trainer import train

    values = _values(tiny, tmp_path / "run", 1)
    values["algorithm"] = {"name": algo}
    run = train(values=values, overrides=[*SMALL, "sample.eta=0.0"], log=None)
    assert (run / "checkpoints").is_dir()
    with pytest.raises(ConfigError, match="sample.eta must be > 0"):
        load_config(values={**values, "algorithm": {"name": "ddpo-is"}}, overrides=[*SMALL, "sample.eta=0.0"])


@pytest.mark.parametrize("algo", ["ddpo-is", "ddpo-sf"])
def test_ddpo_timestep_window_trains_only_the_noisiest_steps(tiny, algo):
    cfg = _config(tiny, algo).with_changes({"train.timestep_window": 0.7})  # int(3 * 0.7) = 2: the first two of three steps
    s = Setup(tiny, cfg)
    seen = []
    step_log_prob = s.policy.step_log_prob

    def recording(x_t, t, *args):
        seen.append(sorted({int(v) for v in t}))
        return step_log_prob(x_t, t, *args)

    s.policy.step_log_prob = recording
    s.update()
    allowed = {int(v) for v in s.batch.timesteps[:2]}
    # Every micro-batch trains each of its rows on both window steps (in one UNet call) and never on the last.
    assert len(seen) == 4 // cfg.train.batch_size
    assert all(set(t) == allowed for t in seen)


def test_gradient_snr_estimator_recovers_known_signal_and_noise():
    """benchmarks/ddpo_gradient_snr.py: n* = tr Cov / |mean|^2 from chunk sums of i.i.d. gradients."""
    from rlbench.benchmarks.ddpo_gradient_snr import samples_for_snr_one

    g = torch.Generator().manual_seed(0)
    dim, per, chunks = 2000, 32, 64
    mean = torch.full((dim,), 0.05)  # |mean|^2 = 5
    noise_std = 0.5  # tr Cov = 500, so n* = 100
    samples = mean + noise_std * torch.randn(chunks, per, dim, generator=g)
    nstar, mu2 = samples_for_snr_one(list(samples.sum(1)), per)
    assert mu2 == pytest.approx(5.0, rel=0.1) and nstar == pytest.approx(100.0, rel=0.1)
    pure_noise = list((noise_std * torch.randn(chunks, per, dim, generator=g)).sum(1))
    assert samples_for_snr_one(pure_noise, per)[0] > 1000  # no signal: n* huge or inf
