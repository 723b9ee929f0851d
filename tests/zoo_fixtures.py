"""Tiny, seeded stand-ins of the reward zoo's CLIP-family weights, written in the official on-disk formats.

Used by the tests of ``aesthetic``, ``pickscore``, ``hpsv2`` and ``clipscore`` (and by
``benchmarks/zoo_clip.py``). Each builder makes the REAL architecture class (transformers
``CLIPModel``, open_clip ``CLIP``, the aesthetic MLP's layer layout) with a tiny config and saves it
the way the published weights are stored, so the rewards load them through their normal loading
path (the weights override options). No network: the CLIP BPE vocabulary comes from the copy that
open_clip bundles (``open_clip/bpe_simple_vocab_16e6.txt.gz``), the same vocabulary as OpenAI's and
LAION's tokenizer files.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from rlbench.utils.bpe import bytes_to_unicode  # the GPT-2/CLIP byte map, one copy

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

TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=49408, max_position_embeddings=77,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the legacy ids of the OpenAI configs
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   image_size=224, patch_size=32)

# An open_clip model config shaped like ViT-H-14.json, only tiny (registered under this name by tests).
TINY_OPEN_CLIP_NAME = "rlbench-tiny-ViT-test"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """The CLIP BPE tokenizer files (vocab.json, merges.txt, configs) as in the OpenAI/LAION hub repos."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
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
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))


def tiny_hf_clip(folder: Path, *, projection_dim: int = 16, seed: int = 0, tokenizer: bool = True,
                 pad_token: str = "<|endoftext|>", safetensors: bool = True) -> Path:
    """A seeded tiny transformers ``CLIPModel`` folder (config.json + model.safetensors, or
    pytorch_model.bin with ``safetensors=False``), with the CLIP processor files unless ``tokenizer=False``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=projection_dim)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # random init leaves logit_scale at log(1/0.07); make it distinctive
        model.logit_scale.fill_(4.0)
    model.save_pretrained(folder)
    if not safetensors:  # the legacy format: transformers 5 only writes safetensors, so convert by hand
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    if tokenizer:
        write_clip_tokenizer(folder, pad_token=pad_token)
        write_preprocessor(folder)
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


def register_tiny_open_clip(folder: Path) -> str:
    """Register :data:`TINY_OPEN_CLIP_CONFIG` with open_clip (``add_model_config``); returns its name."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_OPEN_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP_NAME


def tiny_hps_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A seeded tiny open_clip model saved as HPSv2 ships its checkpoints: ``{'state_dict': ...}``."""
    import open_clip

    name = register_tiny_open_clip(path.parent / "open_clip_configs")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def smooth_images(n: int, size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Image-like float (n, 3, H, W) in [0, 1]: low-frequency colour fields plus mild noise."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return (img + 0.04 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def empty_hf_cache(monkeypatch, root: Path) -> None:
    """Point the Hugging Face cache (and rlbench's URL cache under HF_HOME) at an empty folder, offline."""
    import huggingface_hub.constants as hub_constants

    hf_home = root / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HOME", str(hf_home), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)


def block_network(monkeypatch) -> list:
    """Make every socket connection fail; returns the list of attempted connections (to assert empty)."""
    import socket

    attempts: list = []

    def no_network(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return attempts


def pil_image_processor(folder):
    """The folder's CLIP image processor with PIL arithmetic: ``CLIPImageProcessorPil`` in transformers 5,
    ``CLIPImageProcessor`` in 4 (its only, PIL-based implementation) — the processor of the published numbers."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as cls
    return cls.from_pretrained(str(folder))

