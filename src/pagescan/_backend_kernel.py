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
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _engine, _probe
from . import _target as _target_mod
from ._args import U64, check_out, u64
from ._errors import feature_error, with_context
from ._procfs import task_size
from ._uapi.pagemap import ALL_CATEGORIES, PAGEMAP_SCAN, Category, ScanFlag, pm_scan_arg

if TYPE_CHECKING:
    from ._backend import Runner
    from ._target import Target

__all__ = ["KernelBackend"]

_ioctl = fcntl.ioctl
_PAGE_SIZE = mmap.PAGESIZE
_WP_MATCHING = int(ScanFlag.WP_MATCHING)
#: ``start, end, walk_end, vec, vec_len, max_pages`` of ``struct pm_scan_arg``, at byte 16:
#: one ``pack_into`` costs a third of six ctypes field setters.
_pack_range = struct.Struct("=6Q").pack_into
_RANGE_OFFSET = pm_scan_arg.start.offset


class KernelBackend:
    """``backend="kernel"``: the ``PAGEMAP_SCAN`` ioctl (Linux 6.7)."""

    name = "kernel"

    def scan(self, target: Target, arg: pm_scan_arg, out: np.ndarray | None) -> tuple[int, int]:
        try:
            n: int = _ioctl(target._fd, PAGEMAP_SCAN, arg, True)
        except OSError as err:
            n = _again(target, arg, err)
        walk_end: int = arg.walk_end
        end = arg.end
        if n and walk_end < end and out is not None:
            walk_end = _corrected(target, arg.flags, walk_end, end, n, out)
        return n, walk_end

    def prepare(self, flags: int, inverted: int, mask: int, anyof: int, return_mask: int) -> Runner:
        """The prepared call behind :class:`~pagescan.Scanner`: the same as :meth:`scan`
        with the flags and masks packed once, the range packed in one ``struct`` call."""
        free: list[pm_scan_arg] = []  # spare request structs: list pop/append are atomic
        ioctl, pack, at, req = _ioctl, _pack_range, _RANGE_OFFSET, PAGEMAP_SCAN

        def run(target: Target, start: int, end: int, vec: int, vec_len: int, max_pages: int,
                out: np.ndarray | None) -> tuple[int, int]:
            try:
                arg = free.pop()
            except IndexError:
                arg = pm_scan_arg(96, flags, 0, 0, 0, 0, 0, 0, inverted, mask, anyof, return_mask)
            try:
                pack(arg, at, start, end, 0, vec, vec_len, max_pages)
                try:
                    n: int = ioctl(target._fd, req, arg, True)
                except OSError as err:
                    n = _again(target, arg, err)
                walk_end: int = arg.walk_end
            finally:
                free.append(arg)
            if n and walk_end < end and out is not None:
                walk_end = _corrected(target, flags, walk_end, end, n, out)
            return n, walk_end

        return run

    def prepare_into(
        self, target: Target | None, flags: int, inverted: int, mask: int, anyof: int, return_mask: int,
        max_pages: int, vec_len: int | None, on_enotty: Callable[[int, int, Any], tuple[int, int]] | None,
    ) -> Callable[[int, int, Any], tuple[int, int]]:
        """``Scanner.scan_into`` as one closure: the range checks, the remembered ``out``
        (validated once, re-checked for length and writability at each call), the
        target (``None``: this process, reopened after fork) and the ioctl in a single
        Python frame. ``on_enotty(start, end, out)`` serves a call the kernel answered
        ENOTTY (no ``PAGEMAP_SCAN``: ``backend="auto"`` falls back)."""
        free: list[pm_scan_arg] = []  # spare request structs: list pop/append are atomic
        ioctl, pack, at, req = _ioctl, _pack_range, _RANGE_OFFSET, PAGEMAP_SCAN
        # (out, address, slots the kernel may fill, length) of the last array seen; the reference
        # keeps numpy from resizing it in place.
        last: tuple[Any, int, int, int] | None = None

        def remember(out: Any) -> tuple[Any, int, int, int]:
            nonlocal last
            addr = check_out(out)
            n = len(out)
            c = last = (out, addr, n if vec_len is None or n <= vec_len else vec_len, n)
            return c

        def scan_into(start: int, end: int, out: Any) -> tuple[int, int]:
            if type(start) is not int or type(end) is not int or not (0 <= start <= U64 and 0 <= end <= U64):
                start, end = u64("start", start), u64("end", end)
            c = last
            if c is None or c[0] is not out or len(out) != c[3] or not out.flags.writeable:
                c = remember(out)
            t = target
            if t is None:
                t = _target_mod._self  # reset after fork by an at-fork hook
                if t is None or t._fd < 0:
                    t = _target_mod.self_target()
            try:
                try:
                    arg = free.pop()
                except IndexError:
                    arg = pm_scan_arg(96, flags, 0, 0, 0, 0, 0, 0, inverted, mask, anyof, return_mask)
                try:
                    pack(arg, at, start, end, 0, c[1], c[2], max_pages)
                    try:
                        n: int = ioctl(t._fd, req, arg, True)
                    except OSError as err:
                        n = _again(t, arg, err)
                    walk_end: int = arg.walk_end
                finally:
                    free.append(arg)
            except OSError as err:
                if on_enotty is None or err.errno != errno.ENOTTY:
                    raise
                return on_enotty(start, end, out)
            if n and walk_end < end:
                walk_end = _corrected(t, flags, walk_end, end, n, out)
            return n, walk_end

        return scan_into


def _again(target: Target, arg: pm_scan_arg, err: OSError) -> int:
    """After a failed ioctl: retry on EINTR (a fatal signal is pending at a chunk
    boundary: we are dying anyway), else raise the explained error."""
    while True:
        if not isinstance(err, InterruptedError):
            if target._fd < 0:
                target.fd  # raises ValueError: closed Target
            raise _explain(err, target, arg) from None
        try:
            n: int = _ioctl(target._fd, PAGEMAP_SCAN, arg, True)
            return n
        except OSError as again:
            err = again


def _corrected(target: Target, flags: int, walk_end: int, end: int, n: int, out: np.ndarray) -> int:
    """``walk_end`` after a call that returned ``n`` regions and stopped before ``end``."""
    got = out[:n]
    if walk_end < int(got["end"][n - 1]) and _is_stale(target.pid, flags, walk_end, got):
        return -(-end // _PAGE_SIZE) * _PAGE_SIZE  # completed; the kernel rounds end up
    return walk_end


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
