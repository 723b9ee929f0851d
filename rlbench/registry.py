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
import functools
import importlib
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from rlbench.errors import ConfigError, PluginLoadError, RegistrationError, RLBenchError, UnknownNameError

if TYPE_CHECKING:
    from rlbench.reward import CheckedReward


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

    def load_subclass(self, name: str, base: type) -> type:
        """:meth:`load`, checked to be a subclass of ``base`` (lm-eval's ``base_cls`` check)."""
        cls = self.load(name)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(
                f"{self.kind} '{name}' ({self.entry(name).target}) is not a subclass of "
                f"{base.__module__}.{base.__qualname__}."
            )
        return cls

    def make(self, name: str, options: Mapping[str, Any] | None = None, *, returns: type | None = None) -> Any:
        """Construct the plugin registered as ``name`` with ``options`` (after ``gym.make``).

        Unknown options are a ConfigError naming the plugin's options; with ``returns``, a plugin
        that builds anything else is an error naming what it built.
        """
        obj = construct(self.load(name), options or {}, kind=self.kind, name=name)
        if returns is not None and not isinstance(obj, returns):
            raise ConfigError(
                f"{self.kind} '{name}' ({self.entry(name).target}) built a {type(obj).__name__}, "
                f"not a {returns.__qualname__}."
            )
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


def make_reward(name: str, **options: Any) -> CheckedReward:
    """Build the reward registered as ``name`` — the one front door for rewards (after ``gym.make``).

    Args:
        name: a registered reward name (``rlbench rewards list``), or a weighted combination
            ``"a:1.0,b:0.5"`` (see :mod:`rlbench.combine`).
        **options: constructor options of that reward (a weights path, a batch size, ...).

    Returns:
        A :class:`CheckedReward`: call it as ``reward(images, prompts, metadata)`` to get a
        :class:`RewardOutput` (which unpacks as ``scores, info``).
    """
    # Imported here: listing a registry must not import torch (the reward contract does).
    from rlbench.combine import WeightedSum, is_combination, parse_spec, split_options
    from rlbench.reward import CheckedReward

    if is_combination(name):  # "a:1.0,b:0.5": a weighted sum of registered rewards
        pairs = parse_spec(name)
        routed = split_options([n for n, _ in pairs], options)
        components = [(n, w, make_reward(n, **routed[n])) for n, w in pairs]
        combined = WeightedSum(components)
        return CheckedReward(combined, name=combined.spec, origin="combined",
                             target=", ".join(f"{n}={c.card.target or c.card.origin}" for n, _, c in components))
    entry = REWARDS.entry(name)
    return CheckedReward(REWARDS.make(name, options), name=name, origin=entry.origin, target=entry.target)


def construct(factory: Any, options: Mapping[str, Any], *, kind: str, name: str) -> Any:
    """Call a plugin's class or factory with ``options``; unknown options are a ConfigError."""
    if not (inspect.isclass(factory) or inspect.isroutine(factory) or isinstance(factory, functools.partial)):
        # An entry point (or register()) may name a ready-made instance; a reward instance is
        # callable too, but calling it would score, not construct.
        if options:
            raise ConfigError(
                f"{kind} '{name}' is registered as a ready-made instance and takes no options; "
                f"got {', '.join(repr(k) for k in options)}."
            )
        return factory
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        params = sig.parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in options if k not in accepted]
        if unknown and not takes_kwargs:
            raise ConfigError(
                f"{kind} '{name}' has no option {', '.join(repr(u) for u in unknown)}; "
                f"its options are: {', '.join(accepted) or 'none'}."
            )
    try:
        return factory(**options)
    except RLBenchError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{kind} '{name}' rejected options {dict(options)}: {exc}") from exc
    except Exception as exc:
        raise PluginLoadError(f"{kind} '{name}' failed to construct: {type(exc).__name__}: {exc}") from exc
