"""Training speed: images/s sampled, samples/s trained, peak memory and the overhead ratio.

    python benchmarks/speed.py                       # tiny random pipeline, CPU
    python benchmarks/speed.py --model sd15-random --device cuda --steps 50   # SD-1.5 shapes, 512 px

overhead ratio = epoch wall time / time of the UNet forward (+backward) calls alone at the same
shapes (sampling: steps x batches forwards at 2x the batch for guidance; training: micro-batches x
trained steps forward+backward). No implementation can make the same calls faster than the bare
UNet, so the ratio bounds everything rlbench adds around them (schedulers, log-probs, text
encoding, VAE decode, rewards, advantages, optimizer, logging). Weights are random: speed does not
depend on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def sd15_random_policy():
    """A DiffusionPolicy with Stable Diffusion 1.5's architecture and random weights (no download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlbench.diffusion.policy import DiffusionPolicy
    from rlbench.testing import tiny_clip_tokenizer, tiny_ddim_scheduler

    unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    text = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14 text tower
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    return DiffusionPolicy(unet, tiny_ddim_scheduler(), text, tiny_clip_tokenizer(), vae, name="sd15-random")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_only_seconds(trainer) -> tuple[float, float]:
    """Bare UNet time of one epoch's sampling and training calls, at the run's shapes."""
    cfg, policy, device = trainer.cfg, trainer.policy, trainer.device
    c, h, w = policy.latent_shape
    emb = policy.encode_prompts(["a photo of a cat"])
    n_steps = cfg.sample.num_steps
    bs, mb = cfg.sample.batch_size, cfg.train.batch_size
    n_train = max(1, int(n_steps * cfg.train.timestep_fraction)) if trainer.algorithm.trains_on_trajectory else 1
    micro = cfg.samples_per_epoch // mb * cfg.train.num_inner_epochs
    guided = cfg.sample.guidance_scale != 1.0
    k = 2 if guided else 1

    def call(b: int, grad: bool) -> None:
        x = torch.randn(k * b, c, h, w, device=device, dtype=policy.dtype)
        t = torch.full((k * b,), 500, device=device)
        e = emb.expand(k * b, -1, -1)
        if grad:
            out = policy.model(x, t, encoder_hidden_states=e).sample
            out.float().square().mean().backward()
        else:
            with torch.no_grad():
                policy.model(x, t, encoder_hidden_states=e)

    call(bs, False), call(mb, True)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg.sample.num_batches_per_epoch * n_steps):
        call(bs, False)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(micro * n_train):
        call(mb, True)
    sync(device)
    t2 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | sd15-random | a diffusers folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--algo", default="ddpo-is")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2, help="sampling batches per epoch")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--grad-acc", type=int, default=2)
    ap.add_argument("--timestep-fraction", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up epoch)")
    ap.add_argument("--mixed-precision", default="auto")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()

    from rlbench.diffusion.policy import quiet_hf
    from rlbench.registry import MODELS
    from rlbench.train.rundir import RunDir
    from rlbench.testing import save_tiny_sd_pipeline
    from rlbench.train.trainer import prepare

    quiet_hf()
    tmp = Path(tempfile.mkdtemp(prefix="rlbench-speed-"))
    model = args.model
    if model == "tiny":
        model = str(save_tiny_sd_pipeline(tmp / "tiny-sd"))
    elif model == "sd15-random":
        MODELS.register("sd15-random", lambda: sd15_random_policy())
    device = torch.device(args.device)
    trainer = prepare(
        overrides=[
            f"sample.num_steps={args.steps}", f"sample.batch_size={args.sample_batch}",
            f"sample.num_batches_per_epoch={args.batches}", f"train.batch_size={args.train_batch}",
            f"train.gradient_accumulation_steps={args.grad_acc}", f"train.timestep_fraction={args.timestep_fraction}",
            "logging.samples_every=0", "logging.tensorboard=false", f"model.device={args.device}",
            f"model.mixed_precision={args.mixed_precision}",
        ],
        values={"algorithm": {"name": args.algo}, "reward": {"name": "incompressibility"},
                "model": {"name": model}, "prompts": {"name": "simple-animals"},
                "run": {"epochs": args.epochs + 1, "out": str(tmp / "run")}},
        log=None,
    )
    run = RunDir.create(tmp / "run")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    records = [trainer.epoch(run, e) for e in range(args.epochs + 1)][1:]
    sample_unet, train_unet = unet_only_seconds(trainer)
    cfg = trainer.cfg
    n = cfg.samples_per_epoch
    epoch_s = statistics.median(r["seconds"] for r in records)
    out = {
        "model": args.model, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(), "algo": args.algo, "steps": args.steps,
        "samples_per_epoch": n, "train_batch": args.train_batch, "grad_acc": args.grad_acc,
        "image_size": trainer.policy.image_size, "frozen_dtype": str(trainer.policy.dtype),
        "epoch_s": epoch_s,
        "sampling_s": statistics.median(r["seconds_sampling"] for r in records),
        "training_s": statistics.median(r["seconds_training"] for r in records),
        "unet_only_sampling_s": sample_unet, "unet_only_training_s": train_unet,
    }
    out["images_per_s_sampled"] = n / out["sampling_s"]
    out["samples_per_s_trained"] = n / out["training_s"]
    out["overhead_ratio"] = epoch_s / (sample_unet + train_unet)
    out["sampling_overhead_ratio"] = out["sampling_s"] / sample_unet
    out["training_overhead_ratio"] = out["training_s"] / train_unet
    out["peak_memory_gb"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    width = max(map(len, out))
    for k, v in out.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
