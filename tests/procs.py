"""Test-side process helpers: run code in a forked child, and check nothing is left."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest


def run_in_child(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Fork; the child runs ``fn()`` and pickles its result back; always killed and reaped.

    An exception in the child fails the test with the child's traceback; a child that
    does not answer within ``timeout`` seconds fails it too.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            try:
                data = pickle.dumps(("ok", fn()))
            except BaseException as exc:  # noqa: BLE001
                data = pickle.dumps(("error", "".join(traceback.format_exception(exc))))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the child did not answer in time"
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert chunks, "the child died without answering"
    status, value = pickle.loads(b"".join(chunks))
    assert status == "ok", value
    return value


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
