"""The algorithm contract (``rlbench.algorithms`` registry) and the machinery updates share.

An algorithm plugin is a class with:

* ``Options``: a dataclass of its own hyperparameters (``[algorithm]`` keys), each with help text;
* ``adjust(config, options) -> (changes, notices)``: config values it sets for itself (applied and
  reported once, when the configuration is resolved; see :func:`rlbench.config.resolve`);
* ``validate(config, options)``: raise :class:`~rlbench.errors.ConfigError` for combinations it
  cannot run (it never changes the config);
* ``advantages(rewards, prompts)``: per-sample weights from the epoch's gathered rewards;
* ``update(policy, batch, ctx) -> metrics``: the epoch's gradient steps;
* ``state_dict()`` / ``load_state_dict(state)``: state carried across epochs (DDPO's per-prompt
  reward buffers), saved in every checkpoint so a resumed run continues exactly.

Each family keeps a pure loss function next to its class, unit-tested on hand-made tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlbench.errors import ConfigError
from rlbench.registry import ALGORITHMS

# Annotations name rlbench.config.TrainConfig as a string: config resolution loads algorithm
# classes (rlbench.config -> rlbench.algorithm), so this contract must not import the config back.


@dataclass
class TrainBatch:
    """One epoch's samples on this process (N samples, T stored (stochastic) denoising steps).

    ``prompt_embeds``/``neg_embeds`` hold the prompts' conditioning of any model family
    (:class:`~rlbench.diffusion.conditioning.Conditioning`; a bare tensor is a UNet's text embeddings).
    ``timesteps`` are the stored steps' keys (DDIM timesteps; flow sigma triples): (T, ...) shared by every
    sample, or (N, T, ...) with ``per_sample_keys`` (an SDE window whose start differs between batches).
    """

    latents: torch.Tensor  # (N, T+1, ...): the states entering and leaving the stored steps (x_T ... x_0 for DDIM)
    log_probs: torch.Tensor  # (N, T) log-prob of each step under the sampling weights
    timesteps: torch.Tensor  # (T, ...) or (N, T, ...)
    prompt_embeds: Any  # Conditioning (N rows)
    neg_embeds: Any  # Conditioning (1 row)
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,): advantages (DDPO) or sample weights (RWR)
    prompts: list[str]
    final: torch.Tensor | None = None  # (N, ...) x_0; latents[:, -1] when the stored steps end the chain
    per_sample_keys: bool = False

    def __post_init__(self) -> None:
        from rlbench.diffusion.conditioning import as_conditioning

        self.prompt_embeds = as_conditioning(self.prompt_embeds)
        self.neg_embeds = as_conditioning(self.neg_embeds)
        if self.final is None and self.latents is not None:
            self.final = self.latents[:, -1]

    def __len__(self) -> int:
        return (self.latents if self.latents is not None else self.final).shape[0]

    def step_keys(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The keys of stored steps ``steps`` (mb, k) of samples ``rows`` (mb, 1): (mb, k, ...)."""
        keys = self.timesteps.to(steps.device)
        return keys[rows, steps] if self.per_sample_keys else keys[steps]


@dataclass
class UpdateContext:
    """What an update needs besides the policy and the batch."""

    config: "TrainConfig"
    optimizer: torch.optim.Optimizer
    accelerator: Any
    generator: torch.Generator  # training randomness: permutations, RWR noise and timesteps
    params: list[torch.nn.Parameter]
    policy: Any  # the DiffusionPolicy being trained (its forward module is DDP-wrapped when distributed)
    steps: int = 0  # optimizer steps taken so far in this update
    # The base model, for algorithms whose uses_reference() is true (GRPO's KL anchor): a
    # rlbench.diffusion.policy.BaseWeights made before any checkpoint loaded; `with ctx.reference.active():`
    # the policy computes the base model.
    reference: Any = None
    reward: Any = None  # the training reward (a CheckedReward), for algorithms that score inside update()
    epoch: int = 0  # the epoch being trained (0-based), for schedules across epochs (DiffusionNFT's old-policy decay)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Backward of one micro-step; on ``sync`` also all-reduce, clip and take the optimizer step.

        Gradients are all-reduced across processes only on the step that syncs (DDP ``no_sync``
        on the others), and they are really all-reduced: the forward ran through the DDP-wrapped
        UNet (``policy.forward_module``), unlike early LoRA implementations that bypassed it.
        """
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.policy.forward_module):
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
    # True: updates re-run the UNet on the stored trajectory's denoising steps (DDPO);
    # False: one UNet call per sample per inner epoch (RWR's denoising regression).
    trains_on_trajectory: ClassVar[bool] = True
    # True: the algorithm samples and scores inside its own update with gradients through the sampler
    # (DRaFT, AlignProp): the trainer calls train_direct() instead of sample -> score -> advantages -> update.
    direct: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any, config: "TrainConfig") -> None:
        self.options = options
        self.config = config

    @classmethod
    def adjust(cls, config: "TrainConfig", options: Any) -> tuple[dict[str, Any], list[str]]:
        """Config values this algorithm sets for itself, ``{"section.key": value}``, and a notice for each.

        Called once while the configuration is resolved, before it is validated (so read values
        defensively); the resolution applies the changes and prints the notices.
        """
        return {}, []

    @classmethod
    def validate(cls, config: "TrainConfig", options: Any) -> None:
        """Raise ConfigError for settings this algorithm cannot run. Never changes ``config``."""

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def part_advantages(self, name: str, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``advantage.aggregate = "gdpo"``: the advantages of one component of a combined reward on its
        own; the trainer sums them with the components' weights and batch-normalises (GDPO)."""
        raise ConfigError(
            f"algorithm {self.name!r} has no per-reward advantages, so advantage.aggregate = 'gdpo' cannot apply; "
            "use advantage.aggregate = 'sum'."
        )

    def finish_gdpo(self, advantages: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``advantage.aggregate = "gdpo"``: a last look at the aggregated advantages (GRPO keeps groups flat in
        every reward at exactly 0); unchanged by default."""
        return advantages

    def uses_reference(self) -> bool:
        """Whether updates need the base model (``ctx.reference``), e.g. for a KL penalty to it."""
        return False

    def shares_initial_noise(self) -> bool:
        """Whether the images of one prompt in an epoch start from the same x_T (DanceGRPO's init_same_noise)."""
        return False

    def train_direct(self, policy: Any, batches: list[tuple[list[str], list[dict]]], ctx: UpdateContext
                     ) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
        """``direct`` algorithms: the epoch's training from its prompt batches. Returns, per batch, a dict with
        ``images`` (detached, (B,3,H,W) in [0,1]) and ``scores`` ((B,) float32, CPU) as sampled before that
        batch's update, and the epoch's metrics."""
        raise NotImplementedError

    def update(self, policy: Any, batch: TrainBatch, ctx: UpdateContext) -> dict[str, float | None]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state carried across epochs (checkpointed); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def save_tensors(self, folder: Any) -> None:
        """Write tensor state carried across epochs into a checkpoint folder (safetensors), e.g. DiffusionNFT's old
        policy; nothing by default."""

    def load_tensors(self, folder: Any) -> None:
        """Restore :meth:`save_tensors` from a checkpoint folder (called after the policy's weights loaded)."""

    def sampling_weights(self, policy: Any) -> Any:
        """A context manager around an epoch's training rollouts: the weights they sample with (DiffusionNFT: its
        old policy); the current weights by default."""
        return contextlib.nullcontext()

    def setup(self, policy: Any) -> None:
        """Called once the policy is set up for training, before any checkpoint loads (e.g. to copy its weights)."""


def make_algorithm(config: "TrainConfig") -> Algorithm:
    """The algorithm of a resolved config (``rlbench.config.load_config``), constructed with its typed options."""
    cls = ALGORITHMS.load_subclass(config.algorithm.name, Algorithm)
    opt_cls = getattr(cls, "Options", None)
    options = opt_cls(**config.algorithm.options) if dataclasses.is_dataclass(opt_cls) else None
    return cls(options, config)


def option(default: Any, help: str) -> Any:
    """A documented ``Options`` field."""
    return dataclasses.field(default=default, metadata={"help": help})
