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

    def __init__(self, pid: int | None = None) -> None:
        self._junk = memoryview(bytearray(GAP))
        self.mem = os.open(f"/proc/{'self' if pid is None else pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def _what(self) -> str:
        return "this process"

    def read(self, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray, offsets: np.ndarray) -> None:
        """Read the runs ``[starts[i], starts[i] + lengths[i])`` of the process into ``out`` at byte ``offsets[i]``.

        Runs in ascending order less than :data:`GAP` bytes apart are read by one
        ``preadv`` of ``/proc/PID/mem`` (up to 512 runs; the bytes between them go to a
        scratch buffer): each call releases the GIL once, and a thread that holds it
        meanwhile (a busy writer) can delay us by a whole switch interval, so fewer,
        larger reads win. A span that cannot be read whole (a hole between two
        mappings) is read run by run. A run the kernel cannot read (the twin ended:
        ``0`` bytes) raises ``OSError``.
        """
        mv = out.reshape(-1).view(np.uint8).data
        n = len(starts)
        if not n:
            return
        st = starts.astype(np.int64)
        ln = lengths.astype(np.int64)
        of = offsets.astype(np.int64)
        gap = st[1:] - (st[:-1] + ln[:-1])
        cut = np.flatnonzero((gap < 0) | (gap > GAP)) + 1
        bounds = np.concatenate([[0], cut, [n]]).tolist()
        s_, l_, o_, g_ = st.tolist(), ln.tolist(), of.tolist(), np.concatenate([gap, [0]]).tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            for i in range(a, b, 512):
                j = min(b, i + 512)
                bufs = []
                for k in range(i, j):
                    bufs.append(mv[o_[k]:o_[k] + l_[k]])
                    if k + 1 < j and g_[k]:
                        bufs.append(self._junk[:g_[k]])
                want = s_[j - 1] + l_[j - 1] - s_[i]
                try:
                    got = os.preadv(self.mem, bufs, s_[i]) if j - i > 1 else -1
                except OSError:
                    got = -1
                if got != want:
                    for k in range(i, j):
                        self._read_run(s_[k], l_[k], mv[o_[k]:o_[k] + l_[k]])

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
    """A forked copy of this process, holding its memory as it was at the fork."""

    def __init__(self) -> None:
        parent = os.getpid()
        self.mem = -1
        self.child: Child = fork(lambda: _twin_main(parent))
        try:
            super().__init__(self.child.pid)
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
