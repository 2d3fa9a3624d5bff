"""Incremental checkpoints of Python state (dicts of numpy arrays), eager and lazy restore.

``Checkpointer(path, state)`` takes a ``Mapping[str, buffer]`` -- the main case, a
dict of numpy arrays -- or a sequence of buffers (or page-aligned ``(address,
length)`` pairs). The file records, per entry, its name, exact byte length and, for
arrays, dtype and shape (``docs/checkpoint-format.md``). Writes are tracked per page
by :class:`~pagescan.WriteWatch` (uffd write-protect in asynchronous mode) over the
union of the pages that cover the entries, so objects that share pages (small arrays
on the malloc heap) work together; objects that share *bytes* are refused. The first
:meth:`~Checkpointer.checkpoint` stores every entry; each later one stores only the
chunks of entries that intersect a page written since the previous one, found and
re-armed in one ``PAGEMAP_SCAN`` walk (a write racing a checkpoint lands in this one
or the next, never nowhere).

Every generation is the memory of one instant, even while other threads write (with
or without the GIL). The instant is taken in a short pause inside
:meth:`~Checkpointer.checkpoint`. An incremental checkpoint asks a helper process
(:mod:`._precopy`) to copy the written pages into a staging area in pre-copy rounds
while the program runs, then to stop every other thread with ptrace (:mod:`._freeze`)
for a last walk and copy: that stop is the instant. A full checkpoint, or one whose
helper the kernel may not let trace us, forks instead: the child, a *frozen twin*
that runs nothing of the program (its after-fork hooks apart), keeps the memory as it was at the ``fork``
(copy-on-write), and the chunks are read from it through ``/proc/PID/mem`` (never by
dereferencing addresses from Python). ``checkpoint(wait=False)`` returns a
:class:`PendingCheckpoint` (a ``concurrent.futures.Future``) right after the pause and
does the rest in a background thread. A process with a single thread, checkpointing
synchronously, copies its own memory directly (no other thread can write meanwhile).
See ``docs/background-checkpoints.md``.

:func:`restore` writes exactly each target's bytes and nothing around them
(``process_vm_writev``); :func:`load` returns new arrays (page-aligned, each on its own
mapping), eagerly or lazily; :func:`lazy_restore` refills existing objects on first
touch, served from the file by a handler process (:class:`~pagescan.FaultHandler`).
A lazy load records which pages were touched first, in order, as an optional section
of the file; the next lazy load of that generation prefetches them first.
:func:`compact` folds a chain into one full generation; :func:`verify` checks every
checksum; :func:`inspect` summarises a file.

Page-owning arrays (:func:`pagescan.empty`, :func:`pagescan.zeros`) are the cheapest
state to track: no neighbour's writes are reported, and a lazy restore can serve all
of their pages.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import functools
import os
import time
from collections.abc import Callable
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Literal, overload

import numpy as np

from .._held import HeldSignals as _HeldSignals
from .._held import no_gc as _no_gc
from ..capabilities import capabilities
from ..writewatch import WriteWatch
from ._gil import quick_gil as _quick_gil
from ._format import INDEX_DTYPE, KIND_DATA, KIND_ZERO, SECTION_WORKING_SET, VERSION, page_checksums
from ._lazy import read_working_set
from ._load import LoadedList, LoadedState, load, start_fault_server
from ._pages import BATCH_PAGES, P, Progress, check_progress, pages_of
from ._restoring import _restore as _restore  # the CLI restores (address, length) pairs exactly
from ._restoring import lazy_restore, restore
from ._state import Target, chunk_runs, match, merged_page_runs, metas, pages_to_chunks, targets, zero_padding
from ._precopy import KEEP, Precopier, Refused
from ._twin import FrozenTwin, ProcMem
from ._store import Appender, CheckpointError, CorruptCheckpointError, EmptyFileError, Generation, Store, fsync_dir, link_fd, new_file
from .._uapi import libc
from .._uapi.libc import read_runs
from .._procfs import mem_available, read_smaps

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Checkpointer",
    "CorruptCheckpointError",
    "EmptyFileError",
    "LoadedList",
    "LoadedState",
    "PendingCheckpoint",
    "SYNC_STAGING_SHARE",
    "compact",
    "inspect",
    "lazy_restore",
    "load",
    "start_fault_server",
    "restore",
    "verify",
]

#: ``read(starts, lengths, out, offsets)``: copy runs of memory into rows of ``out``.
Reader = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def _read_self(starts: np.ndarray, lengths: np.ndarray, out: np.ndarray, offsets: np.ndarray) -> None:
    read_runs(os.getpid(), starts, lengths, out, offsets)


def _single_thread() -> bool:
    """Whether this process has one thread (this one)."""
    return len(os.listdir("/proc/self/task")) == 1


@functools.cache
def _fast_path_exact() -> bool:
    """Whether the kernel's ``WRITTEN``-only fast path reports what the masked walk does,
    guard pages apart: an emptied slot reads ``WRITTEN`` on both (the 2026 fix;
    ``docs/kernel-facts.md``). Probed once per process (a few milliseconds)."""
    return bool(capabilities().scan_generation.get("written_unpopulated_pte"))


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What one checkpoint did."""

    generation: int
    full: bool
    pages: int  # chunks stored (data + zero)
    zero_pages: int
    bytes: int  # data bytes written (whole chunks)
    seconds: float  # from the call to the seal
    pause: float = 0.0  # seconds the call took to return (``wait=False``) or to take its instant
    #: How the instant was taken: ``"ptrace"`` (pre-copy, then every thread stopped by a
    #: helper process), ``"fork"`` (a frozen twin) or ``"direct"`` (the only thread).
    method: str = ""


class PendingCheckpoint(Future[CheckpointInfo]):
    """A checkpoint running in the background: a :class:`concurrent.futures.Future`.

    ``done()``, ``result(timeout)`` (the :class:`CheckpointInfo`, or the error raised),
    ``exception()``, ``add_done_callback()``. It stays *pending* (``running()`` is
    false) while the chunks are copied and written, so ``cancel()`` works until the
    generation is being sealed: the file then keeps its previous generation, and the
    chunks found written go into the next checkpoint. ``generation`` is the number the
    generation gets if it is sealed.
    """

    def __init__(self, generation: int) -> None:
        super().__init__()
        self.generation = generation


#: One ptrace instant at a time in this process: two helpers seizing the same threads
#: would refuse each other (EPERM).
_instant_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A child forked while a checkpoint ran in another thread: the instant lock that
    thread may hold is not the child's to wait for (the held signal handlers are put
    back by :mod:`pagescan._held`)."""
    global _instant_lock
    _instant_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


#: First guesses, in seconds per page, of the cost of the fork path (a walk and a
#: ``fork()``, per resident page of the process: page tables) and of the ptrace path
#: (per written page its helper finds: its copies, walks and stop included); each
#: Checkpointer refines them from what it measures.
FORK_COST = 0.2e-6
#: A synchronous checkpoint takes the ptrace path while the pages written are at most
#: this share of the state, and of the memory the kernel counts available (its staging
#: area holds them all until they are written).
SYNC_STAGING_SHARE = 0.25
COPY_COST = 2e-6


def _sync_staging_budget(state_pages: int, available: int | None) -> int:
    """Pages a synchronous checkpoint may stage on the ptrace path: at most
    :data:`SYNC_STAGING_SHARE` of the state and of ``available`` bytes (``MemAvailable``;
    ``None``: unknown, not bounded), and never less than what the helper keeps anyway
    (:data:`~._precopy.KEEP`)."""
    budget = int(state_pages * SYNC_STAGING_SHARE)
    if available is not None:
        budget = min(budget, int(available * SYNC_STAGING_SHARE) // P)
    return max(budget, KEEP // P)


def _resident_pages() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1])


def _bases(ts: list[Target]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([t.chunks for t in ts], dtype=np.int64)]).astype(np.int64)


def _in_shared_mapping(runs: list[tuple[int, int]]) -> tuple[bool, list[tuple[int, int]]]:
    """``(unfrozen, aliased)`` for the sorted, disjoint page ``runs``.

    ``unfrozen``: some run lies in memory that a forked child does not hold as it was
    at the ``fork``: a shared (``MAP_SHARED``) VMA, one marked ``MADV_DONTFORK`` (``dc``
    in VmFlags: not mapped in the child) or ``MADV_WIPEONFORK`` (``wf``: zeros in the
    child), or a private file mapping (the pages not yet copied on write are the file's
    page cache, in the child too). ``aliased``: the parts of the runs in VMAs that are
    not private anonymous memory (shared memory, a memfd, any file mapping, private
    too), which another mapping, another process or ``write(2)`` can change without a
    fault in our page tables, so write tracking never sees it. One read of smaps, up to the last run: the kernel walks the page tables of
    every VMA below it (about 10 ms per GiB populated with 4 KiB pages here; once, when
    the Checkpointer is made)."""
    unfrozen = False
    aliased: list[tuple[int, int]] = []
    if not runs:
        return unfrozen, aliased
    starts = [lo for lo, _ in runs]
    for v in read_smaps(os.getpid(), runs[0][0], runs[-1][1], fields=()):
        i = bisect.bisect_left(starts, v.end) - 1  # the last run starting below the VMA's end
        if i < 0 or runs[i][1] <= v.start:
            continue
        if v.shared or "dc" in v.vmflags or "wf" in v.vmflags or not v.anonymous:
            unfrozen = True
        if not v.anonymous:
            j = bisect.bisect_right(starts, v.start) - 1  # the run holding the VMA's start, or the one before
            for lo, hi in runs[max(j, 0) : i + 1]:
                if hi > v.start and lo < v.end:
                    aliased.append((max(lo, v.start), min(hi, v.end)))
    return unfrozen, aliased


class Checkpointer:
    """Incremental checkpoints of ``state`` into the file ``path``.

    Args:
        path: the checkpoint file. A new file is created (atomically); an existing
            empty file (``tempfile.mkstemp``) is started in place; an existing
            checkpoint of the same entries (names, sizes, dtypes, shapes) is continued
            (its unsealed tail, if any, is dropped, and the next checkpoint is full,
            since writes made before this object existed were not tracked).
        state: a ``Mapping[str, buffer]`` (a dict of numpy arrays, say), or a sequence
            of buffer objects or page-aligned ``(address, length)`` pairs (whole pages,
            as in pagescan 0.1). Arrays must be C-contiguous; entries must not share
            bytes (they may share pages). The objects are referenced (and their
            buffers exported, so a ``bytearray`` cannot be resized) until :meth:`close`.

    Only one writer may have a file open: the Checkpointer holds a lock (``flock``) on
    it until :meth:`close`.

    Generations after the first hold the pages written since the previous one, as the
    kernel's write tracking of this process's page tables reports them -- except in
    state that is not private anonymous memory (shared memory, a memfd, a file
    mapping), which other mappings, processes or ``write(2)`` can change unseen: its
    pages are in every generation.

    Raises:
        TypeError, ValueError: a bad state (naming the entry), before anything else.
        CheckpointError: ``path`` is not a checkpoint, its entries differ, it is in
            use, it is damaged (:class:`CorruptCheckpointError`), or it is a version 2
            or 3 (an earlier pagescan) file, which is read but not continued; nothing is changed.
        OSError: from registering the write watch (EBUSY, EINVAL, ENOMEM, ...).
    """

    def __init__(self, path: str | os.PathLike[str], state: Any) -> None:
        self.mapping, self.targets = targets(state, writable=False)
        self.path = os.fspath(path)
        self._base = _bases(self.targets)
        self._watches: list[WriteWatch] = []
        self._store: Store | None = None
        self._lock = threading.Lock()  # one checkpoint starts at a time
        self._pid = os.getpid()  # a forked child inherits a copy: see _forked()
        #: Thread id -> the call ("checkpoint()", "close()") it is inside, from before
        #: it takes the lock until after it released it: a signal handler or finalizer
        #: of that thread run anywhere in between is refused, never left waiting.
        self._calls: dict[int, str] = {}
        self._thread: threading.Thread | None = None  # the checkpoint in flight
        self._pending: PendingCheckpoint | None = None
        self._closing = False  # close() has begun
        # The helper process of the ptrace path (started by the first checkpoint that is
        # not taken alone). ``_use_ptrace``: ``None`` picks per checkpoint (the cheaper
        # by the costs measured so far), ``True`` always ptrace, ``False`` always fork.
        self._pre: Precopier | None = None
        self._use_ptrace: bool | None = None
        self._shared = False  # the state lies in memory fork() does not freeze (set below)
        self._aliased: list[tuple[int, int]] = []  # page runs written unseen by other mappings (below)
        self._aliased_chunks = np.empty(0, np.int64)
        # ``wait=False`` on the fork path: fork first, find the written chunks after
        # (:meth:`_run`); ``False``: find them, then fork, as ``wait=True`` does (benchmarks).
        self._fork_first = True
        # Seconds per page: a fork per resident page, the ptrace path per page it copies.
        self._cost = {"fork": FORK_COST, "copy": COPY_COST}
        self._found_last = 0  # chunks the last incremental checkpoint found written
        #: The helper's figures for the last ptrace instant (rounds, stop seconds, ...).
        self.last_instant: dict[str, Any] = {}
        meta = metas(self.targets)
        try:
            self._store = Store(self.path, writable=True, lock=True)
        except EmptyFileError:  # made empty beforehand (tempfile.mkstemp, touch): start here
            self._store = Store.create_in_empty(self.path, P, self.mapping, meta)
        except FileNotFoundError:
            try:
                self._store = Store.create(self.path, P, self.mapping, meta)
            except FileExistsError:  # created meanwhile by someone else
                self._store = Store(self.path, writable=True, lock=True)
        store = self._store
        try:
            if store.version != VERSION:
                raise CheckpointError(f"{self.path} is a version {store.version} checkpoint (an earlier pagescan): it can be "
                                      "restored, loaded and compacted, not continued; compact it or start a new file")
            # The file's entry order (a mapping given with its keys in another order).
            self.targets = match(store, self.mapping, self.targets)
            self._base = _bases(self.targets)
            if store.damage is not None:
                raise store.damage
            store.truncate_unsealed()
            runs = merged_page_runs(self.targets)
            for lo, hi in runs:
                self._watches.append(WriteWatch(lo, hi - lo))
            # State in a MAP_SHARED mapping is not copied on write by fork() (nor is one
            # under MADV_DONTFORK or MADV_WIPEONFORK copied at all): only the
            # ptrace stop (or a checkpoint taken alone) freezes it.
            self._shared, aliased = _in_shared_mapping(runs)
            self._aliased = aliased
            #: Chunks on those pages: in every generation (found written or not).
            self._aliased_chunks = self._runs_to_chunks(np.array(aliased, dtype=np.int64).reshape(-1, 2))
            if self._shared:
                self._use_ptrace = True
        except BaseException:
            self.close()
            raise
        self._full_next = True
        # Chunks found written (and re-armed) by a checkpoint that then failed: they go
        # into the next one.
        self._carry = np.empty(0, np.int64)
        # (pages, carry before them) found on the fast path, until read (_find_written).
        self._unfiltered: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def regions(self) -> list[tuple[int, int]]:
        """``(address, length)`` of each entry's exact bytes."""
        return [(t.addr, t.nbytes) for t in self.targets]

    def close(self, cancel: bool = False) -> None:
        """Wait for a checkpoint in flight (``cancel=True``: abandon it, leaving the file
        at its previous sealed generation unless it is already sealing), then stop
        tracking and close the file. Its error, if any, stays in its future.

        From another thread while :meth:`checkpoint` runs: waits for that call to return
        (``cancel=True`` cancels its checkpoint too: a ``checkpoint(wait=True)`` then raises
        ``concurrent.futures.CancelledError``); a ``checkpoint()`` that starts once
        ``close()`` has begun raises ``ValueError`` (closed).

        In a process forked from the one that made it, only closes the child's copies
        of the file and of the tracking (the parent's are left alone), without waiting
        for anything."""
        if self._forked():
            self._closing = True
            self._thread = None  # the parent's: not ours to wait for
            self._close()
            return
        self._not_reentrant("close()")
        me = threading.get_ident()
        self._calls[me] = "close()"  # (it may wait for the checkpoint in flight)
        try:
            callback = threading.current_thread() is self._thread
            if callback:  # from the background thread: never waits (raises RuntimeError instead)
                self._acquire("close()")
            self._closing = True  # no checkpoint starts from now on
            if cancel and self._pending is not None:
                self._pending.cancel()
            if not callback:
                self._acquire("close()")  # a checkpoint() running in another thread ends first
            try:
                self._close()
            finally:
                self._lock.release()
        finally:
            self._calls.pop(me, None)

    def _close(self) -> None:
        self._join()
        if self._pre is not None:
            self._pre.close()
            self._pre = None
        for w in self._watches:
            w.close()
        self._watches = []
        if self._store is not None:
            self._store.close()
            self._store = None
        for t in getattr(self, "targets", []):
            t.release()

    def _join(self) -> None:
        """Wait until no checkpoint is in flight (its twin is reaped, its file work done)."""
        th = self._thread
        if th is not None and th is not threading.current_thread():
            th.join()
            self._thread = None

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

    @overload
    def checkpoint(self, progress: Progress | None = None, *, wait: Literal[True] = True) -> CheckpointInfo: ...

    @overload
    def checkpoint(self, progress: Progress | None = None, *, wait: Literal[False]) -> PendingCheckpoint: ...

    @overload
    def checkpoint(self, progress: Progress | None = None, *,
                   wait: bool) -> CheckpointInfo | PendingCheckpoint: ...

    def checkpoint(self, progress: Progress | None = None, *, wait: bool = True) -> CheckpointInfo | PendingCheckpoint:
        """Store the memory of this instant: the chunks written since the previous
        checkpoint (all of them the first time).

        The *instant* is taken in a short pause inside this call
        (``CheckpointInfo.method`` says how):

        * ``"ptrace"`` (incremental, other threads exist or ``wait=False``): a helper
          process copies the written pages into a staging area in pre-copy rounds
          while the other threads run, then stops them all with ptrace, copies what
          they wrote since the last round and lets them go: the stop is the instant.
          This thread waits with every signal blocked (delivered when it returns).
          In the main thread, Python signal handlers that come due during the call
          are held back until the pause is over (:class:`_HeldSignals`).
          The other threads stall for the stop only; the pause grows with the bytes
          written since the previous checkpoint.
        * ``"fork"`` (a full checkpoint; or the kernel refused to let the helper trace
          us: a debugger attached, Yama): the written chunks are found and re-armed
          (:meth:`_find_written`), then the process is forked; the child (a frozen
          twin, :mod:`pagescan.snapshot._twin`) holds the memory as it was at the
          ``fork``. With ``wait=False`` an incremental checkpoint forks first and
          finds the chunks after, in the background (:meth:`_run`): the pause is
          the ``fork`` alone. The pause grows with the populated memory (page tables).
        * ``"direct"``: this is the process's only thread and no ``progress`` callback
          is given: nothing else can write during a synchronous checkpoint, it copies
          from this process directly (signals blocked).

        The chunks are then checksummed, written, ``fsync``'d and sealed
        (:meth:`_write`). So every generation is the memory of one instant, even while
        other threads write (with or without the GIL): state spanning pages is never
        torn. A write racing the pause is in this generation or the next, never lost.
        During the pause the interpreter's GIL switch interval is 0.1 ms (restored
        before returning), so that a thread busy under the GIL does not delay it, and
        the cyclic garbage collector is paused for the call (a finalizer it ran would
        write from the one thread the instant does not stop).
        The pause is ``CheckpointInfo.pause``.

        ``wait=True`` (default): returns the :class:`CheckpointInfo` when sealed.
        ``wait=False``: returns a :class:`PendingCheckpoint` (a ``Future``) right after
        the pause; the copy and write go on in a background thread, which also calls
        ``progress(done, total)`` (chunks). At most one checkpoint is in flight: the
        next call (and :meth:`close`) first waits for it.

        On failure (a full disk, the twin killed, ...) the file keeps its previous
        generations, the error is raised (from ``result()`` with ``wait=False``;
        ``OSError`` with the errno), and the chunks found written are stored by the
        next checkpoint. The helper dying while it takes the instant raises
        ``ProcessLookupError`` from this call (the threads it stopped run on); what it
        had re-armed is unknown, so the next checkpoint is full. :meth:`close` with
        ``cancel=True`` from another thread cancels a running ``wait=True`` call: it raises
        ``concurrent.futures.CancelledError`` (the file keeps its previous generations).
        """
        check_progress(progress)
        if not isinstance(wait, bool):
            raise TypeError(f"wait must be a bool, not {type(wait).__name__}")
        if self._forked():
            raise RuntimeError(f"this Checkpointer belongs to pid {self._pid}; a forked child does not inherit "
                               "its write tracking: checkpoint only from the parent")
        self._not_reentrant("checkpoint()")
        held: list[_HeldSignals] = []
        me = threading.get_ident()
        self._calls[me] = "checkpoint()"
        try:
            # No collection inside the call: a finalizer run by this thread would write
            # memory from the one thread the instant does not stop (the "direct" copy,
            # the ptrace stop) and could tear the generation.
            with _no_gc():
                self._acquire("checkpoint()")
                try:
                    return self._checkpoint(progress, wait, held)
                finally:
                    self._lock.release()
        finally:
            self._calls.pop(me, None)
            for h in held:
                h.release()  # Python handlers due meanwhile run now

    def _forked(self) -> bool:
        """In a child forked from the process that made us: our lock may have been held
        by one of the parent's threads at the ``fork`` (it stays held here, for good)."""
        return os.getpid() != self._pid

    def _acquire(self, what: str) -> None:
        """Take the lock of :meth:`checkpoint` and :meth:`close` (one runs at a time)."""
        if threading.current_thread() is self._thread:
            # The background thread of the checkpoint in flight: its ``progress``, or a done
            # callback (run by ``set_result``), while a caller may hold the lock waiting for
            # this very thread to end.
            if self._pending is not None and not self._pending.done():
                raise RuntimeError(f"{what} called from the progress callback of the checkpoint in flight")
            if not self._lock.acquire(blocking=False):
                raise RuntimeError(f"{what} called from a done callback while another call waits for the "
                                   "checkpoint in flight (it would wait for this thread, for good)")
        else:
            self._lock.acquire()

    def _not_reentrant(self, what: str) -> None:
        """Refuse a call made inside this thread's :meth:`checkpoint` or :meth:`close` (a
        signal handler, a finalizer): it would wait for the lock this thread holds, for
        good, or close the file under the outer call."""
        inside = self._calls.get(threading.get_ident())
        if inside is not None:
            raise RuntimeError(f"{what} called inside {inside} of the same thread (from a signal handler "
                               "or a finalizer?)")

    def _checkpoint(self, progress: Progress | None, wait: bool,
                    held: list[_HeldSignals]) -> CheckpointInfo | PendingCheckpoint:
        store = self._store
        if store is None or self._closing:
            raise ValueError("operation on a closed Checkpointer")
        self._join()
        if store.damage is not None:
            raise store.damage
        for target in self.targets:
            if target.moved():  # the memory tracked and read is no longer the array's
                raise ValueError(f"{target.label}: the array was given new memory since this Checkpointer was made "
                                 "(ndarray.__setstate__?): its writes are not tracked; make a new Checkpointer")
        held.append(_HeldSignals())  # until the pause ends (the copy, for "direct")
        t0 = time.perf_counter()
        quick = contextlib.ExitStack()  # the GIL comes back fast until we return
        quick.enter_context(_quick_gil())
        try:
            full = self._full_next
            fut = PendingCheckpoint(len(store.generations) + 1)
            self._pending = fut  # (wait=True too: close(cancel=True) from another thread cancels it)
            alone = wait and progress is None and _single_thread()
            pre = (None if (full and not self._shared) or alone or self._use_ptrace is False
                   else self._precopier())
            twin = None
            if pre is not None:
                if full:  # (shared state) every page, copied in the stop: armed first
                    self._carry = self._find_written(True)
                chunks = self._instant_ptrace(pre, fut, wait)
                if chunks is None:
                    pre = None  # refused: fork instead
            if pre is None and self._shared and not alone:
                self._pending = None
                raise CheckpointError(
                    f"{self.path}: generation {fut.generation} was not taken: the state lies in a shared "
                    "mapping (MAP_SHARED; or a file mapping, or under MADV_DONTFORK or MADV_WIPEONFORK), which "
                    "fork() does not freeze, and the ptrace stop of the other "
                    "threads was refused; checkpoint with wait=True while this is the only thread, or keep "
                    "the state in private memory (pagescan.zeros, numpy arrays)")
            if pre is None:
                t = time.perf_counter()
                if wait or full or alone or not self._fork_first:
                    chunks = self._find_written(full, fast=alone)  # the instant: re-armed, then frozen
                else:
                    chunks = None  # frozen first; found and re-armed in the background (_run)
                if not alone:
                    try:
                        twin = FrozenTwin()
                    except OSError as err:  # (what was found and re-armed is carried to the next)
                        self._pending = None
                        raise OSError(err.errno, f"{err.strerror}; generation {fut.generation} was not written, "
                                      f"{self.path} is unchanged") from err
                    self._learn("fork", time.perf_counter() - t, _resident_pages())
                if not alone and self._use_ptrace is not False and self._pre is None:
                    self._precopier()  # started now, ready for the next checkpoint
            method = "ptrace" if pre is not None else "direct" if alone else "fork"
            pause = time.perf_counter() - t0
            if wait:
                quick.close()
                if not alone:
                    try:
                        held[0].release()  # the instant is taken: handlers due meanwhile run now
                    except BaseException:
                        if twin is not None:  # abandoned: the chunks found are carried to the next
                            twin.close()
                        if pre is not None:
                            pre.release()
                        raise
                self._run(fut, store, chunks, full, progress, t0, pause, twin, pre, method)
                return fut.result()
            th = threading.Thread(target=self._run,
                                  args=(fut, store, chunks, full, progress, t0, pause, twin, pre, method),
                                  name="pagescan-checkpoint")
            self._thread = th  # before start: its progress and done callbacks check it
            try:
                th.start()
            except BaseException as err:
                self._thread = None
                if twin is not None:
                    twin.close()
                if pre is not None:
                    pre.release()
                fut.set_exception(err)
                self._pending = None
                raise
            return fut
        finally:
            quick.close()

    def _precopier(self) -> Precopier | None:
        """The helper process of the ptrace path (started on first use); ``None`` once
        the kernel refused to let it trace us, while it is still starting (unless
        ptrace is forced), or when the helper was found dead (a new one is started for
        the next checkpoint: nothing was lost, its last reply came)."""
        if self._pre is not None and self._pre.child.wait(0) is not None:
            self._pre.close()
            self._pre = None
            self._precopier()
            return None
        if self._pre is None:
            runs = merged_page_runs(self.targets)
            if not len(runs):  # nothing to track (every entry is empty): the fork path is free
                return None
            try:
                self._pre = Precopier(runs, neighbors=any(t.addr % P for t in self.targets if t.nbytes),
                                      aliased=self._aliased)
            except OSError:
                self._use_ptrace = False
                return None
        if self._pre.refused is not None:
            return None
        try:
            if self._use_ptrace is None and not self._pre.ready():
                return None  # still starting: fork this time rather than wait for it
        except OSError:  # it died while starting (nothing was asked of it): a new one next time
            self._pre.close()
            self._pre = None
            return None
        return self._pre

    def _instant_ptrace(self, pre: Precopier, fut: PendingCheckpoint, wait: bool = False) -> np.ndarray | None:
        """Take the instant with the helper (:mod:`._precopy`): the chunks to store, now
        held by its staging area; ``None`` if the kernel refused the stop (the chunks its
        rounds found are carried to the fork path)."""
        extra = np.empty((0, 2), np.int64)
        if self._carry.size:
            starts, lengths, _ = chunk_runs(self._carry, self.targets, self._base)
            s = starts.astype(np.int64)
            extra = np.stack([s // P * P, (s + lengths.astype(np.int64) + P - 1) // P * P], axis=1)
        if self._use_ptrace is None and self._over_budget(wait):
            return None
        try:
            with _instant_lock:  # another Checkpointer's helper must not be tracing us now
                runs, figures = pre.instant(extra)
        except Refused as r:
            self._carry = np.union1d(self._carry, self._runs_to_chunks(r.runs))
            return None
        except OSError as err:
            # What the helper had re-armed is unknown: the next checkpoint stores everything.
            self._full_next = True
            pre.close()
            self._pre = None
            raise OSError(err.errno, f"{err.strerror}; generation {fut.generation} was not written, "
                          f"{self.path} is unchanged (the next checkpoint is full)") from err
        except BaseException:  # broken off while the helper worked (it was killed): as above
            self._full_next = True
            pre.close()
            self._pre = None
            raise
        self.last_instant = figures
        found = self._runs_to_chunks(runs)
        # Per page found: its copies (a hot page twice), the walks and the stop included.
        self._learn("copy", float(figures.get("seconds", 0.0)), int(found.size))
        chunks = np.union1d(found, self._carry)
        self._carry = chunks  # remembered until stored
        self._found_last = len(chunks)
        return chunks

    def _over_budget(self, wait: bool = False) -> bool:
        """Should this checkpoint fork rather than take the ptrace path?

        ``wait=False``: when more pages were written than the helper can copy in the
        time of a fork (the pause is what counts). ``wait=True``: the caller waits for
        the whole write either way, and the ptrace path is the quicker one and stalls
        the other threads for less (``benchmarks/README.md``), but its staging area
        holds every page written: it forks when they are more than
        :func:`_sync_staging_budget` allows.

        Counted without re-arming, in walks that stop as soon as the answer is known;
        not counted when the previous checkpoint found more than twice as many (a
        program that rewrites much of its state between checkpoints keeps doing so: the
        walk would only lengthen the pause; the fork's own walk counts them again)."""
        if wait:
            budget = _sync_staging_budget(int(self._base[-1]), mem_available())
        else:
            budget = int(_resident_pages() * self._cost["fork"] / self._cost["copy"])
        if self._found_last > 2 * budget:
            return True
        n = int(self._carry.size) + int(self._aliased_chunks.size)  # (those are copied in every stop)
        for w in self._watches:
            if n > budget:
                break
            n += len(w.get(max_pages=budget + 1 - n))
        return n > budget

    def _learn(self, what: str, seconds: float, pages: int) -> None:
        """Fold a measured cost (seconds for ``pages``) into the per-page estimate."""
        if pages > 256 and seconds > 0:
            self._cost[what] = 0.5 * self._cost[what] + 0.5 * seconds / pages

    def _runs_to_chunks(self, runs: np.ndarray) -> np.ndarray:
        if not len(runs):
            return np.empty(0, np.int64)
        lens = (runs[:, 1] - runs[:, 0]) // P
        total = int(lens.sum())
        first = np.repeat(np.cumsum(lens) - lens, lens)
        pages = np.repeat(runs[:, 0], lens) + (np.arange(total) - first) * P
        return pages_to_chunks(pages.astype(np.uint64), self.targets, self._base)

    def _run(self, fut: PendingCheckpoint, store: Store, chunks: np.ndarray | None, full: bool,
             progress: Progress | None, t0: float, pause: float, twin: FrozenTwin | None,
             pre: Precopier | None = None, method: str = "") -> None:
        """Write the generation (from the twin, from the helper's staging area, or from
        this process when both are ``None``); settle ``fut``; always reap the twin and
        empty the staging area.

        ``chunks`` is ``None`` when the twin was forked before the written chunks were
        found (``wait=False``, incremental): they are found and re-armed here, after the
        fork. A page written between the fork and that walk is found (and stored with
        the twin's value, the instant's), but the walk re-arms it, so its new value
        would be in no generation: the chunks that may have changed since the fork
        (:meth:`_maybe_changed`) are compared with this process's memory (read after
        the walk, through ``/proc/self/mem``), and those that differ are carried to
        the next checkpoint."""
        changed: list[np.ndarray] = []
        live: ProcMem | None = None
        try:
            if chunks is None:
                with _quick_gil():  # its system calls and numpy release the GIL: get it back fast
                    chunks = self._find_written(False)
                live = ProcMem()
            if pre is not None:
                info = self._write(store, chunks, full, progress, t0, pre.read, fut)
            elif twin is None:
                old = libc.block_all_signals()
                try:
                    try:
                        info = self._write_direct(store, chunks, full, t0, fut)
                    except OSError as err:
                        again = self._without_guards(err)
                        if again is None:
                            raise
                        info = self._write_direct(store, again, full, t0, fut)
                finally:
                    self._unfiltered = None
                    libc.restore_signals(old)
            else:
                if not full and live is None:
                    # Pages written after the walk re-armed them and before the fork are in
                    # the twin's memory: store them too (also written after: harmless, the
                    # twin holds the value of the instant; they stay reported for the next).
                    chunks = np.union1d(chunks, self._written_since_armed())
                try:
                    info = self._write(store, chunks, full, progress, t0, twin.read, fut,
                                       compare=None if live is None else (live.read, changed,
                                                                          self._maybe_changed(twin, chunks)))
                except OSError as err:
                    gone = twin.died(timeout=1.0)  # a read that failed: it is ending
                    if gone is None:
                        raise
                    raise OSError(gone.errno, f"{gone.strerror}; generation {fut.generation} was not written, "
                                  f"{store.path} is unchanged") from err
            info = dataclasses.replace(info, pause=pause, method=method)
            self._carry = np.concatenate(changed) if changed else np.empty(0, np.int64)
            self._full_next = False
        except CancelledError:
            return
        except BaseException as err:
            if not fut.cancelled():
                fut.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        finally:
            if live is not None:
                live.close()
            if twin is not None:
                twin.close()
            if pre is not None:
                pre.release()
        fut.set_result(info)

    def _maybe_changed(self, twin: FrozenTwin, chunks: np.ndarray) -> np.ndarray:
        """Which ``chunks`` may differ from the twin's: those on a page that is not the
        very physical page the twin maps (written since the fork, so copied on write;
        or not known: see :meth:`FrozenTwin.unchanged`). Only those are compared."""
        ent = np.searchsorted(self._base, chunks, side="right") - 1
        k = chunks - self._base[ent]
        st = np.array([t.addr for t in self.targets], dtype=np.int64)[ent] + k * P
        n = np.array([t.nbytes for t in self.targets], dtype=np.int64)[ent] - k * P
        first = st // P * P
        last = (st + np.clip(n, 1, P) - 1) // P * P
        pages = np.union1d(first, last)
        same = twin.unchanged(pages)
        keep: np.ndarray = same[np.searchsorted(pages, first)] & same[np.searchsorted(pages, last)]
        return ~keep

    def _written_since_armed(self) -> np.ndarray:
        """Chunks on pages written since :meth:`_find_written` re-armed them (not re-armed again)."""
        got = [w.get() for w in self._watches]
        pages = np.concatenate(got) if got else np.empty(0, np.uint64)
        return pages_to_chunks(pages, self.targets, self._base)

    def _find_written(self, full: bool, fast: bool = False) -> np.ndarray:
        """Global chunk numbers to store (sorted); the tracking is re-armed for them.

        ``fast`` (the "direct" method only): on the kernel's ``WRITTEN``-only fast path,
        which also reports (once, arming them) the guard pages not armed yet; the pages
        found are kept in ``_unfiltered`` until they have been read. Every page found is
        read (each intersects a chunk), and a guard page cannot be read, so a copy that
        succeeds proves that none was among them; a copy that fails on one is redone
        without them (:meth:`_without_guards`): what :meth:`WriteWatch.get` answers."""
        self._unfiltered = None
        if full:
            for w in self._watches:
                w.reset()  # arm first, then copy: a racing write is also in the next checkpoint
            return np.arange(int(self._base[-1]), dtype=np.int64)
        fast = fast and _fast_path_exact() and any(w.exclude for w in self._watches)
        got = [w._fast_get(reset=True) if fast else w.get(reset=True) for w in self._watches]
        pages = got[0] if len(got) == 1 else np.concatenate(got) if got else np.empty(0, np.uint64)
        chunks = pages_to_chunks(pages, self.targets, self._base)
        if self._aliased_chunks.size:
            chunks = np.union1d(chunks, self._aliased_chunks)
        if fast:
            self._unfiltered = (pages, self._carry)
        if self._carry.size:
            chunks = np.union1d(chunks, self._carry)
        self._carry = chunks  # remembered until stored
        self._found_last = len(chunks)
        return chunks

    def _without_guards(self, err: OSError) -> np.ndarray | None:
        """After a failed copy of chunks found on the fast path (:meth:`_find_written`):
        the chunks :meth:`WriteWatch.get` would have given (the pages found less the guard
        pages among them), or ``None`` when none of them is a guard page (``err`` is real)."""
        found, self._unfiltered = self._unfiltered, None
        if found is None or err.errno != errno.EFAULT:
            return None
        pages, carry = found
        guards = [w._guard_pages(pages[(pages >= w.start) & (pages < w.end)]) for w in self._watches]
        bad = np.concatenate(guards) if guards else np.empty(0, np.uint64)
        if not bad.size:
            return None
        chunks = pages_to_chunks(np.setdiff1d(pages, bad, assume_unique=True), self.targets, self._base)
        if self._aliased_chunks.size:
            chunks = np.union1d(chunks, self._aliased_chunks)
        if carry.size:
            chunks = np.union1d(chunks, carry)
        self._carry = chunks
        return chunks

    def _copy(self, read: Reader, chunks: np.ndarray, rows: np.ndarray,
              compare: tuple[Reader, list[np.ndarray], np.ndarray, np.ndarray] | None = None) -> None:
        """Copy the ``chunks`` out of memory (ours or our twin's) into ``rows`` (padded
        with zeros). ``compare = (read2, changed, scratch, which)``: also read the
        chunks selected by the boolean ``which`` with ``read2`` into ``scratch``, and
        append to ``changed`` those whose bytes differ."""
        starts, lengths, offs = chunk_runs(chunks, self.targets, self._base)
        with _quick_gil():  # a gather of megabytes releases the GIL: get it back fast
            read(starts, lengths, rows, offs)
        zero_padding(rows, chunks, self.targets, self._base)
        if compare is not None:
            read2, changed, scratch, which = compare
            sel = np.flatnonzero(which)
            if not sel.size:
                return
            sub = chunks[sel]
            now = scratch[: len(sel)]
            s2, l2, o2 = chunk_runs(sub, self.targets, self._base)
            read2(s2, l2, now, o2)
            zero_padding(now, sub, self.targets, self._base)
            diff = (rows[sel].view(np.uint64) != now.view(np.uint64)).any(axis=1)
            if diff.any():
                changed.append(sub[diff])

    def _write_direct(self, store: Store, chunks: np.ndarray, full: bool, t0: float,
                      fut: PendingCheckpoint) -> CheckpointInfo:
        """:meth:`_write` for the "direct" method (this thread alone, signals blocked:
        nothing can write the memory meanwhile). Each batch is written to the file
        straight from memory (``pwritev``: the kernel reads it, a bad address is
        ``EFAULT``), read back from the page cache and checksummed; a batch that holds
        zero chunks is written again without them (zero chunks are not stored)."""
        total = len(chunks)
        index = np.zeros(total, dtype=INDEX_DTYPE)
        ent = np.searchsorted(self._base, chunks, side="right") - 1
        index["region"] = ent
        index["page"] = chunks - self._base[ent]
        parent = 0 if full else store.generations[-1].number
        buf = np.empty((min(total, BATCH_PAGES), P), dtype=np.uint8)
        with store.appending(total) as app:
            for s in range(0, total, BATCH_PAGES):
                e = min(total, s + BATCH_PAGES)
                if fut.cancelled():
                    raise CancelledError
                n = e - s
                rows = buf[:n]
                starts, lengths, offs = chunk_runs(chunks[s:e], self.targets, self._base)
                off = app.reserve(n)
                # Writeback starts at once, the last batch's too: the device works while
                # the batch is read back and checksummed and the index is made.
                app.write_memory(starts, lengths, offs, n, off)
                app.read_back(rows, off)
                cks = page_checksums(rows)
                nonzero = cks != 0
                maybe_zero = np.flatnonzero(~nonzero)
                if maybe_zero.size:
                    nonzero[maybe_zero] = rows[maybe_zero].any(axis=1)
                    ndata = int(np.count_nonzero(nonzero))
                    app.give_back(n)
                    if ndata:
                        app.write(rows[nonzero], app.reserve(ndata))
                index["kind"][s:e] = np.where(nonzero, KIND_DATA, KIND_ZERO)
                index["checksum"][s:e] = cks
            return _sealed(store, app, index, parent, fut, full, total, t0)

    def _write(self, store: Store, chunks: np.ndarray, full: bool, progress: Progress | None,
               t0: float, read: Reader, fut: PendingCheckpoint,
               compare: tuple[Reader, list[np.ndarray], np.ndarray] | None = None) -> CheckpointInfo:
        """Copy ``chunks`` out of memory with ``read`` batch by batch while a worker
        checksums and writes the previous batch; seal, unless ``fut`` is cancelled
        first (``CancelledError``; the file is cut back to its sealed generations).
        ``compare = (read2, changed, which)``: the chunks selected by the boolean array
        ``which`` whose bytes read by ``read2`` differ from what ``read`` read are
        appended to ``changed`` (see :meth:`_run`)."""
        total = len(chunks)
        scratch = np.empty((min(total, BATCH_PAGES) if compare is not None else 0, P), dtype=np.uint8)
        index = np.zeros(total, dtype=INDEX_DTYPE)
        ent = np.searchsorted(self._base, chunks, side="right") - 1
        index["region"] = ent
        index["page"] = chunks - self._base[ent]
        parent = 0 if full else store.generations[-1].number
        nbatch = (total + BATCH_PAGES - 1) // BATCH_PAGES

        def process(rows: np.ndarray, s: int, e: int) -> None:
            """Checksums, zero chunks, write: for the batch of index entries [s, e) in ``rows``."""
            with _quick_gil():  # the checksums and the write release the GIL: get it back fast
                cks = page_checksums(rows)
                nonzero = cks != 0
                maybe_zero = np.flatnonzero(~nonzero)
                if maybe_zero.size:
                    nonzero[maybe_zero] = rows[maybe_zero].any(axis=1)
                index["kind"][s:e] = np.where(nonzero, KIND_DATA, KIND_ZERO)
                index["checksum"][s:e] = cks
                ndata = int(np.count_nonzero(nonzero))
                if ndata:
                    # Writeback of the last batch is left to the fsync that follows at once.
                    app.write(rows if ndata == e - s else rows[nonzero], app.reserve(ndata), writeback=e < total)

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
                if fut.cancelled():
                    raise CancelledError
                rows = bufs[b % nbuf][: e - s]
                self._copy(read, chunks[s:e], rows,
                           None if compare is None else (compare[0], compare[1], scratch, compare[2][s:e]))
                if pool is not None:
                    pending.append(pool.submit(process, rows, s, e))
                else:
                    process(rows, s, e)
                if progress is not None:
                    progress(e, total)
            for f in pending:
                f.result()
            return _sealed(store, app, index, parent, fut, full, total, t0)


def _sealed(store: Store, app: Appender, index: np.ndarray, parent: int, fut: PendingCheckpoint, full: bool,
            total: int, t0: float) -> CheckpointInfo:
    """Seal the generation ``app`` wrote (unless its checkpoint was cancelled) and describe it."""
    if not fut.set_running_or_notify_cancel():
        raise CancelledError
    with _quick_gil():  # hashing, writes and fsyncs release the GIL: get it back fast
        app.seal(index, parent)
    return CheckpointInfo(
        generation=store.generations[-1].number, full=full, pages=total, zero_pages=total - app.ndata,
        bytes=app.ndata * P, seconds=time.perf_counter() - t0,
    )


def compact(path: str | os.PathLike[str], generation: int | None = None, *, progress: Progress | None = None) -> int:
    """Fold the chain up to ``generation`` (default: the newest) into one full generation.

    The result is a file (of the current version) holding a single generation
    (numbered 1) with every chunk of that generation's state (zero chunks as such);
    generations after ``generation`` and optional sections are dropped. Chunks are
    verified while they are copied. The new file is written beside ``path`` and
    renamed over it (atomic: a crash leaves the old file), with the old file's mode
    (and owner, when we may set it); a symbolic link is followed (the file it names is
    replaced, the link stays). Refused while a Checkpointer has the file open. Returns
    the number of chunks.
    """
    check_progress(progress)
    path = os.path.realpath(os.fspath(path))
    with Store(path, writable=True, lock=True) as store:
        gen = store.generation(generation)
        gen_of, pos_of = store.latest_map(gen.number)
        total = store.total_pages
        index = np.zeros(total, dtype=INDEX_DTYPE)
        region = np.repeat(np.arange(len(store.lengths)), np.diff(store.base))
        index["region"] = region
        index["page"] = np.arange(total) - store.base[region]
        fd, named_tmp = new_file(path, store.page_size, store.mapping, store.entries)
        old = os.fstat(store.fd)
        with contextlib.suppress(OSError):
            os.fchmod(fd, old.st_mode & 0o7777)
            if (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
                os.fchown(fd, old.st_uid, old.st_gid)  # (root only; the mode above stays)
        tmp_name = named_tmp or f"{path}.compact-{os.getpid()}"
        linked = named_tmp is not None
        try:
            with Store(tmp_name, writable=True, _fd=fd, _unnamed=not linked) as out:
                with out.appending(total) as app:
                    buf = np.empty((min(total, BATCH_PAGES), store.page_size), dtype=np.uint8)
                    for s in range(0, total, BATCH_PAGES):
                        e = min(total, s + BATCH_PAGES)
                        rows = buf[: e - s]
                        pages_of(store, gen_of, pos_of, s, e, rows)
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
    """Check every sealed generation's index and page checksums, and every sealed
    section's payload (a working-set record as a lazy load reads it); return the
    generations.

    Raises :class:`CorruptCheckpointError` naming the first damaged generation and page,
    or section. An unsealed tail is not an error (see :func:`inspect`).
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
        for sec in store.sections:
            if sec.type == SECTION_WORKING_SET:
                read_working_set(store, sec)
            else:  # a type this version does not use: its digest still holds
                store.check_section(sec)
        if store.damage is None and store.file_size != store.sealed_end:
            store.check_tail()  # a torn tail, or a damaged record with sealed ones after it
        if store.damage is not None:
            raise store.damage
        return list(store.generations)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of a checkpoint file (indexes are checked; page data is not read)."""
    with Store(path) as store:
        return {
            "path": store.path,
            "version": store.version,
            "page_size": store.page_size,
            "state": "mapping" if store.mapping else "sequence",
            "entries": [
                {"name": e.name, "dtype": str(e.dtype), "descr": np.lib.format.dtype_to_descr(e.dtype),
                 "shape": list(e.shape), "bytes": e.nbytes, "array": e.array}
                for e in store.entries
            ],
            "regions": store.lengths,
            "sections": [
                {"type": "working-set" if s.type == SECTION_WORKING_SET else s.type, "generation": s.generation,
                 "bytes": s.payload_bytes}
                for s in store.sections
            ],
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

