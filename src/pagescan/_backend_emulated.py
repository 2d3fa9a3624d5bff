"""The emulated backend: ``PAGEMAP_SCAN`` answers computed in user space.

For kernels without the ioctl (< 6.7: Debian 12's 6.1, Ubuntu 22.04's 5.15, RHEL 9's
5.14). Per-page categories come from ``/proc/PID/pagemap`` (read in bounded chunks, only
where VMAs are), ``/proc/PID/maps``, ``/proc/PID/smaps`` where needed (below) and, when
readable, PFNs and ``/proc/kpageflags``; the shared pure engine (:mod:`._engine`) turns
them into regions. Only categories that can change the answer -- those in
``category_mask``, ``category_anyof_mask`` or ``return_mask`` -- are computed (one only
in ``category_inverted`` cannot: matching looks at the mask and anyof bits only), as the
kernel itself does for FILE. Each entry's category bits are looked up from its top nine
pagemap bits (55-63) in a 512-entry table per kind of VMA; only the entries the table
flags are looked at again (empty slots, for the page-table rule under WRITTEN; present
shared pages of anonymous VMAs, for PFNZERO).

How each category is derived, and where it cannot be known (``docs/kernel-facts.md``, emulation). Checked
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
  ``/proc/kpageflags`` (root) marks its head THP. A block failing any of these tests is
  not PMD-mapped. Blocks that pass must add up to smaps' PMD-mapped bytes of the VMA; a
  PTE-mapped THP that passes every test makes them disagree, and the scan raises
  ``EOPNOTSUPP``. VMAs without PMD-mapped bytes are exact without privilege. Without
  PFNs or kpageflags a block that passes the tests in a VMA with PMD-mapped THPs could
  be either, and the scan raises ``PermissionError`` under the PFNZERO rule above.
* WPALLOWED: a VMA registered for uffd-WP (smaps ``uw``) on an *asynchronous* uffd
  (``UFFD_FEATURE_WP_ASYNC``, Linux 6.7). smaps does not show async-ness; pagescan knows
  it for registrations made through its own :class:`Userfaultfd` in this process, on
  asynchronous uffds (WPALLOWED) and synchronous ones (not WPALLOWED). Otherwise, when
  WPALLOWED or ``PM_SCAN_CHECK_WPASYNC`` is involved, the scan raises ``EOPNOTSUPP``. On
  a kernel whose userfaultfd has no ``WP_ASYNC`` (found by a ``UFFDIO_API`` handshake)
  no VMA is WPALLOWED. **Limit:** pagescan's record of a registration cannot see the
  range being unmapped behind its back; if the same addresses are mapped again and
  registered by some other uffd, the record is wrong about them (until the pagescan
  :class:`Userfaultfd` is closed or unregisters them).
* ``PM_SCAN_CHECK_WPASYNC`` fails with EPERM at the first VMA the walk reaches that is
  not WP-async, as in the kernel (a walk that stopped earlier succeeds).
* ``PM_SCAN_WP_MATCHING`` cannot be emulated atomically and raises ``EOPNOTSUPP``
  (after argument validation, like every other error here).
* VM_PFNMAP VMAs (smaps ``pf``) are skipped, as the kernel skips them.
* Everything is read at call time, VMA by VMA: like the kernel's walk, the answer is
  not atomic with respect to a process that changes its memory meanwhile.

Where the VMAs come from. ``PROCMAP_QUERY`` (Linux 6.11: an ioctl on ``/proc/PID/maps``
that returns the VMA at or above an address) lists the VMAs of the range, one call
each, without formatting maps for the VMAs below it; on older kernels (``ENOTTY``)
``/proc/PID/maps`` is read up to the end of the range. Neither walks page tables, and
neither shows ``VmFlags`` beyond ``r``/``w``/``x``/``s`` (``docs/kernel-facts.md``).

Empty 2 MiB blocks. A chunk whose whole window of PMD blocks reads as empty entries in
pagemap gets one value for every page (no page-table evidence, no THP: ``WRITTEN`` iff
the VMA is uffd-WP), without per-page work. Reading pagemap itself stays linear in the
range: nothing else says where a huge, mostly empty mapping's pages are.

Where smaps is read. smaps costs
a page-table walk of every VMA it shows -- for populated memory more than the pagemap
read itself -- and it is generated one VMA at a time, in address order: it is read
incrementally, only as far as the last VMA the walk needs it for (plus at most the
record after it, which the kernel generates along with that VMA's tail), never past the
range, but always from the bottom of the address space (seeking regenerates every
record before the offset; when the VMAs came from ``PROCMAP_QUERY``, maps is read once
then, to count the VMAs below the range). A VMA's record is needed, and read, only when:

* the VMA is not private anonymous memory (files, shmem, special mappings): hugetlb
  (``ht``), ``VM_PFNMAP`` (``pf``) and uffd-WP (``uw``) cannot be known otherwise.
  Private anonymous VMAs (:attr:`Vma.anonymous`: never hugetlb, never ``VM_PFNMAP``)
  need it only as follows;
* WPALLOWED is in the masks or ``PM_SCAN_CHECK_WPASYNC`` is set, on a kernel with
  ``WP_ASYNC`` (or one whose userfaultfd cannot be probed): whether a VMA is registered
  for uffd-WP at all shows nowhere else -- not in maps, not in pagemap (an entry's bit
  57 is per page and absent on pages written since arming) -- and pagescan's record
  cannot prove a VMA unregistered (it does not see other code's registrations, nor
  ranges unmapped and mapped again);
* WRITTEN is in the masks and the VMA has an empty slot in a PMD block with no present
  or swap-like page (no page-table evidence): it is WRITTEN iff the VMA is uffd-WP;
* HUGE is in the masks and a whole 2 MiB block of the chunk passes every PMD-mapping
  test above that can be made (with PFNs: physically aligned and contiguous; with
  kpageflags: a THP head): smaps' PMD-mapped bytes of the VMA confirm or refute it.

So a scan without WPALLOWED and ``CHECK_WPASYNC`` (or any scan on a kernel without
``WP_ASYNC``) of private anonymous memory whose PMD blocks each hold a populated page
reads no smaps -- if HUGE is asked for, as long as no block passes the PMD tests: with
PFNs and kpageflags (root) base pages never do; unprivileged, every fully populated
block does. If the VMA a smaps record describes no longer matches maps (the process
changed its mappings between the two reads), the call starts over from smaps alone
(one read of the range).
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import TYPE_CHECKING

import numpy as np

from . import _engine, _probe
from ._errors import UnknowablePagesError
from ._procfs import SCAN_FIELDS, SmapsStream, Vma, maps_in_range, query_maps, read_maps_text, task_size
from ._procfs import read_smaps as _read_all_smaps
from ._registry import wp_async_registry
from ._uapi import libc
from ._uapi.since import since
from ._uapi.mman import MAP, PROT
from ._uapi.pagemap import ALL_CATEGORIES, KPF, PM, Category, ScanFlag, pm_scan_arg
from ._uapi.userfaultfd import UffdFeature

if TYPE_CHECKING:
    from ._target import Target

__all__ = ["EmulatedBackend", "task_size"]

P = mmap.PAGESIZE
PMD_PAGES = 512 if P == 4096 else (P // 8)
PUD_PAGES = PMD_PAGES * PMD_PAGES
_PMD_SPAN = PMD_PAGES * P
#: Pages read from pagemap per chunk (512 KiB of entries).
CHUNK_PAGES = 1 << 16

_KNOWN_CATEGORIES = ALL_CATEGORIES
_KNOWN_FLAGS = int(ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC)
# plain ints for the per-call tests: IntFlag operators are slow
_WP_MATCHING, _CHECK_WPASYNC = int(ScanFlag.WP_MATCHING), int(ScanFlag.CHECK_WPASYNC)

_u = np.uint64
_PRESENT = _u(PM.PRESENT)
_SWAP = _u(PM.SWAP)
_FILE = _u(PM.FILE)
_UFFD_WP = _u(PM.UFFD_WP)
_GUARD = _u(PM.GUARD_REGION)
_SD = _u(PM.SOFT_DIRTY)
_EXCL = _u(PM.MMAP_EXCLUSIVE)
_PFN = _u(PM.PFN_MASK)

#: Per-page categories are uint16 (nine category bits) plus two fix-up flags.
_c16 = np.uint16
_WPA, _WR, _FI, _PR, _SW, _ZE, _HU, _SDC, _GU = (int(c) for c in (
    Category.WPALLOWED, Category.WRITTEN, Category.FILE, Category.PRESENT, Category.SWAPPED,
    Category.PFNZERO, Category.HUGE, Category.SOFT_DIRTY, Category.GUARD))
_CATS = _KNOWN_CATEGORIES
#: Table flag: an empty slot, WRITTEN iff its PMD block has a page table (or the VMA is uffd-WP).
_F_TABLE = 1 << 14
#: Table flag: a present page of an anonymous VMA that is not exclusively mapped:
#: PFNZERO iff it maps the zero page.
_F_ZERO = 1 << 13
_FLAGS = _F_TABLE | _F_ZERO
assert not _CATS & _FLAGS


class _ZeroPfn:
    """The PFN of the shared zero page, learned once by a read fault (needs PFNs).

    No lock: a scan from a signal handler or a finalizer that needs it while this
    thread learns it would wait for good; two threads learning it at once find the
    same value."""

    def __init__(self) -> None:
        self.value: int | None = None

    def get(self) -> int:
        if self.value is None:
            with libc.RawMapping(P, PROT.READ, MAP.PRIVATE | MAP.ANONYMOUS) as page:
                libc.vm_read(os.getpid(), page.addr, bytearray(1))  # read fault: maps the zero page
                fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    e = int.from_bytes(os.pread(fd, 8, page.addr // P * 8), "little")
                finally:
                    os.close(fd)
            self.value = e & int(PM.PFN_MASK) if e >> 63 else 0
        return self.value


_zero_pfn = _ZeroPfn()


def _kernel_has_wp_async() -> bool | None:
    """Whether this kernel's userfaultfd has ``UFFD_FEATURE_WP_ASYNC`` (6.7): ``False``
    only when a ``UFFDIO_API`` handshake said it has not; ``None`` if no userfaultfd
    could be made to ask (then nothing is concluded from it)."""
    probe = _probe.uffd_api()
    return bool(probe.features & UffdFeature.WP_ASYNC) if probe.available else None


def read_smaps(stream: SmapsStream, read_size: int) -> Vma | None:
    """The next smaps record the walk needs (a module-level function, so that profilers
    such as ``benchmarks/emulated.py --breakdown`` can time smaps on its own)."""
    return stream.next(read_size)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has no address space any more (exited, a zombie): ``statm`` then
    reads as zeros, or not at all."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return f.read().split()[:1] in ([], [b"0"])
    except OSError:
        return True


def _exited(pid: int) -> ProcessLookupError:
    return ProcessLookupError(
        errno.ESRCH, f"pid {pid} has no memory to scan (it exited, is a zombie or a kernel thread)")


def _short_read(pid: int, address: int) -> OSError:
    """A pagemap read came back short. The file reads as empty once the target's mm is
    gone (it exited: the kernel's ioctl says ESRCH then); anything else is EFAULT."""
    if _gone(pid):
        return _exited(pid)
    return OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: short pagemap read at {address:#x} in pid {pid}")


def _eopnotsupp(what: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"{os.strerror(errno.EOPNOTSUPP)}: emulated PAGEMAP_SCAN {what}")


class _Mismatch(Exception):
    """maps and smaps disagree about a VMA: the process changed between the two reads."""


class EmulatedBackend:
    """``backend="emulated"``: same contract as :class:`KernelBackend`."""

    name = "emulated"

    def __init__(self) -> None:
        self._task_size = task_size()

    def scan(self, target: Target, arg: pm_scan_arg, out: np.ndarray | None) -> tuple[int, int]:
        fd = target.fd  # ValueError if closed
        start, end, flags = arg.start, arg.end, arg.flags
        inverted, mask, anyof = arg.category_inverted, arg.category_mask, arg.category_anyof_mask
        return_mask, max_pages, vec_len = arg.return_mask, arg.max_pages, arg.vec_len
        vec = out if vec_len else None
        index = 0
        end_r = _engine.validate(
            start=start, end=end, flags=flags, inverted=inverted, mask=mask, anyof=anyof,
            return_mask=return_mask, vec_is_null=not arg.vec, vec_len=vec_len,
            known_flags=_KNOWN_FLAGS, known_categories=_KNOWN_CATEGORIES, page_size=P,
            task_size=self._task_size,
        )
        if vec_len and (out is None or len(out) < vec_len):
            raise OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: PAGEMAP_SCAN: the region vector is "
                                        f"smaller than vec_len ({vec_len})")
        if flags & _WP_MATCHING:
            raise _eopnotsupp(
                f"cannot write-protect: PM_SCAN_WP_MATCHING needs the kernel ioctl (Linux {since('PAGEMAP_SCAN')}); "
                "an emulated read-then-protect would not be atomic"
            )
        if start == end_r:
            return 0, end_r
        pid = target.pid
        # PROCMAP_QUERY (6.11) finds the VMAs of the range without formatting maps below it.
        queried = query_maps(pid, start, end_r)
        below: int | None = None  # VMAs before the range: counted only if smaps is read
        if queried is None:
            vmas, below = maps_in_range(read_maps_text(pid, end_r), start, end_r)
        else:
            vmas = queried
        try:
            try:
                return self._walk(fd, pid, vmas, below, start, end_r, flags, inverted, mask, anyof,
                                  return_mask, max_pages, vec, index, vec_len, smaps_known=False)
            except _Mismatch:
                vmas = _read_all_smaps(pid, start, end_r, SCAN_FIELDS)
                return self._walk(fd, pid, vmas, 0, start, end_r, flags, inverted, mask, anyof,
                                  return_mask, max_pages, vec, index, vec_len, smaps_known=True)
        except OSError as err:
            # smaps and pagemap disagreeing (EOPNOTSUPP) because the target exited between
            # the two reads: its mm is torn down under us. Say so, as the kernel would.
            if err.errno == errno.EOPNOTSUPP and _gone(pid):
                raise _exited(pid) from err
            raise

    def _walk(self, fd: int, pid: int, vmas: list[Vma], below: int | None, start: int, end_r: int, flags: int,
              inverted: int, mask: int, anyof: int, return_mask: int, max_pages: int,
              vec: np.ndarray | None, index: int, vec_len: int, *, smaps_known: bool) -> tuple[int, int]:
        # As in the kernel, a category only in ``inverted`` cannot change the answer
        # (matching looks at ``mask`` and ``anyof`` only), so it is never computed.
        relevant = mask | anyof | return_mask
        check = bool(flags & _CHECK_WPASYNC)
        need_wpa = bool(relevant & _WPA) or check
        col = _engine.Collector(
            vec, index, vec_len, inverted=inverted, mask=mask, anyof=anyof,
            return_mask=return_mask, max_pages=max_pages, page_size=P,
        )
        ctx = _Context(fd, pid, inverted=inverted, mask=mask, anyof=anyof, return_mask=return_mask,
                       scan_start=start, scan_end=end_r, below=below)
        try:
            for i, v in enumerate(vmas):
                if v.start >= self._task_size:
                    break  # [vsyscall]: above user space
                v_index = i  # the smaps record's index is ctx.below + i
                if smaps_known:
                    ctx.known[v.start] = True
                elif not v.anonymous:
                    ctx.smaps(v, v_index)  # hugetlb, VM_PFNMAP, uffd-WP: smaps only
                # The kernel's per-VMA gate, met as the walk reaches each VMA: CHECK_WPASYNC
                # fails the call at the first VMA that is not WP-async -- unless the walk
                # has already stopped (buffer full, max_pages) before getting there.
                vma_bits = _WPA if need_wpa and ctx.wp_allowed(v, v_index) else 0
                if check and not vma_bits:
                    raise OSError(errno.EPERM, os.strerror(errno.EPERM))
                if "pf" in v.vmflags:
                    continue  # VM_PFNMAP: the kernel skips these VMAs
                want = mask & _WPA
                if ((vma_bits ^ inverted) & want) != want:
                    continue  # the kernel's VMA-level pre-filter
                lo = max(start, v.start)
                hi = min(end_r, v.end)
                step = CHUNK_PAGES * P
                clo = lo
                while clo < hi:
                    chi = min(hi, clo + step)
                    if chi < hi and chi - chi % _PMD_SPAN > clo:
                        chi -= chi % _PMD_SPAN  # PMD-aligned: the chunks' windows do not overlap
                    if not col.feed(clo, ctx.categories(v, v_index, clo, chi, vma_bits)):
                        return col.result(end_r)  # stopped: later VMAs are never reached
                    clo = chi
            return col.result(end_r)
        finally:
            ctx.close()


def _table(anon: bool, uw: bool, vma_bits: int, rel: int) -> np.ndarray:
    """Categories (uint16, with the fix-up flags) of each value of a pagemap entry's top
    nine bits (55-63), in a VMA that is not hugetlb."""
    i = np.arange(512)
    bit = {n: ((i >> (n - 55)) & 1).astype(bool) for n in (55, 56, 57, 58, 61, 62, 63)}
    sd, excl, wp, guard, file, swap, present = (bit[n] for n in (55, 56, 57, 58, 61, 62, 63))
    t = np.full(512, vma_bits, dtype=_c16)
    t[present] |= _c16(_PR)
    t[swap] |= _c16(_SW)
    nonempty = present | swap
    t[nonempty & ~wp] |= _c16(_WR)
    empty = ~nonempty & ~wp
    if uw:
        t[empty] |= _c16(_WR)
    elif rel & _WR:
        t[empty] |= _c16(_F_TABLE)
    if rel & _GU:
        t[guard] |= _c16(_GU)
    if rel & _SDC:
        t[sd] |= _c16(_SDC)
    # bit 61 on a present page of an anonymous VMA can only be the huge zero page
    huge_zero = present & file if anon else np.zeros(512, dtype=bool)
    if rel & _FI:
        t[file & nonempty & ~huge_zero] |= _c16(_FI)
    if rel & _ZE:
        t[huge_zero] |= _c16(_ZE)
        if anon:
            # Exclusively mapped pages are never the (shared) zero page.
            t[present & ~huge_zero & ~excl] |= _c16(_F_ZERO)
    if rel & _HU:
        t[huge_zero] |= _c16(_HU)
    return t


_tables: dict[tuple[bool, bool, int, int], np.ndarray] = {}


def _table_for(anon: bool, uw: bool, vma_bits: int, rel: int) -> np.ndarray:
    key = (anon, uw, vma_bits, rel & (_WR | _GU | _SDC | _FI | _ZE | _HU))
    t = _tables.get(key)
    if t is None:
        t = _tables[key] = _table(*key)
    return t


def _uniform(e: np.ndarray, table: np.ndarray) -> np.ndarray | None:
    """If every entry of ``e`` has the same top nine bits and their table value needs no
    fix-up: that value for every page, as a read-only zero-stride array (which the
    engine takes as one run). ``None`` otherwise. The top bits of the smallest and the
    largest entry bound those of every entry in between."""
    if not e.size:
        return None
    top = int(e[0]) >> 55
    if int(e[-1]) >> 55 != top or int(e.min()) >> 55 != top or int(e.max()) >> 55 != top:
        return None
    value = table[top]
    if value & _FLAGS:
        return None
    out: np.ndarray = np.broadcast_to(value, e.shape)
    return out


def _top_bits(e: np.ndarray) -> np.ndarray:
    """Bits 55-63 of each entry (0-511), as ``intp`` indices for ``np.take``."""
    idx: np.ndarray = np.right_shift(e, _u(55)).view(np.int64)
    return idx


class _Context:
    """Per-call state: the pagemap fd, the masks, smaps read so far, cached lookups."""

    def __init__(self, fd: int, pid: int, *, inverted: int, mask: int, anyof: int, return_mask: int,
                 scan_start: int = 0, scan_end: int = 1 << 64, below: int | None = 0) -> None:
        self.fd = fd
        self.pid = pid
        self.inverted = inverted
        self.mask = mask
        self.anyof = anyof
        self.return_mask = return_mask
        self.relevant = mask | anyof | return_mask
        self.scan_start = scan_start
        self.scan_end = scan_end
        #: VMAs below the first one of the range (``None``: not counted yet)
        self.below = below
        #: VMA start -> its smaps fields are filled in
        self.known: dict[int, bool] = {}
        self._smaps: SmapsStream | None = None
        self._kpf_fd: int | None = None
        self._kpf_denied = False
        self._pfns_visible: bool | None = None
        #: VMA start -> (block addresses known PMD-mapped, block addresses that may be)
        self._thp: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pud_occupied: dict[int, bool] = {}  # 1 GiB block -> has a populated page
        self._window: np.ndarray | None = None  # reused by categories() for its window

    def close(self) -> None:
        fd, self._kpf_fd = self._kpf_fd, None
        if fd is not None:
            os.close(fd)
        s, self._smaps = self._smaps, None
        if s is not None:
            s.close()

    # -- reading -------------------------------------------------------------------

    def entries(self, lo: int, hi: int, reuse: bool = False) -> np.ndarray:
        """The pagemap entries of ``[lo, hi)`` (fewer if the read comes back short).
        ``reuse``: into the context's window buffer, which the next such call overwrites
        (a fresh 512 KiB array per chunk costs its page faults every time)."""
        n = (hi - lo) // P
        if reuse:
            if self._window is None or self._window.size < n:
                self._window = np.empty(max(n, CHUNK_PAGES + 2 * PMD_PAGES), dtype=np.uint64)
            out = self._window[:n]
        else:
            out = np.empty(n, dtype=np.uint64)
        view = out.data.cast("B")
        got = 0
        while got < n * 8:
            k = os.preadv(self.fd, [view[got:]], lo // P * 8 + got)
            if k <= 0:
                break
            got += k
        return out[: got // 8]

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

    def smaps(self, v: Vma, v_index: int) -> Vma:
        """Fill in ``v``'s smaps fields (``v_index``: its position among the VMAs of the
        range), reading smaps only as far as ``v``. Raises :class:`_Mismatch` if smaps
        shows another layout."""
        if self.known.get(v.start):
            return v
        s = self._smaps
        if s is None:
            if self.below is None:  # the VMAs came from PROCMAP_QUERY: count those below
                self.below = maps_in_range(read_maps_text(self.pid, self.scan_start), self.scan_start,
                                           self.scan_end)[1]
            s = self._smaps = SmapsStream(self.pid, self.scan_start, self.scan_end, SCAN_FIELDS)
        assert self.below is not None
        while True:
            # Read no further than the records before v could fill (records are at least
            # ~600 bytes; 2 KiB stays clear of the seq_file's 4 KiB buffer, so the kernel
            # never generates, discards and regenerates a record). Never above 4 KiB.
            ahead = self.below + v_index - s.records_seen
            r = read_smaps(s, max(512, min(2048, 512 * ahead)))
            if r is None:
                raise _Mismatch
            if r.end <= v.start:
                continue  # a VMA in range the walk did not need smaps for
            if (r.start, r.end, r.inode, r.perms) != (v.start, v.end, v.inode, v.perms):
                raise _Mismatch
            v.vmflags = r.vmflags
            v.fields = r.fields
            self.known[v.start] = True
            return v

    # -- VMA level -----------------------------------------------------------------

    def wp_allowed(self, v: Vma, v_index: int) -> bool:
        if _kernel_has_wp_async() is False:
            return False  # no uffd here can be asynchronous
        if "uw" not in self.smaps(v, v_index).vmflags:
            return False
        if self.pid == os.getpid():
            known = wp_async_registry.lookup(v.start, v.end)
            if known is not None:
                return known
        raise _eopnotsupp(
            f"cannot tell whether the uffd-WP registration of {v.start:#x}-{v.end:#x} (pid {self.pid}) "
            "is asynchronous (PAGE_IS_WPALLOWED); only registrations made through pagescan in this "
            "process are known"
        )

    # -- page level ----------------------------------------------------------------

    def categories(self, v: Vma, v_index: int, lo: int, hi: int, vma_bits: int) -> np.ndarray:
        """Categories (uint16) of the pages of ``[lo, hi)`` (inside ``v``), VMA bits included."""
        if v.hugetlb:
            return self._hugetlb_categories(v, lo, hi, vma_bits)
        rel = self.relevant
        # Whole PMD blocks around the chunk, so page-table presence can be judged.
        # The last block of user space is one page short (TASK_SIZE): pad it.
        span = PMD_PAGES * P
        wlo = lo - lo % span
        whi = min(-(-hi // span) * span, _task_limit())
        window = self.entries(wlo, whi, reuse=True)  # nothing returned refers to it
        if window.size % PMD_PAGES:
            window = np.concatenate([window, np.zeros(-window.size % PMD_PAGES, dtype=np.uint64)])
        n = (hi - lo) // P
        first = (lo - wlo) // P
        e = window[first : first + n]
        if e.size != n:
            raise _short_read(self.pid, lo)

        anon = v.anonymous
        uw = self.known.get(v.start, False) and "uw" in v.vmflags
        table = _table_for(anon, uw, vma_bits, rel)
        if not window.any():
            # Every entry of the window's PMD blocks is empty: no page-table evidence, no
            # THP; one value for the chunk, WRITTEN iff the VMA is uffd-WP.
            value = int(table[0])
            if value & _F_TABLE:
                value = (value & _CATS) | (_WR if "uw" in self.smaps(v, v_index).vmflags else 0)
            out: np.ndarray = np.broadcast_to(_c16(value), (n,))
            return out
        uniform = _uniform(e, table)
        thp = self._thp_chunk(v, v_index, window, wlo, lo, n) if rel & _HU else None
        if uniform is not None:
            if thp is None:
                return uniform  # the common case of populated memory: one value, no copy
            cats = uniform.copy()
        else:
            cats = np.take(table, _top_bits(e))
        unknown: np.ndarray | None = None  # per page: category bits that cannot be known
        if uniform is None and int(cats.max()) >= _F_ZERO:
            flagged = cats & _c16(_FLAGS)
            empty = (flagged & _c16(_F_TABLE)) != 0
            if empty.any():
                occupied = ((window & (_PRESENT | _SWAP)) != 0).reshape(-1, PMD_PAGES).any(axis=1)
                table_here = np.repeat(occupied, PMD_PAGES)[first : first + n]
                written = empty & table_here
                if not (empty <= table_here).all() and "uw" in self.smaps(v, v_index).vmflags:
                    written = empty  # uffd-WP VMA: every empty slot is WRITTEN
                cats[written] |= _c16(_WR)
            cand = (flagged & _c16(_F_ZERO)) != 0
            if cand.any():
                zero = self._zero_pfn_pages(e)
                if zero is None:
                    unknown = np.where(cand, _c16(_ZE), _c16(0))
                else:
                    cats[cand & zero] |= _c16(_ZE)
            cats &= _c16(_CATS)
        if thp is not None:
            huge, unsure = thp
            cats[huge] |= _c16(_HU)
            if unsure.any():
                bits = np.where(unsure, _c16(_HU), _c16(0))
                unknown = bits if unknown is None else unknown | bits
        if unknown is not None:
            self._settle(v, lo, cats, unknown)
        result: np.ndarray = cats
        return result

    def _hugetlb_categories(self, v: Vma, lo: int, hi: int, vma_bits: int) -> np.ndarray:
        e = self.entries(lo, hi)
        if e.size != (hi - lo) // P:
            raise _short_read(self.pid, lo)
        rel = self.relevant
        present = (e & _PRESENT) != 0
        wp = (e & _UFFD_WP) != 0
        cats = np.full(e.size, vma_bits, dtype=_c16)
        cats[present] |= _c16(_PR)
        marker = ~present & wp  # hugetlb never sets bit 62; a WP marker carries 57
        cats[marker] |= _c16(_SW)
        nonempty = present | marker
        cats[present & ~wp] |= _c16(_WR)
        # HUGE for populated entries, and for empty ones whose PMD table exists.
        if not nonempty.all():
            nonempty |= self._pmd_table(lo, hi)
        cats[nonempty] |= _c16(_HU)
        if rel & _GU:
            cats[(e & _GUARD) != 0] |= _c16(_GU)
        if rel & _SDC:
            cats[(e & _SD) != 0] |= _c16(_SDC)
        if rel & _FI:
            cats[((e & _FILE) != 0) & (present | ((e & _SWAP) != 0))] |= _c16(_FI)
        return cats

    def _settle(self, v: Vma, lo: int, cats: np.ndarray, unknown: np.ndarray) -> None:
        """Raise ``PermissionError`` if a bit that cannot be known changes the answer:
        whether a page matches, or what it reports. Otherwise the bit stays clear."""
        idx = np.flatnonzero(unknown)
        if not idx.size:
            return
        c, u = cats[idx].astype(np.uint64), unknown[idx].astype(np.uint64)
        ret = _u(self.return_mask)
        outcomes = []
        for guess in (0, _ZE, _HU, _ZE | _HU):
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
        raise UnknowablePagesError(int(bits & (Category.PFNZERO | Category.HUGE)), "emulated " + "; ".join(reasons))

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

    # -- THP -------------------------------------------------------------------------

    def _thp_chunk(self, v: Vma, v_index: int, window: np.ndarray, wlo: int, lo: int,
                   n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """HUGE for the ``n`` pages from ``lo`` (a chunk of ``v`` inside the PMD-aligned
        ``window`` of entries from ``wlo``): ``(PMD-mapped THP, maybe)`` per page, or
        ``None`` when no page of the chunk is.

        Cheap tests on the chunk's own entries first: a block that fails one is not
        PMD-mapped. Only if one passes them all does the VMA-wide count against smaps
        (:meth:`_thp_blocks`) decide."""
        if self.known.get(v.start) and not v.pmd_mapped:
            return None
        if v.start in self._thp:
            return self._thp_pmd(v, v_index, lo, n)
        span = PMD_PAGES * P
        b0 = max(0, -(-(v.start - wlo) // span))
        b1 = min(window.size // PMD_PAGES, (v.end - wlo) // span)
        if b1 <= b0:
            return None
        blocks = window[b0 * PMD_PAGES : b1 * PMD_PAGES].reshape(-1, PMD_PAGES)
        if not self._thp_candidates(v, blocks).any():
            return None  # exact: a PMD mapping passes every test
        if not self.smaps(v, v_index).pmd_mapped:
            return None  # smaps: no PMD-mapped THP in this VMA at all
        return self._thp_pmd(v, v_index, lo, n)

    def _thp_candidates(self, v: Vma, blocks: np.ndarray) -> np.ndarray:
        """Per row of ``blocks`` (whole PMD blocks of ``v``): passes every test a PMD
        mapping passes (kpageflags included where readable)."""
        head = blocks[:, 0]
        present_head: np.ndarray = (head & _PRESENT) != 0
        if self._pfns_visible is None and present_head.any():
            self._pfns_visible = bool((head[present_head] & _PFN).any())
        ok = present_head
        if self._pfns_visible:
            ok &= ((head & _PFN) % _u(PMD_PAGES)) == 0  # PMD mappings are physically aligned
        if v.anonymous:
            ok &= (head & _FILE) == 0  # the huge zero page (known already)
        rows = np.flatnonzero(ok)
        if not rows.size:
            return ok
        b = blocks[rows]
        uniform_bits = _UFFD_WP | _FILE | _SD
        good = ((b & _PRESENT) != 0).all(axis=1)
        good &= ((b & uniform_bits) == (b[:, :1] & uniform_bits)).all(axis=1)
        if self._pfns_visible:
            pfn = b & _PFN
            good &= (pfn == pfn[:, :1] + np.arange(PMD_PAGES, dtype=np.uint64)).all(axis=1)
            sel = np.flatnonzero(good)
            if sel.size:
                flags = self.kpageflags(pfn[sel, 0])
                if flags is not None:
                    thp = ((flags >> _u(KPF.THP)) & _u(1)) != 0
                    thp &= ((flags >> _u(KPF.ZERO_PAGE)) & _u(1)) == 0
                    good[sel] = thp
        ok[rows] = good
        return ok

    def _thp_pmd(self, v: Vma, v_index: int, lo: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For the ``n`` pages from ``lo``: (certainly PMD-mapped THP, maybe PMD-mapped)."""
        got = self._thp.get(v.start)
        if got is None:
            self.smaps(v, v_index)
            got = self._thp[v.start] = self._thp_blocks(v)
        return _block_pages(got[0], lo, n), _block_pages(got[1], lo, n)

    def _thp_blocks(self, v: Vma) -> tuple[np.ndarray, np.ndarray]:
        """(PMD-mapped THP blocks, blocks that may be) of ``v`` (smaps fields filled in).

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
        if bhi <= blo or not v.pmd_mapped:
            return empty, empty
        anon = v.anonymous
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


def _task_limit() -> int:
    return _TASK_SIZE


_TASK_SIZE = task_size()
