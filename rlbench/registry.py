"""One generic plugin registry over Python entry points.

rlbench has four registries (:data:`REWARDS`, :data:`ALGORITHMS`, :data:`MODELS`, :data:`PROMPTS`),
all instances of :class:`Registry`. Built-in plugins are registered through rlbench's own
``[project.entry-points]`` exactly as a third-party package registers its own, so the plugin path is
the tested path.

Rules (after Gymnasium's and lm-evaluation-harness' lessons):

* names are read from entry-point metadata without importing any plugin code;
* a plugin is imported only when it is used, and an import failure is an error naming the plugin,
  its distribution and the cause (never a silent skip); listing still works;
* an unknown name is an error listing what exists plus a "did you mean";
* two distributions registering one name is an error naming both.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from rlbench.errors import PluginLoadError, RegistrationError, UnknownNameError


@dataclass(frozen=True)
class PluginEntry:
    """One registration: a name and where its object lives."""

    name: str
    target: str  # "module:attr"; for in-process registrations a repr of the object
    dist: str | None = None  # distribution name, None for in-process registrations
    dist_version: str | None = None
    entry_point: metadata.EntryPoint | None = field(default=None, compare=False, repr=False)
    obj: Any = field(default=None, compare=False, repr=False)

    @property
    def origin(self) -> str:
        """``dist==version`` for entry points, ``local`` for in-process registrations."""
        if self.dist is None:
            return "local"
        return f"{self.dist}=={self.dist_version}" if self.dist_version else self.dist


def _dist_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except Exception:  # a distribution with broken metadata still lists
        return getattr(dist, "name", None), None


class Registry:
    """A named collection of plugins of one kind, backed by an entry-point group.

    Args:
        group: the entry-point group, e.g. ``"rlbench.rewards"``.
        kind: what one plugin is called in messages, e.g. ``"reward"``.
        cli: the CLI command that lists this registry, quoted in error messages.
    """

    def __init__(self, group: str, kind: str, cli: str) -> None:
        self.group = group
        self.kind = kind
        self.cli = cli
        self._local: dict[str, PluginEntry] = {}
        self._loaded: dict[str, Any] = {}
        self._scan_key: tuple[str, ...] | None = None
        self._scanned: dict[str, list[PluginEntry]] = {}

    # -- discovery (no plugin code runs here) ------------------------------------------------------
    def refresh(self) -> None:
        """Forget cached entry points and loaded plugins (after installing a package at run time)."""
        importlib.invalidate_caches()
        self._scan_key = None
        self._loaded.clear()

    def _scan(self) -> dict[str, list[PluginEntry]]:
        key = tuple(sys.path)
        if self._scan_key != key:
            found: dict[str, list[PluginEntry]] = {}
            for ep in metadata.entry_points(group=self.group):
                dist, version = _dist_of(ep)
                entry = PluginEntry(ep.name, ep.value, dist, version, entry_point=ep)
                same = found.setdefault(ep.name, [])
                # One distribution seen twice on sys.path (editable + build dir) is not a conflict.
                if not any(e.target == entry.target and e.dist == entry.dist for e in same):
                    same.append(entry)
            self._scanned, self._scan_key = found, key
        return self._scanned

    def _all(self) -> dict[str, list[PluginEntry]]:
        merged = {name: list(entries) for name, entries in self._scan().items()}
        for name, entry in self._local.items():
            merged.setdefault(name, []).append(entry)
        return merged

    def entries(self) -> list[PluginEntry]:
        """Every registration, sorted by name; conflicting registrations all appear."""
        return [e for name in sorted(self._all()) for e in self._all()[name]]

    def names(self) -> list[str]:
        """Registered names, sorted. Imports no plugin."""
        return sorted(self._all())

    def conflicts(self) -> dict[str, list[PluginEntry]]:
        """Names claimed by more than one registration."""
        return {n: es for n, es in self._all().items() if len(es) > 1}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._all()

    def __iter__(self):
        return iter(self.names())

    def entry(self, name: str) -> PluginEntry:
        """The single registration of ``name``; raises on unknown or conflicting names."""
        found = self._all().get(name)
        if not found:
            raise UnknownNameError(self.unknown_message(name))
        if len(found) > 1:
            claims = " and ".join(f"{e.origin} ({e.target})" for e in found)
            raise RegistrationError(
                f"{self.kind} '{name}' is registered twice: by {claims}. Uninstall one of the "
                f"distributions, or ask one of them to rename its entry point in group '{self.group}'."
            )
        return found[0]

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        close += [n for n in names if n.lower() == str(name).lower() and n not in close]
        hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
        available = ", ".join(names) if names else "none are installed"
        return (
            f"unknown {self.kind} '{name}'.{hint} Available: {available}. "
            f"(`{self.cli}` lists them; plugins register under entry-point group '{self.group}'.)"
        )

    # -- loading ----------------------------------------------------------------------------------
    def load(self, name: str) -> Any:
        """Import and return the object registered as ``name`` (a class or factory)."""
        if name in self._loaded:
            return self._loaded[name]
        entry = self.entry(name)
        if entry.entry_point is None:
            obj = entry.obj if entry.obj is not None else _import_target(entry.target)
        else:
            try:
                obj = entry.entry_point.load()
            except Exception as exc:  # any failure inside plugin code: name the plugin and cause
                raise PluginLoadError(
                    f"{self.kind} '{name}' from {entry.origin} ({entry.target}) failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        self._loaded[name] = obj
        return obj

    # -- in-process registration (notebooks, tests) --------------------------------------------------
    def register(self, name: str, target: Any) -> None:
        """Register ``target`` (an object or a ``"module:attr"`` string) as ``name`` in this process.

        Packages should register through entry points instead; this is for notebooks and tests.
        """
        if name in self._all():
            raise RegistrationError(
                f"{self.kind} '{name}' is already registered by "
                f"{', '.join(e.origin for e in self._all()[name])}; choose another name."
            )
        if isinstance(target, str):
            self._local[name] = PluginEntry(name, target)
        else:
            self._local[name] = PluginEntry(name, _describe(target), obj=target)

    def unregister(self, name: str) -> None:
        """Remove an in-process registration made with :meth:`register`."""
        self._local.pop(name, None)
        self._loaded.pop(name, None)


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except Exception as exc:
        raise PluginLoadError(f"'{target}' failed to import: {type(exc).__name__}: {exc}") from exc
    return obj


REWARDS = Registry("rlbench.rewards", "reward", "rlbench rewards list")
ALGORITHMS = Registry("rlbench.algorithms", "algorithm", "rlbench algos list")
MODELS = Registry("rlbench.models", "model", "rlbench models list")
PROMPTS = Registry("rlbench.prompts", "prompt set", "rlbench prompts list")
