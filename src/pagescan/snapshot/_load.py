"""``load``: new arrays holding a generation of a checkpoint, eagerly or lazily."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import _faultserver
from .._args import seconds
from ..arrays import mapped_array
from ..handler import FaultHandler
from ._lazy import CheckpointSource, LazyGroup, LazyMap, Recording, hot_pages
from ._gil import quick_gil
from ._pages import BATCH_PAGES, P, pages_of
from ._store import Store

__all__ = ["LoadedList", "LoadedState", "load", "start_fault_server"]


class LoadedState(dict):  # type: ignore[type-arg]
    """What :func:`load` returns for a checkpoint of a mapping: a ``dict`` name -> array.

    ``generation`` is the generation loaded; ``handler`` the :class:`~pagescan.FaultHandler`
    serving a lazy load (``None`` for an eager one): ``handler.wait()`` until every
    page is in, ``handler.progress()``.
    """

    generation: int = 0
    handler: FaultHandler | None = None


class LoadedList(list):  # type: ignore[type-arg]
    """What :func:`load` returns for a checkpoint of a sequence (see :class:`LoadedState`)."""

    generation: int = 0
    handler: FaultHandler | None = None


def load(path: str | os.PathLike[str], generation: int | None = None, *, lazy: bool = False,
         prefetch: bool = True, working_set: bool = True, record: bool = False) -> LoadedState | LoadedList:
    """New arrays holding generation ``generation`` (default: the newest) of a checkpoint.

    Returns a dict name -> ``numpy.ndarray`` (stored dtype and shape) for a checkpoint
    of a mapping, a list for one of a sequence (bytes-like entries as ``uint8`` arrays).
    Each array starts on a page boundary on a mapping of its own, unmapped when the
    array is collected (like :func:`pagescan.empty`).

    ``lazy=True``: returns at once; each page arrives when first touched (or earlier,
    prefetched), served by a :class:`~pagescan.FaultHandler` process from the file
    (``result.handler``). ``prefetch=False``: no address-order prefetch (pages come on
    touch). The handler is stopped when all arrays are gone; pages it had not served
    by then raise SIGBUS when touched (as does every unserved page if the handler dies).

    Working sets (REAP): ``record=True`` records the pages this program touches, in
    first-touch order, and appends them to the file as an optional section when the
    load ends (the arrays are collected, or the interpreter exits; skipped if a writer
    holds the file). While recording, every page is served on its own first touch
    (no prefetch): slower, so it is off by default. A later lazy load of the same
    generation (``working_set=True``, the default) prefetches the recorded pages
    first, in that order, then the rest.
    """
    if not isinstance(lazy, bool):
        raise TypeError(f"lazy must be a bool, not {type(lazy).__name__}")
    path = os.fspath(path)
    if lazy:
        return _load_lazy(path, generation, prefetch, working_set, record)
    with quick_gil(), Store(path) as store:
        gen = store.generation(generation)
        gen_of, pos_of = store.latest_map(gen.number)
        arrays = []
        for i, e in enumerate(store.entries):
            arr, m = mapped_array(e.shape, e.dtype)
            arrays.append(arr)
            nch = int(store.base[i + 1] - store.base[i])
            if not nch:
                continue
            rows = np.frombuffer(m, dtype=np.uint8, count=nch * P).reshape(nch, P)
            b = int(store.base[i])
            for s in range(0, nch, BATCH_PAGES):
                t = min(nch, s + BATCH_PAGES)
                pages_of(store, gen_of, pos_of, b + s, b + t, rows[s:t], fresh=True)
        return _result(store, arrays, gen.number, None)


def start_fault_server(wait: float | None = 0.0) -> bool:
    """Start this process's fault server (once): a fresh interpreter that keeps a lazy
    load's handler process ready, so that ``load(lazy=True)`` forks nothing.

    Call it early (at the program's start): the server takes a few hundred
    milliseconds to be ready, meanwhile lazy loads fork their own handler as without
    it. ``wait``: seconds to wait for it to be ready (``None``: as long as it takes).
    Returns whether it is ready (``False`` at once from a signal handler that
    interrupted this thread's own call). A server that died is replaced by the next
    call. It exits with this process; a process forked from this one does not use it
    (it may start its own). See ``docs/howto/lazy-load.md``.
    """
    return _faultserver.start(seconds("wait", wait), preload=(__name__.rpartition(".")[0] + "._lazy",))


def _result(store: Store, arrays: list[np.ndarray], generation: int, fh: FaultHandler | None) -> LoadedState | LoadedList:
    out: LoadedState | LoadedList
    if store.mapping:
        out = LoadedState((e.name, a) for e, a in zip(store.entries, arrays))
    else:
        out = LoadedList(arrays)
    out.generation = generation
    out.handler = fh
    return out


def _load_lazy(path: str, generation: int | None, prefetch: bool, working_set: bool,
               record: bool) -> LoadedState | LoadedList:
    src = CheckpointSource(path, generation)
    try:
        store = src.store
        arrays: list[np.ndarray] = []
        maps: list[Any] = []
        regions: list[tuple[int, int]] = []
        spans: list[tuple[int, int, int]] = []
        for i, e in enumerate(store.entries):
            arr, m = mapped_array(e.shape, e.dtype)
            arrays.append(arr)
            maps.append(m)
            nch = int(store.base[i + 1] - store.base[i])
            if nch:
                regions.append((int(arr.__array_interface__["data"][0]), nch * P))
                spans.append((i, 0, nch))
        if not regions:
            src.store.close()
            return _result(store, arrays, src.generation, None)
        lazymap = LazyMap(store, spans)
        src.bind(lazymap)
        hot = hot_pages(src, lazymap, working_set and not record)  # a recording sees every touch
        recording = Recording(path, src.generation, lazymap, int(lazymap.hbase[-1])) if record else None
        fh = FaultHandler(regions, src, prefetch=prefetch, hot=hot,
                          record=None if recording is None else recording.array, fresh=True)
        # A handler from the fault server if this process has one (no fork of this one).
        fh.start(_faultserver.via((CheckpointSource.__module__, "CheckpointSource.remote"),
                                  src.remote_args(spans), [store.fd]))
    except BaseException:
        src.store.close()
        raise
    group = LazyGroup(fh, src, recording)
    for m in maps:
        m.keep = group
    return _result(store, arrays, src.generation, fh)
