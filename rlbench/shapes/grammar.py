"""The shapes world's caption grammar: captions <-> structured specs <-> atomic facts; prompt splits.

Grammar (lower case; a trailing full stop and extra spaces are ignored when parsing)::

    single    {a|an} COLOUR SHAPE [BG]                       "a red circle"
    count     {two|three} COLOUR SHAPEs [BG]                 "two blue squares"
    relation  {a|an} COLOUR SHAPE REL {a|an} COLOUR SHAPE [BG]  "a green triangle left of a yellow circle"
    BG        " on a BACKGROUND background"                  " on a black background"

COLOUR is an object colour (``vocab.OBJECT_COLORS``), BACKGROUND a background colour
(``vocab.BACKGROUND_COLORS``), REL one of "left of", "right of", "above", "below". A caption
describes every object of its image: "a red circle" shows exactly one object, "two blue squares"
exactly two, a relation caption exactly two (of different colour or shape).

Facts (what :func:`parse_prompt` returns, what the gold analyser checks):

* ``Exists(kind)``: at least one object of that colour and shape;
* ``Count(kind, n)``: exactly ``n`` such objects (count captions);
* ``Relation(subject, relation, other)``: a subject object lies left of/right of/above/below an
  other object (centroids, with a margin);
* ``Total(n)``: the image shows exactly ``n`` objects — the caption describes all of them;
* ``Background(colour)``: the background colour (only when the caption names it).

Splits (:func:`split_prompts`) hold out three kinds of generalisation from ``train``: colour-shape
combinations (``HELDOUT_COMBOS``, never in any train prompt), (count, shape) pairs
(``HELDOUT_COUNTS``) and (relation, subject shape) pairs (``HELDOUT_RELATIONS``).
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Union

from rlbench.errors import InputError
from rlbench.shapes.vocab import (
    BACKGROUND_COLORS,
    COUNT_WORDS,
    OBJECT_COLORS,
    PLURALS,
    RELATIONS,
    SHAPES,
    TEMPLATES,
    article,
)


class PromptParseError(InputError, ValueError):
    """A prompt outside the shapes-world grammar (a ValueError and an rlbench InputError)."""


# -- facts ------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Kind:
    """An object kind: a colour and a shape."""

    color: str
    shape: str

    def __str__(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Exists:
    """At least one object of ``kind``."""

    kind: Kind

    def __str__(self) -> str:
        return f"exists({self.kind})"


@dataclass(frozen=True)
class Count:
    """Exactly ``n`` objects of ``kind``."""

    kind: Kind
    n: int

    def __str__(self) -> str:
        return f"count({self.kind})={self.n}"


@dataclass(frozen=True)
class Relation:
    """An object of ``subject`` lies ``relation`` (left_of/right_of/above/below) an object of ``other``."""

    subject: Kind
    relation: str
    other: Kind

    def __str__(self) -> str:
        return f"{self.relation}({self.subject}, {self.other})"


@dataclass(frozen=True)
class Total:
    """Exactly ``n`` objects in the image: the caption describes every object."""

    n: int

    def __str__(self) -> str:
        return f"total={self.n}"


@dataclass(frozen=True)
class Background:
    """The background colour."""

    color: str

    def __str__(self) -> str:
        return f"background={self.color}"


Fact = Union[Exists, Count, Relation, Total, Background]


# -- captions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionSpec:
    """A caption's structure. ``count`` > 1 only for the count template; ``relation``/``other`` only
    for the relation template; ``background`` None when the caption names no background."""

    template: str
    subject: Kind
    count: int = 1
    relation: str | None = None
    other: Kind | None = None
    background: str | None = None

    @property
    def kinds(self) -> list[Kind]:
        """The kind of every object the caption describes (so ``len(kinds)`` objects in the image)."""
        if self.template == "relation":
            assert self.other is not None
            return [self.subject, self.other]
        return [self.subject] * self.count

    def caption(self) -> str:
        s = self.subject
        if self.template == "single":
            text = f"{article(s.color)} {s}"
        elif self.template == "count":
            text = f"{COUNT_WORDS[self.count]} {s.color} {PLURALS[s.shape]}"
        else:
            assert self.relation is not None and self.other is not None
            o = self.other
            text = f"{article(s.color)} {s} {RELATIONS[self.relation]} {article(o.color)} {o}"
        if self.background is not None:
            text += f" on {article(self.background)} {self.background} background"
        return text

    def facts(self) -> list[Fact]:
        facts: list[Fact] = [Exists(k) for k in dict.fromkeys(self.kinds)]
        if self.template == "count":
            facts.append(Count(self.subject, self.count))
        if self.template == "relation":
            assert self.relation is not None and self.other is not None
            facts.append(Relation(self.subject, self.relation, self.other))
        facts.append(Total(len(self.kinds)))
        if self.background is not None:
            facts.append(Background(self.background))
        return facts

    def heldout_reason(self) -> str | None:
        """Which held-out space the caption falls in ("combos", "counts", "relations"), else None."""
        if any((k.color, k.shape) in HELDOUT_COMBOS for k in self.kinds):
            return "combos"
        if self.template == "count" and (self.count, self.subject.shape) in HELDOUT_COUNTS:
            return "counts"
        if self.template == "relation" and (self.relation, self.subject.shape) in HELDOUT_RELATIONS:
            return "relations"
        return None


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_COLOR = _alt(OBJECT_COLORS)
_SHAPE = _alt(SHAPES)
_BG = rf"(?: on an? (?P<bg>{_alt(BACKGROUND_COLORS)}) background)?"
_SINGLE_RE = re.compile(rf"an? (?P<c1>{_COLOR}) (?P<s1>{_SHAPE}){_BG}")
_COUNT_RE = re.compile(
    rf"(?P<n>{_alt(COUNT_WORDS.values())}) (?P<c1>{_COLOR}) (?P<s1>{_alt(PLURALS.values())}){_BG}"
)
_RELATION_RE = re.compile(
    rf"an? (?P<c1>{_COLOR}) (?P<s1>{_SHAPE}) (?P<rel>{_alt(RELATIONS.values())}) "
    rf"an? (?P<c2>{_COLOR}) (?P<s2>{_SHAPE}){_BG}"
)
_WORD_TO_COUNT: Final = {w: n for n, w in COUNT_WORDS.items()}
_WORDS_TO_RELATION: Final = {w: r for r, w in RELATIONS.items()}
_PLURAL_TO_SHAPE: Final = {p: s for s, p in PLURALS.items()}

GRAMMAR_HELP: Final = (
    "shapes-world captions look like 'a red circle', 'two blue squares', 'a green triangle left of a "
    "yellow circle', optionally followed by ' on a black background'; colours: "
    f"{', '.join(OBJECT_COLORS)}; shapes: {', '.join(SHAPES)}; counts: {', '.join(COUNT_WORDS.values())}; "
    f"relations: {', '.join(RELATIONS.values())}; backgrounds: {', '.join(BACKGROUND_COLORS)}"
)


def normalize(prompt: str) -> str:
    """Lower case, single spaces, no trailing full stop: the form the grammar parses."""
    return " ".join(prompt.lower().split()).rstrip(".").rstrip()


@functools.lru_cache(maxsize=65536)
def parse_caption(prompt: str) -> CaptionSpec:
    """The structure of a shapes-world caption; :class:`PromptParseError` (a ValueError) if it is none."""
    if not isinstance(prompt, str):
        raise PromptParseError(f"prompt must be a string, got {type(prompt).__name__}.")
    text = normalize(prompt)
    spec: CaptionSpec | None = None
    if m := _SINGLE_RE.fullmatch(text):
        spec = CaptionSpec("single", Kind(m["c1"], m["s1"]), background=m["bg"])
    elif m := _COUNT_RE.fullmatch(text):
        spec = CaptionSpec("count", Kind(m["c1"], _PLURAL_TO_SHAPE[m["s1"]]), count=_WORD_TO_COUNT[m["n"]],
                           background=m["bg"])
    elif m := _RELATION_RE.fullmatch(text):
        spec = CaptionSpec("relation", Kind(m["c1"], m["s1"]), relation=_WORDS_TO_RELATION[m["rel"]],
                           other=Kind(m["c2"], m["s2"]), background=m["bg"])
    if spec is None:
        raise PromptParseError(f"cannot parse prompt {prompt!r}: {GRAMMAR_HELP}.")
    if spec.other is not None and spec.other == spec.subject:
        raise PromptParseError(
            f"prompt {prompt!r}: the two objects of a relation must differ in colour or shape."
        )
    if spec.background is not None and any(k.color == spec.background for k in spec.kinds):
        raise PromptParseError(
            f"prompt {prompt!r} is unsatisfiable: an object cannot have the background's colour."
        )
    return spec


def parse_prompt(prompt: str) -> list[Fact]:
    """The atomic facts a caption states; :class:`PromptParseError` (a ValueError) names a bad prompt."""
    return parse_caption(prompt).facts()


# -- the caption space and its splits ---------------------------------------------------------------

# Colour-shape combinations that appear in no train prompt (every colour and shape still does).
HELDOUT_COMBOS: Final = frozenset({("blue", "triangle"), ("orange", "circle"), ("green", "square"),
                                   ("yellow", "triangle")})
# (count, shape) pairs held out of train: "three triangles", "two squares", "two circles". Train
# keeps "two triangles", "three squares", "three circles", so every count word and shape is seen.
HELDOUT_COUNTS: Final = frozenset({(3, "triangle"), (2, "square"), (2, "circle")})
# (relation, subject shape) pairs held out of train: "a <circle> above ...", "a <triangle> left of ...".
HELDOUT_RELATIONS: Final = frozenset({("above", "circle"), ("left_of", "triangle")})

SPLITS: Final = ("train", "heldout-combos", "heldout-counts", "heldout-relations")
# Relation captions are ~90 % of the space; each split takes a fixed hash-chosen subset of them.
TRAIN_RELATION_PROMPTS: Final = 300
HELDOUT_COMBO_RELATION_PROMPTS: Final = 100
HELDOUT_RELATION_PROMPTS: Final = 150
SPLIT_SALT: Final = "rlbench-shapes-v1"
SPLIT_FILE_HEADER: Final = (
    "# {name}: shapes-world prompts, one a line.\n"
    "# Generated by rlbench.shapes.grammar.write_split_files(); edit the generator, not this file.\n"
)


def _kinds() -> list[Kind]:
    return [Kind(c, s) for c in OBJECT_COLORS for s in SHAPES]


def _backgrounds(kinds: list[Kind], with_background: bool) -> list[str | None]:
    if not with_background:
        return [None]
    used = {k.color for k in kinds}
    return [None] + [b for b in BACKGROUND_COLORS if b not in used]


def all_specs(templates: tuple[str, ...] = TEMPLATES, with_background: bool = True) -> list[CaptionSpec]:
    """Every caption of the given templates, in a fixed order (template, kinds, relation, background)."""
    unknown = set(templates) - set(TEMPLATES)
    if unknown:
        raise ValueError(f"unknown templates {sorted(unknown)}; known: {', '.join(TEMPLATES)}")
    specs: list[CaptionSpec] = []
    for template in templates:
        for kind in _kinds():
            if template == "single":
                specs += [CaptionSpec("single", kind, background=b)
                          for b in _backgrounds([kind], with_background)]
            elif template == "count":
                for n in COUNT_WORDS:
                    specs += [CaptionSpec("count", kind, count=n, background=b)
                              for b in _backgrounds([kind], with_background)]
            else:
                for other in _kinds():
                    if other == kind:
                        continue
                    for rel in RELATIONS:
                        specs += [CaptionSpec("relation", kind, relation=rel, other=other, background=b)
                                  for b in _backgrounds([kind, other], with_background)]
    return specs


def all_prompts(templates: tuple[str, ...] = TEMPLATES, with_background: bool = True) -> list[str]:
    """The whole caption space (8,046 captions with backgrounds), in a fixed order."""
    return [s.caption() for s in all_specs(templates, with_background)]


def _hash_pick(specs: list[CaptionSpec], n: int) -> list[CaptionSpec]:
    """A fixed pseudo-random subset of ``n`` specs (by SHA-256 of the caption: stable across
    platforms and library versions), kept in the input's order."""
    if n >= len(specs):
        return list(specs)
    key = {s: hashlib.sha256(f"{SPLIT_SALT}:{s.caption()}".encode()).hexdigest() for s in specs}
    chosen = set(sorted(specs, key=key.__getitem__)[:n])
    return [s for s in specs if s in chosen]


@functools.lru_cache(maxsize=1)
def _split_specs() -> dict[str, tuple[CaptionSpec, ...]]:
    by_reason: dict[tuple[str | None, bool], list[CaptionSpec]] = {}
    for spec in all_specs():
        by_reason.setdefault((spec.heldout_reason(), spec.template == "relation"), []).append(spec)

    def pool(reason: str | None, relation: bool) -> list[CaptionSpec]:
        return by_reason.get((reason, relation), [])

    return {
        "train": tuple(pool(None, False) + _hash_pick(pool(None, True), TRAIN_RELATION_PROMPTS)),
        "heldout-combos": tuple(pool("combos", False)
                                + _hash_pick(pool("combos", True), HELDOUT_COMBO_RELATION_PROMPTS)),
        "heldout-counts": tuple(pool("counts", False)),
        "heldout-relations": tuple(_hash_pick(pool("relations", True), HELDOUT_RELATION_PROMPTS)),
    }


def split_specs() -> dict[str, list[CaptionSpec]]:
    """:func:`split_prompts` as caption specs."""
    return {name: list(specs) for name, specs in _split_specs().items()}


def split_prompts() -> dict[str, list[str]]:
    """The fixed prompt splits: ``train`` and the held-out splits, pairwise disjoint.

    * ``train``: every single and count caption outside the held-out spaces, plus a fixed subset of
      ``TRAIN_RELATION_PROMPTS`` relation captions outside them;
    * ``heldout-combos``: captions with a held-out colour-shape combination (all single and count
      ones, plus a fixed subset of relation ones);
    * ``heldout-counts``: count captions with a held-out (count, shape) pair;
    * ``heldout-relations``: a fixed subset of relation captions with a held-out (relation,
      subject shape) pair.
    """
    return {name: [s.caption() for s in specs] for name, specs in _split_specs().items()}


def split_file_name(split: str) -> str:
    """The bundled file of a split: ``shapes-<split>.txt``."""
    return f"shapes-{split}.txt"


def split_file_text(split: str) -> str:
    """The exact contents of a split's bundled prompt file."""
    header = SPLIT_FILE_HEADER.format(name=f"shapes-{split}")
    return header + "".join(p + "\n" for p in split_prompts()[split])


def write_split_files(folder: str | Path | None = None) -> list[Path]:
    """(Re)write the bundled split files (default: the repository's ``benchmarks/prompts``)."""
    if folder is None:  # benchmarks/ is installed as the package rlbench.benchmarks
        folder = Path(str(resources.files("rlbench.benchmarks").joinpath("prompts")))
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLITS:
        path = out / split_file_name(split)
        path.write_text(split_file_text(split), encoding="utf-8")
        paths.append(path)
    return paths
