"""Property tests: ``scan_iter`` in pieces equals one ``scan`` with a large buffer.

Layouts are built from real pages: untouched, written, read (zero page), zapped
(``MADV_DONTNEED``), read-only VMAs (``mprotect``) and unmapped gaps. Several layouts
produce more than 512 regions, where the kernel's ``walk_end`` is stale (X-01).
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagescan
from pagescan import Category, RegisterMode, Userfaultfd, scan, scan_iter
from pagescan._uapi import libc
from pagescan._uapi.mman import MADV, MAP, PROT

from .conftest import WP_FEATURES, requires_pagemap_scan, requires_wp_async
from .memory import P, hugetlb_anon

pytestmark = requires_pagemap_scan

C = Category
ALL = int(pagescan.capabilities().categories)
PRES, WR, ZERO = int(C.PRESENT), int(C.WRITTEN), int(C.PFNZERO)
WP = int(pagescan.PM_SCAN_WP_MATCHING)
CHK = int(pagescan.PM_SCAN_CHECK_WPASYNC)

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])

KINDS = ("none", "write", "read", "dontneed", "ro", "gap")

#: (category_inverted, category_mask, category_anyof_mask, return_mask)
MASKS = [
    (0, 0, 0, ALL),
    (0, PRES, 0, PRES),
    (0, WR, 0, WR),  # the kernel's fast path
    (0, PRES, 0, PRES | ZERO),
    (0, 0, PRES | ZERO, ALL),
    (PRES, PRES, 0, ALL),  # exclude PRESENT
    (0, 0, 0, 0),  # return_mask 0: runs only
    (ZERO, PRES | ZERO, 0, PRES),  # present, not the zero page
]


class Layout:
    """A reserved range with runs of differently prepared pages; gaps are unmapped."""

    def __init__(self, runs: list[tuple[str, int]]) -> None:
        self.npages = sum(n for _, n in runs)
        self.addr = libc.mmap(0, self.npages * P, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS)
        self.end = self.addr + self.npages * P
        self.mapped: list[tuple[int, int]] = []
        page = 0
        for kind, n in runs:
            lo = self.addr + page * P
            if kind == "gap":
                libc.munmap(lo, n * P)
            else:
                self.mapped.append((lo, n * P))
                if kind in ("write", "dontneed", "ro"):
                    for i in range(n):
                        ctypes.memset(lo + i * P, 1, 1)
                if kind == "read":
                    for i in range(n):
                        ctypes.string_at(lo + i * P, 1)
                if kind == "dontneed":
                    libc.madvise(lo, n * P, MADV.DONTNEED)
                if kind == "ro":
                    libc.mprotect(lo, n * P, PROT.READ)
            page += n

    def close(self) -> None:
        # Unmap only what we mapped: a gap may since hold someone else's mapping.
        for lo, length in self.mapped:
            libc.munmap(lo, length)
        self.mapped = []

    def __enter__(self) -> Layout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def concat(results: list[Any]) -> np.ndarray:
    return np.concatenate([r.regions for r in results]) if results else np.empty(0, pagescan.PAGE_REGION_DTYPE)


def check_iter_equals_scan(start: int, end: int, vec_len: int, max_pages: int, masks: tuple[int, ...]) -> None:
    inv, req, anyof, ret = masks
    kw = dict(category_inverted=inv, category_mask=req, category_anyof_mask=anyof, return_mask=ret)
    whole = scan(start, end, max_pages=max_pages, **kw)
    bound = (end - start) // P + 2  # each call makes progress of at least one page or region
    parts = list(itertools.islice(scan_iter(start, end, vec_len=vec_len, max_pages=max_pages, **kw), bound))
    assert len(parts) < bound, "scan_iter did not terminate"
    got = concat(parts)
    assert np.array_equal(got, whole.regions), (
        f"vec_len={vec_len} max_pages={max_pages} masks={masks}: {len(got)} regions vs {len(whole)}"
    )
    for p in parts:
        assert len(p) <= vec_len
    # Each call resumes where the previous one stopped.
    for a, b in zip(parts, parts[1:]):
        assert not a.complete and b.start == a.walk_end
    if max_pages:
        assert sum(p.pages for p in parts) == whole.pages <= max_pages
    if not max_pages or whole.pages < max_pages:
        assert whole.complete and whole.walk_end == end
        assert parts[-1].complete and parts[-1].walk_end == end


runs_strategy = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(1, 24)), min_size=1, max_size=120
).filter(lambda runs: any(k != "gap" for k, _ in runs))


@settings(max_examples=150, **SETTINGS)
@given(
    runs=runs_strategy,
    vec_len=st.one_of(st.sampled_from([1, 2, 3, 7, 511, 512, 513]), st.integers(1, 200)),
    max_pages=st.one_of(st.just(0), st.integers(1, 400)),
    masks=st.sampled_from(MASKS),
)
def test_scan_iter_equals_one_scan(runs: list[tuple[str, int]], vec_len: int, max_pages: int,
                                   masks: tuple[int, ...]) -> None:
    with Layout(runs) as lay:
        check_iter_equals_scan(lay.addr, lay.end, vec_len, max_pages, masks)


@pytest.fixture(scope="module")
def alternating() -> Iterator[Layout]:
    """1500 written runs separated by 1500 untouched pages, with a read-only VMA and a
    zero-page stretch in the middle: far more than 512 regions per call."""
    runs: list[tuple[str, int]] = []
    for i in range(1500):
        kind = "ro" if 600 <= i < 650 else "write"
        runs += [(kind, 1), ("read" if 900 <= i < 950 else "none", 1)]
    with Layout(runs) as lay:
        yield lay


@settings(max_examples=100, **SETTINGS)
@given(
    vec_len=st.one_of(st.sampled_from([1, 511, 512, 513, 1024, 1499, 1500, 1501, 3000]), st.integers(1, 3100)),
    max_pages=st.one_of(st.just(0), st.sampled_from([1, 512, 700, 1499, 1500, 2999]), st.integers(1, 3100)),
    masks=st.sampled_from(MASKS),
)
def test_scan_iter_more_than_512_regions(alternating: Layout, vec_len: int, max_pages: int,
                                         masks: tuple[int, ...]) -> None:
    check_iter_equals_scan(alternating.addr, alternating.end, vec_len, max_pages, masks)


def test_alternating_layout_shape(alternating: Layout) -> None:
    res = scan(alternating.addr, alternating.end, category_mask=C.PRESENT, return_mask=C.PRESENT)
    assert res.complete and res.walk_end == alternating.end
    # 1500 written pages; the zero-page stretch adds 50 present pages that merge runs.
    assert res.pages == 1550
    assert len(res) == 1500 - 50


@requires_wp_async
@settings(max_examples=60, **SETTINGS)
@given(
    written=st.lists(st.booleans(), min_size=1, max_size=700),
    vec_len=st.integers(1, 40),
    max_pages=st.one_of(st.just(0), st.integers(1, 300)),
)
def test_wp_scan_iter_rearms_exactly_what_it_reported(written: list[bool], vec_len: int, max_pages: int) -> None:
    n = len(written)
    addr = libc.mmap(0, n * P, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS)
    try:
        with Userfaultfd(WP_FEATURES) as uf:
            uf.register(addr, n * P, RegisterMode.WP)
            uf.writeprotect(addr, n * P)
            for i, w in enumerate(written):
                if w:
                    ctypes.memset(addr + i * P, 1, 1)
            dirty = {addr + i * P for i, w in enumerate(written) if w}
            kw = dict(category_mask=C.WRITTEN, return_mask=C.WRITTEN)
            parts = list(itertools.islice(
                scan_iter(addr, addr + n * P, flags=WP | CHK, vec_len=vec_len, max_pages=max_pages, **kw), n + 2))
            assert len(parts) <= n + 1
            reported = {p for r in parts for s, e, _ in r.regions.tolist() for p in range(s, e, P)}
            assert all(len(r) <= vec_len for r in parts)
            expect = sorted(dirty)[:max_pages] if max_pages else sorted(dirty)
            assert sorted(reported) == expect
            # A second, non-WP scan: exactly the reported pages were re-armed.
            left = scan(addr, addr + n * P, **kw)
            still = {p for s, e, _ in left.regions.tolist() for p in range(s, e, P)}
            assert still == dirty - reported
    finally:
        libc.munmap(addr, n * P)


def test_scan_iter_stops_on_partial_hugetlb_page(hugetlb_2m: int) -> None:
    """X-08: WP over half a huge page makes no progress; scan_iter must not spin."""
    with hugetlb_anon(2) as m, Userfaultfd(WP_FEATURES) as uf:
        uf.register(m.addr, m.length, RegisterMode.WP)
        m.touch(0)
        m.touch(512)
        kw = dict(flags=WP | CHK, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        for vec_len in (1, 4, None):
            parts = list(itertools.islice(scan_iter(m[512], m[768], vec_len=vec_len, **kw), 20))
            assert 1 <= len(parts) < 20
            last = parts[-1]
            assert last.complete is False and last.walk_end == m[512]
            assert sum(len(p) for p in parts) == 0
        # A whole page then half of the next: the whole one is reported and armed.
        parts = list(itertools.islice(scan_iter(m[0], m[768], vec_len=1, **kw), 20))
        assert 1 <= len(parts) < 20
        assert [(int(s), int(e)) for s, e, _ in concat(parts).tolist()] == [(m[0], m[512])]
        assert parts[-1].complete is False and parts[-1].walk_end == m[512]
        res = scan(m.addr, m.end, category_mask=C.WRITTEN, return_mask=C.WRITTEN)
        assert [(r.start, r.end) for r in res] == [(m[512], m[1024])]  # second page untouched
