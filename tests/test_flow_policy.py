"""The flow-matching family: schedules, the four samplers' transitions against independent formulas, log-probs,
the exact KL, ratio 1 on-policy, SDE windows, and SD3/FLUX policies on tiny random pipelines (offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlbench.diffusion.flow import flow_log_prob, flow_sigmas, flow_transition, step_keys, velocity_kl_factor
from rlbench.diffusion.gaussian import transition_kl
from rlbench.diffusion.policy import BaseWeights, load_policy
from rlbench.diffusion.sampler import Sampler
from rlbench.testing import save_tiny_flux_pipeline, save_tiny_sd3_pipeline

NOISE = {"flow-sde": 0.7, "dance-sde": 0.3, "cps": 0.8}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sd35_schedule(n: int) -> torch.Tensor:
    # stabilityai/stable-diffusion-3.5-medium scheduler_config.json: shift 3.0
    return flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), n, image_seq_len=1024, flux_sigmas=False)


# -- schedules: the reference's computed tables --------------------------------------------------------------


def test_sd35_and_flux_schedules_match_the_pipelines():
    # ../shared/reference/flow-matching.md §1.2 [computed]: SD3.5-M shift 3, N = 10 (Flow-GRPO training).
    want = [1, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0]
    assert np.allclose(sd35_schedule(10).numpy(), want, atol=1e-4)
    # FLUX 512^2 (1024 packed tokens, mu = 0.63), N = 6, FLUX.1-dev's dynamic shifting.
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
    got = flow_sigmas(flux, 6, image_seq_len=1024, flux_sigmas=True)
    assert np.allclose(got.numpy(), [1, .9037, .7897, .6525, .4842, .2730, 0], atol=1e-4)
    # the model timesteps are exactly 1000 sigma (scheduler.timesteps)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = flow_sigmas(sched, 10, image_seq_len=1024, flux_sigmas=False)
    assert torch.equal(sigmas[:-1] * 1000, sched.timesteps)


def test_step_keys_clamp_sigma_one_to_the_second_sigma():
    sigmas = sd35_schedule(10)
    keys = step_keys(sigmas)
    assert keys.shape == (10, 3) and keys.dtype == torch.float32
    assert torch.equal(keys[:, 0], sigmas[:-1]) and torch.equal(keys[:, 1], sigmas[1:])
    assert keys[0, 2] == sigmas[1] and torch.equal(keys[1:, 2], sigmas[1:-1])  # flow_grpo L44/L47


def test_flow_sde_std_matches_the_reference_table():
    # flow-matching.md §1.3 [computed]: Gaussian std s_i sqrt(-dt_i) at a = 0.7, SD3.5-M N = 10.
    keys = step_keys(sd35_schedule(10))
    x = torch.zeros(10, 1)
    _, std = flow_transition("flow-sde", 0.7, torch.zeros(10, 1), x, keys)
    want = [.700, .743, .536, .446, .392, .353, .319, .282, .225, .0063]
    assert np.allclose(std.flatten().numpy(), want, atol=1e-3)


# -- transitions against independent formulas -------------------------------------------------------------------


def _independent(name: str, a: float, v: np.ndarray, x: np.ndarray, s: float, s_next: float, s_max: float):
    """The papers' forms in float64 (flow-matching.md §1.3-1.5): x1_hat = x + (1 - s) v, x0_hat = x - s v."""
    dt = s_next - s
    x0, x1 = x - s * v, x + (1 - s) * v
    if name == "flow-sde":
        g = a * math.sqrt(s / (1 - (s_max if s == 1 else s)))
        return x + dt * (v + g * g / (2 * s) * x1), g * math.sqrt(-dt)
    if name == "dance-sde":
        return x + dt * (v + a * a / (2 * s) * x1), a * math.sqrt(s - s_next)
    s_hat = s_next * math.sin(a * math.pi / 2)
    return (1 - s_next) * x0 + math.sqrt(s_next**2 - s_hat**2) * x1, s_hat


@pytest.mark.parametrize("name", ["flow-sde", "dance-sde", "cps"])
def test_sampler_mean_and_std_equal_the_written_formulas(name):
    g = torch.Generator().manual_seed(0)
    sigmas = sd35_schedule(10)
    keys = step_keys(sigmas)
    v = torch.randn(10, 2, 4, 4, generator=g)
    x = torch.randn(10, 2, 4, 4, generator=g)
    mean, std = flow_transition(name, NOISE[name], v, x, keys)  # per-sample keys: one step per row
    for i in range(10):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        m_ref, std_ref = _independent(name, NOISE[name], v[i].double().numpy(), x[i].double().numpy(), s, s_next,
                                      float(sigmas[1]))
        assert np.allclose(mean[i].numpy(), m_ref, rtol=1e-5, atol=1e-5)
        assert math.isclose(float(std.flatten()[i]), std_ref, rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("name", ["flow-sde", "dance-sde", "cps", "ode"])
def test_every_sampler_at_noise_zero_is_the_schedulers_euler_step(name):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = flow_sigmas(sched, 6, image_seq_len=256, flux_sigmas=False)
    keys = step_keys(sigmas)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        want = sched.step(v, t, x, return_dict=False)[0]
        mean, std = flow_transition(name, 0.0, v, x, keys[i])
        assert torch.allclose(mean, want, atol=1e-6) and float(std) == 0
        x = want


@pytest.mark.parametrize("name", ["flow-sde", "dance-sde"])
def test_log_prob_is_the_normal_density_averaged_over_dims(name):
    g = torch.Generator().manual_seed(2)
    keys = step_keys(sd35_schedule(10))[[0, 4, 8]]
    v, x = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    mean, std = flow_transition(name, NOISE[name], v, x, keys)
    x_next = mean + std * torch.randn(mean.shape, generator=g)
    want = torch.distributions.Normal(mean.double(), std.double()).log_prob(x_next.double()).mean(dim=(1, 2, 3))
    assert torch.allclose(flow_log_prob(name, x_next, mean, std).double(), want, atol=1e-5)


def test_cps_log_prob_is_the_unnormalised_negative_mse():
    g = torch.Generator().manual_seed(3)
    mean, x_next = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    want = -((x_next - mean) ** 2).mean(dim=(1, 2))
    assert torch.equal(flow_log_prob("cps", x_next, mean, torch.tensor(0.3)), want)


@pytest.mark.parametrize("name", ["flow-sde", "dance-sde", "cps"])
def test_exact_kl_equals_torch_kl_and_the_velocity_form(name):
    g = torch.Generator().manual_seed(4)
    keys = step_keys(sd35_schedule(10))[[0, 3, 7]]
    x = torch.randn(3, 2, 4, 4, generator=g)
    v_a, v_b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    mean_a, std = flow_transition(name, NOISE[name], v_a, x, keys)
    mean_b, _ = flow_transition(name, NOISE[name], v_b, x, keys)
    ours = transition_kl(mean_a, mean_b, std)
    pa = torch.distributions.Normal(mean_a.double(), std.double().expand_as(mean_a))
    pb = torch.distributions.Normal(mean_b.double(), std.double().expand_as(mean_b))
    want = torch.distributions.kl_divergence(pa, pb).flatten(1).sum(1)
    assert torch.allclose(ours, want, rtol=1e-6)
    # KL_i = c^2 ||v_a - v_b||^2 / (2 std^2) with the means affine in v (flow-matching.md §2)
    c = velocity_kl_factor(name, NOISE[name], keys).double()
    by_v = c**2 * (v_a - v_b).double().pow(2).flatten(1).sum(1) / (2 * std.double().flatten() ** 2)
    assert torch.allclose(ours, by_v, rtol=1e-5)
    assert torch.equal(transition_kl(mean_a, mean_a, std), torch.zeros(3, dtype=torch.float64))


# -- policies on the tiny SD3 and FLUX pipelines ------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {"sd3": save_tiny_sd3_pipeline(root / "sd3"), "flux": save_tiny_flux_pipeline(root / "flux")}


def _policy(folder, kind):
    policy = load_policy(str(folder))
    if kind == "flux":
        policy.set_resolution(16)
    torch.manual_seed(0)
    policy.setup_training("lora", 4, 8.0, [])
    return policy


GUIDANCE = {"sd3": 4.5, "flux": 3.5}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("name", ["flow-sde", "dance-sde", "cps"])
def test_first_replay_ratio_is_exactly_one_for_every_sampler(flow_folders, kind, name):
    policy = _policy(flow_folders[kind], kind)
    sampler = Sampler(name, NOISE[name])
    ro = policy.sample(["a red circle", "two blue squares", "a red circle"], num_steps=4,
                       guidance_scale=GUIDANCE[kind], generator=torch.Generator().manual_seed(0), sampler=sampler)
    w = 3 if name == "cps" else 4  # CPS's last step is deterministic (std sigma_N sin(a pi/2) = 0): not stored
    assert ro.latents.shape == (3, w + 1, *policy.latent_shape) and ro.log_probs.shape == (3, w)
    assert ro.timesteps.shape == (w, 3)
    assert torch.equal(ro.final, ro.latents[:, -1]) == (name != "cps")
    neg = policy.encode_prompts([""])
    for k in range(w):
        for key in (ro.timesteps[k], ro.timesteps[k].expand(3, 3)):  # one key for the batch, or one per sample
            lp = policy.step_log_prob(ro.latents[:, k], key, ro.latents[:, k + 1], ro.prompt_embeds, neg,
                                      GUIDANCE[kind], sampler)
            assert torch.equal(torch.exp(lp - ro.log_probs[:, k]), torch.ones(3))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_ode_sampler_reproduces_the_diffusers_pipeline(flow_folders, kind):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    policy = _policy(flow_folders[kind], kind)
    prompts = ["a red circle", "two blue squares"]
    noise = policy.initial_noise(2, torch.Generator().manual_seed(7))
    ro = policy.sample(prompts, num_steps=3, guidance_scale=GUIDANCE[kind], generator=torch.Generator(),
                       sampler=Sampler("ode", 0.0), initial_noise=noise)
    assert ro.latents is None  # a deterministic sampler stores no transitions
    pipe_cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    pipe = pipe_cls(**policy.pipe.components)
    kw = {"max_sequence_length": 128} if kind == "sd3" else {}
    lat = noise if kind == "sd3" else FluxPipeline._pack_latents(noise, 2, *noise.shape[1:])
    want = pipe(prompt=prompts, num_inference_steps=3, guidance_scale=GUIDANCE[kind], latents=lat,
                height=policy.image_size, width=policy.image_size, output_type="latent", **kw).images
    if kind == "flux":
        want = FluxPipeline._unpack_latents(want, policy.image_size, policy.image_size, policy.vae_scale_factor)
    assert torch.allclose(ro.final, want, atol=1e-5)


def test_sde_window_stores_only_its_steps_and_is_ode_elsewhere(flow_folders):
    policy = _policy(flow_folders["sd3"], "sd3")
    window = Sampler("flow-sde", 0.7, window=2, range_lo=0, range_hi=4)
    noise = policy.initial_noise(2, torch.Generator().manual_seed(3))
    ro = policy.sample(["a", "b"], num_steps=5, guidance_scale=1.0, generator=torch.Generator().manual_seed(1),
                       sampler=window, initial_noise=noise, window_start=1)
    keys = policy.schedule(5)
    assert ro.latents.shape[1] == 3 and ro.log_probs.shape == (2, 2) and torch.equal(ro.timesteps, keys[1:3])
    # step 0 was the ODE step: the window's first stored state is the Euler step from x_T
    ode = policy.sample(["a", "b"], num_steps=5, guidance_scale=1.0, generator=torch.Generator(),
                        sampler=Sampler("ode", 0.0), initial_noise=noise)
    neg = policy.encode_prompts([""])
    x1, _ = policy.transition(noise, keys[0], ro.prompt_embeds, neg, 1.0, Sampler("ode", 0.0))
    assert torch.equal(ro.latents[:, 0], x1)
    assert not torch.equal(ro.final, ode.final)
    with pytest.raises(Exception, match="window"):
        Sampler("flow-sde", 0.7, window=4, range_hi=3).check(5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_eval_kl_is_zero_at_the_base_and_the_sum_of_step_kls_after_a_change(flow_folders, kind):
    from rlbench.eval.sampling import sample_paired

    policy = _policy(flow_folders[kind], kind)
    base = BaseWeights(policy)
    sampler = Sampler("flow-sde", 0.7)
    neg = policy.encode_prompts([""])
    at_base = sample_paired(policy, ["a red circle"] * 2, [1, 2], num_steps=3, sampler=sampler,
                            guidance_scale=GUIDANCE[kind], neg_embeds=neg, base=base, kl_sampler=sampler)
    assert np.array_equal(at_base.kl, np.zeros(2)) and at_base.kl_steps == 3
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    moved = sample_paired(policy, ["a red circle"] * 2, [1, 2], num_steps=3, sampler=sampler,
                          guidance_scale=GUIDANCE[kind], neg_embeds=neg, base=base, kl_sampler=sampler)
    assert (moved.kl > 0).all()
    ode = sample_paired(policy, ["a red circle"] * 2, [1, 2], num_steps=3, sampler=Sampler("ode", 0.0),
                        guidance_scale=GUIDANCE[kind], neg_embeds=neg, base=base, kl_sampler=Sampler("ode", 0.0))
    assert ode.kl is None  # a deterministic sampler has no density: no KL


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_saved_lora_loads_with_the_diffusers_pipeline(flow_folders, kind, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    policy = _policy(flow_folders[kind], kind)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    policy.save_trained(tmp_path)
    pipe_cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    fresh = load_policy(str(flow_folders[kind]))
    if kind == "flux":
        fresh.set_resolution(16)
    pipe = pipe_cls(**fresh.pipe.components)
    pipe.load_lora_weights(str(tmp_path))
    x = policy.initial_noise(2, torch.Generator().manual_seed(0))
    cond, neg = policy.encode_prompts(["a", "b"]), policy.encode_prompts([""])
    key = policy.schedule(3)[1]
    with torch.no_grad():
        ours = policy.model_output(x, key, cond, neg, 1.0)
        theirs = fresh.model_output(x, key, cond, neg, 1.0)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("name", ["flow-sde", "dance-sde", "cps"])
@pytest.mark.parametrize("algo", ["grpo", "ddpo-is"])
def test_first_micro_step_of_an_update_has_ratio_exactly_one(flow_folders, monkeypatch, kind, name, algo):
    """Through the algorithms' update (steps replayed one per transformer call, the rollout's batch shape): every
    (sample, step) ratio before the first optimizer step is exactly 1 in fp32, for each sampler and model."""
    from accelerate import Accelerator

    import rlbench.algorithms.ddpo as ddpo_mod
    import rlbench.algorithms.grpo as grpo_mod
    from rlbench.algorithm import TrainBatch, UpdateContext, make_algorithm
    from rlbench.config import load_config

    sample = {"batch_size": 4, "num_batches_per_epoch": 1, "num_steps": 3, "images_per_prompt": 2,
              "sampler": name, "noise_level": NOISE[name], "guidance_scale": GUIDANCE[kind]}
    if kind == "flux":
        sample["resolution"] = 16
    cfg = load_config(values={
        "model": {"name": str(flow_folders[kind]), "device": "cpu", "lora_rank": 4, "lora_alpha": 8.0},
        "algorithm": {"name": algo}, "reward": {"name": "incompressibility"}, "sample": sample,
        "train": {"batch_size": 4, "gradient_accumulation_steps": 1, "steps_per_forward": 1, "learning_rate": 1e-2,
                  "timestep_window": 1.0}})
    policy = load_policy(str(flow_folders[kind]))
    policy.check_config(cfg)
    torch.manual_seed(0)
    policy.setup_training("lora", 4, 8.0, [])
    policy.prepare(Accelerator(cpu=True))
    algo_obj = make_algorithm(cfg)
    prompts = ["a red circle", "a red circle", "two blue squares", "two blue squares"]
    neg = policy.encode_prompts([""])
    ro = policy.sample(prompts, num_steps=3, guidance_scale=GUIDANCE[kind], sampler=cfg.sampler(),
                       generator=torch.Generator().manual_seed(0), neg_embeds=neg)
    batch = TrainBatch(latents=ro.latents, log_probs=ro.log_probs, timesteps=ro.timesteps,
                       prompt_embeds=ro.prompt_embeds, neg_embeds=neg, rewards=torch.zeros(4),
                       advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), prompts=prompts, final=ro.final)
    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ctx = UpdateContext(cfg, optimizer, Accelerator(cpu=True), torch.Generator().manual_seed(7), params, policy,
                        reference=BaseWeights(policy) if algo_obj.uses_reference() else None)
    ratios = []
    for mod in (ddpo_mod, grpo_mod):
        original = mod.ppo_clip_loss

        def spy(log_prob, old_log_prob, *args, _original=original, **kwargs):
            if ctx.steps == 0:
                ratios.append(torch.exp(log_prob - old_log_prob).detach())
            return _original(log_prob, old_log_prob, *args, **kwargs)

        monkeypatch.setattr(mod, "ppo_clip_loss", spy)
    metrics = algo_obj.update(policy, batch, ctx)
    got = torch.cat(ratios)
    assert got.numel() == 4 * (2 if name == "cps" else 3) and torch.equal(got, torch.ones_like(got))
    assert metrics["clipfrac"] == 0.0 and ctx.steps == 1
