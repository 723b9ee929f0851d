"""``rlbench eval``: long-format scores from logged samples, derived tables and plots."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from helpers import make_run_dir
from rlbench.errors import InputError, RunDirError, UnknownNameError
from rlbench.eval.evaluate import SCORE_COLUMNS, evaluate
from rlbench.utils.images import load_images
from rlbench.registry import make_reward
from rlbench.train.rundir import RunDir

REWARDS = ["incompressibility", "compressibility"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("runs") / "run-a", epochs=(1, 2), num_images=4, size=32)


def expected_scores(run: RunDir, reward: str) -> dict[tuple[int, int], float]:
    """(epoch, seed) -> score of make_reward(reward) on the logged PNG."""
    out = {}
    r = make_reward(reward)
    for epoch in run.sample_epochs():
        records = run.read_sample_records(epoch)
        images = load_images([run.samples_dir(epoch) / rec["file"] for rec in records])
        scores = r(images, [rec["prompt"] for rec in records]).scores
        out.update({(epoch, rec["seed"]): float(s) for rec, s in zip(records, scores)})
    return out


def test_evaluate_writes_scores_tables_and_plots(run_dir, tmp_path) -> None:
    out = tmp_path / "eval"
    result = evaluate([run_dir.path], rewards=REWARDS, out=out, batch_size=3)
    assert result.out == out
    scores = pd.read_parquet(out / "scores.parquet")
    assert list(scores.columns) == SCORE_COLUMNS
    assert len(scores) == 2 * 4 * 2  # epochs x images x rewards
    assert set(scores["run"]) == {"run-a"}
    assert sorted(set(scores["checkpoint"])) == [1, 2]
    assert set(scores["reward"]) == set(REWARDS)
    assert set(scores["prompt_split"]) == {"train", "test"}
    assert set(scores["prompt"]) == {"prompt 0", "prompt 1"}
    pd.testing.assert_frame_equal(scores, result.scores)

    for reward in REWARDS:
        want = expected_scores(run_dir, reward)
        part = scores[scores["reward"] == reward]
        got = {(int(r.checkpoint), int(r.seed)): float(r.score) for r in part.itertuples()}
        assert got == want
    inc = scores[scores["reward"] == "incompressibility"].sort_values(["checkpoint", "seed"])["score"].to_numpy()
    comp = scores[scores["reward"] == "compressibility"].sort_values(["checkpoint", "seed"])["score"].to_numpy()
    assert (inc == -comp).all()
    # The smoother second epoch compresses better: the curve moves.
    by_epoch = scores[scores["reward"] == "incompressibility"].groupby("checkpoint")["score"].mean()
    assert by_epoch[2] < by_epoch[1]

    for ext in ("md", "csv", "tex"):
        assert (out / "tables" / f"summary.{ext}").stat().st_size > 0
    summary = pd.read_csv(out / "tables" / "summary.csv")
    assert list(summary.columns) == ["run", "checkpoint", "prompt_split", "reward", "mean", "stderr", "std", "n"]
    assert len(summary) == 2 * 2 * 2  # checkpoints x splits x rewards
    means = scores.groupby(["checkpoint", "prompt_split", "reward"])["score"].mean()
    for row in summary.itertuples():
        assert row.mean == pytest.approx(means[(row.checkpoint, row.prompt_split, row.reward)], rel=1e-12)
        assert row.n == 2
    md = (out / "tables" / "summary.md").read_text()
    assert md.startswith("| run | checkpoint | prompt_split | reward | mean |")
    assert "\\begin{tabular}" in (out / "tables" / "summary.tex").read_text()
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == [f"reward_curve_{r}.png" for r in sorted(REWARDS)]
    for p in (out / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_rewards_are_the_runs_own(tmp_path) -> None:
    run = make_run_dir(tmp_path / "run-c", reward="compressibility", reward_options={"num_workers": 1},
                       epochs=(5,), num_images=2, size=16)
    result = evaluate([run.path], out=tmp_path / "eval")
    assert set(result.scores["reward"]) == {"compressibility"}
    assert list(result.scores["checkpoint"]) == [5, 5]
    assert (result.scores["score"] < 0).all()


def test_several_runs_in_one_table(run_dir, tmp_path) -> None:
    other = make_run_dir(tmp_path / "run-b", epochs=(1,), num_images=2, size=16, seed=9)
    result = evaluate([run_dir.path, other.path], rewards=["incompressibility"], out=tmp_path / "eval")
    assert result.scores.groupby("run").size().to_dict() == {"run-a": 8, "run-b": 2}


def test_existing_out_is_refused_and_untouched(run_dir, tmp_path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError) as info:
        evaluate([run_dir.path], rewards=["incompressibility"], out=out)
    assert "--overwrite" in str(info.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    result = evaluate([run_dir.path], rewards=["incompressibility"], out=out, overwrite=True)
    assert not (out / "notes.txt").exists()
    assert (result.out / "scores.parquet").is_file()


def test_bad_runs(tmp_path, run_dir) -> None:
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(RunDirError, match="not an rlbench run directory"):
        evaluate([tmp_path / "not-a-run"], out=tmp_path / "e1")
    assert not (tmp_path / "e1").exists()
    empty = RunDir.create(tmp_path / "empty-run")
    empty.write_config("[reward]\nname = \"incompressibility\"\n")
    with pytest.raises(RunDirError, match="no logged samples"):
        evaluate([empty.path], out=tmp_path / "e2")
    with pytest.raises(UnknownNameError, match="Did you mean"):
        evaluate([run_dir.path], rewards=["incompresibility"], out=tmp_path / "e3")
    with pytest.raises(InputError, match="at least one run"):
        evaluate([], out=tmp_path / "e4")


def test_scores_come_from_the_png_files(tmp_path) -> None:
    """Scores are of the images as saved (uint8 PNG), not of anything the run logged."""
    run = make_run_dir(tmp_path / "run", epochs=(1,), num_images=3, size=16)
    result = evaluate([run.path], rewards=["incompressibility"], out=tmp_path / "eval")
    records = run.read_sample_records(1)
    images = load_images([run.samples_dir(1) / r["file"] for r in records])
    want = make_reward("incompressibility")(images, ["x"] * 3).scores
    assert torch.equal(torch.tensor(result.scores["score"].to_numpy(), dtype=torch.float32), want)
    assert all(r["score"] == 0.0 for r in records)  # the logged score was a dummy
