"""``pickscore``: PickScore v1 (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences.

Score of an image and its own prompt, as in the PickScore README "Inference with PickScore" (and
flow_grpo ``pickscore_scorer.py``, which takes the diagonal for one prompt per image)::

    score = model.logit_scale.exp() * cos(image_embeds, text_embeds)

* model: transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` (option ``weights``);
* processor: the one of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (option ``processor``; README L55-58
  ``AutoProcessor.from_pretrained``): text ``padding=True, truncation=True, max_length=77``; images as the
  README's ``processor(images=...)`` (L64-70), i.e. transformers' ``CLIPImageProcessor`` with the settings of
  the repo's ``preprocessor_config.json`` (PIL arithmetic, see :mod:`rlbench.nets.clip`): the *short* side
  resized to 224 with PIL bicubic, the long side ``int(224 * long / short)``
  (``image_transforms.get_resize_output_image_size``), a 224 centre crop at the *floored* offset
  ``(H - 224) // 2`` (``image_transforms.center_crop``), rescale 1/255, CLIP mean/std. Checked against the
  processor on odd-offset non-square images in ``tests/test_zoo_preprocessing.py`` (issue 18's audit: no
  discrepancy). The float differentiable path (:func:`rlbench.nets.preprocess.clip_pixels`, same crop rule)
  when ``images.requires_grad``.

No softmax: the README's probabilities compare candidates of one prompt; an RL reward scores each
image against its own prompt. Typical values: ~21-24 for SD3.5-class images (DiffusionNFT#35 via the
rlbench reference); only comparable between images of the same prompt.
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

MODEL_FILES = ("config.json", "model.safetensors")
# Only the processor/tokenizer files of the LAION repo (and its small config.json, which makes
# AutoProcessor build a CLIPProcessor from the snapshot, as the README does), not its several-GB weights.
PROCESSOR_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")
MAX_LENGTH = cm.CLIP_CONTEXT  # PickScore README: processor(text=..., truncation=True, max_length=77)


class PickScore(Reward):
    """PickScore v1: ``logit_scale.exp() * cos(image, prompt)`` of a CLIP-H fine-tuned on human picks.

    Args:
        weights: the PickScore ``CLIPModel`` (local folder or hub id); default ``yuvalkirstain/PickScore_v1``.
        processor: the processor/tokenizer folder or hub id; default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
        device: where the model runs; it moves there on the first call, never at construction.
        dtype: model dtype, ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``; scores are float32.
        batch_size: images (and distinct prompts) per forward.
    """

    name = "pickscore"
    version = "1"
    summary = ("PickScore v1: logit_scale.exp() * cosine of image and prompt embeddings of a CLIP-ViT-H/14 "
               "fine-tuned on Pick-a-Pic human preferences.")
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = ("[-s, s] with s = logit_scale.exp() (CLIP caps it at 100); typical ~21-24 for SD3.5-class "
                   "images, lower for weaker models; comparable only between images of the same prompt")
    paper = ("Kirstain et al. 2023, Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image "
             "Generation, arXiv:2305.01569")
    weights_spec = (
        WeightsSpec(source="yuvalkirstain/PickScore_v1", license="MIT (PickScore code)", option="weights",
                    allow_patterns=MODEL_FILES),
        WeightsSpec(source="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", license="MIT", option="processor",
                    allow_patterns=PROCESSOR_FILES),
    )

    def __init__(self, weights: str | Path | None = None, processor: str | Path | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32) -> None:
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self.overrides = {"weights": weights, "processor": processor}
        self.weights_in_use = cm.used_specs(self.weights_spec, self.overrides)
        self._model = self._tokenizer = self._pixels = None

    def _load(self):
        if self._model is None:
            model_spec, proc_spec = self.weights_spec
            folder = resolve(model_spec, reward=self.name, override=self.overrides["weights"])
            proc = resolve(proc_spec, reward=self.name, override=self.overrides["processor"])
            self._model, self._tokenizer, self._pixels = cm.load_hf_clip_with_processor(
                folder, proc, processor_option="processor", device=self.device, dtype=self.dtype)
        return self._model, self._tokenizer, self._pixels

    def tokenize(self, prompts: list[str]) -> dict:
        """The README's text processing: ``padding=True, truncation=True, max_length=77``."""
        return self._tokenizer(prompts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        if images.shape[0] == 0:
            return RewardOutput(torch.zeros(0, dtype=torch.float32, device=images.device), {})
        model, _, pixels = self._load()
        txt = cm.text_features(model, self.tokenize, prompts, self.batch_size, self.device)
        img = cm.image_features(model, pixels, images, self.batch_size, self.device, self.dtype)
        cos = cm.cosine(img, txt)
        scores = model.logit_scale.detach().float().exp() * cos
        return RewardOutput(scores.to(images.device), {"cosine": cos.detach().cpu()})
