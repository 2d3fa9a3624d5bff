"""Incremental checkpoints of memory regions, with eager and lazy restore.

``Checkpointer(path, regions)`` watches the regions with a :class:`~pagescan.WriteWatch`
(uffd write-protect in asynchronous mode). The first :meth:`~Checkpointer.checkpoint`
stores every page; each later one stores only the pages written since the previous
one, found and re-armed in one ``PAGEMAP_SCAN`` walk: a write racing a checkpoint lands
in this checkpoint or the next, never nowhere. Pages are copied with
``process_vm_readv`` in large batches (never by dereferencing addresses from Python),
while a second thread writes the previous batch to the file.

:func:`restore` writes a generation back bit-exactly; :func:`lazy_restore` registers
the (unpopulated) targets for missing faults and serves them from the file in a handler
process (:class:`~pagescan.FaultHandler`), so the program runs before its memory is
back. :func:`compact` folds a chain into one full generation; :func:`verify` checks
every checksum; :func:`inspect` summarises a file. The file format is described in
``docs/checkpoint-format.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from .._scan import buffer_range
from ..handler import FaultHandler
from ..writewatch import WriteWatch
from ._format import INDEX_DTYPE, KIND_DATA, KIND_ZERO, page_checksums
from ._store import CheckpointError, CorruptCheckpointError, Generation, Store, fsync_dir, link_fd, new_file
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
#: Pages per batch (4 MiB): copied out of memory, checksummed, written; restored.
BATCH_PAGES = 1024

#: ``progress(done, total)`` callbacks, in pages.
Progress = Callable[[int, int], None]


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
    if isinstance(regions, (bytes, bytearray, memoryview, mmap.mmap, np.ndarray)):
        raise TypeError("regions must be a list of (address, length) pairs or buffer objects")
    for r in regions:
        if isinstance(r, tuple):
            if len(r) != 2 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in r):
                raise TypeError(f"a region must be an (address, length) pair of ints or a buffer object, not {r!r}")
            a, n = int(r[0]), int(r[1])
            if a < 0 or n <= 0:
                raise ValueError(f"bad region ({a:#x}, {n}): the address must be >= 0 and the length > 0")
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
        path: the checkpoint file. A new file is created (atomically); an existing
            checkpoint with the same region lengths is continued (its unsealed tail,
            if any, is dropped, and the next checkpoint is full, since writes made
            before this object existed were not tracked).
        regions: ``(address, length)`` pairs (page aligned) or buffer objects (widened
            to whole pages), in this process.

    Only one writer may have a file open: the Checkpointer holds a lock (``flock``) on
    it until :meth:`close`.

    Raises:
        CheckpointError: ``path`` is not a checkpoint, its regions differ, it is in use,
            or it is damaged (:class:`CorruptCheckpointError`); nothing is changed.
        OSError: from registering the write watch (EBUSY, EINVAL, ENOMEM, ...).
    """

    def __init__(self, path: str | os.PathLike[str], regions: Sequence[Any]) -> None:
        self.regions = _normalise(regions)
        self.path = os.fspath(path)
        lengths = [n for _, n in self.regions]
        self._watches: list[WriteWatch] = []
        self._store: Store | None = None
        try:
            self._store = Store(self.path, writable=True, lock=True)
        except FileNotFoundError:
            try:
                self._store = Store.create(self.path, P, lengths)
            except FileExistsError:  # created meanwhile by someone else
                self._store = Store(self.path, writable=True, lock=True)
        store = self._store
        try:
            if store.lengths != lengths or store.page_size != P:
                raise CheckpointError(
                    f"{self.path}: regions of lengths {lengths} do not match the checkpoint's {store.lengths}"
                    + (f" (page size {store.page_size})" if store.page_size != P else "")
                )
            if store.damage is not None:
                raise store.damage
            store.truncate_unsealed()
            for a, n in self.regions:
                self._watches.append(WriteWatch(a, n))
        except BaseException:
            self.close()
            raise
        self._full_next = True
        # Pages found written (and re-armed) by a checkpoint that then failed: they go
        # into the next one.
        self._carry: list[np.ndarray] = [np.empty(0, np.uint64) for _ in self.regions]

    def close(self) -> None:
        for w in self._watches:
            w.close()
        self._watches = []
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._store is None

    @property
    def generations(self) -> int:
        """Sealed generations in the file."""
        return len(self._store.generations) if self._store is not None else 0

    def checkpoint(self, progress: Progress | None = None) -> CheckpointInfo:
        """Store the pages written since the previous checkpoint (all pages the first time).

        Returns what was stored. On failure (a full disk, ...) the file keeps its
        previous generations, the error is raised (``OSError`` with the errno), and the
        pages found written are stored by the next checkpoint.
        """
        store = self._store
        if store is None:
            raise ValueError("operation on a closed Checkpointer")
        t0 = time.perf_counter()
        full = self._full_next
        parts: list[np.ndarray] = []
        for r, ((a, n), w) in enumerate(zip(self.regions, self._watches)):
            if full:
                w.reset()  # arm first, then copy: a racing write is also in the next checkpoint
                pages = np.arange(n // P, dtype=np.uint64)
            else:
                got = (w.get(reset=True) - np.uint64(a)) // np.uint64(P)
                pages = np.union1d(got, self._carry[r]) if len(self._carry[r]) else got
                self._carry[r] = pages  # remembered until stored
            parts.append(pages)
        info = self._store_pages(store, parts, full, progress, t0)
        self._carry = [np.empty(0, np.uint64) for _ in self.regions]
        self._full_next = False
        return info

    def _store_pages(self, store: Store, parts: list[np.ndarray], full: bool, progress: Progress | None,
                     t0: float) -> CheckpointInfo:
        total = sum(len(p) for p in parts)
        index = np.zeros(total, dtype=INDEX_DTYPE)
        addrs = np.empty(total, dtype=np.uint64)
        k = 0
        for r, ((a, _n), pages) in enumerate(zip(self.regions, parts)):
            index["region"][k : k + len(pages)] = r
            index["page"][k : k + len(pages)] = pages
            addrs[k : k + len(pages)] = pages * np.uint64(P) + np.uint64(a)
            k += len(pages)
        parent = 0 if full else store.generations[-1].number
        pid = os.getpid()
        nbatch = (total + BATCH_PAGES - 1) // BATCH_PAGES

        def process(rows: np.ndarray, s: int, e: int) -> None:
            """Checksums, zero pages, write: for the batch of index entries [s, e) in ``rows``."""
            cks = page_checksums(rows)
            nonzero = cks != 0
            maybe_zero = np.flatnonzero(~nonzero)
            if maybe_zero.size:
                nonzero[maybe_zero] = rows[maybe_zero].any(axis=1)
            index["kind"][s:e] = np.where(nonzero, KIND_DATA, KIND_ZERO)
            index["checksum"][s:e] = cks
            ndata = int(np.count_nonzero(nonzero))
            if ndata:
                app.write(rows if ndata == e - s else rows[nonzero], app.reserve(ndata))

        with store.appending(total) as app, contextlib.ExitStack() as stack:
            # This thread copies batch k+1 out of memory while a worker checksums and
            # writes batch k (batches are processed in order: data stays in index order).
            pool = stack.enter_context(ThreadPoolExecutor(1, "pagescan-ckpt")) if nbatch > 1 else None
            nbuf = min(nbatch, 3)
            bufs = [np.empty((min(total, BATCH_PAGES), P), dtype=np.uint8) for _ in range(max(nbuf, 1))]
            pending: list[Future[None]] = []
            for b, s in enumerate(range(0, total, BATCH_PAGES)):
                e = min(total, s + BATCH_PAGES)
                if b >= nbuf:
                    pending[b - nbuf].result()  # its buffer is free again (raises a write error early)
                rows = bufs[b % nbuf][: e - s]
                starts, lengths = _runs(addrs[s:e])
                read_runs(pid, starts, lengths, rows)
                if pool is not None:
                    pending.append(pool.submit(process, rows, s, e))
                else:
                    process(rows, s, e)
                if progress is not None:
                    progress(e, total)
            for f in pending:
                f.result()
            app.seal(index, parent)
        gen = store.generations[-1]
        return CheckpointInfo(
            generation=gen.number, full=full, pages=total, zero_pages=total - app.ndata,
            bytes=app.ndata * P, seconds=time.perf_counter() - t0,
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
        raise CheckpointError(
            f"{store.path}: {len(lengths)} region(s) of lengths {lengths} do not match the checkpoint's "
            f"{len(store.lengths)} region(s) of lengths {store.lengths}"
        )
    if store.page_size != P:
        raise CheckpointError(f"{store.path}: page size {store.page_size} is not this machine's {P}")


def _pages_of(store: Store, gen_of: np.ndarray, pos_of: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """Contents of the global pages ``[lo, hi)`` (verified) into ``out`` (``(hi-lo, P)``)."""
    gens = gen_of[lo:hi]
    pos = pos_of[lo:hi]
    first, last = int(gens[0]), int(gens[-1])
    if first == last and (gens == first).all():  # one generation holds them all (a full one, say)
        if first == 0:
            out[:] = 0
        else:
            store.read_pages(store.generations[first - 1], pos, out=out)
        return
    for g in np.unique(gens).tolist():
        sel = np.flatnonzero(gens == g)
        if g == 0:
            out[sel] = 0  # never stored: zeros
        else:
            out[sel] = store.read_pages(store.generations[g - 1], pos[sel])


def restore(
    path: str | os.PathLike[str], regions: Sequence[Any], generation: int | None = None, *,
    pid: int | None = None, progress: Progress | None = None,
) -> int:
    """Write generation ``generation`` (default: the newest sealed one) into ``regions``.

    ``regions`` must have the checkpoint's lengths, in its order. Pages are restored in
    batches of 4 MiB, each checksum-verified before it is written: a damaged page
    raises :class:`CorruptCheckpointError` (naming generation and page) before its
    batch is written, though earlier batches are in place by then. With ``pid``, the
    regions are ``(address, length)`` pairs in that process (``process_vm_writev``).
    Returns the generation restored.
    """
    regs = _normalise(regions)
    target = os.getpid() if pid is None else pid
    with Store(path) as store:
        _check_regions(store, regs)
        gen = store.generation(generation)
        gen_of, pos_of = store.latest_map(gen.number)
        total = store.total_pages
        buf = np.empty((min(total, BATCH_PAGES), P), dtype=np.uint8)
        done = 0
        for r, (a, n) in enumerate(regs):
            npages = n // P
            base = int(store.base[r])
            for s in range(0, npages, BATCH_PAGES):
                e = min(npages, s + BATCH_PAGES)
                rows = buf[: e - s]
                _pages_of(store, gen_of, pos_of, base + s, base + e, rows)
                write_runs(target, np.array([a + s * P], np.uint64), np.array([(e - s) * P], np.uint64), rows)
                done += e - s
                if progress is not None:
                    progress(done, total)
        return gen.number


class _CheckpointSource:
    """A :class:`~pagescan.handler.Source` reading (and verifying) pages of one generation."""

    def __init__(self, path: str, generation: int | None) -> None:
        self.store = Store(path)
        try:
            self.generation = self.store.generation(generation).number
            self.gen_of, self.pos_of = self.store.latest_map(self.generation)
        except BaseException:
            self.store.close()
            raise

    def read(self, offset: int, out: memoryview) -> bool:
        P_ = self.store.page_size
        first = offset // P_
        n = len(out) // P_
        if not self.gen_of[first : first + n].any():
            return False  # never stored: zero pages
        rows = np.frombuffer(out, dtype=np.uint8).reshape(n, P_)
        _pages_of(self.store, self.gen_of, self.pos_of, first, first + n, rows)
        return True


@contextmanager
def lazy_restore(
    path: str | os.PathLike[str], regions: Sequence[Any], generation: int | None = None, *, prefetch: bool = True
) -> Iterator[FaultHandler]:
    """Restore lazily: pages arrive on first touch, served from the file by a handler process.

    The regions must be unpopulated (``FileExistsError`` otherwise) private anonymous
    or shmem memory of this process. Yields the :class:`~pagescan.FaultHandler`
    (``progress()``, ``wait()``); with ``prefetch`` the handler copies pages ahead while
    no fault waits (the window grows from 64 KiB to 4 MiB, and shrinks back on a fault).
    When every page is in, the handler unregisters the ranges and exits. Leaving the
    block stops the handler: pages not served by then raise SIGBUS when touched --
    call ``wait()`` first. If the handler dies, touching a page not yet restored
    raises SIGBUS (never wrong data, never a hang); a damaged page is not served
    either (the handler stops, and the same applies).
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


def compact(path: str | os.PathLike[str], generation: int | None = None, *, progress: Progress | None = None) -> int:
    """Fold the chain up to ``generation`` (default: the newest) into one full generation.

    The result is a file holding a single generation (numbered 1) with every page of
    that generation's memory (zero pages as such); generations after ``generation``
    are dropped. Pages are verified while they are copied. The new file is written
    beside ``path`` and renamed over it (atomic: a crash leaves the old file). Refused
    while a Checkpointer has the file open. Returns the number of pages.
    """
    path = os.fspath(path)
    with Store(path, writable=True, lock=True) as store:
        gen = store.generation(generation)
        gen_of, pos_of = store.latest_map(gen.number)
        total = store.total_pages
        index = np.zeros(total, dtype=INDEX_DTYPE)
        region = np.repeat(np.arange(len(store.lengths)), np.diff(store.base))
        index["region"] = region
        index["page"] = np.arange(total) - store.base[region]
        fd, named_tmp = new_file(path, store.page_size, store.lengths)
        tmp_name = named_tmp or f"{path}.compact-{os.getpid()}"
        linked = named_tmp is not None
        try:
            with Store(tmp_name, writable=True, _fd=fd) as out:
                with out.appending(total) as app:
                    buf = np.empty((min(total, BATCH_PAGES), store.page_size), dtype=np.uint8)
                    for s in range(0, total, BATCH_PAGES):
                        e = min(total, s + BATCH_PAGES)
                        rows = buf[: e - s]
                        _pages_of(store, gen_of, pos_of, s, e, rows)
                        cks = page_checksums(rows)
                        nz = rows.any(axis=1)
                        index["kind"][s:e] = np.where(nz, KIND_DATA, KIND_ZERO)
                        index["checksum"][s:e] = cks
                        if nz.any():
                            app.write(rows[nz], app.reserve(int(nz.sum())))
                        if progress is not None:
                            progress(e, total)
                    app.seal(index, 0)
                if not linked:
                    link_fd(fd, None, tmp_name)
                    linked = True
                os.replace(tmp_name, path)
                linked = False
                fsync_dir(path)
        except BaseException:
            if linked:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
            raise
    return total


def verify(path: str | os.PathLike[str], *, progress: Progress | None = None) -> list[Generation]:
    """Check every sealed generation's index and page checksums; return them.

    Raises :class:`CorruptCheckpointError` naming the first damaged generation and page.
    An unsealed tail is not an error (see :func:`inspect`).
    """
    with Store(path) as store:
        total = sum(g.pages for g in store.generations)
        done = 0
        buf = np.empty((min(max(total, 1), BATCH_PAGES), store.page_size), dtype=np.uint8)
        for g in store.generations:
            for s in range(0, g.pages, BATCH_PAGES):
                e = min(g.pages, s + BATCH_PAGES)
                store.read_pages(g, np.arange(s, e), out=buf[: e - s])
                done += e - s
                if progress is not None:
                    progress(done, total)
        if store.damage is not None:
            raise store.damage
        return list(store.generations)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of a checkpoint file (indexes are checked; page data is not read)."""
    with Store(path) as store:
        return {
            "path": store.path,
            "page_size": store.page_size,
            "regions": store.lengths,
            "file_size": store.file_size,
            "sealed_bytes": store.sealed_end,
            "unsealed_tail_bytes": store.file_size - store.sealed_end if store.damage is None else 0,
            "damage": None if store.damage is None else str(store.damage),
            "generations": [
                {
                    "generation": g.number,
                    "parent": g.parent,
                    "full": g.parent == 0,
                    "pages": g.pages,
                    "data_pages": g.data_pages,
                    "zero_pages": g.pages - g.data_pages,
                    "offset": g.offset,
                    "bytes": g.end - g.offset,
                }
                for g in store.generations
            ],
        }
