"""A reward service in a subprocess, and a load of client processes against one (tests, benchmarks, notebooks).

:class:`ServiceProcess` runs ``rlbench rewards serve`` with any Python (another environment's too), waits until
it prints its URL, and stops it (SIGTERM, then SIGKILL)::

    with ServiceProcess("incompressibility") as service:       # port 0: a free one
        reward = make_reward("remote", url=service.url, reward="incompressibility")

:func:`run_load` starts client processes (multiprocessing, spawn: numpy and urllib only, no torch) that send
many score requests at once, each with its own deterministic images (:func:`request_images`), and returns every
answer with the wall time from the moment all clients were ready.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

READY = re.compile(r"^serving .+ on (http://\S+) ", re.MULTILINE)
_CLI = "from rlbench.cli import main; main()"


class ServiceStartError(RuntimeError):
    """The service exited (or never said it was ready); ``output`` holds what it printed."""

    def __init__(self, message: str, output: str, returncode: int | None) -> None:
        super().__init__(f"{message}\n{output[-4000:]}")
        self.output, self.returncode = output, returncode


def option_text(value: Any) -> str:
    """A ``--reward-opt`` value as the CLI reads it back (TOML): strings quoted, booleans lower case."""
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


class ServiceProcess:
    """``rlbench rewards serve NAMES`` in a subprocess; ``url`` once :meth:`start` returns.

    Args:
        names: the rewards, comma-separated or a list.
        options: ``{reward: {key: value}}``, passed as ``--reward-opt reward.key=value``.
        python: the interpreter (another virtual environment's, to serve from there).
        env: the environment of the process (default: this one's).
        args: further ``rlbench rewards serve`` flags, e.g. ``("--max-batch", "8", "--token-file", path)``.
    """

    def __init__(self, names: str | Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, args: Sequence[str] = (), python: str | Path = sys.executable,
                 env: Mapping[str, str] | None = None, startup_timeout_s: float = 300.0) -> None:
        names = names if isinstance(names, str) else ",".join(names)
        self.command = [str(python), "-c", _CLI, "rewards", "serve", names, "--host", host, "--port", str(port),
                        *map(str, args)]
        for reward, opts in (options or {}).items():
            for key, value in opts.items():
                self.command += ["--reward-opt", f"{reward}.{key}={option_text(value)}"]
        self.env = dict(env) if env is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url = ""
        fd, log = tempfile.mkstemp(prefix="rlbench-service-", suffix=".log")
        os.close(fd)
        self._log, self._output = Path(log), ""

    def output(self) -> str:
        """What the service printed so far (stdout and stderr)."""
        if not self._log.exists():
            return self._output
        return self._log.read_text(encoding="utf-8", errors="replace")

    def start(self) -> ServiceProcess:
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            found = READY.search(self.output())
            if found:
                self.url = found.group(1)
                return self
            if self.proc.poll() is not None:
                raise ServiceStartError(f"the reward service exited with code {self.proc.returncode} before it "
                                        "was ready:", self.output(), self.proc.returncode)
            if time.monotonic() > deadline:
                self.kill()
                raise ServiceStartError(f"the reward service was not ready after {self.startup_timeout_s:g} s:",
                                        self.output(), None)
            time.sleep(0.05)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (a graceful stop), SIGKILL after ``timeout_s``; the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return None if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the service dies as a crash would end it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self._output = self.output()
        self._log.unlink(missing_ok=True)


# -- load ------------------------------------------------------------------------------------------------


def request_images(seed: int, worker: int, index: int, n: int, size: int) -> np.ndarray:
    """The ``(n, size, size, 3)`` uint8 images of request ``index`` of client ``worker`` (deterministic)."""
    return np.random.default_rng([seed, worker, index]).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@dataclass
class Load:
    """Every answer of a :func:`run_load` (dicts: worker, index, id, n, scores, batch) and its wall time."""

    records: list[dict[str, Any]]
    seconds: float

    @property
    def images(self) -> int:
        return sum(r["n"] for r in self.records)


def _client_thread(url: str, reward: str, token: str | None, worker: int, thread: int, threads: int, requests: int,
                   max_images: int, size: int, seed: int, prompt: str, out: list) -> None:
    from rlbench.service.client import ServiceClient

    client = ServiceClient(url, token=token, retries=2, backoff_s=0.2)
    for i in range(thread, requests, threads):
        n = 1 + i % max_images
        request_id = f"w{worker}-r{i}"
        got = client.score(reward, request_images(seed, worker, i, n, size), [prompt] * n, [{} for _ in range(n)],
                           request_id=request_id)
        out.append({"worker": worker, "index": i, "id": request_id, "n": n, "scores": got.scores.tolist(),
                    "batch": got.batch})


def _client_process(url: str, reward: str, token: str | None, worker: int, threads: int, requests: int,
                    max_images: int, size: int, seed: int, prompt: str, ready: Any, results: Any) -> None:
    try:
        ready.wait()
        out: list[dict] = []
        errors: list[str] = []

        def run(t: int) -> None:
            try:
                _client_thread(url, reward, token, worker, t, threads, requests, max_images, size, seed, prompt, out)
            except Exception:
                errors.append(traceback.format_exc())

        pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        results.put({"worker": worker, "records": out, "errors": errors})
    except Exception:
        results.put({"worker": worker, "records": [], "errors": [traceback.format_exc()]})


def run_load(url: str, reward: str, *, processes: int = 3, threads: int = 2, requests: int = 20, max_images: int = 3,
             size: int = 32, token: str | None = None, seed: int = 0, prompt: str = "a photo of a cat",
             timeout_s: float = 300.0) -> Load:
    """``processes`` client processes x ``threads`` threads send ``requests`` score requests per process (request i
    carries ``1 + i % max_images`` images); raises if any failed."""
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_process, daemon=True, args=(
        url, reward, token, w, threads, requests, max_images, size, seed, prompt, ready, results))
        for w in range(processes)]
    for p in procs:
        p.start()
    try:
        ready.wait(timeout_s)  # every client imported and waiting: the clock starts now
        t0 = time.perf_counter()
        parts = [results.get(timeout=timeout_s) for _ in procs]
        seconds = time.perf_counter() - t0
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    errors = [e for part in parts for e in part["errors"]]
    if errors:
        raise RuntimeError(f"{len(errors)} client thread(s) failed; the first:\n{errors[0]}")
    records = sorted((r for part in parts for r in part["records"]), key=lambda r: (r["worker"], r["index"]))
    return Load(records, seconds)


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment with one intra-op thread and offline hubs: how tests and benchmarks start services."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
