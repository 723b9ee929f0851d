"""The zoo as a tool (rlbench/eval/zoo.py): ``rlbench rewards score --images``, ``compare``, ``bench`` and the shapes
world's exact preference pairs; the rank statistics against hand-worked values and scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import GenericTestReward, mean_pixel, ok, random_images, user_error
from rlbench.cli import app
from rlbench.errors import InputError
from rlbench.eval import zoo
from rlbench.registry import make_reward
from rlbench.utils.images import load_image, to_uint8
from rlbench.utils.stats import kendall_tau_b, pair_counts, spearman


def flat(path, value: int, size: tuple[int, int] = (8, 8)):
    """An image of one grey level ``value`` (its mean pixel is value / 255), saved by its suffix (PNG or JPEG)."""
    h, w = size
    img = Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8))
    img.save(path, quality=100) if path.suffix == ".jpg" else img.save(path)
    return path


def score_of(name: str, path, prompt: str = "") -> float:
    return make_reward(name)(load_image(path)[None], [prompt]).scores.item()


# -- statistics ---------------------------------------------------------------------------------------------


def test_rank_statistics_by_hand() -> None:
    # no ties: one discordant pair of six
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 0.8
    # a tie in a: C = 5, D = 0, tied in a only 1 -> 5 / sqrt(5 * 6); rho of the average ranks [1, 2.5, 2.5, 4]
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    pc = pair_counts([1, 2, 2, 3], [1, 2, 3, 4])
    assert pc == (5, 0, 1, 0, 0) and pc.agreement == pytest.approx(5.5 / 6)
    both = pair_counts([1, 1, 2], [5, 5, 3])  # the first pair tied in both, the other two discordant
    assert both == (0, 2, 0, 0, 1) and both.agreement == pytest.approx(1 / 3) and both.tau_b == pytest.approx(-1)
    # a reward and its negation, a reward and itself
    x = [0.3, 0.1, 0.7, 0.2, 0.9]
    assert kendall_tau_b(x, [-v for v in x]) == -1 and spearman(x, [-v for v in x]) == pytest.approx(-1)
    assert kendall_tau_b(x, x) == 1 and spearman(x, x) == pytest.approx(1)
    # undefined where either is constant, or with one value
    for a, b in (([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [4, 4, 4]), ([1], [2])):
        assert math.isnan(kendall_tau_b(a, b)) and math.isnan(spearman(a, b))
    assert pair_counts([1, 1, 1], [1, 2, 3]).agreement == pytest.approx(0.5)


def test_rank_statistics_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 40, 1500):  # 1500: more than one row chunk of pair_counts
        for levels in (3, 1000):  # many ties, few ties
            a, b = rng.integers(0, levels, n), rng.integers(0, levels, n)
            b = np.where(rng.random(n) < 0.5, a, b)  # correlated
            if np.ptp(a) == 0 or np.ptp(b) == 0:
                continue
            assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
            assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


# -- rlbench rewards score ----------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path):
    """A manifest of five PNG and JPEG images of four sizes, two prompts; and the folder holding them."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    imgs = random_images(5, 20, seed=3)
    sizes = [(20, 20), (16, 24), (20, 20), (12, 12), (24, 16)]
    paths = []
    for k, (img, (h, w)) in enumerate(zip(imgs, sizes)):
        arr = to_uint8(torch.nn.functional.interpolate(img[None], size=(h, w))[0])
        p = folder / f"{k}.{'jpg' if k % 2 else 'png'}"
        Image.fromarray(arr).save(p)
        paths.append(p)
    prompts = ["a cat", "a cat", "a dog", "a dog", "a dog"]
    (folder / "manifest.csv").write_text("path,prompt\n" + "".join(f"{p.name},{q}\n" for p, q in zip(paths, prompts)))
    return folder, paths, prompts


def test_score_a_manifest_of_mixed_sizes_and_formats_with_two_rewards(mixed, tmp_path) -> None:
    folder, paths, prompts = mixed
    res = zoo.score_table("incompressibility,compressibility", folder / "manifest.csv", tmp_path / "t.parquet",
                          cache=tmp_path / "cache")
    assert [f.name for f in res.files.values()] == ["t.parquet", "t.csv", "t.md"]
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert list(table["image"]) == [str(p.resolve()) for p in paths] and list(table["prompt"]) == prompts
    assert sorted(set(zip(table["width"], table["height"]))) == [(12, 12), (16, 24), (20, 20), (24, 16)]
    for name in ("incompressibility", "compressibility"):
        assert list(table[name]) == pytest.approx([score_of(name, p, q) for p, q in zip(paths, prompts)], abs=1e-6)
    csv = pd.read_csv(tmp_path / "t.csv")
    assert list(csv.columns) == list(table.columns)
    assert np.allclose(csv["compressibility"], table["compressibility"])
    md = (tmp_path / "t.md").read_text()
    assert "| image | prompt | incompressibility | compressibility |" in md and "| 3.jpg | a dog |" in md
    # an existing table is never overwritten silently
    with pytest.raises(InputError, match="already exist.*--overwrite"):
        zoo.score_table("incompressibility", folder, tmp_path / "t.csv", cache=False)
    zoo.score_table("incompressibility", folder, tmp_path / "t.csv", cache=False, overwrite=True)
    assert list(pd.read_csv(tmp_path / "t.csv").columns)[-1] == "incompressibility"


def test_score_a_plain_folder_with_one_prompt_and_the_prompt_rules(tmp_path) -> None:
    flat(tmp_path / "b.jpg", 100, (10, 6))
    flat(tmp_path / "a.png", 40, (8, 8))
    (tmp_path / "notes.txt").write_text("not an image")
    res = zoo.score_table("incompressibility", tmp_path, tmp_path / "out" / "s", prompt="grey", cache=False)
    assert [p.rsplit("/", 1)[1] for p in res.scores["image"]] == ["a.png", "b.jpg"]
    assert set(res.scores["prompt"]) == {"grey"} and (tmp_path / "out" / "s.md").is_file()
    with pytest.raises(InputError, match="pass --prompt TEXT"):
        zoo.score_table("incompressibility", tmp_path, tmp_path / "x", cache=False)
    # a manifest without prompts takes --prompt; one with its own prompts refuses it
    (tmp_path / "m.csv").write_text("path\na.png\n")
    assert list(zoo.score_table("incompressibility", tmp_path / "m.csv", tmp_path / "y", prompt="p",
                                cache=False).scores["prompt"]) == ["p"]
    (tmp_path / "m2.csv").write_text("path,prompt\na.png,own\n")
    with pytest.raises(InputError, match="its own prompt; drop --prompt"):
        zoo.score_table("incompressibility", tmp_path / "m2.csv", tmp_path / "z", prompt="p", cache=False)
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "z.csv").exists()


def test_scores_are_cached_like_evals(mixed, tmp_path, register_reward) -> None:
    folder, paths, _ = mixed
    seen: list[int] = []

    def counted(images, prompts, metadata):
        seen.append(len(images))
        return mean_pixel(images)

    register_reward("toy-counted", GenericTestReward(counted, name="toy-counted"))
    first = zoo.score_table("toy-counted,incompressibility", folder, tmp_path / "a", cache=tmp_path / "cache",
                            batch_size=2)
    assert sum(seen) == len(paths) and max(seen) <= 2  # batches of one size, at most 2 images
    seen.clear()
    second = zoo.score_table("toy-counted", folder, tmp_path / "b", cache=tmp_path / "cache")
    assert seen == []  # every score read from the cache
    assert list(second.scores["toy-counted"]) == list(first.scores["toy-counted"])
    zoo.score_table("toy-counted", folder, tmp_path / "c", cache=False)
    assert sum(seen) == len(paths)  # --no-cache computes again
    # the values are each image's own mean pixel, whatever its size
    assert list(first.scores["toy-counted"]) == pytest.approx([load_image(p).mean().item() for p in paths])


def test_cli_score_both_forms_take_mixed_sizes(runner, mixed, tmp_path) -> None:
    folder, paths, _ = mixed
    out = ok(runner.invoke(app, ["rewards", "score", "incompressibility", "--prompt", "x", "--batch-size", "2",
                                 *map(str, paths)]))
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    assert [line.split("\t")[1] for line in lines] == [f"{score_of('incompressibility', p, 'x'):.6f}" for p in paths]
    out = ok(runner.invoke(app, ["rewards", "score", "incompressibility,compressibility", "--images", str(folder),
                                 "--out", str(tmp_path / "t.md"), "--cache", str(tmp_path / "cache")]))
    assert "5 images, 2 prompts" in out and (tmp_path / "t.parquet").is_file()
    user_error(runner.invoke(app, ["rewards", "score", "incompressibility", "--images", str(folder), "--out",
                                   str(tmp_path / "t"), "--no-cache"]), "already exist", "--overwrite")
    user_error(runner.invoke(app, ["rewards", "score", "incompressibility", "--images", str(folder)]),
               "--images needs --out FILE")
    user_error(runner.invoke(app, ["rewards", "score", "incompressibility", str(paths[0]), "--images", str(folder),
                                   "--out", str(tmp_path / "u")]), "not both")
    user_error(runner.invoke(app, ["rewards", "score", "incompresibility,compressibility", "--images", str(folder),
                                   "--out", str(tmp_path / "u")]), "unknown reward 'incompresibility'",
               "Did you mean: 'incompressibility'")
    user_error(runner.invoke(app, ["rewards", "score", "incompressibility,compressibility", "--images", str(folder),
                                   "--out", str(tmp_path / "u"), "--opt", "bogus=1"]), "NAME.KEY=VALUE")
    assert not list(tmp_path.glob("u*"))


# -- rlbench rewards compare ---------------------------------------------------------------------------------


@pytest.fixture
def toys(register_reward):
    """toy-mean (mean pixel), its negation, a constant, toy-b (a hand-made order of the grey levels) and toy-low
    (the mean pixel, declared lower-is-better)."""
    order = {10: 1.0, 20: 3.0, 30: 2.0, 40: 4.0, 50: 1.0, 60: 2.0, 70: 2.0, 80: 3.0, 90: 0.0}

    def level(images):
        return [int(round(v * 255)) for v in mean_pixel(images).tolist()]

    register_reward("toy-mean", GenericTestReward(mean_pixel, name="toy-mean"))
    register_reward("toy-neg", GenericTestReward(lambda i, p, m: -mean_pixel(i), name="toy-neg"))
    register_reward("toy-const", GenericTestReward(lambda i, p, m: torch.zeros(len(i)), name="toy-const"))
    register_reward("toy-b", GenericTestReward(lambda i, p, m: torch.tensor([order[v] for v in level(i)]),
                                               name="toy-b"))
    low = GenericTestReward(mean_pixel, name="toy-low")
    low.higher_is_better = False
    register_reward("toy-low", low)


def test_compare_hand_worked_matrices(toys, tmp_path) -> None:
    rows = []
    for prompt, levels in (("p1", [10, 20, 30, 40]), ("p2", [50, 60, 70, 80]), ("p3", [90])):
        for k, v in enumerate(levels):
            path = flat(tmp_path / f"{prompt}-{k}.{'jpg' if k == 3 else 'png'}", v, (8 + k, 8))
            rows.append(f"{path.name},{prompt}")
    (tmp_path / "manifest.csv").write_text("path,prompt\n" + "\n".join(rows) + "\n")
    res = zoo.compare("toy-mean,toy-b,toy-neg,toy-const,toy-low", tmp_path, out=tmp_path / "cmp", cache=False)
    assert res.counts == {"compared": 2, "single": 1, "images": 8}  # p3's one image is left out
    cell = res.stats.set_index(["reward_a", "reward_b"])
    # p1: b orders [1, 3, 2, 4] (rho 0.8, tau 2/3); p2: [1, 2, 2, 3] (one tie: rho 4.5/sqrt(22.5), tau 5/sqrt(30))
    ab = cell.loc[("toy-mean", "toy-b")]
    assert ab["spearman"] == pytest.approx((0.8 + 4.5 / math.sqrt(22.5)) / 2)
    assert ab["kendall"] == pytest.approx((4 / 6 + 5 / math.sqrt(30)) / 2)
    assert ab["agreement"] == pytest.approx((5 + 5 + 0.5) / 12) and ab["pairs"] == 12
    assert ab["ties_b"] == 1 and cell.loc[("toy-b", "toy-mean")]["ties_a"] == 1
    for other in ("toy-neg", "toy-low"):  # a negation, and the same scores declared lower-is-better
        c = cell.loc[("toy-mean", other)]
        assert (c["spearman"], c["kendall"], c["agreement"]) == (pytest.approx(-1), pytest.approx(-1), 0)
    c = cell.loc[("toy-mean", "toy-mean")]
    assert (c["spearman"], c["kendall"], c["agreement"]) == (pytest.approx(1), pytest.approx(1), 1)
    # a constant reward: no correlation is defined (not 0), every pair a tie in one of the two
    c = cell.loc[("toy-mean", "toy-const")]
    assert math.isnan(c["spearman"]) and math.isnan(c["kendall"]) and c["prompts_defined"] == 0
    assert c["agreement"] == 0.5 and cell.loc[("toy-const", "toy-const")]["agreement"] == 1
    sp = res.tables["spearman"]
    assert list(sp.data.columns) == ["reward", "toy-mean", "toy-b", "toy-neg", "toy-const", "toy-low"]
    assert sp.display.loc[0, "toy-const"] == "–" and sp.display.loc[0, "toy-neg"] == "-1.000"
    assert "1 prompts with one image are left out" in sp.caption
    written = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    for name in ("spearman.md", "kendall.csv", "preference_agreement.md", "agreement.csv", "compare.png",
                 "scores.parquet", "meta.json"):
        assert name in written
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(tmp_path / "cmp" / "preference_agreement.csv")
    assert csv.loc[0, "toy-b"] == pytest.approx(10.5 / 12)
    with pytest.raises(InputError, match="not empty"):
        zoo.compare("toy-mean,toy-b", tmp_path, out=tmp_path / "cmp", cache=False)


def test_compare_bad_input(toys, runner, tmp_path) -> None:
    for k in range(2):
        flat(tmp_path / f"{k}.png", 10 * k + 10)
    (tmp_path / "manifest.csv").write_text("path,prompt\n0.png,one\n1.png,two\n")
    with pytest.raises(InputError, match="no prompt has two or more images"):
        zoo.compare("toy-mean,toy-b", tmp_path, cache=False)
    user_error(runner.invoke(app, ["rewards", "compare", "toy-mean", "--images", str(tmp_path)]),
               "needs 2 or more rewards")
    user_error(runner.invoke(app, ["rewards", "compare", "toy-mean,toy-maen", "--images", str(tmp_path)]),
               "unknown reward 'toy-maen'", "Did you mean")
    # the same two images as one prompt (a plain folder with --prompt): a negation disagrees on the one pair
    (tmp_path / "manifest.csv").unlink()
    out = ok(runner.invoke(app, ["rewards", "compare", "toy-mean,toy-neg", "--images", str(tmp_path), "--prompt", "x",
                                 "--no-cache"]))
    assert "| toy-mean | 1.000 | -1.000 |" in out and "1 prompts with 2+ images (2 images)" in out
    assert "| toy-mean | 1.000 | 0.000 |" in out.split("Pairwise preference agreement")[1]


# -- rlbench rewards bench -------------------------------------------------------------------------------------


@pytest.fixture
def pairs_file(tmp_path):
    """Five hand-made pairs scored by toy-mean (the grey level): right, right, wrong, a reward tie, a human tie."""
    for v in (10, 20, 30, 40):
        flat(tmp_path / f"g{v}.png", v, (8, 6 + v // 10))
    flat(tmp_path / "g20b.jpg", 20)  # another file of the same level: toy-mean ties it with g20.png
    rows = ["p,g10.png,g20.png,b", "p,g30.png,g20.png,A", "p,g10.png,g40.png,a", "p,g20.png,g20b.jpg,a",
            "p,g10.png,g30.png,tie"]
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,image_a,image_b,preferred,note\n" + "".join(r + ",x\n" for r in rows))
    return path


def test_bench_hand_made_pairs_ties_and_the_bootstrap(toys, pairs_file, tmp_path) -> None:
    res = zoo.bench("toy-mean,toy-const,toy-low", pairs_file, cache=False, out=tmp_path / "b")
    row = res.table.data.set_index("reward")
    assert row.loc["toy-mean", "accuracy"] == pytest.approx(2.5 / 4)  # 1 + 1 + 0 + 1/2, the human tie excluded
    assert (row.loc["toy-mean", "pairs"], row.loc["toy-mean", "tied_labels"], row.loc["toy-mean", "reward_ties"]) \
        == (4, 1, 1)
    assert row.loc["toy-const", "accuracy"] == 0.5 and row.loc["toy-const", "reward_ties"] == 4
    assert row.loc["toy-low", "accuracy"] == pytest.approx(1.5 / 4)  # lower is better: the order flips
    lo, hi = row.loc["toy-mean", "ci_low"], row.loc["toy-mean", "ci_high"]
    assert lo <= 2.5 / 4 <= hi and lo < hi
    again = zoo.bench("toy-mean", pairs_file, cache=False).table.data
    assert (again.loc[0, "ci_low"], again.loc[0, "ci_high"]) == (lo, hi)  # seeded
    strict = zoo.bench("toy-mean", pairs_file, cache=False, tie_credit=0.0).table.data
    assert strict.loc[0, "accuracy"] == pytest.approx(2 / 4)  # ImageReward's and HPSv2's convention
    scores = pd.read_csv(tmp_path / "b" / "pair_scores.csv")
    mine = scores[scores["reward"] == "toy-mean"]
    assert list(mine["credit"].iloc[:4]) == [1, 1, 0, 0.5] and math.isnan(mine["credit"].iloc[4])
    assert mine["score_a"].iloc[0] == pytest.approx(10 / 255) and (tmp_path / "b" / "bench.md").is_file()
    # jsonl pairs give the same numbers
    jl = tmp_path / "pairs.jsonl"
    keys = ["prompt", "image_a", "image_b", "preferred"]
    jl.write_text("".join(json.dumps(dict(zip(keys, line.split(",")[:4]))) + "\n"
                          for line in pairs_file.read_text().splitlines()[1:]))
    assert zoo.bench("toy-mean", jl, cache=False).table.data.loc[0, "accuracy"] == pytest.approx(2.5 / 4)


def test_bootstrap_interval_is_seeded_and_contains_the_estimate() -> None:
    rng = np.random.default_rng(1)
    sa, sb = rng.random(300), rng.random(300)
    pref = np.where(sa + 0.3 * rng.standard_normal(300) > sb, "a", "b")
    one = zoo.preference_accuracy(sa, sb, pref, seed=3)
    two = zoo.preference_accuracy(sa, sb, pref, seed=3)
    other = zoo.preference_accuracy(sa, sb, pref, seed=4)
    assert one["ci_low"] < one["accuracy"] < one["ci_high"] and (one["ci_low"], one["ci_high"]) == (
        two["ci_low"], two["ci_high"])
    assert (one["ci_low"], one["ci_high"]) != (other["ci_low"], other["ci_high"])
    assert one["accuracy"] == other["accuracy"] and 0.6 < one["accuracy"] < 0.95
    se = math.sqrt(one["accuracy"] * (1 - one["accuracy"]) / 300)  # the interval is about +-1.96 s.e. wide
    assert one["ci_high"] - one["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    with pytest.raises(InputError, match="all 2 pairs are labelled tie"):
        zoo.preference_accuracy([1, 2], [2, 1], ["tie", "tie"])


def test_ranking_pairs_and_imagereward_s_accuracy() -> None:
    # ImageReward's data/test.json, id 005695-0057: six images, ranking [1, 2, 1, 4, 3, 4] (1 = best; ties)
    ranks = [1, 2, 1, 4, 3, 4]
    pairs = zoo.ranking_pairs("a concept art of a vehicle", [f"{k}.webp" for k in range(6)], ranks)
    assert len(pairs) == 15 and [p["preferred"] for p in pairs] == [
        "a", "tie", "a", "a", "a", "b", "a", "a", "a", "a", "a", "a", "b", "tie", "a"]
    assert pairs[5] == {"prompt": "a concept art of a vehicle", "image_a": "1.webp", "image_b": "2.webp",
                        "preferred": "b"}
    # ImageReward's test.py acc (pooled over pairs; tied rankings skipped; a reward tie counts wrong) equals bench's
    # accuracy with tie_credit=0 on these pairs
    rng = np.random.default_rng(0)
    groups = [(list(rng.integers(1, 5, 6)), list(rng.integers(0, 3, 6).astype(float))) for _ in range(30)]
    right = total = 0
    sa, sb, pref = [], [], []
    for rank, reward in groups:
        for i in range(6):
            for j in range(i + 1, 6):
                if rank[i] != rank[j]:
                    total += 1
                    right += (reward[i] > reward[j]) if rank[i] < rank[j] else (reward[i] < reward[j])
        for p in zoo.ranking_pairs("p", list(range(6)), rank):
            sa.append(reward[int(p["image_a"])])
            sb.append(reward[int(p["image_b"])])
            pref.append(p["preferred"])
    res = zoo.preference_accuracy(sa, sb, pref, tie_credit=0.0, bootstrap=0)
    assert res["accuracy"] == pytest.approx(right / total) and res["pairs"] == total and res["reward_ties"] > 0
    assert math.isnan(res["ci_low"])
    with pytest.raises(InputError, match="3 images but 2 ranks"):
        zoo.ranking_pairs("p", [1, 2, 3], [1, 2])


def test_bench_bad_input_one_line_exit_2(toys, runner, pairs_file, tmp_path) -> None:
    def bench(path, *extra):
        return runner.invoke(app, ["rewards", "bench", "toy-mean", "--pairs", str(path), "--no-cache", *extra])

    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,image_a,winner\np,g10.png,a\n")
    user_error(bench(bad), "lacks the columns image_b,preferred", "prompt,image_a,image_b,preferred")
    bad.write_text("prompt,image_a,image_b,preferred\np,g10.png,g20.png,left\np,g10.png,g20.png,b\n")
    user_error(bench(bad), "preferred must be a, b or tie", "line 2: 'left'")
    bad.write_text("prompt,image_a,image_b,preferred\np,g10.png,nope.png,a\n,g10.png,g20.png,b\n")
    user_error(bench(bad), "lack", "first at line 3")
    bad.write_text("prompt,image_a,image_b,preferred\np,g10.png,nope.png,a\np,gone.png,g20.png,b\n")
    user_error(bench(bad), "2 of 4 images are missing or unreadable", "nope.png", "gone.png")
    user_error(bench(tmp_path / "absent.csv"), "does not exist")
    user_error(runner.invoke(app, ["rewards", "bench", "toy-maen", "--pairs", str(pairs_file)]),
               "unknown reward 'toy-maen'", "Did you mean: 'toy-mean'")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    user_error(bench(pairs_file, "--out", str(tmp_path / "full")), "not empty", "--overwrite")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    user_error(bench(pairs_file, "--tie-credit", "2"), "--tie-credit must lie in [0, 1]")
    out = ok(bench(pairs_file, "--out", str(tmp_path / "res")))
    assert "| toy-mean | 0.625 |" in out and (tmp_path / "res" / "bench.csv").is_file()


# -- the shapes world's exact pairs ------------------------------------------------------------------------------


def test_shapes_pairs_are_labelled_by_shapes_gold(tmp_path) -> None:
    folder = zoo.shapes_pairs(tmp_path / "pairs", 40, source="render", seed=1)
    pairs = pd.read_csv(folder / "pairs.csv")
    assert len(pairs) == 40 and set(pairs["preferred"]) == {"a", "b", "tie"}
    gold = make_reward("shapes-gold")
    paths = sorted(set(pairs["image_a"]) | set(pairs["image_b"]))
    prompt_of = dict(zip(pairs["image_a"], pairs["prompt"])) | dict(zip(pairs["image_b"], pairs["prompt"]))
    score = dict(zip(paths, gold(torch.stack([load_image(folder / p) for p in paths]),
                                 [prompt_of[p] for p in paths]).scores.tolist()))
    want = ["a" if score[a] > score[b] else "b" if score[b] > score[a] else "tie"
            for a, b in zip(pairs["image_a"], pairs["image_b"])]
    assert list(pairs["preferred"]) == want
    assert (pairs.groupby("prompt").size() <= 6).all()  # pairs within a prompt: 4 images, 6 pairs each
    manifest = pd.read_csv(folder / "manifest.csv")
    assert sorted(manifest["path"]) == paths
    res = zoo.bench("shapes-gold,incompressibility", folder / "pairs.csv", cache=False)
    row = res.table.data.set_index("reward")
    assert row.loc["shapes-gold", "accuracy"] == 1.0 and row.loc["shapes-gold", "ci_low"] == 1.0
    assert row.loc["shapes-gold", "tied_labels"] == (pairs["preferred"] == "tie").sum() > 0
    assert row.loc["incompressibility", "accuracy"] < 1.0
    again = zoo.shapes_pairs(tmp_path / "again", 40, source="render", seed=1)
    assert (again / "pairs.csv").read_text() == (folder / "pairs.csv").read_text()  # seeded


def test_shapes_pairs_from_the_model_and_the_cli(runner, tmp_path) -> None:
    out = ok(runner.invoke(app, ["shapes", "pairs", "--n", "6", "--steps", "2", "--out", str(tmp_path / "m")]))
    assert "6 pairs" in out and "4 images, 1 prompts" in out
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["source"] == "model" and meta["steps"] == 2 and meta["pairs"] == 6
    gold = pd.read_csv(tmp_path / "m" / "pairs.csv")
    assert list(gold["preferred"]) == ["a" if a > b else "b" if b > a else "tie"
                                       for a, b in zip(gold["gold_a"], gold["gold_b"])]
    user_error(runner.invoke(app, ["shapes", "pairs", "--n", "6", "--out", str(tmp_path / "m")]), "not empty")
    user_error(runner.invoke(app, ["shapes", "pairs", "--source", "paint", "--out", str(tmp_path / "x")]),
               "--source must be model or render")
    user_error(runner.invoke(app, ["shapes", "pairs", "--split", "nope", "--out", str(tmp_path / "x")]),
               "unknown shapes split 'nope'")
    assert not (tmp_path / "x").exists()
