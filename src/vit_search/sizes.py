"""Image and patch sizes: an int for a square, or (height, width)."""

from __future__ import annotations

from typing import Sequence, Union

Size = Union[int, tuple[int, int]]


def pair(size: int | Sequence[int]) -> tuple[int, int]:
    """A size as (height, width): ``16`` -> ``(16, 16)``; a pair stays a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)
