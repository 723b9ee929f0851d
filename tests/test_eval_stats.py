"""Evaluation arithmetic against hand computations: Vendi score, pairwise distance, the Gaussian KL,
paired standard errors, the over-optimisation summary, checkpoint choice, seeds, and the cache's checks.
No model is loaded."""

from __future__ import annotations

import hashlib
import math
import sqlite3

import numpy as np
import pandas as pd
import pytest
import torch

from rlbench.errors import InputError
from rlbench.eval.cache import EvalCache, image_hash, key_of
from rlbench.eval.diversity import mean_pairwise_distance, vendi_score
from rlbench.eval.kl import kl_eta_for, transition_kl
from rlbench.eval.plan import select_checkpoints, subset
from rlbench.eval.sampling import sample_seed
from rlbench.eval.tables import overoptimisation_table, paired_stats, summary_table, with_base


# -- Vendi score and distances -------------------------------------------------------------------------


def test_vendi_of_identical_items_is_one_and_of_orthogonal_items_is_n() -> None:
    assert vendi_score(np.tile([[0.3, -1.0, 2.0]], (5, 1))) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(np.eye(4) * 3.0) == pytest.approx(4.0, abs=1e-9)  # norms do not matter (cosine kernel)
    assert vendi_score(np.array([[1.0, 2.0]])) == pytest.approx(1.0)


def test_vendi_against_a_hand_computation() -> None:
    # Two unit vectors at angle t: K = [[1, c], [c, 1]], eigenvalues of K/2 are (1 ± c) / 2.
    t = 0.7
    feats = np.array([[1.0, 0.0], [math.cos(t), math.sin(t)]])
    c = math.cos(t)
    lam = [(1 + c) / 2, (1 - c) / 2]
    assert vendi_score(feats) == pytest.approx(math.exp(-sum(x * math.log(x) for x in lam)), rel=1e-12)
    # Two identical items and one orthogonal: eigenvalues of K/3 are 2/3 and 1/3.
    feats = np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 5.0]])
    assert vendi_score(feats) == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))


def test_mean_pairwise_distance() -> None:
    assert mean_pairwise_distance(np.eye(3)) == pytest.approx(1.0)
    assert mean_pairwise_distance(np.ones((4, 2))) == pytest.approx(0.0)
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # distances 1, 2, 1
    assert mean_pairwise_distance(feats) == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="zero"):
        vendi_score(np.zeros((2, 3)))


# -- KL ------------------------------------------------------------------------------------------------


def test_transition_kl_is_the_gaussian_kl() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = 0.37
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(a.double(), std), torch.distributions.Normal(b.double(), std)).flatten(1).sum(1)
    torch.testing.assert_close(transition_kl(a, b, torch.tensor(std)), want)
    assert torch.equal(transition_kl(a, a, torch.tensor(std)), torch.zeros(3, dtype=torch.float64))
    per_sample = torch.tensor([0.1, 0.2, 0.3]).reshape(3, 1, 1, 1)
    want = ((a.double() - b.double()) ** 2).flatten(1).sum(1) / (2 * per_sample.reshape(3).double() ** 2)
    torch.testing.assert_close(transition_kl(a, b, per_sample), want)
    assert transition_kl(a, b, torch.tensor(0.0)) is None  # a deterministic step has no density
    assert kl_eta_for(1.0) == 1.0 and kl_eta_for(0.0) is None


# -- paired statistics -------------------------------------------------------------------------------------


def _scores(base, ckpt, reward="r", prompt_set="s", role="train", run="a", checkpoint=3) -> pd.DataFrame:
    rows = []
    for c, values in ((0, base), (checkpoint, ckpt)):
        for i, v in enumerate(values):
            rows.append({"run": run, "checkpoint": c, "reward_queries": 10 * c, "prompt_set": prompt_set,
                         "set_role": role, "prompt": f"p{i // 2}", "image_index": i % 2, "reward": reward, "score": v})
    return pd.DataFrame(rows)


def test_paired_standard_error_is_std_of_differences_over_sqrt_n() -> None:
    base = [1.0, 2.0, 3.0, 4.0]
    ckpt = [1.5, 2.1, 3.9, 4.2]
    s = summary_table(_scores(base, ckpt)).data.set_index("checkpoint")
    d = np.array(ckpt) - np.array(base)
    assert s.loc[3, "mean"] == pytest.approx(np.mean(ckpt))
    assert s.loc[3, "stderr"] == pytest.approx(np.std(ckpt, ddof=1) / 2)
    assert s.loc[3, "delta"] == pytest.approx(d.mean())
    assert s.loc[3, "delta_se"] == pytest.approx(np.std(d, ddof=1) / 2)
    assert s.loc[3, "delta_se"] < s.loc[3, "stderr"]  # pairing removes the prompts' spread
    assert (s.loc[0, "delta"], s.loc[0, "delta_se"]) == (0.0, 0.0)
    assert s.loc[3, "reward_queries"] == 30


def test_pairs_are_matched_by_prompt_and_image_not_by_row_order() -> None:
    df = _scores([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5])
    shuffled = df.sample(frac=1.0, random_state=3)
    st = paired_stats(with_base(shuffled), ["checkpoint"]).set_index("checkpoint")
    assert st.loc[3, "delta"] == pytest.approx(0.5) and st.loc[3, "delta_se"] == pytest.approx(0.0)


def test_overoptimisation_summary_row() -> None:
    # proxy rises 10 -> 11 -> 12; gold 0.5 -> 0.7 (best, ckpt 1) -> 0.4 (last)
    rows = []
    for c, proxy, gold in ((0, 10.0, 0.5), (1, 11.0, 0.7), (2, 12.0, 0.4)):
        for i in range(2):
            rows += [{"run": "a", "checkpoint": c, "reward_queries": c, "prompt_set": "s", "set_role": "train",
                      "prompt": "p", "image_index": i, "reward": r, "score": v + 0.01 * i}
                     for r, v in (("proxy", proxy), ("gold", gold))]
    meta = {"runs": [{"name": "a", "trained_reward": "proxy", "config": "x", "seed": 0}],
            "rewards": [{"label": "proxy", "higher_is_better": True, "role": "trained", "components": []},
                        {"label": "gold", "higher_is_better": True, "role": "gold", "components": []}],
            "gold": {"gold": ["proxy"]}}
    row = overoptimisation_table(pd.DataFrame(rows), meta).data.iloc[0]
    assert (row["proxy"], row["gold"], row["gold_kind"]) == ("proxy", "gold", "gold")
    assert row["proxy_gain"] == pytest.approx(2.0)
    assert row["best_checkpoint"] == 1 and row["gold_best"] == pytest.approx(0.705)
    assert row["gold_last"] == pytest.approx(0.405)
    assert row["drop_best_to_last"] == pytest.approx(0.3)
    assert row["gold_change"] == pytest.approx(-0.1)


# -- plan pieces -----------------------------------------------------------------------------------------


def test_checkpoint_selection() -> None:
    avail = list(range(1, 21))
    assert select_checkpoints(avail, "auto", "r") == [0, 5, 10, 15, 20]
    assert select_checkpoints([2, 4], "auto", "r") == [0, 2, 4]
    assert select_checkpoints(avail, "all", "r") == [0] + avail
    assert select_checkpoints(avail, "last", "r") == [0, 20]
    assert select_checkpoints(avail, "3, 7", "r") == [0, 3, 7]
    with pytest.raises(InputError, match="has no checkpoint 21"):
        select_checkpoints(avail, "21", "r")
    with pytest.raises(InputError, match="--checkpoints must be"):
        select_checkpoints(avail, "latest", "r")


def test_seeds_and_subsets_are_fixed() -> None:
    assert sample_seed(0, "a red circle", 1) == sample_seed(0, "a red circle", 1)
    assert len({sample_seed(0, "a red circle", k) for k in range(50)}) == 50
    assert sample_seed(0, "a", 0) != sample_seed(1, "a", 0) != sample_seed(0, "b", 0)
    # The documented formula (stable across versions and machines: cached samples depend on it).
    digest = hashlib.sha256(b"rlbench-eval\x000\x00a red circle\x000").digest()
    assert sample_seed(0, "a red circle", 0) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    s = subset(100, 10, seed=0, name="set")
    assert s == subset(100, 10, seed=0, name="set") and len(s) == 10 and s == sorted(s)
    assert subset(100, 10, seed=1, name="set") != s
    assert subset(5, 10, 0, "x") == list(range(5)) and subset(5, 0, 0, "x") == list(range(5))


# -- cache ------------------------------------------------------------------------------------------------


def test_cache_round_trip_and_version_check(tmp_path, monkeypatch) -> None:
    cache = EvalCache(tmp_path / "c")
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    h = image_hash(img)
    cache.put_samples([{"key": "k1", "png": b"png", "hash": h, "kl": 0.5, "kl_steps": 3}])
    cache.put_scores([(key_of("s", h), 1.25)])
    cache.put_features([("f", np.array([1.0, 2.0]))])
    cache.close()
    cache = EvalCache(tmp_path / "c")
    assert cache.get_samples(["k1", "nope"]) == {"k1": {"png": b"png", "hash": h, "kl": 0.5, "kl_steps": 3}}
    assert cache.get_scores([key_of("s", h)]) == {key_of("s", h): 1.25}
    np.testing.assert_array_equal(cache.get_features(["f"])["f"], [1.0, 2.0])
    cache.close()

    import rlbench

    monkeypatch.setattr(rlbench, "__version__", "9.9.9")
    with pytest.raises(InputError, match=r"written by rlbench .* this is rlbench 9.9.9.*delete it") as info:
        EvalCache(tmp_path / "c")
    assert str(tmp_path / "c") in str(info.value)


def test_corrupt_cache_is_named_with_the_fix(tmp_path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "eval-cache.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(InputError, match="not a valid cache.*delete it"):
        EvalCache(tmp_path / "c")
    assert (tmp_path / "c" / "eval-cache.sqlite").read_bytes().startswith(b"this is not")  # nothing deleted
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(tmp_path / "c" / "eval-cache.sqlite").execute("select 1 from meta").fetchall()
