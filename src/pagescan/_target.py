"""Resolving a scan target (a pid) to an open ``/proc/PID/pagemap``.

``/proc/PID/pagemap`` is bound to the process's mm when it is opened: an fd inherited
across ``fork`` keeps describing the *parent*. The cached fd for our own process is
therefore keyed by ``os.getpid()`` and dropped in the child after ``fork``
(``os.register_at_fork``), as Wasmtime does with its atfork hook.

Opening needs ``PTRACE_MODE_READ`` access to the target; PFNs in ``read()`` results
are visible only if the opener has ``CAP_SYS_ADMIN``.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Protocol, Union

from ._fdholder import FdHolder

__all__ = ["HasPid", "PidLike", "Target", "resolve_pid", "self_target", "target_for"]


class HasPid(Protocol):
    """Anything with an int ``pid`` (``subprocess.Popen``, ``multiprocessing.Process``)."""

    @property
    def pid(self) -> int: ...


def resolve_pid(pid: Any) -> int:
    """``None`` -> our pid; an int; or anything with an int ``.pid`` (Popen, Process)."""
    if pid is None:
        return os.getpid()
    if isinstance(pid, Target):
        return pid.pid
    if not isinstance(pid, int) and hasattr(pid, "pid"):
        pid = pid.pid
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise TypeError(f"pid must be None, an int or have a .pid attribute, not {type(pid).__name__}")
    if pid <= 0:
        raise ValueError(f"pid must be positive, got {pid}")
    return pid


class Target(FdHolder):
    """An open ``/proc/PID/pagemap`` file: pass it as ``pid=`` to reuse the fd.

    ``scan(..., pid=1234)`` opens and closes the file on every call; a ``Target`` keeps
    it open (``with pagescan.Target(1234) as t: scan(a, b, pid=t)``). The fd is
    ``O_CLOEXEC``. Raises ``ProcessLookupError`` (ESRCH) if there is no such process and
    ``PermissionError`` if we may not trace it.
    """

    __slots__ = ("__weakref__", "_owner_pid", "pid")
    _what = "pagescan.Target"

    def __init__(self, pid: Any = None) -> None:
        self._fd = -1
        self.pid = resolve_pid(pid)
        self._owner_pid = os.getpid()
        path = f"/proc/{self.pid}/pagemap"
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, f"no process with pid {self.pid}") from None
        except PermissionError as err:
            raise PermissionError(
                err.errno, f"may not read {path} (needs ptrace read access to pid {self.pid})"
            ) from None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<pagescan.Target pid={self.pid} {state}>"


Target.__module__ = "pagescan"

#: What ``pid=`` accepts: ``None`` (this process), a pid, a :class:`Target`, or
#: anything with ``.pid``.
PidLike = Union[int, Target, HasPid, None]

_self: Target | None = None


def self_target() -> Target:
    """The cached ``/proc/<our pid>/pagemap`` (reopened after fork).

    No lock: a signal handler that scans while this function runs in the same thread
    must not wait for a lock its own thread holds. Two callers racing to open it each
    open one; the last assignment wins and the other ``Target`` is closed when its
    caller drops it.
    """
    global _self
    t = _self
    if t is not None and t._fd >= 0 and t._owner_pid == os.getpid():
        return t
    t = Target(os.getpid())
    _self = t
    return t


def _forget_self_after_fork() -> None:
    global _self
    t, _self = _self, None
    if t is not None:
        t.close()  # the inherited fd describes the parent's mm


os.register_at_fork(after_in_child=_forget_self_after_fork)


def target_for(pid: Any) -> tuple[Target, bool]:
    """(target, owned): ``owned`` targets were opened for this call and must be closed."""
    if isinstance(pid, Target):
        return pid, False
    if pid is None:
        return self_target(), False
    resolved = resolve_pid(pid)
    if resolved == os.getpid():
        return self_target(), False
    return Target(resolved), True
