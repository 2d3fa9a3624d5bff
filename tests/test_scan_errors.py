"""Errors of ``scan()``: every errno of docs/kernel-facts.md and X-11, and bad Python input.

For input the public API can express, pagescan's errno is compared with the raw
ioctl's errno for the same fields. Input it cannot express (``size != 96``, a NULL or
wild ``vec``, an unreadable argument struct) is checked on the raw ioctl only, so the
table of kernel behaviour pagescan relies on stays pinned. Not testable here: ENOMEM
(bounce-buffer allocation) and EINTR (needs a fatal signal pending mid-walk).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import pagescan
from pagescan import PAGE_REGION_DTYPE, Category, KernelFeatureError, Target, scan
from pagescan._uapi import libc, pagemap
from pagescan._uapi.mman import PROT

from . import oracle
from .conftest import arm, requires_pagemap_scan, requires_wp_async
from .memory import P, Mapping, anon, child_process

pytestmark = requires_pagemap_scan

C = Category
WP = int(pagescan.PM_SCAN_WP_MATCHING)
CHK = int(pagescan.PM_SCAN_CHECK_WPASYNC)
TASK_SIZE_4LEVEL = 0x7FFFFFFFF000


def _la57() -> bool:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return "la57" in line.split()
    return False


requires_4level = pytest.mark.skipif(
    os.uname().machine != "x86_64" or _la57(),
    reason=f"the TASK_SIZE rows assume x86-64 4-level paging; this kernel is {os.uname().release}",
)


@pytest.fixture
def m() -> Iterator[Mapping]:
    with anon(8) as mapping:
        mapping.write(0, 8)
        yield mapping


# -- the raw ioctl ----------------------------------------------------------------


def raw_errno(start: int, end: int, **kw: Any) -> int:
    """errno of one PAGEMAP_SCAN ioctl with these fields (0 on success)."""
    return oracle.raw_errno(start, end, **kw)


def scan_errno(start: int, end: int, **kw: Any) -> tuple[int, type]:
    try:
        scan(start, end, **kw)
    except OSError as exc:
        return exc.errno, type(exc)
    return 0, type(None)


# -- docs/kernel-facts.md through scan() and the raw ioctl ------------------------------

# (id, (m -> (start, end)), scan keywords, errno)
CASES: list[tuple[str, Callable[[Mapping], tuple[int, int]], dict[str, int], int]] = [
    ("flags-bit2", lambda m: (m.addr, m.end), {"flags": 4}, errno.EINVAL),
    ("flags-bit63", lambda m: (m.addr, m.end), {"flags": 1 << 63}, errno.EINVAL),
    ("flags-wp-bit2", lambda m: (m.addr, m.end), {"flags": WP | 4}, errno.EINVAL),
    ("inverted-bit9", lambda m: (m.addr, m.end), {"category_inverted": 1 << 9}, errno.EINVAL),
    ("mask-bit9", lambda m: (m.addr, m.end), {"category_mask": 1 << 9}, errno.EINVAL),
    ("anyof-bit9", lambda m: (m.addr, m.end), {"category_anyof_mask": 1 << 9}, errno.EINVAL),
    ("return-bit9", lambda m: (m.addr, m.end), {"return_mask": 1 << 9}, errno.EINVAL),
    ("return-bit63", lambda m: (m.addr, m.end), {"return_mask": 1 << 63}, errno.EINVAL),
    ("unaligned-start", lambda m: (m.addr + 1, m.end), {}, errno.EINVAL),
    ("unaligned-start-2048", lambda m: (m.addr + 2048, m.end), {}, errno.EINVAL),
    ("end-before-start", lambda m: (m[4], m[2]), {}, errno.EFAULT),
    ("end-before-start-by-1", lambda m: (m[4], m[4] - 1), {}, errno.EFAULT),
    ("tagged-bit57", lambda m: (m.addr | 1 << 57, m.end | 1 << 57), {}, errno.EFAULT),
    ("end-u64-max", lambda m: (m.addr, (1 << 64) - 1), {}, errno.EFAULT),
    ("chk-unregistered", lambda m: (m.addr, m.end), {"flags": CHK}, errno.EPERM),
    ("wp-chk-unregistered", lambda m: (m.addr, m.end), {"flags": WP | CHK, "return_mask": 2}, errno.EPERM),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_errno_matches_raw_ioctl(m: Mapping, case: Any) -> None:
    _, rng, kw, expected = case
    start, end = rng(m)
    got, exc_type = scan_errno(start, end, **kw)
    raw = raw_errno(start, end, **kw)
    assert raw == expected, f"raw ioctl gave {errno.errorcode.get(raw, raw)}"
    assert got == expected, f"pagescan gave {errno.errorcode.get(got, got)}"
    assert issubclass(exc_type, OSError)
    assert not issubclass(exc_type, KernelFeatureError)


@requires_4level
def test_end_beyond_task_size(m: Mapping) -> None:
    assert raw_errno(m.addr, 1 << 47) == errno.EFAULT
    assert scan_errno(m.addr, 1 << 47) == (errno.EFAULT, OSError)
    assert scan_errno(m.addr, TASK_SIZE_4LEVEL + 1)[0] == errno.EFAULT
    # TASK_SIZE itself is still user space.
    assert raw_errno(m.addr, TASK_SIZE_4LEVEL, max_pages=1, return_mask=int(C.PRESENT)) == 0
    res = scan(m.addr, TASK_SIZE_4LEVEL, max_pages=1, category_mask=C.PRESENT, return_mask=C.PRESENT)
    assert [(r.start, r.end) for r in res] == [(m[0], m[1])]


def test_unknown_category_bit_is_plain_einval(m: Mapping) -> None:
    for field in ("category_inverted", "category_mask", "category_anyof_mask", "return_mask"):
        with pytest.raises(OSError) as info:
            scan(m.addr, m.end, **{field: 1 << 9})
        assert type(info.value) is OSError, f"{field}: bit 9 is no feature; expected plain OSError"
        assert info.value.errno == errno.EINVAL


def test_every_known_category_and_flag_accepted(m: Mapping) -> None:
    caps = pagescan.capabilities()
    for cat in C:
        assert bool(caps.categories & cat) == (raw_errno(m.addr, m.end, return_mask=int(cat)) == 0)
    for flag in pagescan.ScanFlag:
        assert bool(caps.scan_flags & flag) == (raw_errno(m.addr, m.addr, vec_len=0, flags=int(flag)) == 0)


def test_soft_dirty_request_is_no_error(m: Mapping) -> None:
    caps = pagescan.capabilities()
    assert caps.categories & C.SOFT_DIRTY  # accepted since 6.8 even when compiled out
    res = scan(m.addr, m.end, category_mask=C.SOFT_DIRTY, return_mask=C.SOFT_DIRTY)
    assert res.complete
    if not caps.soft_dirty:
        assert len(res) == 0


# -- raw-only rows ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 88, 95, 97, 104, 192, (1 << 64) - 1])
def test_size_must_be_96(m: Mapping, size: int) -> None:
    assert raw_errno(m.addr, m.end, size=size) == errno.EINVAL
    assert raw_errno(m.addr, m.end, size=96) == 0


def test_vec_null_with_vec_len(m: Mapping) -> None:
    assert raw_errno(m.addr, m.end, vec=0, vec_len=8) == errno.EINVAL
    assert raw_errno(m.addr, m.end, vec=0, vec_len=0) == 0
    # pagescan's vec_len=0 is the valid "NULL, 0" form.
    res = scan(m.addr, m.end, vec_len=0, return_mask=C.PRESENT)
    assert len(res) == 0 and res.complete


@pytest.mark.parametrize("vec", [(1 << 64) - 1, 1 << 47, 0xFFFF800000000000])
def test_vec_outside_user_space(m: Mapping, vec: int) -> None:
    assert raw_errno(m.addr, m.end, vec=vec, vec_len=8, return_mask=int(C.PRESENT)) == errno.EFAULT


def test_argument_struct_unreadable(m: Mapping) -> None:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for bad in (0, 16, P):
            with pytest.raises(OSError) as info:
                libc.ioctl(fd, pagemap.PAGEMAP_SCAN, bad)  # an int is passed as the pointer
            assert info.value.errno == errno.EFAULT
    finally:
        os.close(fd)


def test_validation_order(m: Mapping) -> None:
    """docs/kernel-facts.md checks in order: the first failing check decides the errno."""
    assert raw_errno(m.addr, m.end, size=88, vec=(1 << 64) - 1) == errno.EINVAL  # size before vec
    assert raw_errno(m[4], m[2], flags=4) == errno.EINVAL  # flags before range
    assert raw_errno(m[4], m[2], return_mask=1 << 9) == errno.EINVAL  # categories before range
    assert raw_errno(m.addr + 1, m.addr - P) == errno.EINVAL  # alignment before access_ok
    assert raw_errno(m[4], m[2], vec=0, vec_len=8) == errno.EFAULT  # range before vec NULL
    assert raw_errno(m.addr + 1, m.end, vec=(1 << 64) - 1) == errno.EINVAL  # alignment before vec
    assert raw_errno(m.addr, m.end, vec=0, vec_len=8, flags=4) == errno.EINVAL
    # pagescan reports the same first failure.
    assert scan_errno(m.addr + 1, m.addr - P)[0] == errno.EINVAL
    assert scan_errno(m[4], m[2], flags=4)[0] == errno.EINVAL


@requires_wp_async
def test_failed_validation_has_no_side_effects(uffd_wp: pagescan.Userfaultfd) -> None:
    """Validation errors come before the walk: nothing is write-protected."""
    with anon(4) as mm:
        arm(uffd_wp, mm)
        mm.write(0, 4)
        for kw in ({"flags": WP | CHK | 4}, {"flags": WP | CHK, "return_mask": 1 << 9}):
            with pytest.raises(OSError):
                scan(mm.addr, mm.end, category_mask=C.WRITTEN, **kw)
        assert raw_errno(mm.addr, mm.end, flags=WP | CHK, vec=0, vec_len=8, category_mask=2) == errno.EINVAL
        res = scan(mm.addr, mm.end, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        assert [(r.start, r.end) for r in res] == [(mm.addr, mm.end)]


def test_readonly_vec_efault_after_walk(m: Mapping) -> None:
    """Copy-out EFAULT (runtime): a vec the kernel may not write."""
    with anon(1, prot=PROT.READ) as ro:
        assert raw_errno(m.addr, m.end, vec=ro.addr, vec_len=8, return_mask=int(C.PRESENT)) == errno.EFAULT
        # The empty-range call never copies out, so it succeeds.
        assert raw_errno(m.addr, m.addr, vec=ro.addr, vec_len=8, return_mask=int(C.PRESENT)) == 0


# -- process targets ---------------------------------------------------------------------


def _absent_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    for pid in range(pid_max - 1, pid_max - 1000, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid near pid_max")


def test_pid_that_does_not_exist(m: Mapping) -> None:
    pid = _absent_pid()
    with pytest.raises(ProcessLookupError) as info:
        scan(m.addr, m.end, pid=pid)
    assert info.value.errno == errno.ESRCH
    with pytest.raises(ProcessLookupError):
        Target(pid)


def test_pid_we_may_not_trace() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            answer: dict[str, Any] = {}
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                for name, call in (("scan", lambda: scan(0, P, pid=1)), ("Target", lambda: Target(1))):
                    try:
                        call()
                        answer[name] = ["none", 0]
                    except BaseException as exc:  # noqa: BLE001
                        answer[name] = [type(exc).__name__, getattr(exc, "errno", None)]
            except BaseException as exc:  # noqa: BLE001
                answer["setup"] = repr(exc)
            os.write(w, json.dumps(answer).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = b""
        for _ in range(100):
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    answer = json.loads(data)
    assert "setup" not in answer, answer
    for name in ("scan", "Target"):
        exc_name, err = answer[name]
        assert exc_name == "PermissionError", answer
        assert err in (errno.EACCES, errno.EPERM), answer


@pytest.mark.parametrize("backend", ["kernel", "emulated"])
def test_closed_target(m: Mapping, backend: str) -> None:
    """Every way of scanning a closed Target says so (before: fcntl's "file descriptor
    cannot be a negative integer (-1)"), also through a Scanner made before the close."""
    if backend == "kernel" and not pagescan.capabilities().pagemap_scan:
        pytest.skip("the kernel backend needs PAGEMAP_SCAN (Linux 6.7)")
    t = Target()
    sc = pagescan.Scanner(t, return_mask=Category.PRESENT, backend=backend)
    out = np.zeros(4, PAGE_REGION_DTYPE)
    assert sc.scan_into(m.addr, m.end, out)[1] == m.end
    t.close()
    assert t.closed
    calls = {
        "scan": lambda: scan(m.addr, m.end, pid=t, backend=backend),
        "scan out=": lambda: scan(m.addr, m.end, pid=t, out=out, backend=backend),
        "scan chunked": lambda: scan(0, 1 << 47, pid=t, backend=backend),
        "scan_iter": lambda: list(pagescan.scan_iter(m.addr, m.end, pid=t, backend=backend)),
        "Scanner.scan": lambda: sc.scan(m.addr, m.end),
        "Scanner.scan_into": lambda: sc.scan_into(m.addr, m.end, out),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="closed pagescan.Target"):
            call()
            pytest.fail(name)
    with pytest.raises(ValueError, match="closed pagescan.Target"):
        t.fd
    t.close()  # idempotent


class _HasPid:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def test_pid_forms_agree(m: Mapping) -> None:
    with anon(8) as mm:
        with child_process(lambda: mm.touch(2, 3)) as pid:
            kw = dict(category_mask=C.PRESENT, return_mask=C.PRESENT)
            expect = [(mm[2], mm[5], C.PRESENT)]
            assert list(scan(mm.addr, mm.end, pid=pid, **kw)) == expect
            assert list(scan(mm.addr, mm.end, pid=_HasPid(pid), **kw)) == expect
            with Target(pid) as t:
                assert list(scan(mm.addr, mm.end, pid=t, **kw)) == expect
                assert list(scan(mm.addr, mm.end, pid=t, **kw)) == expect  # fd reused
                assert not t.closed
            # Our own view: untouched.
            assert list(scan(mm.addr, mm.end, **kw)) == []
            assert list(scan(mm.addr, mm.end, pid=os.getpid(), **kw)) == []
            assert list(scan(mm.addr, mm.end, pid=_HasPid(os.getpid()), **kw)) == []


def test_scan_on_alternating_targets(m: Mapping) -> None:
    """``scan(pid=Target)`` runs one cached prepared Scanner for every Target (what
    ``pagescan ps`` does over all processes): each call scans its own target, with or
    without ``out``."""
    with anon(8) as mm, child_process(lambda: mm.touch(2, 3)) as one, child_process(lambda: mm.touch(6, 1)) as two:
        kw = dict(category_mask=C.PRESENT, return_mask=C.PRESENT)
        out = np.empty(4, PAGE_REGION_DTYPE)
        with Target(one) as a, Target(two) as b:
            for _ in range(2):
                assert list(scan(mm.addr, mm.end, pid=a, out=out, **kw)) == [(mm[2], mm[5], C.PRESENT)]
                assert list(scan(mm.addr, mm.end, pid=b, out=out, **kw)) == [(mm[6], mm[7], C.PRESENT)]
                assert list(scan(mm.addr, mm.end, pid=a, **kw)) == [(mm[2], mm[5], C.PRESENT)]
                assert list(scan(mm.addr, mm.end, **kw)) == []  # this process: untouched


def test_pid_is_a_popen(m: Mapping) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(f"/proc/{proc.pid}/maps") as f:
            stack = next(line for line in f if line.rstrip().endswith("[stack]"))
        lo, hi = (int(x, 16) for x in stack.split()[0].split("-"))
        res = scan(lo, hi, pid=proc, category_mask=C.PRESENT, return_mask=C.PRESENT)
        assert len(res) >= 1 and res.complete
        assert res.regions["end"][-1] == hi  # the top of the stack is in use
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("bad", [True, False, "1", 1.0, 0, -1, b"1"])
def test_bad_pid_values(m: Mapping, bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        scan(m.addr, m.end, pid=bad)
    if isinstance(bad, int) and not isinstance(bad, bool):
        assert info.type is ValueError
    else:
        assert info.type is TypeError


# -- bad Python arguments ----------------------------------------------------------------

INT_ARGS = ("flags", "category_inverted", "category_mask", "category_anyof_mask", "return_mask", "max_pages")


@pytest.mark.parametrize("bad", [1.5, "4096", None, 4096.0, [0], np.float64(4096)])
def test_non_int_addresses(m: Mapping, bad: Any) -> None:
    with pytest.raises(TypeError):
        scan(bad, m.end)
    if bad is not None:  # end=None means "start is a buffer"
        with pytest.raises(TypeError):
            scan(m.addr, bad)


@pytest.mark.parametrize("name", INT_ARGS + ("vec_len",))
@pytest.mark.parametrize("bad", [1.0, "1", object()])
def test_non_int_keywords(m: Mapping, name: str, bad: Any) -> None:
    with pytest.raises(TypeError):
        scan(m.addr, m.end, **{name: bad})


@pytest.mark.parametrize("name", ("start", "end") + INT_ARGS + ("vec_len",))
def test_negative_and_too_wide(m: Mapping, name: str) -> None:
    def call(value: int) -> None:
        kw: dict[str, Any] = {"start": m.addr, "end": m.end}
        kw[name] = value
        scan(kw.pop("start"), kw.pop("end"), **kw)

    for value in (-1, -P, -(1 << 64), 1 << 64, 1 << 65, 1 << 200):
        with pytest.raises(ValueError):
            call(value)
    with pytest.raises(ValueError):
        call(np.int64(-1))


def test_bools_behave_as_the_ints_they_are(m: Mapping) -> None:
    """A Python bool is an int (Python's own convention): True means 1, False 0, on every
    integer argument, with the same result or the same errno as the int; numpy's
    ``np.bool_`` is not an integer type and is a TypeError."""

    def outcome(kw: dict[str, Any]) -> Any:
        kw = dict(kw)
        try:
            res = scan(kw.pop("start"), kw.pop("end"), **kw)
        except OSError as exc:
            return ("errno", exc.errno)
        return ("ok", res.regions.tolist(), res.walk_end)

    for name in ("start", "end") + INT_ARGS + ("vec_len",):
        for value in (True, False):
            base: dict[str, Any] = {"start": m.addr, "end": m.end}
            as_bool = dict(base, **{name: value})
            as_int = dict(base, **{name: int(value)})
            assert outcome(as_bool) == outcome(as_int), name
        with pytest.raises(TypeError):
            kw: dict[str, Any] = {"start": m.addr, "end": m.end, name: np.bool_(True)}
            scan(kw.pop("start"), kw.pop("end"), **kw)


@pytest.mark.parametrize("typ", [np.uint64, np.int64, np.uint32, np.int32, np.uint8, np.intp])
def test_numpy_integers_accepted(m: Mapping, typ: Any) -> None:
    expect = scan(m.addr, m.end, category_mask=C.PRESENT, return_mask=C.PRESENT, max_pages=5, vec_len=3)
    if np.iinfo(typ).max < m.end:
        res = scan(m.addr, m.end, category_mask=typ(C.PRESENT), return_mask=typ(C.PRESENT),
                   max_pages=typ(5), vec_len=typ(3))
    else:
        res = scan(typ(m.addr), typ(m.end), flags=typ(0), category_mask=typ(C.PRESENT),
                   return_mask=typ(C.PRESENT), max_pages=typ(5), vec_len=typ(3))
    assert np.array_equal(res.regions, expect.regions)
    assert res.walk_end == expect.walk_end == m[5]
    assert type(res.walk_end) is int


def test_u64_max_values_pass_python_checks(m: Mapping) -> None:
    # Largest legal Python value: the kernel decides (here: unknown bits, EINVAL).
    with pytest.raises(OSError) as info:
        scan(m.addr, m.end, return_mask=(1 << 64) - 1)
    assert info.value.errno == errno.EINVAL
    res = scan(m.addr, m.end, max_pages=(1 << 64) - 1, return_mask=C.PRESENT)
    assert res.complete and res.pages == 8


def test_empty_and_equal_range(m: Mapping) -> None:
    res = scan(m.addr, m.addr, return_mask=C.PRESENT)
    assert len(res) == 0 and res.complete and res.walk_end == m.addr


# -- out= ----------------------------------------------------------------------------------


def test_out_is_validated(m: Mapping) -> None:
    kw = dict(category_mask=C.PRESENT, return_mask=C.PRESENT)
    bad_dtype = np.zeros(8, dtype=[("start", "<u8"), ("end", "<u8"), ("categories", "<u4")])
    with pytest.raises(ValueError):
        scan(m.addr, m.end, out=bad_dtype, **kw)
    with pytest.raises(ValueError):
        scan(m.addr, m.end, out=np.zeros(24, np.uint64), **kw)
    with pytest.raises(ValueError):
        scan(m.addr, m.end, out=np.zeros(16, PAGE_REGION_DTYPE)[::2], **kw)
    ro = np.zeros(8, PAGE_REGION_DTYPE)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        scan(m.addr, m.end, out=ro, **kw)
    with pytest.raises(ValueError):
        scan(m.addr, m.end, out=np.zeros(4, PAGE_REGION_DTYPE), vec_len=8, **kw)  # vec_len beyond out
    for shape in ((4, 0), (2, 3), (0, 4)):  # 2-D: the kernel would write len(out) regions
        with pytest.raises(ValueError, match="1-D"):
            scan(m.addr, m.end, out=np.zeros(shape, PAGE_REGION_DTYPE), **kw)
    with pytest.raises(TypeError, match="numpy array"):
        scan(m.addr, m.end, out=[], **kw)  # type: ignore[arg-type]
    # vec_len below len(out) bounds the call, as the kernel's vec_len does.
    small = scan(m.addr, m.end, out=np.zeros(8, PAGE_REGION_DTYPE), vec_len=1, category_anyof_mask=C.PRESENT,
                 return_mask=C.PRESENT | C.WRITTEN)
    assert len(small) <= 1
    assert ro.tobytes() == bytes(ro.nbytes)  # the kernel never wrote into it


def test_out_receives_regions(m: Mapping) -> None:
    m.madvise(pagescan.MADV.DONTNEED, 2, 1)
    m.madvise(pagescan.MADV.DONTNEED, 5, 1)
    kw = dict(category_mask=C.PRESENT, return_mask=C.PRESENT)
    out = np.zeros(8, PAGE_REGION_DTYPE)
    res = scan(m.addr, m.end, out=out, **kw)
    assert len(res) == 3 and res.complete
    assert res.regions.__array_interface__["data"][0] == out.ctypes.data
    assert np.shares_memory(res.regions, out)
    assert out[0]["start"] == m[0] and out[2]["end"] == m[8]
    out[1]["categories"] = 99
    assert res.regions[1]["categories"] == 99  # a view, not a copy
    # len(out) is the vec_len.
    small = np.zeros(2, PAGE_REGION_DTYPE)
    res = scan(m.addr, m.end, out=small, vec_len=2, **kw)
    assert len(res) == 2 and res.walk_end == m[6] and not res.complete  # next unreported run
    assert np.shares_memory(res.regions, small)
    res = scan(m.addr, m.end, out=np.zeros(0, PAGE_REGION_DTYPE), **kw)
    assert len(res) == 0 and res.complete
