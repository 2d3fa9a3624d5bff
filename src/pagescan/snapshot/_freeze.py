"""Stop every thread of another process (ptrace), and let them go again.

Runs in a helper process: a thread cannot trace a thread of its own process
(``ptrace_attach`` refuses the same thread group). :func:`freeze` attaches to each
thread with ``PTRACE_SEIZE`` (which does not stop it) and stops it with
``PTRACE_INTERRUPT``; ``waitpid(tid, __WALL)`` returns once it is in a ptrace stop:
it then runs no instruction of the program until it is detached. ``TRACECLONE`` makes
a thread that a tracee clones meanwhile a tracee too, starting stopped; the task list
is re-read until every thread in it is stopped, so no thread of the process is left
running. :meth:`Frozen.thaw` detaches them (``PTRACE_DETACH``).

A signal that reaches a thread between its seize and its stop is reported as a
signal-delivery stop (``status >> 16 == 0``, any signal, ``SIGTRAP`` included: with
``PTRACE_SEIZE`` an interrupt is reported as ``PTRACE_EVENT_STOP``, never so): the
kernel has taken it off the thread's queue, and it is delivered only if the tracer
resumes the thread with it (``PTRACE_DETACH``'s ``data``; ``0`` discards it). Stops are
waited for with ``WNOWAIT``, which leaves the stop's signal with the thread (a plain
wait clears it, ``wait_task_stopped``): if the helper dies before it detaches, the
kernel's detach delivers it, as it does for every stop we never waited for.

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
from .._uapi.ptrace import PTRACE, PTRACE_O, WALL

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

    def stopped(self, tid: int) -> bool:
        """Wait for the next stop of ``tid`` (seized); record it. ``False``: it exited
        (reaped now) or is gone."""
        sig = _wait_stop(tid)
        if sig is None:
            self.seized.discard(tid)
            return False
        self.tids[tid] = sig
        return True

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
                    if not self.stopped(tid):
                        continue
                except OSError:  # ChildProcessError too
                    continue  # gone
            with contextlib.suppress(OSError):  # ESRCH: it exited meanwhile
                libc.ptrace(PTRACE.DETACH, tid, 0, self.tids.get(tid, 0))
        self.seized.clear()
        self.tids.clear()


def _wait_stop(tid: int) -> int | None:
    """Wait for a ptrace stop of ``tid``: the signal to hand back when it is resumed (that
    of a signal-delivery stop, else 0); ``None`` if it exited instead (now reaped).
    ``WNOWAIT``: the kernel keeps the stop's signal until the thread is resumed."""
    res = os.waitid(os.P_PID, tid, os.WEXITED | os.WSTOPPED | os.WNOWAIT | WALL)
    if res is None or res.si_code != os.CLD_TRAPPED:  # exited, killed
        with contextlib.suppress(ChildProcessError):
            os.waitpid(tid, WALL)
        return None
    # si_status: the signal, and the ptrace event above it (0: a signal-delivery stop)
    return res.si_status & 0xFF if res.si_status >> 8 == 0 else 0


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
                    fr.stopped(tid)  # a clone event stop: its new thread shows up in the task list
                except ChildProcessError:  # gone (and reaped by its own process)
                    fr.seized.discard(tid)
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
