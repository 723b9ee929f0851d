"""``check_reward``: validate any reward against the contract (after Gymnasium's ``check_env``).

Run it in a plugin's CI::

    from rlbench import check_reward
    check_reward(MyReward())

or from the shell: ``rlbench rewards check NAME``. Each check is a function of its own; a failed
check raises :class:`~rlbench.errors.RewardContractError` naming the reward and what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlbench.errors import DependencyNotInstalled, RewardContractError, WeightsNotAvailable
from rlbench.reward import CheckedReward, RewardOutput, check_output, reward_card

# A mix of short, ordinary and over-long prompts (diffusers' "100 * very long" batch check).
DEFAULT_PROMPTS = ("a photo of a cat", "two red circles left of a blue square", "a " + "very long " * 100 + "prompt")


def _name(reward: Any) -> str:
    return reward.name if isinstance(reward, CheckedReward) else reward_card(reward).name


def _raw(reward: Any) -> Any:
    return reward.reward if isinstance(reward, CheckedReward) else reward


def example_inputs(
    reward: Any, batch_size: int = 3, image_size: int = 64, seed: int = 0
) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Inputs for the checks. A reward may provide ``example_inputs(batch_size, image_size, seed)``."""
    provider = getattr(_raw(reward), "example_inputs", None)
    if callable(provider):
        images, prompts, metadata = provider(batch_size=batch_size, image_size=image_size, seed=seed)
        return images, list(prompts), list(metadata)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=g)
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(batch_size)]
    return images, prompts, [{} for _ in range(batch_size)]


def _call(reward: Any, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> RewardOutput:
    name = _name(reward)
    try:
        out = _raw(reward)(images, list(prompts), list(metadata))
    except (DependencyNotInstalled, WeightsNotAvailable):
        raise  # not a contract violation: the message names the install or download that fixes it
    except Exception as exc:
        raise RewardContractError(
            f"reward '{name}' raised {type(exc).__name__} when called as reward(images, prompts, metadata) "
            f"with images {tuple(images.shape)} float32 in [0, 1]: {exc}"
        ) from exc
    return check_output(name, out, images.shape[0])


def check_output_contract(reward: Any, images, prompts, metadata) -> RewardOutput:
    """Scores are a float32 tensor of shape (B,), finite; info (if any) is a dict."""
    return _call(reward, images, prompts, metadata)


def check_inputs_untouched(reward: Any, images, prompts, metadata) -> None:
    """The reward must not modify the images or prompts it is given."""
    img_copy, prompts_copy = images.clone(), list(prompts)
    _call(reward, images, prompts, metadata)
    if not torch.equal(images, img_copy) or list(prompts) != prompts_copy:
        raise RewardContractError(
            f"reward '{_name(reward)}' modified its input images or prompts in place; work on a copy "
            "(e.g. images = images.clone())."
        )


def check_determinism(reward: Any, images, prompts, metadata, atol: float = 1e-5) -> None:
    """A reward declared deterministic returns the same scores for the same inputs."""
    a = _call(reward, images, prompts, metadata).scores.detach().cpu()
    b = _call(reward, images, prompts, metadata).scores.detach().cpu()
    if not torch.allclose(a, b, rtol=0.0, atol=atol):
        diff = float((a - b).abs().max())
        raise RewardContractError(
            f"reward '{_name(reward)}' is declared deterministic but two calls on the same inputs differ "
            f"by up to {diff:.3g}; fix the randomness, or declare `deterministic = False`."
        )


def check_batch_invariance(reward: Any, images, prompts, metadata, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Image i's score must not depend on the rest of its batch (batch of B vs. B batches of 1)."""
    batched = _call(reward, images, prompts, metadata).scores.detach().cpu()
    for i in range(images.shape[0]):
        single = _call(reward, images[i : i + 1], prompts[i : i + 1], metadata[i : i + 1]).scores.detach().cpu()
        if not torch.allclose(batched[i : i + 1], single, rtol=rtol, atol=atol):
            raise RewardContractError(
                f"reward '{_name(reward)}' is not batch-size invariant: image {i} scores "
                f"{float(batched[i]):.6g} in a batch of {images.shape[0]} but {float(single[0]):.6g} alone; "
                "a score must depend only on its own image, prompt and metadata."
            )


def check_reward(
    reward: Any,
    *,
    batch_size: int = 3,
    image_size: int = 64,
    seed: int = 0,
    atol: float = 1e-4,
    skip_batch_invariance: bool = False,
) -> None:
    """Validate ``reward`` against the reward contract; raise RewardContractError on the first failure.

    Checks, in order: output contract (shape ``(B,)``, float32, finite, info a dict), inputs left
    untouched, determinism (skipped when the reward declares ``deterministic = False``), batch-size
    invariance (also skipped for nondeterministic rewards), and a batch of one.

    Args:
        reward: a reward instance, plugin or :class:`~rlbench.reward.CheckedReward`.
        batch_size: images per checked batch.
        image_size: side of the random square test images.
        seed: seed of the random test images.
        atol: absolute tolerance of the determinism and batch-invariance checks.
        skip_batch_invariance: for rewards whose batched math (e.g. padded fp16 attention) differs slightly.
    """
    if not callable(_raw(reward)):
        raise RewardContractError(
            f"reward '{_name(reward)}' is not callable; implement __call__(images, prompts, metadata)."
        )
    images, prompts, metadata = example_inputs(reward, batch_size=batch_size, image_size=image_size, seed=seed)
    # On a copy: a reward that writes into its inputs must not alter the originals before
    # check_inputs_untouched compares against them (an idempotent write would go unnoticed).
    check_output_contract(reward, images.clone(), list(prompts), [dict(m) for m in metadata])
    check_inputs_untouched(reward, images, prompts, metadata)
    deterministic = bool(getattr(_raw(reward), "deterministic", True))
    if deterministic:
        check_determinism(reward, images, prompts, metadata, atol=atol)
        if not skip_batch_invariance:
            check_batch_invariance(reward, images, prompts, metadata, atol=atol)
    check_output_contract(reward, images[:1], prompts[:1], metadata[:1])
