"""Every PAGE_IS_* category, shown on real memory and cross-checked against the raw
``/proc/self/pagemap`` bits (and ``/proc/kpageflags``, smaps) wherever those carry the
information. Kernel facts: ``docs/kernel-facts.md`` 1.3 and 2.2; selftest catalogue part 5.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pagescan
from pagescan import MADV, Category, RegisterMode, Userfaultfd, scan
from pagescan._uapi.mman import PROT
from pagescan._uapi.pagemap import KPF, PM

from .conftest import (
    arm,
    page_out,
    requires_guard,
    requires_pagemap_scan,
    requires_soft_dirty,
    requires_thp,
    reset,
)
from .memory import (
    P,
    Mapping,
    anon,
    collapse,
    file_mapping,
    hugetlb_anon,
    memfd_mapping,
    pagemap_entries,
    shared_anon,
    smaps_field,
    thp,
    thp_size,
)

pytestmark = requires_pagemap_scan

WPA, WR, FILE, PRES, SWAP, ZERO, HUGE, SD, GUARD = (int(c) for c in Category)
ALL = 0x1FF & int(pagescan.capabilities().categories)
WP_CHK = 3
H = thp_size()
HP = H // P
PFN_MASK = (1 << 55) - 1


# -- helpers ---------------------------------------------------------------------------


def per_page(m: Mapping, page: int = 0, n: int | None = None, ret: int = ALL) -> list[int]:
    """Categories (& ``ret``) of every page, from one scan with no filter."""
    n = m.npages - page if n is None else n
    res = scan(m[page], m[page + n], return_mask=ret)
    assert res.complete
    out = [0] * n
    for r in res:
        for a in range(r.start, r.end, P):
            out[(a - m[page]) // P] = int(r.categories)
    return out


def rel(m: Mapping, res: Any) -> list[tuple[int, int, int]]:
    return [((r.start - m.addr) // P, (r.end - m.addr) // P, int(r.categories)) for r in res]


def npages(res: Any) -> int:
    return sum((r.end - r.start) // P for r in res)


def bit(entries: list[int], b: int) -> list[bool]:
    return [bool(e >> b & 1) for e in entries]


def kpageflags(pfn: int) -> int:
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        return int.from_bytes(os.pread(fd, 8, pfn * 8), "little")
    finally:
        os.close(fd)


def vm_flags(addr: int) -> list[str]:
    """smaps ``VmFlags`` of the VMA containing ``addr``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no VMA at {addr:#x}")


def assert_thp_pfns(m: Mapping, page: int = 0) -> None:
    """The 512 entries map one PMD-aligned, physically contiguous compound page."""
    ents = pagemap_entries(m[page], HP)
    pfns = [e & PFN_MASK for e in ents]
    assert all(e >> 63 & 1 for e in ents)
    assert pfns[0] % HP == 0 and pfns == list(range(pfns[0], pfns[0] + HP))
    assert kpageflags(pfns[0]) >> KPF.COMPOUND_HEAD & 1


@pytest.fixture
def huge_zero_page() -> Iterator[None]:
    """``use_zero_page`` = 1 for the test (root), restored afterwards."""
    path = "/sys/kernel/mm/transparent_hugepage/use_zero_page"
    with open(path) as f:
        old = f.read().strip()
    if old != "1":
        with open(path, "w") as f:
            f.write("1")
    yield
    if old != "1":
        with open(path, "w") as f:
            f.write(old)


# -- PRESENT -----------------------------------------------------------------------------


def test_present() -> None:
    with anon(8) as m, shared_anon(2) as s:
        m.touch(0, 4)
        m.madvise(MADV.DONTNEED, 2, 1)
        s.touch(1)
        present = [True, True, False, True, False, False, False, False]
        assert [bool(c & PRES) for c in per_page(m)] == present
        assert bit(pagemap_entries(m.addr, 8), 63) == present
        assert rel(m, scan(m.addr, m.end, category_mask=PRES, return_mask=PRES)) == [
            (0, 2, PRES), (3, 4, PRES),
        ]
        assert per_page(m, 0, 2) == [PRES | WR] * 2  # private anon: not FILE
        assert [bool(c & PRES) for c in per_page(s)] == [False, True]
        assert bit(pagemap_entries(s.addr, 2), 63) == [False, True]


# -- WRITTEN (armed vs written) ----------------------------------------------------------


def test_written_armed_vs_written(uffd_wp: Userfaultfd) -> None:
    with anon(8) as m:
        m.write(0, 4)  # pages 0-3 present before arming, 4-7 never touched
        arm(uffd_wp, m)
        reset(m.addr, m.end)
        # Armed: present pages are write-protected (0x9), empty slots hold markers (0x11).
        assert per_page(m) == [PRES | WPA] * 4 + [SWAP | WPA] * 4
        ents = pagemap_entries(m.addr, 8)
        assert bit(ents, 57) == [True] * 8  # PM_UFFD_WP: armed
        m.touch(1)
        m.touch(5)
        cats = per_page(m)
        assert cats == [PRES | WPA, PRES | WR | WPA, PRES | WPA, PRES | WPA,
                        SWAP | WPA, PRES | WR | WPA, SWAP | WPA, SWAP | WPA]
        ents = pagemap_entries(m.addr, 8)
        # WRITTEN <-> the uffd-wp bit is clear, page by page.
        assert [bool(c & WR) for c in cats] == [not b for b in bit(ents, 57)]
        assert rel(m, scan(m.addr, m.end, category_mask=WR, return_mask=WR)) == [(1, 2, WR), (5, 6, WR)]
        # A WP scan reports and re-arms exactly those two.
        assert rel(m, scan(m.addr, m.end, flags=WP_CHK, category_mask=WR, return_mask=WR)) == [
            (1, 2, WR), (5, 6, WR),
        ]
        assert all(bit(pagemap_entries(m.addr, 8), 57))
        uffd_wp.unregister(m.addr, m.length)
    # Outside any uffd VMA nothing is write-protected: every present page reads WRITTEN.
    with anon(2) as u:
        u.touch(0, 2)
        assert per_page(u) == [PRES | WR] * 2
        assert not any(bit(pagemap_entries(u.addr, 2), 57))


# -- FILE --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shared-anon", "memfd-shared", "file-shared"])
def test_file_shared(kind: str, tmp_path: Path) -> None:
    if kind == "shared-anon":
        m = shared_anon(4)
    elif kind == "memfd-shared":
        m = memfd_mapping(4)
    else:
        m = file_mapping(tmp_path / "shared.bin", 4, shared=True)
    with m:
        m.touch(0, 3)
        m.madvise(MADV.DONTNEED, 3, 1)  # shmem/file: page 3 stays in the page cache, unmapped
        cats = per_page(m)
        assert cats[:3] == [FILE | PRES | WR] * 3
        assert not cats[3] & (FILE | PRES)
        ents = pagemap_entries(m.addr, 4)
        assert bit(ents, 61) == [True] * 3 + [False]  # PM_FILE
        assert [bool(c & FILE) for c in cats] == bit(ents, 61)
        # FILE is computed only when asked for; with FILE in req it selects the pages.
        assert rel(m, scan(m.addr, m.end, category_mask=FILE, return_mask=FILE)) == [(0, 3, FILE)]


def test_file_private_cow_is_not_file(tmp_path: Path) -> None:
    """X-15: a read private file page is FILE; after a CoW write it is anonymous."""
    with file_mapping(tmp_path / "private.bin", 8) as m:
        assert m.read_byte(0) == ord("c")
        m.touch(1, 1, ord("w"))
        cats = per_page(m)
        assert cats[0] == FILE | PRES | WR
        assert cats[1] == PRES | WR
        ents = pagemap_entries(m.addr, 8)
        assert bit(ents, 61)[:2] == [True, False]
        # Fault-around may map the untouched neighbours too; FILE agrees with pagemap anyway.
        assert [bool(c & FILE) for c in cats] == bit(ents, 61)
        assert [bool(c & PRES) for c in cats] == bit(ents, 63)
        assert (tmp_path / "private.bin").read_bytes()[P : P + 1] == b"c"


# -- SWAPPED -----------------------------------------------------------------------------


def test_swapped_real_swap(zram_swap: str) -> None:
    with anon(8) as m:
        m.write(0, 8, 0x5A)
        page_out(m, 0, 4)
        assert per_page(m) == [SWAP | WR] * 4 + [PRES | WR] * 4
        ents = pagemap_entries(m.addr, 8)
        assert bit(ents, 62) == [True] * 4 + [False] * 4
        assert bit(ents, 63) == [False] * 4 + [True] * 4
        assert rel(m, scan(m.addr, m.end, category_mask=SWAP, return_mask=SWAP)) == [(0, 4, SWAP)]
        assert m.read(0) == b"\x5a" * P  # swapped back in
        assert per_page(m, 0, 1) == [PRES | WR]
        assert bit(pagemap_entries(m.addr, 1), 62) == [False]


def test_swapped_armed_swap_entry(zram_swap: str, uffd_wp: Userfaultfd) -> None:
    """A write-protected page that is swapped out keeps its uffd-wp bit in the swap entry."""
    with anon(4) as m:
        m.write(0, 4, 0x33)
        arm(uffd_wp, m)
        assert per_page(m) == [PRES | WPA] * 4
        page_out(m)
        assert per_page(m) == [SWAP | WPA] * 4
        ents = pagemap_entries(m.addr, 4)
        assert all(bit(ents, 62)) and all(bit(ents, 57)) and not any(bit(ents, 63))
        m.touch(0, 1, 0x44)  # swap-in by a write: now written
        assert per_page(m, 0, 1) == [PRES | WR | WPA]
        assert bit(pagemap_entries(m.addr, 1), 57) == [False]
        assert m.read(1) == b"\x33" * P
        uffd_wp.unregister(m.addr, m.length)


def test_swapped_uffd_wp_markers(uffd_wp: Userfaultfd) -> None:
    """X-09: an armed empty slot holds a uffd-wp marker, which reads SWAPPED|WPALLOWED."""
    with anon(4) as m:
        arm(uffd_wp, m)
        assert per_page(m) == [SWAP | WPA] * 4
        ents = pagemap_entries(m.addr, 4)
        assert all(bit(ents, 62)) and all(bit(ents, 57)) and not any(bit(ents, 63))
        assert rel(m, scan(m.addr, m.end, category_mask=SWAP, return_mask=SWAP)) == [(0, 4, SWAP)]
        uffd_wp.unregister(m.addr, m.length)
        # Unregistering drops the markers.
        assert not any(bit(pagemap_entries(m.addr, 4), 62))


def test_swapped_hugetlb_marker_differs_from_pagemap(hugetlb_2m: int, uffd_wp: Userfaultfd) -> None:
    """An armed empty hugetlb page reads SWAPPED|HUGE|WPALLOWED to PAGEMAP_SCAN, but
    pagemap never sets bit 62 for hugetlb (only 57): docs/kernel-facts.md Pinned here because
    it is the one place the two interfaces disagree about SWAPPED."""
    with hugetlb_anon(1) as m:
        arm(uffd_wp, m)
        assert per_page(m) == [SWAP | HUGE | WPA] * HP
        ents = pagemap_entries(m.addr, HP)
        assert all(bit(ents, 57)) and not any(bit(ents, 62)) and not any(bit(ents, 63))
        uffd_wp.unregister(m.addr, m.length)


# -- PFNZERO -----------------------------------------------------------------------------


def test_pfnzero_4k_zero_page() -> None:
    with anon(4, prot=PROT.READ | PROT.WRITE) as m:
        assert m.read(0, 3) == bytes(3 * P)  # read faults map the shared zero page
        m.touch(3)
        assert per_page(m) == [ZERO | PRES | WR] * 3 + [PRES | WR]
        ents = pagemap_entries(m.addr, 4)
        pfns = [e & PFN_MASK for e in ents]
        assert all(bit(ents, 63)) and not any(bit(ents, 61))
        assert pfns[0] == pfns[1] == pfns[2] != pfns[3]
        assert [bool(kpageflags(p) >> KPF.ZERO_PAGE & 1) for p in pfns] == [True, True, True, False]
        assert rel(m, scan(m.addr, m.end, category_mask=ZERO, return_mask=ZERO)) == [(0, 3, ZERO)]


@requires_thp
def test_pfnzero_huge_zero_pmd(huge_zero_page: None) -> None:
    with Mapping(HP, align=H) as m:
        m.madvise(MADV.HUGEPAGE)
        assert m.read_byte(7) == 0
        assert per_page(m) == [ZERO | HUGE | PRES | WR] * HP
        ents = pagemap_entries(m.addr, HP)
        # The huge zero PMD: present, PM_FILE set (unlike the 4K zero page), not exclusive.
        assert all(bit(ents, 63)) and all(bit(ents, 61)) and not any(bit(ents, 56))
        assert_thp_pfns(m)
        head = kpageflags(ents[0] & PFN_MASK)
        assert head >> KPF.ZERO_PAGE & 1 and head >> KPF.THP & 1
        # A write replaces it with a real THP (or base pages): no longer PFNZERO.
        m.touch(0)
        assert not any(c & ZERO for c in per_page(m))


# -- HUGE --------------------------------------------------------------------------------


@requires_thp
def test_huge_thp_by_fault() -> None:
    with thp(1) as m:
        assert smaps_field(m, "AnonHugePages") * 1024 == H
        assert per_page(m) == [HUGE | PRES | WR] * HP
        assert_thp_pfns(m)
        assert kpageflags(pagemap_entries(m.addr, 1)[0] & PFN_MASK) >> KPF.THP & 1


@requires_thp
def test_huge_thp_by_collapse() -> None:
    with Mapping(HP, align=H) as m:
        m.madvise(MADV.NOHUGEPAGE)  # fault in base pages whatever the THP mode
        m.write(0, HP, 9)
        assert per_page(m) == [PRES | WR] * HP
        assert smaps_field(m, "AnonHugePages") == 0
        m.madvise(MADV.HUGEPAGE)  # lifts NOHUGEPAGE, which MADV_COLLAPSE would refuse
        collapse(m)
        assert smaps_field(m, "AnonHugePages") * 1024 == H
        assert per_page(m) == [HUGE | PRES | WR] * HP
        assert_thp_pfns(m)
        assert m.read(HP - 1) == bytes([9]) * P
        # A partial DONTNEED splits the PMD: PTE-mapped pages are not HUGE.
        m.madvise(MADV.DONTNEED, 0, 1)
        assert not any(c & HUGE for c in per_page(m))


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_huge_hugetlb(hugetlb_2m: int, shared: bool) -> None:
    with hugetlb_anon(1, shared=shared) as m:
        m.touch(3)
        expect = HUGE | PRES | WR | (FILE if shared else 0)
        assert per_page(m) == [expect] * HP
        ents = pagemap_entries(m.addr, HP)
        assert all(bit(ents, 63)) and bit(ents, 61) == [shared] * HP
        pfn = ents[0] & PFN_MASK
        assert [e & PFN_MASK for e in ents] == list(range(pfn, pfn + HP))
        assert kpageflags(pfn) >> KPF.HUGE & 1


# -- GUARD -------------------------------------------------------------------------------


@requires_guard
def test_guard_regions_pagemap_scan() -> None:
    """guard-regions.c's pagemap_scan test, plus the pagemap bit."""
    with anon(10) as m:
        res = scan(m.addr, m.end, category_anyof_mask=GUARD, return_mask=GUARD)
        assert len(res) == 0 and res.walk_end == m.end
        for i in range(0, 10, 2):
            m.madvise(MADV.GUARD_INSTALL, i, 1)
        res = scan(m.addr, m.end, category_anyof_mask=GUARD, return_mask=GUARD)
        assert res.walk_end == m.end
        assert rel(m, res) == [(i, i + 1, GUARD) for i in range(0, 10, 2)]
        ents = pagemap_entries(m.addr, 10)
        assert bit(ents, 58) == [i % 2 == 0 for i in range(10)]  # PM_GUARD_REGION
        assert [bool(c & GUARD) for c in per_page(m)] == bit(ents, 58)


@requires_guard
def test_guard_armed_and_written(uffd_wp: Userfaultfd) -> None:
    """X-10: guards on armed, written memory read GUARD|SWAP|WR|WPA (0x113)."""
    guard = [i % 2 == 0 for i in range(10)]
    with anon(10) as m:
        arm(uffd_wp, m)
        reset(m.addr, m.end)
        m.write(0, 10)
        for i in range(0, 10, 2):
            m.madvise(MADV.GUARD_INSTALL, i, 1)
        cats = per_page(m)
        assert cats == [GUARD | SWAP | WR | WPA if g else PRES | WR | WPA for g in guard]
        ents = pagemap_entries(m.addr, 10)
        assert bit(ents, 58) == guard and bit(ents, 62) == guard
        assert [bool(c & WR) for c in cats] == [not b for b in bit(ents, 57)]
        # A plain dirty-tracking WP scan counts guards as written and merges them in ...
        res = scan(m.addr, m.end, flags=WP_CHK, category_mask=WR, return_mask=WR)
        assert rel(m, res) == [(0, 10, WR)]
        # ... and arms them too (0x111).
        cats = per_page(m)
        assert cats == [GUARD | SWAP | WPA if g else PRES | WPA for g in guard]
        assert [bool(c & WR) for c in cats] == [not b for b in bit(pagemap_entries(m.addr, 10), 57)]
        uffd_wp.unregister(m.addr, m.length)
    with anon(10) as m:
        arm(uffd_wp, m)
        reset(m.addr, m.end)
        m.write(0, 10)
        for i in range(0, 10, 2):
            m.madvise(MADV.GUARD_INSTALL, i, 1)
        # The tracker's mask excludes guards: only the five normal pages, guards untouched.
        res = scan(m.addr, m.end, flags=WP_CHK, category_mask=WR | GUARD, category_inverted=GUARD,
                   return_mask=WR)
        assert rel(m, res) == [(i, i + 1, WR) for i in range(1, 10, 2)]
        assert per_page(m) == [GUARD | SWAP | WR | WPA if g else PRES | WPA for g in guard]
        uffd_wp.unregister(m.addr, m.length)


# -- WPALLOWED ---------------------------------------------------------------------------


def test_wpallowed(uffd_wp: Userfaultfd) -> None:
    """WPALLOWED marks VMAs registered for WP on a WP_ASYNC uffd. pagemap has no bit for
    it; smaps ``uw`` (VM_UFFD_WP) is the cross-check, and shows async-ness is required."""
    with anon(8) as m:
        m.touch(0, 8)
        uffd_wp.register(m.addr, 4 * P, RegisterMode.WP)
        assert [bool(c & WPA) for c in per_page(m)] == [True] * 4 + [False] * 4
        assert "uw" in vm_flags(m[0]) and "uw" not in vm_flags(m[4])
        assert rel(m, scan(m.addr, m.end, category_mask=WPA, return_mask=WPA)) == [(0, 4, WPA)]
        # Excluding WPALLOWED selects the unregistered VMA.
        assert rel(m, scan(m.addr, m.end, category_mask=WPA, category_inverted=WPA, return_mask=ALL)) == [
            (4, 8, PRES | WR)
        ]
        uffd_wp.unregister(m.addr, 4 * P)
        assert not any(c & WPA for c in per_page(m))
    with anon(4) as m, Userfaultfd(0) as sync_uf:
        m.touch(0, 4)
        sync_uf.register(m.addr, m.length, RegisterMode.WP)  # synchronous WP: not "allowed"
        assert "uw" in vm_flags(m.addr)
        assert not any(c & WPA for c in per_page(m))
        sync_uf.unregister(m.addr, m.length)


# -- SOFT_DIRTY --------------------------------------------------------------------------


def test_soft_dirty_accepted_and_matches_pagemap() -> None:
    """The bit is accepted in every mask. It is set iff the kernel has soft-dirty: a fresh
    VMA is VM_SOFTDIRTY there, and never set here (no CONFIG_MEM_SOFT_DIRTY). Per page it
    agrees with pagemap bit 55 either way."""
    have = pagescan.capabilities().soft_dirty
    with anon(4) as m:
        m.touch(0, 2)
        for kw in ({"category_mask": SD}, {"category_anyof_mask": SD}, {"category_inverted": SD},
                   {"return_mask": SD}):
            scan(m.addr, m.end, **kw)  # no EINVAL
        cats = per_page(m)
        assert [bool(c & SD) for c in cats] == [have] * 4
        assert bit(pagemap_entries(m.addr, 4), 55) == [have] * 4
        res = scan(m.addr, m.end, category_mask=SD, return_mask=SD)
        assert npages(res) == (4 if have else 0)
        inv = scan(m.addr, m.end, category_mask=SD, category_inverted=SD, return_mask=SD)
        assert npages(inv) == (0 if have else 4)


@requires_soft_dirty
def test_soft_dirty_positive() -> None:
    """Soft-dirty tracking: clear_refs 4 clears it, a write sets it on that page only."""
    with anon(4) as m:
        m.touch(0, 4)
        assert all(c & SD for c in per_page(m))  # new VMA: VM_SOFTDIRTY
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4")
        m.touch(2)
        cats = per_page(m, ret=SD | PRES)
        assert [bool(c & SD) for c in cats] == [False, False, True, False]
        assert bit(pagemap_entries(m.addr, 4), 55) == [False, False, True, False]


# -- the pagemap consistency oracle (vm_util.c page_entry_is) ----------------------------


def page_entry_is(addr: int) -> tuple[int, int]:
    """(scan categories of one page with every bit asked for, its pagemap entry)."""
    res = scan(addr, addr + P, category_anyof_mask=ALL, return_mask=ALL)
    cats = int(res[0].categories) if len(res) else 0
    return cats, pagemap_entries(addr, 1)[0]


@requires_thp
@requires_guard
def test_pagemap_oracle_mixed_states(zram_swap: str, hugetlb_2m: int, uffd_wp: Userfaultfd,
                                     tmp_path: Path, huge_zero_page: None) -> None:
    """For single pages: SD <-> bit 55, SWAP <-> bit 62, PRES|SWAP <-> bits 63|62."""
    checked: dict[str, tuple[int, int]] = {}
    with anon(12) as a, anon(4, prot=PROT.READ) as z, shared_anon(2) as sh, \
            file_mapping(tmp_path / "o.bin", 2) as f, thp(1) as t, Mapping(HP, align=H) as hz, \
            hugetlb_anon(1) as ht, anon(2) as armed, anon(1) as untouched:
        a.write(0, 12, 1)
        a.madvise(MADV.DONTNEED, 1, 1)  # pte_none in a table
        page_out(a, 2, 1)  # real swap
        a.madvise(MADV.GUARD_INSTALL, 3, 1)
        z.read(0, 1)
        sh.touch(0)
        f.read(0, 1)
        f.touch(1)
        hz.madvise(MADV.HUGEPAGE)
        hz.read_byte(0)
        ht.touch(0)
        armed.touch(0)
        arm(uffd_wp, armed)  # page 0 present+armed, page 1 a marker
        states = {
            "anon present": a[0], "pte_none": a[1], "swapped": a[2], "guard": a[3],
            "never touched": untouched[0],
            "zero page": z[0], "zero page untouched": z[3], "shared anon": sh[0],
            "shared untouched": sh[1], "private file read": f[0], "private file CoW": f[1],
            "THP subpage": t[100], "huge zero": hz[5], "hugetlb": ht[17],
            "armed present": armed[0], "uffd-wp marker": armed[1],
        }
        for name, addr in states.items():
            cats, e = page_entry_is(addr)
            checked[name] = (cats, e >> 55)
            assert bool(cats & SD) == bool(e & PM.SOFT_DIRTY), name
            assert bool(cats & SWAP) == bool(e & PM.SWAP), name
            assert bool(cats & (PRES | SWAP)) == bool(e & (PM.PRESENT | PM.SWAP)), name
        # The states really are distinct (so the oracle saw each kind).
        assert checked["swapped"][0] & SWAP and not checked["swapped"][0] & GUARD
        assert checked["guard"][0] & GUARD
        assert checked["uffd-wp marker"][0] == SWAP | WPA
        assert checked["zero page"][0] == ZERO | PRES | WR
        assert checked["huge zero"][0] == ZERO | HUGE | PRES | WR
        assert checked["THP subpage"][0] & HUGE and checked["hugetlb"][0] & HUGE
        assert not checked["pte_none"][0] & (PRES | SWAP)
        uffd_wp.unregister(armed.addr, armed.length)
