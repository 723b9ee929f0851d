"""The reward contract: check_reward catches each class of broken reward; CheckedReward guards calls.

Also the conformance suite: check_reward over every registered reward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import GenericTestReward, mean_pixel, random_images
from rlbench.checker import check_reward
from rlbench.errors import (
    DependencyNotInstalled,
    InputError,
    RewardContractError,
    WeightsNotAvailable,
)
from rlbench.registry import REWARDS, make_reward
from rlbench.reward import CheckedReward, Reward, RewardOutput, reward_card
from rlbench.testing import TINY_REWARDS, tiny_reward
from rlbench.weights import WeightsSpec, specs_of


def _nan(images, prompts, metadata):
    return torch.full((images.shape[0],), float("nan"))


def _inf(images, prompts, metadata):
    s = images.mean(dim=(1, 2, 3))
    s[-1] = float("inf")
    return s


def _column(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)).unsqueeze(1)  # (B, 1)


def _float64(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)).double()


def _numpy(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)).numpy()


def _list(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)).tolist()


def _random(images, prompts, metadata):
    return torch.rand(images.shape[0])


def _batch_dependent(images, prompts, metadata):
    s = images.mean(dim=(1, 2, 3))
    return s - s.mean()


def _mutates_scaling(images, prompts, metadata):
    images.mul_(0.5)
    return images.mean(dim=(1, 2, 3))


def _mutates_idempotently(images, prompts, metadata):
    images[:, 0] = 0.0  # the same in-place write every call
    return images.mean(dim=(1, 2, 3))


def _raises(images, prompts, metadata):
    raise ValueError("model exploded")


def _three_tuple(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}, None


def _bad_info(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), ["not", "a", "dict"]


BROKEN = [
    pytest.param(_nan, ["non-finite", "NaN", "[0, 1, 2] of 3"], id="nan"),
    pytest.param(_inf, ["non-finite", "images [2] of 3"], id="inf"),
    pytest.param(_column, ["shape (3, 1)", "expected (3,)"], id="shape-B1"),
    pytest.param(_float64, ["torch.float64", "torch.float32"], id="float64"),
    pytest.param(_numpy, ["ndarray", "torch.Tensor"], id="numpy"),
    pytest.param(_list, ["list", "torch.Tensor"], id="list"),
    pytest.param(_random, ["declared deterministic", "deterministic = False"], id="nondeterministic"),
    pytest.param(_batch_dependent, ["not batch-size invariant", "image 0"], id="batch-dependent"),
    pytest.param(_mutates_scaling, ["modified its input"], id="mutates-input"),
    pytest.param(_mutates_idempotently, ["modified its input"], id="mutates-input-idempotently"),
    pytest.param(_raises, ["raised ValueError", "model exploded"], id="raises"),
    pytest.param(_three_tuple, ["tuple of 3 items"], id="tuple-of-3"),
    pytest.param(_bad_info, ["info must be a dict"], id="info-not-dict"),
]


@pytest.mark.parametrize("score_fn, fragments", BROKEN)
def test_check_reward_catches_broken_reward(score_fn, fragments) -> None:
    reward = GenericTestReward(score_fn, name="broken-one")
    with pytest.raises(RewardContractError) as info:
        check_reward(reward)
    msg = str(info.value)
    assert "reward 'broken-one'" in msg
    for fragment in fragments:
        assert fragment in msg


def test_check_reward_rejects_non_callable() -> None:
    class NotCallable:
        name = "nc"

    with pytest.raises(RewardContractError, match="not callable"):
        check_reward(NotCallable())


def test_check_reward_passes_good_reward() -> None:
    check_reward(GenericTestReward(mean_pixel))


def test_check_reward_passes_declared_nondeterministic_random_reward() -> None:
    check_reward(GenericTestReward(_random, deterministic=False))


def test_check_reward_batch_dependent_but_skip_flag() -> None:
    # Documented escape hatch for rewards whose batched math differs slightly.
    check_reward(GenericTestReward(_batch_dependent), skip_batch_invariance=True)


class PlainTensorReward:
    """A minimal plugin that does not subclass Reward: returns a bare tensor."""

    def __call__(self, images, prompts, metadata):
        return images[:, 1].mean(dim=(1, 2))


class PlainTupleReward:
    """A minimal plugin returning (scores, info)."""

    deterministic = True

    def __call__(self, images, prompts, metadata):
        return images.amax(dim=(1, 2, 3)), {"lengths": [len(p) for p in prompts]}


@pytest.mark.parametrize("cls", [PlainTensorReward, PlainTupleReward])
def test_check_reward_passes_plain_class_plugins(cls) -> None:
    check_reward(cls())
    checked = CheckedReward(cls(), name="plain")
    images = random_images(2, 8)
    out = checked(images, ["a", "b"])
    assert isinstance(out, RewardOutput)
    scores, info = out
    assert scores.shape == (2,) and scores.dtype == torch.float32
    if cls is PlainTupleReward:
        assert info == {"lengths": [1, 1]}
    else:
        assert info == {}


def test_plain_plugin_card_has_neutral_defaults() -> None:
    card = reward_card(PlainTensorReward(), name="plain")
    assert card.name == "plain"
    assert card.summary == "A minimal plugin that does not subclass Reward: returns a bare tensor."
    assert card.version == "unversioned"
    assert card.higher_is_better and card.deterministic and not card.differentiable
    assert card.weights == "none"


def test_card_reads_declared_in_use_and_legacy_weight_specs() -> None:
    spec, local = WeightsSpec("org/model", license="MIT"), WeightsSpec("/my/copy")

    class Declared(Reward):
        weights_spec = spec

        def __init__(self, weights=None):
            if weights is not None:
                self.weights_in_use = WeightsSpec(str(weights))

    class Legacy(Reward):  # a plugin written against the old name: `weights` as the declared spec
        weights = (spec,)

    class NotSpecs:  # `weights` meaning something else entirely is not read as weight sources
        weights = [0.5, 0.5]

    assert specs_of(Declared) == specs_of(Declared()) == (spec,)
    assert specs_of(Declared(weights="/my/copy")) == (local,)
    assert specs_of(Legacy) == specs_of(Legacy()) == (spec,)
    assert specs_of(NotSpecs()) == ()
    assert reward_card(Legacy()).weights == "org/model" and reward_card(Legacy()).license == "MIT"
    assert reward_card(Declared(weights="/my/copy")).weights == "/my/copy"


@pytest.mark.parametrize("error", [WeightsNotAvailable, DependencyNotInstalled])
def test_missing_weights_or_dependency_is_not_reported_as_a_contract_violation(error) -> None:
    def needs_weights(images, prompts, metadata):
        raise error("weights absent; run `rlbench rewards download x`")

    with pytest.raises(error, match="rlbench rewards download x"):
        check_reward(GenericTestReward(needs_weights))


# -- the CheckedReward boundary ---------------------------------------------------------------------


def test_checked_reward_raises_the_check_reward_error_during_a_normal_call(register_reward) -> None:
    register_reward("nan-reward", GenericTestReward(_nan))
    reward = make_reward("nan-reward")
    assert isinstance(reward, CheckedReward)
    images, prompts = random_images(3, 16), ["a", "b", "c"]
    with pytest.raises(RewardContractError) as during_call:
        reward(images, prompts)
    with pytest.raises(RewardContractError) as during_check:
        check_reward(reward)
    assert str(during_call.value) == str(during_check.value)
    assert "reward 'nan-reward' returned non-finite scores" in str(during_call.value)


def test_checked_reward_wraps_instances_directly() -> None:
    reward = CheckedReward(GenericTestReward(_float64), name="f64")
    with pytest.raises(RewardContractError, match="dtype torch.float64"):
        reward(random_images(2, 8), ["a", "b"])
    with pytest.raises(RewardContractError, match="not callable"):
        CheckedReward(object(), name="nope")


def test_checked_reward_fills_metadata_and_passes_attributes_through() -> None:
    seen = {}

    def fn(images, prompts, metadata):
        seen["metadata"] = metadata
        return images.mean(dim=(1, 2, 3))

    inner = GenericTestReward(fn)
    reward = CheckedReward(inner, name="m")
    scores, info = reward(random_images(2, 8), ["a", "b"])
    assert seen["metadata"] == [{}, {}]
    assert reward.score_fn is fn  # attribute access falls through
    assert torch.equal(scores, random_images(2, 8).mean(dim=(1, 2, 3)))


BAD_INPUTS = [
    pytest.param(lambda: ((random_images(2, 8) * 255).to(torch.uint8), ["a", "b"], None),
                 ["torch.uint8", "images.float() / 255"], id="uint8"),
    pytest.param(lambda: (random_images(2, 8) * 2 - 1, ["a", "b"], None),
                 ["must lie in [0, 1]", "(images + 1) / 2"], id="minus-one-to-one"),
    pytest.param(lambda: (random_images(2, 8), ["a"], None), ["2 strings (one per image)", "got 1"],
                 id="prompt-count"),
    pytest.param(lambda: (random_images(2, 8), "a prompt", None), ["list of 2 strings"], id="prompt-str"),
    pytest.param(lambda: (torch.rand(2, 4, 8, 8), ["a", "b"], None), ["(B, 3, H, W)", "(2, 4, 8, 8)"],
                 id="four-channels"),
    pytest.param(lambda: (torch.rand(3, 8, 8), ["a", "b", "c"], None), ["(B, 3, H, W)"], id="no-batch-dim"),
    pytest.param(lambda: (np.random.rand(2, 8, 8, 3).astype(np.float32), ["a", "b"], None),
                 ["torch.Tensor", "ndarray"], id="numpy-images"),
    pytest.param(lambda: (random_images(2, 8).double(), ["a", "b"], None), ["torch.float64", "images.float()"],
                 id="float64-images"),
    pytest.param(lambda: (random_images(2, 8), ["a", "b"], [{}]), ["metadata must be a list of 2 dicts"],
                 id="metadata-count"),
]


@pytest.mark.parametrize("make_inputs, fragments", BAD_INPUTS)
def test_bad_inputs_raise_input_error(make_inputs, fragments) -> None:
    reward = make_reward("incompressibility")
    images, prompts, metadata = make_inputs()
    with pytest.raises(InputError) as info:
        reward(images, prompts, metadata)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_nan_pixels_are_an_input_error() -> None:
    images = random_images(1, 4)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        make_reward("incompressibility")(images, ["a"])


# -- conformance: every registered reward -----------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """Where the tiny random weights of the weight-backed rewards are written (once per session)."""
    return tmp_path_factory.mktemp("tiny-zoo")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", REWARDS.names(), ids=REWARDS.names())
def test_every_registered_reward_passes_check_reward(name, tiny_zoo) -> None:
    # No skips: a weight-backed reward loads tiny random weights, written in its official formats by
    # rlbench.testing, through its normal loading path; the others load what ships with them.
    reward = tiny_reward(name, tiny_zoo)
    check_reward(reward)
    assert reward.card.name == name


def test_tiny_instances_are_of_registered_zoo_rewards_and_declare_hub_or_url_weights() -> None:
    for name in TINY_REWARDS:
        assert REWARDS.entry(name).target.startswith("rlbench.rewards."), name
        assert any(s.source != "rlbench" for s in specs_of(REWARDS.load(name))), name


# -- construction options ---------------------------------------------------------------------------


def test_make_reward_passes_options_and_rejects_unknown_ones() -> None:
    from rlbench.errors import ConfigError

    assert make_reward("incompressibility", num_workers=1).num_workers == 1
    with pytest.raises(ConfigError) as info:
        make_reward("incompressibility", bogus=1)
    assert "reward 'incompressibility' has no option 'bogus'; its options are: num_workers" in str(info.value)
    with pytest.raises(ConfigError, match="rejected options"):
        make_reward("incompressibility", num_workers=-1)


def test_registered_class_is_constructed_and_instance_used_as_is(register_reward) -> None:
    from rlbench.errors import ConfigError

    register_reward("plain-class", PlainTupleReward)
    assert isinstance(make_reward("plain-class").reward, PlainTupleReward)
    instance = PlainTensorReward()
    register_reward("plain-instance", instance)
    assert make_reward("plain-instance").reward is instance
    with pytest.raises(ConfigError, match="ready-made instance"):
        make_reward("plain-instance", size=3)
