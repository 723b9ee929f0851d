"""``rlbench rewards serve``: registered rewards behind HTTP (FastAPI + uvicorn), concurrent requests batched.

Threading model - every torch op of the process runs on the MAIN thread:

* uvicorn runs the asyncio event loop on one background thread (``rlbench-http``). It parses requests, checks
  the token and the limits, decodes images with numpy only (:mod:`rlbench.service.protocol`) and queues the
  work; it never touches torch.
* the main thread loads every reward (:func:`rlbench.registry.make_reward`), warms each up once, then runs the
  scoring loop (:meth:`Scorer.run`): it takes the oldest queued request and, while other score requests are
  still being received, waits for them at most ``--batch-wait-ms`` (counted from the oldest one's arrival; a
  lone client never waits); then it scores the queued requests of the same reward and image size
  in one reward call while the total stays within ``--max-batch`` images (one request larger than that is
  scored alone, never split); each request gets its slice of the scores and of the per-image ``info``.

A second thread running torch ops would start a second OpenMP team, which slows every op on a small CPU;
scoring on the thread that loaded the models keeps one. If a merged call fails, each of its requests is scored
alone, so only the requests that fail get an error (422 for an ``InputError``, else 500) - never a made-up score.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlbench.errors import ConfigError, DependencyNotInstalled, InputError, RLBenchError
from rlbench.service import protocol as wire

try:  # module level: FastAPI resolves the handlers' annotations in this module's namespace
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - the serve extra is missing
    raise DependencyNotInstalled(f"`rlbench rewards serve` needs FastAPI and uvicorn ({exc}): "
                                 "pip install 'rlbench[serve]'.") from exc

DEFAULT_PORT = 8500
DEFAULT_MAX_BATCH = 64
DEFAULT_BATCH_WAIT_MS = 5.0
EXAMPLE_MAX_IMAGES, EXAMPLE_MAX_SIDE = 64, 512


@dataclass(eq=False)
class Job:
    """One unit of work for the scoring thread: a score request, or a call (``fn``) to run there."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    request: wire.ScoreRequest | None = None
    fn: Callable[[], Any] | None = None
    arrived: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return 0 if self.request is None else self.request.images.shape[0]

    @property
    def key(self) -> tuple:
        r = self.request
        return ("call", id(self)) if r is None else (r.reward, *r.images.shape[1:])

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Hand the result to the waiting HTTP handler (from any thread; a gone client is ignored)."""

        def finish() -> None:
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(finish)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass


class Stats:
    """Counters the health endpoint reports, batch sizes included (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = self.images = self.batches = self.rejected = self.failed = 0
        self.batch_requests: collections.Counter[int] = collections.Counter()
        self.batch_images: collections.Counter[int] = collections.Counter()
        self.threads: set[str] = set()  # that ran reward calls: the main thread only

    def batch(self, requests: int, images: int) -> None:
        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.batches += 1
            self.requests += requests
            self.images += images
            self.batch_requests[requests] += 1
            self.batch_images[images] += 1

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "images": self.images, "batches": self.batches,
                    "rejected": self.rejected, "failed": self.failed,
                    "max_batch_requests": max(self.batch_requests, default=0),
                    "max_batch_images": max(self.batch_images, default=0),
                    "batch_requests": {str(k): v for k, v in sorted(self.batch_requests.items())},
                    "batch_images": {str(k): v for k, v in sorted(self.batch_images.items())},
                    "scoring_threads": sorted(self.threads)}


def jsonable(value: Any) -> Any:
    """A reward's ``info`` as JSON: tensors and arrays as lists, non-finite floats as null, other objects as text."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # torch tensors, numpy arrays and scalars
        value = value.detach().cpu().tolist() if hasattr(value, "detach") else value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def reward_error(name: str, exc: BaseException) -> wire.ProtocolError:
    if isinstance(exc, InputError):
        return wire.ProtocolError(422, f"reward '{name}' refused the inputs: {exc}")
    if isinstance(exc, RLBenchError):
        return wire.ProtocolError(500, f"reward '{name}' failed: {exc}")
    return wire.ProtocolError(500, f"reward '{name}' raised {type(exc).__name__}: {exc}")


class Scorer:
    """The queue between the HTTP thread and the scoring thread, and the scoring loop (:meth:`run`)."""

    def __init__(self, rewards: Mapping[str, Any], max_batch: int = DEFAULT_MAX_BATCH,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_MS / 1000, max_queued_images: int = 4096,
                 log: Callable[[str], None] | None = None) -> None:
        self.rewards = dict(rewards)
        self.max_batch, self.batch_wait_s, self.max_queued_images = max_batch, batch_wait_s, max_queued_images
        self.stats = Stats()
        self.log = log
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._arriving = 0  # score requests being read and parsed: worth waiting for

    # -- HTTP thread ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise wire.ProtocolError(503, "the reward service is shutting down.")
            queued = sum(j.n for j in self._pending)
            if self._pending and queued + job.n > self.max_queued_images:
                raise wire.ProtocolError(503, f"the reward service is busy ({queued} images queued); retry later.")
            self._pending.append(job)
            self._cond.notify()

    def arriving(self, delta: int) -> None:
        with self._cond:
            self._arriving += delta
            self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- scoring thread (the main thread) ---------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool]) -> None:
        """Score queued requests until ``should_stop()``; then fail what is left with 503."""
        try:
            while True:
                jobs = self._take(should_stop)
                if jobs is None:
                    return
                if jobs[0].fn is not None:
                    self._call(jobs[0])
                else:
                    self._score(jobs)
        finally:
            self.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left, self._pending = list(self._pending), collections.deque()
        for job in left:
            job.resolve(error=wire.ProtocolError(503, "the reward service is shutting down."))

    def _take(self, should_stop: Callable[[], bool]) -> list[Job] | None:
        with self._cond:
            while not self._pending:
                if should_stop():
                    return None
                self._cond.wait(0.1)
            first = self._pending[0]
            while True:
                jobs = self._compatible(first)
                wait = first.arrived + self.batch_wait_s - time.monotonic()
                full = sum(j.n for j in jobs) >= self.max_batch
                if first.fn is not None or full or not self._arriving or wait <= 0 or should_stop():
                    break  # nothing else on its way (a lone client never waits), or waited enough
                self._cond.wait(wait)
            for job in jobs:
                self._pending.remove(job)
            return jobs

    def _compatible(self, first: Job) -> list[Job]:
        """``first`` and the queued requests that fit one reward call with it, oldest first."""
        jobs, total = [first], first.n
        for job in self._pending:
            if job is not first and job.key == first.key and total + job.n <= self.max_batch:
                jobs.append(job)
                total += job.n
        return jobs

    def _call(self, job: Job) -> None:
        try:
            job.resolve(job.fn())
        except wire.ProtocolError as exc:
            job.resolve(error=exc)
        except Exception as exc:
            job.resolve(error=wire.ProtocolError(500, f"{type(exc).__name__}: {exc}"))

    def _score(self, jobs: list[Job]) -> None:
        import torch

        name = jobs[0].request.reward
        requests = [j.request for j in jobs]
        sizes = [r.images.shape[0] for r in requests]
        arrays = np.concatenate([r.images for r in requests]) if len(requests) > 1 else requests[0].images
        images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255).contiguous()  # = load_images'
        try:
            with torch.no_grad():
                out = self.rewards[name](images, [p for r in requests for p in r.prompts],
                                         [m for r in requests for m in r.metadata])
            scores = out.scores.detach().float().cpu().tolist()
            infos = wire.split_info(jsonable(out.info), sizes)
        except Exception as exc:
            if len(jobs) > 1:  # find the culprits: each request alone
                for job in jobs:
                    self._score([job])
                return
            error = reward_error(name, exc)
            self.stats.count("failed")
            if self.log is not None:
                self.log(f"request {requests[0].id!r}: HTTP {error.status}: {error}")
            jobs[0].resolve(error=error)
            return
        self.stats.batch(len(jobs), len(scores))
        start = 0
        for job, n, info in zip(jobs, sizes, infos):
            job.resolve(wire.score_answer(job.request, scores[start:start + n], info, len(jobs), len(scores)))
            start += n


# -- the HTTP application ---------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it (or its declared length) passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise wire.ProtocolError(400, f"Content-Length {declared!r} is not a number.")
        if int(declared) > limit:
            raise wire.ProtocolError(413, f"the body declares {int(declared)} bytes; this service takes at most "
                                          f"{limit} (--max-body-mb).")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise wire.ProtocolError(413, f"the body passes {limit} bytes, the most this service takes "
                                          "(--max-body-mb).")
        chunks.append(chunk)
    return b"".join(chunks)


def _int_param(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    text = request.query_params.get(key, str(default))
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise wire.ProtocolError(400, f"query parameter {key} must be an integer in [{lo}, {hi}], got {text!r}.")
    return int(text)


def build_app(scorer: Scorer, cards: Mapping[str, dict], limits: wire.Limits, token: str | None) -> FastAPI:
    """The FastAPI application of the endpoints in :mod:`rlbench.service.protocol`."""
    app = FastAPI(title="rlbench reward service", docs_url=None, redoc_url=None, openapi_url=None)
    service = {"protocol": wire.PROTOCOL, "max_batch": scorer.max_batch, "limits": limits.as_dict()}

    def fail(status: int, message: str) -> JSONResponse:
        if status < 500:
            scorer.stats.count("rejected")
        return JSONResponse(wire.error_body(status, message), status_code=status)

    @app.exception_handler(wire.ProtocolError)
    async def protocol_error(request: Request, exc: wire.ProtocolError) -> JSONResponse:
        return fail(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return fail(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    def card_of(name: str) -> dict:
        if name not in cards:
            raise wire.ProtocolError(404, f"this service does not serve reward {name!r}; it serves: "
                                          f"{', '.join(cards)}.")
        return cards[name]

    async def on_worker(fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        job = Job(loop, loop.create_future(), fn=fn)
        scorer.submit(job)
        return await job.future

    @app.get(wire.HEALTH)
    async def health(request: Request) -> JSONResponse:
        wire.check_token(request.headers.get("authorization"), token)
        return JSONResponse({"status": "ok", **service, "rewards": list(cards), "queued": scorer.queued(),
                             "stats": scorer.stats.as_dict()})

    @app.get(wire.REWARDS)
    async def rewards(request: Request) -> JSONResponse:
        wire.check_token(request.headers.get("authorization"), token)
        return JSONResponse({"rewards": list(cards.values())})

    @app.get(wire.REWARDS + "/{name}")
    async def card(name: str, request: Request) -> JSONResponse:
        wire.check_token(request.headers.get("authorization"), token)
        return JSONResponse({**card_of(name), **service})

    @app.get(wire.REWARDS + "/{name}/example")
    async def example(name: str, request: Request) -> JSONResponse:
        wire.check_token(request.headers.get("authorization"), token)
        card_of(name)
        batch_size = _int_param(request, "batch_size", 3, 1, EXAMPLE_MAX_IMAGES)
        image_size = _int_param(request, "image_size", 64, 8, EXAMPLE_MAX_SIDE)
        seed = _int_param(request, "seed", 0, 0, 2**31 - 1)
        return JSONResponse(await on_worker(lambda: _example(scorer.rewards[name], batch_size, image_size, seed)))

    @app.post(wire.SCORE)
    async def score(request: Request) -> JSONResponse:
        wire.check_token(request.headers.get("authorization"), token)
        scorer.arriving(+1)
        try:
            parsed = wire.parse_score_request(await read_body(request, limits.max_body_bytes), limits, cards)
            loop = asyncio.get_running_loop()
            job = Job(loop, loop.create_future(), request=parsed)
            scorer.submit(job)
        finally:
            scorer.arriving(-1)
        return JSONResponse(await job.future)

    return app


def _example(reward: Any, batch_size: int, image_size: int, seed: int) -> dict[str, Any]:
    """check_reward's inputs for ``reward``, as the wire carries them (runs on the scoring thread)."""
    from rlbench.checker import example_inputs
    from rlbench.utils.images import to_uint8

    images, prompts, metadata = example_inputs(reward, batch_size=batch_size, image_size=image_size, seed=seed)
    return {"images": wire.encode_images(to_uint8(images, layout="hwc")), "prompts": list(prompts),
            "metadata": jsonable(list(metadata))}


# -- startup ------------------------------------------------------------------------------------------------


def parse_names(names: str | Sequence[str]) -> list[str]:
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    if not items or not all(items):
        raise ConfigError(f"rewards to serve must be registered names joined by commas (e.g. incompressibility,"
                          f"clipscore), got {names!r}.")
    for name in items:
        if any(sep in name for sep in (":", "+")):
            raise ConfigError(f"{name!r} is a combination; serve its rewards by name and combine on the client "
                              "(--reward a:1,remote:0.5 --reward-opt remote.url=...).")
    if len(set(items)) != len(items):
        raise ConfigError(f"rewards to serve name one reward twice: {names!r}.")
    return items


def check_bind(host: str, token_file: str | Path | None) -> str | None:
    """The token, read before anything loads; off loopback a token is required (ConfigError otherwise)."""
    token = wire.read_token(token_file, "--token-file") if token_file is not None else None
    if token is None and not wire.is_loopback(host):
        raise ConfigError(f"--host {host} would open the reward service beyond this machine without a token; "
                          "pass --token-file FILE (clients send it with --reward-opt token_file=FILE), or bind "
                          "127.0.0.1 (the default).")
    return token


def _reward_options(name: str, options: Mapping[str, Any], device: str | None) -> dict[str, Any]:
    from rlbench.registry import REWARDS

    opts = dict(options)
    if device is not None and "device" not in opts:
        try:
            takes_device = "device" in inspect.signature(REWARDS.load(name)).parameters
        except (TypeError, ValueError):
            takes_device = False
        if takes_device:
            opts["device"] = device
    return opts


def load_rewards(names: Sequence[str], options: Mapping[str, Mapping[str, Any]], device: str | None,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Build every reward once and score check_reward's example inputs with it (weights load here, not at the
    first request; a reward that cannot score fails the startup)."""
    import torch

    from rlbench.checker import example_inputs
    from rlbench.registry import make_reward

    stray = sorted(set(options) - set(names))
    if stray:
        raise ConfigError(f"--reward-opt names {', '.join(map(repr, stray))}, which is not served "
                          f"(serving {', '.join(names)}); write NAME.KEY=VALUE with a served NAME.")
    rewards = {}
    for name in names:
        reward = make_reward(name, **_reward_options(name, options.get(name, {}), device))
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                reward(*example_inputs(reward, batch_size=2))
        except RLBenchError as exc:
            raise type(exc)(f"reward '{name}' failed its warm-up call: {exc}") from exc
        except Exception as exc:
            raise ConfigError(f"reward '{name}' failed its warm-up call: {type(exc).__name__}: {exc}") from exc
        log(f"loaded {name} ({reward.card.version}, warm-up {time.perf_counter() - t0:.2f} s)")
        rewards[name] = reward
    return rewards


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=256)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}; choose another --port "
                          "(0 takes a free one, printed at startup).") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(names: str | Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None, *,
          host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None,
          max_batch: int = DEFAULT_MAX_BATCH, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
          token_file: str | Path | None = None, limits: wire.Limits | None = None,
          log: Callable[[str], None] | None = None) -> None:
    """Serve ``names`` until interrupted (Ctrl-C or SIGTERM). Prints ``serving ... on URL`` once it accepts
    requests (``port=0`` takes a free port). Host, token and port are checked before anything loads."""
    log = log or (lambda line: print(line, flush=True))
    names = parse_names(names)
    token = check_bind(host, token_file)
    if max_batch < 1 or batch_wait_ms < 0:
        raise ConfigError(f"--max-batch must be >= 1 and --batch-wait-ms >= 0, got {max_batch} and {batch_wait_ms}.")
    limits = limits or wire.Limits()
    sock = listen(host, port)  # a taken port fails before the models load (connections wait in the backlog)
    url = url_of(sock)
    try:
        rewards = load_rewards(names, options or {}, device, log)
    except BaseException:
        sock.close()
        raise

    def warn(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    scorer = Scorer(rewards, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000,
                    max_queued_images=max(4096, 4 * limits.max_images), log=warn)
    cards = {name: reward.card.as_dict() for name, reward in rewards.items()}
    app = build_app(scorer, cards, limits, token)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", loop="asyncio",
                            http="h11", timeout_graceful_shutdown=3, limit_concurrency=1024)
    server = uvicorn.Server(config)
    http_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="rlbench-http", daemon=True)
    http_thread.start()
    while not server.started and http_thread.is_alive():
        time.sleep(0.01)
    if not http_thread.is_alive():
        raise ConfigError(f"the HTTP server did not start on {url}; see the messages above.")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log(f"serving {', '.join(names)} on {url} (max batch {max_batch} images, "
        f"{'token required' if token else 'no token: loopback only'}); Ctrl-C stops")
    try:
        scorer.run(lambda: stop.is_set() or not http_thread.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        scorer.close()
        server.should_exit = True
        http_thread.join(timeout=10)
        signal.signal(signal.SIGTERM, previous)
    stats = scorer.stats.as_dict()
    log(f"stopped after {stats['requests']} requests ({stats['images']} images in {stats['batches']} batches)")
