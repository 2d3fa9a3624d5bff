"""Races around background checkpoints (issue 13): signals, handlers, ``close()``.

Real signals, real threads, real ptrace. What is checked:

* a signal taken off a thread's queue by the stop (a signal-delivery stop: it reached
  the thread between its seize and its stop) is delivered when the thread is let go:
  ``SIGTRAP`` included, a thread let go by the settling of a stop that failed, and a
  thread let go by the kernel because the tracer died (deterministic: the signal is
  sent to a seized thread, which makes the signal-delivery stop certain);
* signals sent from another process at a high rate to a thread busy in numpy, during
  repeated checkpoints: every one arrives (realtime signals are queued, so they are
  counted exactly; standard ones merge while pending, so each is sent only once the
  previous one has arrived). Counted by the interpreter's wakeup fd, which gets a byte
  per delivery (a Python handler may run once for several);
* a Python handler due while ``checkpoint()`` runs in the main thread runs after the
  pause: what it raises comes out of the call without breaking off the exchange with
  the helper (which made later generations store the previous instant's pages), a
  ``checkpoint()`` it makes is refused or taken after; every generation is the memory;
* ``close()`` from another thread while ``checkpoint()`` runs (``wait=True`` and
  ``wait=False``, in its pause or writing) waits for it or, with ``cancel=True``,
  cancels it; the file is left at a sealed generation; no fd, no process is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pagescan
from pagescan._uapi import libc
from pagescan._uapi.ptrace import PTRACE
from pagescan.snapshot import Checkpointer, CheckpointInfo, inspect, load, verify
from pagescan.snapshot._freeze import Frozen, freeze

from .conftest import requires_wp_async
from .procs import Child, children_of, forked

P = 4096

RT = int(signal.SIGRTMIN) + 1
F_SETPIPE_SZ = 1031


def tgkill(pid: int, tid: int, sig: int) -> bool:
    """Send ``sig`` to thread ``tid`` of ``pid``; False if refused (EAGAIN: the queue of
    realtime signals is full)."""
    return int(ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, sig)) == 0


class Deliveries:
    """The read end of a victim's wakeup fd: counts the signals delivered to it, by number."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        fcntl.fcntl(self.w, F_SETPIPE_SZ, 1 << 20)  # never full: a byte dropped would look like a lost signal
        self.got: dict[int, int] = {}

    def drain(self, timeout: float) -> bool:
        if not select.select([self.r], [], [], timeout)[0]:
            return False
        for b in os.read(self.r, 1 << 16):
            self.got[b] = self.got.get(b, 0) + 1
        return True

    def wait_for(self, sig: int, n: int, timeout: float = 5.0) -> int:
        """Wait until ``n`` deliveries of ``sig`` are counted (or ``timeout`` s pass); the count."""
        end = time.monotonic() + timeout
        while self.got.get(sig, 0) < n and time.monotonic() < end:
            self.drain(0.05)
        return self.got.get(sig, 0)

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


#: Counts, through the wakeup fd given as argv[1], every SIGTRAP, SIGUSR1 and SIGRTMIN+1
#: delivered; a thread busy in numpy prints its tid; runs until stdin closes.
_COUNTED = r"""
import os, signal, sys, threading
import numpy as np
from pagescan._uapi import libc
from pagescan._uapi.ptrace import PR_SET_PTRACER
try:
    libc.prctl(PR_SET_PTRACER, -1 & 0xFFFFFFFFFFFFFFFF)  # any tracer (Yama ptrace_scope 1)
except OSError:
    pass
w = int(sys.argv[1])
os.set_blocking(w, False)
signal.set_wakeup_fd(w, warn_on_full_buffer=True)
for s in (signal.SIGTRAP, signal.SIGUSR1, signal.SIGRTMIN + 1):
    signal.signal(s, lambda *a: None)
stop = threading.Event()
def busy():
    a = np.ones(1 << 15)
    while not stop.is_set():
        a.sum()
th = threading.Thread(target=busy)
th.start()
print(th.native_id, flush=True)
sys.stdin.read()
stop.set()
th.join()
"""


@contextmanager
def counted_victim() -> Iterator[tuple[int, int, Deliveries]]:
    """A process counting its signals: ``(pid, busy thread's tid, deliveries)``."""
    d = Deliveries()
    with subprocess.Popen([sys.executable, "-c", _COUNTED, str(d.w)], pass_fds=(d.w,), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as p:
        try:
            os.close(d.w)
            d.w = -1
            assert p.stdout is not None and p.stdin is not None
            tid = int(p.stdout.readline())
            yield p.pid, tid, d
            p.stdin.close()
            assert p.wait(30) == 0
        finally:
            p.kill()
            d.close()


def _in_signal_delivery_stop(pid: int, tid: int, sig: int) -> None:
    """Seize ``tid`` and send it ``sig``: the thread takes it off its queue and stops
    for us (a signal-delivery stop); from here on only its tracer can give it back."""
    libc.ptrace(PTRACE.SEIZE, tid)
    assert tgkill(pid, tid, sig)
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "t":
                return
        assert time.monotonic() < deadline
        time.sleep(0.001)


def _freeze_and_die(pid: int, tid: int) -> int:
    """(In a forked child.) Stop every thread of ``pid`` and exit without letting them go."""
    _in_signal_delivery_stop(pid, tid, RT)
    fr = freeze(pid)
    return fr.tids[tid]


@pytest.mark.parametrize("how", ["thaw", "thaw SIGTRAP", "settle", "tracer dies"])
def test_a_signal_taken_by_the_stop_is_delivered_when_the_thread_is_let_go(how: str) -> None:
    """A thread that a signal reaches between its seize and its stop is reported in a
    signal-delivery stop: the kernel took the signal off its queue and delivers it only
    if the tracer resumes the thread with it. ``thaw`` gives it back (``SIGTRAP`` too: a
    real signal, an interrupt is reported as ``PTRACE_EVENT_STOP``); so does the settling
    of a thread seized but not yet seen stopped (a freeze that failed), and the kernel's
    detach when the tracer dies before letting the threads go (the stop was waited for
    with ``WNOWAIT``, which leaves the signal with the thread)."""
    sig = int(signal.SIGTRAP) if how == "thaw SIGTRAP" else RT
    with counted_victim() as (pid, tid, d):
        if how == "tracer dies":
            assert Child(lambda: _freeze_and_die(pid, tid)).result(30) == RT
        else:
            _in_signal_delivery_stop(pid, tid, sig)
            if how == "settle":
                fr = Frozen(pid)
                fr.seized.add(tid)  # seized, its stop not waited for yet
            else:
                fr = freeze(pid)
            handed = fr.tids.get(tid)
            fr.thaw()
            assert handed == (None if how == "settle" else sig)
        assert d.wait_for(sig, 1) == 1


_CHECKPOINTING = r"""
import os, signal, sys, threading, time
import numpy as np
import pagescan
from pagescan.snapshot import Checkpointer
w = int(sys.argv[2])
os.set_blocking(w, False)
signal.set_wakeup_fd(w, warn_on_full_buffer=True)
for s in (signal.SIGTRAP, signal.SIGUSR1, signal.SIGRTMIN + 1):
    signal.signal(s, lambda *a: None)
s = pagescan.zeros(1 << 18, np.int64)
stop = threading.Event()
def busy():
    a = np.ones(1 << 15)
    k = 0
    while not stop.is_set():
        a.sum()
        s[(k * 512) % s.size] = k
        k += 1
th = threading.Thread(target=busy)
th.start()
print(th.native_id, flush=True)
methods = set()
n = 0
with Checkpointer(sys.argv[1], {"s": s}) as ck:
    ck._use_ptrace = True
    ck.checkpoint()
    t = time.monotonic()
    while time.monotonic() - t < float(sys.argv[3]):
        r = ck.checkpoint(wait=bool(n % 2))
        methods.add((r if n % 2 else r.result()).method)
        n += 1
stop.set()
th.join()
print(n, sorted(methods), flush=True)
"""


@requires_wp_async
def test_signals_sent_during_repeated_checkpoints_all_arrive(tmp_path: Path) -> None:
    """Another process sends a thread busy in numpy SIGTRAP and SIGUSR1 in turn (each
    once the previous one has arrived: standard signals merge while pending) and bursts
    of a realtime signal (queued: counted exactly) while the program checkpoints again
    and again (ptrace instants): every signal sent is delivered, exactly once."""
    d = Deliveries()
    seconds = 2.5
    with subprocess.Popen([sys.executable, "-c", _CHECKPOINTING, str(tmp_path / "s.ckpt"), str(d.w), str(seconds)],
                          pass_fds=(d.w,), stdout=subprocess.PIPE, text=True) as p, contextlib.ExitStack() as stack:
        stack.callback(d.close)
        stack.callback(p.kill)
        os.close(d.w)
        d.w = -1
        assert p.stdout is not None
        tid = int(p.stdout.readline())
        sent = {int(signal.SIGTRAP): 0, int(signal.SIGUSR1): 0, RT: 0}
        k = 0
        end = time.monotonic() + seconds - 0.3  # (the victim's threads run until it ends)
        while time.monotonic() < end:
            std = int(signal.SIGTRAP if k % 2 else signal.SIGUSR1)
            k += 1
            assert tgkill(p.pid, tid, std)
            sent[std] += 1
            for _ in range(4):
                sent[RT] += tgkill(p.pid, tid, RT)
            assert d.wait_for(std, sent[std]) == sent[std], (sent, d.got)
        assert d.wait_for(RT, sent[RT]) == sent[RT], (sent, d.got)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        n, methods = out.split(" ", 1)
        assert int(n) > 10 and methods.strip() == "['ptrace']", out
        d.drain(0.05)
        assert d.got == sent and sent[RT] > 1000, (sent, d.got)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _close_while_checkpointing(path: Path, s: np.ndarray, wait: bool, cancel: bool, delay: float | None) -> None:
    """A thread checkpoints ``s`` three times (``s[::P] = k`` before the k-th); ``close()``
    comes once its first write has started (``delay`` None) or after ``delay`` s."""
    started = threading.Event()
    outcomes: list[object] = []

    def progress(done: int, total: int) -> None:
        if not started.is_set():
            started.set()
            time.sleep(0.02)  # close() is called meanwhile

    ck = Checkpointer(path, {"s": s})
    ck.checkpoint()

    def run() -> None:
        for k in range(1, 4):
            s[::P] = k
            try:
                r = ck.checkpoint(progress, wait=wait)
                info = r if isinstance(r, CheckpointInfo) else r.result(30)
                outcomes.append((info.generation, k))
            except CancelledError:
                outcomes.append("cancelled")
            except ValueError as err:
                assert "closed" in str(err)
                outcomes.append("closed")
                return

    th = threading.Thread(target=run)
    th.start()
    if delay is None:
        assert started.wait(30)
    else:
        time.sleep(delay)
    ck.close(cancel=cancel)
    th.join(30)
    assert not th.is_alive()
    assert outcomes and (cancel or "cancelled" not in outcomes), outcomes
    sealed = [o for o in outcomes if isinstance(o, tuple)]
    summary = inspect(path)
    assert summary["unsealed_tail_bytes"] == 0 and summary["damage"] is None, summary
    assert len(verify(path)) == 1 + len(sealed), outcomes
    if sealed:
        gen, k = sealed[-1]
        assert gen == 1 + len(sealed)
        assert (load(path)["s"][::P] == k).all()


@requires_wp_async
@pytest.mark.parametrize("wait", [True, False])
def test_close_from_another_thread_waits_for_or_cancels_the_running_checkpoint(tmp_path: Path, wait: bool) -> None:
    """``close()`` while another thread is inside ``checkpoint()`` (in its pause, or
    writing: a ``progress`` callback says when) waits for it, ``close(cancel=True)``
    cancels it; it never closes the helper or the file under it. The running call ends
    with its result, ``CancelledError`` (cancelled) or ``ValueError`` (it started after
    ``close()`` had begun), nothing else; the file is left at a sealed generation, the
    last one sealed holding what was written before it; no fd or process is left."""
    s = pagescan.zeros(4 << 20, np.uint8)
    rng = random.Random(13)
    before, fds = children_of(), _fds()
    for it in range(6):
        _close_while_checkpointing(tmp_path / f"{it}.ckpt", s, wait, cancel=bool(it % 2),
                                   delay=None if it % 4 < 2 else rng.random() * 0.03)
    assert children_of() == before
    assert _fds() == fds


#: The main thread checkpoints again and again (writing a page of ``s`` before each), a
#: thread busy in numpy sends itself SIGUSR1 all the while; the main thread runs the
#: Python handler, which (while a checkpoint call is under way) raises, or calls
#: ``checkpoint(wait=False)`` itself. After every checkpoint that returned, the file's
#: last generation must be ``s``.
_HANDLED = r"""
import signal, sys, threading, time
import numpy as np
import pagescan
from pagescan.snapshot import Checkpointer, load
mode, seconds = sys.argv[2], float(sys.argv[3])
s = pagescan.zeros(1 << 17, np.int64)
stop = threading.Event()
def busy():
    a = np.ones(1 << 14)
    me = threading.get_ident()
    while not stop.is_set():
        a.sum()
        signal.pthread_kill(me, signal.SIGUSR1)
        time.sleep(0.003)
class Boom(Exception):
    pass
armed, inner, said = [False], [], {}
def handler(signum, frame):
    if not armed[0]:
        return
    if mode == "raise":
        raise Boom
    try:
        inner.append(ck.checkpoint(wait=False))
        said["inner ok"] = said.get("inner ok", 0) + 1
    except RuntimeError:  # inside a synchronous call still
        said["inner refused"] = said.get("inner refused", 0) + 1
signal.signal(signal.SIGUSR1, handler)
th = threading.Thread(target=busy)
th.start()
bad = 0
with Checkpointer(sys.argv[1], {"s": s}) as ck:
    ck._use_ptrace = True
    ck.checkpoint()
    t, i = time.monotonic(), 0
    while time.monotonic() - t < seconds:
        i += 1
        s[(i * 512) % s.size] = i
        armed[0] = True
        try:
            r = ck.checkpoint(wait=bool(i % 2))
            armed[0] = False
            if not isinstance(r, pagescan.snapshot.CheckpointInfo):
                r.result(30)
            for f in inner:
                f.result(30)
            said["ok"] = said.get("ok", 0) + 1
            if not (load(sys.argv[1])["s"] == s).all():
                bad += 1
        except Boom:
            said["boom"] = said.get("boom", 0) + 1
        finally:
            armed[0] = False
stop.set()
th.join()
said["restored"] = signal.getsignal(signal.SIGUSR1) is handler and signal.getsignal(signal.SIGINT) is signal.default_int_handler
print(bad, sorted(said.items()), flush=True)
"""


@requires_wp_async
@pytest.mark.parametrize("mode", ["raise", "reentrant"])
def test_python_handlers_run_after_the_pause(tmp_path: Path, mode: str) -> None:
    """A Python signal handler due while ``checkpoint()`` runs in the main thread (the
    signal went to another thread: the main thread runs the handler whatever its
    signal mask) runs when the pause is over, never inside it: an exception it raises
    (``KeyboardInterrupt``, say) comes out of ``checkpoint()`` without breaking off the
    exchange with the helper (whose next reply would then answer the next request: the
    pages of the new instant would go unstored), and a ``checkpoint()`` it makes is
    refused (a synchronous call, still inside) or taken after the call's own. Every
    generation sealed is the memory of its instant."""
    r = subprocess.run([sys.executable, "-c", _HANDLED, str(tmp_path / "h.ckpt"), mode, "1.5"],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    bad, said = r.stdout.split(" ", 1)
    assert bad == "0", r.stdout
    assert "'ok'" in said and ("'boom'" in said if mode == "raise" else "'inner ok'" in said), said
    assert "('restored', True)" in said, said  # the program's handlers are back


def test_close_from_the_progress_callback_raises_and_leaves_the_checkpoint_alone(tmp_path: Path) -> None:
    """The ``progress`` callback of a background checkpoint runs in its thread, in the
    middle of the write: ``close()`` there (``cancel=True`` too) raises RuntimeError and
    changes nothing; the checkpoint completes and the Checkpointer stays usable."""
    s = pagescan.zeros(1 << 20, np.uint8)
    said: list[str] = []
    path = tmp_path / "p.ckpt"
    with Checkpointer(path, {"s": s}) as ck:
        ck.checkpoint()

        def progress(done: int, total: int) -> None:
            try:
                ck.close(cancel=True)
            except RuntimeError as err:
                said.append(str(err))

        s[::P] = 7
        assert ck.checkpoint(progress, wait=False).result(30).generation == 2
        assert ck.checkpoint().generation == 3
    assert said and all("progress callback" in x for x in said), said
    assert len(verify(path)) == 3 and (load(path)["s"][::P] == 7).all()


_BROKEN_OFF = r"""
import signal, sys, threading, time
import numpy as np, pagescan
from pagescan.snapshot import Checkpointer, load
s = pagescan.zeros(1 << 22, np.int64)
stop, go = threading.Event(), threading.Event()
def busy():
    a = np.ones(1 << 14)
    while not stop.is_set():
        a.sum()
        if go.is_set():  # once the call has sent its request: the handler is due while it waits
            go.clear()
            time.sleep(0.002)
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
class Boom(Exception):
    pass
armed = [False]
def handler(signum, frame):
    if armed[0]:
        raise Boom
signal.signal(signal.SIGUSR1, handler)
th = threading.Thread(target=busy)
th.start()
out = []
with Checkpointer(sys.argv[1], {"s": s}) as ck:
    ck._use_ptrace = True
    ck.checkpoint()
    ck.checkpoint()
    s[::512] = 1  # every page: the pre-copy takes a while
    ck._pre.hold = 0.2  # and the helper replies twice (the first while holding the threads)
    armed[0] = True
    go.set()
    try:
        ck.checkpoint()
    except Boom:
        out.append("boom")
    armed[0] = False
    ck._pre.hold = 0.0
    for i in range(3):
        s[1000 + i * 512] = 100 + i
        ck.checkpoint()
        out.append(bool((load(sys.argv[1])["s"] == s).all()))
stop.set()
th.join()
print(out)
"""


@requires_wp_async
def test_an_exception_from_a_handler_does_not_break_off_the_exchange_with_the_helper(tmp_path: Path) -> None:
    """A handler raising while the call waits for the helper's replies (it became due
    during the pre-copy; the helper's first reply wakes the call) used to leave the
    last reply unread: each later checkpoint read the previous one's reply, and stored
    the pages of the previous instant, not its own (writes lost: the file no longer
    matched memory). Now the exception comes out after the pause, and every later
    generation is the memory."""
    r = subprocess.run([sys.executable, "-c", _BROKEN_OFF, str(tmp_path / "b.ckpt")], check=False,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['boom', True, True, True]", r.stdout


def test_a_child_forked_while_another_thread_checkpoints_can_close_its_copy(tmp_path: Path) -> None:
    """A ``fork`` while another thread is inside ``checkpoint()`` copies that call's
    lock, held by a thread that does not exist in the child: there ``close()`` only
    drops the child's copies, and ``checkpoint()`` raises ``RuntimeError``, at once
    (before: both waited for the lock, for good). The parent's checkpoint completes."""
    s = pagescan.zeros(1 << 16, np.int64)
    path = tmp_path / "f.ckpt"
    inside, release = threading.Event(), threading.Event()

    def progress(done: int, total: int) -> None:
        inside.set()
        release.wait(30)

    with Checkpointer(path, {"s": s}) as ck:
        ck.checkpoint()
        s[:] = 5
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(ck.checkpoint(progress)))
        t.start()
        try:
            assert inside.wait(30)

            def child() -> str:
                try:
                    ck.checkpoint()
                    said = "checkpointed"
                except RuntimeError as err:
                    said = str(err)
                ck.close()
                return said + (" closed" if ck.closed else " open")

            with forked(child, alarm=20) as c:
                said = c.result(30)
        finally:
            release.set()
            t.join(30)
        assert "forked child" in said and said.endswith(" closed"), said
        assert result and result[0].generation == 2
    assert load(path)["s"].tolist() == s.tolist()


def test_a_handler_raising_while_the_handlers_are_held_back_leaves_them_all_in_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python signal handler can run between any two bytecodes of the main thread,
    also while ``checkpoint()`` swaps the program's handlers for recorders (the stress
    test above caught one raising there, once in a loaded suite run). Its exception
    comes out, and every handler swapped so far is back in place: none is left a
    recorder, and the next checkpoint holds them back again."""
    import pagescan._held as snap  # (the holding lives there; snapshot's _HeldSignals is it)

    class Boom(Exception):
        pass

    real = snap._getsignal

    def getsignal(sig: int) -> object:
        if sig == signal.SIGUSR1:
            raise Boom  # as if SIGUSR1's own handler ran here and raised
        return real(sig)

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    monkeypatch.setattr(snap, "_getsignal", getsignal)
    with pytest.raises(Boom):
        snap.HeldSignals()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert snap.HeldSignals.live is None
    monkeypatch.setattr(snap, "_getsignal", real)
    held = snap.HeldSignals()
    try:
        assert held.owner and signal.getsignal(signal.SIGINT) == held._record
    finally:
        held.release()
    assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]


_HANDLER_CHECKPOINTS = """
import os, signal, sys
import numpy as np
import pagescan
from pagescan.snapshot import Checkpointer
path = sys.argv[1]
state = {"a": pagescan.zeros(16 * 4096, np.uint8)}
ck = Checkpointer(path, state)
refused, other, busy = [0], [], [False]
def handler(sig, frame):
    if busy[0]:
        return
    busy[0] = True
    try:
        ck.checkpoint()
    except RuntimeError:
        refused[0] += 1
    except ValueError as err:  # between close() and the next Checkpointer
        other.append(str(err))
    finally:
        busy[0] = False
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
for i in range(int(sys.argv[2])):
    state["a"][(i * 4096) % len(state["a"])] = i & 0xFF
    ck.checkpoint()
    if i % 500 == 499:
        ck.close()
        os.unlink(path)
        ck = Checkpointer(path, state)
signal.setitimer(signal.ITIMER_REAL, 0, 0)
ck.close()
assert all("closed Checkpointer" in o for o in other), other
print(refused[0])
"""


def test_checkpoint_from_a_signal_handler_never_waits_for_its_own_thread(tmp_path: Path) -> None:
    """A handler run between the main thread's taking of the lock and its noting that
    it is inside ``checkpoint()`` (or between the two at the end, or in ``close()``)
    passed the reentrancy check and waited for the lock its own thread held: a hang,
    every run within 2,000 checkpoints. Now the thread is marked before it takes the
    lock and unmarked after it releases it: the handler gets RuntimeError."""
    r = subprocess.run([sys.executable, "-c", _HANDLER_CHECKPOINTS, str(tmp_path / "c.ck"), "2500"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) > 0, "no handler ran inside a checkpoint: the test tested nothing"
