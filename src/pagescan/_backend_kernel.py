"""The kernel backend: one ``PAGEMAP_SCAN`` ioctl per call.

Facts this module relies on (see ``shared/spec/kernel.md`` section 1):

* The kernel validates the whole argument struct before looking at the range, so
  errors for bad input come back before anything is walked or write-protected.
* ``walk_end`` is stale after a call that returned more than ``PMD_SIZE / PAGE_SIZE``
  (512) regions and then completed: the kernel flushes its bounce buffer, restarts
  from the flush point, and never writes ``walk_end`` again once the rest of the walk
  succeeds. A genuine stop point is never before the end of the last region returned,
  so ``walk_end < regions[-1].end`` means the walk completed -- except for the one
  documented case below.
* Under ``PM_SCAN_WP_MATCHING`` a hugetlb page that is only partly inside the range (or
  cut by ``max_pages``) cannot be write-protected: the kernel withdraws it, sets
  ``walk_end`` to its (clipped) start and keeps walking. That ``walk_end`` is kept.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import struct
import threading
from typing import TYPE_CHECKING

import numpy as np

from ._errors import KernelFeatureError
from ._uapi import libc
from ._uapi.pagemap import CATEGORY_SINCE, PAGEMAP_SCAN, Category, ScanFlag

if TYPE_CHECKING:
    from ._target import Target

__all__ = ["KernelBackend"]

_ARG = struct.Struct("=12Q")
_WALK_END = struct.Struct("=Q")
_WALK_END_OFFSET = 32
_pack_into = _ARG.pack_into
_unpack_walk_end = _WALK_END.unpack_from
_fcntl_ioctl = fcntl.ioctl
_PAGE_SIZE = mmap.PAGESIZE
_WP_MATCHING = int(ScanFlag.WP_MATCHING)


class _ThreadBuffers(threading.local):
    def __init__(self) -> None:
        self.arg = bytearray(_ARG.size)


_tls = _ThreadBuffers()


class KernelBackend:
    """``backend="kernel"``: the ``PAGEMAP_SCAN`` ioctl (Linux 6.7).

    The backend contract (shared with the emulated backend): ``scan()`` takes the
    kernel's arguments, an output array ``vec`` whose slots ``vec[index:index+vec_len]``
    may be written (``vec_addr`` is the address of ``vec[index]``), and returns
    ``(regions written, documented walk_end)``.
    """

    name = "kernel"

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
        arg = _tls.arg
        _pack_into(arg, 0, 96, flags, start, end, 0, vec_addr, vec_len, max_pages, inverted, mask, anyof, return_mask)
        try:
            n: int = _fcntl_ioctl(target._fd, PAGEMAP_SCAN, arg, True)
        except InterruptedError:
            n = libc.ioctl(target.fd, PAGEMAP_SCAN, arg)  # the EINTR-retrying path
        except OSError as err:
            if target._fd < 0:
                target.fd  # raises ValueError: closed Target
            if err.errno == errno.ESRCH:
                raise ProcessLookupError(
                    errno.ESRCH, f"pid {target.pid} has no memory to scan (it exited, is a zombie or a kernel thread)"
                ) from None
            raise _explain(err, inverted | mask | anyof | return_mask) from None
        walk_end: int = _unpack_walk_end(arg, _WALK_END_OFFSET)[0]
        if n and walk_end < end and vec is not None:
            got = vec[index : index + n]
            if walk_end < int(got["end"][-1]) and _is_stale(target.pid, flags, walk_end, got):
                walk_end = -(-end // _PAGE_SIZE) * _PAGE_SIZE  # completed; the kernel rounds end up
        return n, walk_end


def _is_stale(pid: int, flags: int, walk_end: int, regions: np.ndarray) -> bool:
    """``walk_end`` lies below the last region returned: stale, or a skipped hugetlb page?

    A stale value is the restart point of an internal buffer flush, and the walk
    restarted there with a new region, so it is always the start of a returned region.
    A hugetlb page withdrawn under WP_MATCHING is never reported, so its start never is.
    Only when neither test decides (the memory changed between passes) is smaps read.
    """
    starts = regions["start"]
    i = int(np.searchsorted(starts, walk_end))
    if i < len(starts) and int(starts[i]) == walk_end:
        return True
    if not flags & _WP_MATCHING:
        return True  # only WP_MATCHING withdraws pages
    return not _in_hugetlb(pid, walk_end)


def _explain(err: OSError, category_bits: int) -> OSError:
    """Give ENOTTY / unknown-category EINVAL a message naming the kernel needed."""
    if err.errno == errno.ENOTTY:
        return KernelFeatureError(errno.ENOTTY, "PAGEMAP_SCAN", "6.7", "the ioctl on /proc/PID/pagemap")
    if err.errno == errno.EINVAL and category_bits:
        from .capabilities import capabilities

        known = 0
        for cat in Category:
            known |= cat
        missing = Category(category_bits & known & ~int(capabilities().categories))
        if missing:
            name = "PAGE_IS_" + "|PAGE_IS_".join(c.name or "?" for c in missing)
            since = max((CATEGORY_SINCE[c] for c in missing), key=lambda v: tuple(map(int, v.split("."))))
            return KernelFeatureError(errno.EINVAL, name, since, "category bit rejected by PAGEMAP_SCAN")
    return err


def _in_hugetlb(pid: int, address: int) -> bool:
    """Whether ``address`` lies in a hugetlb VMA of ``pid`` (smaps ``KernelPageSize``)."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            inside = False
            for line in f:
                if not inside:
                    head = line.split(b" ", 1)[0]
                    if b"-" in head and not head.endswith(b":"):
                        lo, _, hi = head.partition(b"-")
                        try:
                            inside = int(lo, 16) <= address < int(hi, 16)
                        except ValueError:
                            inside = False
                elif line.startswith(b"KernelPageSize:"):
                    return int(line.split()[1]) * 1024 > _PAGE_SIZE
    except OSError:
        return False
    return False
