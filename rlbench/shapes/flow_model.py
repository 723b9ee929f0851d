"""``shapes-flow``: a flow-matching text-to-image model of the shapes world (SD3's MMDiT, rectified flow).

The flow family's counterpart of :mod:`rlbench.shapes.model`: a diffusers ``SD3Transformer2DModel`` predicting the
velocity ``eps - x0`` under ``FlowMatchEulerDiscreteScheduler`` (shift 3.0, SD3.5-Medium's, so the samplers'
noise levels behave as on SD3.5), on the same space-to-depth pixels as ``shapes`` (32x32 RGB -> 12x16x16, patch
2 -> 64 image tokens), conditioned on a ``CLIPTextModelWithProjection`` over the shapes world's word-level
vocabulary (hidden states as the joint-attention context, the projected EOS state as the pooled embedding).
Saved as ``transformer/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/`` with ``rlbench.json``; loaded by
:class:`~rlbench.diffusion.flow_policy.PixelFlowPolicy`, a flow policy whose "VAE" is the lossless pixel shuffle
and whose text encoder is its own.

Pretraining: rectified flow (``x_sigma = (1 - sigma) x0 + sigma eps``, target ``eps - x0``) with SD3's
logit-normal sigma sampling (``compute_density_for_timestep_sampling("logit_normal")``, mean 0, std 1, mapped to
the shifted training sigmas as diffusers' ``train_dreambooth_sd3.py`` does), 10 % captions dropped for
classifier-free guidance, EMA weights saved; on the training prompts only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlbench.diffusion.flow_policy import PixelFlowPolicy
from rlbench.shapes.model import EVAL_DEFAULTS, IMAGE_SIZE, MAX_TOKENS, PIXEL_SHUFFLE, TEXT_CONFIG, TEXT_DIM, \
    batch_tensors, init_components, init_meta, train_and_save, write_tokenizer

# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
LATENT_SIZE = IMAGE_SIZE // PIXEL_SHUFFLE
TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "patch_size": 2,
    "in_channels": 3 * PIXEL_SHUFFLE**2,
    "out_channels": 3 * PIXEL_SHUFFLE**2,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "caption_projection_dim": 128,  # = heads x head_dim (JointTransformerBlock's added_kv_proj_dim)
    "joint_attention_dim": TEXT_DIM,
    "pooled_projection_dim": TEXT_DIM,
    "pos_embed_max_size": LATENT_SIZE // 2,
}
# Logit-normal sigma sampling (SD3 paper; diffusers compute_density_for_timestep_sampling defaults).
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


# -- components, saving, pretraining ----------------------------------------------------------------------


def new_components(words: Iterable[str], seed: int = 0) -> dict[str, Any]:
    """Fresh, randomly initialised transformer, text encoder, tokenizer and scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), words)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id, **TEXT_CONFIG))
    return {"transformer": transformer, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)}


def save_components(folder: Path, comps: dict[str, Any], words: Iterable[str]) -> Path:
    """transformer/, text_encoder/, tokenizer/, scheduler/ (diffusers / transformers formats) and rlbench.json."""
    folder.mkdir(parents=True, exist_ok=True)
    comps["transformer"].save_pretrained(folder / "transformer", safe_serialization=True)
    comps["text_encoder"].save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_tokenizer(folder / "tokenizer", words)
    comps["scheduler"].save_pretrained(folder / "scheduler")
    meta = {"family": "flow", "kind": "pixel-sd3", "pixel_shuffle": PIXEL_SHUFFLE, "default_prompts": "shapes-train",
            "eval_defaults": EVAL_DEFAULTS}
    (folder / "rlbench.json").write_text(json.dumps(meta, indent=2))
    return folder


def training_sigmas(scheduler: Any, n: int, generator: torch.Generator) -> torch.Tensor:
    """SD3's logit-normal sigmas: u = sigmoid(N(mean, std)), the training schedule's sigma at index int(u * 1000)
    (diffusers train_dreambooth_sd3.py: ``indices = (u * num_train_timesteps).long()``)."""
    u = torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.randn(n, generator=generator))
    idx = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.sigmas) - 1)
    return scheduler.sigmas.float()[idx]


def pretrain(
    out: Path,
    batches: Iterable[tuple[np.ndarray, list[str]]],
    words: Iterable[str],
    *,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 300,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
    max_seconds: float | None = None,
    init: Path | None = None,
) -> Path:
    """Train shapes-flow from scratch on ``batches`` of (uint8 images (B,32,32,3), captions) with the shapes models'
    driver (:func:`rlbench.shapes.model.pretrain_loop`); saves the EMA weights (transformer and text encoder) in the
    folder layout above, with ``pretrain.json``."""
    words = list(words)
    comps = new_components(words, seed)
    if init is not None:  # continued pretraining from a saved folder's weights
        comps = init_components(comps, init, ("transformer", "text_encoder"))
    transformer, text_encoder, tokenizer, scheduler = (comps[k] for k in ("transformer", "text_encoder", "tokenizer",
                                                                          "scheduler"))
    dev = torch.device(device)
    transformer.to(dev).train()
    text_encoder.to(dev).train()
    gen = torch.Generator().manual_seed(seed)

    def loss_of(images: np.ndarray, captions: list[str]) -> torch.Tensor:  # rectified flow's velocity loss
        x0, ids = batch_tensors(images, captions, tokenizer, dev)
        sigma = training_sigmas(scheduler, len(captions), gen).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        s = sigma.view(-1, 1, 1, 1)
        text = text_encoder(ids)
        pred = transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
                           encoder_hidden_states=text.last_hidden_state, pooled_projections=text.text_embeds,
                           return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), noise - x0)

    return train_and_save(out, [transformer, text_encoder], loss_of, batches, lambda: save_components(out, comps, words),
                          steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, device=device, seed=seed, log=log,
                          log_every=log_every, max_seconds=max_seconds,
                          meta={"sigma_sampling": f"logit-normal({LOGIT_MEAN}, {LOGIT_STD})", **init_meta(init)})


# -- the shipped model ----------------------------------------------------------------------------

WEIGHTS_DIR = "flow_weights"  # rlbench/shapes/flow_weights/: the pretrained model, shipped as package data


def shipped_weights() -> Path:
    from importlib import resources

    return Path(str(resources.files("rlbench.shapes").joinpath(WEIGHTS_DIR)))


def load_shapes_flow_model(revision: str = "") -> PixelFlowPolicy:
    """The embedded flow-matching model (``--model shapes-flow``): text-to-image on the shapes world, 32x32 px."""
    from rlbench.errors import ConfigError, WeightsNotAvailable

    if revision:
        raise ConfigError("the shapes-flow model ships with rlbench and has no revisions; drop model.revision.")
    folder = shipped_weights()
    if not (folder / "transformer").is_dir():
        raise WeightsNotAvailable(
            f"the shapes-flow model's pretrained weights are not in this installation ({folder}). Train them with "
            "`rlbench shapes pretrain --family flow --out shapes-flow-model` and pass `--model shapes-flow-model`.")
    return PixelFlowPolicy.from_folder(folder, name="shapes-flow")


load_shapes_flow_model.family = "flow"
load_shapes_flow_model.eval_defaults = EVAL_DEFAULTS
# `rlbench train --model shapes-flow`: GRPO (Flow-GRPO's algorithm) on the CLIP proxy with the gold watched, the
# flow-SDE sampler at Flow-GRPO's a = 0.7 over 10 steps, groups of 8 images a prompt, the noisy 9 of 10 steps
# trained (the last, sigma .0089 -> 0, never: flow_grpo timestep_fraction 0.99), eval every 5 epochs. Measured:
# at lr 3e-5 the proxy stayed flat over 20 epochs (9.9 -> 9.9, KL ~2e-8 a dim); at 3e-4, 9.9 -> 11.7 in 10 epochs.
load_shapes_flow_model.train_defaults = {
    "algorithm.name": "grpo",
    "reward.name": "shapes-clip",
    "logging.watch": ["shapes-gold"],
    "prompts.name": "shapes-demo",
    "run.epochs": 20,
    "model.train_mode": "full",
    "sample.sampler": "flow-sde",
    "sample.noise_level": 0.7,
    "sample.num_steps": 10,
    "sample.guidance_scale": 4.5,
    "sample.batch_size": 16,
    "sample.num_batches_per_epoch": 4,
    "sample.images_per_prompt": 8,
    "train.batch_size": 16,
    "train.gradient_accumulation_steps": 1,
    "train.learning_rate": 3e-4,  # flow_grpo config/base.py L63-76; 3e-5 (the DDIM shapes preset) left the proxy flat
    "train.timestep_window": 0.9,
    "advantage.min_count": 8,
    "logging.num_samples": 16,
    "eval.every": 5,
    "checkpoint.keep": 0,
    "checkpoint.every": 5,
}
