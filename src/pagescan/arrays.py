"""numpy arrays that own their pages: ``empty``, ``zeros``, ``empty_like``, ``zeros_like``.

Each array lives on its own private anonymous mapping (``mmap(MAP_PRIVATE |
MAP_ANONYMOUS)``): it starts on a page boundary, no other object shares its pages, and
the mapping is unmapped (``munmap``) when the last array or view of it is collected.
That is the cheapest memory to track for checkpoints: a write to the array marks only
the array's own pages, and a restore or a lazy load can drop and refill whole pages.

The kernel hands out a fresh anonymous mapping unpopulated; every page reads as zeros
and is allocated on first write. So ``zeros`` costs no more than ``empty`` (nothing is
written), and memory is only used where the program writes.
"""

from __future__ import annotations

import math
import sys
import mmap
from collections.abc import Sequence
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt

__all__ = ["empty", "empty_like", "zeros", "zeros_like"]

P = mmap.PAGESIZE


class _Mapping(mmap.mmap):
    """An anonymous mapping that can carry references (``keep``) for as long as it lives."""

    keep: Any = None


def _shape(shape: SupportsIndex | Sequence[SupportsIndex]) -> tuple[int, ...]:
    if isinstance(shape, (bool, np.bool_)):
        raise TypeError("shape must be an int or a sequence of ints, not a bool")
    try:
        dims = (shape.__index__(),) if hasattr(shape, "__index__") else tuple(d.__index__() for d in shape)
    except (AttributeError, TypeError):
        raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimensions are not allowed: shape {dims}")
    return dims


def mapped_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[np.ndarray, _Mapping]:
    """A C-contiguous array on a new private anonymous mapping, and the mapping.

    The mapping is at least one page long (an empty array still gets its own page).
    """
    if dtype.hasobject:
        raise TypeError(f"dtype {dtype} holds Python object references, which cannot live in raw pages")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > sys.maxsize:
        raise ValueError(f"array is too big: shape {shape} of {dtype} is {nbytes} bytes")
    length = max(P, (nbytes + P - 1) // P * P)
    m = _Mapping(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
    arr = np.frombuffer(m, dtype=dtype, count=count).reshape(shape)
    return arr, m


def empty(shape: SupportsIndex | Sequence[SupportsIndex], dtype: npt.DTypeLike = float) -> np.ndarray:
    """A new array on its own page-aligned private anonymous mapping (reads as zeros).

    Like ``numpy.empty``, except that the memory is a mapping of its own (unmapped when
    the array and all its views are gone) and is never shared with another object.
    Raises ``TypeError`` for object dtypes.
    """
    arr, _ = mapped_array(_shape(shape), np.dtype(dtype))
    return arr


def zeros(shape: SupportsIndex | Sequence[SupportsIndex], dtype: npt.DTypeLike = float) -> np.ndarray:
    """``numpy.zeros`` on its own mapping; the same as :func:`empty` (fresh pages are zero)."""
    return empty(shape, dtype)


def empty_like(a: npt.ArrayLike, dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """:func:`empty` with the shape (and, unless given, the dtype) of ``a``; always C order."""
    src = np.asanyarray(a)
    return empty(src.shape, src.dtype if dtype is None else dtype)


def zeros_like(a: npt.ArrayLike, dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """:func:`zeros` with the shape (and, unless given, the dtype) of ``a``; always C order."""
    return empty_like(a, dtype)
