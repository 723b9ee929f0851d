"""``rlbench train``: sample -> score -> advantages -> update -> log -> checkpoint, per epoch.

:func:`train` is the importable function behind the CLI. It resolves every plugin and validates
the whole configuration before any compute, then runs :class:`Trainer` under accelerate (one
process by default; ``accelerate launch`` for several, gradients all-reduced through the
DDP-wrapped UNet).

Exact resume: a checkpoint holds the trainable weights, optimizer state, every RNG state (per
process), the algorithm's state (DDPO's per-prompt reward buffers) and the counters. Resuming from checkpoint k re-runs epoch k
onwards exactly as an uninterrupted run would (on the same hardware and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rlbench.algorithm import Algorithm, TrainBatch, UpdateContext, make_algorithm
from rlbench.config import TrainConfig, ensure_resolved, load_config
from rlbench.errors import ConfigError, DependencyNotInstalled, RunDirError
from rlbench.train.rundir import RunDir, atomic_write_text



def _slug(text: str) -> str:
    """A reward spec as a folder-name part: ``a:1,b:0.5`` -> ``a1+b0.5``."""
    return text.replace(":", "").replace(",", "+")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def epoch_prompts(prompt_set, rng: np.random.Generator, batch_size: int, num_batches: int,
                  images_per_prompt: int = 1) -> list[tuple[list[str], list[dict[str, Any]]]]:
    """One process's (prompts, metadata) for each sampling batch of an epoch.

    ``images_per_prompt == 1``: each batch draws its prompts i.i.d., as ddpo-pytorch does.
    ``k > 1``: the epoch draws ``batch_size * num_batches / k`` different prompts (Flow-GRPO's
    repeated-prompt sampler draws without replacement) and gives each k consecutive images, so every
    prompt's group is scored together.
    """
    k = images_per_prompt
    if k == 1:
        return [prompt_set.sample(batch_size, rng) for _ in range(num_batches)]
    drawn, meta = prompt_set.sample_distinct(batch_size * num_batches // k, rng)
    prompts = [p for p in drawn for _ in range(k)]
    metadata = [dict(m) for m in meta for _ in range(k)]
    return [(prompts[b * batch_size:(b + 1) * batch_size], metadata[b * batch_size:(b + 1) * batch_size])
            for b in range(num_batches)]


def resolve_config(
    config: str | Path | TrainConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, dict[str, Any]] | None = None,
    resume: str | Path | None = None,
) -> TrainConfig:
    """The run's configuration, resolved once: from the sources given, or for ``resume`` the run's own
    config.toml (only run.epochs may change). A :class:`TrainConfig` is used as it is (resolved if built by hand)."""
    if isinstance(config, TrainConfig):
        if overrides or values:
            raise ConfigError("pass either a TrainConfig or overrides/values, not both (TrainConfig.with_changes "
                              "makes a changed copy).")
        return ensure_resolved(config)
    if resume is None:
        return load_config(config, overrides, values)
    run = RunDir.open(resume)
    given = {f"{s}.{k}" for s, sec in (values or {}).items() for k, v in sec.items() if v is not None}
    changed = sorted(given - {"run.epochs"}) + ([f"--set {o}" for o in overrides]) + (["--config"] if config else [])
    if changed:
        raise ConfigError(
            f"--resume continues {run.path} with its own config.toml; only --epochs may change, got "
            f"{', '.join(changed)}. Start a new run (--out) to change anything else."
        )
    epochs = (values or {}).get("run", {}).get("epochs")
    return load_config(run.config_path, values={"run": {"epochs": epochs}} if epochs else None)


def train(
    config: str | Path | TrainConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, dict[str, Any]] | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train and return the run directory.

    Args:
        config: a TOML file or a :class:`TrainConfig`.
        overrides: ``"section.key=value"`` strings (``--set``).
        values: nested dict applied last (the CLI's ``--algo``, ``--reward``, ... flags).
        resume: an existing run directory to continue from its last checkpoint.
        overwrite: replace a non-empty ``run.out`` directory.
        progress: show a rich progress bar.
        log: receives one line per epoch (None = silent).
    """
    trainer = prepare(config, overrides, values, resume=resume, overwrite=overwrite, progress=progress, log=log)
    return trainer.run(resume=resume, overwrite=overwrite)


def prepare(
    config: str | Path | TrainConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, dict[str, Any]] | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
) -> Trainer:
    """Resolve and validate everything, load the model, and return a ready :class:`Trainer`.

    Every plugin is resolved and the whole configuration validated before the model is loaded.
    """
    from rlbench.diffusion.policy import load_policy
    from rlbench.prompts import load_prompts
    from rlbench.registry import make_reward

    cfg = resolve_config(config, overrides, values, resume)  # the one resolution: validated, frozen
    algorithm = make_algorithm(cfg)
    reward = make_reward(cfg.reward.name, **cfg.reward.options)
    watch = {name: make_reward(name) for name in cfg.logging.watch}  # fail fast on a bad name
    if cfg.logging.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise DependencyNotInstalled("logging.wandb = true needs wandb: pip install 'rlbench[wandb]'.") from exc
    prompt_set = load_prompts(cfg.prompts.name)
    evaluation = _eval_setup(cfg, reward, watch) if cfg.eval.every else None  # bad names fail here
    if resume is None and cfg.run.out and not overwrite:
        RunDir.check_fresh(cfg.run.out)  # the standard "already exists" error, before loading the model
    policy = load_policy(cfg.model.name, cfg.model.revision)
    trainer = Trainer(cfg, policy, reward, algorithm, prompt_set, log=log, progress=progress, watch=watch,
                      evaluation=evaluation)
    for notice in cfg.notices:
        trainer.info(notice)
    return trainer


@dataclass
class EvalSetup:
    """What ``eval.every`` evaluates: prompt sets and rewards (by label), resolved before the model loads."""

    prompt_sets: list[Any]
    rewards: dict[str, Any]


def _eval_setup(cfg: TrainConfig, reward, watch: dict[str, Any]) -> EvalSetup:
    """The training-time evaluation's prompt sets and rewards; defaults: the training set plus the model's
    held-out sets; the training reward, the watched ones and the model's gold rewards."""
    from rlbench.eval.plan import model_eval_defaults
    from rlbench.prompts import load_prompts
    from rlbench.registry import make_reward

    declared = model_eval_defaults(cfg.model.name)
    names = list(cfg.eval.prompts) or [cfg.prompts.name, *declared.get("prompt_sets", [])]
    prompt_sets = [load_prompts(n) for n in dict.fromkeys(names)]
    if cfg.eval.rewards:
        rewards = {n: make_reward(n) for n in dict.fromkeys(cfg.eval.rewards)}
    else:
        rewards = {cfg.reward.name: reward, **watch}
        for gold in declared.get("gold_rewards", []):
            rewards.setdefault(gold, make_reward(gold))
    return EvalSetup(prompt_sets, rewards)


@dataclass
class Sampled:
    """One sampling batch of an epoch and, once scored, its rewards: the record each step below passes on."""

    rollout: Any  # rlbench.diffusion.policy.Rollout
    prompts: list[str]
    metadata: list[dict[str, Any]]
    pending: Future | None = None  # the scoring in flight
    scores: torch.Tensor | None = None  # (B,) float32 on the CPU
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # a combined reward's parts
    seconds_scoring: float = 0.0

    def wait(self) -> None:
        if self.pending is not None:
            self.scores, self.seconds_scoring, self.components = self.pending.result()
            self.pending = None


class Trainer:
    """One training run. Build with resolved parts; :meth:`run` does the epochs."""

    def __init__(self, cfg: TrainConfig, policy, reward, algorithm: Algorithm, prompt_set, log=print, progress=False,
                 watch=None, evaluation: EvalSetup | None = None) -> None:
        from accelerate import Accelerator

        self.cfg = ensure_resolved(cfg)
        self.policy = policy
        self.sampler = policy.as_sampler(self.cfg.sampler())  # refuses a sampler of the other family
        policy.check_config(self.cfg)  # what only the loaded model can tell (image size, guidance)
        self.reward = reward
        self.watch = dict(watch or {})
        self.algorithm = algorithm
        self.prompt_set = prompt_set
        self.log = log
        self.progress = progress
        device = cfg.model.device
        self.accelerator = Accelerator(cpu=(device == "cpu"))
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device

        mp = cfg.model.mixed_precision
        if mp == "auto":
            mp = "fp16" if self.device.type == "cuda" else "no"
        frozen_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
        seed = cfg.run.seed
        torch.manual_seed(seed)  # identical LoRA init on every process
        policy.setup_training(cfg.model.train_mode, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets)
        policy.to(self.device, frozen_dtype)
        policy.prepare(self.accelerator)
        self.evaluation = evaluation if evaluation is not None or not self.cfg.eval.every else \
            _eval_setup(self.cfg, reward, self.watch)
        # The base model, for eval.kl and for algorithms anchored to it (GRPO's KL): the trainable weights
        # as they start, taken before any checkpoint loads (full fine-tuning: a copy of the UNet's weights).
        from rlbench.diffusion.policy import BaseWeights

        wants_base = (self.cfg.eval.every and self.cfg.eval.kl) or algorithm.uses_reference()
        self.base = BaseWeights(policy) if wants_base else None
        algorithm.setup(policy)
        self.params = policy.trainable_parameters()
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay, eps=t.adam_epsilon,
        )
        # Every random draw comes from one of these, so a checkpoint can restore them all.
        self.sample_gen = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)
        self.train_gen = torch.Generator().manual_seed(seed * 1_000_003 + 500_001 + self.rank)
        self.prompt_rng = np.random.default_rng([seed, self.rank])
        self.samples = 0
        self.reward_queries = 0
        self.neg_embeds = policy.encode_prompts([cfg.sample.negative_prompt])
        self._pool: ThreadPoolExecutor | None = None
        self._epoch = 0
        self._tb = None
        self._wandb = None

    def info(self, text: str) -> None:
        if self.main and self.log is not None:
            self.log(text)

    # -- run directory ------------------------------------------------------------------------------
    def _open_run(self, resume, overwrite) -> tuple[RunDir, int]:
        from accelerate.utils import broadcast_object_list

        if resume is not None:
            run = RunDir.open(resume)
            # The main process picks the newest intact checkpoint (a damaged one is named and skipped,
            # never deleted) and checks metrics.jsonl, so every process resumes from the same epoch.
            found: list[Any] = [0, [], None]
            if self.main:
                try:
                    epoch, notices = run.latest_intact_checkpoint()
                    run.read_metrics()
                    found = [epoch or 0, notices, None]
                except RunDirError as exc:
                    found = [0, [], str(exc)]
            if self.world > 1:
                broadcast_object_list(found)
            start, notices, error = found
            if error is not None:
                raise RunDirError(error)
            for notice in notices:
                self.info(notice)
            if start:
                self._load_checkpoint(run, start)  # before the run directory is touched
        else:
            path = [self.cfg.run.out or f"runs/{self.cfg.algorithm.name}-{_slug(self.cfg.reward.name)}-{_now()}"]
            if self.world > 1:
                broadcast_object_list(path)
            if self.cfg.run.out != path[0]:  # the default name, fixed now (a timestamp): no re-resolution
                self.cfg = dataclasses.replace(self.cfg, run=dataclasses.replace(self.cfg.run, out=path[0]))
            run = RunDir.create(path[0], overwrite=overwrite) if self.main else RunDir(path[0])
            start = 0
        self.accelerator.wait_for_everyone()
        if self.main:
            for notice in run.truncate_metrics(start - 1):  # e.g. a torn last line dropped
                self.info(notice)
            run.write_config(self.cfg.to_toml())
            # Samples logged after the checkpoint belong to the interrupted attempt: redo them.
            for epoch in run.sample_epochs():
                if epoch >= start:
                    shutil.rmtree(run.samples_dir(epoch), ignore_errors=True)
        return run, start

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, resume=None, overwrite=False) -> Path:
        run, start = self._open_run(resume, overwrite)
        cfg = self.cfg
        self.info(
            f"run {run.path}: {cfg.algorithm.name} on {cfg.reward.name}, model {cfg.model.name}, "
            f"{cfg.samples_per_epoch * self.world} samples/epoch, {cfg.updates_per_epoch} optimizer steps/epoch, "
            f"{self.world} process(es) on {self.device}"
            + (f"; resuming after epoch {start}" if start else "")
        )
        if start >= cfg.run.epochs:
            self.info(f"nothing to do: the run already has {start} of {cfg.run.epochs} epochs.")
            return run.path
        if self.main:
            self._open_trackers(run)
        bar = None
        if self.progress and self.main:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            bar.start()
            task = bar.add_task("training", total=cfg.run.epochs, completed=start)
        try:
            for epoch in range(start, cfg.run.epochs):
                record = self.epoch(run, epoch)
                if bar is not None:
                    bar.update(task, advance=1, description=f"reward {record['reward_mean']:.4g}")
                done = epoch + 1
                if done % cfg.checkpoint.every == 0 or done == cfg.run.epochs:
                    self._save_checkpoint(run, done)
        finally:
            if bar is not None:
                bar.stop()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
        self.accelerator.wait_for_everyone()
        return run.path

    def _score(self, images, prompts, metadata) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
        t0 = time.perf_counter()
        out = self.reward(images, prompts, metadata)
        components = {k: v.detach().float().cpu() for k, v in (out.info.get("components") or {}).items()}
        return out.scores.detach().float().cpu(), time.perf_counter() - t0, components

    def epoch(self, run: RunDir, epoch: int) -> dict[str, Any]:
        """sample -> score -> advantages -> update -> log."""
        self._epoch = epoch
        if self.algorithm.direct:
            return self._direct_epoch(run, epoch)
        t0 = time.perf_counter()
        with self.algorithm.sampling_weights(self.policy):  # DiffusionNFT samples with its old policy
            sampled = self._sample(epoch)
        t_sampled = time.perf_counter()
        for s in sampled:
            s.wait()
        t_scored = time.perf_counter()
        rewards, all_rewards, advantages = self._advantages(sampled)
        batch = self._train_batch(sampled, rewards, advantages)
        metrics, steps = self._update(batch)
        t_end = time.perf_counter()
        record = self._record(epoch, sampled, all_rewards, metrics, steps, seconds={
            "seconds": t_end - t0, "seconds_sampling": t_sampled - t0,
            "seconds_scoring": sum(s.seconds_scoring for s in sampled),
            "seconds_scoring_wait": t_scored - t_sampled, "seconds_training": t_end - t_scored})
        return self._log_epoch(run, epoch, record, sampled)

    def _log_epoch(self, run: RunDir, epoch: int, record: dict[str, Any], sampled: list[Sampled]) -> dict[str, Any]:
        """The main process writes the epoch's metrics line, samples, tracker scalars and log line."""
        if self.main:
            run.append_metrics(record)
            self._log_samples(run, epoch, sampled)
            self._log_trackers(record, epoch)
            self._log_line(record)
        return record

    def _direct_epoch(self, run: RunDir, epoch: int) -> dict[str, Any]:
        """Direct reward fine-tuning (DRaFT, AlignProp): the algorithm samples with gradients through the last
        steps, scores and steps the optimizer itself; the samples it drew are logged like any epoch's."""
        from rlbench.diffusion.policy import Rollout

        t0 = time.perf_counter()
        cfg = self.cfg
        batches = epoch_prompts(self.prompt_set, self.prompt_rng, cfg.sample.batch_size,
                                cfg.sample.num_batches_per_epoch, cfg.sample.images_per_prompt)
        self.policy.unet.train()
        ctx = self._context()
        drawn, metrics = self.algorithm.train_direct(self.policy, batches, ctx)
        sampled = [Sampled(Rollout(images=d["images"], latents=None, log_probs=None, timesteps=None,
                                   prompt_embeds=None), prompts, metadata, scores=d["scores"])
                   for d, (prompts, metadata) in zip(drawn, batches)]
        all_rewards = self.accelerator.gather(torch.cat([s.scores for s in sampled]).to(self.device)).cpu()
        seconds = time.perf_counter() - t0
        record = self._record(epoch, sampled, all_rewards, metrics, ctx.steps, seconds={
            "seconds": seconds, "seconds_sampling": None, "seconds_scoring": None, "seconds_scoring_wait": None,
            "seconds_training": seconds})
        return self._log_epoch(run, epoch, record, sampled)

    def _context(self) -> UpdateContext:
        return UpdateContext(self.cfg, self.optimizer, self.accelerator, self.train_gen, self.params, self.policy,
                             reference=self.base if self.algorithm.uses_reference() else None, reward=self.reward,
                             epoch=self._epoch)

    def _sample(self, epoch: int = 0) -> list[Sampled]:
        """The epoch's sampling batches; each is scored as soon as it is sampled (in the background
        with ``sample.async_reward``, while the next batch samples)."""
        cfg, policy, sampler = self.cfg, self.policy, self.sampler
        policy.unet.eval()
        out = []
        batches = epoch_prompts(self.prompt_set, self.prompt_rng, cfg.sample.batch_size,
                                cfg.sample.num_batches_per_epoch, cfg.sample.images_per_prompt)
        shared = None
        if self.algorithm.shares_initial_noise():
            # One x_T per prompt group (k consecutive images of the epoch), drawn up front: this changes the
            # sampling stream against a run without the option (DanceGRPO init_same_noise).
            k = cfg.sample.images_per_prompt
            shared = policy.initial_noise(cfg.samples_per_epoch // k, self.sample_gen).repeat_interleave(k, dim=0)
        for b, (prompts, metadata) in enumerate(batches):
            noise = None if shared is None else shared[b * cfg.sample.batch_size:(b + 1) * cfg.sample.batch_size]
            # An SDE window's start: progressive (MixGRPO) or drawn per batch from the sampling stream (Flow-GRPO-Fast).
            start = sampler.window_start(cfg.sample.num_steps, epoch, lambda lo, hi: torch.randint(
                lo, hi + 1, (1,), generator=self.sample_gen)) if sampler.window else 0
            ro = policy.sample(prompts, num_steps=cfg.sample.num_steps, sampler=sampler,
                               guidance_scale=cfg.sample.guidance_scale, generator=self.sample_gen,
                               neg_embeds=self.neg_embeds, initial_noise=noise, window_start=start)
            s = Sampled(ro, prompts, metadata)
            if cfg.sample.async_reward:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="rlbench-reward")
                s.pending = self._pool.submit(self._score, ro.images, prompts, metadata)
            else:
                s.scores, s.seconds_scoring, s.components = self._score(ro.images, prompts, metadata)
            out.append(s)
        return out

    def _advantages(self, sampled: list[Sampled]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(this process's rewards, every process's rewards, this process's advantages).

        Per-prompt statistics see every process's rewards and prompts: ``gather`` concatenates them
        in rank order (equal sizes per process), so this process's advantages are its rank's slice.
        """
        from accelerate.utils import gather_object

        rewards = torch.cat([s.scores for s in sampled])
        prompts = [p for s in sampled for p in s.prompts]
        all_rewards = self.accelerator.gather(rewards.to(self.device)).cpu()
        all_prompts = gather_object(prompts) if self.world > 1 else prompts
        n = rewards.numel()
        if all_rewards.numel() != n * self.world or len(all_prompts) != n * self.world:
            raise RuntimeError(f"gathered {all_rewards.numel()} rewards from {self.world} processes of {n} each")
        if self.cfg.advantage.aggregate == "gdpo":
            # GDPO: each component normalised on its own, weighted, summed, batch-normalised.
            from rlbench.train.advantages import gdpo_aggregate

            parts = []
            for name, weight, _ in self.reward.components:
                part = self.accelerator.gather(torch.cat([s.components[name] for s in sampled]).to(self.device)).cpu()
                parts.append((weight, self.algorithm.part_advantages(name, part, all_prompts)))
            all_advantages = self.algorithm.finish_gdpo(gdpo_aggregate(parts), all_prompts)
        else:
            all_advantages = self.algorithm.advantages(all_rewards, all_prompts)
        return rewards, all_rewards, all_advantages[self.rank * n:(self.rank + 1) * n]

    def _train_batch(self, sampled: list[Sampled], rewards: torch.Tensor, advantages: torch.Tensor) -> TrainBatch:
        from rlbench.diffusion.conditioning import Conditioning

        rollouts = [s.rollout for s in sampled]
        recorded = rollouts[0].latents is not None  # a deterministic sampler stores no transitions (RWR, NFT)
        keys = [r.timesteps for r in rollouts] if recorded else []
        # An SDE window that starts at different steps in different batches: keys per sample.
        per_sample = recorded and any(not torch.equal(k, keys[0]) for k in keys[1:])
        if per_sample:
            timesteps = torch.cat([k.unsqueeze(0).expand(len(r.images), *k.shape) for k, r in zip(keys, rollouts)])
        else:
            timesteps = keys[0] if recorded else None
        return TrainBatch(
            latents=torch.cat([r.latents for r in rollouts]) if recorded else None,
            log_probs=torch.cat([r.log_probs for r in rollouts]) if recorded else None,
            timesteps=timesteps,
            prompt_embeds=Conditioning.cat([r.prompt_embeds for r in rollouts]),
            neg_embeds=self.neg_embeds,
            rewards=rewards.to(self.device),
            advantages=advantages.to(self.device),
            prompts=[p for s in sampled for p in s.prompts],
            final=torch.cat([r.final for r in rollouts]),
            per_sample_keys=per_sample,
        )

    def _update(self, batch: TrainBatch) -> tuple[dict[str, Any], int]:
        self.policy.unet.train()
        ctx = self._context()
        metrics = self.algorithm.update(self.policy, batch, ctx)
        return metrics, ctx.steps

    def _record(self, epoch: int, sampled: list[Sampled], all_rewards: torch.Tensor, metrics: dict[str, Any],
                steps: int, seconds: dict[str, float]) -> dict[str, Any]:
        """The epoch's metrics.jsonl line (every process computes it; gathers are collective)."""
        n_epoch = all_rewards.numel()
        self.samples += n_epoch
        self.reward_queries += n_epoch
        record: dict[str, Any] = {
            "epoch": epoch,
            "samples": self.samples,
            "reward_queries": self.reward_queries,
            "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std(unbiased=False)),
            "loss": metrics.get("loss"),
            "approx_kl": metrics.get("approx_kl"),
            "clipfrac": metrics.get("clipfrac"),
            **seconds,
            "optimizer_steps": steps,
        }
        for name in sampled[0].components:  # a combined reward: each component's mean beside the total
            part = self.accelerator.gather(torch.cat([s.components[name] for s in sampled]).to(self.device))
            record[f"reward_mean/{name}"] = float(part.float().mean())
        for name, watched in self.watch.items():  # scored, not trained on: e.g. the gold beside a proxy
            part = torch.cat([watched(s.rollout.images, s.prompts, s.metadata).scores.detach().float() for s in sampled])
            record[f"watch_mean/{name}"] = float(self.accelerator.gather(part.to(self.device)).mean())
        record.update({k: v for k, v in metrics.items() if k not in record})
        every = self.cfg.eval.every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == self.cfg.run.epochs):
            t0 = time.perf_counter()
            record.update(self._evaluate())
            record["seconds_eval"] = time.perf_counter() - t0
        return record

    def _evaluate(self) -> dict[str, float]:
        """The held-out evaluation of ``[eval]`` with the weights after this epoch's update (every process
        runs it: forward passes go through the DDP wrapper, whose calls must match across processes)."""
        from rlbench.eval.evaluator import evaluate_policy

        cfg, ev = self.cfg, self.cfg.eval
        result = evaluate_policy(
            self.policy, self.evaluation.prompt_sets, self.evaluation.rewards, seed=ev.seed,
            steps=cfg.sample.num_steps, sampler=self.sampler, guidance=cfg.sample.guidance_scale,
            images_per_prompt=ev.images_per_prompt, prompts_per_set=ev.prompts_per_set,
            batch_size=cfg.sample.batch_size, negative_prompt=cfg.sample.negative_prompt,
            base=self.base if ev.kl else None,
            kl_sampler=self.sampler if self.base is not None and ev.kl and self.sampler.stochastic else None,
        )
        return result.metrics()

    def _log_line(self, record: dict[str, Any]) -> None:
        kl = record["approx_kl"]
        self.info(
            f"epoch {record['epoch'] + 1}/{self.cfg.run.epochs}  reward {record['reward_mean']:.4g} ± "
            f"{record['reward_std']:.3g}  loss "
            + (f"{record['loss']:.4g}" if record["loss"] is not None else "- (nothing trained)")
            + (f"  kl {kl:.3g}" if kl is not None else "")
            + "".join(f"  {k.split('/', 1)[1]} {v:.4g}" for k, v in record.items() if k.startswith("watch_mean/"))
            + f"  {record['seconds']:.1f}s"
        )

    # -- logging --------------------------------------------------------------------------------------
    def _log_samples(self, run, epoch, sampled: list[Sampled]) -> None:
        every, n = self.cfg.logging.samples_every, self.cfg.logging.num_samples
        if not every or n == 0 or epoch % every:
            return
        images = torch.cat([s.rollout.images for s in sampled])[:n].cpu()
        prompts = [p for s in sampled for p in s.prompts]
        metadata = [m for s in sampled for m in s.metadata]
        rewards = torch.cat([s.scores for s in sampled])
        records = [
            {"prompt": p, "seed": self.cfg.run.seed, "index": i, "split": "train", "reward": self.cfg.reward.name,
             "score": float(s), "metadata": m}
            for i, (p, m, s) in enumerate(zip(prompts[:n], metadata[:n], rewards[:n].tolist()))
        ]
        run.write_samples(epoch, images, records)
        if self._tb is not None:
            from rlbench.utils.images import make_grid

            self._tb.add_image("samples", make_grid(images), epoch, dataformats="HWC")

    def _open_trackers(self, run: RunDir) -> None:
        if self.cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info("tensorboard is not installed: no TensorBoard events (pip install tensorboard).")
            else:
                self._tb = SummaryWriter(str(run.tb_dir()))
        if self.cfg.logging.wandb:
            import wandb

            self._wandb = wandb.init(project="rlbench", name=run.name, config=self.cfg.to_dict(), dir=str(run.path))

    def _log_trackers(self, record: dict[str, Any], epoch: int) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, epoch)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=epoch)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        return {
            "sample": self.sample_gen.get_state(),
            "train": self.train_gen.get_state(),
            "torch": torch.get_rng_state(),
            "prompt": self.prompt_rng.bit_generator.state,
        }

    def _save_checkpoint(self, run: RunDir, done: int) -> None:
        from accelerate.utils import gather_object

        states = gather_object([self._rng_state()]) if self.world > 1 else [self._rng_state()]
        if self.main:
            from safetensors.torch import save_file

            def write(folder: Path) -> None:
                self.policy.save_state(folder)
                self.algorithm.save_tensors(folder)
                torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
                save_file({f"rank{r}.{k}": s[k] for r, s in enumerate(states) for k in ("sample", "train", "torch")},
                          str(folder / "rng.safetensors"))
                state = {
                    "epoch": done, "samples": self.samples, "reward_queries": self.reward_queries,
                    "world_size": self.world, "algorithm": self.algorithm.state_dict(),
                    "prompt_rng": [s["prompt"] for s in states],
                    "train_mode": self.policy.train_mode, "lora": self.policy.lora_config,
                }
                atomic_write_text(folder / "trainer_state.json", json.dumps(state))

            run.save_checkpoint(done, write, keep=self.cfg.checkpoint.keep)
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self, run: RunDir, epoch: int) -> None:
        from safetensors.torch import load_file

        from rlbench.train.rundir import checkpoint_read_error

        folder = run.checkpoint_dir(epoch)
        check = run.verify_checkpoint(epoch, hashes=False)  # quick: sizes (the hashes were checked when it was chosen)
        if not check.intact:
            raise RunDirError(
                f"checkpoint {folder} is damaged ({'; '.join(check.problems)}); move it out of {folder.parent} "
                "to resume from the checkpoint before it."
            )
        # Every file that does not decode is named in a RunDirError (no traceback from the CLI).
        try:
            state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
            world = state["world_size"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise checkpoint_read_error(folder, "trainer_state.json", exc) from exc
        if world != self.world:
            raise RunDirError(
                f"checkpoint {folder} was written by {world} process(es); resume it with the same "
                f"number (now {self.world}) so the run continues exactly."
            )
        self.policy.load_state(folder)
        try:
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True,
                                                      map_location=self.device))
        except Exception as exc:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... on a damaged file
            raise checkpoint_read_error(folder, "optimizer.pt", exc) from exc
        try:
            rng = load_file(str(folder / "rng.safetensors"))
            self.sample_gen.set_state(rng[f"rank{self.rank}.sample"])
            self.train_gen.set_state(rng[f"rank{self.rank}.train"])
            torch.set_rng_state(rng[f"rank{self.rank}.torch"])
        except Exception as exc:  # SafetensorError on a damaged file; KeyError/RuntimeError on wrong content
            raise checkpoint_read_error(folder, "rng.safetensors", exc) from exc
        try:  # trainer_state.json's content: a key missing or of the wrong kind is a damaged file too
            self.prompt_rng.bit_generator.state = state["prompt_rng"][self.rank]
            # The algorithm's own state (DDPO's reward buffers); checkpoints before 0.2 stored the tracker alone.
            self.algorithm.load_state_dict(state["algorithm"] if "algorithm" in state
                                           else {"tracker": state["tracker"]})
            self.samples, self.reward_queries = state["samples"], state["reward_queries"]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise checkpoint_read_error(folder, "trainer_state.json", exc) from exc
        self.algorithm.load_tensors(folder)  # tensor state beyond the JSON (DiffusionNFT's old policy)
