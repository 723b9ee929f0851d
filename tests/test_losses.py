"""Unit tests of the pure loss / advantage functions against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rlbench.train.advantages import PerPromptStatTracker, batch_normalize
from rlbench.algorithms.ddpo import ADV_CLIP_MAX, CLIP_RANGE, ppo_clip_loss, score_function_loss
from rlbench.algorithms.rwr import BETA, PERCENTILE, rwr_weights, sparse_mask, weighted_denoising_loss
from rlbench.errors import RewardContractError

f64 = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=f64)


def test_constants_match_reference() -> None:
    assert (CLIP_RANGE, ADV_CLIP_MAX, BETA, PERCENTILE) == (1e-4, 5.0, 0.2, 90.0)


# --------------------------------------------------------------------------- PPO / SF


def test_ppo_ratio_one_negative_advantage_is_one() -> None:
    # trl's test: ratio = exp(0) = 1, A = -1  ->  max(-(-1)·1, -(-1)·1) = 1.
    loss, info = ppo_clip_loss(t(-3.0, 0.5), t(-3.0, 0.5), t(-1.0, -1.0))
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    assert info["approx_kl"].item() == 0.0
    assert info["clipfrac"].item() == 0.0


def test_ppo_positive_advantage_outside_clip_uses_clipped_value() -> None:
    # ratio = 1.5, A = 2, ε = 0.2: unclipped -2·1.5 = -3.0, clipped -2·1.2 = -2.4, max = -2.4.
    log_prob = t(math.log(1.5)).requires_grad_()
    loss, info = ppo_clip_loss(log_prob, t(0.0), t(2.0), clip_range=0.2)
    assert loss.item() == pytest.approx(-2.4, abs=1e-12)
    assert info["clipfrac"].item() == 1.0
    loss.backward()
    assert log_prob.grad.item() == 0.0  # the clipped branch is constant in θ


def test_ppo_default_clip_range_and_pessimistic_branch() -> None:
    # Default ε = 1e-4, ratio = 1.5, A = 1: clipped -1·1.0001 = -1.0001 beats unclipped -1.5.
    loss, _ = ppo_clip_loss(t(math.log(1.5)), t(0.0), t(1.0))
    assert loss.item() == pytest.approx(-1.0001, abs=1e-12)
    # ratio = 0.5, A = 1, ε = 0.2: unclipped -0.5, clipped -0.8 -> max keeps the unclipped -0.5.
    loss, _ = ppo_clip_loss(t(math.log(0.5)), t(0.0), t(1.0), clip_range=0.2)
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)
    # ratio = 1.5, A = -1, ε = 0.2: unclipped 1.5, clipped 1.2 -> 1.5.
    loss, _ = ppo_clip_loss(t(math.log(1.5)), t(0.0), t(-1.0), clip_range=0.2)
    assert loss.item() == pytest.approx(1.5, abs=1e-12)


def test_ppo_clipfrac_counts_strictly_outside() -> None:
    # ratios 1, 1.5, 0.5, 1.00005 with ε = 1e-4: |r-1| > ε is F, T, T, F -> 2/4 = 0.5.
    log_prob = t(0.0, math.log(1.5), math.log(0.5), math.log(1.00005))
    _, info = ppo_clip_loss(log_prob, torch.zeros(4, dtype=f64), torch.ones(4, dtype=f64))
    assert info["clipfrac"].item() == 0.5


def test_ppo_advantage_clipping_at_five() -> None:
    # ratio 1: loss = mean(-clamp(A, ±5)) -> A = 10 gives -5, A = -7 gives +5.
    assert ppo_clip_loss(t(0.0), t(0.0), t(10.0))[0].item() == -5.0
    assert ppo_clip_loss(t(0.0), t(0.0), t(-7.0))[0].item() == 5.0
    # d loss / d log_prob at ratio 1 = -clamp(A)/B: A = (10, 3) -> (-5/2, -3/2).
    log_prob = t(0.0, 0.0).requires_grad_()
    ppo_clip_loss(log_prob, t(0.0, 0.0), t(10.0, 3.0))[0].backward()
    assert torch.allclose(log_prob.grad, t(-2.5, -1.5))


def test_ppo_approx_kl_value() -> None:
    # log-ratio (0.1, -0.3): 0.5 · mean(0.01, 0.09) = 0.5 · 0.05 = 0.025.
    _, info = ppo_clip_loss(t(0.1, -0.3), t(0.0, 0.0), t(1.0, 1.0))
    assert info["approx_kl"].item() == pytest.approx(0.025, abs=1e-12)


def test_ppo_no_gradient_through_old_log_prob_or_advantages() -> None:
    old = t(0.0).requires_grad_()
    adv = t(1.0).requires_grad_()
    loss, info = ppo_clip_loss(t(0.0).requires_grad_(), old, adv)
    assert not info["approx_kl"].requires_grad
    loss.backward()
    assert old.grad is None and adv.grad is None


def test_score_function_gradient_equals_ppo_gradient_at_ratio_one() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, generator=gen, dtype=f64)
    adv = torch.randn(8, generator=gen, dtype=f64) * 4  # some |A| > 5, so clamping is exercised
    lp_ppo, lp_sf = base.clone().requires_grad_(), base.clone().requires_grad_()
    ppo_clip_loss(lp_ppo, base.clone(), adv)[0].backward()
    score_function_loss(lp_sf, adv).backward()
    # Both equal -clamp(A, ±5)/B.
    expected = -adv.clamp(-5, 5) / 8
    assert torch.allclose(lp_ppo.grad, expected, atol=1e-12)
    assert torch.allclose(lp_sf.grad, expected, atol=1e-12)


def test_score_function_value() -> None:
    # mean(-A·logp): A = (1, -2), logp = (-3, -1) -> mean(3, -2) = 0.5.
    assert score_function_loss(t(-3.0, -1.0), t(1.0, -2.0)).item() == pytest.approx(0.5)


def test_loss_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        ppo_clip_loss(t(0.0, 0.0), t(0.0), t(1.0, 1.0))


# --------------------------------------------------------------------------- RWR


def test_rwr_weights_two_samples_by_hand() -> None:
    # r = (0, 5), β = 0.2 -> βr = (0, 1); softmax = (1, e)/(1+e) = (0.2689414, 0.7310586);
    # ×N=2 -> (2/3.7182818 = 0.5378828, 2e/3.7182818 = 1.4621172).
    w = rwr_weights([0.0, 5.0])
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor([0.5378828, 1.4621172]), atol=1e-6)


def test_rwr_weights_per_prompt_by_hand() -> None:
    # a: r=(0, 5) -> (0.5378828, 1.4621172) as above.
    # b: r=(0, 10, 10) -> βr=(0, 2, 2); softmax=(1, e², e²)/(1+2e²), 1+2e² = 15.7781122;
    #    ×3 -> (3/15.7781122 = 0.1901369, 1.4049316, 1.4049316).
    prompts = ["a", "b", "a", "b", "b"]
    w = rwr_weights(torch.tensor([0.0, 0.0, 5.0, 10.0, 10.0]), prompts)
    expected = torch.tensor([0.5378828, 0.1901369, 1.4621172, 1.4049316, 1.4049316])
    assert torch.allclose(w, expected, atol=1e-6)
    # Sums are N_p per prompt: 2 for a, 3 for b.
    assert w[[0, 2]].sum().item() == pytest.approx(2.0, abs=1e-6)
    assert w[[1, 3, 4]].sum().item() == pytest.approx(3.0, abs=1e-6)


def test_rwr_weights_large_rewards_do_not_overflow() -> None:
    # exp(0.2·5000) overflows without the max shift; with it the result is (0, 2).
    w = rwr_weights([0.0, 5000.0])
    assert torch.allclose(w, torch.tensor([0.0, 2.0]))


def test_sparse_mask_keeps_top_ten_percent() -> None:
    # r = 0..19: virtual index 0.9·19 = 17.1 -> threshold 17.1 -> keeps 18, 19 (2/20 = 10%).
    m = sparse_mask(torch.arange(20, dtype=torch.float32))
    assert m.dtype == torch.bool
    assert m.nonzero().flatten().tolist() == [18, 19]
    # r = 0..9: index 8.1 -> threshold 8.1 -> keeps only 9.
    assert sparse_mask(np.arange(10.0)).nonzero().flatten().tolist() == [9]


def test_sparse_mask_ties() -> None:
    # Sorted (1×8, 2, 2): index 8.1 lies between two 2s -> threshold 2 -> both 2s kept (20%).
    r = [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]
    assert sparse_mask(r).nonzero().flatten().tolist() == [1, 6]
    # All equal: threshold = the value -> everything is kept.
    assert sparse_mask([3.0] * 7).all()


def test_sparse_mask_per_prompt_threshold() -> None:
    # a = 0..9 -> keeps 9. b = (100, 100, 0, 100): sorted (0, 100, 100, 100), index 0.9·3 = 2.7
    # -> threshold 100 -> keeps the three 100s. A global threshold would drop every a.
    r = list(range(10)) + [100.0, 100.0, 0.0, 100.0]
    prompts = ["a"] * 10 + ["b"] * 4
    assert sparse_mask(r, prompts).nonzero().flatten().tolist() == [9, 10, 11, 13]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_mask_matches_numpy_percentile(dtype: type) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 16, 33, 256):
        r = np.round(rng.normal(size=n), 1).astype(dtype)  # rounding makes ties common
        got = sparse_mask(torch.from_numpy(r)).numpy()
        assert np.array_equal(got, r >= np.percentile(r, 90))
        prompts = [str(k) for k in rng.integers(0, 3, size=n)]
        expected = np.zeros(n, dtype=bool)
        for p in set(prompts):
            sel = np.array(prompts) == p
            expected[sel] = r[sel] >= np.percentile(r[sel], 90)
        assert np.array_equal(sparse_mask(r, prompts).numpy(), expected)


def test_weighted_loss_unit_weights_is_mse() -> None:
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    loss = weighted_denoising_loss(pred, target, torch.ones(4))
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-6)


def test_weighted_loss_by_hand() -> None:
    # per-sample MSE: [(1+1)/2, (4+0)/2] = [1, 2]; w = (2, 0.5) -> (2·1 + 0.5·2)/2 = 1.5.
    pred = torch.zeros(2, 2)
    target = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    assert weighted_denoising_loss(pred, target, torch.tensor([2.0, 0.5])).item() == 1.5


# --------------------------------------------------------------------------- advantages


def test_batch_normalize_by_hand() -> None:
    # r = (1, 3, 5, 7): mean 4, population var (9+1+1+9)/4 = 5 -> (r-4)/(√5 + 1e-8).
    a = batch_normalize(torch.tensor([1.0, 3.0, 5.0, 7.0]))
    s = math.sqrt(5) + 1e-8
    assert a.dtype == torch.float32
    assert torch.allclose(a, torch.tensor([-3 / s, -1 / s, 1 / s, 3 / s]), atol=1e-7)


def test_tracker_fallback_uses_batch_stats_with_population_std() -> None:
    # Buffers hold 2 < min_count=16 -> batch stats: mean 4, std √5 (ddof=0; ddof=1 would be √(20/3)).
    tracker = PerPromptStatTracker()
    a = tracker.update(["a", "a", "b", "b"], np.array([1.0, 3.0, 5.0, 7.0]))
    s = math.sqrt(5) + 1e-6
    assert a.dtype == torch.float32
    assert torch.allclose(a, torch.tensor([-3 / s, -1 / s, 1 / s, 3 / s]), atol=1e-7)


def test_tracker_per_prompt_stats_at_min_count() -> None:
    # min_count=2: a buffer (1, 3) -> mean 2, std 1; b buffer (5, 9) -> mean 7, std 2.
    # Advantages (-1, 1, -1, 1) up to the 1e-6 in the denominator.
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    a = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 5.0, 9.0]))
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5)


def test_tracker_mixed_ready_and_fallback_in_one_batch() -> None:
    # min_count=3. a: buffer (0, 2, 4) ready -> mean 2, std √(8/3) = 1.6329932
    #   -> (-1.2247449, 0, 1.2247449).
    # b: buffer (10) not ready -> whole batch (0, 2, 4, 10): mean 4, var (16+4+0+36)/4 = 14,
    #   std √14 = 3.7416574 -> (10-4)/3.7416574 = 1.6035675.
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    a = tracker.update(["a", "a", "a", "b"], [0.0, 2.0, 4.0, 10.0])
    assert torch.allclose(a, torch.tensor([-1.2247449, 0.0, 1.2247449, 1.6035675]), atol=1e-5)


def test_tracker_switches_from_fallback_to_per_prompt() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    # Step 1: 2 rewards per prompt < 3 -> batch stats (checked above); only fills buffers.
    tracker.update(["a", "a", "b", "b"], [1.0, 3.0, 5.0, 7.0])
    # Step 2: a buffer (1, 3, 5): mean 3, std √(8/3) -> (5-3)/1.6329932 = 1.2247449.
    #         b buffer (5, 7, 3): mean 5, std √(8/3) -> (3-5)/1.6329932 = -1.2247449.
    a = tracker.update(["b", "a"], [3.0, 5.0])
    assert torch.allclose(a, torch.tensor([-1.2247449, 1.2247449]), atol=1e-5)
    assert {p: len(b) for p, b in tracker.state_dict()["buffers"].items()} == {"a": 3, "b": 3}


def test_tracker_ring_buffer_eviction() -> None:
    tracker = PerPromptStatTracker(buffer_size=2, min_count=2)
    tracker.update(["a", "a"], [0.0, 10.0])
    # 0 is evicted: buffer (10, 4) -> mean 7, std 3 -> (4-7)/3 = -1.
    # (Without eviction: (0, 10, 4) -> mean 4.67, a different advantage.)
    a = tracker.update(["a"], [4.0])
    assert a.item() == pytest.approx(-1.0, abs=1e-5)
    assert tracker.state_dict()["buffers"] == {"a": [10.0, 4.0]}
    # A batch longer than the buffer: buffer keeps (2, 3) -> mean 2.5, std 0.5,
    # and all three rewards are scored against it: (1, 2, 3) -> (-3, -1, 1).
    a = PerPromptStatTracker(buffer_size=2, min_count=2).update(["x"] * 3, [1.0, 2.0, 3.0])
    assert torch.allclose(a, torch.tensor([-3.0, -1.0, 1.0]), atol=1e-5)


def test_tracker_state_dict_round_trip_is_exact() -> None:
    rng = np.random.default_rng(3)
    prompts_pool = ["a cat", "a dog", "a héron"]

    def batch() -> tuple[list[str], np.ndarray]:
        return [str(p) for p in rng.choice(prompts_pool, size=12)], rng.normal(size=12) * 3

    first = PerPromptStatTracker(buffer_size=8, min_count=4)
    for _ in range(3):
        first.update(*batch())
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    second = PerPromptStatTracker(buffer_size=8, min_count=4)
    second.load_state_dict(state)
    for _ in range(3):
        prompts, rewards = batch()
        assert torch.equal(first.update(prompts, rewards), second.update(prompts, rewards))
    assert first.state_dict() == second.state_dict()


def test_tracker_load_state_dict_config_mismatch() -> None:
    state = PerPromptStatTracker(buffer_size=3, min_count=1)
    state.update(["a"] * 3, [1.0, 2.0, 3.0])
    other = PerPromptStatTracker(buffer_size=2, min_count=1)
    with pytest.raises(ValueError):
        other.load_state_dict(state.state_dict())
    other.load_state_dict(state.state_dict(), strict=False)
    assert other.state_dict()["buffers"] == {"a": [2.0, 3.0]}  # newest entries kept


def test_tracker_keeps_input_order_and_rejects_bad_input() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
    # min_count=1: each prompt's buffer -> x: (0, 2) mean 1 std 1; y: (10, 30) mean 20 std 10.
    a = tracker.update(["x", "y", "x", "y"], [0.0, 30.0, 2.0, 10.0])
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-5)
    with pytest.raises(ValueError):
        tracker.update(["x"], [1.0, 2.0])
    with pytest.raises(RewardContractError):
        tracker.update(["x"], [float("nan")])
