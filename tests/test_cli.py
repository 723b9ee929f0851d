"""The ``rlbench`` command line: every command, and one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from helpers import GenericTestReward, make_run_dir, ok, random_images, run_cli, user_error, write_png
from rlbench.cli import app
from rlbench.config import TrainConfig
from rlbench.utils.images import load_images, to_uint8
from rlbench.registry import ALGORITHMS, MODELS, PROMPTS, REWARDS
from rlbench.registry import make_reward

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def rows(text: str) -> dict[str, str]:
    return {line.split()[0]: line for line in text.splitlines() if line.split()}


@pytest.fixture
def pngs(tmp_path):
    images = random_images(2, 24, seed=21)
    paths = [write_png(tmp_path / f"{n}.png", to_uint8(img)) for n, img in zip("ab", images)]
    return paths


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("cli-runs") / "run-a", epochs=(1, 2), num_images=2, size=16)


# -- rewards ----------------------------------------------------------------------------------------


def test_rewards_list(runner) -> None:
    out = ok(runner.invoke(app, ["rewards", "list"]))
    table = rows(out)
    assert table["name"].split()[:6] == ["name", "version", "better", "weights", "origin", "summary"]
    for name in REWARDS.names():
        assert name in table
    assert "rlbench==0.1.0" in table["incompressibility"]
    assert "higher" in table["incompressibility"]
    assert "DDPO's incompressibility" in table["incompressibility"]


def test_rewards_info(runner) -> None:
    out = ok(runner.invoke(app, ["rewards", "info", "compressibility"]))
    info = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines() if line.strip()}
    assert info["name"] == "compressibility"
    assert info["version"] == "1"
    assert info["higher_is_better"] == "True"
    assert info["deterministic"] == "True"
    assert info["origin"] == "rlbench==0.1.0"
    assert info["target"] == "rlbench.rewards.jpeg:Compressibility"
    assert "2305.13301" in info["paper"]
    assert info["weights"] == "none" and info["extra"] == "-"


def test_rewards_score(runner, pngs) -> None:
    out = ok(runner.invoke(app, ["rewards", "score", "incompressibility", "--prompt", "x", *map(str, pngs)]))
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in pngs]
    want = make_reward("incompressibility")(load_images(pngs), ["x", "x"]).scores.tolist()
    assert [float(line.split("\t")[1]) for line in lines] == pytest.approx(want, abs=1e-6)


def test_rewards_score_in_small_batches_with_options(runner, pngs) -> None:
    args = ["rewards", "score", "compressibility", *map(str, pngs), "--batch-size", "1", "--opt", "num_workers=1"]
    out = ok(runner.invoke(app, args))
    want = make_reward("compressibility")(load_images(pngs), ["", ""]).scores.tolist()
    assert [float(line.split("\t")[1]) for line in out.strip().splitlines()] == pytest.approx(want, abs=1e-6)


def test_rewards_check(runner, register_reward) -> None:
    assert "reward 'incompressibility' passes check_reward" in ok(
        runner.invoke(app, ["rewards", "check", "incompressibility", "--image-size", "16"]))
    register_reward("nan-reward", GenericTestReward(lambda im, p, m: im.mean(dim=(1, 2, 3)) * float("nan")))
    user_error(runner.invoke(app, ["rewards", "check", "nan-reward"]), "reward 'nan-reward' returned non-finite")


# -- other registries -------------------------------------------------------------------------------


@pytest.mark.parametrize("command, registry", [("algos", ALGORITHMS), ("models", MODELS), ("prompts", PROMPTS)])
def test_registry_lists(runner, command, registry) -> None:
    out = ok(runner.invoke(app, [command, "list"]))
    if not registry.names():
        assert f"no {registry.kind}s registered" in out
        return
    table = rows(out)
    for entry in registry.entries():
        assert entry.name in table, out
        assert entry.origin in table[entry.name]
        assert "BROKEN" not in table[entry.name]


def test_prompts_show(runner, tmp_path) -> None:
    out = ok(runner.invoke(app, ["prompts", "show", "simple-animals"]))
    lines = out.strip().splitlines()
    assert len(lines) == 45 and len(set(lines)) == 45
    assert "cat" in lines
    f = tmp_path / "mine.txt"
    f.write_text("# comment\na red circle\n\n  two blue squares  \n")
    assert ok(runner.invoke(app, ["prompts", "show", str(f)])).splitlines() == ["a red circle", "two blue squares"]
    user_error(runner.invoke(app, ["prompts", "show", "simple-animal"]), "Did you mean: 'simple-animals'",
               "text file")


# -- config -----------------------------------------------------------------------------------------


def test_config_prints_annotated_defaults(runner) -> None:
    out = ok(runner.invoke(app, ["config"]))
    assert tomllib.loads(out) == TrainConfig().to_dict()
    assert "# Training epochs" in out


def test_config_resolves_set_and_file(runner, tmp_path) -> None:
    out = ok(runner.invoke(app, ["config", "--set", "sample.batch_size=16", "--set", "reward.num_workers=2"]))
    data = tomllib.loads(out)
    assert data["sample"]["batch_size"] == 16
    assert data["reward"] == {"name": "shapes-clip", "num_workers": 2}  # the shapes model's preset reward
    f = tmp_path / "c.toml"
    f.write_text("[run]\nepochs = 3\n")
    data = tomllib.loads(ok(runner.invoke(app, ["config", "--config", str(f), "--set", "run.seed=5"])))
    assert (data["run"]["epochs"], data["run"]["seed"]) == (3, 5)


# -- eval -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """A shapes run with one real checkpoint (perturbed weights), built without training."""
    from eval_fixtures import make_eval_run

    return make_eval_run(tmp_path_factory.mktemp("cli-eval") / "run-e", epochs=(1,))


EVAL_SMALL = ["--prompts", "shapes-demo", "--prompts-per-set", "2", "--images-per-prompt", "1"]


def test_eval(runner, eval_run, tmp_path) -> None:
    out_dir = tmp_path / "eval"
    cache = ["--cache", str(tmp_path / "cache")]
    out = ok(runner.invoke(app, ["eval", str(eval_run.path), "--rewards", "incompressibility", "--out", str(out_dir),
                                 *EVAL_SMALL, *cache]))
    assert "Over-optimisation: proxy against gold" in out and "| run | trained on (proxy) |" in out
    assert f"report:  {out_dir / 'report.html'}" in out
    scores = pd.read_parquet(out_dir / "scores.parquet")
    assert len(scores) == 2 * 2 * 5  # checkpoints (base, 1) x images x rewards (4 default + incompressibility)
    assert (out_dir / "tables" / "summary.md").is_file()
    assert (out_dir / "plots" / "reward_curve_incompressibility.png").is_file()
    (out_dir / "report.html").unlink()
    out = ok(runner.invoke(app, ["eval", "--from", str(out_dir)]))
    assert (out_dir / "report.html").is_file() and "Over-optimisation" in out


# -- bad inputs: exit 2, one line, no traceback -------------------------------------------------------


def test_unknown_reward_name(runner, pngs) -> None:
    for args in (["rewards", "score", "incompresibility", str(pngs[0])], ["rewards", "info", "incompresibility"],
                 ["rewards", "check", "incompresibility"]):
        user_error(runner.invoke(app, args), "unknown reward 'incompresibility'", "Did you mean: 'incompressibility'",
                   "Available:")


def test_missing_image(runner, pngs, tmp_path) -> None:
    missing = tmp_path / "nope.png"
    user_error(runner.invoke(app, ["rewards", "score", "incompressibility", str(pngs[0]), str(missing)]),
               str(missing), "does not exist")


def test_unreadable_image(runner, tmp_path) -> None:
    fake = tmp_path / "text.png"
    fake.write_text("this is not an image")
    user_error(runner.invoke(app, ["rewards", "score", "incompressibility", str(fake)]), "cannot read image",
               str(fake))


def test_images_of_different_sizes_are_scored_in_one_call(runner, tmp_path) -> None:
    a = write_png(tmp_path / "a.png", to_uint8(random_images(1, 8, seed=1)[0]))
    b = write_png(tmp_path / "b.png", np.zeros((9, 8, 3)))
    out = ok(runner.invoke(app, ["rewards", "score", "incompressibility", str(a), str(b)]))
    want = [make_reward("incompressibility")(load_images([p]), [""]).scores.item() for p in (a, b)]
    assert out.splitlines() == [f"{a}\t{want[0]:.6f}", f"{b}\t{want[1]:.6f}"] and want[0] != want[1]


def test_bad_reward_option(runner, pngs) -> None:
    user_error(runner.invoke(app, ["rewards", "score", "incompressibility", str(pngs[0]), "--opt", "bogus=1"]),
               "has no option 'bogus'")
    user_error(runner.invoke(app, ["rewards", "score", "incompressibility", str(pngs[0]), "--opt", "bogus"]),
               "--opt expects KEY=VALUE")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "sample.batch_size"], ["--set expects SECTION.KEY=VALUE"]),
        (["--set", "sample.batch_sise=8"], ["unknown key 'sample.batch_sise'", "Did you mean 'sample.batch_size'?"]),
        (["--set", "sampel.batch_size=8"], ["unknown section [sampel]", "Did you mean 'sample'?"]),
        (["--set", "sample.batch_size=many"], ["sample.batch_size must be an integer, got 'many'"]),
        (["--set", "model.train_mode=half"], ["is not one of 'lora', 'full'"]),
        (["--config", "/nonexistent/cfg.toml"], ["does not exist"]),
    ],
)
def test_config_bad_inputs(runner, args, fragments) -> None:
    user_error(runner.invoke(app, ["config", *args]), *fragments)


def test_eval_bad_inputs(runner, run_dir, eval_run, tmp_path) -> None:
    (tmp_path / "plain").mkdir()
    user_error(runner.invoke(app, ["eval", str(tmp_path / "plain"), "--out", str(tmp_path / "e")]),
               "not an rlbench run directory")
    user_error(runner.invoke(app, ["eval", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]),
               "does not exist")
    user_error(runner.invoke(app, ["eval", str(run_dir.path), "--out", str(tmp_path / "e")]),  # logged samples only
               "has no checkpoints")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    user_error(runner.invoke(app, ["eval", str(eval_run.path), "--out", str(out)]), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    user_error(runner.invoke(app, ["eval", str(eval_run.path), "--rewards", "incompresibility",
                                   "--out", str(tmp_path / "e2")]), "Did you mean: 'incompressibility'")
    user_error(runner.invoke(app, ["eval", str(eval_run.path), "--prompts", "shapes-held", "--out", str(tmp_path / "e2")]),
               "unknown prompt set 'shapes-held'")
    user_error(runner.invoke(app, ["eval", str(eval_run.path), "--checkpoints", "3", "--out", str(tmp_path / "e2")]),
               "has no checkpoint 3; it has 1")
    user_error(runner.invoke(app, ["eval"]), "give at least one run directory")
    user_error(runner.invoke(app, ["eval", "--from", str(tmp_path)]), "not an rlbench eval folder")
    assert not (tmp_path / "e").exists() and not (tmp_path / "e2").exists()


def test_eval_overwrite(runner, eval_run, tmp_path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    ok(runner.invoke(app, ["eval", str(eval_run.path), "--out", str(out), "--overwrite", "--no-cache", *EVAL_SMALL,
                           "--checkpoints", "last", "--features", "none"]))
    assert not (out / "keep.txt").exists()
    assert set(pd.read_parquet(out / "scores.parquet")["reward"]) == {
        "shapes-clip", "shapes-aesthetic", "shapes-gold", "shapes-aesthetic-gold"}  # the run's and its model's


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "sample.batch_sise=8"], ["unknown key 'sample.batch_sise'", "Did you mean 'sample.batch_size'?"]),
        (["--set", "sample.batch_size=6", "--set", "train.batch_size=4"],
         ["sample.batch_size (6) must be a multiple of train.batch_size (4)"]),
        (["--config", "/nonexistent/cfg.toml"], ["config file", "does not exist"]),
        (["--epochs", "0"], ["run.epochs must be > 0"]),
        (["--reward-opt", "weights"], ["--reward-opt expects KEY=VALUE"]),
    ],
)
def test_train_rejects_bad_config_before_loading_anything(runner, args, fragments) -> None:
    user_error(runner.invoke(app, ["train", *args]), *fragments)


def test_train_rejects_invalid_toml(runner, tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nepochs = 3\n")
    user_error(runner.invoke(app, ["train", "--config", str(bad)]), "is not valid TOML", str(bad))


# -- as real subprocesses -------------------------------------------------------------------------------


def test_subprocess_score_two_images(pngs) -> None:
    out = run_cli(["rewards", "score", "incompressibility", "--prompt", "x", *pngs])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    want = make_reward("incompressibility")(load_images(pngs), ["x", "x"]).scores.tolist()
    for line, path, score in zip(lines, pngs, want):
        got_path, got_score = line.split("\t")
        assert got_path == str(path)
        assert got_score == f"{score:.6f}"


def test_subprocess_bad_name_has_no_traceback(pngs) -> None:
    out = run_cli(["rewards", "score", "incompresibility", "--prompt", "x", pngs[0]])
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("error: unknown reward 'incompresibility'.")
    assert "Did you mean: 'incompressibility'" in out.stderr
