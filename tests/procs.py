"""Test-side process helpers: run code in a forked child, and check nothing is left."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest


class Child:
    """A forked child running ``fn()``; what it returns (pickled) or the traceback it
    raised comes back on a pipe, and its wait status says how it ended.

    The child disables faulthandler and restores default SIGBUS/SIGSEGV, so that a
    fatal signal is what its exit status shows, and arms ``alarm(alarm)`` against
    hangs. The one fork-and-report helper of the suite.
    """

    def __init__(self, fn: Callable[[], Any], *, alarm: int = 20) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 70
            try:
                os.close(r)
                signal.alarm(alarm)
                faulthandler.disable()
                signal.signal(signal.SIGBUS, signal.SIG_DFL)
                signal.signal(signal.SIGSEGV, signal.SIG_DFL)
                try:
                    data = pickle.dumps(("ok", fn()))
                    code = 0
                except BaseException as exc:  # noqa: BLE001
                    data = pickle.dumps(("error", "".join(traceback.format_exception(exc))))
                _write_all(w, data)
            finally:
                os._exit(code)
        os.close(w)
        self.pid = pid
        self.rfd = r
        self.status: int | None = None
        self._answer: bytes | None = None

    def _read(self, deadline: float) -> bytes:
        """Everything the child wrote (read once, then remembered)."""
        if self._answer is not None:
            return self._answer
        chunks = []
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child {self.pid} did not answer in time")
            if not poller.poll(int(left * 1000) + 1):
                continue
            data = os.read(self.rfd, 1 << 16)
            if not data:
                self._answer = b"".join(chunks)
                os.close(self.rfd)
                self.rfd = -1
                return self._answer
            chunks.append(data)

    def _finish(self, timeout: float) -> tuple[int, tuple[str, Any] | None]:
        """``(wait status, (kind, value) or None)`` once the child has ended; a child
        that does not end in time is killed and fails the test."""
        deadline = time.monotonic() + timeout
        try:
            data = self._read(deadline)
            status = self.wait(max(0.5, deadline - time.monotonic()))
        except AssertionError:
            self.kill()
            raise
        return status, (pickle.loads(data) if data else None)

    def outcome(self, timeout: float = 10.0) -> tuple[int, str]:
        """``(wait status, traceback or "")`` once the child has ended."""
        status, answer = self._finish(timeout)
        return status, answer[1] if answer is not None and answer[0] == "error" else ""

    def result(self, timeout: float = 10.0) -> Any:
        """Wait for the child to finish successfully and return what ``fn`` returned."""
        status, answer = self._finish(timeout)
        kind, value = answer if answer is not None else ("error", "(no answer)")
        assert kind == "ok" and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
            f"child failed: {self.describe(status)}\n{value if kind == 'error' else ''}")
        return value

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                break
            if time.monotonic() > deadline:  # (still running: close() or kill() ends it)
                raise AssertionError(f"child {self.pid} did not exit within {timeout} s")
            time.sleep(0.005)
        return self.status

    def kill(self) -> None:
        """SIGKILL and reap (idempotent)."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.status = os.waitpid(self.pid, 0)[1]
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1

    close = kill

    @staticmethod
    def describe(status: int) -> str:
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit status {os.WEXITSTATUS(status)}"


@contextlib.contextmanager
def forked(fn: Callable[[], Any], *, alarm: int = 20) -> Iterator[Child]:
    """A :class:`Child` that is killed and reaped when the block ends."""
    child = Child(fn, alarm=alarm)
    try:
        yield child
    finally:
        child.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_in_child(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Fork; the child runs ``fn()`` and pickles its result back; always killed and reaped.

    An exception in the child fails the test with the child's traceback; a child that
    does not answer within ``timeout`` seconds fails it too.
    """
    child = Child(fn, alarm=int(timeout) + 5)
    try:
        return child.result(timeout)
    finally:
        child.kill()


def children_of(pid: int | str = "self") -> set[int]:
    """Pids of the children of every thread of ``pid``."""
    out: set[int] = set()
    base = f"/proc/{pid}/task"
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(base):
            with contextlib.suppress(FileNotFoundError), open(f"{base}/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
    return out


def running(pid: int) -> bool:
    """The process is alive (a zombie counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Orphans (e.g. of a dead owner) must stop running; init reaps their zombies."""
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids):
        if time.monotonic() > deadline:
            pytest.fail(f"processes left behind: {[p for p in pids if running(p)]}")
        time.sleep(0.01)


def stop(proc: subprocess.Popen[Any]) -> None:
    """Kill and reap a child started with pipes, and close them."""
    proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()
