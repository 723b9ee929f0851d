"""Benchmarks as versioned specs (rlbench.bench): every shipped spec validates; unknown and missing keys and
a reward version mismatch are errors naming the file and key; `rlbench bench list / validate / run --dry-run`;
a tiny spec on the tiny SD pipeline runs end to end, a re-run skips it, and killed runs resume."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from rlbench.bench import runner as bench_runner
from rlbench.bench.spec import find_specs, load_spec, load_specs, packaged_root, validate_all
from rlbench.cli import app
from rlbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ALGOS = {"ddpo-is", "ddpo-sf", "rwr", "rwr-sparse"}


# -- the shipped specs --------------------------------------------------------------------------------


def test_every_shipped_spec_validates():
    good, bad = validate_all()
    assert bad == {}
    by_suite: dict[str, list] = {}
    for s in good:
        by_suite.setdefault(s.suite, []).append(s)
        assert s.suite.startswith(s.path.parent.name) and s.path.stem == s.id  # shapes/*-v2: suite shapes-v2
        assert set(s.configs) == set(s.seeds)  # every seed resolved by rlbench.config.resolve
    assert set(by_suite) == {"ddpo-paper", "shapes", "shapes-v2", "shapes-v2-extra"}  # v2: tests/test_shapes_v2.py
    paper, shapes = by_suite["ddpo-paper"], by_suite["shapes"]
    # The paper: 4 tasks x 4 algorithms, Table D.5.
    assert {(s.reward, s.train["algorithm"]["name"]) for s in paper} == {
        (r, a) for r in ("compressibility", "incompressibility", "aesthetic", "vlm-bertscore") for a in ALGOS}
    tasks = {s.reward: s.train["prompts"]["name"] for s in paper}
    assert tasks == {"compressibility": "imagenet-animals", "incompressibility": "imagenet-animals",
                     "aesthetic": "simple-animals", "vlm-bertscore": "nouns-activities"}
    for s in paper:
        cfg = s.configs[s.seeds[0]]
        assert (cfg.model.name, cfg.sample.num_steps, cfg.sample.eta, cfg.sample.guidance_scale) == ("sd-1.4", 50, 1.0, 5.0)
        assert cfg.train.learning_rate == 1e-5 and cfg.model.train_mode == "full"
        ddpo = cfg.algorithm.name.startswith("ddpo")
        assert cfg.samples_per_epoch == (256 if ddpo else 10240)
        assert (cfg.samples_per_update, cfg.updates_per_epoch) == {
            "ddpo-is": (64, 4), "ddpo-sf": (256, 1), "rwr": (128, 400), "rwr-sparse": (128, 400)}[cfg.algorithm.name]
        assert {"unseen-animals", "everyday-objects"} <= set(s.eval["prompts"])
    # Shapes: 4 algorithms x {shapes-clip, shapes-aesthetic, shapes-gold}, 2-3 seeds, gold rewards in every evaluation;
    # and the successor families (grpo with and without KL, draft) on both proxies at equal wall time.
    ddpo_rwr = [s for s in shapes if s.train["algorithm"]["name"] in ALGOS]
    assert {(s.reward, s.train["algorithm"]["name"]) for s in ddpo_rwr} == {
        (r, a) for r in ("shapes-clip", "shapes-aesthetic", "shapes-gold") for a in ALGOS}
    successors = sorted((s.reward, s.name) for s in shapes if s not in ddpo_rwr)
    assert successors == sorted((f"shapes-{r}", f"{r}-{k}") for r in ("clip", "aesthetic")
                                for k in ("grpo", "grpo-nokl", "draft"))
    for s in shapes:
        assert 2 <= len(s.seeds) <= 3
        assert {"shapes-gold", "shapes-aesthetic-gold"} <= set(s.eval["rewards"])
        cfg = s.configs[s.seeds[0]]
        if s in ddpo_rwr:
            assert cfg.samples_per_epoch * cfg.run.epochs == 2048  # the same reward-query budget for every algorithm


def test_specs_are_found_by_path_suite_and_id():
    assert (packaged_root() / "shapes" / "clip-rwr-v1.toml").is_file()  # package data (rlbench.benchmarks)
    assert len(find_specs("shapes")) == 18 + 7 and len(find_specs(ROOT / "benchmarks" / "ddpo-paper")) == 16
    assert len(find_specs("shapes-v2-extra")) == 13  # the v2 rows cut from the 4-hour suite
    assert find_specs("shapes/clip-rwr-v1") == find_specs("clip-rwr-v1") == [packaged_root() / "shapes/clip-rwr-v1.toml"]
    with pytest.raises(ConfigError, match="ambiguous"):
        find_specs("aesthetic-rwr-v1")  # in both suites
    with pytest.raises(ConfigError, match="Did you mean 'shapes'"):
        find_specs("shapez")


# -- errors ----------------------------------------------------------------------------------------------


def _copy(tmp_path: Path, edit=None, name: str = "clip-ddpo-is-v1.toml") -> Path:
    text = (ROOT / "benchmarks" / "shapes" / "clip-ddpo-is-v1.toml").read_text()
    if edit:
        text = edit(text)
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit,key", [
    (lambda t: t.replace("[benchmark]\n", "[benchmark]\nauthor = 'x'\n"), "benchmark.author"),
    (lambda t: t.replace("num_steps = 10", "num_steps = 10\nnum_step = 10"), "train.sample.num_step"),
    (lambda t: t.replace("[eval]\n", "[eval]\nimages = 3\n"), "eval.images"),
    (lambda t: t + "\n[evaluation]\nx = 1\n", "evaluation"),
    (lambda t: t + "\n[train.sampler]\nx = 1\n", "train.sampler"),
    (lambda t: t.replace("clip_range = 0.0001", "clip_range = 0.0001\nclip_rnge = 0.1"), "clip_rnge"),
    (lambda t: t.replace("[train.run]\n", "[train.run]\nseed = 3\n"), "train.run.seed"),
])
def test_unknown_keys_are_errors_naming_file_and_key(tmp_path, edit, key):
    path = _copy(tmp_path, edit)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and key in str(info.value)


@pytest.mark.parametrize("edit,key", [
    (lambda t: t.replace("eta = 1.0\nguidance_scale", "guidance_scale"), "train.sample.eta"),
    (lambda t: t.replace("learning_rate = 3e-05\n", ""), "train.train.learning_rate"),
    (lambda t: t.replace("\nsteps = 10\n", "\n"), "eval.steps"),
    (lambda t: t.replace("seeds = [0, 1]\n", ""), "benchmark.seeds"),
    (lambda t: t.replace('version = "1"\n', ""), "reward.version"),
    (lambda t: t.replace("clip_range = 0.0001  # Table D.5\n", ""), "train.algorithm.clip_range"),
])
def test_missing_keys_are_errors_naming_file_and_key(tmp_path, edit, key):
    path = _copy(tmp_path, edit)
    with pytest.raises(ConfigError, match="missing key") as info:
        load_spec(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_reward_version_mismatch_is_an_error(tmp_path):
    path = _copy(tmp_path, lambda t: t.replace('name = "shapes-clip"\nversion = "1"', 'name = "shapes-clip"\nversion = "2"'))
    with pytest.raises(ConfigError, match=r"reward.version = '2', but the registered reward 'shapes-clip' is version '1'"):
        load_spec(path)


def test_bad_values_are_errors_from_rlbench_config_resolution(tmp_path):
    path = _copy(tmp_path, lambda t: t.replace("gradient_accumulation_steps = 1", "gradient_accumulation_steps = 3"))
    with pytest.raises(ConfigError, match="must be a multiple of samples per optimizer step") as info:
        load_spec(path)
    assert str(path) in str(info.value)
    path = _copy(tmp_path, lambda t: t.replace("checkpoints = [0, 8, 16, 24, 32]", "checkpoints = [0, 5, 32]"))
    with pytest.raises(ConfigError, match="epoch 5, which training does not save"):
        load_spec(path)
    with pytest.raises(ConfigError, match=r"file name must be clip-ddpo-is-v1.toml"):
        load_spec(_copy(tmp_path, name="clip-ddpo-is-v2.toml"))


# -- CLI -----------------------------------------------------------------------------------------------


def test_cli_bench_list_and_validate(runner, tmp_path):
    res = runner.invoke(app, ["bench", "list"])
    assert res.exit_code == 0, res.output
    assert "compressibility-ddpo-is-v1" in res.output and "gold-rwr-sparse-v1" in res.output
    res = runner.invoke(app, ["bench", "validate"])
    assert res.exit_code == 0, res.output
    assert "54 specs valid." in res.output  # 16 paper + 18 shapes v1 + 20 shapes v2 (7 + 13 extra)
    # A folder with one good and two bad specs: exit 2, every invalid one named.
    _copy(tmp_path)
    _copy(tmp_path, lambda t: t.replace("[eval]\n", "[eval]\nimages = 3\n").replace("clip-ddpo-is", "bad-a"), "bad-a-v1.toml")
    _copy(tmp_path, lambda t: t.replace('version = "1"', 'version = "9"').replace("clip-ddpo-is", "bad-b"), "bad-b-v1.toml")
    res = runner.invoke(app, ["bench", "validate", str(tmp_path)])
    assert res.exit_code == 2
    err = res.output
    assert "bad-a-v1.toml" in err and "bad-b-v1.toml" in err and "eval.images" in err
    assert "error: 2 of 3 specs are invalid" in err
    res = runner.invoke(app, ["bench", "run", "no-such-suite", "--dry-run"])
    assert res.exit_code == 2 and "error: no benchmark spec" in res.output


def test_dry_run_of_the_paper_suite_prints_gpu_hours_offline(runner):
    res = runner.invoke(app, ["bench", "run", str(ROOT / "benchmarks" / "ddpo-paper"), "--dry-run"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "16 runs (16 specs x seeds): 819,200 training samples" in out
    hours = float(re.search(r"Estimated GPU hours: ([\d,.]+) H100-hours", out).group(1).replace(",", ""))
    assert 100 < hours < 1000
    assert "README 'Speed'" in out and "compressibility-ddpo-is-v1/seed-0" in out


# -- running ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, one_thread) -> Path:
    from rlbench.testing import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", sample_size=8)


TINY = """
[benchmark]
name = "tiny"
version = 1
suite = "tiny-suite"
description = "two epochs of the tiny SD pipeline"
seeds = [0]

[reward]
name = "incompressibility"
version = "1"

[train.run]
epochs = 2

[train.model]
name = "{model}"
train_mode = "lora"
lora_rank = 4
lora_alpha = 4.0
device = "cpu"

[train.prompts]
name = "simple-animals"

[train.sample]
num_steps = 2
eta = 1.0
guidance_scale = 5.0
batch_size = 2
num_batches_per_epoch = 1
images_per_prompt = 1

[train.algorithm]
name = "ddpo-is"
clip_range = 0.0001
adv_clip_max = 5.0

[train.train]
batch_size = 2
gradient_accumulation_steps = 1
num_inner_epochs = 1
timestep_fraction = 1.0
timestep_window = 1.0
learning_rate = 3e-4
adam_beta1 = 0.9
adam_beta2 = 0.999
weight_decay = 1e-4
adam_epsilon = 1e-8
max_grad_norm = 1.0
cfg = true

[train.advantage]
per_prompt = false
buffer_size = 16
min_count = 16

[train.checkpoint]
every = 1

[train.logging]
tensorboard = false
samples_every = 0

[eval]
checkpoints = [0, 2]
prompts = ["simple-animals"]
rewards = ["incompressibility"]
images_per_prompt = 1
prompts_per_set = 2
seed = 0
steps = 2
eta = 1.0
guidance = 5.0
features = "none"
"""


@pytest.fixture
def tiny_spec(tmp_path, tiny_model):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "tiny-v1.toml").write_text(TINY.format(model=tiny_model))
    return load_specs(folder)


@pytest.fixture
def counted(monkeypatch):
    """Counts trainer.train calls and Trainer.epoch calls (epochs actually trained)."""
    from rlbench.train import trainer

    calls = {"train": [], "epochs": []}
    real_train, real_epoch = trainer.train, trainer.Trainer.epoch

    def train(*args, **kwargs):
        calls["train"].append(kwargs.get("resume"))
        return real_train(*args, **kwargs)

    def epoch(self, run, epoch):
        calls["epochs"].append(epoch)
        if calls.get("kill_at") == epoch:
            raise KeyboardInterrupt
        return real_epoch(self, run, epoch)

    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(trainer.Trainer, "epoch", epoch)
    return calls


def test_a_run_of_one_suite_leaves_the_other_suites_results_as_they_were(tiny_spec, tiny_model, tmp_path):
    """`rlbench bench run shapes --only '*-v2'` covers v1's specs too; only the selected suite's README is rewritten."""
    other = tmp_path / "specs" / "other-v1.toml"
    other.write_text(TINY.format(model=tiny_model).replace('name = "tiny"', 'name = "other"')
                     .replace('suite = "tiny-suite"', 'suite = "other-suite"'))
    specs = load_specs(tmp_path / "specs")
    out = tmp_path / "results"
    (out / "other-suite").mkdir(parents=True)
    (out / "other-suite" / "README.md").write_text("committed results\n")
    bench_runner.run(specs, out=out, only="tiny-v1/*", log=lambda line: None)
    assert (out / "tiny-suite" / "README.md").is_file()
    assert (out / "other-suite" / "README.md").read_text() == "committed results\n"
    assert not (out / "other-suite" / "runs").exists()


def test_tiny_spec_runs_end_to_end_and_a_rerun_skips_it(tiny_spec, tmp_path, counted, runner):
    out = tmp_path / "results"
    outcomes = bench_runner.run(tiny_spec, out=out, log=lambda line: None)
    assert [(o.id, o.status) for o in outcomes] == [("tiny-v1/seed-0", "done")]
    run = out / "runs" / "tiny-v1" / "seed-0"
    assert json.loads((run / "state.json").read_text())["status"] == "done"
    assert counted["train"] == [None] and counted["epochs"] == [0, 1]
    assert [int(p.name) for p in sorted((run / "train" / "checkpoints").iterdir())] == [1, 2]
    assert (run / "eval" / "report.html").is_file() and (run / "eval" / "tables" / "summary.csv").is_file()
    readme = (out / "README.md").read_text()
    assert "Git commit:" in readme and "torch " in readme and "Wall time:" in readme and "| tiny-v1 | 1 |" in readme
    assert (out / "summary.csv").is_file() and (out / "runs" / "tiny-v1" / "tiny-v1.toml").is_file()
    # The cross-run tables, plots and report of the suite.
    for name in ("efficiency", "overoptimisation", "transfer", "comparison"):
        assert (out / "tables" / f"{name}.md").is_file() and (out / "tables" / f"{name}.csv").is_file()
        assert (out / "tables" / f"{name}.md").read_text().split("\n\n", 1)[1] in readme
    assert (out / "plots" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "Sample efficiency per trained reward" in (out / "report.html").read_text()
    comparison = (out / "tables" / "comparison.csv").read_text()
    assert "tiny-v1,ddpo-is,incompressibility,4," in comparison  # 2 epochs x 2 samples of reward queries
    # The combined README regenerates from the folder alone.
    (out / "README.md").unlink()
    res = runner.invoke(app, ["bench", "report", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "README.md").read_text().split("## Main table")[1] == readme.split("## Main table")[1]
    # Again: nothing is trained or evaluated.
    mtime = (run / "eval" / "scores.parquet").stat().st_mtime_ns
    outcomes = bench_runner.run(tiny_spec, out=out, log=lambda line: None)
    assert [o.status for o in outcomes] == ["skipped"] and counted["train"] == [None]
    assert (run / "eval" / "scores.parquet").stat().st_mtime_ns == mtime
    # A changed spec file is a new experiment: refused, not silently mixed.
    spec_file = tiny_spec[0].path
    spec_file.write_text(spec_file.read_text().replace("lora_alpha = 4.0", "lora_alpha = 8.0"))
    with pytest.raises(ConfigError, match="the spec changed after the run"):
        bench_runner.run(load_specs(spec_file), out=out, log=lambda line: None)


def test_a_killed_run_resumes_only_with_resume(tiny_spec, tmp_path, counted, runner):
    out = tmp_path / "results"
    counted["kill_at"] = 1  # killed during the second epoch, after checkpoint 1
    with pytest.raises(KeyboardInterrupt):
        bench_runner.run(tiny_spec, out=out, log=lambda line: None)
    run = out / "runs" / "tiny-v1" / "seed-0"
    assert json.loads((run / "state.json").read_text())["status"] == "training"
    counted.pop("kill_at")
    res = runner.invoke(app, ["bench", "run", str(tiny_spec[0].path), "--out", str(out)])
    assert res.exit_code == 2 and "was interrupted (training); pass --resume" in res.output
    counted["epochs"].clear()
    outcomes = bench_runner.run(tiny_spec, out=out, resume=True, log=lambda line: None)
    assert [o.status for o in outcomes] == ["resumed"]
    assert counted["epochs"] == [1]  # epoch 0 was not redone
    assert counted["train"][-1] == run / "train"
    rows = [json.loads(line)["epoch"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1]
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "done"
    # Each training attempt records its machine and speed (the equal-time table's clock); the two attempts'
    # training times add up to the run's.
    assert len(state["machines"]) == 2
    for attempt in state["machines"]:
        assert attempt["speed_model"] == bench_runner.SPEED_MODEL and attempt["device"].startswith("cpu")
        assert 0 < attempt["seconds_per_image_step"] < 1 and attempt["train_seconds"] > 0
    assert sum(a["train_seconds"] for a in state["machines"]) == pytest.approx(state["train_seconds"])


def test_a_run_resumed_from_before_the_machine_record_gets_no_clock(tiny_spec, tmp_path, counted):
    """Its earlier attempt's machine is unknown: the run is not put on the new machine's clock."""
    out = tmp_path / "results"
    counted["kill_at"] = 1
    with pytest.raises(KeyboardInterrupt):
        bench_runner.run(tiny_spec, out=out, log=lambda line: None)
    counted.pop("kill_at")
    state_file = out / "runs" / "tiny-v1" / "seed-0" / "state.json"
    old = json.loads(state_file.read_text())
    first = old.pop("machines")[0]["train_seconds"]
    state_file.write_text(json.dumps(old))  # as written before machines were recorded
    bench_runner.run(tiny_spec, out=out, resume=True, log=lambda line: None)
    machines = json.loads(state_file.read_text())["machines"]
    assert machines[0] == {"seconds_per_image_step": None, "train_seconds": first} and len(machines) == 2
    from rlbench.bench import stats

    assert math.isnan(stats.machine_speed(state_file))


def test_dry_run_of_a_local_model_measures_this_device(tiny_spec):
    plans, costs = bench_runner.plan(tiny_spec, log=lambda line: None)
    text = bench_runner.format_plan(plans, costs)
    assert "measured on this machine" in text and "Estimated time on this device" in text
    assert plans[0].samples == 4 and plans[0].eval_images == 4 and plans[0].eval_queries == 4
    with pytest.raises(ConfigError, match="matches no run"):
        bench_runner.select(tiny_spec, "nothing-*")


def test_a_run_killed_while_evaluating_resumes_without_training_again(tiny_spec, tmp_path, counted, monkeypatch):
    out = tmp_path / "results"
    real = bench_runner._evaluate

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_runner, "_evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        bench_runner.run(tiny_spec, out=out, log=lambda line: None)
    run = out / "runs" / "tiny-v1" / "seed-0"
    assert json.loads((run / "state.json").read_text())["status"] == "evaluating"
    monkeypatch.setattr(bench_runner, "_evaluate", real)
    outcomes = bench_runner.run(tiny_spec, out=out, resume=True, log=lambda line: None)
    assert [o.status for o in outcomes] == ["resumed"] and counted["train"] == [None]  # trained once
    assert (run / "eval" / "report.html").is_file()
    assert len(json.loads((run / "state.json").read_text())["machines"]) == 1  # one training attempt


# -- cross-run analysis ------------------------------------------------------------------------------------


def _fake_suite():
    """Two specs (algorithms a, b trained on proxy p), two seeds, checkpoints at 0/50/100 queries, one gold."""
    import pandas as pd
    from types import SimpleNamespace

    # model "fake" declares x-gold as its gold reward (see the monkeypatched model_eval_defaults below)
    specs = [SimpleNamespace(id=f"{a}-v1", train={"algorithm": {"name": a}, "model": {"name": "fake"}}, reward="p",
                             suite="s") for a in "ab"]
    rows = []
    # proxy change by (algo, seed) at queries 0, 50, 100; gold mean at the same checkpoints.
    proxy = {("a", 0): [0, 1, 2], ("a", 1): [0, 3, 4], ("b", 0): [0, 0, 2], ("b", 1): [0, 0, 2]}
    gold = {("a", 0): [0.5, 0.7, 0.4], ("a", 1): [0.5, 0.6, 0.6], ("b", 0): [0.5, 0.5, 0.5], ("b", 1): [0.5, 0.4, 0.3]}
    held = {("a", 0): 1.0, ("a", 1): 2.0, ("b", 0): -1.0, ("b", 1): 1.0}
    for (a, seed), ys in proxy.items():
        for c, (q, y) in enumerate(zip((0, 50, 100), ys)):
            base = dict(spec=f"{a}-v1", seed=seed, run="train", checkpoint=c, reward_queries=q)
            rows.append({**base, "prompt_set": "tr", "set_role": "train", "reward": "p", "mean": 10 + y, "delta": y})
            g = gold[(a, seed)]
            rows.append({**base, "prompt_set": "tr", "set_role": "train", "reward": "x-gold", "mean": g[c],
                         "delta": g[c] - g[0]})
            rows.append({**base, "prompt_set": "ho", "set_role": "held-out", "reward": "p", "mean": 0.0,
                         "delta": held[(a, seed)] if c == 2 else 0.0})
    return pd.DataFrame(rows), specs


def test_suite_tables_compute_efficiency_overoptimisation_and_transfer(monkeypatch):
    import numpy as np

    from rlbench.bench import analysis
    from rlbench.eval import plan

    monkeypatch.setattr(plan, "model_eval_defaults", lambda model: {"gold_rewards": ["x-gold"]} if model == "fake" else {})

    summary, specs = _fake_suite()
    eff = analysis.efficiency(summary, specs).data.set_index("algorithm")
    # AUC / budget with trapezoids: a seed 0: (0+1)/2*50 + (1+2)/2*50 = 100 -> 1.0; seed 1: 75 + 175 = 250 -> 2.5.
    assert eff.loc["a", "auc"] == pytest.approx(1.75) and eff.loc["b", "auc"] == pytest.approx(0.5)
    assert eff.loc["a", "rank"] == 1 and eff.loc["b", "rank"] == 2
    assert eff.loc["a", "half"] == pytest.approx(2.0) and eff.loc["b", "full"] == pytest.approx(2.0)

    oo = analysis.overoptimisation(summary, specs)
    data = oo.data.set_index("algorithm")
    assert data.loc["a", "proxy_gain"] == pytest.approx(3.0)
    assert data.loc["a", "x-gold:change"] == pytest.approx(np.mean([-0.1, 0.1]))
    assert data.loc["a", "x-gold:drop"] == pytest.approx(np.mean([0.3, 0.0]))
    shown = oo.display.set_index("algorithm")
    assert shown.loc["a", "x-gold peak at (queries)"] == "50, 50"  # per seed, where the gold was highest
    assert shown.loc["b", "x-gold peak at (queries)"] == "0, 0"    # the base model was best: pure over-optimisation
    assert shown.loc["a", "trained-reward gain"] == f"+3 ± {np.std([2, 4], ddof=1):.2g}"

    tr = analysis.transfer(summary, specs).data.set_index("algorithm")
    assert tr.loc["a", "ho"] == pytest.approx(1.5) and tr.loc["b", "ho"] == pytest.approx(0.0)
    assert tr.loc["a", "tr"] == pytest.approx(3.0)


def test_suite_plots_draw_a_line_per_spec_when_two_specs_share_an_algorithm(monkeypatch):
    """v2 trains grpo in three rows on one reward: their curves and points must not be averaged into one."""
    from rlbench.bench import analysis
    from rlbench.eval import plan
    from rlbench.eval import plots as eval_plots

    monkeypatch.setattr(plan, "model_eval_defaults", lambda model: {"gold_rewards": ["x-gold"]} if model == "fake" else {})
    monkeypatch.setattr(eval_plots, "_png", lambda fig: fig)
    summary, specs = _fake_suite()
    for s in specs:
        s.train["algorithm"]["name"] = "grpo"
    figs = analysis.plots(summary, specs)
    for name in ("curves.png", "proxy_vs_gold.png"):
        labels = figs[name].axes[0].get_legend_handles_labels()[1]
        assert sorted(labels) == ["a-v1", "b-v1"], (name, labels)
    proxy_line = {ln.get_label(): ln.get_ydata() for ln in figs["curves.png"].axes[0].get_lines() if ln.get_label() in ("a-v1", "b-v1")}
    assert list(proxy_line["a-v1"]) == [0, 2, 3] and list(proxy_line["b-v1"]) == [0, 0, 2]


@pytest.mark.parametrize("suite, n_tables", [("shapes", 12), ("shapes-v2", 24)])
def test_bench_report_regenerates_the_committed_shapes_tables_byte_for_byte(tmp_path, suite, n_tables):
    """`rlbench bench report results/<suite>` rebuilds summary.csv and every derived table from the committed runs
    exactly as committed (the refactors of the sampler, the trainer and the algorithms keep them reproducible;
    v2 adds the intervals, significance, equal-time and ratio-by-step tables)."""
    import shutil

    from rlbench.bench.runner import report

    committed = Path(__file__).resolve().parents[1] / "results" / suite
    copy = tmp_path / suite
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("report.html", "plots", "probes", "dropped",
                                                                   "headroom", "continued-flow"))
    report(copy)
    assert (copy / "summary.csv").read_bytes() == (committed / "summary.csv").read_bytes()
    names = sorted(p.name for p in (committed / "tables").iterdir())
    assert len(names) == n_tables
    for name in names:
        assert (copy / "tables" / name).read_bytes() == (committed / "tables" / name).read_bytes(), name
