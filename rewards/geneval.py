"""``geneval`` / ``geneval-partial``: GenEval's per-image verdict and Flow-GRPO's partial credit, GenEval-style.

GenEval (Ghosh et al. 2023, djghosh13/geneval ``evaluation/evaluate_images.py``) checks each image of a GenEval
prompt with an instance detector and a CLIP colour classifier under fixed rules. Here:

* the **rules** are GenEval's own, unchanged (:mod:`rlbench.rewards.geneval_rules`: ``select_objects``,
  ``evaluate``, ``partial_credit``), every constant an option with its official default;
* the **colour classifier** is GenEval's (``color_classification`` / ``ImageCrops``, L81-127): open_clip
  ``ViT-L-14`` with OpenAI's weights and its own eval transform, each instance's crop =
  ``Image.composite(image, #999 grey, mask).crop(box)``, a zero-shot classifier over the 10 colours with 3
  templates per colour (class vector = normalised mean of the normalised text embeddings, clip_benchmark
  ``zero_shot_classifier``), prediction = argmax of ``100 * norm(img) . W`` (``run_classification``);
* the **detector is a stand-in**: transformers' ``Mask2FormerForUniversalSegmentation`` with
  ``facebook/mask2former-swin-small-coco-instance`` (the same Swin-S Mask2Former architecture and score formula as
  GenEval's mmdet checkpoint, *different weights*, converted from the detectron2 training). Numbers are therefore
  **GenEval-style, not comparable digit for digit with published GenEval**; the card's summary and version say so.

Detector adapter (:class:`Mask2FormerDetector`): the folder's ``Mask2FormerImageProcessor`` (384x384 resize) and
``post_process_instance_segmentation(..., return_binary_maps=True)`` (without it later masks overwrite earlier ones
in one label map). Its score is what mmdet's ``MaskFormerFusionHead.instance_postprocess`` computes: softmax class
probability (no-object dropped) x mean sigmoid mask probability inside the binary mask, over the top
``num_queries`` (query, class) pairs (transformers ``image_processing_mask2former.py``
``post_process_instance_segmentation``; read in the installed 5.x source). Its post-process threshold is the lower of
the reward's two thresholds, so GenEval's own cuts (``> 0.3``, ``> 0.9`` for counting) decide. Label ``i`` is
GenEval class ``object_names.txt[i]`` (by index: GenEval's names differ from COCO's, e.g. ``computer mouse``). Boxes
come from the masks: ``torchvision.ops.masks_to_boxes`` plus 1 on ``x2, y2``, as mmdet's ``mask2bbox``
(``[x[0], y[0], x[-1] + 1, y[-1] + 1]``). The detector is replaceable: ``detector=DIR|hub id`` (any Mask2Former
instance-segmentation checkpoint with its processor), or any object with
``detect(images: list[PIL.Image]) -> list[{class name: [Detection, ...]}]`` passed in Python.

Images: float ``(B, 3, H, W)`` in [0, 1] -> uint8 (rlbench's one quantisation, :func:`rlbench.utils.images.to_uint8`)
-> PIL RGB, any size (GenEval reads PNGs, i.e. the same uint8 pixels). Not differentiable; deterministic.

Metadata: GenEval's records (``tag``, ``include``, optional ``exclude``), as the ``geneval`` prompt set carries them;
anything else is an :class:`~rlbench.errors.InputError`.

Deviations from the official code. Forced by the stand-in: the detector weights (above); the Mask2Former processor's
384x384 input and mask probabilities computed at 384x384 (mmdet: at the padded input size, eval-suites.md §1.7); HF
rounds scores to 6 decimals. A choice: the colour CLIP runs in ``dtype`` (float32 by default), where clip_benchmark's
default ``amp=True`` autocasts it to fp16 on CUDA (``dtype="float16"`` on a GPU comes close). ``geneval-partial``
scores the decoded images directly; Flow-GRPO's client JPEG-compressed them (``flow_grpo/rewards.py:geneval_score``,
PIL's default quality 75) before its server decoded them: option ``jpeg_quality=75`` reproduces that transport (both
rewards take it; default none). Not reproduced: Flow-GRPO's server hands mmdet's ``inference_detector`` RGB arrays
(``np.array(pil)``), which mmdet's ndarray path treats as BGR, so its detector may see red and blue swapped (the
config's ``to_rgb`` was not opened: unverified); GenEval itself passes file paths (correct channels).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from rlbench.errors import ConfigError, DependencyNotInstalled, InputError, WeightsNotAvailable
from rlbench.nets import clip as cm
from rlbench.nets.options import parse_batch_size, parse_device, parse_dtype, positive_int
from rlbench.reward import Reward, RewardOutput
from rlbench.rewards.geneval_rules import (COLORS, COUNTING_THRESHOLD, MAX_OBJECTS, MAX_OVERLAP, POSITION_THRESHOLD,
                                           THRESHOLD, Detection, evaluate, partial_credit, select_objects)
from rlbench.weights import WeightsSpec, resolve

# The stand-in detector: eval-suites.md §1.8 (transformers-native stand-ins, first row; HF card licence "other").
DETECTOR_REPO = "facebook/mask2former-swin-small-coco-instance"
DETECTOR_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
# GenEval's class names in the detector's label order (evaluation/object_names.txt, eval-suites.md §1.1), fetched like
# the prompts (rlbench.suitedata; `rlbench prompts download geneval`).
OBJECT_NAMES = "geneval/object_names.txt"
# The colour CLIP: open_clip ViT-L-14, pretrained="openai" (evaluate_images.py L66-67, eval-suites.md §1.4). open_clip
# fetches that tag from the hub repo of its pretrained config (open_clip 3.3 ``get_pretrained_cfg('ViT-L-14',
# 'openai')['hf_hub']``), preferring the safetensors twin of open_clip_pytorch_model.bin (pretrained.py
# download_pretrained_from_hf). Licence: MIT, OpenAI's (openai/CLIP LICENSE); the timm copy's card says apache-2.0.
CLIP_ARCH = "ViT-L-14"
CLIP_REPO = "timm/vit_large_patch14_clip_224.openai"
CLIP_FILE = "open_clip_model.safetensors"
CLIP_FILES = (CLIP_FILE, "open_clip_pytorch_model.bin")  # what a local folder given as clip=DIR may hold
# OpenAI CLIP was trained with QuickGELU; open_clip's "openai" pretrained config sets it (quick_gelu: True).
CLIP_QUICK_GELU = True
# OpenAI CLIP normalisation (open_clip OPENAI_DATASET_MEAN/STD, the 'openai' pretrained config's mean/std).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BGCOLOR = "#999"  # ImageCrops background, evaluate_images.py L84 (option 'bgcolor'; "original": no masking)
# The zero-shot templates, evaluate_images.py L113-117 ({c} = the colour; the class name is put in first, as there).
COLOR_TEMPLATES = ("a photo of a {{c}} {cls}", "a photo of a {{c}}-colored {cls}", "a photo of a {{c}} object")
COLOR_LOGIT_SCALE = 100.0  # clip_benchmark run_classification: logits = 100. * image_features @ classifier
CROPS_PER_BATCH = 16  # the crops DataLoader's batch_size, evaluate_images.py L121-124

_NOT_GENEVAL = ("the geneval rewards score GenEval prompts only: image {i}'s metadata has no {missing} (GenEval's "
                "per-prompt fields, e.g. {{'tag': 'counting', 'include': [{{'class': 'clock', 'count': 2}}], ...}}); "
                "score the prompt set `geneval` (fetch it with `rlbench prompts download geneval`), which carries "
                "them, or pass its records as metadata.")


# -- the two replaceable parts ----------------------------------------------------------------------------------


@runtime_checkable
class Detector(Protocol):
    """What the reward needs from a detector: per image, GenEval class name -> its detections (any order; the rule
    engine sorts and thresholds them). Boxes in pixels ``(x1, y1, x2, y2)``, masks boolean ``(H, W)`` or None."""

    def detect(self, images: list) -> list[dict[str, list[Detection]]]: ...


@runtime_checkable
class ColorClassifierLike(Protocol):
    """What the reward needs from a colour classifier: one colour of :data:`COLORS` per detection."""

    def classify(self, image, detections: Sequence[Detection], classname: str) -> list[str]: ...


def load_object_names(path: str | Path | None = None) -> list[str]:
    """GenEval's class names in detector label order: ``path`` (a text file, one name a line), or by default the
    pinned ``geneval/object_names.txt`` (``RLBENCH_DATA_DIR``, the rlbench data cache, or its pinned URL)."""
    if path in (None, ""):
        from rlbench.suitedata import data_path

        path = data_path(OBJECT_NAMES)
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"object_names={str(path)!r} is not a file; give a text file with one class name a line "
                         "in the detector's label order (GenEval's evaluation/object_names.txt).")
    # evaluate_images.py L70-71: [line.strip() for line in file]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    return names


def detections_from_instances(segmentation: torch.Tensor | None, segments_info: Sequence[Mapping[str, Any]],
                              names: Sequence[str]) -> dict[str, list[Detection]]:
    """One image's ``post_process_instance_segmentation(..., return_binary_maps=True)`` output as GenEval
    detections: label ``i`` -> ``names[i]`` (by index), box from the mask as mmdet's ``mask2bbox`` (torchvision
    ``masks_to_boxes`` + 1 on x2, y2), the mask kept (boolean numpy, for the colour crop)."""
    from torchvision.ops import masks_to_boxes

    out: dict[str, list[Detection]] = {}
    if not segments_info:
        return out
    masks = torch.as_tensor(segmentation)
    if masks.ndim == 2:  # a single instance given as one (H, W) map
        masks = masks.unsqueeze(0)
    if masks.shape[0] != len(segments_info):
        raise ValueError(f"{len(segments_info)} segments but {masks.shape[0]} binary maps "
                         "(post-process with return_binary_maps=True)")
    binary = masks > 0.5
    boxes = masks_to_boxes(binary).to(torch.float64)
    boxes[:, 2:] += 1  # mmdet mask2bbox: [x[0], y[0], x[-1] + 1, y[-1] + 1]
    for k, seg in enumerate(segments_info):
        label = int(seg["label_id"])
        if not 0 <= label < len(names):
            raise ConfigError(f"the detector predicted label {label}, but object_names has {len(names)} names; "
                              "the names must list the detector's classes in its label order.")
        out.setdefault(names[label], []).append(Detection(
            tuple(float(v) for v in boxes[k].tolist()), float(seg["score"]), binary[k].cpu().numpy()))
    return out


class Mask2FormerDetector:
    """transformers Mask2Former instance segmentation as a GenEval detector (see the module doc).

    Args:
        folder: a local folder with the model (``config.json`` + weights) and its ``preprocessor_config.json``.
        names: the class names in label order (GenEval's ``object_names.txt``).
        min_score: the post-process threshold (keep every instance scoring at least this).
        device, dtype, batch_size: where and how the model runs; images per forward.
    """

    def __init__(self, folder: str | Path, names: Sequence[str], *, min_score: float = 0.0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16,
                 option: str = "detector") -> None:
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        folder = Path(folder)
        if not cm.has_hf_weights(folder) or not (folder / "preprocessor_config.json").is_file():
            raise WeightsNotAvailable(
                f"{folder} is not a transformers Mask2Former folder (needs config.json, model.safetensors or "
                f"pytorch_model.bin, and preprocessor_config.json); pass one via {option}=PATH.")
        try:
            model, info = Mask2FormerForUniversalSegmentation.from_pretrained(
                str(folder), local_files_only=True, output_loading_info=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise WeightsNotAvailable(f"the Mask2Former in {folder} cannot be loaded: {type(exc).__name__}: "
                                      f"{' '.join(str(exc).split())[:400]}") from exc
        problems = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
        if problems:
            detail = "; ".join(f"{k}: {', '.join(map(str, info[k][:4]))}" for k in problems)
            raise WeightsNotAvailable(f"the Mask2Former weights in {folder} do not match its config ({detail}).")
        num_labels = int(model.config.num_labels)
        if num_labels != len(names):
            raise ConfigError(f"the detector in {folder} has {num_labels} classes but object_names lists "
                              f"{len(names)}; GenEval maps the detector's labels to its 80 names by index.")
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.processor = Mask2FormerImageProcessor.from_pretrained(str(folder), local_files_only=True)
        self.class_names = list(names)
        self.min_score = float(min_score)
        self.batch_size = parse_batch_size(batch_size)

    def detect(self, images: list) -> list[dict[str, list[Detection]]]:
        out: list[dict[str, list[Detection]]] = []
        for s in cm.chunks(len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[s]]
            inputs = self.processor(images=batch, return_tensors="pt")
            pixels = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
            mask = inputs.get("pixel_mask")
            with torch.no_grad():
                raw = self.model(pixel_values=pixels, pixel_mask=None if mask is None else mask.to(self.device))
            raw.class_queries_logits = raw.class_queries_logits.float()
            raw.masks_queries_logits = raw.masks_queries_logits.float()
            results = self.processor.post_process_instance_segmentation(
                raw, threshold=self.min_score, target_sizes=[im.size[::-1] for im in batch], return_binary_maps=True)
            out.extend(detections_from_instances(r["segmentation"], r["segments_info"], self.class_names)
                       for r in results)
        return out


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # a core dependency; only a broken install gets here
        raise DependencyNotInstalled("the geneval rewards need open_clip: pip install open_clip_torch") from exc
    return open_clip


def load_open_clip(path: Path, arch: str, *, quick_gelu: bool = CLIP_QUICK_GELU, option: str = "clip"):
    """``open_clip.create_model(arch, force_quick_gelu=quick_gelu)`` with the checkpoint at ``path`` loaded strictly
    (``open_clip.load_checkpoint``: safetensors or a torch state dict), eval mode, frozen."""
    import logging

    open_clip = _open_clip()
    if arch not in open_clip.list_models():
        raise ConfigError(f"clip_arch {arch!r} is not an open_clip model config (open_clip.list_models()); GenEval's "
                          f"colour classifier is {CLIP_ARCH!r}.")
    previous = logging.root.manager.disable  # open_clip warns "initialized randomly" before the weights are loaded
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        logging.disable(previous)
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable file, missing or mis-shaped keys: one fix
        raise WeightsNotAvailable(
            f"{path} is not an open_clip {arch} checkpoint (open_clip.load_checkpoint, strict): {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}; pass the open_clip weights via {option}=PATH.") from exc
    return model.eval().requires_grad_(False)


def clip_eval_transform(image_size: int):
    """open_clip's eval transform of the 'openai' ViT-L-14 (pinned open-clip-torch 2.20.0 ``image_transform(224,
    is_train=False)``): Resize(224, bicubic) of the short side, CenterCrop(224), RGB, ToTensor, OpenAI mean/std."""
    return _open_clip().image_transform(image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)


class ColorClassifier:
    """GenEval's colour classifier (``color_classification`` / ``ImageCrops``, evaluate_images.py L81-127).

    Args:
        model, tokenizer, transform: an open_clip model, its tokenizer and image transform.
        device, dtype: where the model runs.
        batch_size: crops per forward (GenEval: 16).
        bgcolor: the background of the masked crop (GenEval: ``"#999"``; ``"original"``: the image itself).
    """

    def __init__(self, model, tokenizer, transform, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = CROPS_PER_BATCH, bgcolor: str = BGCOLOR) -> None:
        self.model, self.tokenizer, self.transform = model, tokenizer, transform
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size = parse_batch_size(batch_size)
        self.bgcolor = bgcolor
        self._weights: dict[str, torch.Tensor] = {}

    @staticmethod
    def templates(classname: str) -> list[str]:
        """GenEval's three templates for ``classname``, with ``{c}`` left for the colour (L113-117)."""
        return [t.format(cls=classname) for t in COLOR_TEMPLATES]

    def zero_shot_weights(self, classname: str) -> torch.Tensor:
        """clip_benchmark ``zero_shot_classifier``: per colour, the normalised mean of the normalised embeddings of
        the three templates, renormalised; stacked as columns ``(D, 10)`` in :data:`COLORS` order (cached per class)."""
        if classname not in self._weights:
            columns = []
            with torch.no_grad():
                for colour in COLORS:
                    texts = [t.format(c=colour) for t in self.templates(classname)]
                    emb = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
                    emb = torch.nn.functional.normalize(emb, dim=-1).mean(dim=0)
                    columns.append(emb / emb.norm())
            self._weights[classname] = torch.stack(columns, dim=1)
        return self._weights[classname]

    def crops(self, image, detections: Sequence[Detection]) -> list:
        """``ImageCrops``: the instance pasted on the background through its mask, then cut to its box (PIL
        ``crop``, which rounds the float box); without a mask the box of the unmasked image."""
        from PIL import Image

        image = image.convert("RGB")
        blank = image.copy() if self.bgcolor == "original" else Image.new("RGB", image.size, color=self.bgcolor)
        out = []
        for det in detections:
            if det.mask is not None:
                mask = np.asarray(det.mask)
                if tuple(mask.shape) != tuple(image.size[::-1]):
                    raise ValueError(f"mask of shape {mask.shape} for an image of size {image.size[::-1]}")
                crop = Image.composite(image, blank, Image.fromarray(mask.astype(bool)))
            else:
                crop = image
            out.append(crop.crop(tuple(det.box[:4])))
        return out

    def classify(self, image, detections: Sequence[Detection], classname: str) -> list[str]:
        """One colour per detection: argmax of ``100 * norm(encode_image(crop)) . W`` (``run_classification``)."""
        if not detections:
            return []
        weights = self.zero_shot_weights(classname)
        crops = self.crops(image, detections)
        picks: list[int] = []
        with torch.no_grad():
            for s in cm.chunks(len(crops), self.batch_size):
                x = torch.stack([self.transform(c) for c in crops[s]]).to(device=self.device, dtype=self.dtype)
                feats = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
                picks.extend((COLOR_LOGIT_SCALE * feats @ weights).argmax(dim=1).tolist())
        return [COLORS[i] for i in picks]


# -- the rewards ------------------------------------------------------------------------------------------------

# Realistic GenEval records, one per tag, in the form of evaluation_metadata.jsonl (prompts/create_prompts.py's
# templates); what check_reward feeds the rewards.
EXAMPLE_METADATA = (
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a cat and a dog"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "brown"}], "prompt": "a photo of a brown dog"},
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                    {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
    {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "white"},
                                      {"class": "bench", "count": 1, "color": "red"}],
     "prompt": "a photo of a white dog and a red bench"},
)


def _is_spec_override(value: Any) -> bool:
    return value is None or isinstance(value, (str, Path))


class GenEval(Reward):
    """GenEval's per-image verdict: 1.0 if the image is ``correct`` under GenEval's rules, else 0.0 (GenEval-style:
    transformers Mask2Former stands in for the official mmdet detector).

    Args:
        detector: the detector: a Mask2Former folder or hub id (default ``facebook/mask2former-swin-small-coco-
            instance``), or in Python any object with ``detect(images) -> [{class: [Detection]}]``.
        clip: the colour CLIP's open_clip weights (a ``.safetensors``/``.bin`` file, a folder holding
            ``open_clip_model.safetensors``, or a hub id); default OpenAI's ViT-L-14
            (``timm/vit_large_patch14_clip_224.openai``).
        clip_arch: the open_clip model config of those weights (default ``"ViT-L-14"``).
        clip_quick_gelu: build the CLIP with QuickGELU, as OpenAI's weights need (default True).
        color_classifier: in Python, any object with ``classify(image, detections, classname) -> [colour]``
            instead of the CLIP (``clip`` is then not loaded).
        object_names: the detector's class names in label order (a text file); default GenEval's
            ``geneval/object_names.txt`` (fetched with ``rlbench prompts download geneval``).
        threshold, counting_threshold, max_objects, max_overlap, position_threshold: GenEval's constants
            (0.3, 0.9, 16, 1.0, 0.1: evaluate_images.py L286-290).
        bgcolor: the colour crops' background (GenEval's ``"#999"``; ``"original"``: unmasked).
        jpeg_quality: JPEG-compress the images at this quality before scoring (Flow-GRPO's transport: 75); default none.
        device, dtype: where and in which precision the models run (scores are float32).
        batch_size: images per detector forward and crops per CLIP forward.
    """

    name = "geneval"
    version = "1+geneval-style-hf-mask2former"  # the stand-in detector is part of the version: not official GenEval
    summary = ("GenEval-style (transformers Mask2Former), not the official mmdet weights: 1 if the image satisfies "
               "its GenEval prompt under GenEval's own rules (objects, exact counts, CLIP ViT-L-14 colours, relative "
               "positions), else 0.")
    higher_is_better = True
    deterministic = True
    differentiable = False
    score_range = "{0, 1}; the suite reports per-tag means and their unweighted mean (Overall)"
    paper = ("Ghosh et al. 2023, GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment, "
             "arXiv:2310.11513 (djghosh13/geneval @ af4902f)")
    weights_spec = (
        WeightsSpec(source=DETECTOR_REPO, license="other", option="detector", allow_patterns=DETECTOR_FILES),
        WeightsSpec(source=CLIP_REPO, filename=CLIP_FILE, license="MIT", option="clip"),
    )

    def __init__(self, detector: Any = None, clip: str | Path | None = None, clip_arch: str = CLIP_ARCH,
                 clip_quick_gelu: bool = CLIP_QUICK_GELU, color_classifier: Any = None,
                 object_names: str | Path | None = None, threshold: float = THRESHOLD,
                 counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
                 max_overlap: float = MAX_OVERLAP, position_threshold: float = POSITION_THRESHOLD,
                 bgcolor: str = BGCOLOR, jpeg_quality: int | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 16) -> None:
        if not (_is_spec_override(detector) or isinstance(detector, Detector)):
            raise ValueError(f"detector must be a folder, a hub id or an object with detect(images), got "
                             f"{type(detector).__name__}")
        if not (color_classifier is None or isinstance(color_classifier, ColorClassifierLike)):
            raise ValueError("color_classifier must have classify(image, detections, classname), got "
                             f"{type(color_classifier).__name__}")
        self.threshold, self.counting_threshold = float(threshold), float(counting_threshold)
        self.max_objects = positive_int("max_objects", max_objects)
        self.max_overlap, self.position_threshold = float(max_overlap), float(position_threshold)
        if jpeg_quality is not None and not 1 <= positive_int("jpeg_quality", jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be an integer in [1, 100], got {jpeg_quality!r}")
        self.jpeg_quality = None if jpeg_quality is None else int(jpeg_quality)
        self.clip_arch, self.clip_quick_gelu, self.bgcolor = clip_arch, bool(clip_quick_gelu), str(bgcolor)
        self.object_names = object_names
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self._detector_opt, self._clip_opt = detector, clip
        self._detector = None if _is_spec_override(detector) else detector
        self._colors = color_classifier
        det_spec, clip_spec = self.weights_spec
        used = list(cm.used_specs(self.weights_spec, {
            "detector": detector if _is_spec_override(detector) else None, "clip": clip}))
        if self._detector is not None:
            used[0] = replace(det_spec, source=f"python:{type(detector).__name__}", license=None, allow_patterns=())
        if self._colors is not None:
            used[1] = replace(clip_spec, source=f"python:{type(color_classifier).__name__}", filename=None,
                              license=None)
        self.weights_in_use = tuple(used)
        if self._detector is not None:  # another detector's numbers are another metric's: say so in the version
            self.version = f"{type(self).version}+detector-{type(detector).__name__}"

    # -- loading -------------------------------------------------------------------------------------------------

    def _resolve_clip(self) -> Path:
        path = resolve(self.weights_spec[1], reward=self.name, override=self._clip_opt)
        if path.is_dir():
            for name in CLIP_FILES:
                if (path / name).is_file():
                    return path / name
            raise WeightsNotAvailable(f"clip={str(self._clip_opt or path)!r} holds none of {', '.join(CLIP_FILES)}; "
                                      "pass the open_clip checkpoint file via clip=PATH.")
        return path

    def _load(self) -> tuple[Any, Any]:
        if self._detector is None:
            folder = resolve(self.weights_spec[0], reward=self.name, override=self._detector_opt)
            names = load_object_names(self.object_names)
            self._detector = Mask2FormerDetector(
                folder, names, min_score=min(self.threshold, self.counting_threshold), device=self.device,
                dtype=self.dtype, batch_size=self.batch_size)
        if self._colors is None:
            model = load_open_clip(self._resolve_clip(), self.clip_arch, quick_gelu=self.clip_quick_gelu)
            model = model.to(device=self.device, dtype=self.dtype)
            size = model.visual.image_size
            self._colors = ColorClassifier(
                model, _open_clip().get_tokenizer(self.clip_arch),
                clip_eval_transform(size[0] if isinstance(size, (tuple, list)) else int(size)),
                device=self.device, dtype=self.dtype, batch_size=self.batch_size, bgcolor=self.bgcolor)
        return self._detector, self._colors

    # -- inputs --------------------------------------------------------------------------------------------------

    @staticmethod
    def check_metadata(metadata: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> None:
        """Every record must be GenEval's (``tag`` and an ``include`` list of clauses with ``class`` and ``count``);
        with ``names``, every class must be one of them. Raises :class:`InputError` naming the image."""
        for i, meta in enumerate(metadata):
            missing = [k for k in ("tag", "include") if k not in meta]
            if missing:
                raise InputError(_NOT_GENEVAL.format(i=i, missing=" and ".join(repr(k) for k in missing)))
            include, exclude = meta["include"], meta.get("exclude", [])
            clauses = (list(include) + list(exclude) if all(isinstance(x, (list, tuple)) for x in (include, exclude))
                       else None)
            if clauses is None or not all(isinstance(c, Mapping) and "class" in c and "count" in c for c in clauses):
                raise InputError(f"image {i}'s GenEval metadata is malformed: every include/exclude clause needs "
                                 f"'class' and 'count' (got {meta['include']!r}).")
            if names is not None:
                unknown = sorted({c["class"] for c in clauses} - set(names))
                if unknown:
                    raise InputError(f"image {i}'s GenEval metadata names {', '.join(map(repr, unknown))}, not among "
                                     f"the detector's {len(names)} class names (GenEval's object_names.txt, e.g. "
                                     "'computer mouse', not COCO's 'mouse').")

    def to_pil(self, images: torch.Tensor) -> list:
        """The images as PIL RGB (uint8 as rlbench quantises), JPEG-round-tripped when ``jpeg_quality`` is set."""
        from PIL import Image

        from rlbench.utils.images import to_uint8

        out = [Image.fromarray(a) for a in to_uint8(images)]
        if self.jpeg_quality is not None:
            def jpeg(im):
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=self.jpeg_quality)
                buf.seek(0)
                return Image.open(buf).convert("RGB")
            out = [jpeg(im) for im in out]
        return out

    @classmethod
    def example_inputs(cls, batch_size: int = 3, image_size: int = 64, seed: int = 0
                       ) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Images with GenEval records (one per tag, cycled): what :func:`rlbench.check_reward` scores. The images
        are smooth random colour fields (blobs a detector can segment), seeded."""
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(batch_size, 3, 6, 6, generator=g)
        images = torch.nn.functional.interpolate(low, size=(image_size, image_size), mode="bicubic",
                                                 align_corners=False).clamp(0, 1)
        metadata = [dict(EXAMPLE_METADATA[i % len(EXAMPLE_METADATA)]) for i in range(batch_size)]
        return images, [m["prompt"] for m in metadata], metadata

    # -- scoring -------------------------------------------------------------------------------------------------

    def judge(self, images: torch.Tensor, metadata: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Per image: GenEval's verdict (``correct``, ``reason``) and Flow-GRPO's (``partial``, ``strict``) on the
        objects GenEval keeps; the colour of each instance set is classified once."""
        self.check_metadata(metadata)
        detector, colors = self._load()
        self.check_metadata(metadata, getattr(detector, "class_names", None))
        pils = self.to_pil(images)
        detected = detector.detect(pils)
        if len(detected) != len(pils):
            raise ValueError(f"the detector returned {len(detected)} results for {len(pils)} images")
        out = []
        for image, dets, meta in zip(pils, detected, metadata):
            objects = select_objects(dets, meta["tag"], threshold=self.threshold,
                                     counting_threshold=self.counting_threshold, max_objects=self.max_objects,
                                     max_overlap=self.max_overlap)
            seen: dict[tuple, list[str]] = {}

            def color_of(found, classname, image=image, seen=seen):
                key = (classname, tuple(id(d) for d in found))
                if key not in seen:
                    seen[key] = list(colors.classify(image, list(found), classname))
                return seen[key]

            correct, reason = evaluate(meta, objects, color_of, self.position_threshold)
            partial, strict = partial_credit(meta, objects, color_of, self.position_threshold)
            out.append({"tag": meta["tag"], "correct": bool(correct), "reason": reason, "partial": float(partial),
                        "strict": bool(strict), "counts": {k: len(v) for k, v in objects.items()}})
        return out

    def _info(self, verdicts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"tag": [v["tag"] for v in verdicts], "reason": [v["reason"] for v in verdicts],
                "correct": torch.tensor([v["correct"] for v in verdicts], dtype=torch.float32),
                "counts": [v["counts"] for v in verdicts]}

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        if images.shape[0] == 0:
            return RewardOutput(torch.zeros(0, dtype=torch.float32, device=images.device), {})
        verdicts = self.judge(images, metadata)
        scores = torch.tensor([1.0 if v["correct"] else 0.0 for v in verdicts], dtype=torch.float32)
        return RewardOutput(scores.to(images.device), self._info(verdicts))


class GenEvalPartial(GenEval):
    """Flow-GRPO's GenEval training reward: the mean of per-clause partial-credit terms on GenEval's detections
    (reward-server ``gen_eval.py`` ``evaluate_reward`` L201-264, quirks included; GenEval-style detector).

    Same options as :class:`GenEval`. ``info["strict"]`` is Flow-GRPO's strict verdict (every clause exact, exclude
    clauses ignored), ``info["correct"]`` GenEval's official one.
    """

    name = "geneval-partial"
    version = "1+geneval-style-hf-mask2former"
    summary = ("GenEval-style (transformers Mask2Former), not the official mmdet weights: Flow-GRPO's partial-credit "
               "GenEval reward, the mean of per-clause terms (count 1 - |n - N| / n, colour and position credit) on "
               "GenEval's detections, with Flow-GRPO's quirks.")
    score_range = ("[-14, 1] at max_objects=16 (the count term 1 - |n - N| / n is negative when N > 2n); 1 = every "
                   "clause exact")
    paper = ("Liu et al. 2025, Flow-GRPO: Training Flow Matching Models via Online RL, arXiv:2505.05470 "
             "(yifan123/reward-server gen_eval.py); GenEval, Ghosh et al. 2023, arXiv:2310.11513")

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        if images.shape[0] == 0:
            return RewardOutput(torch.zeros(0, dtype=torch.float32, device=images.device), {})
        verdicts = self.judge(images, metadata)
        info = self._info(verdicts)
        info["strict"] = torch.tensor([v["strict"] for v in verdicts], dtype=torch.float32)
        scores = torch.tensor([v["partial"] for v in verdicts], dtype=torch.float32)
        return RewardOutput(scores.to(images.device), info)


__all__ = ["BGCOLOR", "COLOR_TEMPLATES", "ColorClassifier", "ColorClassifierLike", "Detector", "EXAMPLE_METADATA",
           "GenEval", "GenEvalPartial", "Mask2FormerDetector", "clip_eval_transform", "detections_from_instances",
           "load_object_names", "load_open_clip"]
