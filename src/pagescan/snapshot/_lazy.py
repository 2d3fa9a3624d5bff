"""The lazy side of restore and load: the handler's page map, the source that serves
chunks from a checkpoint (verified), working-set records."""

from __future__ import annotations

import contextlib
import mmap
import os
import weakref
from typing import Any

import numpy as np

from .._procfs import read_maps
from .._uapi import libc
from .._uapi.mman import MADV
from .._uapi.userfaultfd import RegisterMode
from ..handler import FaultHandler, servable
from ..userfaultfd import Userfaultfd
from ._format import SECTION_WORKING_SET
from ._pages import P
from ._store import CheckpointError, CorruptCheckpointError, Section, Store

__all__ = ["CheckpointSource", "LazyGroup", "LazyMap", "Recording", "drop", "hot_pages", "probe_missing"]


class LazyGroup:
    """Keeps a lazy load's handler and source alive while any of its arrays lives."""

    def __init__(self, fh: FaultHandler, src: CheckpointSource, recording: Recording | None) -> None:
        self.finalizer = weakref.finalize(self, _end_lazy, fh, src, recording)


def _end_lazy(fh: FaultHandler, src: CheckpointSource, recording: Recording | None) -> None:
    fh.close()
    src.store.close()
    if recording is not None:
        recording.save()


class LazyMap:
    """Pages of the handler's regions <-> the file's global chunks.

    Handler region ``i`` is the page-aligned span ``[lo_i, lo_i + npages_i * P)`` of entry
    ``entry_i``, starting ``skip_i`` bytes into the entry; its pages are numbered from
    ``hbase_i`` in the handler's page space.
    """

    def __init__(self, store: Store, spans: list[tuple[int, int, int]]) -> None:
        # spans: (entry, skip bytes, npages)
        self.entry = np.array([s[0] for s in spans], dtype=np.int64)
        self.skip = np.array([s[1] for s in spans], dtype=np.int64)
        npages = np.array([s[2] for s in spans], dtype=np.int64)
        self.hbase = np.concatenate([[0], np.cumsum(npages)]).astype(np.int64)
        self.cbase = store.base

    def to_chunks(self, hpages: np.ndarray) -> np.ndarray:
        """The chunk holding the first byte of each handler page."""
        r = np.searchsorted(self.hbase, hpages, side="right") - 1
        byte = self.skip[r] + (hpages - self.hbase[r]) * P
        out: np.ndarray = self.cbase[self.entry[r]] + byte // P
        return out

    def from_chunks(self, chunks: np.ndarray) -> np.ndarray:
        """The handler pages that start in each chunk (chunks outside the lazy spans dropped)."""
        ent = np.searchsorted(self.cbase, chunks, side="right") - 1
        region_of = np.full(len(self.cbase) - 1, -1, dtype=np.int64)  # entry -> its lazy region
        region_of[self.entry] = np.arange(len(self.entry))
        r = region_of[ent]
        keep = r >= 0
        chunks, ent, r = chunks[keep], ent[keep], r[keep]
        byte = (chunks - self.cbase[ent]) * P - self.skip[r]
        page = -(-byte // P)  # the first page starting at or after the chunk's start
        ok = (page >= 0) & (page < self.hbase[r + 1] - self.hbase[r])
        hp: np.ndarray = (self.hbase[r] + page)[ok]
        _, first = np.unique(hp, return_index=True)
        return hp[np.sort(first)]  # keep the recorded order, without repeats


class CheckpointSource:
    """A :class:`~pagescan.handler.Source` reading (and verifying) the chunks of one generation.

    Serves the handler's regions (see :class:`LazyMap`); a span that does not start on
    a chunk boundary is assembled from the two chunks it straddles.
    """

    thread_safe = True  # reads at explicit offsets; the index block cache is a dict

    def __init__(self, path: str, generation: int | None, _store: Store | None = None) -> None:
        # Index blocks are read (and verified) when a fault first needs them: opening
        # costs the same whatever the size of the state.
        self.store = Store(path, lazy_index=True) if _store is None else _store
        try:
            self.generation = self.store.generation(generation).number
        except BaseException:
            self.store.close()
            raise
        self.map: LazyMap | None = None
        self.hbyte = np.zeros(1, np.int64)

    def remote_args(self, spans: list[tuple[int, int, int]]) -> tuple[Any, ...]:
        """What :meth:`remote` needs (picklable), besides the checkpoint's fd: the
        generation, the spans of :class:`LazyMap`, and the store as parsed here (its
        index blocks are read when used: nothing to send for them)."""
        state = {k: v for k, v in vars(self.store).items() if k not in ("fd", "_offsets", "_blocks")}
        return self.generation, spans, state

    @classmethod
    def remote(cls, fds: list[int], generation: int, spans: list[tuple[int, int, int]],
               state: dict[str, Any]) -> CheckpointSource:
        """The same source rebuilt in a fault server's handler, from :meth:`remote_args`
        and the checkpoint's fd (``fds[0]``, passed with SCM_RIGHTS: the file the owner
        opened, even if its path was replaced since). The file is not parsed again
        (that took 0.7-0.9 ms in the handler, while the first fault waited)."""
        store = Store.__new__(Store)
        vars(store).update(state, fd=fds[0], _offsets={}, _blocks={})
        src = cls(store.path, generation, _store=store)
        src.bind(LazyMap(store, spans))
        return src

    def bind(self, lazymap: LazyMap) -> None:
        self.map = lazymap
        self.hbyte = lazymap.hbase * P

    def warm(self) -> None:
        """Read (and verify) the first chunk served, into scratch memory: the handler
        calls this while no fault waits, so that the first fault does not pay for the
        first pass through the read path (and the first index block) in a new process."""
        m = self.map
        if m is not None and len(m.entry):
            c0 = int(m.cbase[int(m.entry[0])]) + int(m.skip[0]) // P
            self.read_range(c0, c0 + 1, np.zeros((1, P), np.uint8), fresh=True)

    def read_range(self, c0: int, c1: int, out: np.ndarray, fresh: bool = False) -> bool:
        """Chunks ``[c0, c1)`` into the rows of ``out`` (verified); ``False``: all zeros, nothing written."""
        return self.store.read_chunks(self.generation, np.arange(c0, c1, dtype=np.int64), out, fresh)

    def read(self, offset: int, out: memoryview) -> bool:
        m = self.map
        assert m is not None
        r = int(np.searchsorted(self.hbyte, offset, side="right")) - 1
        ent = int(m.entry[r])
        byte = int(m.skip[r]) + offset - int(self.hbyte[r])
        c0 = int(m.cbase[ent]) + byte // P
        shift = byte % P
        n = (shift + len(out) + P - 1) // P
        if not shift:
            rows = np.frombuffer(out, dtype=np.uint8).reshape(len(out) // P, P)
            return self.read_range(c0, c0 + n, rows)
        tmp = np.empty((n, P), dtype=np.uint8)
        if not self.read_range(c0, c0 + n, tmp):
            return False  # zero pages
        np.frombuffer(out, dtype=np.uint8)[:] = tmp.reshape(-1)[shift : shift + len(out)]
        return True

    def read_many(self, offsets: np.ndarray, rows: np.ndarray) -> None:
        """The pages at handler ``offsets`` (scattered) into ``rows``, verified, in a few reads."""
        m = self.map
        assert m is not None
        r = np.searchsorted(self.hbyte, offsets, side="right") - 1
        byte = m.skip[r] + offsets - self.hbyte[r]
        if bool((byte % P).any()):  # pages straddling chunks (an unaligned target): one by one
            for j, off in enumerate(offsets.tolist()):
                if not self.read(int(off), rows[j].data.cast("B")):
                    rows[j] = 0
            return
        chunks = m.cbase[m.entry[r]] + byte // P
        order = np.argsort(chunks, kind="stable")
        if bool((order == np.arange(len(order))).all()):
            if not self.store.read_chunks(self.generation, chunks, rows):
                rows[: len(chunks)] = 0
            return
        tmp = np.zeros((len(chunks), P), np.uint8)
        self.store.read_chunks(self.generation, chunks[order], tmp, fresh=True)
        rows[order] = tmp


def read_working_set(store: Store, sec: Section) -> np.ndarray:
    """The first-touch chunks of a working-set section, checked (``CorruptCheckpointError``)."""
    raw = store.read_section(sec, limit=8 * store.total_pages)  # each chunk at most once
    if len(raw) % 8:
        raise CorruptCheckpointError(f"{store.path}: working-set section is damaged (length {len(raw)})")
    chunks = np.frombuffer(raw, dtype="<u8")
    if chunks.size and int(chunks.max()) >= store.total_pages:
        raise CorruptCheckpointError(f"{store.path}: working-set section names chunks outside the entries")
    return chunks.astype(np.int64)


def _working_set(store: Store, generation: int) -> np.ndarray | None:
    """The newest first-touch chunks recorded for ``generation`` (``None`` if none)."""
    for sec in reversed(store.sections):
        if sec.type == SECTION_WORKING_SET and sec.generation == generation:
            return read_working_set(store, sec)
    return None


class Recording:
    """A first-touch record shared with the handler (``MAP_SHARED``), saved as a section when done."""

    def __init__(self, path: str, generation: int, lazymap: LazyMap, total: int) -> None:
        self.path, self.generation, self.lazymap = path, generation, lazymap
        self.mm = mmap.mmap(-1, 8 * (total + 2), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self.mm, dtype=np.uint64)
        #: The process recording: a forked child shares the record (``MAP_SHARED``) but is
        #: not the one recorded, and must neither end the recording nor save it.
        self.owner = os.getpid()

    def stop(self) -> None:
        """End the recording: the handler serves the rest as a normal lazy restore (with prefetch)."""
        if self.array.size and os.getpid() == self.owner:
            self.array[-1] = 1

    def save(self) -> None:
        """Append the record to the file (best effort: skipped if a writer holds it or it
        changed, and in a forked child of the recording process)."""
        if os.getpid() != self.owner:
            return
        self.stop()
        arr, self.array = self.array, np.empty(0, np.uint64)
        if not arr.size:
            return
        n = int(arr[0])
        hpages = arr[1 : n + 1].astype(np.int64)
        del arr  # the mapping goes with the last reference (the handler object may hold one)
        if not n:
            return
        try:
            store = Store(self.path, writable=True, lock=True)
        except (CheckpointError, OSError):
            return
        with store:
            if store.damage is not None or len(store.generations) < self.generation or store.version < 3:
                return  # (a version 2 file holds no sections: left as it is)
            chunks = self.lazymap.to_chunks(hpages)
            with contextlib.suppress(OSError):
                store.append_section(SECTION_WORKING_SET, self.generation, chunks.astype("<u8").tobytes())


def hot_pages(src: CheckpointSource, lazymap: LazyMap, use: bool) -> np.ndarray | None:
    """The handler pages to prefetch first: the newest working set recorded for the generation."""
    if not use:
        return None
    try:
        chunks = _working_set(src.store, src.generation)
    except CorruptCheckpointError:
        return None  # a damaged record only costs speed
    return None if chunks is None else lazymap.from_chunks(chunks)


def probe_missing(regions: list[tuple[int, int]]) -> None:
    """Register (and unregister) the ranges for MISSING faults: refuse memory that cannot
    take them, and hugetlb memory, which the handler does not serve (``InvalidArgumentError``)."""
    if not regions:
        return
    with Userfaultfd(0) as uf:
        for a, n in regions:
            servable(uf.register(a, n, RegisterMode.MISSING), a, n, "lazy restore (use restore())")
        for a, n in regions:
            uf.unregister(a, n)


def refuse_private_files(regions: list[tuple[int, int]]) -> None:
    """Refuse (``ValueError``) a private mapping of a shared-memory file (a memfd or
    tmpfs file mapped ``MAP_PRIVATE``) among the ranges: the kernel takes MISSING
    faults there, but after the pages are dropped a touch maps the file's own page
    from its page cache, raising no fault: the file's bytes, not the checkpoint's,
    with nothing to tell. (Private anonymous memory and shared memory are served.)"""
    if not regions:
        return
    lo = min(a for a, _ in regions)
    hi = max(a + n for a, n in regions)
    vmas = read_maps(os.getpid(), lo, hi)
    for a, n in regions:
        for v in vmas:
            if (v.start < a + n and a < v.end and not v.shared and not v.anonymous
                    and not v.name.startswith("/anon_hugepage")):
                raise ValueError(
                    f"lazy restore into {a:#x}-{a + n:#x}: {v.start:#x}-{v.end:#x} is a private mapping of "
                    f"the file {v.name or '(unnamed)'}; a touched page would read the file's bytes, not the "
                    "checkpoint's: use restore(), or map the file MAP_SHARED")


def drop(a: int, n: int) -> None:
    """Discard the pages (shared memory: punch a hole, ``MADV_REMOVE``; private: ``MADV_DONTNEED``)."""
    try:
        libc.madvise(a, n, MADV.REMOVE)
    except OSError:
        libc.madvise(a, n, MADV.DONTNEED)
