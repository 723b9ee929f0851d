"""The embedded text-to-image model of the shapes world: architecture, tokenizer, pretraining.

A pixel-space diffusers ``UNet2DConditionModel`` (32x32 RGB, no VAE) conditioned on a tiny
``CLIPTextModel`` over a word-level CLIP BPE vocabulary learnt from the world's captions (any other
text still tokenises, byte by byte). Everything is saved in the diffusers folder layout, so
:meth:`rlbench.diffusion.policy.DiffusionPolicy.from_pretrained` loads it like any Stable Diffusion folder.

Pretraining is plain DDPM epsilon-prediction on rendered (image, caption) pairs of the training
prompts only (held-out prompts stay unseen by the whole pipeline), with 10 % of captions dropped
for classifier-free guidance and an EMA of the UNet weights, which is what is saved.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SIZE = 32
MAX_TOKENS = 20  # longest caption is ~14 words + BOS/EOS
TEXT_DIM = 64
CFG_DROPOUT = 0.1  # fraction of captions replaced by "" during pretraining (classifier-free guidance)
EMA_DECAY = 0.999

# DDPM's linear schedule (Ho et al. 2020) suits 32x32 pixel-space models; the DDIM sampling
# conventions follow SD (leading spacing, steps_offset 1, no alpha-to-one at the end) so that the
# last DDIM step keeps a non-zero variance and a finite log-prob for DDPO.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
# The shipped model's schedule above has a terminal SNR of 4.0e-5 (not zero) and samples from t = 901: the flaws of
# Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed" (arXiv:2305.08891), which keep a
# model from choosing the image's mean colour (the shapes model draws white and black backgrounds gray). Their fixes:
# betas rescaled to zero terminal SNR (their Algorithm 1 = diffusers' rescale_betas_zero_snr), v-prediction (an
# epsilon model cannot denoise pure noise) and "trailing" spacing (sampling starts at t = 999).
SCHEDULES: dict[str, dict[str, Any]] = {
    "ddpm": SCHEDULER_CONFIG,
    "zero-snr": {**SCHEDULER_CONFIG, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                 "timestep_spacing": "trailing"},
}

# The UNet denoises space-to-depth images: (3, 32, 32) -> (12, 16, 16), a lossless reshaping
# (undone by DiffusionPolicy.decode) that makes every step about 3x cheaper on a CPU than the same
# network at 32x32; the policy's "latents" are these 12x16x16 tensors.
PIXEL_SHUFFLE = 2
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // PIXEL_SHUFFLE,
    "in_channels": 3 * PIXEL_SHUFFLE**2,
    "out_channels": 3 * PIXEL_SHUFFLE**2,
    "layers_per_block": 1,
    "block_out_channels": (64, 64, 96),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_DIM,
    "intermediate_size": 4 * TEXT_DIM,
    "projection_dim": TEXT_DIM,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
}


# -- tokenizer ------------------------------------------------------------------------------------


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges after which every word is a single symbol, learnt deterministically.

    Classic BPE training (most frequent adjacent pair first) with ties broken by the pair itself,
    so the same words always give the same merges and token ids (the ``tokenizers`` trainer breaks
    ties by hash order, which changes from process to process). Symbols are CLIP's byte-to-unicode
    characters with ``</w>`` on each word's last one.
    """
    from rlbench.utils.bpe import bytes_to_unicode

    b2u = bytes_to_unicode()
    seqs = []
    for w in sorted({w.lower() for w in words}):
        syms = [b2u[b] for b in w.encode("utf-8")]
        seqs.append(syms[:-1] + [syms[-1] + "</w>"])
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


def write_tokenizer(folder: Path, words: Iterable[str]) -> None:
    """A CLIP BPE tokenizer in which every world word is one token, with byte fallback.

    The 256 byte symbols and their end-of-word variants stay in the vocabulary, so any text can be
    encoded; merges (:func:`learn_merges`) make each world word one token. Deterministic.
    """
    from transformers import CLIPTokenizer

    from rlbench.utils.bpe import byte_level_vocab

    merges = learn_merges(words)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab = {t: i for t, i in byte_level_vocab().items() if t not in (bos, eos)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS).save_pretrained(folder)
    # save_pretrained (transformers 5) writes tokenizer.json; keep vocab/merges for transformers 4.
    (folder / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def check_schedule(schedule: str) -> None:
    """That ``schedule`` names one of :data:`SCHEDULES` (one message for the CLI and the library)."""
    from rlbench.errors import InputError

    if schedule not in SCHEDULES:
        raise InputError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")


def new_components(words: Iterable[str], seed: int = 0, schedule: str = "ddpm") -> dict[str, Any]:
    """Fresh, randomly initialised components (unet, text_encoder, tokenizer, scheduler); ``schedule`` names one of
    :data:`SCHEDULES`."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), words)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **TEXT_CONFIG,
        ))
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDIMScheduler(**SCHEDULES[schedule])}


def check_init(init: Path, modules: Iterable[str]) -> None:
    """That ``init`` is a saved model folder holding ``modules`` (before anything is written)."""
    from rlbench.errors import InputError

    if not Path(init).is_dir():
        raise InputError(f"--init {init}: no such folder; give a model folder that `rlbench shapes pretrain` wrote.")
    for name in modules:
        if not (Path(init) / name / "config.json").is_file():
            raise InputError(f"--init {init}: no {name}/config.json there; give a folder that `rlbench shapes "
                             "pretrain` wrote (or the shipped weights) for the same --family.")


_CONFIG_METADATA = ("architectures", "transformers_version", "torch_dtype", "dtype")  # not architecture


def init_components(comps: dict[str, Any], init: Path, modules: Iterable[str]) -> dict[str, Any]:
    """``comps`` with each of ``modules`` (folder names: ``unet``, ``transformer``, ``text_encoder``) loaded from the
    saved model folder ``init`` (a continued pretraining starts from its weights). The saved modules must have the
    architecture that ``comps`` were built with; the tokenizer and scheduler stay ``comps``' own (both are fixed by
    the vocabulary and the model's config)."""
    from rlbench.errors import InputError

    check_init(init, modules)
    out = dict(comps)
    for name in modules:
        cls = type(comps[name])
        loaded = cls.from_pretrained(Path(init) / name)
        # As JSON both ways: a saved config holds lists where a fresh one may hold tuples.
        fresh, saved = (json.loads(json.dumps(c.to_dict() if hasattr(c, "to_dict") else dict(c), default=str))
                        for c in (comps[name].config, loaded.config))
        differ = sorted(k for k in fresh if not k.startswith("_") and k not in _CONFIG_METADATA and saved.get(k) != fresh[k])
        if differ:
            raise InputError(f"--init {init}: its {name} differs from this model's architecture in {', '.join(differ)}; "
                             "give weights of the same --family and version.")
        out[name] = loaded
    return out


def save_components(folder: Path, comps: dict[str, Any], words: Iterable[str]) -> Path:
    """Write the diffusers folder layout: unet/, text_encoder/, tokenizer/, scheduler/."""
    folder.mkdir(parents=True, exist_ok=True)
    comps["unet"].save_pretrained(folder / "unet", safe_serialization=True)
    comps["text_encoder"].save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_tokenizer(folder / "tokenizer", words)
    comps["scheduler"].save_pretrained(folder / "scheduler")
    from rlbench.diffusion.policy import RLBENCH_MODEL_FILE

    meta = {"pixel_shuffle": PIXEL_SHUFFLE, "default_prompts": "shapes-train", "eval_defaults": EVAL_DEFAULTS}
    (folder / RLBENCH_MODEL_FILE).write_text(json.dumps(meta, indent=2))
    return folder


# -- pretraining ---------------------------------------------------------------------------------

def world_batch(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Batch ``index`` of the pretraining stream: (uint8 images (B,32,32,3), captions).

    Each batch has its own seed ``(seed, index)``, so the stream is the same however many worker
    processes make it. Held-out prompt spaces are excluded: the base model never sees them.
    """
    from rlbench.shapes.world import sample_batch

    seed, index, batch_size = args
    images, captions, _ = sample_batch(np.random.default_rng([seed, index]), batch_size, exclude_heldout=True)
    return images, captions


def world_batches(steps: int, batch_size: int, seed: int, workers: int = 0):
    """The pretraining stream, rendered ahead in ``workers`` processes (0: in this process)."""
    tasks = ((seed, i, batch_size) for i in range(steps))
    if workers <= 0:
        yield from map(world_batch, tasks)
        return
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        window: deque = deque()
        for task in tasks:  # a bounded window of batches in flight keeps memory flat
            window.append(pool.submit(world_batch, task))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def batch_tensors(images: np.ndarray, captions: list[str], tokenizer: Any, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pretraining batch as the shapes models see it: space-to-depth pixels in [-1, 1] (B, 12, 16, 16) and
    the captions' token ids (B, MAX_TOKENS)."""
    x0 = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return torch.nn.functional.pixel_unshuffle(x0, PIXEL_SHUFFLE), ids


def pretrain_loop(
    params: list[torch.nn.Parameter],
    loss_of: Callable[[np.ndarray, list[str]], torch.Tensor],
    batches: Iterable[tuple[np.ndarray, list[str]]],
    *,
    steps: int,
    lr: float,
    warmup: int,
    seed: int,
    log: Callable[[str], None] | None,
    log_every: int,
    max_seconds: float | None,
) -> tuple[int, float]:
    """The shapes models' shared pretraining driver; returns (steps done, seconds).

    Per step: 10 % of captions replaced by "" (classifier-free guidance), ``loss_of(images, captions)`` (the
    model's own objective), AdamW with linear warm-up then cosine decay, gradients clipped at 1, and an EMA of
    ``params`` (decay min(0.999, (1 + n) / (10 + n))) copied into them at the end.
    """
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched_lr = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    rng = np.random.default_rng(seed)
    t0, running, step = time.perf_counter(), 0.0, -1
    for step, (images, captions) in zip(range(steps), batches):
        drop = rng.random(len(captions)) < CFG_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop)]
        loss = loss_of(images, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched_lr.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # short runs: the EMA warms up too
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        running += float(loss.detach())
        if log is not None and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  {time.perf_counter() - t0:.0f}s")
            running = 0.0
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            if log is not None:
                log(f"stopping after {step + 1} steps: the {max_seconds:.0f} s budget is spent")
            break
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return step + 1, time.perf_counter() - t0


def init_meta(init: Path | None) -> dict[str, Any]:
    """What ``pretrain.json`` records of a continued pretraining: the folder it started from and that folder's own
    ``pretrain.json`` (so the whole history of the weights stays on record)."""
    if init is None:
        return {}
    prior = Path(init) / "pretrain.json"
    return {"init": str(init), "init_pretrain": json.loads(prior.read_text()) if prior.is_file() else None}


def train_and_save(out: Path, modules: list[torch.nn.Module], loss_of, batches, save: Callable[[], Any], *, steps: int,
                   batch_size: int, lr: float, warmup: int, device: str, seed: int, log, log_every: int,
                   max_seconds: float | None, meta: dict[str, Any] | None = None) -> Path:
    """What both shapes models' ``pretrain`` share after building their loss: :func:`pretrain_loop` over the
    ``modules``' parameters, the modules back on the CPU in eval mode, ``save()`` (the EMA weights in the diffusers
    layout) and ``pretrain.json`` with the run's settings (and ``meta``)."""
    done, seconds = pretrain_loop([p for m in modules for p in m.parameters()], loss_of, batches, steps=steps, lr=lr,
                                  warmup=warmup, seed=seed, log=log, log_every=log_every, max_seconds=max_seconds)
    for m in modules:
        m.to("cpu").eval()
    save()
    info = {"steps": done, "planned_steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed,
            "device": device, "seconds": seconds, "ema_decay": EMA_DECAY, "cfg_dropout": CFG_DROPOUT, **(meta or {})}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2))
    return out


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, v: bool) -> torch.Tensor:
    """What the UNet learns to predict from ``x_t = sqrt(a) x0 + sqrt(1 - a) noise``: the noise (epsilon), or with
    ``v`` the velocity ``sqrt(a) noise - sqrt(1 - a) x0`` (Salimans & Ho 2022, as diffusers' ``get_velocity``)."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0 if v else noise


def pretrain(
    out: Path,
    batches: Iterable[tuple[np.ndarray, list[str]]],
    words: Iterable[str],
    *,
    steps: int = 20_000,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 500,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 200,
    max_seconds: float | None = None,
    init: Path | None = None,
    schedule: str = "ddpm",
) -> Path:
    """Train the model from scratch (or, with ``init``, on from a saved model folder's weights) on ``batches`` of
    (uint8 images (B,32,32,3), captions), under the noise schedule ``schedule`` (:data:`SCHEDULES`: DDPM's epsilon
    loss, or the v loss of the zero-terminal-SNR schedule).

    AdamW with linear warm-up then cosine decay; gradients clipped at 1; the EMA of the UNet and
    text-encoder weights is saved to ``out`` in the diffusers layout, with ``pretrain.json``.
    """
    check_schedule(schedule)
    words = list(words)
    comps = new_components(words, seed, schedule)
    if init is not None:
        comps = init_components(comps, init, ("unet", "text_encoder"))
    unet, text_encoder, tokenizer, scheduler = (comps[k] for k in ("unet", "text_encoder", "tokenizer", "scheduler"))
    dev = torch.device(device)
    unet.to(dev).train()
    text_encoder.to(dev).train()
    alphas = scheduler.alphas_cumprod.to(dev)
    gen = torch.Generator().manual_seed(seed)

    v_loss = scheduler.config.prediction_type == "v_prediction"  # SCHEDULES hold epsilon or v_prediction

    def loss_of(images: np.ndarray, captions: list[str]) -> torch.Tensor:  # DDPM's epsilon loss (or v)
        x0, ids = batch_tensors(images, captions, tokenizer, dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(captions),), generator=gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(x_t, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        return torch.nn.functional.mse_loss(pred.float(), training_target(x0, noise, a, v_loss))

    return train_and_save(out, [unet, text_encoder], loss_of, batches, lambda: save_components(out, comps, words),
                          steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, device=device, seed=seed, log=log,
                          log_every=log_every, max_seconds=max_seconds, meta={"schedule": schedule, **init_meta(init)})


# -- the shipped model ----------------------------------------------------------------------------

WEIGHTS_DIR = "weights"  # rlbench/shapes/weights/: the pretrained model, shipped as package data


def shipped_weights() -> Path:
    """Folder of the pretrained shapes model inside the installed package."""
    from importlib import resources

    return Path(str(resources.files("rlbench.shapes").joinpath(WEIGHTS_DIR)))


def load_shapes_model(revision: str = ""):
    """The embedded default model (``--model shapes``): text-to-image on the shapes world, 32x32 px."""
    from rlbench.errors import ConfigError, WeightsNotAvailable
    from rlbench.diffusion.policy import DiffusionPolicy

    if revision:
        raise ConfigError("the shapes model ships with rlbench and has no revisions; drop model.revision.")
    folder = shipped_weights()
    if not (folder / "unet").is_dir():
        raise WeightsNotAvailable(
            f"the shapes model's pretrained weights are not in this installation ({folder}). Train them with "
            "`rlbench shapes pretrain --out shapes-model` and pass `--model shapes-model`."
        )
    return DiffusionPolicy.from_pretrained(folder, name="shapes", default_prompts="shapes-train")


# `rlbench train` with no options trains this model: CPU-sized defaults under the user's settings
# (rlbench.config.model_presets). The reward is the learned CLIP proxy with the exact gold watched
# beside it, so the default run shows a reward rising and what happens to the truth meanwhile.
# Measured on this model (README "Training in the shapes world"):
# - DDPO's gradient is noise-dominated: training only the noisiest half of the steps
#   (timestep_window 0.5) cut the samples needed for a gradient SNR of 1 from ~3,900 to ~390
#   (shapes-clip, benchmarks/ddpo_gradient_snr.py); the late steps carry 1/sigma-sized noise.
# - 8 prompts x 8 images per epoch (shapes-demo, images_per_prompt 8) give every prompt its own
#   baseline from the first epoch and epoch means that compare across epochs.
# - lr 3e-5 raised the proxy; 1e-4 only damaged the model (a random walk on that noise).
# - 10 DDIM steps sample as well as 20 (gold 0.236 vs 0.241 on shapes-train) at half the cost.
# - Full fine-tuning: LoRA adapters moved this 3.2 M-parameter UNet by KL ~1e-8 per step.
load_shapes_model.train_defaults = {
    "reward.name": "shapes-clip",
    "logging.watch": ["shapes-gold"],
    "prompts.name": "shapes-demo",
    "run.epochs": 20,
    "model.train_mode": "full",
    "sample.num_steps": 10,
    "sample.batch_size": 16,
    "sample.num_batches_per_epoch": 4,
    "sample.images_per_prompt": 8,
    "train.batch_size": 16,
    "train.gradient_accumulation_steps": 1,
    "train.learning_rate": 3e-5,
    "train.timestep_window": 0.5,
    "advantage.min_count": 8,
    "logging.num_samples": 16,
    "eval.every": 5,  # held-out curves while the run goes: 4 sets x 8 prompts x 2 images, ~4 s an evaluation
    "checkpoint.keep": 0,  # every checkpoint stays: `rlbench eval` compares them with the base model
    "checkpoint.every": 5,  # 4 checkpoints of a 20-epoch run (~50 MB each with the optimizer state)
}

# What `rlbench eval` uses by default for this model (rlbench.eval.plan.model_eval_defaults): the
# held-out prompt splits beside the run's training set, the exact gold rewards beside the learned
# proxies they are the truth of (both proxies are scored for every run, so the cross-reward matrix is
# complete), and the shipped shapes-clip vision tower for diversity features.
EVAL_DEFAULTS: dict[str, Any] = {
    "prompt_sets": ["shapes-heldout-combos", "shapes-heldout-counts", "shapes-heldout-relations"],
    "rewards": ["shapes-clip", "shapes-aesthetic"],
    "gold_rewards": ["shapes-gold", "shapes-aesthetic-gold"],
    "gold_of": {"shapes-gold": ["shapes-clip", "shapes-vlm-bertscore"],
                "shapes-aesthetic-gold": ["shapes-aesthetic"]},
    "features": "shapes-clip",
}
load_shapes_model.eval_defaults = EVAL_DEFAULTS


def vocabulary() -> list[str]:
    """Every word of every shapes-world caption (the tokenizer's whole-word tokens)."""
    from rlbench.shapes.grammar import all_prompts

    return sorted({w for p in all_prompts() for w in p.split()})
