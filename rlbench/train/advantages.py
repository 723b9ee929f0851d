"""Reward -> advantage normalisation for the DDPO family.

Two modes, both matching kvablack/ddpo-pytorch:

* :class:`PerPromptStatTracker` -- ``ddpo_pytorch/stat_tracking.py``: a ring buffer of past
  rewards per prompt; a prompt is z-scored against its own buffer once the buffer holds
  ``min_count`` rewards, and against the whole current batch before that.
* :func:`batch_normalize` -- ``scripts/train.py`` (``per_prompt_stat_tracking=False`` branch):
  one z-score over the whole batch.

Both use the population std (``np.std``, ddof=0) like the reference. Statistics are computed in
float64 (the reference works in whatever dtype the rewards arrive in); results are float32.
Unlike the reference, the tracker's buffers can be checkpointed (:meth:`state_dict`), so a
resumed run produces the same advantages as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rlbench.errors import RewardContractError

# ddpo-pytorch config/base.py: per_prompt_stat_tracking.buffer_size / .min_count (paper-scale
# dgx.py aesthetic/alignment configs use buffer_size=32, min_count=16).
BUFFER_SIZE = 16
MIN_COUNT = 16
# ddpo_pytorch/stat_tracking.py: `std = np.std(...) + 1e-6` (both the per-prompt and fallback branch).
TRACKER_STD_EPS = 1e-6
# scripts/train.py L435: `(rewards - rewards.mean()) / (rewards.std() + 1e-8)`.
BATCH_STD_EPS = 1e-8

RewardsLike = torch.Tensor | np.ndarray | Sequence[float]


def as_float64(rewards: RewardsLike) -> np.ndarray:
    """1-D float64 numpy copy of ``rewards``; rejects NaN/inf (they would poison a buffer for good)."""
    if isinstance(rewards, torch.Tensor):
        arr = rewards.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(rewards, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise RewardContractError("rewards contain NaN or inf; cannot turn them into advantages")
    return arr


def to_output(values: np.ndarray, like: RewardsLike) -> torch.Tensor:
    """float32 tensor, on the device of ``like`` when it is a tensor."""
    out = torch.from_numpy(values.astype(np.float32))
    return out.to(like.device) if isinstance(like, torch.Tensor) else out


def batch_normalize(rewards: RewardsLike) -> torch.Tensor:
    """``(r - mean) / (std + 1e-8)`` over the whole batch (ddpo-pytorch train.py L435, population std)."""
    r = as_float64(rewards)
    if r.size == 0:
        return to_output(r, rewards)
    return to_output((r - r.mean()) / (r.std() + BATCH_STD_EPS), rewards)


class PerPromptStatTracker:
    """Per-prompt running reward statistics (ddpo_pytorch/stat_tracking.py).

    For each prompt in the batch, its rewards are appended to a ``deque(maxlen=buffer_size)``
    *first*, then the prompt's advantages are ``(r - mean) / (std + 1e-6)`` with mean/std over
    the buffer if it holds at least ``min_count`` rewards, otherwise over the entire current batch
    (all prompts). Note that with ``buffer_size < min_count`` the per-prompt branch never fires.
    """

    def __init__(self, buffer_size: int = BUFFER_SIZE, min_count: int = MIN_COUNT) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self._buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: RewardsLike) -> torch.Tensor:
        """Push ``rewards`` into the buffers and return float32 advantages in input order."""
        r = as_float64(rewards)
        prompt_list = list(prompts)
        if not all(isinstance(p, str) for p in prompt_list):
            raise TypeError("prompts must be str (they key the buffers and the JSON state)")
        prompt_arr = np.asarray(prompt_list, dtype=object)
        if prompt_arr.shape != r.shape:
            raise ValueError(f"got {len(prompt_arr)} prompts for {r.size} rewards")
        advantages = np.empty_like(r)
        if r.size == 0:
            return to_output(advantages, rewards)
        batch_mean, batch_std = r.mean(), r.std()
        for prompt in dict.fromkeys(prompt_arr.tolist()):  # unique, first-seen order
            mask = prompt_arr == prompt
            buffer = self._buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = np.fromiter(buffer, dtype=np.float64, count=len(buffer))
                mean, std = values.mean(), values.std()
            advantages[mask] = (r[mask] - mean) / (std + TRACKER_STD_EPS)
        return to_output(advantages, rewards)

    def state_dict(self) -> dict[str, Any]:
        """Plain-python (JSON-serialisable) state; floats round-trip exactly through ``json``."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buf) for prompt, buf in self._buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore buffers from :meth:`state_dict`.

        With ``strict`` a differing ``buffer_size``/``min_count`` is an error (the advantages
        would no longer match an uninterrupted run); otherwise this tracker's own settings win
        and over-long buffers keep their newest entries, as the deque would have.
        """
        saved = (int(state["buffer_size"]), int(state["min_count"]))
        if strict and saved != (self.buffer_size, self.min_count):
            raise ValueError(
                f"tracker state has buffer_size/min_count {saved}, this tracker has "
                f"{(self.buffer_size, self.min_count)}; pass strict=False to adopt the new settings"
            )
        buffers: dict[str, deque[float]] = {}
        for prompt, values in state["buffers"].items():
            floats = [float(v) for v in values]
            if not all(math.isfinite(v) for v in floats):
                raise ValueError(f"tracker state for prompt {prompt!r} contains NaN or inf")
            buffers[str(prompt)] = deque(floats, maxlen=self.buffer_size)
        self._buffers = buffers


# -- group-relative advantages (GRPO) and multi-reward aggregation -------------------------------------

# flow_grpo/stat_tracking.py: `std = np.std(...) + 1e-4` (group and global branch alike).
GROUP_STD_EPS = 1e-4


def group_normalize(prompts: Sequence[str], rewards: RewardsLike, global_std: bool = True
                    ) -> tuple[torch.Tensor, np.ndarray]:
    """GRPO advantages over the groups of one epoch: ``(r - mean_group) / (std + 1e-4)``.

    A group is every reward of one prompt in this call (no buffer across epochs: Flow-GRPO clears its
    tracker every epoch). ``std`` is the group's own population std, or with ``global_std`` (Flow-GRPO's
    default) the std of all rewards in the call. Returns (advantages float32, a boolean mask of the
    samples whose group has zero spread: all its rewards equal, so it carries no signal).
    """
    r = as_float64(rewards)
    prompt_arr = np.asarray(list(prompts), dtype=object)
    if prompt_arr.shape != r.shape:
        raise ValueError(f"got {len(prompt_arr)} prompts for {r.size} rewards")
    advantages = np.zeros_like(r)
    flat = np.zeros(r.shape, dtype=bool)
    if r.size == 0:
        return to_output(advantages, rewards), flat
    all_std = r.std()
    for prompt in dict.fromkeys(prompt_arr.tolist()):
        mask = prompt_arr == prompt
        group = r[mask]
        std = all_std if global_std else group.std()
        advantages[mask] = (group - group.mean()) / (std + GROUP_STD_EPS)
        if group.max() == group.min():
            flat[mask] = True
            advantages[mask] = 0.0  # exactly: the mean of equal floats can differ from them by an ulp
    return to_output(advantages, rewards), flat


def gdpo_aggregate(parts: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """GDPO (Liu et al. 2026, arXiv 2601.05242): ``sum_i w_i A_i`` over each reward's own normalised
    advantages ``A_i``, then one batch-wise normalisation ``(x - mean) / (std + 1e-8)`` so the scale does
    not grow with the number of rewards. ``parts``: (weight, advantages) per reward."""
    if not parts:
        raise ValueError("gdpo needs at least one reward's advantages")
    total = sum(float(w) * as_float64(a) for w, a in parts)
    return batch_normalize(total)


def flat_group_fraction(prompts: Sequence[str], flat: np.ndarray) -> float:
    """The fraction of an epoch's prompt groups whose rewards were all equal (``flat`` per sample, from
    :func:`group_normalize`): Flow-GRPO's ``zero_std_ratio``."""
    groups = {p: bool(f) for p, f in zip(prompts, np.asarray(flat).tolist())}
    return sum(groups.values()) / max(len(groups), 1)
