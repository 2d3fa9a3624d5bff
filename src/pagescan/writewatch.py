"""``WriteWatch``: which pages of a range were written since I last asked?

``GetWriteWatch``/``ResetWriteWatch`` semantics on Linux: the range is registered for
userfaultfd write-protect in asynchronous mode (``UFFD_FEATURE_WP_ASYNC``, Linux 6.7,
which implies ``WP_UNPOPULATED``) and armed. A write to an armed page faults once; the
kernel itself clears the page's uffd-wp bit and lets the write through -- no message,
no handler, the writer never blocks. ``PAGEMAP_SCAN`` then reads back the pages whose
bit is clear (``PAGE_IS_WRITTEN``) and, with ``PM_SCAN_WP_MATCHING``, re-arms exactly
the pages it reported in the same page-table walk, so a write racing a ``get`` lands in
this answer or the next one, never nowhere.

Decisions (what the kernel does, and what pagescan does about it):

* **Granularity.** Whole pages: a buffer is widened to the pages that cover it (a
  ``bytearray`` or small numpy array shares its pages with other heap objects, whose
  writes are reported too). hugetlb memory is tracked per huge page (a write marks all
  its base pages). Transparent huge pages: a PMD-mapped THP that is armed as a whole
  stays PMD-mapped until its first write, which splits the mapping so that only the
  written page reads written; while the range is watched no new THP forms in it
  (arming installs uffd-wp markers in page tables, and khugepaged and
  ``MADV_COLLAPSE`` refuse uffd-wp PTEs), so results are page-exact. After ``close``
  THPs may form again; ``nohugepage=True`` applies ``MADV_NOHUGEPAGE`` first (as Wine
  does for watched views), which keeps the range out of THP for good.
* **Guard pages** (``MADV_GUARD_INSTALL``) read as written to the kernel. ``get`` and
  ``regions`` exclude them where the kernel reports guard pages (6.16): with
  ``category_mask=WRITTEN|GUARD, category_inverted=GUARD``, which takes the kernel off
  its ``WRITTEN``-only fast path -- or, when the previous answer was sparse (at most one
  region per 2048 pages), on the fast path, which reports a guard page installed since
  it was last seen (and arms it: a guard page is reported by the fast path at most
  once), followed by a ``GUARD`` scan of just the reported pages, whose guard pages are
  dropped. Both give the same answer (``tests/test_writewatch.py`` checks it on real
  guard pages); the fast one costs 0.6x the other at 0.01 % written. After
  ``MADV_GUARD_REMOVE`` the page reads as written.
* **Zapped pages.** ``MADV_DONTNEED``/hole punching drop the page and its arming; the
  kernel defines that as written, and it is reported as written.
* **Memory types.** WP-async can track any mapping: private and shared anonymous,
  shmem/memfd, hugetlb, and files. Only writes through *this* mapping's page tables
  are seen: writes by ``write(2)`` to the file, by other mappings or processes sharing
  the memory, or by devices (DMA) are not.
* **hugetlb and max_pages.** ``get(max_pages=n, reset=True)`` cannot return part of a
  huge page (the kernel does not re-arm part of one): it returns whole huge pages up to
  ``n`` pages, and raises ``OSError(EINVAL)`` when even the first written huge page
  does not fit in ``n`` (rather than answering "nothing written").
* **fork.** The child does not inherit the registration: all its pages read written
  (scan them with a ``pagemap`` the child opens itself, which pagescan does after
  fork), and a ``WriteWatch`` used in the child raises ``RuntimeError``. The parent's
  watch is unaffected: its writes after the fork (copy-on-write) are reported.
* **mremap/munmap.** The registration does not follow ``mremap``; after any part of
  the range is moved away, unmapped, or replaced by a new mapping, ``get``, ``regions``
  and ``reset`` raise ``PermissionError`` (EPERM). Create a new watch. A range that is
  not wholly mapped to begin with is refused (``OSError(ENOMEM)``), where the kernel
  alone would register the mapped parts and skip the holes.
* Watches may not overlap (the kernel allows one uffd per VMA): an overlapping watch
  is refused with ``OSError(EBUSY)``, as is a range registered with another uffd.
  ``close()`` (or the context manager) unregisters the range explicitly, so it is no
  longer tracked even if a forked process still holds a copy of the uffd.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import Any, final

import numpy as np

from . import _probe
from ._args import Buffer, buffer_range, check_aligned, u64
from ._errors import InvalidArgumentError, feature_error
from ._scan import Scanner, ScanResult, scan, walk
from ._uapi import libc
from ._uapi.mman import MADV
from ._uapi.pagemap import PAGE_REGION_DTYPE, Category, ScanFlag
from ._uapi.userfaultfd import RegisterMode, UffdFeature
from .userfaultfd import Userfaultfd

__all__ = ["WriteWatch", "regions_to_pages"]

P = mmap.PAGESIZE
#: The fast path plus a guard check of the reported pages is used when the previous
#: answer had at most one region per this many pages of the range (1 GiB written at
#: 0.01 %: 346 against 598 us; 0.05 %: 504 against 671 us; slower above about 0.08 %).
_SPARSE_PAGES = 2048
#: Regions the reused buffer of a whole-range get starts with, and the most it is kept at
#: (the C reference's buffer has room for every page).
_BUF_FIRST = 4096
_BUF_KEEP = 1 << 16
#: Reported regions closer than this many pages share one guard-check scan.
_WINDOW_GAP = 64
#: More than one guard-check scan per this many pages of the range: one scan of the span.
_WINDOW_PAGES = 1024
#: Up to this many regions, their windows are found in a Python loop (warm, 10 us
#: against numpy's 15 at 64 regions; level at ~120).
_WINDOW_LOOP = 128
_WRITTEN = int(Category.WRITTEN)
_GUARD = int(Category.GUARD)

_active_lock = threading.RLock()  # reentrant: a signal handler or __del__ may create or close a watch
_active: dict[int, tuple[int, int]] = {}  # id(watch) -> (start, end)


def _forget_in_child() -> None:
    """A forked child tracks nothing of its parent's (its copies of the ranges are not
    registered): its own watches may cover them."""
    global _active_lock
    _active_lock = threading.RLock()
    _active.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _msync_async(addr: int, length: int) -> None:
    """``msync(MS_ASYNC)``: a no-op on the memory that fails with ENOMEM on a hole."""
    libc.msync(addr, length, libc.MS_ASYNC)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    try:
        with memoryview(obj) as mv:
            return mv.nbytes
    except TypeError:
        return -1  # not a buffer: buffer_range has said so already


def regions_to_pages(regions: np.ndarray, page_size: int = P) -> np.ndarray:
    """Expand ``PAGE_REGION_DTYPE`` regions to the ascending uint64 addresses of their pages.

    ``regions`` must be a one-dimensional array of ``PAGE_REGION_DTYPE`` (as
    ``ScanResult.regions`` and ``WriteWatch.get(pages=False)`` return) whose regions
    do not end before they start (``ValueError`` otherwise, ``TypeError`` for another
    type); ``page_size`` a power of two."""
    if not isinstance(regions, np.ndarray) or regions.dtype != PAGE_REGION_DTYPE:
        raise TypeError(f"regions must be a numpy array of PAGE_REGION_DTYPE, not "
                        f"{regions.dtype if isinstance(regions, np.ndarray) else type(regions).__name__}")
    if regions.ndim != 1:
        raise ValueError(f"regions must be one-dimensional, not of shape {regions.shape}")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, not {page_size!r}")
    if len(regions) and bool((regions["end"] < regions["start"]).any()):
        at = int(np.flatnonzero(regions["end"] < regions["start"])[0])
        raise ValueError(f"region {at} ends before it starts: {regions[at]['start']:#x}-{regions[at]['end']:#x}")
    pages = float(((regions["end"] - regions["start"]) // np.uint64(page_size)).sum(dtype=np.float64))
    need = pages * 8
    if need > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
        raise ValueError(f"the regions hold {pages:.4g} pages: their addresses would take {need:.4g} bytes, "
                         "more than this machine's memory")
    return _regions_to_pages(regions, page_size)


def _regions_to_pages(regions: np.ndarray, page_size: int = P) -> np.ndarray:
    """``regions_to_pages`` without its checks, for regions this package made."""
    n = len(regions)
    if not n:
        return np.empty(0, dtype=np.uint64)
    if n == 1:  # the common small case: one numpy call instead of ten
        s, e, _ = regions[0].tolist()
        return np.arange(s, e, page_size, dtype=np.uint64)
    starts, ends = regions["start"], regions["end"]
    shift = page_size.bit_length() - 1
    size = ends - starts
    counts = size >> np.uint64(shift) if page_size == 1 << shift else size // np.uint64(page_size)
    total = int(counts.sum())
    if total == n:  # one page per region (scattered writes)
        return np.ascontiguousarray(starts)
    if total - n <= n // 4:  # mostly single pages: each region's start, then the few runs filled in
        pages: np.ndarray = np.repeat(starts, counts.astype(np.intp))
        multi = np.flatnonzero(counts != 1)
        extra = counts[multi].astype(np.intp) - 1  # pages after the first, per run
        upto = np.cumsum(extra)
        step = np.arange(1, int(upto[-1]) + 1, dtype=np.intp) - np.repeat(upto - extra, extra)  # 1..extra
        at = np.repeat(multi + upto - extra, extra) + step  # multi + upto - extra: where a run's first page is
        pages[at] += step.astype(np.uint64) * np.uint64(page_size)
        return pages
    # The running sum of the steps from page to page: one page, or the jump to the next region.
    steps = np.full(total, page_size, dtype=np.uint64)
    steps[0] = starts[0]
    steps[np.cumsum(counts[:-1]).astype(np.intp)] = starts[1:] - ends[:-1] + np.uint64(page_size)
    return np.cumsum(steps, out=steps)


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.empty(0, PAGE_REGION_DTYPE)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _windows(regions: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of the groups of ``regions`` (ascending, at least one) less than
    ``_WINDOW_GAP`` pages apart: in Python for a few regions (a dozen numpy calls cost
    more than the loop while a large walk has left the caches cold), with numpy for many."""
    gap = _WINDOW_GAP * P
    if len(regions) <= _WINDOW_LOOP:
        rows = regions.tolist()
        out = []
        lo, hi = rows[0][0], rows[0][1]
        for s, e, _ in rows:
            if s - hi >= gap:
                out.append((lo, hi))
                lo = s
            hi = e
        out.append((lo, hi))
        return out
    starts, ends = regions["start"], regions["end"]
    cut = np.flatnonzero(starts[1:] - ends[:-1] >= np.uint64(gap)) + 1
    return list(zip(starts[np.r_[0, cut]].tolist(), ends[np.r_[cut - 1, len(regions) - 1]].tolist()))


def _as_regions(pages: np.ndarray) -> np.ndarray:
    """Ascending page addresses as ``PAGE_REGION_DTYPE`` regions of written pages."""
    out = np.empty(0, PAGE_REGION_DTYPE)
    if pages.size:
        brk = np.flatnonzero(np.diff(pages) != np.uint64(P)) + 1
        out = np.empty(brk.size + 1, PAGE_REGION_DTYPE)
        out["start"] = pages[np.r_[0, brk]]
        out["end"] = pages[np.r_[brk - 1, pages.size - 1]] + np.uint64(P)
        out["categories"] = _WRITTEN
    return out


@final
class WriteWatch:
    """Track writes to ``[start, start + length)`` (or to a buffer object's pages).

    Args:
        start: page-aligned address, or a buffer object (mmap, numpy array, bytearray,
            memoryview) whose covering pages are watched (then omit ``length``).
        length: bytes; rounded up to whole pages.
        nohugepage: ``MADV_NOHUGEPAGE`` on the range first (page-exact results).

    Raises:
        KernelFeatureError: no ``UFFD_FEATURE_WP_ASYNC`` (needs Linux 6.7).
        OSError: ENOMEM (not wholly mapped), EBUSY (overlaps another watch, or
            registered with another uffd), EINVAL (memory a uffd cannot track:
            ``[vdso]``, ``VM_PFNMAP``, ``MAP_DROPPABLE``, a hugetlb range not aligned to
            its huge pages).
        PermissionError: EPERM (a mapping that can never be written, e.g. a shared
            mapping of a read-only file).
        ValueError, TypeError: bad arguments (unaligned ``start``, ``length <= 0``).
    """

    __slots__ = ("__weakref__", "_bufs", "_guard_bufs", "_lock", "_owner", "_scanners", "_sparse", "_uffd", "end", "exclude",
                 "start")

    def __init__(self, start: int | Buffer, length: int | None = None, *, nohugepage: bool = False) -> None:
        self._uffd: Userfaultfd | None = None
        # Prepared once (buffers reused), by (reset, fast path); the guard check by None.
        self._scanners: dict[tuple[bool, bool] | None, Scanner] = {}
        self._sparse = True  # the previous answer was sparse: use the fast path
        # Guard regions of one window: a reentrant get (a signal handler) takes its own.
        self._guard_bufs = [np.zeros(64, PAGE_REGION_DTYPE)]
        self._bufs: list[np.ndarray] = []  # spare region buffers of whole-range gets
        if length is None:
            lo, hi = buffer_range(start, "start")
            if _nbytes(start) == 0:
                raise ValueError("cannot watch an empty buffer")
        else:
            lo, n = u64("start", start, bool_ok=False), u64("length", length, bool_ok=False)
            check_aligned("WriteWatch", "start", lo)
            if n == 0:
                raise InvalidArgumentError("WriteWatch: length must not be 0")
            hi = lo + (n + P - 1) // P * P
        self.start, self.end = lo, hi
        if not _probe.uffd_api().features & UffdFeature.WP_ASYNC:
            raise feature_error(errno.EINVAL, ["UFFD_FEATURE_WP_ASYNC"], "needed by WriteWatch")
        self.exclude = int(Category.GUARD) if _probe.pagemap_scan().categories & Category.GUARD else 0
        with _active_lock:
            for other in tuple(_active.values()):  # (a signal handler may create or close one meanwhile)
                if other[0] < hi and lo < other[1]:
                    raise OSError(
                        errno.EBUSY,
                        f"{os.strerror(errno.EBUSY)}: {lo:#x}-{hi:#x} overlaps a WriteWatch of "
                        f"{other[0]:#x}-{other[1]:#x}",
                    )
            _active[id(self)] = (lo, hi)
        try:
            try:
                _msync_async(lo, hi - lo)
            except OSError as err:
                if err.errno != errno.ENOMEM:
                    raise
                # The kernel would register the mapped parts and skip the holes.
                raise OSError(
                    errno.ENOMEM, f"{os.strerror(errno.ENOMEM)}: {lo:#x}-{hi:#x} is not wholly mapped"
                ) from None
            if nohugepage:
                libc.madvise(lo, hi - lo, MADV.NOHUGEPAGE)
            uf = Userfaultfd(UffdFeature.WP_ASYNC)
            try:
                uf.register(lo, hi - lo, RegisterMode.WP)
                uf.writeprotect(lo, hi - lo)
            except BaseException:
                uf.close()
                raise
        except BaseException:
            with _active_lock:
                _active.pop(id(self), None)
            raise
        self._uffd = uf
        self._owner = os.getpid()
        self._lock = threading.RLock()  # a get() from a signal handler during a get() must not deadlock

    # -- lifecycle ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._uffd is None or self._uffd.closed

    def close(self) -> None:
        """Unregister the range (the kernel clears its write-protection) and forget it."""
        uf, self._uffd = self._uffd, None
        with _active_lock:
            _active.pop(id(self), None)
        if uf is not None:
            if not uf.closed and os.getpid() == self._owner:
                # A forked child may hold a copy of the fd (keeping the uffd alive), so
                # closing ours alone would leave the range registered. In the child the
                # ioctl would act on the parent's mm: only the owner unregisters.
                try:
                    uf.unregister(self.start, self.end - self.start)
                except OSError:
                    pass  # part of the range is gone; closing the fd drops the rest
            uf.close()

    def __enter__(self) -> WriteWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<pagescan.WriteWatch {self.start:#x}-{self.end:#x} {state}>"

    @property
    def length(self) -> int:
        return self.end - self.start

    def _check(self) -> Userfaultfd:
        uf = self._uffd
        if uf is None or uf.closed:
            raise ValueError("operation on a closed WriteWatch")
        if os.getpid() != self._owner:
            raise RuntimeError(
                f"this WriteWatch belongs to pid {self._owner}; a forked child does not inherit "
                "the write tracking (all its pages read as written)"
            )
        return uf

    # -- queries ----------------------------------------------------------------------

    def regions(self, reset: bool = False, max_pages: int | None = None) -> np.ndarray:
        """Written pages as compact ``PAGE_REGION_DTYPE`` regions, ascending.

        ``reset=True`` re-arms exactly the pages returned, in the same walk; with
        ``max_pages`` the pages beyond the limit stay written for the next call.

        Raises:
            ValueError: closed watch, or ``max_pages`` not a positive int.
            RuntimeError: called in a forked child.
            PermissionError: the range was unmapped, moved or replaced (EPERM).
            OSError: EINVAL for hugetlb memory when ``reset=True`` and ``max_pages`` is
                smaller than the first written huge page.
        """
        return self._written(reset, max_pages, False)

    def _written(self, reset: bool, max_pages: int | None, pages: bool) -> np.ndarray:
        """:meth:`regions`, or with ``pages`` the addresses of their pages (:meth:`get`)."""
        self._check()
        if max_pages is not None:
            given = max_pages
            try:
                max_pages = u64("max_pages", max_pages, bool_ok=False)
            except TypeError:
                max_pages = 0  # as in 0.1: any bad max_pages is a ValueError
            if max_pages == 0:
                raise ValueError(f"max_pages must be a positive int or None, not {given!r}")
        reset = bool(reset)
        fast = bool(self.exclude) and max_pages is None and self._sparse
        sc = self._scanners.get((reset, fast))
        if sc is None:
            ex = 0 if fast else self.exclude
            sc = self._scanners[reset, fast] = Scanner(
                flags=int(ScanFlag.CHECK_WPASYNC | (ScanFlag.WP_MATCHING if reset else 0)),
                category_mask=_WRITTEN | ex, category_inverted=ex, return_mask=_WRITTEN,
            )
        if max_pages is None:
            return self._whole(sc, fast, pages)
        with self._lock:
            parts, last = self._walk(sc, self.start, max_pages)
        got = sum(int((p["end"] - p["start"]).sum()) for p in parts) // P
        if reset and not got and last is not None and not last.complete:
            # The walk stopped at a huge page it could not re-arm in part (hugetlb).
            raise OSError(
                errno.EINVAL,
                f"{os.strerror(errno.EINVAL)}: max_pages={max_pages} is smaller than the written huge "
                f"page at {last.walk_end:#x}; with reset=True hugetlb pages are returned and re-armed whole",
            )
        found = _joined(parts)
        return _regions_to_pages(found) if pages else found

    def _walk(self, sc: Scanner, start: int, max_pages: int) -> tuple[list[np.ndarray], ScanResult | None]:
        """The written regions of ``[start, end)``, walked in calls of a few thousand
        regions (the caller holds the lock), and the last result."""
        parts = []
        last = None
        try:
            for last in walk(sc, start, self.end, None, max_pages):
                if len(last.regions):
                    parts.append(last.regions)
            if last is not None and not last.complete:
                # The walk stopped early (max_pages): CHECK_WPASYNC has not seen the
                # rest of the range. Check it without walking pages: inverting
                # WPALLOWED in the mask makes the kernel skip every async-WP VMA at
                # the VMA level, and CHECK_WPASYNC fails on any other.
                w = int(Category.WPALLOWED)
                scan(last.walk_end, self.end, flags=int(ScanFlag.CHECK_WPASYNC),
                     category_inverted=w, category_mask=w, vec_len=0)
        except PermissionError as err:
            raise self._gone(err) from err
        # PAGEMAP_SCAN skips holes silently: a range moved away or unmapped would
        # read "nothing written". Check it is still wholly mapped.
        self._check_mapped()
        return parts, last

    def _whole(self, sc: Scanner, fast: bool, pages: bool) -> np.ndarray:
        """The whole range (no ``max_pages``) in one kernel call, as the C reference makes
        it: into a reused buffer (grown, and the walk resumed, when an answer fills it),
        then guard pages left out after the fast path; the answer is converted to
        addresses, or copied, before the buffer is reused."""
        end = self.end
        with self._lock:
            try:
                buf = self._bufs.pop()  # list pop/append are atomic: a reentrant get takes its own
            except IndexError:
                buf = np.empty(_BUF_FIRST, PAGE_REGION_DTYPE)
            try:
                try:
                    n, walk_end = sc.scan_into(self.start, end, buf)
                    while walk_end < end and n == len(buf):  # full: go on in a bigger one
                        bigger = np.empty(2 * len(buf), PAGE_REGION_DTYPE)
                        bigger[:n] = buf[:n]
                        buf = bigger
                        k, walk_end = sc.scan_into(walk_end, end, buf[n:])
                        n += k
                except PermissionError as err:
                    raise self._gone(err) from err
                found = buf[:n]
                if walk_end < end:  # stopped at a hugetlb page it could not re-arm in part
                    parts, _ = self._walk(sc, walk_end, 0)
                    found = _joined([found, *parts])
                else:
                    self._check_mapped()
                if fast and len(found):
                    found = self._without_guards(found)
                if self.exclude:
                    self._sparse = len(found) * _SPARSE_PAGES <= (end - self.start) // P
                return _regions_to_pages(found) if pages else found.copy()  # nothing returned shares buf
            finally:
                if len(buf) <= _BUF_KEEP:
                    self._bufs.append(buf)

    def _without_guards(self, regions: np.ndarray) -> np.ndarray:
        """``regions`` (from the fast path) less the guard pages among them.

        The fast path reports exactly what the masked walk would, plus the guard pages
        not yet armed (``docs/kernel-facts.md``, PAGEMAP_SCAN fast paths). Those are
        found by a ``GUARD`` scan of the reported pages: one scan per group of regions
        less than ``_WINDOW_GAP`` pages apart, or one of their whole span when that
        would take many (then it costs what the masked walk would have).
        """
        g = self._scanners.get(None)
        if g is None:
            g = self._scanners[None] = Scanner(category_mask=_GUARD, return_mask=_GUARD)
        windows = _windows(regions)
        if (len(windows) - 1) * _WINDOW_PAGES > (self.end - self.start) // P:
            windows = [(windows[0][0], windows[-1][1])]
        try:
            buf = self._guard_bufs.pop()  # list pop/append are atomic
        except IndexError:
            buf = np.zeros(64, PAGE_REGION_DTYPE)
        into = g.scan_into
        guards: list[np.ndarray] = []
        try:
            for lo, hi in windows:
                n, walk_end = into(lo, hi, buf)  # usually none: no allocation
                if n == len(buf) and walk_end < hi:
                    guards.extend(res.regions for res in walk(g, lo, hi, None, 0))
                elif n:
                    guards.append(buf[:n].copy())
        finally:
            self._guard_bufs.append(buf)
        if not guards:
            return regions
        pages = np.setdiff1d(_regions_to_pages(regions), _regions_to_pages(np.concatenate(guards)), assume_unique=True)
        return _as_regions(pages)

    def _fast_get(self, reset: bool) -> np.ndarray:
        """Page addresses of the whole range as the kernel's ``WRITTEN``-only fast path
        reports them (``reset``: re-armed in the same walk): :meth:`get`'s answer plus the
        guard pages not armed yet, which that walk arms, so each is reported once
        (``docs/kernel-facts.md``, PAGEMAP_SCAN, "Fast paths"). For a caller that finds
        those pages another way: the Checkpointer reads every page it is given, and a
        guard page cannot be read (:meth:`_guard_pages` then names them)."""
        self._check()
        reset = bool(reset)
        sc = self._scanners.get((reset, True))
        if sc is None:
            sc = self._scanners[reset, True] = Scanner(
                flags=int(ScanFlag.CHECK_WPASYNC | (ScanFlag.WP_MATCHING if reset else 0)),
                category_mask=_WRITTEN, return_mask=_WRITTEN,
            )
        return self._whole(sc, False, True)

    def _guard_pages(self, pages: np.ndarray) -> np.ndarray:
        """Those of the ascending page addresses ``pages`` that are guard pages now (one
        ``GUARD`` scan of their span; armed or not, a guard page reads ``GUARD``)."""
        if not self.exclude or not pages.size:
            return np.empty(0, np.uint64)
        g = self._scanners.get(None)
        if g is None:
            g = self._scanners[None] = Scanner(category_mask=_GUARD, return_mask=_GUARD)
        lo, hi = max(int(pages[0]), self.start), min(int(pages[-1]) + P, self.end)
        if lo >= hi:
            return np.empty(0, np.uint64)
        with self._lock:
            found = _joined([res.regions for res in walk(g, lo, hi, None, 0)])
        return np.intersect1d(pages.astype(np.uint64), _regions_to_pages(found), assume_unique=True)

    def _gone(self, err: OSError | None = None) -> PermissionError | ValueError:
        """The error for a range found no longer registered: a closed watch's (``close``
        in another thread or a signal handler unregistered it during the call), else
        ``PermissionError``."""
        if self.closed:
            return ValueError("operation on a closed WriteWatch (closed during the call)")
        detail = f" ({err.strerror})" if err is not None and err.errno != errno.EPERM else ""
        return PermissionError(
            errno.EPERM,
            f"{os.strerror(errno.EPERM)}: {self.start:#x}-{self.end:#x} is no longer fully registered for "
            f"write tracking (unmapped, mremap'd or replaced?){detail}",
        )

    def _check_mapped(self) -> None:
        try:
            _msync_async(self.start, self.end - self.start)
        except OSError as err:
            if err.errno != errno.ENOMEM:  # ENOMEM: part of the range is unmapped
                raise
            raise self._gone(err) from err

    def get(self, max_pages: int | None = None, reset: bool = False) -> np.ndarray:
        """Addresses of the written pages, ascending ``uint64`` (``GetWriteWatch``)."""
        return self._written(reset, max_pages, True)

    def reset(self) -> None:
        """Re-arm every page of the range (``ResetWriteWatch``)."""
        uf = self._check()
        with self._lock:
            try:
                uf.writeprotect(self.start, self.end - self.start)
            except FileNotFoundError as err:  # ENOENT: a VMA in range is not registered
                raise self._gone(err) from err
            self._check_mapped()
