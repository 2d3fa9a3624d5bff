"""Basic scan() behaviour on anonymous memory, checked against /proc/self/pagemap."""

from __future__ import annotations

import numpy as np
import pytest

import pagescan
from pagescan import PAGE_REGION_DTYPE, Category, scan, scan_iter

from .conftest import arm, requires_pagemap_scan, reset
from .memory import P, anon, pagemap_entries

pytestmark = requires_pagemap_scan

ALL = 0x1FF & int(pagescan.capabilities().categories)


def test_written_and_untouched_pages() -> None:
    with anon(10) as m:
        m.touch(0, 10, 1)
        m.madvise(pagescan.MADV.DONTNEED, 1, 1)
        res = scan(m.addr, m.end, return_mask=ALL)
        assert res.complete and res.walk_end == m.end
        assert res.regions.dtype == PAGE_REGION_DTYPE
        got = [(r.start, r.end, r.categories) for r in res]
        assert got == [
            (m[0], m[1], Category.PRESENT | Category.WRITTEN),
            (m[1], m[2], Category.WRITTEN),  # pte_none in an allocated table: WRITTEN (docs/kernel-facts.md)
            (m[2], m[10], Category.PRESENT | Category.WRITTEN),
        ]
        present = [bool(e >> 63) for e in pagemap_entries(m.addr, 10)]
        assert present == [True, False] + [True] * 8


def test_zero_page_is_pfnzero() -> None:
    with anon(4, prot=pagescan._uapi.mman.PROT.READ) as m:
        m.read(0, 4)
        res = scan(m.addr, m.end, category_mask=Category.PFNZERO, return_mask=Category.PFNZERO)
        assert [(r.start, r.end) for r in res] == [(m.addr, m.end)]


def test_wp_async_written_tracking(uffd_wp: pagescan.Userfaultfd) -> None:
    with anon(8) as m:
        arm(uffd_wp, m)
        reset(m.addr, m.end)
        m.touch(3, 2)
        res = scan(m.addr, m.end, flags=3, category_mask=Category.WRITTEN, return_mask=Category.WRITTEN)
        assert [(r.start, r.end, int(r.categories)) for r in res] == [(m[3], m[5], 2)]
        assert len(scan(m.addr, m.end, category_mask=Category.WRITTEN, return_mask=Category.WRITTEN)) == 0


def test_buffer_object_range() -> None:
    arr = np.zeros(3 * P, dtype=np.uint8)
    arr[:] = 1
    res = scan(arr, return_mask=Category.PRESENT)
    assert res.regions["start"][0] <= arr.ctypes.data
    assert res.regions["end"][-1] >= arr.ctypes.data + arr.nbytes


def test_results_do_not_alias() -> None:
    with anon(2) as m:
        m.touch(0)
        first = scan(m.addr, m.end, return_mask=ALL)
        m.touch(1)
        second = scan(m.addr, m.end, return_mask=ALL)
        assert len(first) == 2 and len(second) == 1
        assert first.regions["end"][0] == m[1]


def test_scan_iter_resumes_and_budgets() -> None:
    with anon(64) as m:
        m.touch(0, 64)
        for i in range(1, 64, 2):
            m.madvise(pagescan.MADV.DONTNEED, i, 1)
        kw = dict(category_mask=Category.PRESENT, return_mask=Category.PRESENT)
        whole = scan(m.addr, m.end, **kw).regions
        parts = list(scan_iter(m.addr, m.end, vec_len=5, **kw))
        assert len(parts) == 7
        assert np.array_equal(np.concatenate([p.regions for p in parts]), whole)
        limited = list(scan_iter(m.addr, m.end, vec_len=5, max_pages=12, **kw))
        assert sum(p.pages for p in limited) == 12


def test_bad_python_arguments() -> None:
    with pytest.raises(TypeError):
        scan(1.5, 4096)
    with pytest.raises(ValueError):
        scan(-4096, 0)
    with pytest.raises(ValueError):
        scan(0, 1 << 64)
    with pytest.raises(ValueError):
        scan(0, 4096, backend="nope")
    with pytest.raises(ProcessLookupError):
        scan(0, 4096, pid=2**22 + 12345)
