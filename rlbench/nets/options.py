"""The constructor options the model-based rewards share, checked one way: ``dtype``, ``device``, ``batch_size``.

Used by the zoo rewards (``aesthetic``, ``pickscore``, ``hpsv2``, ``clipscore``, ``imagereward``,
``vlm-bertscore``, ``shapes-vlm-bertscore``) and by the nets they build (BERTScore, the VLM describers).
A bad value is a ``ValueError`` naming the option; ``make_reward`` turns it into a ``ConfigError``.
"""

from __future__ import annotations

import math
import numbers

import torch

# The precisions a reward's network may run in (scores always come back float32).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype, name: str = "dtype") -> torch.dtype:
    """``"float32"``, ``"float16"``, ``"bfloat16"`` (or the torch dtype itself) -> the torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {dtype!r}")


def parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}") from exc


def positive_int(name: str, value: int) -> int:
    """``value`` as an int >= 1 (an integral float such as 4.0 is accepted; bools and strings are not)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value != int(value) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def parse_batch_size(batch_size: int) -> int:
    return positive_int("batch_size", batch_size)
