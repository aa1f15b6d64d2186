"""Segment tables: int64 ``[L+1]`` column offsets splitting ``J``'s columns into segments
(docs/methods.md#notation)."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def offsets_from_numels(numels: Iterable[int]) -> torch.Tensor:
    """Segment table for consecutive blocks of the given sizes (zeros allowed), on the CPU.

    ``offsets_from_numels(p.numel() for p in params)`` gives one segment per parameter tensor.

    Args:
        numels: the segments' sizes, in order.

    Returns:
        int64 ``[L+1]``: ``0`` then the cumulative sizes.

    Raises:
        ValueError: for no sizes or a negative size.
    """
    sizes = [int(n) for n in numels]
    if not sizes:
        raise ValueError("offsets_from_numels: need at least one segment")
    if any(n < 0 for n in sizes):
        raise ValueError(f"offsets_from_numels: sizes must be >= 0, got {sizes}")
    out = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    return out


def segment_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each segment of a segment table (reads the values on the host)."""
    o = offsets.tolist()
    return list(zip(o[:-1], o[1:]))
