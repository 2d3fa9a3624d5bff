"""The emulated backend: ``PAGEMAP_SCAN`` answers computed in user space.

For kernels without the ioctl (< 6.7: Debian 12's 6.1, Ubuntu 22.04's 5.15, RHEL 9's
5.14). Per-page categories come from ``/proc/PID/pagemap`` (read in bounded chunks, only
where VMAs are), ``/proc/PID/maps``/``smaps`` and, when readable, PFNs and
``/proc/kpageflags``; the shared pure engine (:mod:`._engine`) turns them into regions.
Only categories that take part in the call (any of the four masks) are computed, as the
kernel itself does for FILE.

How each category is derived, and where it cannot be known (``kernel.md`` 2.3):

* PRESENT, SWAPPED, GUARD, SOFT_DIRTY: pagemap bits 63, 62, 58, 55 (exact). uffd-wp
  markers read SWAPPED, guard markers SWAPPED|WRITTEN, as in the kernel. In hugetlb
  VMAs a non-present entry carrying bit 57 is a marker (SWAPPED).
* WRITTEN: present or swap-like and not uffd-wp (bit 57). Empty slots follow the newest
  kernels (2026 fixes): WRITTEN in uffd-WP VMAs and wherever a page table exists.
  pagemap cannot show page tables, so a table is taken to exist when another page of
  the same PMD-sized block is present or swap-like. **Approximation:** a block whose
  pages were all zapped (``MADV_DONTNEED``) keeps its table in the kernel, which then
  reports WRITTEN where the emulation reports nothing. hugetlb empty slots are never
  WRITTEN; they are HUGE when the PMD table of their 1 GiB block exists (same rule).
* FILE: pagemap bit 61, except the huge zero page (bit 61 set in an anonymous private
  VMA), which the ioctl does not call FILE. Copy-on-written private file pages are anon.
* PFNZERO: PFN equal to the zero page's, or the huge zero page. Needs PFNs
  (``CAP_SYS_ADMIN``): without them a present page of a private anonymous VMA that is
  not exclusively mapped could be the zero page or a page shared after ``fork``, and
  the scan raises ``PermissionError`` rather than guess.
* HUGE: hugetlb VMAs (smaps ``ht``) and PMD-mapped THPs. A THP is recognised from PFNs
  and ``/proc/kpageflags`` (root) and checked against the VMA's PMD-mapped bytes in
  smaps; without root, or when a PTE-mapped THP makes the count ambiguous, the scan
  raises (``PermissionError`` / ``EOPNOTSUPP``).
* WPALLOWED: a VMA registered for uffd-WP (smaps ``uw``) on an *asynchronous* uffd.
  smaps does not show async-ness; pagescan knows it for registrations made through its
  own :class:`Userfaultfd` in this process. Otherwise the scan raises ``EOPNOTSUPP``.
* ``PM_SCAN_WP_MATCHING`` cannot be emulated atomically and raises ``EOPNOTSUPP``
  (after argument validation, like every other error here).
* VM_PFNMAP VMAs (smaps ``pf``) are skipped, as the kernel skips them.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import threading
from typing import TYPE_CHECKING

import numpy as np

from . import _engine
from ._procfs import Vma, read_smaps
from ._uapi import libc
from ._uapi.mman import MAP, PROT
from ._uapi.pagemap import KPF, PM, Category, ScanFlag

if TYPE_CHECKING:
    from ._target import Target

__all__ = ["EmulatedBackend", "task_size"]

P = mmap.PAGESIZE
PMD_PAGES = 512 if P == 4096 else (P // 8)
PUD_PAGES = PMD_PAGES * PMD_PAGES
#: Pages read from pagemap per chunk (512 KiB of entries).
CHUNK_PAGES = 1 << 16

_KNOWN_CATEGORIES = 0
for _c in Category:
    _KNOWN_CATEGORIES |= _c
_KNOWN_FLAGS = int(ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC)

_u = np.uint64
_PRESENT = _u(PM.PRESENT)
_SWAP = _u(PM.SWAP)
_FILE = _u(PM.FILE)
_UFFD_WP = _u(PM.UFFD_WP)
_GUARD = _u(PM.GUARD_REGION)
_SD = _u(PM.SOFT_DIRTY)
_EXCL = _u(PM.MMAP_EXCLUSIVE)
_PFN = _u(PM.PFN_MASK)


def task_size() -> int:
    """Highest user address + 1 as ``access_ok`` sees it (x86-64 4/5-level, arm64 48-bit)."""
    machine = platform.machine()
    if machine == "x86_64":
        try:
            with open("/proc/cpuinfo") as f:
                la57 = " la57" in f.read(1 << 16)
        except OSError:
            la57 = False
        # 5-level paging also needs a kernel that enabled it; VmallocTotal tells.
        bits = 56 if la57 and _vmalloc_total() > (1 << 46) else 47
        return (1 << bits) - P
    return 1 << 48


def _vmalloc_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("VmallocTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _ZeroPfn:
    """The PFN of the shared zero page, learned once by a read fault (needs PFNs)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: int | None = None

    def get(self) -> int:
        with self.lock:
            if self.value is None:
                page = libc.mmap(0, P, PROT.READ, MAP.PRIVATE | MAP.ANONYMOUS)
                try:
                    libc.vm_read(os.getpid(), page, bytearray(1))  # read fault: maps the zero page
                    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        e = int.from_bytes(os.pread(fd, 8, page // P * 8), "little")
                    finally:
                        os.close(fd)
                finally:
                    libc.munmap(page, P)
                self.value = e & int(PM.PFN_MASK) if e >> 63 else 0
            return self.value


_zero_pfn = _ZeroPfn()


class _Registry:
    """Ranges this process registered for uffd-WP on asynchronous uffds (via pagescan)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ranges: dict[int, list[tuple[int, int]]] = {}  # uffd id -> [(start, end)]

    def add(self, key: int, start: int, end: int) -> None:
        with self.lock:
            self.ranges.setdefault(key, []).append((start, end))

    def remove(self, key: int, start: int | None = None, end: int | None = None) -> None:
        with self.lock:
            if start is None or end is None:
                self.ranges.pop(key, None)
                return
            kept = []
            for s, e in self.ranges.get(key, []):
                if e <= start or s >= end:
                    kept.append((s, e))
                else:
                    if s < start:
                        kept.append((s, start))
                    if e > end:
                        kept.append((end, e))
            self.ranges[key] = kept

    def covers(self, start: int, end: int) -> bool:
        with self.lock:
            spans = sorted(r for rs in self.ranges.values() for r in rs)
        cur = start
        for s, e in spans:
            if s <= cur < e:
                cur = e
                if cur >= end:
                    return True
        return cur >= end


#: Filled by :class:`pagescan.Userfaultfd` (WP registrations on WP_ASYNC uffds).
wp_async_registry = _Registry()


def _eopnotsupp(what: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"{os.strerror(errno.EOPNOTSUPP)}: emulated PAGEMAP_SCAN {what}")


class EmulatedBackend:
    """``backend="emulated"``: same contract as :class:`KernelBackend`."""

    name = "emulated"

    def __init__(self) -> None:
        self._task_size = task_size()

    def scan(
        self,
        target: Target,
        start: int,
        end: int,
        flags: int,
        inverted: int,
        mask: int,
        anyof: int,
        return_mask: int,
        max_pages: int,
        vec: np.ndarray | None,
        index: int,
        vec_addr: int,
        vec_len: int,
    ) -> tuple[int, int]:
        fd = target.fd  # ValueError if closed
        end_r = _engine.validate(
            start=start, end=end, flags=flags, inverted=inverted, mask=mask, anyof=anyof,
            return_mask=return_mask, vec_is_null=vec is None and vec_addr == 0, vec_len=vec_len,
            known_flags=_KNOWN_FLAGS, known_categories=_KNOWN_CATEGORIES, page_size=P,
            task_size=self._task_size,
        )
        if flags & ScanFlag.WP_MATCHING:
            raise _eopnotsupp(
                "cannot write-protect: PM_SCAN_WP_MATCHING needs the kernel ioctl (Linux 6.7); "
                "an emulated read-then-protect would not be atomic"
            )
        if start == end_r:
            return 0, end_r
        relevant = inverted | mask | anyof | return_mask
        need_wpa = bool(relevant & Category.WPALLOWED) or bool(flags & ScanFlag.CHECK_WPASYNC)
        pid = target.pid
        vmas = [v for v in read_smaps(pid, start, end_r) if v.start < self._task_size]
        col = _engine.Collector(
            vec, index, vec_len, inverted=inverted, mask=mask, anyof=anyof,
            return_mask=return_mask, max_pages=max_pages, page_size=P,
        )
        ctx = _Context(fd, pid, relevant, vmas)
        # CHECK_WPASYNC fails the whole call before anything is reported.
        if flags & ScanFlag.CHECK_WPASYNC:
            for v in vmas:
                if not ctx.wp_allowed(v):
                    raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        for v in vmas:
            if "pf" in v.vmflags:
                continue  # VM_PFNMAP: the kernel skips these VMAs
            vma_bits = int(Category.WPALLOWED) if need_wpa and ctx.wp_allowed(v) else 0
            want = mask & Category.WPALLOWED
            if ((vma_bits ^ inverted) & want) != want:
                continue  # the kernel's VMA-level pre-filter
            lo = max(start, v.start)
            hi = min(end_r, v.end)
            for clo in range(lo, hi, CHUNK_PAGES * P):
                chi = min(hi, clo + CHUNK_PAGES * P)
                cats = ctx.categories(v, clo, chi) | _u(vma_bits)
                if not col.feed(clo, cats):
                    return col.result(end_r)
        return col.result(end_r)


class _Context:
    """Per-call state: the pagemap fd, what is relevant, and cached privileged lookups."""

    def __init__(self, fd: int, pid: int, relevant: int, vmas: list[Vma]) -> None:
        self.fd = fd
        self.pid = pid
        self.relevant = relevant
        self.vmas = vmas
        self._kpf_fd: int | None = None
        self._thp_checked: set[int] = set()

    # -- reading -------------------------------------------------------------------

    def entries(self, lo: int, hi: int) -> np.ndarray:
        n = (hi - lo) // P
        buf = bytearray(n * 8)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            k = os.preadv(self.fd, [view[got:]], lo // P * 8 + got)
            if k <= 0:
                break
            got += k
        return np.frombuffer(buf, dtype=np.uint64, count=got // 8)

    def kpageflags(self, pfns: np.ndarray) -> np.ndarray:
        if self._kpf_fd is None:
            try:
                self._kpf_fd = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
            except PermissionError:
                raise PermissionError(
                    errno.EACCES, "emulated PAGE_IS_HUGE needs /proc/kpageflags (root) to recognise THPs"
                ) from None
        out = np.zeros(pfns.size, dtype=np.uint64)
        for i, pfn in enumerate(pfns.tolist()):
            out[i] = int.from_bytes(os.pread(self._kpf_fd, 8, pfn * 8), "little")
        return out

    def __del__(self) -> None:
        if self._kpf_fd is not None:
            os.close(self._kpf_fd)

    # -- VMA level -----------------------------------------------------------------

    def wp_allowed(self, v: Vma) -> bool:
        if "uw" not in v.vmflags:
            return False
        if self.pid == os.getpid() and wp_async_registry.covers(v.start, v.end):
            return True
        raise _eopnotsupp(
            f"cannot tell whether the uffd-WP registration of {v.start:#x}-{v.end:#x} (pid {self.pid}) "
            "is asynchronous (PAGE_IS_WPALLOWED); only registrations made through pagescan in this "
            "process are known"
        )

    # -- page level ----------------------------------------------------------------

    def categories(self, v: Vma, lo: int, hi: int) -> np.ndarray:
        rel = self.relevant
        # Read whole PMD blocks around the chunk so page-table presence can be judged.
        span = PUD_PAGES * P if v.hugetlb else PMD_PAGES * P
        wlo = lo - lo % span
        whi = min(-(-hi // span) * span, _task_limit())
        window = self.entries(wlo, whi)
        first = (lo - wlo) // P
        e = window[first : first + (hi - lo) // P]
        if e.size != (hi - lo) // P:
            raise OSError(errno.EFAULT, f"short pagemap read at {lo:#x}")

        present = (e & _PRESENT) != 0
        swap = (e & _SWAP) != 0
        wp = (e & _UFFD_WP) != 0
        cats = np.zeros(e.size, dtype=np.uint64)
        cats[present] |= _u(Category.PRESENT)

        if v.hugetlb:
            marker = ~present & wp  # hugetlb never sets bit 62; a WP marker carries 57
            cats[marker] |= _u(Category.SWAPPED)
            nonempty = present | marker
            cats[present & ~wp] |= _u(Category.WRITTEN)
            # HUGE for populated entries, and for empty ones whose PMD table exists.
            blocks = ((window & (_PRESENT | _SWAP | _UFFD_WP)) != 0).reshape(-1, PUD_PAGES).any(axis=1)
            table = np.repeat(blocks, PUD_PAGES)[first : first + e.size]
            cats[nonempty | table] |= _u(Category.HUGE)
        else:
            cats[swap] |= _u(Category.SWAPPED)
            nonempty = present | swap
            written = nonempty & ~wp
            empty = ~nonempty & ~wp
            if empty.any():
                if "uw" in v.vmflags:
                    written |= empty
                else:
                    occupied = ((window & (_PRESENT | _SWAP)) != 0).reshape(-1, PMD_PAGES).any(axis=1)
                    table = np.repeat(occupied, PMD_PAGES)[first : first + e.size]
                    written |= empty & table
            cats[written] |= _u(Category.WRITTEN)

        if rel & Category.GUARD:
            cats[(e & _GUARD) != 0] |= _u(Category.GUARD)
        if rel & Category.SOFT_DIRTY:
            cats[(e & _SD) != 0] |= _u(Category.SOFT_DIRTY)
        huge_zero = np.zeros(e.size, dtype=bool)
        if v.anon_private and rel & (Category.FILE | Category.PFNZERO | Category.HUGE):
            # bit 61 in an anonymous private VMA can only be the huge zero page
            huge_zero = present & ((e & _FILE) != 0)
        if rel & Category.FILE:
            cats[((e & _FILE) != 0) & (present | swap) & ~huge_zero] |= _u(Category.FILE)
        if rel & Category.PFNZERO:
            cats[huge_zero] |= _u(Category.PFNZERO)
            if v.anon_private:
                cand = present & ~huge_zero & ((e & _EXCL) == 0)
                if cand.any():
                    cats[cand & self._is_zero_pfn(e)] |= _u(Category.PFNZERO)
        if rel & Category.HUGE and not v.hugetlb:
            cats[huge_zero] |= _u(Category.HUGE)
            if v.pmd_mapped:
                cats[self._thp_pmd(v, lo, e)] |= _u(Category.HUGE)
        return cats

    def _is_zero_pfn(self, e: np.ndarray) -> np.ndarray:
        pfn = e & _PFN
        if not (pfn[(e & _PRESENT) != 0]).any():
            raise PermissionError(
                errno.EPERM,
                "emulated PAGE_IS_PFNZERO needs PFNs from /proc/PID/pagemap (CAP_SYS_ADMIN): "
                "without them the zero page cannot be told from a page shared after fork",
            )
        z = _zero_pfn.get()
        if not z:
            raise PermissionError(errno.EPERM, "emulated PAGE_IS_PFNZERO: the zero page's PFN is not visible")
        return pfn == _u(z)

    def _thp_pmd(self, v: Vma, lo: int, e: np.ndarray) -> np.ndarray:
        """Pages of ``e`` (starting at ``lo``) that are PMD-mapped THPs."""
        out = np.zeros(e.size, dtype=bool)
        cand_blocks = self._thp_candidates(v.start, v.end)
        # Exactness: every PMD-mapped byte smaps counts must be one of our candidates.
        if v.start not in self._thp_checked:
            found = len(cand_blocks) * PMD_PAGES * P
            if found != v.pmd_mapped:
                raise _eopnotsupp(
                    f"cannot tell PMD-mapped from PTE-mapped THPs in {v.start:#x}-{v.end:#x}: "
                    f"smaps counts {v.pmd_mapped} PMD-mapped bytes, PFN analysis finds {found}"
                )
            self._thp_checked.add(v.start)
        for b in cand_blocks:
            s = (b - lo) // P
            if s + PMD_PAGES > 0 and s < e.size:
                out[max(s, 0) : min(s + PMD_PAGES, e.size)] = True
        return out

    def _thp_candidates(self, vlo: int, vhi: int) -> list[int]:
        span = PMD_PAGES * P
        blo = -(-vlo // span) * span
        bhi = vhi - vhi % span
        if bhi <= blo:
            return []
        out: list[int] = []
        for clo in range(blo, bhi, CHUNK_PAGES * P):
            chi = min(bhi, clo + CHUNK_PAGES * P)
            e = self.entries(clo, chi).reshape(-1, PMD_PAGES)
            pres = ((e & _PRESENT) != 0).all(axis=1)
            pfn = e & _PFN
            if pres.any() and not pfn[pres].any():
                raise PermissionError(
                    errno.EPERM, "emulated PAGE_IS_HUGE for THPs needs PFNs from /proc/PID/pagemap (CAP_SYS_ADMIN)"
                )
            step = np.arange(PMD_PAGES, dtype=np.uint64)
            contiguous = (pfn == pfn[:, :1] + step).all(axis=1) & (pfn[:, 0] % _u(PMD_PAGES) == 0)
            uniform = ((e & (_UFFD_WP | _FILE)) == (e[:, :1] & (_UFFD_WP | _FILE))).all(axis=1)
            ok = np.flatnonzero(pres & contiguous & uniform)
            if ok.size:
                heads = pfn[ok, 0]
                flags = self.kpageflags(heads)
                thp = (flags >> _u(KPF.THP)) & _u(1)
                zero = (flags >> _u(KPF.ZERO_PAGE)) & _u(1)
                for i, t, z in zip(ok.tolist(), thp.tolist(), zero.tolist()):
                    if t and not z:
                        out.append(clo + i * span)
        return out


def _task_limit() -> int:
    return _TASK_SIZE


_TASK_SIZE = task_size()
