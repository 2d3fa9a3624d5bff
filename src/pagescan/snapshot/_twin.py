"""A frozen twin: a ``fork()`` of this process whose memory is ours at the instant of the fork.

``fork()`` copies the address space copy-on-write: the kernel write-protects every
private page in both processes (under the mmap lock, with a TLB flush), so after it
returns the child's pages keep the contents they had at that instant, whatever our
threads write afterwards (a write, by any thread, with or without the GIL, faults and
gets a private copy in the writing process). Reading the child's pages therefore
reads the memory of one instant. The cost is the ``fork()`` itself (copying page
tables: about 8 ms per GiB populated here) plus one page copy per page written
meanwhile, in the writer.

The pages are read through ``/proc/PID/mem``, not ``process_vm_readv``: the latter
pins the pages it reads (``FOLL_PIN``), and the kernel *unshares* a copy-on-write
anonymous page before a read-only pin (it copies it into the pinning side, so that the
pin observes later writes): every page read from the twin would be copied in it, as
much extra memory as the checkpoint reads, and a second copy of each page
(measured: 256 MiB read cost 275 MiB of PSS and ran 3x slower). ``/proc/PID/mem``
takes plain references (``FOLL_GET``): no unsharing, no extra memory.

The child must not change the state it holds. It runs as little as possible: Python's
``os.fork`` runs the interpreter's after-fork hooks in it; then it disables the
garbage collector (no finalizer of the program runs in it), blocks every signal (a
terminal's Ctrl-C or a ``kill`` of the process group does not end it early), and
sleeps in ``poll`` on a pidfd of its parent: it exits when the parent dies, and the
parent kills it (``SIGKILL``) and reaps it when the copy is done. The parent never
needs the child to do anything: its memory is read whatever it is doing.
:meth:`FrozenTwin.unchanged` tells which of our pages are still the twin's very pages
(the same PFN in both pagemaps: not written by us since the fork). The uffd
write tracking is not inherited (the child's VMAs are not registered; see
:mod:`pagescan.writewatch`), and a WriteWatch refuses to act in a forked child, so the
child never unregisters the parent's ranges.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import mmap
import os
import select
import signal

import numpy as np

from .._child import Child, fork
from .._uapi import libc
from .._uapi.pagemap import PM

__all__ = ["GAP", "FrozenTwin", "ProcMem"]

#: Runs at most this many bytes apart are read in one call (the bytes between are read too).
GAP = 4 * 4096
#: :meth:`FrozenTwin.unchanged` reads the pagemap entries of pages at most this many
#: pages apart in one call (8 bytes per page).
SPAN_GAP = 4096
P = mmap.PAGESIZE


def _twin_main(parent: int) -> int:  # pragma: no cover - runs in the child
    gc.disable()
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    fd = os.pidfd_open(parent)
    if os.getppid() != parent:  # the parent died before we watched it
        return 0
    p = select.poll()
    p.register(fd, select.POLLIN)
    while not p.poll():
        pass
    return 0


class ProcMem:
    """Reads of a process's memory through ``/proc/PID/mem`` (``pid=None``: ours).

    Plain page references (``FOLL_GET``), never pins: reading a page that is shared
    copy-on-write (with a frozen twin) does not unshare it (see the module docstring)."""

    #: Keep the GIL for each read (:func:`pagescan._uapi.libc.preadv`): only for a
    #: process none of whose reads can wait on one of our threads.
    keep_gil = False

    def __init__(self, pid: int | None = None) -> None:
        self._junk = np.zeros(GAP, np.uint8)
        self.mem = os.open(f"/proc/{'self' if pid is None else pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def _what(self) -> str:
        return "this process"

    def read(self, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray, offsets: np.ndarray) -> None:
        """Read the runs ``[starts[i], starts[i] + lengths[i])`` of the process into ``out`` at byte ``offsets[i]``.

        Runs in ascending order less than :data:`GAP` bytes apart are read by one
        ``preadv`` of ``/proc/PID/mem`` (up to 512 runs; the bytes between them go to a
        scratch buffer). A span that cannot be read whole (a hole between two mappings)
        is read run by run. A run the kernel cannot read (the twin ended: ``0`` bytes)
        raises ``OSError``. ``out`` (C-contiguous, writable) must hold every run: checked,
        since the kernel writes there.
        """
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out must be a C-contiguous, writable array")
        n = len(starts)
        if not n:
            return
        st = starts.astype(np.int64)
        ln = lengths.astype(np.int64)
        of = offsets.astype(np.int64)
        flat = out.reshape(-1).view(np.uint8)
        if bool((of < 0).any() or (ln < 0).any()) or int((of + ln).max()) > flat.nbytes:
            raise ValueError("the runs do not fit in out")
        gap = st[1:] - (st[:-1] + ln[:-1])
        cut = np.flatnonzero((gap < 0) | (gap > GAP)) + 1
        bounds = np.concatenate([[0], cut, [n]])
        # Spans of at most 512 runs: 1023 iovecs (a run, then the gap after it).
        lo = np.concatenate([np.arange(a, b, 512) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())])
        hi = np.append(lo[1:], n)
        iov = np.zeros(2 * n, dtype=libc.IOVEC)
        iov["base"][0::2] = of + int(flat.ctypes.data)
        iov["len"][0::2] = ln
        iov["base"][1::2] = int(self._junk.ctypes.data)
        inner = np.ones(n, bool)
        inner[hi - 1] = False  # no gap read after a span's last run
        iov["len"][1:-1:2] = np.where(inner[:-1], np.maximum(gap, 0), 0)
        want = st[hi - 1] + ln[hi - 1] - st[lo]
        addr = int(iov.ctypes.data)
        size = libc.IOVEC.itemsize
        keep = self.keep_gil
        fd = self.mem
        for a, b, w, at in zip(lo.tolist(), hi.tolist(), want.tolist(), st[lo].tolist()):
            try:
                got = libc.preadv(fd, addr + 2 * a * size, 2 * (b - a) - 1, at, keep)
            except OSError:
                got = -1
            if got != w:
                mv = flat.data
                for k in range(a, b):
                    o = int(of[k])
                    self._read_run(int(st[k]), int(ln[k]), mv[o:o + int(ln[k])])

    def _read_run(self, start: int, n: int, into: memoryview) -> None:
        done = 0
        while done < n:
            got = os.preadv(self.mem, [into[done:]], start + done)
            if got <= 0:
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: cannot read {start + done:#x} in "
                              f"{self._what()}")
            done += got

    def close(self) -> None:
        """Close the file (idempotent)."""
        if getattr(self, "mem", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self.mem)
            self.mem = -1


class FrozenTwin(ProcMem):
    """A forked copy of this process, holding its memory as it was at the fork.

    Its reads keep the GIL (:attr:`ProcMem.keep_gil`): a checkpoint reads thousands of
    runs, and with a busy Python thread running, taking the GIL back after each read
    cost up to a switch interval (measured: 15,400 reads of 100 MiB took 15.5 s while a
    thread looped; 0.57 s kept). No read of the twin waits on one of our threads: it
    inherits no ``userfaultfd`` registration (pagescan never asks for
    ``UFFD_FEATURE_EVENT_FORK``; with a handler that did, the ``fork()`` itself waits
    for it), so a page is read or is absent. (One case is not covered: state in a file
    mapping whose file system is served by a thread of this process, a FUSE server
    running in it, would make a read of a page not in memory wait for that thread.)"""

    keep_gil = True

    def __init__(self) -> None:
        parent = os.getpid()
        self.mem = -1
        self.child: Child = fork(lambda: _twin_main(parent))
        try:
            super().__init__(self.child.pid)
        except OSError as err:  # it ended before its memory could be opened: say how
            why = self.died(1.0)
            self.close()
            if why is None:
                raise
            raise why from err
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.child.pid

    def died(self, timeout: float = 0) -> OSError | None:
        """An ``OSError(ESRCH)`` saying how the twin ended if it is gone (within ``timeout`` s), else ``None``."""
        status = self.child.wait(timeout)
        if status is None:
            return None
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        return OSError(errno.ESRCH, f"{os.strerror(errno.ESRCH)}: the frozen copy of this process that the "
                       f"checkpoint reads (pid {self.child.pid}) ended ({how})")

    def _what(self) -> str:
        return f"the frozen copy (pid {self.child.pid})"

    def unchanged(self, pages: np.ndarray) -> np.ndarray:
        """For each page address (ascending): is it still the very physical page the twin
        maps there (so its bytes are the twin's)? From both processes' ``pagemap``
        entries: present in both with the same PFN. A page this process wrote since the
        fork was copied on write (a new PFN); one read as PFN 0 (no ``CAP_SYS_ADMIN``:
        the kernel hides PFNs), or not present in either, is not known to be unchanged."""
        same = np.zeros(len(pages), dtype=bool)
        if not len(pages):
            return same
        pg = pages.astype(np.int64) // P
        cut = np.flatnonzero(np.diff(pg) > SPAN_GAP) + 1
        bounds = np.concatenate([[0], cut, [len(pg)]]).tolist()
        fds = [os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC) for pid in ("self", self.child.pid)]
        try:
            for a, b in zip(bounds[:-1], bounds[1:]):
                lo, hi = int(pg[a]), int(pg[b - 1]) + 1
                ent = []
                for fd in fds:
                    e = np.zeros(hi - lo, dtype=np.uint64)
                    got = os.preadv(fd, [e.data.cast("B")], lo * 8)
                    e[got // 8:] = 0  # a short read: unknown
                    ent.append(e[pg[a:b] - lo])
                mine, theirs = ent
                pfn = mine & np.uint64(PM.PFN_MASK)
                same[a:b] = ((mine & theirs & np.uint64(PM.PRESENT)) != 0) & (pfn != 0) & (
                    pfn == (theirs & np.uint64(PM.PFN_MASK)))
        finally:
            for fd in fds:
                os.close(fd)
        return same

    def close(self) -> None:
        """Kill and reap the twin (idempotent)."""
        super().close()
        self.child.kill()
        self.child.wait()
