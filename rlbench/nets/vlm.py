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

The in-process describer also serves the Qwen2.5-VL rewards (``vqascore``, ``unifiedreward``): per-image
questions and seeded sampling (:meth:`TransformersDescriber.generate`), the next-token distribution of one
forward (:meth:`TransformersDescriber.next_token_probs`), and an image resize hook, for Qwen
:func:`qwen_fetch_resize` (what ``qwen_vl_utils.process_vision_info`` does to each image in the official
scripts before the processor sees it).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from rlbench.errors import ConfigError, InputError, RLBenchError
from rlbench.nets.options import parse_device, parse_dtype, positive_int
from rlbench.service.protocol import is_loopback  # one definition, shared with the reward service
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


# qwen_vl_utils (QwenLM/Qwen2-VL qwen-vl-utils/src/qwen_vl_utils/vision_process.py, 487a12d): the official Qwen2.5-VL
# scripts (t2v_metrics qwen2vl_model.py, UnifiedReward qwen_point_score_image_generation.py) pass each image through
# process_vision_info -> fetch_image, which resizes it with PIL to these bounds before the processor sees it.
QWEN_IMAGE_FACTOR = 28  # vision_process.py IMAGE_FACTOR (patch 14 x spatial merge 2)
QWEN_MIN_PIXELS = 4 * 28 * 28  # vision_process.py MIN_PIXELS
QWEN_MAX_PIXELS = 16384 * 28 * 28  # vision_process.py MAX_PIXELS
QWEN_MAX_RATIO = 200  # vision_process.py MAX_RATIO


def qwen_smart_resize(height: int, width: int, factor: int = QWEN_IMAGE_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                      max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """qwen_vl_utils ``smart_resize``: (height, width) rounded to multiples of ``factor`` with the pixel count in
    [min_pixels, max_pixels], aspect ratio kept as closely as possible (transformers' own ``smart_resize`` differs
    in where it clamps to ``factor``)."""
    if max(height, width) / min(height, width) > QWEN_MAX_RATIO:
        raise InputError(f"an image of {width}x{height} pixels has an aspect ratio over {QWEN_MAX_RATIO}, "
                         "which Qwen2.5-VL's resize rejects; crop or pad it first.")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_fetch_resize(min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS) -> Callable:
    """The resize of qwen_vl_utils ``fetch_image`` as a function PIL image -> PIL image: :func:`qwen_smart_resize`
    then ``image.resize((w, h))`` (PIL's default filter for RGB, bicubic)."""
    min_pixels, max_pixels = positive_int("min_pixels", min_pixels), positive_int("max_pixels", max_pixels)
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")

    def resize(image):
        from PIL import Image

        width, height = image.size
        h, w = qwen_smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        return image if (w, h) == (width, height) else image.resize((w, h), Image.Resampling.BICUBIC)

    return resize


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


def backbone_of(model: str | os.PathLike | None, default: str) -> str:
    """How a reward's ``version`` names its VLM: the hub id, or ``local-<folder name>`` for a local copy."""
    text = default if model in (None, "") else os.fspath(model)
    path = Path(text).expanduser()
    return f"local-{path.name}" if path.exists() or text.startswith((".", "/", "~")) else text


class TransformersDescriber:
    """A transformers VLM answering questions about images, greedily (or seeded sampling), in batches.

    Args:
        model: hub id or local folder of an ``AutoModelForImageTextToText`` model with its
            ``AutoProcessor`` (chat template included); default LLaVA-1.5-7B (``llava-hf``).
        max_new_tokens: answer length cap (DDPO's LLaVA-server: 64).
        batch_size: images per ``generate`` call (or per forward of :meth:`next_token_probs`).
        device: where the model runs; moved there on first use.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; default float16 on CUDA (as DDPO ran
            LLaVA), float32 elsewhere.
        jpeg_quality: JPEG round trip before the processor, as DDPO's client (None: skip).
        reward, option: named in the missing-weights error.
        spec: the weights spec resolved (``model`` overrides its source); default :func:`vlm_spec` of ``model``.
        image_resize: applied to each PIL image after the JPEG round trip (e.g. :func:`qwen_fetch_resize`).

    Decoding is greedy (``do_sample=False``); every other setting (e.g. a repetition penalty) comes from the
    checkpoint's ``generation_config.json``, as a plain ``model.generate(**inputs, max_new_tokens=...)`` would.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, max_new_tokens: int = DDPO_MAX_TOKENS,
                 batch_size: int = 8, device: str | torch.device = "cpu", dtype: str | None = None,
                 jpeg_quality: int | None = DDPO_JPEG_QUALITY, reward: str = "vlm-bertscore",
                 option: str = "vlm", spec: WeightsSpec | None = None,
                 image_resize: Callable | None = None) -> None:
        self.max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        self.batch_size = positive_int("batch_size", batch_size)
        self.device = parse_device(device)
        self.dtype = (parse_dtype(dtype) if dtype is not None
                      else torch.float16 if self.device.type == "cuda" else torch.float32)
        self.jpeg_quality = _check_quality(jpeg_quality)
        self.model_name = None if model in (None, "") else model
        self.reward, self.option = reward, option
        self.spec = spec
        self.image_resize = image_resize
        self._model = None
        self._processor = None

    def resolve_path(self) -> Path:
        """The local folder of the VLM (no network unless online and not cached): what ``load`` reads."""
        spec = self.spec if self.spec is not None else vlm_spec(self.model_name, self.option)
        return resolve(spec, reward=self.reward, override=self.model_name)

    def load(self):
        """(model, processor), loaded from the resolved local folder on first use."""
        if self._model is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            from rlbench.utils.hf import no_progress_bars

            path: Path = self.resolve_path()
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

    def pil_images(self, images: torch.Tensor) -> list:
        """The PIL images the processor gets: uint8, the JPEG round trip unless disabled, ``image_resize``."""
        pil = to_pil(images, self.jpeg_quality)
        return pil if self.image_resize is None else [self.image_resize(im) for im in pil]

    def _chunks(self, images: torch.Tensor, questions: Sequence[str]):
        """The processor's inputs, on the device, per chunk of ``batch_size`` images (left-padded prompts)."""
        if len(questions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(questions)} questions; give one question per image")
        _, processor = self.load()
        prompts = {q: self.prompt(q) for q in dict.fromkeys(questions)}
        pil = self.pil_images(images)
        for s in range(0, len(pil), self.batch_size):
            texts = [prompts[q] for q in questions[s : s + self.batch_size]]
            inputs = processor(images=pil[s : s + self.batch_size], text=texts, return_tensors="pt", padding=True)
            yield {k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
                   for k, v in inputs.items()}

    @torch.no_grad()
    def generate(self, images: torch.Tensor, questions: Sequence[str], *, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        """The model's answer to ``questions[i]`` about image ``i``: greedy for ``temperature == 0``, else plain
        temperature sampling (no top-k/top-p) with the torch RNG seeded by ``seed`` for this call only (the
        caller's RNG state is restored). A sampled answer depends on the whole call: pass one image per call
        for answers that depend only on their own image, question and seed."""
        model, processor = self.load()
        questions = list(questions)
        if temperature:
            if seed is None:
                raise ValueError("sampling (temperature > 0) needs a seed, so that answers are reproducible")
            decoding = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        else:
            decoding = dict(do_sample=False)
        devices = [self.device] if self.device.type == "cuda" else []
        answers: list[str] = []
        with torch.random.fork_rng(devices=devices, enabled=bool(temperature)):
            if temperature:
                torch.manual_seed(int(seed))
            for inputs in self._chunks(images, questions):
                out = model.generate(**inputs, **decoding, num_beams=1, max_new_tokens=self.max_new_tokens,
                                     pad_token_id=processor.tokenizer.pad_token_id)
                new = out[:, inputs["input_ids"].shape[1]:]
                answers.extend(a.strip() for a in processor.batch_decode(new, skip_special_tokens=True))
        return answers

    def describe(self, images: torch.Tensor, question: str) -> list[str]:
        """The model's greedy answer to ``question`` for each image."""
        return self.generate(images, [question] * images.shape[0])

    @torch.no_grad()
    def next_token_probs(self, images: torch.Tensor, questions: Sequence[str], *,
                         repetition_penalty: float = 1.0) -> torch.Tensor:
        """(B, vocab) float32 on the CPU: the softmax over the vocabulary of the first answer token after each
        prompt, from one forward per chunk (the last position of the left-padded batch): what the first step of
        ``generate`` scores. ``repetition_penalty`` != 1 first applies the rule of transformers'
        ``RepetitionPenaltyLogitsProcessor`` to the tokens of the row's own prompt (padding excluded), as that first
        step does when the checkpoint's generation config sets one."""
        model, _ = self.load()
        probs = []
        for inputs in self._chunks(images, list(questions)):
            logits = model(**inputs).logits[:, -1].float()
            if repetition_penalty != 1.0:
                for row, (ids, mask) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"])):
                    seen = ids[mask.bool()].unique()
                    picked = logits[row, seen]
                    logits[row, seen] = torch.where(picked < 0, picked * repetition_penalty,
                                                    picked / repetition_penalty)
            probs.append(logits.softmax(dim=-1).cpu())
        return torch.cat(probs) if probs else torch.zeros(0, 0)


# -- OpenAI-compatible endpoint -----------------------------------------------------------------------


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
