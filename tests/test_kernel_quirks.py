"""The fifteen extra kernel cases X-01..X-15 (the kernel selftest catalogue (``tools/testing/selftests/mm/pagemap_ioctl.c`` and ``uffd-unit-tests.c``) Part 5).

Each test rebuilds the case's setup on real memory and asserts the observed values
given in the spec, through ``scan()`` on the kernel backend. Where the public API cannot
express the input (a read-only output vector, the raw ``walk_end`` on failure) the test
calls the ``PAGEMAP_SCAN`` ioctl itself. X-14 (UFFDIO_MOVE) is covered by the
userfaultfd tests, not here.

Category values in comments are hex of ``Category``: 0x1 WPALLOWED, 0x2 WRITTEN,
0x4 FILE, 0x8 PRESENT, 0x10 SWAPPED, 0x20 PFNZERO, 0x40 HUGE, 0x100 GUARD.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import pagescan
from pagescan import Category, RegisterMode, Userfaultfd, scan, scan_iter
from pagescan._uapi import libc
from pagescan._uapi.mman import MADV, MAP, PROT

from . import oracle
from .conftest import arm, requires_guard, requires_pagemap_scan, requires_thp, requires_wp_async
from .memory import P, Mapping, anon, child_process, file_mapping, hugetlb_anon, is_thp, shared_anon, thp
from .procs import run_in_child

pytestmark = [requires_pagemap_scan, requires_wp_async]

C = Category
ALL = int(pagescan.capabilities().categories)
WP = int(pagescan.PM_SCAN_WP_MATCHING)
CHK = int(pagescan.PM_SCAN_CHECK_WPASYNC)
WR = int(C.WRITTEN)


# -- helpers -------------------------------------------------------------------------


def regions(res: Any, base: int, page: int = P) -> list[tuple[int, int, int]]:
    """``[(first page, end page, categories)]`` relative to ``base``."""
    return [((s - base) // page, (e - base) // page, int(c)) for s, e, c in res.regions.tolist()]


def view(m: Mapping, ret: int = ALL, **kw: Any) -> list[tuple[int, int, int]]:
    """Every page of ``m`` with ``ret`` categories, as page-relative regions."""
    return regions(scan(m.addr, m.end, return_mask=ret, **kw), m.addr)


class Raw:
    """Result of one raw PAGEMAP_SCAN ioctl."""

    def __init__(self, ret: int, err: int, walk_end: int, vec: np.ndarray | None) -> None:
        self.ret, self.err, self.walk_end, self.vec = ret, err, walk_end, vec


def raw_scan(
    start: int,
    end: int,
    *,
    fd: int | None = None,
    flags: int = 0,
    vec_len: int = 0,
    vec_addr: int | None = None,
    max_pages: int = 0,
    inv: int = 0,
    req: int = 0,
    anyof: int = 0,
    ret: int = 0,
    walk_end: int = 0,
) -> Raw:
    """The ioctl itself (:func:`tests.oracle.raw_scan`), on our own pagemap unless ``fd`` is given."""
    r = oracle.raw_scan(start, end, fd=fd, flags=flags, vec=vec_addr, vec_len=vec_len, max_pages=max_pages,
                        category_inverted=inv, category_mask=req, category_anyof_mask=anyof, return_mask=ret,
                        walk_end=walk_end)
    return Raw(r.ret, r.err, r.walk_end, r.regions)


def vma_starts() -> set[int]:
    with open("/proc/self/maps") as f:
        return {int(line.split("-", 1)[0], 16) for line in f}


# -- X-01 ----------------------------------------------------------------------------


@pytest.fixture
def alternating_4000() -> Iterator[Mapping]:
    """4000 anonymous pages, every other one written: 2000 present runs."""
    with anon(4000) as m:
        for i in range(0, 4000, 2):
            ctypes.memset(m[i], 1, 1)
        yield m


def test_x01_pagescan_corrects_stale_walk_end(alternating_4000: Mapping) -> None:
    m = alternating_4000
    kw = dict(category_mask=C.PRESENT, return_mask=C.PRESENT)
    for vec_len in (4096, 2000, None):
        res = scan(m.addr, m.end, vec_len=vec_len, **kw)
        assert len(res) == 2000
        assert res.walk_end == m.end and res.complete
        assert regions(res, m.addr)[-1] == (3998, 3999, int(C.PRESENT))
    # Genuine early stops are kept as the kernel reports them.
    res = scan(m.addr, m.end, vec_len=1999, **kw)
    assert len(res) == 1999 and res.walk_end == m[3998] and not res.complete
    res = scan(m.addr, m.end, vec_len=513, **kw)
    assert len(res) == 513 and res.walk_end == m[1026] and not res.complete
    res = scan(m.addr, m.end, max_pages=700, **kw)
    assert len(res) == 700 and res.walk_end == m[1400] and not res.complete
    # Resuming never reports a region twice.
    parts = list(scan_iter(m.addr, m.end, vec_len=1500, **kw))
    assert np.array_equal(np.concatenate([p.regions for p in parts]), scan(m.addr, m.end, **kw).regions)
    assert parts[-1].complete and parts[-1].walk_end == m.end


@requires_wp_async
def test_x01_stale_walk_end_under_wp_matching(uffd_wp: Userfaultfd) -> None:
    """X-01 with PM_SCAN_WP_MATCHING (a get+WP of many written pages, the tracking's
    hot call): the stale value is found at the last 512-region boundary, on every entry
    point (a result's own buffer, a Scanner's ``out``, which WriteWatch uses, an ``out``
    that is an ndarray subclass), and every page reported is re-armed."""
    n = 6000
    with anon(n) as m:
        m.write(0, n)
        arm(uffd_wp, m)
        kw = dict(flags=WP | CHK, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        sc = pagescan.Scanner(**kw)
        out = np.zeros(4096, pagescan.PAGE_REGION_DTYPE)
        masked = np.ma.MaskedArray(np.zeros(4096, pagescan.PAGE_REGION_DTYPE))  # an ndarray subclass
        for written, how in ((1300, "scan"), (2000, "vec_len"), (3000, "Scanner.scan"), (2600, "scan_into"),
                             (2200, "scan_into, MaskedArray"), (1800, "scan(out=MaskedArray)")):
            for i in range(0, 2 * written, 2):
                ctypes.memset(m[i], 1, 1)
            raw = raw_scan(m.addr, m.end, vec_len=4096, req=WR, ret=WR) if how == "scan" else None
            if raw is not None:  # the kernel's own answer is stale (no WP: nothing re-armed)
                assert raw.ret == written and raw.walk_end == m[2 * ((written - 1) // 512 * 512)]
            if how == "scan":
                res = scan(m.addr, m.end, **kw)
                got, walk_end = res.regions, res.walk_end
            elif how == "vec_len":
                res = scan(m.addr, m.end, vec_len=written + 7, **kw)
                got, walk_end = res.regions, res.walk_end
            elif how == "Scanner.scan":
                res = sc.scan(m.addr, m.end)
                got, walk_end = res.regions, res.walk_end
            elif how == "scan_into":
                k, walk_end = sc.scan_into(m.addr, m.end, out)
                got = out[:k]
            elif how == "scan_into, MaskedArray":
                k, walk_end = sc.scan_into(m.addr, m.end, masked)
                got = np.asarray(masked)[:k]
            else:
                res = scan(m.addr, m.end, out=masked, **kw)
                got, walk_end = np.asarray(res.regions), res.walk_end
            assert walk_end == m.end, how
            assert [(int(s), int(e)) for s, e, _ in got.tolist()] == [(m[i], m[i + 1]) for i in range(0, 2 * written, 2)]
            assert view(m, WR, category_mask=C.WRITTEN) == []  # all re-armed
        sc.close()


def test_x01_kernel_bug_raw_walk_end(alternating_4000: Mapping) -> None:
    """Pins the kernel bug itself: if this fails, a kernel fixed X-01."""
    m = alternating_4000
    for vec_len in (4096, 2000):
        raw = raw_scan(m.addr, m.end, vec_len=vec_len, req=int(C.PRESENT), ret=int(C.PRESENT))
        assert raw.err == 0 and raw.ret == 2000
        assert raw.walk_end == m.addr + 3072 * P, "kernel no longer leaves walk_end stale (X-01 fixed?)"
        assert int(raw.vec["end"][-1]) == m[3999]
    raw = raw_scan(m.addr, m.end, vec_len=1999, req=int(C.PRESENT), ret=int(C.PRESENT))
    assert (raw.ret, raw.walk_end) == (1999, m[3998])


# -- X-02 ----------------------------------------------------------------------------


def test_x02_regions_merge_across_vmas(uffd_wp: Userfaultfd) -> None:
    with anon(8) as m:
        m.write(0, 8)
        m.mprotect(PROT.READ, 4, 4)
        assert m[4] in vma_starts(), "mprotect should have split the VMA"
        assert view(m, int(C.PRESENT | C.WRITTEN), category_mask=C.PRESENT, vec_len=8) == [(0, 8, 0xA)]
        uffd_wp.register(m[4], 4 * P, RegisterMode.WP)
        # WPALLOWED differs, so the region splits; outside the uffd VMA pages are WRITTEN.
        assert view(m) == [(0, 4, 0xA), (4, 8, 0xB)]
        # Bits outside return_mask never split a region.
        assert view(m, int(C.PRESENT)) == [(0, 8, 0x8)]
        # An unmapped gap ends a run and is not reported.
        libc.munmap(m[2], P)
        assert view(m, int(C.PRESENT)) == [(0, 2, 0x8), (3, 8, 0x8)]
        assert view(m) == [(0, 2, 0xA), (3, 4, 0xA), (4, 8, 0xB)]


# -- X-03 ----------------------------------------------------------------------------


def test_x03_return_mask_zero(uffd_wp: Userfaultfd) -> None:
    with anon(8) as m:
        arm(uffd_wp, m)
        m.touch(0, 2)
        m.touch(3)
        res = scan(m.addr, m.end, category_mask=C.WRITTEN, return_mask=0, vec_len=8)
        assert regions(res, m.addr) == [(0, 2, 0), (3, 4, 0)]
        assert res.complete
        # With WP the matched pages are still re-armed.
        res = scan(m.addr, m.end, flags=WP, category_mask=C.WRITTEN, return_mask=0, vec_len=8)
        assert regions(res, m.addr) == [(0, 2, 0), (3, 4, 0)]
        assert view(m, WR, category_mask=C.WRITTEN) == []
        assert view(m) == [(0, 2, 0x9), (2, 3, 0x11), (3, 4, 0x9), (4, 8, 0x11)]


# -- X-04 ----------------------------------------------------------------------------


def test_x04_inverted_selects_unregistered_vmas(uffd_wp: Userfaultfd) -> None:
    with anon(12) as m:
        m.write(0, 12)
        uffd_wp.register(m.addr, 4 * P, RegisterMode.WP)
        assert view(m) == [(0, 4, 0xB), (4, 12, 0xA)]
        res = scan(m.addr, m.end, category_inverted=C.WPALLOWED, category_mask=C.WPALLOWED, return_mask=ALL)
        assert regions(res, m.addr) == [(4, 12, 0xA)]


def test_x04_anyof_is_tested_after_the_xor() -> None:
    with anon(8) as m:
        m.write(0, 8)
        m.madvise(MADV.DONTNEED, 2, 1)
        m.madvise(MADV.DONTNEED, 5, 1)
        everything = view(m)
        assert everything == [(0, 2, 0xA), (2, 3, 0x2), (3, 5, 0xA), (5, 6, 0x2), (6, 8, 0xA)]
        both = int(C.PRESENT | C.SWAPPED)
        # No page is both PRESENT and SWAPPED, so after inverting both every page matches;
        # the reported categories are the raw ones.
        assert view(m, category_inverted=both, category_anyof_mask=both) == everything
        assert view(m, category_anyof_mask=both) == [(0, 2, 0xA), (3, 5, 0xA), (6, 8, 0xA)]


def test_x04_fast_and_generic_paths_agree(uffd_wp: Userfaultfd) -> None:
    with anon(32) as m:
        m.write(0, 20)
        arm(uffd_wp, m)
        for i in (0, 1, 2, 7, 9, 10, 20, 31):
            m.touch(i)
        m.madvise(MADV.DONTNEED, 15, 3)
        fast = view(m, WR, category_mask=C.WRITTEN)
        generic = view(m, WR, category_mask=C.WRITTEN, category_anyof_mask=C.WRITTEN)
        generic2 = view(m, WR, category_mask=C.WRITTEN | C.WPALLOWED)
        expect = [(0, 3, 2), (7, 8, 2), (9, 11, 2), (15, 18, 2), (20, 21, 2), (31, 32, 2)]
        assert fast == generic == generic2 == expect


# -- X-05 ----------------------------------------------------------------------------


def test_x05_vec_len_zero_wp_ignores_masks_and_max_pages(uffd_wp: Userfaultfd) -> None:
    with anon(8) as m, anon(8) as m2:
        for mm in (m, m2):
            mm.write(0, 8)
            arm(uffd_wp, mm)
            mm.write(0, 8)
            assert view(mm, WR, category_mask=C.WRITTEN) == [(0, 8, 2)]
        kw = dict(flags=WP | CHK, max_pages=1, category_mask=C.FILE, return_mask=C.FILE)
        # vec_len 8: nothing is FILE, nothing is protected.
        res = scan(m2.addr, m2.end, vec_len=8, **kw)
        assert len(res) == 0 and res.complete
        assert view(m2, WR, category_mask=C.WRITTEN) == [(0, 8, 2)]
        # vec_len 0: every page is protected even though none is FILE and max_pages is 1.
        res = scan(m.addr, m.end, vec_len=0, **kw)
        assert len(res) == 0 and res.walk_end == m.end and res.complete
        assert view(m, WR, category_mask=C.WRITTEN) == []
        assert view(m) == [(0, 8, 0x9)]
        raw = raw_scan(m2.addr, m2.end, vec_len=0, flags=WP | CHK, max_pages=1, req=int(C.FILE), ret=int(C.FILE))
        assert (raw.err, raw.ret, raw.walk_end) == (0, 0, m2.end)
        assert view(m2) == [(0, 8, 0x9)]


# -- X-06 ----------------------------------------------------------------------------


def test_x06a_readonly_vec_faults_after_rearming(uffd_wp: Userfaultfd) -> None:
    with anon(8) as m, anon(1, prot=PROT.READ) as ro:
        arm(uffd_wp, m)
        m.write(0, 8)
        assert view(m) == [(0, 8, 0xB)]
        raw = raw_scan(m.addr, m.end, vec_addr=ro.addr, vec_len=8, flags=WP | CHK, req=WR, ret=WR)
        assert raw.err == errno.EFAULT
        assert raw.walk_end == m.end  # written back despite the failure
        # The dirty state is lost: every page was re-armed.
        assert view(m) == [(0, 8, 0x9)]


def test_x06b_chk_over_mixed_range_resets_then_fails(uffd_wp: Userfaultfd) -> None:
    with anon(8) as m:
        m.write(0, 8)
        arm(uffd_wp, m, 0, 4)
        m.write(0, 8)
        assert view(m) == [(0, 4, 0xB), (4, 8, 0xA)]
        with pytest.raises(PermissionError) as info:
            scan(m.addr, m.end, flags=WP | CHK, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        assert info.value.errno == errno.EPERM
        assert view(m) == [(0, 4, 0x9), (4, 8, 0xA)]  # the registered part was already reset
        m.write(0, 8)
        raw = raw_scan(m.addr, m.end, vec_len=8, flags=WP | CHK, req=WR, ret=WR)
        assert raw.err == errno.EPERM and raw.walk_end == m.end
        assert view(m) == [(0, 4, 0x9), (4, 8, 0xA)]


def test_x06cd_chk_without_wp_and_wp_without_chk(uffd_wp: Userfaultfd) -> None:
    with anon(8) as m:
        m.write(0, 8)
        arm(uffd_wp, m, 0, 4)
        m.write(0, 8)
        with pytest.raises(PermissionError) as info:
            scan(m[4], m.end, flags=CHK, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        assert info.value.errno == errno.EPERM
        with pytest.raises(PermissionError):
            scan(m.addr, m.end, flags=CHK, return_mask=C.WRITTEN)
        # WP alone skips the unregistered VMA silently: not protected, not even reported.
        res = scan(m.addr, m.end, flags=WP, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        assert res.complete and res.walk_end == m.end
        assert regions(res, m.addr) == [(0, 4, 2)]
        assert view(m) == [(0, 4, 0x9), (4, 8, 0xA)]


# -- X-07 ----------------------------------------------------------------------------


@requires_thp
def test_x07_max_pages_inside_thp_without_wp() -> None:
    with thp() as m:
        assert is_thp(m), "no PMD-mapped THP formed (MADV_HUGEPAGE and MADV_COLLAPSE failed)"
        res = scan(m.addr, m.end, vec_len=16, max_pages=1, return_mask=ALL)
        assert regions(res, m.addr) == [(0, 1, int(C.HUGE | C.PRESENT | C.WRITTEN))]
        assert res.walk_end == m[1] and not res.complete
        res = scan(m[100], m[200], return_mask=ALL)
        assert regions(res, m.addr) == [(100, 200, 0x4A)]
        assert is_thp(m), "a scan without WP must not split the THP"


@requires_thp
def test_x07_max_pages_inside_thp_with_wp(uffd_wp: Userfaultfd) -> None:
    with thp() as m:
        assert is_thp(m)
        uffd_wp.register(m.addr, m.length, RegisterMode.WP)
        assert view(m) == [(0, 512, 0x4B)]
        res = scan(m.addr, m.end, vec_len=16, flags=WP | CHK, max_pages=1,
                   category_mask=C.WRITTEN, return_mask=C.WRITTEN | C.HUGE)
        assert regions(res, m.addr) == [(0, 1, WR)]  # split: HUGE is gone
        assert res.walk_end == m[1] and not res.complete
        assert view(m) == [(0, 1, 0x9), (1, 512, 0xB)]


@requires_thp
def test_x07_full_thp_wp_stays_pmd_until_first_write(uffd_wp: Userfaultfd) -> None:
    with thp() as m:
        assert is_thp(m)
        uffd_wp.register(m.addr, m.length, RegisterMode.WP)
        res = scan(m.addr, m.end, flags=WP | CHK, category_mask=C.WRITTEN, return_mask=C.WRITTEN | C.HUGE)
        assert regions(res, m.addr) == [(0, 512, 0x42)]
        assert view(m) == [(0, 512, 0x49)]
        assert is_thp(m)
        m.touch(5)
        assert view(m) == [(0, 5, 0x9), (5, 6, 0xB), (6, 512, 0x9)]


# -- X-08 ----------------------------------------------------------------------------


def test_x08_hugetlb_wp_cannot_be_partial(hugetlb_2m: int, uffd_wp: Userfaultfd) -> None:
    with hugetlb_anon(3) as m:
        assert view(m) == [(0, 1536, 0x40)]  # unpopulated hugetlb: HUGE only, not WRITTEN
        uffd_wp.register(m.addr, m.length, RegisterMode.WP)
        assert view(m) == [(0, 1536, 0x41)]
        m.touch(0)
        m.touch(512)
        assert view(m) == [(0, 1024, 0x4B), (1024, 1536, 0x41)]
        res = scan(m.addr, m.end, vec_len=16, flags=WP | CHK, max_pages=522,
                   category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        assert regions(res, m.addr) == [(0, 512, WR)]
        assert res.walk_end == m[512] and not res.complete
        # The second huge page was backed out: not reported, not protected.
        assert view(m) == [(0, 512, 0x49), (512, 1024, 0x4B), (1024, 1536, 0x41)]
        # WP over half a huge page: nothing, and no progress.
        res = scan(m[512], m[768], vec_len=16, flags=WP | CHK, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        assert len(res) == 0 and res.walk_end == m[512] and not res.complete
        assert view(m) == [(0, 512, 0x49), (512, 1024, 0x4B), (1024, 1536, 0x41)]
        # Without WP the same half range is reported.
        res = scan(m[512], m[768], category_mask=C.WRITTEN, return_mask=C.WRITTEN | C.HUGE)
        assert regions(res, m.addr) == [(512, 768, 0x42)] and res.complete


# -- X-09 ----------------------------------------------------------------------------


def test_x09_unpopulated_marker_reads_swapped(uffd_wp: Userfaultfd) -> None:
    with anon(4) as m:
        arm(uffd_wp, m)
        assert view(m) == [(0, 4, 0x11)]
        assert view(m, int(C.SWAPPED), category_mask=C.SWAPPED) == [(0, 4, 0x10)]


def test_x09_dontneed_anon_drops_marker(uffd_wp: Userfaultfd) -> None:
    with anon(4) as m:
        m.write(0, 2)
        arm(uffd_wp, m)
        assert view(m) == [(0, 2, 0x9), (2, 4, 0x11)]
        m.madvise(MADV.DONTNEED, 1, 1)
        m.madvise(MADV.DONTNEED, 3, 1)
        assert view(m) == [(0, 1, 0x9), (1, 2, 0x3), (2, 3, 0x11), (3, 4, 0x3)]
        fast = view(m, WR, category_mask=C.WRITTEN)
        generic = view(m, WR, category_mask=C.WRITTEN, category_anyof_mask=C.WRITTEN | C.PRESENT)
        assert fast == generic == [(1, 2, 2), (3, 4, 2)]


def test_x09_dontneed_shmem_keeps_marker_of_protected_page(uffd_wp: Userfaultfd) -> None:
    with shared_anon(4) as m:
        m.write(0, 4)
        arm(uffd_wp, m)
        m.touch(1)
        assert view(m) == [(0, 1, 0xD), (1, 2, 0xF), (2, 4, 0xD)]
        m.madvise(MADV.DONTNEED, 0, 2)
        assert view(m) == [(0, 1, 0x11), (1, 2, 0x3), (2, 4, 0xD)]


def test_x09_zero_page() -> None:
    with anon(2, prot=PROT.READ) as m:
        m.read(0, 2)
        assert view(m) == [(0, 2, 0x2A)]


# -- X-10 ----------------------------------------------------------------------------


def _guarded(uf: Userfaultfd) -> Mapping:
    m = anon(10)
    arm(uf, m)
    m.write(0, 10)
    for i in range(0, 10, 2):
        m.madvise(MADV.GUARD_INSTALL, i, 1)
    return m


@requires_guard
def test_x10_guard_regions_count_as_written(uffd_wp: Userfaultfd) -> None:
    with _guarded(uffd_wp) as m:
        assert view(m) == [(i, i + 1, 0x113 if i % 2 == 0 else 0xB) for i in range(10)]
        res = scan(m.addr, m.end, flags=WP | CHK, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        assert regions(res, m.addr) == [(0, 10, 2)]
        assert view(m) == [(i, i + 1, 0x111 if i % 2 == 0 else 0x9) for i in range(10)]

        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(r)
                faulthandler.disable()
                m.read_byte(4)
                os.write(w, b"read")
            finally:
                os._exit(0)
        os.close(w)
        try:
            _, status = os.waitpid(pid, 0)
            assert os.read(r, 16) == b""
        finally:
            os.close(r)
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "reading a guard page must kill the reader"


@requires_guard
def test_x10_dirty_tracker_excludes_guards(uffd_wp: Userfaultfd) -> None:
    with _guarded(uffd_wp) as m:
        res = scan(m.addr, m.end, flags=WP | CHK, category_inverted=C.GUARD,
                   category_mask=C.WRITTEN | C.GUARD, return_mask=C.WRITTEN)
        assert regions(res, m.addr) == [(i, i + 1, 2) for i in range(1, 10, 2)]
        assert view(m) == [(i, i + 1, 0x113 if i % 2 == 0 else 0x9) for i in range(10)]


# -- X-11 (the non-error rows; errnos are in test_scan_errors.py) --------------------


def test_x11_one_byte_range_rounds_up() -> None:
    with anon(2) as m:
        m.touch(0, 2)
        res = scan(m.addr, m.addr + 1, return_mask=C.PRESENT)
        assert regions(res, m.addr) == [(0, 1, 0x8)]
        assert res.walk_end == m[1] and res.complete


def test_x11_soft_dirty_request_without_soft_dirty() -> None:
    caps = pagescan.capabilities()
    if caps.soft_dirty:
        pytest.skip(f"this kernel ({os.uname().release}) has CONFIG_MEM_SOFT_DIRTY; the row is about it compiled out")
    with anon(4) as m:
        m.write(0, 4)
        res = scan(m.addr, m.end, category_mask=C.SOFT_DIRTY, return_mask=ALL)
        assert len(res) == 0 and res.complete


# -- X-12 ----------------------------------------------------------------------------


def test_x12_scan_another_process() -> None:
    with anon(8) as m:
        with child_process(lambda: (m.touch(1), m.touch(3, 2))) as pid:
            res = scan(m.addr, m.end, pid=pid, category_mask=C.PRESENT, return_mask=C.PRESENT | C.WRITTEN)
            assert regions(res, m.addr) == [(1, 2, 0xA), (3, 5, 0xA)]
            assert view(m, int(C.PRESENT), category_mask=C.PRESENT) == []  # ours are untouched
            with pytest.raises(PermissionError) as info:
                scan(m.addr, m.end, pid=pid, flags=WP | CHK, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
            assert info.value.errno == errno.EPERM


def test_x12_target_died() -> None:
    with anon(4) as m:
        m.touch(0, 4)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(r)
                os.write(w, b"1")
                signal.pause()
            finally:
                os._exit(0)
        os.close(w)
        reaped = False
        try:
            assert os.read(r, 1) == b"1"
            with pagescan.Target(pid) as target:
                assert len(scan(m.addr, m.end, pid=target, return_mask=C.PRESENT)) == 1
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                reaped = True
                with pytest.raises(ProcessLookupError) as info:
                    scan(m.addr, m.end, pid=target, return_mask=C.PRESENT)
                assert info.value.errno == errno.ESRCH
                raw = raw_scan(m.addr, m.end, fd=target.fd, vec_len=4, ret=int(C.PRESENT), walk_end=0xDEAD000)
                assert raw.err == errno.ESRCH
                assert raw.walk_end == 0xDEAD000  # not written back
        finally:
            os.close(r)
            if not reaped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


# -- X-13 ----------------------------------------------------------------------------


def test_x13_fork_cow_with_wp_async(uffd_wp: Userfaultfd) -> None:
    with anon(4) as m:
        m.write(0, 4)
        arm(uffd_wp, m)
        assert view(m) == [(0, 4, 0x9)]

        def child() -> Any:
            before = view(m)
            m.write(0, 4, value=7)
            return [before, view(m)]

        # In the child WPA is lost and every page looks written, before and after its write.
        assert run_in_child(child) == [[(0, 4, 0xA)], [(0, 4, 0xA)]]
        assert view(m, WR, category_mask=C.WRITTEN) == []  # the child's writes are not ours
        assert m.read_byte(0) == 1
        m.touch(2)
        assert view(m, WR, category_mask=C.WRITTEN) == [(2, 3, 2)]


def test_x13_mremap_loses_wp_state(uffd_wp: Userfaultfd) -> None:
    lib = ctypes.CDLL(None, use_errno=True)
    mremap = lib.mremap
    mremap.restype = ctypes.c_void_p
    mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    with anon(4) as m, anon(4, prot=PROT.NONE, flags=MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE) as dst:
        m.write(0, 2)
        arm(uffd_wp, m)
        assert view(m) == [(0, 2, 0x9), (2, 4, 0x11)]
        got = mremap(m.addr, m.length, m.length, 1 | 2, dst.addr)  # MREMAP_MAYMOVE | MREMAP_FIXED
        assert got == dst.addr, os.strerror(ctypes.get_errno())
        m.closed = True  # its pages now live at dst
        assert view(dst) == [(0, 2, 0xA), (2, 4, 0x2)]
        with pytest.raises(PermissionError):
            scan(dst.addr, dst.end, flags=CHK, return_mask=C.WRITTEN)


# -- X-15 ----------------------------------------------------------------------------


def test_x15_map_private_file(tmp_path: Any, uffd_wp: Userfaultfd) -> None:
    with file_mapping(tmp_path / "f", 8) as m:
        assert m.read_byte(0) == ord("c")
        m.touch(1)
        # Fault-around maps the untouched pages 2-7; COW drops FILE from page 1.
        assert view(m) == [(0, 1, 0xE), (1, 2, 0xA), (2, 8, 0xE)]
        assert [e >> 61 & 1 for e in _pagemap(m)] == [1, 0, 1, 1, 1, 1, 1, 1]
        arm(uffd_wp, m)
        assert view(m) == [(0, 1, 0xD), (1, 2, 0x9), (2, 8, 0xD)]
        m.touch(0)
        assert view(m) == [(0, 1, 0xB), (1, 2, 0x9), (2, 8, 0xD)]


def _pagemap(m: Mapping) -> list[int]:
    from .memory import pagemap_entries

    return pagemap_entries(m.addr, m.npages)


def test_scan_generation_probe_matches_the_kernel(uffd_wp: pagescan.Userfaultfd) -> None:
    """capabilities().scan_generation (docs/kernel-facts.md) agrees with the behaviour itself:
    armed-then-written-then-zapped pages read WRITTEN on the generic path (PM-UP-01)
    exactly when the probe says the 2026 fix is in; this kernel (6.18.44) has all three."""
    gen = pagescan.capabilities().scan_generation
    assert set(gen) == {"written_unpopulated_pte", "written_pmd_hole", "pfnzero_huge_zero"}
    with anon(16) as m:
        arm(uffd_wp, m)
        m.write(0, 16)
        m.madvise(MADV.DONTNEED)
        generic = scan(m.addr, m.end, category_anyof_mask=C.WRITTEN, return_mask=C.WRITTEN).pages
        assert (generic == 16) is gen["written_unpopulated_pte"]
    assert gen == {"written_unpopulated_pte": True, "written_pmd_hole": True, "pfnzero_huge_zero": True}
