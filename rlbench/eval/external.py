"""``rlbench eval --images PATH``: score images rlbench did not make, with the same metrics, tables and report.

Two layouts are read:

* GenEval's sample folder (``generation/diffusers_generate.py``): ``PATH/<index>/metadata.jsonl`` (one JSON line, the
  prompt's metadata with its ``prompt``) and ``PATH/<index>/samples/NNNN.png``;
* a manifest, ``manifest.csv`` (header ``path,prompt`` and optionally ``group``) or ``manifest.jsonl`` (one object a
  line with the same keys, and optionally ``metadata``), paths relative to the manifest; ``PATH`` is the manifest or
  a folder holding one. ``group`` names the generator (a column of the tables; default ``external``).

Images keep their own sizes (a reward is called on batches of one size). Each image is scored where it lies (the
results' ``image`` column holds its absolute path; nothing is copied); a score is cached by the file's content hash.
An image whose prompt belongs to a requested suite's prompt set is scored by that suite's metrics with the suite's
metadata for that prompt (GenEval's clauses, the OCR text); ``--rewards`` score every image. The tables are the
summary and each suite's table, with ``external`` in place of checkpoints.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlbench.errors import InputError

MAX_NAMED = 5  # bad files named in an error (then a count)


@dataclass
class ExternalImage:
    path: Path
    prompt: str
    group: str = "external"
    metadata: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # the image's number among its prompt's images


def _geneval_folder(root: Path) -> list[ExternalImage]:
    out = []
    bad: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = sub / "metadata.jsonl"
        if not meta.is_file():
            bad.append(f"{sub.name}/metadata.jsonl (missing)")
            continue
        try:
            line = meta.read_text(encoding="utf-8").strip().splitlines()[0]
            md = json.loads(line)
            prompt = md["prompt"]
        except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
            bad.append(f"{sub.name}/metadata.jsonl ({type(exc).__name__})")
            continue
        samples = sorted((sub / "samples").glob("*.png")) if (sub / "samples").is_dir() else []
        if not samples:
            bad.append(f"{sub.name}/samples/ (no .png images)")
        for k, png in enumerate(samples):
            out.append(ExternalImage(png, str(prompt), "external", dict(md), k))
    if bad:
        raise InputError(f"{root} is a GenEval sample folder with {len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'}: "
                         + ", ".join(bad[:MAX_NAMED]) + (f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED
                                                         else "")
                         + "; each <index>/ folder needs metadata.jsonl (with its prompt) and samples/NNNN.png.")
    return out


def read_rows(path: Path, what: str, keys: str) -> tuple[list[str] | None, list[tuple[int, Any]]]:
    """The rows of a .csv (with a header) or .jsonl (one object a line) file: (the CSV header, or None for JSONL;
    [(line number, row)]). An unreadable file or a line that is not JSON is one error naming ``what`` the file is
    and the ``keys`` its rows need."""
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                return list(reader.fieldnames or []), list(enumerate(reader, 2))
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except ValueError as exc:
                    raise InputError(f"{path} line {i} is not JSON ({exc}); write one object a line with {keys}.") \
                        from exc
        return None, rows
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from exc


def _manifest(path: Path, prompt: str | None = None) -> list[ExternalImage]:
    header, numbered = read_rows(path, "the manifest", "path and prompt")
    if header is not None and ("path" not in header or ("prompt" not in header and prompt is None)):
        raise InputError(f"{path} needs a header with the columns path,prompt (and optionally group); it "
                         f"has {','.join(header) or 'none'}.")
    rows: list[Any] = [r for _, r in numbered]
    out, seen = [], {}
    if prompt is not None:  # the default prompt of rows without one (rlbench rewards score/compare --prompt)
        def lacks(r: Any) -> bool:
            return isinstance(r, dict) and not str(r.get("prompt") or "").strip()

        if rows and not any(lacks(r) for r in rows):
            raise InputError(f"{path} gives every image its own prompt; drop --prompt (it is the prompt of images "
                             "without one).")
        rows = [{**r, "prompt": prompt} if lacks(r) else r for r in rows]
    no_prompt = [i + 2 for i, r in enumerate(rows) if not isinstance(r, dict) or not str(r.get("prompt") or "").strip()
                 or not str(r.get("path") or "").strip()]
    if no_prompt:
        raise InputError(f"{path}: {len(no_prompt)} row(s) without a path or a prompt (first at line "
                         f"{no_prompt[0] if path.suffix == '.csv' else no_prompt[0] - 1}); every image needs both.")
    for r in rows:
        group = str(r.get("group") or "external")
        k = seen.get((group, r["prompt"]), 0)
        seen[(group, r["prompt"])] = k + 1
        md = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
        p = Path(str(r["path"])).expanduser()
        out.append(ExternalImage(p if p.is_absolute() else path.parent / p, str(r["prompt"]), group, dict(md), k))
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_images(path: str | Path, prompt: str | None = None) -> tuple[list[ExternalImage], str]:
    """The images of ``path`` and its layout (``geneval``, ``manifest`` or ``folder``); one error naming what is wrong.

    ``prompt`` (``rlbench rewards score/compare --prompt``) is the prompt of every image that has none: the images of
    a plain folder of image files (layout ``folder``), manifest rows without a prompt. A source that gives every image
    its own prompt and a ``prompt`` as well is an error (which one was meant?).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"--images {root} does not exist; give a GenEval sample folder or a manifest.csv/.jsonl.")
    if root.is_file():
        if root.suffix not in (".csv", ".jsonl"):
            raise InputError(f"--images {root}: a manifest is a .csv (header path,prompt[,group]) or a .jsonl file.")
        images, layout = _manifest(root, prompt), "manifest"
    elif (root / "manifest.csv").is_file() or (root / "manifest.jsonl").is_file():
        m = root / "manifest.csv" if (root / "manifest.csv").is_file() else root / "manifest.jsonl"
        images, layout = _manifest(m, prompt), "manifest"
    elif any((p / "metadata.jsonl").is_file() for p in root.iterdir() if p.is_dir()):
        if prompt is not None:
            raise InputError(f"--images {root} is a GenEval sample folder, whose metadata.jsonl files give every image "
                             "its prompt; drop --prompt.")
        images, layout = _geneval_folder(root), "geneval"
    elif prompt is not None and any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir() if p.is_file()):
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        images, layout = [ExternalImage(p, prompt, "external", {}, k) for k, p in enumerate(files)], "folder"
    else:
        loose = any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir() if p.is_file())
        raise InputError(f"--images {root} is neither a GenEval sample folder (<index>/metadata.jsonl + samples/NNNN.png) "
                         "nor a folder with manifest.csv / manifest.jsonl"
                         + ("; its image files have no prompt: pass --prompt TEXT (rlbench rewards score / compare) "
                            "or write a manifest.csv (path,prompt)." if loose else "."))
    if not images:
        raise InputError(f"--images {root} holds no images.")
    check_readable([im.path for im in images])
    return images, layout


def check_readable(paths: Sequence[Path]) -> None:
    """One error naming the files of ``paths`` that are missing or not images (PIL's verify)."""
    bad = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                from PIL import Image

                Image.open(f).verify()
        except Exception as exc:  # noqa: BLE001 - missing, unreadable or not an image: all named the same way
            bad.append(f"{p} ({type(exc).__name__})")
    if bad:
        raise InputError(f"{len(bad)} of {len(paths)} images are missing or unreadable: "
                         + ", ".join(bad[:MAX_NAMED]) + (f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED
                                                         else "") + ".")


class FileStore:
    """Images by content hash, read from where they lie (any size); ``size(h)`` groups scoring batches."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def add(self, path: Path) -> str:
        from PIL import Image

        data = path.read_bytes()
        h = hashlib.sha256(data).hexdigest()
        self.paths.setdefault(h, path)
        if h not in self.sizes:
            with Image.open(path) as im:
                self.sizes[h] = im.size
        return h

    def size(self, h: str) -> tuple[int, int]:
        return self.sizes[h]

    def get(self, hashes: Sequence[str]) -> np.ndarray:
        from PIL import Image, ImageOps

        arrays = []
        for h in hashes:
            with Image.open(self.paths[h]) as im:  # GenEval reads with exif_transpose (evaluate_images.py)
                arrays.append(np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8))
        return np.stack(arrays)


def with_options(specs: Sequence[Any], reward_options: Mapping[str, Mapping[str, Any]] | None,
                 what: str = "this evaluation") -> list[Any]:
    """``specs`` (RewardSpec) once per label, each reward named in ``reward_options`` (``--reward-opt NAME.KEY=VALUE``)
    with those options merged into its own; options of a reward that ``specs`` do not score are an error."""
    from rlbench.eval.plan import RewardSpec

    unique: dict[str, RewardSpec] = {}
    for s in specs:
        unique.setdefault(s.label, s)
    opts = {k: dict(v) for k, v in (reward_options or {}).items()}
    unknown = [n for n in opts if n not in {s.name for s in unique.values()}]
    if unknown:
        raise InputError(f"--reward-opt names {', '.join(unknown)}, which {what} does not score.")
    return [s if s.name not in opts or s.components else
            RewardSpec(s.label, s.name, tuple(sorted({**s.option_dict, **opts[s.name]}.items())), s.components,
                       s.role, s.sets) for s in unique.values()]


def suite_record_external(suite: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """What meta.json records of a suite run on external images (``rlbench eval --images``)."""
    from rlbench.eval.plan import reward_label

    d = suite.as_dict()
    d["groups"] = {}
    for c in suite.categories:
        if c.available and c.where:
            d["groups"][c.label] = sorted({r["prompt"] for r in records if r["prompt_set"] == c.prompts
                                           and c.selects(json.loads(r["metadata"]))})
    from rlbench.prompts import load_prompts

    d["used"] = [{"prompt_set": n, "used": len({r["prompt"] for r in records if r["prompt_set"] == n}),
                  "total": len(load_prompts(n).prompts)} for n in suite.prompt_sets]
    counts = {}
    for r in records:
        if r["prompt_set"] in suite.prompt_sets:
            counts[(r["run"], r["prompt"])] = counts.get((r["run"], r["prompt"]), 0) + 1
    d["images_used"] = ", ".join(str(n) for n in sorted(set(counts.values()))) or "0"
    d["categories"] = [{**c, "reward": reward_label(c["metric"], c["metric_options"]) if c["metric"] else ""}
                       for c in d["categories"]]
    d["sampler_note"] = "external images, scored as given"
    return d


def evaluate_images(
    path: str | Path,
    *,
    rewards: Sequence[str] | str | None = None,
    suites: Sequence[str] | str | None = None,
    out: str | Path = "eval",
    overwrite: bool = False,
    batch_size: int = 32,
    cache: str | Path | bool | None = None,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Any = None,
    log: Callable[[str], None] | None = None,
):
    """Score the images of ``path`` (see the module doc) and write the results folder ``out`` like :func:`evaluate`."""
    from rlbench.eval.cache import EvalCache, NoCache
    from rlbench.eval.evaluator import EvalResult, NullProgress, _remove_stale_tmp, _version, check_out, finish
    from rlbench.eval.plan import RewardSpec, check_weights, reward_label, reward_specs
    from rlbench.eval.results import DIVERSITY_COLUMNS, KL_COLUMNS, SCORE_COLUMNS
    from rlbench.eval.scoring import build_rewards, meta_json, reward_cards, score_entries
    from rlbench.eval.suites import find_suites
    from rlbench.prompts import load_prompts
    from rlbench.registry import make_reward

    t0 = time.perf_counter()
    log = log or (lambda line: None)
    progress = progress or NullProgress()
    if isinstance(rewards, str):
        rewards = [r.strip() for r in rewards.split(",") if r.strip()]
    suite_objs = find_suites(suites)
    if not rewards and not suite_objs:
        raise InputError("--images needs something to score: --suite NAME and/or --rewards NAME,...")
    images, layout = read_images(path)
    # a prompt of a suite's set takes that set's name and metadata (GenEval's clauses, the OCR text)
    owner: dict[str, tuple[str, dict[str, Any]]] = {}
    for suite in suite_objs:
        for name in suite.prompt_sets:
            ps = load_prompts(name)
            for p, m in zip(ps.prompts, ps.metadata):
                owner.setdefault(p, (name, dict(m)))
    specs: list[RewardSpec] = []
    for r in rewards or []:
        specs += reward_specs(r, {}, "extra")
    for suite in suite_objs:
        for name, options, sets in suite.metrics():
            specs.append(RewardSpec(reward_label(name, options), name, tuple(sorted(options.items())), role="suite",
                                    sets=tuple(sets)))
    specs = with_options(specs, reward_options)
    for s in specs:
        if not s.components:
            check_weights(make_reward(s.name, **s.option_dict), s.name, s.option_dict)
    out_path = check_out(out, overwrite)
    store = FileStore()
    records = []
    for im in images:
        h = store.add(im.path)
        set_name, md = owner.get(im.prompt, ("external", im.metadata))
        records.append({"run": im.group, "checkpoint": 0, "prompt_set": set_name, "prompt": im.prompt,
                        "metadata": meta_json(md), "image_index": im.index, "hash": h, "path": str(im.path.resolve())})
    matched = sum(r["prompt_set"] != "external" for r in records)
    notices = []
    if suite_objs and not matched:
        raise InputError(f"none of the {len(records)} images has a prompt of the suites' prompt sets "
                         f"({', '.join(s for x in suite_objs for s in x.prompt_sets)}); the suites score their own "
                         "prompts (as the manifest's prompt column or GenEval's metadata.jsonl must give them).")
    if suite_objs and matched < len(records):
        notices.append(f"{len(records) - matched} of {len(records)} images have prompts outside the suites' prompt "
                       "sets: only --rewards score them")
    for line in notices:
        log(f"notice: {line}")
    store_cache = NoCache() if cache is False else EvalCache(None if cache in (None, True) else cache)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    (tmp / ".pid").write_text(str(os.getpid()))
    try:
        reward_objs = build_rewards(specs)
        scores: dict[tuple, float] = {}
        groups: dict[tuple[str, ...], list[RewardSpec]] = {}
        for spec in specs:
            groups.setdefault(spec.sets, []).append(spec)
        for sets, group in groups.items():
            entries = [(r["hash"], r["prompt"], r["metadata"]) for r in records if not sets or r["prompt_set"] in sets]
            scores.update(score_entries(group, reward_objs, entries, store, store_cache, batch_size, progress.task))
        rows = []
        for r in records:
            for spec in specs:
                if spec.sets and r["prompt_set"] not in spec.sets:
                    continue
                rows.append({"run": r["run"], "algorithm": "external", "trained_reward": "", "seed": -1,
                             "config": "external", "checkpoint": 0, "reward_queries": 0, "prompt_set": r["prompt_set"],
                             "set_role": "suite" if r["prompt_set"] != "external" else "external",
                             "prompt": r["prompt"], "image_index": r["image_index"], "sample_seed": -1,
                             "reward": spec.label, "score": scores[(spec.label, r["hash"], r["prompt"], r["metadata"])],
                             "image": r["path"]})
        score_df = pd.DataFrame(rows, columns=SCORE_COLUMNS)
        groups_seen = list(dict.fromkeys(r["run"] for r in records))
        meta = {
            "rlbench": _version(),
            "external": {"source": str(Path(path).expanduser().resolve()), "layout": layout, "images": len(records),
                         "groups": groups_seen},
            "settings": {"batch_size": batch_size, "cache": str(store_cache.path) if store_cache.path else None,
                         "suites": [s.id for s in suite_objs], "rewards": [s.label for s in specs]},
            "runs": [{"name": g, "config": "external", "algorithm": "external", "trained_reward": "", "seed": -1}
                     for g in groups_seen],
            "rewards": reward_cards(specs, reward_objs),
            "gold": {},
            "prompt_sets": [{"name": n, "role": "suite" if n != "external" else "external",
                             "used": len({r["prompt"] for r in records if r["prompt_set"] == n}),
                             "total": len(load_prompts(n).prompts) if n != "external" else
                             len({r["prompt"] for r in records if r["prompt_set"] == n})}
                            for n in dict.fromkeys(r["prompt_set"] for r in records)],
            "suites": [suite_record_external(s, records) for s in suite_objs],
            "notices": notices,
            "timings": {"total": time.perf_counter() - t0},
        }
        tables = finish(tmp, out_path, score_df, pd.DataFrame(columns=KL_COLUMNS),
                        pd.DataFrame(columns=DIVERSITY_COLUMNS), meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        store_cache.close()
    return EvalResult(out_path, score_df, tables["summary"].data, pd.DataFrame(columns=KL_COLUMNS),
                      pd.DataFrame(columns=DIVERSITY_COLUMNS), meta, tables)
