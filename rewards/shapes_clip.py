"""``shapes-clip``: a learned CLIP-style proxy reward of the shapes world (rlbench's embedded default).

The shapes world's analogue of CLIPScore / PickScore: a tiny dual encoder (transformers'
``CLIPModel``: a ViT on 32x32 images, a causal text transformer over the world's word-level
tokenizer) trained contrastively on (image, caption) pairs of the train prompt space, with limited
data on purpose — good, but imperfect and exploitable. Its exact counterpart is ``shapes-gold``;
training DDPO against ``shapes-clip`` while watching ``shapes-gold`` measures reward
over-optimisation. Architecture, training and the measured agreement with the gold:
:mod:`rlbench.shapes.clip_train` and ``rlbench/shapes/proxies/clip/metrics.json``.

Score of an image and its own prompt, exactly PickScore's form (Kirstain et al. 2023)::

    score = logit_scale.exp() * cos(image_embedding, text_embedding)

with ``logit_scale`` the model's learned temperature (clamped at ``log 100`` in training, as CLIP;
the shipped weights reach about 18), so scores lie in ``[-exp(logit_scale), exp(logit_scale)]``.

Pre-processing (differentiable): images of another size than 32x32 are area-resized to 32x32 *in
float* (``adaptive_avg_pool2d``; unlike ``shapes-gold`` there is no uint8 quantisation on this
learned path, so gradients flow to the pixels), then mapped to [-1, 1]. Prompts are tokenised with
the world tokenizer (any text encodes, unknown words byte by byte; prompts past 20 tokens are
truncated): the proxy scores any prompt, it is meaningful on shapes-world captions.

Batching: each distinct prompt of a call is encoded once (one text-tower forward per chunk of
``batch_size`` distinct prompts), images in chunks of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlbench.nets.options import parse_batch_size
from rlbench.reward import Reward, RewardOutput
from rlbench.weights import WeightsSpec
from rlbench.shapes.clip_train import clip_folder, image_embeds, load_clip, pixel_values, text_embeds, tokenize
from rlbench.shapes.vocab import IMAGE_SIZE


class ShapesCLIP(Reward):
    """Shapes-world CLIP proxy: ``logit_scale.exp() * cos(image, prompt)`` of a tiny learned dual encoder.

    Args:
        weights: a folder written by ``python -m rlbench.shapes.clip_train --out DIR`` (a
            ``CLIPModel.from_pretrained`` folder with the tokenizer); default: the copy shipped in
            the package (``rlbench/shapes/proxies/clip``).
        device: where the model runs (``"cpu"``, ``"cuda"``, ...); it is moved there on the first
            call, never at construction. Scores come back on the images' device.
        batch_size: images (and distinct prompts) per forward pass.
    """

    name = "shapes-clip"
    version = "1"
    summary = ("Shapes-world learned proxy (CLIPScore/PickScore analogue): logit_scale.exp() * cosine of a "
               "tiny CLIP trained on limited (image, caption) pairs of the train prompts.")
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = ("[-s, s] with s = logit_scale.exp() <= 100; shipped weights: s = 18.08, own captions "
                   "~15.5, wrong captions ~0.5 on average")
    paper = ("CLIP, Radford et al. 2021, arXiv:2103.00020; score as PickScore, Kirstain et al. 2023, "
             "arXiv:2305.01569; rlbench shapes world (rlbench.shapes)")
    weights_spec = WeightsSpec(source="rlbench", filename="shapes/proxies/clip/model.safetensors",
                               sha256="03cbedc496de49140bd6894ab34b5ddc53c849ed336c0563b362589789d7cc56",
                               license="MIT")

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 256) -> None:
        self.batch_size = parse_batch_size(batch_size)
        folder = clip_folder(weights, reward=self.name, option="weights")
        if weights is not None:  # the card names the weights actually used
            self.weights_in_use = WeightsSpec(source=str(folder), filename="model.safetensors")
        self.folder = folder
        self.device = torch.device(device)
        self._model = None
        self._tokenizer = None

    def _load(self):
        if self._model is None:
            model, tokenizer = load_clip(self.folder)
            self._model, self._tokenizer = model.to(self.device), tokenizer
        return self._model, self._tokenizer

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings (N, D) of ``prompts`` (no gradient), ``batch_size`` prompts a forward."""
        model, tokenizer = self._load()
        with torch.no_grad():
            return torch.cat([text_embeds(model, tokenize(tokenizer, prompts[s : s + self.batch_size]).to(self.device))
                              for s in range(0, len(prompts), self.batch_size)])

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings (B, D), differentiable w.r.t. ``images`` (float (B, 3, H, W) in [0, 1])."""
        model, _ = self._load()
        x = images.to(self.device)
        return torch.cat([image_embeds(model, pixel_values(x[s : s + self.batch_size]))
                          for s in range(0, x.shape[0], self.batch_size)])

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        if images.shape[0] == 0:
            return RewardOutput(torch.zeros(0, dtype=torch.float32, device=images.device), {})
        model, _ = self._load()
        distinct = list(dict.fromkeys(prompts))
        where = {p: k for k, p in enumerate(distinct)}
        txt = self.text_embeddings(distinct)[torch.tensor([where[p] for p in prompts], device=self.device)]
        cosine = (self.image_embeddings(images) * txt).sum(dim=-1)
        scores = model.logit_scale.exp() * cosine
        return RewardOutput(scores.float().to(images.device), {"cosine": cosine.detach().cpu()})

    @classmethod
    def example_inputs(cls, batch_size: int = 3, image_size: int = IMAGE_SIZE, seed: int = 0
                       ) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Shapes-world renders with their captions, every third one with another image's caption —
        the same inputs as ``shapes-gold``'s checks (:meth:`ShapesGold.example_inputs`)."""
        from rlbench.rewards.shapes_gold import ShapesGold

        return ShapesGold.example_inputs(batch_size=batch_size, image_size=image_size, seed=seed)
