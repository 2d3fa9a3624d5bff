"""A fault server: lazy-load handler processes started ahead of time, from a process
that is not the owner.

Starting a :class:`~pagescan.FaultHandler` forks the owner twice (handler, guardian):
each ``fork`` copies the owner's page tables (about 1 ms for a bare interpreter with
numpy, 25 ms more per GiB the owner has populated), and the new handler then takes a
copy-on-write fault for each page of the owner's heap it writes while it serves its
first fault. The server is a fresh interpreter (``posix_spawn``: no page table
copied, nothing shared with the owner) started once by :func:`start`. It keeps one
*spare* handler process forked from itself, which has already taken private copies of
the pages it shares with the server (``MADV_POPULATE_WRITE``) and waits on a unix
socket to the owner. A lazy load gives the registered userfaultfd to the server (the
guardian) and then to the spare (the handler) over unix sockets (``SCM_RIGHTS``), with
the progress page (a memfd), the checkpoint's fd and how to rebuild the source there;
it waits for neither. ``UFFDIO_COPY`` works from any process holding the uffd (the
uffd names the owner's mm; the source address is the caller's); nothing here uses
``UFFDIO_MOVE``, which only works within the caller's own mm. The server forks the
next spare :data:`SPARE_DELAY` after a load.

The server guards every handler it started: it keeps a copy of the uffd, reaps the
handler (its child) and, if it did not finish, poisons the pages still empty
(``UFFDIO_POISON``) before it lets the uffd go: SIGBUS on touch, never zeros or a
hang. It then writes the handler's ``waitpid`` status to the progress page and closes
the owner's "done" pipe (the owner's :meth:`FaultHandler.wait`). The server and its
spares exit when the owner exits (a pidfd of the owner, polled; not
``PR_SET_PDEATHSIG``, which fires when the *thread* that started the server exits);
:func:`stop` (run ``atexit``) kills and reaps it.

A process forked from the owner never uses the owner's server (its loads fork their
handler, or it starts its own server); neither does a load made while another thread's
request is in flight (or from a signal handler during one), nor one that records a
working set (the record is anonymous shared memory of the owner).
"""

from __future__ import annotations

import array
import atexit
import contextlib
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from ._child import Child, fork, release_inherited
from ._uapi import libc
from ._uapi.mman import MADV
from ._uapi.pagemap import Category
from .handler import (
    STATE_DONE,
    STATE_FAILED,
    FaultHandler,
    Via,
    _handler_main,
    _poison_empty,
    _where_now,
    _Proc,
    _Shared,
)
from .userfaultfd import Userfaultfd

__all__ = ["start", "stop", "via"]

_HDR = struct.Struct("<Q")
_REPLY = struct.Struct("<i")
#: Seconds after a request before the server forks the next spare: the fork (about a
#: millisecond of CPU) is left until the first faults of that load have been served.
SPARE_DELAY = 0.01
_MAX_FDS = 16


class _Lock:
    """A lock that knows which thread holds it: a thread never waits for itself (a
    signal handler or a finalizer run while its own thread holds it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None

    def acquire(self, timeout: float | None = None) -> bool:
        """Take it within ``timeout`` seconds (``None``: as long as it takes); ``False``
        at once if this thread holds it."""
        if not self._lock.acquire(blocking=False):
            if self._holder == threading.get_ident() or timeout == 0:
                return False
            if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                return False
        self._holder = threading.get_ident()
        return True

    def release(self) -> None:
        self._holder = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class _Server:
    """The owner's end: the server process, its socket, and the spare it announced."""

    def __init__(self, child: Child, sock: socket.socket) -> None:
        self.child, self.sock = child, sock
        self.owner = os.getpid()
        self.lock = _Lock()
        #: The announced spare: (pid, pidfd, socket to it).
        self.spare: tuple[int, int, socket.socket] | None = None
        #: The server has announced a spare (it is up); the spare has unshared its memory.
        self.ready = self.spare_warm = False

    def drop_spare(self) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:
            os.close(spare[1])
            spare[2].close()

    def close(self) -> None:
        self.drop_spare()
        with contextlib.suppress(OSError):
            self.sock.close()

    def end(self) -> None:
        """Close our ends, kill and reap the server."""
        self.close()
        self.child.kill()
        self.child.wait()


def _drop(srv: _Server) -> None:
    """The server is gone or broken: forget it (the next :func:`start` starts another)."""
    global _server
    if _server is srv:
        _server = None
    srv.end()


_server: _Server | None = None


def _forget_in_child() -> None:
    """After ``fork``: the parent's server is not ours (never used, killed or reaped here),
    and a hold on :func:`start` by another thread of the parent is no one's here."""
    global _server, _start_lock
    _start_lock = _Lock()
    srv, _server = _server, None
    if srv is not None:
        srv.close()
        srv.child.close()


os.register_at_fork(after_in_child=_forget_in_child)


#: The server as a program of its own: the socket to the owner is its fd 3.
_PROGRAM = """\
import os, socket, sys
sys.path[:0] = sys.argv[2].split(os.pathsep)
from pagescan._faultserver import _server_main
os._exit(_server_main(socket.socket(fileno=3), int(sys.argv[1]), sys.argv[3:]))
"""

_start_lock = _Lock()


def start(wait: float | None = 0.0, preload: tuple[str, ...] = ()) -> bool:
    """Start this process's fault server, if it has none: a fresh interpreter started
    with ``posix_spawn`` (the caller waits for its ``exec``, 2-6 ms here; no page
    table is copied). It is ready when it has imported pagescan and its first spare
    has taken its copies of the memory it shares with the server (a few hundred ms);
    until then loads fork their own handler. ``wait`` (seconds, ``None``: as long as it takes): wait until it is ready.
    ``preload``: modules the server imports before its first spare (those of the
    sources' factories). Returns whether it is ready. A server found dead is reaped
    and started again. Never waits longer than ``wait`` for another thread (nor at
    all for its own thread: a signal handler that interrupted it gets ``False``)."""
    global _server
    deadline = None if wait is None else time.monotonic() + wait
    if not _start_lock.acquire(wait):  # another thread is starting it (or this one, interrupted)
        return False
    try:
        srv = _server
        if srv is not None and srv.owner == os.getpid() and srv.child.wait(0) is not None:
            _drop(srv)  # it died: reaped now, started again
            srv = None
        if srv is None or srv.owner != os.getpid():
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
                argv = [sys.executable, "-I", "-S", "-c", _PROGRAM, str(os.getpid()), os.pathsep.join([here, *sys.path]),
                        *preload]
                pid = os.posix_spawn(sys.executable, argv, dict(os.environ), setpgroup=0,
                                     file_actions=[(os.POSIX_SPAWN_DUP2, b.fileno(), 3)])
            except BaseException:
                a.close()
                raise
            finally:
                b.close()
            srv = _server = _Server(Child(pid), a)
    finally:
        _start_lock.release()
    return _poll_spare(srv, None if deadline is None else max(0.0, deadline - time.monotonic()))


def _poll_spare(srv: _Server, timeout: float | None) -> bool:
    """Whether the server has a spare ready (waiting ``timeout`` for its announcement,
    and for the spare to say it has taken its copies of the memory it shares)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    # Another thread's request or wait holds it: wait for it no longer than told (this
    # thread's own, interrupted by a signal handler: not at all).
    if not srv.lock.acquire(timeout):
        return False
    try:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not _read_spare(srv, left):
            return False
        assert srv.spare is not None
        if not srv.spare_warm:
            p = select.poll()
            p.register(srv.spare[2], select.POLLIN)
            wait = -1 if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if not p.poll(wait):
                return False
            srv.spare_warm = srv.spare[2].recv(1) == b"R"
        return srv.spare_warm
    except OSError:  # the server (or its spare) is gone: the next start starts another
        _drop(srv)
        return False
    finally:
        srv.lock.release()


def _read_spare(srv: _Server, timeout: float | None) -> bool:
    if srv.spare is not None:
        return True
    p = select.poll()
    p.register(srv.sock, select.POLLIN)
    if not p.poll(-1 if timeout is None else int(timeout * 1000)):
        return False
    data, got, _, _ = socket.recv_fds(srv.sock, _REPLY.size, 2, socket.MSG_CMSG_CLOEXEC)
    if len(data) != _REPLY.size or len(got) != 2:
        for fd in got:
            os.close(fd)
        raise ConnectionError("the fault server stopped")
    srv.spare = (_REPLY.unpack(data)[0], got[0], socket.socket(fileno=got[1]))
    srv.spare_warm = False
    srv.ready = True
    return True


def stop() -> None:
    """Kill and reap this process's server (no-op if none, or in a forked child)."""
    global _server
    srv, _server = _server, None
    if srv is not None:
        srv.end()


atexit.register(stop)


# -- owner side -------------------------------------------------------------------------


class _Remote:
    """A process of the server, as the owner's :class:`FaultHandler` sees it (``_Proc``).

    Both the handler and its guardian (the server) are done once the server closes the
    "done" pipe: it has reaped the handler, poisoned what it left empty, and written its
    ``waitpid`` status to the progress page. If the server ends first (killed), the
    handler serves on without a guardian: it is waited for through its pidfd, and its
    status is 0 if it served every page, else that of an exit status 1. ``kill`` signals the handler only (through
    its pidfd), never the server; only the owner does.
    """

    def __init__(self, pid: int, pidfd: int, done_fd: int, shared: _Shared) -> None:
        self.pid, self.pidfd, self.done_fd, self.shared = pid, pidfd, done_fd, shared
        self.status: int | None = None
        self.parent = os.getpid()

    def _close(self) -> None:
        for fd in (self.pidfd, self.done_fd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.done_fd = -1

    def wait(self, timeout: float | None = None) -> int | None:
        if self.status is not None or self.done_fd < 0:
            return self.status
        if os.getpid() != self.parent:
            self._close()
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        # The "done" pipe closes once the server has reaped the handler, or when the
        # server ends first (killed): then the handler, unguarded, serves on, and is
        # waited for through its pidfd (readable at once in the first case).
        for fd in (self.done_fd, self.pidfd):
            if fd >= 0:
                p = select.poll()
                p.register(fd, select.POLLIN)
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not p.poll(-1 if left is None else int(left * 1000 + 0.999)):
                    return None
        arr = self.shared.arr if self.shared.addr else None
        status = int(arr[3]) if arr is not None else 0
        if arr is not None and status == 0 and arr[1] != STATE_DONE:
            status = 1 << 8  # no server wrote its status (it ended first): exit status 1, not done
        self.status = status
        self._close()
        return self.status

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.pidfd >= 0 and self.status is None and os.getpid() == self.parent:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close()


#: Seconds a load waits for the server's spare handler (forked at start, and again
#: :data:`SPARE_DELAY` after each load) before it forks its own handler instead.
SPARE_WAIT = 0.05


def via(factory: tuple[str, str], args: tuple[Any, ...], fds: list[int]) -> Via | None:
    """A ``via`` for :meth:`FaultHandler.start` that hands the handler to this process's
    server (``None`` if it has none). In the server's spare, the source is rebuilt as
    ``module.name(received fds, *args)`` (``factory = (module, dotted name)``); ``fds``
    are passed along (the caller keeps its own)."""
    srv = _server
    if srv is None or srv.owner != os.getpid() or srv.child.status is not None:
        return None

    def send(fh: FaultHandler, uf: Userfaultfd) -> tuple[_Proc, _Proc] | None:
        if fh.record is not None or fh._shared is None or not srv.lock.acquire(0):
            return None
        try:
            return _request(srv, fh, uf, factory, args, fds)
        finally:
            srv.lock.release()

    return send


def _take_spare(srv: _Server) -> tuple[int, int, socket.socket] | None:
    """The spare the server announced; once it has announced one, a load waits up to
    :data:`SPARE_WAIT` for the next (forked :data:`SPARE_DELAY` after a load)."""
    if not _read_spare(srv, SPARE_WAIT if srv.ready else 0.0):
        return None
    spare, srv.spare = srv.spare, None
    return spare


def _request(srv: _Server, fh: FaultHandler, uf: Userfaultfd, factory: tuple[str, str],
             args: tuple[Any, ...], fds: list[int]) -> tuple[_Proc, _Proc] | None:
    """Give the uffd to the server (the guardian) first, then to its spare (the handler).
    Neither is waited for: the first fault waits for the spare if need be."""
    shared = fh._shared
    assert shared is not None
    try:
        spare = _take_spare(srv)
    except OSError:
        spare = None
        _drop(srv)
    if spare is None:
        return None
    pid, pidfd, conn = spare
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    try:
        # The spare first: if it is gone, nothing was handed to anyone.
        body = (fh.owner, fh.regions, fh.prefetch, fh.hot, factory, args)
        _send(conn, pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL), [uf.fd, shared.fd, *fds])
    except OSError:
        for fd in (done_r, done_w, pidfd):
            os.close(fd)
        return None
    finally:
        conn.close()
    try:
        _send(srv.sock, pickle.dumps((pid, fh.owner, fh.regions)), [uf.fd, shared.fd, done_w])
    except OSError:
        # No guardian: stop the spare (pages it served are right) and fork our own.
        _drop(srv)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        p.poll(-1)
        for fd in (done_r, done_w, pidfd):
            os.close(fd)
        return None
    os.close(done_w)
    handler = _Remote(pid, pidfd, done_r, shared)
    guardian = _Remote(srv.child.pid, -1, os.dup(done_r), shared)
    return handler, guardian


def _send(sock: socket.socket, body: bytes, fds: list[int]) -> None:
    msg = _HDR.pack(len(body)) + body
    sent = sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < len(msg):
        sock.sendall(msg[sent:])


# -- server side ------------------------------------------------------------------------


class _Job:
    """A handler the server started, and what it needs to guard it."""

    def __init__(self, child: Child | _Ended, uf: Userfaultfd, regions: list[tuple[int, int]], owner: int,
                 shared: _Shared, done_w: int) -> None:
        self.child, self.uf, self.regions, self.owner, self.shared, self.done_w = child, uf, regions, owner, shared, done_w

    def close(self) -> None:
        self.uf.close()
        self.shared.close()
        if self.done_w >= 0:
            os.close(self.done_w)
            self.done_w = -1


def _recv_request(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One message (its pickled body) and its fds; ``None`` at EOF (also a reset: the
    owner exited with unread data on its end, as a program that ends does)."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, _MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        return None
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    buf = bytearray(data)
    while len(buf) < _HDR.size or len(buf) < _HDR.size + _HDR.unpack_from(buf)[0]:
        want = _HDR.size - len(buf) if len(buf) < _HDR.size else _HDR.size + _HDR.unpack_from(buf)[0] - len(buf)
        try:
            more = sock.recv(min(1 << 20, want))
        except ConnectionResetError:
            more = b""
        if not more:
            for fd in fds:
                os.close(fd)
            return None
        buf += more
    return bytes(buf[_HDR.size :]), fds


def _quiet_stdio() -> None:
    """stdin and stdout on /dev/null: a pipe the owner's parent reads to EOF is not held
    open by us (stderr is kept, for tracebacks)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)


def _server_main(sock: socket.socket, owner: int, preload: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_stdio()
    release_inherited({sock.fileno()})  # (others may wait for the EOF of the owner's pipes and sockets)
    try:
        owner_fd = os.pidfd_open(owner)
    except ProcessLookupError:
        return 0  # the owner exited (and was reaped) before we could watch it
    if os.getppid() != owner:
        return 0  # the owner exited before we watched it
    # What every spare needs, done once here: the factories' modules, the scan backend
    # (the spares' first scan), then the heap frozen for the cyclic GC (which would
    # write to every object it walks: copy-on-write copies in each spare).
    for name in preload:
        importlib.import_module(name)
    from ._scan import scan

    scan(0, 0)
    gc.collect()
    gc.freeze()
    jobs: dict[int, _Job] = {}
    # Spares that ended before the owner's message about them came (pid -> status): a
    # load's handler killed at once is guarded all the same.
    dead: dict[int, int] = {}
    spare: Child | None = None
    spare_at = 0.0  # when to fork the next spare
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(owner_fd, select.POLLIN)
    try:
        while True:
            wait = -1
            if spare is None:
                wait = int(max(0.0, spare_at - time.monotonic()) * 1000)
                if not wait:
                    spare = _fork_spare(sock, owner_fd, jobs)
                    poller.register(spare.fd, select.POLLIN)
                    wait = -1
            try:
                ready = dict(poller.poll(wait))
            except InterruptedError:
                continue
            if owner_fd in ready:
                return 0
            if sock.fileno() in ready:  # before the processes' exits: it may name the spare
                req = _recv_request(sock)
                if req is None:
                    return 0  # the owner closed the socket
                job = _guard(req, spare, dead)
                if job is not None and job.child is spare:  # the spare is a handler now
                    jobs[job.child.fd] = job
                    spare, spare_at = None, time.monotonic() + SPARE_DELAY
                elif job is not None:  # it had ended already
                    _finish(job, dead.pop(job.child.pid))
            for fd in ready:
                if fd in jobs:
                    poller.unregister(fd)
                    _finish(jobs.pop(fd))
                elif spare is not None and fd == spare.fd:
                    poller.unregister(fd)
                    if len(dead) > 64:
                        dead.clear()
                    dead[spare.pid] = spare.wait() or 0  # unused, or the owner's message is on its way
                    spare, spare_at = None, time.monotonic() + SPARE_DELAY
    finally:
        # Handlers still serving are left to end with the owner (they watch it too): at
        # the owner's exit (atexit) its last lazy arrays are still served.
        if spare is not None:
            spare.kill()
            spare.wait()


def _guard(req: tuple[bytes, list[int]], spare: Child | None, dead: dict[int, int]) -> _Job | None:
    """The owner gave the spare a load: keep the uffd (and the progress page, and the
    owner's "done" pipe) to guard it. A message naming a spare that has ended already
    (``dead``) gives a job to finish at once; one naming another process is dropped."""
    data, fds = req
    try:
        pid, owner, regions = pickle.loads(data)
        child = spare if spare is not None and pid == spare.pid else _Ended(pid) if pid in dead else None
        if child is None or len(fds) != 3:
            raise ValueError("not our spare")
        return _Job(child, Userfaultfd.from_fd(fds[0]), regions, owner, _Shared(fds[1]), fds[2])
    except (OSError, ValueError, pickle.UnpicklingError):
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        return None


class _Ended:
    """A spare already reaped, as a job's ``child``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self) -> int | None:
        return None

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass


def _finish(job: _Job, status: int | None = None) -> None:
    """The handler ended: reap it; if it did not finish, poison what it left empty."""
    if status is None:
        status = job.child.wait()
    if status != 0:
        with contextlib.suppress(Exception):
            _poison_empty(job.uf, _where_now(job.regions, job.shared.arr), job.owner)
    if job.shared.addr:
        arr = job.shared.arr
        arr[3] = status if status is not None else 0
        if status != 0 and arr[1] == 0:
            arr[1] = STATE_FAILED  # killed before it could say so
    job.close()


def _fork_spare(sock: socket.socket, owner_fd: int, jobs: dict[int, _Job]) -> Child:
    """Fork the next spare and announce it to the owner: its pid, a pidfd, a socket to it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def spare_main() -> int:
        # Not ours: the owner's socket, the other handlers' uffds and pidfds.
        a.close()
        sock.close()
        os.close(owner_fd)
        for job in jobs.values():
            job.close()
            job.child.close()
        return _spare_main(b)

    try:
        child = fork(spare_main)
        with contextlib.suppress(OSError):
            socket.send_fds(sock, [_REPLY.pack(child.pid)], [child.fd, a.fileno()])
    finally:
        a.close()
        b.close()
    return child


def _unshare_memory(conn: socket.socket) -> bool:
    """Take private copies now of the anonymous pages the server shares with us
    copy-on-write (``MADV_POPULATE_WRITE``, Linux 5.14, on the present pages of every
    private writable mapping), while no load waits: a first write to each (Python writes
    reference counts wherever it reads) would otherwise be a copy-on-write fault while a
    fault waits for us. Stops as soon as a load arrives (``False``)."""
    from ._scan import scan

    with open("/proc/self/maps", "rb") as f:
        lines = f.read().splitlines()
    p = select.poll()
    p.register(conn, select.POLLIN)
    present = int(Category.PRESENT | Category.FILE)
    for line in lines:
        parts = line.split()
        perms = parts[1]
        if perms[1:2] != b"w" or perms[3:4] != b"p" or (len(parts) > 5 and parts[5].startswith(b"[v")):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split(b"-"))
        try:
            runs = scan(lo, hi, category_mask=present, category_inverted=int(Category.FILE), return_mask=0)
        except OSError:
            continue
        for s, e, _ in runs.regions.tolist():
            for c in range(s, e, _UNSHARE_STEP):
                if p.poll(0):
                    return False
                with contextlib.suppress(OSError):
                    libc.madvise(c, min(e, c + _UNSHARE_STEP) - c, MADV.POPULATE_WRITE)
    return True


_UNSHARE_STEP = 256 << 10


def _spare_main(conn: socket.socket) -> int:
    """A handler waiting for its load: serves it (``_handler_main``) once it arrives."""
    if _unshare_memory(conn):
        with contextlib.suppress(OSError):
            conn.send(b"R")  # warm (read by start(wait=...))
    req = _recv_request(conn)
    conn.close()
    if req is None:
        return 0  # the owner dropped us, or exited
    data, fds = req
    owner, regions, prefetch, hot, (module, name), args = pickle.loads(data)
    uffd, shared_fd, *extra = fds
    factory: Any = importlib.import_module(module)
    for part in name.split("."):
        factory = getattr(factory, part)
    source = factory(extra, *args)
    fh = FaultHandler(regions, source, prefetch=prefetch, hot=hot, fresh=True)
    fh._finalizer.detach()
    fh.owner = owner
    fh._shared = _Shared(shared_fd)
    return _handler_main(Userfaultfd.from_fd(uffd), fh, -1)
