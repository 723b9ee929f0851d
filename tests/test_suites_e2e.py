"""The built-in suites end to end, offline: `rlbench eval RUN --suite geneval,ocr,t2i-compbench` on a tiny Stable
Diffusion run and `rlbench eval --images DIR --suite geneval` on a GenEval sample folder, with the suites' real
prompt files (../shared/data through RLBENCH_DATA_DIR) and the metrics' tiny random weights (rlbench.testing), the
real EasyOCR weights for `ocr`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_fixtures import make_eval_run
from rlbench.eval.evaluate import evaluate
from rlbench.testing import tiny_reward_options

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "geneval" / "evaluation_metadata.jsonl").is_file(),
                                reason="../shared/data is absent")
METRICS = ("geneval", "ocr", "t2i-compbench-blip-vqa", "t2i-compbench-clip")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite-zoo")
    return {m: tiny_reward_options(m, root) for m in METRICS}


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, one_thread):
    from rlbench.testing import save_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("suite-sd")
    model = save_tiny_sd_pipeline(root / "sd", sample_size=8)
    return make_eval_run(root / "inc", model=str(model), reward="incompressibility", prompts="simple-animals",
                         epochs=(1,), scale=1.0)


def test_three_suites_on_a_run(sd_run, zoo, tmp_path, monkeypatch) -> None:
    from rlbench.registry import make_reward
    from rlbench.utils.images import load_images

    monkeypatch.setenv("RLBENCH_DATA_DIR", str(DATA))
    res = evaluate([sd_run.path], out=tmp_path / "e", cache=False, prompts=["simple-animals"], prompts_per_set=2,
                   images_per_prompt=1, suites="geneval,ocr,t2i-compbench", reward_options=zoo, features="none")
    s = res.scores
    by_set = s.groupby("prompt_set")["reward"].unique().to_dict()
    assert set(by_set["geneval"]) == {"geneval"} and set(by_set["flow-grpo-ocr"]) == {"ocr"}
    assert set(by_set["t2i-compbench-color"]) == {"t2i-compbench-blip-vqa"}
    assert set(by_set["t2i-compbench-non-spatial"]) == {"t2i-compbench-clip"}
    assert "t2i-compbench-spatial" not in by_set  # an n/a column is not sampled
    assert set(by_set["simple-animals"]) == {"incompressibility"}
    g = s[s["reward"] == "geneval"]
    assert set(g["score"]) <= {0.0, 1.0}
    o = s[s["reward"] == "ocr"]
    assert ((o["score"] >= 0) & (o["score"] <= 1)).all()
    # A score in the table is the metric applied to the saved image with the suite's metadata.
    row = g.iloc[0]
    from rlbench.prompts import load_prompts

    ps = load_prompts("geneval")
    meta = ps.metadata[ps.prompts.index(row["prompt"])]
    again = make_reward("geneval", **zoo["geneval"])(load_images([res.out / row["image"]]), [row["prompt"]], [meta])
    assert float(again.scores[0]) == row["score"]
    tables = res.tables
    assert list(tables["suite_geneval"].display.columns) == ["run", "checkpoint", "Overall", "Single object",
                                                             "Two object", "Counting", "Colors", "Position",
                                                             "Attribute binding"]
    t2i = tables["suite_t2i_compbench"].display
    assert list(t2i["2D-Spatial"]) == ["n/a", "n/a"] and t2i["Color"].iloc[0] not in ("n/a", "–")
    assert "ocr" in tables["suite_ocr"].caption.lower() and "EasyOCR" in tables["suite_ocr"].caption
    # two prompts of each set, one image each: the captions say this is not the paper's protocol
    assert all("NOT the paper's protocol" in tables[n].caption for n in ("suite_geneval", "suite_ocr"))
    meta_json = json.loads((res.out / "meta.json").read_text())
    assert [x["id"] for x in meta_json["suites"]] == ["geneval-v1", "ocr-v1", "t2i-compbench-v1"]


def test_cli_images_in_geneval_layout_and_spacy_checked_first(sd_run, zoo, tmp_path, monkeypatch, runner) -> None:
    from PIL import Image

    from rlbench.cli import app
    from rlbench.prompts import load_prompts

    monkeypatch.setenv("RLBENCH_DATA_DIR", str(DATA))
    ps = load_prompts("geneval")
    for j in range(3):
        folder = tmp_path / "samples" / f"{j:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps({**ps.metadata[j * 100], "prompt": ps.prompts[j * 100]}))
        for k in range(2):
            Image.new("RGB", (64 + 32 * k, 64), (30 * j, 200, 40 * k)).save(folder / "samples" / f"{k:04d}.png")
    opts = [x for key, v in zoo["geneval"].items() for x in ("--reward-opt", f"geneval.{key}={v}")]
    res = runner.invoke(app, ["eval", "--images", str(tmp_path / "samples"), "--suite", "geneval", *opts,
                              "--no-cache", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert "| run | checkpoint | Overall |" in res.output and "| external | external |" in res.output
    # BLIP-VQA's noun phrases need spaCy (not installable offline here): one line before anything samples.
    import importlib.util

    if importlib.util.find_spec("spacy") is None:
        w = zoo["t2i-compbench-blip-vqa"]["weights"]
        res = runner.invoke(app, ["eval", str(sd_run.path), "--suite", "t2i-compbench", "--reward-opt",
                                  f"t2i-compbench-blip-vqa.weights={w}", "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and "spacy" in res.output.lower() and "Traceback" not in res.output
        assert not (tmp_path / "x").exists()


def test_cli_eval_with_all_three_suites_offline(sd_run, zoo, tmp_path, monkeypatch, runner) -> None:
    from rlbench.cli import app

    monkeypatch.setenv("RLBENCH_DATA_DIR", str(DATA))
    opts = []
    for metric, options in zoo.items():
        for key, value in options.items():
            if callable(value):  # the chunker goes by its import path on a command line
                value = f"{value.__module__}:{value.__qualname__}"
            opts += ["--reward-opt", f"{metric}.{key}={value}"]
    res = runner.invoke(app, ["eval", str(sd_run.path), "--suite", "geneval,ocr,t2i-compbench", *opts,
                              "--prompts", "simple-animals", "--prompts-per-set", "1", "--images-per-prompt", "1",
                              "--features", "none", "--no-cache", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    for title in ("GenEval", "OCR accuracy", "T2I-CompBench++"):
        assert title in res.output
    assert (tmp_path / "e" / "tables" / "suite_t2i_compbench.tex").is_file()
    scores = __import__("pandas").read_parquet(tmp_path / "e" / "scores.parquet")
    assert {"geneval", "ocr", "t2i-compbench-blip-vqa", "t2i-compbench-clip"} <= set(scores["reward"])


def test_a_noun_chunker_by_import_path_and_a_bad_one(zoo) -> None:
    from rlbench.errors import ConfigError
    from rlbench.registry import make_reward
    from rlbench.testing import tiny_noun_chunker

    weights = zoo["t2i-compbench-blip-vqa"]["weights"]
    r = make_reward("t2i-compbench-blip-vqa", weights=weights, noun_chunker="rlbench.testing:tiny_noun_chunker")
    assert r.reward.noun_chunker is tiny_noun_chunker
    with pytest.raises(ConfigError, match="cannot be imported"):
        make_reward("t2i-compbench-blip-vqa", weights=weights, noun_chunker="rlbench.testing:no_such_chunker")


def test_suite_weights_missing_offline_fail_before_sampling(sd_run, tmp_path, monkeypatch, runner) -> None:
    from rlbench.cli import app
    from rlbench.diffusion.policy import DiffusionPolicy

    monkeypatch.setenv("RLBENCH_DATA_DIR", str(DATA))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached
    sampled: list[int] = []
    monkeypatch.setattr(DiffusionPolicy, "guided_eps", lambda *a, **k: sampled.append(1))
    res = runner.invoke(app, ["eval", str(sd_run.path), "--suite", "geneval", "--no-cache", "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "rlbench rewards download geneval" in res.output and "detector" in res.output
    assert not sampled and not (tmp_path / "e").exists()
    # the suite's prompt data missing offline: one line naming the download command, before the weights
    monkeypatch.setenv("RLBENCH_DATA_DIR", "")
    res = runner.invoke(app, ["eval", str(sd_run.path), "--suite", "ocr", "--no-cache", "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "rlbench prompts download flow-grpo-ocr" in res.output
    assert not sampled and not (tmp_path / "e").exists()
