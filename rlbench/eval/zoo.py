"""The reward zoo as a tool: score any images with several rewards, measure how rewards agree, and how often each
picks the image people preferred (``rlbench rewards score / compare / bench``); and the shapes world's preference
pairs, whose labels are exact (``rlbench shapes pairs``).

Images come from :func:`rlbench.eval.external.read_images` (a plain folder of image files with ``--prompt``, a
GenEval sample folder, a manifest ``path,prompt[,group]``), any size and format; they are read by content hash
(:class:`~rlbench.eval.external.FileStore`) and scored through eval's scoring and cache
(:func:`~rlbench.eval.scoring.score_entries`, batches of one image size; :class:`~rlbench.eval.cache.EvalCache`), so
a score computed once, by ``rlbench eval`` or here, is never computed again. A score that cannot be computed is an
error, never a made-up number. A reward that declares ``higher_is_better = False`` is negated before it is compared
or benchmarked, so "higher = preferred" holds for every reward.

Conventions:

* **compare**, within prompts: for every prompt with two or more images (prompts with one image are left out and
  counted), Spearman's rho (average ranks for ties) and Kendall's tau-b between two rewards' scores of that prompt's
  images; a prompt on which either reward is constant has neither (it is counted as undefined, not as 0); the cell
  is the unweighted mean over the prompts where it is defined. Pairwise preference agreement pools every
  within-prompt pair of images: 1 when both rewards order the pair alike (a pair both score equal included), 1/2
  when exactly one of them ties it, 0 when they disagree (PickScore's ``calc_score``); without ties it is
  ``(1 + tau_a) / 2`` over the pooled pairs.
* **bench**, preference accuracy over a pairs file (``prompt,image_a,image_b,preferred`` with ``preferred`` = ``a``,
  ``b`` or ``tie``): pairs people tied are excluded and counted (ImageReward's ``test.py`` ``acc`` and HPSv2's
  ``calc_ImageReward`` skip tied rankings), a pair the reward scores exactly equal earns ``tie_credit`` (default
  1/2, PickScore's ``calc_score`` at threshold 0; 0 reproduces ImageReward's and HPSv2's, which count it wrong);
  the 95% interval is the percentile bootstrap over the scored pairs, seeded, the same resamples for every reward.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlbench.errors import InputError
from rlbench.eval.external import ExternalImage, FileStore, check_readable, read_images, read_rows, with_options
from rlbench.eval.plan import RewardSpec, reward_specs
from rlbench.eval.tables import Table, markdown_table, num

TABLE_SUFFIXES = (".parquet", ".csv", ".md")
IMAGE_COLUMNS = ["image", "prompt", "group", "image_index", "width", "height", "sha256"]
PAIR_COLUMNS = ("prompt", "image_a", "image_b", "preferred")
PREFERRED = ("a", "b", "tie")
BOOTSTRAP = 1000  # resamples of the bootstrap interval
TIE_CREDIT = 0.5  # what a pair the reward scores equal earns (PickScore's convention)


# -- rewards ------------------------------------------------------------------------------------------


@dataclass
class Rewards:
    """The rewards of one call: every spec scored (a combination's components first), the labels the user named,
    the built rewards and their cards."""

    specs: list[RewardSpec]
    named: list[str]
    objs: dict[str, Any]
    cards: list[dict[str, Any]]

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.specs]

    def sign(self, label: str) -> float:
        """+1, or -1 for a reward whose lower scores are better (so that higher = preferred for every reward)."""
        return 1.0 if next(c for c in self.cards if c["label"] == label)["higher_is_better"] else -1.0


def split_names(rewards: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> names (a weighted sum is written with ``+``: ``a:1+b:0.5``)."""
    names = [r.strip() for r in (rewards.split(",") if isinstance(rewards, str) else rewards) if r.strip()]
    if not names:
        raise InputError("give one or more reward names (comma-separated; `rlbench rewards list`).")
    return list(dict.fromkeys(names))


def prepare_rewards(rewards: str | Sequence[str], reward_options: Mapping[str, Mapping[str, Any]] | None = None,
                    *, at_least: int = 1, what: str = "this call") -> Rewards:
    """Build the named rewards: unknown names and options fail here, with a suggestion, and each reward's weights
    are resolved (:func:`~rlbench.eval.plan.check_weights`: offline and missing is the one-line error naming
    ``rlbench rewards download``) before any image is read or scored."""
    from rlbench.eval.plan import check_weights
    from rlbench.eval.scoring import build_rewards, reward_cards

    names = split_names(rewards)
    if len(names) < at_least:
        raise InputError(f"{what} needs {at_least} or more rewards, comma-separated (got {', '.join(names)}).")
    specs: list[RewardSpec] = []
    named = []
    for name in names:
        expanded = reward_specs(name, {}, "extra")
        specs += expanded
        named.append(expanded[-1].label)
    specs = with_options(specs, reward_options, what)
    clash = [s.label for s in specs if s.label in IMAGE_COLUMNS]
    if clash:
        raise InputError(f"a reward named {clash[0]!r} would clash with the table's own column; register it under "
                         "another name.")
    objs = build_rewards(specs)
    for s in specs:
        if not s.components:
            check_weights(objs[s.label], s.name, s.option_dict)
    return Rewards(specs, list(dict.fromkeys(named)), objs, reward_cards(specs, objs))


def _progress(progress: Any):
    from rlbench.eval.evaluator import NullProgress

    return progress or NullProgress()


def _cache(cache: str | Path | bool | None):
    from rlbench.eval.cache import EvalCache, NoCache

    return NoCache() if cache is False else EvalCache(None if cache in (None, True) else cache)


def score_images(images: Sequence[ExternalImage], rw: Rewards, *, batch_size: int = 32,
                 cache: str | Path | bool | None = None, progress: Any = None) -> pd.DataFrame:
    """One row per image (:data:`IMAGE_COLUMNS`, then a column per reward label), scored through eval's cache."""
    from rlbench.eval.scoring import meta_json, score_entries

    progress = _progress(progress)
    store = FileStore()
    advance = progress.task("reading images", len(images)) if len(images) > batch_size else None
    hashes = []
    for im in images:
        hashes.append(store.add(im.path))
        if advance is not None:
            advance(1)
    entries = [(h, im.prompt, meta_json(im.metadata)) for h, im in zip(hashes, images)]
    store_cache = _cache(cache)
    try:
        scores = score_entries(rw.specs, rw.objs, entries, store, store_cache, batch_size, progress.task)
    finally:
        store_cache.close()
    rows = []
    for im, (h, p, m) in zip(images, entries):
        w, ht = store.size(h)
        rows.append({"image": str(im.path.resolve()), "prompt": im.prompt, "group": im.group, "image_index": im.index,
                     "width": w, "height": ht, "sha256": h, **{lab: scores[(lab, h, p, m)] for lab in rw.labels}})
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS + rw.labels)


def score_files(name: str, paths: Sequence[Path], prompt: str = "", options: Mapping[str, Any] | None = None,
                batch_size: int = 32, progress: Any = None) -> list[float]:
    """``rlbench rewards score NAME --prompt TEXT FILE...``: one reward's score of each file, in order; any sizes
    (batches of one size), no cache."""
    from PIL import UnidentifiedImageError

    from rlbench.eval.cache import NoCache
    from rlbench.eval.scoring import score_entries
    from rlbench.registry import make_reward

    options = dict(options or {})
    reward = make_reward(name, **options)  # an unknown name or option fails before any file is read
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"image file {str(p)!r} does not exist.")
    store = FileStore()
    hashes = []
    for p in paths:
        try:
            hashes.append(store.add(Path(p)))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InputError(f"cannot read image {str(p)!r}: {exc}") from exc
    spec = RewardSpec(name, name, tuple(sorted(options.items())))
    entries = [(h, prompt, "{}") for h in hashes]
    scores = score_entries([spec], {name: reward}, entries, store, NoCache(), batch_size,
                           _progress(progress).task)
    return [scores[(name, h, prompt, "{}")] for h in hashes]


# -- rlbench rewards score --images ----------------------------------------------------------------------


def table_files(out: str | Path) -> dict[str, Path]:
    """``--out FILE`` -> the table's three files: FILE's stem + .parquet, .csv, .md (FILE may carry one of them)."""
    out = Path(out).expanduser()
    stem = out.with_suffix("") if out.suffix in TABLE_SUFFIXES else out
    return {ext[1:]: stem.with_name(stem.name + ext) for ext in TABLE_SUFFIXES}


def _check_table_out(out: str | Path, overwrite: bool) -> dict[str, Path]:
    files = table_files(out)
    for p in files.values():
        if p.is_dir():
            raise InputError(f"--out {out}: {p} is a folder; --out names the table's file (FILE.parquet, .csv, .md).")
    there = [str(p) for p in files.values() if p.exists()]
    if there and not overwrite:
        raise InputError(f"--out {out}: {', '.join(there)} already exist{'s' if len(there) == 1 else ''}; choose "
                         "another --out or pass --overwrite to replace.")
    return files


def _display_path(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root.resolve()))
    except ValueError:
        return path


def score_table_text(df: pd.DataFrame, rw: Rewards, source: str | Path) -> str:
    """The Markdown of a score table: the image (relative to the source's folder), its prompt, every score."""
    src = Path(source).expanduser()
    root = src if src.is_dir() else src.parent
    disp = pd.DataFrame({"image": [_display_path(p, root) for p in df["image"]], "prompt": df["prompt"]})
    for lab in rw.labels:
        disp[lab] = [num(v) for v in df[lab]]
    return (f"**Scores.** {len(df)} images of {src} ({df['prompt'].nunique()} prompts), scored with "
            f"{', '.join(rw.labels)}.\n\n" + markdown_table(disp))


@dataclass
class ScoreResult:
    scores: pd.DataFrame
    files: dict[str, Path]
    rewards: Rewards


def score_table(rewards: str | Sequence[str], images: str | Path, out: str | Path, *, prompt: str | None = None,
                overwrite: bool = False, batch_size: int = 32, cache: str | Path | bool | None = None,
                reward_options: Mapping[str, Mapping[str, Any]] | None = None, progress: Any = None) -> ScoreResult:
    """``rlbench rewards score NAME[,NAME...] --images SRC --out FILE``: every image of ``SRC`` scored by every
    reward, written as one table (FILE.parquet, FILE.csv, FILE.md: a row per image, a column per reward)."""
    from rlbench.eval.results import parquet_bytes
    from rlbench.train.rundir import atomic_write_bytes, atomic_write_text

    rw = prepare_rewards(rewards, reward_options)
    files = _check_table_out(out, overwrite)
    found, _ = read_images(images, prompt)
    df = score_images(found, rw, batch_size=batch_size, cache=cache, progress=progress)
    data = {"parquet": parquet_bytes(df), "csv": df.to_csv(index=False).encode(),
            "md": score_table_text(df, rw, images).encode()}
    for key in ("parquet", "csv"):
        atomic_write_bytes(files[key], data[key])
    atomic_write_text(files["md"], data["md"].decode())
    return ScoreResult(df, files, rw)


# -- results folders ----------------------------------------------------------------------------------------


def _write_folder(out: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a fresh temporary folder beside ``out`` and swap it into place: nothing half-written
    is ever at ``out``. ``out`` must be new or empty unless ``overwrite``."""
    import shutil

    from rlbench.eval.evaluator import _remove_stale_tmp, _swap_into_place, check_out

    out_path = check_out(out, overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    (tmp / ".pid").write_text(str(os.getpid()))
    try:
        write(tmp)
        (tmp / ".pid").unlink()
        _swap_into_place(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def _meta(**items: Any) -> str:
    import rlbench

    return json.dumps({"rlbench": rlbench.__version__, **items}, indent=1, default=str)


# -- rlbench rewards compare ---------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def agreement_stats(scores: pd.DataFrame, labels: Sequence[str], signs: Mapping[str, float] | None = None
                    ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Every pair of rewards (both orders, the diagonal included) on the images of ``scores`` (a row per image, a
    column per reward, a ``prompt`` column), within prompts (see the module doc): spearman, kendall (means over the
    prompts where defined), prompts_defined, agreement (pooled pairs), pairs, ties_a, ties_b, ties_both.
    Also returns the counts of prompts: ``compared`` (2+ images), ``single`` (one image, left out), ``images``."""
    from rlbench.utils.stats import PairCounts, pair_counts, spearman

    signs = signs or {}
    groups = [g for _, g in scores.groupby("prompt", sort=False) if len(g) >= 2]
    sizes = scores.groupby("prompt", sort=False).size()
    counts = {"compared": len(groups), "single": int((sizes < 2).sum()), "images": int(sum(len(g) for g in groups))}
    if not groups:
        raise InputError(f"no prompt has two or more images ({len(scores)} images, {len(sizes)} prompts): rewards are "
                         "compared within prompts; give several images of each prompt.")
    rows = []
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for i, a in enumerate(labels):
        for b in labels[i:]:
            rhos, taus, total = [], [], PairCounts(0, 0, 0, 0, 0)
            for g in groups:
                x = g[a].to_numpy(np.float64) * signs.get(a, 1.0)
                y = g[b].to_numpy(np.float64) * signs.get(b, 1.0)
                pc = pair_counts(x, y)
                total = PairCounts(*(s + t for s, t in zip(total, pc)))
                rho = spearman(x, y)
                if math.isfinite(rho):  # tau-b is defined exactly where rho is (neither reward constant)
                    rhos.append(rho)
                    taus.append(pc.tau_b)
            cells[(a, b)] = {"spearman": float(np.mean(rhos)) if rhos else float("nan"),
                             "kendall": float(np.mean(taus)) if taus else float("nan"),
                             "prompts_defined": len(rhos), "agreement": total.agreement, "pairs": total.pairs,
                             "ties_a": total.ties_a, "ties_b": total.ties_b, "ties_both": total.ties_both}
            cells[(b, a)] = {**cells[(a, b)], "ties_a": total.ties_b, "ties_b": total.ties_a}
    for a in labels:
        for b in labels:
            rows.append({"reward_a": a, "reward_b": b, **cells[(a, b)]})
    return pd.DataFrame(rows), counts


def matrix(stats: pd.DataFrame, labels: Sequence[str], column: str) -> pd.DataFrame:
    """``stats``' ``column`` as a square table: a ``reward`` column, then a column per reward."""
    m = stats.pivot(index="reward_a", columns="reward_b", values=column).reindex(index=labels, columns=labels)
    return m.reset_index().rename(columns={"reward_a": "reward"}).rename_axis(None, axis=1)


MATRICES = {
    "spearman": ("Spearman rank correlation within prompts",
                 "Spearman's rho (average ranks for ties) between two rewards' scores of one prompt's images, averaged "
                 "over the prompts with 2+ images where both rewards vary (a prompt where either is constant is left "
                 "out: rho is undefined there)."),
    "kendall": ("Kendall rank correlation within prompts",
                "Kendall's tau-b (ties corrected) between two rewards' scores of one prompt's images, averaged over "
                "the prompts with 2+ images where both rewards vary."),
    "preference_agreement": ("Pairwise preference agreement",
                             "Over every pair of images of one prompt: the fraction both rewards order alike (1 when "
                             "they agree, both ties included; 1/2 when exactly one scores the pair equal; 0 when they "
                             "disagree); 0.5 is chance."),
}


@dataclass
class CompareResult:
    scores: pd.DataFrame
    stats: pd.DataFrame
    tables: dict[str, Table]
    counts: dict[str, int]
    rewards: Rewards
    out: Path | None = None
    figure: bytes = field(default=b"", repr=False)


def compare_tables(stats: pd.DataFrame, labels: Sequence[str], counts: Mapping[str, int]) -> dict[str, Table]:
    scope = (f" {counts['compared']} prompts with 2+ images ({counts['images']} images)"
             + (f"; {counts['single']} prompts with one image are left out." if counts["single"] else "."))
    tables = {}
    for name, (title, caption) in MATRICES.items():
        col = "agreement" if name == "preference_agreement" else name
        data = matrix(stats, labels, col)
        disp = data.copy()
        for lab in labels:
            disp[lab] = [_fmt(v) for v in data[lab]]
        tables[name] = Table(name, title, caption + scope, data, disp)
    long_disp = stats.copy()
    for col in ("spearman", "kendall", "agreement"):
        long_disp[col] = [_fmt(v) for v in stats[col]]
    tables["agreement"] = Table("agreement", "Agreement between rewards",
                                "Every pair of rewards: the within-prompt correlations (prompts_defined: the prompts "
                                "where both rewards vary), the pooled pairwise agreement over `pairs` image pairs and "
                                "their ties (ties_a: tied by reward_a only; ties_both: by both)." + scope,
                                stats, long_disp)
    return tables


def heatmap(tables: Mapping[str, Table], labels: Sequence[str]) -> bytes:
    """The three matrices side by side (annotated cells), PNG bytes."""
    from rlbench.eval.plots import _plt, _png

    plt = _plt()
    n = len(labels)
    side = max(3.2, 0.55 * n + 1.6)
    fig, axes = plt.subplots(1, 3, figsize=(3 * side, side + 0.4), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], MATRICES):
        values = tables[name].data[list(labels)].to_numpy(np.float64)
        lo = 0.0 if name == "preference_agreement" else -1.0
        im = ax.imshow(np.ma.masked_invalid(values), vmin=lo, vmax=1.0, cmap="RdBu_r")
        ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                strong = math.isfinite(v) and abs(v - (0.5 if lo == 0.0 else 0.0)) > (0.3 if lo == 0.0 else 0.6)
                ax.text(j, i, _fmt(v, 2), ha="center", va="center", fontsize=7, color="white" if strong else "black")
        ax.set_title(MATRICES[name][0], fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _png(fig)


def compare(rewards: str | Sequence[str], images: str | Path, *, prompt: str | None = None,
            out: str | Path | None = None, overwrite: bool = False, batch_size: int = 32,
            cache: str | Path | bool | None = None, reward_options: Mapping[str, Mapping[str, Any]] | None = None,
            progress: Any = None) -> CompareResult:
    """``rlbench rewards compare NAME,NAME,... --images SRC [--out DIR]``: how the rewards agree on SRC's images
    (see the module doc). With ``out``: DIR/ holds the tables (.md, .csv, .tex), compare.png, scores.parquet/.csv
    and meta.json, written whole or not at all."""
    from rlbench.eval.evaluator import check_out
    from rlbench.eval.results import parquet_bytes
    from rlbench.eval.tables import write_table

    rw = prepare_rewards(rewards, reward_options, at_least=2, what="rewards compare")
    if out is not None:
        check_out(out, overwrite)  # before any scoring
    found, layout = read_images(images, prompt)
    scores = score_images(found, rw, batch_size=batch_size, cache=cache, progress=progress)
    stats, counts = agreement_stats(scores, rw.named, {lab: rw.sign(lab) for lab in rw.named})
    tables = compare_tables(stats, rw.named, counts)
    result = CompareResult(scores, stats, tables, counts, rw)
    if out is None:
        return result
    result.figure = heatmap(tables, rw.named)

    def write(tmp: Path) -> None:
        for t in tables.values():
            write_table(t, tmp)
        (tmp / "compare.png").write_bytes(result.figure)
        (tmp / "scores.parquet").write_bytes(parquet_bytes(scores))
        (tmp / "scores.csv").write_text(scores.to_csv(index=False), encoding="utf-8")
        (tmp / "meta.json").write_text(_meta(command="rewards compare", source=str(Path(images).expanduser().resolve()),
                                             layout=layout, prompts=counts, rewards=rw.cards), encoding="utf-8")

    result.out = _write_folder(out, overwrite, write)
    return result


# -- rlbench rewards bench -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    prompt: str
    image_a: Path
    image_b: Path
    preferred: str  # a | b | tie
    line: int = 0


def read_pairs(path: str | Path) -> list[Pair]:
    """A pairs file: a .csv with the header ``prompt,image_a,image_b,preferred`` (other columns are ignored) or a
    .jsonl with those keys; ``preferred`` is ``a``, ``b`` or ``tie`` (any case); image paths relative to the file's
    folder. One error names every problem: missing columns, bad labels, empty cells, missing images."""
    path = Path(path).expanduser()
    want = ",".join(PAIR_COLUMNS)
    if not path.is_file():
        raise InputError(f"--pairs {path} does not exist; give a .csv ({want}) or a .jsonl pairs file.")
    if path.suffix not in (".csv", ".jsonl"):
        raise InputError(f"--pairs {path}: a pairs file is a .csv (header {want}) or a .jsonl file.")
    header, rows = read_rows(path, "the pairs file", f"the keys {want}")
    missing = [c for c in PAIR_COLUMNS if c not in (header or PAIR_COLUMNS)]
    if missing:
        raise InputError(f"--pairs {path} lacks the column{'s' if len(missing) > 1 else ''} {','.join(missing)}; "
                         f"its header must hold {want} (preferred: a, b or tie); it has "
                         f"{','.join(header or []) or 'none'}.")
    if not rows:
        raise InputError(f"--pairs {path} holds no pairs.")
    bad_rows = [i for i, r in rows if not isinstance(r, dict) or any(not str(r.get(c) or "").strip()
                                                                      for c in PAIR_COLUMNS)]
    if bad_rows:
        missing = sorted({c for _, r in rows if isinstance(r, dict) for c in PAIR_COLUMNS if c not in r})
        raise InputError(f"--pairs {path}: {len(bad_rows)} row(s) lack "
                         + (f"the key(s) {','.join(missing)} or " if missing else "")
                         + f"a value of {want} (first at line {bad_rows[0]}); every pair needs all four.")
    bad_labels = [(i, r["preferred"]) for i, r in rows if str(r["preferred"]).strip().lower() not in PREFERRED]
    if bad_labels:
        shown = ", ".join(f"line {i}: {v!r}" for i, v in bad_labels[:5])
        raise InputError(f"--pairs {path}: preferred must be a, b or tie; {len(bad_labels)} row(s) say otherwise "
                         f"({shown}).")

    def resolve(p: Any) -> Path:
        q = Path(str(p)).expanduser()
        return q if q.is_absolute() else path.parent / q

    pairs = [Pair(str(r["prompt"]), resolve(r["image_a"]), resolve(r["image_b"]),
                  str(r["preferred"]).strip().lower(), i) for i, r in rows]
    check_readable(list(dict.fromkeys(p for pair in pairs for p in (pair.image_a, pair.image_b))))
    return pairs


def ranking_pairs(prompt: str, images: Sequence[Any], ranks: Sequence[float]) -> list[dict[str, Any]]:
    """The pairs of a ranked group of images (ImageReward's test.json ``generations``/``ranking``, HPDv2's test.json
    ``image_path``/``rank``: a lower rank is better, equal ranks a tie), as rows of a pairs file: every pair once,
    in index order (``i < j``)."""
    if len(images) != len(ranks):
        raise InputError(f"prompt {prompt!r}: {len(images)} images but {len(ranks)} ranks.")
    return [{"prompt": prompt, "image_a": str(images[i]), "image_b": str(images[j]),
             "preferred": "a" if ranks[i] < ranks[j] else "b" if ranks[j] < ranks[i] else "tie"}
            for i, j in combinations(range(len(images)), 2)]


def preference_accuracy(score_a: Sequence[float], score_b: Sequence[float], preferred: Sequence[str], *,
                        tie_credit: float = TIE_CREDIT, bootstrap: int = BOOTSTRAP, seed: int = 0,
                        ) -> dict[str, Any]:
    """Accuracy of scores against people's choices (see the module doc): ``accuracy``, ``ci_low``/``ci_high`` (the
    95% percentile bootstrap over the untied pairs, ``bootstrap`` resamples drawn from ``seed``), ``pairs`` (untied
    pairs scored), ``tied_labels`` (pairs labelled tie: excluded), ``reward_ties`` and the per-pair ``credit``
    (NaN for excluded pairs)."""
    sa, sb = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    pref = np.asarray([str(p) for p in preferred])
    if not (len(sa) == len(sb) == len(pref)):
        raise ValueError("score_a, score_b and preferred need one length")
    if not 0.0 <= tie_credit <= 1.0:
        raise InputError(f"--tie-credit must lie in [0, 1], got {tie_credit}.")
    labelled = pref != "tie"
    n = int(labelled.sum())
    if n == 0:
        raise InputError(f"all {len(pref)} pairs are labelled tie: preference accuracy needs pairs with a winner.")
    want = np.where(pref == "a", 1.0, -1.0)
    got = np.sign(sa - sb)
    credit = np.where(got == 0, tie_credit, (got == want).astype(np.float64))
    credit[~labelled] = np.nan
    kept = credit[labelled]
    acc = float(kept.mean())
    lo = hi = float("nan")
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        means = np.empty(bootstrap)
        for start in range(0, bootstrap, 256):  # O(256 n) memory however many pairs
            k = min(256, bootstrap - start)
            means[start : start + k] = kept[rng.integers(0, n, size=(k, n))].mean(axis=1)
        lo, hi = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return {"accuracy": acc, "ci_low": lo, "ci_high": hi, "pairs": n, "tied_labels": int((~labelled).sum()),
            "reward_ties": int(((got == 0) & labelled).sum()), "credit": credit}


@dataclass
class BenchResult:
    table: Table
    pair_scores: pd.DataFrame
    rewards: Rewards
    out: Path | None = None


def bench(rewards: str | Sequence[str], pairs: str | Path, *, out: str | Path | None = None,
          overwrite: bool = False, seed: int = 0, bootstrap: int = BOOTSTRAP, tie_credit: float = TIE_CREDIT,
          batch_size: int = 32, cache: str | Path | bool | None = None,
          reward_options: Mapping[str, Mapping[str, Any]] | None = None, progress: Any = None) -> BenchResult:
    """``rlbench rewards bench NAME[,NAME...] --pairs FILE [--out DIR]``: each reward's preference accuracy on the
    pairs (see the module doc), a row per reward. With ``out``: DIR/ holds bench.md/.csv/.tex, pair_scores.csv
    (both images' scores and the credit of every pair and reward) and meta.json."""
    from rlbench.eval.evaluator import check_out
    from rlbench.eval.tables import write_table

    if bootstrap < 0:
        raise InputError(f"--bootstrap must be 0 (no interval) or more resamples, got {bootstrap}.")
    if not 0.0 <= tie_credit <= 1.0:
        raise InputError(f"--tie-credit must lie in [0, 1], got {tie_credit}.")
    rw = prepare_rewards(rewards, reward_options, what="rewards bench")
    if out is not None:
        check_out(out, overwrite)
    found = read_pairs(pairs)
    images = list(dict.fromkeys((path.resolve(), p.prompt) for p in found for path in (p.image_a, p.image_b)))
    scored = score_images([ExternalImage(path, prompt) for path, prompt in images], rw, batch_size=batch_size,
                          cache=cache, progress=progress)
    by_image = {(r["image"], r["prompt"]): r for r in scored.to_dict("records")}
    rows, long = [], []
    for lab in rw.named:
        sign = rw.sign(lab)
        sa = [sign * by_image[(str(p.image_a.resolve()), p.prompt)][lab] for p in found]
        sb = [sign * by_image[(str(p.image_b.resolve()), p.prompt)][lab] for p in found]
        res = preference_accuracy(sa, sb, [p.preferred for p in found], tie_credit=tie_credit, bootstrap=bootstrap,
                                  seed=seed)
        rows.append({"reward": lab, **{k: v for k, v in res.items() if k != "credit"}})
        for k, (p, a, b, c) in enumerate(zip(found, sa, sb, res["credit"])):
            long.append({"pair": k, "line": p.line, "prompt": p.prompt, "image_a": str(p.image_a), "image_b":
                         str(p.image_b), "preferred": p.preferred, "reward": lab, "score_a": sign * a,
                         "score_b": sign * b, "credit": c})
    data = pd.DataFrame(rows)
    disp = pd.DataFrame({"reward": data["reward"], "accuracy": [_fmt(v) for v in data["accuracy"]],
                         "95% CI": [f"[{_fmt(lo)}, {_fmt(hi)}]" for lo, hi in zip(data["ci_low"], data["ci_high"])],
                         "pairs": data["pairs"], "tied labels (excluded)": data["tied_labels"],
                         "reward ties": data["reward_ties"]})
    caption = (f"{len(found)} pairs of {Path(pairs).expanduser()}; accuracy over the pairs whose label is not a tie "
               "(tied labels are excluded, as ImageReward's and HPSv2's evaluations do); a pair the reward scores "
               f"equal earns {tie_credit:g}" + (" (PickScore's convention)" if tie_credit == 0.5 else "")
               + (f"; 95% percentile bootstrap over pairs, {bootstrap} resamples, seed {seed}." if bootstrap else "."))
    table = Table("bench", "Preference accuracy", caption, data, disp)
    result = BenchResult(table, pd.DataFrame(long), rw)
    if out is None:
        return result

    def write(tmp: Path) -> None:
        write_table(table, tmp)
        (tmp / "pair_scores.csv").write_text(result.pair_scores.to_csv(index=False), encoding="utf-8")
        (tmp / "meta.json").write_text(_meta(command="rewards bench", pairs=str(Path(pairs).expanduser().resolve()),
                                             seed=seed, bootstrap=bootstrap, tie_credit=tie_credit,
                                             rewards=rw.cards), encoding="utf-8")

    result.out = _write_folder(out, overwrite, write)
    return result


# -- rlbench shapes pairs -----------------------------------------------------------------------------------------


SOURCES = ("model", "render")


def shapes_pairs(out: str | Path, n: int = 256, *, source: str = "model", split: str = "train",
                 images_per_prompt: int = 4, steps: int = 20, guidance: float = 5.0, model: str = "shapes",
                 seed: int = 0, overwrite: bool = False, progress: Any = None) -> Path:
    """Preference pairs of the shapes world whose labels are exact: ``n`` pairs of images of one prompt, the one
    ``shapes-gold`` scores higher preferred (equal gold: ``tie``).

    ``source="model"``: ``images_per_prompt`` samples of each prompt from the shapes model (DDIM, eta = 1,
    ``steps`` steps, guidance ``guidance``: the images RL fine-tuning scores); ``"render"``: each image rendered
    exactly for its prompt or, with probability 1/2, for another caption of the split (crisp renders, the proxies'
    own training distribution; fast). Every within-prompt pair of a prompt's images is a pair, prompt after prompt,
    the first ``n`` kept. Writes ``out/``: images/NNNNN.png, pairs.csv (prompt,image_a,image_b,preferred,gold_a,
    gold_b), manifest.csv (path,prompt,shapes_gold: the same images for ``rewards score/compare``) and meta.json.
    """
    from rlbench.shapes.analyser import gold_scores
    from rlbench.shapes.grammar import split_prompts

    if n < 1:
        raise InputError(f"--n must be 1 or more pairs, got {n}.")
    if images_per_prompt < 2:
        raise InputError(f"--images-per-prompt must be 2 or more (pairs are within a prompt), got {images_per_prompt}.")
    if source not in SOURCES:
        raise InputError(f"--source must be {' or '.join(SOURCES)}, got {source!r}.")
    splits = split_prompts()
    pools = {**splits, "heldout": [p for name, ps in splits.items() if name != "train" for p in ps]}
    if split not in pools:
        raise InputError(f"unknown shapes split {split!r}; choose from {', '.join(pools)}.")
    from rlbench.eval.evaluator import check_out

    check_out(out, overwrite)
    pool = pools[split]
    k = images_per_prompt
    n_prompts = math.ceil(n / (k * (k - 1) // 2))
    rng = np.random.default_rng([seed, 22, k])
    prompts = [pool[int(i)] for i in rng.choice(len(pool), size=n_prompts, replace=n_prompts > len(pool))]
    per_image = [p for p in prompts for _ in range(k)]
    if source == "model":
        from rlbench.diffusion.policy import load_policy
        from rlbench.shapes.quality import sample_images

        policy = load_policy(model)
        advance = _progress(progress).task(f"sampling {model}", len(per_image))
        chunks = []
        for start in range(0, len(per_image), 64):  # a generator seeded per chunk of 64 images
            chunk = per_image[start : start + 64]
            chunks.append(sample_images(policy, chunk, num_steps=steps, guidance_scale=guidance,
                                        seed=seed * 1_000_003 + start, batch_size=64))
            advance(len(chunk))
        images = np.concatenate(chunks)
    else:
        from rlbench.shapes.world import render_batch, scene_for_prompt

        captions = [p if rng.random() < 0.5 else pool[int(rng.integers(len(pool)))] for p in per_image]
        images = render_batch([scene_for_prompt(c, rng) for c in captions])
    gold = gold_scores(images, per_image)
    pairs = []
    for i in range(n_prompts):
        for a, b in combinations(range(i * k, (i + 1) * k), 2):
            pref = "a" if gold[a] > gold[b] else "b" if gold[b] > gold[a] else "tie"
            pairs.append((a, b, pref))
    pairs = pairs[:n]
    used = sorted({j for a, b, _ in pairs for j in (a, b)})

    def name(j: int) -> str:
        return f"images/{j:05d}.png"

    def write(tmp: Path) -> None:
        from rlbench.eval.scoring import encode_png

        (tmp / "images").mkdir()
        for j in used:
            (tmp / name(j)).write_bytes(encode_png(images[j]))
        with (tmp / "pairs.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([*PAIR_COLUMNS, "gold_a", "gold_b"])
            for a, b, pref in pairs:
                w.writerow([per_image[a], name(a), name(b), pref, f"{gold[a]:.6g}", f"{gold[b]:.6g}"])
        with (tmp / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "prompt", "shapes_gold"])
            for j in used:
                w.writerow([name(j), per_image[j], f"{gold[j]:.6g}"])
        (tmp / "meta.json").write_text(_meta(
            command="shapes pairs", source=source, model=model if source == "model" else None, split=split, seed=seed,
            steps=steps if source == "model" else None, guidance=guidance if source == "model" else None,
            images_per_prompt=k, prompts=n_prompts, images=len(used), pairs=len(pairs),
            tied=sum(p == "tie" for _, _, p in pairs), label="shapes-gold (higher preferred; equal: tie)"),
            encoding="utf-8")

    return _write_folder(out, overwrite, write)
