"""The evaluation suites' public prompt files, fetched on request like weights (issue 21, part 1).

Each file is pinned to a commit of its public repository and checked by sha256 (``FILES``; the sources and hashes
are those of ``../shared/data/README.md``). Where a file is looked for, in order:

1. ``$RLBENCH_DATA_DIR/<path>`` when that variable is set (a folder laid out as ``../shared/data``:
   ``geneval/evaluation_metadata.jsonl``, ``flow-grpo-ocr/test.txt``, ``t2i-compbench/<category>_val.txt``);
   the tests use the shared copies this way, never the network;
2. the rlbench data cache, ``$HF_HOME/rlbench/data/<path>`` (where ``rlbench prompts download NAME`` puts it);
3. its pinned URL, downloaded into the cache when the machine is online (``HF_HUB_OFFLINE`` unset).

A file whose sha256 is not the pinned one is refused, naming it (a corrupt or altered copy is never read), and a
missing one offline is one line naming ``rlbench prompts download NAME``. Only suites whose licence allows it
are built in (all three are MIT); DrawBench, GenAI-Bench, Pick-a-Pic and HPDv2 prompts come from the user as a file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rlbench.errors import InputError, WeightsNotAvailable

DATA_DIR_ENV = "RLBENCH_DATA_DIR"


@dataclass(frozen=True)
class DataFile:
    """One pinned file: its path in the data layout, its raw URL at a commit, and its sha256."""

    path: str
    url: str
    sha256: str


_GENEVAL = "https://raw.githubusercontent.com/djghosh13/geneval/af4902f24d3ca90ebbb446dd9891a59e0f82725f/"
_OCR = "https://raw.githubusercontent.com/yifan123/flow_grpo/ac4c86e8cae021841f1fde853d340e0db67690dd/"
_COMPBENCH = "https://raw.githubusercontent.com/Karine-Huang/T2I-CompBench/1b7094991a57f3c22abdd4f6e8ba6c1a15517073/"
# T2I-CompBench++'s eight categories, each with a 300-prompt validation file.
COMPBENCH_SHA256 = {
    "3d_spatial": "c9953597315f36a5fcb41291bb19bdc6ab5f64a0fa760d691b4854a73f5d1fe9",
    "color": "1634259756dbc77d13093d907d414480080ec9790a8c97ad09efaea7b2534f2d",
    "complex": "1b808018b8d9916db3d47d5aa2ef18377a3549a56901a474156f799824cdf3b4",
    "non_spatial": "04c56cc9ac441dc9ea6c5157652058bd1635b5308526dd31bb29a1caab9a758d",
    "numeracy": "dad8df141604b70ba7554bec724e3db0a80023680769b5c514854ea2d2527bbe",
    "shape": "37e1a276906c7ea9516cbd7ac8501be896006c0c17ca7344f260562834455bae",
    "spatial": "8707a1d7e42ce3002d95363cf55f74bd043c843ae27108f5125aaaa7840ca988",
    "texture": "fbb5363515b4a28009e360afaaaf389d2dd2289e50dbb0c6ef4ea0c7fe4f3d4f",
}
DATASETS: dict[str, tuple[DataFile, ...]] = {
    "geneval": (
        DataFile("geneval/evaluation_metadata.jsonl", _GENEVAL + "prompts/evaluation_metadata.jsonl",
                 "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"),
        DataFile("geneval/object_names.txt", _GENEVAL + "evaluation/object_names.txt",
                 "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd"),
    ),
    "flow-grpo-ocr": (
        DataFile("flow-grpo-ocr/test.txt", _OCR + "dataset/ocr/test.txt",
                 "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc"),
    ),
    "t2i-compbench": tuple(
        DataFile(f"t2i-compbench/{c}_val.txt", _COMPBENCH + f"examples/dataset/{c}_val.txt", sha)
        for c, sha in COMPBENCH_SHA256.items()),
}
FILES: dict[str, DataFile] = {f.path: f for files in DATASETS.values() for f in files}


def dataset_of(name: str) -> str:
    """The dataset a name means: a dataset (``geneval``) or one of its prompt sets (``t2i-compbench-color``)."""
    if name in DATASETS:
        return name
    for dataset in DATASETS:
        if name.startswith(dataset + "-"):
            return dataset
    import difflib

    names = sorted(DATASETS)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise InputError(f"no downloadable prompt data named {name!r}.{hint} Choose from {', '.join(names)}.")


def cache_dir() -> Path:
    """The rlbench data cache: ``$HF_HOME/rlbench/data`` (beside the URL downloads of reward weights)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "rlbench" / "data"


def _checked(path: Path, spec: DataFile, where: str) -> Path:
    from rlbench.weights import sha256_of

    got = sha256_of(path)
    if got != spec.sha256:
        raise InputError(
            f"{where} {path} is not the pinned {spec.path} (sha256 {got[:16]}..., expected {spec.sha256[:16]}...): "
            f"a corrupt or altered copy is not read. Replace it with the file from {spec.url} "
            f"(`rlbench prompts download {dataset_of(spec.path.split('/')[0])}` after deleting it).")
    return path


def _fetch(spec: DataFile, target: Path) -> Path:
    """Download ``spec`` into ``target`` atomically, refusing a file whose sha256 differs (nothing kept)."""
    from rlbench.weights import fetch_pinned

    return fetch_pinned(spec.url, spec.sha256, target, lambda: InputError(
        f"the file downloaded from {spec.url} does not have the pinned sha256 {spec.sha256}; the source changed or "
        "the download was corrupted. Nothing was kept."))


CACHED = "the cached file"


def local_copy(path: str) -> tuple[Path, str]:
    """Where the pinned file ``path`` is looked for without a download, and what that place is: the
    ``$RLBENCH_DATA_DIR`` copy when the variable is set, else the data cache's (the file may not exist)."""
    local = os.environ.get(DATA_DIR_ENV, "").strip()
    if local:
        return Path(local).expanduser() / path, f"{DATA_DIR_ENV} file"
    return cache_dir() / path, CACHED


def data_path(path: str) -> Path:
    """The local, sha256-checked copy of the pinned file ``path`` (e.g. ``geneval/evaluation_metadata.jsonl``)."""
    from rlbench.weights import is_offline

    spec = FILES[path]
    candidate, where = local_copy(spec.path)
    if candidate.is_file():
        return _checked(candidate, spec, where)
    if where != CACHED:
        raise InputError(f"{DATA_DIR_ENV}={os.environ[DATA_DIR_ENV].strip()} has no {spec.path}; lay the folder out as "
                         f"the suites' sources ({', '.join(sorted(FILES))}) or unset {DATA_DIR_ENV} to use the "
                         "download cache.")
    dataset = dataset_of(spec.path.split("/")[0])
    if is_offline():
        raise WeightsNotAvailable(
            f"the prompt file {spec.path} is not in the rlbench data cache ({cache_dir()}) and HF_HUB_OFFLINE is set: "
            f"fetch it with `rlbench prompts download {dataset}` on a machine with network access, or point "
            f"{DATA_DIR_ENV} at a folder holding it.")
    try:
        return _fetch(spec, candidate)
    except OSError as exc:
        raise WeightsNotAvailable(f"could not download {spec.url} ({type(exc).__name__}: {exc}); retry, or fetch it "
                                  f"with `rlbench prompts download {dataset}` elsewhere, or set {DATA_DIR_ENV}.") from exc


def download(name: str, *, log=print) -> list[Path]:
    """Fetch every file of a dataset (or of the dataset of a prompt set) into the cache; returns the paths. Files
    already cached are checked, not fetched again; ``RLBENCH_DATA_DIR`` is ignored here (this fills the cache)."""
    out = []
    for spec in DATASETS[dataset_of(name)]:
        target = cache_dir() / spec.path
        if target.is_file():
            out.append(_checked(target, spec, "the cached file"))
            continue
        if log is not None:
            log(f"fetching {spec.url} ...")
        try:
            out.append(_fetch(spec, target))
        except OSError as exc:
            raise WeightsNotAvailable(f"could not download {spec.url} ({type(exc).__name__}: {exc}).") from exc
    return out


# -- the prompt sets (registered in pyproject.toml) ---------------------------------------------------------

_QUOTED = re.compile(r'"([^"]*)"')


def geneval():
    """GenEval's 553 prompts (djghosh13/geneval @ af4902f), each with its metadata: ``tag`` (single_object,
    two_object, counting, colors, position, color_attr), ``include`` and ``exclude`` clauses (MIT)."""
    from rlbench.prompts import PromptSet

    lines = data_path("geneval/evaluation_metadata.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    return PromptSet("geneval", [r["prompt"] for r in records], records,
                     description="GenEval (djghosh13/geneval @ af4902f, prompts/evaluation_metadata.jsonl)")


def flow_grpo_ocr():
    """Flow-GRPO's OCR test prompts (yifan123/flow_grpo @ ac4c86e, dataset/ocr/test.txt; 1,018, MIT); metadata
    ``text``: the first quoted span, the text the image must render (Flow-GRPO's OCR reward reads that span)."""
    from rlbench.prompts import PromptSet

    prompts = [x for x in data_path("flow-grpo-ocr/test.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    meta = []
    for p in prompts:
        m = _QUOTED.search(p)
        meta.append({"text": m.group(1) if m else None})
    return PromptSet("flow-grpo-ocr", prompts, meta,
                     description="Flow-GRPO OCR test set (yifan123/flow_grpo @ ac4c86e, dataset/ocr/test.txt)")


def _compbench(category: str):
    from rlbench.prompts import PromptSet

    path = data_path(f"t2i-compbench/{category}_val.txt")
    prompts = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    name = "t2i-compbench-" + category.replace("_", "-")
    return PromptSet(name, prompts, [{"category": category} for _ in prompts],
                     description=f"T2I-CompBench {category} validation prompts (Karine-Huang/T2I-CompBench @ 1b70949)")


def _compbench_factory(category: str):
    def factory():
        return _compbench(category)

    factory.__name__ = f"t2i_compbench_{category}"
    factory.__doc__ = (f"T2I-CompBench's 300 {category.replace('_', ' ')} validation prompts (Karine-Huang/"
                       "T2I-CompBench @ 1b70949, examples/dataset; MIT); metadata ``category``.")
    return factory


t2i_compbench_3d_spatial = _compbench_factory("3d_spatial")
t2i_compbench_color = _compbench_factory("color")
t2i_compbench_complex = _compbench_factory("complex")
t2i_compbench_non_spatial = _compbench_factory("non_spatial")
t2i_compbench_numeracy = _compbench_factory("numeracy")
t2i_compbench_shape = _compbench_factory("shape")
t2i_compbench_spatial = _compbench_factory("spatial")
t2i_compbench_texture = _compbench_factory("texture")
