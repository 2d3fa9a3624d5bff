"""``restore`` and ``lazy_restore``: a generation of a checkpoint into existing objects."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .._held import held_still
from .._uapi.libc import write_runs
from ..handler import FaultHandler
from ._lazy import CheckpointSource, LazyMap, Recording, drop, hot_pages, probe_missing, refuse_private_files
from ._gil import quick_gil
from ._pages import BATCH_PAGES, P, Progress, check_progress, pages_of
from ._state import Target, chunk_runs, match, targets
from ._store import Generation, Store

__all__ = ["lazy_restore", "restore"]


def _pid_arg(pid: Any) -> int:
    if pid is None:
        return os.getpid()
    if isinstance(pid, bool) or not isinstance(pid, (int, np.integer)):
        raise TypeError(f"pid must be an int or None, not {type(pid).__name__}")
    if pid <= 0:
        raise ValueError(f"pid must be > 0, not {pid}")
    return int(pid)


def _open_for_targets(path: str | os.PathLike[str], state: Any, generation: int | None, *,
                      exact_pairs: bool = False, lazy_index: bool = False) -> tuple[Store, list[Target], Generation]:
    mapping, ts = targets(state, writable=True, exact_pairs=exact_pairs)
    store = Store(path, lazy_index=lazy_index)
    try:
        ordered = match(store, mapping, ts)
        gen = store.generation(generation)
    except BaseException:
        store.close()
        _release(ts)
        raise
    return store, ordered, gen


def _release(ts: list[Target]) -> None:
    for t in ts:
        t.release()


def _restore_chunks(store: Store, gen_of: np.ndarray, pos_of: np.ndarray, ts: list[Target], pid: int,
                    progress: Progress | None) -> None:
    base = store.base
    total = int(base[-1])
    buf = np.empty((min(total, BATCH_PAGES), P), dtype=np.uint8)
    for s in range(0, total, BATCH_PAGES):
        e = min(total, s + BATCH_PAGES)
        rows = buf[: e - s]
        pages_of(store, gen_of, pos_of, s, e, rows)
        chunks = np.arange(s, e, dtype=np.int64)
        starts, lengths, offs = chunk_runs(chunks, ts, base)
        write_runs(pid, starts, lengths, rows, offs)
        if progress is not None:
            progress(e, total)
            _refuse_moved(ts)  # the callback ran code: every target must still be where it was


def _refuse_moved(ts: list[Target]) -> None:
    """``ValueError`` if an array target's data has moved (``ndarray.__setstate__`` gives
    an array new memory and frees the old, buffer exports or not): the next writes
    would land in freed memory."""
    for t in ts:
        if t.moved():
            raise ValueError(f"{t.label}: the array was given new memory during the restore "
                             "(ndarray.__setstate__?); the restore stopped before writing into the old")


def restore(
    path: str | os.PathLike[str], state: Any, generation: int | None = None, *,
    pid: int | None = None, progress: Progress | None = None,
) -> int:
    """Write generation ``generation`` (default: the newest sealed one) into the objects of ``state``.

    ``state`` has the checkpoint's form: a mapping with the same names (any order), or
    a sequence in the same order; every entry the same size (and, for arrays, dtype
    and shape) -- checked before anything is written. Exactly each object's bytes are
    written (``process_vm_writev``), nothing around them. Data is restored in batches
    of 4 MiB, each checksum-verified before it is written: a damaged page raises
    :class:`CorruptCheckpointError` (naming generation and page) before its batch is
    written, though earlier batches are in place by then. With ``pid``, the entries are
    ``(address, length)`` pairs in that process, exact bytes at any alignment (as
    ``pagescan restore`` takes them): each ``length`` is its entry's size. Without
    ``pid``, a pair is whole pages (``length`` rounded up), as a state of pairs is
    checkpointed. Returns the generation restored.
    """
    return _restore(path, state, generation, pid, progress, exact_pairs=pid is not None)


def _restore(path: str | os.PathLike[str], state: Any, generation: int | None, pid: Any,
             progress: Progress | None, *, exact_pairs: bool) -> int:
    """:func:`restore`; ``exact_pairs``: ``(address, length)`` pairs are exact bytes, any alignment (the CLI)."""
    check_progress(progress)  # before a byte is written
    with quick_gil():
        return _restore_quickly(path, state, generation, pid, progress, exact_pairs)


def _restore_quickly(path: str | os.PathLike[str], state: Any, generation: int | None, pid: Any,
                     progress: Progress | None, exact_pairs: bool) -> int:
    target = _pid_arg(pid)
    store, ts, gen = _open_for_targets(path, state, generation, exact_pairs=exact_pairs)
    if pid is not None and target != os.getpid() and any(t.keep is not None for t in ts):
        store.close()
        _release(ts)
        raise TypeError("with pid, the entries must be (address, length) pairs in that process, not buffer objects")
    try:
        gen_of, pos_of = store.latest_map(gen.number)
        _restore_chunks(store, gen_of, pos_of, ts, target, progress)
        return gen.number
    finally:
        store.close()
        _release(ts)


def _restore_bytes(src: CheckpointSource, t: Target, entry: int, skip: int, length: int, pid: int) -> None:
    """Write bytes ``[skip, skip+length)`` of entry ``entry`` to ``t.addr + skip``."""
    if length <= 0:
        return
    base = int(src.store.base[entry])
    c0 = base + skip // P
    c1 = base + (skip + length + P - 1) // P
    rows = np.zeros((c1 - c0, P), dtype=np.uint8)
    src.read_range(c0, c1, rows, fresh=True)
    flat = rows.reshape(-1)
    sh = skip % P
    write_runs(pid, np.array([t.addr + skip], np.uint64), np.array([length], np.uint64), flat,
               np.array([sh], np.uint64))


@contextmanager
def lazy_restore(
    path: str | os.PathLike[str], state: Any, generation: int | None = None, *, prefetch: bool = True,
    working_set: bool = True, record: bool = False,
) -> Iterator[FaultHandler]:
    """Restore into the objects of ``state`` lazily: pages arrive on first touch.

    ``state`` as for :func:`restore` (private anonymous memory, or shared memory
    (shmem) mapped ``MAP_SHARED``, of this process; refused with ``ValueError``: a
    ``MAP_PRIVATE`` mapping of a memfd or tmpfs file, whose file's pages would show
    through, and hugetlb memory, whose faults are resolved a huge page at a time --
    use :func:`restore` there). The pages that lie entirely inside an object are dropped
    (``MADV_DONTNEED``; ``MADV_REMOVE`` for shared memory) and served from the file on
    first touch by a handler process; the bytes of an object on pages it shares with
    other objects (the first and last page of a small array on the malloc heap) are
    restored eagerly, before this returns -- the neighbours' bytes are not touched.
    Do not touch the objects from another thread while this starts (a page
    repopulated between drop and registration is refused: ``FileExistsError``), and
    keep them alive and in place until the block ends: the handler serves the
    addresses it was given, so an object freed (or given new memory by
    ``ndarray.__setstate__``) inside the block has the checkpoint's bytes served into
    memory it no longer owns, when malloc hands that memory out again.

    Yields the :class:`~pagescan.FaultHandler` (``progress()``, ``wait()``); with
    ``prefetch`` the handler copies pages ahead while no fault waits; a recorded
    working set is prefetched first, and ``record`` records one (every first touch
    served alone, no prefetch; see :func:`load`): when the block ends the recording is
    saved and the handler prefetches the rest.

    The block's end waits until the handler has brought every page in (without
    ``prefetch``, the pages nobody touched are read then: :meth:`FaultHandler.fetch_rest`),
    also when the block ends by an exception, and raises ``RuntimeError`` (on a normal
    end) if the handler failed first. If the handler dies, touching a page not yet
    restored raises SIGBUS (never wrong data, never a hang); a damaged page is not
    served either. Such a page stays so while it is mapped: for a target on the malloc
    heap, also after the target is freed, when malloc hands that memory out again --
    lazy targets are safest on pages of their own (:func:`pagescan.zeros`).
    """
    # The index blocks are read (and verified) when first used, as by a lazy load:
    # reading the whole index at the start cost 25 ms per GiB of state.
    store, ts, gen = _open_for_targets(path, state, generation, lazy_index=True)
    try:
        src = CheckpointSource(os.fspath(path), gen.number, _store=store)
    except BaseException:
        store.close()
        _release(ts)
        raise
    try:
        regions: list[tuple[int, int]] = []
        spans: list[tuple[int, int, int]] = []
        eager: list[tuple[Target, int, int, int]] = []  # target, entry, skip, length
        for i, t in enumerate(ts):
            if not t.nbytes:
                continue
            lo = (t.addr + P - 1) // P * P
            hi = (t.addr + t.nbytes) // P * P
            if hi > lo:
                regions.append((lo, hi - lo))
                spans.append((i, lo - t.addr, (hi - lo) // P))
                eager.append((t, i, 0, lo - t.addr))
                eager.append((t, i, hi - t.addr, t.addr + t.nbytes - hi))
            else:
                eager.append((t, i, 0, t.nbytes))
        with contextlib.ExitStack() as serving:
            # From the first registration (the probe's) until the handler process serves:
            # a signal handler or finalizer of this thread that touched a registered page
            # would wait for a server only this thread can start. They run once it serves.
            with held_still():
                probe_missing(regions)
                refuse_private_files(regions)
                me = os.getpid()
                for t, i, skip, length in eager:
                    _restore_bytes(src, t, i, skip, length, me)
                for a, n in regions:
                    drop(a, n)
                lazymap = LazyMap(src.store, spans)
                src.bind(lazymap)
                hot = hot_pages(src, lazymap, working_set and not record)  # a recording sees every touch
                recording = (Recording(os.fspath(path), src.generation, lazymap, int(lazymap.hbase[-1]))
                             if record else None)
                fh = serving.enter_context(FaultHandler(regions, src, prefetch=prefetch, hot=hot,
                                                        record=None if recording is None else recording.array))
            try:
                yield fh
                if recording is not None:
                    recording.save()
            except BaseException:
                # Leaving by an exception: the pages still come in (unless the handler
                # failed), so that none is left poisoned -- a target on the malloc heap
                # outlives the restore as memory malloc hands out again.
                with contextlib.suppress(Exception):
                    fh.fetch_rest()
                    fh.wait()
                raise
            fh.fetch_rest()  # (without prefetch: read now)
            if not fh.wait():
                raise RuntimeError(
                    f"lazy restore from {os.fspath(path)}: the fault handler failed (exit status "
                    f"{fh.exit_status}) before every page was in; pages not served raise SIGBUS")
    finally:
        src.store.close()
        _release(ts)
