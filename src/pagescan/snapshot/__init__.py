"""Incremental checkpoints of memory regions, with eager and lazy restore.

``Checkpointer(path, regions)`` watches the regions with a :class:`~pagescan.WriteWatch`
(uffd write-protect in asynchronous mode). The first :meth:`~Checkpointer.checkpoint`
stores every page; each later one stores only the pages written since the previous
one, found and re-armed in one ``PAGEMAP_SCAN`` walk: a write racing a checkpoint lands
in this checkpoint or the next, never nowhere. Pages are copied with
``process_vm_readv`` in large batches (never by dereferencing addresses from Python).

:func:`restore` writes a generation back bit-exactly; :func:`lazy_restore` registers
the (unpopulated) targets for missing faults and serves them from the file in a handler
process (:class:`~pagescan.FaultHandler`), so the program runs before its memory is
back. :func:`compact` folds a chain into one full generation; :func:`verify` checks
every checksum. The file format is described in ``docs/checkpoint-format.md``.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .._scan import buffer_range
from ..handler import FaultHandler
from ..writewatch import WriteWatch
from ._format import INDEX_DTYPE, KIND_DATA, KIND_ZERO, page_checksums
from ._store import CheckpointError, CorruptCheckpointError, Generation, Store
from ._vm import read_runs, write_runs

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Checkpointer",
    "CorruptCheckpointError",
    "compact",
    "inspect",
    "lazy_restore",
    "restore",
    "verify",
]

P = mmap.PAGESIZE
#: Pages copied per batch (16 MiB).
BATCH_PAGES = 4096


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What one checkpoint did."""

    generation: int
    full: bool
    pages: int  # pages stored (data + zero)
    zero_pages: int
    bytes: int  # page data bytes written
    seconds: float


def _normalise(regions: Sequence[Any]) -> list[tuple[int, int]]:
    out = []
    for r in regions:
        if isinstance(r, tuple) and len(r) == 2 and all(isinstance(x, int) for x in r):
            a, n = r
            if a < 0 or n <= 0:
                raise ValueError(f"bad region {r!r}")
            if a % P:
                raise ValueError(f"region address {a:#x} is not page aligned")
            out.append((a, (n + P - 1) // P * P))
        else:
            lo, hi = buffer_range(r)
            out.append((lo, hi - lo))
    if not out:
        raise ValueError("no regions given")
    return out


class Checkpointer:
    """Incremental checkpoints of ``regions`` into the file ``path``.

    Args:
        path: the checkpoint file. A new file is created; an existing checkpoint with
            the same region lengths is continued (its next checkpoint is full, since
            writes made before this object existed were not tracked).
        regions: ``(address, length)`` pairs (page aligned) or buffer objects (widened
            to whole pages).

    Raises:
        CheckpointError: ``path`` exists and is not a checkpoint, or its regions differ.
        OSError: from registering the write watch (EBUSY, EINVAL, ...).
    """

    def __init__(self, path: str | os.PathLike[str], regions: Sequence[Any]) -> None:
        self.regions = _normalise(regions)
        self.path = os.fspath(path)
        lengths = [n for _, n in self.regions]
        if os.path.exists(self.path):
            self._store = Store(self.path, writable=True)
            if self._store.lengths != lengths or self._store.page_size != P:
                self._store.close()
                raise CheckpointError(f"{self.path}: regions {lengths} do not match the checkpoint's {self._store.lengths}")
            self._store.truncate_unsealed()
        else:
            self._store = Store.create(self.path, P, lengths)
        self._watches: list[WriteWatch] = []
        try:
            for a, n in self.regions:
                self._watches.append(WriteWatch(a, n))
        except BaseException:
            self.close()
            raise
        self._full_next = True

    def close(self) -> None:
        for w in self._watches:
            w.close()
        self._watches = []
        self._store.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def generations(self) -> int:
        return len(self._store.generations)

    def checkpoint(self) -> CheckpointInfo:
        """Store the pages written since the previous checkpoint (all pages the first time)."""
        t0 = time.perf_counter()
        full = self._full_next
        idx_parts: list[np.ndarray] = []
        addr_parts: list[np.ndarray] = []
        for r, ((a, n), w) in enumerate(zip(self.regions, self._watches)):
            if full:
                w.reset()  # arm first, then copy: a racing write is also in the next checkpoint
                pages = np.arange(n // P, dtype=np.uint64)
            else:
                pages = (w.get(reset=True) - np.uint64(a)) // np.uint64(P)
            ent = np.zeros(len(pages), dtype=INDEX_DTYPE)
            ent["region"] = r
            ent["page"] = pages
            idx_parts.append(ent)
            addr_parts.append(pages * np.uint64(P) + np.uint64(a))
        index = np.concatenate(idx_parts)
        addrs = np.concatenate(addr_parts)
        data_chunks: list[np.ndarray] = []
        pid = os.getpid()
        for s in range(0, len(index), BATCH_PAGES):
            e = min(len(index), s + BATCH_PAGES)
            buf = np.empty((e - s, P), dtype=np.uint8)
            starts, lengths = _runs(addrs[s:e])
            read_runs(pid, starts, lengths, buf)
            nonzero = buf.any(axis=1)
            index["kind"][s:e] = np.where(nonzero, KIND_DATA, KIND_ZERO)
            index["checksum"][s:e] = page_checksums(buf)
            data_chunks.append(buf[nonzero])
        data = np.concatenate(data_chunks) if data_chunks else np.empty((0, P), np.uint8)
        parent = 0 if full else (self._store.generations[-1].number if self._store.generations else 0)
        gen = self._store.append(index, data, parent)
        self._full_next = False
        return CheckpointInfo(
            generation=gen.number, full=full, pages=len(index), zero_pages=int((index["kind"] == KIND_ZERO).sum()),
            bytes=len(data) * P, seconds=time.perf_counter() - t0,
        )


def _runs(addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coalesce ascending page addresses into (start, length) runs."""
    if not len(addrs):
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    cuts = np.flatnonzero(np.diff(addrs) != np.uint64(P)) + 1
    first = np.concatenate([[0], cuts])
    last = np.concatenate([cuts, [len(addrs)]])
    return addrs[first], (last - first).astype(np.uint64) * np.uint64(P)


def _check_regions(store: Store, regions: list[tuple[int, int]]) -> None:
    lengths = [n for _, n in regions]
    if lengths != store.lengths:
        raise CheckpointError(f"{store.path}: regions of lengths {lengths} do not match the checkpoint's {store.lengths}")


def _pages_of(store: Store, gen_of: np.ndarray, pos_of: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Contents of the global pages ``flat`` (verified), as an (n, P) array."""
    out = np.zeros((len(flat), store.page_size), dtype=np.uint8)
    gens = gen_of[flat]
    for g in np.unique(gens).tolist():
        if g == 0:
            continue  # never stored: zeros
        sel = np.flatnonzero(gens == g)
        out[sel] = store.read_pages(store.generations[g - 1], pos_of[flat[sel]])
    return out


def restore(
    path: str | os.PathLike[str], regions: Sequence[Any], generation: int | None = None, *, pid: int | None = None
) -> int:
    """Write generation ``generation`` (default: the newest sealed one) into ``regions``.

    ``regions`` must have the checkpoint's lengths, in its order. Every page is
    checksum-verified before anything is written. Returns the generation restored.
    With ``pid``, the regions are addresses in that process (``process_vm_writev``).
    """
    regs = _normalise(regions)
    target = os.getpid() if pid is None else pid
    with Store(path) as store:
        _check_regions(store, regs)
        gen = store.generation(generation)
        gen_of, pos_of = store.latest_map(gen.number)
        base = 0
        for a, n in regs:
            npages = n // P
            for s in range(0, npages, BATCH_PAGES):
                e = min(npages, s + BATCH_PAGES)
                flat = np.arange(base + s, base + e)
                data = _pages_of(store, gen_of, pos_of, flat)
                write_runs(target, np.array([a + s * P], np.uint64), np.array([(e - s) * P], np.uint64), data)
            base += npages
        return gen.number


class _CheckpointSource:
    """A :class:`~pagescan.handler.Source` reading pages of one generation."""

    def __init__(self, path: str, generation: int | None) -> None:
        self.store = Store(path)
        self.gen_of, self.pos_of = self.store.latest_map(generation)

    def read(self, offset: int, out: memoryview) -> bool:
        P_ = self.store.page_size
        first = offset // P_
        n = len(out) // P_
        flat = np.arange(first, first + n)
        if not self.gen_of[flat].any():
            return False
        data = _pages_of(self.store, self.gen_of, self.pos_of, flat)
        np.frombuffer(out, dtype=np.uint8)[:] = data.reshape(-1)
        return True


@contextmanager
def lazy_restore(
    path: str | os.PathLike[str], regions: Sequence[Any], generation: int | None = None, *, prefetch: bool = True
) -> Iterator[FaultHandler]:
    """Restore lazily: pages arrive on first touch, served from the file by a handler process.

    The regions must be unpopulated (``FileExistsError`` otherwise) private anonymous
    or shmem memory. Yields the :class:`~pagescan.FaultHandler` (``progress()``,
    ``wait()``). If the handler dies, touching a page not yet restored raises SIGBUS
    (never wrong data, never a hang); a damaged page is not served either (the
    handler stops and the same applies).
    """
    regs = _normalise(regions)
    src = _CheckpointSource(os.fspath(path), generation)
    try:
        _check_regions(src.store, regs)
        fh = FaultHandler(regs, src, prefetch=prefetch)
        with fh:
            yield fh
    finally:
        src.store.close()


def compact(path: str | os.PathLike[str], generation: int | None = None) -> int:
    """Fold the chain up to ``generation`` (default: newest) into one full generation.

    Writes a new file next to ``path`` and renames it over ``path`` (atomic). Returns
    the number of pages in the folded generation.
    """
    path = os.fspath(path)
    tmp = f"{path}.compact-{os.getpid()}"
    with Store(path) as store:
        gen = store.generation(generation)
        gen_of, pos_of = store.latest_map(gen.number)
        total = len(gen_of)
        base = np.concatenate([[0], np.cumsum([n // store.page_size for n in store.lengths])])
        index = np.zeros(total, dtype=INDEX_DTYPE)
        region = np.repeat(np.arange(len(store.lengths)), np.diff(base))
        index["region"] = region
        index["page"] = np.arange(total) - base[region]
        chunks = []
        for s in range(0, total, BATCH_PAGES):
            e = min(total, s + BATCH_PAGES)
            data = _pages_of(store, gen_of, pos_of, np.arange(s, e))
            nz = data.any(axis=1)
            index["kind"][s:e] = np.where(nz, KIND_DATA, KIND_ZERO)
            index["checksum"][s:e] = page_checksums(data)
            chunks.append(data[nz])
        try:
            with Store.create(tmp, store.page_size, store.lengths) as out:
                out.append(index, np.concatenate(chunks) if chunks else np.empty((0, store.page_size), np.uint8), 0)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return total


def verify(path: str | os.PathLike[str]) -> list[Generation]:
    """Check every sealed generation's index and page checksums; return them.

    Raises :class:`CorruptCheckpointError` naming the first damaged generation and page.
    """
    with Store(path) as store:
        for g in store.generations:
            for s in range(0, g.pages, BATCH_PAGES):
                store.read_pages(g, np.arange(s, min(g.pages, s + BATCH_PAGES)))
        return list(store.generations)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of a checkpoint file (no page data is read)."""
    with Store(path) as store:
        return {
            "path": store.path,
            "page_size": store.page_size,
            "regions": store.lengths,
            "file_size": store.file_size,
            "sealed_bytes": store.sealed_end,
            "unsealed_tail_bytes": store.file_size - store.sealed_end,
            "generations": [
                {
                    "generation": g.number,
                    "full": g.parent == 0,
                    "pages": g.pages,
                    "data_pages": g.data_pages,
                    "zero_pages": g.pages - g.data_pages,
                    "bytes": g.end - g.offset,
                }
                for g in store.generations
            ],
        }
