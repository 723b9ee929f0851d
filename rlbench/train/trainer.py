"""``rlbench train``: sample -> score -> advantages -> update -> log -> checkpoint, per epoch.

:func:`train` is the importable function behind the CLI. It resolves every plugin and validates
the whole configuration before any compute, then runs :class:`Trainer` under accelerate (one
process by default; ``accelerate launch`` for several, gradients all-reduced through the
DDP-wrapped UNet).

Exact resume: a checkpoint holds the trainable weights, optimizer state, every RNG state (per
process), the per-prompt stat tracker and the counters. Resuming from checkpoint k re-runs epoch k
onwards exactly as an uninterrupted run would (on the same hardware and thread count).
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rlbench.config import TrainConfig, load_config
from rlbench.errors import ConfigError, DependencyNotInstalled, RunDirError
from rlbench.train.rundir import RunDir, atomic_write_text

CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json")


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
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, dict[str, Any]] | None = None,
    resume: str | Path | None = None,
) -> TrainConfig:
    """The run's configuration; for ``resume``, the run's own config (only run.epochs may change)."""
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
    from rlbench.algorithm import resolve_algorithm
    from rlbench.prompts import load_prompts
    from rlbench.registry import make_reward

    cfg = config.validate() if isinstance(config, TrainConfig) else resolve_config(config, overrides, values, resume)
    algorithm, notices = resolve_algorithm(cfg)
    cfg.validate()
    reward = make_reward(cfg.reward.name, **cfg.reward.options)
    watch = {name: make_reward(name) for name in cfg.logging.watch}  # fail fast on a bad name
    if cfg.logging.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise DependencyNotInstalled("logging.wandb = true needs wandb: pip install 'rlbench[wandb]'.") from exc
    if cfg.model.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("model.mixed_precision = 'fp16' needs a CUDA GPU; use 'no' or 'bf16' on CPU.")
    prompt_set = load_prompts(cfg.prompts.name) if cfg.prompts.name else None  # fail fast on a bad name
    if resume is None and cfg.run.out and not overwrite:
        out = Path(cfg.run.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            RunDir.create(out)  # raises the standard "already exists" error before loading the model

    from rlbench.diffusion.policy import load_policy

    policy = load_policy(cfg.model.name, cfg.model.revision)
    if prompt_set is None:
        cfg.prompts.name = policy.default_prompts
        prompt_set = load_prompts(cfg.prompts.name)
    trainer = Trainer(cfg, policy, reward, algorithm, prompt_set, log=log, progress=progress, watch=watch)
    for notice in notices:
        trainer.info(notice)
    return trainer


class Trainer:
    """One training run. Build with resolved parts; :meth:`run` does the epochs."""

    def __init__(self, cfg: TrainConfig, policy, reward, algorithm, prompt_set, log=print, progress=False,
                 watch=None) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.policy = policy
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
        policy.model = self.accelerator.prepare(policy.unet)
        self.params = policy.trainable_parameters()
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay, eps=t.adam_epsilon,
        )
        from rlbench.train.advantages import PerPromptStatTracker

        self.tracker = PerPromptStatTracker(cfg.advantage.buffer_size, cfg.advantage.min_count)
        # Every random draw comes from one of these, so a checkpoint can restore them all.
        self.sample_gen = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)
        self.train_gen = torch.Generator().manual_seed(seed * 1_000_003 + 500_001 + self.rank)
        self.prompt_rng = np.random.default_rng([seed, self.rank])
        self.samples = 0
        self.reward_queries = 0
        self.neg_embeds = policy.encode_prompts([cfg.sample.negative_prompt])
        self._pool: ThreadPoolExecutor | None = None
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
            start = run.latest_checkpoint() or 0
        else:
            path = [self.cfg.run.out or f"runs/{self.cfg.algorithm.name}-{_slug(self.cfg.reward.name)}-{_now()}"]
            if self.world > 1:
                broadcast_object_list(path)
            self.cfg.run.out = path[0]
            run = RunDir.create(path[0], overwrite=overwrite) if self.main else RunDir(path[0])
            start = 0
        self.accelerator.wait_for_everyone()
        if self.main:
            run.write_config(self.cfg.to_toml())
            run.truncate_metrics(start - 1)
            # Samples logged after the checkpoint belong to the interrupted attempt: redo them.
            for epoch in run.sample_epochs():
                if epoch >= start:
                    shutil.rmtree(run.samples_dir(epoch), ignore_errors=True)
        if start:
            self._load_checkpoint(run, start)
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
        cfg, policy = self.cfg, self.policy
        t_start = time.perf_counter()
        policy.unet.eval()
        rollouts, futures, prompts_all, meta_all, batches = [], [], [], [], []
        for prompts, metadata in epoch_prompts(self.prompt_set, self.prompt_rng, cfg.sample.batch_size,
                                               cfg.sample.num_batches_per_epoch, cfg.sample.images_per_prompt):
            ro = policy.sample(prompts, num_steps=cfg.sample.num_steps, eta=cfg.sample.eta,
                               guidance_scale=cfg.sample.guidance_scale, generator=self.sample_gen,
                               neg_embeds=self.neg_embeds)
            if cfg.sample.async_reward:  # score in the background while the next batch samples
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="rlbench-reward")
                futures.append(self._pool.submit(self._score, ro.images, prompts, metadata))
            else:
                f: Future = Future()
                f.set_result(self._score(ro.images, prompts, metadata))
                futures.append(f)
            rollouts.append(ro)
            batches.append((ro.images, prompts, metadata))
            prompts_all += prompts
            meta_all += metadata
        t_sampled = time.perf_counter()
        results = [f.result() for f in futures]
        t_scored = time.perf_counter()
        rewards = torch.cat([r[0] for r in results])
        scoring_compute = sum(r[1] for r in results)

        # Per-prompt statistics see every process's rewards and prompts.
        from accelerate.utils import gather_object

        all_rewards = self.accelerator.gather(rewards.to(self.device)).cpu()
        all_prompts = gather_object(prompts_all) if self.world > 1 else prompts_all
        advantages_all = self.algorithm.advantages(all_rewards, all_prompts, self.tracker)
        advantages = advantages_all.reshape(self.world, -1)[self.rank]

        from rlbench.algorithm import TrainBatch, UpdateContext

        batch = TrainBatch(
            latents=torch.cat([r.latents for r in rollouts]),
            log_probs=torch.cat([r.log_probs for r in rollouts]),
            timesteps=rollouts[0].timesteps,
            prompt_embeds=torch.cat([r.prompt_embeds for r in rollouts]),
            neg_embeds=self.neg_embeds,
            rewards=rewards.to(self.device),
            advantages=advantages.to(self.device),
            prompts=prompts_all,
        )
        policy.unet.train()
        ctx = UpdateContext(cfg, self.optimizer, self.accelerator, self.train_gen, self.params, model=policy.model)
        t_train = time.perf_counter()
        metrics = self.algorithm.update(policy, batch, ctx)
        t_end = time.perf_counter()

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
            "seconds": t_end - t_start,
            "seconds_sampling": t_sampled - t_start,
            "seconds_scoring": scoring_compute,
            "seconds_scoring_wait": t_scored - t_sampled,
            "seconds_training": t_end - t_train,
            "optimizer_steps": ctx.steps,
        }
        for name in results[0][2]:  # a combined reward: each component's mean beside the total
            part = self.accelerator.gather(torch.cat([r[2][name] for r in results]).to(self.device))
            record[f"reward_mean/{name}"] = float(part.float().mean())
        for name, watched in self.watch.items():  # scored, not trained on: e.g. the gold beside a proxy
            part = torch.cat([watched(*batch).scores.detach().float() for batch in batches])
            record[f"watch_mean/{name}"] = float(self.accelerator.gather(part.to(self.device)).mean())
        record.update({k: v for k, v in metrics.items() if k not in record})
        if self.main:
            run.append_metrics(record)
            self._log_samples(run, epoch, rollouts, prompts_all, meta_all, rewards)
            self._log_trackers(record, epoch)
            kl = record["approx_kl"]
            self.info(
                f"epoch {epoch + 1}/{cfg.run.epochs}  reward {record['reward_mean']:.4g} ± {record['reward_std']:.3g}  "
                f"loss {record['loss']:.4g}" + (f"  kl {kl:.3g}" if kl is not None else "")
                + "".join(f"  {k.split('/', 1)[1]} {v:.4g}" for k, v in record.items() if k.startswith("watch_mean/"))
                + f"  {record['seconds']:.1f}s"
            )
        return record

    # -- logging --------------------------------------------------------------------------------------
    def _log_samples(self, run, epoch, rollouts, prompts, metadata, rewards) -> None:
        every, n = self.cfg.logging.samples_every, self.cfg.logging.num_samples
        if not every or n == 0 or epoch % every:
            return
        images = torch.cat([r.images for r in rollouts])[:n].cpu()
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
                torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
                save_file({f"rank{r}.{k}": s[k] for r, s in enumerate(states) for k in ("sample", "train", "torch")},
                          str(folder / "rng.safetensors"))
                state = {
                    "epoch": done, "samples": self.samples, "reward_queries": self.reward_queries,
                    "world_size": self.world, "tracker": self.tracker.state_dict(),
                    "prompt_rng": [s["prompt"] for s in states],
                    "train_mode": self.policy.train_mode, "lora": self.policy.lora_config,
                }
                atomic_write_text(folder / "trainer_state.json", json.dumps(state))

            run.save_checkpoint(done, write, keep=self.cfg.checkpoint.keep)
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self, run: RunDir, epoch: int) -> None:
        from safetensors.torch import load_file

        folder = run.checkpoint_dir(epoch)
        missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
        if missing:
            raise RunDirError(f"checkpoint {folder} is incomplete (missing {missing}); delete it to resume from an earlier one.")
        state = json.loads((folder / "trainer_state.json").read_text())
        if state["world_size"] != self.world:
            raise RunDirError(
                f"checkpoint {folder} was written by {state['world_size']} process(es); resume it with the same "
                f"number (now {self.world}) so the run continues exactly."
            )
        self.policy.load_state(folder)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=self.device))
        rng = load_file(str(folder / "rng.safetensors"))
        self.sample_gen.set_state(rng[f"rank{self.rank}.sample"])
        self.train_gen.set_state(rng[f"rank{self.rank}.train"])
        torch.set_rng_state(rng[f"rank{self.rank}.torch"])
        self.prompt_rng.bit_generator.state = state["prompt_rng"][self.rank]
        self.tracker.load_state_dict(state["tracker"])
        self.samples, self.reward_queries = state["samples"], state["reward_queries"]
