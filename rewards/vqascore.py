"""``vqascore``: VQAScore on Qwen2.5-VL, P("Yes" | image, "Does this image show "{prompt}"?").

VQAScore (Lin et al. 2024) asks a vision-language model whether the image shows the prompt and reads the
probability of the answer "Yes" (linzhiqiu/t2v_metrics). This reward does it in one forward of
``Qwen2_5_VLForConditionalGeneration`` (default ``Qwen/Qwen2.5-VL-7B-Instruct``) through its ``AutoProcessor``:

1. the image goes through qwen_vl_utils' resize (:func:`rlbench.nets.vlm.qwen_fetch_resize`: sides rounded to
   multiples of 28, pixel count in [``min_pixels``, ``max_pixels``], PIL bicubic), as ``process_vision_info`` in
   t2v_metrics' ``qwen2vl_model.py``; then the processor (its own resize is then a no-op);
2. one user turn, the image then the question, through the processor's chat template with
   ``add_generation_prompt=True`` (Qwen's default system turn included, as ``apply_chat_template`` writes it);
3. the softmax (float32) over the vocabulary at the last position, the probability of the token id of "Yes"
   (resolved from the tokenizer, which must encode "Yes" as one token; t2v_metrics: ``tokenizer.encode("Yes")[0]``).

Templates (``template=``): ``"t2v-metrics-3.0-qwen2vl"`` (default): t2v_metrics 3.0's Qwen2-VL path,
``'Does this image show "{}"?'`` (``qwen2vl_model.py`` ``forward`` ``question_template``);
``"t2v-metrics-3.1-qwen2vl"``: HEAD v3.1's ``'Does this figure show "{}"? Please answer Yes or No.'``; or any
string with one ``{}``. The template and the backbone are part of ``version``: scores of different templates or
backbones are different metrics.

How it differs from t2v_metrics' numbers:

* t2v_metrics reads P(Yes) off ``generate(max_new_tokens=1, do_sample=False, output_scores=True).scores[0]``, i.e.
  after the checkpoint's ``generation_config`` logits processors; under greedy decoding that is its repetition
  penalty (the tokens of the prompt, image pads included, pushed down). Default here: the plain model
  distribution (``repetition_penalty=1.0``); ``repetition_penalty="checkpoint"`` applies the checkpoint's value
  as that ``generate`` call does (a number applies that penalty).
* t2v_metrics scores one image at a time; here batches are left-padded (``batch_size``), equal up to float noise.
* v3.1 scores the geometric mean of the answer tokens' probabilities; "Yes" is a single token, so with the v3.1
  template that is the same P("Yes") (whether v3.1 also scores an end-of-turn token was not checked).
* dtype: bfloat16 on CUDA (t2v_metrics: bfloat16 with flash-attention 2), float32 elsewhere.

Deterministic; not differentiable (the images go through PIL and the HF processor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlbench.errors import ConfigError
from rlbench.nets.clip import used_specs
from rlbench.nets.options import parse_batch_size, parse_device
from rlbench.nets.vlm import (GENERIC_VLM_PATTERNS, QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, TransformersDescriber,
                              backbone_of, qwen_fetch_resize)
from rlbench.reward import Reward, RewardOutput
from rlbench.weights import WeightsSpec

QWEN25_VL_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
# Templates by id: t2v_metrics 3.0 t2v_metrics/models/vqascore_models/qwen2vl_model.py (forward's default
# question_template); HEAD v3.1 (6ecb74f) qwen2vl_model.py L169-289 (reference eval-suites.md §3.2).
TEMPLATES = {
    "t2v-metrics-3.0-qwen2vl": 'Does this image show "{}"?',
    "t2v-metrics-3.1-qwen2vl": 'Does this figure show "{}"? Please answer Yes or No.',
}
DEFAULT_TEMPLATE = "t2v-metrics-3.0-qwen2vl"
ANSWER = "Yes"  # t2v_metrics qwen2vl_model.py forward: answer_template "Yes"


def template_of(template: str) -> tuple[str, str]:
    """(id, text) of a template given by id (:data:`TEMPLATES`) or as a string with one ``{}``."""
    if template in TEMPLATES:
        return template, TEMPLATES[template]
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)} or a question with one '{{}}' where the "
                         f"prompt goes, got {template!r}")
    return "custom-" + hashlib.sha256(template.encode("utf-8")).hexdigest()[:8], template


def answer_token_id(tokenizer: Any, answer: str, where: str) -> int:
    """The id of ``answer``, which must be one token (as t2v_metrics' ``tokenizer.encode(answer)[0]`` assumes)."""
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"the tokenizer of {where} encodes {answer!r} as {len(ids)} tokens {ids}; VQAScore reads "
                          "the probability of a single answer token. Use a Qwen2.5-VL checkpoint's tokenizer.")
    return int(ids[0])


def _penalty(value: float | str) -> float | str:
    if value == "checkpoint":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
        raise ValueError(f"repetition_penalty must be a number > 0 or 'checkpoint', got {value!r}")
    return float(value)


class VQAScore(Reward):
    """VQAScore: P("Yes") of Qwen2.5-VL asked whether the image shows the prompt (t2v_metrics' Qwen2-VL path).

    Args:
        weights: hub id or local folder of a Qwen2.5-VL checkpoint (model + processor with its chat template);
            default ``Qwen/Qwen2.5-VL-7B-Instruct``.
        template: ``"t2v-metrics-3.0-qwen2vl"`` (default, ``'Does this image show "{}"?'``),
            ``"t2v-metrics-3.1-qwen2vl"``
            (``'Does this figure show "{}"? Please answer Yes or No.'``) or a question with one ``{}``.
        repetition_penalty: 1.0 (default): the model's own distribution; ``"checkpoint"``: the checkpoint's
            ``generation_config.repetition_penalty``, as t2v_metrics' ``generate`` scores; or a number.
        min_pixels, max_pixels: bounds of qwen_vl_utils' resize (defaults 4*28*28 and 16384*28*28, its own);
            lower ``max_pixels`` to bound the cost of large images on a CPU.
        batch_size: images per forward (left-padded).
        device, dtype: where / in which precision the model runs (dtype default: bfloat16 on CUDA, float32 elsewhere).
    """

    name = "vqascore"
    version = "1"  # the instance's version adds the template id and the backbone
    summary = 'VQAScore: P("Yes") of Qwen2.5-VL-7B-Instruct asked \'Does this image show "{prompt}"?\' (t2v_metrics).'
    higher_is_better = True
    deterministic = True
    differentiable = False
    score_range = "[0, 1], a probability"
    paper = ("VQAScore, Lin et al. 2024, arXiv:2404.01291 (t2v_metrics); Qwen2.5-VL, Bai et al. 2025, "
             "arXiv:2502.13923")
    # Qwen/Qwen2.5-VL-7B-Instruct: Apache-2.0 (reference eval-suites.md §6).
    weights_spec = WeightsSpec(source=QWEN25_VL_7B, license="Apache-2.0", option="weights",
                               allow_patterns=GENERIC_VLM_PATTERNS)
    extra = None

    def __init__(self, weights: str | Path | None = None, template: str = DEFAULT_TEMPLATE,
                 repetition_penalty: float | str = 1.0, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS, batch_size: int = 8, device: str = "cpu",
                 dtype: str | None = None) -> None:
        self.template_id, self.template = template_of(template)
        self.repetition_penalty = _penalty(repetition_penalty)
        self.batch_size = parse_batch_size(batch_size)
        device_ = parse_device(device)
        self.vlm = TransformersDescriber(
            weights, batch_size=self.batch_size, device=device_,
            dtype=dtype if dtype is not None else ("bfloat16" if device_.type == "cuda" else "float32"),
            jpeg_quality=None, reward=self.name, option="weights", spec=self.weights_spec,
            image_resize=qwen_fetch_resize(min_pixels, max_pixels))
        self.weights_in_use = used_specs((self.weights_spec,), {"weights": weights})[0]
        parts = [type(self).version, self.template_id, backbone_of(weights, QWEN25_VL_7B)]
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition-penalty-{self.repetition_penalty}")
        self.version = "+".join(parts)
        self._yes: int | None = None

    def question(self, prompt: str) -> str:
        return self.template.format(prompt)

    def answer_id(self) -> int:
        """The token id of "Yes" in the checkpoint's tokenizer (checked to be one token)."""
        if self._yes is None:
            _, processor = self.vlm.load()
            self._yes = answer_token_id(processor.tokenizer, ANSWER, self.vlm.model_name or QWEN25_VL_7B)
        return self._yes

    def penalty(self) -> float:
        """The repetition penalty applied to the logits (the checkpoint's for ``"checkpoint"``)."""
        if self.repetition_penalty == "checkpoint":
            model, _ = self.vlm.load()
            return float(getattr(model.generation_config, "repetition_penalty", None) or 1.0)
        return float(self.repetition_penalty)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        yes = self.answer_id()
        probs = self.vlm.next_token_probs(images, [self.question(p) for p in prompts],
                                          repetition_penalty=self.penalty())
        scores = probs[:, yes] if probs.numel() else torch.zeros(0)
        return RewardOutput(scores.float().to(images.device), {"template": self.template_id})
