"""``unifiedreward``: UnifiedReward-qwen-7b's point score of an image for its caption, divided by 5.

UnifiedReward (Wang et al. 2025) fine-tunes Qwen2.5-VL-Instruct into a judge. Its point-score script for image
generation (CodeGoat24/UnifiedReward ``inference_qwen/image_generation/qwen_point_score_image_generation.py``,
read at ed52f98) asks ``CodeGoat24/UnifiedReward-qwen-7b`` the :data:`QUESTION` below about the image (one user
turn: the image, then the text, through the processor's chat template with ``add_generation_prompt=True``;
the image through qwen_vl_utils' ``process_vision_info``) and ``generate(**inputs, max_new_tokens=512)``. Flow-GRPO
reads the score off the answer with the regex ``Final Score:\\s*([1-5](?:\\.\\d+)?)`` and divides it by 5
(yifan123/flow_grpo ``flow_grpo/rewards.py`` ``unifiedreward_score_sglang``, which uses this recipe for the
LLaVA-based UnifiedReward-7b-v1.5 with the same question minus the key-elements line).

This reward, step by step:

1. images quantised to uint8 (``(x * 255).round()``) and resized to 512x512 with PIL's default (bicubic) filter,
   as Flow-GRPO's client ``unifiedreward_score_sglang`` does before sending PNG (lossless, so skipped here);
   ``resize=None`` skips it;
2. qwen_vl_utils' resize (:func:`rlbench.nets.vlm.qwen_fetch_resize`; 512 -> 504) and the processor, as the
   official script; the question of :data:`QUESTION` with the prompt;
3. greedy decoding (``do_sample=False``: Flow-GRPO's ``temperature=0``), ``max_new_tokens=512`` (the script's);
   other decoding settings (a repetition penalty, if any) come from the checkpoint's ``generation_config.json``,
   as in the script's plain ``generate`` call;
4. the first match of :data:`SCORE_PATTERN` -> float, reward = score / 5.

**Unparsable answers are never scored.** Flow-GRPO scores an answer without a match as 0.0 (a silent, maximal
penalty indistinguishable from a terrible image); here each such image is re-asked up to ``retries`` times
(default 2) with seeded sampling at temperature 0.7 (the seed is a hash of the image's uint8 pixels, the question
and the attempt number, so the reward stays deterministic and each image's score depends only on itself), and if
some still do not parse the call raises :class:`rlbench.errors.RewardFailed` naming how many and showing one raw
answer. ``info["reasks"]`` counts the re-asks of the call, ``info["answers"]`` holds the answers scored.

Batches: the transformers judge decodes ``batch_size`` left-padded images at once. In float32 a batch answers as
its images one at a time do; in bfloat16 on a GPU, padding can tip a near-tie of greedy decoding, so an answer
(and its score) may depend on its batch there; ``batch_size=1`` rules that out at a cost in speed.

The judge is pluggable (``backend=``): any object with ``generate(images, questions, *, temperature=0.0,
seed=None) -> list[str]`` (``images`` float (B, 3, H, W) in [0, 1], already resized; a sampled call gets one image).
The default runs the checkpoint in this process (:class:`rlbench.nets.vlm.TransformersDescriber`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlbench.errors import RewardFailed
from rlbench.nets.clip import used_specs
from rlbench.nets.options import parse_batch_size, parse_device, positive_int
from rlbench.nets.vlm import (GENERIC_VLM_PATTERNS, QWEN_MAX_PIXELS, QWEN_MIN_PIXELS, TransformersDescriber,
                              backbone_of, qwen_fetch_resize)
from rlbench.reward import Reward, RewardOutput
from rlbench.utils.images import to_uint8
from rlbench.weights import WeightsSpec

UNIFIEDREWARD_QWEN_7B = "CodeGoat24/UnifiedReward-qwen-7b"
# CodeGoat24/UnifiedReward inference_qwen/image_generation/qwen_point_score_image_generation.py (ed52f98), the text
# of the user turn, verbatim; {prompt} is the caption.
QUESTION = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this image "
    "based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, "
    "color accuracy, and overall aesthetic appeal.\n"
    "Extract key elements from the provided text caption, evaluate their presence in the generated image using the "
    "format: 'element (type): value' (where value=0 means not generated, and value=1 means generated), and assign "
    "a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]"
)
SCORE_PATTERN = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")  # flow_grpo rewards.py unifiedreward_score_sglang
SCORE_SCALE = 5.0  # flow_grpo rewards.py unifiedreward_score_sglang: score = [sc / 5.0 for sc in score]
MAX_NEW_TOKENS = 512  # qwen_point_score_image_generation.py: model.generate(**inputs, max_new_tokens=512)
IMAGE_SIZE = 512  # flow_grpo rewards.py unifiedreward_score_sglang: Image.fromarray(image).resize((512, 512))
RETRY_TEMPERATURE = 0.7  # rlbench's re-ask policy (no upstream counterpart: Flow-GRPO scores a miss as 0.0)
RAW_SHOWN = 300  # characters of a failed answer shown in the error


def question(prompt: str) -> str:
    """The judge's question for one caption (:data:`QUESTION`)."""
    return QUESTION.format(prompt=prompt)


def parse_score(text: str) -> float | None:
    """The first ``Final Score: N`` of an answer (N in 1-5 with optional decimals), or None when there is none.
    Flow-GRPO's regex, so its quirks too: "Final Score: 10" reads 1, "Final Score: 5.5" reads 5.5."""
    match = SCORE_PATTERN.search(text)
    return float(match.group(1)) if match else None


def retry_seed(image_u8: bytes, question_text: str, attempt: int) -> int:
    """The sampling seed of re-ask ``attempt`` (1, 2, ...) of one image: a hash of its pixels, question, attempt."""
    digest = hashlib.sha256(image_u8 + b"\0" + question_text.encode("utf-8") + b"\0" + str(attempt).encode())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


class UnifiedReward(Reward):
    """UnifiedReward-qwen-7b's 1-5 point score of image-caption alignment and quality, divided by 5.

    Args:
        weights: hub id or local folder of a UnifiedReward-qwen checkpoint (Qwen2.5-VL format with its processor);
            default ``CodeGoat24/UnifiedReward-qwen-7b``.
        backend: the judge: ``"transformers"`` (default, the checkpoint in this process) or an object with
            ``generate(images, questions, *, temperature=0.0, seed=None) -> list[str]``.
        retries: re-asks of an image whose answer has no score, with seeded sampling at temperature 0.7
            (default 2; 0: fail at once). Images still without a score raise RewardFailed.
        resize: side of the square resize before the judge (default 512, Flow-GRPO's client); None: none.
        max_new_tokens: answer length cap (default 512, the official script's).
        min_pixels, max_pixels: bounds of qwen_vl_utils' resize (its defaults).
        batch_size: images per ``generate`` call of the transformers judge (left-padded).
        device, dtype: where / in which precision the judge runs (dtype default: bfloat16 on CUDA, float32 elsewhere).
    """

    name = "unifiedreward"
    version = "1"  # the instance's version adds the judge
    summary = ("UnifiedReward-qwen-7b's 1-5 point score for caption alignment and image quality, / 5 "
               "(Flow-GRPO's regex; unparsable answers are re-asked, never scored 0).")
    higher_is_better = True
    deterministic = True  # greedy; re-asks sample with seeds derived from the image and question
    differentiable = False
    score_range = ("[0.2, 1] for answers 'Final Score: 1'..'5'; Flow-GRPO's regex also reads '5.x' (up to 1.2) "
                   "and the leading digit of e.g. '10'")
    paper = ("UnifiedReward, Wang et al. 2025, arXiv:2503.05236; used as a reward by Flow-GRPO, Liu et al. 2025, "
             "arXiv:2505.05470")
    # The UnifiedReward repository's code is MIT; the checkpoint's licence is not declared in what was read
    # (base Qwen2.5-VL-7B-Instruct: Apache-2.0) (reference eval-suites.md §4.3).
    weights_spec = WeightsSpec(source=UNIFIEDREWARD_QWEN_7B,
                               license="unverified (base Qwen2.5-VL-7B-Instruct: Apache-2.0)", option="weights",
                               allow_patterns=GENERIC_VLM_PATTERNS)
    extra = None

    def __init__(self, weights: str | Path | None = None, backend: Any = "transformers", retries: int = 2,
                 resize: int | None = IMAGE_SIZE, max_new_tokens: int = MAX_NEW_TOKENS,
                 min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS, batch_size: int = 8,
                 device: str = "cpu", dtype: str | None = None) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        self.retries = retries
        self.resize = None if resize is None else positive_int("resize", resize)
        self.batch_size = parse_batch_size(batch_size)
        device_ = parse_device(device)
        if isinstance(backend, str):
            if backend != "transformers":
                raise ValueError(f"backend must be 'transformers' or an object with generate(images, questions), "
                                 f"got {backend!r}")
            self.backend = TransformersDescriber(
                weights, max_new_tokens=max_new_tokens, batch_size=self.batch_size, device=device_,
                dtype=dtype if dtype is not None else ("bfloat16" if device_.type == "cuda" else "float32"),
                jpeg_quality=None, reward=self.name, option="weights", spec=self.weights_spec,
                image_resize=qwen_fetch_resize(min_pixels, max_pixels))
            self.weights_in_use = used_specs((self.weights_spec,), {"weights": weights})[0]
            judge = backbone_of(weights, UNIFIEDREWARD_QWEN_7B)
        else:
            if not callable(getattr(backend, "generate", None)):
                raise ValueError(f"backend {backend!r} has no generate(images, questions) method")
            self.backend = backend
            self.weights_in_use = ()  # the judge is the caller's: no weights of ours to resolve
            judge = "backend-" + str(getattr(backend, "name", None) or type(backend).__name__)
        parts = [type(self).version, judge]
        if self.resize != IMAGE_SIZE:
            parts.append(f"resize-{self.resize or 'none'}")
        self.version = "+".join(parts)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """What the judge sees: uint8 levels, resized to ``resize`` squared (PIL, bicubic), as float in [0, 1]."""
        if self.resize is None:
            return torch.from_numpy(to_uint8(images, layout="chw")).float() / 255
        from PIL import Image

        side = self.resize
        out = [torch.from_numpy(np.array(Image.fromarray(a).resize((side, side), Image.Resampling.BICUBIC)))
               .permute(2, 0, 1) for a in to_uint8(images, layout="hwc")]
        return (torch.stack(out).float() / 255) if out else torch.zeros(0, 3, side, side)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        seen = self.prepare(images)
        questions = [question(p) for p in prompts]
        answers = list(self.backend.generate(seen, questions)) if len(questions) else []
        if len(answers) != len(questions):
            raise RewardFailed(f"reward '{self.name}': the judge returned {len(answers)} answers for "
                               f"{len(questions)} images.")
        scores = [parse_score(a) for a in answers]
        reasks, reasked = 0, []
        for i, value in enumerate(scores):
            if value is not None:
                continue
            reasked.append(i)
            pixels = to_uint8(seen[i : i + 1], layout="chw").tobytes()
            for attempt in range(1, self.retries + 1):
                reasks += 1
                answers[i] = self.backend.generate(seen[i : i + 1], [questions[i]], temperature=RETRY_TEMPERATURE,
                                                   seed=retry_seed(pixels, questions[i], attempt))[0]
                scores[i] = parse_score(answers[i])
                if scores[i] is not None:
                    break
        failed = [i for i, v in enumerate(scores) if v is None]
        if failed:
            raw = answers[failed[0]]
            shown = raw if len(raw) <= RAW_SHOWN else raw[:RAW_SHOWN] + f"... ({len(raw)} characters)"
            raise RewardFailed(
                f"reward '{self.name}': the judge's answer for {len(failed)} of {len(answers)} images has no "
                f"'Final Score: N' (N in 1-5), after {self.retries} re-ask(s) each with seeded sampling at "
                f"temperature {RETRY_TEMPERATURE}; image {failed[0]} answered {shown!r}. Such images are not "
                "scored 0; check that weights= is a UnifiedReward checkpoint, or raise retries=.")
        values = torch.tensor([v / SCORE_SCALE for v in scores], dtype=torch.float32)
        return RewardOutput(values.to(images.device), {"answers": answers, "reasks": reasks, "reasked": reasked})
