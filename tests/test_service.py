"""The reward service (``rlbench rewards serve``) and its client, the ``remote`` reward: same scores as in-process,
the card from the server, a corpus of bad requests, tokens, failures that never become scores, batching under
load from several processes, combinations, evaluation, and a training run whose service dies and is resumed
bit-identical to an in-process run. Every service runs in a subprocess (scoring on its main thread)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_fake_distribution, write_png
from rlbench.checker import check_reward, example_inputs
from rlbench.errors import ConfigError, RemoteRewardError
from rlbench.registry import make_reward
from rlbench.service import protocol as wire
from rlbench.service.client import ServiceClient
from rlbench.service.process import ServiceProcess, ServiceStartError, cpu_env, request_images, run_load
from rlbench.testing import tiny_reward_options

RLBENCH = str(Path(sys.executable).parent / "rlbench")
TOKEN = "s3cret-token-for-tests"
MAX_IMAGES, MAX_BODY_MB = 8, 1

# Fails (RuntimeError) on any all-black image, scores the mean pixel otherwise: a reward that fails on some images.
FLAKY = '''
import torch
from rlbench.reward import Reward

class Flaky(Reward):
    name = "flaky"
    version = "3"
    higher_is_better = False

    def score(self, images, prompts, metadata):
        if bool((images.flatten(1).amax(1) == 0).any()):
            raise RuntimeError("cannot score an all-black image")
        return images.mean(dim=(1, 2, 3))
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def token_file(root) -> Path:
    path = root / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def clip_opts(root) -> dict:
    return tiny_reward_options("clipscore", root / "zoo")


@pytest.fixture(scope="module")
def service(root, token_file, clip_opts):
    """One service for most tests: four rewards (one a third-party plugin that fails on black images), a token,
    small limits, a 20 ms batching window."""
    plugin = make_fake_distribution(root / "plugin", "flakypkg", "0.3", entry_points={
        "rlbench.rewards": {"flaky": "flaky_reward:Flaky"}}, modules={"flaky_reward": FLAKY})
    proc = ServiceProcess("incompressibility,clipscore,shapes-gold,flaky", {"clipscore": clip_opts},
                          args=["--token-file", token_file, "--max-batch", "16", "--batch-wait-ms", "20",
                                "--max-images", str(MAX_IMAGES), "--max-body-mb", str(MAX_BODY_MB)],
                          env=cpu_env(PYTHONPATH=str(plugin)))
    with proc:
        yield proc


def remote(service, reward: str, token_file, **kw):
    return make_reward("remote", url=service.url, reward=reward, token_file=str(token_file), **kw)


def health(service) -> dict:
    return ServiceClient(service.url, token=TOKEN).health()


# -- the same scores, the card, the contract --------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_remote_scores_equal_in_process_scores(service, token_file, clip_opts) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 40, 48, generator=g)  # not quantised: both sides quantise the same way
    prompts = ["a photo of a cat", "a dog", "a red circle", "", "a " + "very long " * 60 + "caption"]
    for name, opts in (("incompressibility", {}), ("clipscore", clip_opts)):
        local = make_reward(name, **opts)(images, prompts).scores
        served = remote(service, name, token_file)(images, prompts).scores
        assert served.dtype == torch.float32 and served.shape == (5,)
        assert torch.equal(served, local), (name, served, local)
    shapes = make_reward("shapes-gold")
    images, prompts, metadata = example_inputs(shapes, batch_size=6, seed=3)
    out = remote(service, "shapes-gold", token_file)(images, prompts, metadata)
    ref = shapes(images, prompts, metadata)
    assert torch.equal(out.scores, ref.scores) and len(set(out.scores.tolist())) > 1
    assert out.info["facts"] == ref.info["facts"]  # per-image info comes back too


def test_the_card_comes_from_the_server(service, token_file, clip_opts) -> None:
    local = make_reward("clipscore", **clip_opts).card
    card = remote(service, "clipscore", token_file).card
    for key in ("version", "higher_is_better", "deterministic", "score_range", "paper"):
        assert getattr(card, key) == getattr(local, key), key
    assert local.differentiable and not card.differentiable  # no gradients over HTTP
    assert card.name == "remote" and "clipscore served at " + service.url in card.summary
    flaky = remote(service, "flaky", token_file)
    assert (flaky.card.version, flaky.card.higher_is_better) == ("3", False)  # the plugin's own declarations
    assert flaky.reward.served_card["origin"] == "flakypkg==0.3"
    assert health(service)["rewards"] == ["incompressibility", "clipscore", "shapes-gold", "flaky"]


@pytest.mark.parametrize("name", ["incompressibility", "clipscore", "shapes-gold"])
def test_check_reward_passes_on_the_remote_reward(service, token_file, name) -> None:
    check_reward(remote(service, name, token_file))  # shapes-gold: the server's own example inputs (captions)


def test_remote_is_a_component_of_a_combination(service, token_file) -> None:
    combo = make_reward("incompressibility:1,remote:0.5", **{
        "remote.url": service.url, "remote.reward": "shapes-gold", "remote.token_file": str(token_file)})
    images, prompts, metadata = example_inputs(make_reward("shapes-gold"), batch_size=4, seed=5)
    out = combo(images, prompts, metadata)
    inc = make_reward("incompressibility")(images, prompts).scores
    gold = make_reward("shapes-gold")(images, prompts, metadata).scores
    assert torch.equal(out.info["components"]["remote"], gold)
    assert torch.allclose(out.scores, inc + 0.5 * gold, rtol=0, atol=1e-6)
    assert combo.card.version == "incompressibility@1+remote@1"
    with pytest.raises(ConfigError, match="must name its component"):
        make_reward("incompressibility:1,remote:0.5", url=service.url)  # an option must name its component


def test_rlbench_eval_scores_images_with_the_remote_reward(service, token_file, tmp_path, runner) -> None:
    from rlbench.cli import app

    rng = np.random.default_rng(0)
    rows = ["path,prompt"]
    for i in range(3):
        rows.append(f"{write_png(tmp_path / f'{i}.png', rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))},a cat")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    result = runner.invoke(app, [
        "eval", "--images", str(tmp_path / "manifest.csv"), "--rewards", "incompressibility,remote", "--no-cache",
        "--out", str(tmp_path / "eval"), "--reward-opt", f"remote.url={service.url}",
        "--reward-opt", "remote.reward=incompressibility", "--reward-opt", f"remote.token_file={token_file}"])
    assert result.exit_code == 0, result.output
    import pandas as pd

    scores = pd.read_parquet(tmp_path / "eval" / "scores.parquet")
    by = scores.pivot_table(index="image", columns="reward", values="score")
    assert len(by) == 3 and by["remote"].notna().all()
    assert (by["remote"] == by["incompressibility"]).all()


# -- bad requests, tokens, limits --------------------------------------------------------------------------


def _npy(array: np.ndarray, allow_pickle: bool = False) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return base64.b64encode(buf.getvalue()).decode()


def _declared(shape: tuple, data: bytes = b"\0" * 12) -> str:
    """An npy header that declares ``shape`` of uint8, followed by ``data``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return base64.b64encode(buf.getvalue() + data).decode()


def _good(n: int = 2, size: int = 16, **change) -> dict:
    images = request_images(0, 0, 0, n, size)
    return {"reward": "incompressibility", "images": wire.encode_images(images), "prompts": ["p"] * n,
            "metadata": [{} for _ in range(n)], "id": "good", **change}


def _send(url: str, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
          headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    hdrs = {"Content-Type": "application/json", **wire.auth_headers(token), **(headers or {})}
    try:
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, {"raw": raw.decode(errors="replace")}


def _send_raw(url: str, head: bytes, body_chunks) -> tuple[int, dict]:
    """A hand-written request (lying Content-Length, chunked bodies); the status and JSON of the answer."""
    import socket

    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the body ended: read what it said
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                data.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


BAD_REQUESTS = [
    # (what, body or a dict to JSON-encode, expected status, fragment of the message)
    ("not JSON", b"this is {not json", 400, "not JSON"),
    ("invalid UTF-8", b"\xff\xfe\xfa", 400, "not JSON"),
    ("a JSON list", b"[1, 2, 3]", 400, "JSON object"),
    ("missing images", {k: v for k, v in _good().items() if k != "images"}, 400, "missing field(s) 'images'"),
    ("missing prompts", {k: v for k, v in _good().items() if k != "prompts"}, 400, "'prompts'"),
    ("missing reward", {k: v for k, v in _good().items() if k != "reward"}, 400, "'reward'"),
    ("unknown field", _good(image="x"), 400, "unknown field(s) 'image'"),
    ("unknown reward", _good(reward="pickscore"), 404, "does not serve reward 'pickscore'"),
    ("reward not a string", _good(reward=["incompressibility"]), 400, "'reward' must be a string"),
    ("id not a string", _good(id=7), 400, "'id'"),
    ("images not a string", _good(images=[[1, 2, 3]]), 400, "must be a string"),
    ("not base64", _good(images="@@@ not base64 @@@"), 400, "not valid base64"),
    ("not npy", _good(images=base64.b64encode(b"PNG but not npy").decode()), 400, "not a readable .npy"),
    ("truncated array", _good(images=wire.encode_images(request_images(0, 0, 0, 2, 16))[:-40]), 400,
     "declares shape (2, 16, 16, 3)"),
    ("array cut short", _good(images=_declared((2, 16, 16, 3), b"\0" * 100)), 400, "carries 100 bytes"),
    ("padded array", _good(images=_declared((1, 2, 2, 3), b"\0" * 13)), 400, "declares shape (1, 2, 2, 3)"),
    ("float32 dtype", _good(images=_npy(np.zeros((2, 16, 16, 3), np.float32))), 400, "must be uint8"),
    ("int64 dtype", _good(images=_npy(np.zeros((2, 16, 16, 3), np.int64))), 400, "must be uint8"),
    ("3-d array", _good(images=_npy(np.zeros((16, 16, 3), np.uint8))), 400, "(B, H, W, 3)"),
    ("channels first", _good(images=_npy(np.zeros((2, 3, 16, 16), np.uint8))), 400, "(B, H, W, 3)"),
    ("4 channels", _good(images=_npy(np.zeros((2, 16, 16, 4), np.uint8))), 400, "(B, H, W, 3)"),
    ("fortran order", _good(images=_npy(np.asfortranarray(np.zeros((2, 16, 16, 3), np.uint8)))), 400, "C-order"),
    ("no images", _good(images=_npy(np.zeros((0, 16, 16, 3), np.uint8)), prompts=[]), 400, "at least one image"),
    ("pickle-bearing npy", _good(images=_npy(np.array([{"x": 1}, None], dtype=object), allow_pickle=True)), 400,
     "never unpickles"),
    ("huge declared batch", _good(images=_declared((10**9, 64, 64, 3))), 413, "at most 8 per request"),
    ("huge declared side", _good(images=_declared((1, 10**6, 10**6, 3))), 413, "pixels a side"),
    ("too many images", _good(n=MAX_IMAGES + 1), 413, "at most 8 per request"),
    ("prompts of another length", _good(prompts=["p"]), 400, "list of 2 strings"),
    ("prompts not strings", _good(prompts=[1, 2]), 400, "list of 2 strings"),
    ("metadata not objects", _good(metadata=[1, 2]), 400, "'metadata'"),
]


def test_every_malformed_request_gets_a_4xx_with_a_message_and_the_service_keeps_serving(service) -> None:
    before = health(service)["stats"]["rejected"]
    for what, body, status, fragment in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, answer = _send(service.url, "POST", wire.SCORE, raw)
        assert got == status, (what, got, answer)
        assert answer["status"] == status and fragment in answer["error"] and answer["error"], (what, answer)
    for what, method, path, token, status, fragment in [
        ("no token", "POST", wire.SCORE, None, 401, "needs a token"),
        ("wrong token", "POST", wire.SCORE, TOKEN + "x", 403, "wrong token"),
        ("a prefix of the token", "GET", wire.HEALTH, TOKEN[:-1], 403, "wrong token"),
        ("no token on a GET", "GET", wire.REWARDS, None, 401, "needs a token"),
        ("unknown path", "GET", "/v1/nothing", TOKEN, 404, "Not Found"),
        ("wrong method", "GET", wire.SCORE, TOKEN, 405, "Method Not Allowed"),
        ("card of an unknown reward", "GET", wire.REWARDS + "/pickscore", TOKEN, 404, "does not serve"),
        ("bad example size", "GET", wire.REWARDS + "/clipscore/example?batch_size=0", TOKEN, 400, "batch_size"),
        ("non-numeric example seed", "GET", wire.REWARDS + "/clipscore/example?seed=x", TOKEN, 400, "seed"),
    ]:
        got, answer = _send(service.url, method, path, json.dumps(_good()).encode() if method == "POST" else None,
                            token=token)
        assert (got, answer.get("status")) == (status, status) and fragment in answer["error"], (what, answer)
    got, answer = _send(service.url, "POST", wire.SCORE, json.dumps(_good()).encode(), headers={
        "Authorization": f"Basic {TOKEN}"})
    assert got == 401, answer
    # bodies over --max-body-mb: a declared length (refused before any byte is read) and a chunked stream
    head = (f"POST {wire.SCORE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10**12}\r\n\r\n").encode()
    got, answer = _send_raw(service.url, head, [b"{"])
    assert got == 413 and "declares 1000000000000 bytes" in answer["error"], answer
    head = (f"POST {wire.SCORE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"x" * 65536
    got, answer = _send_raw(service.url, head, [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (MAX_BODY_MB * 16 + 2))
    assert got == 413 and "passes 1048576 bytes" in answer["error"], answer

    stats = health(service)["stats"]
    assert stats["rejected"] - before >= len(BAD_REQUESTS) + 12
    got, answer = _send(service.url, "POST", wire.SCORE, json.dumps(_good()).encode())
    assert got == 200 and answer["id"] == "good", answer
    expected = make_reward("incompressibility")(torch.from_numpy(request_images(0, 0, 0, 2, 16)).permute(0, 3, 1, 2)
                                                .float() / 255, ["p", "p"]).scores.tolist()
    assert answer["scores"] == expected


def test_the_client_names_the_url_and_status_of_a_refusal(service, token_file, tmp_path) -> None:
    with pytest.raises(RemoteRewardError) as info:
        make_reward("remote", url=service.url, reward="incompressibility")  # no token
    assert f"the reward service at {service.url} refused GET" in str(info.value) and "HTTP 401" in str(info.value)
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    with pytest.raises(RemoteRewardError, match="HTTP 403: wrong token"):
        make_reward("remote", url=service.url, reward="incompressibility", token_file=str(wrong))
    with pytest.raises(RemoteRewardError, match="HTTP 404: this service does not serve reward 'pickscore'"):
        remote(service, "pickscore", token_file)
    with pytest.raises(ConfigError, match="needs the service and the served reward"):
        make_reward("remote")
    with pytest.raises(ConfigError, match="is empty"):
        (tmp_path / "empty").write_text(" \n")
        make_reward("remote", url=service.url, reward="x", token_file=str(tmp_path / "empty"))


def test_startup_refusals_are_one_error_line_off_loopback_without_a_token_above_all(service, tmp_path) -> None:
    for host in ("0.0.0.0", "192.0.2.10", "example.org"):
        t0 = time.perf_counter()
        proc = subprocess.run([RLBENCH, "rewards", "serve", "incompressibility", "--host", host, "--port", "0"],
                              env=cpu_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--token-file" in lines[0], proc.stderr
        assert "serving" not in proc.stdout and "loaded" not in proc.stdout  # refused before any reward loaded
        assert time.perf_counter() - t0 < 60
    empty = tmp_path / "empty"
    empty.write_text("")
    proc = subprocess.run([RLBENCH, "rewards", "serve", "incompressibility", "--token-file", str(empty)],
                          env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --token-file") and "is empty" in proc.stderr
    port = int(service.url.rsplit(":", 1)[1])
    with pytest.raises(ServiceStartError) as info:
        ServiceProcess("incompressibility", port=port, env=cpu_env()).start()
    assert info.value.returncode == 2
    assert info.value.output.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use; choose " \
                                        "another --port (0 takes a free one, printed at startup)."


# -- failures are errors, never scores ------------------------------------------------------------------------


def test_a_reward_that_fails_gets_an_error_never_a_score_and_only_the_failing_request_fails(service, token_file
                                                                                             ) -> None:
    flaky = remote(service, "flaky", token_file, retries=0)
    black = torch.zeros(2, 3, 16, 16)
    with pytest.raises(RemoteRewardError) as info:
        flaky(black, ["a", "b"])
    assert "HTTP 500" in str(info.value) and "cannot score an all-black image" in str(info.value)
    assert f"the reward service at {service.url}" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RemoteRewardError, match=r"HTTP 422: reward 'shapes-gold' refused the inputs"):
        remote(service, "shapes-gold", token_file)(torch.rand(1, 3, 32, 32), ["not a shapes caption"])

    # Concurrent requests batched together: the black one fails alone, the others get their own scores.
    client = ServiceClient(service.url, token=TOKEN, retries=0)
    before = health(service)["stats"]["failed"]
    arrays = {i: request_images(7, 0, i, 2, 16) for i in range(4)}
    arrays[2][1] = 0
    results: dict[int, object] = {}

    def send(i: int) -> None:
        try:
            results[i] = client.score("flaky", arrays[i], ["p", "p"], [{}, {}], request_id=f"c{i}")
        except RemoteRewardError as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in arrays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[2], RemoteRewardError) and "all-black" in str(results[2])
    for i in (0, 1, 3):
        expected = (torch.from_numpy(arrays[i]).float() / 255).mean(dim=(1, 2, 3))
        assert torch.allclose(torch.from_numpy(results[i].scores), expected, atol=1e-6), i
    assert health(service)["stats"]["failed"] - before == 1


def test_a_service_that_is_down_is_one_error_naming_the_url() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError) as info:
        make_reward("remote", url=url, reward="incompressibility", retries=2, backoff_s=0.05)
    msg = str(info.value)
    assert f"the reward service at {url} did not answer GET /v1/rewards/incompressibility after 3 attempt(s)" in msg
    assert "ConnectionRefusedError" in msg and "\n" not in msg
    assert 0.15 <= time.perf_counter() - t0 < 10  # the back-off waited 0.05 + 0.1 s, and no more than needed


def test_a_service_that_hangs_times_out_and_is_retried_a_bounded_number_of_times() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError) as info:
            ServiceClient(url, timeout_s=0.3, retries=1, backoff_s=0.05).health()
        elapsed = time.perf_counter() - t0
    msg = str(info.value)
    assert f"the reward service at {url} did not answer GET /v1/health after 2 attempt(s) (timeout 0.3 s" in msg
    assert "timed out" in msg
    assert 0.6 <= elapsed < 5


def test_serve_device_goes_to_the_rewards_that_take_one() -> None:
    from rlbench.service.server import _reward_options, parse_names

    assert _reward_options("clipscore", {}, "cpu") == {"device": "cpu"}
    assert _reward_options("clipscore", {"device": "meta"}, "cpu") == {"device": "meta"}  # --reward-opt wins
    assert _reward_options("incompressibility", {"num_workers": 1}, "cuda") == {"num_workers": 1}
    assert parse_names(" incompressibility, clipscore") == ["incompressibility", "clipscore"]
    for bad, fragment in (("a:1,b", "combination"), ("a,,b", "joined by commas"), ("a,a", "twice")):
        with pytest.raises(ConfigError, match=fragment):
            parse_names(bad)


# -- load: several client processes ----------------------------------------------------------------------------


def test_load_from_several_processes_every_answer_matches_and_requests_are_batched(service) -> None:
    before = health(service)["stats"]
    load = run_load(service.url, "incompressibility", processes=3, threads=3, requests=24, max_images=3, size=24,
                    token=TOKEN, seed=11)
    after = health(service)["stats"]
    assert len(load.records) == 3 * 24
    assert sorted(r["id"] for r in load.records) == sorted(f"w{w}-r{i}" for w in range(3) for i in range(24))
    reward = make_reward("incompressibility")
    for r in load.records:
        images = request_images(11, r["worker"], r["index"], r["n"], 24)
        expected = reward(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, ["a photo of a cat"] * r["n"])
        assert r["scores"] == expected.scores.tolist(), r["id"]
    assert after["requests"] - before["requests"] == len(load.records)  # nothing lost, nothing scored twice
    assert after["images"] - before["images"] == load.images
    merged = [r for r in load.records if r["batch"]["requests"] > 1]
    assert merged, "no two requests were ever scored in one reward call"
    assert all(r["batch"]["images"] <= 16 for r in load.records)  # --max-batch 16
    assert after["max_batch_requests"] > 1
    assert after["scoring_threads"] == ["MainThread"]  # every reward call on the service's main thread


# -- training against a service that dies, resumed -------------------------------------------------------------

SMALL = ["sample.num_steps=12", "sample.batch_size=4", "sample.num_batches_per_epoch=1", "sample.images_per_prompt=2",
         "advantage.min_count=2", "train.batch_size=2", "logging.tensorboard=false", "logging.num_samples=2",
         "model.device=cpu", "checkpoint.every=1", "eval.every=0", "sample.async_reward=true"]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def _train(*args: str) -> list[str]:
    return [RLBENCH, "train", "--model", "shapes", "--epochs", "2", *args, *(a for o in SMALL for a in ("--set", o))]


@pytest.mark.usefixtures("one_thread")
def test_training_survives_a_dead_service_and_resumes_bit_identical_to_in_process(tmp_path) -> None:
    from rlbench.train.rundir import RunDir
    from rlbench.train.trainer import train

    env = cpu_env(PYTHONHASHSEED="0")
    first = ServiceProcess("shapes-gold", env=env).start()
    run, ref = tmp_path / "served", tmp_path / "ref"
    try:
        proc = subprocess.Popen(_train("--reward", "remote", "--reward-opt", f"url={first.url}", "--reward-opt",
                                       "reward=shapes-gold", "--reward-opt", "retries=1", "--reward-opt",
                                       "backoff_s=0.1", "--out", str(run)),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def kill_after_epoch_1() -> None:  # no torch here: it only watches a folder
            deadline = time.time() + 300
            while not (run / "checkpoints" / "0001").is_dir() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            first.kill()

        killer = threading.Thread(target=kill_after_epoch_1)
        killer.start()
        # Meanwhile, the same run with the reward in this process.
        train(values={"run": {"epochs": 2, "out": str(ref)}, "model": {"name": "shapes"},
                      "reward": {"name": "shapes-gold"}}, overrides=SMALL, log=None)
        killer.join()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        first.stop()
    assert proc.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: the reward service at {first.url} did not answer"), stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["0001"], \
        "the kill came too late to test anything"
    assert RunDir(run).verify_checkpoint(1).intact and len(_metrics(run)) == 1

    with ServiceProcess("shapes-gold", port=int(first.url.rsplit(":", 1)[1]), env=env) as second:
        assert second.url == first.url  # the run's config names this URL
        train(resume=run, log=None)
    assert _metrics(run) == _metrics(ref) and len(_metrics(ref)) == 2
    a = load_file(str(ref / "checkpoints" / "0002" / "trainable.safetensors"))
    b = load_file(str(run / "checkpoints" / "0002" / "trainable.safetensors"))
    start = load_file(str(ref / "checkpoints" / "0001" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # epoch 2 did train


# -- the service from another Python environment --------------------------------------------------------------


@pytest.mark.slow
def test_a_service_from_another_environment_with_other_pins_trains_this_one(tmp_path) -> None:
    """A second venv with only what serving PickScore needs (torch numpy pillow fastapi uvicorn typer rich tomli-w
    transformers, from the package index) and rlbench installed --no-deps, pillow pinned older than here; it serves
    `pickscore` on tiny random weights (written here in the official HF layout) and this environment trains against
    it, with the scores equal to the in-process reward's. Measured here: ~70 s to build (5.5 GB, torch with its CUDA
    wheels) without transformers."""
    import PIL

    from rlbench.testing import tiny_reward_options

    pillow = "10.4.0"
    assert PIL.__version__ != pillow, "pick another pin: the two environments must conflict"
    other, root = tmp_path / "venv", Path(__file__).resolve().parents[1]
    py = other / "bin" / "python"
    options = tiny_reward_options("pickscore", tmp_path / "zoo")
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(other)], check=True, timeout=300)
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch", "numpy", f"pillow=={pillow}", "fastapi", "uvicorn", "typer", "rich", "tomli-w",
                        "transformers", "safetensors", "huggingface_hub"], check=True, timeout=3600)
        subprocess.run([*pip, "--no-deps", "-e", str(root)], check=True, timeout=600)
        built = time.perf_counter() - t0
        probe = subprocess.run([str(py), "-c", "import PIL, sys; print(PIL.__version__, sys.prefix)"],
                               capture_output=True, text=True, check=True, env=cpu_env(PYTHONPATH="")).stdout.split()
        assert probe == [pillow, str(other)]
        with ServiceProcess("pickscore", {"pickscore": options}, python=py, env=cpu_env(PYTHONPATH="")) as service:
            reward = make_reward("remote", url=service.url, reward="pickscore")
            images = torch.rand(3, 3, 32, 32)
            served = reward(images, ["a cat", "a dog", "a cat"]).scores  # scored by the other environment
            local = make_reward("pickscore", **options)(images, ["a cat", "a dog", "a cat"]).scores
            assert torch.allclose(served, local, atol=1e-5), (served, local)
            out = tmp_path / "run"
            proc = subprocess.run(_train("--reward", "remote", "--reward-opt", f"url={service.url}", "--reward-opt",
                                         "reward=pickscore", "--out", str(out)),
                                  env=cpu_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        config = (out / "config.toml").read_text()
        assert 'name = "remote"' in config and service.url in config
        rows = _metrics(out)
        assert len(rows) == 2 and all(math.isfinite(r["reward_mean"]) for r in rows)
        print(f"second environment built in {built:.0f} s")
    finally:
        shutil.rmtree(other, ignore_errors=True)  # 5.5 GB
