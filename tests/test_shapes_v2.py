"""Shapes suite v2 (issue 20): the shipped specs are what benchmarks/shapes_v2_specs.py writes and meet the power
measured on the base models; flow specs pin their sampler; evaluation sizes per prompt set; the per-step
importance ratio GRPO-Guard diagnoses."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from rlbench.bench.spec import find_specs, load_spec
from rlbench.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """A script of benchmarks/ imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _generator():
    return _bench_module("shapes_v2_specs")


def test_shipped_v2_specs_are_the_generators_output():
    gen = _generator()
    for folder in ("shapes", "shapes-v2-extra"):
        files = gen.specs(ROOT / "benchmarks" / folder)
        shipped = {p.name: p.read_text() for p in (ROOT / "benchmarks" / folder).glob("*-v2.toml")}
        assert shipped == files  # run `python benchmarks/shapes_v2_specs.py` after editing its table


def test_v2_design_equal_budget_three_seeds_and_both_families():
    core = [load_spec(p) for p in find_specs("shapes") if p.stem.endswith("-v2")]
    extra = [load_spec(p) for p in find_specs("shapes-v2-extra")]
    # the 4-hour suite: the upper reference per family and the rows the README's findings are read from
    assert {s.id for s in core} == {"gold-grpo-nokl-v2", "gold-flow-grpo-v2", "clip-grpo-v2", "clip-ddpo-is-v2",
                                    "clip-flow-grpo-v2", "clip-flow-grpo-nokl-v2", "clip-flow-nft-v2"}
    assert {s.suite for s in core} == {"shapes-v2"} and {s.suite for s in extra} == {"shapes-v2-extra"}
    specs = core + extra
    assert len(specs) == 20
    families = {}
    for s in specs:
        assert s.seeds == (0, 1, 2)  # the cut rows keep the suite's power
        cfg = s.configs[0]
        assert cfg.samples_per_epoch * cfg.run.epochs == 2048  # equal reward queries in every row
        assert 100 not in s.seeds  # the probes' seed is not the suite's
        families.setdefault(cfg.model_family(), set()).add((s.reward, s.name))
        assert s.eval_checkpoints() == [0, cfg.run.epochs]
        if cfg.model_family() == "flow":
            assert s.eval["sampler"] == "flow-sde" and "eta" not in s.eval
        else:
            assert s.eval["eta"] == 1.0 and "sampler" not in s.eval
    assert {n for r, n in families["flow"] if r == "shapes-clip"} == {
        "clip-flow-grpo", "clip-flow-grpo-nokl", "clip-flow-grpo-fast", "clip-dance-grpo", "clip-flow-nft",
        "clip-flow-draft"}
    assert {n for r, n in families["ddim"] if r == "shapes-clip"} == {
        "clip-ddpo-is", "clip-ddpo-sf", "clip-grpo", "clip-grpo-nokl", "clip-nft", "clip-draft", "clip-rwr"}
    fast = load_spec(find_specs("clip-flow-grpo-fast-v2")[0]).configs[0]
    assert fast.sampler().window == 3 and fast.sample.sde_window_range == [0, 5]
    dance = load_spec(find_specs("clip-dance-grpo-v2")[0]).configs[0]
    assert dance.sampler().name == "dance-sde" and dance.sampler().noise == 0.3


def test_v2_evaluation_sizes_meet_the_measured_power():
    """Standard error of a change at the specs' sizes from the base models' measured spread: <= 0.02 on the [0, 1]
    rewards and <= 0.2 on shapes-clip, on the training set and on the held-out sets pooled."""
    power = json.loads((ROOT / "results" / "shapes-v2" / "power.json").read_text())
    spec = load_spec(find_specs("clip-grpo-v2")[0], resolve=False)
    per_set, m = spec.eval["prompts_per_set"], spec.eval["images_per_prompt"]
    held = [s for s in per_set if s != "shapes-train"]
    for model, r in power["results"].items():
        for reward, target in power["targets"].items():
            sd = {s: r["sets"][s][reward]["sd_prompt_diff"][str(m)] for s in per_set}
            n = {s: min(per_set[s], power["set_sizes"][s]) for s in per_set}
            assert sd["shapes-train"] / math.sqrt(n["shapes-train"]) <= target, (model, reward)
            pooled = math.sqrt(sum(n[s] * sd[s] ** 2 for s in held)) / sum(n[s] for s in held)
            assert pooled <= target, (model, reward)


def _v2_copy(tmp_path, edit, name="clip-flow-grpo-v2.toml"):
    text = (ROOT / "benchmarks" / "shapes" / name).read_text()
    path = tmp_path / name
    path.write_text(edit(text))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('sampler = "flow-sde"\nnoise_level = 0.7\n', ""), "train.sample.sampler"),
    (lambda t: t.replace('\nsampler = "flow-sde"\nguidance', "\nguidance"), "missing key eval.sampler"),
    (lambda t: t.replace('\nsampler = "flow-sde"\nguidance', "\neta = 1.0\nguidance"), "eval.eta is DDIM's"),
    (lambda t: t.replace('"shapes-heldout-counts" = 32, ', ""), "give a number for each prompt set"),
])
def test_flow_spec_errors_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(_v2_copy(tmp_path, edit))


def test_ddim_spec_rejects_a_flow_eval_sampler(tmp_path):
    path = _v2_copy(tmp_path, lambda t: t.replace("\neta = 1.0\nguidance = 5.0", '\nsampler = "ode"\nguidance = 5.0'),
                    name="clip-grpo-v2.toml")
    with pytest.raises(ConfigError, match="eval.sampler is for flow models"):
        load_spec(path)


def test_evaluation_prompts_per_set_mapping():
    from rlbench.eval.plan import prompt_set_plans, subset
    from rlbench.prompts import load_prompts

    sets = prompt_set_plans(["shapes-train", "shapes-heldout-counts"], {"shapes-train": 5, "shapes-heldout-counts": 0}, 3)
    assert {s.name: len(s.prompts) for s in sets} == {"shapes-train": 5, "shapes-heldout-counts": 74}
    # the same fixed subset as one number for every set gives (seeded by the eval seed and the set's name)
    same = prompt_set_plans(["shapes-train"], 5, 3)[0]
    train = load_prompts("shapes-train").prompts
    assert sets[0].prompts == same.prompts == [train[i] for i in subset(len(train), 5, 3, "shapes-train")]
    with pytest.raises(InputError, match="give a number for each of them"):
        prompt_set_plans(["shapes-train", "shapes-heldout-counts"], {"shapes-train": 5}, 0)
    with pytest.raises(InputError, match="must be >= 0"):
        prompt_set_plans(["shapes-train"], {"shapes-train": -1}, 0)


# -- GRPO-Guard's diagnostic: the mean importance ratio per denoising step -------------------------------------


def _grpo_setup(tmp_path, steps: int, **train):
    """tests/test_successors.Setup for GRPO (no KL) on the tiny SD pipeline: 4 samples in groups of 2, micro-batch 2."""
    from tests.test_successors import GUIDANCE, Setup
    from rlbench.config import load_config
    from rlbench.testing import save_tiny_sd_pipeline

    tiny = save_tiny_sd_pipeline(tmp_path / "tiny-sd", sample_size=16)
    cfg = load_config(values={
        "model": {"name": str(tiny), "device": "cpu"}, "algorithm": {"name": "grpo", "beta": 0.0},
        "reward": {"name": "incompressibility"},
        "sample": {"batch_size": 4, "num_batches_per_epoch": 1, "num_steps": steps, "eta": 1.0,
                   "guidance_scale": GUIDANCE, "images_per_prompt": 2},
        "train": {"batch_size": 2, "num_inner_epochs": 1, **train}})
    return Setup(tiny, cfg)


def test_ratio_by_step_is_the_per_step_mean_of_the_ratios(tmp_path):
    from tests.test_successors import _perturb

    # window 0.5: steps 0 and 1 trained, 2 and 3 not; the optimizer's lr is set to 0, so the weights stay put during
    # the update and every ratio is computable up front
    s = _grpo_setup(tmp_path, 4, gradient_accumulation_steps=1, timestep_window=0.5)
    for group in s.optimizer.param_groups:
        group["lr"] = 0.0
    _perturb(s.params, scale=0.05)  # the policy moved since sampling: ratios differ from 1
    b = s.batch
    expected = []
    with torch.no_grad():
        for j in range(2):
            keys = b.step_keys(torch.arange(4)[:, None], torch.full((4, 1), j)).flatten(0, 1)
            lp = s.policy.step_log_prob(b.latents[:, j], keys, b.latents[:, j + 1], b.prompt_embeds, s.neg,
                                        s.cfg.sample.guidance_scale, s.algo.sampler)
            expected.append(float(torch.exp(lp - b.log_probs[:, j]).double().mean()))
    got = s.algo.update(s.policy, b, s.ctx)["ratio_by_step"]
    assert len(got) == 4 and got[2:] == [None, None]
    assert got[:2] == pytest.approx(expected, rel=1e-5)
    assert any(abs(r - 1) > 1e-4 for r in got[:2])


def test_ratio_by_step_is_one_when_the_epoch_is_one_optimizer_step(tmp_path):
    """Every micro-batch replays weights the samples came from when the only optimizer step closes the epoch."""
    s = _grpo_setup(tmp_path, 3, gradient_accumulation_steps=2, learning_rate=1e-2)
    got = s.algo.update(s.policy, s.batch, s.ctx)["ratio_by_step"]
    assert s.steps_taken == 1 and len(got) == 3
    assert got == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_probe_summary_reads_first_and_last_quarters():
    mod = _bench_module("shapes_v2_probes")
    folder = ROOT / "results" / "shapes-v2" / "probes" / "ddim-gold-grpo-k16"
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    r = mod.summarise(folder)
    rewards = [x["reward_mean"] for x in lines]
    assert r["epochs"] == 32 and r["k"] == 16 and r["reward"] == "shapes-gold"
    assert r["trained"][:3] == pytest.approx((sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8,
                                              sum(rewards[-8:]) / 8 - sum(rewards[:8]) / 8))


class _RenderingPolicy:
    """A stand-in policy that draws each prompt exactly (a fresh render of a scene for it) except the prompts in
    ``blank``, drawn as an empty gray image: the analyser then reads every fact of the rendered ones."""

    family = "ddim"

    def __init__(self, blank=()):
        import numpy as np

        self.blank, self.rng = set(blank), np.random.default_rng(0)

    def encode_prompts(self, prompts):
        return None

    def sample(self, prompts, **kwargs):
        import numpy as np
        from types import SimpleNamespace

        from rlbench.shapes.world import Scene, render_batch, scene_for_prompt

        scenes = [Scene("gray", ()) if p in self.blank else scene_for_prompt(p, self.rng) for p in prompts]
        images = torch.from_numpy(render_batch(scenes).astype(np.float32) / 255).permute(0, 3, 1, 2)
        return SimpleNamespace(images=images)


def test_headroom_reads_facts_best_of_k_and_backgrounds():
    from rlbench.shapes.grammar import parse_prompt

    mod = _bench_module("shapes_headroom")
    good, bad = "a red circle on a black background", "two blue squares on a white background"
    r = mod.headroom(_RenderingPolicy(blank=[bad]), [good, bad], 3, steps=1, guidance=1.0, seed=0)
    # exact renders hold every fact; the blank gray image holds none of the other prompt's (2 blue squares exist,
    # exactly 2 of them, 2 objects in all, a white background)
    assert r["gold"] == pytest.approx(0.5) and r["best_of_k"] == pytest.approx(0.5)
    assert r["templates"]["single"] == {"prompts": 1, "gold": 1.0, "best_of_k": 1.0, "within_prompt_sd": 0.0}
    assert r["templates"]["count"]["gold"] == 0.0
    n_bad = len(parse_prompt(bad))
    assert r["facts"]["Background"] == {"n": 6, "held": 0.5}
    assert r["background_asked_drawn"] == {"black->black": 3, "white->gray": 3}
    assert r["objects_found"] == {"0": 0.5, "1": 0.5} and n_bad == 4
    assert "| single | 1 | 1.000 | 1.000 | 0.000 |" in mod.render(r, "stand-in")
