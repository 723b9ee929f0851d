"""``vlm-bertscore`` (DDPO's alignment reward) and rlbench.nets.vlm's describers, on a tiny random LLaVA.

The in-process describer runs the REAL classes (LlavaForConditionalGeneration, LlavaProcessor) with a
tiny random config saved in the llava-hf on-disk layout (:func:`rlbench.testing.write_tiny_llava`); the
endpoint describer talks to a stdlib http.server fake on 127.0.0.1. BERTScore runs on the real
shipped all-MiniLM-L6-v2.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from rlbench.nets.bertscore import BERTScorer
from rlbench.checker import check_reward
from rlbench.errors import ConfigError, WeightsNotAvailable
from rlbench.registry import make_reward
from rlbench.rewards.vlm_bertscore import QUESTION, REFERENCE, VLMBERTScore
from rlbench.nets.vlm import EndpointDescriber, TransformersDescriber, VLMEndpointError, is_loopback
from rlbench.testing import write_tiny_llava

PROMPTS = ["a cat riding a bike", "two red circles left of a blue square", "a dog", "a pig washing the dishes",
           "three green triangles"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), seed=0)


def smooth_images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


# -- constants and card ---------------------------------------------------------------------------------


def test_ddpo_question_reference_and_card() -> None:
    # ddpo-pytorch ddpo_pytorch/rewards.py llava_bertscore
    assert QUESTION == "Answer concisely: what is going on in this image?"
    assert REFERENCE.format(prompt="a cat riding a bike") == "The image contains a cat riding a bike"
    card = make_reward("vlm-bertscore").card  # construction loads nothing
    assert card.name == "vlm-bertscore" and card.deterministic and not card.differentiable and card.higher_is_better
    assert "llava-hf/llava-1.5-7b-hf" in card.weights and "all-MiniLM-L6-v2" in card.weights
    assert "DDPO" in card.paper and "BERTScore" in card.paper
    specs = {s.option: s for s in VLMBERTScore.weights_spec}
    assert set(specs) == {"vlm", "bertscore_model"}
    assert "*.safetensors" in specs["vlm"].allow_patterns and specs["bertscore_model"].sha256


# -- in-process describer ------------------------------------------------------------------------------


def test_describer_is_greedy_deterministic_and_batched_equals_one_by_one(tiny_llava) -> None:
    images = smooth_images(5)
    d = TransformersDescriber(tiny_llava, max_new_tokens=6, batch_size=4)
    answers = d.describe(images, QUESTION)
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
    assert len(set(answers)) > 1  # the answer depends on the image
    assert d.describe(images, QUESTION) == answers
    one = TransformersDescriber(tiny_llava, max_new_tokens=6, batch_size=1)
    assert [one.describe(images[i : i + 1], QUESTION)[0] for i in range(5)] == answers
    assert d._processor.tokenizer.padding_side == "left"


def test_describer_equals_a_direct_transformers_generation(tiny_llava) -> None:
    """Independent: AutoProcessor + AutoModelForImageTextToText as the llava-hf model card does, on the
    JPEG (quality 80) round trip of the uint8 image, greedy."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_llava))
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_llava)).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{QUESTION} ASSISTANT:"  # LLaVA-1.5's template
    images = smooth_images(3, seed=1)
    expected = []
    for img in images:
        arr = (img * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=80)
        pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        inputs = processor(images=pil, text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
        expected.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    d = TransformersDescriber(tiny_llava, max_new_tokens=6)
    assert d.prompt(QUESTION) == prompt
    assert d.describe(images, QUESTION) == expected


# -- the reward ----------------------------------------------------------------------------------------


def test_score_is_bertscore_recall_of_the_answer_against_the_prompt_sentence(tiny_llava) -> None:
    reward = make_reward("vlm-bertscore", vlm=str(tiny_llava), max_new_tokens=6)
    images = smooth_images(5)
    out = reward(images, PROMPTS)
    answers = out.info["answers"]
    assert answers == TransformersDescriber(tiny_llava, max_new_tokens=6).describe(images, QUESTION)
    references = [f"The image contains {p}" for p in PROMPTS]
    expected = BERTScorer().score(answers, references)  # candidate = answer, reference = prompt sentence
    assert out.scores.dtype == torch.float32 and out.scores.shape == (5,)
    torch.testing.assert_close(out.scores, expected.recall, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.info["precision"], expected.precision, atol=1e-5, rtol=0)
    assert not torch.allclose(out.scores, expected.precision)  # recall, not precision
    assert reward.card.weights.startswith(str(tiny_llava))  # the card names the weights in use


def test_check_reward_passes_with_tiny_llava(tiny_llava) -> None:
    check_reward(make_reward("vlm-bertscore", vlm=str(tiny_llava), max_new_tokens=4, batch_size=2))


def test_batch_size_invariance(tiny_llava) -> None:
    images = smooth_images(5, seed=2)
    ref = VLMBERTScore(vlm=str(tiny_llava), max_new_tokens=5, batch_size=16)(images, PROMPTS).scores
    for batch_size in (1, 2):
        got = VLMBERTScore(vlm=str(tiny_llava), max_new_tokens=5, batch_size=batch_size)(images, PROMPTS).scores
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_one_generate_call_per_chunk(tiny_llava) -> None:
    reward = VLMBERTScore(vlm=str(tiny_llava), max_new_tokens=3, batch_size=2)
    model, _ = reward.describer.load()
    calls: list[int] = []
    original = model.generate

    def counting_generate(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    model.generate = counting_generate
    try:
        reward(smooth_images(5), PROMPTS)
    finally:
        del model.generate
    assert calls == [2, 2, 1]


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hub_constants

    hf_home = tmp_path / "hf-home"
    for key, value in (("HF_HOME", hf_home), ("HF_HUB_CACHE", hf_home / "hub")):
        monkeypatch.setenv(key, str(value))
        monkeypatch.setattr(hub_constants, key, str(value), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    reward = make_reward("vlm-bertscore")
    with pytest.raises(WeightsNotAvailable, match=r"rlbench rewards download vlm-bertscore.*--reward-opt vlm=PATH"):
        reward(smooth_images(1), ["a cat"])


@pytest.mark.parametrize("options", [dict(describer="llava-server"), dict(batch_size=0), dict(dtype="int4"),
                                     dict(bertscore_variant="bleu"), dict(max_new_tokens=0), dict(jpeg_quality=0),
                                     dict(describer="endpoint", endpoint_url="http://10.1.2.3:8000/v1"),
                                     dict(describer="endpoint", endpoint_url="https://vlm.example.com/v1"),
                                     dict(describer="endpoint", endpoint_url="ftp://127.0.0.1/v1"),
                                     dict(describer="endpoint", retries=-1)])
def test_bad_options_are_config_errors(options) -> None:
    with pytest.raises(ConfigError):
        make_reward("vlm-bertscore", **options)


# -- endpoint describer --------------------------------------------------------------------------------


class FakeVLMServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 (random port) that records requests.

    ``plan``: what to do with each successive request: "ok", an HTTP status (int), or "hang".
    Answers are a function of the image bytes, so they are deterministic per image.
    """

    ANSWERS = ("a cat riding a bike", "two red circles", "a dog on a white background", "nothing at all")

    def __init__(self, plan=None, delay_s: float = 0.0) -> None:
        self.plan = list(plan or [])
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    server.requests.append({"path": self.path, "body": json.loads(body)})
                    server.headers.append(dict(self.headers))
                    action = server.plan.pop(0) if server.plan else "ok"
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if action == "hang":
                        server.release.wait(5.0)
                        return
                    time.sleep(server.delay_s)
                    if isinstance(action, int):
                        self.send_response(action)
                        self.end_headers()
                        self.wfile.write(b'{"error": "planned failure"}')
                        return
                    url = json.loads(body)["messages"][0]["content"][0]["image_url"]["url"]
                    pick = hashlib.sha256(url.encode()).digest()[0] % len(server.ANSWERS)
                    reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                  "content": f"  {server.ANSWERS[pick]} "}}]})
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(reply.encode())
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeVLMServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_endpoint_request_is_openai_chat_json_with_a_jpeg_q80_data_url(monkeypatch) -> None:
    monkeypatch.setenv("RLBENCH_VLM_API_KEY", "sk-test")
    images = smooth_images(2, size=40)
    with FakeVLMServer() as server:
        d = EndpointDescriber(server.url, "llava-hf/llava-1.5-7b-hf", max_tokens=32, timeout_s=5, retries=0)
        answers = d.describe(images, QUESTION)
    assert len(server.requests) == 2 and all(r["path"] == "/v1/chat/completions" for r in server.requests)
    assert all(a in FakeVLMServer.ANSWERS for a in answers)  # stripped
    assert all(h["Authorization"] == "Bearer sk-test" and h["Content-Type"] == "application/json"
               for h in server.headers)
    body = server.requests[0]["body"]
    assert body["model"] == "llava-hf/llava-1.5-7b-hf" and body["temperature"] == 0 and body["max_tokens"] == 32
    (message,) = body["messages"]
    assert message["role"] == "user"
    image_part, text_part = message["content"]
    assert text_part == {"type": "text", "text": QUESTION}
    assert image_part["type"] == "image_url"
    prefix = "data:image/jpeg;base64,"
    urls = sorted(r["body"]["messages"][0]["content"][0]["image_url"]["url"] for r in server.requests)
    expected = []
    for img in images:  # ddpo-pytorch: uint8 quantisation, then PIL JPEG quality 80
        buf = io.BytesIO()
        arr = (img * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(buf, format="JPEG", quality=80)
        expected.append(prefix + base64.b64encode(buf.getvalue()).decode())
    assert urls == sorted(expected)


def test_endpoint_without_key_sends_no_authorization(monkeypatch) -> None:
    monkeypatch.delenv("RLBENCH_VLM_API_KEY", raising=False)
    with FakeVLMServer() as server:
        EndpointDescriber(server.url, timeout_s=5, retries=0).describe(smooth_images(1), QUESTION)
    assert "Authorization" not in server.headers[0]


def test_endpoint_reward_scores_the_served_answers_and_passes_check_reward() -> None:
    with FakeVLMServer() as server:
        reward = make_reward("vlm-bertscore", describer="endpoint", endpoint_url=server.url, timeout_s=5,
                             retries=0, concurrency=3)
        images = smooth_images(5, seed=3)
        out = reward(images, PROMPTS)
        check_reward(reward)
        assert server.max_in_flight >= 1
    expected = BERTScorer().recall(out.info["answers"], [f"The image contains {p}" for p in PROMPTS])
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=0)
    assert reward.card.weights == "sentence-transformers/all-MiniLM-L6-v2"  # the VLM is served elsewhere


def test_endpoint_requests_run_concurrently() -> None:
    with FakeVLMServer(delay_s=0.1) as server:
        EndpointDescriber(server.url, timeout_s=5, retries=0, concurrency=4).describe(smooth_images(8), QUESTION)
    assert server.max_in_flight >= 2


def test_endpoint_retries_failures_with_backoff_then_succeeds() -> None:
    with FakeVLMServer(plan=[500, 503]) as server:
        d = EndpointDescriber(server.url, timeout_s=2, retries=2, backoff_s=0.01)
        assert d.describe(smooth_images(1), QUESTION)[0] in FakeVLMServer.ANSWERS
    assert len(server.requests) == 3
    with FakeVLMServer(plan=[500, 500]) as server:
        d = EndpointDescriber(server.url, timeout_s=2, retries=1, backoff_s=0.01)
        with pytest.raises(VLMEndpointError, match=r"after 2 attempts.*HTTP 500"):
            d.describe(smooth_images(1), QUESTION)
    assert len(server.requests) == 2


def test_endpoint_that_hangs_fails_clearly_after_the_retries() -> None:
    with FakeVLMServer(plan=["hang", "hang"]) as server:
        d = EndpointDescriber(server.url, timeout_s=0.2, retries=1, backoff_s=0.01)
        t0 = time.perf_counter()
        with pytest.raises(VLMEndpointError, match=r"did not answer after 2 attempts \(timeout 0.2 s each\)"):
            d.describe(smooth_images(1), QUESTION)
        elapsed = time.perf_counter() - t0
    assert len(server.requests) == 2 and 0.35 < elapsed < 2.0


def test_endpoint_client_errors_are_not_retried() -> None:
    with FakeVLMServer(plan=[400]) as server:
        with pytest.raises(VLMEndpointError, match="refused the request: HTTP 400"):
            EndpointDescriber(server.url, timeout_s=2, retries=3, backoff_s=0.01).describe(smooth_images(1), QUESTION)
    assert len(server.requests) == 1


def test_endpoint_connection_refused_is_retried_then_reported() -> None:
    with FakeVLMServer() as server:
        url = server.url
    d = EndpointDescriber(url, timeout_s=0.5, retries=1, backoff_s=0.01)  # the server is gone
    with pytest.raises(VLMEndpointError, match="did not answer after 2 attempts"):
        d.describe(smooth_images(1), QUESTION)


def test_only_loopback_hosts_unless_allowed() -> None:
    for host in ("localhost", "127.0.0.1", "127.3.2.1", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "example.com", "0.0.0.0", "", None):
        assert not is_loopback(host), host
    EndpointDescriber("http://localhost:8000/v1")
    EndpointDescriber("http://[::1]:8000/v1")
    with pytest.raises(ConfigError, match="allow_remote=True"):
        EndpointDescriber("http://192.168.1.20:8000/v1")
    EndpointDescriber("https://vlm.example.com/v1", allow_remote=True)  # constructing sends nothing


def test_to_uint8_matches_ddpo_quantisation() -> None:
    from rlbench.utils.images import to_uint8

    x = torch.tensor([0.0, 0.5 / 255, 1.5 / 255, 0.999, 1.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    got = to_uint8(x.contiguous(), layout="hwc")
    assert got.shape == (1, 1, 5, 3) and got.dtype == np.uint8
    assert got[0, 0, :, 0].tolist() == [0, 0, 2, 255, 255]  # round half to even, as torch.round
