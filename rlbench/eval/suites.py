"""The field's evaluation suites as versioned specs (issue 21): GenEval, Flow-GRPO's OCR, T2I-CompBench++.

A suite is data: one TOML file per version, ``<name>-v<N>.toml``, shipped in ``rlbench.benchmarks/suites/`` (or any
file a user writes in the same format and passes by path)::

    [suite]
    name = "geneval"             # the file is geneval-v1.toml
    version = 1                  # bumped on any change that alters a number
    title = "GenEval"
    paper = "..."                # where the protocol and the table layout come from
    description = "..."
    images_per_prompt = 4        # the protocol's images per prompt
    flow_sampler = "ode"         # optional: the sampler flow-matching runs are evaluated with (peers' convention)
    overall = "mean"             # "mean": an Overall column (first), the unweighted mean of the columns; "": none
    notes = "..."                # optional: what the numbers are not (stand-in detectors, engines)

    [[category]]                 # one column of the paper's table, in its order
    label = "Counting"
    prompts = "geneval"          # a registered prompt set (or a prompt file)
    metric = "geneval"           # a registered reward, scored on this set only
    metric_options = {}          # optional: its constructor options
    where = { tag = "counting" } # optional: only the prompts whose metadata has these values
    unavailable = ""             # optional: why rlbench cannot compute the column (listed, never silently dropped)

:func:`suite_table` turns an evaluation's scores into the paper's table: one row per run and checkpoint (the base
model first), each column the mean of its metric over the column's images, with the paired change from the base
model ± its standard error; Overall is the unweighted mean of the columns (GenEval ``summary_scores.py`` L26-45),
its paired error the root sum of the columns' squared errors over their number (disjoint prompt groups).
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlbench.errors import ConfigError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUITE_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str, "version": int, "title": str, "paper": str, "description": str, "images_per_prompt": int}
SUITE_OPTIONAL: dict[str, type | tuple[type, ...]] = {"flow_sampler": str, "overall": str, "notes": str}
CATEGORY_KEYS: dict[str, type | tuple[type, ...]] = {"label": str, "prompts": str}
CATEGORY_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "metric": str, "metric_options": dict, "where": dict, "unavailable": str}
OVERALL = ("mean", "")
_KIND = {str: "a string", int: "an integer", dict: "a table", list: "a list"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class Category:
    """One column of a suite's table."""

    label: str
    prompts: str
    metric: str = ""
    metric_options: tuple[tuple[str, Any], ...] = ()
    where: tuple[tuple[str, Any], ...] = ()
    unavailable: str = ""

    @property
    def available(self) -> bool:
        return not self.unavailable

    def selects(self, metadata: dict[str, Any]) -> bool:
        return all(metadata.get(k) == v for k, v in self.where)


@dataclass(frozen=True)
class Suite:
    """One validated suite spec."""

    path: Path
    name: str
    version: int
    title: str
    paper: str
    description: str
    images_per_prompt: int
    categories: tuple[Category, ...]
    flow_sampler: str = ""
    overall: str = "mean"
    notes: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    @property
    def prompt_sets(self) -> list[str]:
        """The prompt sets its available columns sample, in order."""
        return list(dict.fromkeys(c.prompts for c in self.categories if c.available))

    def metrics(self) -> list[tuple[str, dict[str, Any], list[str]]]:
        """``(reward name, options, [prompt sets it scores])`` of its available columns."""
        out: dict[tuple[str, tuple], list[str]] = {}
        for c in self.categories:
            if c.available:
                sets = out.setdefault((c.metric, c.metric_options), [])
                if c.prompts not in sets:
                    sets.append(c.prompts)
        return [(name, dict(opts), sets) for (name, opts), sets in out.items()]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["id"] = self.id
        d["categories"] = [{**asdict(c), "metric_options": dict(c.metric_options), "where": dict(c.where)}
                           for c in self.categories]
        return d


def _check_keys(table: Any, required: dict, optional: dict, where: str, path: Path) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where} must be a table.")
    for key, value in table.items():
        allowed = {**required, **optional}
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown key {where}.{key}.{hint} Valid keys: {', '.join(allowed)}.")
        if not isinstance(value, allowed[key]) or isinstance(value, bool) and allowed[key] is int:
            kinds = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
            kind = " or ".join(_KIND[t] for t in kinds)
            raise ConfigError(f"{path}: {where}.{key} must be {kind}, got {value!r}.")
    missing = [k for k in required if k not in table]
    if missing:
        raise ConfigError(f"{path}: {where} is missing {', '.join(missing)}.")


def load_suite(path: str | Path) -> Suite:
    """Read and validate one suite file; :class:`ConfigError` naming the file and the key on bad input."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read suite file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    unknown = [k for k in data if k not in ("suite", "category")]
    if unknown:
        raise ConfigError(f"{path}: unknown table {unknown[0]!r}; a suite has [suite] and [[category]] tables.")
    head = data.get("suite")
    _check_keys(head, SUITE_KEYS, SUITE_OPTIONAL, "suite", path)
    if not _NAME_RE.match(head["name"]):
        raise ConfigError(f"{path}: suite.name {head['name']!r} must be lower-case letters, digits, '.', '_' or '-'.")
    if head["version"] < 1 or head["images_per_prompt"] < 1:
        raise ConfigError(f"{path}: suite.version and suite.images_per_prompt must be >= 1.")
    if head.get("overall", "mean") not in OVERALL:
        raise ConfigError(f"{path}: suite.overall must be \"mean\" (an unweighted mean of the columns) or \"\" (none).")
    stem = f"{head['name']}-v{head['version']}"
    if path.suffix == ".toml" and path.parent.name == "suites" and path.stem != stem:
        raise ConfigError(f"{path}: a built-in suite file is named <name>-v<version>.toml; this one should be {stem}.toml.")
    rows = data.get("category")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{path}: a suite needs at least one [[category]] table (one column of its table).")
    cats = []
    for i, row in enumerate(rows):
        _check_keys(row, CATEGORY_KEYS, CATEGORY_OPTIONAL, f"category[{i}]", path)
        if bool(row.get("metric")) == bool(row.get("unavailable")):
            raise ConfigError(f"{path}: category[{i}] ({row['label']}) needs either a metric or, when rlbench cannot "
                              "compute it, unavailable = \"the reason\".")
        cats.append(Category(row["label"], _prompt_source(row["prompts"], path), row.get("metric", ""),
                             tuple(sorted((row.get("metric_options") or {}).items())),
                             tuple(sorted((row.get("where") or {}).items())), row.get("unavailable", "")))
    labels = [c.label for c in cats]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: two categories share a label; each column needs its own.")
    if not any(c.available for c in cats):
        raise ConfigError(f"{path}: every category is unavailable; there is nothing to evaluate.")
    return Suite(path, head["name"], head["version"], head["title"], head["paper"], head["description"],
                 head["images_per_prompt"], tuple(cats), head.get("flow_sampler", ""), head.get("overall", "mean"),
                 head.get("notes", ""))


def _prompt_source(prompts: str, suite_path: Path) -> str:
    """A registered prompt set as named; a prompt file relative to the suite file resolved against its folder."""
    from rlbench.registry import PROMPTS

    if prompts in PROMPTS.names():
        return prompts
    beside = suite_path.parent / prompts
    return str(beside.resolve()) if not Path(prompts).is_absolute() and beside.is_file() else prompts


def suites_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("rlbench.benchmarks").joinpath("suites")))


def suite_files() -> dict[str, Path]:
    """``{id: path}`` of the built-in suites, e.g. ``{"geneval-v1": ...}``."""
    return {p.stem: p for p in sorted(suites_dir().glob("*-v*.toml"))}


def _latest(name: str) -> Path | None:
    found = [(int(stem.rsplit("-v", 1)[1]), p) for stem, p in suite_files().items() if stem.rsplit("-v", 1)[0] == name]
    return max(found)[1] if found else None


def find_suite(name: str) -> Suite:
    """A suite by name (its latest version), by id (``geneval-v1``) or by the path of a suite file."""
    text = name.strip()
    files = suite_files()
    if text in files:
        return load_suite(files[text])
    latest = _latest(text)
    if latest is not None:
        return load_suite(latest)
    if text.endswith(".toml") or "/" in text:
        if Path(text).expanduser().is_file():
            return load_suite(Path(text).expanduser())
        raise InputError(f"suite file {text} does not exist.")
    names = sorted({stem.rsplit("-v", 1)[0] for stem in files})
    close = difflib.get_close_matches(text, names + list(files), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise InputError(f"unknown suite {text!r}.{hint} Built-in suites: {', '.join(names)} (`rlbench suites list`), "
                     "or give the path of a suite file.")


def find_suites(text: str | list[str] | None) -> list[Suite]:
    """Comma-separated names (or a list) -> suites, in order, each once."""
    if not text:
        return []
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    suites: dict[str, Suite] = {}
    for n in names:
        s = find_suite(n)
        suites.setdefault(s.name, s)
    return list(suites.values())


def list_suites() -> list[Suite]:
    """Every built-in suite at its latest version."""
    names = sorted({stem.rsplit("-v", 1)[0] for stem in suite_files()})
    return [find_suite(n) for n in names]


# -- what a suite needs -----------------------------------------------------------------------------------


@dataclass
class Needs:
    """What one suite needs before it can run: its data files and each metric's weights and extras."""

    data: list[tuple[str, str]] = field(default_factory=list)  # (prompt set, "ok" | the reason it is missing)
    metrics: list[tuple[str, str, str]] = field(default_factory=list)  # (metric, weights, extra)


def suite_needs(suite: Suite) -> Needs:
    """Data status (found locally or what fetches it, never downloading) and each metric's declared weights."""
    from rlbench.registry import REWARDS
    from rlbench.reward import reward_card

    needs = Needs()
    for ps in suite.prompt_sets:
        needs.data.append((ps, data_status(ps)))
    for name, _, _ in suite.metrics():
        try:
            card = reward_card(REWARDS.load(name), name=name)
            needs.metrics.append((name, card.weights, card.extra))
        except Exception as exc:  # noqa: BLE001 - a plugin that fails to import is reported, not raised
            needs.metrics.append((name, f"cannot load: {exc}", ""))
    return needs


def data_status(prompt_set: str) -> str:
    """``ok`` when the prompt set's pinned files are present locally (RLBENCH_DATA_DIR or the cache), else the command
    that fetches them; prompt sets that are not downloadable data are ``ok`` when they are registered."""
    from rlbench import suitedata

    try:
        dataset = suitedata.dataset_of(prompt_set)
    except InputError:
        return "ok"
    for spec in suitedata.DATASETS[dataset]:
        path, where = suitedata.local_copy(spec.path)
        if not path.is_file():
            return (f"not downloaded: rlbench prompts download {dataset}" if where == suitedata.CACHED
                    else f"missing from {suitedata.DATA_DIR_ENV}")
    return "ok"


# -- the paper's table --------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.4f}"


def suite_table(scores, meta: dict[str, Any], suite: dict[str, Any]):
    """The suite's table in its paper's layout from an evaluation's long-format scores (see the module doc).

    ``suite`` is the suite as recorded in ``meta["suites"]`` (:meth:`Suite.as_dict` plus ``groups``: for each
    category with a ``where``, the prompts of its set that it selects)."""
    import pandas as pd

    from rlbench.eval.tables import Table, paired_stats, with_base

    cats = suite["categories"]
    rows = []
    runs = [r["name"] for r in meta["runs"]]
    for run in runs:
        s = scores[scores["run"] == run]
        for c in sorted(s["checkpoint"].unique()):
            rows.append({"run": run, "checkpoint": int(c)})
    data_rows = []
    for cat in cats:
        if cat["unavailable"]:
            continue
        sel = scores[(scores["prompt_set"] == cat["prompts"]) & (scores["reward"] == (cat.get("reward") or cat["metric"]))]
        if cat["where"]:
            chosen = set(suite["groups"].get(cat["label"], []))
            sel = sel[sel["prompt"].isin(chosen)]
        if not len(sel):
            continue
        stats = paired_stats(with_base(sel), ["run", "checkpoint"])
        for r in stats.itertuples(index=False):
            data_rows.append({"run": r.run, "checkpoint": int(r.checkpoint), "column": cat["label"], "mean": r.mean,
                              "stderr": r.stderr, "n": int(r.n), "delta": r.delta, "delta_se": r.delta_se})
    data = pd.DataFrame(data_rows, columns=["run", "checkpoint", "column", "mean", "stderr", "n", "delta", "delta_se"])
    available = [c["label"] for c in cats if not c["unavailable"]]
    if suite.get("overall") == "mean" and len(data):
        over = []
        for (run, ckpt), g in data.groupby(["run", "checkpoint"], sort=True):
            if set(g["column"]) != set(available):
                continue  # a missing column leaves Overall undefined, never a mean of fewer columns
            k = len(g)
            over.append({"run": run, "checkpoint": ckpt, "column": "Overall", "mean": g["mean"].mean(),
                         "stderr": math.sqrt(float((g["stderr"] ** 2).sum())) / k, "n": int(g["n"].sum()),
                         "delta": g["delta"].mean(), "delta_se": math.sqrt(float((g["delta_se"] ** 2).sum())) / k})
        data = pd.concat([data, pd.DataFrame(over, columns=data.columns)], ignore_index=True)
    # GenEval's Table 2 (and Flow-GRPO's Table 1) put Overall first
    columns = (["Overall"] if suite.get("overall") == "mean" else []) + [c["label"] for c in cats]
    external = bool(meta.get("external"))
    disp_rows = []
    for row in rows:
        cells = {"run": row["run"], "checkpoint": "external" if external else row["checkpoint"]}
        for cat in columns:
            unavailable = next((c["unavailable"] for c in cats if c["label"] == cat and c["unavailable"]), "")
            if unavailable:
                cells[cat] = "n/a"
                continue
            hit = data[(data["run"] == row["run"]) & (data["checkpoint"] == row["checkpoint"]) & (data["column"] == cat)]
            if not len(hit):
                cells[cat] = "–"
                continue
            h = hit.iloc[0]
            cells[cat] = _fmt(h["mean"]) + (f" ± {h['stderr']:.3f}" if external else "") if row["checkpoint"] == 0 else (
                f"{_fmt(h['mean'])} ({h['delta']:+.3f} ± {h['delta_se']:.3f})")
        disp_rows.append(cells)
    disp = pd.DataFrame(disp_rows, columns=["run", "checkpoint", *columns])
    missing = [f"{c['label']}: {c['unavailable']}" for c in cats if c["unavailable"]]
    subset = [f"{u['prompt_set']} {u['used']} of {u['total']} prompts" for u in suite.get("used", [])
              if u["used"] < u["total"]]
    ipp = suite.get("images_used", suite["images_per_prompt"])
    how = ("Images from outside rlbench, scored as given: the mean ± its standard error per generator (group). "
           if external else "Checkpoint 0 is the base model; later rows give the mean and, in brackets, the paired "
           "change from the base model ± its standard error (same prompts, same noise). ")
    caption = (f"{suite['title']} (suite {suite['id']}; {suite['paper']}), in the paper's columns. {how}"
               f"{ipp} images per prompt"
               + (f" (the protocol's is {suite['images_per_prompt']})" if str(ipp) != str(suite["images_per_prompt"])
                  else "")
               + (". Overall: the unweighted mean of the columns" if suite.get("overall") == "mean" else "")
               + (f". Sampler: {suite['sampler_note']}" if suite.get("sampler_note") else "")
               + (f". NOT the paper's protocol: a subset ({'; '.join(subset)})" if subset else "")
               + (f". {suite['notes']}" if suite.get("notes") else "")
               + (f". Not computed (n/a): {'; '.join(missing)}" if missing else "") + ".")
    name = "suite_" + re.sub(r"[^a-z0-9]+", "_", suite["name"])
    return Table(name, suite["title"], caption, data.sort_values(["run", "checkpoint", "column"]).reset_index(drop=True)
                 if len(data) else data, disp)


def suite_tables(scores, meta: dict[str, Any]) -> dict[str, Any]:
    """``{table name: Table}`` for every suite an evaluation ran (none when it ran none)."""
    out = {}
    for suite in meta.get("suites", []):
        t = suite_table(scores, meta, suite)
        out[t.name] = t
    return out
