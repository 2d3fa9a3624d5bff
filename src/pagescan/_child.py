"""Helper processes: forked, watched through a pidfd, reaped exactly once.

The pattern trio follows for its subprocesses. Right after ``fork`` the parent opens a
pidfd of the child (``pidfd_open``, Linux 5.3). The pidfd polls readable once the child
has exited, so waiting with a timeout is one ``poll``, never a ``waitpid(WNOHANG)``
loop with sleeps; a signal sent through it (``pidfd_send_signal``) cannot reach a
recycled pid; ``waitpid`` then collects the status at once (``docs/kernel-facts.md``,
pidfds). The pidfd is an owned fd (:class:`~pagescan._fdholder.FdHolder`), and a
forgotten :class:`Child` is killed and reaped when it is collected: no zombie is left.

A child process is only ever signalled or reaped by the process that forked it: in a
process forked later (which inherits the pidfd), :meth:`Child.kill` and
:meth:`Child.wait` only close that inherited copy.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from ._fdholder import FdHolder

__all__ = ["Child", "fork", "release_inherited"]


class Child(FdHolder):
    """A child process of ours and its pidfd. ``status`` is the ``waitpid`` status once reaped."""

    __slots__ = ("pid", "status", "_depth", "_parent", "_reaping")

    _what = "pidfd"

    def __init__(self, pid: int) -> None:
        self._fd = -1
        self.pid = pid
        self.status: int | None = None
        self._parent = os.getpid()
        # Held from waitpid to storing the status: a second reaper in another thread waits
        # for the status (it would get ECHILD); one nested in this thread (a signal
        # handler) goes on and finds the status stored, or takes it first.
        self._reaping = threading.RLock()
        self._depth = 0  # calls of wait() inside the lock (one thread: nested ones)
        try:
            self._fd = os.pidfd_open(pid)
        except BaseException:
            # Without a pidfd we cannot watch it: do not leave it running.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.status = -1
            raise

    @property
    def running(self) -> bool:
        """Not reaped yet (it may have exited: ``wait(0)`` tells)."""
        return self.status is None and self._fd >= 0

    def _ours(self) -> bool:
        if os.getpid() != self._parent:
            self.close()  # an inherited copy: the process belongs to our parent
            return False
        return True

    def wait(self, timeout: float | None = None) -> int | None:
        """Reap the child: its ``waitpid`` status, or ``None`` if it still runs after
        ``timeout`` seconds (``None``: wait as long as it takes) -- or, in a call nested
        in one that is reaping it (a signal handler), before that call has stored it. A
        child that someone else reaped (``ECHILD``) counts as status 0."""
        if self.status is not None or not self._ours():
            return self.status
        fd = self._fd
        if fd < 0:  # closed by a call nested in this one (a signal handler) that reaped it
            return self.status
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(-1 if timeout is None else math.ceil(max(0.0, timeout) * 1000)):  # EINTR: retried
            return self.status  # (reaped meanwhile by a nested call, or still running: None)
        with self._reaping:
            if self.status is not None:  # reaped meanwhile by another thread, or a nested call
                return self.status
            self._depth += 1
            try:
                _, status = os.waitpid(self.pid, 0)  # exited: does not block
            except ChildProcessError:
                if self.status is not None:  # reaped by a call nested in this one (a signal handler)
                    return self.status
                if self._depth > 1:  # nested in a call that reaped it and has yet to store it
                    return None
                status = 0  # reaped by someone else (a SIGCHLD handler's waitpid(-1))
            finally:
                self._depth -= 1
            self.status = status
        self.close()
        return status

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` through the pidfd (a no-op once reaped)."""
        if self.status is None and self._ours() and self._fd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, sig)

    def __del__(self) -> None:
        # Forgotten while running: kill and reap it; FdHolder closes the pidfd.
        try:
            if self.status is None and self._fd >= 0 and os.getpid() == self._parent:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self._fd, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                self.status = -1
        except Exception:  # interpreter shutdown, or __init__ never finished
            pass
        super().__del__()


def fork(main: Callable[[], int]) -> Child:
    """Fork a child that runs ``main()`` and leaves with ``os._exit`` of what it returns
    (1 if it raises): it never returns into the caller's code nor runs ``atexit``
    handlers. Returns the :class:`Child` in the parent."""
    if getattr(_forking, "active", False):
        # A signal handler run by the at-fork hooks of a fork this thread is making: a
        # second fork now would wait, for good, for locks those hooks hold.
        raise RuntimeError("cannot fork from a signal handler while this thread is forking")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # or the child could write our buffered output again
    # Signals blocked in this thread while the fork and its hooks run (handlers due are
    # run after); the flag covers a signal another thread took meanwhile.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    _forking.active = True
    try:
        pid = os.fork()
    except BaseException:
        _forking.active = False
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    _forking.active = False
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            code = main()
        except BaseException as exc:
            code = 1
            if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                # Said where the owner's errors go (its stderr): a handler whose source
                # raised leaves the owner SIGBUS, and this is the cause.
                with contextlib.suppress(BaseException):
                    _say(f"pagescan: helper process {os.getpid()} failed:\n" + "".join(traceback.format_exception(exc)))
        finally:
            os._exit(code)
    return Child(pid)


def _say(text: str) -> None:
    """Write ``text`` to fd 2 if that cannot block: one write of at most ``PIPE_BUF``
    bytes (its end kept), only when ``poll`` finds room for it (a full pipe, or a
    stderr no one reads, would keep a helper from exiting); not through ``sys.stderr``,
    whose lock another thread may have held at the fork."""
    data = text.encode(errors="replace")
    if len(data) > select.PIPE_BUF:
        data = b"...\n" + data[-(select.PIPE_BUF - 4):]
    p = select.poll()
    p.register(2, select.POLLOUT)
    if any(ev & select.POLLOUT for _, ev in p.poll(0)):
        os.write(2, data)


def release_inherited(keep: set[int]) -> None:
    """In a forked helper: point the fds it inherited, except 0-2 and ``keep``, at
    /dev/null, so that it does not hold the owner's pipes and sockets open (their peers
    wait for EOF) nor its ``flock`` locks (held by an open file description, which the
    fork shares)."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd != null and fd not in keep:
                with contextlib.suppress(OSError):  # (the listing's own fd, closed since)
                    os.dup2(null, fd)
    finally:
        os.close(null)


#: ``active`` while this thread is inside :func:`fork`'s ``os.fork`` (its hooks included).
_forking = threading.local()
