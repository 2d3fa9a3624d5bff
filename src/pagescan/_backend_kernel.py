"""The kernel backend: one ``PAGEMAP_SCAN`` ioctl per call.

Facts this module relies on (``docs/kernel-facts.md``, PAGEMAP_SCAN):

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

Errors are translated here, in one place (:func:`_explain`): the errno and the
exception class stay the kernel's; the message says which argument or which memory.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
from typing import TYPE_CHECKING

import numpy as np

from . import _engine, _probe
from ._errors import feature_error, with_context
from ._procfs import task_size
from ._uapi.pagemap import ALL_CATEGORIES, PAGEMAP_SCAN, Category, ScanFlag, pm_scan_arg

if TYPE_CHECKING:
    from ._target import Target

__all__ = ["KernelBackend"]

_ioctl = fcntl.ioctl
_PAGE_SIZE = mmap.PAGESIZE
_WP_MATCHING = int(ScanFlag.WP_MATCHING)


class KernelBackend:
    """``backend="kernel"``: the ``PAGEMAP_SCAN`` ioctl (Linux 6.7)."""

    name = "kernel"

    def scan(self, target: Target, arg: pm_scan_arg, out: np.ndarray | None) -> tuple[int, int]:
        while True:
            try:
                n: int = _ioctl(target._fd, PAGEMAP_SCAN, arg, True)
                break
            except InterruptedError:
                continue  # a fatal signal is pending at a chunk boundary: we are dying anyway
            except OSError as err:
                if target._fd < 0:
                    target.fd  # raises ValueError: closed Target
                raise _explain(err, target, arg) from None
        walk_end: int = arg.walk_end
        end = arg.end
        if n and walk_end < end and out is not None:
            got = out[:n]
            if walk_end < int(got["end"][n - 1]) and _is_stale(target.pid, arg.flags, walk_end, got):
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


def _explain(err: OSError, target: Target, arg: pm_scan_arg) -> OSError:
    """The error the caller sees: same errno and class, a message that says why."""
    e = err.errno
    where = f"PAGEMAP_SCAN of [{arg.start:#x}, {arg.end:#x}) in pid {target.pid}"
    if e == errno.ENOTTY:
        return feature_error(errno.ENOTTY, ["PAGEMAP_SCAN"], "the ioctl on /proc/PID/pagemap")
    if e == errno.ESRCH:
        return ProcessLookupError(
            errno.ESRCH, f"pid {target.pid} has no memory to scan (it exited, is a zombie or a kernel thread)"
        )
    if e == errno.EPERM and arg.flags & ScanFlag.CHECK_WPASYNC:
        return PermissionError(errno.EPERM, f"{err.strerror}: {where}: PM_SCAN_CHECK_WPASYNC and a mapping in "
                                            "range is not registered for asynchronous uffd write-protect")
    if e == errno.EINVAL:
        bits = arg.category_inverted | arg.category_mask | arg.category_anyof_mask | arg.return_mask
        probe = _probe.pagemap_scan()
        missing = Category(bits & ALL_CATEGORIES & ~int(probe.categories))
        if missing:
            names = [f"PAGE_IS_{c.name}" for c in Category if c & missing]
            return feature_error(errno.EINVAL, names, "category bit rejected by PAGEMAP_SCAN")
    if e in (errno.EINVAL, errno.EFAULT):
        probe = _probe.pagemap_scan()
        try:
            _engine.validate(
                start=arg.start, end=arg.end, flags=arg.flags, inverted=arg.category_inverted,
                mask=arg.category_mask, anyof=arg.category_anyof_mask, return_mask=arg.return_mask,
                vec_is_null=not arg.vec, vec_len=arg.vec_len, known_flags=int(probe.flags),
                known_categories=int(probe.categories), page_size=_PAGE_SIZE, task_size=task_size(),
            )
        except OSError as ours:
            if ours.errno == e:
                return ours
    return with_context(err, where)




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
