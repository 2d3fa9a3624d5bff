"""When the emulated backend reads smaps, and pagescan's record of uffd registrations.

The emulation reads ``/proc/PID/maps`` first and smaps only for the VMAs that need it
(module docstring of :mod:`pagescan._backend_emulated`). These tests watch which smaps
records are read (by wrapping the backend's ``read_smaps``), check the answers against
the kernel's in every case, and check the fallback when maps and smaps disagree. They
also pin the registry kept by :class:`pagescan.Userfaultfd` for WPALLOWED.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pagescan
from pagescan import MADV, Category, RegisterMode, Userfaultfd, scan
from pagescan import _backend_emulated as emu
from pagescan import _registry
from pagescan import _procfs
from pagescan._uapi import userfaultfd as U
from pagescan._uapi.mman import MAP, PROT

from . import oracle
from .conftest import WP_FEATURES, arm, requires_pagemap_scan, requires_wp_async
from .memory import P, Mapping, anon, file_mapping

pytestmark = [requires_pagemap_scan, requires_wp_async]

WPA, WR, FILE, PRES, SWAP, ZERO, HUGE, SD, GUARD = (int(c) for c in Category)
ALL9 = 0x1FF
CHK = int(pagescan.PM_SCAN_CHECK_WPASYNC)
PMD = 512 * P


def regions(start: int, end: int, backend: str, **kw: Any) -> tuple[list[tuple[int, int, int]], int]:
    r = scan(start, end, backend=backend, **kw)
    return [tuple(x) for x in r.regions.tolist()], r.walk_end


def agree(start: int, end: int, **kw: Any) -> list[tuple[int, int, int]]:
    k = regions(start, end, "kernel", **kw)
    e = regions(start, end, "emulated", **kw)
    assert k == e, (kw, k, e)
    return k[0]


@contextlib.contextmanager
def smaps_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The start addresses of the smaps records the emulation reads."""
    seen: list[int] = []
    real = emu.read_smaps

    def spy(stream: _procfs.SmapsStream, read_size: int) -> _procfs.Vma | None:
        v = real(stream, read_size)
        if v is not None:
            seen.append(v.start)
        return v

    monkeypatch.setattr(emu, "read_smaps", spy)
    yield seen


@contextlib.contextmanager
def kernel_without_wp_async(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(emu, "_kernel_has_wp_async", lambda: False)
    yield


def needs_pfns() -> None:
    """Without PFNs and kpageflags every fully populated 2 MiB block is a THP candidate
    that only smaps can rule out."""
    caps = pagescan.capabilities()
    if not (caps.pfns_visible and caps.kpageflags):
        pytest.skip("needs PFNs (CAP_SYS_ADMIN) and /proc/kpageflags (root)")


def populated(npages: int) -> Mapping:
    """Written private anonymous memory, 4 KiB PTEs, every PMD block populated."""
    m = Mapping(npages, align=PMD)
    m.madvise(MADV.NOHUGEPAGE)
    m.write(0, npages)
    return m


# -- which scans read smaps -------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {"return_mask": ALL9 & ~WPA},
    {"category_anyof_mask": ALL9 & ~WPA, "return_mask": ALL9 & ~WPA},
    {"category_mask": PRES | WR, "return_mask": PRES | WR | SD},
    {"category_inverted": SWAP, "category_mask": SWAP, "return_mask": ALL9 & ~WPA, "max_pages": 700},
    {"return_mask": ALL9 & ~WPA, "vec_len": 1},
])
def test_populated_anonymous_memory_reads_no_smaps(monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any]) -> None:
    needs_pfns()
    with populated(3 * 512 + 7) as m, smaps_reads(monkeypatch) as seen:
        agree(m.addr, m.end, **kw)
        agree(m[5], m[1000], **kw)
        assert seen == []


def test_wpallowed_reads_smaps_of_the_vmas_walked_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """WPALLOWED on a kernel with WP_ASYNC: smaps, as far as the last VMA the walk reaches."""
    with populated(64) as m, smaps_reads(monkeypatch) as seen:
        m.mprotect(PROT.READ, 16, 16)  # three VMAs
        assert agree(m.addr, m.end, return_mask=ALL9)
        assert seen == [m.addr, m[16], m[32]]
        seen.clear()
        agree(m.addr, m.end, return_mask=ALL9, max_pages=10)  # stops in the first VMA
        assert seen == [m.addr]
        seen.clear()
        with pytest.raises(OSError) as info:  # EPERM at the first VMA, as the kernel
            scan(m.addr, m.end, flags=CHK, backend="emulated")
        assert info.value.errno == errno.EPERM
        assert seen == [m.addr]


def test_kernel_without_wp_async_needs_no_smaps_for_wpallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without UFFD_FEATURE_WP_ASYNC no VMA can be WPALLOWED: exact without smaps, and
    CHECK_WPASYNC fails at the first VMA."""
    needs_pfns()
    with populated(600) as m, kernel_without_wp_async(monkeypatch), smaps_reads(monkeypatch) as seen:
        want = regions(m.addr, m.end, "kernel", return_mask=ALL9)[0]
        assert all(not c & WPA for _, _, c in want)
        assert regions(m.addr, m.end, "emulated", return_mask=ALL9)[0] == want
        assert regions(m.addr, m.end, "emulated", category_mask=WPA)[0] == []
        with pytest.raises(OSError) as info:
            scan(m.addr, m.end, flags=CHK, backend="emulated")
        assert info.value.errno == errno.EPERM
        assert seen == []


def test_empty_block_without_page_table_reads_smaps_for_written(monkeypatch: pytest.MonkeyPatch,
                                                                uffd_wp: Userfaultfd) -> None:
    """An untouched PMD block is WRITTEN iff its VMA is uffd-WP: smaps decides, and only
    when WRITTEN matters."""
    with Mapping(2 * 512, align=PMD) as m, Mapping(2 * 512, align=PMD) as w, smaps_reads(monkeypatch) as seen:
        for x in (m, w):
            x.madvise(MADV.NOHUGEPAGE)
            x.write(0, 3)  # block 0 has a table, block 1 none
        uffd_wp.register(w.addr, w.length, RegisterMode.WP)
        for x in (m, w):
            seen.clear()
            agree(x.addr, x.end, return_mask=ALL9 & ~WPA)
            assert seen == [x.addr]
            seen.clear()
            agree(x.addr, x[512], return_mask=ALL9 & ~WPA)  # block 0 only: tables everywhere
            agree(x.addr, x.end, return_mask=PRES | SWAP | FILE)  # WRITTEN not asked
            assert seen == []
        assert regions(w.addr, w.end, "emulated", category_mask=WR)[0] == [(w.addr, w.end, 0)]


def test_file_mappings_read_smaps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with file_mapping(tmp_path / "f", 8) as f, smaps_reads(monkeypatch) as seen:
        f.read(0, 8)
        agree(f.addr, f.end, return_mask=ALL9 & ~WPA)
        assert seen == [f.addr]


def test_special_mappings_are_not_anonymous() -> None:
    vmas = {v.name: v for v in _procfs.read_maps(os.getpid())}
    assert not vmas["[vdso]"].anonymous
    if "[vvar]" in vmas:
        assert not vmas["[vvar]"].anonymous
    assert vmas["[stack]"].anonymous
    with anon(2) as a, Mapping(2, flags=MAP.SHARED | MAP.ANONYMOUS) as s:
        fd = os.open("/dev/zero", os.O_RDWR)
        try:
            with Mapping(2, flags=MAP.PRIVATE, fd=fd) as z:
                def vma(addr: int) -> _procfs.Vma:
                    (v,) = _procfs.read_maps(os.getpid(), addr, addr + P)
                    return v

                assert vma(a.addr).anonymous
                assert vma(z.addr).name == "/dev/zero" and vma(z.addr).anonymous
                assert not vma(s.addr).anonymous  # shmem
        finally:
            os.close(fd)
    assert not hasattr(_procfs.Vma, "anon_private")


def test_thp_candidates_are_confirmed_by_smaps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fully populated block is a THP candidate; with PFNs and kpageflags a base-page
    block is ruled out without smaps, a THP is confirmed by smaps' PMD-mapped bytes."""
    needs_pfns()
    if pagescan.capabilities().thp_mode in ("never", "unavailable"):
        pytest.skip("needs THP")
    with populated(2 * 512) as m, smaps_reads(monkeypatch) as seen:
        agree(m.addr, m.end, return_mask=HUGE | PRES)
        assert seen == []
    with Mapping(2 * 512, align=PMD) as t, smaps_reads(monkeypatch) as seen:
        t.madvise(MADV.HUGEPAGE)
        t.write(0, 2 * 512)
        agree(t.addr, t.end, return_mask=HUGE | PRES)
        if any(c & HUGE for _, _, c in regions(t.addr, t.end, "kernel", return_mask=HUGE)[0]):
            assert seen == [t.addr]


# -- where the VMAs of the range come from: PROCMAP_QUERY (6.11), or maps ------------------------


def _fields(vmas: list[_procfs.Vma]) -> list[tuple[Any, ...]]:
    return [(v.start, v.end, v.perms, v.offset, v.dev, v.inode, v.name) for v in vmas]


def test_procmap_query_lists_what_maps_lists(tmp_path: Path) -> None:
    """PROCMAP_QUERY gives every field of a maps line: the whole address space (file,
    special and anonymous mappings), and a range that starts and ends inside VMAs of a
    mapping split by mprotect."""
    pid = os.getpid()
    with populated(64) as m, file_mapping(tmp_path / "f", 8) as f:
        m.mprotect(PROT.READ, 16, 16)  # three VMAs: rw, r, rw
        f.read(0, 8)
        got = _procfs.query_maps(pid, 0, _procfs.task_size())
        assert got is not None and _procfs.procmap_query_works is True
        assert _fields(got) == _fields(_procfs.read_maps(pid, 0, _procfs.task_size()))
        assert any(v.name == str(tmp_path / "f") and v.inode for v in got)
        inside = _procfs.query_maps(pid, m[8], m[40])
        assert inside is not None
        assert [(v.start, v.end, v.perms) for v in inside] == [
            (m.addr, m[16], "rw-p"), (m[16], m[32], "r--p"), (m[32], m.end, "rw-p")]
        assert _fields(inside) == _fields(_procfs.read_maps(pid, m[8], m[40]))
        assert _procfs.query_maps(pid, m[8], m[8]) == []


@pytest.mark.parametrize("source", ["PROCMAP_QUERY", "maps"])
def test_emulated_scan_from_either_vma_source(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """The same answers whether the VMAs come from PROCMAP_QUERY or (a kernel without it)
    from maps: a range starting inside a VMA, a VMA split by mprotect in the middle, and
    WPALLOWED, which reads smaps (from the bottom: with PROCMAP_QUERY the VMAs below the
    range are counted first) and must find the records it expects (no start-over)."""
    used: list[str] = []
    real_query, real_text = emu.query_maps, emu.read_maps_text

    def query(pid: int, start: int, end: int) -> list[_procfs.Vma] | None:
        got = real_query(pid, start, end)
        used.append("PROCMAP_QUERY" if got is not None else "none")
        return got

    def text(pid: int, end: int = 1 << 64) -> bytes:
        used.append("maps")
        return real_text(pid, end)

    if source == "maps":
        monkeypatch.setattr(_procfs, "procmap_query_works", False)
    monkeypatch.setattr(emu, "query_maps", query)
    monkeypatch.setattr(emu, "read_maps_text", text)
    restarts: list[int] = []
    real_all = getattr(emu, "_read_all_smaps")
    monkeypatch.setattr(emu, "_read_all_smaps", lambda *a: restarts.append(1) or real_all(*a))
    with populated(3 * 512) as m, smaps_reads(monkeypatch) as seen:
        m.mprotect(PROT.READ, 700, 100)  # split in the middle: rw, r, rw
        for lo, hi in ((m[300], m[1200]), (m[750], m[760]), (m[0], m.end)):
            used.clear()
            seen.clear()
            agree(lo, hi, return_mask=ALL9)
            vmas = [(m.addr, m[700]), (m[700], m[800]), (m[800], m.end)]
            assert seen == [s for s, e in vmas if s < hi and e > lo]
            if source == "maps":
                assert used == ["none", "maps"]
            else:  # maps is read only to count the VMAs below the range, for smaps
                assert used == ["PROCMAP_QUERY", "maps"]
            used.clear()
            agree(lo, hi, return_mask=ALL9 & ~WPA)  # no smaps needed
            assert used == (["none", "maps"] if source == "maps" else ["PROCMAP_QUERY"])
    assert restarts == []


def test_huge_empty_reservation_is_exact(uffd_wp: Userfaultfd) -> None:
    """Empty PMD blocks take a shortcut (one value per chunk): a 1 GiB reservation with a
    few written pages, and a uffd-WP one whose empty slots are WRITTEN."""
    G = 1 << 30
    for wp in (False, True):
        with Mapping(G // P, flags=MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE, align=PMD) as m:
            m.madvise(MADV.NOHUGEPAGE)
            for i in (0, 511, 512 * 200 + 7, G // P - 1):
                m.write(i, 1)
            if wp:
                uffd_wp.register(m.addr, m.length, RegisterMode.WP)
            for kw in ({"return_mask": ALL9}, {"return_mask": ALL9 & ~WPA},
                       {"category_mask": WR, "return_mask": WR | PRES}):
                got = agree(m.addr, m.end, **kw)
                assert len(got) >= (1 if "category_mask" in kw and wp else 3), (wp, kw, got)


@pytest.mark.skipif(not pagescan.capabilities().uffd_features & U.UffdFeature.POISON,
                    reason="needs UFFD_FEATURE_POISON (Linux 6.6)")
def test_a_vma_smaps_calls_empty_can_hold_a_marker() -> None:
    """Why the emulation reads pagemap even where smaps counts nothing: a poison marker
    outlives the registration that placed it, in a VMA with ``Rss`` and ``Swap`` 0 and
    no userfaultfd flag; the kernel reports its page SWAPPED."""
    from pagescan._uapi import libc

    # between two PROT_NONE pages: once unregistered, the VMA merges with no neighbour
    outer = libc.mmap(0, 18 * P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE)
    with Mapping(16, addr=outer + P, flags=MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED) as m:
        m._reserve = (outer, 18 * P)  # close() unmaps all of it
        with Userfaultfd(U.UffdFeature.POISON) as uf:
            uf.register(m.addr, m.length, RegisterMode.MISSING)
            uf.poison(m[3], P)
            uf.unregister(m.addr, m.length)
        rec = next(r for r in oracle.smaps() if r.start <= m.addr < r.end)
        assert rec.fields.get("Rss") == 0 and rec.fields.get("Swap") == 0
        assert not {"um", "uw", "ui"} & set(rec.vmflags)
        got = agree(m.addr, m.end, return_mask=ALL9)
        assert (m[3], m[4], SWAP | WR) in got


# -- maps and smaps disagree --------------------------------------------------------------------


@pytest.mark.parametrize("source", ["PROCMAP_QUERY", "maps"])
def test_layout_changed_between_maps_and_smaps_starts_over_from_smaps(monkeypatch: pytest.MonkeyPatch,
                                                                       source: str) -> None:
    """VMAs listed before an mprotect split (by PROCMAP_QUERY, or by maps where the kernel
    has no such ioctl), smaps read after: the emulation notices and answers from smaps
    alone (what the kernel says now)."""
    with populated(64) as m:
        if source == "maps":
            stale_text = _procfs.read_maps_text(os.getpid())
            monkeypatch.setattr(_procfs, "procmap_query_works", False)
            monkeypatch.setattr(emu, "read_maps_text", lambda pid, end=1 << 64: stale_text)
        else:
            stale = _procfs.query_maps(os.getpid(), m.addr, m.end)
            assert stale is not None and len(stale) == 1
            monkeypatch.setattr(emu, "query_maps", lambda pid, start, end: stale)
        m.mprotect(PROT.READ, 16, 16)
        calls: list[int] = []
        real = getattr(emu, "_read_all_smaps")

        def spy(*a: Any, **k: Any) -> Any:
            calls.append(1)
            return real(*a, **k)

        monkeypatch.setattr(emu, "_read_all_smaps", spy)
        agree(m.addr, m.end, return_mask=ALL9)
        assert calls == [1]


# -- the registry of pagescan's uffd registrations -------------------------------------------


def _raw_register(fd: int, start: int, length: int, mode: int) -> None:
    oracle.raw_register(fd, start, length, mode)


def test_registry_records_async_and_sync_registrations() -> None:
    reg = _registry.wp_async_registry
    with anon(4) as a, anon(4) as s, anon(4) as x, Userfaultfd(WP_FEATURES) as ua, \
            Userfaultfd(U.UffdFeature.WP_HUGETLBFS_SHMEM) as us:
        for m in (a, s, x):
            m.write(0, 4)  # before registering: never fault on a MISSING range here
        ua.register(a.addr, a.length, RegisterMode.WP)
        us.register(s.addr, s.length, RegisterMode.WP)
        us.register(x.addr, x.length, RegisterMode.MISSING)
        assert reg.lookup(a.addr, a.end) is True
        assert reg.lookup(s.addr, s.end) is False
        assert reg.lookup(x.addr, x.end) is None  # not WP
        assert reg.lookup(a.addr, s.end) is None  # two uffds: no single registration
        for m in (a, s, x):
            agree(m.addr, m.end, return_mask=ALL9)
            agree(m.addr, m.end, category_mask=WPA, return_mask=ALL9)
        for m, ok in ((a, True), (s, False), (x, False)):
            if ok:
                agree(m.addr, m.end, flags=CHK, return_mask=ALL9)
            else:
                for backend in ("kernel", "emulated"):
                    with pytest.raises(OSError) as info:
                        scan(m.addr, m.end, flags=CHK, backend=backend)
                    assert info.value.errno == errno.EPERM
        ua.unregister(a.addr, a.length)
        assert reg.lookup(a.addr, a.end) is None
        agree(a.addr, a.end, return_mask=ALL9)
    assert reg.lookup(s.addr, s.end) is None  # closed


def test_registry_forgets_a_garbage_collected_uffd() -> None:
    reg = _registry.wp_async_registry
    with anon(4) as m:
        uf = Userfaultfd(WP_FEATURES)
        uf.register(m.addr, m.length, RegisterMode.WP)
        key = id(uf)
        assert reg.lookup(m.addr, m.end) is True
        del uf
        gc.collect()
        assert reg.lookup(m.addr, m.end) is None
        assert all(k != key for _, _, k, _ in reg.spans) and key not in reg.wp_async
        # The kernel closed it too: the VMA is no longer registered; both agree.
        agree(m.addr, m.end, return_mask=ALL9)


def test_registry_asks_the_kernel_whether_an_adopted_uffd_is_async() -> None:
    """``from_fd`` with the wrong features: the registry reads the enabled features from
    /proc/self/fdinfo, so WPALLOWED stays exact."""
    with anon(4) as m:
        src = Userfaultfd(WP_FEATURES)
        fd = src.detach()
        del src
        with Userfaultfd.from_fd(fd, features=0) as uf:
            arm(uf, m)
            m.touch(1)
            assert _registry.wp_async_registry.lookup(m.addr, m.end) is True
            agree(m.addr, m.end, return_mask=ALL9)


def test_registry_replaces_what_a_registration_covers() -> None:
    r = _registry._Registry()
    r.add(1, 0x1000, 0x9000, wp=True, wp_async=True)
    r.add(2, 0x3000, 0x5000, wp=True, wp_async=False)
    assert r.lookup(0x1000, 0x3000) is True and r.lookup(0x3000, 0x5000) is False
    assert r.lookup(0x5000, 0x9000) is True and r.lookup(0x1000, 0x9000) is None
    r.remove(1, 0x6000, 0x7000)
    assert r.lookup(0x5000, 0x6000) is True and r.lookup(0x5000, 0x7000) is None
    r.add(1, 0x1000, 0x2000, wp=False)  # MISSING only now (async-ness already known)
    assert r.lookup(0x1000, 0x2000) is None
    r.add(3, 0x8000, 0x9000, wp=True, fd=None)  # async-ness unknown: only forgotten
    assert r.lookup(0x8000, 0x9000) is None
    r.remove(2)
    assert r.lookup(0x3000, 0x5000) is None and 2 not in r.wp_async


# -- the readers ------------------------------------------------------------------------------


def _plain_smaps() -> list[tuple[int, int, frozenset[str], dict[str, int]]]:
    return [(r.start, r.end, r.vmflags, r.fields) for r in oracle.smaps()]


def test_smaps_reader_matches_a_plain_parse() -> None:
    with Mapping(64, align=PMD) as m:  # PROT_NONE reserve around it: a VMA of its own
        m.write(0, 7)
        plain = {s: (e, f, kb) for s, e, f, kb in _plain_smaps()}
        got = _procfs.read_smaps(os.getpid(), m.addr, m.end)
        assert [(v.start, v.end) for v in got] == [(m.addr, m.end)]
        e, flags, kb = plain[m.addr]
        assert got[0].vmflags == flags and got[0].fields["Rss"] == kb["Rss"] == 7 * P
        assert set(got[0].fields) == set(kb)
        few = _procfs.read_smaps(os.getpid(), m.addr, m.end, _procfs.SCAN_FIELDS)
        assert set(few[0].fields) == {k for k in _procfs.SCAN_FIELDS if k in kb}
        every = _procfs.read_smaps(os.getpid())
        assert [v.start for v in every][:5] == [s for s, *_ in _plain_smaps()][:5]


# -- the engine's fast paths ------------------------------------------------------------------


def _reference(cats: list[int], addr: int, inverted: int, mask: int, anyof: int, rm: int, max_pages: int,
               vec_len: int) -> tuple[list[tuple[int, int, int]], int | None]:
    """The kernel's rules, page by page (``_engine`` module docstring)."""
    out: list[list[int]] = []
    found = 0
    for i, c in enumerate(cats):
        x = c ^ inverted
        if (x & mask) != mask or (anyof and not x & anyof) or not vec_len:
            continue
        a = addr + i * P
        if max_pages and found >= max_pages:
            return [tuple(r) for r in out], a  # type: ignore[misc]
        if out and out[-1][1] == a and out[-1][2] == c & rm:
            out[-1][1] = a + P
        elif len(out) == vec_len:
            return [tuple(r) for r in out], a  # type: ignore[misc]
        else:
            out.append([a, a + P, c & rm])
        found += 1
    return [tuple(r) for r in out], None  # type: ignore[misc]


def test_engine_fast_paths_follow_the_rules() -> None:
    import numpy as np

    from pagescan import PAGE_REGION_DTYPE, _engine

    rng = np.random.default_rng(7)
    addr = 0x7F0000000000
    for case in range(400):
        n = int(rng.integers(1, 300))
        # Runs of equal values (often one value for everything), a few distinct values.
        values = rng.choice([0x8, 0xA, 0x2, 0x0, 0x48, 0x1A], size=int(rng.integers(1, 6)))
        cats = np.repeat(rng.choice(values, size=n // 8 + 1), 8)[:n].astype(np.uint64)
        if case % 3 == 0:
            cats[:] = cats[0]
        inverted, mask, anyof = (int(rng.choice([0, 0, 0x8, 0x2, 0xA, 0x40])) for _ in range(3))
        if case % 2:
            mask = anyof = 0  # the no-mask path
        rm = int(rng.choice([0x1FF, 0x1FE, 0x8, 0x2, 0]))
        max_pages = int(rng.choice([0, 0, 1, 5, 17, n]))
        vec_len = int(rng.choice([0, 1, 2, 3, 100]))
        want_regions, want_end = _reference([int(c) for c in cats], addr, inverted, mask, anyof, rm, max_pages,
                                            vec_len)
        dtype = np.uint16 if case % 4 < 2 else np.uint64
        out = np.zeros(max(vec_len, 1), PAGE_REGION_DTYPE)
        col = _engine.Collector(out, 0, vec_len, inverted=inverted, mask=mask, anyof=anyof, return_mask=rm,
                                max_pages=max_pages, page_size=P)
        pos = 0
        while pos < n:
            k = int(rng.integers(1, n - pos + 1))
            piece = cats[pos : pos + k].astype(dtype)
            if (piece == piece[0]).all() and rng.random() < 0.7:
                piece = np.broadcast_to(piece[0], piece.shape)  # one value: zero-stride
            if not col.feed(addr + pos * P, piece):
                break
            pos += k
        got_n, got_end = col.result(addr + n * P)
        assert [tuple(int(x) for x in r) for r in out[:got_n].tolist()] == want_regions, case
        assert got_end == (addr + n * P if want_end is None else want_end), case
