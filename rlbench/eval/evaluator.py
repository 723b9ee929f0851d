"""``rlbench eval``: sample every checkpoint on held-out prompts with paired noise, score, report.

:func:`evaluate` is the harness (runs on disk -> ``<out>/``), :func:`evaluate_policy` the same
sampling and scoring code for one in-memory policy (training-time evaluation), :func:`rebuild`
re-derives tables, plots and the report from a results folder (``rlbench eval --from DIR``).

Results are data::

    <out>/scores.parquet     one row per image x reward (long format)
    <out>/kl.parquet         one row per image: KL of its trajectory from the base model
    <out>/diversity.parquet  one row per (run, checkpoint, prompt set, prompt): Vendi score, mean distance
    <out>/meta.json          runs, settings, rewards (version, direction, role), prompt sets, notices
    <out>/images/            every sample, <content hash>.png
    <out>/tables/ plots/ report.html   derived from the files above alone

The output folder is written beside ``<out>`` and renamed into place at the end: an interrupted
evaluation leaves no half-written output (and resumes from the cache when run again).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlbench.errors import InputError
from rlbench.train.rundir import fresh_dir
from rlbench.eval.cache import EvalCache, NoCache, image_hash, key_of
from rlbench.eval.plan import EvalPlan, RewardSpec, RunPlan, make_plan, reward_specs
from rlbench.eval.results import (  # noqa: F401 - the column lists are part of this module's API
    DIVERSITY_COLUMNS, KL_COLUMNS, SCORE_COLUMNS, load_results, parquet_bytes,
)
from rlbench.eval.scoring import (
    ImageStore, build_rewards, encode_png, features_of, meta_json, reward_cards, score_entries,
)

Advance = Callable[[int], None]


class NullProgress:
    """Progress reporting interface: ``task(description, total)`` returns ``advance(n)``."""

    def task(self, description: str, total: int) -> Advance:
        return lambda n=1: None


@dataclass
class EvalResult:
    """What :func:`evaluate` wrote. ``scores`` is long format; ``summary`` has mean, s.e. and the paired
    change from the base model per (run, checkpoint, prompt set, reward); ``tables`` the derived tables."""

    out: Path
    scores: pd.DataFrame
    summary: pd.DataFrame
    kl: pd.DataFrame
    diversity: pd.DataFrame
    meta: dict[str, Any]
    tables: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return self.out / "report.html"


# -- sampling ---------------------------------------------------------------------------------------


@dataclass
class Item:
    """One image to sample (a unique sample-cache key)."""

    key: str
    prompt: str
    index: int
    seed: int


def _fingerprint(path: Path) -> list[Any]:
    try:
        st = path.stat()
        return [path.name, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path.name, None, None]


def model_identity(model: str, revision: str) -> dict[str, Any]:
    """What identifies a base model's weights for the sample cache."""
    ident: dict[str, Any] = {"model": model, "revision": revision}
    folder = Path(model).expanduser()
    if folder.is_dir():
        ident["model"] = str(folder.resolve())
        ident["files"] = [_fingerprint(f) for f in sorted((folder / "unet").glob("*")) if f.is_file()]
        if (folder / "transformer").is_dir():  # a flow-matching pipeline's denoiser (UNet folders keep their keys)
            ident["files"] += [_fingerprint(f) for f in sorted((folder / "transformer").glob("*")) if f.is_file()]
    return ident


def checkpoint_identity(run: RunPlan, epoch: int) -> dict[str, Any]:
    folder = run.run.checkpoint_dir(epoch)
    return {"base": model_identity(run.model, run.revision), "run": str(run.run.path.resolve()), "epoch": epoch,
            "weights": _fingerprint(folder / "trainable.safetensors"), "train_mode": run.train_mode,
            "lora": [run.lora[0], run.lora[1], list(run.lora[2])] if run.train_mode == "lora" else None}


def sample_items(policy: Any, items: Sequence[Item], *, steps: int, eta: Any, guidance: float,
                 neg_embeds: Any, base: Any, kl_eta: Any, cache: NoCache, store: ImageStore,
                 batch_size: int, advance: Advance, found: Mapping[str, dict[str, Any]] | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Sample ``items`` not in the cache (batches of ``batch_size``, all prompts mixed: one UNet call per
    step per batch) and return ``{key: {"hash", "kl", "kl_steps"}}`` for every item."""
    from rlbench.eval.sampling import sample_paired

    found = cache.get_samples([it.key for it in items]) if found is None else found
    out: dict[str, dict[str, Any]] = {}
    for key, row in found.items():
        store.put(row["hash"], png=row["png"])
        out[key] = {"hash": row["hash"], "kl": row["kl"], "kl_steps": row["kl_steps"]}
    todo = list({it.key: it for it in items if it.key not in out}.values())
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        # eta / kl_eta: a DDIM eta or a Sampler (the eval sampler; the run's sampler whose KL is measured)
        batch = sample_paired(policy, [it.prompt for it in chunk], [it.seed for it in chunk], num_steps=steps,
                              sampler=policy.as_sampler(eta), guidance_scale=guidance, neg_embeds=neg_embeds,
                              base=base, kl_sampler=None if kl_eta is None else policy.as_sampler(kl_eta))
        rows = []
        for i, it in enumerate(chunk):
            image = batch.images[i]
            h = image_hash(image)
            png = encode_png(image)
            store.put(h, image=image, png=png)
            kl = float(batch.kl[i]) if batch.kl is not None else None
            rows.append({"key": it.key, "png": png, "hash": h, "kl": kl, "kl_steps": batch.kl_steps})
            out[it.key] = {"hash": h, "kl": kl, "kl_steps": batch.kl_steps}
        cache.put_samples(rows)
        advance(len(chunk))
    return out


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_policy(run: RunPlan, device: str):
    """The run's model, set up for its trainable weights, with a snapshot of the base values."""
    import torch

    from rlbench.diffusion.policy import load_policy
    from rlbench.diffusion.policy import BaseWeights

    policy = load_policy(run.model, run.revision)
    with torch.random.fork_rng(devices=[]):  # LoRA's random init must not move the caller's RNG
        policy.setup_training(run.train_mode, run.lora[0], run.lora[1], list(run.lora[2]))
    policy.to(device)
    policy.denoiser.eval()
    return policy, BaseWeights(policy)


def _sample_all(plan: EvalPlan, cache: NoCache, store: ImageStore, batch_size: int, device: str,
                progress: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Sample (or read from the cache) every image of every run and checkpoint; one record per image."""
    from rlbench.eval.kl import kl_eta_for
    from rlbench.eval.sampling import sample_seed

    records: list[dict[str, Any]] = []
    work = []  # (run, checkpoint, items, per-record list)
    for run in plan.runs:
        kl_eta = kl_eta_for(run.train_eta) if run.train_sampler is None or run.train_sampler.stochastic else None
        for c in run.checkpoints:
            ident = model_identity(run.model, run.revision) if c == 0 else checkpoint_identity(run, c)
            settings = [run.steps, run.eta, run.guidance, run.negative_prompt, kl_eta if c else None]
            if run.sampler is not None and run.sampler.family != "ddim":  # DDIM keys stay as they were
                settings += [repr(run.sampler), repr(run.train_sampler)]
            items: dict[str, Item] = {}
            recs = []
            for ps in plan.prompt_sets:
                for prompt, metadata in zip(ps.prompts, ps.metadata):
                    for k in range(plan.images_of(ps)):
                        seed = sample_seed(plan.seed, prompt, k)
                        key = key_of("sample", ident, settings, prompt, k, seed)
                        items.setdefault(key, Item(key, prompt, k, seed))
                        recs.append({"run": run.name, "checkpoint": c, "prompt_set": ps.name, "prompt": prompt,
                                     "metadata": meta_json(metadata), "image_index": k, "sample_seed": seed,
                                     "key": key, "kl_eta": kl_eta})
            work.append((run, c, list(items.values()), recs))
    total = sum(len(items) for _, _, items, _ in work)
    advance = progress.task("sampling", total)
    loaded: dict[tuple, Any] = {}
    for run, c, items, recs in work:
        found = cache.get_samples([it.key for it in items])
        missing = len(items) - len(found)
        group = (run.model, run.revision, run.train_mode, run.lora)
        policy = base = None
        if missing:
            if group not in loaded:
                loaded.clear()  # one model in memory at a time
                loaded[group] = _load_policy(run, device)
            policy, base = loaded[group]
            if c == 0:
                base.restore()
            else:
                policy.load_state(run.run.checkpoint_dir(c))
            neg = policy.encode_prompts([run.negative_prompt])
        kl_eta = recs[0]["kl_eta"] if recs else None
        advance(len(found))
        eval_sampler = run.sampler if run.sampler is not None else run.eta
        kl_sampler = (run.train_sampler if run.train_sampler is not None else kl_eta) if kl_eta else None
        got = sample_items(policy, [it for it in items if it.key not in found], steps=run.steps, eta=eval_sampler,
                           guidance=run.guidance, neg_embeds=neg if missing else None,
                           base=base if c else None, kl_eta=kl_sampler if c else None, cache=cache, store=store,
                           batch_size=batch_size, advance=advance, found={})
        for key, row in found.items():
            store.put(row["hash"], png=row["png"])
            got[key] = {"hash": row["hash"], "kl": row["kl"], "kl_steps": row["kl_steps"]}
        for rec in recs:
            row = got[rec["key"]]
            kl = row["kl"]
            if c == 0:
                kl = 0.0 if kl_eta else None  # the base model's KL from itself
            records.append({**rec, "hash": row["hash"], "kl": kl, "kl_steps": row["kl_steps"] if c else run.steps})
    return records


# -- results -----------------------------------------------------------------------------------------


def _frames(plan: EvalPlan, records: list[dict[str, Any]], scores: Mapping[tuple, float],
            features: Mapping[str, np.ndarray] | None, feature_name: str | None
            ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from rlbench.eval.diversity import mean_pairwise_distance, vendi_score

    runs = {r.name: r for r in plan.runs}
    suite_only = {p.name for p in plan.prompt_sets if p.role == "suite"}
    rows = []
    for rec in records:
        run = runs[rec["run"]]
        role = ("train" if rec["prompt_set"] == run.train_prompts else
                "suite" if rec["prompt_set"] in suite_only else "held-out")
        base = {"run": run.name, "algorithm": run.algorithm, "trained_reward": run.trained_reward, "seed": run.seed,
                "config": run.config, "checkpoint": rec["checkpoint"],
                "reward_queries": run.reward_queries.get(rec["checkpoint"], -1), "prompt_set": rec["prompt_set"],
                "set_role": role,
                "prompt": rec["prompt"], "image_index": rec["image_index"], "sample_seed": rec["sample_seed"]}
        image = f"images/{ImageStore.name(rec['hash'])}"
        for spec in plan.rewards:
            if not plan.applies(spec, rec["prompt_set"]):
                continue
            rows.append({**base, "reward": spec.label,
                         "score": scores[(spec.label, rec["hash"], rec["prompt"], rec["metadata"])], "image": image})
    score_df = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    kl_rows = [{"run": rec["run"], "checkpoint": rec["checkpoint"], "prompt_set": rec["prompt_set"],
                "prompt": rec["prompt"], "image_index": rec["image_index"], "sample_seed": rec["sample_seed"],
                "kl": np.nan if rec["kl"] is None else rec["kl"], "kl_steps": rec["kl_steps"],
                "kl_eta": np.nan if rec["kl_eta"] is None else rec["kl_eta"], "eval_eta": runs[rec["run"]].eta,
                "on_policy": rec["kl_eta"] is not None and abs(runs[rec["run"]].eta - rec["kl_eta"]) < 1e-12
                and (runs[rec["run"]].sampler is None or runs[rec["run"]].sampler == runs[rec["run"]].train_sampler)}
               for rec in records]
    kl_df = pd.DataFrame(kl_rows, columns=KL_COLUMNS)
    div_rows = []
    if features is not None:
        groups: dict[tuple, list[str]] = {}
        for rec in records:
            groups.setdefault((rec["run"], rec["checkpoint"], rec["prompt_set"], rec["prompt"]), []).append(rec["hash"])
        for (run, c, ps, prompt), hashes in groups.items():
            f = np.stack([features[h] for h in hashes])
            div_rows.append({"run": run, "checkpoint": c, "prompt_set": ps, "prompt": prompt, "n_images": len(hashes),
                             "vendi": vendi_score(f), "mean_pairwise_distance": mean_pairwise_distance(f),
                             "features": feature_name})
    div_df = pd.DataFrame(div_rows, columns=DIVERSITY_COLUMNS)
    return score_df, kl_df, div_df


def check_out(out: str | Path, overwrite: bool) -> Path:
    """The output folder must be new or empty unless ``overwrite`` (checked before any compute)."""
    return fresh_dir(out, overwrite, create=False, error=InputError)


def _remove_stale_tmp(out: Path) -> None:
    """Remove the half-written output of an evaluation that was killed (its process is gone)."""
    for old in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            os.kill(int((old / ".pid").read_text()), 0)
        except PermissionError:
            continue  # the process exists (another user's): still running
        except (OSError, ValueError):
            shutil.rmtree(old, ignore_errors=True)  # no such process, or no pid: killed
        # else: that evaluation is still running; leave it


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out`` (an existing ``out`` is replaced)."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash) if out.is_dir() else out.rename(trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


def evaluate(
    run_dirs: Sequence[str | Path],
    rewards: Sequence[str] | str | None = None,
    out: str | Path = "eval",
    overwrite: bool = False,
    batch_size: int = 32,
    progress: Any = None,
    *,
    prompts: Sequence[str] | str | None = None,
    checkpoints: str | Sequence[int] | None = None,
    images_per_prompt: int | None = 4,
    prompts_per_set: int | Mapping[str, int] | None = 16,
    seed: int = 0,
    eta: float | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    cache: str | Path | bool | None = None,
    features: str | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    sampler: str | None = None,
    suites: Sequence[str] | str | None = None,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> EvalResult:
    """Evaluate runs: sample every chosen checkpoint (the base model is checkpoint 0) on the prompt sets
    with paired noise, score with the rewards, and write data, tables, plots and ``report.html`` to ``out``.

    Args:
        run_dirs: run directories made by ``rlbench train``.
        rewards: rewards scored besides the defaults (each run's trained reward and its components, its
            ``logging.watch`` rewards, the gold rewards its model declares).
        out: output folder; must be new or empty unless ``overwrite``.
        batch_size: images per UNet call while sampling, and per reward call.
        progress: an object with ``task(description, total) -> advance(n)`` (the CLI's progress bars).
        prompts: prompt sets (default: each run's training set + its model's held-out sets).
        checkpoints: ``"auto"`` (default: up to 4 evenly spaced, the last included), ``"all"``, ``"last"``,
            or epoch numbers; the base model (0) is always included.
        images_per_prompt: images per prompt (each with its own fixed noise); None: 4, and each suite's own on
            its prompt sets.
        prompts_per_set: a fixed, seeded subset of this many prompts of each larger set (0: all; None: 16, and
            every prompt of a suite's sets); a mapping gives each prompt set its own number (every evaluated set named).
        seed: the eval seed; with the prompt and the image index it fixes every image's noise.
        eta, steps, guidance: sampler settings (default: each run's own); ``eta=0`` is the deterministic
            DDIM sampler.
        sampler: flow-matching runs: the sampler to evaluate with (default: the run's own; ``ode`` is the
            deterministic Euler sampler peers report with).
        cache: cache folder (default ``$RLBENCH_CACHE_DIR`` or ``~/.cache/rlbench/eval``); False: none.
        features: diversity features: ``shapes-clip``, a Hugging Face CLIP id, ``pixels`` or ``none``
            (default: what the model declares, else ``openai/clip-vit-base-patch32`` if cached).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ...
        log: receives notices (one line each).
        suites: evaluation suites (``geneval``, ``ocr``, ``t2i-compbench`` or a suite file; comma-separated or a
            list) added to the evaluation, each scored by its own metrics and tabled in its paper's layout.
        reward_options: ``{reward name: {option: value}}`` for every reward of that name (e.g. local weights).
    """
    t0 = time.perf_counter()
    log = log or (lambda line: None)
    progress = progress or NullProgress()
    if isinstance(rewards, str):
        rewards = [r.strip() for r in rewards.split(",") if r.strip()]
    if isinstance(prompts, str):
        prompts = [p.strip() for p in prompts.split(",") if p.strip()]
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}.")
    plan = make_plan(run_dirs, rewards, prompts, checkpoints, images_per_prompt, prompts_per_set, seed, eta, steps,
                     guidance, features, sampler, suites, reward_options)
    for line in plan.notices:
        log(f"notice: {line}")
    out_path = check_out(out, overwrite)
    store_cache = NoCache() if cache is False else EvalCache(None if cache in (None, True) else cache)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    (tmp / ".pid").write_text(str(os.getpid()))
    timings: dict[str, float] = {}
    try:
        store = ImageStore(tmp / "images")
        t = time.perf_counter()
        records = _sample_all(plan, store_cache, store, batch_size, _device(device), progress, log)
        timings["sampling"] = time.perf_counter() - t
        t = time.perf_counter()
        reward_objs = build_rewards(plan.rewards)
        scores = {}
        groups: dict[tuple[str, ...], list[RewardSpec]] = {}  # rewards that score the same prompt sets, together
        for spec in plan.rewards:
            groups.setdefault(spec.sets, []).append(spec)
        for sets, specs in groups.items():
            entries = [(r["hash"], r["prompt"], r["metadata"]) for r in records if not sets or r["prompt_set"] in sets]
            scores.update(score_entries(specs, reward_objs, entries, store, store_cache, batch_size, progress.task))
        timings["scoring"] = time.perf_counter() - t
        t = time.perf_counter()
        feats, feature_name, notices = None, None, list(plan.notices)
        if plan.features:
            from rlbench.errors import RLBenchError
            from rlbench.eval.diversity import load_feature_model

            try:
                fm = load_feature_model(plan.features, device=_device(device))
            except RLBenchError as exc:
                notices.append(f"diversity skipped: {exc}")
                log(f"notice: diversity skipped: {exc}")
            else:
                feature_name = fm.name
                feats = features_of(fm, [r["hash"] for r in records], store, store_cache, batch_size)
        else:
            notices.append("diversity skipped: no feature model (features = none)")
        timings["diversity"] = time.perf_counter() - t
        score_df, kl_df, div_df = _frames(plan, records, scores, feats, feature_name)
        from rlbench.eval.kl import kl_eta_for, kl_note

        meta = {
            "rlbench": _version(),
            "settings": {**plan.settings(), "batch_size": batch_size, "device": _device(device),
                         "cache": str(store_cache.path) if store_cache.path else None},
            "runs": [r.as_dict() for r in plan.runs],
            "rewards": reward_cards(plan.rewards, reward_objs),
            "gold": plan.gold,
            "prompt_sets": [{"name": p.name, "total": p.total, "used": len(p.prompts), "prompts": p.prompts,
                             "images_per_prompt": plan.images_of(p), "role": p.role or "default"}
                            for p in plan.prompt_sets],
            "suites": plan.suites,
            "features": feature_name,
            "kl_notes": {r.name: kl_note(r.eta, kl_eta_for(r.train_eta) if r.train_sampler is None
                                         or r.train_sampler.stochastic else None,
                                         r.train_sampler.name if r.train_sampler is not None else "ddim",
                                         r.sampler.name if r.sampler is not None else None) for r in plan.runs},
            "notices": notices,
            "timings": timings,
        }
        timings["total"] = time.perf_counter() - t0
        tables = finish(tmp, out_path, score_df, kl_df, div_df, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        store_cache.close()
    return EvalResult(out_path, score_df, tables["summary"].data, kl_df, div_df, meta, tables)


def finish(tmp: Path, out_path: Path, scores: pd.DataFrame, kl: pd.DataFrame, div: pd.DataFrame,
           meta: dict[str, Any]) -> dict[str, Any]:
    """Write the data files into ``tmp``, derive tables, plots and the report there, and swap it into ``out_path``."""
    from rlbench.eval.report import derive

    (tmp / "scores.parquet").write_bytes(parquet_bytes(scores))
    (tmp / "kl.parquet").write_bytes(parquet_bytes(kl))
    (tmp / "diversity.parquet").write_bytes(parquet_bytes(div))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    tables = derive(tmp)
    (tmp / ".pid").unlink()
    _swap_into_place(tmp, out_path)
    return tables


def _version() -> str:
    import rlbench

    return rlbench.__version__


def rebuild(folder: str | Path) -> EvalResult:
    """Re-derive tables/, plots/ and report.html of a results folder from its data files alone."""
    from rlbench.eval.report import derive

    folder = Path(folder)
    scores, kl, div, meta = load_results(folder)
    tables = derive(folder)
    return EvalResult(folder, scores, tables["summary"].data, kl, div, meta, tables)


# -- training-time evaluation ---------------------------------------------------------------------------


@dataclass
class PolicyEval:
    """What :func:`evaluate_policy` returns: long-format scores and per-image KL (None without a base)."""

    scores: pd.DataFrame
    kl: pd.DataFrame | None

    def metrics(self) -> dict[str, float]:
        """``{"eval/<reward>/<prompt set>": mean}`` (and ``eval/kl/<prompt set>``) for metrics.jsonl/TensorBoard."""
        out = {f"eval/{r}/{s}": float(v) for (r, s), v in self.scores.groupby(["reward", "prompt_set"])["score"].mean().items()}
        if self.kl is not None:
            out.update({f"eval/kl/{s}": float(v) for s, v in self.kl.groupby("prompt_set")["kl"].mean().items()})
        return out


def evaluate_policy(
    policy: Any,
    prompt_sets: Sequence[Any],
    rewards: Mapping[str, Any] | Sequence[str],
    *,
    seed: int = 0,
    steps: int,
    eta: float = 1.0,
    guidance: float,
    images_per_prompt: int = 2,
    prompts_per_set: int | None = 8,
    batch_size: int = 32,
    negative_prompt: str = "",
    base: Any = None,
    kl_eta: float | None = None,
    sampler: Any = None,
    kl_sampler: Any = None,
) -> PolicyEval:
    """Evaluate an in-memory policy with the harness's sampling and scoring (no cache, nothing written).

    The noise of image k of prompt p is fixed by (seed, p, k), as in :func:`evaluate`, so calls at
    different epochs are paired. Uses only its own generators (the caller's RNG states are untouched)
    and runs under ``torch.no_grad``; the policy's weights are left as they were.

    Args:
        policy: a :class:`~rlbench.diffusion.policy.DiffusionPolicy` (e.g. the trainer's).
        prompt_sets: names (or :class:`~rlbench.prompts.PromptSet` objects) of prompt sets.
        rewards: ``{label: reward}`` (e.g. the trainer's own CheckedReward objects) or reward names.
        base: the base model's trainable tensors (a ``{name: tensor}`` dict, e.g. cloned from
            ``policy.named_trainable_state()`` before training, or a :class:`~rlbench.diffusion.policy.BaseWeights`);
            with ``kl_eta`` (the run's training eta) the KL from the base model is measured too.
        prompts_per_set: a fixed subset (seeded by ``seed`` and the set's name) of larger sets.
    """
    from rlbench.eval.plan import subset
    from rlbench.diffusion.policy import BaseWeights
    from rlbench.eval.sampling import sample_seed
    from rlbench.prompts import PromptSet, load_prompts

    if isinstance(rewards, Mapping):
        reward_objs = dict(rewards)
        specs = [RewardSpec(label, label) for label in reward_objs]
    else:
        specs = [s for name in rewards for s in reward_specs(name, {}, "extra")]
        reward_objs = build_rewards(specs)
    if base is not None and not isinstance(base, BaseWeights):
        base = BaseWeights(policy, dict(base))
    store, cache = ImageStore(), NoCache()
    neg = policy.encode_prompts([negative_prompt])
    records = []
    items: dict[str, Item] = {}
    for ps in prompt_sets:
        ps = ps if isinstance(ps, PromptSet) else load_prompts(ps)
        for i in subset(len(ps.prompts), prompts_per_set, seed, ps.name):
            prompt, metadata = ps.prompts[i], ps.metadata[i]
            for k in range(images_per_prompt):
                s = sample_seed(seed, prompt, k)
                key = key_of(prompt, k, s)
                items.setdefault(key, Item(key, prompt, k, s))
                records.append({"prompt_set": ps.name, "prompt": prompt, "metadata": meta_json(metadata),
                                "image_index": k, "sample_seed": s, "key": key})
    if kl_sampler is None and kl_eta is not None and kl_eta > 0:
        kl_sampler = kl_eta
    with_kl = base is not None and kl_sampler is not None and policy.as_sampler(kl_sampler).stochastic
    training = policy.denoiser.training
    policy.denoiser.eval()
    try:  # leave the policy as the caller had it (train mode, the schedule's step count)
        with policy.keeping_schedule():
            got = sample_items(policy, list(items.values()), steps=steps, eta=sampler if sampler is not None else eta,
                               guidance=guidance, neg_embeds=neg, base=base if with_kl else None,
                               kl_eta=kl_sampler if with_kl else None, cache=cache, store=store,
                               batch_size=batch_size, advance=lambda n: None, found={})
    finally:
        policy.denoiser.train(training)
    entries = [(got[r["key"]]["hash"], r["prompt"], r["metadata"]) for r in records]
    scores = score_entries(specs, reward_objs, entries, store, cache, batch_size)
    rows = [{"prompt_set": r["prompt_set"], "prompt": r["prompt"], "image_index": r["image_index"],
             "sample_seed": r["sample_seed"], "reward": s.label,
             "score": scores[(s.label, got[r["key"]]["hash"], r["prompt"], r["metadata"])]}
            for r in records for s in specs]
    kl = None
    if with_kl:
        kl = pd.DataFrame([{"prompt_set": r["prompt_set"], "prompt": r["prompt"], "image_index": r["image_index"],
                            "kl": got[r["key"]]["kl"]} for r in records])
    return PolicyEval(pd.DataFrame(rows), kl)
