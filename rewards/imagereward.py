"""``imagereward``: ImageReward v1.0 (Xu et al. 2023), a human-preference reward for text-to-image generation.

Score of an image and its own prompt, as ``ImageReward.score`` (ImageReward/ImageReward.py)::

    image_embeds = BLIP ViT-L/16(preprocess(image))                       # (197, 1024) tokens @ 224 px
    cls = BLIP text encoder(tokens(prompt), cross-attention to image_embeds)[:, 0]   # (768,)
    score = (MLP(cls) - 0.16717362830052426) / 1.0333394966054072

with the MLP ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (no activations). Scores are roughly standard normal
on generated images (README example: 0.58, 0.27, -1.41, -2.03).

Pre-processing, as ImageReward's ``_transform(224)`` (``ImageReward/ImageReward.py`` L30-37, applied to the
PIL image by ``score`` L120 and ``inference_rank`` L153; a copy of OpenAI CLIP's ``_transform``, no square
resize anywhere in the repo's ``ImageReward/``): torchvision ``Resize(224, BICUBIC)``, i.e. the *short* side to 224 with PIL
bicubic and the long side ``int(224 * long / short)`` (torchvision ``_compute_resized_output_size``), then
``CenterCrop(224)`` at the *rounded* offset ``int(round((H - 224) / 2))`` (torchvision
``functional.center_crop``; Python ``round``, half to even), ``ToTensor``, ``Normalize`` with the OpenAI CLIP
mean/std (:func:`rlbench.nets.preprocess.clip_pixels_exact`, ``hf=False``; checked on odd-offset
non-square images in ``tests/test_zoo_preprocessing.py``, issue 18's audit: no discrepancy). When the
images require grad and grad mode is on, the float path :func:`rlbench.nets.preprocess.clip_pixels`
instead, as ReFL's ``score_gard`` input (``ReFL.py`` L744-752: the same ``Resize``/``CenterCrop``/
``Normalize`` on the decoded float tensor, which torchvision >= 0.17 resizes with antialiased bicubic as
rlbench does); rlbench also clamps the resized pixels to [0, 1], as the uint8 exact path does, where ReFL
lets the bicubic overshoot through. Prompts: bert-base-uncased tokenizer with BLIP's added
``[DEC]``/``[ENC]`` tokens, ``padding='max_length', truncation=True, max_length=35``.

The network runs on transformers' BLIP port (:mod:`rlbench.nets.blip`), loading the official
``ImageReward.pt`` through an explicit, strict key mapping; the pip package ``image-reward`` is not needed.
Batching: one forward per chunk of ``batch_size`` (image, prompt) pairs; distinct prompts are tokenised once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rlbench.errors import WeightsNotAvailable
from rlbench.nets.blip import MAX_LENGTH, SCORE_MEAN, SCORE_STD, BlipRewardConfig, ImageRewardModel, load_official
from rlbench.nets.options import parse_batch_size, parse_device, parse_dtype
from rlbench.nets.preprocess import clip_pixels, clip_pixels_exact
from rlbench.reward import Reward, RewardOutput
from rlbench.weights import WeightsSpec, resolve

# ImageReward/utils.py: hf_hub_download(repo_id="THUDM/ImageReward", filename="ImageReward.pt"); apache-2.0
# (HF card). Revision: the snapshot id of that repo seen in public HF caches (not given by the reference).
MODEL_SPEC = WeightsSpec(source="THUDM/ImageReward", filename="ImageReward.pt",
                         revision="5736be03b2652728fb87788c9797b0570450ab72", license="apache-2.0", option="weights")
# ImageReward/models/BLIP/blip.py init_tokenizer: BertTokenizer.from_pretrained('bert-base-uncased').
TOKENIZER_SPEC = WeightsSpec(source="bert-base-uncased", revision="86b5e0934494bd15c9632b12f734a8a67f723594",
                             license="apache-2.0", option="tokenizer",
                             allow_patterns=("vocab.txt", "tokenizer.json", "tokenizer_config.json", "config.json"))


def _in_use(spec: WeightsSpec, override: Any) -> WeightsSpec:
    """The spec the card shows when an override replaces the default source."""
    if override in (None, ""):
        return spec
    return replace(spec, source=str(override), filename=None if Path(str(override)).exists() else spec.filename,
                   revision=None, sha256=None)


def load_tokenizer(path: str | Path):
    """BLIP's tokenizer: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]`` (blip.py ``init_tokenizer``)."""
    from transformers import BertTokenizer

    path = Path(path)
    tokenizer = (BertTokenizer.from_pretrained(str(path)) if path.is_dir()
                 else BertTokenizer.from_pretrained(str(path.parent)) if path.name == "vocab.txt"
                 else None)
    if tokenizer is None:
        raise WeightsNotAvailable(f"tokenizer={path} is neither a tokenizer folder nor a vocab.txt file.")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Reward):
    """ImageReward v1.0: ``(MLP(BLIP cross-attention CLS feature) - mean) / std`` of (image, prompt).

    Args:
        weights: ``ImageReward.pt`` (a local file, a folder holding it, or a hub id with that file);
            default: ``THUDM/ImageReward`` from the Hugging Face cache (``rlbench rewards download imagereward``).
        tokenizer: a bert-base-uncased tokenizer folder (or its ``vocab.txt``) or hub id; default
            ``bert-base-uncased`` from the cache.
        device: where the model runs; moved there on the first call, never at construction.
        dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` for the two encoders; the head and
            the scores stay float32 (ImageReward casts the CLS feature with ``.float()``).
        batch_size: (image, prompt) pairs per forward pass.
        config: size overrides of :class:`rlbench.nets.blip.BlipRewardConfig` (for tests and
            re-trained variants); default ImageReward v1.0 (ViT-L/16 @ 224 + BERT-base).
    """

    name = "imagereward"
    version = "1"
    summary = ("ImageReward v1.0 human-preference score: BLIP ViT-L/16 + cross-attention BERT, MLP on the CLS "
               "feature, z-normalised.")
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = "(-inf, inf), about N(0, 1) on generated images (README example: -2.03 ... 0.58)"
    paper = ("Xu et al. 2023, ImageReward: Learning and Evaluating Human Preferences for Text-to-Image "
             "Generation, NeurIPS 2023, arXiv:2304.05977")
    weights_spec = (MODEL_SPEC, TOKENIZER_SPEC)

    def __init__(self, weights: str | Path | None = None, tokenizer: str | Path | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32, config: Mapping[str, Any] | None = None) -> None:
        self.dtype = parse_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self.device = parse_device(device)
        self.cfg = BlipRewardConfig.from_options(config)
        self.weights_override, self.tokenizer_override = weights, tokenizer
        if weights is not None or tokenizer is not None:  # the card names the weights actually used
            self.weights_in_use = (_in_use(MODEL_SPEC, weights), _in_use(TOKENIZER_SPEC, tokenizer))
        self._model: ImageRewardModel | None = None
        self._tokenizer = None

    # -- loading --------------------------------------------------------------------------------------

    def _load(self):
        if self._model is None:
            ckpt = resolve(MODEL_SPEC, reward=self.name, override=self.weights_override)
            tok_path = resolve(TOKENIZER_SPEC, reward=self.name, override=self.tokenizer_override)
            tokenizer = load_tokenizer(tok_path)
            if len(tokenizer) != self.cfg.vocab_size:
                raise WeightsNotAvailable(
                    f"the tokenizer at {tok_path} has {len(tokenizer)} tokens with BLIP's [DEC]/[ENC] added, the "
                    f"model expects {self.cfg.vocab_size}; pass bert-base-uncased (30522 + 2 = 30524)."
                )
            model = load_official(ckpt, self.cfg)
            model.vision.to(self.dtype)
            model.text.to(self.dtype)  # head and projections stay float32
            self._model, self._tokenizer = model.to(self.device), tokenizer
        return self._model, self._tokenizer

    # -- the pieces of a score ------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, 35) on the model's device; each distinct prompt once."""
        _, tokenizer = self._load()
        distinct = list(dict.fromkeys(prompts))
        enc = tokenizer(distinct, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        where = {p: k for k, p in enumerate(distinct)}
        index = torch.tensor([where[p] for p in prompts])
        return enc["input_ids"][index].to(self.device), enc["attention_mask"][index].to(self.device)

    def pixel_values(self, images: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """ImageReward's ``_transform`` of float images (B, 3, H, W) in [0, 1]: normalised (B, 3, S, S)."""
        fn = clip_pixels if differentiable else clip_pixels_exact
        return fn(images, size=self.cfg.image_size)

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        n = images.shape[0]
        if n == 0:
            return RewardOutput(torch.zeros(0, dtype=torch.float32, device=images.device), {})
        model, _ = self._load()
        ids, mask = self.tokenize(prompts)
        differentiable = torch.is_grad_enabled() and images.requires_grad
        raw = []
        with torch.set_grad_enabled(differentiable):
            for s in range(0, n, self.batch_size):
                pixels = self.pixel_values(images[s : s + self.batch_size], differentiable)
                pixels = pixels.to(device=self.device, dtype=self.dtype)
                raw.append(model(pixels, ids[s : s + self.batch_size], mask[s : s + self.batch_size]))
        raw = torch.cat(raw)
        scores = (raw - SCORE_MEAN) / SCORE_STD
        return RewardOutput(scores.float().to(images.device), {"raw": raw.detach().float().cpu()})
