"""Keep Hugging Face libraries' progress bars and chatter out of rlbench's own output."""

from __future__ import annotations

import contextlib


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
