"""A weighted sum of registered rewards, usable wherever one reward name is (``--reward a:1.0,b:0.5``).

Spec syntax: components ``NAME[:WEIGHT]`` joined by ``+`` (or ``,`` where a single reward is expected,
as in ``rlbench train --reward aesthetic:1.0,imagereward:0.5``); a missing weight is 1. Options of a
component are prefixed with its name: ``--reward-opt imagereward.batch_size=8``.

The combined score is ``sum_i w_i * score_i``; ``info["components"]`` holds every component's own
scores, which training logs as ``reward_mean/<name>`` beside the combined ``reward_mean``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rlbench.errors import ConfigError
from rlbench.reward import CheckedReward, Reward, RewardOutput


def is_combination(spec: str) -> bool:
    return any(sep in spec for sep in ("+", ",", ":"))


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"a:1.0+b:0.5"`` (or with commas) -> ``[("a", 1.0), ("b", 0.5)]``; ConfigError on bad syntax."""
    parts = [p.strip() for p in spec.replace(",", "+").split("+")]
    if not all(parts):
        raise ConfigError(f"reward spec {spec!r} has an empty component; write NAME[:WEIGHT] joined by '+' or ','.")
    out: list[tuple[str, float]] = []
    for part in parts:
        name, _, weight = part.partition(":")
        name = name.strip()
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ConfigError(f"reward spec {spec!r}: weight {weight!r} of '{name}' is not a number "
                              "(write NAME:WEIGHT, e.g. aesthetic:0.5).") from None
        if not math.isfinite(w):
            raise ConfigError(f"reward spec {spec!r}: the weight of '{name}' must be finite, got {weight!r}.")
        if any(name == n for n, _ in out):
            raise ConfigError(f"reward spec {spec!r} names '{name}' twice; give each reward once with its weight.")
        out.append((name, w))
    return out


def split_options(components: Sequence[str], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Route ``NAME.key`` options to component ``NAME``; anything else is an error naming the fix."""
    routed: dict[str, dict[str, Any]] = {name: {} for name in components}
    for key, value in options.items():
        # Names may contain dots themselves: the longest component name that prefixes the key owns it.
        owner = next((c for c in sorted(components, key=len, reverse=True) if key.startswith(c + ".")), None)
        if owner is None:
            raise ConfigError(
                f"option {key!r} of a combined reward must name its component: write "
                f"{components[0]}.{key}=VALUE (components: {', '.join(components)})."
            )
        routed[owner][key[len(owner) + 1 :]] = value
    return routed


class WeightedSum(Reward):
    """``sum_i w_i * r_i(images, prompts)`` over checked component rewards, each component reported."""

    name = "weighted-sum"
    summary = "Weighted sum of registered rewards."

    def __init__(self, components: Sequence[tuple[str, float, CheckedReward]]) -> None:
        if not components:
            raise ConfigError("a combined reward needs at least one component.")
        self.components = list(components)
        cards = [c.card for _, _, c in self.components]
        self.spec = "+".join(f"{n}:{w:g}" for n, w, _ in self.components)
        self.version = "+".join(f"{c.name}@{c.version}" for c in cards)
        self.deterministic = all(c.deterministic for c in cards)
        self.differentiable = all(c.differentiable for c in cards)
        self.summary = "Weighted sum: " + ", ".join(f"{w:g} x {n}" for n, w, _ in self.components)

    def example_inputs(self, batch_size: int = 3, image_size: int = 64, seed: int = 0):
        """The first component's own example inputs (a shapes reward needs shapes captions), else generic ones."""
        from rlbench import checker

        for _, _, reward in self.components:
            if callable(getattr(reward.reward, "example_inputs", None)):
                return checker.example_inputs(reward, batch_size=batch_size, image_size=image_size, seed=seed)
        return checker.example_inputs(object(), batch_size=batch_size, image_size=image_size, seed=seed)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> RewardOutput:
        total = None
        parts: dict[str, torch.Tensor] = {}
        for name, weight, reward in self.components:
            s = reward(images, prompts, metadata).scores
            parts[name] = s
            total = weight * s if total is None else total + weight * s
        return RewardOutput(total.float(), {"components": parts})
