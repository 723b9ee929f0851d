"""``hpsv2``: Human Preference Score v2 / v2.1 (Wu et al. 2023), an open_clip ViT-H-14 fine-tuned on HPD v2.

Score of an image and its own prompt, as ``hpsv2.score`` computes it (tgxs002/HPSv2 ``hpsv2/img_score.py``)::

    score = cos(image_features, text_features)      # raw cosine: no logit scale (the benchmark reports x100)

* model: open_clip ``ViT-H-14`` built with ``open_clip.create_model(arch, pretrained=None)`` and the
  HPS checkpoint (``xswu/HPSv2`` files ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt``,
  ``hpsv2/utils.py`` ``hps_version_map``; a ``{'state_dict': ...}`` dict) loaded strictly;
* text: open_clip's tokenizer of the architecture (CLIP BPE, context 77, end token kept on truncation);
* images: HPSv2's ``preprocess_val``. ``hpsv2.score`` and ``hpsv2.evaluate`` build it with
  ``create_model_and_transforms(..., light_augmentation=True)`` (``hpsv2/img_score.py`` L20-38,
  ``hpsv2/evaluation.py`` L227-240), which makes its open_clip fork use
  ``image_transform(..., resize_longest_max=True)`` (``hpsv2/src/open_clip/factory.py`` L368-376), i.e.
  (``transform.py`` L141-157) ``ToTensor`` (uint8 / 255) -> ``ResizeMaxSize(224)`` *on the tensor* ->
  ``Normalize(OPENAI mean/std)``. ``ResizeMaxSize`` (``transform.py`` L26-49): ``scale = 224 /
  float(max(h, w))``; if ``scale != 1``, resize to ``(round(h * scale), round(w * scale))`` (Python
  ``round``, half to even) with torchvision's ``F.resize(..., BICUBIC)`` and zero-pad to 224x224 with
  ``F.pad(padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)``. No crop:
  the whole image is seen, letterboxed. The pad value 0 is applied in [0, 1] pixel space *before*
  ``Normalize`` (black borders: ``-mean / std`` after normalisation). rlbench applies the same
  torchvision functions to the whole uint8-quantised batch at once (:func:`hps_pixels`). The tensor resize
  antialiases (torchvision >= 0.17 default); torchvision < 0.17 resized tensors without antialiasing, so
  numbers computed then differ slightly. (The fork's other branch, short side to 224 + ``CenterCrop``, is
  its ``light_augmentation=False`` default, which HPSv2's scoring code does not use; rlbench used it up to
  reward version 1, which therefore differs from ``hpsv2.score`` on non-square images.)

  One deliberate difference: when the longer side is already 224 (``scale == 1``) ``ResizeMaxSize``
  returns the image untouched, unpadded, so ``hpsv2.score`` feeds e.g. a 224x160 tensor to the ViT and
  fails (its positional embedding has 16x16 + 1 positions). rlbench pads such images to 224x224 like every
  other size (no resize needed): the limit of the official output as the long side tends to 224, and the
  only input the model accepts. Square 224x224 images are unchanged either way.
* differentiable path (``images.requires_grad`` under grad mode): the same resize/pad/normalise on the
  float images without the uint8 quantisation, so gradients reach the pixels.

``version="v2.1"`` (default; as ``hpsv2.evaluate``) or ``"v2.0"`` (``hpsv2.score``'s default). Scores of
the two versions are not comparable; within a version, only between images of the same prompt (HPSv2#9).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rlbench.errors import ConfigError, DependencyNotInstalled, WeightsNotAvailable
from rlbench.nets import clip as cm
from rlbench.nets.options import parse_batch_size, parse_device, parse_dtype
from rlbench.nets.preprocess import CLIP_MEAN, CLIP_SIZE, CLIP_STD, letterbox_padding, letterbox_shape
from rlbench.reward import Reward
from rlbench.utils.images import quantize
from rlbench.weights import WeightsSpec, resolve

# hpsv2/utils.py hps_version_map
HPS_FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}
HPS_REPO = "xswu/HPSv2"
DEFAULT_ARCH = "ViT-H-14"  # hpsv2/img_score.py initialize_model: create_model_and_transforms('ViT-H-14', ...)


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # a core dependency; only a broken install gets here
        raise DependencyNotInstalled("the hpsv2 reward needs open_clip: pip install open_clip_torch") from exc
    return open_clip


def hps_pixels(images: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """HPSv2 ``preprocess_val`` (``light_augmentation=True``) on a batch ``(B, 3, H, W)`` in [0, 1]: uint8
    quantisation (``exact``; skipped on the differentiable path), then torchvision's tensor ``resize`` of
    the longer side to 224 (bicubic, antialias), zero padding to 224x224 in pixel space (``ResizeMaxSize``)
    and ``normalize`` with the OpenAI CLIP mean/std. A long side of exactly 224 is padded, not resized
    (see the module docstring)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = quantize(images) / 255 if exact else images.float()  # PIL image -> ToTensor
    h, w = x.shape[-2:]
    nh, nw = letterbox_shape(h, w, CLIP_SIZE)
    if (nh, nw) != (h, w):
        x = TF.resize(x, [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if (nh, nw) != (CLIP_SIZE, CLIP_SIZE):
        x = TF.pad(x, letterbox_padding(nh, nw, CLIP_SIZE), fill=0.0)  # ResizeMaxSize fill=0, before Normalize
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def load_hps_model(path: Path, arch: str):
    """``open_clip.create_model(arch, pretrained=None)`` with the checkpoint's state dict, strictly."""
    open_clip = _open_clip()
    ckpt = cm.load_tensors(path, "weights")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise WeightsNotAvailable(f"{path} is not an HPSv2 checkpoint (a dict with 'state_dict').")
    previous = logging.root.manager.disable  # open_clip warns "initialized randomly" before we load the weights
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        logging.disable(previous)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsNotAvailable(
            f"{path} does not fit the open_clip architecture {arch!r} (HPSv2 checkpoints are ViT-H-14): "
            + " ".join(str(exc).split())
        ) from exc
    return model


class HPSv2(Reward):
    """HPS v2.1 (or v2.0): raw cosine of image and prompt features of an open_clip ViT-H-14 fine-tuned on HPD v2.

    Args:
        weights: the HPS checkpoint (local ``.pt`` file, or a hub repo holding it); default
            ``xswu/HPSv2`` file of ``version``.
        version: ``"v2.1"`` (default) or ``"v2.0"``.
        arch: the open_clip model config the checkpoint belongs to (default ``"ViT-H-14"``).
        device: where the model runs; it moves there on the first call, never at construction.
        dtype: model dtype, ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``; scores are float32.
        batch_size: images (and distinct prompts) per forward.
    """

    name = "hpsv2"
    # 2: HPSv2's letterbox (ResizeMaxSize) instead of v1's short-side resize + centre crop; scores of
    # non-square images changed (square ones did not). Issue 18.
    version = "2"
    summary = ("Human Preference Score v2.1 (v2.0 by option): raw cosine of image and prompt features of an "
               "open_clip ViT-H-14 fine-tuned on human preference pairs (HPD v2); images letterboxed (long side "
               "224, zero padding) as hpsv2.score's preprocess_val.")
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = ("[-1, 1] raw cosine; typical 0.23-0.29 (v2.0), up to ~0.33 (v2.1); benchmark tables report "
                   "x100; comparable only between images of the same prompt and version")
    paper = ("Wu et al. 2023, Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of "
             "Text-to-Image Synthesis, arXiv:2306.09341")
    weights_spec = WeightsSpec(source=HPS_REPO, filename=HPS_FILES["v2.1"], license="Apache-2.0", option="weights")

    def __init__(self, weights: str | Path | None = None, version: str = "v2.1", arch: str = DEFAULT_ARCH,
                 device: str = "cpu", dtype: str = "float32", batch_size: int = 32) -> None:
        if version not in HPS_FILES:
            raise ValueError(f"version must be one of {', '.join(HPS_FILES)}, got {version!r}")
        open_clip = _open_clip()
        if arch not in open_clip.list_models():
            raise ConfigError(f"arch {arch!r} is not an open_clip model config (open_clip.list_models()); "
                              f"HPSv2 checkpoints are {DEFAULT_ARCH!r}.")
        self.hps_version, self.arch = version, arch
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self.override = weights
        self.weights_in_use = cm.used_specs((self._version_spec(),), {"weights": weights})[0]
        self._model = self._tokenizer = None

    def _version_spec(self) -> WeightsSpec:
        """The declared spec with the file of the chosen version (what is resolved, overrides aside)."""
        return replace(self.weights_spec, filename=HPS_FILES[self.hps_version])

    def _resolve(self) -> Path:
        spec = self._version_spec()
        try:
            path = resolve(spec, reward=self.name, override=self.override)
        except WeightsNotAvailable as exc:
            if spec.filename == self.weights_spec.filename:
                raise
            raise WeightsNotAvailable(
                f"{exc} (`rlbench rewards download {self.name}` fetches the default {HPS_FILES['v2.1']}; for "
                f"version {self.hps_version} fetch `hf download {HPS_REPO} {spec.filename}`.)"
            ) from exc
        if path.is_dir():  # a hub repo id given as override: its snapshot folder
            path = path / spec.filename
            if not path.is_file():
                raise WeightsNotAvailable(f"weights={self.override!r} holds no {spec.filename}.")
        return path

    def _load(self):
        if self._model is None:
            model = load_hps_model(self._resolve(), self.arch)
            self._model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
            self._tokenizer = _open_clip().get_tokenizer(self.arch)
        return self._model, self._tokenizer

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> torch.Tensor:
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        model, tokenizer = self._load()
        img, txt = cm.open_clip_features(model, tokenizer, lambda x, grad: hps_pixels(x, exact=not grad), images,
                                         prompts, self.batch_size, self.device, self.dtype)
        return cm.cosine(img, txt).to(images.device)
