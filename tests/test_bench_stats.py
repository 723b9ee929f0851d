"""Statistics of a suite with three or more seeds per spec (rlbench.bench.stats): the t distribution against the
printed tables and SciPy, t intervals and Welch tests by hand, the best-on-gold marker, the comparison at equal
wall time, the importance ratio per denoising step, and the hook into the suite report (none of it for a
two-seed suite; a partially finished suite reports)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from rlbench.bench import analysis, stats

V1_TABLES = {"efficiency", "overoptimisation", "transfer", "comparison"}
STATS_TABLES = {"intervals", "significance", "equal_time", "ratio_by_step"}

# Per spec (algorithm, model): the trained reward p's gain and the gold's change at the last checkpoint, per seed.
# a and c overlap; b is far from both.
GAINS = {"a": [1.0, 2.0, 3.0], "b": [10.0, 11.0, 12.0], "c": [1.5, 2.5, 3.5]}
GOLD = {"a": [0.5, 0.6, 0.7], "b": [-1.0, -1.1, -0.9], "c": [0.4, 0.6, 0.8]}
MODELS = {"a": "fake-ddim", "b": "fake-flow", "c": "fake-ddim", "d": "fake-ddim"}
# Per-epoch training seconds: a's runs take 100 s, b's 200 s, c's 120 s.
EPOCH_SECONDS = {"a": [10.0] * 10, "b": [20.0] * 10, "c": [10.0] * 12}


@pytest.fixture(autouse=True)
def fake_models(monkeypatch):
    """Models "fake-ddim" / "fake-flow" declare x-gold as the gold of p; their family is in their name."""
    from rlbench.diffusion import sampler
    from rlbench.eval import plan

    monkeypatch.setattr(plan, "model_eval_defaults",
                        lambda model: {"gold_rewards": ["x-gold"], "gold_of": {"x-gold": ["p"]}})
    monkeypatch.setattr(sampler, "model_family", lambda name: "flow" if "flow" in name else "ddim")


def _spec(algo: str, seeds: list[int]) -> SimpleNamespace:
    return SimpleNamespace(id=f"p-{algo}-v2", name=f"p-{algo}", suite="s", seeds=seeds, reward="p", sha256="0" * 64,
                           train={"algorithm": {"name": algo}, "model": {"name": MODELS[algo]},
                                  "prompts": {"name": "tr"}})


def _summary(algos: str, seeds: list[int]) -> pd.DataFrame:
    """summary.csv rows: checkpoints 0 and 2 on the training set, the held-out set too."""
    rows = []
    for a in algos:
        for i, seed in enumerate(seeds):
            for c, q in ((0, 0), (2, 128)):
                base = dict(spec=f"p-{a}-v2", seed=seed, run="train", checkpoint=c, reward_queries=q)
                for reward, value in (("p", GAINS[a][i]), ("x-gold", GOLD[a][i])):
                    d = value if c else 0.0
                    rows.append({**base, "prompt_set": "tr", "set_role": "train", "reward": reward,
                                 "mean": 1.0 + d, "delta": d})
                    rows.append({**base, "prompt_set": "ho", "set_role": "held-out", "reward": reward,
                                 "mean": 1.0 + 7 * d, "delta": 7 * d})  # held out: never in these tables
    return pd.DataFrame(rows)


def _metrics(root: Path, algo: str, seed: int, ratios: list | None = None) -> None:
    """metrics.jsonl: reward_mean = seed + e (1 + 0.1 seed), the watched gold -0.1 e; epoch e's ratios[e]."""
    folder = root / "runs" / f"p-{algo}-v2" / f"seed-{seed}" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for e, sec in enumerate(EPOCH_SECONDS[algo]):
        row = {"epoch": e, "seconds": sec, "reward_mean": seed + e * (1 + 0.1 * seed), "watch_mean/x-gold": -0.1 * e}
        if ratios is not None and e < len(ratios):
            row["ratio_by_step"] = ratios[e]
        lines.append(json.dumps(row))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def suite(tmp_path):
    """A 3-seed suite of a, b, c: metrics for every run but b's seed 2; a logs ratios with nulls."""
    seeds = [0, 1, 2]
    specs = [_spec(a, seeds) for a in "abc"]
    ratios = [[1.0, None, 0.9], [1.2, None, None]]
    for a in "abc":
        for seed in seeds:
            if (a, seed) != ("b", 2):
                _metrics(tmp_path, a, seed, ratios if a == "a" else None)
    return tmp_path, _summary("abc", seeds), specs


# -- the t distribution --------------------------------------------------------------------------------------

@pytest.mark.parametrize("df,t975", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantiles_match_the_printed_tables(df, t975):
    assert stats.t_quantile(0.975, df) == pytest.approx(t975, abs=5e-4)


def test_t_p_values_match_closed_forms_and_scipy():
    # df = 1 (Cauchy): p = 1 - 2 atan|t| / pi; df = 2: p = 1 - |t| / sqrt(2 + t^2).
    for t in (0.1, 1.0, 3.0, 40.0):
        assert stats.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
        assert stats.t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    sp = pytest.importorskip("scipy.stats")
    for t, df in ((0.6124, 4.0), (2.5, 3.7), (7.0, 2.2), (1.3, 25.0), (0.01, 1.5)):
        assert stats.t_two_sided_p(t, df) == pytest.approx(2 * sp.t.sf(t, df), rel=1e-9)
    assert stats.t_quantile(0.975, 3.3) == pytest.approx(sp.t.ppf(0.975, 3.3), rel=1e-9)


def test_t_interval_and_welch_by_hand():
    m, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 / math.sqrt(3), rel=1e-4) and m - lo == pytest.approx(hi - m)
    assert stats.t_interval([5.0])[0] == 5.0 and math.isnan(stats.t_interval([5.0])[1])
    # Two seeds each with sd sqrt 2: se = sqrt(2), Welch df = 2, t = -1/sqrt 2 -> p = 1 - |t| / sqrt(2 + t^2).
    diff, df, p = stats.welch([0.0, 2.0], [1.0, 3.0])
    t = -1 / math.sqrt(2)
    assert diff == -1.0 and df == pytest.approx(2.0) and p == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))
    sp = pytest.importorskip("scipy.stats")
    a, b = [0.1, 0.4, 0.35, 0.2], [0.9, 0.5, 1.4]
    assert stats.welch(a, b)[2] == pytest.approx(sp.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)


# -- tables --------------------------------------------------------------------------------------------------

def test_intervals_give_the_t_interval_family_and_best_on_gold(suite):
    _, summary, specs = suite
    table = stats.intervals(summary, specs)
    data = table.data.set_index("spec")
    assert data.loc["p-a-v2", "proxy_gain"] == pytest.approx(2.0)
    assert data.loc["p-a-v2", "proxy_gain:hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert data.loc["p-b-v2", "x-gold:change"] == pytest.approx(-1.0)
    assert list(data["family"]) == ["ddim", "flow", "ddim"] and list(data["seeds"]) == [3, 3, 3]
    # a has the highest mean gold change; c overlaps it (Welch p >= 0.05); b is clearly worse.
    assert dict(data["best"]) == {"p-a-v2": "best", "p-b-v2": "", "p-c-v2": "≈ best"}
    shown = table.display.set_index("spec")
    half = 4.303 / math.sqrt(3)
    assert shown.loc["p-a-v2", "trained-reward gain"] == f"+2 [{2 - half:+.3g}, {2 + half:+.3g}]"
    assert shown.loc["p-c-v2", "best on gold"] == "≈ best"
    assert "t interval over seeds" in table.caption and "n = seeds = 3" in table.caption


def test_significance_marks_the_separated_pair_only(suite):
    _, summary, specs = suite
    table = stats.significance(summary, specs)
    data = table.data.set_index(["spec_a", "spec_b"])
    assert list(data.index) == [("p-a-v2", "p-b-v2"), ("p-a-v2", "p-c-v2"), ("p-b-v2", "p-c-v2")]
    assert data.loc[("p-a-v2", "p-b-v2"), "proxy_gain:diff"] == pytest.approx(-9.0)
    assert data.loc[("p-a-v2", "p-b-v2"), "proxy_gain:p"] < 1e-3
    # a vs c: equal sds of 1, difference -0.5: t = -0.5 / sqrt(2/3), Welch df = 4.
    p = data.loc[("p-a-v2", "p-c-v2"), "proxy_gain:p"]
    assert data.loc[("p-a-v2", "p-c-v2"), "proxy_gain:df"] == pytest.approx(4.0)
    assert p == pytest.approx(stats.t_two_sided_p(0.5 / math.sqrt(2 / 3), 4)) and p > 0.5
    shown = table.display.set_index(["spec A", "spec B"])
    assert shown.loc[("p-a-v2", "p-b-v2"), "Δ trained-reward gain"] == "-9*"
    assert shown.loc[("p-a-v2", "p-c-v2"), "Δ trained-reward gain"] == "-0.5"
    assert shown.loc[("p-a-v2", "p-b-v2"), "Δ x-gold change"].endswith("*")
    assert "p-value" not in " ".join(table.display.columns)  # p-values only in the CSV


def test_equal_time_averages_the_epochs_ending_in_the_window(suite):
    root, summary, specs = suite
    metrics = stats.read_metrics(root, summary)
    table = stats.equal_time(metrics, specs, ["x-gold"])
    data = table.data.set_index("spec")
    # T = min(median 100 s, 200 s, 120 s) = 100 s; the window (80, 100] s.
    assert set(data["seconds"]) == {100.0} and "T = 100 s for p" in table.caption
    # a: epochs 8, 9 end at 90 and 100 s: mean of e (1 + 0.1 seed) = 8.5 (1 + 0.1 seed), over seeds 8.5 * 1.1.
    assert data.loc["p-a-v2", "proxy_change"] == pytest.approx(8.5 * 1.1)
    assert data.loc["p-a-v2", "x-gold:change"] == pytest.approx(-0.85)
    # b: only epoch 4 ends in the window (100 s; epoch 3's 80 s is outside); seed 2 has no metrics.jsonl.
    assert data.loc["p-b-v2", "runs"] == 2 and data.loc["p-b-v2", "epochs"] == 1
    assert data.loc["p-b-v2", "proxy_change"] == pytest.approx(np.mean([4 * 1.0, 4 * 1.1]))
    # c: epochs 8, 9 (90, 100 s) again.
    assert data.loc["p-c-v2", "x-gold:change"] == pytest.approx(-0.85)
    shown = table.display.set_index("spec")
    assert shown.loc["p-b-v2", "epochs in window"] == "1, 1"
    assert shown.loc["p-a-v2", "trained-reward change"].startswith("+9.35 ± ")


def _machines(root: Path, algo: str, seed: int, attempts: list[tuple[float | None, float]]) -> None:
    """state.json with one machine record per training attempt: (seconds per image-step, training seconds)."""
    machines = [{"node": "vm", "device": "cpu", "speed_model": "shapes", "seconds_per_image_step": v,
                 "train_seconds": t} for v, t in attempts]
    (root / "runs" / f"p-{algo}-v2" / f"seed-{seed}" / "state.json").write_text(
        json.dumps({"status": "done", "machines": machines}))


def test_machine_speed_weights_attempts_by_training_time_and_refuses_a_gap(tmp_path):
    for seed, attempts in enumerate([[(1.0, 30.0), (3.0, 10.0)], [(2.0, 5.0), (None, 5.0)], []]):
        (tmp_path / "runs" / "p-a-v2" / f"seed-{seed}").mkdir(parents=True)
        _machines(tmp_path, "a", seed, attempts)
    state = tmp_path / "runs" / "p-a-v2"
    assert stats.machine_speed(state / "seed-0" / "state.json") == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert math.isnan(stats.machine_speed(state / "seed-1" / "state.json"))  # an attempt was not timed
    assert math.isnan(stats.machine_speed(state / "seed-2" / "state.json"))  # made before the record existed
    assert math.isnan(stats.machine_speed(state / "seed-9" / "state.json"))  # no file


def test_equal_time_puts_runs_from_a_slower_machine_on_one_clock(suite):
    """b's runs ran on a machine twice as slow as a's and c's: its 20 s epochs are 10 s on the common clock."""
    root, summary, specs = suite
    raw = stats.equal_time(stats.read_metrics(root, summary), specs, ["x-gold"])
    assert "No run recorded its machine's speed" in raw.caption and "Times are on one clock" not in raw.caption
    for a in "abc":
        for seed in (0, 1, 2):
            if (a, seed) != ("b", 2):  # no folder: that run has no metrics
                _machines(root, a, seed, [(2.0e-3 if a == "b" else 1.0e-3, 100.0)])
    table = stats.equal_time(stats.read_metrics(root, summary), specs, ["x-gold"])
    data = table.data.set_index("spec")
    # The median machine is a's and c's (6 of the 8 runs with logs): a and c keep their times, T is still 100 s.
    assert set(data["seconds"]) == {100.0} and "Times are on one clock" in table.caption and "1.00 ms" in table.caption
    assert data.loc["p-b-v2", "machine_seconds_per_image_step"] == pytest.approx(2.0e-3)
    # b: epochs 8, 9 now end in the window, as a's do (before: only epoch 4).
    assert data.loc["p-b-v2", "epochs"] == 2
    assert data.loc["p-b-v2", "proxy_change"] == pytest.approx(np.mean([8.5 * 1.0, 8.5 * 1.1]))
    assert data.loc["p-a-v2", "proxy_change"] == pytest.approx(8.5 * 1.1)
    # One run without a record: no run is rescaled (a half-normalised clock compares nothing), and it says so.
    _machines(root, "c", 1, [])
    partial = stats.equal_time(stats.read_metrics(root, summary), specs, ["x-gold"])
    assert partial.data.set_index("spec").loc["p-b-v2", "epochs"] == 1
    assert "1 of the 8 runs recorded no machine speed" in partial.caption
    assert "machine_seconds_per_image_step" not in partial.data


def test_ratio_by_step_averages_ignoring_nulls(suite):
    root, summary, specs = suite
    metrics = stats.read_metrics(root, summary)
    table = stats.ratio_by_step(metrics, specs)
    data = table.data
    assert set(data["spec"]) == {"p-a-v2"}  # b and c logged no ratios
    steps = data.set_index("step")
    # Every seed of a logged [1.0, null, 0.9] then [1.2, null, null].
    assert steps.loc[0, "ratio"] == pytest.approx(1.1) and steps.loc[0, "n"] == 6
    assert steps.loc[2, "ratio_minus_1"] == pytest.approx(-0.1) and steps.loc[2, "n"] == 3
    assert steps.loc[1, "n"] == 0 and math.isnan(steps.loc[1, "ratio"])
    shown = table.display.iloc[0]
    assert shown["step 0"] == "+1.00e-01" and shown["step 1"] == "–" and shown["step 2"] == "-1.00e-01"
    assert stats.ratio_by_step(metrics.drop(columns="ratio_by_step"), specs) is None


# -- the suite report ----------------------------------------------------------------------------------------

def _tables_on_disk(root: Path) -> set[str]:
    return {p.stem for p in (root / "tables").glob("*.csv")}


def test_a_three_seed_suite_gets_the_statistics_tables_and_plots(suite):
    root, summary, specs = suite
    tables = analysis.write(root, summary, specs)
    assert list(tables) == [*analysis.all_tables(summary, specs), "intervals", "significance", "equal_time",
                            "ratio_by_step"]
    assert _tables_on_disk(root) == V1_TABLES | STATS_TABLES
    for name in ("gain_vs_gold.png", "ratio_by_step.png"):
        assert (root / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    html = (root / "report.html").read_text()
    assert "Confidence intervals over seeds" in html and "Importance ratio per denoising step" in html
    assert 'alt="gain vs gold"' in html
    # Deterministic: the same folder gives the same bytes.
    first = {p.name: p.read_bytes() for p in sorted((root / "tables").iterdir())}
    analysis.write(root, summary, specs)
    assert first == {p.name: p.read_bytes() for p in sorted((root / "tables").iterdir())}


def test_a_two_seed_suite_gets_none_of_the_statistics(tmp_path):
    specs = [_spec(a, [0, 1]) for a in "ab"]
    for a in "ab":
        for seed in (0, 1):
            _metrics(tmp_path, a, seed, [[1.0]])
    summary = _summary("ab", [0, 1])
    assert not stats.applies(summary, specs)
    tables = analysis.write(tmp_path, summary, specs)
    assert set(tables) == V1_TABLES and _tables_on_disk(tmp_path) == V1_TABLES
    assert not (tmp_path / "plots" / "gain_vs_gold.png").exists()
    assert "Confidence intervals" not in (tmp_path / "report.html").read_text()


def test_a_partial_suite_reports_the_finished_specs(suite):
    """Spec d has no finished seed and a's seed 2 left no metrics.jsonl: the README still gets the statistics."""
    from rlbench.bench.runner import write_readme

    root, summary, specs = suite
    specs = [*specs, _spec("d", [0, 1, 2])]
    (root / "runs" / "p-a-v2" / "seed-2" / "train" / "metrics.jsonl").unlink()
    for (spec, seed), rows in summary.groupby(["spec", "seed"]):
        folder = root / "runs" / spec / f"seed-{seed}"
        (folder / "eval" / "tables").mkdir(parents=True)
        rows.drop(columns=["spec", "seed"]).to_csv(folder / "eval" / "tables" / "summary.csv", index=False)
        (folder / "state.json").write_text(json.dumps({"status": "done", "train_seconds": 1.0, "eval_seconds": 1.0}))
    assert stats.applies(summary, specs)
    readme = write_readme(root, specs, None).read_text()
    assert "| p-d-v2 | 0 | not run |" in readme
    for title in ("Confidence intervals over seeds", "Pairwise differences between specs", "At equal wall time"):
        assert title in readme
    intervals = pd.read_csv(root / "tables" / "intervals.csv")
    assert list(intervals["spec"]) == ["p-a-v2", "p-b-v2", "p-c-v2"]
    equal = pd.read_csv(root / "tables" / "equal_time.csv").set_index("spec")
    assert equal.loc["p-a-v2", "runs"] == 2 and "p-d-v2" not in equal.index
    # One spec short of three seeds (a suite run part of the way): statistics over the seeds finished so far.
    partial = summary[~((summary["spec"] == "p-b-v2") & (summary["seed"] == 2))]
    assert stats.applies(partial, specs)
    assert stats.intervals(partial, specs).data.set_index("spec").loc["p-b-v2"].notna().any()
