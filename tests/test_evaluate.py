"""``rlbench.evaluate``: paired sampling of every checkpoint, scores, KL, diversity, derived tables,
plots and report; the cache (work never done twice, a killed eval resumes); bad input.

Runs are built in seconds with real checkpoints of the shipped shapes model (perturbed weights,
``eval_fixtures.make_eval_run``); evaluations use 2 DDIM steps and a handful of prompts.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from eval_fixtures import make_eval_run
from helpers import GenericTestReward
from rlbench.errors import InputError, RunDirError, UnknownNameError
from rlbench.eval.evaluate import SCORE_COLUMNS, evaluate, rebuild
from rlbench.registry import make_reward
from rlbench.train.rundir import RunDir
from rlbench.utils.images import load_images

SETS = ["shapes-demo", "shapes-heldout-counts"]
SMALL = dict(prompts=SETS, prompts_per_set=2, images_per_prompt=2)  # 8 images per checkpoint
DEFAULT_REWARDS = {"shapes-clip", "shapes-aesthetic", "shapes-gold", "shapes-aesthetic-gold"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("eval-runs")
    a = make_eval_run(root / "clip-s0", reward="shapes-clip", seed=0, epochs=(1, 2), watch=["shapes-gold"])
    b = make_eval_run(root / "aes-s1", reward="shapes-aesthetic", seed=1, epochs=(1, 2), scale=0.01)
    return a, b


@pytest.fixture(scope="module")
def result(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-out")
    return evaluate([r.path for r in runs], out=root / "eval", cache=root / "cache", **SMALL)


class Counter:
    """Counts images through the UNet (per denoising step) while installed."""

    def __init__(self, monkeypatch) -> None:
        from rlbench.diffusion.policy import DiffusionPolicy

        self.images = 0
        original = DiffusionPolicy.guided_eps

        def counting(policy, latents, *args, **kwargs):
            self.images += latents.shape[0]
            return original(policy, latents, *args, **kwargs)

        monkeypatch.setattr(DiffusionPolicy, "guided_eps", counting)


def counting_reward(register_reward, name: str, calls: list[int], deterministic: bool = True) -> str:
    def score(images, prompts, metadata):
        calls.append(len(prompts))
        return images.mean(dim=(1, 2, 3))

    return register_reward(name, GenericTestReward(score, deterministic=deterministic, name=name))


def test_every_output_is_written(result, runs) -> None:
    out = result.out
    scores = pd.read_parquet(out / "scores.parquet")
    assert list(scores.columns) == SCORE_COLUMNS
    pd.testing.assert_frame_equal(scores, result.scores)
    assert set(scores["reward"]) == DEFAULT_REWARDS
    assert set(scores["run"]) == {"clip-s0", "aes-s1"}
    assert sorted(scores["checkpoint"].unique()) == [0, 1, 2]
    assert len(scores) == 2 * 3 * 8 * 4  # runs x checkpoints x images x rewards
    a = scores[scores["run"] == "clip-s0"]
    assert set(a["trained_reward"]) == {"shapes-clip"} and set(a["algorithm"]) == {"ddpo-is"}
    assert dict(a.groupby("checkpoint")["reward_queries"].first()) == {0: 0, 1: 64, 2: 128}
    assert dict(a.groupby("prompt_set")["set_role"].first()) == {"shapes-demo": "train",
                                                                 "shapes-heldout-counts": "held-out"}

    # Paired: the base model's images are the same for both runs (same model, same noise), and served
    # once from the cache; checkpoints differ from the base image by image.
    base = scores[(scores["checkpoint"] == 0) & (scores["reward"] == "shapes-gold")]
    by_run = {r: part.sort_values(["prompt_set", "prompt", "image_index"])["image"].tolist()
              for r, part in base.groupby("run")}
    assert by_run["clip-s0"] == by_run["aes-s1"]
    assert len(set(a["image"])) > len(set(base["image"]))

    # Scores are those of the saved PNGs.
    gold = a[a["reward"] == "shapes-gold"].head(6)
    images = load_images([out / p for p in gold["image"]])
    want = make_reward("shapes-gold")(images, gold["prompt"].tolist()).scores
    np.testing.assert_allclose(gold["score"].to_numpy(), want.numpy(), rtol=1e-6)

    kl = pd.read_parquet(out / "kl.parquet")
    assert len(kl) == 2 * 3 * 8
    assert (kl[kl["checkpoint"] == 0]["kl"] == 0).all()
    assert (kl[kl["checkpoint"] > 0]["kl"] > 0).all()
    means = kl.groupby(["run", "checkpoint"])["kl"].mean()
    assert means[("clip-s0", 2)] > means[("clip-s0", 1)]  # twice the perturbation
    assert kl["on_policy"].all() and set(kl["kl_steps"]) == {2}

    div = pd.read_parquet(out / "diversity.parquet")
    assert len(div) == 2 * 3 * 4 and (div["vendi"] >= 1 - 1e-9).all() and (div["vendi"] <= 2 + 1e-9).all()
    assert set(div["features"]) == {"shapes-clip vision tower"}

    for name in ("summary", "overoptimisation", "proxy_vs_gold", "generalisation", "cross_reward", "kl", "diversity"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"proxy_vs_gold.png", "reward_vs_sqrt_kl.png", "generalisation.png", "diversity.png",
            "reward_curve_shapes-gold.png"} <= plots
    meta = json.loads((out / "meta.json").read_text())
    assert [r["name"] for r in meta["runs"]] == ["clip-s0", "aes-s1"]
    html = (out / "report.html").read_text()
    assert "Over-optimisation" in html and "clip-s0" in html and "data:image/png;base64," in html
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html)  # self-contained


def test_headline_tables(result) -> None:
    over = result.tables["overoptimisation"].data
    assert set(zip(over["run"], over["proxy"], over["gold"])) == {
        ("clip-s0", "shapes-clip", "shapes-gold"), ("clip-s0", "shapes-clip", "shapes-aesthetic-gold"),
        ("aes-s1", "shapes-aesthetic", "shapes-aesthetic-gold"), ("aes-s1", "shapes-aesthetic", "shapes-gold")}
    # The gold the model declares for the proxy comes first.
    assert over[over["run"] == "aes-s1"]["gold"].iloc[0] == "shapes-aesthetic-gold"
    s = result.summary.set_index(["run", "checkpoint", "prompt_set", "reward"])
    row = over[(over["run"] == "clip-s0") & (over["gold"] == "shapes-gold")].iloc[0]
    assert row["proxy_gain"] == pytest.approx(s.loc[("clip-s0", 2, "shapes-demo", "shapes-clip"), "delta"])
    golds = [s.loc[("clip-s0", c, "shapes-demo", "shapes-gold"), "mean"] for c in (0, 1, 2)]
    assert row["gold_best"] == pytest.approx(max(golds)) and row["gold_last"] == pytest.approx(golds[2])
    assert row["drop_best_to_last"] == pytest.approx(max(golds) - golds[2])
    per_ckpt = result.tables["proxy_vs_gold"].display
    assert {"trained on", "shapes-clip", "shapes-gold", "√KL"} <= set(per_ckpt.columns)
    gen = result.tables["generalisation"].display
    assert {"shapes-demo (train)", "shapes-heldout-counts"} <= set(gen.columns)
    cross = result.tables["cross_reward"].display
    assert list(cross.iloc[:, 0]) == ["shapes-clip", "shapes-aesthetic"]


def test_rerun_computes_only_what_is_new(runs, tmp_path, monkeypatch, register_reward) -> None:
    run = runs[0]
    calls: list[int] = []
    calls2: list[int] = []
    nondet: list[int] = []
    counting_reward(register_reward, "count-a", calls)
    counting_reward(register_reward, "count-b", calls2)
    counting_reward(register_reward, "count-random", nondet, deterministic=False)
    unet = Counter(monkeypatch)
    kw = dict(out=tmp_path / "e", overwrite=True, cache=tmp_path / "cache", features="none", **SMALL)
    evaluate([run.path], rewards=["count-a", "count-random"], checkpoints="1", **kw)
    assert unet.images == 8 * 2 + 8 * 2 * 2  # base: 8 images x 2 steps; checkpoint 1: its UNet + the base's (KL)
    assert sum(calls) == 16 and sum(nondet) == 16

    unet.images, calls[:], nondet[:] = 0, [], []
    evaluate([run.path], rewards=["count-a", "count-random"], checkpoints="1,2", **kw)  # one more checkpoint
    assert unet.images == 8 * 2 * 2 and sum(calls) == 8
    assert sum(nondet) == 24  # a nondeterministic reward is never cached

    unet.images, calls[:] = 0, []
    res = evaluate([run.path], rewards=["count-a", "count-b"], checkpoints="1,2", **kw)  # one more reward
    assert unet.images == 0 and sum(calls) == 0 and sum(calls2) == 24
    assert {"count-a", "count-b"} <= set(res.scores["reward"])


def test_a_killed_evaluation_resumes_and_leaves_no_output(runs, tmp_path, monkeypatch) -> None:
    class Killer:
        def __init__(self, after: int) -> None:
            self.left = after

        def task(self, description, total):
            def advance(n=1):
                if description == "sampling" and n:
                    self.left -= 1
                    if self.left < 0:
                        raise KeyboardInterrupt

            return advance

    unet = Counter(monkeypatch)
    kw = dict(out=tmp_path / "e", cache=tmp_path / "cache", features="none", batch_size=4, checkpoints="2", **SMALL)
    with pytest.raises(KeyboardInterrupt):
        evaluate([runs[0].path], progress=Killer(after=2), **kw)  # killed after 3 of 4 batches
    assert not (tmp_path / "e").exists() and [p.name for p in tmp_path.iterdir()] == ["cache"]
    done = unet.images
    assert done == 8 * 2 + 4 * 2 * 2  # the base's two batches, then one of checkpoint 2
    stale = tmp_path / ".e.tmp-killed"  # what a SIGKILL leaves: a half-written output of a dead process
    stale.mkdir()
    (stale / ".pid").write_text("999999999")
    unet.images = 0
    evaluate([runs[0].path], **kw)
    assert unet.images == 4 * 2 * 2  # only the batch that was lost
    assert (tmp_path / "e" / "report.html").is_file() and not (tmp_path / "e" / ".pid").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "e"]


def test_from_rebuilds_tables_plots_and_report(result, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(result.out, copy)
    for name in ("tables", "plots"):
        shutil.rmtree(copy / name)
    (copy / "report.html").unlink()
    rebuilt = rebuild(copy)
    assert (copy / "tables" / "summary.csv").read_text() == (result.out / "tables" / "summary.csv").read_text()
    assert (copy / "tables" / "overoptimisation.md").read_text() == (
        result.out / "tables" / "overoptimisation.md").read_text()
    assert {p.name for p in (copy / "plots").iterdir()} == {p.name for p in (result.out / "plots").iterdir()}
    assert (copy / "report.html").stat().st_size > 10_000
    pd.testing.assert_frame_equal(rebuilt.summary, result.summary)
    with pytest.raises(InputError, match="not an rlbench eval folder"):
        rebuild(tmp_path)


def test_readme_python_api(runs, tmp_path, monkeypatch) -> None:
    import rlbench

    monkeypatch.setenv("RLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    result = rlbench.evaluate([runs[0].path], rewards=["incompressibility"], out=tmp_path / "eval",
                              prompts_per_set=1, images_per_prompt=1, checkpoints="last")
    assert isinstance(result.summary, pd.DataFrame)
    assert {"run", "checkpoint", "prompt_set", "reward", "mean", "stderr", "delta", "delta_se"} <= set(result.summary)
    assert "incompressibility" in set(result.scores["reward"]) and "shapes-clip" in set(result.scores["reward"])
    assert set(result.scores["prompt_set"]) == {"shapes-demo", "shapes-heldout-combos", "shapes-heldout-counts",
                                               "shapes-heldout-relations"}  # the model's held-out sets by default
    assert (tmp_path / "cache" / "eval-cache.sqlite").is_file()


def test_sd_folder_model_with_lora_and_the_deterministic_sampler(tmp_path, one_thread) -> None:
    from rlbench.testing import save_tiny_sd_pipeline

    model = save_tiny_sd_pipeline(tmp_path / "sd", sample_size=8)
    run = make_eval_run(tmp_path / "lora-run", model=str(model), reward="incompressibility", prompts="simple-animals",
                        train_mode="lora", epochs=(3,), scale=2.0)
    notices: list[str] = []
    res = evaluate([run.path], out=tmp_path / "e", cache=False, eta=0.0, prompts_per_set=2, images_per_prompt=2,
                   log=notices.append)
    assert set(res.scores["reward"]) == {"incompressibility"} and set(res.scores["prompt_set"]) == {"simple-animals"}
    kl = res.kl
    assert (kl[kl["checkpoint"] == 3]["kl"] > 0).all() and not kl["on_policy"].any()
    assert "not on-policy" in res.tables["kl"].caption
    # No features declared and no CLIP cached offline: diversity is skipped with a notice that says so.
    assert len(res.diversity) == 0 and any("diversity skipped" in n for n in notices)
    assert "diversity skipped" in (res.out / "report.html").read_text()


def test_bad_input_is_one_error_and_nothing_is_written(runs, tmp_path) -> None:
    out = tmp_path / "e"
    kw = dict(out=out, cache=tmp_path / "cache", **SMALL)

    def fails(exc, match, *args, **extra):
        with pytest.raises(exc, match=match):
            evaluate(*args, **{**kw, **extra})
        assert not out.exists() and not list(tmp_path.glob(".e.*"))

    (tmp_path / "plain").mkdir()
    fails(RunDirError, "not an rlbench run directory", [tmp_path / "plain"])
    empty = RunDir.create(tmp_path / "empty")
    empty.write_config('[reward]\nname = "shapes-clip"\n')
    fails(RunDirError, "has no checkpoints.*--resume", [empty.path])
    fails(UnknownNameError, "Did you mean", [runs[0].path], rewards=["shapes-glod"])
    fails(UnknownNameError, "unknown prompt set", [runs[0].path], prompts=["shapes-heldout-colors"])
    fails(InputError, r"has no checkpoint 7; it has 1, 2", [runs[0].path], checkpoints="7")
    fails(InputError, "at least one run", [])
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="already exists.*--overwrite"):
        evaluate([runs[0].path], **kw)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_cache_of_another_version_is_refused(runs, tmp_path, monkeypatch) -> None:
    import rlbench

    from rlbench.eval.cache import EvalCache

    EvalCache(tmp_path / "cache").close()
    monkeypatch.setattr(rlbench, "__version__", "0.0.1")
    with pytest.raises(InputError, match="written by rlbench .*delete it"):
        evaluate([runs[0].path], out=tmp_path / "e", cache=tmp_path / "cache", **SMALL)
    assert not (tmp_path / "e").exists()


def test_evaluate_policy_for_the_trainer(runs, result) -> None:
    from rlbench.diffusion.policy import load_policy
    from rlbench.eval.evaluate import evaluate_policy

    policy = load_policy("shapes")
    policy.setup_training("full")
    base = {n: t.clone() for n, t in policy.named_trainable_state().items()}
    policy.load_state(runs[0].checkpoint_dir(1))
    state = torch.get_rng_state()
    res = evaluate_policy(policy, ["shapes-heldout-counts"], ["shapes-gold"], seed=0, steps=2, eta=1.0, guidance=5.0,
                          images_per_prompt=2, prompts_per_set=2, base=base, kl_eta=1.0)
    assert torch.equal(state, torch.get_rng_state())
    m = res.metrics()
    assert set(m) == {"eval/shapes-gold/shapes-heldout-counts", "eval/kl/shapes-heldout-counts"}
    assert m["eval/kl/shapes-heldout-counts"] > 0
    # The harness's code: the same prompts, noise and scores as `evaluate` at that checkpoint.
    h = result.scores
    h = h[(h["run"] == "clip-s0") & (h["checkpoint"] == 1) & (h["prompt_set"] == "shapes-heldout-counts")
          & (h["reward"] == "shapes-gold")]
    cols = ["prompt", "image_index", "sample_seed", "score"]
    pd.testing.assert_frame_equal(res.scores[cols].reset_index(drop=True), h[cols].reset_index(drop=True))
    k = result.kl
    k = k[(k["run"] == "clip-s0") & (k["checkpoint"] == 1) & (k["prompt_set"] == "shapes-heldout-counts")]
    np.testing.assert_allclose(res.kl["kl"].to_numpy(), k["kl"].to_numpy(), rtol=1e-4)  # batches differ
