"""``PAGEMAP_SCAN`` and ``/proc/PID/pagemap`` ABI.

Sources: ``include/uapi/linux/fs.h`` (``struct pm_scan_arg``, ``struct page_region``,
``PAGE_IS_*``, ``PM_SCAN_*``; Linux 6.7, ``PAGE_IS_SOFT_DIRTY`` 6.8, ``PAGE_IS_GUARD``
6.16), ``fs/proc/task_mmu.c`` (pagemap entry bits) and
``Documentation/admin-guide/mm/pagemap.rst`` (``/proc/kpageflags`` bits).
"""

from __future__ import annotations

import ctypes
import enum

import numpy as np

from ._ioc import _IOWR

__all__ = [
    "ALL_CATEGORIES",
    "CATEGORY_SINCE",
    "KPF",
    "PAGEMAP_SCAN",
    "PAGE_REGION_DTYPE",
    "PM",
    "PM_SCAN_CHECK_WPASYNC",
    "PM_SCAN_WP_MATCHING",
    "PM_SCAN_ARG_DTYPE",
    "Category",
    "ScanFlag",
    "page_region",
    "pm_scan_arg",
]


class Category(enum.IntFlag):
    """Page categories, bit for bit the kernel's ``PAGE_IS_*`` (``linux/fs.h``)."""

    WPALLOWED = 1 << 0  #: VMA is registered uffd-WP on a ``WP_ASYNC`` userfaultfd (6.7)
    WRITTEN = 1 << 1  #: not write-protected by uffd-wp, i.e. written since armed (6.7)
    FILE = 1 << 2  #: backed by a page-cache page: file, shmem, shared anon (6.7)
    PRESENT = 1 << 3  #: mapped in the page table (6.7)
    SWAPPED = 1 << 4  #: any non-present non-empty entry: swap, migration, marker (6.7)
    PFNZERO = 1 << 5  #: the shared zero page, or the huge zero page (6.7)
    HUGE = 1 << 6  #: PMD-mapped THP or hugetlb (6.7)
    SOFT_DIRTY = 1 << 7  #: soft-dirty bit of the entry or VMA (6.8)
    GUARD = 1 << 8  #: ``MADV_GUARD_INSTALL`` guard marker (6.16)


#: Every category bit defined here, as a plain int (``~`` of an ``IntFlag`` complements
#: within the flag's own bits, which would make every unknown bit look known).
ALL_CATEGORIES: int = sum(int(c) for c in Category.__members__.values())

#: Kernel release that first accepts each category bit in ``PAGEMAP_SCAN``.
CATEGORY_SINCE: dict[Category, str] = {
    Category.WPALLOWED: "6.7",
    Category.WRITTEN: "6.7",
    Category.FILE: "6.7",
    Category.PRESENT: "6.7",
    Category.SWAPPED: "6.7",
    Category.PFNZERO: "6.7",
    Category.HUGE: "6.7",
    Category.SOFT_DIRTY: "6.8",
    Category.GUARD: "6.16",
}


class ScanFlag(enum.IntFlag):
    """``pm_scan_arg.flags`` (``PM_SCAN_*``, 6.7)."""

    WP_MATCHING = 1 << 0  #: write-protect the pages that matched and were reported
    CHECK_WPASYNC = 1 << 1  #: fail with EPERM if a VMA in range is not uffd-WP async


PM_SCAN_WP_MATCHING = ScanFlag.WP_MATCHING
PM_SCAN_CHECK_WPASYNC = ScanFlag.CHECK_WPASYNC


class pm_scan_arg(ctypes.Structure):
    """``struct pm_scan_arg`` (96 bytes; ``size`` must be exactly 96)."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


class page_region(ctypes.Structure):
    """``struct page_region`` (24 bytes): ``[start, end)`` and its categories."""

    _fields_ = [
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    ]


assert ctypes.sizeof(pm_scan_arg) == 96, "struct pm_scan_arg must be 96 bytes"
assert ctypes.sizeof(page_region) == 24, "struct page_region must be 24 bytes"

#: numpy view of ``struct page_region``.
PAGE_REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])
#: numpy view of ``struct pm_scan_arg`` (fields in kernel order).
PM_SCAN_ARG_DTYPE = np.dtype([(f[0], "<u8") for f in pm_scan_arg._fields_])
assert PAGE_REGION_DTYPE.itemsize == 24 and PM_SCAN_ARG_DTYPE.itemsize == 96

#: ``_IOWR('f', 16, struct pm_scan_arg)`` on ``/proc/PID/pagemap`` (6.7).
PAGEMAP_SCAN = _IOWR("f", 16, ctypes.sizeof(pm_scan_arg))


class PM(enum.IntFlag):
    """Bits of a ``/proc/PID/pagemap`` entry (one little-endian u64 per page)."""

    PFN_MASK = (1 << 55) - 1  #: bits 0-54: PFN, or swap type (0-4) / offset (5-54)
    SOFT_DIRTY = 1 << 55  #: 3.11
    MMAP_EXCLUSIVE = 1 << 56  #: page certainly mapped only here (4.2)
    UFFD_WP = 1 << 57  #: 5.13
    GUARD_REGION = 1 << 58  #: 6.15
    FILE = 1 << 61  #: file page or shared anon (not private anon)
    SWAP = 1 << 62
    PRESENT = 1 << 63


class KPF(enum.IntEnum):
    """Bit numbers of ``/proc/kpageflags`` entries (stable part, ``kernel-page-flags.h``)."""

    LOCKED = 0
    ERROR = 1
    REFERENCED = 2
    UPTODATE = 3
    DIRTY = 4
    LRU = 5
    ACTIVE = 6
    SLAB = 7
    WRITEBACK = 8
    RECLAIM = 9
    BUDDY = 10
    MMAP = 11
    ANON = 12
    SWAPCACHE = 13
    SWAPBACKED = 14
    COMPOUND_HEAD = 15
    COMPOUND_TAIL = 16
    HUGE = 17
    UNEVICTABLE = 18
    HWPOISON = 19
    NOPAGE = 20
    KSM = 21
    THP = 22
    OFFLINE = 23
    ZERO_PAGE = 24
    IDLE = 25
    PGTABLE = 26
