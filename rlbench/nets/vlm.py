"""Describers: vision-language models that answer a question about each image of a batch.

A describer is any object with ``describe(images, question) -> list[str]``, ``images`` float
(B, 3, H, W) in [0, 1]. DDPO's alignment reward (ddpo-pytorch ``rewards.py llava_bertscore``) asks
LLaVA "Answer concisely: what is going on in this image?" and scores the answer with BERTScore;
two describers serve it:

* :class:`TransformersDescriber`: a VLM in this process through transformers
  (``AutoModelForImageTextToText`` + ``AutoProcessor``; LLaVA-1.5 by default), the processor's chat
  template, greedy decoding, left-padded batches: one ``generate`` per chunk of ``batch_size`` images;
* :class:`EndpointDescriber`: an OpenAI-compatible chat endpoint (vLLM, SGLang, TGI) over HTTP with
  JSON, one request per image, a few in flight at once; loopback only unless ``allow_remote=True``.

Both see what DDPO's LLaVA saw: images quantised as ``(x * 255).round().clamp(0, 255)`` to uint8
and passed through JPEG at quality 80 (ddpo-pytorch ``rewards.py``: ``pil.save(buffer, format="JPEG",
quality=80)`` before posting to kvablack/LLaVA-server). ``jpeg_quality=None`` skips the JPEG round
trip of the in-process describer; the endpoint always sends JPEG.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from rlbench.errors import ConfigError, RLBenchError
from rlbench.nets.options import parse_device, parse_dtype, positive_int
from rlbench.utils.images import to_uint8
from rlbench.weights import WeightsSpec, resolve

LLAVA = "llava-hf/llava-1.5-7b-hf"
# llava-hf/llava-1.5-7b-hf: safetensors shards, tokenizer, processor and chat template only (the
# repo's license: Llama 2 Community License, inherited from Vicuna/LLaMA-2).
LLAVA_SPEC = WeightsSpec(
    source=LLAVA,
    license="Llama 2 Community License",
    option="vlm",
    allow_patterns=("*.json", "*.safetensors", "tokenizer.model", "*.jinja"),
)
GENERIC_VLM_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
DDPO_JPEG_QUALITY = 80  # ddpo-pytorch rewards.py llava_bertscore: JPEG quality=80 before the request
DDPO_MAX_TOKENS = 64  # kvablack/LLaVA-server llava_server/llava.py MAX_TOKENS
DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"  # vLLM's `vllm serve` default port, loopback
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class VLMEndpointError(RLBenchError):
    """The VLM endpoint did not answer usefully (after the configured retries)."""


# -- images -------------------------------------------------------------------------------------------


def jpeg_bytes(image: np.ndarray, quality: int = DDPO_JPEG_QUALITY) -> bytes:
    """One (H, W, 3) uint8 image as JPEG bytes (PIL, ``quality``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def to_pil(images: torch.Tensor, jpeg_quality: int | None = DDPO_JPEG_QUALITY) -> list:
    """PIL RGB images of a batch, through a JPEG round trip at ``jpeg_quality`` unless it is None."""
    from PIL import Image

    out = []
    for arr in to_uint8(images, layout="hwc"):
        if jpeg_quality is None:
            out.append(Image.fromarray(arr))
        else:
            out.append(Image.open(io.BytesIO(jpeg_bytes(arr, jpeg_quality))).convert("RGB"))
    return out


def _check_quality(jpeg_quality: int | None) -> int | None:
    if jpeg_quality is None:
        return None
    if isinstance(jpeg_quality, bool) or not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100 or None, got {jpeg_quality!r}")
    return int(jpeg_quality)


# -- in-process transformers VLM ------------------------------------------------------------------


def vlm_spec(model: str | os.PathLike | None, option: str = "vlm") -> WeightsSpec:
    """Weights spec of a VLM by hub id (LLaVA-1.5-7B by default)."""
    from dataclasses import replace

    if model is None or str(model) == LLAVA:
        return replace(LLAVA_SPEC, option=option)
    return WeightsSpec(source=str(model), option=option, allow_patterns=GENERIC_VLM_PATTERNS)


class TransformersDescriber:
    """A transformers VLM answering one question about each image, greedily, in batches.

    Args:
        model: hub id or local folder of an ``AutoModelForImageTextToText`` model with its
            ``AutoProcessor`` (chat template included); default LLaVA-1.5-7B (``llava-hf``).
        max_new_tokens: answer length cap (DDPO's LLaVA-server: 64).
        batch_size: images per ``generate`` call.
        device: where the model runs; moved there on first use.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; default float16 on CUDA (as DDPO ran
            LLaVA), float32 elsewhere.
        jpeg_quality: JPEG round trip before the processor, as DDPO's client (None: skip).
        reward, option: named in the missing-weights error.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, max_new_tokens: int = DDPO_MAX_TOKENS,
                 batch_size: int = 8, device: str | torch.device = "cpu", dtype: str | None = None,
                 jpeg_quality: int | None = DDPO_JPEG_QUALITY, reward: str = "vlm-bertscore",
                 option: str = "vlm") -> None:
        self.max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        self.batch_size = positive_int("batch_size", batch_size)
        self.device = parse_device(device)
        self.dtype = (parse_dtype(dtype) if dtype is not None
                      else torch.float16 if self.device.type == "cuda" else torch.float32)
        self.jpeg_quality = _check_quality(jpeg_quality)
        self.model_name = None if model in (None, "") else model
        self.reward, self.option = reward, option
        self._model = None
        self._processor = None

    def load(self):
        """(model, processor), loaded from the resolved local folder on first use."""
        if self._model is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            from rlbench.utils.hf import no_progress_bars

            path: Path = resolve(vlm_spec(self.model_name, self.option), reward=self.reward,
                                 override=self.model_name)
            with no_progress_bars():
                processor = AutoProcessor.from_pretrained(str(path))
                model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=self.dtype)
            tokenizer = getattr(processor, "tokenizer", None)
            if tokenizer is None or getattr(processor, "chat_template", None) is None:
                raise ConfigError(f"the VLM folder {path} has no tokenizer or no chat template in its processor; "
                                  "the describer needs both (AutoProcessor with a chat_template).")
            tokenizer.padding_side = "left"  # decoder-only batches: pad on the left
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            model.eval().requires_grad_(False).to(self.device)
            self._model, self._processor = model, processor
        return self._model, self._processor

    def prompt(self, question: str) -> str:
        """The chat-template prompt: one user turn with the image and the question, then the assistant cue."""
        _, processor = self.load()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.no_grad()
    def describe(self, images: torch.Tensor, question: str) -> list[str]:
        """The model's greedy answer to ``question`` for each image."""
        model, processor = self.load()
        text = self.prompt(question)
        pil = to_pil(images, self.jpeg_quality)
        answers: list[str] = []
        for s in range(0, len(pil), self.batch_size):
            chunk = pil[s : s + self.batch_size]
            inputs = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
            inputs = {k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
                      for k, v in inputs.items()}
            out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                 pad_token_id=processor.tokenizer.pad_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers.extend(a.strip() for a in processor.batch_decode(new, skip_special_tokens=True))
        return answers


# -- OpenAI-compatible endpoint -----------------------------------------------------------------------


def is_loopback(host: str | None) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class EndpointDescriber:
    """A VLM behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, TGI).

    One JSON request per image: a user message with the image as a ``data:image/jpeg;base64`` URL
    (JPEG quality ``jpeg_quality``, DDPO's 80) and the question, ``temperature`` 0, ``max_tokens``.
    Up to ``concurrency`` requests are in flight. Failures that may pass (connection errors,
    timeouts, HTTP 408/425/429/5xx) are retried ``retries`` times with exponential back-off
    (``backoff_s``, then twice that, ...); anything else, or the last failure, raises
    :class:`VLMEndpointError`.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (POSTs go to ``{base_url}/chat/completions``).
        model: the model name the server serves (the request's ``model`` field).
        max_tokens, timeout_s, retries, backoff_s, concurrency: as above; ``timeout_s`` bounds each
            connection attempt and each wait for data.
        api_key_env: name of an environment variable holding a bearer token (sent only if set).
        allow_remote: permit a host other than localhost/127.0.0.0/8/::1.
    """

    def __init__(self, base_url: str = DEFAULT_ENDPOINT, model: str = LLAVA, *, max_tokens: int = DDPO_MAX_TOKENS,
                 timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0, concurrency: int = 4,
                 api_key_env: str | None = "RLBENCH_VLM_API_KEY", allow_remote: bool = False,
                 jpeg_quality: int = DDPO_JPEG_QUALITY) -> None:
        parsed = urllib.parse.urlsplit(str(base_url))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"endpoint_url must be an http(s) URL such as {DEFAULT_ENDPOINT}, got {base_url!r}")
        if not allow_remote and not is_loopback(parsed.hostname):
            raise ConfigError(
                f"endpoint_url {base_url!r} is not on this machine (loopback); images would leave it. "
                "Pass allow_remote=True (--reward-opt allow_remote=true) to send them to a remote server."
            )
        if not float(timeout_s) > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if isinstance(retries, bool) or int(retries) != retries or int(retries) < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if float(backoff_s) < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")
        if not model:
            raise ValueError("the endpoint model name must be a non-empty string")
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.model = str(model)
        self.max_tokens = positive_int("max_tokens", max_tokens)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.concurrency = positive_int("concurrency", concurrency)
        self.api_key_env = api_key_env
        if jpeg_quality is None:
            raise ValueError("the endpoint describer sends JPEG: jpeg_quality must be in 1..100")
        self.jpeg_quality = _check_quality(jpeg_quality)
        # Loopback traffic never goes through an HTTP proxy from the environment.
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def payload(self, jpeg: bytes, question: str) -> dict:
        """The request body for one image."""
        data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": question},
            ]}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, body: bytes) -> str:
        request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        with self._opener.open(request, timeout=self.timeout_s) as response:
            raw = response.read()
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise VLMEndpointError(
                f"the VLM endpoint {self.url} answered with something other than a chat completion "
                f"({type(exc).__name__}: {exc}); first bytes: {raw[:200]!r}"
            ) from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return (content or "").strip()

    def ask(self, jpeg: bytes, question: str) -> str:
        """The answer for one JPEG image, with the bounded retries."""
        body = json.dumps(self.payload(jpeg, question)).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._post(body)
            except urllib.error.HTTPError as exc:
                try:
                    detail = exc.read()[:300].decode("utf-8", "replace") if exc.fp is not None else ""
                except (OSError, http.client.HTTPException):
                    detail = ""
                last = f"HTTP {exc.code} {exc.reason}: {detail}".strip()
                if exc.code not in RETRY_STATUS:
                    raise VLMEndpointError(f"the VLM endpoint {self.url} refused the request: {last}") from None
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise VLMEndpointError(
            f"the VLM endpoint {self.url} did not answer after {self.retries + 1} attempts "
            f"(timeout {self.timeout_s:g} s each); last error: {last}. Is the server running "
            "(e.g. `vllm serve llava-hf/llava-1.5-7b-hf`)? Raise timeout_s/retries for a slow server."
        )

    def describe(self, images: torch.Tensor, question: str) -> list[str]:
        """The endpoint's answer to ``question`` for each image, in order."""
        jpegs = [jpeg_bytes(a, self.jpeg_quality) for a in to_uint8(images, layout="hwc")]
        if not jpegs:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(jpegs)))
        try:
            return list(pool.map(lambda j: self.ask(j, question), jpegs))
        finally:  # on a failure, requests not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)
