"""Which sampler a policy samples with: its name, noise level and SDE window, and the model families.

Two families (:mod:`rlbench.diffusion.ddim`, :mod:`rlbench.diffusion.flow`), each with its samplers:

=========  ==========  ===========================================================  =================
family     sampler     stochastic step                                              noise default
=========  ==========  ===========================================================  =================
ddim       ddim        DDIM with ``sigma_t = eta * sqrt(var_t)`` (DDPO)             eta 1.0
flow       flow-sde    Flow-GRPO's SDE, ``s_i = a sqrt(sigma / (1 - sigma))``       a 0.7
flow       dance-sde   DanceGRPO's SDE, constant diffusion eta                      eta 0.3
flow       cps         coefficients-preserving sampling (log-prob unnormalised)     a 0.8
flow       ode         deterministic Euler (what the peers evaluate with)           0
=========  ==========  ===========================================================  =================

An SDE window (``window`` steps) makes the sampler stochastic only on ``[start, start + window)`` and
deterministic elsewhere (Flow-GRPO-Fast draws ``start`` per sampling call; MixGRPO moves it every few
iterations); only the window's transitions are stored and trained.

Nothing here imports torch at module level: configuration resolution uses it to validate samplers
before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlbench.errors import ConfigError

FAMILY_SAMPLERS: dict[str, tuple[str, ...]] = {"ddim": ("ddim",), "flow": ("flow-sde", "dance-sde", "cps", "ode")}
DEFAULT_SAMPLER = {"ddim": "ddim", "flow": "flow-sde"}
ALL_SAMPLERS = tuple(s for names in FAMILY_SAMPLERS.values() for s in names)
# Noise defaults: Flow-SDE a = 0.7 (flow_grpo sd3_sde_with_logprob.py signature; config/base.py L54);
# Dance-SDE eta = 0.3 (DanceGRPO scripts/finetune/finetune_flux_grpo.sh --eta 0.3); CPS a = 0.8 (flow_grpo
# README "Training Speed": noise_level = 0.8); DDIM eta = 1.0 (DDPO paper).
DEFAULT_NOISE = {"ddim": 1.0, "flow-sde": 0.7, "dance-sde": 0.3, "cps": 0.8, "ode": 0.0}
# The largest noise level each sampler is defined for: DDIM's direction term sqrt(1 - a_prev - sigma^2) needs
# eta <= 1; CPS's sin(a pi / 2) <= 1 needs a <= 1; the SDEs take any level (large ones are useless, not undefined).
MAX_NOISE = {"ddim": 1.0, "cps": 1.0}

# diffusers pipeline classes (model_index.json `_class_name`) -> rlbench's model kinds.
PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
    "StableDiffusionXLPipeline": "sdxl",
}
KIND_FAMILY = {"sd": "ddim", "sdxl": "ddim", "sd3": "flow", "flux": "flow", "pixel-sd3": "flow"}


def family_of_sampler(name: str) -> str:
    for family, names in FAMILY_SAMPLERS.items():
        if name in names:
            return family
    import difflib

    close = difflib.get_close_matches(name, ALL_SAMPLERS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown sampler {name!r}.{hint} Samplers: {', '.join(ALL_SAMPLERS)} "
                      "(ddim for UNet models; flow-sde, dance-sde, cps, ode for flow-matching models).")


@dataclass(frozen=True)
class Sampler:
    """A sampler of one family: ``noise`` is DDIM's eta, Flow-SDE's and CPS's a, Dance-SDE's eta (0 for ode).

    ``window`` > 0: stochastic on ``window`` consecutive steps only, their start in
    ``[range_lo, range_hi - window]`` (``range_hi`` 0 = the number of steps minus one: the last step is
    never stochastic then), drawn per sampling call, or with ``shift_every`` > 0 advanced by one step every
    ``shift_every`` epochs and rolled back to ``range_lo`` at the end (MixGRPO).
    """

    name: str
    noise: float
    window: int = 0
    range_lo: int = 0
    range_hi: int = 0
    shift_every: int = 0

    @property
    def family(self) -> str:
        return family_of_sampler(self.name)

    @property
    def stochastic(self) -> bool:
        return self.name != "ode" and self.noise > 0

    def deterministic(self) -> Sampler:
        """The family's deterministic sampler (DDIM eta = 0, the Euler ODE)."""
        return Sampler("ddim", 0.0) if self.family == "ddim" else Sampler("ode", 0.0)

    def window_range(self, num_steps: int) -> tuple[int, int]:
        hi = self.range_hi or num_steps - 1
        return self.range_lo, hi

    def check(self, num_steps: int) -> None:
        """Raise ConfigError for a noise level outside the sampler's range or a window outside the schedule."""
        family_of_sampler(self.name)
        if not self.noise >= 0:
            raise ConfigError(f"the {self.name} sampler's noise level must be >= 0, got {self.noise}.")
        top = MAX_NOISE.get(self.name)
        if top is not None and self.noise > top:
            what = "sample.eta" if self.name == "ddim" else "sample.noise_level"
            raise ConfigError(f"{what} must be in [0, {top:g}] for the {self.name} sampler, got {self.noise}.")
        if self.name == "ode" and self.noise:
            raise ConfigError(f"the ode sampler is deterministic: sample.noise_level must be 0, got {self.noise}.")
        if self.window < 0 or self.shift_every < 0:
            raise ConfigError("sample.sde_window and sample.sde_window_shift_every must be >= 0.")
        if self.window:
            lo, hi = self.window_range(num_steps)
            if not (0 <= lo < hi <= num_steps) or hi - lo < self.window:
                raise ConfigError(
                    f"the SDE window of {self.window} steps does not fit sample.sde_window_range [{lo}, {hi}) within "
                    f"{num_steps} sampling steps: choose 0 <= lo < hi <= sample.num_steps with hi - lo >= "
                    "sample.sde_window.")

    def window_start(self, num_steps: int, epoch: int, draw: Any = None) -> int:
        """The first stochastic step of a sampling call: progressive with ``shift_every``, else ``draw(lo, hi)``
        (an inclusive uniform integer draw), or ``lo`` when no draw is given (evaluation: a fixed window)."""
        lo, hi = self.window_range(num_steps)
        last = hi - self.window
        if self.shift_every:
            return lo + (epoch // self.shift_every) % (last - lo + 1)
        return lo if draw is None else int(draw(lo, last))

    def stochastic_steps(self, num_steps: int, start: int = 0) -> range:
        """The steps sampled stochastically (and stored for training) when the window starts at ``start``."""
        if not self.stochastic:
            return range(0)
        if not self.window:
            # CPS's last step has std sigma_N sin(a pi / 2) = 0: it is deterministic, not a stored transition.
            return range(num_steps - 1) if self.name == "cps" else range(num_steps)
        return range(start, start + self.window)


def sampler_from_config(sample: Any, family: str) -> Sampler:
    """The :class:`Sampler` of a ``[sample]`` section for a model of ``family`` ("" sampler = the family's default)."""
    name = sample.sampler or DEFAULT_SAMPLER[family]
    noise = sample.eta if family_of_sampler(name) == "ddim" else sample.noise_level
    lo, hi = (list(sample.sde_window_range) + [0, 0])[:2] if sample.sde_window_range else (0, 0)
    return Sampler(name, float(noise), int(sample.sde_window), int(lo), int(hi), int(sample.sde_window_shift_every))


# -- which family a model is -------------------------------------------------------------------------


def pipeline_kind(source: str | Path) -> str | None:
    """"sd", "sdxl", "sd3" or "flux" for a diffusers folder (or a cached hub id) from its ``model_index.json``; None
    when that cannot be told without loading (a hub id not in the cache)."""
    path = Path(str(source)).expanduser()
    meta = path / "rlbench.json"
    if path.is_dir() and meta.is_file():  # rlbench's own pixel-space models declare their kind
        try:
            declared = json.loads(meta.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            declared = None
        if declared in KIND_FAMILY:
            return declared
    index = path / "model_index.json" if path.is_dir() else None
    if index is None and not path.exists():
        parts = str(source).split("/")
        if len(parts) == 2 and all(parts):
            try:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(str(source), "model_index.json")
                index = Path(found) if isinstance(found, str) else None
            except Exception:  # a malformed id: the loader names it
                index = None
    if index is not None and index.is_file():
        try:
            name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError):
            name = ""
        if name in PIPELINE_KINDS:
            return PIPELINE_KINDS[name]
        if "Flux" in name:
            return "flux"
        if "StableDiffusion3" in name:
            return "sd3"
    if path.is_dir():
        if (path / "transformer").is_dir():
            return "sd3"
        if (path / "unet").is_dir():
            return "sd"
    return None


def model_family(name: str) -> str | None:
    """"ddim" or "flow" for a registered model, a diffusers folder or a cached hub id; None when unknown."""
    from rlbench.registry import MODELS

    if name in MODELS:
        try:
            factory = MODELS.load(name)
        except Exception:  # a broken plugin is reported when the run loads it
            return None
        return getattr(factory, "family", "ddim")
    kind = pipeline_kind(name)
    if kind is None:  # a hub id not in the cache: online, its model_index.json (a few hundred bytes) tells
        kind = _hub_pipeline_kind(name)
    return KIND_FAMILY.get(kind) if kind else None


def _hub_pipeline_kind(name: str, revision: str | None = None) -> str | None:
    """The pipeline kind of a hub id not in the cache, from its model_index.json when online (None offline)."""
    parts = str(name).split("/")
    if len(parts) != 2 or not all(parts) or Path(str(name)).expanduser().exists():
        return None
    from rlbench.weights import is_offline

    if is_offline():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return pipeline_kind(Path(hf_hub_download(str(name), "model_index.json", revision=revision or None)).parent)
    except Exception:  # no such repo or no network: the loader names it
        return None
