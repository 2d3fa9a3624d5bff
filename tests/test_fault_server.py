"""The fault server (``pagescan._faultserver``, ``start_fault_server``): lazy loads served
by handlers forked ahead of time from a process of their own, never from the owner.

* a load through the server: bit-exact; the handler is the server's child, not ours;
  the server is the guardian; each load gets a new spare;
* the server's handler killed: the server poisons, the owner gets SIGBUS (no hang,
  no zeros); the server and its spare end with the owner;
* a process forked from the owner never uses the owner's server; a recording load
  does not either (it forks its handler).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pagescan import _faultserver
from pagescan.snapshot import load, start_fault_server

from .procs import run_in_child, wait_gone
from .test_snapshot import Owner, kill_handler_expect_sigbus, wait_go
from .test_state import lazy_state, raw


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


@pytest.fixture
def server() -> Iterator[int]:
    """This process's server, ready (stopped and reaped after the test)."""
    assert start_fault_server(wait=60)
    srv = _faultserver._server
    assert srv is not None
    yield srv.child.pid
    _faultserver.stop()


def test_lazy_load_through_the_server(tmp_path: Path, server: int) -> None:
    path = tmp_path / "s.ck"
    want = lazy_state(path, 31)
    for _ in range(3):  # one spare per load (waited for: a load that finds none forks its own)
        assert start_fault_server(wait=60)
        got = load(path, lazy=True)
        fh = got.handler
        assert fh is not None
        hpid = fh.pid
        assert fh.guardian_pid == server and _ppid(hpid) == server, "a spare of the server, not our fork"
        assert raw(got["big"]) == raw(want["big"]) and raw(got["mid"]) == raw(want["mid"])
        assert fh.wait(30) and fh.exit_status == 0 and fh.pid == 0
        assert fh.progress() == (fh.total_pages, fh.total_pages)
        del got
        wait_gone([hpid])
    assert _faultserver._server is not None and _faultserver._server.child.wait(0) is None, "the server stays"


def test_threads_loading_at_once_through_the_server(tmp_path: Path, server: int) -> None:
    """Only one request is in flight at a time: the other threads fork their handler."""
    path = tmp_path / "t.ck"
    want = lazy_state(path, 32, npages=256)
    errors: list[str] = []
    guardians: list[int] = []

    def one() -> None:
        got = load(path, lazy=True)
        if raw(got["big"]) != raw(want["big"]):
            errors.append("wrong data")
        assert got.handler is not None
        guardians.append(got.handler.guardian_pid)
        got.handler.close()

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(guardians) == 4
    assert server in guardians


def test_server_handler_killed_is_sigbus_and_server_ends_with_owner(tmp_path: Path) -> None:
    path = tmp_path / "k.ck"
    want = lazy_state(path, 33, npages=1024)

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        assert start_fault_server(wait=60)
        got = load(path, lazy=True, prefetch=False)
        fh = got.handler
        assert fh is not None and fh.guardian_pid == _faultserver._server.child.pid  # type: ignore[union-attr]
        ok = np.array_equal(got["big"][0], want["big"][0])
        report(struct.pack("iii", fh.pid, fh.guardian_pid, int(ok)).hex().encode())
        wait_go(go_r)
        _ = float(got["big"][900].sum())  # never served: SIGBUS
        report(b"!read " + (b"zeros" if not got["big"][900].any() else b"data"))

    kill_handler_expect_sigbus(body)  # also: handler and server gone after the owner


def test_forked_process_and_recording_do_not_use_the_server(tmp_path: Path, server: int) -> None:
    path = tmp_path / "f.ck"
    want = lazy_state(path, 34, npages=256)

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        got = load(path, lazy=True)
        fh = got.handler
        assert fh is not None and raw(got["big"]) == raw(want["big"])
        mine = _ppid(fh.pid) == os.getpid() and fh.guardian_pid != server
        report(b"ok" if mine and _faultserver._server is None else b"!used the parent's server")
        fh.close()

    o = Owner(body)
    assert o.read(2) == b"ok"
    status, rest = o.finish()
    assert status == 0, rest
    got = load(path, lazy=True, record=True)
    assert got.handler is not None and got.handler.guardian_pid != server
    assert raw(got["big"]) == raw(want["big"])
    got.handler.close()
    got = load(path, lazy=True)  # the server still serves the parent
    assert got.handler is not None and got.handler.guardian_pid == server
    assert raw(got["big"]) == raw(want["big"])
    got.handler.close()


def test_spare_killed_while_waiting_load_forks_its_own(tmp_path: Path, server: int) -> None:
    """The announced spare is dead when the load comes: nothing was handed over, the load
    forks its handler (right data), and the server forks a new spare for the next one."""
    import signal

    path = tmp_path / "d.ck"
    want = lazy_state(path, 35, npages=256)
    srv = _faultserver._server
    assert srv is not None and srv.spare is not None
    spare = srv.spare[0]
    os.kill(spare, signal.SIGKILL)
    wait_gone([spare])
    got = load(path, lazy=True)
    assert got.handler is not None and got.handler.guardian_pid != server
    assert raw(got["big"]) == raw(want["big"])
    got.handler.close()
    assert start_fault_server(wait=60)  # the next spare
    got = load(path, lazy=True)
    assert got.handler is not None and got.handler.guardian_pid == server
    assert raw(got["big"]) == raw(want["big"])
    got.handler.close()


@pytest.mark.parametrize(("wait", "exc"), [("1", TypeError), (True, TypeError), (-1, ValueError),
                                           (float("nan"), ValueError), (float("inf"), ValueError)])
def test_start_fault_server_refuses_a_bad_wait(wait: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="wait"):
        start_fault_server(wait=wait)  # type: ignore[arg-type]
    assert _faultserver._server is None, "refused before starting anything"


def test_server_and_spare_end_with_their_owner() -> None:
    def body(report: Callable[[bytes], None], go_r: int) -> None:
        assert start_fault_server(wait=60)
        srv = _faultserver._server
        assert srv is not None and srv.spare is not None
        report(struct.pack("ii", srv.child.pid, srv.spare[0]).hex().encode())
        wait_go(go_r)
        os._exit(0)  # no atexit: only the pidfd and the sockets tell them

    o = Owner(body)
    server, spare = struct.unpack("ii", bytes.fromhex(o.read(16).decode()))
    assert _ppid(spare) == server
    o.go()
    status, rest = o.finish()
    assert status == 0, rest
    wait_gone([server, spare])


def test_start_after_the_server_died_starts_a_new_one(tmp_path: Path) -> None:
    """A server that died (killed, crashed) is reaped and replaced by the next start
    (before: every later start raised ConnectionError, and the dead server stayed a
    zombie until exit)."""
    import signal

    path = tmp_path / "r.ck"
    want = lazy_state(path, 36, npages=256)
    try:
        assert start_fault_server(wait=60)
        srv = _faultserver._server
        assert srv is not None
        old = srv.child.pid
        os.kill(old, signal.SIGKILL)
        wait_gone([old])
        assert start_fault_server(wait=60)
        srv = _faultserver._server
        assert srv is not None and srv.child.pid != old
        assert not os.path.exists(f"/proc/{old}"), "the dead server was not reaped"
        got = load(path, lazy=True)
        assert got.handler is not None and got.handler.guardian_pid == srv.child.pid
        assert raw(got["big"]) == raw(want["big"])
        got.handler.close()
    finally:
        _faultserver.stop()


def test_start_waits_only_as_long_as_told_and_never_for_itself() -> None:
    """``start_fault_server()`` (wait=0) returns at once while another thread's call
    waits for the server, and one made from a signal handler that interrupted this
    thread's own waiting call returns (``False``) instead of waiting for that call,
    for good."""
    import signal

    def body() -> tuple[list[bool], bool, bool]:
        seen: list[bool] = []

        def handler(signum: int, frame: object) -> None:
            srv = _faultserver._server
            seen.append(srv is not None and srv.lock.locked())  # interrupted inside the wait
            seen.append(start_fault_server())

        signal.signal(signal.SIGUSR1, handler)
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        ready = start_fault_server(wait=60)
        # another thread's waiting call: a wait=0 call from here returns at once
        _faultserver.stop()
        t = threading.Thread(target=start_fault_server, kwargs={"wait": 60})
        t.start()
        while _faultserver._server is None or not _faultserver._server.lock.locked():
            pass
        other = threading.Thread(target=start_fault_server)
        other.start()
        other.join(5)
        quick = not other.is_alive()
        t.join(60)
        _faultserver.stop()
        return seen, ready, quick

    seen, ready, quick = run_in_child(body, timeout=60)
    assert seen == [True, False] and ready
    assert quick, "a wait=0 start waited for another thread's wait"


def test_server_killed_while_its_handler_serves(tmp_path: Path, server: int) -> None:
    """The server (the guardian) killed mid-load: the handler serves on, right data;
    ``wait()`` waits for the handler itself (before: it returned ``False`` at once,
    with ``exit_status`` 0, and no longer tracked the handler, which ``close()`` then
    left running)."""
    import signal

    path = tmp_path / "g.ck"
    want = lazy_state(path, 37, npages=512)
    got = load(path, lazy=True, prefetch=False)
    fh = got.handler
    assert fh is not None and fh.guardian_pid == server
    hpid = fh.pid
    assert raw(got["big"][:4]) == raw(want["big"][:4])
    os.kill(server, signal.SIGKILL)
    wait_gone([server])
    assert not fh.wait(0.2) and fh.pid == hpid, "the handler, still serving, is no longer waited for"
    assert fh.exit_status is None
    assert all(raw(got[k]) == raw(want[k]) for k in want)  # every page touched: served
    assert fh.wait(30) and fh.exit_status == 0 and fh.pid == 0
    wait_gone([hpid])
    fh.close()


def test_start_in_a_child_forked_while_another_thread_starts_the_server() -> None:
    """A fork while another thread is inside ``start()`` (its spawn) copies that
    thread's hold on the start: the child's own ``start()`` must not wait for a
    thread that does not exist there (before: for good)."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:  # as another thread inside start(), spawning
        assert _faultserver._start_lock.acquire()
        holding.set()
        done.wait(30)
        _faultserver._start_lock.release()

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(30)

        def body() -> bool:
            try:
                return start_fault_server(wait=30)
            finally:
                _faultserver.stop()

        assert run_in_child(body, timeout=40)
    finally:
        done.set()
        t.join()


_OWNER_GONE_AT_ONCE = """
import os
from pagescan.snapshot import start_fault_server
pid = os.fork()
if pid == 0:
    start_fault_server()  # wait=0: the server is still starting
    os._exit(0)
os.waitpid(pid, 0)  # the owner reaped at once: gone before the server can watch it
"""


def test_the_server_ends_quietly_when_its_owner_is_gone_before_it_started() -> None:
    """An owner that exits (and is reaped) while its server is still starting: the
    server exits without a word (before: a ProcessLookupError traceback on the
    owner's stderr, which it keeps). ``subprocess.run`` reads stderr to its end, which
    comes when the server has exited too."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _OWNER_GONE_AT_ONCE], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr


_OWNER_EXITS_AFTER_A_LOAD = """
import sys, time
import numpy as np
import pagescan
from pagescan.snapshot import Checkpointer, load, start_fault_server
state = {"big": pagescan.empty((64, 512)), "small": np.arange(7)}
state["big"][:] = 3.0
with Checkpointer(sys.argv[1], state) as ck:
    ck.checkpoint()
assert start_fault_server(wait=60)
got = load(sys.argv[1], lazy=True)
assert float(got["big"][7, 3]) == 3.0
time.sleep(0.3)  # the server announces its next spare; this process never reads it
"""


def test_the_server_ends_quietly_when_its_owner_exits_with_an_unread_spare(tmp_path: Path) -> None:
    """The owner ends with the server's announcement of a new spare unread on its
    socket, so the server's next read fails with ECONNRESET, not EOF: it is the end
    all the same (before: a ConnectionResetError traceback on the owner's stderr, 4
    runs in 4)."""
    import subprocess
    import sys

    for i in range(3):
        r = subprocess.run([sys.executable, "-c", _OWNER_EXITS_AFTER_A_LOAD, str(tmp_path / f"{i}.ck")],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and r.stderr == "", r.stderr
