"""Port of the kernel selftest ``pagemap_ioctl.c``, Groups 1-6, on anonymous memory.

Test names carry the catalog IDs of the kernel selftest catalogue (``tools/testing/selftests/mm/pagemap_ioctl.c`` and ``uffd-unit-tests.c``) Part 1 (PM-SD-01..35,
PM-ST-01..11, PM-SIM-01). Where the C test only checks "no error", or relies on a stale
buffer, these tests assert the real values the catalog gives (Part 4).

Notation follows the catalog: ``pm(start, end, vec_len, flags, max_pages, req, anyof,
inv, ret)`` is one ``PAGEMAP_SCAN`` with ``category_mask=req``,
``category_anyof_mask=anyof``, ``category_inverted=inv`` and ``return_mask=ret``; the
output buffer is a fresh array of exactly ``vec_len`` slots, so ``vec_len`` reaches the
kernel unchanged. Page numbers in expectations count from the mapping's start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pagescan import PAGE_REGION_DTYPE, Category, RegisterMode, ScanResult, UffdIoctl, Userfaultfd, scan

from . import oracle
from .conftest import arm, requires_pagemap_scan, reset
from .memory import P, Mapping, anon

pytestmark = requires_pagemap_scan

WPA = int(Category.WPALLOWED)  # 0x01
WR = int(Category.WRITTEN)  # 0x02
PRES = int(Category.PRESENT)  # 0x08
SWAP = int(Category.SWAPPED)  # 0x10
ALL7 = 0x7F  # the suite's "all bits": bits 0-6
WP = 1  # PM_SCAN_WP_MATCHING
WP_CHK = 3  # PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
U64_MAX = (1 << 64) - 1  # what C's int -1 becomes in a u64 field


# -- helpers ------------------------------------------------------------------------


def pm(
    start: int,
    end: int,
    vec_len: int,
    flags: int = 0,
    max_pages: int = 0,
    req: int = 0,
    anyof: int = 0,
    inv: int = 0,
    ret: int = 0,
) -> ScanResult:
    """One scan in the catalog's argument order, with a buffer of exactly ``vec_len``."""
    out = np.zeros(vec_len, PAGE_REGION_DTYPE)
    return scan(
        start,
        end,
        flags=flags,
        max_pages=max_pages,
        category_mask=req,
        category_anyof_mask=anyof,
        category_inverted=inv,
        return_mask=ret,
        out=out,
    )


def raw_pm(
    start: int,
    end: int,
    vec: int,
    vec_len: int,
    flags: int = 0,
    max_pages: int = 0,
    req: int = 0,
    anyof: int = 0,
    inv: int = 0,
    ret: int = 0,
) -> tuple[int, int]:
    """The bare ioctl on a fresh ``/proc/self/pagemap`` fd (:func:`tests.oracle.raw_scan`),
    for a ``vec`` pointer of our choosing (``scan()`` always allocates one). Returns
    ``(ret, walk_end)``; a failure raises ``OSError`` with the kernel's errno."""
    r = oracle.raw_scan(start, end, flags=flags, vec=vec, vec_len=vec_len, max_pages=max_pages,
                        category_inverted=inv, category_mask=req, category_anyof_mask=anyof, return_mask=ret)
    if r.err:
        raise OSError(r.err, os.strerror(r.err))
    return r.ret, r.walk_end


def rel(res: ScanResult, m: Mapping) -> list[tuple[int, int, int]]:
    """Regions as ``(first page, end page, categories)`` relative to ``m``."""
    return [((s - m.addr) // P, (e - m.addr) // P, c) for s, e, c in res.regions.tolist()]


def assert_errno(err: int, fn: Callable[..., object], *args: int) -> None:
    """``fn(*args)`` fails with OSError ``err``."""
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == err, info.value


@contextlib.contextmanager
def armed(uf: Userfaultfd, npages: int) -> Iterator[Mapping]:
    """A fresh private anonymous mapping, ARMed and RESET (every page clean)."""
    with anon(npages) as m:
        arm(uf, m)
        reset(m.addr, m.end)
        yield m


def write_pages(m: Mapping, pages: range | list[int]) -> None:
    """Dirty each page by writing one byte in it."""
    for i in pages:
        ctypes.memset(m[i], 0x5A, 1)


EVENS = [(2 * i, 2 * i + 1) for i in range(500)]  # the even pages of a 1000-page mapping


# -- Group 1: argument validation and sanity ----------------------------------------
#
# Setup for PM-SD-01..11: 1000 armed, reset, never-written pages (each holds a uffd-wp
# marker, so it reads WPA|SWAP and is not WRITTEN); a 500-region buffer.


@pytest.fixture
def sd(uffd_wp: Userfaultfd) -> Iterator[Mapping]:
    with armed(uffd_wp, 1000) as m:
        yield m


def test_pm_sd_01_zero_length_range(sd: Mapping) -> None:
    res = pm(sd.addr, sd.addr, 500, 0, 0, ALL7, 0, 0, ALL7)
    assert len(res) == 0
    assert res.walk_end == sd.addr


def test_pm_sd_02_null_vec_with_length_is_einval(sd: Mapping) -> None:
    # Not expressible through scan(), which always supplies a buffer.
    assert_errno(errno.EINVAL, raw_pm, sd.addr, sd.end, 0, 500, 0, 0, ALL7, 0, 0, ALL7)


def test_pm_sd_03_valid_vec_zero_length(sd: Mapping) -> None:
    buf = np.full(500, 0xEE, PAGE_REGION_DTYPE)
    n, walk_end = raw_pm(sd.addr, sd.end, int(buf.ctypes.data), 0, 0, 0, ALL7, 0, 0, ALL7)
    assert (n, walk_end) == (0, sd.end)
    assert (buf["start"] == 0xEE).all(), "vec_len 0 must not write to vec"
    res = scan(sd.addr, sd.end, category_mask=ALL7, return_mask=ALL7, vec_len=0)
    assert len(res) == 0 and res.walk_end == sd.end


def test_pm_sd_04_null_vec_zero_length(sd: Mapping) -> None:
    assert raw_pm(sd.addr, sd.end, 0, 0, 0, 0, ALL7, 0, 0, ALL7) == (0, sd.end)
    res = scan(sd.addr, sd.end, category_mask=ALL7, return_mask=ALL7, vec_len=0)
    assert len(res) == 0 and res.walk_end == sd.end


def test_pm_sd_05_all_ones_flags_einval(sd: Mapping) -> None:
    assert_errno(errno.EINVAL, pm, sd.addr, sd.end, 500, U64_MAX, 0, WR, 0, 0, WR)
    assert_errno(errno.EINVAL, raw_pm, sd.addr, sd.end, 0, 0, U64_MAX, 0, WR, 0, 0, WR)
    # C's int -1 is not a valid Python spelling: pagescan refuses negative values.
    with pytest.raises(ValueError):
        pm(sd.addr, sd.end, 500, -1, 0, WR, 0, 0, WR)


def test_pm_sd_06_undefined_flag_bits_einval(sd: Mapping) -> None:
    assert_errno(errno.EINVAL, pm, sd.addr, sd.end, 500, 0xFF, 0, WR, 0, 0, WR)


def test_pm_sd_07_return_mask_only(sd: Mapping) -> None:
    res = pm(sd.addr, sd.end, 500, 0, 0, 0, 0, 0, WR)
    assert rel(res, sd) == [(0, 1000, 0)]
    assert res.walk_end == sd.end


def test_pm_sd_08_zero_return_mask(sd: Mapping) -> None:
    res = pm(sd.addr, sd.end, 500, 0, 0, WR, WR, 0, 0)
    assert len(res) == 0 and res.walk_end == sd.end
    # The C check is vacuous (nothing written yet); a written page is reported, with
    # categories masked to 0, which shows return_mask 0 does not suppress regions.
    write_pages(sd, [5])
    assert rel(pm(sd.addr, sd.end, 500, 0, 0, WR, WR, 0, 0), sd) == [(5, 6, 0)]


def test_pm_sd_09_undefined_return_bit_einval(sd: Mapping) -> None:
    assert_errno(errno.EINVAL, pm, sd.addr, sd.end, 500, 0, 0, WR, 0, 0, 0x1000)


def test_pm_sd_10_undefined_mask_bits_einval(sd: Mapping) -> None:
    assert_errno(errno.EINVAL, pm, sd.addr, sd.end, 500, WP_CHK, 0, 0xFFF, WR, 0, WR)


def test_pm_sd_11_inverted_only(sd: Mapping) -> None:
    res = pm(sd.addr, sd.end, 500, WP_CHK, 0, 0, 0, ALL7, WR)
    assert rel(res, sd) == [(0, 1000, 0)]
    assert res.walk_end == sd.end


# Setup for PM-ST-01..05: 10 armed, reset pages, buffer of 10. Unwritten pages hold
# uffd-wp markers, which read as WPA|SWAP = 0x11.
ST_SANITY = [
    pytest.param(WP_CHK, ALL7, 0, 0, [], id="pm_st_01_wp_with_non_written_mask"),
    pytest.param(0, ALL7, 0, 0, [], id="pm_st_02_require_all"),
    pytest.param(0, 0, ALL7, 0, [(0, 10, WPA | SWAP)], id="pm_st_03_anyof_all"),
    pytest.param(0, 0, 0, ALL7, [(0, 10, WPA | SWAP)], id="pm_st_04_inverted_all"),
    pytest.param(0, ALL7, ALL7, 0, [], id="pm_st_05_require_and_anyof_all"),
]


@pytest.mark.parametrize(("flags", "req", "anyof", "inv", "expected"), ST_SANITY)
def test_pm_st_01_05_sanity(
    uffd_wp: Userfaultfd, flags: int, req: int, anyof: int, inv: int, expected: list[tuple[int, int, int]]
) -> None:
    with armed(uffd_wp, 10) as m:
        res = pm(m.addr, m.end, 10, flags, 0, req, anyof, inv, ALL7)
        assert rel(res, m) == expected
        assert res.walk_end == m.end


# -- Group 2: basic get and mask filters ----------------------------------------------
#
# 10 armed, reset pages, then all written: each page is PRES|WR|WPA = 0xB.

ST_FILTERS = [
    pytest.param(0, ALL7, 0, [(0, 10, PRES | WR | WPA)], id="pm_st_06_anyof_all"),
    # The C check passes only on a stale buffer; nothing has all seven bits.
    pytest.param(ALL7, 0, 0, [], id="pm_st_07_require_all"),
    pytest.param(WR, PRES, 0, [(0, 10, PRES | WR | WPA)], id="pm_st_08_written_and_present"),
    pytest.param(WR, 0, WR, [], id="pm_st_09_written_inverted"),
    pytest.param(PRES, 0, PRES, [], id="pm_st_10_present_inverted"),
]


@pytest.mark.parametrize(("req", "anyof", "inv", "expected"), ST_FILTERS)
def test_pm_st_06_10_filters(
    uffd_wp: Userfaultfd, req: int, anyof: int, inv: int, expected: list[tuple[int, int, int]]
) -> None:
    with armed(uffd_wp, 10) as m:
        write_pages(m, range(10))
        res = pm(m.addr, m.end, 10, 0, 0, req, anyof, inv, ALL7)
        assert rel(res, m) == expected
        assert res.walk_end == m.end


def test_pm_st_11_wp_with_return_mask_written(uffd_wp: Userfaultfd) -> None:
    with armed(uffd_wp, 10) as m:
        write_pages(m, range(10))
        res = pm(m.addr, m.end, 10, WP_CHK, 0, 0, ALL7, 0, WR)
        assert rel(res, m) == [(0, 10, WR)]  # exactly WR: return_mask strips WPA and PRES
        # Side effect: the pages were re-armed (present, write-protected, not WRITTEN).
        assert rel(pm(m.addr, m.end, 10, 0, 0, 0, 0, 0, ALL7), m) == [(0, 10, PRES | WPA)]


# -- Group 3: written patterns and reset ------------------------------------------------


def test_pm_sd_12_wp_scan_on_clean_pages(sd: Mapping) -> None:
    res = pm(sd.addr, sd.end, 500, WP_CHK, 0, WR, 0, 0, WR)
    assert len(res) == 0 and res.walk_end == sd.end


def test_pm_sd_13_even_pages_fill_buffer(sd: Mapping) -> None:
    write_pages(sd, range(0, 1000, 2))
    res = pm(sd.addr, sd.end, 500, 0, 0, WR, 0, 0, WR)
    assert rel(res, sd) == [(s, e, WR) for s, e in EVENS]
    # The buffer fills exactly at the last match: not an early stop.
    assert res.walk_end == sd.end


def test_pm_sd_16_max_pages_on_sub_range(sd: Mapping) -> None:
    write_pages(sd, range(1000))
    res = pm(sd[1], sd[3], 1, WP_CHK, 2, WR, 0, 0, WR)
    assert rel(res, sd) == [(1, 3, WR)]
    assert res.walk_end == sd[3]
    res = pm(sd.addr, sd.end, 1000, 0, 0, WR, 0, 0, WR)
    assert rel(res, sd) == [(0, 1, WR), (3, 1000, WR)]


def test_pm_sd_17_two_regions(uffd_wp: Userfaultfd) -> None:
    with armed(uffd_wp, 1000) as m0, armed(uffd_wp, 1000) as m1:
        write_pages(m0, range(1000))
        write_pages(m1, range(1000))
        reset(m0.addr, m0.end)
        res = pm(m1.addr, m1.end, 1, 0, 0, WR, 0, 0, WR)
        assert rel(res, m1) == [(0, 1000, WR)]
        assert res.walk_end == m1.end
        # RESET on m0 cleared m0 only.
        assert len(pm(m0.addr, m0.end, 1, 0, 0, WR, 0, 0, WR)) == 0


def test_pm_sim_01_simple_heap_page(uffd_wp: Userfaultfd) -> None:
    # One page from aligned_alloc, so it lies in the heap's VMA rather than a fresh mmap.
    c = ctypes.CDLL(None, use_errno=True)
    c.aligned_alloc.restype = ctypes.c_void_p
    c.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    c.free.argtypes = [ctypes.c_void_p]
    c.free.restype = None
    p = c.aligned_alloc(P, P)
    assert p, "aligned_alloc failed"
    try:
        assert uffd_wp.register(p, P, RegisterMode.WP) & UffdIoctl.WRITEPROTECT
        try:
            uffd_wp.writeprotect(p, P)
            reset(p, p + P)
            byte = ctypes.c_ubyte.from_address(p)
            for i in range(100):
                assert len(pm(p, p + P, 1, 0, 0, WR, 0, 0, WR)) == 0, f"iteration {i}: phantom write"
                reset(p, p + P)
                byte.value = (byte.value + 1) & 0xFF
                res = pm(p, p + P, 1, 0, 0, WR, 0, 0, WR)
                assert res.regions.tolist() == [(p, p + P, WR)], f"iteration {i}: lost write"
                reset(p, p + P)
        finally:
            uffd_wp.unregister(p, P)
    finally:
        c.free(p)


# -- Group 4: max_pages -------------------------------------------------------------------


def test_pm_sd_14_pattern_in_parts(sd: Mapping) -> None:
    write_pages(sd, range(0, 1000, 2))  # the state PM-SD-13 leaves behind
    r1 = pm(sd.addr, sd.end, 500, WP_CHK, 498, WR, 0, 0, WR)
    assert rel(r1, sd) == [(s, e, WR) for s, e in EVENS[:498]]
    # Budget spent exactly at a run's end: walk_end is the next matching page.
    assert r1.walk_end == sd[996]
    r2 = pm(sd.addr, sd.end, 2, 0, 0, WR, 0, 0, WR)
    assert rel(r2, sd) == [(996, 997, WR), (998, 999, WR)]  # not reset by r1
    r3 = pm(sd.addr, sd.end, 500, WP_CHK, 0, WR, 0, 0, WR)
    assert rel(r3, sd) == [(996, 997, WR), (998, 999, WR)]
    assert len(r1) + len(r3) == 500
    assert len(pm(sd.addr, sd.end, 500, 0, 0, WR, 0, 0, WR)) == 0


def test_pm_sd_15_max_pages(sd: Mapping) -> None:
    write_pages(sd, [*range(0, 1000, 2), 999])  # 501 pages in 500 runs
    res = pm(sd.addr, sd.end, 500, WP_CHK, 500, WR, 0, 0, WR)
    assert len(res) == 500
    assert rel(res, sd) == [(s, e, WR) for s, e in EVENS]  # last run truncated to [998,999)
    assert res.walk_end == sd[999]  # stopped inside the run
    res = pm(sd.addr, sd.end, 500, WP_CHK, 0, WR, 0, 0, WR)
    assert rel(res, sd) == [(999, 1000, WR)]  # page 999 was not reset


def test_pm_sd_18_smaller_max_pages(uffd_wp: Userfaultfd) -> None:
    with armed(uffd_wp, 1050) as m:
        assert len(pm(m.addr, m.end, 525, WP_CHK, 0, WR, 0, 0, WR)) == 0
        write_pages(m, range(0, 1050, 2))  # 525 single pages
        evens = [(2 * i, 2 * i + 1, WR) for i in range(525)]
        got = []
        for expected in (210, 210, 105):
            res = pm(m.addr, m.end, 525, WP_CHK, 210, WR, 0, 0, WR)
            assert len(res) == expected
            got += rel(res, m)
        assert got == evens
        assert len(pm(m.addr, m.end, 525, WP_CHK, 210, WR, 0, 0, WR)) == 0


# -- Group 5: vec_len limits and resumption -------------------------------------------


def test_pm_sd_19_smaller_vec(uffd_wp: Userfaultfd) -> None:
    npages, vec, rounds = 10_000, 50, 100
    rng = np.random.default_rng(0x5D19)
    with armed(uffd_wp, npages) as m:
        view = np.frombuffer((ctypes.c_ubyte * m.length).from_address(m.addr), np.uint8).reshape(npages, P)
        for rnd in range(rounds):
            pages = rng.choice(npages, npages // 2, replace=False)
            view[pages, 0] = rnd + 1  # one write per chosen page
            written = np.zeros(npages, bool)
            written[pages] = True
            seen = np.zeros(npages, bool)
            cur, total, prev_full = m.addr, 0, False
            for _ in range(npages):  # bound: every call reports at least one page
                if total == len(pages):
                    break
                assert cur < m.end, f"round {rnd}: walk reached the end with {total}/{len(pages)} pages"
                res = pm(cur, m.end, vec, WP_CHK, 0, WR, 0, 0, WR)
                r = rel(res, m)
                assert r, f"round {rnd}: no progress at page {(cur - m.addr) // P}"
                if prev_full:
                    # After a full buffer, walk_end is the first matching page not reported.
                    assert m[r[0][0]] == cur, f"round {rnd}: resumed past an unreported page"
                for s, e, _ in r:
                    assert not seen[s:e].any(), f"round {rnd}: pages [{s},{e}) reported twice"
                    seen[s:e] = True
                    total += e - s
                assert res.walk_end > cur and res.walk_end >= m[r[-1][1]]
                prev_full = len(r) == vec
                cur = res.walk_end
            assert total == len(pages), f"round {rnd}: {total} pages reported, {len(pages)} written"
            assert np.array_equal(seen, written), f"round {rnd}: reported pages differ from written ones"
            # Everything reported was reset; nothing is left WRITTEN.
            assert len(pm(m.addr, m.end, vec, 0, 0, WR, 0, 0, WR)) == 0, f"round {rnd}"
        del view


# -- Group 6: walk_end ------------------------------------------------------------------
#
# 1000 armed pages, all written (dense), or RESET and then only the even pages written
# (sparse). Every row: whole range (or a zero-length one), req = ret = WR, no WP unless
# stated. Expected walk_end is a page number, "start" = 0 and "end" = 1000.

WALK_END = [
    # id, sparse, zero-length range, vec_len, flags, max_pages, expected regions, walk_end page
    ("pm_sd_20", False, True, 1000, 0, 0, [], 0),
    ("pm_sd_21", False, True, 1000, WP_CHK, 0, [], 0),
    ("pm_sd_22", False, True, 0, WP_CHK, 0, [], 0),
    ("pm_sd_23", False, False, 1000, 0, 0, [(0, 1000)], 1000),
    ("pm_sd_24", False, False, 1, 0, 0, [(0, 1000)], 1000),
    ("pm_sd_25", False, False, 1, 0, 1000, [(0, 1000)], 1000),
    ("pm_sd_26", False, False, 1000, 0, 500, [(0, 500)], 500),
    ("pm_sd_27", False, False, 1000, 0, 1, [(0, 1)], 1),
    ("pm_sd_28", False, False, 1000, 0, U64_MAX, [(0, 1000)], 1000),
    ("pm_sd_29", True, False, 1000, 0, 0, EVENS, 1000),
    ("pm_sd_30", True, False, 1, 0, 0, [(0, 1)], 2),
    ("pm_sd_31", True, False, 1, 0, 1000, [(0, 1)], 2),
    ("pm_sd_32", True, False, 500, 0, 1000, EVENS, 1000),
    ("pm_sd_33", True, False, 1000, 0, 1000, EVENS, 1000),
    ("pm_sd_34", True, False, 1000, 0, 500, EVENS, 1000),
    ("pm_sd_35", True, False, 1000, 0, 1, [(0, 1)], 2),
]


@pytest.mark.parametrize(
    ("sparse", "zero_len", "vec_len", "flags", "max_pages", "regions", "walk_end_page"),
    [pytest.param(*row[1:], id=row[0]) for row in WALK_END],
)
def test_pm_sd_20_35_walk_end(
    uffd_wp: Userfaultfd,
    sparse: bool,
    zero_len: bool,
    vec_len: int,
    flags: int,
    max_pages: int,
    regions: list[tuple[int, int]],
    walk_end_page: int,
) -> None:
    with armed(uffd_wp, 1000) as m:
        m.write(0, 1000)
        if sparse:
            reset(m.addr, m.end)
            write_pages(m, range(0, 1000, 2))
        end = m.addr if zero_len else m.end
        res = pm(m.addr, end, vec_len, flags, max_pages, WR, 0, 0, WR)
        assert rel(res, m) == [(s, e, WR) for s, e in regions]
        assert res.walk_end == m[walk_end_page]
        assert res.complete == (walk_end_page == 1000 or zero_len)
