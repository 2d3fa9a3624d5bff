"""Differential tests: the emulated backend against the kernel's ``PAGEMAP_SCAN``.

Each layout is one reserved stretch of address space filled, side by side, with real
mappings of every kind the foundation's fixtures make -- private anonymous pages written,
read (zero page), untouched, zapped (``MADV_DONTNEED``), swapped (zram), guard pages;
pages moved in with ``mremap``; ``MAP_PRIVATE`` ``/dev/zero``; shared anonymous memory
and memfds (also paged out, also private); private and shared files with fault-around;
PMD THPs, split, zapped and ``mprotect``-split THPs and the huge zero page; hugetlb,
private and shared, sometimes armed; uffd-WP async ranges on anonymous memory, memfds,
files and THPs with pages written before and after arming, read, zapped, swapped while
armed, poisoned and ``UFFDIO_ZEROPAGE``'d; over 512 alternating runs; pages CoW-shared
with a forked child (which is scanned too); ``mprotect`` splits; unmapped holes and
``PROT_NONE`` gaps. For each layout a seeded generator draws hundreds of argument sets
(sub-ranges with aligned starts and sometimes unaligned ends, all nine category bits in
the four masks, the kernel's WRITTEN fast path, ``vec_len`` 0/1/small/large,
``max_pages``, ``CHECK_WPASYNC``), and three answers must agree exactly:
``backend="kernel"``, ``backend="emulated"`` and the raw ioctl (regions, ``walk_end``,
errno; the raw ``walk_end`` only where it is not the kernel's documented stale value).
The same is run with the emulation's pagemap chunk shrunk to 1, 7 and 512 pages.

States the emulation cannot know by design (module docstring of
:mod:`pagescan._backend_emulated`) are kept out of the random layouts and pinned by
explicit tests at the end of this file instead:

* a PMD block whose pages were all zapped keeps its page table, so the kernel reports its
  empty slots WRITTEN; pagemap cannot show that table. The layouts keep a non-empty page
  in every PMD block they touch;
* WPALLOWED / ``CHECK_WPASYNC`` for uffd-WP registrations pagescan did not make
  (EOPNOTSUPP);
* HUGE in a VMA where a PTE-mapped THP is indistinguishable from a PMD-mapped one
  (EOPNOTSUPP);
* ``PM_SCAN_WP_MATCHING`` (EOPNOTSUPP).

The machine may change memory behind the test's back (reclaim, DAMON); a disagreement is
re-checked on a pagemap snapshot that stays the same, see :func:`run_cases`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pagescan
from pagescan import MADV, PAGE_REGION_DTYPE, Category, RegisterMode, Userfaultfd, scan
from pagescan import _backend_emulated as emu
from pagescan._target import self_target
from pagescan._uapi import libc
from pagescan._uapi import userfaultfd as U
from pagescan._uapi.mman import MAP, MAP_HUGE_SHIFT, PROT
from pagescan._procfs import task_size

from . import oracle
from .conftest import WP_FEATURES, arm, page_out, requires_pagemap_scan, requires_thp, requires_wp_async
from .memory import P, Mapping, anon, child_process, pagemap_entries, thp_size

pytestmark = [requires_pagemap_scan, requires_wp_async, requires_thp]

WPA, WR, FILE, PRES, SWAP, ZERO, HUGE, SD, GUARD = (int(c) for c in Category)
ALL9 = 0x1FF
CHK = int(pagescan.PM_SCAN_CHECK_WPASYNC)
WP = int(pagescan.PM_SCAN_WP_MATCHING)
H = thp_size()
HP = H // P
HT = 2 << 20  # hugetlb page size used here (the x86-64 default)
CAPS = pagescan.capabilities()
HAVE_GUARD = bool(CAPS.guard_regions and CAPS.categories & Category.GUARD)
TASK_SIZE = task_size()
#: Above this many regions the raw ioctl's walk_end may be stale (docs/kernel-facts.md).
STALE_AFTER = 512


# -- layouts -----------------------------------------------------------------------------


@dataclass
class Piece:
    kind: str
    start: int
    end: int
    states: str = ""


@dataclass
class Layout:
    """Mappings side by side in one reserved span; ``owned`` = span minus the holes."""

    base: int
    length: int
    owned: list[tuple[int, int]]
    pieces: list[Piece] = field(default_factory=list)
    mappings: list[Mapping] = field(default_factory=list)
    cursor: int = 0
    forked: bool = False
    child: int = 0
    used: int = 0  # end of the last piece; the rest of the span stays PROT_NONE
    maps_snapshot: list[str] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.base + self.length

    def describe(self) -> str:
        parts = [f"span {self.base:#x}+{self.length // P}p fork={self.forked}"]
        for p in self.pieces:
            parts.append(f"  {p.kind:12s} [{(p.start - self.base) // P}, {(p.end - self.base) // P}) {p.states}")
        return "\n".join(parts)

    def boundaries(self) -> list[int]:
        """Interesting page-aligned addresses: piece and VMA edges, PMD boundaries."""
        out = {self.base, self.end}
        for p in self.pieces:
            out.update((p.start, p.end))
        for a in range(self.base - self.base % H + H, self.end, H):
            out.add(a)
        return sorted(out)


def vmas_in(lo: int, hi: int) -> list[str]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            s, _, rest = line.partition("-")
            e = rest.split(" ", 1)[0]
            if int(e, 16) > lo and int(s, 16) < hi:
                out.append(line.split(" ", 1)[0] + " " + line.split()[1])
    return out


class Builder:
    """Builds one random layout from a seed; everything it maps is released by ``close``."""

    def __init__(self, seed: int, tmp_path: Path, uffd: Userfaultfd, stack: contextlib.ExitStack) -> None:
        self.rng = random.Random(seed)
        self.tmp = tmp_path
        self.uffd = uffd
        self.stack = stack
        self.nfile = 0
        length = 24 << 20
        raw = libc.mmap(0, length + H, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE)
        base = -(-raw // H) * H
        # Keep only the aligned span reserved.
        if base > raw:
            libc.munmap(raw, base - raw)
        libc.munmap(base + length, raw + length + H - (base + length))
        self.lay = Layout(base, length, [(base, base + length)])
        self.lay.cursor = base + self.rng.randrange(0, 64) * P
        stack.callback(self.close)

    # -- address space ---------------------------------------------------------------

    def close(self) -> None:
        for m in self.lay.mappings:
            m.closed = True  # unmapped below, with the rest of the span
        for lo, hi in self.lay.owned:
            libc.munmap(lo, hi - lo)
        self.lay.owned = []

    def take(self, size: int, align: int = P) -> int:
        addr = -(-self.lay.cursor // align) * align
        if addr + size > self.lay.end:
            raise _Full
        self.lay.cursor = addr + size
        return addr

    def hole(self) -> None:
        n = self.rng.randint(1, 4)
        addr = self.take(n * P)
        libc.munmap(addr, n * P)
        owned = []
        for lo, hi in self.lay.owned:
            if hi <= addr or lo >= addr + n * P:
                owned.append((lo, hi))
            else:
                if lo < addr:
                    owned.append((lo, addr))
                if hi > addr + n * P:
                    owned.append((addr + n * P, hi))
        self.lay.owned = owned
        self.lay.pieces.append(Piece("hole", addr, addr + n * P))

    def gap(self) -> None:
        """Leave some of the PROT_NONE reservation in place (an inert VMA)."""
        n = self.rng.randint(1, 8)
        addr = self.take(n * P)
        self.lay.pieces.append(Piece("prot_none", addr, addr + n * P))

    def map(self, kind: str, npages: int, *, flags: int = MAP.PRIVATE | MAP.ANONYMOUS, fd: int = -1,
            page_size: int = P, align: int = P, prot: int = PROT.READ | PROT.WRITE) -> Mapping:
        addr = self.take(npages * page_size, align)
        m = Mapping(npages, prot=prot, flags=flags | MAP.FIXED, fd=fd, addr=addr, page_size=page_size)
        self.lay.mappings.append(m)
        self.lay.pieces.append(Piece(kind, m.addr, m.end))
        return m

    # -- per-page states ---------------------------------------------------------------

    def states(self, m: Mapping, alphabet: str, *, keeper: str = "W", empty: str = "DO",
               untouched_empty: bool = True) -> str:
        """Random states, then a keeper per PMD block segment that allocated a table but
        would otherwise be left with nothing but empty slots (the documented divergence)."""
        rng = self.rng
        weights = [6 if c in "WRU" else 3 for c in alphabet]
        st = rng.choices(alphabet, weights=weights, k=m.npages)
        first = 0
        while first < m.npages:
            block_end = (m[first] // H + 1) * H
            last = min(m.npages, (block_end - m.addr) // P)
            seg = st[first:last]
            touched = any(c != "U" for c in seg) or not untouched_empty
            nonempty = any(c not in empty and (c != "U" or not untouched_empty) for c in seg)
            if touched and not nonempty:
                st[rng.randrange(first, last)] = keeper
            first = last
        return "".join(st)

    def apply(self, m: Mapping, st: str, *, zap_swap: bool = False) -> None:
        for i, c in enumerate(st):
            if c == "W":
                m.touch(i, 1, 0x5A)
            elif c == "R":
                m.read_byte(i)
            elif c == "D":
                m.touch(i, 1, 0x11)
                m.madvise(MADV.DONTNEED, i, 1)
            elif c == "G":
                m.madvise(MADV.GUARD_INSTALL, i, 1)
        swapped = [i for i, c in enumerate(st) if c in "SO"]
        for i in swapped:
            m.touch(i, 1, 0x77)
        if swapped and not zap_swap:
            for i in swapped:
                page_out(m, i, 1)
        elif swapped:
            for i in swapped:
                m.madvise(MADV.PAGEOUT, i, 1)

    def maybe_mprotect(self, m: Mapping, st: str) -> None:
        if m.npages >= 4 and self.rng.random() < 0.4:
            a = self.rng.randrange(1, m.npages - 1)
            b = self.rng.randrange(a + 1, m.npages)
            prot = self.rng.choice([PROT.READ, PROT.NONE])
            m.mprotect(prot, a, b - a)
            self.lay.pieces[-1].states += f" {'ro' if prot else 'none'}[{a},{b})"

    # -- the kinds -----------------------------------------------------------------------

    def anon(self) -> None:
        m = self.map("anon", self.rng.randint(1, 48))
        st = self.states(m, "UWRDSG" if HAVE_GUARD else "UWRDS")
        self.apply(m, st)
        self.lay.pieces[-1].states = st
        self.maybe_mprotect(m, st)

    def moved(self) -> None:
        """Anonymous pages written elsewhere, then moved into place with mremap."""
        n = self.rng.randint(1, 24)
        addr = self.take(n * P)
        with anon(n) as src:
            st = self.states(src, "UWRD")
            self.apply(src, st)
            got = _mremap(src.addr, src.length, src.length, MREMAP_MAYMOVE | MREMAP_FIXED, addr)
            assert got == addr
            src.closed = True  # its pages live at addr now
        m = Mapping.__new__(Mapping)
        m.page_size, m.npages, m.length, m._reserve, m.addr, m.closed = P, n, n * P, None, addr, False
        self.lay.mappings.append(m)
        self.lay.pieces.append(Piece("moved", addr, addr + n * P, st))

    def checker(self) -> None:
        """Over 512 runs (written / untouched / zero page in turn): the kernel flushes its
        bounce buffer mid-call, and after such a call its raw walk_end can be stale."""
        n = self.rng.randint(1100, 1500)
        m = self.map("checker", n)
        pattern = self.rng.choice(["WU", "WR", "WUR"])
        st = (pattern * n)[:n]
        for i, c in enumerate(st):
            if c == "W":
                m.touch(i, 1, 0x12)
            elif c == "R":
                m.read_byte(i)
        self.lay.pieces[-1].states = pattern

    def devzero(self) -> None:
        fd = os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC)
        try:
            m = self.map("devzero", self.rng.randint(1, 24), flags=MAP.PRIVATE, fd=fd)
        finally:
            os.close(fd)
        st = self.states(m, "UWRD")
        self.apply(m, st)
        self.lay.pieces[-1].states = st

    def shared(self) -> None:
        n = self.rng.randint(1, 32)
        kind = self.rng.choice(["shared_anon", "memfd", "memfd_private"])
        if kind == "shared_anon":
            m = self.map(kind, n, flags=MAP.SHARED | MAP.ANONYMOUS)
        else:
            fd = os.memfd_create("pagescan-diff", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, n * P)
                m = self.map(kind, n, flags=MAP.PRIVATE if kind == "memfd_private" else MAP.SHARED, fd=fd)
            finally:
                os.close(fd)
        alphabet = ("UWRD" if kind == "memfd_private" else "UWRDO") + ("G" if HAVE_GUARD else "")
        st = self.states(m, alphabet)
        self.apply(m, st, zap_swap=True)
        self.lay.pieces[-1].states = st
        self.maybe_mprotect(m, st)

    def file(self) -> None:
        n = self.rng.randint(1, 40)
        shared = self.rng.random() < 0.5
        self.nfile += 1
        path = self.tmp / f"layout-{self.nfile}.bin"
        path.write_bytes(b"f" * (n * P))
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            m = self.map("file_shared" if shared else "file_private", n,
                         flags=MAP.SHARED if shared else MAP.PRIVATE, fd=fd)
        finally:
            os.close(fd)
        # Reads fault around (maps cached neighbours); a block whose only touch was a
        # read keeps the read page, so keepers are needed only for zaps.
        st = self.states(m, ("UWRDO" if shared else "UWRD") + ("G" if HAVE_GUARD else ""))
        self.apply(m, st, zap_swap=True)
        self.lay.pieces[-1].states = st

    def thp(self) -> None:
        variant = self.rng.choice(["full", "full", "split", "zero", "zapped", "mprot"])
        n = 2 if variant == "zapped" else 1
        m = self.map("thp", n * HP, align=H)
        m.madvise(MADV.HUGEPAGE)
        if variant == "zero":
            m.read_byte(self.rng.randrange(HP))
        else:
            m.write(0, m.npages, 0x42)
            if not _pmd_mapped(m):
                with contextlib.suppress(OSError):
                    m.madvise(MADV.COLLAPSE)
        # No khugepaged changes behind our back from here on.
        m.madvise(MADV.NOHUGEPAGE)
        huge = _huge_zero(m) if variant == "zero" else _pmd_mapped(m)
        if variant == "split":
            a = self.rng.randrange(0, HP - 1)
            k = self.rng.randint(1, min(64, HP - 1 - a))
            m.madvise(MADV.DONTNEED, a, k)
            variant += f"[{a},{a + k})"
        elif variant == "zapped" and huge:
            m.madvise(MADV.DONTNEED, HP, HP)  # the whole PMD goes: no page table left
        elif variant == "mprot":
            a = self.rng.randrange(1, HP - 1)
            b = self.rng.randrange(a + 1, HP)
            m.mprotect(PROT.READ, a, b - a)
            variant += f"[{a},{b})"
        self.lay.pieces[-1].states = f"{variant} pmd={huge}"

    def hugetlb(self, budget: list[int]) -> None:
        n = self.rng.randint(1, 2)
        if budget[0] < n:
            return
        budget[0] -= n
        shared = self.rng.random() < 0.5
        flags = (MAP.SHARED if shared else MAP.PRIVATE) | MAP.ANONYMOUS | MAP.HUGETLB | (21 << MAP_HUGE_SHIFT)
        m = self.map("hugetlb_shared" if shared else "hugetlb", n, flags=flags, page_size=HT, align=HT)
        st = "".join(self.rng.choice("UWR") for _ in range(n))
        for i, c in enumerate(st):
            if c == "W":
                m.touch(i, 1, 0x21)
            elif c == "R":
                m.read_byte(i)
        if self.rng.random() < 0.3:
            arm(self.uffd, m)
            st += " armed"
            if "W" in st and self.rng.random() < 0.5:
                m.touch(st.index("W"), 1, 0x22)
                st += " rewritten"
        self.lay.pieces[-1].states = st

    def uffd_range(self) -> None:
        kind = self.rng.choice(["uffd_anon", "uffd_anon", "uffd_memfd", "uffd_file", "uffd_thp"])
        if kind == "uffd_thp":
            return self.uffd_thp()
        n = self.rng.randint(1, 40)
        if kind == "uffd_anon":
            m = self.map(kind, n)
        elif kind == "uffd_memfd":
            fd = os.memfd_create("pagescan-diff-wp", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, n * P)
                m = self.map(kind, n, flags=MAP.SHARED, fd=fd)
            finally:
                os.close(fd)
        else:
            self.nfile += 1
            path = self.tmp / f"layout-wp-{self.nfile}.bin"
            path.write_bytes(b"w" * (n * P))
            shared = self.rng.random() < 0.5
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                m = self.map(kind, n, flags=MAP.SHARED if shared else MAP.PRIVATE, fd=fd)
            finally:
                os.close(fd)
        # Before arming: A written (stays protected), S written then swapped out while
        # armed, P poisoned (UFFDIO_POISON marker), Z UFFDIO_ZEROPAGE (zero page);
        # after arming: W written, R read, D zapped, U left as a marker.
        alphabet = {"uffd_anon": "AWRDUSPZ", "uffd_memfd": "AWRDUP", "uffd_file": "AWRDU"}[kind]
        st = self.states(m, alphabet, keeper="A", empty="D", untouched_empty=False)
        for i, c in enumerate(st):
            if c in "AS":
                m.touch(i, 1, 0x33)
        self.uffd.register(m.addr, m.length, RegisterMode.WP)
        for i, c in enumerate(st):
            if c == "P":
                self.uffd.poison(m[i], P)
            elif c == "Z":
                self.uffd.zeropage(m[i], P)
        self.uffd.writeprotect(m.addr, m.length)
        for i, c in enumerate(st):
            if c == "W":
                m.touch(i, 1, 0x44)
            elif c == "R":
                m.read_byte(i)
            elif c == "D":
                m.madvise(MADV.DONTNEED, i, 1)
            elif c == "S":
                page_out(m, i, 1)
        self.lay.pieces[-1].states = st

    def uffd_thp(self) -> None:
        """A PMD THP armed as a whole (PMD-level uffd-wp), then maybe written or zapped."""
        m = self.map("uffd_thp", HP, align=H)
        m.madvise(MADV.HUGEPAGE)
        m.write(0, HP, 0x42)
        if not _pmd_mapped(m):
            with contextlib.suppress(OSError):
                m.madvise(MADV.COLLAPSE)
        m.madvise(MADV.NOHUGEPAGE)
        huge = _pmd_mapped(m)
        arm(self.uffd, m)
        variant = self.rng.choice(["armed", "written", "zapped"])
        if variant == "written":  # splits the PMD (WP-async fault on a huge PMD)
            i = self.rng.randrange(HP)
            m.touch(i, 1, 0x43)
            variant += f"[{i}]"
        elif variant == "zapped":
            a = self.rng.randrange(0, HP - 1)
            k = self.rng.randint(1, HP - a)
            m.madvise(MADV.DONTNEED, a, k)
            variant += f"[{a},{a + k})"
        self.lay.pieces[-1].states = f"{variant} pmd={huge}"

    def build(self, hugetlb_budget: int, *, allow_fork: bool = True) -> Layout:
        rng = self.rng
        kinds = ["anon", "anon", "devzero", "moved", "shared", "shared", "file", "file", "thp", "uffd", "uffd",
                 "hugetlb"]
        budget = [hugetlb_budget]
        order = kinds + rng.choices(kinds, k=rng.randint(2, 6)) + (["checker"] if rng.random() < 0.5 else [])
        rng.shuffle(order)
        with contextlib.suppress(_Full):
            for kind in order:
                r = rng.random()
                if r < 0.25:
                    self.hole()
                elif r < 0.4:
                    self.gap()
                if kind == "uffd":
                    self.uffd_range()
                elif kind == "hugetlb":
                    self.hugetlb(budget)
                else:
                    getattr(self, kind)()
            if rng.random() < 0.3:
                self.hole()
        if allow_fork and rng.random() < 0.4:
            self.fork()
        self.lay.used = -(-self.lay.cursor // P) * P
        self.lay.maps_snapshot = vmas_in(self.lay.base, self.lay.end)
        return self.lay

    def fork(self) -> None:
        """A child that sleeps: every private page of the parent is now CoW-shared.
        Then the parent writes a few anonymous pages again (CoW breaks)."""
        self.lay.child = self.stack.enter_context(child_process(lambda: None))
        self.lay.forked = True
        for p in self.lay.pieces:
            if p.kind == "anon" and "[" not in p.states and self.rng.random() < 0.5:
                for i, c in enumerate(p.states):
                    if c == "W" and self.rng.random() < 0.5:
                        ctypes.memset(p.start + i * P, 0x66, 1)


class _Full(Exception):
    pass


MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2


def _mremap(old: int, old_size: int, new_size: int, flags: int, new: int) -> int:
    fn = ctypes.CDLL(None, use_errno=True).mremap
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    got = fn(old, old_size, new_size, flags, new)
    if got is None or got == ctypes.c_void_p(-1).value:
        libc.raise_errno(ctypes.get_errno(), "mremap")
    return int(got)


def _pmd_mapped(m: Mapping) -> bool:
    from .memory import smaps_field

    return smaps_field(m, "AnonHugePages") * 1024 >= H


def _huge_zero(m: Mapping) -> bool:
    """The huge zero PMD: present with PM_FILE in an anonymous VMA (docs/kernel-facts.md)."""
    return all(e >> 63 & 1 and e >> 61 & 1 for e in pagemap_entries(m.addr, m.npages))


@contextlib.contextmanager
def layout(seed: int, tmp_path: Path, uffd: Userfaultfd, hugetlb_budget: int) -> Iterator[Layout]:
    with contextlib.ExitStack() as stack:
        b = Builder(seed, tmp_path, uffd, stack)
        lay = b.build(hugetlb_budget)
        yield lay
        assert vmas_in(lay.base, lay.end) == lay.maps_snapshot, "the layout changed under the test"


# -- the three answers --------------------------------------------------------------------


Outcome = tuple  # ("ok", regions, walk_end) | ("err", errno)


def via_scan(backend: str, start: int, end: int, a: dict[str, int], target: Any = None) -> Outcome:
    try:
        r = scan(start, end, backend=backend, pid=target, **a)
    except OSError as exc:
        return ("err", exc.errno, f"{type(exc).__name__}: {exc}")
    return ("ok", r.regions.tolist(), r.walk_end)


def via_ioctl(start: int, end: int, a: dict[str, int], target: Any = None) -> Outcome:
    """The raw ioctl, with the caller's ``vec_len`` unclamped (the buffer holds as many
    regions as the range can produce, so the kernel never writes past it)."""
    vec_len = a["vec_len"]
    cap = max(0, (end - start + P - 1) // P) + 1 if end >= start else 1
    vec = np.zeros(max(1, min(vec_len, cap)), PAGE_REGION_DTYPE)
    r = oracle.raw_scan(
        start, end, fd=(target or self_target()).fd, flags=a["flags"], vec=int(vec.ctypes.data) if vec_len else 0,
        vec_len=vec_len, max_pages=a["max_pages"], category_inverted=a["category_inverted"],
        category_mask=a["category_mask"], category_anyof_mask=a["category_anyof_mask"],
        return_mask=a["return_mask"],
    )
    if r.err:
        return ("err", r.err, os.strerror(r.err))
    return ("ok", vec[: r.ret].tolist(), r.walk_end)


def rounded(end: int) -> int:
    return -(-end // P) * P


def check_case(start: int, end: int, a: dict[str, int], target: Any = None) -> str | None:
    """None if the three answers agree, else a description of the disagreement."""
    k = via_scan("kernel", start, end, a, target)
    e = via_scan("emulated", start, end, a, target)
    r = via_ioctl(start, end, a, target)
    problems = []
    if k[0] != e[0] or k[1] != e[1] or (k[0] == "ok" and k[2] != e[2]):
        problems.append(f"kernel {_short(k)}\n  emulated {_short(e)}")
    if k[0] != r[0] or k[1] != r[1]:
        problems.append(f"kernel {_short(k)}\n  raw ioctl {_short(r)}")
    elif k[0] == "ok" and k[2] != r[2]:
        n = len(r[1])
        stale = n > STALE_AFTER and r[2] < r[1][-1][1] and k[2] == rounded(end)
        if not stale:
            problems.append(f"walk_end: scan() {k[2]:#x}, raw ioctl {r[2]:#x} after {n} regions")
    if problems:
        return "\n  ".join(problems)
    return None


def _short(o: Outcome) -> str:
    if o[0] == "err":
        return f"errno {o[1]} ({o[2]})"
    regs = o[1]
    body = ", ".join(f"({s:#x},{(e - s) // P}p,{c:#x})" for s, e, c in regs[:6])
    more = f" ... +{len(regs) - 6}" if len(regs) > 6 else ""
    return f"{len(regs)} regions [{body}{more}] walk_end {o[2]:#x}"


# -- random arguments -----------------------------------------------------------------------


def random_mask(rng: random.Random, p_zero: float) -> int:
    if rng.random() < p_zero:
        return 0
    k = rng.choice([1, 1, 1, 2, 2, 3, 9])
    return sum(1 << b for b in rng.sample(range(9), min(k, 9)))


#: How often each category bit is drawn for require/exclude: rare states (SOFT_DIRTY is
#: never set without CONFIG_MEM_SOFT_DIRTY, GUARD pages are few) less often.
BIT_WEIGHTS = [2, 3, 3, 3, 2, 2, 2, 1, 1]


def _weighted_bits(rng: random.Random, k: int) -> list[int]:
    out: list[int] = []
    while len(out) < k:
        b = rng.choices(range(9), weights=BIT_WEIGHTS)[0]
        if b not in out:
            out.append(b)
    return out


def random_args(rng: random.Random, lay: Layout) -> tuple[int, int, dict[str, int]]:
    edges = lay.boundaries()
    if rng.random() < 0.4:
        start = rng.choice(edges[:-1])
    else:
        start = min(lay.base + rng.randrange((lay.used - lay.base) // P + 8) * P, lay.end - P)
    room = (lay.end - start) // P
    shape = rng.random()
    if shape < 0.05:
        end = start  # empty range
    elif shape < 0.3:
        later = [x for x in edges if x > start]
        end = rng.choice(later) if later else lay.end
    elif shape < 0.7:
        end = start + rng.randint(1, min(room, 64)) * P
    elif shape < 0.95:
        end = start + rng.randint(1, max(1, min(room, (lay.used - start) // P + 8))) * P
    else:
        end = start + rng.randint(1, room) * P
    if rng.random() < 0.2 and end > start:
        end -= rng.randint(1, P - 1)  # unaligned end: rounded up by the kernel
    r = rng.random()
    if r < 0.1:  # the kernel's WRITTEN fast path
        masks = {"category_inverted": 0, "category_mask": WR, "category_anyof_mask": 0, "return_mask": WR}
    elif r < 0.3:  # anything goes
        masks = {
            "category_inverted": random_mask(rng, 0.5),
            "category_mask": random_mask(rng, 0.4),
            "category_anyof_mask": random_mask(rng, 0.5),
            "return_mask": random_mask(rng, 0.1),
        }
    else:  # require / exclude / anyof filters, which mostly match something
        bits = _weighted_bits(rng, 5)
        require = sum(1 << b for b in bits[: rng.choice([0, 0, 1, 1, 2])])
        exclude = sum(1 << b for b in bits[2 : 2 + rng.choice([0, 0, 1, 2])])
        anyof = 0 if rng.random() < 0.6 else sum(1 << b for b in rng.sample(range(9), rng.randint(1, 3)))
        masks = {
            "category_inverted": exclude | (random_mask(rng, 0.9) & ~require),
            "category_mask": require | exclude,
            "category_anyof_mask": anyof,
            "return_mask": ALL9 if rng.random() < 0.5 else random_mask(rng, 0.1),
        }
    vec_len = rng.choice([0, 1, 1, 2, 3, 5, 8, 1 << 16, 1 << 20])
    max_pages = 0 if rng.random() < 0.6 else rng.choice([1, 2, 3, rng.randint(1, 600)])
    big = [p for p in lay.pieces if p.kind == "checker"]
    if big and rng.random() < 0.06:  # over 512 regions in one call, around the buffer sizes
        p = big[0]
        start = p.start + rng.randrange(64) * P
        end = rng.choice([p.end, lay.used])
        vec_len = rng.choice([511, 512, 513, 700, 1 << 16])
        masks["category_anyof_mask"] = 0
        masks["category_mask"] &= PRES | WR
        masks["category_inverted"] &= ~masks["category_mask"]
    flags = CHK if rng.random() < 0.15 else 0
    return start, end, dict(masks, vec_len=vec_len, max_pages=max_pages, flags=flags)


def run_cases(lay: Layout, seed: int, n: int) -> int:
    """``n`` random cases; in a forked layout a quarter of them scan the sleeping child.

    The machine may change memory behind the test's back (reclaim, DAMON pageout,
    compaction). A disagreement is therefore re-checked with a pagemap snapshot of the
    layout taken before and after: it counts as transient only if the snapshot moved and
    the re-check then agrees on unchanged memory; a handful of transients is tolerated.
    """
    rng = random.Random(seed * 7919 + 1)
    failures = []
    transient = 0
    with contextlib.ExitStack() as stack:
        child = stack.enter_context(pagescan.Target(lay.child)) if lay.child else None
        for i in range(n):
            start, end, a = random_args(rng, lay)
            target = child if child is not None and rng.random() < 0.25 else None
            before = snapshot(lay, target)
            bad = check_case(start, end, a, target)
            if bad and snapshot(lay, target) != before:
                bad = recheck(lay, start, end, a, target)
                transient += bad is None
            if bad:
                who = "child" if target is not None else "self"
                failures.append(f"case {i} ({who}): [{start:#x}, {end:#x}) {a}\n  {bad}")
                if len(failures) >= 5:
                    break
    assert not failures, lay.describe() + "\n" + "\n".join(failures)
    assert transient <= max(3, n // 50), f"{transient} cases saw memory change under them"
    return n


def snapshot(lay: Layout, target: Any) -> bytes:
    fd = (target or self_target()).fd
    return os.pread(fd, (lay.used - lay.base) // P * 8 + 64, lay.base // P * 8)


def recheck(lay: Layout, start: int, end: int, a: dict[str, int], target: Any) -> str | None:
    """The case again, until it runs on memory that stays the same."""
    for _ in range(3):
        before = snapshot(lay, target)
        bad = check_case(start, end, a, target)
        if snapshot(lay, target) == before:
            return bad
    return "memory kept changing under the test"


# -- the random differential ------------------------------------------------------------------

LAYOUT_SEEDS = list(range(16))
CASES_PER_LAYOUT = 260


@pytest.fixture
def hugetlb_budget(hugetlb_2m: int) -> int:
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
        free = int(f.read())
    return min(4, free)


@pytest.mark.parametrize("seed", LAYOUT_SEEDS)
def test_random_layouts_agree(seed: int, tmp_path: Path, uffd_wp: Userfaultfd, zram_swap: str,
                              hugetlb_budget: int) -> None:
    with layout(seed, tmp_path, uffd_wp, hugetlb_budget) as lay:
        run_cases(lay, seed, CASES_PER_LAYOUT)


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_random_layouts_agree_in_small_chunks(chunk: int, tmp_path: Path, uffd_wp: Userfaultfd,
                                              zram_swap: str, hugetlb_budget: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulation reads pagemap in bounded chunks; with tiny chunks every region and
    every stop (buffer full, max_pages) crosses chunk boundaries somewhere."""
    monkeypatch.setattr(emu, "CHUNK_PAGES", chunk)
    seed = 100 + chunk
    with layout(seed, tmp_path, uffd_wp, hugetlb_budget) as lay:
        run_cases(lay, seed, 60 if chunk == 1 else 120)


def test_layout_generator_covers_every_kind(tmp_path: Path, uffd_wp: Userfaultfd, zram_swap: str,
                                            hugetlb_budget: int) -> None:
    """The seeds above really build every mapping kind and state (so the agreement
    means something): from the pieces built and the categories the kernel reports."""
    kinds: set[str] = set()
    states: set[str] = set()
    forked = False
    categories = 0
    for seed in LAYOUT_SEEDS:
        with layout(seed, tmp_path, uffd_wp, hugetlb_budget) as lay:
            kinds.update(p.kind for p in lay.pieces)
            for p in lay.pieces:
                states.update(p.kind + ":" + c for c in p.states.split(" ")[0])
                if p.kind in ("thp", "uffd_thp"):
                    variant = p.states.split("[")[0].split(" ")[0]
                    states.add(f"{p.kind}:{variant}" + ("+pmd" if "True" in p.states else ""))
            forked |= lay.forked
            res = scan(lay.base, lay.end, category_anyof_mask=ALL9, return_mask=ALL9, backend="kernel")
            for c in np.unique(res.regions["categories"]).tolist():
                categories |= int(c)
    want_kinds = {"anon", "checker", "devzero", "moved", "shared_anon", "memfd", "memfd_private", "file_shared", "file_private",
                  "thp", "hugetlb", "hugetlb_shared", "uffd_anon", "uffd_memfd", "uffd_file", "uffd_thp", "hole",
                  "prot_none"}
    assert want_kinds <= kinds, want_kinds - kinds
    want_states = {"anon:W", "anon:R", "anon:D", "anon:S", "anon:U", "uffd_anon:S", "uffd_anon:D",
                   "uffd_anon:R", "uffd_anon:U", "uffd_anon:P", "uffd_anon:Z", "shared_anon:O", "moved:W", "memfd:O", "file_private:R",
                   "thp:full+pmd", "thp:zero+pmd", "thp:split+pmd", "thp:zapped+pmd", "thp:mprot+pmd",
                   "uffd_thp:armed+pmd", "uffd_thp:written+pmd", "uffd_thp:zapped+pmd"}
    if HAVE_GUARD:
        want_states |= {"anon:G", "memfd:G", "file_shared:G", "file_private:G"}
    assert want_states <= states, want_states - states
    assert forked
    want_cats = WPA | WR | FILE | PRES | SWAP | ZERO | HUGE | (GUARD if HAVE_GUARD else 0)
    assert categories & want_cats == want_cats, hex(want_cats & ~categories)


# -- whole processes --------------------------------------------------------------------------

ADDR_NO_RANDOMIZE = 0x0040000


def _no_aslr() -> None:  # pragma: no cover - runs in the child before exec
    ctypes.CDLL(None, use_errno=True).personality(ADDR_NO_RANDOMIZE)


#: x86_64 system call numbers of nanosleep and clock_nanosleep (as /proc/PID/syscall shows them).
_NANOSLEEPS = ("35", "230")


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


@pytest.mark.parametrize("aslr", [True, False], ids=["aslr", "no-aslr"])
def test_whole_address_space_of_a_sleeping_process(aslr: bool) -> None:
    """Every VMA of a real process (text, data, heap, libraries, ``[vdso]``, ``[vvar]``,
    ``[stack]``), scanned from outside while it sleeps. Without ASLR its stack ends at
    the top of user space, in the one PMD block that is a page short."""
    import subprocess

    proc = subprocess.Popen(["sleep", "60"], preexec_fn=None if aslr else _no_aslr)
    try:
        with pagescan.Target(proc.pid) as t:
            deadline = time.monotonic() + 10
            # exec and ld.so build the new mm in steps (mapping libc, then mprotect of its
            # RELRO part...): wait until sleep(1) sits in its nanosleep, i.e. the layout is
            # final. /proc/PID/syscall names the call a blocked task is in.
            while _read_text(f"/proc/{proc.pid}/syscall").split()[0] not in _NANOSLEEPS:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            maps = [line.split() for line in _read_text(f"/proc/{proc.pid}/maps").splitlines()]
            spans = [tuple(int(x, 16) for x in f[0].split("-")) for f in maps]
            spans = [(lo, hi) for lo, hi in spans if hi <= TASK_SIZE]
            names = " ".join(f[-1] for f in maps)
            assert "[vdso]" in names and "[stack]" in names
            if not aslr:
                assert spans[-1][1] == TASK_SIZE, "the stack should end at the top of user space"
            rng = random.Random(77 + aslr)
            cases = [(0, TASK_SIZE, {"return_mask": ALL9}), (0, TASK_SIZE, {"category_anyof_mask": ALL9,
                                                                            "return_mask": ALL9})]
            for _ in range(150):
                lo, hi = rng.choice(spans)
                start = rng.choice([lo, lo + rng.randrange((hi - lo) // P) * P])
                end = rng.choice([hi, TASK_SIZE, rng.choice(spans)[1], start + rng.randint(0, 64) * P])
                a = {"category_inverted": random_mask(rng, 0.6), "category_mask": random_mask(rng, 0.5),
                     "category_anyof_mask": random_mask(rng, 0.6), "return_mask": random_mask(rng, 0.1),
                     "vec_len": rng.choice([1, 3, 1 << 16]), "max_pages": rng.choice([0, 0, 5, 100])}
                cases.append((start, end, a))
            for start, end, kw in cases:
                a = {"flags": 0, "category_inverted": 0, "category_mask": 0, "category_anyof_mask": 0,
                     "return_mask": 0, "vec_len": 1 << 16, "max_pages": 0, **kw}
                bad = check_case(start, end, a, t)
                assert bad is None, (hex(start), hex(end), a, bad)
    finally:
        proc.kill()
        proc.wait()


# -- bad input ------------------------------------------------------------------------------


def test_random_bad_input_same_errno(uffd_wp: Userfaultfd) -> None:
    """Unknown flag/category bits, unaligned start, end < start, end beyond user space,
    alone and combined: both backends and the raw ioctl give the same errno."""
    rng = random.Random(4242)
    with anon(16) as m:
        m.write(0, 16)
        arm(uffd_wp, m, 8, 8)
        seen: dict[int, int] = {}
        for i in range(900):
            start = m[rng.randrange(16)]
            end = m[rng.randrange(start // P - m.addr // P, 17)] if rng.random() < 0.9 else start
            a = {"flags": rng.choice([0, 0, CHK]), "category_inverted": random_mask(rng, 0.7),
                 "category_mask": random_mask(rng, 0.5), "category_anyof_mask": random_mask(rng, 0.7),
                 "return_mask": random_mask(rng, 0.3), "vec_len": rng.choice([0, 1, 4, 1 << 16]),
                 "max_pages": rng.choice([0, 0, 1, 5])}
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                bad = rng.randrange(7)
                if bad == 0:
                    a["flags"] |= 1 << rng.randrange(2, 64)
                elif bad == 1:
                    name = rng.choice(["category_inverted", "category_mask", "category_anyof_mask", "return_mask"])
                    a[name] |= 1 << rng.choice([9, 10, 31, 32, 63, rng.randrange(9, 64)])
                elif bad == 2:
                    start += rng.choice([1, 8, P // 2, P - 1])
                elif bad == 3:
                    end = start - rng.choice([1, P, 2 * P, start])
                elif bad == 4:
                    end = rng.choice([TASK_SIZE + 1, TASK_SIZE + P, 1 << 47, 1 << 56, (1 << 64) - 1])
                elif bad == 5:
                    end = TASK_SIZE  # the last valid end: not an error by itself
                else:
                    start = rng.choice([TASK_SIZE, TASK_SIZE - P, 1 << 47])
            end = max(0, end)
            k = via_scan("kernel", start, end, a)
            e = via_scan("emulated", start, end, a)
            r = via_ioctl(start, end, a)
            assert k[0] == "err" or start <= end <= TASK_SIZE, (hex(start), hex(end), a, k)
            # The same outcome, and for an error the same errno. Regions are compared only
            # within m: a valid range reaching past it covers this process's own heap,
            # arenas and stack, which the interpreter changes between the three calls.
            assert k[0] == e[0] == r[0], (i, hex(start), hex(end), a, k, e, r)
            if k[0] == "err" or end <= m.end:
                assert k[1] == r[1], ("kernel backend vs raw ioctl", i, hex(start), hex(end), a, k, r)
                assert e[1] == r[1], ("emulated vs raw ioctl", i, hex(start), hex(end), a, e, r)
            if k[0] == "err":
                seen[k[1]] = seen.get(k[1], 0) + 1
            if k[0] == "ok" and end <= m.end:  # beyond m lie VMAs this process changes as it runs
                assert k[1:] == e[1:], (i, hex(start), hex(end), a, k, e)
        assert seen.get(errno.EINVAL, 0) > 100 and seen.get(errno.EFAULT, 0) > 100
        assert seen.get(errno.EPERM, 0) > 5  # CHECK_WPASYNC over the unregistered half


# -- the single-page consistency oracle ------------------------------------------------------


def per_page_categories(lay: Layout, backend: str) -> np.ndarray:
    n = lay.length // P
    cats = np.zeros(n, dtype=np.uint64)
    res = scan(lay.base, lay.end, return_mask=ALL9, backend=backend)
    assert res.complete
    for s, e, c in res.regions.tolist():
        cats[(s - lay.base) // P : (e - lay.base) // P] = c
    return cats


def hugetlb_pages(lay: Layout) -> np.ndarray:
    out = np.zeros(lay.length // P, dtype=bool)
    for p in lay.pieces:
        if p.kind.startswith("hugetlb"):
            out[(p.start - lay.base) // P : (p.end - lay.base) // P] = True
    return out


@pytest.mark.parametrize("seed", LAYOUT_SEEDS[:4])
def test_pagemap_oracle_on_layouts(seed: int, tmp_path: Path, uffd_wp: Userfaultfd, zram_swap: str,
                                   hugetlb_budget: int) -> None:
    """For every page of a layout (one full scan) and for single-page scans of a sample:
    SOFT_DIRTY <-> bit 55, SWAPPED <-> bit 62, PRESENT|SWAPPED <-> bits 63|62 -- except that
    a hugetlb uffd-wp marker is SWAPPED while pagemap never sets bit 62 for hugetlb
    (docs/kernel-facts.md): there SWAPPED <-> bit 57 of a non-present entry."""
    with layout(seed, tmp_path, uffd_wp, hugetlb_budget) as lay:
        for _ in range(3):  # on memory that stayed the same during the scans
            before = pagemap_entries(lay.base, lay.length // P)
            per_page = {backend: per_page_categories(lay, backend) for backend in ("kernel", "emulated")}
            if pagemap_entries(lay.base, lay.length // P) == before:
                break
        else:
            pytest.fail("the layout's memory kept changing under the test")
        ents = np.array(before, dtype=np.uint64)
        b55 = (ents >> np.uint64(55)) & np.uint64(1) == 1
        b57 = (ents >> np.uint64(57)) & np.uint64(1) == 1
        b62 = (ents >> np.uint64(62)) & np.uint64(1) == 1
        b63 = (ents >> np.uint64(63)) & np.uint64(1) == 1
        ht = hugetlb_pages(lay)
        want_swap = np.where(ht, ~b63 & b57, b62)
        for backend, cats in per_page.items():
            sd = cats & np.uint64(SD) != 0
            sw = cats & np.uint64(SWAP) != 0
            pr = cats & np.uint64(PRES) != 0
            assert np.array_equal(sd, b55), backend
            assert np.array_equal(pr, b63), (backend, np.flatnonzero(pr != b63)[:10])
            assert np.array_equal(sw, want_swap), (backend, np.flatnonzero(sw != want_swap)[:10])
            assert np.array_equal(pr | sw, np.where(ht, b63 | want_swap, b63 | b62)), backend
        assert b62.any() and b63.any()
        # Single pages, as the kernel suite's page_entry_is() does.
        rng = random.Random(seed)
        for i in rng.sample(range((lay.used - lay.base) // P), 120):
            addr = lay.base + i * P
            e = pagemap_entries(addr, 1)[0]
            for backend in ("kernel", "emulated"):
                res = scan(addr, addr + P, category_anyof_mask=ALL9, return_mask=ALL9, vec_len=1, backend=backend)
                c = int(res.regions["categories"][0]) if len(res) else 0
                if pagemap_entries(addr, 1)[0] != e:
                    continue  # the page changed under the test (reclaim): not a verdict
                swap_bit = (not e >> 63 & 1 and e >> 57 & 1) if ht[i] else e >> 62 & 1
                assert bool(c & SD) == bool(e >> 55 & 1)
                assert bool(c & SWAP) == bool(swap_bit), (backend, hex(addr), hex(c), hex(e))
                assert bool(c & (PRES | SWAP)) == bool(e >> 63 & 1 or swap_bit), (backend, hex(addr))


# -- timing ----------------------------------------------------------------------------------


def test_emulation_cost_is_bounded(tmp_path: Path, uffd_wp: Userfaultfd, zram_swap: str,
                                   hugetlb_budget: int) -> None:
    """Sanity bound on one emulated call over a whole layout (smaps + pagemap + kpageflags)."""
    with layout(3, tmp_path, uffd_wp, hugetlb_budget) as lay:
        t = time.perf_counter()
        for _ in range(10):
            scan(lay.base, lay.end, return_mask=ALL9, backend="emulated")
        assert (time.perf_counter() - t) / 10 < 0.5


# -- documented divergences and refusals -----------------------------------------------------


def test_divergence_fully_zapped_pmd_block_written() -> None:
    """Documented approximation: a PMD block whose pages were all zapped keeps its page
    table; the kernel reports the empty slots WRITTEN, pagemap cannot show the table, so
    the emulation reports nothing. As soon as one page of the block is populated again,
    both agree."""
    with Mapping(2 * HP, align=H) as m:
        m.madvise(MADV.NOHUGEPAGE)
        m.write(0, 4)
        m.madvise(MADV.DONTNEED, 0, 4)  # block 0: table kept, every slot empty
        kw = dict(category_anyof_mask=WR, return_mask=ALL9)
        k = scan(m.addr, m.end, backend="kernel", **kw)
        e = scan(m.addr, m.end, backend="emulated", **kw)
        assert [tuple(x) for x in k.regions.tolist()] == [(m.addr, m[HP], WR)]
        assert len(e.regions) == 0
        assert not any(x >> 62 & 1 or x >> 63 & 1 for x in pagemap_entries(m.addr, 2 * HP))
        # Block 1 was never touched: no table, both agree it is not WRITTEN.
        m.touch(7)
        k = scan(m.addr, m.end, backend="kernel", **kw)
        e = scan(m.addr, m.end, backend="emulated", **kw)
        assert k.regions.tolist() == e.regions.tolist() == [(m.addr, m[7], WR), (m[7], m[8], WR | PRES),
                                                            (m[8], m[HP], WR)]
        assert "Approximation" in (emu.__doc__ or "") and "zapped" in (emu.__doc__ or "")


def test_divergence_fully_zapped_block_absent_in_uffd_wp_vma(uffd_wp: Userfaultfd) -> None:
    """In a uffd-WP VMA every empty slot is WRITTEN whether or not a table exists, so the
    zapped-block approximation does not arise there."""
    with Mapping(HP, align=H) as m:
        m.madvise(MADV.NOHUGEPAGE)
        m.write(0, 4)
        arm(uffd_wp, m)
        m.madvise(MADV.DONTNEED, 0, HP)
        kw = dict(category_anyof_mask=WR, return_mask=ALL9)
        k = scan(m.addr, m.end, backend="kernel", **kw)
        e = scan(m.addr, m.end, backend="emulated", **kw)
        assert k.regions.tolist() == e.regions.tolist() == [(m.addr, m.end, WR | WPA)]


def _raw_register_wp(fd: int, start: int, length: int) -> None:
    oracle.raw_register(fd, start, length, int(RegisterMode.WP))


def test_refusal_wpallowed_for_foreign_uffd_registration() -> None:
    """A uffd-WP registration pagescan did not make (here: the raw ioctl on a WP_ASYNC
    uffd): smaps shows ``uw`` but not whether the uffd is asynchronous, so WPALLOWED and
    CHECK_WPASYNC raise EOPNOTSUPP saying why -- where the kernel answers. Scans that do
    not involve WPALLOWED still agree exactly."""
    with Userfaultfd(WP_FEATURES) as uf, anon(8) as m:
        m.write(0, 4)
        _raw_register_wp(uf.fd, m.addr, m.length)
        uf.writeprotect(m.addr, m.length)
        m.touch(1)
        for kw in ({"return_mask": WPA}, {"category_mask": WPA}, {"category_inverted": WPA, "category_mask": WPA},
                   {"category_anyof_mask": WPA | PRES}, {"flags": CHK, "return_mask": WR}):
            k = scan(m.addr, m.end, backend="kernel", **kw)
            assert k.complete
            with pytest.raises(OSError) as info:
                scan(m.addr, m.end, backend="emulated", **kw)
            assert info.value.errno == errno.EOPNOTSUPP
            msg = str(info.value)
            assert "asynchronous" in msg and "WPALLOWED" in msg and f"{m.addr:#x}" in msg
        assert scan(m.addr, m.end, backend="kernel", return_mask=WPA).regions.tolist() == [(m.addr, m.end, WPA)]
        for kw in ({"return_mask": ALL9 & ~WPA}, {"category_mask": WR, "return_mask": WR},
                   {"category_anyof_mask": SWAP | PRES, "return_mask": ALL9 & ~WPA}):
            k = scan(m.addr, m.end, backend="kernel", **kw)
            e = scan(m.addr, m.end, backend="emulated", **kw)
            assert k.regions.tolist() == e.regions.tolist() and k.walk_end == e.walk_end, kw
        # Once pagescan has made the registration itself, the emulation knows and agrees.
    with Userfaultfd(WP_FEATURES) as uf, anon(8) as m:
        m.write(0, 4)
        arm(uf, m)
        m.touch(1)
        for kw in ({"return_mask": ALL9}, {"flags": CHK, "category_mask": WPA | WR, "return_mask": ALL9}):
            k = scan(m.addr, m.end, backend="kernel", **kw)
            e = scan(m.addr, m.end, backend="emulated", **kw)
            assert k.regions.tolist() == e.regions.tolist(), kw


def test_wpallowed_for_sync_uffd() -> None:
    """A synchronous uffd-WP registration is never WPALLOWED to the kernel. One made
    through pagescan is recorded as synchronous, so the emulation agrees exactly
    (CHECK_WPASYNC: EPERM); the same registration made with the raw ioctl is one the
    emulation cannot tell from a foreign asynchronous one, and it refuses rather than
    guess."""
    with Userfaultfd(U.UffdFeature.WP_HUGETLBFS_SHMEM) as uf, anon(4) as m:
        m.write(0, 4)
        uf.register(m.addr, m.length, RegisterMode.WP)
        for kw in ({"category_mask": WPA}, {"return_mask": ALL9}, {"category_inverted": WPA, "category_mask": WPA,
                                                                    "return_mask": ALL9}):
            k = scan(m.addr, m.end, backend="kernel", **kw)
            e = scan(m.addr, m.end, backend="emulated", **kw)
            assert k.regions.tolist() == e.regions.tolist() and k.walk_end == e.walk_end, kw
        assert len(scan(m.addr, m.end, category_mask=WPA, backend="emulated")) == 0
        for backend in ("kernel", "emulated"):
            with pytest.raises(OSError) as info:
                scan(m.addr, m.end, flags=CHK, backend=backend)
            assert info.value.errno == errno.EPERM, backend
    with Userfaultfd(U.UffdFeature.WP_HUGETLBFS_SHMEM) as uf, anon(4) as m:
        m.write(0, 4)
        _raw_register_wp(uf.fd, m.addr, m.length)
        assert len(scan(m.addr, m.end, category_mask=WPA, backend="kernel")) == 0
        for kw in ({"category_mask": WPA}, {"flags": CHK}):
            with pytest.raises(OSError) as info:
                scan(m.addr, m.end, backend="emulated", **kw)
            assert info.value.errno == errno.EOPNOTSUPP, kw


def test_refusal_wp_matching(uffd_wp: Userfaultfd) -> None:
    """PM_SCAN_WP_MATCHING cannot be emulated atomically: EOPNOTSUPP saying so, after
    the same argument validation as the kernel (bad arguments give the kernel's errno),
    and with nothing write-protected."""
    with anon(8) as m:
        m.write(0, 8)
        arm(uffd_wp, m)
        m.touch(0, 8)
        for kw in ({"flags": WP, "category_mask": WR, "return_mask": WR},
                   {"flags": WP | CHK, "category_mask": WR, "return_mask": WR},
                   {"flags": WP, "vec_len": 0},
                   {"flags": WP | CHK, "category_anyof_mask": ALL9, "return_mask": ALL9, "max_pages": 1}):
            with pytest.raises(OSError) as info:
                scan(m.addr, m.end, backend="emulated", **kw)
            assert info.value.errno == errno.EOPNOTSUPP
            assert "WP_MATCHING" in str(info.value) and "atomic" in str(info.value)
        assert scan(m.addr, m.end, category_mask=WR, return_mask=WR).regions.tolist() == [(m.addr, m.end, WR)]
        for bad, err in (({"flags": WP | 4}, errno.EINVAL), ({"flags": WP, "return_mask": 1 << 9}, errno.EINVAL),
                         ({"flags": WP, "start": m.addr + 1}, errno.EINVAL), ({"flags": WP, "end": m.addr - P}, errno.EFAULT)):
            start = bad.pop("start", m.addr)
            end = bad.pop("end", m.end)
            for backend in ("kernel", "emulated"):
                with pytest.raises(OSError) as info:
                    scan(start, end, backend=backend, **bad)
                assert info.value.errno == err, (backend, bad)
        # Empty range: validation passes; the kernel has nothing to do, the emulation
        # still refuses (it never pretends to have write-protected).
        assert scan(m.addr, m.addr, flags=WP, backend="kernel").complete
        with pytest.raises(OSError) as info:
            scan(m.addr, m.addr, flags=WP, backend="emulated")
        assert info.value.errno == errno.EOPNOTSUPP


def test_refusal_huge_with_pte_mapped_thp() -> None:
    """A THP whose PMD was split but whose folio is still mapped whole, in place, by 512
    PTEs passes every test a PMD mapping passes (present, uniform, contiguous aligned
    PFNs, kpageflags THP). In a VMA that also has a PMD-mapped THP, smaps' count then
    disagrees with the candidates and HUGE cannot be decided: EOPNOTSUPP saying so.
    Without HUGE in the masks the scan is exact."""
    with Mapping(2 * HP, align=H) as m:
        m.madvise(MADV.HUGEPAGE)
        m.write(0, 2 * HP, 5)
        if not _pmd_mapped(m) or smaps_kb(m, "AnonHugePages") * 1024 != 2 * H:
            with contextlib.suppress(OSError):
                m.madvise(MADV.COLLAPSE)
        m.madvise(MADV.NOHUGEPAGE)
        assert smaps_kb(m, "AnonHugePages") * 1024 == 2 * H, "THPs did not form"
        # Split the second PMD by changing the protection of part of it, then restore it:
        # the VMAs merge back and the folio stays mapped by PTEs.
        m.mprotect(PROT.READ, HP + 10, 5)
        m.mprotect(PROT.READ | PROT.WRITE, HP + 10, 5)
        assert len(vmas_in(m.addr, m.end)) == 1
        assert smaps_kb(m, "AnonHugePages") * 1024 == H
        k = scan(m.addr, m.end, return_mask=ALL9, backend="kernel")
        assert k.regions.tolist() == [(m.addr, m[HP], PRES | WR | HUGE), (m[HP], m.end, PRES | WR)]
        with pytest.raises(OSError) as info:
            scan(m.addr, m.end, return_mask=HUGE, backend="emulated")
        assert info.value.errno == errno.EOPNOTSUPP
        assert "PTE-mapped THPs" in str(info.value) and f"{m.addr:#x}" in str(info.value)
        for kw in ({"return_mask": ALL9 & ~HUGE}, {"category_mask": PRES, "return_mask": PRES | WR | ZERO}):
            e = scan(m.addr, m.end, backend="emulated", **kw)
            assert e.regions.tolist() == scan(m.addr, m.end, backend="kernel", **kw).regions.tolist()


def smaps_kb(m: Mapping, field: str) -> int:
    from .memory import smaps_field

    return smaps_field(m, field)
