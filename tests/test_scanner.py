"""``Scanner`` (prepared scans) and the guarantees of the scan path: results own their
regions, a large ``vec_len`` costs nothing, calls are reentrant and thread-safe, and
bad arguments are refused before the kernel sees them (issue 9 items 1-6)."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest

import pagescan
from pagescan import PAGE_REGION_DTYPE, Category as C, Scanner, scan, scan_iter

from .conftest import requires_pagemap_scan
from .memory import P, anon
from .procs import run_in_child

pytestmark = requires_pagemap_scan

BACKENDS = ["kernel", "emulated"]
PRESENT = int(C.PRESENT)


def striped(npages: int) -> Any:
    """A mapping whose even pages are present: npages/2 regions under mask=PRESENT."""
    m = anon(npages)
    for i in range(0, npages, 2):
        m.write(i, 1, value=0x5A)
    return m


def owned_bytes(arr: np.ndarray) -> int:
    """Bytes of the memory object at the root of ``arr``'s base chain."""
    base: Any = arr
    while getattr(base, "base", None) is not None:
        base = base.base
    if isinstance(base, np.ndarray):
        return int(base.nbytes)
    if isinstance(base, (bytes, bytearray, memoryview)):
        return memoryview(base).nbytes
    return ctypes.sizeof(base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scanner_equals_scan(backend: str) -> None:
    with striped(64) as m:
        kw: dict[str, Any] = dict(category_mask=PRESENT, return_mask=PRESENT | int(C.WRITTEN), backend=backend)
        for extra in ({}, {"max_pages": 5}, {"vec_len": 3}, {"max_pages": 7, "vec_len": 2}):
            with Scanner(**kw, **extra) as sc:
                for lo, hi in ((0, 64), (3, 17), (10, 10), (63, 64)):
                    want = scan(m[lo], m[hi], **kw, **extra)
                    got = sc.scan(m[lo], m[hi])
                    assert got.regions.tolist() == want.regions.tolist()
                    assert (got.walk_end, got.complete) == (want.walk_end, want.complete)
                    out = np.zeros(64, PAGE_REGION_DTYPE)
                    n, walk_end = sc.scan_into(m[lo], m[hi], out)
                    assert out[:n].tolist() == want.regions.tolist() and walk_end == want.walk_end


def test_scan_into_bounds_and_validation() -> None:
    with striped(16) as m, Scanner(category_mask=PRESENT, return_mask=PRESENT) as sc:
        out = np.zeros(3, PAGE_REGION_DTYPE)
        n, walk_end = sc.scan_into(m.addr, m.end, out)
        assert n == 3 and walk_end == m[6]  # the fourth region did not fit
        assert sc.scan_into(m.addr, m.end, out[:0]) == (0, m.end)  # vec_len 0: walked, nothing reported
        bad: list[Any] = [np.zeros((4, 0), PAGE_REGION_DTYPE), np.zeros((2, 3), PAGE_REGION_DTYPE),
                          np.zeros(8, PAGE_REGION_DTYPE)[::2], np.zeros(24, np.uint64), [], None]
        ro = np.zeros(4, PAGE_REGION_DTYPE)
        ro.flags.writeable = False
        bad.append(ro)
        for b in bad:
            with pytest.raises((TypeError, ValueError)):
                sc.scan_into(m.addr, m.end, b)
        assert ro.tobytes() == bytes(ro.nbytes)
        # A remembered out that was made read-only since is refused, not written.
        out2 = np.zeros(4, PAGE_REGION_DTYPE)
        sc.scan_into(m.addr, m.end, out2)
        out2[:] = 0
        out2.flags.writeable = False
        with pytest.raises(ValueError, match="writable"):
            sc.scan_into(m.addr, m.end, out2)
        assert out2.tobytes() == bytes(out2.nbytes)
    with striped(16) as m, Scanner(category_mask=PRESENT, return_mask=PRESENT, vec_len=2) as sc:
        assert sc.scan_into(m.addr, m.end, np.zeros(8, PAGE_REGION_DTYPE))[0] == 2  # vec_len bounds too


def test_scan_into_range_checked_by_the_store() -> None:
    """Issue 12.1: scan_into stores start and end without a separate range check; a
    negative or 65-bit value is still refused, naming the argument, before any call,
    with the remembered out and with a new (bad) one."""
    with striped(8) as m, Scanner(category_mask=PRESENT, return_mask=PRESENT) as sc:
        out = np.zeros(8, PAGE_REGION_DTYPE)
        assert sc.scan_into(m.addr, m.end, out) == (4, m.end)
        out[:] = 0
        for start, end, name in ((-P, m.end, "start"), (m.addr, 1 << 64, "end"), (1 << 64, m.end, "start")):
            with pytest.raises(ValueError, match=name):
                sc.scan_into(start, end, out)
            with pytest.raises(ValueError, match=name):  # the range is reported before the bad out
                sc.scan_into(start, end, np.zeros(4, np.uint64))
        with pytest.raises(TypeError, match="start"):
            sc.scan_into(float(m.addr), m.end, out)
        assert out.tobytes() == bytes(out.nbytes)
        assert sc.scan_into(np.uint64(m.addr), np.int64(m.end), out) == (4, m.end)  # __index__ ints
        assert sc.scan_into(m.addr, m.end, out) == (4, m.end)  # every spare request is back and sound


def test_plain_one_off_scan() -> None:
    """Issue 12.2: ``scan()`` with only ``return_mask`` (the one-off call's own path) and
    ``Scanner.scan`` of a small range return what the general path returns: a writable
    result owning only its regions (made on first use), ``len`` without making it, the
    same errors, and with ``out=`` a view of ``out``."""
    with striped(16) as m:
        want = scan(m.addr, m.end, category_mask=0, return_mask=PRESENT, max_pages=1 << 20)  # the general path
        for res in (scan(m.addr, m.end, return_mask=PRESENT), scan(m.addr, m.end, return_mask=C.PRESENT),
                    Scanner(return_mask=PRESENT).scan(m.addr, m.end)):
            assert len(want) == 16 and len(res) == 16 and res.complete and res.walk_end == m.end  # 8 present
            assert res.regions.tolist() == want.regions.tolist()
            assert res.regions.flags.writeable and owned_bytes(res.regions) == 16 * 24
            assert res.regions is res.regions  # made once
            res.regions[0]["categories"] = 7
            assert res[0].categories == 7
        assert scan(m[1], m[2], return_mask=PRESENT).regions.tolist() == [(m[1], m[2], 0)]
        assert scan(m.addr, m.addr + 100, return_mask=PRESENT).walk_end == m[1]  # end rounded up
        out = np.zeros(16, PAGE_REGION_DTYPE)
        res = scan(m.addr, m.end, return_mask=PRESENT, out=out)
        assert len(res) == 16 and np.shares_memory(res.regions, out) and out.tolist() == want.regions.tolist()
        short = np.zeros(3, PAGE_REGION_DTYPE)
        res = scan(m.addr, m.end, return_mask=PRESENT, out=short)
        assert len(res) == 3 and res.walk_end == m[3] and not res.complete
        for bad in (np.zeros(3, np.uint64), [0, 0, 0]):
            with pytest.raises((TypeError, ValueError)):
                scan(m.addr, m.end, return_mask=PRESENT, out=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="start"):
            scan(-P, m.end, return_mask=PRESENT)
        with pytest.raises(ValueError, match="end"):
            scan(m.addr, 1 << 64, return_mask=PRESENT)
        with pytest.raises(OSError) as err:
            scan(m.addr + 1, m.end, return_mask=PRESENT)
        assert err.value.errno == errno.EINVAL
        with pytest.raises(OSError) as err:
            scan(m.addr, m.end, return_mask=1 << 40)  # an unknown category
        assert err.value.errno == errno.EINVAL


def test_scanner_arguments_checked_once() -> None:
    for kw in ({"flags": -1}, {"category_mask": 1 << 64}, {"max_pages": 1.0}, {"vec_len": "1"},
               {"return_mask": np.bool_(True)}, {"backend": "gpu"}):
        with pytest.raises((TypeError, ValueError)):
            Scanner(**kw)
    with pytest.raises(ValueError):
        Scanner(pid=0)
    with pytest.raises(ProcessLookupError):
        Scanner(pid=2**22 + 12345)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_addresses_with_a_category_mask_are_refused(backend: str) -> None:
    """Issue 9.3: an IntFlag mask must not switch off the range checks."""
    with anon(2) as m:
        for kw in ({"start": -P, "end": m.end}, {"start": m.addr, "end": -1}):
            with pytest.raises(ValueError, match="negative"):
                scan(kw["start"], kw["end"], category_mask=C.PRESENT, return_mask=C.PRESENT, backend=backend)
        with pytest.raises(ValueError, match="negative"):
            scan(m.addr, m.end, category_mask=C.PRESENT, max_pages=-1, backend=backend)
        with pytest.raises(ValueError):
            scan(m.addr, m.end, category_mask=C.PRESENT, vec_len=-1, backend=backend)


def test_integer_like_start_without_end_is_refused() -> None:
    """Issue 9.6: a numpy integer is not a buffer to scan."""
    with anon(2) as m:
        for start in (np.uint64(m.addr), np.int64(m.addr), m.addr, C.PRESENT):
            with pytest.raises(TypeError, match="integer"):
                scan(start)
            with pytest.raises(TypeError, match="integer"):
                pagescan.WriteWatch(start)


def test_large_vec_len_costs_nothing() -> None:
    """Issue 9.4: vec_len bounds the answer; the buffer follows what is returned."""
    top = pagescan._procfs.task_size()
    res = scan(0, top, vec_len=1 << 40, category_mask=PRESENT, return_mask=PRESENT)
    assert res.complete and len(res) > 0
    assert owned_bytes(res.regions) <= max(len(res), 16) * 24 * 2 + 4096
    with striped(8) as m:
        assert len(scan(m.addr, m.end, vec_len=(1 << 64) - 1, category_mask=PRESENT, return_mask=PRESENT)) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_regions_equal_the_resumed_walk(backend: str) -> None:
    """A call that returns more regions than one kernel call's scratch buffer (4096)
    equals a walk resumed region by region: same regions, same walk_end."""
    npages = 2 * 4096 + 200
    with striped(npages) as m:
        kw: dict[str, Any] = dict(category_mask=PRESENT, return_mask=PRESENT, backend=backend)
        for extra in ({}, {"max_pages": 4500}, {"vec_len": 4100}, {"max_pages": 4096}, {"vec_len": 4096}):
            one = scan(m.addr, m.end, **kw, **extra)
            parts = list(scan_iter(m.addr, m.end, vec_len=1000, **kw,
                                   max_pages=extra.get("max_pages", 0)))
            want = np.concatenate([p.regions for p in parts])
            if "vec_len" in extra:
                want = want[: extra["vec_len"]]
            assert one.regions.tolist() == want.tolist(), extra
            if "vec_len" not in extra:
                assert one.walk_end == parts[-1].walk_end
            assert owned_bytes(one.regions) == one.regions.nbytes  # exactly its regions


def test_results_own_only_their_regions() -> None:
    """Issue 12.6: 100 live results of a one-region scan cost ~100 regions, not
    100 buffers."""
    with anon((1 << 30) // P) as m:  # 1 GiB reserved, one page touched: the call could return 262144
        m.write(0, 1)
        results = [scan(m.addr, m.end, category_mask=PRESENT, return_mask=PRESENT)
                   for _ in range(100)]
        assert all(len(r) == 1 for r in results)
        assert sum(owned_bytes(r.regions) for r in results) <= 100 * 24 * 16


def _reentrancy(seconds: float) -> tuple[int, int, int]:
    m = anon(64)
    for i in range(0, 64, 2):
        m.write(i, 1)
    kw: dict[str, Any] = dict(category_mask=PRESENT, return_mask=PRESENT)
    expect = scan(m.addr, m.end, **kw).regions.tolist()
    plain = scan(m.addr, m.end, return_mask=PRESENT, max_pages=64).regions.tolist()  # the general path
    sc = Scanner(**kw)
    bad = [0]
    calls = [0]

    def handler(*_: object) -> None:
        calls[0] += 1
        if scan(m.addr, m.end, **kw).regions.tolist() != expect:
            bad[0] += 1
        if sc.scan(m.addr, m.end).regions.tolist() != expect:
            bad[0] += 1
        if scan(m.addr, m.end, return_mask=PRESENT).regions.tolist() != plain:  # scan()'s own small path
            bad[0] += 1

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
    out = np.zeros(64, PAGE_REGION_DTYPE)
    n = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if scan(m.addr, m.end, **kw).regions.tolist() != expect:
                bad[0] += 1
            if scan(m.addr, m.end, return_mask=PRESENT).regions.tolist() != plain:
                bad[0] += 1
            k, walk_end = sc.scan_into(m.addr, m.end, out)
            if out[:k].tolist() != expect or walk_end != m.end:
                bad[0] += 1
            n += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
    return n, calls[0], bad[0]


def test_scan_is_reentrant_from_signal_handlers() -> None:
    """Issue 9.2: scan() from a 100 us timer's handler while scan() runs in the same
    thread: no corruption, no wrong answer (in a child: a crash fails the test)."""
    n, handled, bad = run_in_child(lambda: _reentrancy(1.5), timeout=60)
    assert handled > 100 and n > 100
    assert bad == 0



_FIRST_SCAN = """
import linecache, os, signal, sys
import numpy as np
import pagescan
from pagescan import _backend
assert not _backend._backends, "a backend is loaded already"
buf = pagescan.zeros(16 * 4096, np.uint8)
buf[:4096] = 1
seen = []
signal.signal(signal.SIGUSR1, lambda *_: seen.append(pagescan.scan(buf, category_mask=pagescan.Category.PRESENT).pages))
fired = []

def tracer(frame, event, arg):
    if frame.f_code.co_name != "_get":
        return None
    if event == "line" and not fired and "Backend()" in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
        fired.append(1)
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler's scan runs here, as this one loads the backend
    return tracer

sys.settrace(tracer)
n = pagescan.scan(buf, category_mask=pagescan.Category.PRESENT).pages
sys.settrace(None)
print(fired, seen, n)
"""


@pytest.mark.parametrize("backend", ["kernel", "emulated"])
def test_scan_from_a_signal_handler_during_the_first_scan(backend: str) -> None:
    """The first scan of a process loads its backend: a handler's scan that comes
    meanwhile gets an answer (before: it waited for good for the lock the loading scan
    held). In a fresh interpreter, the signal sent as the backend is constructed."""
    import subprocess
    import sys

    env = {**os.environ, "PAGESCAN_BACKEND": backend}
    r = subprocess.run([sys.executable, "-c", _FIRST_SCAN], capture_output=True, text=True, timeout=30, env=env,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[1]", "[1]", "1"]


def test_emulated_scan_from_a_signal_handler_while_the_zero_pfn_is_learned() -> None:
    """The emulation learns the zero page's PFN once (a read fault and a pagemap read):
    a handler's scan that needs it meanwhile gets an answer (before: it waited for good
    for the lock the learning scan held)."""
    import subprocess
    import sys

    script = (_FIRST_SCAN.replace('"Backend()"', '"vm_read"').replace('"_get"', '"get"')
              .replace("category_mask=pagescan.Category.PRESENT", "return_mask=pagescan.Category.PFNZERO")
              .replace("buf[:4096] = 1", "buf[:4096] = 1; _ = buf[8192:12288].sum()"))
    env = {**os.environ, "PAGESCAN_BACKEND": "emulated"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, env=env,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[1]", "[16]", "16"]

def test_one_scanner_many_threads() -> None:
    with striped(64) as m, Scanner(category_mask=PRESENT, return_mask=PRESENT) as sc:
        expect = sc.scan(m.addr, m.end).regions.tolist()
        errors: list[str] = []

        def work() -> None:
            out = np.zeros(64, PAGE_REGION_DTYPE)
            for _ in range(3000):
                if sc.scan(m.addr, m.end).regions.tolist() != expect:
                    errors.append("scan")
                k, _ = sc.scan_into(m.addr, m.end, out)
                if out[:k].tolist() != expect:
                    errors.append("scan_into")

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


def test_scanner_of_another_process_and_after_fork() -> None:
    with anon(4) as m:
        m.write(0, 4)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child drops its copy of page 1 and waits
            try:
                m.madvise(pagescan.MADV.DONTNEED, 1, 1)
                os.write(w, b"1")
                time.sleep(30)
            finally:
                os._exit(0)
        try:
            os.read(r, 1)
            with Scanner(pid, category_mask=PRESENT, return_mask=PRESENT) as sc:
                assert [(x.start, x.end) for x in sc.scan(m.addr, m.end)] == [(m[0], m[1]), (m[2], m[4])]
            with Scanner(category_mask=PRESENT, return_mask=PRESENT) as mine:
                assert [(x.start, x.end) for x in mine.scan(m.addr, m.end)] == [(m.addr, m.end)]
                # The same Scanner in a forked child scans the child's memory.
                child = run_in_child(lambda: (m.madvise(pagescan.MADV.DONTNEED, 0, 1),
                                              mine.scan(m.addr, m.end).regions.tolist())[1])
                assert [(s, e) for s, e, _ in child] == [(m[1], m[4])]
        finally:
            os.close(r)
            os.close(w)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_emulated_scan_of_an_exiting_process_is_process_lookup_error() -> None:
    """Issue 9.5: a target that exits mid-call is ESRCH (ProcessLookupError), never a
    short-read EFAULT."""
    outcomes: set[str] = set()
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            try:
                big = anon(2048)
                big.write(0, 2048)
                time.sleep(0.002)
            finally:
                os._exit(0)
        try:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                try:
                    with Scanner(pid, return_mask=PRESENT, backend="emulated") as sc:
                        sc.scan(0, pagescan._procfs.task_size())
                    outcomes.add("ok")
                except ProcessLookupError as err:
                    assert err.errno == errno.ESRCH
                    outcomes.add("esrch")
                    break
        finally:
            os.waitpid(pid, 0)
    assert "esrch" in outcomes


@pytest.mark.parametrize("backend", ["kernel", "emulated"])
@pytest.mark.parametrize("slots", [16, 512])  # __setstate__ copies up to 1000 bytes, keeps a bytes object above
def test_an_out_given_new_memory_by_setstate_is_looked_up_again(backend: str, slots: int) -> None:
    """``ndarray.__setstate__`` gives the same object (same length, same dtype) new
    memory and frees the old, though the Scanner holds a reference and numpy a buffer
    export: the remembered address was used again and the kernel wrote the regions into
    the freed block (the array stayed zeros; a bytearray that reused the block was
    overwritten). The data pointer is re-read before every call."""
    if backend == "kernel" and not pagescan.capabilities().pagemap_scan:
        pytest.skip("the kernel backend needs PAGEMAP_SCAN (Linux 6.7)")

    def body() -> bool:
        with anon(2 * slots) as m:
            for i in range(0, 2 * slots, 2):
                m.touch(i)  # one region per page, every other page
            sc = Scanner(category_mask=C.PRESENT, return_mask=C.PRESENT, backend=backend)
            for call in (lambda out: sc.scan_into(m.addr, m.end, out)[0],
                         lambda out: len(scan(m.addr, m.end, category_mask=C.PRESENT, return_mask=C.PRESENT, out=out,
                                              backend=backend))):
                out = np.zeros(slots, PAGE_REGION_DTYPE)
                assert call(out) == slots
                old = out.ctypes.data
                out.__setstate__(np.zeros(slots, PAGE_REGION_DTYPE).__reduce__()[2])
                assert not out["start"].any()
                assert out.ctypes.data != old or slots == 16  # (a copy may get the freed block back)
                assert call(out) == slots
                assert out["start"].tolist() == [m.addr + 2 * i * P for i in range(slots)], "written where out is now"
        return True

    assert run_in_child(body)  # before: heap corruption, the child died
