"""The algorithm contract (``rlbench.algorithms`` registry) and the machinery updates share.

An algorithm plugin is a class with:

* ``Options``: a dataclass of its own hyperparameters (``[algorithm]`` keys), each with help text;
* ``validate(config)``: raise :class:`~rlbench.errors.ConfigError` for combinations it cannot run;
* ``advantages(rewards, prompts, tracker)``: per-sample weights from the epoch's gathered rewards;
* ``update(policy, batch, ctx) -> metrics``: the epoch's gradient steps.

Each family keeps a pure loss function next to its class, unit-tested on hand-made tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlbench.config import TrainConfig, _coerce
from rlbench.errors import ConfigError
from rlbench.registry import ALGORITHMS


@dataclass
class TrainBatch:
    """One epoch's samples on this process (N samples, T denoising steps)."""

    latents: torch.Tensor  # (N, T+1, C, h, w): x_T ... x_0
    log_probs: torch.Tensor  # (N, T) log-prob of each step under the sampling weights
    timesteps: torch.Tensor  # (T,)
    prompt_embeds: torch.Tensor  # (N, L, D)
    neg_embeds: torch.Tensor  # (1, L, D)
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,): advantages (DDPO) or sample weights (RWR)
    prompts: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> TrainBatch:
        return TrainBatch(
            self.latents[index], self.log_probs[index], self.timesteps, self.prompt_embeds[index],
            self.neg_embeds, self.rewards[index], self.advantages[index], [self.prompts[i] for i in index.tolist()],
        )


@dataclass
class UpdateContext:
    """What an update needs besides the policy and the batch."""

    config: TrainConfig
    optimizer: torch.optim.Optimizer
    accelerator: Any
    generator: torch.Generator  # training randomness: permutations, RWR noise and timesteps
    params: list[torch.nn.Parameter]
    model: Any = None  # the module forwards run through (DDP-wrapped when distributed)
    steps: int = 0  # optimizer steps taken so far in this update

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Backward of one micro-step; on ``sync`` also all-reduce, clip and take the optimizer step.

        Gradients are all-reduced across processes only on the step that syncs (DDP ``no_sync``
        on the others), and they are really all-reduced: the forward ran through the DDP-wrapped
        UNet (``policy.model``), unlike early LoRA implementations that bypassed it.
        """
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
            self.accelerator.backward(loss)
        if sync:
            if self.config.train.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1


class Algorithm:
    """Base class of algorithm plugins."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # True: updates re-run the UNet on the stored trajectory's denoising steps (DDPO);
    # False: one UNet call per sample per inner epoch (RWR's denoising regression).
    trains_on_trajectory: ClassVar[bool] = True

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any, config: TrainConfig) -> None:
        self.options = options
        self.config = config

    @classmethod
    def validate(cls, config: TrainConfig, options: Any) -> list[str]:
        """Raise ConfigError for impossible settings; return notices to print. May adjust ``config``."""
        return []

    def advantages(self, rewards: torch.Tensor, prompts: list[str], tracker: Any) -> torch.Tensor:
        raise NotImplementedError

    def update(self, policy: Any, batch: TrainBatch, ctx: UpdateContext) -> dict[str, float | None]:
        raise NotImplementedError


def build_options(cls: type, options: dict[str, Any], algo: str) -> Any:
    """Validate ``[algorithm]`` keys against the plugin's ``Options`` dataclass."""
    opt_cls = getattr(cls, "Options", None)
    if opt_cls is None or not dataclasses.is_dataclass(opt_cls):
        if options:
            raise ConfigError(f"algorithm '{algo}' takes no options, got {sorted(options)}.")
        return None
    hints = typing.get_type_hints(opt_cls)
    names = [f.name for f in dataclasses.fields(opt_cls)]
    kwargs = {}
    for key, value in options.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean 'algorithm.{close[0]}'?" if close else ""
            raise ConfigError(
                f"algorithm '{algo}' has no option '{key}'.{hint} Its options: {', '.join(names) or 'none'}."
            )
        kwargs[key] = _coerce(f"algorithm.{key}", value, hints[key], "config")
    try:
        return opt_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"algorithm '{algo}': {exc}") from exc


def resolve_algorithm(config: TrainConfig) -> tuple[Algorithm, list[str]]:
    """Load, validate and construct ``config.algorithm`` (before any compute)."""
    name = config.algorithm.name
    cls = ALGORITHMS.load_subclass(name, Algorithm)
    options = build_options(cls, dict(config.algorithm.options), name)
    notices = cls.validate(config, options) or []
    if options is not None:  # write the full, resolved options back into the config
        config.algorithm.options = dataclasses.asdict(options)
    return cls(options, config), notices


def option(default: Any, help: str) -> Any:
    """A documented ``Options`` field."""
    return dataclasses.field(default=default, metadata={"help": help})
