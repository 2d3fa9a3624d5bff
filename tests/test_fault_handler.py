"""pagescan.FaultHandler: MISSING faults served from a forked handler process.

What is checked, on real memory: contents bit-exact (random data, several regions,
files, zero pages), faults taken while holding the GIL and by many threads at once,
prefetch without any touch, ``progress()``, the non-cooperative events (REMOVE after
``MADV_DONTNEED``, UNMAP after ``munmap``), and failure: a killed handler makes the
owner's next touch of an unserved page a SIGBUS -- never a hang, never wrong data --
also for a thread already blocked in the fault. Owners that are expected to die run in
forked children with an ``alarm()`` hang guard; their status must be "killed by
SIGBUS". No process is left behind: after every test this process has no children,
and the handler and guardian pids are gone from ``/proc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import mmap
import os
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pagescan
from pagescan import Category, FaultHandler, FileSource, RegisterMode, Userfaultfd, WriteWatch
from pagescan._uapi import libc
from pagescan._uapi.mman import MADV, MAP, PROT

from .memory import Mapping, P, anon, hugetlb_anon, pagemap_entries, vmflags
from .procs import Child, children_of, forked, run_in_child, wait_gone

N = 64  # pages per lazy region unless said otherwise


# -- helpers ----------------------------------------------------------------------------


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def source_of(data: bytes) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return read


def present(addr: int, npages: int) -> list[int]:
    return [int(e >> 63) for e in pagemap_entries(addr, npages)]


def wchan(pid: int, tid: str) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def fork_owner(body: Callable[[int], None], timeout: float = 10.0) -> tuple[int, int]:
    """Run ``body(report_fd)`` in a forked owner; return (its pid, the read end of its reports).

    The body reports through ``report_fd`` (``os.write``); an exception is reported as a
    traceback prefixed with ``b"!"``. An ``alarm`` kills a hung owner (SIGALRM).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            faulthandler.disable()  # the expected SIGBUS needs no traceback dump
            signal.alarm(int(timeout))
            body(w)
        except BaseException:
            code = 1
            with contextlib.suppress(BaseException):
                os.write(w, b"!" + traceback.format_exc().encode()[-6000:])
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def finish_owner(pid: int, r: int, timeout: float = 15.0) -> tuple[int, bytes]:
    """Reap the owner (bounded) and collect everything it reported."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the owner hung (killed)")
            time.sleep(0.005)
        os.set_blocking(r, False)
        chunks = []
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        return status, b"".join(chunks)
    finally:
        os.close(r)


def read_pids(r: int, timeout: float = 10.0) -> tuple[int, int]:
    """The (handler, guardian) pids an owner reports first."""
    buf = b""
    deadline = time.monotonic() + timeout
    while len(buf) < 16:  # two ints, hex-encoded (a leading "!" marks a failure)
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail("the owner did not report its handler")
        import select

        if select.select([r], [], [], left)[0]:
            chunk = os.read(r, 16 - len(buf))
            if not chunk:
                pytest.fail("the owner died before reporting its handler")
            if chunk.startswith(b"!"):
                pytest.fail("owner failed:\n" + (chunk + os.read(r, 65536)).decode(errors="replace"))
            buf += chunk
    hpid, gpid = struct.unpack("ii", bytes.fromhex(buf.decode()))
    return hpid, gpid


def assert_sigbus(status: int, report: bytes) -> None:
    assert b"!" not in report[8:9], report.decode(errors="replace")
    assert os.WIFSIGNALED(status), f"owner exited normally ({os.WEXITSTATUS(status)}): {report!r}"
    assert os.WTERMSIG(status) == signal.SIGBUS, f"owner killed by {signal.Signals(os.WTERMSIG(status)).name}"


def check_gone(fh: FaultHandler, hpid: int, gpid: int) -> None:
    assert fh.pid == 0 and fh.guardian_pid == 0
    assert not os.path.exists(f"/proc/{hpid}") and not os.path.exists(f"/proc/{gpid}"), "not reaped"


# -- serving ----------------------------------------------------------------------------


def test_contents_are_bit_exact_on_touch() -> None:
    data = random_bytes(N * P, 1)
    with anon(N) as m:
        fh = FaultHandler([(m.addr, m.length)], source_of(data), prefetch=False)
        with fh:
            hpid, gpid = fh.pid, fh.guardian_pid
            assert hpid > 0 and gpid > 0 and {hpid, gpid} <= children_of()
            assert "um" in vmflags(m.addr)
            assert fh.progress() == (0, N)
            assert ctypes.string_at(m[N - 1], P) == data[(N - 1) * P :]  # ctypes.string_at holds the GIL
            wait_for(lambda: fh.progress()[0] >= 1, what="progress")  # counted just after the wake
            served, total = fh.progress()
            assert served < N and total == N
            assert ctypes.string_at(m.addr, m.length) == data
            assert fh.wait(10) is True
            assert fh.progress() == (N, N)
            assert fh.exit_status == 0
            assert "um" not in vmflags(m.addr), "unregistered once every page is in"
        check_gone(fh, hpid, gpid)
        assert m.read(0, N) == data


def test_first_touch_while_holding_the_gil() -> None:
    """A ``mmap`` slice and a numpy reduction fault with the GIL held: no deadlock."""
    data = random_bytes(N * P, 2)
    mm = mmap.mmap(-1, N * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        addr = int(np.frombuffer(mm, np.uint8).ctypes.data)
        with FaultHandler([(addr, N * P)], source_of(data), prefetch=False) as fh:
            assert bytes(mm[5 * P : 6 * P]) == data[5 * P : 6 * P]
            view = np.frombuffer(mm, dtype=np.uint8)
            expect = np.frombuffer(data, dtype=np.uint8)
            assert int(view[40 * P : 48 * P].sum()) == int(expect[40 * P : 48 * P].sum())
            assert mm.find(data[63 * P : 63 * P + 64]) == 63 * P
            assert bytes(mm[:]) == data
            del view
            assert fh.wait(10)
    finally:
        mm.close()


def test_many_threads_touching_at_once() -> None:
    npages, nthreads = 256, 8
    data = random_bytes(npages * P, 3)
    expect = np.frombuffer(data, dtype=np.uint8)
    with anon(npages) as m:
        view = np.frombuffer((ctypes.c_uint8 * m.length).from_address(m.addr), dtype=np.uint8)
        results: dict[int, bool] = {}
        go = threading.Barrier(nthreads, timeout=10)

        def worker(t: int) -> None:
            go.wait()
            order = np.random.default_rng(t).permutation(npages)
            ok = True
            for p in order[: npages // 2].tolist():  # overlapping random pages
                lo = p * P
                ok &= bool(np.array_equal(view[lo : lo + P], expect[lo : lo + P]))
            results[t] = ok

        with FaultHandler([(m.addr, m.length)], source_of(data), prefetch=False) as fh:
            threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            assert not any(t.is_alive() for t in threads), "a thread hung in a fault"
            assert results == {t: True for t in range(nthreads)}
            assert bytes(view) == data
            assert fh.wait(10)


def test_several_regions_from_a_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "image")
    blob = random_bytes(40 * P, 4)
    with open(path, "wb") as f:
        f.write(blob)
    with anon(16) as a, anon(32) as b, FileSource(path, base=3 * P) as src:
        # Regions are source offsets 0.. in order; the file ends inside b (zeros after).
        with FaultHandler([(b.addr, b.length), (a.addr, a.length)], src) as fh:
            assert fh.total_pages == 48
            assert a.read(0, 16) == blob[3 * P + 32 * P : 40 * P] + bytes(11 * P)
            assert b.read(0, 32) == blob[3 * P : 35 * P]
            assert fh.wait(10)


def test_file_source_takes_regular_files_only(tmp_path: os.PathLike[str]) -> None:
    """A FIFO would block the handler's first read forever; a device or a directory
    is no page image either: ValueError at once, naming the path."""
    fifo = os.path.join(tmp_path, "fifo")
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", os.fspath(tmp_path)):
        with pytest.raises(ValueError, match="not a regular file|directory"):
            FileSource(path)


def test_none_from_the_source_maps_zero_pages() -> None:
    data = random_bytes(16 * P, 5)

    def src(offset: int, length: int) -> bytes | None:
        return None if offset >= 16 * P else data[offset : offset + length]

    with anon(16) as a, anon(16) as z:
        with FaultHandler([(a.addr, a.length), (z.addr, z.length)], src) as fh:
            assert fh.wait(10), "prefetch serves everything"
        zero = int(Category.PFNZERO)
        res = pagescan.scan(z.addr, z.end, category_mask=zero, return_mask=zero)
        assert [(r.start, r.end) for r in res] == [(z.addr, z.end)], "UFFDIO_ZEROPAGE: the zero page"
        assert len(pagescan.scan(a.addr, a.end, category_mask=zero, return_mask=zero)) == 0
        assert z.read(0, 16) == bytes(16 * P) and a.read(0, 16) == data


def test_prefetch_completes_without_any_touch() -> None:
    npages = 2048  # 8 MiB: several prefetch windows
    data = random_bytes(npages * P, 6)
    seen: list[tuple[int, int]] = []
    with anon(npages) as m:
        with FaultHandler([(m.addr, m.length)], source_of(data)) as fh:
            hpid = fh.pid
            deadline = time.monotonic() + 20
            while fh.pid and time.monotonic() < deadline:
                seen.append(fh.progress())
                if fh.wait(0.01):
                    break
            assert fh.wait(10) is True
            assert fh.progress() == (npages, npages)
        assert not os.path.exists(f"/proc/{hpid}")
        done = [s for s, _ in seen]
        assert done == sorted(done), "progress never goes back"
        assert all(t == npages for _, t in seen)
        assert present(m.addr, npages) == [1] * npages, "every page is in before any touch"
        assert m.read(0, npages) == data


def test_prefetch_waits_for_the_first_touch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before it prefetches, the handler gives the first fault FIRST_TOUCH_WAIT to come
    (a lazy load is touched at once; its first fault must not queue behind a window)."""
    import pagescan.handler as handler_mod

    monkeypatch.setattr(handler_mod, "FIRST_TOUCH_WAIT", 5000)  # ms; the forked handler inherits it
    npages = 2048
    data = random_bytes(npages * P, 16)
    with anon(npages) as m:
        with FaultHandler([(m.addr, m.length)], source_of(data)) as fh:
            time.sleep(0.3)  # long enough to prefetch all 8 MiB, had it not waited
            assert fh.progress() == (0, npages) and present(m.addr, npages) == [0] * npages
            assert m.read(npages - 1) == data[(npages - 1) * P :]
            assert fh.wait(10) is True, "after the first fault, prefetch brings the rest"
        assert m.read(0, npages) == data


def test_no_prefetch_serves_only_what_is_touched() -> None:
    data = random_bytes(N * P, 7)
    with anon(N) as m:
        fh = FaultHandler([(m.addr, m.length)], source_of(data), prefetch=False).start()
        try:
            assert fh.wait(0.2) is False, "without touches the handler cannot finish"
            assert fh.progress() == (0, N) and present(m.addr, N) == [0] * N
            assert m.read_byte(20) == data[20 * P]
            wait_for(lambda: fh.progress()[0] >= 1, what="progress")
            served, _ = fh.progress()
            assert served <= 16, "a fault resolves a 64 KiB window around it"
            got = present(m.addr, N)
            assert got[20] == 1 and sum(got) == served
        finally:
            fh.close()  # unserved pages are poisoned now: never touch them
        assert fh.pid == 0 and fh.guardian_pid == 0


# -- non-cooperative events -------------------------------------------------------------


def test_dontneed_gives_zeros_never_the_old_data() -> None:
    data = random_bytes(N * P, 8)
    with anon(N) as m:
        with FaultHandler([(m.addr, m.length)], source_of(data), prefetch=False) as fh:
            assert m.read(3) == data[3 * P : 4 * P]  # served
            m.madvise(MADV.DONTNEED, 3, 1)  # REMOVE event; the handler reads it
            assert m.read(3) == bytes(P), "a discarded page must not be refilled from the source"
            m.madvise(MADV.DONTNEED, 40, 1)  # never served
            assert m.read(40) == bytes(P)
            assert m.read(41) == data[41 * P : 42 * P], "its neighbours are still served"
            m.write(3, 1, 0x33)  # the owner's own data stays
            assert m.read(0, N) == b"".join(
                bytes([0x33]) * P if i == 3 else bytes(P) if i == 40 else data[i * P : (i + 1) * P]
                for i in range(N)
            )
            assert fh.wait(10)


def test_dontneed_during_threaded_prefetch_gives_zeros(tmp_path: Path) -> None:
    """With a thread-safe source two threads prefetch windows while the owner discards
    pages just ahead of the progress (in the windows being read and copied): a
    discarded range reads zeros, never data copied in after the discard (the main
    thread reads the REMOVE message only with no window in flight)."""
    n = 32768  # 128 MiB: prefetch windows of up to 8 MiB, several in flight
    data = random_bytes(n * P, 31)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    cuts: list[int] = []
    with anon(n) as m, FileSource(path) as src:
        with FaultHandler([(m.addr, m.length)], src, prefetch=True) as fh:
            while fh.progress()[0] < n - 8192 and fh.wait(0.0002) is False:
                page = fh.progress()[0] + 256 + 613 * len(cuts) % 6144
                if page not in cuts:
                    m.madvise(MADV.DONTNEED, page, 16)
                    cuts.append(page)
            assert fh.wait(60)
        assert len(cuts) >= 5, "too few discards while prefetching"
        got = np.frombuffer(m.read(0, n), np.uint8).reshape(n, P)
        want = np.frombuffer(data, np.uint8).reshape(n, P).copy()
        for page in cuts:
            want[page : page + 16] = 0
        bad = np.flatnonzero((got != want).any(axis=1))
        assert not bad.size, f"{bad.size} pages wrong, first {bad[:8]} (discarded: {cuts[:8]}...)"


def test_faults_during_threaded_prefetch_halt_and_resume(tmp_path: Path) -> None:
    """Touches from the far end while two threads prefetch from the start: each fault
    stops the windows not yet copied (left pending, resumed later); every page ends
    up in, exact."""
    n = 16384
    data = random_bytes(n * P, 32)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    with anon(n) as m, FileSource(path) as src, FaultHandler([(m.addr, m.length)], src, prefetch=True) as fh:
        for page in range(n - 1, n // 2, -997):
            assert m.read(page) == data[page * P : (page + 1) * P]
        assert fh.wait(60)
        assert fh.progress() == (n, n)
        assert m.read(0, n) == data


def test_unmap_part_of_the_range_handler_still_finishes() -> None:
    data = random_bytes(N * P, 9)
    for prefetch in (False, True):
        with anon(N) as m:
            with FaultHandler([(m.addr, m.length)], source_of(data), prefetch=prefetch) as fh:
                if not prefetch:
                    assert m.read(0) == data[:P]
                libc.munmap(m[16], 16 * P)  # UNMAP event
                rest = [i for i in range(N) if not 16 <= i < 32]
                if not prefetch:
                    for i in rest:
                        assert m.read(i) == data[i * P : (i + 1) * P]
                assert fh.wait(10) is True, f"prefetch={prefetch}"
                assert fh.progress() == (N, N)
                for i in rest:
                    assert m.read(i) == data[i * P : (i + 1) * P]
            libc.mmap(m[16], 16 * P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)  # for close()


def test_remap_follows_the_moved_range() -> None:
    data = random_bytes(N * P, 13)

    def owner(w: int) -> None:
        mremap = ctypes.CDLL(None, use_errno=True).mremap
        mremap.restype = ctypes.c_void_p
        mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        m, dst = anon(N), anon(N)
        fh = FaultHandler([(m.addr, m.length)], source_of(data), prefetch=False).start()
        _report_pids(w, fh)
        assert m.read(0) == data[:P]
        assert mremap(m.addr, m.length, m.length, 1 | 2, dst.addr) == dst.addr  # REMAP event
        assert dst.read(0, N) == data, "served at the new address from the same offsets"
        assert fh.wait(5) is True
        os.write(w, b"OK")

    pid, r = fork_owner(owner)
    hpid, gpid = read_pids(r)
    status, report = finish_owner(pid, r)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, report.decode(errors="replace")
    assert report.endswith(b"OK")
    wait_gone([hpid, gpid])


def _libc_mremap() -> Callable[..., int]:
    mremap = ctypes.CDLL(None, use_errno=True).mremap
    mremap.restype = ctypes.c_void_p
    mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return mremap  # type: ignore[no-any-return]


def test_remap_of_part_of_a_range_serves_both_parts() -> None:
    """``mremap`` of the middle of a served range (before: only a move of a whole region
    was followed; the moved pages hung, or with prefetch read zeros): each part is
    served its own bytes at its own address, touched or prefetched."""
    data = random_bytes(N * P, 21)

    def owner(prefetch: bool) -> bool:
        with anon(N) as m, anon(N) as dst:
            fh = FaultHandler([(m.addr, m.length)], source_of(data), prefetch=prefetch).start()
            try:
                assert m.read(0) == data[:P]
                lo, hi = 20, 44  # pages [20, 44) move; the window served first was [0, 16)
                moved = _libc_mremap()(m[lo], (hi - lo) * P, (hi - lo) * P, 1 | 2, dst.addr)
                assert moved == dst.addr
                if prefetch:
                    assert fh.wait(10) is True
                ok = all(dst.read(i - lo) == data[i * P : (i + 1) * P] for i in range(lo, hi))
                ok = ok and all(m.read(i) == data[i * P : (i + 1) * P] for i in [*range(lo), *range(hi, N)])
                if not prefetch:
                    assert fh.wait(10) is True
                return ok
            finally:
                fh.close()
                libc.mmap(m[20], 24 * P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)

    for prefetch in (False, True):
        assert run_in_child(lambda: owner(prefetch), timeout=20) is True, f"prefetch={prefetch}"
    assert not children_of()


def test_overlapping_regions_and_a_private_record_are_refused() -> None:
    """Two regions naming the same page (the first's source won, silently) and a
    ``record`` in private memory (the handler's writes landed in its own copy, and the
    end of the recording never reached it: ``wait()`` hung) are refused."""
    with anon(32) as m:
        with pytest.raises(pagescan.InvalidArgumentError, match="overlap"):
            FaultHandler([(m.addr, 32 * P), (m[16], 16 * P)], lambda o, n: bytes(n))
        with pytest.raises(ValueError, match="MAP_SHARED"):
            FaultHandler([(m.addr, 32 * P)], lambda o, n: bytes(n), record=np.zeros(34, np.uint64))
        shared = mmap.mmap(-1, 34 * 8, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        rec = np.frombuffer(shared, np.uint64)
        FaultHandler([(m.addr, 32 * P)], lambda o, n: bytes(n), record=rec)  # accepted (not started)
        del rec
        shared.close()


def test_a_forked_child_neither_ends_nor_saves_the_parents_recording(tmp_path: Path) -> None:
    """``load(lazy=True, record=True)``, then ``fork``: the child dropping its copy (or
    exiting) ended the parent's recording (the stop flag is in shared memory) and
    appended a working set of its own to the file."""
    import gc

    from pagescan.snapshot import Checkpointer, inspect, load

    path = tmp_path / "r.ck"
    a = np.ones(512 * P // 8)
    with Checkpointer(path, {"a": a}) as ck:
        ck.checkpoint()
    st = load(path, lazy=True, record=True)
    try:
        assert st.handler is not None and st.handler.record is not None
        rec = st.handler.record
        _ = st["a"][0]

        def child() -> None:
            nonlocal st
            del st
            gc.collect()

        run_in_child(child)
        assert int(rec[-1]) == 0, "the child ended the recording"
        assert inspect(path)["sections"] == []
        _ = st["a"][300 * P // 8]
        assert int(rec[0]) == 2, "the parent's touch was not recorded"
        rec[-1] = 1  # the owner ends the recording: the handler prefetches the rest
        assert st.handler.wait(20)
    finally:
        del st, rec
        gc.collect()
    assert [s["type"] for s in inspect(path)["sections"]] == ["working-set"]


def test_the_guardian_holds_none_of_the_owners_fds_and_a_source_may_use_any(tmp_path: Path) -> None:
    """Handler and guardian are forks of the owner. The guardian held every fd the owner
    had: a peer never saw EOF while it lived, a released ``flock`` stayed held. It holds
    none now. The handler keeps them all while it runs: its source may talk to a page
    server over a socket, or read a file the program keeps locked."""
    import fcntl
    import socket

    data = random_bytes(N * P, 41)

    def owner() -> list[str]:
        a, b = socket.socketpair()
        server, client = socket.socketpair()
        lock = os.open(tmp_path / "lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)

        pid = os.fork()  # a page server, (offset, length) in, bytes out: another process
        if pid == 0:  # pragma: no cover - child
            try:
                client.close()
                a.close()
                b.close()
                os.close(lock)
                while req := server.recv(16):
                    off, n = struct.unpack("QQ", req)
                    server.sendall(data[off : off + n])
            finally:
                os._exit(0)
        server.close()

        def source(offset: int, length: int) -> bytes:
            client.sendall(struct.pack("QQ", offset, length))
            got = b""
            while len(got) < length:
                got += client.recv(length - len(got))
            return got

        with anon(N) as m:
            fh = FaultHandler([(m.addr, m.length)], source, prefetch=False).start()
            try:
                out = ["served" if m.read(3) == data[3 * P : 4 * P] else "wrong data"]
                held = {os.readlink(f"/proc/{fh.guardian_pid}/fd/{fd}") for fd in os.listdir(f"/proc/{fh.guardian_pid}/fd")}
                out.append("guardian holds none" if not any("socket" in h or h.endswith("/lock") for h in held)
                           else f"guardian holds {held}")
                b.close()
                os.close(lock)
            finally:
                fh.close()
            a.settimeout(5)
            out.append(repr(a.recv(1)))  # EOF once the handler has ended
            other = os.open(tmp_path / "lock", os.O_RDWR)
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                out.append("lock free")
            except BlockingIOError:
                out.append("lock still held")
            client.close()
            os.waitpid(pid, 0)
            return out

    assert run_in_child(owner, timeout=30) == ["served", "guardian holds none", "b''", "lock free"]
    assert not children_of()


def test_a_stopped_handler_reports_how_it_ended() -> None:
    """Killed from outside, closed from a signal handler during ``wait()`` or from
    another thread: ``wait()`` is False, ``failed`` True, ``exit_status`` the kill's
    (it read 0 when the other reaper got there first, and ``failed`` stayed False)."""

    def killed(fh: FaultHandler) -> None:
        os.kill(fh.pid, signal.SIGKILL)

    def from_a_signal_handler(fh: FaultHandler) -> None:
        signal.signal(signal.SIGALRM, lambda *_: fh.close())
        signal.setitimer(signal.ITIMER_REAL, 0.05)

    def from_a_thread(fh: FaultHandler) -> None:
        threading.Timer(0.05, fh.close).start()

    def closed_before_any_wait(fh: FaultHandler) -> None:
        fh.close()
        assert fh.failed and fh.exit_status is not None, "known at once, without wait()"

    for stop in (killed, from_a_signal_handler, from_a_thread, closed_before_any_wait):
        for _ in range(5 if stop is from_a_thread else 1):
            with anon(N) as m:
                fh = FaultHandler([(m.addr, m.length)], lambda o, n: bytes(n), prefetch=False).start()
                try:
                    stop(fh)
                    assert fh.wait(10) is False, stop.__name__
                    assert fh.exit_status is not None and os.WIFSIGNALED(fh.exit_status), (stop.__name__, fh.exit_status)
                    assert os.WTERMSIG(fh.exit_status) == signal.SIGKILL
                    assert fh.failed, stop.__name__
                finally:
                    signal.signal(signal.SIGALRM, signal.SIG_DFL)
                    fh.close()
    assert not children_of()


def test_the_progress_page_outlives_close_while_a_reader_holds_it() -> None:
    """A reader of the progress page interrupted between its check and its read by a
    signal handler that closes the handler (``_faultserver._Remote.wait``, ``progress``)
    read an unmapped page: SIGSEGV. The page now stays mapped while a view of it lives."""
    from pagescan.handler import _Shared

    def reader() -> int:
        sh = _Shared()
        arr = sh.arr
        arr[1] = 7
        sh.close()  # what the signal handler did
        del sh
        import gc

        gc.collect()
        return int(arr[1])

    assert run_in_child(reader) == 7


@pytest.mark.parametrize("guardian", ["forked", "spawned"])
@pytest.mark.parametrize("moved", ["all", "part"])
def test_a_handler_killed_after_a_remap_leaves_sigbus_at_the_new_address(guardian: str, moved: str) -> None:
    """The guardian poisons where the handler last saw the regions (the handler writes
    them into the shared page on each ``mremap``): it poisoned the old addresses, and the
    moved pages, unregistered once the uffd went, read zeros."""
    import pagescan.handler as handler_mod

    data = bytes([7]) * (N * P)

    def owner() -> None:
        if guardian == "spawned":
            handler_mod.SPAWN_ABOVE = 0
        m, dst = anon(N), anon(N)
        fh = FaultHandler([(m.addr, m.length)], source_of(data), prefetch=False).start()
        assert m.read(0) == data[:P]
        lo = 0 if moved == "all" else 20
        assert _libc_mremap()(m[lo], (N - lo) * P, (N - lo) * P, 1 | 2, dst.addr) == dst.addr
        assert dst.read(1) == data[P : 2 * P]  # served at the new address
        os.kill(fh.pid, signal.SIGKILL)
        assert fh.wait(10) is False
        dst.read(N - lo - 1)  # never served: SIGBUS, not zeros

    with forked(owner, alarm=30) as c:
        status, trace = c.outcome(30)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, (Child.describe(status), trace)


def test_remap_onto_addresses_the_range_held_before_serves_the_moved_pages() -> None:
    """A piece unmapped, or replaced by a move onto it, stayed in the handler's table and
    shadowed a piece moved there later: the moved pages read zeros. Both orders, with
    and without prefetch."""
    data = random_bytes(N * P, 31)

    def owner(prefetch: bool, unmap_first: bool) -> bool:
        with anon(N) as m:
            fh = FaultHandler([(m.addr, m.length)], source_of(data), prefetch=prefetch).start()
            try:
                if unmap_first:
                    libc.munmap(m.addr, 2 * P)
                moved = _libc_mremap()(m[5], P, P, 1 | 2, m.addr)  # page 5 onto page 0
                assert moved == m.addr
                ok = m.read(0) == data[5 * P : 6 * P] and m.read(7) == data[7 * P : 8 * P]
                if prefetch:
                    assert fh.wait(10) is True
                return ok
            finally:
                fh.close()
                libc.mmap(m[5], P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)
                libc.mmap(m[1], P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)

    for prefetch in (False, True):
        for unmap_first in (False, True):
            assert run_in_child(lambda: owner(prefetch, unmap_first), timeout=20) is True, (prefetch, unmap_first)
    assert not children_of()


def test_a_failing_helper_never_blocks_on_a_full_stderr() -> None:
    """A helper that raises says why on the owner's stderr, but never waits for room
    there: with a stderr pipe no one reads, full, the handler blocked in its last
    write and ``wait()`` never returned."""
    import fcntl

    def owner() -> tuple[bool, int | None]:
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(w, b"x" * 65536)
        fcntl.fcntl(w, fcntl.F_SETFL, 0)
        os.dup2(w, 2)
        with anon(N) as m:
            fh = FaultHandler([(m.addr, m.length)], lambda o, n: b"short", prefetch=True).start()
            try:
                return fh.wait(10), fh.exit_status
            finally:
                fh.close()

    done, status = run_in_child(owner, timeout=30)
    assert done is False and status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1


def test_faults_on_pages_not_the_handlers_to_serve_get_zero_pages() -> None:
    """A fault the handler has no data for is answered, never dropped (a hang): a range
    grown in place by ``mremap`` (the new tail stays registered) and pages moved out
    with ``move_pages`` after they were served (holes again) read zeros, as such
    memory reads anywhere."""
    data = bytes([7]) * (N * P)

    def grown() -> list[int]:
        with anon(2 * N) as m:
            libc.munmap(m[N], N * P)  # room to grow into
            fh = FaultHandler([(m.addr, N * P)], source_of(data), prefetch=False).start()
            try:
                assert m.read(0) == data[:P]
                assert _libc_mremap()(m.addr, N * P, 2 * N * P, 0, None) == m.addr  # in place
                return [m.read(N + 1)[0], m.read(2 * N - 1)[-1], m.read(3)[0]]
            finally:
                fh.close()

    assert run_in_child(grown, timeout=20) == [0, 0, 7]

    def moved_out() -> list[int]:
        with anon(N) as m, anon(16) as dst:
            fh = FaultHandler([(m.addr, N * P)], source_of(data), prefetch=False).start()
            try:
                assert m.read(0) == data[:P]  # served: the first 64 KiB window
                pagescan.move_pages(dst.addr, m.addr, 16 * P)
                return [dst.read(0)[0], m.read(0)[0], m.read(15)[0], m.read(16)[0]]
            finally:
                fh.close()

    assert run_in_child(moved_out, timeout=20) == [7, 0, 0, 7]
    assert not children_of()


def test_hugetlb_memory_is_refused_before_anything_is_dropped(hugetlb_2m: int, tmp_path: Path) -> None:
    """The handler serves base pages; hugetlb faults are resolved a whole huge page at a
    time (``UFFDIO_COPY`` of 4 KiB there is EINVAL, which killed the handler and left
    the owner SIGBUS). Refused at start, ``FaultHandler`` and ``lazy_restore`` alike,
    the target's bytes untouched."""
    from pagescan.snapshot import Checkpointer, lazy_restore

    h = 2 << 20
    for shared in (False, True):
        with hugetlb_anon(1, shared=shared) as m:
            with pytest.raises(pagescan.InvalidArgumentError, match="hugetlb"):
                FaultHandler([(m.addr, h)], lambda o, n: bytes(n)).start()
            arr = np.frombuffer((ctypes.c_uint8 * h).from_address(m.addr), np.uint8)
            arr[:] = 5
            path = tmp_path / f"h{int(shared)}.ck"
            with Checkpointer(path, [arr]) as ck:
                ck.checkpoint()
            arr[:] = 9
            with pytest.raises(ValueError, match="hugetlb"):
                with lazy_restore(path, [arr]):
                    pass
            assert (arr == 9).all(), "nothing dropped, nothing restored"
            del arr
    assert not children_of()


# -- failure: never a hang, never wrong data --------------------------------------------


def _report_pids(w: int, fh: FaultHandler) -> None:
    os.write(w, struct.pack("ii", fh.pid, fh.guardian_pid).hex().encode())


def test_killed_handler_makes_the_next_touch_sigbus() -> None:
    data = random_bytes(N * P, 10)

    def owner(w: int) -> None:
        m = anon(N)
        fh = FaultHandler([(m.addr, m.length)], source_of(data), prefetch=False).start()
        _report_pids(w, fh)
        assert m.read(0) == data[:P]
        os.kill(fh.pid, signal.SIGKILL)
        assert fh.wait(5) is False, "not finished"  # reaps handler and guardian
        assert m.read(1) == data[P : 2 * P], "pages served before the death stay right"
        os.write(w, b"touching")
        m.read(N - 1)  # unserved: SIGBUS, not zeros, not a hang
        os.write(w, b"READ")

    pid, r = fork_owner(owner)
    hpid, gpid = read_pids(r)
    status, report = finish_owner(pid, r)
    assert report.endswith(b"touching"), report
    assert_sigbus(status, report)
    wait_gone([hpid, gpid])


def test_killed_handler_releases_a_thread_blocked_in_the_fault() -> None:
    data = random_bytes(N * P, 11)

    def owner(w: int) -> None:
        m = anon(N)
        never_r, never_w = os.pipe()

        def src(offset: int, length: int) -> bytes:
            if offset >= 32 * P:
                os.read(never_r, 1)  # the handler hangs here, as a stuck source would
            return data[offset : offset + length]

        fh = FaultHandler([(m.addr, m.length)], src, prefetch=False).start()
        mm = (ctypes.c_char * m.length).from_address(m.addr)
        assert mm[:P] == data[:P]
        _report_pids(w, fh)

        def toucher() -> None:
            mm[(N - 1) * P : N * P]  # blocks in the fault, holding the GIL

        t = threading.Thread(target=toucher)
        t.start()
        t.join(30)
        os.write(w, b"RETURNED")

    pid, r = fork_owner(owner)
    hpid, gpid = read_pids(r)
    try:
        wait_for(lambda: any("handle_userfault" in wchan(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")),
                 what="the owner thread to block in the fault")
        time.sleep(0.05)
        assert os.path.exists(f"/proc/{pid}"), "the owner must still be waiting"
        os.kill(hpid, signal.SIGKILL)
    finally:
        status, report = finish_owner(pid, r)
    assert b"RETURNED" not in report
    assert_sigbus(status, report)
    wait_gone([hpid, gpid])


def test_a_failing_source_makes_touches_sigbus() -> None:
    def src(offset: int, length: int) -> bytes:
        if offset >= 16 * P:
            raise RuntimeError("source broke")
        return bytes([7]) * length

    def owner(w: int) -> None:
        m = anon(N)
        fh = FaultHandler([(m.addr, m.length)], src, prefetch=False).start()
        _report_pids(w, fh)
        assert m.read(0) == bytes([7]) * P
        os.write(w, b"touching")
        m.read(N - 1)
        os.write(w, b"READ")

    pid, r = fork_owner(owner)
    hpid, gpid = read_pids(r)
    status, report = finish_owner(pid, r)
    assert report.endswith(b"touching"), report
    assert_sigbus(status, report)
    wait_gone([hpid, gpid])


def test_handler_exits_when_the_owner_exits() -> None:
    def owner(w: int) -> None:
        m = anon(N)
        fh = FaultHandler([(m.addr, m.length)], lambda o, n: bytes(n), prefetch=False).start()
        _report_pids(w, fh)
        os._exit(0)  # neither close() nor wait(): the owner just goes away

    pid, r = fork_owner(owner)
    hpid, gpid = read_pids(r)
    status, _ = finish_owner(pid, r)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    wait_gone([hpid, gpid])


def test_close_midway_reaps_both_processes() -> None:
    data = random_bytes(N * P, 12)
    with anon(N) as m:
        fh = FaultHandler([(m.addr, m.length)], source_of(data), prefetch=False).start()
        hpid, gpid = fh.pid, fh.guardian_pid
        assert m.read(0) == data[:P]
        fh.close()
        check_gone(fh, hpid, gpid)
        assert "um" not in vmflags(m.addr), "the uffd is gone with its last holder"
        assert m.read(1) == data[P : 2 * P]
        fh.close()  # idempotent


# -- bad input --------------------------------------------------------------------------


def test_populated_target_is_refused() -> None:
    with anon(8) as m:
        m.touch(5)
        fh = FaultHandler([(m.addr, m.length)], lambda o, n: bytes(n))
        with pytest.raises(FileExistsError) as ei:
            fh.start()
        assert ei.value.errno == errno.EEXIST
        assert fh.pid == 0 and "um" not in vmflags(m.addr)
        fh.close()


def test_bad_regions_and_states() -> None:
    with anon(4) as m:
        for regions in ([(m.addr + 8, P)], [(m.addr, P + 1)], [(m.addr, 0)], [(m.addr, -P)]):
            with pytest.raises(ValueError):
                FaultHandler(regions, lambda o, n: bytes(n))
        fh = FaultHandler([(m.addr, m.length)], lambda o, n: bytes(n))
        with pytest.raises(RuntimeError):
            fh.wait(1)
        with fh:
            with pytest.raises(RuntimeError):
                fh.start()
            assert fh.wait(10)


def test_wrong_length_from_the_source_fails_loudly() -> None:
    def owner(w: int) -> None:
        m = anon(N)
        fh = FaultHandler([(m.addr, m.length)], lambda o, n: b"short", prefetch=False).start()
        _report_pids(w, fh)
        os.write(w, b"touching")
        m.read(0)
        os.write(w, b"READ")

    pid, r = fork_owner(owner)
    hpid, gpid = read_pids(r)
    status, report = finish_owner(pid, r)
    assert_sigbus(status, report)
    wait_gone([hpid, gpid])


def test_memory_that_cannot_be_served() -> None:
    with anon(4) as m, WriteWatch(m.addr, m.length):
        with pytest.raises(OSError) as ei:
            FaultHandler([(m.addr, m.length)], lambda o, n: bytes(n)).start()
        assert ei.value.errno == errno.EBUSY
    with Userfaultfd(0) as uf, anon(4) as m2:
        uf.register(m2.addr, m2.length, RegisterMode.MISSING)
        with pytest.raises(OSError) as ei:
            FaultHandler([(m2.addr, m2.length)], lambda o, n: bytes(n)).start()
        assert ei.value.errno == errno.EBUSY
    hole = Mapping(8, prot=PROT.NONE)
    try:
        libc.munmap(hole[2], 4 * P)
        with pytest.raises(OSError):
            FaultHandler([(hole[2], 4 * P)], lambda o, n: bytes(n)).start()
    finally:
        libc.mmap(hole[2], 4 * P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)
        hole.close()


def test_bad_sources_and_hot_pages_are_refused_at_construction() -> None:
    """A source that is neither a Source nor a callable is a ``TypeError`` here: before,
    it failed in the handler process, whose guardian then poisoned the pages (the
    owner's first touch died of SIGBUS). ``hot`` must be integer page numbers in range."""
    regions = [(0x10000000, 4 * P)]  # (not registered: construction only)
    for bad in (42, "abc", None, b"data"):
        with pytest.raises(TypeError, match="source must be"):
            FaultHandler(regions, bad)  # type: ignore[arg-type]
    src = lambda off, n: None  # noqa: E731
    for hot, err in [([2**63], ValueError), ([2**64], ValueError), ([4], ValueError), ([-1], ValueError),
                     ([1.7], TypeError), (["2"], TypeError), ([True], TypeError), ([[1]], ValueError)]:
        with pytest.raises(err):
            FaultHandler(regions, src, hot=hot)
    assert FaultHandler(regions, src, hot=[3, 0, 1]).hot.tolist() == [3, 0, 1]  # type: ignore[union-attr]
    assert FaultHandler(regions, src, hot=np.array([2], np.uint64)).hot.tolist() == [2]  # type: ignore[union-attr]


def test_the_handler_process_collects_garbage_as_the_owner_did() -> None:
    """The handler is forked while the owner holds the collector off (``held_still``):
    the child gets it back as it was, not disabled for good."""
    import gc

    assert gc.isenabled()
    with anon(1) as m:
        with FaultHandler([(m.addr, P)], lambda off, n: bytes([1 + gc.isenabled()]) * n, prefetch=False) as fh:
            assert m.read(0)[:1] == b"\x02", "the source ran with the collector disabled"
            assert fh.wait(10)
    assert gc.isenabled()


def test_collector_blocks_overlapping_in_two_threads() -> None:
    """``no_gc`` blocks of two threads overlap: the first out does not turn the collector
    back on under the other; the last out does."""
    import gc

    from pagescan._held import no_gc

    a_in, a_out, seen = threading.Event(), threading.Event(), []

    def a() -> None:
        with no_gc():
            a_in.set()
            a_out.wait(5)

    t = threading.Thread(target=a)
    t.start()
    a_in.wait(5)
    with no_gc():
        a_out.set()
        t.join(5)
        seen.append(gc.isenabled())
    assert seen == [False] and gc.isenabled()


def test_fetch_rest_brings_every_page_in_without_prefetch() -> None:
    """``fetch_rest()`` turns an idle handler made with ``prefetch=False`` into one that
    prefetches: ``wait()`` then returns True, every page holds the source's bytes."""
    data = random_bytes(64 * P, 9)
    with anon(64) as m, FaultHandler([(m.addr, m.length)], lambda off, n: data[off : off + n],
                                     prefetch=False) as fh:
        assert m.read(3, 1) == data[3 * P : 4 * P]
        assert not fh.wait(0.3), "without prefetch the rest waits for touches"
        assert fh.progress()[0] < 64
        fh.fetch_rest()
        assert fh.wait(30) and fh.progress() == (64, 64)
        assert m.read(0, 64) == data
