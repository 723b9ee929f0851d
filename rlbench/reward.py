"""The reward contract.

A reward maps a batch of images and their prompts to one score per image::

    reward(images, prompts, metadata) -> scores | (scores, info)

* ``images``: ``torch.float32`` tensor of shape ``(B, 3, H, W)`` with values in ``[0, 1]``;
* ``prompts``: a list of ``B`` strings; ``metadata``: a list of ``B`` dicts;
* ``scores``: a float32 tensor of shape ``(B,)``, finite; ``info``: an optional dict of extras.

Any class with no required constructor arguments whose instances behave like this is a reward
plugin. Subclassing :class:`Reward` adds declared metadata (the reward's card) and normalises the
return value to :class:`RewardOutput`. Whatever the plugin, rlbench calls it through
:class:`CheckedReward`, which validates inputs and outputs at that boundary with the same messages as
:func:`rlbench.check_reward`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from rlbench.errors import InputError, RewardContractError
from rlbench.weights import WeightsSpec, specs_of


@dataclass
class RewardOutput:
    """Scores of a batch plus optional per-batch extras. Unpacks as ``scores, info``."""

    scores: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        yield self.scores
        yield self.info


class Reward:
    """Optional base class for rewards: declare metadata, implement :meth:`score`.

    Class attributes form the reward's card (``rlbench rewards info NAME``). Bump ``version`` on any
    change that alters scores: results record it.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""  # one line: what it measures
    higher_is_better: ClassVar[bool] = True
    deterministic: ClassVar[bool] = True
    differentiable: ClassVar[bool] = False
    score_range: ClassVar[str] = ""  # e.g. "[0, inf) kB"
    paper: ClassVar[str] = ""
    weights_spec: ClassVar[WeightsSpec | tuple[WeightsSpec, ...] | None] = None  # declared sources, see rlbench.weights
    # Set by an instance whose options replace a declared source (e.g. ``weights=PATH``): what its card shows.
    weights_in_use: WeightsSpec | tuple[WeightsSpec, ...] | None = None
    extra: ClassVar[str | None] = None  # pip extra needed, e.g. "rlbench[vlm]"

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor | RewardOutput | tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"{type(self).__name__} must implement score(images, prompts, metadata)")

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> RewardOutput:
        if metadata is None:
            metadata = [{} for _ in prompts]
        out = self.score(images, prompts, metadata)
        if isinstance(out, RewardOutput):
            return out
        if isinstance(out, tuple):
            if len(out) == 2 and (out[1] is None or isinstance(out[1], Mapping)):
                return RewardOutput(out[0], dict(out[1] or {}))
            return out  # malformed: left for check_output to name the problem
        return RewardOutput(out, {})


@dataclass(frozen=True)
class RewardCard:
    """What a reward declares about itself; missing declarations get neutral defaults."""

    name: str
    version: str
    summary: str
    higher_is_better: bool
    deterministic: bool
    differentiable: bool
    score_range: str
    paper: str
    weights: str
    license: str
    extra: str
    origin: str = "local"
    target: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def reward_card(reward: Any, name: str | None = None, origin: str = "local", target: str = "") -> RewardCard:
    """Read the card of any reward (class or instance, subclass of :class:`Reward` or not)."""
    inner = reward.reward if isinstance(reward, CheckedReward) else reward
    specs = specs_of(inner)
    doc = inspect.getdoc(inner if inspect.isclass(inner) else type(inner)) or ""
    return RewardCard(
        name=name or getattr(inner, "name", "") or getattr(inner, "__name__", type(inner).__name__),
        version=str(getattr(inner, "version", "unversioned")),
        summary=getattr(inner, "summary", "") or doc.split("\n\n")[0].replace("\n", " "),
        higher_is_better=bool(getattr(inner, "higher_is_better", True)),
        deterministic=bool(getattr(inner, "deterministic", True)),
        differentiable=bool(getattr(inner, "differentiable", False)),
        score_range=getattr(inner, "score_range", "") or "",
        paper=getattr(inner, "paper", "") or "",
        weights=" + ".join(str(s) for s in specs) or "none",
        license="; ".join(dict.fromkeys(s.license for s in specs if s.license)),
        extra=getattr(inner, "extra", None) or "",
        origin=origin,
        target=target,
    )


# -- validation at the boundary ------------------------------------------------------------------


def check_inputs(images: Any, prompts: Any, metadata: Any) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Validate a reward call's inputs; return them with metadata filled in. Never rescales."""
    if not isinstance(images, torch.Tensor):
        raise InputError(
            f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}; "
            "convert with torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255 for uint8 HWC arrays."
        )
    if images.dtype != torch.float32:
        raise InputError(
            f"images must be float32 in [0, 1], got {images.dtype}; "
            + ("divide uint8 images by 255: images.float() / 255." if images.dtype == torch.uint8
               else "convert with images.float().")
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}.")
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if not (0.0 <= lo and hi <= 1.0):
            raise InputError(
                f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; images in [-1, 1] map "
                "to [0, 1] with (images + 1) / 2. (NaN pixels also fail this check.)"
            )
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a list of {images.shape[0]} strings, got {type(prompts).__name__}.")
    prompts = list(prompts)
    if len(prompts) != images.shape[0] or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"prompts must be a list of {images.shape[0]} strings (one per image), got {len(prompts)} items.")
    if metadata is None:
        metadata = [{} for _ in prompts]
    metadata = list(metadata)
    if len(metadata) != len(prompts) or not all(isinstance(m, Mapping) for m in metadata):
        raise InputError(f"metadata must be a list of {len(prompts)} dicts (one per image).")
    return images, prompts, metadata


def check_output(name: str, out: Any, batch: int) -> RewardOutput:
    """Normalise a reward's return value to :class:`RewardOutput`, or raise RewardContractError."""
    if isinstance(out, RewardOutput):
        scores, info = out.scores, out.info
    elif isinstance(out, tuple):
        if len(out) != 2:
            raise RewardContractError(
                f"reward '{name}' returned a tuple of {len(out)} items; return scores or (scores, info)."
            )
        scores, info = out
    else:
        scores, info = out, {}
    if info is None:
        info = {}
    if not isinstance(info, Mapping):
        raise RewardContractError(f"reward '{name}' returned info of type {type(info).__name__}; info must be a dict.")
    if not isinstance(scores, torch.Tensor):
        raise RewardContractError(
            f"reward '{name}' returned scores of type {type(scores).__name__}; return a torch.Tensor of "
            f"shape ({batch},) (wrap numpy with torch.from_numpy(x).float())."
        )
    if tuple(scores.shape) != (batch,):
        raise RewardContractError(
            f"reward '{name}' returned scores of shape {tuple(scores.shape)} for {batch} images; "
            f"expected ({batch},), one score per image (e.g. scores.reshape({batch}))."
        )
    if scores.dtype != torch.float32:
        raise RewardContractError(
            f"reward '{name}' returned scores of dtype {scores.dtype}; expected torch.float32 (scores.float())."
        )
    finite = torch.isfinite(scores.detach())
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise RewardContractError(
            f"reward '{name}' returned non-finite scores (NaN or inf) for images {bad[:8]}"
            f"{'...' if len(bad) > 8 else ''} of {batch}; scores must be finite."
        )
    return RewardOutput(scores, dict(info))


class CheckedReward:
    """A reward called through the contract: inputs and outputs validated on every call.

    This is what :func:`rlbench.make_reward` returns and what training and evaluation call.
    Attribute access falls through to the wrapped reward.
    """

    def __init__(self, reward: Any, name: str, origin: str = "local", target: str = "") -> None:
        if not callable(reward):
            raise RewardContractError(
                f"reward '{name}' is a {type(reward).__name__}, which is not callable; a reward is called "
                "as reward(images, prompts, metadata)."
            )
        self.reward = reward
        self.name = name
        self.card = reward_card(reward, name=name, origin=origin, target=target)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping] | None = None) -> RewardOutput:
        images, prompts, metadata = check_inputs(images, prompts, metadata)
        return check_output(self.name, self.reward(images, prompts, metadata), images.shape[0])

    def __getattr__(self, item: str) -> Any:
        return getattr(self.__dict__["reward"], item)

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r}, version={self.card.version}, origin={self.card.origin})"
