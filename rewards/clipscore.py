"""``clipscore``: CLIPScore as torchmetrics defines it, one score per image.

torchmetrics ``multimodal.CLIPScore`` (``functional/multimodal/clip_score.py``)::

    CLIPScore(I, C) = max(100 * cos(E_I, E_C), 0)

with a transformers CLIP (default ``openai/clip-vit-large-patch14``) and that repo's ``CLIPProcessor``:

* images: torchmetrics (``_get_features``) hands uint8-range tensors to the ``CLIPProcessor``, i.e.
  transformers' ``CLIPImageProcessor`` with the repo's ``preprocessor_config.json``: the *short* side
  resized to 224, PIL bicubic, the long side ``int(224 * long / short)``
  (``image_transforms.get_resize_output_image_size``), a 224 centre crop at the *floored* offset
  ``(H - 224) // 2`` (``image_transforms.center_crop``), rescale 1/255, CLIP mean/std; rlbench quantises its
  [0, 1] floats to uint8 and applies the same arithmetic (PIL, see :mod:`rlbench.nets.clip`; checked on
  odd-offset non-square images in ``tests/test_zoo_preprocessing.py``, issue 18's audit: no discrepancy);
  the float differentiable path (same crop rule) when ``images.requires_grad``;
* text: ``processor(text=..., padding=True)`` *without* truncation, then the ids are cut at the text
  model's ``max_position_embeddings`` (77) — torchmetrics' own truncation, which drops the end token
  of over-long captions; reproduced so scores equal torchmetrics' on every prompt.

One difference on purpose: torchmetrics' metric averages over its inputs and clamps the *mean* at 0;
a reward needs one score per image, so the clamp is applied per image (what torchmetrics returns for a
batch of one). ``info["unclamped"]`` holds ``100 * cos`` per image: ``max(mean(unclamped), 0)`` is
torchmetrics' value over the batch. Not Hessel et al.'s CLIP-S (``2.5 * max(cos, 0)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlbench.nets import clip as cm
from rlbench.nets.options import parse_batch_size, parse_device, parse_dtype
from rlbench.reward import Reward, RewardOutput
from rlbench.weights import WeightsSpec, resolve

SCALE = 100.0  # torchmetrics clip_score.py: score = 100 * (img * txt).sum(-1)


class CLIPScore(Reward):
    """CLIPScore (torchmetrics): ``max(100 * cos(image, prompt), 0)`` with OpenAI CLIP ViT-L/14.

    Args:
        weights: the CLIP (transformers ``CLIPModel`` folder with its processor files, or hub id);
            default ``openai/clip-vit-large-patch14`` (torchmetrics' default).
        device: where the model runs; it moves there on the first call, never at construction.
        dtype: model dtype, ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``; scores are float32.
        batch_size: images (and distinct prompts) per forward.
    """

    name = "clipscore"
    version = "1"
    summary = "CLIPScore as torchmetrics defines it: max(100 * cos(image, prompt), 0) with OpenAI CLIP ViT-L/14."
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = "[0, 100]; typical ~20-35 (noise vs a caption ~20-25)"
    paper = ("Hessel et al. 2021, CLIPScore, arXiv:2104.08718, in torchmetrics' form (x100, no 2.5 weight); "
             "CLIP, Radford et al. 2021, arXiv:2103.00020")
    weights_spec = WeightsSpec(source="openai/clip-vit-large-patch14", license="MIT", option="weights",
                               allow_patterns=cm.HF_CLIP_FILES)

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 32) -> None:
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self.override = weights
        self.weights_in_use = cm.used_specs((self.weights_spec,), {"weights": weights})[0]
        self._model = self._tokenizer = self._pixels = None

    def _load(self):
        if self._model is None:
            folder = resolve(self.weights_spec, reward=self.name, override=self.override)
            self._model, self._tokenizer, self._pixels = cm.load_hf_clip_with_processor(
                folder, folder, processor_option="weights", device=self.device, dtype=self.dtype)
        return self._model, self._tokenizer, self._pixels

    def tokenize(self, prompts: list[str]) -> dict:
        """torchmetrics ``_get_features``: pad to the longest, no truncation, then cut the ids at the
        text model's ``max_position_embeddings``."""
        tokens = self._tokenizer(prompts, padding=True, return_tensors="pt")
        limit = self._model.config.text_config.max_position_embeddings
        return {k: tokens[k][..., :limit] for k in ("input_ids", "attention_mask")}

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        if images.shape[0] == 0:
            return RewardOutput(torch.zeros(0, dtype=torch.float32, device=images.device), {})
        model, _, pixels = self._load()
        txt = cm.text_features(model, self.tokenize, prompts, self.batch_size, self.device)
        img = cm.image_features(model, pixels, images, self.batch_size, self.device, self.dtype)
        raw = SCALE * cm.cosine(img, txt)
        return RewardOutput(raw.clamp(min=0.0).to(images.device), {"unclamped": raw.detach().cpu()})
