"""``PROCMAP_QUERY``: one VMA of a process by address, an ioctl on ``/proc/PID/maps``.

Source: ``include/uapi/linux/fs.h`` (``struct procmap_query``, ``enum
procmap_query_flags``; Linux 6.11) and ``fs/proc/task_mmu.c`` (``do_procmap_query``).
It reports what a maps line shows -- range, ``r``/``w``/``x``/``s``, offset, device,
inode, name -- plus the VMA's page size (``vma_kernel_pagesize``: above the base page
only for hugetlb), and nothing of smaps' ``VmFlags`` (``uw``, ``pf``, ``gu``, ...).
"""

from __future__ import annotations

import ctypes
import enum

from ._ioc import _IOWR

__all__ = ["PROCFS_IOCTL_MAGIC", "PROCMAP_QUERY", "ProcmapQueryFlag", "procmap_query"]

PROCFS_IOCTL_MAGIC = "f"


class ProcmapQueryFlag(enum.IntFlag):
    """``enum procmap_query_flags``: the VMA's permissions (out, and as query filters in
    ``query_flags``) and how the address is matched."""

    VMA_READABLE = 0x01
    VMA_WRITABLE = 0x02
    VMA_EXECUTABLE = 0x04
    VMA_SHARED = 0x08
    #: the VMA covering ``query_addr`` or, if none, the next one above it
    COVERING_OR_NEXT_VMA = 0x10
    #: only file-backed VMAs
    FILE_BACKED_VMA = 0x20


class procmap_query(ctypes.Structure):
    """``struct procmap_query`` (104 bytes in 6.11; ``size`` tells the kernel which
    version the caller has)."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("query_flags", ctypes.c_uint64),  # in
        ("query_addr", ctypes.c_uint64),  # in
        ("vma_start", ctypes.c_uint64),  # out
        ("vma_end", ctypes.c_uint64),  # out
        ("vma_flags", ctypes.c_uint64),  # out: ProcmapQueryFlag VMA_* bits
        ("vma_page_size", ctypes.c_uint64),  # out
        ("vma_offset", ctypes.c_uint64),  # out: vm_pgoff << PAGE_SHIFT, as maps prints
        ("inode", ctypes.c_uint64),  # out
        ("dev_major", ctypes.c_uint32),  # out
        ("dev_minor", ctypes.c_uint32),  # out
        ("vma_name_size", ctypes.c_uint32),  # in: buffer size; out: name length + 1, 0 if none
        ("build_id_size", ctypes.c_uint32),  # in/out
        ("vma_name_addr", ctypes.c_uint64),  # in
        ("build_id_addr", ctypes.c_uint64),  # in
    ]


assert ctypes.sizeof(procmap_query) == 104

PROCMAP_QUERY = _IOWR(PROCFS_IOCTL_MAGIC, 17, ctypes.sizeof(procmap_query))
