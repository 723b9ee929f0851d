"""``remote``: a reward served by ``rlbench rewards serve`` in another process, environment or machine.

Used like any reward::

    rlbench train --reward remote --reward-opt url=http://127.0.0.1:8500 --reward-opt reward=pickscore
    rlbench train --reward incompressibility:1,remote:0.5 --reward-opt remote.url=... --reward-opt remote.reward=...

The card (version, direction, determinism, range, paper) is the served reward's, fetched from the service at
construction (``GET /v1/rewards/NAME``), so results record what was scored; a service that is down fails the
construction, before any model loads. Each call quantises the images to uint8 with
:func:`rlbench.utils.images.to_uint8` (numpy only for CPU tensors: no torch op, so ``sample.async_reward`` keeps
one OpenMP team), sends them as base64 ``.npy`` in JSON (:mod:`rlbench.service.protocol`) and returns the
served scores; a batch larger than the service's per-request limit goes in several requests. The served reward
sees ``uint8 / 255`` - for the zoo's rewards, which quantise to uint8 themselves, the same scores as in-process.
Not differentiable. Transport: :mod:`rlbench.service.client` (urllib; timeouts, bounded retries with back-off;
every failure is a :class:`~rlbench.errors.RemoteRewardError` naming the URL - no score is ever made up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlbench.errors import ConfigError, InputError
from rlbench.reward import Reward, RewardOutput
from rlbench.service import protocol as wire
from rlbench.service.client import ServiceClient
from rlbench.utils.images import to_uint8

CARD_FIELDS = ("version", "higher_is_better", "deterministic", "score_range", "paper")


class Remote(Reward):
    """A reward served over HTTP by ``rlbench rewards serve``; its card is the served reward's.

    Args:
        url: the service, e.g. ``http://127.0.0.1:8500`` (what ``rlbench rewards serve`` prints).
        reward: the served reward's name (one of those the service was started with).
        token: the service's secret (``--token-file`` there). Prefer ``token_file``: an option is written into
            the run's config.toml.
        token_file: a file holding that secret.
        timeout_s: bound of each connection attempt and each wait for an answer.
        retries: attempts after the first on failures that may pass (refused, reset, timeout, HTTP 429/502/503/504).
        backoff_s: wait before the first retry, doubled for each next one.
    """

    name = "remote"
    version = "1"
    summary = ("A reward served over HTTP by `rlbench rewards serve` (options url=, reward=); its card is the "
               "served one's.")
    differentiable = False
    score_range = "the served reward's"

    def __init__(self, url: str = "", reward: str = "", token: str | None = None, token_file: str | Path | None = None,
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5) -> None:
        if not url or not reward:
            raise ConfigError("reward 'remote' needs the service and the served reward: --reward-opt "
                              "url=http://127.0.0.1:8500 --reward-opt reward=NAME (start one with "
                              "`rlbench rewards serve NAME`).")
        if token and token_file:
            raise ConfigError("reward 'remote': give token or token_file, not both.")
        if token_file:
            token = wire.read_token(token_file, "token_file")
        self.served = str(reward)
        self.client = ServiceClient(url, token=token or None, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
        self.url = self.client.url
        card = self.client.card(self.served)
        self.served_card = {k: v for k, v in card.items() if k not in ("limits", "max_batch", "protocol")}
        for key in CARD_FIELDS:
            if key in card:
                setattr(self, key, card[key])
        self.version = str(self.version)
        self.name = str(card.get("name", self.served))
        self.summary = f"{self.name} served at {self.url}: {card.get('summary', '')}".rstrip(": ")
        self.max_images = int(card.get("limits", {}).get("max_images", wire.Limits().max_images))

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        if images.shape[0] == 0:
            return RewardOutput(torch.zeros(0, dtype=torch.float32, device=images.device), {})
        # CPU images quantise with numpy only (no torch op in a reward thread); others on their device.
        arrays = (to_uint8(images.detach().to(torch.float32).numpy(), layout="hwc") if images.device.type == "cpu"
                  else to_uint8(images, layout="hwc"))
        prompts, metadata = list(prompts), [dict(m) for m in metadata]
        scores, infos, sizes = [], [], []
        for start in range(0, len(arrays), self.max_images):
            stop = start + self.max_images
            try:
                got = self.client.score(self.served, arrays[start:stop], prompts[start:stop], metadata[start:stop])
            except TypeError as exc:
                raise InputError(f"reward 'remote' sends metadata as JSON, and this metadata is not JSON: {exc}"
                                 ) from None
            scores.append(got.scores)
            infos.append(got.info)
            sizes.append(len(got.scores))
        info = wire.merge_infos(infos, sizes)
        if isinstance(info.get("components"), dict):  # a served combination: its parts, as training logs them
            info["components"] = {k: torch.tensor(v, dtype=torch.float32) for k, v in info["components"].items()}
        return RewardOutput(torch.from_numpy(np.concatenate(scores)).to(images.device), info)

    def example_inputs(self, batch_size: int = 3, image_size: int = 64, seed: int = 0
                       ) -> tuple[torch.Tensor, list[str], list[dict]]:
        """The served reward's own example inputs (a shapes reward needs shapes captions), from the service."""
        arrays, prompts, metadata = self.client.example(self.served, batch_size, image_size, seed)
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255).contiguous(), prompts, metadata
