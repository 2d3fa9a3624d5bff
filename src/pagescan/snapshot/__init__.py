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
that runs nothing of the program, keeps the memory as it was at the ``fork``
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

import contextlib
import dataclasses
import mmap
import os
import time
import weakref
from collections.abc import Callable, Iterator
import signal
import sys
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal, overload

import numpy as np

from .._uapi import libc
from .._uapi.mman import MADV
from .._uapi.userfaultfd import RegisterMode
from ..arrays import mapped_array
from ..handler import FaultHandler
from ..userfaultfd import Userfaultfd
from ..writewatch import WriteWatch
from ._format import INDEX_DTYPE, KIND_DATA, KIND_ZERO, SECTION_WORKING_SET, VERSION, page_checksums
from ._state import Target, chunk_runs, match, merged_page_runs, metas, pages_to_chunks, targets, zero_padding
from ._precopy import Precopier, Refused
from ._twin import FrozenTwin
from ._store import CheckpointError, CorruptCheckpointError, Generation, Store, fsync_dir, link_fd, new_file
from .._uapi.libc import read_runs, write_runs

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "Checkpointer",
    "CorruptCheckpointError",
    "LoadedList",
    "LoadedState",
    "PendingCheckpoint",
    "compact",
    "inspect",
    "lazy_restore",
    "load",
    "restore",
    "verify",
]

P = mmap.PAGESIZE
#: Chunks per batch (4 MiB): copied out of memory, checksummed, written; restored.
BATCH_PAGES = 1024

#: ``progress(done, total)`` callbacks, in pages (chunks).
Progress = Callable[[int, int], None]
#: ``read(starts, lengths, out, offsets)``: copy runs of memory into rows of ``out``.
Reader = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def _read_self(starts: np.ndarray, lengths: np.ndarray, out: np.ndarray, offsets: np.ndarray) -> None:
    read_runs(os.getpid(), starts, lengths, out, offsets)


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


@contextmanager
def _quick_gil() -> Iterator[None]:
    """The GIL switch interval lowered to 0.1 ms (restored after): the pause makes a few
    system calls that release the GIL, and a thread that holds it meanwhile (a busy
    Python loop) would otherwise keep it for a whole interval (5 ms by default) each time.

    Pauses of several Checkpointers may overlap (threads, or a signal handler): the first
    one in saves the program's interval and the last one out restores it."""
    with _gil_lock:
        if _gil_users[0] == 0:
            _gil_users[1] = sys.getswitchinterval()
            sys.setswitchinterval(min(_gil_users[1], 1e-4))
        _gil_users[0] += 1
    try:
        yield
    finally:
        with _gil_lock:
            _gil_users[0] -= 1
            if _gil_users[0] == 0:
                sys.setswitchinterval(_gil_users[1])


_gil_lock = threading.RLock()
#: One ptrace instant at a time in this process: two helpers seizing the same threads
#: would refuse each other (EPERM).
_instant_lock = threading.Lock()
_gil_users: list[Any] = [0, 0.0]  # pauses in progress, the interval to restore


#: First guesses, in seconds per page, of the cost of the fork path (a walk and a
#: ``fork()``, per resident page of the process: page tables) and of the ptrace path
#: (per written page its helper finds: its copies, walks and stop included); each
#: Checkpointer refines them from what it measures.
FORK_COST = 0.2e-6
COPY_COST = 2e-6


def _resident_pages() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1])


def _bases(ts: list[Target]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([t.chunks for t in ts], dtype=np.int64)]).astype(np.int64)


def _pid_arg(pid: Any) -> int:
    if pid is None:
        return os.getpid()
    if isinstance(pid, bool) or not isinstance(pid, (int, np.integer)):
        raise TypeError(f"pid must be an int or None, not {type(pid).__name__}")
    if pid <= 0:
        raise ValueError(f"pid must be > 0, not {pid}")
    return int(pid)


class Checkpointer:
    """Incremental checkpoints of ``state`` into the file ``path``.

    Args:
        path: the checkpoint file. A new file is created (atomically); an existing
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

    Raises:
        TypeError, ValueError: a bad state (naming the entry), before anything else.
        CheckpointError: ``path`` is not a checkpoint, its entries differ, it is in
            use, it is damaged (:class:`CorruptCheckpointError`), or it is a version 2
            (pagescan 0.1) file, which is read but not continued; nothing is changed.
        OSError: from registering the write watch (EBUSY, EINVAL, ENOMEM, ...).
    """

    def __init__(self, path: str | os.PathLike[str], state: Any) -> None:
        self.mapping, self.targets = targets(state, writable=False)
        self.path = os.fspath(path)
        self._base = _bases(self.targets)
        self._watches: list[WriteWatch] = []
        self._store: Store | None = None
        self._lock = threading.Lock()  # one checkpoint starts at a time
        self._thread: threading.Thread | None = None  # the checkpoint in flight
        self._pending: PendingCheckpoint | None = None
        # The helper process of the ptrace path (started by the first checkpoint that is
        # not taken alone). ``_use_ptrace``: ``None`` picks per checkpoint (the cheaper
        # by the costs measured so far), ``True`` always ptrace, ``False`` always fork.
        self._pre: Precopier | None = None
        self._use_ptrace: bool | None = None
        # Seconds per page: a fork per resident page, the ptrace path per page it copies.
        self._cost = {"fork": FORK_COST, "copy": COPY_COST}
        #: The helper's figures for the last ptrace instant (rounds, stop seconds, ...).
        self.last_instant: dict[str, Any] = {}
        meta = metas(self.targets)
        try:
            self._store = Store(self.path, writable=True, lock=True)
        except FileNotFoundError:
            try:
                self._store = Store.create(self.path, P, self.mapping, meta)
            except FileExistsError:  # created meanwhile by someone else
                self._store = Store(self.path, writable=True, lock=True)
        store = self._store
        try:
            if store.version != VERSION:
                raise CheckpointError(f"{self.path} is a version {store.version} checkpoint (pagescan 0.1): it can be "
                                      "restored, loaded and compacted, not continued; compact it or start a new file")
            # The file's entry order (a mapping given with its keys in another order).
            self.targets = match(store, self.mapping, self.targets)
            self._base = _bases(self.targets)
            if store.damage is not None:
                raise store.damage
            store.truncate_unsealed()
            for lo, hi in merged_page_runs(self.targets):
                self._watches.append(WriteWatch(lo, hi - lo))
        except BaseException:
            self.close()
            raise
        self._full_next = True
        # Chunks found written (and re-armed) by a checkpoint that then failed: they go
        # into the next one.
        self._carry = np.empty(0, np.int64)

    @property
    def regions(self) -> list[tuple[int, int]]:
        """``(address, length)`` of each entry's exact bytes."""
        return [(t.addr, t.nbytes) for t in self.targets]

    def close(self, cancel: bool = False) -> None:
        """Wait for a checkpoint in flight (``cancel=True``: abandon it, leaving the file
        at its previous sealed generation unless it is already sealing), then stop
        tracking and close the file. Its error, if any, stays in its future."""
        if cancel and self._pending is not None:
            self._pending.cancel()
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
            if isinstance(t.keep, memoryview):
                t.keep.release()
            t.keep = None

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
          The other threads stall for the stop only; the pause grows with the bytes
          written since the previous checkpoint.
        * ``"fork"`` (a full checkpoint; or the kernel refused to let the helper trace
          us: a debugger attached, Yama): the written chunks are found and re-armed
          (:meth:`_find_written`), then the process is forked; the child (a frozen
          twin, :mod:`pagescan.snapshot._twin`) holds the memory as it was at the
          ``fork``. The pause grows with the populated memory (page tables).
        * ``"direct"``: this is the process's only thread and no ``progress`` callback
          is given: nothing else can write during a synchronous checkpoint, it copies
          from this process directly (signals blocked).

        The chunks are then checksummed, written, ``fsync``'d and sealed
        (:meth:`_write`). So every generation is the memory of one instant, even while
        other threads write (with or without the GIL): state spanning pages is never
        torn. A write racing the pause is in this generation or the next, never lost.
        During the pause the interpreter's GIL switch interval is 0.1 ms (restored
        before returning), so that a thread busy under the GIL does not delay it.
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
        had re-armed is unknown, so the next checkpoint is full.
        """
        with self._lock:
            store = self._store
            if store is None:
                raise ValueError("operation on a closed Checkpointer")
            self._join()
            if store.damage is not None:
                raise store.damage
            t0 = time.perf_counter()
            quick = contextlib.ExitStack()  # the GIL comes back fast until we return
            quick.enter_context(_quick_gil())
            try:
                full = self._full_next
                fut = PendingCheckpoint(len(store.generations) + 1)
                alone = wait and progress is None and len(os.listdir("/proc/self/task")) == 1
                pre = None if full or alone or self._use_ptrace is False else self._precopier()
                twin = None
                if pre is not None:
                    chunks = self._instant_ptrace(pre, fut)
                    if chunks is None:
                        pre = None  # refused: fork instead
                if pre is None:
                    t = time.perf_counter()
                    chunks = self._find_written(full)  # the instant: re-armed, then frozen
                    if not alone:
                        twin = FrozenTwin()
                        self._learn("fork", time.perf_counter() - t, _resident_pages())
                    if not alone and self._use_ptrace is not False and self._pre is None:
                        self._precopier()  # started now, ready for the next checkpoint
                assert chunks is not None
                method = "ptrace" if pre is not None else "direct" if alone else "fork"
                pause = time.perf_counter() - t0
                if wait:
                    quick.close()
                    self._run(fut, store, chunks, full, progress, t0, pause, twin, pre, method)
                    return fut.result()
                self._pending = fut
                th = threading.Thread(target=self._run,
                                      args=(fut, store, chunks, full, progress, t0, pause, twin, pre, method),
                                      name="pagescan-checkpoint")
                try:
                    th.start()
                except BaseException as err:
                    if twin is not None:
                        twin.close()
                    if pre is not None:
                        pre.release()
                    fut.set_exception(err)
                    self._pending = None
                    raise
                self._thread = th
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
            try:
                self._pre = Precopier(merged_page_runs(self.targets),
                                      neighbors=any(t.addr % P for t in self.targets if t.nbytes))
            except OSError:
                self._use_ptrace = False
                return None
        if self._pre.refused is not None:
            return None
        if self._use_ptrace is None and not self._pre.ready():
            return None  # still starting: fork this time rather than wait for it
        return self._pre

    def _instant_ptrace(self, pre: Precopier, fut: PendingCheckpoint) -> np.ndarray | None:
        """Take the instant with the helper (:mod:`._precopy`): the chunks to store, now
        held by its staging area; ``None`` if the kernel refused the stop (the chunks its
        rounds found are carried to the fork path)."""
        extra = np.empty((0, 2), np.int64)
        if self._carry.size:
            starts, lengths, _ = chunk_runs(self._carry, self.targets, self._base)
            s = starts.astype(np.int64)
            extra = np.stack([s // P * P, (s + lengths.astype(np.int64) + P - 1) // P * P], axis=1)
        if self._use_ptrace is None and self._over_budget():
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
        self.last_instant = figures
        found = self._runs_to_chunks(runs)
        # Per page found: its copies (a hot page twice), the walks and the stop included.
        self._learn("copy", float(figures.get("seconds", 0.0)), int(found.size))
        chunks = np.union1d(found, self._carry)
        self._carry = chunks  # remembered until stored
        return chunks

    def _over_budget(self) -> bool:
        """More pages written than the helper can copy in the time of a fork? Counted
        without re-arming, in walks that stop as soon as the answer is known."""
        budget = int(_resident_pages() * self._cost["fork"] / self._cost["copy"])
        n = int(self._carry.size)
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

    def _run(self, fut: PendingCheckpoint, store: Store, chunks: np.ndarray, full: bool,
             progress: Progress | None, t0: float, pause: float, twin: FrozenTwin | None,
             pre: Precopier | None = None, method: str = "") -> None:
        """Write the generation (from the twin, from the helper's staging area, or from
        this process when both are ``None``); settle ``fut``; always reap the twin and
        empty the staging area."""
        try:
            if pre is not None:
                info = self._write(store, chunks, full, progress, t0, pre.read, fut)
            elif twin is None:
                old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
                try:
                    info = self._write(store, chunks, full, progress, t0, _read_self, fut)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
            else:
                if not full:
                    # Pages written after the walk re-armed them and before the fork are in
                    # the twin's memory: store them too (also written after: harmless, the
                    # twin holds the value of the instant; they stay reported for the next).
                    chunks = np.union1d(chunks, self._written_since_armed())
                try:
                    info = self._write(store, chunks, full, progress, t0, twin.read, fut)
                except OSError as err:
                    gone = twin.died(timeout=1.0)  # a read that failed: it is ending
                    if gone is None:
                        raise
                    raise OSError(gone.errno, f"{gone.strerror}; generation {fut.generation} was not written, "
                                  f"{store.path} is unchanged") from err
            info = dataclasses.replace(info, pause=pause, method=method)
            self._carry = np.empty(0, np.int64)
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
            if twin is not None:
                twin.close()
            if pre is not None:
                pre.release()
        fut.set_result(info)

    def _written_since_armed(self) -> np.ndarray:
        """Chunks on pages written since :meth:`_find_written` re-armed them (not re-armed again)."""
        got = [w.get() for w in self._watches]
        pages = np.concatenate(got) if got else np.empty(0, np.uint64)
        return pages_to_chunks(pages, self.targets, self._base)

    def _find_written(self, full: bool) -> np.ndarray:
        """Global chunk numbers to store (sorted); the tracking is re-armed for them."""
        if full:
            for w in self._watches:
                w.reset()  # arm first, then copy: a racing write is also in the next checkpoint
            return np.arange(int(self._base[-1]), dtype=np.int64)
        got = [w.get(reset=True) for w in self._watches]
        pages = np.concatenate(got) if got else np.empty(0, np.uint64)
        chunks = pages_to_chunks(pages, self.targets, self._base)
        if self._carry.size:
            chunks = np.union1d(chunks, self._carry)
        self._carry = chunks  # remembered until stored
        return chunks

    def _copy(self, read: Reader, chunks: np.ndarray, rows: np.ndarray) -> None:
        """Copy the ``chunks`` out of memory (ours or our twin's) into ``rows`` (padded with zeros)."""
        starts, lengths, offs = chunk_runs(chunks, self.targets, self._base)
        read(starts, lengths, rows, offs)
        zero_padding(rows, chunks, self.targets, self._base)

    def _write(self, store: Store, chunks: np.ndarray, full: bool, progress: Progress | None,
               t0: float, read: Reader, fut: PendingCheckpoint) -> CheckpointInfo:
        """Copy ``chunks`` out of memory with ``read`` batch by batch while a worker
        checksums and writes the previous batch; seal, unless ``fut`` is cancelled
        first (``CancelledError``; the file is cut back to its sealed generations)."""
        total = len(chunks)
        index = np.zeros(total, dtype=INDEX_DTYPE)
        ent = np.searchsorted(self._base, chunks, side="right") - 1
        index["region"] = ent
        index["page"] = chunks - self._base[ent]
        parent = 0 if full else store.generations[-1].number
        nbatch = (total + BATCH_PAGES - 1) // BATCH_PAGES

        def process(rows: np.ndarray, s: int, e: int) -> None:
            """Checksums, zero chunks, write: for the batch of index entries [s, e) in ``rows``."""
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
                if fut.cancelled():
                    raise CancelledError
                rows = bufs[b % nbuf][: e - s]
                self._copy(read, chunks[s:e], rows)
                if pool is not None:
                    pending.append(pool.submit(process, rows, s, e))
                else:
                    process(rows, s, e)
                if progress is not None:
                    progress(e, total)
            for f in pending:
                f.result()
            if not fut.set_running_or_notify_cancel():
                raise CancelledError
            app.seal(index, parent)
        gen = store.generations[-1]
        return CheckpointInfo(
            generation=gen.number, full=full, pages=total, zero_pages=total - app.ndata,
            bytes=app.ndata * P, seconds=time.perf_counter() - t0,
        )


def _pages_of(store: Store, gen_of: np.ndarray, pos_of: np.ndarray, lo: int, hi: int, out: np.ndarray,
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


def _open_for_targets(path: str | os.PathLike[str], state: Any, generation: int | None, *,
                      exact_pairs: bool = False) -> tuple[Store, list[Target], Generation]:
    mapping, ts = targets(state, writable=True, exact_pairs=exact_pairs)
    store = Store(path)
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
        if isinstance(t.keep, memoryview):
            t.keep.release()
        t.keep = None


def _restore_chunks(store: Store, gen_of: np.ndarray, pos_of: np.ndarray, ts: list[Target], pid: int,
                    progress: Progress | None) -> None:
    base = store.base
    total = int(base[-1])
    buf = np.empty((min(total, BATCH_PAGES), P), dtype=np.uint8)
    for s in range(0, total, BATCH_PAGES):
        e = min(total, s + BATCH_PAGES)
        rows = buf[: e - s]
        _pages_of(store, gen_of, pos_of, s, e, rows)
        chunks = np.arange(s, e, dtype=np.int64)
        starts, lengths, offs = chunk_runs(chunks, ts, base)
        write_runs(pid, starts, lengths, rows, offs)
        if progress is not None:
            progress(e, total)


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
    page-aligned ``(address, length)`` pairs in that process. Returns the generation
    restored.
    """
    return _restore(path, state, generation, pid, progress, exact_pairs=False)


def _restore(path: str | os.PathLike[str], state: Any, generation: int | None, pid: Any,
             progress: Progress | None, *, exact_pairs: bool) -> int:
    """:func:`restore`; ``exact_pairs``: ``(address, length)`` pairs are exact bytes, any alignment (the CLI)."""
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


class _LazyGroup:
    """Keeps a lazy load's handler and source alive while any of its arrays lives."""

    def __init__(self, fh: FaultHandler, src: _CheckpointSource, recording: _Recording | None) -> None:
        self.finalizer = weakref.finalize(self, _end_lazy, fh, src, recording)


def _end_lazy(fh: FaultHandler, src: _CheckpointSource, recording: _Recording | None) -> None:
    fh.close()
    src.store.close()
    if recording is not None:
        recording.save()


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
    with Store(path) as store:
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
                _pages_of(store, gen_of, pos_of, b + s, b + t, rows[s:t], fresh=True)
        return _result(store, arrays, gen.number, None)


def _result(store: Store, arrays: list[np.ndarray], generation: int, fh: FaultHandler | None) -> LoadedState | LoadedList:
    out: LoadedState | LoadedList
    if store.mapping:
        out = LoadedState((e.name, a) for e, a in zip(store.entries, arrays))
    else:
        out = LoadedList(arrays)
    out.generation = generation
    out.handler = fh
    return out


class _LazyMap:
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


class _CheckpointSource:
    """A :class:`~pagescan.handler.Source` reading (and verifying) the chunks of one generation.

    Serves the handler's regions (see :class:`_LazyMap`); a span that does not start on
    a chunk boundary is assembled from the two chunks it straddles.
    """

    def __init__(self, path: str, generation: int | None) -> None:
        self.store = Store(path)
        try:
            self.generation = self.store.generation(generation).number
            self.gen_of, self.pos_of = self.store.latest_map(self.generation)
        except BaseException:
            self.store.close()
            raise
        self.map: _LazyMap | None = None
        self.hbyte = np.zeros(1, np.int64)
        # Chunks with data: the others are served as zero pages (UFFDIO_ZEROPAGE: no copy,
        # no memory), never stored or stored as ZERO.
        self.has_data = self.store.data_map(self.generation)

    def bind(self, lazymap: _LazyMap) -> None:
        self.map = lazymap
        self.hbyte = lazymap.hbase * P

    def read(self, offset: int, out: memoryview) -> bool:
        m = self.map
        assert m is not None
        r = int(np.searchsorted(self.hbyte, offset, side="right")) - 1
        ent = int(m.entry[r])
        byte = int(m.skip[r]) + offset - int(self.hbyte[r])
        c0 = int(m.cbase[ent]) + byte // P
        shift = byte % P
        n = (shift + len(out) + P - 1) // P
        if not self.has_data[c0 : c0 + n].any():
            return False  # zero pages
        if not shift:
            rows = np.frombuffer(out, dtype=np.uint8).reshape(len(out) // P, P)
            _pages_of(self.store, self.gen_of, self.pos_of, c0, c0 + n, rows)
            return True
        tmp = np.empty((n, P), dtype=np.uint8)
        _pages_of(self.store, self.gen_of, self.pos_of, c0, c0 + n, tmp)
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
        gens = self.gen_of[chunks]
        pos = self.pos_of[chunks]
        for g in np.unique(gens).tolist():
            sel = np.flatnonzero(gens == g)
            if g == 0:
                rows[sel] = 0
            elif sel.size == len(rows):
                self.store.read_pages(self.store.generations[g - 1], pos, out=rows)
            else:
                rows[sel] = self.store.read_pages(self.store.generations[g - 1], pos[sel])


def _working_set(store: Store, generation: int) -> np.ndarray | None:
    """The newest first-touch chunks recorded for ``generation`` (``None`` if none)."""
    for sec in reversed(store.sections):
        if sec.type == SECTION_WORKING_SET and sec.generation == generation:
            raw = store.read_section(sec)
            if len(raw) % 8:
                raise CorruptCheckpointError(f"{store.path}: working-set section is damaged (length {len(raw)})")
            chunks = np.frombuffer(raw, dtype="<u8").astype(np.int64)
            if chunks.size and (int(chunks.min()) < 0 or int(chunks.max()) >= store.total_pages):
                raise CorruptCheckpointError(f"{store.path}: working-set section names chunks outside the entries")
            return chunks
    return None


class _Recording:
    """A first-touch record shared with the handler (``MAP_SHARED``), saved as a section when done."""

    def __init__(self, path: str, generation: int, lazymap: _LazyMap, total: int) -> None:
        self.path, self.generation, self.lazymap = path, generation, lazymap
        self.mm = mmap.mmap(-1, 8 * (total + 2), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self.mm, dtype=np.uint64)

    def stop(self) -> None:
        """End the recording: the handler serves the rest as a normal lazy restore (with prefetch)."""
        if self.array.size:
            self.array[-1] = 1

    def save(self) -> None:
        """Append the record to the file (best effort: skipped if a writer holds it or it changed)."""
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
            if store.damage is not None or len(store.generations) < self.generation:
                return
            chunks = self.lazymap.to_chunks(hpages)
            with contextlib.suppress(OSError):
                store.append_section(SECTION_WORKING_SET, self.generation, chunks.astype("<u8").tobytes())


def _hot(src: _CheckpointSource, lazymap: _LazyMap, use: bool) -> np.ndarray | None:
    """The handler pages to prefetch first: the newest working set recorded for the generation."""
    if not use:
        return None
    try:
        chunks = _working_set(src.store, src.generation)
    except CorruptCheckpointError:
        return None  # a damaged record only costs speed
    return None if chunks is None else lazymap.from_chunks(chunks)


def _load_lazy(path: str, generation: int | None, prefetch: bool, working_set: bool,
               record: bool) -> LoadedState | LoadedList:
    src = _CheckpointSource(path, generation)
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
        lazymap = _LazyMap(store, spans)
        src.bind(lazymap)
        hot = _hot(src, lazymap, working_set and not record)  # a recording sees every touch
        recording = _Recording(path, src.generation, lazymap, int(lazymap.hbase[-1])) if record else None
        fh = FaultHandler(regions, src, prefetch=prefetch, hot=hot,
                          record=None if recording is None else recording.array)
        fh.start()
    except BaseException:
        src.store.close()
        raise
    group = _LazyGroup(fh, src, recording)
    for m in maps:
        m.keep = group
    return _result(store, arrays, src.generation, fh)


def _probe_missing(regions: list[tuple[int, int]]) -> None:
    """Register (and unregister) the ranges for MISSING faults: refuse memory that cannot take them."""
    if not regions:
        return
    with Userfaultfd(0) as uf:
        for a, n in regions:
            uf.register(a, n, RegisterMode.MISSING)
        for a, n in regions:
            uf.unregister(a, n)


def _drop(a: int, n: int) -> None:
    """Discard the pages (shared memory: punch a hole, ``MADV_REMOVE``; private: ``MADV_DONTNEED``)."""
    try:
        libc.madvise(a, n, MADV.REMOVE)
    except OSError:
        libc.madvise(a, n, MADV.DONTNEED)


def _restore_bytes(store: Store, gen_of: np.ndarray, pos_of: np.ndarray, t: Target, entry: int, skip: int,
                   length: int, pid: int) -> None:
    """Write bytes ``[skip, skip+length)`` of entry ``entry`` to ``t.addr + skip``."""
    if length <= 0:
        return
    c0 = int(store.base[entry]) + skip // P
    c1 = int(store.base[entry]) + (skip + length + P - 1) // P
    rows = np.empty((c1 - c0, P), dtype=np.uint8)
    _pages_of(store, gen_of, pos_of, c0, c1, rows)
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

    ``state`` as for :func:`restore` (private anonymous or shmem memory of this
    process). The pages that lie entirely inside an object are dropped
    (``MADV_DONTNEED``; ``MADV_REMOVE`` for shared memory) and served from the file on
    first touch by a handler process; the bytes of an object on pages it shares with
    other objects (the first and last page of a small array on the malloc heap) are
    restored eagerly, before this returns -- the neighbours' bytes are not touched.
    Do not touch the objects from another thread while this starts (a page
    repopulated between drop and registration is refused: ``FileExistsError``).

    Yields the :class:`~pagescan.FaultHandler` (``progress()``, ``wait()``); with
    ``prefetch`` the handler copies pages ahead while no fault waits; a recorded
    working set is prefetched first, and ``record`` records one (every first touch
    served alone, no prefetch; see :func:`load`): when the block ends the recording is
    saved and the handler prefetches the rest, which the block's end waits for.
    Leaving the block stops the
    handler: pages not served by then raise SIGBUS when touched -- call ``wait()``
    first. If the handler dies, touching a page not yet restored raises SIGBUS (never
    wrong data, never a hang); a damaged page is not served either.
    """
    store, ts, gen = _open_for_targets(path, state, generation)
    store.close()
    try:
        src = _CheckpointSource(os.fspath(path), gen.number)
    except BaseException:
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
        _probe_missing(regions)
        me = os.getpid()
        for t, i, skip, length in eager:
            _restore_bytes(src.store, src.gen_of, src.pos_of, t, i, skip, length, me)
        for a, n in regions:
            _drop(a, n)
        lazymap = _LazyMap(src.store, spans)
        src.bind(lazymap)
        hot = _hot(src, lazymap, working_set and not record)  # a recording sees every touch
        recording = (_Recording(os.fspath(path), src.generation, lazymap, int(lazymap.hbase[-1]))
                     if record else None)
        fh = FaultHandler(regions, src, prefetch=prefetch, hot=hot,
                          record=None if recording is None else recording.array)
        with fh:
            yield fh
            if recording is not None:  # the rest comes in, prefetched, before the block ends
                recording.save()
                if not fh.wait():
                    raise RuntimeError(
                        f"lazy restore from {os.fspath(path)}: the fault handler failed (exit status "
                        f"{fh.exit_status}) before every page was in; pages not served raise SIGBUS")
    finally:
        src.store.close()
        _release(ts)


def compact(path: str | os.PathLike[str], generation: int | None = None, *, progress: Progress | None = None) -> int:
    """Fold the chain up to ``generation`` (default: the newest) into one full generation.

    The result is a file (of the current version) holding a single generation
    (numbered 1) with every chunk of that generation's state (zero chunks as such);
    generations after ``generation`` and optional sections are dropped. Chunks are
    verified while they are copied. The new file is written beside ``path`` and
    renamed over it (atomic: a crash leaves the old file). Refused while a Checkpointer
    has the file open. Returns the number of chunks.
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
        fd, named_tmp = new_file(path, store.page_size, store.mapping, store.entries)
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
