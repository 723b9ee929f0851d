"""The reward service's wire format, limits and status codes: the one copy the server
(:mod:`rlbench.service.server`) and the client (:mod:`rlbench.service.client`, behind the ``remote`` reward) share.

HTTP/1.1 with JSON bodies (UTF-8). Images travel inside the JSON as the base64 of an ``.npy`` file (format 1.0
or 2.0) holding one C-order ``uint8`` array of shape ``(B, H, W, 3)``: RGB, channels last, the bytes
:func:`rlbench.utils.images.to_uint8` makes from the contract's float images (the quantisation every zoo
pipeline that goes through PIL applies anyway). Decoding never runs ``np.load``: it reads the magic and the
header with numpy's header parser (a dict literal read by ``ast.literal_eval``: nothing executes), checks dtype,
order, shape and limits, and only then maps the bytes with ``np.frombuffer`` - so an object (pickle) array is
refused unread, and a header that declares a huge array allocates nothing.

Endpoints (all under ``/v1``; with a token, every one needs ``Authorization: Bearer TOKEN``)::

    GET  /v1/health               {"status": "ok", "protocol": 1, "rewards": [...], "max_batch": N,
                                   "limits": {...}, "stats": {...batch sizes seen...}}
    GET  /v1/rewards              {"rewards": [card, ...]}
    GET  /v1/rewards/NAME         card (rlbench.reward.RewardCard fields) + "limits" + "max_batch"
    GET  /v1/rewards/NAME/example?batch_size=3&image_size=64&seed=0
                                  {"images": NPY, "prompts": [...], "metadata": [...]}  (check_reward's inputs)
    POST /v1/score                {"reward": NAME, "images": NPY, "prompts": [B strings],
                                   "metadata": [B objects] (optional), "id": "..." (optional, echoed)}
                               -> {"id": ..., "reward": NAME, "scores": [B floats], "info": {...},
                                   "batch": {"requests": r, "images": n}}  (the server batch it was scored in)

Every error is ``{"error": "one line", "status": CODE}``: 400 malformed request, 401 token missing, 403 token
wrong, 404 unknown reward or path, 405 wrong method, 413 over a limit, 422 the reward refused the inputs (an
``InputError``, e.g. a prompt it cannot parse), 500 the reward failed, 503 busy or shutting down (retried by
the client, with 429/502/504). A score is never made up: a request whose reward call fails gets an error.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import ipaddress
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlbench.errors import ConfigError

PROTOCOL = 1
HEALTH = "/v1/health"
REWARDS = "/v1/rewards"
SCORE = "/v1/score"
RETRY_STATUS = frozenset({429, 502, 503, 504})  # may pass on a retry; anything else will not
REQUEST_FIELDS = ("reward", "images", "prompts", "metadata", "id")


@dataclass(frozen=True)
class Limits:
    """What one request may carry (``rlbench rewards serve --max-body-mb/--max-images``)."""

    max_body_bytes: int = 256 * 2**20
    max_images: int = 256  # per request
    max_side: int = 4096  # pixels, height and width each
    max_prompt_chars: int = 20_000
    max_id_chars: int = 200

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ProtocolError(ValueError):
    """A request (or answer) that breaks the protocol, with the HTTP status that says so."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(one_line(message))
        self.status = status


def one_line(text: str, limit: int = 1000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# -- tokens ---------------------------------------------------------------------------------------------


def read_token(path: str | Path, flag: str) -> str:
    """The secret in a token file (surrounding white space stripped); ConfigError if missing or empty."""
    p = Path(path).expanduser()
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {str(p)!r} cannot be read ({exc}); write the shared secret into it, "
                          "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE.") from None
    if not token:
        raise ConfigError(f"{flag} {str(p)!r} is empty; write the shared secret into it.")
    return token


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_token(header: str | None, token: str | None) -> None:
    """401 without a bearer token, 403 with a wrong one (compared in constant time); nothing without a token."""
    if token is None:
        return
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ProtocolError(401, "this reward service needs a token: send 'Authorization: Bearer TOKEN' "
                                 "(the remote reward's token_file=FILE option).")
    if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        raise ProtocolError(403, "wrong token for this reward service.")


# -- images ---------------------------------------------------------------------------------------------


def encode_images(images: np.ndarray) -> str:
    """``(B, H, W, 3)`` uint8 -> base64 text of its ``.npy`` file (no pickle)."""
    return _npy_base64(images).decode("ascii")


def _npy_base64(images: np.ndarray) -> bytes:
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] == 3):
        raise ValueError(f"images to send must be a (B, H, W, 3) uint8 array, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(images), allow_pickle=False)
    return base64.b64encode(buffer.getvalue())


def decode_images(text: Any, limits: Limits, field: str = "images") -> np.ndarray:
    """base64 ``.npy`` text -> a writable ``(B, H, W, 3)`` uint8 array, checked before any data is touched."""
    if not isinstance(text, str):
        raise ProtocolError(400, f"'{field}' must be a string: the base64 of a .npy file of a (B, H, W, 3) uint8 "
                                 f"array, got {type(text).__name__}.")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(400, f"'{field}' is not valid base64.") from None
    fp = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]} is not taken (1.0 or 2.0)")
    except (ValueError, TypeError, SyntaxError, EOFError) as exc:
        raise ProtocolError(400, f"'{field}' is not a readable .npy file: {exc}") from None
    if dtype.hasobject:
        raise ProtocolError(400, f"'{field}' holds Python objects (a pickle); this service reads only uint8 "
                                 "arrays and never unpickles.")
    if dtype != np.uint8:
        raise ProtocolError(400, f"'{field}' must be uint8 (quantised RGB), got dtype {dtype}.")
    if fortran_order:
        raise ProtocolError(400, f"'{field}' must be a C-order array, got Fortran order.")
    if len(shape) != 4 or shape[3] != 3:
        raise ProtocolError(400, f"'{field}' must have shape (B, H, W, 3) (RGB, channels last), got {shape}.")
    b, h, w, _ = shape
    if b < 1 or h < 1 or w < 1:
        raise ProtocolError(400, f"'{field}' has shape {shape}: at least one image of at least 1x1 pixels.")
    if b > limits.max_images:
        raise ProtocolError(413, f"'{field}' holds {b} images; this service takes at most {limits.max_images} per "
                                 "request (send several requests, or raise --max-images).")
    if h > limits.max_side or w > limits.max_side:
        raise ProtocolError(413, f"'{field}' images are {h}x{w}; this service takes at most "
                                 f"{limits.max_side} pixels a side.")
    offset, expected = fp.tell(), b * h * w * 3
    if len(raw) - offset != expected:
        raise ProtocolError(400, f"'{field}' declares shape {shape} ({expected} bytes) but carries "
                                 f"{len(raw) - offset} bytes (a truncated or padded array).")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=offset).reshape(shape).copy()


# -- requests and answers -------------------------------------------------------------------------------


@dataclass
class ScoreRequest:
    reward: str
    images: np.ndarray  # (B, H, W, 3) uint8
    prompts: list[str]
    metadata: list[dict[str, Any]]
    id: str


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def loads(body: bytes, what: str = "the body") -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(400, f"{what} is not JSON: {exc}") from None


def score_request(reward: str, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]],
                  request_id: str) -> bytes:
    """The body of a ``POST /v1/score``; TypeError if metadata is not JSON. The images' base64 (JSON-safe
    characters only) is spliced in as bytes: ``json.dumps`` would scan megabytes of it for escapes."""
    head = dumps({"reward": reward, "id": request_id, "prompts": list(prompts),
                  "metadata": [dict(m) for m in metadata]})
    return head[:-1] + b',"images":"' + _npy_base64(images) + b'"}'



def parse_score_request(body: bytes, limits: Limits, served: Collection[str]) -> ScoreRequest:
    doc = loads(body)
    if not isinstance(doc, dict):
        raise ProtocolError(400, "the body must be a JSON object with the fields reward, images, prompts "
                                 f"(metadata and id optional), got a {type(doc).__name__}.")
    unknown = sorted(set(doc) - set(REQUEST_FIELDS))
    if unknown:
        raise ProtocolError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; a score request has "
                                 f"{', '.join(REQUEST_FIELDS)}.")
    missing = [f for f in ("reward", "images", "prompts") if f not in doc]
    if missing:
        raise ProtocolError(400, f"missing field(s) {', '.join(map(repr, missing))}.")
    reward = doc["reward"]
    if not isinstance(reward, str):
        raise ProtocolError(400, f"'reward' must be a string, got {type(reward).__name__}.")
    if reward not in served:
        raise ProtocolError(404, f"this service does not serve reward {reward!r}; it serves: {', '.join(served)}.")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str) or len(request_id) > limits.max_id_chars:
        raise ProtocolError(400, f"'id' must be a string of at most {limits.max_id_chars} characters.")
    images = decode_images(doc["images"], limits)
    n = images.shape[0]
    prompts = doc["prompts"]
    if not (isinstance(prompts, list) and len(prompts) == n and all(isinstance(p, str) for p in prompts)):
        raise ProtocolError(400, f"'prompts' must be a list of {n} strings, one per image.")
    if any(len(p) > limits.max_prompt_chars for p in prompts):
        raise ProtocolError(413, f"a prompt is longer than {limits.max_prompt_chars} characters.")
    metadata = doc.get("metadata")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    if not (isinstance(metadata, list) and len(metadata) == n and all(isinstance(m, dict) for m in metadata)):
        raise ProtocolError(400, f"'metadata' must be a list of {n} JSON objects, one per image (or left out).")
    return ScoreRequest(reward, images, prompts, metadata, request_id)


def score_answer(request: ScoreRequest, scores: Sequence[float], info: Mapping[str, Any], batch_requests: int,
                 batch_images: int) -> dict[str, Any]:
    return {"id": request.id, "reward": request.reward, "scores": [float(s) for s in scores], "info": dict(info),
            "batch": {"requests": batch_requests, "images": batch_images}}


def parse_score_answer(doc: Any, request_id: str, n: int) -> tuple[np.ndarray, dict[str, Any], dict[str, int]]:
    """``(scores float32 (n,), info, batch)`` of an answer; ProtocolError if it is not the answer to this request."""
    if not isinstance(doc, dict) or not isinstance(doc.get("scores"), list):
        raise ProtocolError(502, "the answer is not a score answer (no 'scores' list).")
    if doc.get("id") != request_id:
        raise ProtocolError(502, f"the answer is for request {doc.get('id')!r}, not {request_id!r}.")
    scores = doc["scores"]
    if len(scores) != n or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                                   for s in scores):
        raise ProtocolError(502, f"the answer has {len(scores)} scores for {n} images, or a non-finite one.")
    info = doc.get("info") if isinstance(doc.get("info"), dict) else {}
    batch = doc.get("batch") if isinstance(doc.get("batch"), dict) else {}
    return np.asarray(scores, dtype=np.float32), info, batch


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": one_line(message), "status": status}


# -- info: per image entries split between the requests of one server batch, and merged back -----------------


def split_info(info: Any, sizes: Sequence[int]) -> list[Any]:
    """One JSON ``info`` of a reward call over several requests -> one per request: lists as long as the batch
    are sliced (per-image entries), objects recursively; anything else (a per-batch value) is given to each."""
    total = sum(sizes)
    if isinstance(info, dict):
        parts = {k: split_info(v, sizes) for k, v in info.items()}
        return [{k: parts[k][i] for k in info} for i in range(len(sizes))]
    if isinstance(info, list) and len(info) == total and len(sizes) > 1:
        bounds = np.cumsum([0, *sizes]).tolist()
        return [info[a:b] for a, b in zip(bounds, bounds[1:])]
    return [info for _ in sizes]


def merge_infos(infos: Sequence[Any], sizes: Sequence[int]) -> Any:
    """The inverse of :func:`split_info`: the infos of consecutive chunks of one batch, as one."""
    if len(infos) == 1:
        return infos[0]
    if all(isinstance(i, dict) for i in infos):
        return {k: merge_infos([i.get(k) for i in infos], sizes) for k in infos[0]}
    if all(isinstance(i, list) and len(i) == n for i, n in zip(infos, sizes)):
        return [x for i in infos for x in i]
    return infos[0]
