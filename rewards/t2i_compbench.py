"""T2I-CompBench(++)'s transformers-native metrics as rewards: BLIP-VQA (colour, shape, texture) and CLIP (non-spatial).

Source: Karine-Huang/T2I-CompBench at 1b70949 (MIT). Every rule below names the file and line it reproduces.

``t2i-compbench-blip-vqa`` (:class:`BLIPVQA`), ``BLIPvqa_eval/``::

    phrases = [c.text for c in spacy_en_core_web_sm(prompt).noun_chunks
               if c.text not in ("top", "the side", "the left", "the right")][:8]     # BLIP_vqa.py L17, L34-40, L66-69
    p(phrase) = P(yes) / (P(yes) + P(no))                                             # models/blip_vqa.py L133-147
    score = prod(p(phrase) for phrase in phrases)      # 1 when there is no phrase      # BLIP_vqa.py L102-110

* question: ``f"{phrase}?"`` (``BLIP_vqa.py`` L40) through BLIP's ``pre_question`` (``data/vqa_dataset.py`` L57,
  ``data/utils.py`` L31-43: lower-case, delete ``.!"()*#:;~``, strip trailing spaces, at most 50 words), tokenised
  with ``truncation=True, max_length=35`` and the first token ([CLS]) replaced by ``[ENC]`` (``models/blip_vqa.py``
  L44-46; transformers' own ``BlipForQuestionAnswering.generate`` keeps [CLS]);
* image: ``Resize((480, 480), BICUBIC)`` of the PIL image (no aspect kept, no crop), ``ToTensor``, ``Normalize`` with
  the CLIP mean/std (``data/__init__.py`` L13, L23-27; ``configs/vqa.yaml`` L17 ``image_size: 480``); rlbench
  quantises its floats to uint8 and resizes with PIL bicubic as torchvision does on a PIL image;
* p: the text encoder reads the question with cross-attention to every image token; ONE decoder step from the BOS
  token ``[DEC]`` (id 30522) with cross-attention to the question states (the official code masks the question's
  padding; rlbench does not pad, see below); the softmax of its logits at ``yes`` (2748) and ``no`` (2053) (``models/blip_vqa.py`` L133-147). Not
  ``generate``. The ids are resolved through the loaded model's tokenizer and config (BLIP's ``init_tokenizer``
  appends ``[DEC]`` then ``[ENC]`` to bert-base-uncased, ``models/blip.py`` L186-191) and checked against them.
* model: transformers ``BlipForQuestionAnswering`` from ``Salesforce/blip-vqa-capfilt-large``, the HF conversion of
  BLIP's ``model_base_vqa_capfilt_large.pth`` (``configs/vqa.yaml`` L7). **Its equivalence with that checkpoint is
  unverified** (no copy of either could be compared here).

Noun phrases come from a *noun-phrase source*: ``metadata["noun_phrases"]`` when an image has it (the prompt's
spaCy noun chunks computed elsewhere; the drop list and the cap still apply), else the constructor's
``noun_chunker`` callable when one is given (tests use a stand-in, named in ``info``), else spaCy's
``en_core_web_sm`` (option ``spacy_model``, any name or path ``spacy.load`` takes). Without spaCy and its model
the reward raises :class:`~rlbench.errors.DependencyNotInstalled`; it never falls back to another chunker.
``en_core_web_sm`` is not on PyPI (spaCy ships it from its GitHub releases; ``python -m spacy download
en_core_web_sm``); T2I-CompBench pins ``en_core_web_sm`` 3.5.0 with spaCy 3.5.3 (``requirements.txt`` L25, L107) and
noun chunks can differ between model versions, so ``info["noun_phrase_source"]`` names the pipeline and version used.

Deviations from the official code, each on purpose:

* positional embeddings: the HF checkpoint has a 24x24 grid of patch positions (its ``config.json`` leaves
  ``vision_config.image_size`` at ``BlipVisionConfig``'s 384, its processor resizes to 384, and transformers'
  ``convert_blip_original_pytorch_to_hf.py`` builds ``blip_vqa(image_size=384)``, whose ``load_checkpoint``
  bicubically resizes BLIP's 30x30 grid; that the hub files came from this script is unverified); at the official
  480 px rlbench interpolates them back
  (``interpolate_pos_encoding=True``, bicubic like BLIP's ``interpolate_pos_embed``), which does not restore the
  original 30x30 grid exactly. ``image_size=384`` runs at the checkpoint's own grid (the HF processor's size);
* ``p`` is computed as ``sigmoid(logit_yes - logit_no)``, equal to the official ratio of softmax probabilities but
  finite when both underflow;
* the official script writes every ``p`` and the final product with ``'{:.4f}'`` (``models/blip_vqa.py`` L124-126,
  ``BLIP_vqa.py`` L104, L117) and multiplies the rounded values in float32; rlbench keeps full precision (a reward
  must not be a step function) unless ``official_rounding=True``, which reproduces that rounding exactly;
* each image is encoded once and its questions share the embedding (the official script re-runs VQA per phrase
  index), and questions are batched only with others of the same token length, never padded: the official code pads
  and masks (L44, L140), but transformers 5's BLIP text cross-attention drops ``encoder_attention_mask`` (see
  :meth:`BLIPVQA.yes_probability`), so unpadded batches are how to get the official numbers, batch-independent.

``t2i-compbench-clip`` (:class:`CompBenchCLIP`), ``CLIPScore_eval/CLIP_similarity.py``::

    score = cos(encode_image(preprocess(image)), encode_text(clip.tokenize(prompt)))   # L16, L58-80: no x100, no clamp

with OpenAI CLIP ViT-B/32 (``clip.load("ViT-B/32")``, L16). Of rlbench's two CLIP paths, open_clip's reproduces
the ``clip`` package and transformers' does not, so it is the one used:

* weights: the very file ``clip.load`` downloads (``clip/clip.py`` L36, the TorchScript archive
  ``ViT-B-32.pt``, sha256 = the URL's path segment, which ``clip._download`` checks), rebuilt as a plain module with
  open_clip's ``build_model_from_openai_state_dict`` (the port of ``clip/model.py`` ``build_model``: QuickGELU,
  OpenAI's key layout, strict load);
* tokens: open_clip's ``SimpleTokenizer`` is ``clip/simple_tokenizer.py`` (ftfy, double ``html.unescape``,
  whitespace clean, lower case, the same BPE file, sot/eot ids, zero padding to 77); it differs only on prompts that
  contain the literal strings ``<|startoftext|>``/``<|endoftext|>`` or the control characters ``\\x1c``-``\\x1f``
  (open_clip splits whitespace with ``str.split``), and on prompts over 77 tokens, which ``clip.tokenize`` refuses
  (``truncate=False``, ``clip/clip.py`` L197-234) and open_clip truncates keeping the end token (``clip.tokenize(...,
  truncate=True)``): a reward must score every prompt. transformers' ``CLIPTokenizer`` skips ftfy and the html
  unescaping;
* pixels: ``clip/clip.py`` ``_transform`` (L79-86): short side to 224 with PIL bicubic, ``CenterCrop(224)`` at the
  *rounded* offset (torchvision), ``ToTensor``, CLIP mean/std — :func:`rlbench.nets.preprocess.clip_pixels_exact`
  with ``hf=False``. transformers' ``CLIPImageProcessor`` floors the crop offset instead. The float path
  (``images.requires_grad``) resizes with antialiased bicubic, so the reward is differentiable;
* precision: ``clip.load`` keeps the weights in float16 on CUDA (``clip/model.py`` ``build_model`` ->
  ``convert_weights``; ``model.float()`` only on CPU, ``clip/clip.py`` L140-141), so the published numbers were
  computed in float16; rlbench defaults to float32 (``dtype="float16"`` on a GPU is the official setting).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlbench.errors import DependencyNotInstalled, InputError, WeightsNotAvailable
from rlbench.nets import clip as cm
from rlbench.nets.options import parse_batch_size, parse_device, parse_dtype, positive_int
from rlbench.nets.preprocess import CLIP_MEAN, CLIP_STD, clip_pixels, clip_pixels_exact
from rlbench.reward import Reward, RewardOutput
from rlbench.utils.hf import no_progress_bars
from rlbench.utils.images import to_uint8
from rlbench.weights import WeightsSpec, resolve

PAPER = ("Huang et al., T2I-CompBench++: An Enhanced and Comprehensive Benchmark for Compositional Text-to-Image "
         "Generation, IEEE TPAMI 2025 (T2I-CompBench, NeurIPS 2023 Datasets and Benchmarks), arXiv:2307.06350")

# == BLIP-VQA =========================================================================================

VQA_REPO = "Salesforce/blip-vqa-capfilt-large"  # HF conversion of configs/vqa.yaml L7 model_base_vqa_capfilt_large.pth
VQA_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json")
IMAGE_SIZE = 480  # BLIPvqa_eval/configs/vqa.yaml L17 image_size: 480 (transform_test, data/__init__.py L23-27)
MAX_PHRASES = 8  # BLIPvqa_eval/BLIP_vqa.py L66-69 --np_num default 8
DROPPED_PHRASES = ("top", "the side", "the left", "the right")  # BLIPvqa_eval/BLIP_vqa.py L34-37 (exact chunk text)
SPACY_MODEL = "en_core_web_sm"  # BLIPvqa_eval/BLIP_vqa.py L17 spacy.load("en_core_web_sm")
QUESTION_MAX_LENGTH = 35  # BLIPvqa_eval/models/blip_vqa.py L44: truncation=True, max_length=35
MAX_QUESTION_WORDS = 50  # BLIPvqa_eval/data/utils.py L31 pre_question(max_ques_words=50)
PRE_QUESTION_PUNCT = re.compile(r"([.!\"()*#:;~])")  # BLIPvqa_eval/data/utils.py L32-36
# BLIPvqa_eval/models/blip_vqa.py L136 (BOS id 30522 = [DEC]), L145-146 (yes 2748, no 2053) in BLIP's
# bert-base-uncased vocabulary; [ENC] 30523 (models/blip.py L186-191: [DEC] then [ENC] appended to 30522 tokens).
OFFICIAL_IDS = {"bos": 30522, "enc": 30523, "yes": 2748, "no": 2053}


def pre_question(question: str, max_words: int = MAX_QUESTION_WORDS) -> str:
    """BLIP's ``pre_question`` (``BLIPvqa_eval/data/utils.py`` L31-43), applied to every question."""
    question = PRE_QUESTION_PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def select_phrases(chunks: Sequence[str], max_phrases: int = MAX_PHRASES) -> list[str]:
    """The official drop list (exact text match) then the first ``max_phrases`` (BLIP_vqa.py L34-40, L85)."""
    return [c for c in chunks if c not in DROPPED_PHRASES][:max_phrases]


@dataclass(frozen=True)
class VQATokenIds:
    """The ids vqa_prob needs, resolved from the loaded tokenizer and model config."""

    bos: int  # [DEC]: the decoder's first input
    enc: int  # [ENC]: replaces the question's [CLS]
    yes: int
    no: int


def vqa_token_ids(tokenizer: Any, text_config: Any, where: Any = "the model") -> VQATokenIds:
    """``[DEC]``/``[ENC]``/``yes``/``no`` ids of a BLIP tokenizer. A tokenizer without the two added tokens (the HF
    repos ship plain bert-base-uncased files) gets them where BLIP's ``init_tokenizer`` puts them, right after the
    base vocabulary; ``[DEC]`` must be the model's ``bos_token_id`` and both must be inside its vocabulary."""
    vocab = tokenizer.get_vocab()
    base = int(tokenizer.vocab_size)
    dec = int(vocab.get("[DEC]", base))
    enc = int(vocab.get("[ENC]", dec + 1))
    bos = getattr(text_config, "bos_token_id", None)
    size = int(getattr(text_config, "vocab_size", 0))
    problems = []
    if bos is not None and dec != int(bos):
        problems.append(f"[DEC] is id {dec} but the model's bos_token_id is {bos}")
    if not (0 <= dec < size and 0 <= enc < size) or dec == enc:
        problems.append(f"[DEC]={dec}, [ENC]={enc} do not fit the text vocabulary of {size}")
    words = {}
    for word in ("yes", "no"):
        if word not in vocab:
            problems.append(f"the tokenizer has no token {word!r}")
        else:
            words[word] = int(vocab[word])
    if problems:
        raise WeightsNotAvailable(
            f"{where} is not a BLIP VQA model with its BERT tokenizer ({'; '.join(problems)}); pass the folder of "
            f"{VQA_REPO} (model and tokenizer files) via weights=PATH."
        )
    return VQATokenIds(bos=dec, enc=enc, yes=words["yes"], no=words["no"])


# -- noun phrases ---------------------------------------------------------------------------------------

NounChunker = Callable[[str], Sequence[str]]


def _spacy_missing(model: str, why: str) -> DependencyNotInstalled:
    return DependencyNotInstalled(
        f"reward 't2i-compbench-blip-vqa' takes each prompt's noun phrases from spaCy's {model!r} pipeline, as "
        f"T2I-CompBench does (BLIPvqa_eval/BLIP_vqa.py), and {why}. Install it with `pip install spacy` and "
        f"`python -m spacy download {SPACY_MODEL}` (the model is not on PyPI: spaCy fetches it from its GitHub "
        f"releases; T2I-CompBench pins {SPACY_MODEL} 3.5.0), or pass spacy_model=PATH of a local copy of the "
        "pipeline, or give each image's noun phrases as metadata['noun_phrases'] (a list of strings)."
    )


class SpacyNounChunks:
    """``[chunk.text for chunk in nlp(prompt).noun_chunks]`` with ``nlp = spacy.load(model)``, loaded on first use."""

    def __init__(self, model: str = SPACY_MODEL) -> None:
        self.model = str(model)
        self._nlp = None

    def load(self):
        if self._nlp is None:
            try:
                import spacy
            except ImportError as exc:
                raise _spacy_missing(self.model, "spaCy is not installed") from exc
            try:
                self._nlp = spacy.load(self.model)
            except OSError as exc:  # spaCy's E050/E053: no such package, link or path
                why = f"spacy.load({self.model!r}) failed ({' '.join(str(exc).split())[:200]})"
                raise _spacy_missing(self.model, why) from exc
        return self._nlp

    @property
    def source(self) -> str:
        meta = getattr(self.load(), "meta", None) or {}
        return f"spacy:{meta.get('lang', '')}_{meta.get('name', self.model)}-{meta.get('version', '?')}"

    def __call__(self, prompt: str) -> list[str]:
        return [chunk.text for chunk in self.load()(prompt).noun_chunks]


def _import_callable(path: str):
    """``"package.module:function"`` -> that object (how a command line names a Python callable, as entry points)."""
    import importlib

    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"noun_chunker must be a callable or 'module:function', got {path!r}")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"noun_chunker {path!r} cannot be imported: {exc}") from exc
    return obj


def _metadata_phrases(meta: Mapping[str, Any], index: int) -> list[str] | None:
    value = meta.get("noun_phrases")
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise InputError(f"metadata[{index}]['noun_phrases'] must be a list of strings (the prompt's noun chunks), "
                         f"got {value!r}.")
    return list(value)


# -- pixels ---------------------------------------------------------------------------------------------


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # BLIPvqa_eval/data/__init__.py L13: Normalize((0.48145466, ...), (0.26862954, ...)), the CLIP constants
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def vqa_pixels_exact(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``transform_test`` of BLIP-VQA (``data/__init__.py`` L23-27) on uint8 PIL images: ``Resize((size, size),
    BICUBIC)`` (PIL's bicubic, what torchvision calls on a PIL image), ``ToTensor``, ``Normalize``."""
    from PIL import Image

    out = []
    for arr in to_uint8(images, layout="hwc"):
        img = Image.fromarray(arr)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return _normalise(torch.stack(out).to(images.device))


def vqa_pixels(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The differentiable counterpart: float antialiased bicubic to ``size x size``, clamped, normalised."""
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    return _normalise(x)


# -- the model ------------------------------------------------------------------------------------------


def load_blip_vqa(folder: Path, *, device: torch.device, dtype: torch.dtype):
    """(``BlipForQuestionAnswering``, BERT tokenizer) from a local folder, eval mode, frozen; missing, unexpected or
    mis-shaped weights raise instead of being initialised at random."""
    from transformers import BertTokenizer, BlipForQuestionAnswering

    folder = Path(folder)
    if not cm.has_hf_weights(folder) or not (folder / "vocab.txt").is_file():
        raise WeightsNotAvailable(
            f"{folder} is not a BlipForQuestionAnswering folder (needs config.json, model.safetensors or "
            f"pytorch_model.bin, and the tokenizer's vocab.txt, as {VQA_REPO} ships them); pass one via weights=PATH."
        )
    try:
        with no_progress_bars():
            model, info = BlipForQuestionAnswering.from_pretrained(str(folder), local_files_only=True,
                                                                   output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsNotAvailable(f"the BLIP VQA weights in {folder} do not match its config or cannot be read: "
                                  f"{type(exc).__name__}: {str(exc)[:500]}") from exc
    problems = {"missing": list(info.get("missing_keys", ())),
                "unexpected": [k for k in info.get("unexpected_keys", ()) if not k.endswith("position_ids")],
                "mismatched": [str(m) for m in info.get("mismatched_keys", ())]}
    if any(problems.values()):
        detail = "; ".join(f"{k} keys: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                           for k, v in problems.items() if v)
        raise WeightsNotAvailable(f"the BLIP VQA weights in {folder} do not match its config ({detail}).")
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, tokenizer


class BLIPVQA(Reward):
    """T2I-CompBench's BLIP-VQA score: the product over the prompt's noun phrases of BLIP's P(yes)/(P(yes)+P(no)).

    Args:
        weights: a ``BlipForQuestionAnswering`` folder with its tokenizer files, or a hub id; default
            ``Salesforce/blip-vqa-capfilt-large``.
        spacy_model: the spaCy pipeline giving the noun chunks (a package name or a path ``spacy.load`` takes);
            default ``en_core_web_sm`` as T2I-CompBench.
        noun_chunker: a callable ``prompt -> list of noun-phrase strings`` used instead of spaCy, or its import path
            ``"module:function"`` (from the command line: ``--reward-opt t2i-compbench-blip-vqa.noun_chunker=...``;
            the tests' stand-in is ``rlbench.testing:tiny_noun_chunker``, which is NOT spaCy). Per image,
            ``metadata["noun_phrases"]`` takes precedence over both.
        image_size: the square side the images are resized to (default 480, the official ``configs/vqa.yaml``;
            384 is the HF checkpoint's own position grid).
        max_phrases: the number of noun phrases asked about (default 8, ``--np_num``).
        official_rounding: round every p and the product to 4 decimals as the official result files do
            (not differentiable then).
        device: where the model runs; moved there on the first call, never at construction.
        dtype: model dtype, ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``; scores are float32.
        batch_size: images per vision forward and questions per text forward.
    """

    name = "t2i-compbench-blip-vqa"
    version = "1"
    summary = ("T2I-CompBench(++) BLIP-VQA (colour/shape/texture): product over the prompt's spaCy noun phrases (up to "
               "8) of P(yes)/(P(yes)+P(no)) for '<phrase>?' from BLIP VQA at 480 px; needs spaCy + en_core_web_sm or "
               "metadata['noun_phrases']. Weights: the HF conversion Salesforce/blip-vqa-capfilt-large, whose "
               "equivalence with the official model_base_vqa_capfilt_large.pth is unverified.")
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = "[0, 1]; 1 for a prompt without noun phrases; the category score is the mean over its images"
    paper = PAPER + "; BLIP, Li et al. 2022, arXiv:2201.12086"
    weights_spec = WeightsSpec(source=VQA_REPO, license="BSD-3-Clause", option="weights", allow_patterns=VQA_FILES)

    def __init__(self, weights: str | Path | None = None, spacy_model: str = SPACY_MODEL,
                 noun_chunker: NounChunker | None = None, image_size: int = IMAGE_SIZE, max_phrases: int = MAX_PHRASES,
                 official_rounding: bool = False, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 16) -> None:
        if isinstance(noun_chunker, str):  # "module:function" from the command line (--reward-opt), as entry points
            noun_chunker = _import_callable(noun_chunker)
        if noun_chunker is not None and not callable(noun_chunker):
            raise ValueError(f"noun_chunker must be a callable prompt -> list of strings, got {noun_chunker!r}")
        if not isinstance(official_rounding, bool):
            raise ValueError(f"official_rounding must be true or false, got {official_rounding!r}")
        self.image_size = positive_int("image_size", image_size)
        self.max_phrases = positive_int("max_phrases", max_phrases)
        self.official_rounding = official_rounding
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self.override = weights
        self.weights_in_use = cm.used_specs((self.weights_spec,), {"weights": weights})[0]
        self.spacy = SpacyNounChunks(spacy_model)
        self.noun_chunker = noun_chunker
        self._model = self._tokenizer = self._ids = None
        self._chunks: dict[str, list[str]] = {}

    # -- the pieces of a score ----------------------------------------------------------------------------

    def _load(self):
        if self._model is None:
            folder = resolve(self.weights_spec, reward=self.name, override=self.override)
            model, tokenizer = load_blip_vqa(folder, device=self.device, dtype=self.dtype)
            self._ids = vqa_token_ids(tokenizer, model.config.text_config, where=folder)
            self._model, self._tokenizer = model, tokenizer
        return self._model, self._tokenizer, self._ids

    def check_ready(self) -> None:
        """What an evaluation checks before it samples (rlbench.eval.plan.check_weights): a noun-phrase source
        exists (an explicit ``noun_chunker``, or spaCy with its model), else the one-line DependencyNotInstalled."""
        if self.noun_chunker is None:
            self.spacy.load()

    def chunk_source(self) -> str:
        if self.noun_chunker is not None:
            return f"noun_chunker:{getattr(self.noun_chunker, '__qualname__', type(self.noun_chunker).__name__)}"
        return self.spacy.source

    def noun_phrases(self, prompt: str, meta: Mapping[str, Any] | None = None, index: int = 0) -> list[str]:
        """The phrases asked about for one image: metadata's, else the chunker's/spaCy's, then the drop list and cap."""
        chunks = _metadata_phrases(meta or {}, index)
        if chunks is None:
            if prompt not in self._chunks:
                chunker = self.noun_chunker if self.noun_chunker is not None else self.spacy
                self._chunks[prompt] = [str(c) for c in chunker(prompt)]
            chunks = self._chunks[prompt]
        return select_phrases(chunks, self.max_phrases)

    def tokenize(self, question: str) -> list[int]:
        """One question's ids, truncated to 35, the first ([CLS]) replaced by [ENC] (models/blip_vqa.py L44-46).
        Unpadded: questions are batched with others of the same length only (see :meth:`yes_probability`)."""
        _, tokenizer, ids = self._load()
        input_ids = list(tokenizer(question, truncation=True, max_length=QUESTION_MAX_LENGTH)["input_ids"])
        input_ids[0] = ids.enc
        return input_ids

    def pixel_values(self, images: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        return (vqa_pixels if differentiable else vqa_pixels_exact)(images, self.image_size)

    def yes_probability(self, image_embeds: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        """``vqa_prob`` (models/blip_vqa.py L133-147) of each question (a row of ``question_ids``, (Q, L), no padding)
        about the image whose tokens are the matching row of ``image_embeds`` (Q, N, D): the text encoder with
        cross-attention to every image token, then ONE decoder step from [DEC] with cross-attention to the question.

        The official code pads a batch of questions and masks the padding (``question.attention_mask``, L44, L122,
        L140). transformers 5's BLIP text cross-attention drops its ``encoder_attention_mask`` (``BlipTextAttention``
        does not pass it on to ``BlipTextSelfAttention``), so padded batches would let the decoder attend to padding
        states; rlbench therefore never pads: every batch holds questions of one token length, all masks are ones,
        which is what the official masked computation gives."""
        model, _, ids = self._load()
        question_ids = question_ids.to(self.device)
        ones = torch.ones(question_ids.shape, dtype=torch.long, device=self.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        states = model.text_encoder(input_ids=question_ids, attention_mask=ones, encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_atts).last_hidden_state
        start = torch.full((question_ids.shape[0], 1), ids.bos, dtype=torch.long, device=self.device)
        logits = model.text_decoder(input_ids=start, encoder_hidden_states=states, encoder_attention_mask=ones,
                                    use_cache=False).logits[:, 0, :].float()
        # softmax(l)[yes] / (softmax(l)[yes] + softmax(l)[no]) == sigmoid(l_yes - l_no), finite even when both underflow
        return torch.sigmoid(logits[:, ids.yes] - logits[:, ids.no])

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        n = images.shape[0]
        phrases = [self.noun_phrases(p, m, i) for i, (p, m) in enumerate(zip(prompts, metadata))]
        given = [_metadata_phrases(m, i) is not None for i, m in enumerate(metadata)]
        source = "+".join((["metadata"] if any(given) else []) + ([] if all(given) else [self.chunk_source()]))
        info: dict[str, Any] = {"noun_phrases": phrases, "noun_phrase_source": source}
        if n == 0 or not any(phrases):
            info["phrase_probs"] = [[] for _ in phrases]
            return RewardOutput(torch.ones(n, dtype=torch.float32, device=images.device), info)
        model, _, _ = self._load()
        grad = cm.wants_grad(images)
        owner = [i for i, ph in enumerate(phrases) for _ in ph]  # question k is about image owner[k]
        tokens = [self.tokenize(pre_question(f"{q}?")) for ph in phrases for q in ph]  # BLIP_vqa.py L40: f'{q_tmp}?'
        found: dict[int, torch.Tensor] = {}
        with torch.set_grad_enabled(grad):
            for s in cm.chunks(n, self.batch_size):
                pick = [k for k in range(len(tokens)) if s.start <= owner[k] < s.stop]
                if not pick:
                    continue
                pixels = self.pixel_values(images[s], differentiable=grad).to(device=self.device, dtype=self.dtype)
                embeds = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
                by_length: dict[int, list[int]] = {}
                for k in pick:
                    by_length.setdefault(len(tokens[k]), []).append(k)
                for rows_all in by_length.values():
                    for c in cm.chunks(len(rows_all), self.batch_size):
                        rows = rows_all[c]
                        local = torch.tensor([owner[k] - s.start for k in rows], device=embeds.device)
                        p = self.yes_probability(embeds[local], torch.tensor([tokens[k] for k in rows]))
                        found.update(zip(rows, p))
        p = torch.stack([found[k] for k in range(len(tokens))])
        per_image = list(torch.split(p, [len(ph) for ph in phrases]))
        info["phrase_probs"] = [t.detach().cpu().tolist() for t in per_image]
        if self.official_rounding:
            scores = torch.tensor([official_product(t.detach().cpu().tolist()) for t in per_image], dtype=torch.float32)
        else:
            scores = torch.stack([t.prod() if len(t) else torch.ones((), device=p.device) for t in per_image])
        return RewardOutput(scores.float().to(images.device), info)


def official_product(probs: Sequence[float]) -> float:
    """The official result value of one image from its unrounded p's: each ``'{:.4f}'``-formatted and read back
    (models/blip_vqa.py L124-126, BLIP_vqa.py L104), multiplied in float32 in phrase order (the CUDA float32 tensor
    ``reward``, L80, L108-110; missing phrases are factors 1), the product formatted ``'{:.4f}'`` again (L117)."""
    out = np.float32(1.0)
    for p in probs:
        out = np.float32(out * np.float32(float(f"{float(np.float32(p)):.4f}")))
    return float(f"{float(out):.4f}")


# == CLIP (non-spatial) ===============================================================================

# CLIPScore_eval/clip/clip.py L36 _MODELS["ViT-B/32"]; the path segment is the file's sha256 (clip._download checks it).
OPENAI_VIT_B32_URL = ("https://openaipublic.azureedge.net/clip/models/"
                      "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
OPENAI_VIT_B32_SHA256 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
OPENAI_FILES = ("ViT-B-32.pt", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")


def load_openai_clip(path: Path):
    """An OpenAI CLIP checkpoint (``clip.load``'s TorchScript archive, or a state dict in OpenAI's key layout as
    ``.pt``/``.bin``/``.safetensors``) rebuilt with open_clip's ``build_model_from_openai_state_dict`` (strict),
    in float32."""
    from open_clip.model import build_model_from_openai_state_dict

    path = Path(path)
    if path.is_dir():
        found = [path / f for f in OPENAI_FILES if (path / f).is_file()]
        if not found:
            raise WeightsNotAvailable(f"{path} holds none of {', '.join(OPENAI_FILES)}; pass the ViT-B-32.pt file.")
        path = found[0]
    if not path.is_file():
        raise WeightsNotAvailable(f"OpenAI CLIP checkpoint not found: {path}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, and is the format OpenAI ships
                warnings.simplefilter("ignore")
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError:  # not a TorchScript archive: a plain state dict (clip.load accepts both)
            state = cm.load_tensors(path, "weights")
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or "visual.proj" not in state:
        raise WeightsNotAvailable(f"{path} is not an OpenAI CLIP ViT checkpoint (no 'visual.proj' in its state dict).")
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = build_model_from_openai_state_dict(dict(state), cast_dtype=None)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise WeightsNotAvailable(f"{path} does not fit OpenAI's CLIP layout: {' '.join(str(exc).split())[:500]}"
                                  ) from exc
    finally:
        logging.disable(previous)
    return model.float().eval().requires_grad_(False)


class CompBenchCLIP(Reward):
    """T2I-CompBench's non-spatial CLIPScore: raw cosine of OpenAI CLIP ViT-B/32 image and prompt features.

    Args:
        weights: OpenAI's ``ViT-B-32.pt`` (what ``clip.load("ViT-B/32")`` downloads; a local file, a folder holding
            it, or a URL/hub id), default the official URL, sha256-checked.
        device: where the model runs; moved there on the first call, never at construction.
        dtype: ``"float32"`` (default), ``"float16"`` (the official CUDA setting) or ``"bfloat16"``; scores float32.
        batch_size: images (and distinct prompts) per forward.
    """

    name = "t2i-compbench-clip"
    version = "1"
    summary = ("T2I-CompBench(++) non-spatial CLIPScore: raw cosine of OpenAI CLIP ViT-B/32 image and prompt "
               "features (no x100, no clamp), with the clip package's preprocessing and tokenisation.")
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = "[-1, 1] raw cosine; typical ~0.2-0.35 for an image of its prompt; the category score is the mean"
    paper = PAPER + "; CLIP, Radford et al. 2021, arXiv:2103.00020"
    weights_spec = WeightsSpec(source=OPENAI_VIT_B32_URL, sha256=OPENAI_VIT_B32_SHA256, license="MIT", option="weights")

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 32) -> None:
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self.override = weights
        if weights not in (None, ""):
            self.weights_in_use = replace(self.weights_spec, source=str(weights), sha256=None)
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            from open_clip.tokenizer import SimpleTokenizer

            path = resolve(self.weights_spec, reward=self.name, override=self.override)
            model = load_openai_clip(path)
            self._model = model.to(device=self.device, dtype=self.dtype)
            self._tokenizer = SimpleTokenizer(context_length=model.context_length)
        return self._model, self._tokenizer

    @property
    def image_size(self) -> int:
        size = self._load()[0].visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """``clip.tokenize`` (context 77, zero padding), over-long prompts truncated keeping the end token."""
        return self._load()[1](list(prompts))

    def pixel_values(self, images: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """``clip/clip.py`` ``_transform(n_px)``: short side bicubic, rounded centre crop, CLIP mean/std."""
        fn = clip_pixels if differentiable else clip_pixels_exact
        return fn(images, self.image_size, CLIP_MEAN, CLIP_STD, hf=False)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> torch.Tensor:
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        model, _ = self._load()
        img, txt = cm.open_clip_features(model, self.tokenize, self.pixel_values, images, prompts, self.batch_size,
                                         self.device, self.dtype)
        # CLIP_similarity.py L72-80: both features L2-normalised, their dot product; no x100, no clamp
        return cm.cosine(img, txt).to(images.device)


__all__ = [
    "BLIPVQA", "CompBenchCLIP", "DROPPED_PHRASES", "IMAGE_SIZE", "MAX_PHRASES", "OFFICIAL_IDS", "SpacyNounChunks",
    "VQATokenIds", "load_blip_vqa", "load_openai_clip", "official_product", "pre_question", "select_phrases",
    "vqa_pixels", "vqa_pixels_exact", "vqa_token_ids",
]
