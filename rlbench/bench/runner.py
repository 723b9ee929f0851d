"""Plan and run benchmark specs: training, then the evaluation harness, for every (spec, seed).

Output folder (default ``results/<suite>/``)::

    runs/<spec id>/seed-<s>/train/        the run directory (rlbench train)
    runs/<spec id>/seed-<s>/eval/         the evaluation (rlbench eval): scores, tables, plots, report.html
    runs/<spec id>/seed-<s>/state.json    status (training -> evaluating -> done), the spec's sha256, timings,
                                          and per training attempt the machine and its speed (``machines``)
    runs/<spec id>/<spec id>.toml         a copy of the spec file the runs were made from
    summary.csv                           every run's eval summary (tables/summary.csv) with spec and seed
    README.md                             machine, versions, git commit, wall time, the runs and a main table
    .cache/                               the evaluation cache shared by the runs (the base model is sampled once)

A finished run (``done``, same spec file) is skipped. A killed run is refused unless ``resume``: then
training continues from its last intact checkpoint and the evaluation (atomic, cached) is redone.
A run whose spec file changed since it ran is an error: a changed experiment is a new spec version.

Each training attempt records the machine it ran on and that machine's speed: ``seconds_per_image_step`` of
:data:`SPEED_MODEL` on the run's device (:func:`measure_image_step`, timed once per invocation, before the first
training). A suite whose runs were made on machines of different speeds is compared at equal wall time on the
normalised clock (:func:`rlbench.bench.stats.equal_time`).

Time estimates (:func:`plan`) count UNet image-steps: every sampled image x its DDIM steps, plus
``TRAIN_STEP_COST`` per trained step (a forward and a backward), plus the evaluation's images x steps
(twice for checkpoints: the base model's UNet runs beside for the KL). Seconds per image-step are
measured on this machine for a model that loads offline (a short timing of its sampler), else taken from
``H100_SECONDS_PER_IMAGE_STEP`` for Stable Diffusion at 512 px.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlbench.bench.spec import Spec
from rlbench.eval.tables import markdown_table
from rlbench.errors import ConfigError, RLBenchError

# README "Speed": SD-1.5 (512 px) on an H100, fp16 frozen weights: 1.87 images/s sampled at 50 DDIM steps
# with guidance (row "SD-1.5 shapes (512 px), DDPO-IS, H100"); 78 s per DDPO-IS epoch of 32 samples x 50 steps,
# which this cost model reproduces within 15 % (32 x 50 x (1 + 3) x 0.0107 s = 68 s).
H100_SECONDS_PER_IMAGE_STEP = 1.0 / (1.87 * 50)
H100_SOURCE = ("README 'Speed': SD-1.5 512 px on an H100 samples 1.87 images/s at 50 steps (0.0107 s per image-step; "
               "DDPO-IS 78 s per epoch of 32 x 50 steps); full fine-tuning costs more than the LoRA it was measured with")
# A trained denoising step (forward + backward, guided) against a sampled one: the default shapes run's
# training 3.2 s for 64 x 5 steps against sampling 2.1 s for 64 x 10 (README "Speed"): 3.05.
TRAIN_STEP_COST = 3.0
RUN_OVERHEAD_S = 10.0  # start-up per run and per evaluation (model loading)
SD_MODELS = {"sd-1.4": "CompVis/stable-diffusion-v1-4", "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
STATE_FILE = "state.json"
# The machine-speed probe: the shipped shapes UNet (it loads offline everywhere), timed as the plan's estimates
# are; about 2 s on a 2-core CPU once the model is loaded.
SPEED_MODEL = "shapes"


@dataclasses.dataclass
class RunPlan:
    """One (spec, seed) run and what it costs."""

    spec: Spec
    seed: int
    samples: int            # training samples (= training reward queries)
    eval_images: int
    eval_queries: int       # eval images x eval rewards (at least; the harness adds the model's gold rewards)
    image_steps: float      # UNet image-step equivalents, training and evaluation
    seconds: float | None = None

    @property
    def id(self) -> str:
        return f"{self.spec.id}/seed-{self.seed}"

    @property
    def reward_queries(self) -> int:
        return self.samples + self.eval_queries


def _checkpoint_count(spec: Spec) -> int:
    c = spec.eval_checkpoints()
    every = int(spec.train["checkpoint"]["every"])
    saved = sorted({e for e in range(every, spec.epochs + 1, every)} | {spec.epochs})
    if c == "all":
        return len(saved) + 1
    if c == "last":
        return 2
    if c == "auto":
        return min(4, len(saved)) + 1
    return len(set(c) | {0})


def _prompt_count(name: str, per_set: int | dict[str, int]) -> int:
    if isinstance(per_set, dict):
        per_set = per_set.get(name, 0)
    try:
        from rlbench.prompts import load_prompts

        total = len(load_prompts(name).prompts)
    except Exception:  # noqa: BLE001 - an estimate only
        return per_set or 16
    return min(per_set, total) if per_set else total


def run_plan(spec: Spec, seed: int) -> RunPlan:
    """Samples, reward queries and image-steps of one run (no model is loaded)."""
    cfg = spec.configs.get(seed) or spec.config(seed)
    samples = cfg.samples_per_epoch * cfg.run.epochs
    steps = cfg.sample.num_steps
    name, opts = cfg.algorithm.name, cfg.algorithm.options
    if name == "draft":
        # Every step is sampled once; the K grad-enabled ones add their backward (TRAIN_STEP_COST - 1 forwards)
        # and, checkpointed, a recomputed forward; DRaFT-LV redoes the last step n times with gradients.
        k, lv = int(opts.get("k", 1)), int(opts.get("lv_copies", 0))
        per_grad_step = TRAIN_STEP_COST - 1 + (1 if opts.get("gradient_checkpointing", True) else 0)
        train_steps = samples * (steps + (k if not lv else 0) * per_grad_step + lv * (1 + per_grad_step))
    else:
        if name.startswith("rwr"):
            trained_per_sample = cfg.train.num_inner_epochs  # one random timestep per pass (the denoising loss)
        else:
            window = max(1, round(steps * cfg.train.timestep_window))
            trained_per_sample = max(1, round(window * cfg.train.timestep_fraction)) * cfg.train.num_inner_epochs
        # GRPO's KL anchor runs the base model's forward beside each trained step.
        step_cost = TRAIN_STEP_COST + (1 if name == "grpo" and float(opts.get("beta", 0)) > 0 else 0)
        train_steps = samples * (steps + step_cost * trained_per_sample)
    ev = spec.eval
    n_ckpt = _checkpoint_count(spec)
    per_ckpt = sum(_prompt_count(p, ev["prompts_per_set"]) for p in ev["prompts"]) * ev["images_per_prompt"]
    eval_images = n_ckpt * per_ckpt
    eval_steps = per_ckpt * ev["steps"] * (1 + 2 * (n_ckpt - 1))
    return RunPlan(spec, seed, samples, eval_images, eval_images * len(ev["rewards"]), train_steps + eval_steps)


def measure_image_step(model: str, device: str = "auto", batch: int = 16, steps: int = 4,
                       guidance: float = 5.0, repeats: int = 3) -> float:
    """Seconds per guided UNet image-step of ``model`` on ``device``: a short timing of its sampler."""
    import torch

    from rlbench.diffusion.policy import load_policy

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    policy = load_policy(model).to(dev)
    prompts = ["a test prompt"] * batch
    gen = torch.Generator("cpu").manual_seed(0)
    policy.sample(prompts[:2], num_steps=1, eta=1.0, guidance_scale=guidance, generator=gen)  # warm-up

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(repeats):  # the fastest of a few: other processes on a shared machine only add time
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            policy.sample(prompts, num_steps=n, eta=1.0, guidance_scale=guidance, generator=gen)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    # Text encoding and decoding are included (a few percent of a sample at these lengths): a slight overestimate.
    return timed(steps) / (batch * steps)


def device_name(device: str = "auto") -> str:
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def machine_record(device: str = "auto") -> dict[str, Any]:
    """The machine a training attempt runs on: its name, device and speed (seconds per guided image-step of
    :data:`SPEED_MODEL`; ``None`` with the reason where it cannot be timed)."""
    rec: dict[str, Any] = {"node": platform.node() or "unknown", "device": device_name(device),
                           "speed_model": SPEED_MODEL, "seconds_per_image_step": None}
    try:
        rec["seconds_per_image_step"] = measure_image_step(SPEED_MODEL, device)
    except (RLBenchError, OSError, RuntimeError) as exc:  # a run is not refused for its clock
        rec["speed_error"] = f"{type(exc).__name__}: {exc}"
    if hasattr(os, "getloadavg"):
        rec["load_average"] = round(os.getloadavg()[0], 2)
    return rec


def _cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "unet/config.json"), str)
    except Exception:  # noqa: BLE001 - no cache, no hub library: not cached
        return False


@dataclasses.dataclass
class Costs:
    """Seconds per image-step per model, and how each was obtained."""

    seconds: dict[str, float]
    how: dict[str, str]
    gpu_estimate: set[str]  # models estimated with the H100 constant


def measure_costs(models: Sequence[str], device: str = "auto", log: Callable[[str], None] = print,
                  batch: int = 16) -> Costs:
    import torch

    seconds, how, gpu = {}, {}, set()
    on_gpu = device in ("auto", "cuda") and torch.cuda.is_available()
    for m in sorted(set(models)):
        if m in SD_MODELS and not (on_gpu and _cached(SD_MODELS[m])):  # a dry run never downloads weights
            seconds[m], how[m] = H100_SECONDS_PER_IMAGE_STEP, f"H100 constant ({H100_SOURCE})"
            gpu.add(m)
            continue
        try:
            seconds[m] = measure_image_step(m, device, batch=batch)
            load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
            how[m] = (f"measured on this machine: {seconds[m] * 1000:.2f} ms per image-step ({device_name(device)}{load}; "
                      "the fastest of 3 timings of its sampler; other work on the machine inflates it)")
        except (RLBenchError, OSError) as exc:
            if m in SD_MODELS:
                seconds[m], how[m] = H100_SECONDS_PER_IMAGE_STEP, f"H100 constant (not measurable here: {exc})"
                gpu.add(m)
            else:
                raise ConfigError(f"cannot time model {m!r} for the estimate: {exc}") from exc
    return Costs(seconds, how, gpu)


def select(specs: Sequence[Spec], only: str | None = None) -> list[tuple[Spec, int]]:
    """(spec, seed) pairs; ``only`` is a glob over ``<spec id>`` or ``<spec id>/seed-<s>`` (comma-separated)."""
    pats = [p.strip() for p in (only or "").split(",") if p.strip()]
    out = []
    for spec in specs:
        for seed in spec.seeds:
            rid = f"{spec.id}/seed-{seed}"
            names = (spec.id, spec.name, rid, f"{spec.suite}/{spec.id}", f"{spec.suite}/{rid}")
            if not pats or any(fnmatch.fnmatchcase(n, p) for p in pats for n in names):
                out.append((spec, seed))
    if pats and not out:
        raise ConfigError(f"--only {only!r} matches no run; runs are named like "
                          f"{specs[0].id}/seed-{specs[0].seeds[0]} (globs allowed)." if specs else "no specs.")
    return out


def plan(specs: Sequence[Spec], only: str | None = None, *, measure: bool = True, device: str = "auto",
         log: Callable[[str], None] = print) -> tuple[list[RunPlan], Costs | None]:
    plans = [run_plan(s, seed) for s, seed in select(specs, only)]
    costs = None
    if measure and plans:
        batch = max(int(p.spec.train["sample"]["batch_size"]) for p in plans)  # the training's sampling batch
        costs = measure_costs([p.spec.train["model"]["name"] for p in plans], device, log, batch=min(batch, 32))
        for p in plans:
            p.seconds = p.image_steps * costs.seconds[p.spec.train["model"]["name"]] + 2 * RUN_OVERHEAD_S
    return plans, costs


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def format_plan(plans: Sequence[RunPlan], costs: Costs | None, device: str = "auto") -> str:
    """The dry-run's text: one line per run, totals, and how the time was estimated."""
    lines = [f"{'run':<44} {'algorithm':<11} {'reward':<22} {'epochs':>6} {'samples':>8} {'queries':>9} {'est. time':>10}"]
    for p in plans:
        cfg = p.spec.configs.get(p.seed) or p.spec.config(p.seed)
        est = _hours(p.seconds) if p.seconds is not None else "-"
        lines.append(f"{p.id:<44} {cfg.algorithm.name:<11} {p.spec.reward:<22} {cfg.run.epochs:>6} {p.samples:>8,} "
                     f"{p.reward_queries:>9,} {est:>10}")
    n_specs = len({p.spec.id for p in plans})
    samples = sum(p.samples for p in plans)
    queries = sum(p.reward_queries for p in plans)
    lines.append("")
    lines.append(f"{len(plans)} runs ({n_specs} specs x seeds): {samples:,} training samples, {queries:,} reward queries "
                 f"(training {samples:,} + evaluation {sum(p.eval_queries for p in plans):,}), "
                 f"{sum(p.eval_images for p in plans):,} evaluation images.")
    if costs is not None:
        here = [p for p in plans if p.spec.train["model"]["name"] not in costs.gpu_estimate]
        gpu = [p for p in plans if p.spec.train["model"]["name"] in costs.gpu_estimate]
        if here:
            lines.append(f"Estimated time on this device ({device_name(device)}): {_hours(sum(p.seconds for p in here))} "
                         f"for {len(here)} runs.")
        if gpu:
            total = sum(p.seconds for p in gpu)
            lines.append(f"Estimated GPU hours: {total / 3600:,.1f} H100-hours for {len(gpu)} runs "
                         f"({total / 3600 / max(1, len(gpu)):.1f} per run); this machine has no GPU for them or "
                         "lacks the weights.")
        for model, how in sorted(costs.how.items()):
            lines.append(f"  {model}: {how}")
        lines.append(f"  cost model: sampled image-steps + {TRAIN_STEP_COST:g} x trained steps + evaluation image-steps "
                     f"(x2 with the KL's base-model pass) + {RUN_OVERHEAD_S:g} s start-up per training and evaluation.")
    return "\n".join(lines)


# -- running -----------------------------------------------------------------------------------------


def _read_state(path: Path) -> dict[str, Any] | None:
    f = path / STATE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError as exc:
        raise ConfigError(f"{f} is not valid JSON ({exc}); delete {path} to redo this run.") from exc


def _write_state(path: Path, state: dict[str, Any]) -> None:
    from rlbench.train.rundir import atomic_write_text

    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / STATE_FILE, json.dumps(state, indent=1))


def _out_for(spec: Spec, out: str | Path | None, suites: set[str]) -> Path:
    if out is None:
        return Path("results") / spec.suite
    return Path(out) / spec.suite if len(suites) > 1 else Path(out)


@dataclasses.dataclass
class RunOutcome:
    id: str
    status: str     # "done" (ran now), "skipped" (finished before), "resumed"
    seconds: float
    folder: Path


def run(specs: Sequence[Spec], *, out: str | Path | None = None, only: str | None = None, resume: bool = False,
        device: str | None = None, log: Callable[[str], None] = print) -> list[RunOutcome]:
    """Train and evaluate every selected (spec, seed); resumable (see the module docstring). Returns the outcomes."""
    pairs = select(specs, only)
    suites = {s.suite for s in specs}
    # Check every run's state before any compute: changed specs and interrupted runs fail here.
    problems = []
    for spec, seed in pairs:
        folder = _out_for(spec, out, suites) / "runs" / spec.id / f"seed-{seed}"
        state = _read_state(folder)
        if state is None:
            if folder.exists() and any(folder.iterdir()):
                problems.append(f"{folder} exists without {STATE_FILE}; delete it to run {spec.id}/seed-{seed}")
            continue
        if state.get("spec_sha256") != spec.sha256:
            problems.append(f"{folder} was made from a different {spec.path.name} (the spec changed after the run): "
                            "give the changed experiment a new version, or delete the folder to redo it")
        elif state.get("status") != "done" and not resume:
            problems.append(f"{spec.id}/seed-{seed} was interrupted ({state.get('status')}); pass --resume to "
                            "continue it from its last checkpoint")
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    outcomes: list[RunOutcome] = []
    machines: dict[str, dict[str, Any]] = {}  # per device: this invocation's machine record (timed once)
    t_all = time.perf_counter()
    for i, (spec, seed) in enumerate(pairs, 1):
        root = _out_for(spec, out, suites)
        folder = root / "runs" / spec.id / f"seed-{seed}"
        rid = f"{spec.id}/seed-{seed}"
        state = _read_state(folder)
        if state and state.get("status") == "done":
            log(f"[{i}/{len(pairs)}] {rid}: done before, skipped")
            outcomes.append(RunOutcome(rid, "skipped", 0.0, folder))
            continue
        resumed = state is not None
        state = state or {"spec": f"{spec.suite}/{spec.id}", "spec_file": spec.path.name, "spec_sha256": spec.sha256,
                          "seed": seed, "status": "training", "train_seconds": 0.0, "eval_seconds": 0.0,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        from rlbench.train.rundir import atomic_write_bytes

        copy = folder.parent / spec.path.name
        if not copy.is_file():
            atomic_write_bytes(copy, spec.path.read_bytes())  # the spec beside its runs: `bench report` reads it
        train_dir = folder / "train"
        cfg = spec.config(seed, out=str(train_dir))
        if device:
            cfg = cfg.with_changes({"model.device": device})
        if state["status"] == "training" and cfg.model.device not in machines:  # not counted as training time
            machines[cfg.model.device] = machine_record(cfg.model.device)
        t0 = time.perf_counter()
        if state["status"] == "training":
            if "machines" not in state and state["train_seconds"] > 0:  # attempts made before the record existed
                state["machines"] = [{"seconds_per_image_step": None, "train_seconds": state["train_seconds"]}]
            attempt = {**machines[cfg.model.device], "train_seconds": 0.0}
            state.setdefault("machines", []).append(attempt)
            _write_state(folder, state)
            log(f"[{i}/{len(pairs)}] {rid}: training ({cfg.algorithm.name}, {cfg.reward.name}, {cfg.run.epochs} epochs"
                + (", resuming" if resumed else "") + ")")
            from rlbench.train.trainer import train

            try:
                if resumed and (train_dir / "config.toml").is_file():
                    train(config=cfg, resume=train_dir, log=None)
                else:
                    train(config=cfg, overwrite=True, log=None)
                state["status"] = "evaluating"
            finally:  # a killed attempt's time counts too (the README's wall time)
                attempt["train_seconds"] = time.perf_counter() - t0
                state["train_seconds"] += attempt["train_seconds"]
                _write_state(folder, state)
        t1 = time.perf_counter()
        log(f"[{i}/{len(pairs)}] {rid}: evaluating")
        try:
            _evaluate(spec, train_dir, folder / "eval", root / ".cache", cfg.model.device)
            state["status"] = "done"
            state["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        finally:
            state["eval_seconds"] += time.perf_counter() - t1
            _write_state(folder, state)
        outcomes.append(RunOutcome(rid, "resumed" if resumed else "done", time.perf_counter() - t0, folder))
    # Only the suites whose runs were selected: `--only '*-v2'` over the shapes folder leaves results/shapes/ as it was.
    for root in sorted({_out_for(s, out, suites) for s, _ in pairs}):
        write_readme(root, [s for s in specs if _out_for(s, out, suites) == root], time.perf_counter() - t_all)
    return outcomes


def _evaluate(spec: Spec, train_dir: Path, out: Path, cache: Path, device: str) -> None:
    from rlbench.eval.evaluator import evaluate

    ev = spec.eval
    evaluate([train_dir], rewards=list(ev["rewards"]), out=out, overwrite=True, batch_size=ev.get("batch_size", 32),
             prompts=list(ev["prompts"]), checkpoints=spec.eval_checkpoints(),
             images_per_prompt=ev["images_per_prompt"], prompts_per_set=ev["prompts_per_set"] or None,
             seed=ev["seed"], eta=ev.get("eta"), sampler=ev.get("sampler"), steps=ev["steps"], guidance=ev["guidance"],
             cache=cache, features=ev.get("features"), device=device)


# -- the combined README --------------------------------------------------------------------------------


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if sha.returncode:
        return "unknown (not a git checkout)"
    return sha.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _versions() -> str:
    from importlib import metadata

    parts = [f"python {platform.python_version()}"]
    for dist in ("rlbench", "torch", "diffusers", "transformers"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


def collect_summary(root: Path, specs: Sequence[Spec]):
    """Every finished run's ``eval/tables/summary.csv`` with spec and seed columns (None when there is none)."""
    import pandas as pd

    frames = []
    for spec in specs:
        for seed in spec.seeds:
            f = root / "runs" / spec.id / f"seed-{seed}" / "eval" / "tables" / "summary.csv"
            if f.is_file():
                df = pd.read_csv(f)
                df.insert(0, "seed", seed)
                df.insert(0, "spec", spec.id)
                frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


def main_table(summary) -> str:
    """Change from the base model at each run's last checkpoint on its training prompt set, per spec and
    reward: mean ± sd over seeds (Markdown)."""
    if summary is None or summary.empty:
        return "_No finished runs yet._\n"
    from rlbench.bench.common import at_last_checkpoint

    last = at_last_checkpoint(summary[summary["checkpoint"] > 0])
    last = last[last["set_role"] == "train"] if "set_role" in last else last
    rewards = sorted(last["reward"].unique())
    lines = ["| spec | seeds | " + " | ".join(rewards) + " |", "|---|---|" + "---|" * len(rewards)]
    for spec, g in last.groupby("spec", sort=True):
        cells = []
        for r in rewards:
            d = g[g["reward"] == r]["delta"].dropna()
            cells.append("" if d.empty else (f"{d.mean():+.4g} ± {d.std():.2g}" if len(d) > 1 else f"{d.mean():+.4g}"))
        lines.append(f"| {spec} | {g['seed'].nunique()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(root: str | Path) -> Path:
    """Rewrite ``<root>/README.md`` and ``summary.csv`` from the runs' state and evaluation tables alone
    (``rlbench bench report``); each run's own tables regenerate with ``rlbench eval --from RUN/eval``."""
    from rlbench.bench.spec import load_spec

    root = Path(root)
    files = sorted(p for p in root.glob("runs/*/*.toml") if p.stem == p.parent.name)
    if not files:
        raise ConfigError(f"{root} holds no benchmark runs (runs/<spec id>/<spec id>.toml); run `rlbench bench run` first.")
    return write_readme(root, [load_spec(p, resolve=False) for p in files], None, by="rlbench bench report")


def write_readme(root: Path, specs: Sequence[Spec], wall: float | None, by: str = "rlbench bench run") -> Path:
    """``<root>/README.md`` and ``<root>/summary.csv``: machine, versions, commit, wall time, runs, main table."""
    from rlbench.train.rundir import atomic_write_text

    root.mkdir(parents=True, exist_ok=True)
    rows, total = [], 0.0
    for spec in specs:
        for seed in spec.seeds:
            st = _read_state(root / "runs" / spec.id / f"seed-{seed}")
            if st is None:
                rows.append(f"| {spec.id} | {seed} | not run | | |")
                continue
            tr, evs = st.get("train_seconds", 0.0), st.get("eval_seconds", 0.0)
            total += tr + evs
            rows.append(f"| {spec.id} | {seed} | {st.get('status')} | {tr:.0f} | {evs:.0f} |")
    summary = collect_summary(root, specs)
    tables = {}
    if summary is not None:
        from rlbench.bench import analysis

        atomic_write_text(root / "summary.csv", summary.to_csv(index=False))
        tables = analysis.write(root, summary, specs)
    derived = "".join(f"\n## {t.title}\n\n{t.caption}\n\n{markdown_table(t.display)}" for t in tables.values())
    suite = ", ".join(sorted({s.suite for s in specs}))
    extra_plots = "".join(f", `plots/{n}`" for n in ("gain_vs_gold.png", "ratio_by_step.png") if (root / "plots" / n).is_file()
                          and "intervals" in tables)
    text = f"""# Benchmark results: {suite}

Written by `{by}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Every number comes out of
`rlbench eval`; each run's folder holds its training run (`train/`), its evaluation (`eval/`, with
`report.html`, `tables/`, `plots/`) and `state.json`.

- Machine: {platform.node() or 'unknown'}; {device_name()}; {platform.platform()}
- Versions: {_versions()}
- Git commit: {_git_commit()}
- Wall time: {_hours(total)} in the runs (training + evaluation, summed over runs){'' if wall is None else f'; this invocation {_hours(wall)}'}
- Specs: {', '.join(sorted(f'{s.id} ({s.sha256[:12]})' for s in specs))}

## Main table

Change from the base model at each run's last checkpoint, on the training prompt set, per reward
(mean ± sd over seeds; the full data is `summary.csv`).

{main_table(summary)}{derived}
Plots: `plots/curves.png` (change from base against reward queries), `plots/proxy_vs_gold.png`{extra_plots};
all of it in `report.html`. Regenerate with `rlbench bench report {root}`.

## Runs

| spec | seed | status | training s | evaluation s |
|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    atomic_write_text(root / "README.md", text)
    return root / "README.md"
