"""Prompt sets: the ``rlbench.prompts`` registry's contract and the built-in sets.

A prompt-set plugin is a zero-argument factory returning a :class:`PromptSet`. ``--prompts`` takes a
registered name or a text file (one prompt a line; blank lines and ``#`` comments are skipped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rlbench.errors import InputError, UnknownNameError
from rlbench.registry import PROMPTS


@dataclass
class PromptSet:
    """An ordered list of prompts, each with a metadata dict."""

    name: str
    prompts: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    version: str = "1"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise InputError(f"prompt set '{self.name}' is empty.")
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]
        if len(self.metadata) != len(self.prompts):
            raise InputError(f"prompt set '{self.name}': {len(self.prompts)} prompts but {len(self.metadata)} metadata dicts.")

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[list[str], list[dict[str, Any]]]:
        """``n`` prompts drawn uniformly with replacement (the reference's ``random.choice``)."""
        idx = rng.integers(0, len(self.prompts), size=n)
        return [self.prompts[i] for i in idx], [dict(self.metadata[i]) for i in idx]

    def sample_distinct(self, n: int, rng: np.random.Generator) -> tuple[list[str], list[dict[str, Any]]]:
        """``n`` different prompts (a random permutation's first n; whole permutations while n > len)."""
        idx = np.concatenate([rng.permutation(len(self.prompts)) for _ in range(-(-n // len(self.prompts)))])[:n]
        return [self.prompts[i] for i in idx], [dict(self.metadata[i]) for i in idx]


def read_prompt_file(path: str | Path, name: str | None = None) -> PromptSet:
    """A text file, one prompt a line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompt file {str(p)!r}: {exc}") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {str(p)!r} has no prompts (one prompt a line).")
    return PromptSet(name or p.stem, prompts)


def _bundled(filename: str, name: str, description: str) -> PromptSet:
    ref = resources.files("rlbench.benchmarks").joinpath("prompts", filename)
    with resources.as_file(ref) as path:
        ps = read_prompt_file(path, name)
    ps.description = description
    return ps


def load_prompts(name_or_path: str) -> PromptSet:
    """A registered prompt set by name, else a prompt file by path."""
    if name_or_path in PROMPTS:
        return PROMPTS.make(name_or_path, returns=PromptSet)
    if Path(name_or_path).is_file():
        return read_prompt_file(name_or_path)
    raise UnknownNameError(PROMPTS.unknown_message(name_or_path) + " Or give a text file, one prompt a line.")


# -- built-in sets (registered in pyproject.toml) ---------------------------------------------------


def simple_animals() -> PromptSet:
    """The 45 common animals of DDPO's aesthetic experiments (paper App. D.6; ddpo-pytorch assets)."""
    return _bundled("simple-animals.txt", "simple-animals", "45 common animals (DDPO paper App. D.6)")


# -- the DDPO paper's other prompt sets (Black et al. 2023; ddpo-pytorch / jannerm/ddpo assets) -----------------


def _bundled_lines(filename: str) -> list[str]:
    """The prompts of a bundled file under ``benchmarks/prompts/`` (``#`` header lines skipped)."""
    return _bundled(filename, Path(filename).stem, "").prompts


_EXPLICIT_AN = re.compile(r"^(?:euler|hour(?!i)|heir|honest|hono[ur])")
_VOWEL_EXCEPTIONS_A = re.compile(
    r"^(?:e[uw]|onc?e\b|onetime\b|uni(?:[^nmd]|mo)|u[bcfghjkqrst][aeiou]|ukr|unabomber|unanimous)"
)
_Y_VOWEL_SOUND = re.compile(r"^y(?:b[lor]|cl[ea]|fere|gg|p[ios]|rou|tt)")


def a_or_an(noun: str) -> str:
    """``noun`` with its indefinite article: ``"an ant"``, ``"a cat"``, ``"a unicorn"``, ``"an hour"``.

    The word-level rules of ``inflect.engine().a`` (what ddpo-pytorch's ``nouns_activities`` calls), in inflect's
    order: silent-h words ("hour", "heir", "honest", "honour") take "an"; other consonants "a"; vowel letters with
    a consonant sound ("eu"/"ew", "one", "uni-", "u" + consonant + vowel as in "usual") "a"; other vowels "an";
    "y" + consonant as in "yttrium" "an"; else "a". inflect's rules for abbreviations ("an FBI agent"), single
    letters and ordinals are left out: these sets hold plain words.
    """
    word = noun.strip()
    w = word.lower()
    if _EXPLICIT_AN.match(w):
        article = "an"
    elif w[:1] and w[0] not in "aeiouy":
        article = "a"
    elif _VOWEL_EXCEPTIONS_A.match(w):
        article = "a"
    elif w[:1] in ("a", "e", "i", "o", "u"):
        article = "an"
    elif _Y_VOWEL_SOUND.match(w):
        article = "an"
    else:
        article = "a"
    return f"{article} {word}"


def imagenet_animals() -> PromptSet:
    """The 398 ImageNet-1k animal classes (indices 0-397) as full class strings with synonyms.

    The compressibility / incompressibility prompts of the DDPO paper (§6.1): ddpo-pytorch's
    ``imagenet_animals`` draws ``imagenet_classes.txt[0:398]``, jannerm/ddpo's ``classes[0..397]``.
    Metadata: ``{"imagenet_class": index}``.
    """
    prompts = _bundled_lines("imagenet-animals.txt")
    return PromptSet(
        "imagenet-animals",
        prompts,
        [{"imagenet_class": i} for i in range(len(prompts))],
        description="398 ImageNet-1k animal classes 0-397, full class strings (DDPO §6.1; jannerm/ddpo imagenet.py)",
    )


def nouns_activities() -> PromptSet:
    """The DDPO prompt-alignment prompts: "a(n) <animal> <activity>" for 45 simple animals x 3 activities.

    ddpo-pytorch's ``nouns_activities("simple_animals.txt", "activities.txt")`` draws the animal and the activity
    independently and uniformly, i.e. uniformly over this 135-prompt grid (animal-major, activities in file order).
    Metadata: ``{"animal": noun, "activity": activity}``.
    """
    nouns = _bundled_lines("simple-animals.txt")
    activities = _bundled_lines("activities.txt")
    prompts, metadata = [], []
    for noun in nouns:
        for activity in activities:
            prompts.append(f"{a_or_an(noun)} {activity}")
            metadata.append({"animal": noun, "activity": activity})
    return PromptSet(
        "nouns-activities",
        prompts,
        metadata,
        description="45 simple animals x 3 activities, 'a(n) <animal> <activity>' (DDPO paper §6.2 prompt alignment)",
    )


def unseen_animals() -> PromptSet:
    """38 animals outside the 45 simple animals: the DDPO paper's held-out animals (App. F, Fig. 12).

    ddpo-pytorch ``assets/uncommon_animals.txt``, text as in the source (capitalised). Metadata: ``{"animal": name}``.
    """
    prompts = _bundled_lines("unseen-animals.txt")
    return PromptSet(
        "unseen-animals",
        prompts,
        [{"animal": p} for p in prompts],
        description="38 held-out animals for generalisation (DDPO paper App. F; ddpo-pytorch uncommon_animals.txt)",
    )


def everyday_objects() -> PromptSet:
    """50 ordinary objects (toaster, chair, coffee cup, ...): the DDPO paper's non-animal held-out set (App. F).

    ddpo-pytorch ``assets/everyday_objects.txt`` (= jannerm/ddpo ``assets/everyday_objects.txt``), text as in the
    source (capitalised). Metadata: ``{"object": name}``.
    """
    prompts = _bundled_lines("everyday-objects.txt")
    return PromptSet(
        "everyday-objects",
        prompts,
        [{"object": p} for p in prompts],
        description="50 everyday objects for generalisation (DDPO paper App. F; ddpo-pytorch everyday_objects.txt)",
    )
