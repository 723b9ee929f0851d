"""rlbench's error hierarchy.

Every error a user can cause derives from :class:`RLBenchError`; its message names what is wrong
and how to fix it. The CLI prints such errors as one line (no traceback) and exits with code 2.
"""

from __future__ import annotations


class RLBenchError(Exception):
    """Base class of every error a user can cause and fix."""


class UnknownNameError(RLBenchError, KeyError):
    """A registry lookup for a name nobody registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class RegistrationError(RLBenchError):
    """Two plugins claim the same name, or a plugin is registered wrongly."""


class PluginLoadError(RLBenchError):
    """A registered plugin failed to import or to construct."""


class DependencyNotInstalled(RLBenchError):
    """An optional dependency is missing; the message carries the install command."""


class WeightsNotAvailable(RLBenchError):
    """Model weights are absent and cannot be fetched; the message names the fix."""


class ConfigError(RLBenchError):
    """A configuration value or combination is invalid."""


class RewardContractError(RLBenchError):
    """A reward broke the reward contract (shape, dtype, finiteness, determinism, ...)."""


class InputError(RLBenchError):
    """Bad input data: an unreadable image, a missing file, images outside [0, 1], ..."""


class RunDirError(RLBenchError):
    """A run directory is missing, incomplete, or would be overwritten."""


class RemoteRewardError(RLBenchError):
    """The reward service (``rlbench rewards serve``) is unreachable, refused a request or failed; the message
    names its URL and what to do."""


class RewardFailed(RLBenchError):
    """A reward could not score some of its inputs (e.g. a VLM judge's answer has no score after the re-asks);
    the message says how many and shows one raw output. Never replaced by a made-up score."""
