"""``aesthetic``: the LAION improved aesthetic predictor v2, as DDPO's aesthetic reward computes it.

Score of an image (the prompt is not used)::

    e = CLIP-ViT-L/14 image embedding (768-d projection);  score = MLP(e / ||e||_2)

with the MLP of christophschuhmann/improved-aesthetic-predictor (``simple_inference.py`` ``class MLP``):
``Linear(768,1024) Dropout(0.2) Linear(1024,128) Dropout(0.2) Linear(128,64) Dropout(0.1) Linear(64,16)
Linear(16,1)`` — the ReLUs are commented out upstream, so at eval time the head is one affine map of the
unit embedding — loaded from ``sac+logos+ava1-l14-linearMSE.pth`` (state-dict keys ``layers.{0,2,4,6,7}``).

The CLIP is transformers' ``openai/clip-vit-large-patch14``, exactly as ddpo-pytorch's
``aesthetic_scorer.py`` uses it (L35-53: the HF port of OpenAI's ``clip.load("ViT-L/14")``), with that
repo's processor. Pre-processing, option ``preprocess``:

* ``"ddpo"`` (default): ddpo-pytorch's. Images quantised to uint8 (``(x*255).round()``, ddpo-pytorch
  ``rewards.py``), then transformers' ``CLIPImageProcessor`` (``aesthetic_scorer.py`` L48): PIL bicubic
  resize of the short side to 224, the long side ``int(224 * long / short)`` (transformers
  ``image_transforms.get_resize_output_image_size``), centre crop 224 at the *floored* offset
  ``(H - 224) // 2`` (``image_transforms.center_crop``), rescale 1/255, CLIP normalisation
  (:class:`rlbench.nets.clip.PixelSpec`).
* ``"laion"``: the predictor's own ``simple_inference.py`` (L103-108: ``clip.load("ViT-L/14")`` and its
  ``preprocess``, OpenAI CLIP ``clip/clip.py`` ``_transform`` L79-86): torchvision ``Resize(224,
  BICUBIC)`` on the PIL image (the same PIL resize and ``int()`` long side, torchvision
  ``_compute_resized_output_size``), ``CenterCrop(224)`` at the *rounded* offset ``int(round((H - 224) /
  2))`` (torchvision ``functional.center_crop``; Python ``round``, half to even), ``ToTensor``,
  ``Normalize`` with the same constants. The uint8 quantisation is the same (a PIL image holds uint8).

The two differ only by one pixel of crop offset, and only when ``(resized long side - 224) / 2`` is
``k + 0.5`` with ``k`` odd (e.g. 640x427: offset 55 vs 56); square images (all of DDPO's, 512x512) score
the same. ``"ddpo"`` is the default because this reward is DDPO's aesthetic reward: every other step
(the HF CLIP port, the quantisation) is ddpo-pytorch's, the DDPO paper's numbers come from it, and the
default scores stay those of version 1 (which the ``ddpo-paper`` aesthetic specs pin), so the version is
unchanged. ``"laion"`` reproduces the predictor's authors' pixels; the network is still the HF port of the
same weights (``simple_inference.py`` runs OpenAI's, in float16 on a GPU). With ``images.requires_grad``
under grad mode the float pre-processing (same crop rule) keeps the graph instead.

Range: trained on 1-10 ratings; natural images score ~4-7. Over the unit sphere the head spans about
[-12.8, 23.2] (5.2366 + w.e with ||w|| = 18.0, computed from the weights in the rlbench reference), the
headroom aesthetic-optimised diffusion models exploit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlbench.errors import ConfigError, WeightsNotAvailable
from rlbench.nets import clip as cm
from rlbench.nets.options import parse_batch_size, parse_device, parse_dtype
from rlbench.reward import Reward
from rlbench.weights import WeightsSpec, resolve

# improved-aesthetic-predictor simple_inference.py MLP: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropouts in between.
MLP_DIMS = (768, 1024, 128, 64, 16, 1)
MLP_DROPOUT = (0.2, 0.2, 0.1)
MLP_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))

# preprocess= option: whose pre-processing (see the module docstring) -> centre-crop offset rule.
PREPROCESS = {"ddpo": "floor", "laion": "round"}

# Weights file in the repo root (GitHub raw URL as ImageReward/utils.py _SCORES["Aesthetic"] fetches it);
# sha256 from the rlbench reference (byte-identical to ddpo-pytorch ddpo_pytorch/assets/).
MLP_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
MLP_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (no activations, as upstream)."""

    def __init__(self) -> None:
        super().__init__()
        d = MLP_DIMS
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(MLP_DROPOUT[0]),
            nn.Linear(d[1], d[2]), nn.Dropout(MLP_DROPOUT[1]),
            nn.Linear(d[2], d[3]), nn.Dropout(MLP_DROPOUT[2]),
            nn.Linear(d[3], d[4]),
            nn.Linear(d[4], d[5]),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed)


def _mlp_file(path: Path, option: str) -> Path:
    """The .pth inside ``path`` (a file, or a folder such as a hub snapshot holding exactly one)."""
    if path.is_file():
        return path
    found = sorted(p for p in path.glob("*.pth") if p.is_file()) if path.is_dir() else []
    if len(found) != 1:
        raise WeightsNotAvailable(
            f"{option}={str(path)!r}: expected the aesthetic head's .pth file (or a folder holding exactly one), "
            f"found {[p.name for p in found] or 'none'}."
        )
    return found[0]


def load_mlp(path: Path, option: str = "weights") -> AestheticMLP:
    """Load ``sac+logos+ava1-l14-linearMSE.pth`` (a plain state dict) strictly into :class:`AestheticMLP`."""
    path = _mlp_file(Path(path), option)
    state = cm.load_tensors(path, option)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    mlp = AestheticMLP()
    expected = mlp.state_dict()
    if not isinstance(state, Mapping) or set(state) != set(expected):
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise WeightsNotAvailable(
            f"{path} is not an improved-aesthetic-predictor head: expected the keys {', '.join(MLP_KEYS)}, got {keys}."
        )
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise WeightsNotAvailable(
            f"{path}: the head must be {'-'.join(map(str, MLP_DIMS))} (OpenAI CLIP ViT-L/14 embeddings); "
            f"wrong shapes: {'; '.join(bad)}."
        )
    mlp.load_state_dict(state, strict=True)
    return mlp.eval().requires_grad_(False)


class Aesthetic(Reward):
    """LAION aesthetic predictor v2: a linear head on unit OpenAI CLIP ViT-L/14 image embeddings (1-10 scale).

    Args:
        weights: the head's ``.pth`` (local file, or a folder/hub repo holding one); default: the
            original ``sac+logos+ava1-l14-linearMSE.pth`` (GitHub URL, sha256-checked).
        clip: the CLIP (transformers ``CLIPModel`` folder with its processor files, or hub id);
            default ``openai/clip-vit-large-patch14``. Its projection must be 768-d.
        device: where the models run; they move there on the first call, never at construction.
        dtype: CLIP dtype, ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` (the head runs in float32).
        batch_size: images per CLIP forward.
        preprocess: ``"ddpo"`` (default: ddpo-pytorch's transformers ``CLIPImageProcessor``, floored crop
            offset) or ``"laion"`` (``simple_inference.py``'s OpenAI CLIP ``preprocess``, rounded offset);
            they differ on some non-square images only.
    """

    name = "aesthetic"
    version = "1"  # the default preprocess="ddpo" is version 1's arithmetic, unchanged (issue 18 added "laion")
    summary = ("LAION improved aesthetic predictor v2 (DDPO's aesthetic reward): linear MLP on the unit "
               "OpenAI CLIP ViT-L/14 image embedding; prompt unused. Pre-processing: ddpo-pytorch's CLIPProcessor "
               "(default, preprocess=ddpo) or simple_inference.py's OpenAI CLIP preprocess (preprocess=laion); they "
               "differ by one pixel of crop offset on some non-square images.")
    higher_is_better = True
    deterministic = True
    differentiable = True
    score_range = ("1-10 rating scale (natural images ~4-7); unbounded affine head, about [-12.8, 23.2] "
                   "over all unit embeddings")
    paper = ("LAION-Aesthetics predictor v2, Schuhmann 2022 (github.com/christophschuhmann/improved-aesthetic-"
             "predictor); CLIP, Radford et al. 2021, arXiv:2103.00020; DDPO, Black et al. 2023, arXiv:2305.13301")
    weights_spec = (
        WeightsSpec(source=MLP_URL, sha256=MLP_SHA256, license="Apache-2.0", option="weights"),
        WeightsSpec(source="openai/clip-vit-large-patch14", license="MIT", option="clip", allow_patterns=cm.HF_CLIP_FILES),
    )

    def __init__(self, weights: str | Path | None = None, clip: str | Path | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32, preprocess: str = "ddpo") -> None:
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {', '.join(map(repr, PREPROCESS))}, got {preprocess!r}")
        self.preprocess = preprocess
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = parse_batch_size(batch_size)
        self.overrides = {"weights": weights, "clip": clip}
        self.weights_in_use = cm.used_specs(self.weights_spec, self.overrides)  # the card names what is used
        self._clip = self._mlp = self._pixels = None

    def _load(self):
        if self._clip is None:
            mlp_spec, clip_spec = self.weights_spec
            mlp = load_mlp(resolve(mlp_spec, reward=self.name, override=self.overrides["weights"]))
            folder = resolve(clip_spec, reward=self.name, override=self.overrides["clip"])
            pixels = replace(cm.PixelSpec.from_folder(folder, "clip"), crop=PREPROCESS[self.preprocess])
            clip = cm.load_hf_clip(folder, option="clip", device=self.device, dtype=self.dtype)
            if clip.config.projection_dim != MLP_DIMS[0]:
                raise ConfigError(
                    f"the aesthetic head takes {MLP_DIMS[0]}-d OpenAI CLIP ViT-L/14 image embeddings, but the CLIP "
                    f"at {folder} projects to {clip.config.projection_dim}-d; pass clip=openai/clip-vit-large-patch14 "
                    "(or a local copy of it)."
                )
            self._clip, self._mlp, self._pixels = clip, mlp.to(self.device), pixels
        return self._clip, self._mlp, self._pixels

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> torch.Tensor:
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        clip, mlp, pixels = self._load()
        embed = cm.image_features(clip, pixels, images, self.batch_size, self.device, self.dtype)
        with torch.set_grad_enabled(cm.wants_grad(images)):
            scores = mlp(embed).squeeze(-1)
        return scores.float().to(images.device)
