"""Typed configuration of a training run.

A run is configured by :class:`TrainConfig`, a dataclass of sections (``[run]``, ``[model]``, ...).
Every field has help text and units (``rlbench config`` prints them all as annotated TOML). Sources,
later ones winning: the defaults, a TOML file (``--config FILE``), ``--set section.key=value``
overrides, then the CLI's own flags (``--algo``, ``--reward``, ...). Unknown keys, wrong types and
impossible combinations are :class:`~rlbench.errors.ConfigError` before any compute, with the fix in
the message. The resolved config is written into the run directory as ``config.toml``.

``[algorithm]`` and ``[reward]`` take a ``name`` plus that plugin's own options (e.g.
``algorithm.clip_range``, ``reward.weights``).

Resolution happens once (:func:`load_config`, :func:`resolve`): the layers are merged, the
algorithm's options typed against its ``Options`` dataclass, the algorithm's adjustments applied
(DDPO-SF sets the accumulation that makes one step per epoch) and reported as ``notices``, then the
whole configuration validated. The result is frozen: the rest of rlbench reads it and never
changes it (``with_changes`` makes a new, re-resolved one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlbench.errors import ConfigError, RLBenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _f(default: Any, help: str, unit: str = "", choices: tuple | None = None) -> Any:
    meta = {"help": help, "unit": unit, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunSection:
    """Identity and length of the run."""

    epochs: int = _f(100, "Training epochs (one epoch = sample, score, update)", "epochs")
    seed: int = _f(42, "Seed of every random number generator (ddpo-pytorch default 42)")
    out: str = _f("", "Run directory; empty = runs/<algo>-<reward>-<UTC timestamp>", "path")


@dataclass(frozen=True)
class ModelSection:
    """The policy: which text-to-image model and what is trained."""

    name: str = _f("shapes", "Registered model name (`rlbench models list`), diffusers folder or hub id")
    revision: str = _f("", "Hub revision (commit) of a hub model; empty = the default branch")
    train_mode: str = _f("lora", "Train LoRA adapters or the full UNet", choices=("lora", "full"))
    lora_rank: int = _f(4, "LoRA rank (ddpo-pytorch/trl default 4)")
    lora_alpha: float = _f(4.0, "LoRA alpha (trl: alpha = rank = 4)")
    lora_targets: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules given LoRA adapters")
    mixed_precision: str = _f(
        "auto", "Frozen-weight dtype; trainables stay fp32. auto = fp16 on CUDA, fp32 on CPU",
        choices=("auto", "no", "fp16", "bf16"),
    )
    device: str = _f("auto", "Device: auto, cpu, cuda, cuda:1, mps")


@dataclass(frozen=True)
class PromptsSection:
    """Where training prompts come from."""

    name: str = _f("", "Registered prompt set (`rlbench prompts list`) or a text file, one prompt a line; "
                   "empty = the model's default set")


@dataclass(frozen=True)
class RewardSection:
    """The reward trained against; other keys are the reward's own options."""

    name: str = _f("incompressibility", "Registered reward name (`rlbench rewards list`)")
    options: dict = _f({}, "Options passed to the reward's constructor (write them as reward.KEY)")


@dataclass(frozen=True)
class SampleSection:
    """Sampling of training images."""

    num_steps: int = _f(50, "Denoising steps per sample (DDPO paper: 50 DDIM steps; Flow-GRPO SD3.5: 10)", "steps")
    sampler: str = _f("", "The policy's sampler: ddim (UNet models), flow-sde (Flow-GRPO), dance-sde (DanceGRPO), cps "
                          "(coefficients-preserving), ode (deterministic Euler); empty = the model family's default "
                          "(ddim, flow-sde)")
    eta: float = _f(1.0, "DDIM eta (the ddim sampler only); DDPO needs eta > 0 for a stochastic policy (paper: 1.0)")
    noise_level: float = _f(0.7, "Noise level of the flow samplers: flow-sde's and cps's a, dance-sde's eta; unset = "
                                 "the sampler's default (flow-sde 0.7, dance-sde 0.3, cps 0.8, ode 0)")
    sde_window: int = _f(0, "Flow-GRPO-Fast / MixGRPO: stochastic on this many consecutive steps only (deterministic "
                            "elsewhere), only those stored and trained; 0 = every step", "steps")
    sde_window_range: list = _f([], "[lo, hi]: the window lies within steps lo..hi-1, its start drawn per sampling "
                                    "batch from [lo, hi - sde_window] (Flow-GRPO-Fast); empty = [0, num_steps - 1]")
    sde_window_shift_every: int = _f(0, "MixGRPO's progressive window: the start advances one step every N epochs "
                                        "(rolling back at the end of the range); 0 = drawn at random", "epochs")
    resolution: int = _f(0, "Image height and width in pixels (flow-matching models); 0 = the model's default size",
                         "px")
    true_cfg_scale: float = _f(1.0, "FLUX: true classifier-free guidance weight with the negative prompt (FluxPipeline's "
                                    "true_cfg_scale; needs a non-empty sample.negative_prompt); 1 = off. FLUX-dev's "
                                    "distilled guidance is sample.guidance_scale")
    guidance_scale: float = _f(5.0, "Classifier-free guidance weight (paper: 5.0)")
    batch_size: int = _f(8, "Images per sampling batch, per process", "images")
    num_batches_per_epoch: int = _f(4, "Sampling batches per epoch, per process", "batches")
    images_per_prompt: int = _f(
        1, "Images per drawn prompt in an epoch: 1 = every image draws its own prompt (DDPO); k > 1 = "
        "samples-per-epoch / k prompts, k images each, so per-prompt statistics exist from the first epoch "
        "(Flow-GRPO's groups; pair with advantage.min_count = k)", "images")
    negative_prompt: str = _f("", "Unconditional prompt for guidance (reference: empty string)")
    async_reward: bool = _f(
        False, "Score a batch in a background thread while the next one samples. Pays for a reward on a GPU "
        "or a remote endpoint; on a CPU torch ops in a second thread slow every later op of the process "
        "(a second OpenMP team: 1.8x on 2 cores), so the default scores on the main thread")


@dataclass(frozen=True)
class AlgorithmSection:
    """The RL algorithm; other keys are the algorithm's own options."""

    name: str = _f("ddpo-is", "Registered algorithm name (`rlbench algos list`)")
    options: dict = _f({}, "Algorithm options (write them as algorithm.KEY, e.g. algorithm.clip_range)")


@dataclass(frozen=True)
class OptimSection:
    """Gradient updates (the reference's `train` section)."""

    batch_size: int = _f(4, "Samples per training micro-batch, per process", "samples")
    gradient_accumulation_steps: int = _f(2, "Micro-batches accumulated per optimizer step", "micro-batches")
    num_inner_epochs: int = _f(1, "Passes over each epoch's samples", "passes")
    timestep_fraction: float = _f(1.0, "Fraction of the window's denoising steps trained per sample (0, 1]")
    timestep_window: float = _f(
        1.0, "DDPO trains only the first (noisiest) fraction of the denoising steps, (0, 1]; 1 = all (DDPO). "
        "The late, nearly noiseless steps carry score-function gradients of norm ~1/sigma_t that are mostly noise")
    learning_rate: float = _f(3e-4, "AdamW learning rate (ddpo-pytorch LoRA: 3e-4; paper full FT: 1e-5)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    weight_decay: float = _f(1e-4, "AdamW weight decay (reference 1e-4)")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 = off")
    steps_per_forward: int = _f(
        0, "DDPO/GRPO/NFT: trained denoising steps of a micro-batch that share one denoiser forward+backward (the "
        "reference: 1). Same gradient, fuller batches, more activation memory. 0 = auto: on a CPU 4 for a UNet "
        "(training 1.2x faster at issue 12's settings) and 2 for a flow transformer, 1 on a GPU; raise it while "
        "memory allows", "steps")
    cfg: bool = _f(True, "Train the guided model output, epsilon or velocity (paper App. E.1: essential after the "
                         "first round)")


@dataclass(frozen=True)
class AdvantageSection:
    """Reward normalisation into advantages."""

    per_prompt: bool = _f(True, "Normalise per prompt with a ring buffer; false = batch statistics")
    buffer_size: int = _f(16, "Rewards kept per prompt (ddpo-pytorch: 16)", "rewards")
    min_count: int = _f(16, "Rewards a prompt needs before its own stats are used (ddpo-pytorch: 16)", "rewards")
    aggregate: str = _f(
        "sum", "Combined rewards (a+b) in policy-gradient algorithms: sum = advantages of the weighted sum; gdpo = "
        "the weighted sum of each reward's own normalised advantages, batch-normalised (arXiv 2601.05242), so "
        "an easy reward does not drown a hard one", choices=("sum", "gdpo"))


@dataclass(frozen=True)
class LoggingSection:
    """What is logged besides metrics.jsonl."""

    samples_every: int = _f(1, "Save sample images and their scores every N epochs; 0 = never", "epochs")
    num_samples: int = _f(16, "Images saved per logged epoch", "images")
    tensorboard: bool = _f(True, "Write TensorBoard events to <run>/tb (needs the tensorboard package)")
    wandb: bool = _f(False, "Also log to Weights & Biases (needs the wandb package)")
    watch: list = _f([], "Rewards also scored on every epoch's samples, not trained on, logged as watch_mean/NAME "
                         "(e.g. a gold reward beside its proxy: over-optimisation as it happens)")


@dataclass(frozen=True)
class CheckpointSection:
    """Checkpoints for resume and evaluation."""

    every: int = _f(1, "Checkpoint every N epochs (and always at the end)", "epochs")
    keep: int = _f(0, "Keep only the newest N checkpoints; 0 = keep all", "checkpoints")


@dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation during training: the `rlbench eval` harness, small, every few epochs."""

    every: int = _f(0, "Evaluate every N epochs (and after the last one), logged as eval/REWARD/PROMPT_SET; "
                       "0 = never", "epochs")
    prompts: list = _f([], "Prompt sets evaluated; empty = the training set plus the held-out sets the model "
                           "declares (shapes: shapes-heldout-*)")
    prompts_per_set: int = _f(8, "Prompts per set: a fixed, seeded subset of larger sets", "prompts")
    images_per_prompt: int = _f(2, "Images per prompt; image k of prompt p always gets the noise of (eval.seed, p, k), "
                                   "so evaluations at different epochs are paired", "images")
    rewards: list = _f([], "Rewards scored; empty = the training reward, logging.watch and the model's gold rewards")
    seed: int = _f(0, "Seed of the evaluation noise")
    kl: bool = _f(True, "Also log eval/kl/PROMPT_SET, the exact KL of the policy's DDIM transitions from the base "
                        "model's on the evaluation trajectories (keeps a copy of the initial trainable weights: "
                        "small for LoRA, one UNet for full fine-tuning)")


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": ModelSection,
    "prompts": PromptsSection,
    "reward": RewardSection,
    "sample": SampleSection,
    "algorithm": AlgorithmSection,
    "train": OptimSection,
    "advantage": AdvantageSection,
    "logging": LoggingSection,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
}
# Sections whose unknown keys are plugin options, collected into `options`.
_OPEN_SECTIONS = ("reward", "algorithm")


@dataclass(frozen=True)
class TrainConfig:
    """The whole configuration of a training run."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    prompts: PromptsSection = field(default_factory=PromptsSection)
    reward: RewardSection = field(default_factory=RewardSection)
    sample: SampleSection = field(default_factory=SampleSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    train: OptimSection = field(default_factory=OptimSection)
    advantage: AdvantageSection = field(default_factory=AdvantageSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # What resolution adjusted for the user (printed at the start of a run); not part of config.toml.
    notices: tuple[str, ...] = field(default=(), compare=False, repr=False)
    resolved: bool = field(default=False, compare=False, repr=False)

    # -- derived numbers (logged at start) --------------------------------------------------------
    @property
    def samples_per_epoch(self) -> int:
        """Samples per epoch per process."""
        return self.sample.batch_size * self.sample.num_batches_per_epoch

    @property
    def samples_per_update(self) -> int:
        """Samples per optimizer step per process."""
        return self.train.batch_size * self.train.gradient_accumulation_steps

    @property
    def updates_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        return self.samples_per_epoch // self.samples_per_update * self.train.num_inner_epochs

    def model_family(self) -> str:
        """"ddim" or "flow": the model's family when it can be told before loading, else the sampler's, else ddim."""
        from rlbench.diffusion.sampler import family_of_sampler, model_family

        family = model_family(self.model.name)
        if family is None:
            family = family_of_sampler(self.sample.sampler) if self.sample.sampler else "ddim"
        return family

    def sampler(self):
        """The policy's :class:`~rlbench.diffusion.sampler.Sampler` (name, noise level, SDE window)."""
        from rlbench.diffusion.sampler import sampler_from_config

        return sampler_from_config(self.sample, self.model_family())

    def _validate_sampler(self) -> None:
        from rlbench.diffusion.sampler import FAMILY_SAMPLERS, family_of_sampler, model_family

        s = self.sample
        known = model_family(self.model.name)
        if s.sampler:
            fam = family_of_sampler(s.sampler)  # unknown names: one error with a suggestion
            if known is not None and fam != known:
                raise ConfigError(
                    f"sample.sampler = {s.sampler!r} is a {fam} sampler, but model {self.model.name!r} is a {known} "
                    f"model; its samplers: {', '.join(FAMILY_SAMPLERS[known])}.")
        family = self.model_family()
        if family == "ddim":
            if s.eta > 1.0:
                # DDIM's sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev) exceeds
                # sqrt(1 - a_prev) for eta > 1, and the direction term sqrt(1 - a_prev - sigma_t^2) is undefined.
                raise ConfigError(f"sample.eta must be in [0, 1] (DDPO: 1.0), got {s.eta}.")
            if s.resolution:
                raise ConfigError("sample.resolution applies to flow-matching models; a UNet model samples at its "
                                  "own size (set it to 0).")
        elif s.eta != SampleSection.eta:
            raise ConfigError(
                f"sample.eta is the DDIM sampler's noise; {self.model.name!r} is a flow-matching model: set "
                f"sample.noise_level (a for flow-sde and cps, eta for dance-sde) and leave sample.eta unset.")
        if s.true_cfg_scale < 1.0:
            raise ConfigError(f"sample.true_cfg_scale must be >= 1 (1 = off), got {s.true_cfg_scale}.")
        if s.true_cfg_scale > 1.0 and family == "ddim":
            raise ConfigError("sample.true_cfg_scale is FLUX's true guidance; UNet models guide with "
                              "sample.guidance_scale (set true_cfg_scale to 1).")
        if s.true_cfg_scale > 1.0 and not s.negative_prompt:
            raise ConfigError(
                "sample.true_cfg_scale > 1 asks for true classifier-free guidance, which needs a negative prompt "
                "(FluxPipeline: do_true_cfg = true_cfg_scale > 1 and a negative prompt): set sample.negative_prompt, "
                "or keep true_cfg_scale = 1 and use FLUX-dev's distilled guidance (sample.guidance_scale).")
        if s.sde_window_range and len(s.sde_window_range) != 2:
            raise ConfigError(f"sample.sde_window_range must be [lo, hi], got {list(s.sde_window_range)}.")
        if s.sde_window_shift_every and not s.sde_window:
            raise ConfigError("sample.sde_window_shift_every moves an SDE window: set sample.sde_window > 0 too.")
        if (s.sde_window or s.sde_window_range) and family == "ddim":
            raise ConfigError("sample.sde_window applies to the flow-matching samplers; a DDIM policy is stochastic "
                              "on every step (unset sample.sde_window and sample.sde_window_range).")
        self.sampler().check(s.num_steps)

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check values and combinations; raise ConfigError with the fix. Returns self. Changes nothing."""
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            for f in dataclasses.fields(cls):
                choices = f.metadata.get("choices")
                value = getattr(section, f.name)
                if choices and value not in choices:
                    raise ConfigError(
                        f"{name}.{f.name} = {value!r} is not one of {', '.join(map(repr, choices))}."
                    )
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{name}.{f.name} must be a finite number, got {value}.")
        positive = {
            "run.epochs": self.run.epochs,
            "sample.num_steps": self.sample.num_steps,
            "sample.batch_size": self.sample.batch_size,
            "sample.num_batches_per_epoch": self.sample.num_batches_per_epoch,
            "sample.images_per_prompt": self.sample.images_per_prompt,
            "train.batch_size": self.train.batch_size,
            "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "train.num_inner_epochs": self.train.num_inner_epochs,
            "train.learning_rate": self.train.learning_rate,
            "model.lora_rank": self.model.lora_rank,
            "model.lora_alpha": self.model.lora_alpha,
            "train.adam_epsilon": self.train.adam_epsilon,
            "advantage.buffer_size": self.advantage.buffer_size,
            "advantage.min_count": self.advantage.min_count,
            "checkpoint.every": self.checkpoint.every,
            "eval.prompts_per_set": self.eval.prompts_per_set,
            "eval.images_per_prompt": self.eval.images_per_prompt,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}.")
        non_negative = {
            "sample.eta": self.sample.eta,
            "sample.guidance_scale": self.sample.guidance_scale,
            "train.max_grad_norm": self.train.max_grad_norm,
            "train.weight_decay": self.train.weight_decay,
            "logging.samples_every": self.logging.samples_every,
            "logging.num_samples": self.logging.num_samples,
            "checkpoint.keep": self.checkpoint.keep,
            "run.seed": self.run.seed,
            "eval.every": self.eval.every,
            "eval.seed": self.eval.seed,
            "train.steps_per_forward": self.train.steps_per_forward,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}.")
        self._validate_sampler()
        if not 0.0 < self.train.timestep_fraction <= 1.0:
            raise ConfigError(
                f"train.timestep_fraction must be in (0, 1], got {self.train.timestep_fraction}."
            )
        if not 0.0 < self.train.timestep_window <= 1.0:
            raise ConfigError(f"train.timestep_window must be in (0, 1], got {self.train.timestep_window}.")
        if not (0.0 <= self.train.adam_beta1 < 1.0 and 0.0 <= self.train.adam_beta2 < 1.0):
            raise ConfigError("train.adam_beta1 and train.adam_beta2 must be in [0, 1).")
        sb, tb = self.sample.batch_size, self.train.batch_size
        if sb % tb:
            divisors = [d for d in range(1, sb + 1) if sb % d == 0]
            raise ConfigError(
                f"sample.batch_size ({sb}) must be a multiple of train.batch_size ({tb}): set "
                f"train.batch_size to one of {divisors}, or sample.batch_size to a multiple of {tb}."
            )
        if self.samples_per_epoch % self.samples_per_update:
            raise ConfigError(
                f"samples per epoch (sample.batch_size x sample.num_batches_per_epoch = {self.samples_per_epoch}) "
                f"must be a multiple of samples per optimizer step (train.batch_size x "
                f"train.gradient_accumulation_steps = {self.samples_per_update}); lower "
                "train.gradient_accumulation_steps or raise sample.num_batches_per_epoch."
            )
        k = self.sample.images_per_prompt
        if self.samples_per_epoch % k:
            divisors = [d for d in range(1, self.samples_per_epoch + 1) if self.samples_per_epoch % d == 0]
            raise ConfigError(
                f"sample.images_per_prompt ({k}) must divide the samples per epoch (sample.batch_size x "
                f"sample.num_batches_per_epoch = {self.samples_per_epoch}); use one of {divisors}."
            )
        if self.advantage.per_prompt and self.advantage.min_count > self.advantage.buffer_size:
            raise ConfigError(
                f"advantage.min_count ({self.advantage.min_count}) exceeds advantage.buffer_size "
                f"({self.advantage.buffer_size}), so per-prompt statistics would never be used; set "
                "min_count <= buffer_size."
            )
        if self.advantage.aggregate == "gdpo" and not any(c in self.reward.name for c in "+,"):
            raise ConfigError(
                f"advantage.aggregate = 'gdpo' normalises each reward of a combination on its own, but "
                f"reward.name = {self.reward.name!r} is a single reward; combine rewards (e.g. "
                "--reward 'shapes-clip:1+shapes-aesthetic:0.5') or use advantage.aggregate = 'sum'."
            )
        if not self.reward.name:
            raise ConfigError("reward.name is empty; choose one with --reward NAME (`rlbench rewards list`).")
        if not self.algorithm.name:
            raise ConfigError("algorithm.name is empty; choose one with --algo NAME (`rlbench algos list`).")
        if not self.model.name:
            raise ConfigError("model.name is empty; choose one with --model NAME|PATH (`rlbench models list`).")
        check_device(self.model.device, self.model.mixed_precision)
        return self

    def with_changes(self, changes: Mapping[str, Any]) -> TrainConfig:
        """A new, re-resolved config with ``{"section.key": value}`` changed (this one is frozen)."""
        data = self.to_dict()
        for dotted, value in changes.items():
            sname, _, key = dotted.partition(".")
            data.setdefault(sname, {})[key] = value
        return resolve(data, "config")

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict; plugin options are flattened into their sections, as in TOML."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            if name in _OPEN_SECTIONS:
                section.update(section.pop("options"))
            out[name] = section
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a nested dict (TOML layout); unknown sections/keys and wrong types are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table of sections, got {type(data).__name__}.")
        sections: dict[str, Any] = {}
        for sname, values in data.items():
            if sname not in SECTIONS:
                raise ConfigError(_unknown(f"section [{sname}]", sname, list(SECTIONS), source))
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{sname}] must be a table of keys, got {values!r}.")
            scls = SECTIONS[sname]
            hints = typing.get_type_hints(scls)
            kwargs: dict[str, Any] = {}
            options: dict[str, Any] = {}
            for key, value in values.items():
                if key == "options" and sname in _OPEN_SECTIONS:
                    if not isinstance(value, dict):
                        raise ConfigError(f"{source}: {sname}.options must be a table, got {value!r}.")
                    options.update(value)
                elif key in hints:
                    kwargs[key] = _coerce(f"{sname}.{key}", value, hints[key], source)
                elif sname in _OPEN_SECTIONS:
                    options[key] = value
                else:
                    raise ConfigError(_unknown(f"key '{sname}.{key}'", key, list(hints), source, sname))
            if sname in _OPEN_SECTIONS:
                kwargs["options"] = options
            sections[sname] = scls(**kwargs)
        return cls(**sections)


def _unknown(what: str, key: str, valid: list[str], source: str, section: str | None = None) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{(section + '.') if section else ''}{close[0]}'?" if close else ""
    where = f" in [{section}]" if section else ""
    return f"{source}: unknown {what}.{hint} Valid keys{where}: {', '.join(valid)}."


DEFAULT_PROMPTS = "simple-animals"  # DDPO's aesthetic task set; a model may declare its own (prompts.name preset)

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", dict: "a table"}


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    origin = typing.get_origin(typ) or typ
    ok = (
        (origin is bool and isinstance(value, bool))
        or (origin is int and isinstance(value, int) and not isinstance(value, bool))
        or (origin is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (origin is str and isinstance(value, str))
        or (origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value)
            and key != "sample.sde_window_range")
        or (key == "sample.sde_window_range" and isinstance(value, list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        or (origin is dict and isinstance(value, dict))
    )
    if not ok:
        raise ConfigError(
            f"{source}: {key} must be {_TYPE_WORDS.get(origin, str(typ))}, got {value!r} "
            f"({type(value).__name__})."
        )
    return float(value) if origin is float else value


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> (section, key, value); the value is read as TOML, else as a string."""
    path, sep, raw = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(
            f"--set expects SECTION.KEY=VALUE (e.g. --set sample.batch_size=8), got {text!r}."
        )
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --set model.name=shapes
    return section, key.strip(), value


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist.")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc


def model_presets(model: str) -> dict[str, Any]:
    """Training defaults a model declares for itself (``{"section.key": value}``), applied under the user's.

    A registered model's factory may carry a ``train_defaults`` dict (the shapes model sets a reward
    that works offline and CPU-sized sampling); a model folder may hold them in ``rlbench.json`` under
    ``"train_defaults"``. Hub ids have none. Shown by ``rlbench config --set model.name=NAME``.
    """
    import json

    from rlbench.registry import MODELS

    if not isinstance(model, str) or not model:
        return {}
    default_prompts = None
    if model in MODELS:
        try:
            factory = MODELS.load(model)
        except RLBenchError:
            factory = None  # a broken model plugin is reported when the run loads it
        presets = getattr(factory, "train_defaults", None) or {}
    else:
        meta = Path(model).expanduser() / "rlbench.json"
        try:
            declared = json.loads(meta.read_text()) if meta.is_file() else {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{meta} is not valid JSON: {exc}") from exc
        if not isinstance(declared, dict):
            raise ConfigError(f"{meta} must hold a JSON object, got {type(declared).__name__}.")
        presets = declared.get("train_defaults", {})
        default_prompts = declared.get("default_prompts")  # the folder's own prompt set (DiffusionPolicy reads it too)
        from rlbench.diffusion.sampler import _hub_pipeline_kind, pipeline_kind

        kind = pipeline_kind(model) or _hub_pipeline_kind(model)
        if kind in ("sd3", "flux") and isinstance(presets, dict):  # a flow folder or cached hub id: its family recipe
            from rlbench.diffusion.flow_policy import FLOW_PRESETS

            presets = {**FLOW_PRESETS[kind], **presets}
    if not isinstance(presets, dict) or not all(isinstance(k, str) and "." in k for k in presets):
        raise ConfigError(f"model '{model}' declares malformed train_defaults {presets!r}; expected "
                          "{'section.key': value, ...}.")
    presets = dict(presets)
    if isinstance(default_prompts, str) and default_prompts:
        presets.setdefault("prompts.name", default_prompts)
    return presets


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, dict[str, Any]] | None = None,
) -> TrainConfig:
    """Defaults <- model presets <- TOML file <- ``--set`` overrides <- ``values`` (nested dict), resolved once.

    Args:
        path: a TOML file in the layout of ``config.toml``.
        overrides: ``"section.key=value"`` strings.
        values: a nested dict applied last (the CLI's own flags).
    """
    data: dict[str, dict[str, Any]] = {}
    source = "config"
    if path is not None:
        data = read_toml(path)
        source = str(path)
        for sname, section in data.items():
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: top-level key '{sname}' must be a [section] table.")
    for text in overrides:
        sname, key, value = parse_override(text)
        data.setdefault(sname, {})[key] = value
    for sname, section in (values or {}).items():
        for key, value in section.items():
            if value is not None:
                data.setdefault(sname, {})[key] = value
    model = data.get("model", {}).get("name", ModelSection.name)
    presets = model_presets(model)
    user_sample = dict(data.get("sample", {})) if isinstance(data.get("sample"), dict) else {}
    if "sampler" in user_sample and user_sample["sampler"] != presets.get("sample.sampler", user_sample["sampler"]):
        # A preset noise level belongs to the preset's sampler: another sampler takes its own default.
        presets = {k: v for k, v in presets.items() if k != "sample.noise_level"}
    for dotted, value in presets.items():  # lowest layer: anything the user set wins
        sname, _, key = dotted.partition(".")
        data.setdefault(sname, {}).setdefault(key, value)
    _default_noise_level(data, model)
    return resolve(data, source if not overrides else f"{source} + --set")


def _default_noise_level(data: dict[str, Any], model: str) -> None:
    """An unset sample.noise_level takes its flow sampler's default (Flow-SDE 0.7, Dance-SDE 0.3, CPS 0.8, ODE 0)."""
    from rlbench.diffusion.sampler import DEFAULT_NOISE, DEFAULT_SAMPLER, family_of_sampler, model_family

    sample = data.get("sample", {})
    if not isinstance(sample, dict) or "noise_level" in sample:
        return
    name = sample.get("sampler") or ""
    if not name:
        family = model_family(model) if isinstance(model, str) else None
        name = DEFAULT_SAMPLER.get(family or "", "")
    try:
        flow = bool(name) and family_of_sampler(str(name)) == "flow"
    except ConfigError:
        return  # an unknown sampler: validation names it
    if flow:
        data.setdefault("sample", {})["noise_level"] = DEFAULT_NOISE[str(name)]


def resolve(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """The one resolution: merged layers -> typed config -> algorithm options and adjustments -> validated, frozen.

    The algorithm plugin is loaded (not constructed) to type its options and to ask what it adjusts
    (``Algorithm.adjust``); its adjustments are applied here and reported as ``notices``.
    """
    from rlbench.algorithm import Algorithm
    from rlbench.registry import ALGORITHMS

    cfg = TrainConfig.from_dict(data, source=source)
    if not cfg.prompts.name:
        cfg = dataclasses.replace(cfg, prompts=PromptsSection(name=DEFAULT_PROMPTS))
    name = cfg.algorithm.name
    if not name:
        raise ConfigError("algorithm.name is empty; choose one with --algo NAME (`rlbench algos list`).")
    algo = ALGORITHMS.load_subclass(name, Algorithm)
    options = build_options(algo, dict(cfg.algorithm.options), name)
    resolved_options = dataclasses.asdict(options) if options is not None else {}
    cfg = dataclasses.replace(cfg, algorithm=AlgorithmSection(name=name, options=resolved_options))
    changes, notices = algo.adjust(cfg, options)
    if changes:
        cfg = _apply(cfg, changes)
    cfg.validate()
    algo.validate(cfg, options)
    return dataclasses.replace(cfg, notices=tuple(notices), resolved=True)


def ensure_resolved(config: TrainConfig) -> TrainConfig:
    """``config`` itself when it came from :func:`resolve`; else its resolution (a hand-built TrainConfig)."""
    return config if config.resolved else resolve(config.to_dict())


def _apply(cfg: TrainConfig, changes: Mapping[str, Any]) -> TrainConfig:
    sections: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        sname, _, key = dotted.partition(".")
        if sname not in SECTIONS or key not in {f.name for f in dataclasses.fields(SECTIONS[sname])}:
            raise ConfigError(f"an algorithm adjusted unknown config key {dotted!r}.")
        sections.setdefault(sname, {})[key] = value
    return dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


def build_options(cls: type, options: dict[str, Any], algo: str) -> Any:
    """Type ``[algorithm]`` keys against the plugin's ``Options`` dataclass; unknown keys and bad values are errors."""
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
        if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
            raise ConfigError(f"algorithm.{key} must be a finite number, got {value}.")
    try:
        return opt_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"algorithm '{algo}': {exc}") from exc


def check_device(device: str, mixed_precision: str = "auto") -> None:
    """A device this machine does not have is an error (never a silent fallback to the CPU)."""
    if device in ("auto", "cpu") and mixed_precision != "fp16":
        return
    import torch

    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("model.device = 'mps' but this machine has no Apple MPS device; use 'auto' or 'cpu'.")
    elif device.startswith("cuda"):
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"model.device = {device!r}: write cuda or cuda:N (N a GPU index).")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"model.device = {device!r} but this machine has no CUDA GPU; use 'auto' or 'cpu'.")
        if index and int(index) >= count:
            raise ConfigError(f"model.device = {device!r} but this machine has {count} GPU(s): cuda:0..cuda:{count - 1}.")
    elif device not in ("auto", "cpu"):
        raise ConfigError(f"model.device = {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps.")
    if mixed_precision == "fp16" and not (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
        raise ConfigError("model.mixed_precision = 'fp16' needs a CUDA GPU; use 'no' or 'bf16' on CPU.")


def _inline(value: Any) -> str:
    """One-line TOML for a default value (tomli_w writes lists over several lines)."""
    import json

    import tomli_w

    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[4:]


def annotated_defaults() -> str:
    """Every field with its default, help and unit, as commented TOML (``rlbench config``)."""
    lines: list[str] = []
    for sname, scls in SECTIONS.items():
        lines.append(f"[{sname}]  # {scls.__doc__}")
        for f in dataclasses.fields(scls):
            if f.name == "options":
                lines.append(f"# {sname}.KEY = ...  # {f.metadata['help']}")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = _inline(default)
            unit = f" [{f.metadata['unit']}]" if f.metadata.get("unit") else ""
            choices = f" (one of {', '.join(f.metadata['choices'])})" if f.metadata.get("choices") else ""
            lines.append(f"{f.name} = {value}  # {f.metadata['help']}{unit}{choices}")
        lines.append("")
    presets = model_presets(ModelSection.name)
    if presets:
        lines.append(f"# Presets of the default model '{ModelSection.name}', applied under anything you set:")
        lines += [f"#   {k} = {_inline(v)}" for k, v in presets.items()]
        lines.append("")
    return "\n".join(lines)
