"""Scoring evaluation images with rewards, and their diversity features, through the cache.

Images travel as uint8 (what is saved and hashed); a reward gets them as float32 ``uint8 / 255``.
A score is cached per (image content hash, reward name, options, reward version, prompt, prompt
metadata) when the reward declares itself deterministic; a nondeterministic reward is called every
time. A weighted sum of rewards is computed from its components' scores (``sum w_i s_i``, what
:mod:`rlbench.combine` computes), so its components are never scored twice.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlbench.eval.cache import NoCache, key_of
from rlbench.eval.plan import RewardSpec

Advance = Callable[[int], None]


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


class ImageStore:
    """Evaluation images by content hash: PNG files in ``folder`` (``images/<hash>.png``), or in memory."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, np.ndarray] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def name(h: str) -> str:
        return f"{h[:24]}.png"

    def put(self, h: str, image: np.ndarray | None = None, png: bytes | None = None) -> None:
        if self.folder is None:
            if h not in self.memory:
                self.memory[h] = image if image is not None else decode_png(png)
            return
        path = self.folder / self.name(h)
        if not path.exists():
            path.write_bytes(png if png is not None else encode_png(image))

    def get(self, hashes: Sequence[str]) -> np.ndarray:
        if self.folder is None:
            return np.stack([self.memory[h] for h in hashes])
        return np.stack([decode_png((self.folder / self.name(h)).read_bytes()) for h in hashes])


def as_float(images: np.ndarray):
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1], the reward contract's images."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)


def meta_json(metadata: Mapping[str, Any]) -> str:
    return json.dumps(dict(metadata), sort_keys=True, default=str)


def build_rewards(specs: Sequence[RewardSpec]) -> dict[str, Any]:
    """label -> CheckedReward for every spec that is scored directly (not derived from components)."""
    from rlbench.registry import make_reward

    return {s.label: make_reward(s.name, **s.option_dict) for s in specs if not s.components}


def score_entries(
    specs: Sequence[RewardSpec],
    rewards: Mapping[str, Any],
    entries: Sequence[tuple[str, str, str]],
    store: ImageStore,
    cache: NoCache,
    batch_size: int,
    task: Callable[[str, int], Advance] | None = None,
) -> dict[tuple[str, str, str, str], float]:
    """Scores of ``entries`` (image hash, prompt, metadata JSON), unique, with every reward of ``specs``.

    Returns ``{(reward label, hash, prompt, metadata JSON): score}``. Cached scores are read, the rest
    computed in batches of ``batch_size`` and committed to the cache batch by batch.
    """
    entries = list(dict.fromkeys(entries))
    out: dict[tuple[str, str, str, str], float] = {}
    for spec in specs:
        if spec.components:
            continue
        reward = rewards[spec.label]
        card = reward.card
        keys = [key_of("score", h, spec.name, spec.options, card.version, p, m) for h, p, m in entries]
        cached = cache.get_scores(keys) if card.deterministic else {}
        todo = [(k, e) for k, e in zip(keys, entries) if k not in cached]
        size = getattr(store, "size", None)  # images of several sizes (rlbench eval --images): one size a batch
        if size is not None:
            todo.sort(key=lambda t: size(t[1][0]))
        for k, (h, p, m) in zip(keys, entries):
            if k in cached:
                out[(spec.label, h, p, m)] = float(cached[k])
        advance = task(f"scoring {spec.label}", len(todo)) if task is not None and todo else None
        for chunk in _batches(todo, batch_size, size):
            images = as_float(store.get([h for _, (h, _, _) in chunk]))
            prompts = [p for _, (_, p, _) in chunk]
            metadata = [json.loads(m) for _, (_, _, m) in chunk]
            scores = reward(images, prompts, metadata).scores.detach().float().cpu().tolist()
            for (k, (h, p, m)), s in zip(chunk, scores):
                out[(spec.label, h, p, m)] = float(s)
            if card.deterministic:
                cache.put_scores([(k, s) for (k, _), s in zip(chunk, scores)])
            if advance is not None:
                advance(len(chunk))
    for spec in specs:
        if spec.components:
            for h, p, m in entries:
                out[(spec.label, h, p, m)] = float(sum(w * out[(c, h, p, m)] for c, w in spec.components))
    return out


def _batches(todo: list, batch_size: int, size: Callable[[str], Any] | None) -> list[list]:
    """Consecutive chunks of at most ``batch_size``; with ``size``, never two image sizes in one chunk."""
    out: list[list] = []
    for item in todo:
        if out and len(out[-1]) < batch_size and (size is None or size(out[-1][0][1][0]) == size(item[1][0])):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def reward_cards(specs: Sequence[RewardSpec], rewards: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the results record about each reward column."""
    cards = []
    for s in specs:
        if s.components:
            parts = [rewards[c].card for c, _ in s.components]
            version = "+".join(f"{c.name}@{c.version}" for c in parts)
            higher = all(c.higher_is_better for c in parts)
            deterministic = all(c.deterministic for c in parts)
        else:
            card = rewards[s.label].card
            version, higher, deterministic = card.version, card.higher_is_better, card.deterministic
        cards.append({"label": s.label, "name": s.name, "options": s.option_dict, "version": version,
                      "higher_is_better": higher, "deterministic": deterministic, "role": s.role,
                      "components": [list(c) for c in s.components]})
    return cards


def features_of(model: Any, hashes: Sequence[str], store: ImageStore, cache: NoCache,
                batch_size: int) -> dict[str, np.ndarray]:
    """Diversity feature vectors of unique images, through the cache."""
    hashes = list(dict.fromkeys(hashes))
    keys = [key_of("features", h, model.name, model.version) for h in hashes]
    cached = cache.get_features(keys)
    out = {h: cached[k] for h, k in zip(hashes, keys) if k in cached}
    todo = [(h, k) for h, k in zip(hashes, keys) if k not in cached]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        vecs = np.asarray(model.embed(store.get([h for h, _ in chunk])), dtype=np.float32)
        for (h, _), v in zip(chunk, vecs):
            out[h] = v
        cache.put_features([(k, v) for (_, k), v in zip(chunk, vecs)])
    return out
