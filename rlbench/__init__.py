"""rlbench: a reward-model zoo and benchmarking toolkit for RL fine-tuning of text-to-image diffusion.

The public API mirrors the CLI::

    import rlbench
    reward = rlbench.make_reward("incompressibility")      # the one front door for rewards
    scores, info = reward(images, prompts, metadata)       # images: float32 (B,3,H,W) in [0,1]
    rlbench.check_reward(reward)                           # validate any reward, built-in or yours
    run_dir = rlbench.train(values={"algorithm": {"name": "ddpo-is"}})
    result = rlbench.evaluate([run_dir], rewards=["incompressibility"], out="eval")

Importing rlbench imports no plugin and no torch-heavy module; names resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Reward": "rlbench.reward",
    "RewardOutput": "rlbench.reward",
    "WeightsSpec": "rlbench.weights",
    "CheckedReward": "rlbench.reward",
    "make_reward": "rlbench.registry",
    "check_reward": "rlbench.checker",
    "TrainConfig": "rlbench.config",
    "load_config": "rlbench.config",
    "PromptSet": "rlbench.prompts",
    "load_prompts": "rlbench.prompts",
    "RunDir": "rlbench.train.rundir",
    "REWARDS": "rlbench.registry",
    "ALGORITHMS": "rlbench.registry",
    "MODELS": "rlbench.registry",
    "PROMPTS": "rlbench.registry",
    "train": "rlbench.train.trainer",
    "evaluate": "rlbench.eval.evaluate",
    "ddim_step_with_logprob": "rlbench.diffusion.ddim",
    "load_policy": "rlbench.diffusion.policy",
    "load_trained_policy": "rlbench.train.rundir",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
