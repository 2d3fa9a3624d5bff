"""Process lifecycle of pagescan's helper processes (``pagescan._child``, FaultHandler).

Checked on real processes: a FaultHandler dropped without ``close()`` leaves no process,
no pidfd, no shared page and no userfaultfd registration once collected; ``wait`` sleeps
in ``poll`` on a pidfd (no sleep-and-``waitpid`` loop) and wakes when the handler exits;
a process forked from the owner never stops the owner's handler; a forgotten ``Child``
is killed and reaped.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import threading
import time
import warnings

import pytest

from pagescan import FaultHandler
from pagescan._child import Child, fork

from .memory import anon, vmflags
from .procs import children_of, run_in_child

N = 32


def pidfds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                out.add(fd)
        except OSError:
            pass
    return out


def mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def zombie_or_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def ctxt_switches(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_forgotten_running_handler_leaves_nothing_behind() -> None:
    before_fds = pidfds()
    with anon(N) as m:
        fh = FaultHandler([(m.addr, m.length)], lambda o, n: b"\x07" * n, prefetch=False).start()
        hpid, gpid = fh.pid, fh.guardian_pid
        assert fh._shared is not None
        shared = fh._shared.addr
        assert {hpid, gpid} <= children_of()
        assert len(pidfds() - before_fds) == 2, "one pidfd per child"
        assert mapped(shared) and "um" in vmflags(m.addr)
        assert ctypes.string_at(m.addr, 1) == b"\x07"  # served: the handler works
        with pytest.warns(ResourceWarning, match="without close"):
            del fh
            gc.collect()
        assert not zombie_or_alive(hpid) and not zombie_or_alive(gpid), "killed and reaped"
        assert pidfds() == before_fds
        assert not mapped(shared), "the progress page is unmapped"
        assert "um" not in vmflags(m.addr), "the uffd is gone with its last holder"
        # Pages never served are poisoned (the guardian ran): not touched here.


def test_forgotten_finished_handler_is_reaped_quietly() -> None:
    with anon(N) as m:
        fh = FaultHandler([(m.addr, m.length)], lambda o, n: bytes(n), prefetch=True).start()
        hpid, gpid = fh.pid, fh.guardian_pid
        child = fh._life.handler
        assert child is not None
        assert child.wait(10) == 0, "prefetch serves every page, then the handler exits"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ResourceWarning: nothing was still being served
            del fh, child
            gc.collect()
        assert not zombie_or_alive(hpid) and not zombie_or_alive(gpid)
        assert ctypes.string_at(m.addr, m.length) == bytes(m.length)


def test_wait_sleeps_in_poll_on_a_pidfd_and_wakes_on_exit() -> None:
    with anon(N) as m:
        with FaultHandler([(m.addr, m.length)], lambda o, n: b"\x01" * n, prefetch=False) as fh:
            result: list[bool] = []
            t = threading.Thread(target=lambda: result.append(fh.wait(0.6)))
            t.start()
            tid = t.native_id
            assert tid is not None
            time.sleep(0.1)
            switches = ctxt_switches(tid)
            wchans = []
            for _ in range(10):
                with open(f"/proc/self/task/{tid}/wchan") as f:
                    wchans.append(f.read())
                time.sleep(0.02)
            woke = ctxt_switches(tid) - switches
            t.join(5)
            assert result == [False], "no touches: the handler cannot finish"
            assert all("poll" in w for w in wchans), wchans
            # A 2 ms sleep-and-waitpid loop would wake about 100 times in these 0.2 s.
            assert woke <= 3, f"the waiting thread woke {woke} times"

            t = threading.Thread(target=lambda: result.append(fh.wait(10)))
            t.start()
            time.sleep(0.05)
            assert ctypes.string_at(m.addr, m.length) == b"\x01" * m.length  # every page in: the handler exits
            t.join(10)
            assert not t.is_alive() and result == [False, True]
            assert fh.pid == 0 and fh.exit_status == 0


def test_a_forked_process_never_stops_the_owners_handler() -> None:
    with anon(N) as m:
        fh = FaultHandler([(m.addr, m.length)], lambda o, n: b"\x05" * n, prefetch=False).start()
        try:
            hpid, gpid = fh.pid, fh.guardian_pid

            def in_child() -> bool:
                fh.close()
                fh._finalizer()  # what atexit would run in a child that exits normally
                return fh.pid == 0

            assert run_in_child(in_child) is True
            assert {hpid, gpid} <= children_of() and fh.pid == hpid
            assert fh.wait(0.05) is False, "still serving"
            assert ctypes.string_at(m.addr, m.length) == b"\x05" * m.length
            assert fh.wait(10) is True
        finally:
            fh.close()


def test_forgotten_child_is_killed_and_reaped() -> None:
    r, w = os.pipe()
    try:

        def main() -> int:
            os.close(w)
            os.read(r, 1)  # blocks until killed (or the test closes w)
            return 0

        child = fork(main)
        pid = child.pid
        assert child.running and child.wait(0) is None
        del child
        gc.collect()
        assert not zombie_or_alive(pid)
    finally:
        os.close(r)
        os.close(w)


def test_child_status_and_signals() -> None:
    assert fork(lambda: 3).wait(10) == 3 << 8
    assert fork(lambda: 1 // 0).wait(10) == 1 << 8, "an exception exits with status 1"

    def pause() -> int:
        signal.pause()
        return 0

    child = fork(pause)
    assert child.wait(0.05) is None
    child.kill(signal.SIGTERM)
    status = child.wait(10)
    assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert child.closed and not child.running
    child.kill()  # reaped: a no-op, never a signal to a recycled pid
    with pytest.raises(ProcessLookupError):
        Child(os.getpid() + 10_000_000)  # no such process: pidfd_open fails
