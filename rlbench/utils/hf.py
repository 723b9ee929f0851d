"""Keep Hugging Face libraries' progress bars and chatter out of rlbench's own output.

Two scopes, one place: :func:`quiet_hf` for a whole process (the CLI, the demo, training: rlbench
reports progress itself), :func:`no_progress_bars` around one load inside library code (the reward
nets), which leaves the caller's settings as it found them.
"""

from __future__ import annotations

import contextlib


def quiet_hf() -> None:
    """For the rest of the process: diffusers and transformers log errors only and show no progress bars."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


@contextlib.contextmanager
def no_progress_bars():
    """No transformers progress bars (loading / writing weights) inside the block; restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
