"""Benchmark specs: one TOML file per experiment, versioned in its name (``<name>-v<N>.toml``).

A spec pins everything a result depends on::

    [benchmark]                 # identity
    name = "compressibility-ddpo-is"   # the file is <name>-v<version>.toml
    version = 1
    suite = "ddpo-paper"        # results go to results/<suite>/
    description = "..."
    reference = "..."           # optional: where the numbers come from
    seeds = [0, 1]              # one run per seed (run.seed)

    [reward]                    # the trained reward, name AND version (checked against the registered card)
    name = "compressibility"
    version = "1"
    options = {}                # optional: the reward's constructor options

    [train.<section>]           # a training config (rlbench config), applied over the defaults and
    ...                         # resolved once per seed with rlbench.config.resolve; see REQUIRED_TRAIN

    [eval]                      # the evaluation harness (rlbench eval) after training; see EVAL_KEYS
    checkpoints = [0, 10, 20]   # epochs (0 = the base model), or "auto" / "all" / "last"
    ...

Unknown keys, missing keys, wrong types and a reward version that is not the registered one are
:class:`~rlbench.errors.ConfigError` naming the file and the key. Specs ship as package data
(``rlbench.benchmarks``: ``ddpo-paper/*.toml``, ``shapes/*.toml``) and are found by path, by suite
(``shapes``) or by id (``shapes/clip-ddpo-is-v1`` or ``clip-ddpo-is-v1``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlbench.errors import ConfigError, RLBenchError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_KEYS = ("benchmark", "reward", "train", "eval")
BENCHMARK_KEYS = {"name": str, "version": int, "suite": str, "description": str, "seeds": list}
BENCHMARK_OPTIONAL = {"reference": str}
REWARD_KEYS = {"name": str, "version": str}
REWARD_OPTIONAL = {"options": dict}

# Every key a spec must pin in [train.*]: the hyperparameters (anything left to a default could change
# with rlbench's defaults, and the result with it). Other TrainConfig keys (logging, model.device,
# eval.every, ...) are optional. The algorithm's own options are required too (every field of its Options).
REQUIRED_TRAIN: dict[str, tuple[str, ...]] = {
    "run": ("epochs",),
    "model": ("name", "train_mode"),
    "prompts": ("name",),
    "sample": ("num_steps", "guidance_scale", "batch_size", "num_batches_per_epoch", "images_per_prompt"),
    "algorithm": ("name",),
    "train": ("batch_size", "gradient_accumulation_steps", "num_inner_epochs", "timestep_fraction",
              "timestep_window", "learning_rate", "adam_beta1", "adam_beta2", "weight_decay", "adam_epsilon",
              "max_grad_norm", "cfg"),
    "advantage": ("per_prompt", "buffer_size", "min_count"),
    "checkpoint": ("every",),
}
REQUIRED_LORA = ("lora_rank", "lora_alpha")
# The sampler's own settings, per model family (rlbench.diffusion.sampler): DDIM's eta; a flow model's sampler
# and its noise level (flow-sde's a, dance-sde's eta, ...). The other family's keys are errors in resolution.
REQUIRED_SAMPLER: dict[str, tuple[str, ...]] = {"ddim": ("eta",), "flow": ("sampler", "noise_level")}
# Set by the runner, never by a spec.
FORBIDDEN_TRAIN = {"run.seed": "set by [benchmark] seeds", "run.out": "set by `rlbench bench run --out`",
                   "reward": "the trained reward is the spec's [reward] table (name and version)"}

EVAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "checkpoints": (list, str),   # epochs, or "auto" / "all" / "last"
    "prompts": list,              # prompt sets: the training set and the held-out sets
    "rewards": list,              # rewards scored (the trained one, cross rewards, gold rewards)
    "images_per_prompt": int,
    "prompts_per_set": (int, dict),  # a fixed, seeded subset of each larger set (0 = all), or {set: n} per set
    "seed": int,                  # eval noise seed (paired across checkpoints and runs)
    "steps": int,                 # sampler settings of the evaluation
    "guidance": float,
}
# eval.eta for DDIM models (required there), eval.sampler for flow models (required there: ode, what peers
# report, or the training sampler).
EVAL_OPTIONAL: dict[str, type | tuple[type, ...]] = {"features": str, "batch_size": int, "eta": float, "sampler": str}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class Spec:
    """One validated benchmark experiment."""

    path: Path
    name: str
    version: int
    suite: str
    description: str
    seeds: tuple[int, ...]
    reward: str
    reward_version: str
    reward_options: dict[str, Any]
    train: dict[str, dict[str, Any]]      # the [train] table as written (plus the reward)
    eval: dict[str, Any]
    reference: str = ""
    sha256: str = ""
    configs: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)  # seed -> TrainConfig

    @property
    def id(self) -> str:
        """``<name>-v<version>``, the file's stem."""
        return f"{self.name}-v{self.version}"

    def train_data(self, seed: int, out: str = "") -> dict[str, dict[str, Any]]:
        """The training config (TOML layout) of the run with ``seed``: the spec's [train] with the reward,
        the seed and the run directory filled in."""
        data = {s: dict(v) for s, v in self.train.items()}
        data["reward"] = {"name": self.reward, **self.reward_options}
        data.setdefault("run", {})["seed"] = seed
        if out:
            data["run"]["out"] = out
        return data

    def config(self, seed: int, out: str = ""):
        """The resolved :class:`~rlbench.config.TrainConfig` of the run with ``seed``."""
        from rlbench.config import resolve

        try:
            return resolve(self.train_data(seed, out), source=str(self.path))
        except ConfigError as exc:
            raise ConfigError(_in_file(self.path, exc)) from exc

    @property
    def epochs(self) -> int:
        return int(self.train["run"]["epochs"])

    def eval_checkpoints(self) -> list[int] | str:
        c = self.eval["checkpoints"]
        return c if isinstance(c, str) else [int(x) for x in c]


def _in_file(path: Path, exc: Exception) -> str:
    text = str(exc)
    return text if text.startswith(str(path)) else f"{path}: {text}"


def _type_name(t: type | tuple[type, ...]) -> str:
    words = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table", bool: "true/false"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(words.get(x, x.__name__) for x in ts)


def _check_type(path: Path, key: str, value: Any, t: type | tuple[type, ...]) -> Any:
    ts = t if isinstance(t, tuple) else (t,)
    if float in ts and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in ts:
        ok = False
    else:
        ok = isinstance(value, ts)
    if not ok:
        raise ConfigError(f"{path}: {key} must be {_type_name(t)}, got {value!r}.")
    return value


def _table(path: Path, where: str, data: Any, required: dict, optional: dict) -> dict[str, Any]:
    """Check one table's keys (unknown and missing keys are errors) and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [{where}] must be a table, got {data!r}.")
    valid = list(required) + list(optional)
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown key '{where}.{key}'.{hint} Valid keys in [{where}]: {', '.join(valid)}.")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing key{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(f'{where}.{k}' for k in missing)} (a spec pins every setting).")
    return {k: _check_type(path, f"{where}.{k}", v, {**required, **optional}[k]) for k, v in data.items()}


def _registered_reward_version(name: str) -> str:
    from rlbench.registry import REWARDS
    from rlbench.reward import reward_card

    if name not in REWARDS:
        raise ConfigError(REWARDS.unknown_message(name))
    return reward_card(REWARDS.load(name), name=name).version


def _algorithm_option_names(name: str) -> list[str]:
    from rlbench.algorithm import Algorithm
    from rlbench.registry import ALGORITHMS

    opt = getattr(ALGORITHMS.load_subclass(name, Algorithm), "Options", None)
    return [f.name for f in dataclasses.fields(opt)] if opt is not None and dataclasses.is_dataclass(opt) else []


def load_spec(path: str | Path, *, resolve: bool = True) -> Spec:
    """Read and validate one spec file.

    ``resolve`` (default) also resolves the training config of every seed with
    :func:`rlbench.config.resolve` and checks the reward version and the evaluation's names against the
    registries; ``resolve=False`` checks the file's structure only (fast: ``rlbench bench list``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark spec {str(path)!r} does not exist.")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for key in data:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(key, TOP_KEYS, n=1)
            hint = f" Did you mean [{close[0]}]?" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'.{hint} A spec holds the tables {', '.join(TOP_KEYS)}.")
    missing = [k for k in TOP_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing table{'s' if len(missing) > 1 else ''} {', '.join(f'[{k}]' for k in missing)}.")
    bench = _table(path, "benchmark", data["benchmark"], BENCHMARK_KEYS, BENCHMARK_OPTIONAL)
    for key in ("name", "suite"):
        if not _NAME_RE.match(bench[key]):
            raise ConfigError(f"{path}: benchmark.{key} = {bench[key]!r} must be lower case letters, digits, '.', '-', '_'.")
    if bench["version"] < 1:
        raise ConfigError(f"{path}: benchmark.version must be >= 1, got {bench['version']}.")
    stem = f"{bench['name']}-v{bench['version']}"
    if path.stem != stem:
        raise ConfigError(f"{path}: the file name must be {stem}.toml (benchmark.name and benchmark.version); "
                          "a changed experiment is a new version in a new file.")
    seeds = bench["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: benchmark.seeds must be a non-empty list of distinct integers >= 0, got {seeds!r}.")
    reward = _table(path, "reward", data["reward"], REWARD_KEYS, REWARD_OPTIONAL)
    train = data["train"]
    if not isinstance(train, dict) or not all(isinstance(v, dict) for v in train.values()):
        raise ConfigError(f"{path}: [train] must hold [train.SECTION] tables (the layout of `rlbench config`).")
    for dotted, why in FORBIDDEN_TRAIN.items():
        sname, _, key = dotted.partition(".")
        if sname in train and (not key or key in train[sname]):
            raise ConfigError(f"{path}: train.{dotted} must not be set: {why}.")
    from rlbench.config import SECTIONS

    for sname in train:
        if sname not in SECTIONS:
            close = difflib.get_close_matches(sname, list(SECTIONS), n=1)
            hint = f" Did you mean [train.{close[0]}]?" if close else ""
            raise ConfigError(f"{path}: unknown section [train.{sname}].{hint} Valid: "
                              f"{', '.join(f'train.{s}' for s in SECTIONS if s != 'reward')}.")
        if sname not in ("algorithm", "reward"):  # open sections take plugin options, checked at resolution
            fields = [f.name for f in dataclasses.fields(SECTIONS[sname])]
            for key in train[sname]:
                if key not in fields:
                    close = difflib.get_close_matches(key, fields, n=1)
                    hint = f" Did you mean 'train.{sname}.{close[0]}'?" if close else ""
                    raise ConfigError(f"{path}: unknown key 'train.{sname}.{key}'.{hint} Valid keys in "
                                      f"[train.{sname}]: {', '.join(fields)}.")
    missing = [f"train.{s}.{k}" for s, keys in REQUIRED_TRAIN.items() for k in keys if k not in train.get(s, {})]
    family = _family(train.get("model", {}).get("name"))
    if family in REQUIRED_SAMPLER:
        missing += [f"train.sample.{k}" for k in REQUIRED_SAMPLER[family] if k not in train.get("sample", {})]
    if train.get("model", {}).get("train_mode", "lora") == "lora":
        missing += [f"train.model.{k}" for k in REQUIRED_LORA if k not in train.get("model", {})]
    if missing:
        raise ConfigError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                          "(a spec pins every hyperparameter).")
    ev = _table(path, "eval", data["eval"], EVAL_KEYS, EVAL_OPTIONAL)
    spec = Spec(path=path, name=bench["name"], version=bench["version"], suite=bench["suite"],
                description=bench["description"], seeds=tuple(seeds), reward=reward["name"],
                reward_version=reward["version"], reward_options=dict(reward.get("options", {})),
                train=train, eval=ev, reference=bench.get("reference", ""),
                sha256=hashlib.sha256(raw).hexdigest())
    _check_eval_shape(spec, family)
    if resolve:
        validate(spec)
    return spec


def _family(model: Any) -> str | None:
    """"ddim" or "flow" for the spec's model name (None when it cannot be told: resolution reports it)."""
    if not isinstance(model, str) or not model:
        return None
    from rlbench.diffusion.sampler import model_family

    try:
        return model_family(model)
    except RLBenchError:
        return None


def _check_eval_shape(spec: Spec, family: str | None = None) -> None:
    path, ev = spec.path, spec.eval
    if family == "flow":
        if "eta" in ev:
            raise ConfigError(f"{path}: eval.eta is DDIM's; a flow model's evaluation names eval.sampler "
                              "(ode, or the training sampler) instead.")
        if "sampler" not in ev:
            raise ConfigError(f"{path}: missing key eval.sampler (a flow model's evaluation sampler: ode, what peers "
                              "report, or the training sampler, e.g. flow-sde).")
    elif family == "ddim":
        if "sampler" in ev:
            raise ConfigError(f"{path}: eval.sampler is for flow models; a DDIM model's evaluation sets eval.eta.")
        if "eta" not in ev:
            raise ConfigError(f"{path}: missing key eval.eta (the DDIM eta of the evaluation; 0 = deterministic).")
    c = ev["checkpoints"]
    if isinstance(c, str):
        if c not in ("auto", "all", "last"):
            raise ConfigError(f"{path}: eval.checkpoints must be a list of epochs or 'auto', 'all', 'last'; got {c!r}.")
    else:
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in c) or not c:
            raise ConfigError(f"{path}: eval.checkpoints must be a non-empty list of epochs, got {c!r}.")
        every = spec.train["checkpoint"]["every"]
        for x in c:
            if x < 0 or x > spec.epochs or (x and x % every and x != spec.epochs):
                raise ConfigError(
                    f"{path}: eval.checkpoints has epoch {x}, which training does not save (checkpoint.every = "
                    f"{every}, run.epochs = {spec.epochs}).")
    for key in ("prompts", "rewards"):
        if not ev[key] or not all(isinstance(x, str) and x for x in ev[key]):
            raise ConfigError(f"{path}: eval.{key} must be a non-empty list of names, got {ev[key]!r}.")
    for key in ("images_per_prompt", "steps"):
        if ev[key] < 1:
            raise ConfigError(f"{path}: eval.{key} must be >= 1, got {ev[key]}.")
    per_set = ev["prompts_per_set"]
    if isinstance(per_set, dict):
        if set(per_set) != set(ev["prompts"]):
            raise ConfigError(f"{path}: eval.prompts_per_set names {', '.join(sorted(per_set)) or 'no set'}, but "
                              f"eval.prompts is {', '.join(ev['prompts'])}: give a number for each prompt set.")
        counts = list(per_set.values())
    else:
        counts = [per_set]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts) or ev["seed"] < 0:
        raise ConfigError(f"{path}: eval.prompts_per_set (each number) and eval.seed must be integers >= 0.")
    if not 0.0 <= ev.get("eta", 0.0) <= 1.0 or ev["guidance"] < 0:
        raise ConfigError(f"{path}: eval.eta must be in [0, 1] and eval.guidance >= 0.")


def validate(spec: Spec) -> Spec:
    """Check ``spec`` against rlbench: the reward's registered version, the algorithm's options, every
    seed's training config (``rlbench.config.resolve``), and the evaluation's prompt sets and rewards."""
    from rlbench.registry import PROMPTS, REWARDS

    path = spec.path
    try:
        registered = _registered_reward_version(spec.reward)
    except RLBenchError as exc:
        raise ConfigError(f"{path}: reward.name: {exc}") from exc
    if registered != spec.reward_version:
        raise ConfigError(
            f"{path}: reward.version = {spec.reward_version!r}, but the registered reward '{spec.reward}' is version "
            f"{registered!r}: its scores are not comparable with this spec's. Write a new spec version for the new "
            "reward (or install the reward version the spec pins).")
    algo = spec.train["algorithm"]["name"]
    try:
        options = _algorithm_option_names(algo)
    except RLBenchError as exc:
        raise ConfigError(f"{path}: train.algorithm.name: {exc}") from exc
    missing = [f"train.algorithm.{k}" for k in options if k not in spec.train["algorithm"]]
    if missing:
        raise ConfigError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                          f"(every option of '{algo}' is pinned).")
    for seed in spec.seeds:
        cfg = spec.config(seed)
        if cfg.notices:
            raise ConfigError(f"{path}: resolution adjusted the config ({'; '.join(cfg.notices)}); pin the adjusted "
                              "value in the spec so that it says what runs.")
        spec.configs[seed] = cfg
    for name in spec.eval["prompts"]:
        if name not in PROMPTS and not Path(name).is_file():
            raise ConfigError(f"{path}: eval.prompts: {PROMPTS.unknown_message(name)}")
    for name in spec.eval["rewards"]:
        if name not in REWARDS:
            raise ConfigError(f"{path}: eval.rewards: {REWARDS.unknown_message(name)}")
    return spec


# -- finding specs ----------------------------------------------------------------------------------


def packaged_root() -> Path:
    """The folder of the shipped specs (``rlbench.benchmarks``, i.e. ``benchmarks/`` in a checkout)."""
    import importlib.resources

    return Path(str(importlib.resources.files("rlbench.benchmarks")))


def _spec_files(folder: Path) -> list[Path]:
    # benchmarks/suites/ holds the evaluation suites of `rlbench eval --suite` (rlbench.eval.suites), not experiments
    suites = packaged_root() / "suites"
    return sorted(p for p in folder.rglob("*.toml") if re.search(r"-v\d+$", p.stem) and p.parent != suites)


def find_specs(target: str | Path | None = None) -> list[Path]:
    """Spec files for ``target``: a file, a folder (every ``*-vN.toml`` under it), a suite name of the shipped
    specs (``shapes``), or a spec id (``shapes/clip-ddpo-is-v1``, ``clip-ddpo-is-v1``); None = every shipped spec."""
    root = packaged_root()
    if target is None:
        return _spec_files(root)
    p = Path(target).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = _spec_files(p)
        if not files:
            raise ConfigError(f"{p} holds no benchmark specs (<name>-v<N>.toml files).")
        return files
    text = str(target).removesuffix(".toml")
    if (root / text).is_dir():
        return _spec_files(root / text)
    if (root / f"{text}.toml").is_file():
        return [root / f"{text}.toml"]
    hits = [f for f in _spec_files(root) if f.stem == text]
    if len(hits) == 1:
        return hits
    if len(hits) > 1:
        raise ConfigError(f"spec id {text!r} is ambiguous: {', '.join(str(h.relative_to(root)) for h in hits)}; "
                          "write SUITE/ID.")
    names = sorted({f.parent.name for f in _spec_files(root)} | {f.stem for f in _spec_files(root)})
    close = difflib.get_close_matches(text, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"no benchmark spec, folder or suite {str(target)!r}.{hint} See `rlbench bench list`.")


def load_specs(target: str | Path | None = None, *, resolve: bool = True) -> list[Spec]:
    """Every spec of ``target`` (see :func:`find_specs`), validated; the first invalid one raises."""
    specs = [load_spec(p, resolve=resolve) for p in find_specs(target)]
    seen: dict[tuple[str, str], Path] = {}
    for s in specs:
        key = (s.suite, s.id)
        if key in seen:
            raise ConfigError(f"{s.path}: spec {s.suite}/{s.id} is also defined in {seen[key]}.")
        seen[key] = s.path
    return specs


def validate_all(target: str | Path | None = None) -> tuple[list[Spec], dict[Path, str]]:
    """Validate every spec of ``target``; returns (valid specs, {path: error message} of the invalid ones)."""
    good, bad = [], {}
    for p in find_specs(target):
        try:
            good.append(load_spec(p))
        except RLBenchError as exc:
            bad[p] = str(exc)
    return good, bad
