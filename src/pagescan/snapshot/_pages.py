"""Chunks of a generation out of a checkpoint file: shared by restore, load and the lazy source."""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np

from ._store import Store

__all__ = ["BATCH_PAGES", "P", "Progress", "check_progress", "pages_of"]

P = mmap.PAGESIZE
#: Chunks per batch (4 MiB): copied out of memory, checksummed, written; restored.
BATCH_PAGES = 1024

#: ``progress(done, total)`` callbacks, in pages (chunks).
Progress = Callable[[int, int], None]


def check_progress(progress: object) -> None:
    """``TypeError`` unless ``progress`` is a callable or ``None`` (checked up front: a
    call would otherwise fail on it only after its first batch)."""
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable or None, not {type(progress).__name__}")


def pages_of(store: Store, gen_of: np.ndarray, pos_of: np.ndarray, lo: int, hi: int, out: np.ndarray,
              fresh: bool = False) -> None:
    """Contents of the global chunks ``[lo, hi)`` (verified) into ``out`` (``(hi-lo, P)``).

    ``fresh``: ``out`` is known to read as zeros (a new mapping): zero chunks are not
    written (their pages stay unallocated).
    """
    gens = gen_of[lo:hi]
    pos = pos_of[lo:hi]
    if not gens.size:
        return
    first, last = int(gens[0]), int(gens[-1])
    if first == last and (gens == first).all():  # one generation holds them all (a full one, say)
        if first == 0:
            if not fresh:
                out[:] = 0
        else:
            store.read_pages(store.generations[first - 1], pos, out=out, fresh=fresh)
        return
    for g in np.unique(gens).tolist():
        sel = np.flatnonzero(gens == g)
        if g == 0:
            if not fresh:
                out[sel] = 0  # never stored: zeros
        else:
            out[sel] = store.read_pages(store.generations[g - 1], pos[sel])
