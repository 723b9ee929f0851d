"""A client of the reward service: the standard library's ``urllib`` and numpy, no torch.

:class:`ServiceClient` speaks :mod:`rlbench.service.protocol`: each call is one HTTP request (a new connection),
with a timeout per attempt and bounded retries with exponential back-off on what may pass (connection refused
or reset, timeouts, HTTP 429/502/503/504). Anything else, or the last failure, raises
:class:`~rlbench.errors.RemoteRewardError`: one line naming the service's URL. The ``remote`` reward
(``rewards/remote.py``) wraps it; the load generator of :mod:`rlbench.service.process` uses it in plain
processes.
"""

from __future__ import annotations

import http.client
import itertools
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlbench.errors import ConfigError, RemoteRewardError
from rlbench.service import protocol as wire

MAX_BACKOFF_S = 10.0
_ids = itertools.count()


@dataclass
class Scored:
    scores: np.ndarray  # (B,) float32
    info: dict[str, Any]
    batch: dict[str, int]  # the server batch it was scored in: {"requests": r, "images": n}


class ServiceClient:
    """Requests to one reward service at ``url`` (``http://HOST:PORT``).

    Args:
        url: the service root, as ``rlbench rewards serve`` prints it.
        token: the shared secret, sent as ``Authorization: Bearer``; None for a loopback service without one.
        timeout_s: bound of each connection attempt and each wait for data.
        retries: attempts after the first, on failures that may pass.
        backoff_s: wait before the first retry; doubled for each next one (at most 10 s).
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5) -> None:
        parsed = urllib.parse.urlsplit(str(url))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"the reward service url must look like http://127.0.0.1:8500 (what `rlbench rewards "
                              f"serve` prints), got {url!r}.")
        if not float(timeout_s) > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}.")
        if isinstance(retries, bool) or int(retries) != retries or int(retries) < 0:
            raise ConfigError(f"retries must be an integer >= 0, got {retries!r}.")
        if float(backoff_s) < 0:
            raise ConfigError(f"backoff_s must be >= 0, got {backoff_s!r}.")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.token = token
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        # Loopback traffic never goes through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if wire.is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    # -- endpoints ------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.request("GET", wire.HEALTH)

    def card(self, reward: str) -> dict[str, Any]:
        return self.request("GET", f"{wire.REWARDS}/{urllib.parse.quote(reward, safe='')}")

    def example(self, reward: str, batch_size: int, image_size: int, seed: int
                ) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
        query = urllib.parse.urlencode({"batch_size": batch_size, "image_size": image_size, "seed": seed})
        doc = self.request("GET", f"{wire.REWARDS}/{urllib.parse.quote(reward, safe='')}/example?{query}")
        try:
            images = wire.decode_images(doc["images"], wire.Limits())  # the server caps examples below these
            return images, list(doc["prompts"]), list(doc["metadata"])
        except (wire.ProtocolError, KeyError, TypeError) as exc:
            raise RemoteRewardError(f"the reward service at {self.url} sent unreadable example inputs: {exc}") from None

    def score(self, reward: str, images: np.ndarray, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any]], request_id: str | None = None) -> Scored:
        """Scores of ``images`` ((B, H, W, 3) uint8) under the served ``reward``."""
        request_id = request_id or f"{os.getpid()}-{next(_ids)}"
        body = wire.score_request(reward, images, prompts, metadata, request_id)
        doc = self.request("POST", wire.SCORE, body)
        try:
            scores, info, batch = wire.parse_score_answer(doc, request_id, images.shape[0])
        except wire.ProtocolError as exc:
            raise RemoteRewardError(f"the reward service at {self.url} gave a bad answer to a score request: "
                                    f"{exc}") from None
        return Scored(scores, info, batch)

    # -- transport --------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        """One JSON request with the bounded retries; the decoded answer."""
        headers = {"Accept": "application/json", **wire.auth_headers(self.token)}
        if body is not None:
            headers["Content-Type"] = "application/json"
        last = ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return wire.loads(raw, "the answer")
                except wire.ProtocolError as exc:
                    raise RemoteRewardError(f"the reward service at {self.url} answered {method} {path} with "
                                            f"something else than JSON ({exc}); is that URL a reward service?"
                                            ) from None
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {_error_message(exc)}"
                if exc.code not in wire.RETRY_STATUS:
                    raise RemoteRewardError(f"the reward service at {self.url} refused {method} {path}: {last}"
                                            ) from None
            except (OSError, http.client.HTTPException) as exc:  # URLError, refused, reset, timeouts
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.retries:
                time.sleep(min(self.backoff_s * 2**attempt, MAX_BACKOFF_S))
        raise RemoteRewardError(
            f"the reward service at {self.url} did not answer {method} {path} after {self.retries + 1} attempt(s) "
            f"(timeout {self.timeout_s:g} s each); last error: {wire.one_line(last, 300)}. Is `rlbench rewards serve` "
            "running there? Start it (the same --port), or raise timeout_s/retries for a slow service.")


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The ``error`` line of an error answer, else the start of its body."""
    try:
        raw = exc.read() if exc.fp is not None else b""
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        doc = wire.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return wire.one_line(doc["error"])
    except wire.ProtocolError:
        pass
    return wire.one_line(raw[:300].decode("utf-8", "replace") or str(exc.reason))
