"""The emulated backend: ``PAGEMAP_SCAN`` answers computed in user space.

For kernels without the ioctl (< 6.7: Debian 12's 6.1, Ubuntu 22.04's 5.15, RHEL 9's
5.14). Per-page categories come from ``/proc/PID/pagemap`` (read in bounded chunks, only
where VMAs are), ``/proc/PID/smaps`` and, when readable, PFNs and ``/proc/kpageflags``;
the shared pure engine (:mod:`._engine`) turns them into regions. Only categories that
can change the answer -- those in ``category_mask``, ``category_anyof_mask`` or
``return_mask`` -- are computed (one only in ``category_inverted`` cannot: matching looks
at the mask and anyof bits only), as the kernel itself does for FILE.

How each category is derived, and where it cannot be known (``kernel.md`` 2.3). Checked
against the kernel on random layouts of every mapping kind by
``tests/test_emulated_differential.py`` and, unprivileged, by
``tests/test_emulated_unprivileged.py``:

* PRESENT, SWAPPED, GUARD, SOFT_DIRTY: pagemap bits 63, 62, 58, 55 (exact). uffd-wp and
  poison markers read SWAPPED, guard markers SWAPPED|WRITTEN, as in the kernel. In
  hugetlb VMAs a non-present entry carrying bit 57 is a marker (SWAPPED).
* WRITTEN: present or swap-like and not uffd-wp (bit 57). Empty slots follow the newest
  kernels (2026 fixes): WRITTEN in uffd-WP VMAs and wherever a page table exists.
  pagemap cannot show page tables, so a table is taken to exist when another page of
  the same PMD-sized block is present or swap-like. **Approximation:** a block whose
  pages were all zapped (``MADV_DONTNEED``, or file/shmem pages reclaimed) keeps its
  table in the kernel, which then reports its empty slots (in any VMA that is not
  uffd-WP) WRITTEN where the emulation reports nothing. hugetlb empty slots are never
  WRITTEN; they are HUGE when the PMD table of their 1 GiB block exists (same rule, same
  approximation).
* FILE: pagemap bit 61, except the huge zero page (bit 61 on a present page of an
  anonymous VMA), which the ioctl does not call FILE. Copy-on-written private file pages
  are anon. Special mappings (``[vdso]``) are not anonymous: their pages are FILE.
* PFNZERO: PFN equal to the zero page's, or the huge zero page (known from bit 61). Only
  a present page of an anonymous VMA (private anonymous memory, ``MAP_PRIVATE`` of
  ``/dev/zero``) that is not exclusively mapped (bit 56) can be the zero page. Telling
  the zero page from a page shared after ``fork`` (or by KSM) needs PFNs
  (``CAP_SYS_ADMIN``); without them the scan raises ``PermissionError`` naming the
  privilege -- if, and only if, the unknown bit would change the answer: whether a page
  the walk reaches matches, or what it reports.
* HUGE: hugetlb VMAs (smaps ``ht``) and PMD-mapped THPs. A PMD mapping is a whole
  aligned 2 MiB block inside the VMA, every page present with the same uffd-wp,
  soft-dirty and file bits; with PFNs it is also physically contiguous and aligned, and
  ``/proc/kpageflags`` (root) marks its head THP. The blocks found must add up to smaps'
  PMD-mapped bytes of the VMA; a PTE-mapped THP that passes every test makes them
  disagree, and the scan raises ``EOPNOTSUPP``. VMAs without PMD-mapped bytes are exact
  without privilege. Without PFNs or kpageflags a candidate block in a VMA with
  PMD-mapped THPs could be either, and the scan raises ``PermissionError`` under the
  PFNZERO rule above.
* WPALLOWED: a VMA registered for uffd-WP (smaps ``uw``) on an *asynchronous* uffd.
  smaps does not show async-ness; pagescan knows it for registrations made through its
  own :class:`Userfaultfd` in this process. Otherwise, when WPALLOWED or
  ``PM_SCAN_CHECK_WPASYNC`` is involved, the scan raises ``EOPNOTSUPP`` (even for a
  synchronous registration, which the kernel never calls WPALLOWED).
* ``PM_SCAN_CHECK_WPASYNC`` fails with EPERM at the first VMA the walk reaches that is
  not WP-async, as in the kernel (a walk that stopped earlier succeeds).
* ``PM_SCAN_WP_MATCHING`` cannot be emulated atomically and raises ``EOPNOTSUPP``
  (after argument validation, like every other error here).
* VM_PFNMAP VMAs (smaps ``pf``) are skipped, as the kernel skips them.
* Everything is read at call time, VMA by VMA: like the kernel's walk, the answer is
  not atomic with respect to a process that changes its memory meanwhile.
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

# Plain ints: ``~`` of an IntFlag is the complement within the flag's own bits (0 here),
# which would make every unknown bit look known.
_KNOWN_CATEGORIES = 0
for _c in Category:
    _KNOWN_CATEGORIES |= int(_c)
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
        # As in the kernel, a category only in ``inverted`` cannot change the answer
        # (matching looks at ``mask`` and ``anyof`` only), so it is never computed.
        relevant = mask | anyof | return_mask
        need_wpa = bool(relevant & Category.WPALLOWED) or bool(flags & ScanFlag.CHECK_WPASYNC)
        pid = target.pid
        vmas = [v for v in read_smaps(pid, start, end_r) if v.start < self._task_size]
        col = _engine.Collector(
            vec, index, vec_len, inverted=inverted, mask=mask, anyof=anyof,
            return_mask=return_mask, max_pages=max_pages, page_size=P,
        )
        ctx = _Context(fd, pid, inverted=inverted, mask=mask, anyof=anyof, return_mask=return_mask)
        try:
            check = bool(flags & ScanFlag.CHECK_WPASYNC)
            for v in vmas:
                # The kernel's per-VMA gate, met as the walk reaches each VMA: CHECK_WPASYNC
                # fails the call at the first VMA that is not WP-async -- unless the walk
                # has already stopped (buffer full, max_pages) before getting there.
                vma_bits = int(Category.WPALLOWED) if need_wpa and ctx.wp_allowed(v) else 0
                if check and not vma_bits:
                    raise OSError(errno.EPERM, os.strerror(errno.EPERM))
                if "pf" in v.vmflags:
                    continue  # VM_PFNMAP: the kernel skips these VMAs
                want = mask & Category.WPALLOWED
                if ((vma_bits ^ inverted) & want) != want:
                    continue  # the kernel's VMA-level pre-filter
                lo = max(start, v.start)
                hi = min(end_r, v.end)
                for clo in range(lo, hi, CHUNK_PAGES * P):
                    chi = min(hi, clo + CHUNK_PAGES * P)
                    if not col.feed(clo, ctx.categories(v, clo, chi, vma_bits)):
                        return col.result(end_r)  # stopped: later VMAs are never reached
            return col.result(end_r)
        finally:
            ctx.close()


class _Context:
    """Per-call state: the pagemap fd, the masks, and cached privileged lookups."""

    def __init__(self, fd: int, pid: int, *, inverted: int, mask: int, anyof: int, return_mask: int) -> None:
        self.fd = fd
        self.pid = pid
        self.inverted = inverted
        self.mask = mask
        self.anyof = anyof
        self.return_mask = return_mask
        self.relevant = mask | anyof | return_mask
        self._kpf_fd: int | None = None
        self._kpf_denied = False
        #: VMA start -> (block addresses known PMD-mapped, block addresses that may be)
        self._thp: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pud_occupied: dict[int, bool] = {}  # 1 GiB block -> has a populated page

    def close(self) -> None:
        fd, self._kpf_fd = self._kpf_fd, None
        if fd is not None:
            os.close(fd)

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

    def kpageflags(self, pfns: np.ndarray) -> np.ndarray | None:
        """Flags of each PFN, or ``None`` when ``/proc/kpageflags`` is not readable."""
        if self._kpf_fd is None:
            if self._kpf_denied:
                return None
            try:
                self._kpf_fd = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
            except PermissionError:
                self._kpf_denied = True
                return None
        out = np.zeros(pfns.size, dtype=np.uint64)
        for i, pfn in enumerate(pfns.tolist()):  # one read per candidate 2 MiB block
            out[i] = int.from_bytes(os.pread(self._kpf_fd, 8, pfn * 8), "little")
        return out

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

    def categories(self, v: Vma, lo: int, hi: int, vma_bits: int) -> np.ndarray:
        """Categories of the pages of ``[lo, hi)`` (inside ``v``), VMA bits included."""
        rel = self.relevant
        if v.hugetlb:
            e = self.entries(lo, hi)
        else:
            # Whole PMD blocks around the chunk, so page-table presence can be judged.
            # The last block of user space is one page short (TASK_SIZE): pad it.
            span = PMD_PAGES * P
            wlo = lo - lo % span
            whi = min(-(-hi // span) * span, _task_limit())
            window = self.entries(wlo, whi)
            if window.size % PMD_PAGES:
                window = np.concatenate([window, np.zeros(-window.size % PMD_PAGES, dtype=np.uint64)])
            first = (lo - wlo) // P
            e = window[first : first + (hi - lo) // P]
        if e.size != (hi - lo) // P:
            raise OSError(errno.EFAULT, f"short pagemap read at {lo:#x}")

        present = (e & _PRESENT) != 0
        swap = (e & _SWAP) != 0
        wp = (e & _UFFD_WP) != 0
        cats = np.full(e.size, vma_bits, dtype=np.uint64)
        cats[present] |= _u(Category.PRESENT)

        if v.hugetlb:
            marker = ~present & wp  # hugetlb never sets bit 62; a WP marker carries 57
            cats[marker] |= _u(Category.SWAPPED)
            nonempty = present | marker
            cats[present & ~wp] |= _u(Category.WRITTEN)
            # HUGE for populated entries, and for empty ones whose PMD table exists.
            if not nonempty.all():
                nonempty |= self._pmd_table(lo, hi)
            cats[nonempty] |= _u(Category.HUGE)
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
        anon = _anonymous(v)
        # bit 61 on a present page of an anonymous VMA can only be the huge zero page
        huge_zero = present & ((e & _FILE) != 0) if anon else np.zeros(e.size, dtype=bool)
        if rel & Category.FILE:
            cats[((e & _FILE) != 0) & (present | swap) & ~huge_zero] |= _u(Category.FILE)
        unknown: np.ndarray | None = None  # per page: category bits that cannot be known
        if rel & Category.PFNZERO:
            cats[huge_zero] |= _u(Category.PFNZERO)
            if anon:
                # Exclusively mapped pages are never the (shared) zero page.
                cand = present & ~huge_zero & ((e & _EXCL) == 0)
                if cand.any():
                    zero = self._zero_pfn_pages(e)
                    if zero is None:
                        unknown = np.where(cand, _u(Category.PFNZERO), _u(0))
                    else:
                        cats[cand & zero] |= _u(Category.PFNZERO)
        if rel & Category.HUGE and not v.hugetlb:
            cats[huge_zero] |= _u(Category.HUGE)
            if v.pmd_mapped:
                huge, unsure = self._thp_pmd(v, lo, e.size)
                cats[huge] |= _u(Category.HUGE)
                if unsure.any():
                    bits = np.where(unsure, _u(Category.HUGE), _u(0))
                    unknown = bits if unknown is None else unknown | bits
        if unknown is not None:
            self._settle(v, lo, cats, unknown)
        return cats

    def _settle(self, v: Vma, lo: int, cats: np.ndarray, unknown: np.ndarray) -> None:
        """Raise ``PermissionError`` if a bit that cannot be known changes the answer:
        whether a page matches, or what it reports. Otherwise the bit stays clear."""
        idx = np.flatnonzero(unknown)
        if not idx.size:
            return
        c, u = cats[idx], unknown[idx]
        ret = _u(self.return_mask)
        outcomes = []
        for guess in (0, int(Category.PFNZERO), int(Category.HUGE), int(Category.PFNZERO | Category.HUGE)):
            cg = c | (u & _u(guess))
            m = _engine.match(cg, self.inverted, self.mask, self.anyof)
            outcomes.append(np.where(m, cg & ret, _u(1 << 63)))
        differs = np.zeros(idx.size, dtype=bool)
        for o in outcomes[1:]:
            differs |= o != outcomes[0]
        if not differs.any():
            return
        k = int(np.argmax(differs))
        addr = lo + int(idx[k]) * P
        bits = Category(int(u[k]))
        reasons = []
        if bits & Category.PFNZERO:
            reasons.append(
                f"PAGE_IS_PFNZERO needs PFNs from /proc/PID/pagemap (CAP_SYS_ADMIN): the page at {addr:#x} "
                "is not exclusively mapped, so it could be the zero page or a page shared after fork"
            )
        if bits & Category.HUGE:
            block = addr - addr % (PMD_PAGES * P)
            reasons.append(
                "PAGE_IS_HUGE needs PFNs from /proc/PID/pagemap (CAP_SYS_ADMIN) and /proc/kpageflags (root): "
                f"the fully mapped block at {block:#x} in a VMA with PMD-mapped THPs "
                f"({v.start:#x}-{v.end:#x}) could be a THP or base pages"
            )
        raise PermissionError(errno.EPERM, "emulated " + "; ".join(reasons))

    def _pmd_table(self, lo: int, hi: int) -> np.ndarray:
        """Per page of ``[lo, hi)``: whether its 1 GiB block has a PMD table, taken to be
        so when any page of the block is populated (cached per block for the call)."""
        span = PUD_PAGES * P
        out = np.zeros((hi - lo) // P, dtype=bool)
        for b in range(lo - lo % span, hi, span):
            occupied = self._pud_occupied.get(b)
            if occupied is None:
                occupied = False
                step = (1 << 16) * P  # bounded reads (512 KiB of entries), whatever the chunk
                for clo in range(b, min(b + span, _task_limit()), step):
                    chi = min(b + span, clo + step, _task_limit())
                    if ((self.entries(clo, chi) & (_PRESENT | _SWAP | _UFFD_WP)) != 0).any():
                        occupied = True
                        break
                self._pud_occupied[b] = occupied
            if occupied:
                out[max(b, lo) // P - lo // P : min(b + span, hi) // P - lo // P] = True
        return out

    def _zero_pfn_pages(self, e: np.ndarray) -> np.ndarray | None:
        """Which entries map the zero page, or ``None`` if PFNs are hidden from us."""
        pfn = e & _PFN
        if not (pfn[(e & _PRESENT) != 0]).any():
            return None
        z = _zero_pfn.get()
        if not z:
            return None
        zero: np.ndarray = pfn == _u(z)
        return zero

    def _thp_pmd(self, v: Vma, lo: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For the ``n`` pages from ``lo``: (certainly PMD-mapped THP, maybe PMD-mapped)."""
        got = self._thp.get(v.start)
        if got is None:
            got = self._thp[v.start] = self._thp_blocks(v)
        return _block_pages(got[0], lo, n), _block_pages(got[1], lo, n)

    def _thp_blocks(self, v: Vma) -> tuple[np.ndarray, np.ndarray]:
        """(PMD-mapped THP blocks, blocks that may be) of ``v``.

        A PMD mapping covers a whole aligned 2 MiB block inside the VMA, every page
        present with the same uffd-wp, soft-dirty and file bits (one PMD entry) and not
        the huge zero page. With PFNs, its frames are also physically contiguous and
        aligned, and ``/proc/kpageflags`` marks the head THP. The blocks found must add
        up to smaps' PMD-mapped bytes; a PTE-mapped THP that passes every test makes the
        count disagree (``EOPNOTSUPP``). Without PFNs or kpageflags the structural
        candidates are returned as "may be".
        """
        span = PMD_PAGES * P
        blo = -(-v.start // span) * span
        bhi = v.end - v.end % span
        empty = np.empty(0, dtype=np.int64)
        if bhi <= blo:
            return empty, empty
        anon = _anonymous(v)
        sure: list[np.ndarray] = []
        maybe: list[np.ndarray] = []
        uniform_bits = _UFFD_WP | _FILE | _SD
        ramp = np.arange(PMD_PAGES, dtype=np.uint64)
        step = max(CHUNK_PAGES // PMD_PAGES, 1) * span  # whole PMD blocks per read
        for clo in range(blo, bhi, step):
            chi = min(bhi, clo + step)
            e = self.entries(clo, chi).reshape(-1, PMD_PAGES)
            ok = ((e & _PRESENT) != 0).all(axis=1)
            ok &= ((e & uniform_bits) == (e[:, :1] & uniform_bits)).all(axis=1)
            if anon:
                ok &= (e[:, 0] & _FILE) == 0  # the huge zero page (known already)
            if not ok.any():
                continue
            pfn = e & _PFN
            addrs = clo + np.flatnonzero(ok).astype(np.int64) * span
            if not pfn[ok].any():
                maybe.append(addrs)  # PFNs hidden
                continue
            ok &= (pfn == pfn[:, :1] + ramp).all(axis=1) & (pfn[:, 0] % _u(PMD_PAGES) == 0)
            rows = np.flatnonzero(ok)
            if not rows.size:
                continue
            flags = self.kpageflags(pfn[rows, 0])
            addrs = clo + rows.astype(np.int64) * span
            if flags is None:
                maybe.append(addrs)  # no /proc/kpageflags
                continue
            thp = ((flags >> _u(KPF.THP)) & _u(1)) != 0
            thp &= ((flags >> _u(KPF.ZERO_PAGE)) & _u(1)) == 0
            sure.append(addrs[thp])
        sure_a = np.concatenate(sure) if sure else empty
        maybe_a = np.concatenate(maybe) if maybe else empty
        if not maybe_a.size and sure_a.size * span != v.pmd_mapped:
            raise _eopnotsupp(
                f"cannot tell PMD-mapped from PTE-mapped THPs in {v.start:#x}-{v.end:#x}: "
                f"smaps counts {v.pmd_mapped} PMD-mapped bytes, PFN analysis finds {sure_a.size * span}"
            )
        return sure_a, maybe_a


def _block_pages(blocks: np.ndarray, lo: int, n: int) -> np.ndarray:
    """Boolean per page of ``[lo, lo + n pages)``: inside one of the PMD ``blocks``."""
    out = np.zeros(n, dtype=bool)
    if blocks.size:
        first = (blocks - lo) // P  # page index of each block (may be out of range)
        marks = np.zeros(n + 1, dtype=np.int64)
        np.add.at(marks, np.clip(first, 0, n), 1)
        np.add.at(marks, np.clip(first + PMD_PAGES, 0, n), -1)
        out = np.cumsum(marks[:-1]) > 0
    return out


def _anonymous(v: Vma) -> bool:
    """Whether ``v`` is private anonymous memory (the kernel's ``vma_is_anonymous``), the
    only kind that can map the zero page or the huge zero page.

    maps names such VMAs ``""``, ``[heap]``, ``[stack]`` (``[stack:TID]`` before 4.5) or
    ``[anon:NAME]`` (``PR_SET_VMA_ANON_NAME``), with inode 0. ``MAP_PRIVATE`` of
    ``/dev/zero`` keeps the file for ``/proc`` but is set up as anonymous. Every other
    bracketed name is a special mapping (``[vdso]``, ``[vvar]``, ``[uprobes]``, ...) whose
    pages are ordinary kernel pages (FILE), not anonymous ones.
    """
    if v.shared:
        return False
    name = v.name
    if v.inode == 0:
        return name in ("", "[heap]", "[stack]") or name.startswith(("[anon:", "[stack:"))
    return name == "/dev/zero"


def _task_limit() -> int:
    return _TASK_SIZE


_TASK_SIZE = task_size()
