"""Prompt sets: the ``rlbench.prompts`` registry's contract and the built-in sets.

A prompt-set plugin is a zero-argument factory returning a :class:`PromptSet`. ``--prompts`` takes a
registered name or a text file (one prompt a line; blank lines and ``#`` comments are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rlbench.errors import InputError, UnknownNameError


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
    from rlbench.registry import PROMPTS
    from rlbench.reward import construct_plugin

    if name_or_path in PROMPTS:
        ps = construct_plugin(PROMPTS.load(name_or_path), {}, kind="prompt set", name=name_or_path)
        if not isinstance(ps, PromptSet):
            raise InputError(f"prompt set '{name_or_path}' returned {type(ps).__name__}, not a PromptSet.")
        return ps
    if Path(name_or_path).is_file():
        return read_prompt_file(name_or_path)
    raise UnknownNameError(PROMPTS.unknown_message(name_or_path) + " Or give a text file, one prompt a line.")


# -- built-in sets (registered in pyproject.toml) ---------------------------------------------------


def simple_animals() -> PromptSet:
    """The 45 common animals of DDPO's aesthetic experiments (paper App. D.6; ddpo-pytorch assets)."""
    return _bundled("simple-animals.txt", "simple-animals", "45 common animals (DDPO paper App. D.6)")
