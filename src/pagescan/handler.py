"""Serve userfaultfd MISSING faults from a separate process.

Why another process: a fault taken by a thread holding the GIL (a ``bytes()`` copy, an
``mmap`` index, a numpy operation) blocks until it is resolved; a handler *thread* of
the same process would need that GIL to run, so the process would deadlock. The
handler here is a forked child: it inherits the userfaultfd, whose faults belong to the
parent's mm, and resolves them with ``UFFDIO_COPY``/``UFFDIO_ZEROPAGE``, which copy from
the handler's own memory into the parent's (``UFFDIO_MOVE`` is not an option: the
kernel refuses it from any process but the owner of the memory).

What the handler does:

* reads many messages per ``read``; a fault resolves a window of pages around it;
* waits (once, :data:`FIRST_TOUCH_WAIT`) for the first fault before it prefetches
  anything, warming the source meanwhile: a lazy load is touched at once, and a fault
  that arrives while a window is being read waits for that window;
* when idle, prefetches ahead in address order, the window growing from 64 KiB to
  8 MiB while idle and shrinking back on a fault (CRIU's lazy-pages policy); with a
  ``thread_safe`` source two threads each read (and verify) a window and copy it in,
  so reading and ``UFFDIO_COPY`` run on two CPUs at once, and messages are read only
  while no window is being copied (a window copied after a ``REMOVE`` was read could
  land after the owner's pages were discarded);
* treats EEXIST (already populated: a race with prefetch) by waking the range,
  EAGAIN (the mm is changing) by reading the pending events and retrying, and
  ENOENT (a span crossing two VMAs of a range, or a range gone) by splitting the span;
* follows non-cooperative events: ``REMOVE`` (``MADV_DONTNEED``) means the owner
  discarded the contents, so later faults there get zero pages, never the old data;
  ``UNMAP`` forgets the range; ``REMAP`` (mremap) moves it;
* when every page is in, unregisters the ranges and exits.

Failure, never a hang and never wrong data: the owner gives up its own copy of the
uffd, so the ranges stay registered only while the handler (and its guardian) hold it.
The owner starts, besides the handler, a small guardian that also holds the uffd and
waits for the handler to end (a pipe whose only writer is the handler). A ``fork``
copies the page tables of all the memory the owner has populated (about 25 ms per GiB
here), so in an owner with more than :data:`SPAWN_ABOVE` of it the guardian is a
fresh interpreter started with ``posix_spawn`` (no page tables copied; it imports
pagescan only if it has pages to poison), in its own process group; in a small owner
it is forked (0.5 ms, against 2-6 ms for the ``exec``). If the handler dies before
finishing -- killed, crashed, a source that raised, or stopped by
:meth:`FaultHandler.close` -- the guardian installs poison markers (``UFFDIO_POISON``,
Linux 6.6) on every page still empty and wakes the faulting threads: they get SIGBUS,
a clear failure, instead of waiting forever or -- had the uffd simply been closed --
silently reading zero pages. (If handler and guardian are killed together, the kernel
unregisters the ranges and later faults read zeros: do not kill the guardian.) Both
are children of the owner, watched through pidfds (``pagescan._child``) and reaped by
``wait``/``close``, or when a forgotten :class:`FaultHandler` is collected
(``weakref.finalize``); if the owner exits first, the handler notices (a pidfd) and
both exit.

A lazy load (``pagescan.snapshot.load``) can instead hand the uffd to handler and
guardian processes started ahead of time by a fault server (``pagescan._faultserver``,
:meth:`FaultHandler.start`'s ``via``): no fork of the owner at all.

A process the owner forks later does not inherit the registration (no
``EVENT_FORK``): pages not yet served read as zeros there. Fork after :meth:`wait`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import select
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from ._child import Child, fork, release_inherited
from ._args import U64, check_aligned, open_regular, plain_array, u64
from ._held import held_still
from ._procfs import read_maps
from ._errors import InvalidArgumentError, PartialProgressError
from ._uapi import libc
from ._uapi.mman import MAP, PROT
from ._uapi.pagemap import Category
from ._uapi.userfaultfd import RegisterMode, UffdFeature, UffdIoctl
from .userfaultfd import (
    PagefaultEvent,
    RemapEvent,
    RemoveEvent,
    UnmapEvent,
    Userfaultfd,
)

__all__ = ["FaultHandler", "FileSource", "Source"]

P = mmap.PAGESIZE
MIN_WINDOW = 64 << 10
MAX_WINDOW = 4 << 20


class Source(Protocol):
    """Where the pages come from: ``read(offset, out) -> bool`` fills the writable
    memoryview ``out`` with the bytes at ``offset`` (``len(out)`` of them).

    ``offset`` counts from the start of the first region (regions are concatenated).
    Return ``False`` instead if the whole span is zero (served as zero pages without
    copying; ``out`` is then not read).
    A source with a true ``thread_safe`` attribute may be called from two threads of
    the handler at once (prefetch reads the next window while a fault is served).
    """

    def read(self, offset: int, out: memoryview) -> bool: ...


def _regions(regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(address, length)`` pairs as ints: page aligned, non-empty, inside 64 bits."""
    if isinstance(regions, (str, bytes)) or not hasattr(regions, "__iter__"):
        raise TypeError(f"regions must be a sequence of (address, length) pairs, not {type(regions).__name__}")
    out = []
    for i, r in enumerate(regions):
        try:
            a, n = r
        except (TypeError, ValueError):
            raise TypeError(f"regions[{i}] must be an (address, length) pair, not {r!r}") from None
        a, n = u64(f"regions[{i}] address", a, bool_ok=False), u64(f"regions[{i}] length", n, bool_ok=False)
        check_aligned("FaultHandler", f"regions[{i}] address", a)
        check_aligned("FaultHandler", f"regions[{i}] length", n)
        if n == 0 or a + n > U64:
            raise InvalidArgumentError(f"FaultHandler: regions[{i}] {a:#x}+{n:#x} is empty or runs past the top "
                                       "of the address space")
        out.append((a, n))
    spans = sorted(out)
    for (a, n), (b, m) in zip(spans, spans[1:]):
        if b < a + n:  # the same page would have two sources: the first region's wins, silently
            raise InvalidArgumentError(f"FaultHandler: regions {a:#x}+{n:#x} and {b:#x}+{m:#x} overlap")
    return out


class FileSource:
    """Pages from a file (or a slice of it starting at ``base``): region offset ``o``
    is file offset ``base + o``. Past the end of the file the pages read as zeros (a
    file mapping would raise SIGBUS there), so a file shorter than the regions is
    served whole. The file is opened at once (a regular file only: ``ValueError`` for
    a FIFO or a device, which could block the handler) and read with ``preadv``, from
    two handler threads at once (``thread_safe``)."""

    thread_safe = True  # preadv at explicit offsets

    def __init__(self, path: str | os.PathLike[str], base: int = 0) -> None:
        self.fd = -1
        self.base = u64("base", base, bool_ok=False)
        if self.base >= 1 << 63:
            raise ValueError(f"base {self.base:#x} is beyond the largest file offset (2**63 - 1)")
        self.fd = open_regular(path, os.O_RDONLY, "FileSource path")  # a FIFO would block forever

    def read(self, offset: int, out: memoryview) -> bool:
        pos = self.base + u64("offset", offset)
        if pos >= 1 << 63:
            raise ValueError(f"offset {offset:#x} from base {self.base:#x} is beyond the largest file offset")
        got = os.preadv(self.fd, [out], pos)
        if got < len(out):
            out[got:] = bytes(len(out) - got)
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _CallableSource:
    def __init__(self, fn: Callable[[int, int], Any]) -> None:
        self.fn = fn

    def read(self, offset: int, out: memoryview) -> bool:
        data = self.fn(offset, len(out))
        if data is None:
            return False
        mv = memoryview(data).cast("B")
        if len(mv) != len(out):
            raise ValueError(f"source returned {len(mv)} bytes for a {len(out)}-byte request")
        out[:] = mv
        return True


class _Counters(ctypes.c_uint64 * (P // 8)):  # type: ignore[misc]  # (a ctypes array type, made at run time)
    """The shared page as words, holding the mapping they view (``mapping``)."""

    mapping: libc.RawMapping


#: Words of the shared page after the four counters: where the handler's regions are
#: now (``mremap`` moves them; the guardian poisons what is left empty *there*). Word
#: :data:`_PIECES` holds their number (0: where they were registered), then
#: ``(address, length)`` pairs; :data:`_UNKNOWN` while it is being rewritten, or when
#: they do not fit (the guardian then falls back to the registered regions).
_PIECES, _TABLE = 5, 6
#: Word of the shared page the owner sets to have the handler bring in every page
#: (:meth:`FaultHandler.fetch_rest`).
_FETCH_REST = 4
#: Milliseconds an idle handler that does not prefetch sleeps between looks at
#: :data:`_FETCH_REST` (faults wake it at once).
_IDLE_LOOK = 50
_MAX_PIECES = (P // 8 - _TABLE) // 2
_UNKNOWN = (1 << 64) - 1


class _Shared:
    """A small MAP_SHARED page for progress counters: [served_pages, state, error, the
    handler's ``waitpid`` status (written by a fault server), :data:`_FETCH_REST`], then
    where the regions are now (:data:`_PIECES`).

    :attr:`arr` is a view that keeps the mapping alive (it holds the mapping object):
    :meth:`close` only marks it closed (``addr`` 0) and closes the fd, and the page is
    unmapped once the last view is gone, so a reader interrupted between its check of
    ``addr`` and its read (a signal handler that closes the handler) reads a page that
    is still there."""

    def __init__(self, fd: int = -1) -> None:
        # A memfd: the page can also be handed to a process that is not our fork (the
        # fault server, ``pagescan._faultserver``) with SCM_RIGHTS.
        self.fd = os.memfd_create("pagescan-handler", os.MFD_CLOEXEC) if fd < 0 else fd
        try:
            if fd < 0:
                os.ftruncate(self.fd, P)
            mapping = libc.RawMapping(P, PROT.READ | PROT.WRITE, MAP.SHARED, self.fd)  # (no fd of its own)
        except BaseException:
            os.close(self.fd)
            raise
        self.arr = _Counters.from_address(mapping.addr)
        self.arr.mapping = mapping  # unmapped when the last view goes
        self.addr = mapping.addr

    def close(self) -> None:
        self.addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


STATE_RUNNING, STATE_DONE, STATE_FAILED = 0, 1, 2


class _Proc(Protocol):
    """A helper process as the owner sees it: a :class:`~pagescan._child.Child`, or a
    process of the fault server (``pagescan._faultserver``)."""

    pid: int
    status: int | None

    def wait(self, timeout: float | None = None) -> int | None: ...

    def kill(self, sig: int = signal.SIGKILL) -> None: ...


#: ``via(handler, uffd)`` of :meth:`FaultHandler.start`: hands the registered uffd to
#: processes started elsewhere; returns (handler, guardian), or ``None`` to fork them.
Via = Callable[["FaultHandler", Userfaultfd], "tuple[_Proc, _Proc] | None"]


class _Lifecycle:
    """What a :class:`FaultHandler` owns outside Python's heap: its two processes and
    the shared page. Held by the handler's ``weakref.finalize``, so it never refers to
    the handler itself."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.handler: _Proc | None = None
        self.guardian: _Proc | None = None
        self.shared: _Shared | None = None
        #: The handler's ``waitpid`` status, once a stop has reaped it.
        self.handler_status: int | None = None
        # Held by a stop in progress: a stop in another thread returns only once the
        # guardian is done (or the caller could unmap the range, map new memory there
        # and have the guardian poison it); one nested in this thread (a signal handler)
        # goes on at once, and the stop it interrupted finishes the work.
        self._stopping = threading.RLock()

    def stop(self) -> None:
        """Kill the handler (if running), reap it and the guardian, unmap the page.

        The guardian poisons the pages still empty once the handler is gone; that takes
        milliseconds; a guardian stuck for long is killed (the ranges are then
        unregistered and read zeros: the documented last resort). In a process forked
        from the owner this only drops the inherited pidfds and the page.
        """
        if os.getpid() != self.owner:  # (a lock held at the fork would be held for good)
            self._stop()
            return
        with self._stopping:
            self._stop()

    def _stop(self) -> None:
        handler, guardian, self.handler, self.guardian = self.handler, self.guardian, None, None
        if handler is not None:
            handler.kill()
            handler.wait()
            self.handler_status = handler.status
        if guardian is not None and guardian.wait(10.0) is None:
            guardian.kill()
            guardian.wait()
        if self.shared is not None:
            self.shared.close()

    def finalize(self) -> None:
        """The handler was dropped without :meth:`FaultHandler.close`."""
        running = self.handler is not None and self.handler.wait(0) is None
        self.stop()
        if running and os.getpid() == self.owner:
            warnings.warn("FaultHandler dropped while serving faults, without close(): stopped it; "
                          "pages not served by then are poisoned", ResourceWarning, stacklevel=2)


def _page_numbers(hot: Any, total: int) -> np.ndarray:
    """``hot`` as int64 page numbers in ``[0, total)``: ``TypeError`` for what is not
    integers (floats, strings, bools), ``ValueError`` for numbers out of range."""
    try:
        arr = np.asarray(hot)
    except (TypeError, ValueError, OverflowError) as err:
        raise TypeError(f"hot must be a sequence of page numbers ({err})") from None
    if arr.ndim != 1:
        raise ValueError(f"hot must be a 1-D sequence of page numbers, not {arr.ndim}-D")
    if not arr.size:
        return np.empty(0, np.int64)
    if arr.dtype.kind == "O":  # ints beyond 64 bits (or anything else)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in arr.tolist()):
            raise ValueError(f"hot must be page numbers in [0, {total})")
        raise TypeError("hot must be integer page numbers")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"hot must be integer page numbers, not {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) >= total:
        raise ValueError(f"hot must be page numbers in [0, {total})")
    return arr.astype(np.int64)


def servable(ioctls: int, a: int, n: int, what: str) -> None:
    """Refuse (``InvalidArgumentError``) a range just registered for MISSING faults whose
    ``ioctls`` lack ``UFFDIO_ZEROPAGE``: the kernel leaves it out for hugetlb memory, whose
    faults are resolved a whole huge page at a time (``UFFDIO_COPY`` of 4 KiB there is
    EINVAL), and the handler serves base pages."""
    if not ioctls & UffdIoctl.ZEROPAGE:
        raise InvalidArgumentError(
            f"{what}: {a:#x}-{a + n:#x} is (or holds) hugetlb memory, which is not served lazily: its faults "
            "are resolved a whole huge page at a time")


class FaultHandler:
    """Register ``regions`` for MISSING faults and serve them from ``source`` in a child.

    Args:
        regions: ``(address, length)`` pairs, page aligned, each unpopulated (checked:
            ``FileExistsError`` otherwise). Their bytes are ``source`` offsets 0.. in order.
        source: a :class:`Source`, or a callable ``(offset, length) -> bytes | None``
            (``None``: zeros).
        prefetch: copy pages ahead while no fault is waiting.
        hot: page numbers (counted over the regions in order) to prefetch first, in
            this order, before the address-order prefetch (a recorded working set).
        record: a writable ``uint64`` array in memory shared with the handler (a
            ``MAP_SHARED`` mapping), of ``total pages + 2`` elements: the handler
            records every page that faults, in first-touch order, from element 1 on,
            and keeps the count in element 0 (a working set). While recording, each
            fault is served alone (no window, no prefetch), so that every first touch
            is seen. Setting the last element to 1 ends the recording: the handler
            then serves as if created with ``prefetch=True`` and no record.
        fresh: the caller has just mapped the regions and never touched them, so the
            check that they are unpopulated is skipped (it costs a ``PAGEMAP_SCAN``,
            and the first one in a process loads the scan backend: milliseconds).

    Use as a context manager; :meth:`wait` blocks until every page is in. Raises
    ``OSError`` from registration (EINVAL for memory that cannot take MISSING faults,
    or hugetlb memory, whose faults are resolved a huge page at a time: not served
    here; EBUSY if registered elsewhere).

    Handler and guardian are forks of the owner. The guardian holds none of its fds;
    the handler holds copies of all of them while it runs (its source may use any: a
    socket to a page server, a locked file), so a socket or pipe the owner closes meanwhile
    gives its peer EOF, and an ``flock`` the owner releases is free, only once the
    handler has ended (:meth:`wait`, :meth:`close`). The processes are watched through
    pidfds. A handler dropped
    without :meth:`close` is closed when it is collected (with a ``ResourceWarning``
    if it was still serving), so it leaves neither a process nor a mapping behind.
    """

    def __init__(
        self,
        regions: Sequence[tuple[int, int]],
        source: Source | Callable[[int, int], Any],
        *,
        prefetch: bool = True,
        hot: Sequence[int] | np.ndarray | None = None,
        record: np.ndarray | None = None,
        fresh: bool = False,
    ) -> None:
        self.regions = _regions(regions)
        self.total_pages = sum(n for _, n in self.regions) // P
        if hasattr(source, "read"):
            self.source: Source = source
        elif callable(source):
            self.source = _CallableSource(source)
        else:  # found now, not by the handler process (whose failure would leave SIGBUS)
            raise TypeError(f"source must be a Source (with a read method) or a callable (offset, length) -> "
                            f"bytes | None, not {type(source).__name__}")
        self.prefetch = prefetch
        self.hot = None if hot is None else _page_numbers(hot, self.total_pages)
        if record is not None:
            if not isinstance(record, np.ndarray):
                raise TypeError(f"record must be a numpy array, not {type(record).__name__}")
            real = plain_array(record)
            if (real.dtype != np.uint64 or real.ndim != 1 or len(real) < self.total_pages + 2
                    or not real.flags.writeable):
                raise ValueError(f"record must be a writable uint64 array of at least {self.total_pages + 2} "
                                 "elements")
            lo = int(real.__array_interface__["data"][0])
            if not all(v.shared for v in read_maps(os.getpid(), lo, lo + real.nbytes)):
                # The handler (another process) writes it: in private memory its records
                # would land in the handler's copy, and the end of the recording never reach it.
                raise ValueError("record must lie in memory shared with the handler (a MAP_SHARED mapping)")
            record = real
        self.record = record
        self.fresh = bool(fresh)
        #: ``waitpid`` status of the handler process once reaped by :meth:`wait`.
        self.exit_status: int | None = None
        self.owner = os.getpid()
        self._shared: _Shared | None = None
        self._started = False
        self._life = _Lifecycle()
        self._finalizer = weakref.finalize(self, self._life.finalize)

    @property
    def pid(self) -> int:
        """pid of the handler process (0 once reaped)."""
        child = self._life.handler
        return child.pid if child is not None and child.status is None else 0

    @property
    def guardian_pid(self) -> int:
        """pid of the guardian process (0 once reaped)."""
        child = self._life.guardian
        return child.pid if child is not None and child.status is None else 0

    # -- owner side -----------------------------------------------------------------

    def start(self, via: Via | None = None) -> FaultHandler:
        """Register the regions and start serving: the handler and its guardian are
        forked here. (``via`` is for pagescan's fault server, which starts them from a
        process of its own, :func:`pagescan.snapshot.start_fault_server`; leave it out.)

        Python signal handlers and finalizers of this thread run once the handler serves
        (:func:`pagescan._held.held_still`): one that touched a registered page before
        would wait for a server only this thread can start."""
        with held_still():
            return self._start(via)

    def _start(self, via: Via | None) -> FaultHandler:
        from ._scan import scan

        if self._started:
            raise RuntimeError("FaultHandler already started")
        life = self._life
        self.owner = life.owner = os.getpid()
        feats = UffdFeature.EVENT_REMOVE | UffdFeature.EVENT_UNMAP | UffdFeature.EVENT_REMAP
        uf = Userfaultfd(feats, nonblock=True)
        shared = self._shared = life.shared = _Shared()
        ok = False
        try:
            # Register first (EBUSY if another uffd has the range: the clearer error),
            # then insist on empty pages (closing the uffd undoes the registration).
            for a, n in self.regions:
                servable(uf.register(a, n, RegisterMode.MISSING), a, n, "FaultHandler")
            for a, n in [] if self.fresh else self.regions:
                busy = scan(a, a + n, category_anyof_mask=int(Category.PRESENT | Category.SWAPPED), return_mask=0)
                if len(busy):
                    raise FileExistsError(
                        errno.EEXIST,
                        f"lazy targets must be unpopulated: {busy.pages} pages of {a:#x}+{n:#x} are already "
                        "present (or swapped)",
                    )
            procs = via(self, uf) if via is not None else None
            if procs is not None:
                life.handler, life.guardian = procs
                self._started = True
                ok = True
                return self
            # The handler holds the only write end of `life`; the guardian reads EOF (after
            # "D" for done) when the handler ends, however it ends.
            life_r, life_w = os.pipe()
            try:

                def handler_main() -> int:
                    os.close(life_r)  # (every other fd stays: the source may use any of them)
                    return _handler_main(uf, self, life_w)

                def guardian_main() -> int:
                    release_inherited({uf.fd, life_r})
                    _guardian(uf, self.regions, self.owner, life_r, shared.arr)
                    return 0

                life.handler = fork(handler_main)
                self._started = True
                os.close(life_w)
                life_w = -1
                life.guardian = (_spawn_guardian(uf.fd, life_r, shared.fd, self.regions, self.owner)
                                 or fork(guardian_main))
            finally:
                os.close(life_r)
                if life_w >= 0:
                    os.close(life_w)
            ok = True
        finally:
            uf.close()  # handler and guardian hold it now
            if not ok:
                self.close()
                shared.close()
        return self

    def progress(self) -> tuple[int, int]:
        """``(pages served, total pages)``."""
        sh = self._shared  # (its page stays mapped while we hold it, closed or not)
        return (int(sh.arr[0]) if sh else 0), self.total_pages

    @property
    def failed(self) -> bool:
        """The handler ended without serving every page: it failed (a source that
        raised, the owner's pages gone), or it was killed or stopped (:meth:`close`)
        before it was done, as :meth:`wait` found."""
        sh = self._shared  # (its page stays mapped while we hold it, closed or not)
        if sh is None:
            return False
        state = sh.arr[1]
        return bool(state == STATE_FAILED or (state != STATE_DONE and self.exit_status is not None))

    def fetch_rest(self) -> None:
        """Have the handler bring in every page it has not served, as ``prefetch=True``
        does (a handler made with ``prefetch=False``, or recording: the recording ends);
        returns at once, :meth:`wait` waits for them. A handler that is idle notices
        within 50 ms."""
        if not self._started:
            raise RuntimeError("FaultHandler was not started")
        sh = self._shared
        if sh is not None and sh.addr:
            sh.arr[_FETCH_REST] = 1

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the handler to finish; ``True`` when every page was served.

        Sleeps in ``poll`` on the handler's pidfd (then the guardian's), woken by its exit.
        """
        if not self._started:
            raise RuntimeError("FaultHandler was not started")
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        life = self._life
        if life.handler is not None:
            status = life.handler.wait(left())
            if status is None:
                return False
            life.handler = None
            self.exit_status = status
        if life.guardian is not None:
            # The handler is gone: the guardian exits at once (after poisoning, if the
            # handler failed). Not reaped in time: close() does it.
            if life.guardian.wait(left()) is not None:
                life.guardian = None
        sh = self._shared
        return bool(sh and sh.arr[1] == STATE_DONE)

    def close(self) -> None:
        """Stop the handler (if still running) and reap it and its guardian.

        Pages not served by then are poisoned: touching them raises SIGBUS. Call
        :meth:`wait` first to let every page in. In a forked child of the owner this
        only forgets the handler (the processes belong to the owner).
        """
        self._finalizer.detach()
        self._life.stop()
        if self.exit_status is None and os.getpid() == self.owner:
            self.exit_status = self._life.handler_status  # (stopped here, not reaped by wait)

    def __enter__(self) -> FaultHandler:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- handler process --------------------------------------------------------------------


#: The address of a region that is no longer in the address space (:meth:`_Pages.forget`):
#: above every address, so no fault or event finds it.
GONE = (1 << 64) - P


class _Pages:
    """Per-page state of the lazy ranges: 0 pending, 1 in (served or present), 2 zero-fill."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self.regions = list(regions)  # (split by remap)
        self.base = [0]
        for _, n in regions:
            self.base.append(self.base[-1] + n // P)
        self.state = np.zeros(self.base[-1], dtype=np.uint8)
        self.addr = [a for a, _ in regions]
        self.offset = [0] * len(regions)  # source offset of each region (moved by REMAP)
        off = 0
        for i, (_, n) in enumerate(regions):
            self.offset[i] = off
            off += n
        #: Pages in state 0 (kept by :meth:`set`: no pass over the state per event).
        self.pending = int(self.base[-1])

    def set(self, lo: int, hi: int, value: int) -> None:
        """Global pages ``[lo, hi)`` take state ``value`` (1 or 2)."""
        seg = self.state[lo:hi]
        self.pending -= int(np.count_nonzero(seg == 0))
        seg[:] = value

    def served(self) -> int:
        return int(self.state.size) - self.pending

    def region_of(self, g: int) -> int:
        return next(k for k in range(len(self.regions)) if self.base[k] <= g < self.base[k + 1])

    def next_pending(self, start: int) -> int:
        """The first pending page at or after ``start``, wrapping around (-1: none left).
        Looks at the state a slice at a time: the cost is the distance travelled."""
        if not self.pending:
            return -1
        n = int(self.state.size)
        for lo, hi in ((min(start, n), n), (0, min(start, n))):
            for s in range(lo, hi, 1 << 16):
                k = np.flatnonzero(self.state[s : min(hi, s + (1 << 16))] == 0)
                if k.size:
                    return s + int(k[0])
        return -1

    def locate(self, address: int) -> tuple[int, int] | None:
        """(region index, page index within the global state array)."""
        for i, a in enumerate(self.addr):
            n = self.regions[i][1]
            if a <= address < a + n:
                return i, self.base[i] + (address - a) // P
        return None

    def _cut(self, at: int) -> None:
        """Split the live region that ``at`` falls inside of (its pieces keep their global
        pages and source offsets)."""
        for i, a in enumerate(self.addr):
            n = self.regions[i][1]
            if a < at < a + n:
                k = at - a
                self.regions[i : i + 1] = [(a, k), (at, n - k)]
                self.addr[i : i + 1] = [a, at]
                self.offset[i : i + 1] = [self.offset[i], self.offset[i] + k]
                self.base.insert(i + 1, self.base[i] + k // P)
                return

    def forget(self, start: int, end: int) -> None:
        """``[start, end)`` is no longer ours (unmapped, or replaced by a move onto it):
        its pages count as done and its pieces leave the address space (:data:`GONE`),
        so that another piece moved there later is the one found."""
        self._cut(start)
        self._cut(end)
        for i, a in enumerate(self.addr):
            if start <= a < end:
                self.set(self.base[i], self.base[i + 1], 1)
                self.addr[i] = GONE

    def remap(self, old: int, new: int, length: int) -> None:
        """``[old, old+length)`` now lies at ``new`` (``mremap``): a region the move cuts
        is split where it cuts, whatever was at ``new`` is gone (the kernel unmaps it),
        and the pieces inside the old span take their new addresses."""
        self._cut(old)
        self._cut(old + length)
        # The moving pieces, by their first global page (indices shift as forget cuts).
        moving = {self.base[i]: a for i, a in enumerate(self.addr) if old <= a < old + length}
        for i, b in enumerate(self.base[:-1]):
            if b in moving:
                self.addr[i] = GONE  # out of the way while the destination is cleared
        self.forget(new, new + length)
        for i, b in enumerate(self.base[:-1]):
            if b in moving:
                self.addr[i] = new + (moving[b] - old)

    def mark(self, start: int, end: int, value: int) -> None:
        for i, a in enumerate(self.addr):
            n = self.regions[i][1]
            lo, hi = max(start, a), min(end, a + n)
            if lo < hi:
                s = self.base[i] + (lo - a) // P
                self.set(s, s + (hi - lo) // P, value)


#: Threads of the handler that prefetch with a ``thread_safe`` source: each reads (and
#: verifies) a window and copies it in, so two windows are read and copied at once, on
#: two CPUs (``preadv``, the checksums and ``UFFDIO_COPY`` all run without the GIL).
PREFETCH_THREADS = 2
#: Windows queued for them (one more than the threads: a thread that ends a window
#: finds the next one waiting, without waiting for the main thread).
PREFETCH_QUEUE = PREFETCH_THREADS + 1
#: Largest prefetch window (a fault is served with at most :data:`MAX_WINDOW`): the
#: per-window work in Python (finding the pages, locating them in the source, the
#: thread hand-off) is paid once per window.
PREFETCH_WINDOW = 8 << 20


class _Prefetch:
    """Address-order prefetch, one window per job: read the window from the source into
    a buffer of the job's own, then copy its pending pages in (``UFFDIO_COPY``). With a
    source that may be read from several threads (``thread_safe``), the jobs run on
    :data:`PREFETCH_THREADS` worker threads, each reading *and* copying, so both halves
    of the work run on both CPUs; otherwise one at a time, in the calling thread.

    Page states and uffd messages stay with the main thread: a job only reads the
    states of its own window (no other job and no fault touches them while it runs) and
    returns the runs it filled, which :meth:`collect` marks. The main thread waits for
    the jobs in flight before it reads messages (:meth:`collect` with ``wait_all``), so
    no window is copied after a ``REMOVE``/``UNMAP``/``REMAP`` that it has not seen;
    to keep that wait short (a fault waits in it), it first tells the jobs to stop
    (:attr:`halt`): a job not started yet does nothing, one reading its window does not
    copy it, one copying stops at the next :data:`MAX_WINDOW` (what is left stays
    pending; prefetch resumes there). Only the pages still pending when a window is
    copied are filled."""

    def __init__(self, fh: FaultHandler, pages: _Pages, uf: Userfaultfd) -> None:
        self.fh, self.pages, self.uf = fh, pages, uf
        threaded = bool(getattr(fh.source, "thread_safe", False))
        n = PREFETCH_QUEUE if threaded else 1
        self.maps = [mmap.mmap(-1, PREFETCH_WINDOW, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for _ in range(n)]
        self.views = [memoryview(m) for m in self.maps]
        self.addrs = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self.maps]
        self.free = list(range(n))
        self.pool = ThreadPoolExecutor(PREFETCH_THREADS, "prefetch") if threaded else None
        # A job writes a byte here when it ends: the main thread polls it with the uffd.
        self.rfd, self.wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK) if threaded else (-1, -1)
        #: Jobs in flight: (result, lo, hi, buffer).
        self.jobs: list[tuple[Future[tuple[list[tuple[int, int]], bool]], int, int, int]] = []
        #: The next pending pages are in a window in flight: start nothing until a job ends.
        self.stalled = False
        #: Set by the main thread before it waits for the jobs: they stop early.
        self.halt = False
        #: The first page a halted job left pending (prefetch resumes there).
        self.resume = -1

    def can_start(self) -> bool:
        return bool(self.free) and not self.stalled

    def _plan(self, cursor: int, window: int) -> tuple[int, int] | None:
        g = self.pages.next_pending(cursor)
        if g < 0:
            return None
        i = self.pages.region_of(g)
        return g, min(self.pages.base[i + 1], g + window // P)

    def _job(self, lo: int, hi: int, b: int) -> tuple[list[tuple[int, int]], bool]:
        """Read and copy one window: (the runs filled, whether the job ran to its end
        rather than stopping for :attr:`halt`)."""
        if self.halt:
            return [], False
        pages = self.pages
        i = pages.region_of(lo)
        off = pages.offset[i] + (lo - pages.base[i]) * P
        has_data = self.fh.source.read(off, self.views[b][: (hi - lo) * P])
        if self.halt:
            return [], False
        return _copy_pending(self.uf, pages, lo, hi, self.addrs[b] if has_data else None, lambda: self.halt)

    def _wake(self, _res: Future[tuple[list[tuple[int, int]], bool]]) -> None:
        # A done callback: runs once the result is set, so the main thread, woken by
        # the byte, finds the job done.
        with contextlib.suppress(OSError):
            os.write(self.wfd, b"\0")

    def start(self, cursor: int, window: int) -> int:
        """Start a job on each free buffer, on the next pending pages at or after
        ``cursor`` (a window each; without threads: do one); returns where the next
        one starts."""
        while self.free:
            span = self._plan(cursor, window)
            if span is None or any(span[0] < hi and lo < span[1] for _, lo, hi, _ in self.jobs):
                self.stalled = bool(self.jobs)
                break
            lo, hi = span
            b = self.free.pop()
            if self.pool is None:  # one window, then back to look for faults
                self._done(self._job(lo, hi, b), lo, b)
                return hi
            else:
                res = self.pool.submit(self._job, lo, hi, b)
                res.add_done_callback(self._wake)
                self.jobs.append((res, lo, hi, b))
            cursor = hi
        return cursor

    def _done(self, result: tuple[list[tuple[int, int]], bool], lo: int, b: int) -> None:
        runs, whole = result
        for s, e in runs:
            self.pages.set(s, e, 1)
        if not whole:  # halted: the rest of the window is still pending
            self.resume = lo if self.resume < 0 else min(self.resume, lo)
        self.free.append(b)

    def collect(self, wait_all: bool = False) -> None:
        """Mark what the ended jobs filled; with ``wait_all``, halt the jobs and wait
        for every one. An error of a job (a damaged page) is raised here."""
        if self.rfd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.read(self.rfd, 64)
        self.halt = wait_all  # stays set if a job failed: the others stop too
        left = []
        for job in self.jobs:
            res, lo, _hi, b = job
            if wait_all or res.done():
                self._done(res.result(), lo, b)
                self.stalled = False
            else:
                left.append(job)
        self.halt = False
        self.jobs = left

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1


def _copy_pending(uf: Userfaultfd, pages: _Pages, lo: int, hi: int, src: int | None,
                  halt: Callable[[], bool] | None = None) -> tuple[list[tuple[int, int]], bool]:
    """Fill the pages of ``[lo, hi)`` (one region) still pending from ``src`` (the
    window's bytes; ``None``: zero pages), a run of at most :data:`MAX_WINDOW` at a
    time, stopping before the next one once ``halt()`` is true. Returns the runs filled
    (global pages; the caller marks them) and whether it went to the end."""
    i = pages.region_of(lo)
    todo = (pages.state[lo:hi] == 0).astype(np.int8)
    edges = np.flatnonzero(np.diff(todo, prepend=0, append=0))
    done: list[tuple[int, int]] = []
    step = MAX_WINDOW // P
    for s0, e in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        for s in range(s0, e, step):
            if halt is not None and halt():
                return done, False
            t = min(e, s + step)
            addr = pages.addr[i] + (lo + s - pages.base[i]) * P
            try:
                _fill(uf, addr, (t - s) * P, None if src is None else src + s * P)
            except _Retry:
                return done, True  # pages stay pending
            done.append((lo + s, lo + t))
    return done, True


def _handler_main(uf: Userfaultfd, fh: FaultHandler, life_w: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The owner's exit must end us too (nobody would fault any more; without prefetch we
    # would wait forever): poll a pidfd of the owner along with the uffd.
    owner_fd = os.pidfd_open(fh.owner)
    poller = select.poll()
    poller.register(uf.fd, select.POLLIN)
    poller.register(owner_fd, select.POLLIN)
    assert fh._shared is not None
    shared = fh._shared.arr
    pages = _Pages(fh.regions)
    # Anonymous memory, populated as it is used (a bytearray would zero-fill all of it
    # before the first fault is served).
    buf = mmap.mmap(-1, MAX_WINDOW, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    bufmv = memoryview(buf)
    buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    window = MIN_WINDOW
    cursor = 0  # global page index for prefetch
    hot = fh.hot if fh.hot is not None else np.empty(0, np.int64)
    hot_pos = 0  # next entry of `hot` to prefetch
    # First-touch record: pages that faulted, in order (a working set for next time).
    rec = fh.record
    if rec is not None:
        rec[0] = 0
    prefetch = fh.prefetch and rec is None
    ahead: _Prefetch | None = None
    state = STATE_FAILED
    # The owner usually touches at once: before any prefetch, give the first fault
    # FIRST_TOUCH_WAIT to come, so that it is never queued behind a window being read
    # (the source is warmed meanwhile, if no fault is waiting yet).
    first = True
    try:
        while True:
            if rec is not None and rec[-1]:  # the owner ended the recording
                rec, prefetch = None, True
            if not prefetch and shared[_FETCH_REST]:  # the owner wants every page now
                rec, prefetch = None, True
            if not pages.pending:
                state = STATE_DONE
                break
            try:
                # Prefetching with a free worker: only look whether a fault waits (with
                # every worker busy: sleep until a fault comes or a window is in).
                # Recording: wake now and then to see the owner end it (last element of `rec`).
                busy = hot_pos < hot.size or (prefetch and (ahead is None or ahead.can_start()))
                if first:
                    first = False
                    ready = poller.poll(0)
                    if not ready:  # no fault yet: warm the source, then give it FIRST_TOUCH_WAIT
                        _warm(fh.source)
                        ready = poller.poll(FIRST_TOUCH_WAIT if busy else 10 if rec is not None else _IDLE_LOOK)
                else:
                    ready = poller.poll(0 if busy else 10 if rec is not None else _IDLE_LOOK if not prefetch else -1)
            except InterruptedError:
                continue
            if any(fd == owner_fd for fd, _ in ready):
                break  # the owner exited: STATE_FAILED
            faulted = any(fd == uf.fd for fd, _ in ready)
            if ahead is not None and ahead.jobs:
                # Messages are read only with no window in flight (see _Prefetch).
                ahead.collect(wait_all=faulted)
            events = uf.read_events(timeout=0, max_events=64) if faulted else []
            if events:
                window = MIN_WINDOW
                for ev in events:
                    if isinstance(ev, PagefaultEvent):
                        loc = pages.locate(ev.address)
                        if loc is None or pages.state[loc[1]] == 1:
                            # Not ours to serve (a range grown in place by mremap), or served
                            # and since emptied without an event (moved out by UFFDIO_MOVE;
                            # or a repeated message): what such memory reads anywhere,
                            # a zero page (EEXIST, already there: its waiters are woken).
                            _zero_page(uf, ev.address)
                            continue
                        g = loc[1]
                        if rec is not None:
                            if pages.state[g] == 0:  # first touch (a repeated message: already in)
                                n = int(rec[0])
                                rec[n + 1] = g
                                rec[0] = n + 1
                            _serve_span(uf, fh, pages, g, g + 1, bufmv, buf_addr)
                        else:
                            _serve(uf, fh, pages, g, window, bufmv, buf_addr, shared)
                    elif isinstance(ev, RemoveEvent):
                        pages.mark(ev.start, ev.end, 2)  # discarded: later faults get zero pages
                    elif isinstance(ev, UnmapEvent):
                        pages.forget(ev.start, ev.end)
                        _publish(shared, pages)
                    elif isinstance(ev, RemapEvent):
                        pages.remap(ev.from_, ev.to, ev.len)
                        _publish(shared, pages)
                shared[0] = pages.served()
                if hot_pos >= hot.size:
                    continue
            if hot_pos < hot.size:
                # A recorded working set: its pages first, in recorded order, a batch at
                # a time (sorted into runs: few copies), between faults too -- a program
                # that faults continuously never leaves the handler idle.
                batch = hot[hot_pos : hot_pos + HOT_BATCH]
                hot_pos += batch.size
                batch = np.unique(batch[pages.state[batch] == 0])
                _serve_pages(uf, fh, pages, batch, bufmv, buf_addr)
                shared[0] = pages.served()
                continue
            if not prefetch:
                continue
            # No fault waiting: prefetch the next pending pages.
            if ahead is None:
                ahead = _Prefetch(fh, pages, uf)
                if ahead.rfd >= 0:
                    poller.register(ahead.rfd, select.POLLIN)
            if ahead.resume >= 0:  # windows halted for a fault: go back to them
                cursor, ahead.resume = min(cursor, ahead.resume), -1
            if ahead.can_start():
                cursor = ahead.start(cursor, window)
                window = min(window * 2, PREFETCH_WINDOW)
            shared[0] = pages.served()
        if state == STATE_DONE:
            for a, n in zip(pages.addr, (n for _, n in pages.regions)):
                if a != GONE:
                    with contextlib.suppress(OSError):
                        uf.unregister(a, n)
    except ProcessLookupError:
        state = STATE_FAILED  # the owner is gone
    finally:
        if ahead is not None:
            ahead.close()
        shared[1] = state
        if life_w >= 0:  # -1: a fault server's handler, guarded by the server (its exit status)
            with contextlib.suppress(OSError):
                os.write(life_w, b"D" if state == STATE_DONE else b"F")
            os.close(life_w)
        os.close(owner_fd)
    return 0 if state == STATE_DONE else 1


def _publish(shared: Any, pages: _Pages) -> None:
    """Write where the regions are now into the shared page, for the guardian."""
    live = [(a, length) for a, (_, length) in zip(pages.addr, pages.regions) if a != GONE]
    shared[_PIECES] = _UNKNOWN  # (a handler killed while writing leaves it so)
    if len(live) > _MAX_PIECES:
        return
    for k, (a, length) in enumerate(live):
        shared[_TABLE + 2 * k] = a
        shared[_TABLE + 2 * k + 1] = length
    shared[_PIECES] = len(live) or _UNKNOWN - 1  # (none left: nothing to poison)


def _where_now(regions: list[tuple[int, int]], shared: Any) -> list[tuple[int, int]]:
    """The regions where the handler last saw them (``shared``: the shared page's words,
    or ``None``): moved by ``mremap``, else as registered."""
    n = 0 if shared is None else int(shared[_PIECES])
    if n == _UNKNOWN - 1:
        return []  # every region unmapped
    if not 0 < n <= _MAX_PIECES:
        return regions
    return [(int(shared[_TABLE + 2 * k]), int(shared[_TABLE + 2 * k + 1])) for k in range(n)]


def _warm(source: Source) -> None:
    """Let a source with a ``warm()`` method do its first-use work (opening, caching,
    the first pass through its code in this new process) while no fault waits; its
    errors are left for the faults that need the pages."""
    warm = getattr(source, "warm", None)
    if warm is not None:
        with contextlib.suppress(Exception):
            warm()


#: Pages of a recorded working set prefetched between two looks at the fault queue.
HOT_BATCH = 256

#: Milliseconds the handler waits, once, for the first fault before it prefetches
#: anything: a lazy load is usually touched at once, and a first fault that arrives
#: while a prefetch window is being read waits for that window (milliseconds).
FIRST_TOUCH_WAIT = 5


def _runs_within_regions(sorted_pages: np.ndarray, base: list[int]) -> list[tuple[int, int]]:
    """Runs ``[lo, hi)`` of consecutive pages, cut at region boundaries."""
    if not sorted_pages.size:
        return []
    region = np.searchsorted(np.asarray(base), sorted_pages, side="right")
    cuts = np.flatnonzero((np.diff(sorted_pages) != 1) | (np.diff(region) != 0)) + 1
    first = np.concatenate([[0], cuts])
    last = np.concatenate([cuts, [sorted_pages.size]]) - 1
    out: list[tuple[int, int]] = []
    for f, la in zip(first.tolist(), last.tolist()):
        lo, hi = int(sorted_pages[f]), int(sorted_pages[la]) + 1
        for s in range(lo, hi, MAX_WINDOW // P):  # the copy buffer holds MAX_WINDOW
            out.append((s, min(hi, s + MAX_WINDOW // P)))
    return out


def _serve_pages(uf: Userfaultfd, fh: FaultHandler, pages: _Pages, batch: np.ndarray,
                 bufmv: memoryview, buf_addr: int) -> None:
    """Resolve the pending pages ``batch`` (sorted global pages, at most MAX_WINDOW of them).

    A source with ``read_many(offsets, rows)`` reads them all in one call (scattered
    pages: one pass instead of one call per page); each run of consecutive pages is
    then one ``UFFDIO_COPY``.
    """
    read_many = getattr(fh.source, "read_many", None)
    if read_many is None or not batch.size:
        for lo, hi in _runs_within_regions(batch, pages.base):
            _serve_span(uf, fh, pages, lo, hi, bufmv, buf_addr)
        return
    base = np.asarray(pages.base)
    region = np.searchsorted(base, batch, side="right") - 1
    rel = batch - base[region]
    offsets = np.asarray(pages.offset, dtype=np.int64)[region] + rel * P
    rows = np.frombuffer(bufmv, dtype=np.uint8, count=batch.size * P).reshape(batch.size, P)
    read_many(offsets, rows)
    k = 0
    for lo, hi in _runs_within_regions(batch, pages.base):
        i = int(region[k])
        addr = pages.addr[i] + int(rel[k]) * P
        try:
            _fill(uf, addr, (hi - lo) * P, buf_addr + k * P)
        except _Retry:
            return  # pages stay pending
        pages.set(lo, hi, 1)
        k += hi - lo


class _Retry(Exception):
    """The mm is changing (a non-cooperative event is pending): read events, then retry."""


def _serve(
    uf: Userfaultfd, fh: FaultHandler, pages: _Pages, gidx: int, window: int,
    bufmv: memoryview, buf_addr: int, shared: Any,
) -> None:
    """Resolve the pending pages in the window around global page ``gidx``."""
    i = next(k for k in range(len(pages.regions)) if pages.base[k] <= gidx < pages.base[k + 1])
    wpages = window // P
    lo = max(pages.base[i], gidx - gidx % wpages)  # window aligned down: serve the fault's neighbours too
    hi = min(pages.base[i + 1], lo + wpages)
    _serve_span(uf, fh, pages, lo, hi, bufmv, buf_addr)
    shared[0] = pages.served()


def _serve_span(uf: Userfaultfd, fh: FaultHandler, pages: _Pages, lo: int, hi: int,
                bufmv: memoryview, buf_addr: int) -> None:
    """Resolve the pending pages among the global pages ``[lo, hi)`` (within one region)."""
    i = next(k for k in range(len(pages.regions)) if pages.base[k] <= lo < pages.base[k + 1])
    st = pages.state[lo:hi]
    n = hi - lo
    k = 0
    while k < n:
        if st[k] == 1:
            k += 1
            continue
        kind = st[k]
        j = k
        while j < n and st[j] == kind:
            j += 1
        page0 = lo + k
        addr = pages.addr[i] + (page0 - pages.base[i]) * P
        length = (j - k) * P
        src: int | None = None
        if kind == 0:
            src_off = pages.offset[i] + (page0 - pages.base[i]) * P
            if fh.source.read(src_off, bufmv[:length]):
                src = buf_addr
        try:
            _fill(uf, addr, length, src)
        except _Retry:
            return  # pages stay pending
        pages.set(page0, lo + j, 1)
        k = j


def _fill(uf: Userfaultfd, addr: int, length: int, src: int | None) -> None:
    """``UFFDIO_COPY`` from ``src`` (or ``UFFDIO_ZEROPAGE``) into ``[addr, addr+length)``.

    A page that is already present (EEXIST: a race with a fault or the owner) is
    skipped and its waiters are woken. ENOENT refuses the whole span, with nothing
    done, both when part of it is no longer registered (unmapped) and when it crosses
    from one VMA into the next: a registered range is often several VMAs (flags
    differing by ``madvise``/``mprotect``/``mlock``; on the malloc heap, a
    ``MADV_HUGEPAGE`` left by an earlier allocation), and the kernel resolves within
    one VMA only. So the span is halved down to single pages; only a single page
    that gets ENOENT is skipped (it is gone).
    """

    def op(off: int, ln: int) -> None:
        if src is None:
            uf.zeropage(addr + off, ln)
        else:
            uf.copy(addr + off, src + off, ln)

    done = 0
    while done < length:
        left = length - done
        try:
            op(done, left)
            return
        except PartialProgressError as err:
            if err.done <= 0:
                raise _Retry from None
            done += err.done
        except FileNotFoundError:
            _halves(lambda a, n: _fill(uf, a, n, None if src is None else src + (a - addr)), addr + done, left)
            return
        except FileExistsError:
            with contextlib.suppress(OSError):
                uf.wake(addr + done, P)  # already in: wake its waiters, go on after it
            done += P


def _zero_page(uf: Userfaultfd, address: int) -> None:
    """Resolve a fault at ``address`` with a zero page (EEXIST, already there, or EAGAIN,
    the mm changing: wake its waiters, who fault again if need be; ENOENT, the page is
    gone: nothing to do)."""
    page = address - address % P
    try:
        uf.zeropage(page, P)
    except (FileExistsError, PartialProgressError):  # (EAGAIN, the mm changing: it faults again)
        with contextlib.suppress(OSError):
            uf.wake(page, P)
    except FileNotFoundError:
        pass


def _halves(op: Callable[[int, int], object], start: int, length: int) -> None:
    """``op(address, length)`` on the two halves of ``[start, start+length)`` (page
    multiples), each halved again while ``op`` raises ENOENT; a single page's ENOENT is
    ignored (that page is gone).

    For a span the kernel refused with ENOENT: it crosses a VMA boundary (each
    resolving ioctl works within one VMA), or part of it is unmapped.
    """
    if length <= P:
        return
    half = length // P // 2 * P
    for s, n in ((start, half), (start + half, length - half)):
        try:
            op(s, n)
        except FileNotFoundError:
            _halves(op, s, n)


#: The guardian as a program of its own: it imports nothing but ``os`` and ``sys`` until
#: the handler ends, and all of pagescan only if it has pages to poison. The uffd is its
#: fd 3, the read end of the handler's pipe its fd 4, the shared page's memfd its fd 5.
_GUARDIAN_PROGRAM = """\
import os, sys
msg = b""
while True:
    chunk = os.read(4, 1)
    if not chunk:
        break
    msg = chunk
if msg != b"D":
    sys.path[:0] = sys.argv[3].split(os.pathsep)
    from pagescan.handler import _guardian_poison
    _guardian_poison(3, sys.argv[1], int(sys.argv[2]), 5)
"""


#: Populated anonymous memory of the owner above which the guardian is spawned rather
#: than forked: ``posix_spawn`` costs 2-6 ms here (the owner waits for the ``exec``),
#: ``fork`` 0.5 ms in a small process and about 25 ms per GiB populated.
SPAWN_ABOVE = 256 << 20


def _anon_bytes() -> int:
    """``RssAnon`` of this process (bytes; 0 if unknown)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _spawn_guardian(uffd: int, life_r: int, shared_fd: int, regions: list[tuple[int, int]],
                    owner: int) -> Child | None:
    """Start the guardian with ``posix_spawn`` of a fresh interpreter when this process
    has populated more than :data:`SPAWN_ABOVE` bytes of anonymous memory (``None``
    otherwise, or if that is not possible: the caller forks one instead).

    A ``fork`` copies the page tables of every page the owner has populated (about
    25 ms per GiB here, done twice when both helpers are forked); ``posix_spawn``
    (``vfork`` + ``exec``) copies none. The guardian has its own process group, so a
    signal to the owner's group (Ctrl-C) that kills the handler leaves the guardian
    to poison the pages. It holds the uffd from the moment it exists.
    """
    if not sys.executable or _anon_bytes() < SPAWN_ABOVE:
        return None
    fds = [uffd, life_r, shared_fd]
    extra = []
    try:
        # dup2 onto fds 3, 4 and 5 in the child; a source already numbered 3 to 5 is
        # moved out of the way first (dup2 of an fd onto itself keeps FD_CLOEXEC).
        for i, fd in enumerate(fds):
            if fd in (3, 4, 5):
                fds[i] = os.dup(fd)
                extra.append(fds[i])
        # Where this pagescan is (first), then the owner's path (numpy): the guardian
        # finds both without site-packages' .pth files or import hooks.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        argv = [sys.executable, "-I", "-S", "-c", _GUARDIAN_PROGRAM,
                ",".join(f"{a:x}:{n:x}" for a, n in regions), str(owner), os.pathsep.join([here, *sys.path])]
        pid = os.posix_spawn(sys.executable, argv, dict(os.environ), setpgroup=0,
                             file_actions=[(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(fds)])
    except OSError:
        return None
    finally:
        for fd in extra:
            os.close(fd)
    return Child(pid)


def _guardian_poison(uffd: int, regions: str, owner: int, shared_fd: int) -> None:
    """The spawned guardian, once the handler has ended without finishing: poison what is
    still empty (:func:`_poison_empty`) where the regions are now."""
    uf = Userfaultfd.from_fd(uffd)
    spans = [(int(a, 16), int(n, 16)) for a, n in (r.split(":") for r in regions.split(","))]
    _poison_empty(uf, _where_now(spans, _Shared(shared_fd).arr), owner)


def _guardian(uf: Userfaultfd, regions: list[tuple[int, int]], owner: int, life_r: int, shared: Any) -> None:
    """Wait for the handler to end; if it did not finish, poison what is still empty
    where the regions are now (``shared``: the shared page's words)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    msg = b""
    while True:
        try:
            chunk = os.read(life_r, 1)
        except InterruptedError:
            continue
        if not chunk:
            break
        msg = chunk
    if msg == b"D":
        return
    _poison_empty(uf, _where_now(regions, shared), owner)


def _poison_empty(uf: Userfaultfd, regions: list[tuple[int, int]], owner: int) -> None:
    from ._scan import scan

    empty = int(Category.PRESENT | Category.SWAPPED)
    for _ in range(100):
        with contextlib.suppress(OSError):
            uf.read_events(timeout=0, max_events=256)  # unblock pending non-cooperative events
        left = 0
        for a, n in regions:
            try:
                res = scan(a, a + n, pid=owner, category_mask=empty, category_inverted=empty, return_mask=0)
            except OSError:
                return
            for s, e, _ in res.regions.tolist():
                left += 1
                with contextlib.suppress(OSError):  # a run of empty pages may span VMAs: split it
                    try:
                        uf.poison(s, e - s)
                    except FileNotFoundError:
                        _halves(uf.poison, s, e - s)
        if not left:
            return
