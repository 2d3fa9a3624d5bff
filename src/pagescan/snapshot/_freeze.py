"""Stop every thread of another process (ptrace), and let them go again.

Runs in a helper process: a thread cannot trace a thread of its own process
(``ptrace_attach`` refuses the same thread group). :func:`freeze` attaches to each
thread with ``PTRACE_SEIZE`` (which does not stop it) and stops it with
``PTRACE_INTERRUPT``; ``waitpid(tid, __WALL)`` returns once it is in a ptrace stop:
it then runs no instruction of the program until it is detached. ``TRACECLONE`` makes
a thread that a tracee clones meanwhile a tracee too, starting stopped; the task list
is re-read until every thread in it is stopped, so no thread of the process is left
running. :meth:`Frozen.thaw` detaches them (``PTRACE_DETACH``; a signal that arrived
while a thread was being stopped is handed back to it then).

If the helper dies while the threads are stopped, the kernel detaches its tracees and
wakes them (``exit_ptrace`` -> ``__ptrace_unlink``, which wakes a task in a traced
stop): the program never stays frozen. A blocking system call of a stopped thread is
restarted on resume, except the few that the kernel ends with ``EINTR`` after any
stop (``epoll_wait``, ``sigtimedwait``, ``semop``...; see signal(7)), which Python
retries.

Refusals (``PermissionError``): Yama ``ptrace_scope`` 2 or 3, no ``CAP_SYS_PTRACE``
towards a non-dumpable process, or a process already traced (a debugger, ``strace``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time

from .._uapi import libc
from .._uapi.ptrace import PTRACE, PTRACE_EVENT_STOP, PTRACE_O, WALL

__all__ = ["Frozen", "freeze"]


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


class Frozen:
    """The stopped threads of ``pid``: ``tids`` maps each to the signal to give back on thaw."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tids: dict[int, int] = {}
        self.seized: set[int] = set()
        self.seconds = 0.0  # how long stopping them took

    def thaw(self, settle: bool = True) -> None:
        """Detach every thread (idempotent); each resumes where it stopped.

        A thread seized but not seen stopped yet cannot be detached (``PTRACE_DETACH``
        needs a ptrace stop): ``settle`` waits for its stop first; without it, it stays
        ours until this process exits (the kernel then lets it go)."""
        for tid in sorted(self.seized):
            if tid not in self.tids:
                if not settle:
                    continue
                try:
                    libc.ptrace(PTRACE.INTERRUPT, tid)
                    os.waitpid(tid, WALL)
                except (OSError, ChildProcessError):
                    continue  # gone
            with contextlib.suppress(OSError):  # ESRCH: it exited meanwhile
                libc.ptrace(PTRACE.DETACH, tid, 0, self.tids.get(tid, 0))
        self.seized.clear()
        self.tids.clear()


def _tasks(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def _zombie(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in (b"Z", b"X")


def _tracer(pid: int, tid: int) -> int:
    try:
        with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def freeze(pid: int, timeout: float = 2.0, skip: int = 0) -> Frozen:
    """Stop every thread of ``pid`` but ``skip``; the caller must :meth:`Frozen.thaw` them.

    ``skip``: a thread that cannot run meanwhile anyway (the one waiting for our reply
    in a blocking read with every signal blocked): waking it just to stop it would cost
    a trip through the scheduler.

    Raises ``PermissionError`` if the kernel refuses to trace it (nothing is left
    stopped), ``TimeoutError`` if a thread does not stop within ``timeout`` seconds
    (one in uninterruptible sleep: everything is thawed again).
    """
    fr = Frozen(pid)
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    dead: set[int] = set()  # exited, still listed: they run nothing, and cannot be traced
    try:
        while True:
            new = _tasks(pid) - fr.seized - dead - {skip}
            if not new and len(fr.tids) == len(fr.seized):
                break
            for tid in sorted(new):
                try:
                    libc.ptrace(PTRACE.SEIZE, tid, 0, int(PTRACE_O.TRACECLONE))
                except ProcessLookupError:
                    continue  # exited
                except PermissionError:
                    # A thread cloned by a tracee is already ours (auto-attached, starting
                    # stopped); one that has exited (an exit state: EPERM too) runs nothing;
                    # anything else is a refusal (another tracer, no permission).
                    if _zombie(pid, tid):
                        dead.add(tid)
                        continue
                    if _tracer(pid, tid) != os.getpid():
                        raise
                    fr.seized.add(tid)
                    continue
                fr.seized.add(tid)
                if tid == pid and _zombie(pid, tid):  # an exited main thread never stops
                    fr.tids[tid] = 0
                    continue
                with contextlib.suppress(ProcessLookupError):
                    libc.ptrace(PTRACE.INTERRUPT, tid)
            for tid in sorted(fr.seized - fr.tids.keys()):
                try:
                    _, status = os.waitpid(tid, WALL)
                except ChildProcessError:  # gone (and reaped by its own process)
                    fr.seized.discard(tid)
                    continue
                if os.WIFSTOPPED(status):
                    event = status >> 16
                    sig = os.WSTOPSIG(status)
                    # A signal-delivery stop (event 0): the signal is handed back on thaw.
                    fr.tids[tid] = sig if event == 0 and sig != signal.SIGTRAP else 0
                    if event not in (0, PTRACE_EVENT_STOP):
                        fr.tids[tid] = 0  # a clone event stop: its new thread shows up in the task list
                else:
                    fr.seized.discard(tid)  # exited
        fr.seconds = time.perf_counter() - t0
        return fr
    except _Timeout:
        fr.thaw(settle=False)
        raise TimeoutError(errno.ETIMEDOUT, f"{os.strerror(errno.ETIMEDOUT)}: a thread of pid {pid} did not "
                           f"stop within {timeout} s") from None
    except BaseException:
        fr.thaw()
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
