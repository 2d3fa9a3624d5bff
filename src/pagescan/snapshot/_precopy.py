"""Pre-copy rounds and a short stop of every thread, done by a helper process.

The instant of a generation without ``fork()``: a long-lived helper process (started
with ``posix_spawn``, so it shares no memory with us, in its own process group: a
Ctrl-C for the program's group does not end it) copies the written pages of the
tracked ranges into a *staging* area, a memfd that both processes map, while our
threads keep running:

1. pre-copy rounds: ``PAGEMAP_SCAN`` of ``/proc/OURPID/pagemap`` finds the pages
   written since the previous checkpoint and re-arms them (``PM_SCAN_WP_MATCHING``,
   the same async uffd-WP tracking the :class:`~pagescan.WriteWatch` set up), then
   ``process_vm_readv`` copies them into their slots in the staging area. A page
   written again after it was re-armed is found by the next round and copied again.
   Rounds stop when they no longer shrink by half (a hot set the program keeps
   rewriting: that last set is left for the stop to copy) or after :data:`ROUNDS`.
2. the stop: every thread of ours is stopped with ptrace (:mod:`._freeze`), the
   pages written since the last round are found, re-armed and copied, the threads
   are let go. That is the instant: for every page, its last copy is its content at
   the stop (a page copied earlier and not written since has not changed; a write
   racing a round's re-arm lands before the walk's TLB flush returns, so before the
   copy, or faults and marks the page written again).

The helper replies with every page it found (the chunks to store); the caller writes
the generation from the staging area in the background and empties it after. The
tracking goes on from the instant: pages written after the stop are the next
checkpoint's. If the kernel refuses to trace us (Yama ``ptrace_scope`` 2 or 3, a
debugger attached, no ``CAP_SYS_PTRACE``) the reply says so, with the pages the
rounds found (and re-armed), and the caller takes the instant with a ``fork()``
instead. If the helper dies, the kernel lets our threads go, and the caller sees the
end of the socket.

Cost: the pause of the calling thread is the rounds plus the stop; the other threads
only stall for the stop (a walk of the ranges plus the copy of what was written since
the last round). Extra memory: the staging area holds every page found, until the
generation is written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._uapi import libc
from .._uapi.mman import MADV
from .._uapi.ptrace import PR_SET_PTRACER

__all__ = ["ROUNDS", "Precopier", "Refused", "main"]

P = mmap.PAGESIZE
#: At most this many pre-copy rounds before the stop.
ROUNDS = 4
#: A round that finds at most this many pages is the last one before the stop.
SMALL = 64
#: The staging area keeps up to this many bytes allocated between checkpoints.
KEEP = 64 << 20

#: Seconds between checks that the helper is not stopped while we wait for its reply.
STOPPED_CHECK = 0.5

_LEN = struct.Struct("<QQ")


def _stopped(pid: int) -> bool:
    """Is ``pid`` in a stop (``T``: SIGSTOP and the like; ``t``: a debugger's)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _send(sock: socket.socket, head: dict[str, Any], blob: bytes = b"") -> None:
    """One message: lengths, a JSON head, a binary blob (one ``send`` where it fits)."""
    h = json.dumps(head).encode()
    sock.sendall(_LEN.pack(len(h), len(blob)) + h + blob)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    n, m = _LEN.unpack(_recv_exact(sock, _LEN.size))
    body = _recv_exact(sock, n + m)
    return json.loads(body[:n]), body[n:]


def _runs(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.int64).reshape(-1, 2)


def merge_runs(runs: np.ndarray) -> np.ndarray:
    """Sorted, disjoint ``(start, end)`` runs covering the given (possibly overlapping) ones."""
    if len(runs) <= 1:
        return runs.reshape(-1, 2).astype(np.int64)
    r = runs[np.argsort(runs[:, 0], kind="stable")].astype(np.int64)
    ends = np.maximum.accumulate(r[:, 1])
    new = np.concatenate([[True], r[1:, 0] > ends[:-1]])
    first = np.flatnonzero(new)
    last = np.concatenate([first[1:], [len(r)]]) - 1
    return np.stack([r[first, 0], ends[last]], axis=1)


def subtract_runs(runs: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Sorted disjoint ``(start, end)`` runs less sorted disjoint ``holes`` (page-aligned)."""
    if not len(runs) or not len(holes):
        return runs
    lens = (runs[:, 1] - runs[:, 0]) // P
    pages = np.repeat(runs[:, 0], lens) + (np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)) * P
    hlens = (holes[:, 1] - holes[:, 0]) // P
    hpages = np.repeat(holes[:, 0], hlens) + (
        np.arange(int(hlens.sum())) - np.repeat(np.cumsum(hlens) - hlens, hlens)) * P
    pages = pages[~np.isin(pages, hpages)]
    if not len(pages):
        return np.empty((0, 2), np.int64)
    cut = np.flatnonzero(np.diff(pages) != P) + 1
    first = np.concatenate([[0], cut])
    last = np.concatenate([cut, [len(pages)]]) - 1
    return np.stack([pages[first], pages[last] + P], axis=1).astype(np.int64)


# -- the helper process -------------------------------------------------------------------


class _Helper:
    def __init__(self, parent: int, sock: socket.socket, memfd: int, ranges: np.ndarray, neighbors: bool,
                 aliased: np.ndarray | None = None) -> None:
        from .._target import Target

        self.parent, self.sock = parent, sock
        self.ranges = ranges
        self.neighbors = neighbors
        #: Runs that other mappings can write unseen (not private anonymous memory):
        #: copied whole in every stop, and reported found.
        self.aliased = np.empty((0, 2), np.int64) if aliased is None else aliased
        lens = ranges[:, 1] - ranges[:, 0]
        self.soff = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        total = int(lens.sum())
        self.map = mmap.mmap(memfd, total, mmap.MAP_SHARED)
        os.close(memfd)
        self.stage = np.frombuffer(self.map, dtype=np.uint8)
        self.target = Target(parent)
        self.guards: list[np.ndarray] = []  # guard pages met by copy() in this checkpoint

    def scan(self) -> np.ndarray:
        """Written runs of the ranges, re-armed in the same walk.

        On the kernel's ``WRITTEN``-only fast path, which also reports (and arms) a guard
        page installed since the last walk, once: :meth:`copy` finds it (a guard page
        cannot be read) and leaves it out."""
        from .._scan import scan_iter
        from .._uapi.pagemap import Category, ScanFlag

        flags = int(ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC)
        parts = []
        for lo, hi in self.ranges.tolist():
            for res in scan_iter(lo, hi, pid=self.target, flags=flags, category_mask=int(Category.WRITTEN),
                                 return_mask=int(Category.WRITTEN)):
                if len(res.regions):
                    parts.append(np.stack([res.regions["start"], res.regions["end"]], axis=1).astype(np.int64))
        return np.concatenate(parts) if parts else np.empty((0, 2), np.int64)

    def copy(self, runs: np.ndarray) -> int:
        """Copy ``runs`` (widened by a page each side for unaligned entries) into the staging area."""
        if not len(runs):
            return 0
        if self.neighbors:
            runs = runs + np.array([-P, P], np.int64)
            r = np.searchsorted(self.ranges[:, 0], runs[:, 0] + P, side="right") - 1
            runs = np.stack([np.maximum(runs[:, 0], self.ranges[r, 0]), np.minimum(runs[:, 1], self.ranges[r, 1])],
                            axis=1)
            runs = merge_runs(runs)
        try:
            return self._read(runs)
        except OSError as err:
            if err.errno != errno.EFAULT:
                raise
            # A page that cannot be read: a guard page the fast-path walk reported? Left
            # out of the copy and of the reply: the generation then holds what the walk
            # masked to leave guard pages out would give. Anything else is raised.
            guards = self.guard_runs(runs)
            if not len(guards):
                raise
        self.guards.append(guards)
        return self._read(subtract_runs(runs, guards))

    def _read(self, runs: np.ndarray) -> int:
        if not len(runs):
            return 0
        r = np.searchsorted(self.ranges[:, 0], runs[:, 0], side="right") - 1
        offs = runs[:, 0] - self.ranges[r, 0] + self.soff[r]
        lens = runs[:, 1] - runs[:, 0]
        libc.read_runs(self.parent, runs[:, 0].astype(np.uint64), lens.astype(np.uint64), self.stage,
                       offs.astype(np.uint64))
        return int(lens.sum())

    def guard_runs(self, runs: np.ndarray) -> np.ndarray:
        """The guard pages among ``runs``, as runs: one walk asking only for GUARD (not on
        the fast path, and not re-arming) from the first run to the last."""
        from .._scan import scan_iter
        from .._uapi.pagemap import Category

        g = int(Category.GUARD)
        parts = [np.stack([res.regions["start"], res.regions["end"]], axis=1).astype(np.int64)
                 for res in scan_iter(int(runs[0, 0]), int(runs[-1, 1]), pid=self.target,
                                      category_anyof_mask=g, return_mask=g) if len(res.regions)]
        return merge_runs(np.concatenate(parts)) if parts else np.empty((0, 2), np.int64)

    def reply_runs(self, found: list[np.ndarray]) -> np.ndarray:
        """Every page found this checkpoint, less the guard pages :meth:`copy` left out."""
        allr = merge_runs(np.concatenate(found))
        if self.guards:
            allr = subtract_runs(allr, merge_runs(np.concatenate(self.guards)))
        return allr

    def checkpoint(self, head: dict[str, Any], extra: np.ndarray) -> None:
        from ._freeze import freeze

        t0 = time.perf_counter()
        self.guards = []
        found = []
        copied = 0
        runs = merge_runs(np.concatenate([self.scan(), extra]))
        found.append(runs)
        prev = int((runs[:, 1] - runs[:, 0]).sum()) // P
        copied += self.copy(runs)
        rounds = 1
        pending = np.empty((0, 2), np.int64)  # found and re-armed, left for the stop to copy
        while rounds < ROUNDS and prev > SMALL:
            runs = self.scan()
            found.append(runs)
            rounds += 1
            n = int((runs[:, 1] - runs[:, 0]).sum()) // P
            if n > prev // 2:
                pending = runs  # not converging (a hot set): copying it now would be wasted
                break
            copied += self.copy(runs)
            prev = n
        t1 = time.perf_counter()
        try:
            fr = freeze(self.parent, skip=int(head.get("skip", 0)))
            nthreads = len(fr.tids)
        except (PermissionError, TimeoutError) as err:
            allr = self.reply_runs(found)
            _send(self.sock, {"ok": False, "refused": True, "errno": err.errno or errno.EPERM,
                              "error": str(err)}, allr.tobytes())
            if isinstance(err, TimeoutError):
                raise SystemExit(3)  # threads still seized but not stopped: our exit lets them go
            return
        try:
            t2 = time.perf_counter()
            runs = self.scan()
            found.append(runs)
            if len(self.aliased):
                found.append(self.aliased)
            runs = merge_runs(np.concatenate([runs, pending, self.aliased]))
            copied += self.copy(runs)
            stop_pages = int((runs[:, 1] - runs[:, 0]).sum()) // P
            hold = float(head.get("hold", 0.0))
            if hold:
                # Tests: keep the threads stopped (a helper killed here must not leave them so).
                _send(self.sock, {"holding": True})
                time.sleep(hold)
        finally:
            fr.thaw()
        t3 = time.perf_counter()
        allr = self.reply_runs(found)
        _send(self.sock, {"ok": True, "rounds": rounds, "precopy": t1 - t0, "stop": t3 - t2 + fr.seconds,
                          "stopping": fr.seconds, "threads": nthreads,
                          "stop_pages": stop_pages, "copied": copied, "seconds": t3 - t0}, allr.tobytes())

    def serve(self) -> int:
        pfd = os.pidfd_open(self.parent)
        poll = select.poll()
        poll.register(self.sock.fileno(), select.POLLIN)
        poll.register(pfd, select.POLLIN)
        _send(self.sock, {"ready": True, "pid": os.getpid()})
        while True:
            ev = dict(poll.poll())
            if pfd in ev:
                return 0  # the parent ended
            try:
                head, blob = _recv(self.sock)
            except (EOFError, ConnectionError):
                return 0
            if head.get("op") == "checkpoint":
                try:
                    self.checkpoint(head, _runs(blob))
                except (OSError, ValueError) as err:
                    _send(self.sock, {"ok": False, "refused": False, "errno": getattr(err, "errno", 0) or errno.EIO,
                                      "error": getattr(err, "strerror", None) or str(err)})  # no "[Errno N]" twice
            else:
                return 0


def main(argv: list[str]) -> int:  # pragma: no cover - runs in the helper process
    parent, sockfd, memfd = (int(x) for x in argv[:3])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
    sock = socket.socket(fileno=sockfd)
    try:
        head, blob = _recv(sock)
        aliased = np.array(head.get("aliased", []), dtype=np.int64).reshape(-1, 2)
        return _Helper(parent, sock, memfd, _runs(blob).copy(), bool(head["neighbors"]), aliased).serve()
    except (EOFError, ConnectionError):
        return 0  # our parent closed its end (a Checkpointer closed before it needed us)
    except ProcessLookupError:
        return 0  # our parent ended (exited, crashed) before we could watch it


# -- our side ----------------------------------------------------------------------------


class Refused(Exception):
    """The helper could not stop our threads: ``runs`` were found (and re-armed) by its rounds."""

    def __init__(self, err: OSError, runs: np.ndarray) -> None:
        super().__init__(str(err))
        self.err, self.runs = err, runs


class Precopier:
    """Our end of a helper process (started at once, ready at the first :meth:`instant`).

    ``ranges``: the sorted, disjoint page runs tracked; ``neighbors``: copy the pages
    beside each written page too (entries that do not start on a page boundary have
    chunks straddling two pages); ``aliased``: page runs copied whole in every stop
    (memory that other mappings can write without this process's write tracking
    seeing it).
    """

    def __init__(self, ranges: list[tuple[int, int]], neighbors: bool,
                 aliased: Sequence[tuple[int, int]] = ()) -> None:
        from .._child import Child

        self.ranges = np.array(ranges, dtype=np.int64).reshape(-1, 2)
        lens = self.ranges[:, 1] - self.ranges[:, 0]
        self.soff = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        self.size = int(lens.sum())
        self.refused: OSError | None = None
        self.hold = 0.0  # tests: seconds the helper keeps the threads stopped
        self.staged = 0  # bytes of slots filled since the staging area was last emptied
        ours, theirs = socket.socketpair()
        memfd = os.memfd_create("pagescan-staging", os.MFD_CLOEXEC)
        extra: list[int] = []
        try:
            os.ftruncate(memfd, self.size)
            self.map = mmap.mmap(memfd, self.size, mmap.MAP_SHARED)
            self.stage = np.frombuffer(self.map, dtype=np.uint8)
            # dup2 onto fds 3 and 4 in the child; a source already numbered 3 or 4 is
            # moved out of the way first (dup2 of an fd onto itself keeps FD_CLOEXEC).
            fds = [theirs.fileno(), memfd]
            for i, fd in enumerate(fds):
                if fd in (3, 4):
                    fds[i] = os.dup(fd)
                    extra.append(fds[i])
            # This pagescan first, then our path (numpy); -I -S: no site hooks to run.
            here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            code = ("import sys; sys.path[:0] = sys.argv[4].split(__import__('os').pathsep); "
                    "from pagescan.snapshot._precopy import main; sys.exit(main(sys.argv[1:]))")
            argv = [sys.executable, "-I", "-S", "-c", code, str(os.getpid()), "3", "4",
                    os.pathsep.join([here, *sys.path])]
            pid = os.posix_spawn(sys.executable, argv, dict(os.environ), setpgroup=0,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, fds[0], 3), (os.POSIX_SPAWN_DUP2, fds[1], 4)])
        finally:
            for fd in extra:
                os.close(fd)
            os.close(memfd)
            theirs.close()
        self.child = Child(pid)
        self.sock = ours
        self._owner = os.getpid()  # a forked child inherits the socket: it must not use it
        with contextlib.suppress(OSError):  # EINVAL without Yama: nothing to allow
            libc.prctl(PR_SET_PTRACER, pid)
        _send(self.sock, {"neighbors": neighbors, "aliased": [[int(a), int(b)] for a, b in aliased]},
              self.ranges.tobytes())
        self._ready = False

    @property
    def pid(self) -> int:
        return self.child.pid

    def _died(self, err: BaseException | None = None, why: str = "ended") -> OSError:
        status = self.child.wait(1.0)
        how = ("still running" if status is None else f"killed by signal {os.WTERMSIG(status)}"
               if os.WIFSIGNALED(status) else f"exit status {os.waitstatus_to_exitcode(status)}")
        return OSError(errno.ESRCH, f"{os.strerror(errno.ESRCH)}: the checkpoint helper process (pid "
                       f"{self.child.pid}) {why} ({how})")

    def _mine(self) -> None:
        """Refuse in a forked child: the helper traces and re-arms the process that started it."""
        if os.getpid() != self._owner:
            raise RuntimeError(f"this checkpoint helper belongs to pid {self._owner}; a forked child does not "
                               "inherit it (nor the write tracking)")

    def _wait_reply(self) -> None:
        """Wait until the helper's next message can be read. A helper seen stopped (SIGSTOP,
        a debugger) at two checks in a row is killed, which also lets go any thread it
        had stopped: the caller waits with every signal blocked and would hang for good."""
        stopped = 0
        while not select.select([self.sock], [], [], STOPPED_CHECK)[0]:
            stopped = stopped + 1 if _stopped(self.child.pid) else 0
            if stopped >= 2:
                self.child.kill()
                raise self._died(why="was stopped and was killed")

    def ready(self) -> bool:
        """Has the helper started (without waiting for it)? Its start takes an interpreter
        start-up (a few hundred ms on a busy machine)."""
        self._mine()
        if not self._ready and select.select([self.sock], [], [], 0)[0]:
            head, _ = self._get()
            if not head.get("ready"):
                raise self._died()
            self._ready = True
        return self._ready

    def _get(self) -> tuple[dict[str, Any], bytes]:
        self._wait_reply()
        try:
            return _recv(self.sock)
        except (EOFError, ConnectionError) as err:
            raise self._died(err) from None

    def instant(self, extra: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Run the rounds and the stop; return the runs found and the helper's figures.

        The calling thread waits for the reply with every signal blocked, so that it runs
        nothing of the program meanwhile (no Python signal handler): the helper leaves it
        running and stops the others.

        Raises :class:`Refused` (ptrace refused: take the instant another way) or
        ``OSError(ESRCH)`` (the helper died: what it had re-armed is unknown).
        """
        self._mine()
        if not self._ready:
            head, _ = self._get()
            if not head.get("ready"):
                raise self._died()
            self._ready = True
        old = libc.block_all_signals()
        try:
            try:
                _send(self.sock, {"op": "checkpoint", "hold": self.hold, "skip": threading.get_native_id()},
                      merge_runs(extra).astype(np.int64).tobytes())
            except ConnectionError as gone:  # EPIPE: it has closed its end
                raise self._died(gone) from None
            head, blob = self._get()
            if head.get("holding"):
                head, blob = self._get()
        except OSError:
            raise
        except BaseException:  # broken off mid-exchange: its reply would answer the next request
            self.child.kill()
            raise
        finally:
            libc.restore_signals(old)
        runs = _runs(blob)
        self.staged += int((runs[:, 1] - runs[:, 0]).sum())  # slots filled (at most)
        if not head.get("ok"):
            err = OSError(int(head.get("errno") or errno.EIO), str(head.get("error")))
            if head.get("refused"):
                self.refused = err
                raise Refused(err, runs)
            raise err
        return runs, head

    def read(self, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray, offsets: np.ndarray) -> None:
        """Read runs of our memory as the staging area holds them (a :data:`Reader`).

        Runs that start on page boundaries into rows of ``out`` (the usual case: entries
        that start on a page) are gathered page by page from our mapping of the staging
        area (a memcpy each; a page's bytes past the end of a run land in the rest of its
        row, which the caller zeroes); others are copied with ``process_vm_readv``."""
        st = starts.astype(np.int64)
        r = np.searchsorted(self.ranges[:, 0], st, side="right") - 1
        src = st - self.ranges[r, 0] + self.soff[r]
        ln = lengths.astype(np.int64)
        of = offsets.astype(np.int64)
        if out.ndim == 2 and out.shape[1] == P and not ((st % P).any() or (of % P).any()):
            npg = (ln + P - 1) // P
            total = int(npg.sum())
            first = np.repeat(np.cumsum(npg) - npg, npg)
            k = np.arange(total, dtype=np.int64) - first
            slots = np.repeat(src // P, npg) + k
            rows = np.repeat(of // P, npg) + k
            pages = self.stage[: self.size].reshape(-1, P)
            if total == len(out) and (rows == np.arange(total)).all():
                np.take(pages, slots, axis=0, out=out)
            else:
                out[rows] = pages[slots]
            return
        libc.read_runs(os.getpid(), src.astype(np.uint64) + np.uint64(self.stage.ctypes.data), lengths, out,
                       offsets)

    def release(self) -> None:
        """Done with what the staging area holds. Up to :data:`KEEP` bytes of it stay
        allocated for the next checkpoint (copying into a page that exists is about
        twice as fast as into a new one: no allocation, no zeroing); beyond that, all
        of it goes back to the system."""
        if self.size and self.staged > KEEP:
            with contextlib.suppress(OSError):
                libc.madvise(int(self.stage.ctypes.data), self.size, MADV.REMOVE)
            self.staged = 0

    def close(self) -> None:
        """Stop and reap the helper; unmap the staging area (idempotent). In a forked
        child, only close the inherited copies (a ``shutdown`` of the socket would end
        the parent's helper)."""
        if self.sock.fileno() >= 0:
            if os.getpid() == self._owner:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        if self.child.wait(1.0) is None:  # (in a forked child: returns at once, touches nothing)
            self.child.kill()
            self.child.wait()
        self.stage = np.empty(0, np.uint8)
        with contextlib.suppress(BufferError):
            self.map.close()

    def __del__(self) -> None:
        # Dropped without close() (its Checkpointer was): end the helper, quietly.
        with contextlib.suppress(Exception):
            if self.sock.fileno() >= 0:
                self.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
