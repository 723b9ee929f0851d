"""Time trl 0.23.1's DDPOTrainer at the settings of issue 12 (the peer side of the speed comparison).

Runs inside the peer virtualenv (benchmarks/peer/setup_peer_env.sh), never imports rlbench:

    .venv-peer/bin/python benchmarks/peer/trl_ddpo.py --pipeline DIR --prompts FILE --epochs N

DIR is a diffusers StableDiffusionPipeline folder (written by rlbench's venv with
``rlbench.testing.save_tiny_sd_pipeline``), FILE holds the training prompts, one a line. Prints ONE JSON
line on stdout (everything else, trl's warnings and progress bars included, goes to stderr): per-epoch wall
time split into sampling / reward / training, the median of epochs 2..N, peak RSS and the work done per
epoch (counted, not assumed: UNet calls and their batch sizes, optimizer steps).

Settings (fixed, issue 12): DDPO-IS (trl's only loss: PPO-clip ratio, clip range 1e-4, advantages clipped to
+-5), LoRA rank 4 / alpha 4 on to_q, to_k, to_v, to_out.0 (trl's DefaultDDPOStableDiffusionPipeline, gaussian
init), 2 sampling batches x 4 samples x 20 DDIM steps, eta 1, guidance 5, trained with guidance
(train_cfg), train batch 2 x gradient accumulation 2 over all 20 timesteps (timestep_fraction 1.0) = 2
optimizer steps per epoch, AdamW lr 3e-4 (betas 0.9/0.999, weight decay 1e-4, eps 1e-8), grad-norm clip 1,
one inner epoch, batch-normalised advantages (per_prompt_stat_tracking False), JPEG incompressibility
(ddpo-pytorch's: PIL JPEG quality 95, size in kB = bytes / 1000), scored synchronously in the main thread
(trl's default), empty negative prompt, fp32 (mixed_precision "no"), CPU, torch's default thread count,
no checkpoints (save_freq larger than any run), no tracker.

trl's "epoch" is one ``DDPOTrainer.step``: sample ``sample_num_batches_per_epoch x sample_batch_size`` images,
score them, normalise advantages, then ``train_num_inner_epochs`` passes over the samples in micro-batches
of ``train_batch_size``, one optimizer step per ``train_gradient_accumulation_steps`` micro-batches x
``int(sample_num_steps * train_timestep_fraction)`` timesteps. ``DDPOTrainer.train`` is exactly
``for epoch in range(num_epochs): global_step = self.step(epoch, global_step)``; this script runs that loop
itself so it can time each epoch.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

# The issue's settings. Every DDPOConfig field that is set is listed here; the rest are trl 0.23.1's defaults,
# which equal rlbench's (adam betas / weight decay / eps, max_grad_norm 1, clip range 1e-4, adv clip 5).
SETTINGS = dict(
    sample_num_steps=20,
    sample_eta=1.0,
    sample_guidance_scale=5.0,
    sample_batch_size=4,
    sample_num_batches_per_epoch=2,
    train_batch_size=2,
    train_gradient_accumulation_steps=2,
    train_learning_rate=3e-4,
    train_adam_beta1=0.9,
    train_adam_beta2=0.999,
    train_adam_weight_decay=1e-4,
    train_adam_epsilon=1e-8,
    train_max_grad_norm=1.0,
    train_num_inner_epochs=1,
    train_cfg=True,
    train_adv_clip_max=5.0,
    train_clip_range=1e-4,
    train_timestep_fraction=1.0,
    per_prompt_stat_tracking=False,
    async_reward_computation=False,
    negative_prompts="",
    mixed_precision="no",  # fp32 (trl's default is "fp16")
    allow_tf32=False,  # CUDA only; fp32 means fp32
    log_with=None,
)
JPEG_QUALITY = 95  # ddpo-pytorch rewards.py / rlbench rewards/jpeg.py
BYTES_PER_KB = 1000


def jpeg_incompressibility(images, prompts, metadata):
    """ddpo-pytorch's ``jpeg_incompressibility`` (the DDPO paper's reward), as rlbench/rewards/jpeg.py defines it:
    float images in [0, 1], (B, 3, H, W) -> ``(x * 255).round().clamp(0, 255)`` to uint8 (float32 products,
    round half to even), PIL JPEG at quality 95 (PIL's other defaults), reward = file size in kB (bytes / 1000).
    Runs in the calling (main) thread, as trl does with ``async_reward_computation=False``."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    arrays = arrays.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / BYTES_PER_KB)
    return np.array(sizes), {}


def read_prompts(path: Path) -> list[str]:
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"trl_ddpo.py: no prompts in {path}")
    return prompts


def load_text_encoder_weights(text_encoder, folder: Path) -> str:
    """Load the folder's CLIPTextModel weights whatever transformers wrote them.

    transformers 5 (rlbench's venv) saves CLIPTextModel keys without the ``text_model.`` prefix that
    transformers 4 (this venv) expects, so ``from_pretrained`` here leaves the text encoder randomly
    initialised (with a warning). Same shapes, same cost, but not the same weights as rlbench's side: load them
    again with the prefix added. Returns how they were loaded."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        return "from_pretrained (no model.safetensors)"
    state = load_file(str(path))
    expected = set(text_encoder.state_dict())
    if set(state) <= expected:
        how = "from_pretrained"
    else:
        state = {(f"text_model.{k}" if f"text_model.{k}" in expected else k): v for k, v in state.items()}
        how = "reloaded with the text_model. prefix (file written by transformers 5)"
    missing, unexpected = text_encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"trl_ddpo.py: text encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    return how


def bare_unet_seconds(trainer, config) -> tuple[float, float]:
    """The UNet calls alone of one epoch, as benchmarks/speed.py's ``unet_only_seconds`` times rlbench's:
    sampling = batches x steps forwards without grad at 2x the sample batch (guidance); training = micro-batches
    x trained steps forward+backward at 2x the train batch (train_cfg), on the trained (LoRA) UNet; t = 500,
    one prompt embedding, random latents, one warm-up call of each."""
    import torch

    unet = trainer.sd_pipeline.unet
    c, size = unet.config.in_channels, unet.config.sample_size
    emb = trainer.neg_prompt_embed  # (1, 77, dim): the shape of any prompt embedding
    k = 2 if config.sample_guidance_scale > 1.0 else 1
    kt = 2 if config.train_cfg else 1
    micro = config.sample_batch_size * config.sample_num_batches_per_epoch // config.train_batch_size
    micro *= config.train_num_inner_epochs

    def call(b: int, grad: bool) -> None:
        x = torch.randn(b, c, size, size)
        t = torch.full((b,), 500)
        e = emb.expand(b, -1, -1)
        if grad:
            unet(x, t, e).sample.float().square().mean().backward()
        else:
            with torch.no_grad():
                unet(x, t, e)

    call(k * config.sample_batch_size, False), call(kt * config.train_batch_size, True)  # warm-up
    t0 = time.perf_counter()
    for _ in range(config.sample_num_batches_per_epoch * config.sample_num_steps):
        call(k * config.sample_batch_size, False)
    t1 = time.perf_counter()
    for _ in range(micro * trainer.num_train_timesteps):
        call(kt * config.train_batch_size, True)
    t2 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1


class Clock:
    """Seconds spent in wrapped trainer methods, per phase, since the last reset."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, obj, name: str, phase: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", required=True, type=Path, help="diffusers StableDiffusionPipeline folder")
    ap.add_argument("--prompts", required=True, type=Path, help="text file, one training prompt a line")
    ap.add_argument("--epochs", type=int, default=4, help="epochs to run (median over epochs 2..N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bare-unet", action="store_true",
                    help="after the epochs, also time the bare UNet calls of one epoch at the same shapes "
                         "(benchmarks/speed.py's unet_only_seconds definition), in this environment")
    args = ap.parse_args()
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")
    if not (args.pipeline / "model_index.json").is_file():
        ap.error(f"--pipeline {args.pipeline}: no model_index.json (not a diffusers pipeline folder)")
    prompts = read_prompts(args.prompts)

    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # only the JSON line goes to stdout
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never reach a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # "DDPOTrainer is deprecated"

    t_start = time.perf_counter()
    import importlib.metadata as md

    import torch
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    t_imported = time.perf_counter()
    # trl's pipeline logs through accelerate's logger when the folder has no LoRA weights, which raises unless
    # the accelerate state exists; DDPOTrainer's Accelerator() reuses this state.
    PartialState()
    pipeline = DefaultDDPOStableDiffusionPipeline(str(args.pipeline), use_lora=True)
    text_encoder_weights = load_text_encoder_weights(pipeline.text_encoder, args.pipeline / "text_encoder")
    prompt_cycle = itertools.cycle(prompts)  # every epoch of 8 samples sees each of 8 prompts once

    def prompt_fn():
        return next(prompt_cycle), {}

    config = DDPOConfig(
        exp_name="trl_ddpo_peer",
        seed=args.seed,
        num_epochs=args.epochs,
        save_freq=10**9,  # trl saves accelerator state every epoch > 0 by default; no checkpoints here
        **SETTINGS,
    )
    trainer = DDPOTrainer(config, jpeg_incompressibility, prompt_fn, pipeline)
    t_ready = time.perf_counter()

    # Counted work: UNet calls per phase with their batch sizes (hook cost: microseconds per call).
    unet = pipeline.unet
    calls: dict[str, list[int]] = {"sampling": [], "training": []}
    phase = {"now": "sampling"}
    unet.register_forward_pre_hook(
        lambda module, inputs, kwargs: calls[phase["now"]].append(int((inputs[0] if inputs else kwargs["sample"]).shape[0])),
        with_kwargs=True,
    )
    shapes: dict[str, object] = {}

    clock = Clock()
    clock.wrap(trainer, "_generate_samples", "sampling")
    clock.wrap(trainer, "compute_rewards", "reward")
    inner_train = trainer._train_batched_samples

    def train_batched(inner_epoch, epoch, global_step, batched_samples):
        phase["now"] = "training"
        shapes["train_micro_batches"] = len(batched_samples)
        shapes["train_batch_size"] = int(batched_samples[0]["latents"].shape[0])
        shapes["trained_timesteps"] = trainer.num_train_timesteps
        shapes["latent_shape"] = list(batched_samples[0]["latents"].shape[2:])
        return inner_train(inner_epoch, epoch, global_step, batched_samples)

    trainer._train_batched_samples = train_batched
    clock.wrap(trainer, "_train_batched_samples", "training_loop")

    epochs = []
    global_step = 0
    for epoch in range(trainer.first_epoch, args.epochs):
        clock.seconds.clear()
        for v in calls.values():
            v.clear()
        phase["now"] = "sampling"
        step_before = global_step
        t0 = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        seconds = time.perf_counter() - t0
        sampling = clock.seconds.get("sampling", 0.0) + clock.seconds.get("reward", 0.0)
        epochs.append({
            "epoch": epoch + 1,
            "seconds": seconds,
            # sampling = generating the trajectories (text encoding, 20 guided UNet calls per batch, scheduler,
            # VAE decode) + scoring rewards; training = everything after the rewards (advantages, shuffling,
            # re-batching, the forward+backward loop and the optimizer steps).
            "sampling_s": sampling,
            "generate_s": clock.seconds.get("sampling", 0.0),
            "reward_s": clock.seconds.get("reward", 0.0),
            "training_s": seconds - sampling,
            "train_loop_s": clock.seconds.get("training_loop", 0.0),
            "optimizer_steps": global_step - step_before,
            "unet_calls_sampling": len(calls["sampling"]),
            "unet_batch_sampling": sorted(set(calls["sampling"])),
            "unet_calls_training": len(calls["training"]),
            "unet_batch_training": sorted(set(calls["training"])),
        })
        print(f"[trl_ddpo] epoch {epoch + 1}: {seconds:.2f} s (sampling {sampling:.2f}, "
              f"training {seconds - sampling:.2f})", file=sys.stderr, flush=True)

    bare = bare_unet_seconds(trainer, config) if args.bare_unet else None

    measured = epochs[1:] if len(epochs) > 1 else epochs
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    out = {
        "impl": "trl",
        "versions": {name: md.version(name) for name in
                     ("trl", "torch", "diffusers", "transformers", "accelerate", "peft")},
        "python": platform.python_version(),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "pipeline": str(args.pipeline),
        "unet_block_out_channels": list(unet.config.block_out_channels),
        "text_encoder_weights": text_encoder_weights,
        "latent_shape": shapes.get("latent_shape"),
        "image_size": int(unet.config.sample_size * pipeline.sd_pipeline.vae_scale_factor),
        "num_prompts": len(prompts),
        "seed": args.seed,
        "settings": {**SETTINGS, "lora_rank": 4, "lora_alpha": 4,
                     "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"], "reward": "jpeg_incompressibility"},
        "work_per_epoch": {
            "samples": config.sample_batch_size * config.sample_num_batches_per_epoch,
            "train_micro_batches": shapes.get("train_micro_batches"),
            "train_batch_size": shapes.get("train_batch_size"),
            "trained_timesteps": shapes.get("trained_timesteps"),
            "optimizer_steps": epochs[-1]["optimizer_steps"],
            "unet_calls_sampling": epochs[-1]["unet_calls_sampling"],
            "unet_batch_sampling": epochs[-1]["unet_batch_sampling"],
            "unet_calls_training": epochs[-1]["unet_calls_training"],
            "unet_batch_training": epochs[-1]["unet_batch_training"],
        },
        "import_s": t_imported - t_start,
        "setup_s": t_ready - t_imported,
        "epochs": epochs,
        "median_of": [e["epoch"] for e in measured],
        "epoch_s": statistics.median(e["seconds"] for e in measured),
        "sampling_s": statistics.median(e["sampling_s"] for e in measured),
        "reward_s": statistics.median(e["reward_s"] for e in measured),
        "training_s": statistics.median(e["training_s"] for e in measured),
        "unet_only_sampling_s": bare[0] if bare else None,
        "unet_only_training_s": bare[1] if bare else None,
        "peak_rss_bytes": rss_kb * 1024,
        "peak_rss_mb": rss_kb * 1024 / 1e6,
    }
    real_stdout.write(json.dumps(out) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
