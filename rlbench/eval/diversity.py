"""Within-prompt diversity: the Vendi score and the mean pairwise distance of image features.

Vendi score (Friedman & Dieng, ICLR 2023): for ``n`` items with a positive semi-definite similarity
kernel ``K`` with ``K_ii = 1``, ``VS = exp(-sum_i l_i log l_i)`` where ``l_i`` are the eigenvalues of
``K / n`` — the exponential of the entropy of the kernel's spectrum, "the effective number of
distinct items": 1 when all items are identical, ``n`` when they are mutually orthogonal. Here ``K`` is
the cosine-similarity kernel of L2-normalised image features. Reward hacking often collapses it.

Mean pairwise distance: the mean of ``1 - cos(f_i, f_j)`` over pairs ``i < j`` (0 for identical images).

Features: the shapes world uses the vision tower of the shipped ``shapes-clip`` (works offline); other
models a named Hugging Face CLIP (e.g. ``openai/clip-vit-base-patch32``), loaded from the local cache
only: when its weights are absent the diversity section is skipped with a notice saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SHAPES_FEATURES = "shapes-clip"
DEFAULT_FEATURES = "openai/clip-vit-base-patch32"


def _normalise(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (n, d) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError("a feature vector is zero: cosine similarity is undefined")
    return x / norms


def vendi_score(features: np.ndarray) -> float:
    """``exp(entropy of the eigenvalues of K / n)``, ``K`` the cosine kernel of ``features`` (n, d)."""
    x = _normalise(features)
    n = x.shape[0]
    k = x @ x.T
    eig = np.linalg.eigvalsh((k + k.T) / 2 / n)
    eig = eig[eig > 1e-12]  # 0 log 0 = 0; tiny negatives are rounding
    return float(np.exp(-np.sum(eig * np.log(eig))))


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean of ``1 - cos`` over the ``n (n - 1) / 2`` pairs; 0.0 for a single item."""
    x = _normalise(features)
    n = x.shape[0]
    if n < 2:
        return 0.0
    sims = (x @ x.T)[np.triu_indices(n, k=1)]
    return float(np.mean(1.0 - sims))


@dataclass
class FeatureModel:
    """``embed(uint8 images (B, H, W, 3)) -> float32 (B, d)``; ``name`` says which model, for tables."""

    name: str
    embed: Callable[[np.ndarray], np.ndarray]
    version: str = "1"


def load_feature_model(name: str, device: str = "cpu") -> FeatureModel:
    """A feature model by name: ``shapes-clip``, ``pixels`` or a Hugging Face CLIP id (local cache only).

    Raises :class:`~rlbench.errors.WeightsNotAvailable` when a hub model's weights are not cached.
    """
    import torch

    if name == "pixels":  # raw pixels: always available; mostly for tests and sanity checks
        return FeatureModel("pixels", lambda im: np.asarray(im, dtype=np.float32).reshape(len(im), -1) / 255 + 1e-3)
    if name == SHAPES_FEATURES:
        from rlbench.shapes.clip_train import clip_folder, image_embeds, load_clip, pixel_values

        model, _ = load_clip(clip_folder(None, reward="diversity features", option="--features"))
        model.to(device)

        def embed(images: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255).to(device)
            with torch.no_grad():
                return image_embeds(model, pixel_values(x)).float().cpu().numpy()

        return FeatureModel("shapes-clip vision tower", embed)
    return _hub_clip(name, device)


def _hub_clip(name: str, device: str) -> FeatureModel:
    import torch

    from rlbench.errors import WeightsNotAvailable

    try:
        from transformers import CLIPImageProcessor, CLIPModel

        from rlbench.utils.hf import no_progress_bars

        with no_progress_bars():
            model = CLIPModel.from_pretrained(name, local_files_only=True).eval().to(device)
            processor = CLIPImageProcessor.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsNotAvailable(
            f"diversity features: the weights of {name!r} are not in the local Hugging Face cache "
            f"(fetch them once with `hf download {name}`, or pass --features shapes-clip|pixels|none)"
        ) from exc

    def embed(images: np.ndarray) -> np.ndarray:
        inputs = processor(images=list(images), return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.get_image_features(**inputs)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out.float().cpu().numpy()

    return FeatureModel(name, embed)
