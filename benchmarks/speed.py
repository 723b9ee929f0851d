"""Training speed: images/s sampled, samples/s trained, peak memory, the overhead ratio, and the ratio to trl.

    python benchmarks/speed.py --compare-trl         # rlbench vs trl 0.23.1's DDPOTrainer, issue 12's settings
    python benchmarks/speed.py                       # tiny random pipeline, CPU
    python benchmarks/speed.py --model sd15-random --device cuda --steps 50   # SD-1.5 shapes, 512 px
    python benchmarks/speed.py --model tiny-sd3 --algo grpo                   # the flow family, tiny SD3, CPU
    python benchmarks/speed.py --model tiny-flux --algo grpo                  # tiny FLUX.1-dev-like, CPU
    python benchmarks/speed.py --model sd35m-random --device cuda --algo grpo --steps 10 --resolution 512 \
        --guidance 4.5 --sample-batch 8 --train-batch 8     # SD3.5-Medium-sized random weights, Flow-GRPO settings

--compare-trl runs the reference implementation (benchmarks/peer/: trl 0.23.1 in its own pinned venv,
set up by benchmarks/peer/setup_peer_env.sh) and rlbench one after the other, each in a fresh process,
on the same pipeline folder (diffusers' test-size SD: UNet (32, 64), latents 4x32x32, 64 px) and the
same 8 prompts: DDPO-IS, LoRA rank 4, 2 x 4 samples x 20 steps, eta 1, guidance 5 trained, train batch
2 x accumulation 2 over every step, lr 3e-4, batch-normalised advantages, JPEG incompressibility, fp32;
median of epochs 2-4. It prints both epoch times, their ratio and both peak RSS.

overhead ratio = epoch wall time / time of the denoiser's (UNet's or transformer's) forward (+backward)
calls alone at the same shapes (sampling: steps x batches forwards at 2x the batch for guidance; training: micro-batches x
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


def sd35m_random_policy(resolution: int = 512):
    """A FlowPolicy with Stable Diffusion 3.5 Medium's transformer and VAE architecture, random weights, and tiny
    CLIP text towers without T5 (diffusers allows text_encoder_3=None: its part of the prompt embeddings is zeros):
    the transformer, which dominates the cost, is full size. Meant for a GPU (about 2.5 B transformer parameters)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from rlbench.diffusion.flow_policy import FlowPolicy
    from rlbench.testing import tiny_clip_tokenizer

    transformer = SD3Transformer2DModel(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    vae = AutoencoderKL(  # SD3's 16-channel VAE (vae/config.json)
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)

    def text(seed: int, proj: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=proj))

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text(0, 768), tokenizer=tiny_clip_tokenizer(), text_encoder_2=text(1, 1280),
        tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    return FlowPolicy(pipe, "sd3", name="sd35m-random", resolution=resolution)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_only_seconds(trainer) -> tuple[float, float]:
    """Bare denoiser time of one epoch's sampling and training calls, at the run's shapes: the UNet, or the flow
    transformer on the inputs its pipeline gives it (SD3: latents, 1000 sigma, embeddings, pooled; FLUX: packed
    latents, sigma, guidance, embeddings, pooled, text and image ids)."""
    cfg, policy, device = trainer.cfg, trainer.policy, trainer.device
    c, h, w = policy.latent_shape
    cond = policy.encode_prompts(["a photo of a cat"])
    n_steps = cfg.sample.num_steps
    bs, mb = cfg.sample.batch_size, cfg.train.batch_size
    window = max(1, int(n_steps * cfg.train.timestep_window))
    n_train = max(1, int(window * cfg.train.timestep_fraction)) if trainer.algorithm.trains_on_trajectory else 1
    micro = cfg.samples_per_epoch // mb * cfg.train.num_inner_epochs
    flux = getattr(policy, "kind", "") == "flux"
    k = 2 if cfg.sample.guidance_scale != 1.0 and not flux else 1

    def inputs(b: int) -> dict:
        x = torch.randn(k * b, c, h, w, device=device, dtype=policy.dtype)
        if policy.family == "ddim":
            return {"sample": x, "timestep": torch.full((k * b,), 500, device=device),
                    "encoder_hidden_states": cond["embeds"].expand(k * b, -1, -1)}
        e, pooled = cond["embeds"].expand(k * b, -1, -1), cond["pooled"].expand(k * b, -1)
        if not flux:
            return {"hidden_states": x, "timestep": torch.full((k * b,), 500.0, device=device),
                    "encoder_hidden_states": e, "pooled_projections": pooled, "return_dict": False}
        from diffusers import FluxPipeline

        guidance = torch.full((b,), 3.5, device=device) if policy.denoiser.config.guidance_embeds else None
        return {"hidden_states": FluxPipeline._pack_latents(x, b, c, h, w), "timestep": torch.full((b,), 0.5, device=device),
                "guidance": guidance, "encoder_hidden_states": e, "pooled_projections": pooled,
                "txt_ids": cond["text_ids"], "img_ids": policy._image_ids(), "return_dict": False}

    def call(b: int, grad: bool) -> None:
        kw = inputs(b)
        if grad:
            out = policy.forward_module(**kw)
            out = out.sample if hasattr(out, "sample") else out[0]
            out.float().square().mean().backward()
        else:
            with torch.no_grad():
                policy.forward_module(**kw)

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


# issue 12's comparison settings (trl's DDPOConfig fields in benchmarks/peer/trl_ddpo.py SETTINGS)
COMPARE = ["--model", "diffusers-test", "--steps", "20", "--sample-batch", "4", "--batches", "2",
           "--train-batch", "2", "--grad-acc", "2", "--lr", "3e-4", "--batch-advantages", "--epochs", "3"]


def compare_trl(peer_python: str, keep: Path | None) -> dict:
    """Run trl's DDPOTrainer, then rlbench, each in its own process, at identical settings; one JSON each."""
    import subprocess

    from rlbench.testing import save_tiny_sd_pipeline

    root = Path(__file__).resolve().parent
    if not Path(peer_python).exists():
        raise SystemExit(f"error: {peer_python} not found; build the peer env with benchmarks/peer/setup_peer_env.sh")
    tmp = keep or Path(tempfile.mkdtemp(prefix="rlbench-compare-"))
    pipe = save_tiny_sd_pipeline(tmp / "sd", size="diffusers-test")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join((root / "prompts" / "simple-animals.txt").read_text().split()[:8]) + "\n")

    def run(cmd: list[str]) -> dict:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    trl = run([peer_python, str(root / "peer" / "trl_ddpo.py"), "--pipeline", str(pipe), "--prompts", str(prompts),
               "--epochs", "4"])
    ours = run([sys.executable, str(Path(__file__).resolve()), *COMPARE, "--model", str(pipe),
                "--prompts", str(prompts), "--json-stdout"])
    return {
        "trl_epoch_s": trl["epoch_s"], "rlbench_epoch_s": ours["epoch_s"],
        "epoch_ratio_rlbench_over_trl": ours["epoch_s"] / trl["epoch_s"],
        "trl_sampling_s": trl["sampling_s"], "rlbench_sampling_s": ours["sampling_s"],
        "trl_training_s": trl["training_s"], "rlbench_training_s": ours["training_s"],
        "trl_peak_rss_mb": trl["peak_rss_bytes"] / 1e6, "rlbench_peak_rss_mb": ours["peak_rss_bytes"] / 1e6,
        "rlbench_overhead_ratio": ours["overhead_ratio"], "trl_versions": trl.get("versions"),
        "torch_threads": ours["torch_threads"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare-trl", action="store_true", help="rlbench vs trl 0.23.1 at issue 12's settings")
    ap.add_argument("--peer-python", default=".venv-peer/bin/python", help="python of the trl peer env")
    ap.add_argument("--prompts", default="simple-animals", help="prompt set or file")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the config's)")
    ap.add_argument("--batch-advantages", action="store_true", help="batch-normalised advantages (no per-prompt)")
    ap.add_argument("--json-stdout", action="store_true", help="print only one JSON line (for --compare-trl)")
    ap.add_argument("--steps-per-forward", type=int, default=None, help="train.steps_per_forward (default: auto)")
    ap.add_argument("--model", default="tiny", help="tiny | diffusers-test | sd15-random | tiny-sd3 | tiny-flux | "
                    "sd35m-random | a diffusers folder")
    ap.add_argument("--sampler", default=None, help="sample.sampler (flow models: flow-sde, dance-sde, cps, ode)")
    ap.add_argument("--guidance", type=float, default=None, help="sample.guidance_scale (default: the config's)")
    ap.add_argument("--resolution", type=int, default=0, help="sample.resolution (flow models)")
    ap.add_argument("--images-per-prompt", type=int, default=None, help="sample.images_per_prompt (grpo: >= 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--algo", default="ddpo-is")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps")
    ap.add_argument("--sample-batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2, help="sampling batches per epoch")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--grad-acc", type=int, default=2)
    ap.add_argument("--timestep-fraction", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up epoch)")
    ap.add_argument("--mixed-precision", default="auto")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    if args.compare_trl:
        out = compare_trl(args.peer_python, None)
        width = max(map(len, out))
        for k, v in out.items():
            print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return

    from rlbench.utils.hf import quiet_hf
    from rlbench.registry import MODELS
    from rlbench.train.rundir import RunDir
    from rlbench.testing import save_tiny_flux_pipeline, save_tiny_sd3_pipeline, save_tiny_sd_pipeline
    from rlbench.train.trainer import prepare

    quiet_hf()
    tmp = Path(tempfile.mkdtemp(prefix="rlbench-speed-"))
    model = args.model
    if model in ("tiny", "diffusers-test"):
        model = str(save_tiny_sd_pipeline(tmp / "sd", size=model))
    elif model == "sd15-random":
        MODELS.register("sd15-random", lambda: sd15_random_policy())
    elif model == "tiny-sd3":
        model = str(save_tiny_sd3_pipeline(tmp / "sd3"))
    elif model == "tiny-flux":
        model = str(save_tiny_flux_pipeline(tmp / "flux"))
        args.resolution = args.resolution or 16  # the tiny FLUX model's size (FluxPipeline defaults to 1024 px)
    elif model == "sd35m-random":
        factory = lambda: sd35m_random_policy(args.resolution or 512)  # noqa: E731
        factory.family = "flow"
        MODELS.register("sd35m-random", factory)
    device = torch.device(args.device)
    trainer = prepare(
        overrides=[
            f"sample.num_steps={args.steps}", f"sample.batch_size={args.sample_batch}",
            f"sample.num_batches_per_epoch={args.batches}", f"train.batch_size={args.train_batch}",
            f"train.gradient_accumulation_steps={args.grad_acc}", f"train.timestep_fraction={args.timestep_fraction}",
            "logging.samples_every=0", "logging.tensorboard=false", f"model.device={args.device}",
            f"model.mixed_precision={args.mixed_precision}",
            *([f"train.learning_rate={args.lr}"] if args.lr else []),
            *(["advantage.per_prompt=false"] if args.batch_advantages else []),
            *([f"train.steps_per_forward={args.steps_per_forward}"] if args.steps_per_forward is not None else []),
            *([f"sample.sampler={args.sampler}"] if args.sampler else []),
            *([f"sample.guidance_scale={args.guidance}"] if args.guidance is not None else []),
            *([f"sample.resolution={args.resolution}"] if args.resolution else []),
            *([f"sample.images_per_prompt={args.images_per_prompt or 2}"] if args.algo in ("grpo", "nft")
              or args.images_per_prompt else []),
        ],
        values={"algorithm": {"name": args.algo}, "reward": {"name": "incompressibility"},
                "model": {"name": model}, "prompts": {"name": args.prompts},
                "run": {"epochs": args.epochs + 1, "out": str(tmp / "run")}},
        log=None,
    )
    run = RunDir.create(tmp / "run")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    records = [trainer.epoch(run, e) for e in range(args.epochs + 1)][1:]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the bare-UNet timing
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
        "sampler": repr(trainer.sampler),
        "unet_only_sampling_s": sample_unet, "unet_only_training_s": train_unet,
    }
    out["images_per_s_sampled"] = n / out["sampling_s"]
    out["samples_per_s_trained"] = n / out["training_s"]
    out["overhead_ratio"] = epoch_s / (sample_unet + train_unet)
    out["sampling_overhead_ratio"] = out["sampling_s"] / sample_unet
    out["training_overhead_ratio"] = out["training_s"] / train_unet
    out["peak_rss_bytes"] = peak_rss
    out["peak_memory_gb"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss) / 2**30
    if args.json_stdout:
        print(json.dumps(out))
        return
    width = max(map(len, out))
    for k, v in out.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
