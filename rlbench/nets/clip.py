"""What the CLIP-family rewards share: loading a transformers CLIP from a local folder, the
pre-processing read from the folder's processor config, and chunked feature extraction.

Used by ``aesthetic``, ``pickscore`` and ``clipscore`` (transformers ``CLIPModel``) and, for the
chunking, by ``hpsv2`` (open_clip); their ``dtype``/``device``/``batch_size`` options are checked by
:mod:`rlbench.nets.options`. Everything here works on local paths only; weights
are resolved by :func:`rlbench.weights.resolve` before anything is loaded.

Two pre-processing paths (see :mod:`rlbench.nets.preprocess`):

* exact: :func:`~rlbench.nets.preprocess.clip_pixels_exact` with ``hf=True`` — uint8 quantisation, PIL
  bicubic resize, floor centre crop, CLIP normalisation: the arithmetic of transformers' PIL image
  processor (``CLIPImageProcessor`` of transformers 4, ``CLIPImageProcessorPil`` of 5; equal to the
  last bit in rlbench's tests), which the published PickScore, ddpo-pytorch aesthetic and torchmetrics
  CLIPScore numbers were computed with. ``PixelSpec(crop="round")`` rounds the crop offset instead,
  as torchvision's ``CenterCrop`` in OpenAI CLIP's ``preprocess`` (the aesthetic reward's
  ``preprocess="laion"``).
  transformers 5's default torchvision backend of the same processor resizes differently (up to
  ~2/255 per pixel); rlbench keeps the PIL arithmetic so scores do not depend on the installed version.
* differentiable: :func:`~rlbench.nets.preprocess.clip_pixels` (float antialiased bicubic, same crop and
  normalisation), taken when gradients are wanted (:func:`wants_grad`).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rlbench.errors import ConfigError, WeightsNotAvailable
from rlbench.nets.preprocess import clip_pixels, clip_pixels_exact
from rlbench.weights import WeightsSpec

BICUBIC = 3  # PIL.Image.BICUBIC, the ``resample`` of every CLIP processor config used here
CLIP_CONTEXT = 77  # CLIP text context length (PickScore README max_length=77; open_clip context_length)
# The files of an HF CLIP repo a reward needs (allow_patterns): config, safetensors weights, processor and
# tokenizer files — not the repo's duplicate pytorch_model.bin / tf_model.h5 / flax_model.msgpack.
HF_CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


# -- the card --------------------------------------------------------------------------------------


def used_specs(specs: Sequence[WeightsSpec], overrides: dict[str, Any]) -> tuple[WeightsSpec, ...]:
    """The specs with user overrides put in (so the card names the weights actually used)."""
    out = []
    for spec in specs:
        value = overrides.get(spec.option)
        out.append(spec if value in (None, "") else replace(spec, source=str(value), filename=None, revision=None,
                                                              sha256=None))
    return tuple(out)


# -- batching ---------------------------------------------------------------------------------------


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def wants_grad(images: torch.Tensor) -> bool:
    """Take the differentiable path: gradients are on and the images require them."""
    return torch.is_grad_enabled() and images.requires_grad


def unique_prompts(prompts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts in first-seen order, and for each input prompt its index among them."""
    distinct = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(distinct)}
    return distinct, torch.tensor([where[p] for p in prompts], dtype=torch.long)


def features(out: Any) -> torch.Tensor:
    """``get_image_features``/``get_text_features`` output as a tensor: transformers 4 returns the
    projected embedding, transformers 5 a ``BaseModelOutputWithPooling`` holding it in ``pooler_output``
    (vllm-project/vllm#37200, Lightning-AI/torchmetrics#3407)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"CLIP feature call returned {type(out).__name__} without a pooler_output tensor")


def unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim in float32 (the dot products and scores are float32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)


# -- pre-processing ---------------------------------------------------------------------------------


def _edge(value: Any, key: str, folder: Path) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ConfigError(f"{folder}/preprocessor_config.json: unsupported {key}={value!r} (CLIP uses a square 224).")


@dataclass(frozen=True)
class PixelSpec:
    """CLIP image pre-processing constants, as read from a processor's ``preprocessor_config.json``."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # Centre-crop offset: "floor" as transformers' image processors ((H - size) // 2, what a processor
    # config describes), "round" as torchvision's CenterCrop (OpenAI CLIP's preprocess; the aesthetic
    # reward's preprocess="laion").
    crop: str = "floor"

    @classmethod
    def from_folder(cls, folder: Path, option: str) -> PixelSpec:
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise WeightsNotAvailable(
                f"{folder} has no preprocessor_config.json (the CLIP image processor settings); pass a folder "
                f"with the processor files via {option}=PATH, as the hub repository ships it."
            )
        cfg = json.loads(path.read_text())
        size = _edge(cfg.get("size", 224), "size", folder)
        crop = _edge(cfg.get("crop_size", size), "crop_size", folder)
        checks = {
            "resample": (cfg.get("resample", BICUBIC), BICUBIC),
            "do_resize": (cfg.get("do_resize", True), True),
            "do_center_crop": (cfg.get("do_center_crop", True), True),
            "do_normalize": (cfg.get("do_normalize", True), True),
            "do_rescale": (cfg.get("do_rescale", True), True),
            "size == crop_size": (size == crop, True),
        }
        bad = [f"{k}={v!r}" for k, (v, want) in checks.items() if v != want]
        if abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
            bad.append(f"rescale_factor={cfg['rescale_factor']!r}")
        if bad:
            raise ConfigError(
                f"{path}: {', '.join(bad)}; rlbench's CLIP pre-processing implements the CLIP recipe only "
                "(bicubic resize of the short side, centre crop of the same size, rescale 1/255, normalise)."
            )
        return cls(size=size, mean=tuple(cfg.get("image_mean", cls.mean)), std=tuple(cfg.get("image_std", cls.std)))

    def __post_init__(self) -> None:
        if self.crop not in ("floor", "round"):
            raise ValueError(f"crop must be 'floor' or 'round', got {self.crop!r}")

    def exact(self, images: torch.Tensor) -> torch.Tensor:
        """The HF (PIL) processor's pixel values of float images in [0, 1], quantised to uint8 first
        (with ``crop="round"``: OpenAI CLIP's ``preprocess``, which differs only in the crop offset)."""
        return clip_pixels_exact(images, self.size, self.mean, self.std, hf=self.crop == "floor")

    def differentiable(self, images: torch.Tensor) -> torch.Tensor:
        return clip_pixels(images, self.size, self.mean, self.std, hf=self.crop == "floor")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.differentiable(images) if wants_grad(images) else self.exact(images)


# -- transformers CLIP ------------------------------------------------------------------------------


def load_tensors(path: Path, option: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain containers only
    (never arbitrary pickled objects); an unreadable file names the option that replaces it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise WeightsNotAvailable(
            f"{path} cannot be read as a weights file (torch.load with weights_only=True): {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}. Pass a good copy via {option}=PATH."
        ) from exc


def has_hf_weights(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "config.json").is_file() and any(
        (folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                         "pytorch_model.bin.index.json"))


def load_hf_clip(folder: Path, *, option: str, device: torch.device, dtype: torch.dtype):
    """A transformers ``CLIPModel`` from a local folder (safetensors, or the .bin fallback), eval mode,
    frozen (gradients flow to the inputs only), on ``device`` in ``dtype``. Missing or wrongly shaped
    weights raise instead of being initialised at random."""
    from transformers import CLIPModel

    folder = Path(folder)
    if not has_hf_weights(folder):
        raise WeightsNotAvailable(
            f"{folder} is not a transformers CLIPModel folder (needs config.json and model.safetensors or "
            f"pytorch_model.bin); pass one via {option}=PATH."
        )
    try:
        model, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as exc:  # e.g. shapes that do not match the config
        raise WeightsNotAvailable(f"the CLIPModel weights in {folder} do not match its config or cannot be read: "
                                  f"{type(exc).__name__}: {str(exc)[:500]}") from exc
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.endswith("position_ids")]
    problems = {"missing": list(info.get("missing_keys", ())), "unexpected": unexpected,
                "mismatched": [str(m) for m in info.get("mismatched_keys", ())]}
    if any(problems.values()):
        detail = "; ".join(f"{k} keys: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for k, v in problems.items() if v)
        raise WeightsNotAvailable(f"the CLIPModel weights in {folder} do not match its config ({detail}).")
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def load_hf_tokenizer(folder: Path, *, option: str):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise WeightsNotAvailable(
            f"{folder} has no CLIP tokenizer files (tokenizer.json or vocab.json + merges.txt); pass a folder "
            f"with them via {option}=PATH."
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_hf_clip_with_processor(model_folder: Path, processor_folder: Path, *, processor_option: str,
                                device: torch.device, dtype: torch.dtype):
    """(CLIPModel, tokenizer, PixelSpec): the model from ``model_folder``, the text and image processing
    from ``processor_folder`` (the same folder for CLIPScore, the LAION repo for PickScore)."""
    pixels = PixelSpec.from_folder(processor_folder, processor_option)
    tokenizer = load_hf_tokenizer(processor_folder, option=processor_option)
    return load_hf_clip(model_folder, option="weights", device=device, dtype=dtype), tokenizer, pixels


def image_features(model, pixels: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int,
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Unit image embeddings (B, D) float32 on ``device``: one ``get_image_features`` per chunk.
    Differentiable w.r.t. ``images`` when :func:`wants_grad`, else computed without a graph."""
    grad = wants_grad(images)
    out = []
    with torch.set_grad_enabled(grad):
        for s in chunks(images.shape[0], batch_size):
            x = pixels(images[s]).to(device=device, dtype=dtype)
            out.append(unit(features(model.get_image_features(pixel_values=x))))
    return torch.cat(out)


def text_features(model, tokenize: Callable[[list[str]], dict], prompts: Sequence[str], batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """Unit text embeddings (N, D) float32 of ``prompts``, each distinct prompt encoded once, one
    ``get_text_features`` per chunk of ``batch_size`` distinct prompts; no gradient."""
    distinct, index = unique_prompts(prompts)
    out = []
    with torch.no_grad():
        for s in chunks(len(distinct), batch_size):
            tokens = tokenize(distinct[s])
            out.append(unit(features(model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)))))
    return torch.cat(out)[index.to(device)]


def open_clip_features(model, tokenize: Callable[[list[str]], torch.Tensor],
                       pixels: Callable[[torch.Tensor, bool], torch.Tensor], images: torch.Tensor,
                       prompts: Sequence[str], batch_size: int, device: torch.device, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and prompt embeddings (B, D) float32 of an open_clip-style model (``encode_image`` /
    ``encode_text``): each distinct prompt encoded once without a graph, the images in chunks of ``batch_size``
    through ``pixels(chunk, differentiable)``, differentiable w.r.t. ``images`` when :func:`wants_grad`."""
    distinct, index = unique_prompts(prompts)
    with torch.no_grad():
        txt = torch.cat([unit(model.encode_text(tokenize(distinct[s]).to(device)))
                         for s in chunks(len(distinct), batch_size)])[index.to(device)]
    grad = wants_grad(images)
    img = []
    with torch.set_grad_enabled(grad):
        for s in chunks(images.shape[0], batch_size):
            img.append(unit(model.encode_image(pixels(images[s], grad).to(device=device, dtype=dtype))))
    return torch.cat(img), txt


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of unit vectors (float32)."""
    return (a * b).sum(dim=-1)


__all__ = [
    "HF_CLIP_FILES", "PixelSpec", "chunks", "cosine", "features", "image_features", "load_hf_clip",
    "load_hf_tokenizer", "load_tensors", "text_features", "unique_prompts", "unit", "used_specs", "wants_grad",
]
