"""Consistent background checkpoints (issue 13): every generation is the memory of one instant.

Real threads writing real memory, real forks, real files. What is checked:

* the torn-state detector: writer threads run transactions ``A[j] = c; B[j] = c`` (A on
  low pages, B on high pages; numpy slice assignments big enough to release the GIL)
  while ``checkpoint(wait=False)`` and ``checkpoint()`` run again and again; every
  generation loaded satisfies ``A[j] >= B[j] >= A[j] - 1`` and never goes back in
  time; after the writers stop the last generation is the memory, exactly (the write
  tracking survived every instant). With the ptrace path (an entry on a page boundary
  and one that is not), the fork fallback, and the default choice declining the
  ptrace path every time. The same detector catches the old, fuzzy copy (read from
  the live process while it writes): the check can fail;
* SIGKILL of a process at random moments during background checkpoints (60 rounds,
  in forked processes): the last sealed generation loads intact and satisfies the
  invariant; every frozen twin exits when its parent dies;
* the frozen twin killed mid-copy: ``result()`` raises ``OSError(ESRCH)`` saying so, the
  program keeps writing, nothing sealed is damaged, the next checkpoint stores the
  chunks the failed one had found;
* ``close()`` waits for a checkpoint in flight, ``close(cancel=True)`` abandons it;
* disk full (a small tmpfs) in the background surfaces in ``result()``; the next
  checkpoint (after the tmpfs grows) works;
* a thread traced by another process (a debugger's place): PTRACE_SEIZE is refused
  (EPERM) and every checkpoint forks;
* the helper SIGKILLed while it holds every thread stopped: the threads run on, the
  call raises ``ProcessLookupError``, the next checkpoint is full; the helper killed
  between checkpoints is replaced; no process is left over.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
import numpy as np
import pytest

import pagescan
from pagescan._uapi import libc
from pagescan.snapshot import CheckpointError, Checkpointer, LoadedState, PendingCheckpoint, _read_self, load, verify

from .conftest import requires_wp_async
from .memory import anon
from .procs import Child as ProcChild
from .procs import children_of

pytestmark = requires_wp_async

P = 4096
N = 64 * 1024  # int64 per half: A and B are 512 KiB each
BLOCK = 4096  # elements per slice transaction (8 pages; numpy releases the GIL)


def loaded(path: Path, generation: int | None = None) -> LoadedState:
    """``load()`` of a state checkpointed from a dict."""
    out = load(path, generation=generation)
    assert isinstance(out, LoadedState)
    return out


def invariant_breaks(s: np.ndarray) -> int:
    """How many j break ``A[j] >= B[j] >= A[j] - 1`` in a state ``s = [A | B]``."""
    a, b = s[:N], s[N:]
    return int(np.count_nonzero((b > a) | (b < a - 1)))


@contextmanager
def writers(s: np.ndarray, nthreads: int = 2) -> Iterator[list[int]]:
    """Threads running ``A[j] = c; B[j] = c`` on disjoint blocks until the block ends.

    Thread 0 writes whole blocks with slice assignments (no GIL inside); the others
    single elements spread over the pages. Yields the transaction counts."""
    a, b = s[:N], s[N:]
    stop = threading.Event()
    counts = [0] * nthreads
    nblocks = N // BLOCK

    def slices(t: int) -> None:
        c = 0
        mine = list(range(0, nblocks, nthreads))
        while not stop.is_set():
            c += 1
            for k in mine:
                sl = slice(k * BLOCK, (k + 1) * BLOCK)
                a[sl] = c
                b[sl] = c
            counts[t] += 1

    def elements(t: int) -> None:
        rng = np.random.default_rng(t)
        mine = [k for k in range(nblocks) if k % nthreads == t]
        js = np.concatenate([np.arange(k * BLOCK, (k + 1) * BLOCK, 97) for k in mine])
        while not stop.is_set():
            for j in rng.choice(js, 64).tolist():
                c = int(a[j]) + 1
                a[j] = c
                b[j] = c
            counts[t] += 1

    ths = [threading.Thread(target=slices if t == 0 else elements, args=(t,)) for t in range(nthreads)]
    for th in ths:
        th.start()
    try:
        yield counts
    finally:
        stop.set()
        for th in ths:
            th.join()


def check_generations(path: Path, first: int = 1) -> int:
    """Every generation from ``first`` on satisfies the invariant and none goes back in time."""
    prev = None
    n = len(verify(path))
    for g in range(first, n + 1):
        s = loaded(path, generation=g)["s"]
        assert invariant_breaks(s) == 0, f"generation {g} is torn"
        if prev is not None:
            assert (s >= prev).all(), f"generation {g} went back in time"
        prev = s
    return n


@pytest.mark.parametrize("method,offset", [("ptrace", 0), ("ptrace", 8), ("fork", 0), ("declined", 0)])
def test_every_generation_is_one_instant_while_threads_write(tmp_path: Path, method: str, offset: int) -> None:
    """``ptrace``: the helper's pre-copy rounds and stop (offset 8: the entry does not
    start on a page boundary, so its chunks straddle pages); ``fork``: the fallback;
    ``declined``: the default per-checkpoint choice, with costs that make a fork look
    cheaper every time (its counting walk, which stops early, must not lose pages)."""
    mem = pagescan.zeros(2 * N * 8 + P, np.uint8)
    s = mem[offset:offset + 2 * N * 8].view(np.int64)
    path = tmp_path / "c.ckpt"
    methods = set()
    bg_methods = set()
    with Checkpointer(path, {"s": s}) as ck:
        ck._use_ptrace = {"ptrace": True, "fork": False, "declined": None}[method]
        ck._cost["copy"] = 1e9 if method == "declined" else ck._cost["copy"]
        ck.checkpoint()
        with writers(s) as counts:
            # At least 10 rounds however slow the machine (a loaded CI ran 6 in 4 s);
            # more while 4 s last, at most 40.
            t0 = time.monotonic()
            rounds = 0
            while rounds < 10 or (rounds < 40 and time.monotonic() < t0 + 4):
                if rounds % 4 == 3:
                    info = ck.checkpoint()
                else:
                    fut = ck.checkpoint(wait=False)
                    assert isinstance(fut, PendingCheckpoint)
                    info = fut.result(timeout=30)
                    bg_methods.add(info.method)
                methods.add(info.method)
                rounds += 1
        assert min(counts) > 0
        final = ck.checkpoint()
    if method == "declined":  # (a synchronous one takes the ptrace path while little is written)
        assert bg_methods == {"fork"} and methods <= {"fork", "ptrace"}
    else:
        assert methods == {method}
    assert check_generations(path) == final.generation
    np.testing.assert_array_equal(loaded(path)["s"], s)  # tracking survived every instant


def test_bad_checkpoint_arguments_are_refused_before_anything_is_taken(tmp_path: Path) -> None:
    """A ``progress`` that is not callable and a ``wait`` that is not a bool are
    ``TypeError`` from the call, before the instant (nothing re-armed, no generation);
    ``restore`` checks its ``progress`` before writing a byte."""
    from pagescan.snapshot import inspect, restore

    a = pagescan.zeros(4 * P, np.uint8)
    path = tmp_path / "args.ckpt"
    with Checkpointer(path, {"a": a}) as ck:
        ck.checkpoint()
        a[0] = 1
        for kw in ({"progress": 5}, {"wait": "no"}, {"wait": None}, {"wait": 1}):
            with pytest.raises(TypeError):
                ck.checkpoint(**kw)  # type: ignore[call-overload]
        assert len(inspect(path)["generations"]) == 1
        assert ck.checkpoint().pages == 1  # the write was still found
    tgt = pagescan.zeros(4 * P, np.uint8)
    tgt[:] = 7
    with pytest.raises(TypeError, match="progress"):
        restore(path, {"a": tgt}, progress=5)  # type: ignore[arg-type]
    assert (tgt == 7).all()


def test_a_checkpointer_dropped_without_close_releases_its_file() -> None:
    """A Checkpointer dropped unclosed: its file's fd (and the writer's lock on it) and
    its helper go with it; the file can be opened for writing again."""
    import gc
    import tempfile

    a = pagescan.zeros(4 * P, np.uint8)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "drop.ckpt"
        before = set(os.listdir("/proc/self/fd"))
        ck = Checkpointer(path, {"a": a})
        ck.checkpoint()
        del ck
        gc.collect()

        def opened() -> set[str]:
            names = set()
            for f in set(os.listdir("/proc/self/fd")) - before:
                with contextlib.suppress(OSError):
                    names.add(os.readlink(f"/proc/self/fd/{f}"))
            return names

        assert not any(str(path) in name for name in opened())
        with Checkpointer(path, {"a": a}) as again:  # the lock is free
            again.checkpoint()


def test_no_collection_runs_during_a_checkpoint_and_finalizers_never_tear_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cyclic garbage collector is paused while ``checkpoint()`` runs: a finalizer
    it would run writes from the one thread the instant does not stop (here a "direct"
    checkpoint, this thread alone: its copy, batch by batch). With a collection due at
    every allocation, none runs inside the call, every generation holds both halves of
    the finalizer's write or neither, and the program's GC setting is back after."""
    import gc

    import pagescan.snapshot as snap
    from pagescan.snapshot import BATCH_PAGES

    # As in a process whose only thread checkpoints (pytest's faulthandler watchdog is a
    # second thread, which writes no memory).
    monkeypatch.setattr(snap, "_single_thread", lambda: True)
    a = pagescan.zeros(8 * BATCH_PAGES * P // 8, np.int64)  # 8 batches
    runs: list[float] = []
    inside = [False]
    count = [0]

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:  # one transaction over the first and the last page
            count[0] += 1
            a[1] = a[-1] = count[0]

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and inside[0] and ck._lock.locked():
            runs.append(time.monotonic())

    path = tmp_path / "gc.ckpt"
    old = gc.get_threshold()
    gc.callbacks.append(seen)
    gc.set_threshold(1)  # a collection at (nearly) every allocation
    try:
        with Checkpointer(path, {"a": a}) as ck:
            ck.checkpoint()
            for _ in range(5):
                a[::512] += 1
                Cycle()  # garbage with a finalizer, due at the next collection
                inside[0] = True
                info = ck.checkpoint()
                inside[0] = False
                assert info.method == "direct"
                assert gc.isenabled()
                st = loaded(path)["a"]
                assert st[1] == st[-1]
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*old)
    assert runs == []
    assert count[0] == 5  # the finalizers did run, after each call


@requires_wp_async
def test_a_child_forked_during_a_ptrace_instant_has_its_signal_handlers_and_can_checkpoint(tmp_path: Path) -> None:
    """Another thread forks while the main thread's checkpoint holds the instant lock
    and the Python signal handlers: the child gets its handlers back (SIGUSR1's runs,
    SIGINT raises ``KeyboardInterrupt``) and a free instant lock (a new Checkpointer's
    ptrace checkpoint there completes)."""
    import pagescan.snapshot as snap

    got: list[int] = []
    old_usr1 = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    big = pagescan.zeros(64 << 20 >> 3)
    stop = threading.Event()
    status: dict[str, Any] = {}
    r, w = os.pipe()

    def in_child() -> str:
        held_lock, held_signals = snap._instant_lock.locked(), snap._HeldSignals.live is not None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(30)  # a hang ends the child (faulthandler's timer waits for the parent's thread here)
        small = pagescan.zeros(4096)
        other = threading.Thread(target=stop.wait, daemon=True)
        other.start()
        with Checkpointer(tmp_path / "child.ckpt", {"s": small}) as ck2:
            ck2._use_ptrace = True
            ck2.checkpoint()
            small[:10] = 1
            method = ck2.checkpoint().method
        return f"{held_lock} {held_signals} {bool(got)} {interrupted} {method}"

    def forker() -> None:
        while not stop.is_set():
            if snap._HeldSignals.live is not None and snap._instant_lock.locked():
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child
                    try:
                        os.write(w, in_child().encode())
                    finally:
                        os._exit(0)
                status["pid"] = pid
                stop.set()
                return

    try:
        with Checkpointer(tmp_path / "c.ckpt", {"b": big}) as ck:
            ck._use_ptrace = True
            ck.checkpoint()
            ck.checkpoint()
            th = threading.Thread(target=forker)
            th.start()
            for _ in range(200):
                if stop.is_set():
                    break
                big[::512] += 1
                ck.checkpoint()  # the main thread: it holds the handlers
            stop.set()
            th.join()
        assert "pid" in status, "no fork landed inside an instant"
        os.close(w)
        answer = os.read(r, 200).decode()
        assert os.waitpid(status["pid"], 0)[1] == 0
        assert answer == "False False True True ptrace", answer
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
        os.close(r)
        with contextlib.suppress(OSError):
            os.close(w)


@requires_wp_async
def test_a_synchronous_checkpoint_takes_the_ptrace_path_unless_much_is_written(tmp_path: Path) -> None:
    """With other threads, ``checkpoint()`` (wait=True, the default choice) takes the
    ptrace path, quicker and a shorter stall for them, while the pages written are at
    most a quarter of the state (its staging area holds them all); beyond, it forks.
    Both generations hold exactly what was written."""
    from pagescan.snapshot import SYNC_STAGING_SHARE
    from pagescan.snapshot._precopy import KEEP

    npages = 4 * (KEEP // P)  # KEEP is a quarter of it: the share decides
    a = pagescan.zeros(npages * P // 8, np.int64)
    rows = a.reshape(npages, P // 8)
    path = tmp_path / "sync.ckpt"
    idle = threading.Event()
    other = threading.Thread(target=idle.wait)  # another thread: neither "direct" nor alone
    other.start()
    try:
        with Checkpointer(path, {"a": a}) as ck:
            ck.checkpoint()
            deadline = time.monotonic() + 30
            while ck._pre is None or not ck._pre.ready():  # the helper starts with the first checkpoint
                assert time.monotonic() < deadline
                time.sleep(0.01)
            methods = []
            for share in (0.05, SYNC_STAGING_SHARE + 0.2, 0.05):
                rows[: int(npages * share), 0] += 1
                methods.append(ck.checkpoint().method)
                np.testing.assert_array_equal(loaded(path)["a"], a)
    finally:
        idle.set()
        other.join()
    assert methods == ["ptrace", "fork", "ptrace"]


def test_the_synchronous_staging_budget_is_bounded_by_the_state_and_the_memory_available() -> None:
    """A synchronous ptrace-path checkpoint stages every written page: at most a quarter
    of the state and of ``MemAvailable``, never below what the helper keeps anyway."""
    from pagescan._procfs import mem_available
    from pagescan.snapshot import SYNC_STAGING_SHARE, _sync_staging_budget
    from pagescan.snapshot._precopy import KEEP

    keep, gib = KEEP // P, (1 << 30) // P
    assert SYNC_STAGING_SHARE == 0.25
    assert _sync_staging_budget(16 * gib, None) == 4 * gib  # a quarter of the state
    assert _sync_staging_budget(16 * gib, 8 << 30) == 2 * gib  # a quarter of what is available
    assert _sync_staging_budget(16 * gib, 0) == keep  # never below KEEP
    assert _sync_staging_budget(keep, 1 << 40) == keep  # a small state: KEEP
    available = mem_available()
    assert available is not None and 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_cgroup() -> tuple[str, str] | None:
    """This process's memory cgroup directory, where a child cgroup gets a memory limit
    file, and that file's name: v1 (``memory.limit_in_bytes``), or v2 (``memory.max``,
    when the memory controller is enabled for children)."""
    from pagescan._procfs import _cgroup_mounts

    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        version = "2" if hid == "0" and not controllers else "1" if "memory" in controllers.split(",") else ""
        for v, root, point in _cgroup_mounts():
            if v != version or not version:
                continue
            d = Path(point, os.path.relpath(path, root))
            if version == "1" and (d / "memory.limit_in_bytes").exists():
                return str(d), "memory.limit_in_bytes"
            control = d / "cgroup.subtree_control"
            if version == "2" and control.exists() and "memory" in control.read_text().split():
                return str(d), "memory.max"
    return None


def test_the_memory_available_is_bounded_by_a_memory_cgroup_limit() -> None:
    """``mem_available`` (the synchronous staging budget's bound) in a process placed in
    a memory cgroup limited to 256 MiB, made here for real: at most that limit, not the
    machine's ``MemAvailable``."""
    from pagescan._procfs import mem_available

    found = _memory_cgroup()
    if found is None:
        pytest.skip("no memory cgroup controller this process can create a child in (v1 or delegated v2)")
    parent, limit_file = found
    child = os.path.join(parent, f"pagescan-test-{os.getpid()}")
    limit = 256 << 20
    os.mkdir(child)
    try:
        Path(child, limit_file).write_text(str(limit))
        code = ("import os, sys; open(os.path.join(sys.argv[1], 'cgroup.procs'), 'w').write(str(os.getpid()));"
                "from pagescan._procfs import mem_available; print(mem_available())")
        out = subprocess.run([sys.executable, "-c", code, child], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        inside = int(out.stdout)
        assert 0 < inside <= limit
        here = mem_available()
        assert here is not None and here > 4 * limit  # this machine: 24 GiB, no such limit above us
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(child)
                break
            except OSError:  # the child process's exit is still being accounted
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_state_in_a_shared_mapping_is_frozen_by_the_stop_never_by_a_fork(tmp_path: Path) -> None:
    """``fork()`` shares a MAP_SHARED mapping with the twin instead of copying it on
    write, so only the ptrace stop freezes such state: every checkpoint of it takes that
    path (``wait=False`` too), each generation is one instant; where the stop cannot be
    had (the helper refused), the checkpoint is refused, never taken torn."""
    buf = mmap.mmap(-1, 2 * N * 8)  # shared anonymous memory (shmem)
    s = np.frombuffer(buf, np.int64)
    path = tmp_path / "shared.ckpt"
    methods = set()
    try:
        with Checkpointer(path, {"s": s}) as ck:
            ck.checkpoint()
            with writers(s) as counts:
                for rounds in range(10):
                    info = ck.checkpoint() if rounds % 2 else ck.checkpoint(wait=False).result(timeout=30)
                    methods.add(info.method)
                assert min(counts) > 0
                ck._use_ptrace = False  # as when the kernel refuses the helper's stop
                with pytest.raises(CheckpointError, match="shared mapping"):
                    ck.checkpoint(wait=False)
                ck._use_ptrace = True
            final = ck.checkpoint()
        assert methods == {"ptrace"}
        assert check_generations(path) == final.generation
        np.testing.assert_array_equal(loaded(path)["s"], s)
    finally:
        del s
        buf.close()


@pytest.mark.parametrize("advice", ["WIPEONFORK", "DONTFORK"])
def test_state_that_fork_does_not_copy_is_frozen_by_the_stop(tmp_path: Path, advice: str) -> None:
    """Private memory under ``MADV_WIPEONFORK`` reads as zeros in a forked child, and
    under ``MADV_DONTFORK`` is not mapped there at all: a frozen twin cannot hold it
    (before: the generation stored zeros, or the checkpoint failed with EIO), so such
    state takes the ptrace stop, like a shared mapping."""
    buf = mmap.mmap(-1, 2 * N * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(getattr(mmap, f"MADV_{advice}", {"WIPEONFORK": 18, "DONTFORK": 10}[advice]))
    s = np.frombuffer(buf, np.int64)
    s[:] = 7
    path = tmp_path / "nofork.ckpt"
    methods = set()
    try:
        with Checkpointer(path, {"s": s}) as ck, writers(s):
            methods.add(ck.checkpoint().method)  # full
            methods.add(ck.checkpoint(wait=False).result(timeout=30).method)
            final = ck.checkpoint()
            methods.add(final.method)
            got = loaded(path)["s"]
            assert invariant_breaks(got) == 0 and got.min() > 0, "zeros or a torn state stored"
        assert methods == {"ptrace"}
        assert check_generations(path) == final.generation
    finally:
        del s
        buf.close()


def read_live_high_to_low(starts: np.ndarray, lengths: np.ndarray, out: np.ndarray, offsets: np.ndarray) -> None:
    """A deliberately non-atomic copy: this process's live memory, 16 pages per call, high to low."""
    for i in range(len(starts)):
        s0, n, o = int(starts[i]), int(lengths[i]), int(offsets[i])
        for k in reversed(range(0, n, 16 * P)):
            m = min(16 * P, n - k)
            _read_self(np.array([s0 + k], np.uint64), np.array([m], np.uint64), out,
                       np.array([o + k], np.uint64))
            time.sleep(0)


def test_the_detector_catches_a_fuzzy_copy(tmp_path: Path) -> None:
    """A copy of the live memory while threads write (the pre-issue-13 path, here made
    slower and read high to low) is caught torn: the check can fail."""
    s = pagescan.zeros(2 * N, np.int64)
    path = tmp_path / "c.ckpt"
    torn = tries = 0
    with Checkpointer(path, {"s": s}) as ck, writers(s):
        store = ck._store
        assert store is not None
        deadline = time.monotonic() + 10
        while not torn and time.monotonic() < deadline:
            fut = PendingCheckpoint(0)
            chunks = ck._find_written(True)
            ck._write(store, chunks, True, None, time.perf_counter(), read_live_high_to_low, fut)
            torn += invariant_breaks(loaded(path)["s"]) > 0
            tries += 1
    assert torn, f"a fuzzy copy under concurrent writes was never caught torn in {tries} tries"


# -- SIGKILL at random moments --------------------------------------------------------

_VICTIM = """
import os, random, signal, sys, time, threading
import numpy as np
import pagescan
from pagescan.snapshot import Checkpointer, load, verify
from pagescan._uapi import libc

N, BLOCK = {N}, {BLOCK}
path, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
libc.libc().prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned twins come back to us
rng = random.Random(seed)

def victim():
    s = pagescan.zeros(2 * N, np.int64)
    if os.path.exists(path) and verify(path):
        s[:] = load(path)["s"].max()  # carry on from the last sealed state, evened out
    a, b = s[:N], s[N:]
    ck = Checkpointer(path, {{"s": s}})
    def write():
        c = int(a.max())
        while True:
            c += 1
            for k in range(0, N, BLOCK):
                a[k:k + BLOCK] = c
                b[k:k + BLOCK] = c
    threading.Thread(target=write, daemon=True).start()
    while True:
        ck.checkpoint(wait=False).result()

sealed = 0
for r in range(rounds):
    pid = os.fork()
    if pid == 0:
        try:
            victim()
        finally:
            os._exit(1)
    time.sleep(rng.uniform(0.02, 0.25))
    os.kill(pid, signal.SIGKILL)
    # The victim and every twin it left (they exit when their parent dies).
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    gens = verify(path) if os.path.exists(path) else []
    if gens:
        s = load(path)["s"]
        a, b = s[:N], s[N:]
        assert not ((b > a) | (b < a - 1)).any(), f"round {{r}}: generation {{len(gens)}} is torn"
        sealed = max(sealed, len(gens))
print(sealed)
"""


def test_sigkill_at_random_moments_leaves_the_last_sealed_generation_intact(tmp_path: Path) -> None:
    path = tmp_path / "k.ckpt"
    code = _VICTIM.format(N=N, BLOCK=BLOCK)
    r = subprocess.run([sys.executable, "-c", code, str(path), "60", "13"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 10, r.stdout  # generations were sealed between the kills


# -- failures in the background ------------------------------------------------------


def _twin_of(before: set[int]) -> int:
    new = children_of() - before
    assert len(new) == 1, new
    return new.pop()


def _blocking_progress(started: threading.Event, go: threading.Event) -> Callable[[int, int], None]:
    def progress(done: int, total: int) -> None:
        started.set()
        assert go.wait(30)
    return progress


def test_killing_the_twin_fails_the_checkpoint_clearly_and_the_next_one_works(tmp_path: Path) -> None:
    s = pagescan.zeros(4 * 1024 * 1024, np.uint8)  # 4 MiB: two batches
    s2 = pagescan.zeros(2 * N, np.int64)
    path = tmp_path / "c.ckpt"
    with Checkpointer(path, {"big": s, "s": s2}) as ck:
        ck._use_ptrace = False
        ck.checkpoint()
        s[:] = 1
        started, go = threading.Event(), threading.Event()
        before = children_of()
        with writers(s2):
            fut = ck.checkpoint(wait=False, progress=_blocking_progress(started, go))
            assert started.wait(30)
            os.kill(_twin_of(before), signal.SIGKILL)
            time.sleep(0.05)
            go.set()
            with pytest.raises(ProcessLookupError, match=r"frozen copy .* ended \(killed by signal 9\).*"
                               r"generation 2 was not written") as exc:
                fut.result(timeout=30)
            assert exc.value.errno == errno.ESRCH
        assert ck.generations == 1
        assert len(verify(path)) == 1
        info = ck.checkpoint()  # the chunks the failed one found are stored now
        assert info.generation == 2
    out = loaded(path)
    np.testing.assert_array_equal(out["big"], s)
    np.testing.assert_array_equal(out["s"], s2)


def test_close_waits_for_a_checkpoint_in_flight_or_cancels_it(tmp_path: Path) -> None:
    s = pagescan.zeros(4 * 1024 * 1024, np.uint8)
    path = tmp_path / "c.ckpt"
    ck = Checkpointer(path, {"s": s})
    ck.checkpoint()
    s[::P] = 2
    fut = ck.checkpoint(wait=False)
    ck.close()
    assert fut.done() and fut.result().generation == 2
    assert len(verify(path)) == 2

    ck = Checkpointer(path, {"s": s})
    ck.checkpoint()  # 3 (full: a new Checkpointer did not see earlier writes)
    s[::P] = 3
    started, go = threading.Event(), threading.Event()
    fut = ck.checkpoint(wait=False, progress=_blocking_progress(started, go))
    assert started.wait(30)
    threading.Timer(0.1, go.set).start()
    ck.close(cancel=True)
    assert fut.cancelled()
    assert len(verify(path)) == 3
    assert (loaded(path)["s"][::P] == 2).all()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_in_the_background_surfaces_in_result(small_tmpfs: Path) -> None:
    rng = np.random.default_rng(1)
    s = pagescan.empty(2 * 1024 * 1024, np.uint8)
    s[:] = rng.integers(0, 255, s.size, dtype=np.uint8)
    path = small_tmpfs / "c.ckpt"
    with Checkpointer(path, {"s": s}) as ck:
        ck.checkpoint()
        s[:] = rng.integers(0, 255, s.size, dtype=np.uint8)
        fut = ck.checkpoint(wait=False)
        err = fut.exception(timeout=30)
        assert isinstance(err, OSError) and err.errno == errno.ENOSPC, err
        with pytest.raises(OSError, match="cannot write generation 2"):
            fut.result()
        assert ck.generations == 1 and len(verify(path)) == 1
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
        assert ck.checkpoint(wait=False).result(timeout=30).generation == 2
    np.testing.assert_array_equal(loaded(path)["s"], s)


def test_pause_is_reported_and_progress_comes_from_the_background(tmp_path: Path) -> None:
    s = pagescan.zeros(8 * 1024 * 1024, np.uint8)
    calls: list[tuple[int, int, str]] = []
    with Checkpointer(tmp_path / "c.ckpt", {"s": s}) as ck:
        info = ck.checkpoint(wait=False, progress=lambda d, t: calls.append(
            (d, t, threading.current_thread().name))).result(timeout=30)
    assert 0 < info.pause <= info.seconds
    assert calls[-1][:2] == (2048, 2048)
    assert {c[2] for c in calls} == {"pagescan-checkpoint"}


class _WriteFirst:
    """A WriteWatch stand-in that runs ``before()`` ahead of the real ``get``."""

    def __init__(self, watch: pagescan.WriteWatch, before: Callable[[], None]) -> None:
        self.watch, self.before = watch, before

    def get(self, reset: bool = False) -> np.ndarray:
        self.before()
        self.before = lambda: None
        return self.watch.get(reset=reset)

    def close(self) -> None:
        self.watch.close()


@pytest.mark.parametrize("wait", [True, False])
def test_a_transaction_during_the_walk_is_neither_torn_nor_lost(tmp_path: Path, wait: bool) -> None:
    """The walk re-arms A's pages, then a transaction writes A and B, then the walk reaches
    B: B is found written (and re-armed), A is not.

    ``wait=True`` walks, then forks: the twin holds both writes, A must be stored too.
    ``wait=False`` forks, then walks (in the background): the twin holds neither, so the
    generation holds neither; B's new value, re-armed by the walk, must not be lost: it
    is in the next generation (found by comparing with the live memory), with A's."""
    # Private: a shared mapping is not copied on write by fork (the twin would see the writes).
    area = mmap.mmap(-1, 16 * N + P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(area, np.uint8)
    libc.mprotect(whole.ctypes.data + 8 * N, P, 0)  # a gap page: two watches, a's (lower) walked first
    a = whole[: 8 * N].view(np.int64)
    b = whole[8 * N + P:].view(np.int64)
    path = tmp_path / "c.ckpt"
    with Checkpointer(path, {"a": a, "b": b}) as ck:
        ck._use_ptrace = False
        ck.checkpoint()
        assert len(ck._watches) == 2 and ck._watches[0].start == a.ctypes.data

        def transaction() -> None:
            a[5] = 1
            b[5] = 1

        ck._watches[1] = _WriteFirst(ck._watches[1], transaction)  # type: ignore[call-overload]
        with writers(np.zeros(2 * N, np.int64), 1):  # a second thread: the fork path
            info = ck.checkpoint() if wait else ck.checkpoint(wait=False).result(timeout=30)
            assert info.generation == 2
            g2 = loaded(path)
            assert g2["a"][5] == g2["b"][5] == (1 if wait else 0)
            info = ck.checkpoint() if wait else ck.checkpoint(wait=False).result(timeout=30)
        assert info.generation == 3
    out = loaded(path)
    assert out["a"][5] == out["b"][5] == 1
    del a, b, whole
    area.close()


def test_the_twin_tells_the_pages_written_since_the_fork() -> None:
    """``FrozenTwin.unchanged``: a page written after the fork was copied on write (a new
    PFN); the others are still the twin's pages (PFNs are hidden without CAP_SYS_ADMIN:
    then no page is known unchanged, and every one is compared)."""
    from pagescan.snapshot._twin import FrozenTwin

    a = pagescan.zeros(64 * P // 8, np.int64)
    a[:: P // 8] = 1
    pages = (a.ctypes.data + np.arange(64) * P).astype(np.uint64)
    twin = FrozenTwin()
    try:
        a[3 * P // 8] = 2
        a[60 * P // 8 + 5] = 2
        same = twin.unchanged(pages)
    finally:
        twin.close()
    written = np.isin(np.arange(64), [3, 60])
    assert not same[written].any()
    if pagescan.capabilities().pfns_visible:
        assert same[~written].all()
    else:
        assert not same.any()


def test_the_twin_reads_scattered_runs_as_they_were_at_the_fork() -> None:
    """``FrozenTwin.read``: runs of any length, near (read in one call with the bytes
    between) and far apart, more than one call's 512 runs, and a span with a hole (an
    unmapped page) in it, read run by run: every byte as it was at the fork, nothing
    outside the runs touched; runs that do not fit in ``out`` are refused before any read."""
    from pagescan.snapshot._twin import FrozenTwin

    npages, hole = 4000, 3950
    m = anon(npages)
    mem = np.ctypeslib.as_array((ctypes.c_uint8 * (hole * P)).from_address(m.addr))
    rng = np.random.default_rng(7)
    mem[:] = rng.integers(0, 256, mem.size, dtype=np.uint8)
    before = mem.copy()
    m.write(hole + 1, npages - hole - 1, 0x5A)
    libc.munmap(m[hole], P)
    starts, lengths, at = [], [], 0
    while True:  # in order; gaps from none to several pages
        start = at + int(rng.integers(0, 2 * P if len(starts) % 10 else 6 * P))
        length = int(rng.integers(1, 2 * P))
        if start + length > (hole - 10) * P:
            break
        starts.append(start)
        lengths.append(length)
        at = start + length
    starts += [(hole - 1) * P + 100, (hole + 1) * P]  # the hole between them: one span, read run by run
    lengths += [P - 100, 2 * P]
    st = np.array(starts, np.int64)
    ln = np.array(lengths, np.int64)
    of = np.concatenate([[0], np.cumsum(ln)[:-1]])
    out = np.full(int(ln.sum()) + 5, 0xAB, np.uint8)
    twin = FrozenTwin()
    try:
        mem[:] ^= 0xFF  # written after the fork: the twin keeps the old bytes
        twin.read(st + m.addr, ln, out, of)
        with pytest.raises(ValueError):
            twin.read(st + m.addr, ln, out[:-6], of)
    finally:
        twin.close()
    want = np.concatenate([before[s : s + n] for s, n in zip(starts[:-1], lengths[:-1])] + [np.full(2 * P, 0x5A, np.uint8)])
    assert len(st) > 1000 and np.array_equal(out[: want.size], want)
    assert (out[want.size :] == 0xAB).all()
    del mem
    m.close()


@pytest.mark.parametrize("keep_gil", [False, True])
def test_preadv_takes_64_bit_offsets_and_addresses_either_way(tmp_path: Path, keep_gil: bool) -> None:
    """``libc.preadv`` with and without the GIL: an offset beyond 4 GiB in a sparse file
    reads what is there (a prototype missing on one of the two handles passed its
    offset and iovec address as 32-bit ``int``s: the bytes at 4 GiB less)."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.seek(10)
        f.write(b"LOW!")
        f.seek((1 << 32) + 10)
        f.write(b"HIGH")
    buf = np.zeros(4, np.uint8)
    iov = np.zeros(1, libc.IOVEC)
    iov["base"], iov["len"] = buf.ctypes.data, 4
    fd = os.open(path, os.O_RDONLY)
    try:
        assert libc.preadv(fd, int(iov.ctypes.data), 1, (1 << 32) + 10, keep_gil) == 4
        assert buf.tobytes() == b"HIGH"
        assert libc.preadv(fd, int(iov.ctypes.data), 1, 10, keep_gil) == 4
        assert buf.tobytes() == b"LOW!"
    finally:
        os.close(fd)


def test_live_reads_take_one_call_per_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ProcMem`` (this process, the GIL released: the background checkpoint's compare
    pass) reads runs close together in one ``preadv`` each, exactly, and falls back to
    reading run by run only for a span that cannot be read whole."""
    from pagescan.snapshot._twin import ProcMem

    a = pagescan.zeros(64 * P, np.uint8)
    a[:] = np.random.default_rng(3).integers(0, 256, a.size, dtype=np.uint8)
    starts = np.arange(0, 60 * P, 3 * P + 100, dtype=np.int64)
    lengths = np.full(len(starts), 1000, np.int64)
    offsets = np.arange(len(starts), dtype=np.int64) * 1000
    out = np.zeros(int(lengths.sum()), np.uint8)
    by_run: list[int] = []
    real = ProcMem._read_run
    monkeypatch.setattr(ProcMem, "_read_run", lambda self, *args: (by_run.append(1), real(self, *args))[1])
    mem = ProcMem()
    try:
        mem.read(starts + a.ctypes.data, lengths, out, offsets)
    finally:
        mem.close()
    assert not by_run
    assert np.array_equal(out, np.concatenate([a[s : s + 1000] for s in starts.tolist()]))


# -- the ptrace path: refusal, a helper killed mid-stop, no process left ------------------

_TRACER = """
import os, select, sys
from pagescan._uapi import libc
from pagescan._uapi.ptrace import PTRACE, WALL
tid = int(sys.argv[1])
libc.ptrace(PTRACE.SEIZE, tid, 0, 0)  # a debugger's place: nobody else may trace this thread
print("seized", flush=True)
while not select.select([sys.stdin], [], [], 0.01)[0]:
    try:
        pid, st = os.waitpid(tid, WALL | os.WNOHANG)
    except ChildProcessError:
        break
    if pid and os.WIFSTOPPED(st):  # a signal for the tracee: hand it over
        libc.ptrace(PTRACE.CONT, tid, 0, os.WSTOPSIG(st) if st >> 16 == 0 else 0)
"""

_TRACED = """
import os, sys, threading
import numpy as np
import pagescan
from pagescan.snapshot import Checkpointer, load
s = pagescan.zeros(1 << 16, np.int64)
stop = threading.Event()
def write():
    print(threading.get_native_id(), flush=True)
    k = 0
    while not stop.is_set():
        s[(k * 512) % s.size] = k
        k += 1
th = threading.Thread(target=write)
th.start()
sys.stdin.readline()  # the writer is traced from now on
with Checkpointer(sys.argv[1], {"s": s}) as ck:
    ck._use_ptrace = True
    methods = [ck.checkpoint(wait=False).result().method for _ in range(3)] + [ck.checkpoint().method]
    refused = ck._pre.refused.errno if ck._pre is not None and ck._pre.refused is not None else None
    stop.set()
    th.join()
    ck.checkpoint()
    same = bool((load(sys.argv[1])["s"] == s).all())
print(methods, refused, same)
"""


def _traced_from_outside(victim_src: str, tracer_src: str, ckpt: Path, timeout: float) -> str:
    """Run ``victim_src`` (it prints a thread id, waits for a line, prints its result)
    with that thread seized by ``tracer_src`` in another process (it prints "seized",
    holds the thread until its stdin closes); return the victim's result line. The
    tracer is ended before the victim is waited for: a victim whose thread is a zombie
    held by the tracer cannot finish exiting before."""
    with subprocess.Popen([sys.executable, "-c", victim_src, str(ckpt)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as victim:
        assert victim.stdin is not None and victim.stdout is not None
        try:
            tid = int(victim.stdout.readline())
            with subprocess.Popen([sys.executable, "-c", tracer_src, str(tid)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) as tracer:
                assert tracer.stdout is not None and tracer.stdout.readline().strip() == "seized"
                victim.stdin.write("go\n")
                victim.stdin.flush()
                out = victim.stdout.readline().strip()
                tracer.communicate("", timeout=30)
            assert victim.wait(timeout) == 0
        finally:
            victim.kill()
    return out


def test_a_process_traced_by_someone_else_falls_back_to_fork(tmp_path: Path) -> None:
    """Another tracer (a debugger, strace) holds a thread: PTRACE_SEIZE is refused
    (EPERM), the checkpoints take their instant with a fork, and say so."""
    out = _traced_from_outside(_TRACED, _TRACER, tmp_path / "t.ckpt", timeout=60)
    assert out == f"['fork', 'fork', 'fork', 'fork'] {errno.EPERM} True"


def test_killing_the_helper_while_threads_are_stopped_lets_the_program_run_on(tmp_path: Path) -> None:
    """SIGKILL of the helper while it holds every thread stopped: the kernel lets them go,
    the checkpoint fails clearly, nothing sealed is damaged, the next one is full, and no
    process is left over."""
    s = pagescan.zeros(2 * N, np.int64)
    path = tmp_path / "c.ckpt"
    before = children_of()
    with Checkpointer(path, {"s": s}) as ck, writers(s) as counts:
        ck._use_ptrace = True
        ck.checkpoint()
        assert ck.checkpoint(wait=False).result(timeout=30).method == "ptrace"
        helper = ck._pre.pid if ck._pre is not None else 0
        assert ck._pre is not None
        ck._pre.hold = 30.0  # the helper keeps every thread stopped this long
        t = time.monotonic()  # before the killer starts: its 0.5 s sleep begins after this
        killer = subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {ck._pre.pid}"])
        with pytest.raises(ProcessLookupError, match=r"checkpoint helper process .* ended \(killed by signal 9\)"
                           r".*generation 3 was not written"):
            ck.checkpoint(wait=False)
        elapsed = time.monotonic() - t
        assert killer.wait(30) == 0
        assert 0.45 < elapsed < 10, elapsed  # stopped until the kill, not for the hold
        c = sum(counts)
        time.sleep(0.2)
        assert sum(counts) > c  # the program runs on
        assert ck.generations == 2 and len(verify(path)) == 2
        info = ck.checkpoint()
        assert info.generation == 3 and info.full  # what the dead helper had re-armed is unknown
        assert ck.checkpoint(wait=False).result(timeout=30).method == "ptrace"
        assert ck._pre is not None and ck._pre.pid != helper  # a new helper
        helper = ck._pre.pid
        ck._pre.child.kill()  # between checkpoints: its last reply came, nothing is lost
        assert ck._pre.child.wait(30) is not None
        info = ck.checkpoint(wait=False).result(timeout=30)
        assert (info.method, info.full) == ("fork", False)
        assert ck.checkpoint(wait=False).result(timeout=30).method == "ptrace"
        assert ck._pre is not None and ck._pre.pid != helper
    with Checkpointer(path, {"s": s}) as ck:
        ck.checkpoint()
    assert children_of() == before
    check_generations(path)
    np.testing.assert_array_equal(loaded(path)["s"], s)


def test_two_checkpointers_taking_instants_at_once_do_not_refuse_each_other(tmp_path: Path) -> None:
    """Two helpers seizing the same threads at once would refuse each other (EPERM): the
    instants of one process are taken one at a time, and both stay on the ptrace path."""
    s1, s2 = pagescan.zeros(2 * N, np.int64), pagescan.zeros(2 * N, np.int64)
    methods: list[set[str]] = [set(), set()]
    with Checkpointer(tmp_path / "1.ckpt", {"s": s1}) as c1, Checkpointer(tmp_path / "2.ckpt", {"s": s2}) as c2:
        cks = [c1, c2]
        for ck in cks:
            ck._use_ptrace = True
            ck.checkpoint()

        def run(i: int) -> None:
            for _ in range(8):
                methods[i].add(cks[i].checkpoint(wait=False).result(timeout=30).method)

        with writers(s1, 1), writers(s2, 1):
            ths = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
    assert methods == [{"ptrace"}, {"ptrace"}]
    check_generations(tmp_path / "1.ckpt")
    check_generations(tmp_path / "2.ckpt")


def _sigblk() -> int:
    """This thread's blocked-signal mask as the kernel reports it."""
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))


def test_block_all_signals_blocks_every_signal_and_restores() -> None:
    """The cheap mask helper that the checkpoint paths use around their copies: every
    signal but the two glibc keeps for itself (32 and 33) blocked, the old mask back after."""
    before = _sigblk()
    got: list[int] = []
    prev = signal.signal(signal.SIGUSR1, lambda sig, frame: got.append(sig))
    try:
        old = libc.block_all_signals()
        try:
            blocked = _sigblk()
            for sig in signal.valid_signals():
                if sig not in (32, 33, signal.SIGKILL, signal.SIGSTOP):  # glibc's own; unblockable
                    assert blocked & (1 << (sig - 1)), f"signal {sig} not blocked"
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            assert signal.SIGUSR1 in signal.sigpending() and got == []  # pending, not delivered
        finally:
            libc.restore_signals(old)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:  # delivered once unblocked
            time.sleep(0.001)
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, prev)
    assert _sigblk() == before


# -- the helper and forked processes; a stopped helper -------------------------------


_CRASH_AFTER_FIRST_CHECKPOINT = """
import os, sys, threading
import numpy as np, pagescan
from pagescan.snapshot import Checkpointer
s = pagescan.zeros(1 << 16, np.int64)
threading.Thread(target=threading.Event().wait, daemon=True).start()  # not alone: the helper starts
ck = Checkpointer(sys.argv[1], {"s": s})
ck.checkpoint()
assert ck._pre is not None
print(ck._pre.pid, flush=True)
os._exit(0)  # a crash: no close(), the helper still starting
"""


def test_the_helper_ends_quietly_when_the_program_ends_before_it_started(tmp_path: Path) -> None:
    """A program that ends (crashes) while its checkpoint helper is still starting: the
    helper exits without a word (before: a ProcessLookupError traceback on the
    program's stderr, after the program had ended). ``subprocess.run`` reads stderr to
    its end, which comes when the helper, which inherits it, has exited too."""
    r = subprocess.run([sys.executable, "-c", _CRASH_AFTER_FIRST_CHECKPOINT, str(tmp_path / "c.ckpt")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.strip().isdigit(), r.stderr
    assert r.stderr == ""


def test_a_forked_child_neither_uses_nor_ends_the_parents_helper(tmp_path: Path) -> None:
    """The helper traces and re-arms its parent: a Checkpointer used in a forked child
    must not ask it for an instant (it would re-arm the parent's written pages, which
    the parent's next generation would then miss), and its ``close()`` must not end the
    parent's helper (a ``shutdown`` of the inherited socket would)."""
    s = pagescan.zeros(2 * N, np.int64)
    path = tmp_path / "f.ckpt"
    before = children_of()
    with Checkpointer(path, {"s": s}) as ck:
        ck._use_ptrace = True
        ck.checkpoint()
        s[::512] = 1
        assert ck.checkpoint(wait=False).result(timeout=30).method == "ptrace"
        assert ck._pre is not None
        helper = ck._pre.pid
        s[N::512] = 2  # written by the parent, not yet stored

        def child() -> str:
            try:
                ck.checkpoint(wait=False).result(timeout=10)
            except RuntimeError as err:
                return str(err)
            finally:
                ck.close()
            return "checkpointed"

        said = ProcChild(child).result(timeout=20)
        assert "forked child" in said, said
        info = ck.checkpoint(wait=False).result(timeout=30)
        assert (info.method, info.full) == ("ptrace", False)
        assert ck._pre is not None and ck._pre.pid == helper  # still the parent's helper
    assert children_of() == before
    np.testing.assert_array_equal(loaded(path)["s"], s)  # nothing the parent wrote was lost


def test_a_stopped_helper_fails_the_checkpoint_instead_of_hanging(tmp_path: Path) -> None:
    """The caller waits for the helper with every signal blocked (not even Ctrl-C
    interrupts it): a helper stopped by SIGSTOP must not hang it. The stopped helper is
    killed (which lets any thread it had stopped go), the call raises, and the next
    checkpoint (full) starts a new helper; nothing is left over."""
    s = pagescan.zeros(2 * N, np.int64)
    path = tmp_path / "s.ckpt"
    before = children_of()
    with Checkpointer(path, {"s": s}) as ck, writers(s) as counts:
        ck._use_ptrace = True
        ck.checkpoint()
        assert ck.checkpoint(wait=False).result(timeout=30).method == "ptrace"
        assert ck._pre is not None
        helper = ck._pre.pid
        os.kill(helper, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(ProcessLookupError, match=r"checkpoint helper process .* (stopped|ended)"):
            ck.checkpoint(wait=False)
        assert time.monotonic() - t < 15
        c = sum(counts)
        time.sleep(0.2)
        assert sum(counts) > c  # the program runs on
        info = ck.checkpoint(wait=False).result(timeout=30)
        assert info.full and ck.checkpoint(wait=False).result(timeout=30).method == "ptrace"
        assert ck._pre is not None and ck._pre.pid != helper
    with Checkpointer(path, {"s": s}) as ck:
        ck.checkpoint()
    assert children_of() == before
    check_generations(path)
    np.testing.assert_array_equal(loaded(path)["s"], s)


_REENTRANT = """
import os, signal, sys, threading
import numpy as np, pagescan
from pagescan.snapshot import Checkpointer
s = pagescan.zeros(1 << 16, np.int64)
started, go = threading.Event(), threading.Event()
def progress(done, total):
    started.set()
    go.wait(10)
said = []
with Checkpointer(sys.argv[1], {"s": s}) as ck:
    def handler(signum, frame):
        for call in (ck.checkpoint, ck.close):
            try:
                call()
                said.append("ran")
            except RuntimeError as err:
                said.append(str(err))
    signal.signal(signal.SIGUSR1, handler)
    pending = ck.checkpoint(wait=False, progress=progress)
    started.wait(10)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    threading.Timer(0.6, go.set).start()
    s[0] = 1
    info = ck.checkpoint()  # waits for the one in flight: the handler runs meanwhile
    print(pending.result().generation, info.generation, ck.generations, said)
"""


def test_checkpoint_from_a_signal_handler_during_checkpoint_raises_instead_of_deadlocking(tmp_path: Path) -> None:
    """A handler (checkpoint on SIGUSR1, say) that runs while its thread is inside
    ``checkpoint()`` (here waiting for the checkpoint in flight) would wait for the
    lock that thread holds, for good: it gets a RuntimeError; ``close()`` from it too
    (it would close the file under the outer call). The outer call completes."""
    r = subprocess.run([sys.executable, "-c", _REENTRANT, str(tmp_path / "r.ckpt")], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    gens, said = r.stdout.split(" [", 1)
    assert gens == "1 2 2"
    assert said.count("inside checkpoint() of the same thread") == 2, said



_REENTRANT_CLOSE = _REENTRANT.replace(
    """    s[0] = 1
    info = ck.checkpoint()  # waits for the one in flight: the handler runs meanwhile
    print(pending.result().generation, info.generation, ck.generations, said)""",
    """    ck.close()  # waits for the one in flight: the handler runs meanwhile
    print(pending.result().generation, ck.closed, said)""")


def test_checkpoint_or_close_from_a_signal_handler_during_close_raises_instead_of_deadlocking(
        tmp_path: Path) -> None:
    """The same during ``close()`` waiting for the checkpoint in flight (before: the
    handler's call waited, for good, for the lock that ``close()`` holds)."""
    assert _REENTRANT_CLOSE != _REENTRANT
    r = subprocess.run([sys.executable, "-c", _REENTRANT_CLOSE, str(tmp_path / "r.ckpt")], capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    gens, said = r.stdout.split(" [", 1)
    assert gens == "1 True"
    assert said.count("inside close() of the same thread") == 2, said

_HOLDER = """
import sys
from pagescan._uapi import libc
from pagescan._uapi.ptrace import PTRACE
libc.ptrace(PTRACE.SEIZE, int(sys.argv[1]), 0, 0)  # and never waitpid: its exit stays a zombie
print("seized", flush=True)
sys.stdin.read()
"""

_EXITED = """
import os, sys, threading
import numpy as np
import pagescan
from pagescan.snapshot import Checkpointer
s = pagescan.zeros(1 << 16, np.int64)
go = threading.Event()
def short():
    print(threading.get_native_id(), flush=True)
    go.wait(30)
th = threading.Thread(target=short)
th.start()
sys.stdin.readline()  # seized by the holder now
go.set()
th.join()
tid = th.native_id
while open(f"/proc/self/task/{tid}/stat").read().rpartition(")")[2].split()[0] not in "ZX":
    pass
with Checkpointer(sys.argv[1], {"s": s}) as ck:
    ck._use_ptrace = True
    ck.checkpoint()
    methods = []
    for k in range(3):
        s[k * 512] = k + 1
        methods.append(ck.checkpoint(wait=False).result(30).method)
print(methods, ck._pre is None or ck._pre.refused is None, flush=True)
"""


def test_a_thread_that_has_exited_does_not_make_the_kernel_refuse_the_stop(tmp_path: Path) -> None:
    """``PTRACE_SEIZE`` of a thread that has exited (an exit state set: it runs nothing
    any more, and stays listed until reaped) fails with EPERM, as a real refusal does.
    Such a thread needs no stop: the checkpoints keep the ptrace path. (A thread exiting
    at the moment of the stop hits the same EPERM, rarely; a thread traced by another
    process, here never waited for, stays a zombie, which makes it certain.)"""
    out = _traced_from_outside(_EXITED, _HOLDER, tmp_path / "x.ckpt", timeout=30)
    assert out == "['ptrace', 'ptrace', 'ptrace'] True"


_CALLBACK = """
import sys, threading
import numpy as np, pagescan
from pagescan.snapshot import Checkpointer
s = pagescan.zeros(1 << 16, np.int64)
said = []
started, go = threading.Event(), threading.Event()
def progress(done, total):
    started.set()
    go.wait(10)
    try:
        ck.checkpoint()
    except RuntimeError as err:
        said.append(str(err))
def callback(f):
    try:
        said.append(ck.checkpoint().generation)
    except RuntimeError as err:
        said.append(str(err))
with Checkpointer(sys.argv[1], {"s": s}) as ck:
    pending = ck.checkpoint(wait=False, progress=progress)
    pending.add_done_callback(callback)
    started.wait(10)
    threading.Timer(0.3, go.set).start()
    s[0] = 1
    info = ck.checkpoint()  # holds the lock, waiting for the one in flight: its callback runs meanwhile
    print(pending.result().generation, info.generation, ck.generations, said)
"""


def test_checkpoint_from_a_done_callback_while_another_call_waits_raises_instead_of_deadlocking(
        tmp_path: Path) -> None:
    """A done callback runs in the background thread; a ``checkpoint()`` from it, while
    another call holds the lock waiting for that thread to end, would wait for good: it
    raises RuntimeError (as one from ``progress`` does, always: the generation is still
    being written). The waiting call completes."""
    r = subprocess.run([sys.executable, "-c", _CALLBACK, str(tmp_path / "d.ckpt")], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    gens, said = r.stdout.split(" [", 1)
    assert gens == "1 2 2"
    assert "from the progress callback" in said and "from a done callback while another call waits" in said, said
