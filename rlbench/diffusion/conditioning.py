"""The prompt conditioning of any model family as one batch-indexable record.

What a denoiser needs besides the latents differs by family:

* SD 1.x/2.x and the shapes model (UNet): ``embeds`` (B, L, D), the text encoder's hidden states;
* SD3/SD3.5 (MMDiT): ``embeds`` (B, 77 + T, D) (CLIP-L + CLIP-G, zero-padded, then T5) and ``pooled``
  (B, 2 * projection_dim);
* FLUX.1: ``embeds`` (B, T, D) (T5), ``pooled`` (B, D_clip) and the text position ids (T, 3), the same
  for every sample (``shared``).

:class:`Conditioning` holds the per-sample tensors (batch first) and the shared ones, so the trainer's
batches, the evaluation and the algorithms index, repeat and concatenate it without knowing the family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Conditioning:
    """Per-sample tensors (``batched``, batch dim first, all of one length) and shared ones (``shared``)."""

    batched: Mapping[str, torch.Tensor]
    shared: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.batched:
            raise ValueError("a Conditioning needs at least one per-sample tensor")
        sizes = {k: v.shape[0] for k, v in self.batched.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"per-sample conditioning tensors differ in batch size: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.batched.values())).shape[0]

    def __getitem__(self, item: Any) -> Any:
        """``cond["embeds"]``: a tensor by name; ``cond[rows]`` (an int, indices or a slice): those rows."""
        if isinstance(item, str):
            return self.batched[item] if item in self.batched else self.shared[item]
        if isinstance(item, int):
            item = [item]
        return self.select(item)

    @property
    def device(self) -> torch.device:
        return next(iter(self.batched.values())).device

    def _map(self, fn) -> Conditioning:
        return Conditioning({k: fn(v) for k, v in self.batched.items()}, dict(self.shared))

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> Conditioning:
        """The rows ``index`` (a tensor or list of indices, or a slice)."""
        if isinstance(index, slice):
            return self._map(lambda v: v[index])
        return self._map(lambda v: v[torch.as_tensor(index, device=v.device)])

    def repeat_interleave(self, k: int, dim: int = 0) -> Conditioning:
        """Each row ``k`` times in a row (one per trained step of a sample); rows only (``dim`` 0)."""
        if dim != 0:
            raise ValueError("a Conditioning repeats along its rows (dim 0) only")
        return self if k == 1 else self._map(lambda v: v.repeat_interleave(k, dim=0))

    def expand(self, n: int) -> Conditioning:
        """A one-row conditioning (the negative prompt) as ``n`` rows (views, no copies)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"only a one-row conditioning expands, this one has {len(self)} rows")
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Conditioning:
        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)

        return Conditioning({k: move(v) for k, v in self.batched.items()},
                            {k: v.to(device=device) for k, v in self.shared.items()})

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Rows of several conditionings one after another (their shared tensors must agree)."""
        first = items[0]
        for other in items[1:]:
            if set(other.batched) != set(first.batched) or set(other.shared) != set(first.shared):
                raise ValueError("cannot concatenate conditionings of different models")
        return Conditioning({k: torch.cat([c.batched[k] for c in items]) for k in first.batched}, dict(first.shared))

    @staticmethod
    def pair(neg: Conditioning, pos: Conditioning) -> Conditioning:
        """[negative rows, positive rows]: one batch for classifier-free guidance (``neg`` expanded to ``pos``)."""
        return Conditioning.cat([neg.expand(len(pos)), pos])


def as_conditioning(value: torch.Tensor | Conditioning) -> Conditioning:
    """A bare tensor is the UNet family's text embeddings."""
    return value if isinstance(value, Conditioning) else Conditioning({"embeds": value})
