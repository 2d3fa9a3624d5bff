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

import ctypes
import errno
import fcntl
import mmap
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _engine, _probe
from . import _target as _target_mod
from ._args import address_word, check_out, u64
from ._errors import feature_error, with_context
from ._procfs import task_size
from ._uapi.pagemap import ALL_CATEGORIES, PAGE_REGION_DTYPE, PAGEMAP_SCAN, Category, ScanFlag, pm_scan_arg

if TYPE_CHECKING:
    from ._backend import Runner
    from ._target import Target

__all__ = ["KernelBackend"]

_ioctl = fcntl.ioctl
_PAGE_SIZE = mmap.PAGESIZE
_WP_MATCHING = int(ScanFlag.WP_MATCHING)
_REQ = int(PAGEMAP_SCAN)
#: Regions in the kernel's bounce buffer (``PAGEMAP_WALK_SIZE >> PAGE_SHIFT``: the
#: entries of one page table, 512 with 4 KiB pages).
_BOUNCE = _PAGE_SIZE // 8
#: ``start, end, walk_end, vec, vec_len, max_pages`` of ``struct pm_scan_arg``, at byte 16:
#: one ``pack_into`` costs a third of six ctypes field setters.
_pack_range = struct.Struct("=6Q").pack_into
_RANGE_OFFSET = pm_scan_arg.start.offset
#: Indices of the ``u64`` fields of ``struct pm_scan_arg`` in a ``memoryview.cast("Q")`` of
#: a request: one item store costs 20 ns, a ctypes field setter 40.
_START, _END, _WALK_END, _VEC, _VEC_LEN, _MAX_PAGES = 2, 3, 4, 5, 6, 7
_REGION = PAGE_REGION_DTYPE.itemsize
#: A request: a ``u64`` view of a ``bytearray`` holding ``struct pm_scan_arg``, passed to
#: ``fcntl.ioctl`` as it is (which writes ``walk_end`` back into it).
Request = memoryview
#: What ``prepare_into``'s closure remembers of the last ``out`` (see there).
Remembered = tuple[Any, int, list[Request], int, int, list[memoryview], Any, Any]


def _template(flags: int, inverted: int, mask: int, anyof: int, return_mask: int, max_pages: int = 0) -> bytes:
    return bytes(pm_scan_arg(ctypes.sizeof(pm_scan_arg), flags, 0, 0, 0, 0, 0, max_pages, inverted, mask, anyof,
                             return_mask))


def _request(template: bytes) -> Request:
    return memoryview(bytearray(template)).cast("Q")


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
        free: list[Request] = []  # spare requests: list pop/append are atomic
        ioctl, pack, at, req, template = _ioctl, _pack_range, _RANGE_OFFSET, _REQ, _template(
            flags, inverted, mask, anyof, return_mask)

        def run(target: Target, start: int, end: int, vec: int, vec_len: int, max_pages: int,
                out: np.ndarray | None) -> tuple[int, int]:
            try:
                q = free.pop()
            except IndexError:
                q = _request(template)
            try:
                pack(q, at, start, end, 0, vec, vec_len, max_pages)
                try:
                    n: int = ioctl(target._fd, req, q, True)
                except OSError as err:
                    n = _again(target, q, err)
                walk_end: int = q[_WALK_END]
            finally:
                free.append(q)
            if n and walk_end < end and out is not None:
                walk_end = _corrected(target, flags, walk_end, end, n, out)
            return n, walk_end

        return run

    def prepare_small(self, flags: int, inverted: int, mask: int, anyof: int, return_mask: int, max_pages: int,
                      slots: int) -> Callable[[Target, int, int], tuple[bytes, int]]:
        """``small(target, start, end) -> (regions, walk_end)`` for ``start < end`` at
        most ``slots`` pages apart, with the default ``vec_len`` (one slot per page of
        the range): the kernel writes into a reused buffer of ``slots`` regions, and the
        regions come back as ``bytes`` of ``PAGE_REGION_DTYPE`` records. Per call only
        ``start``, ``end``, ``walk_end`` and ``vec_len`` are stored (a bad ``start`` or
        ``end`` is refused by the store: ``ValueError`` naming it)."""
        free: list[tuple[Request, memoryview]] = []  # list pop/append are atomic
        ioctl, req, template = _ioctl, _REQ, _template(flags, inverted, mask, anyof, return_mask, max_pages)
        size, page = _REGION, _PAGE_SIZE

        def new() -> tuple[Request, memoryview]:
            q = _request(template)
            buf = bytearray(slots * size)
            view = memoryview(buf)  # kept with the request: buf stays alive and cannot be resized
            q[_VEC] = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            return q, view

        def small(target: Target, start: int, end: int) -> tuple[bytes, int]:
            try:
                q, buf = free.pop()
            except IndexError:
                q, buf = new()
            try:
                try:
                    q[2] = start  # refuses a negative or 65-bit value: ValueError
                    q[3] = end
                except ValueError:
                    u64("start", start), u64("end", end)  # the error that names the argument
                    raise
                q[4] = 0
                q[6] = (end - start + page - 1) // page  # the kernel's bounce buffer is sized by it
                try:
                    n: int = ioctl(target._fd, req, q, True)
                except OSError as err:
                    n = _again(target, q, err)
                walk_end: int = q[4]
                raw = buf[:n * size].tobytes()
            finally:
                free.append((q, buf))
            if n and walk_end < end:
                walk_end = _corrected(target, flags, walk_end, end, n, memoryview(raw).cast("Q"))
            return raw, walk_end

        return small

    def prepare_into(
        self, target: Target | None, flags: int, inverted: int, mask: int, anyof: int, return_mask: int,
        max_pages: int, vec_len: int | None, on_enotty: Callable[[int, int, Any], tuple[int, int]] | None,
    ) -> Callable[[int, int, Any], tuple[int, int]]:
        """``Scanner.scan_into`` as one closure: the range checks, the remembered ``out``
        (validated once, re-checked for identity, length and writability at each call),
        the target (``None``: this process, reopened after fork) and the ioctl in a
        single Python frame. Spare requests are kept per remembered ``out``, with its
        address and length already packed: a call stores only ``start``, ``end`` and
        ``walk_end``. ``on_enotty(start, end, out)`` serves a call the kernel answered
        ENOTTY (no ``PAGEMAP_SCAN``: ``backend="auto"`` falls back)."""
        ioctl, req, template = _ioctl, _REQ, _template(flags, inverted, mask, anyof, return_mask, max_pages)
        self_target = _target_mod.self_target
        # (out, its length, spare requests packed for it, its address, slots the kernel may
        # fill, its u64 words once made, where its data is now, its dtype) of the last
        # array seen; the reference keeps numpy from resizing it in place, and the live
        # address word catches ``__setstate__`` (new memory for the same object).
        last: Remembered = (None, -1, [], 0, 0, [], None, None)

        def remember(out: Any, start: int, end: int) -> Remembered:
            nonlocal last
            u64("start", start), u64("end", end)  # a bad range is reported before a bad out
            addr, n = check_out(out)
            c = last = (out, n, [], addr, n if vec_len is None or n <= vec_len else vec_len, [], address_word(out),
                        out.dtype)
            return c

        def request(c: Remembered) -> Request:
            q = _request(template)
            q[_VEC], q[_VEC_LEN] = c[3], c[4]
            return q

        def scan_into(start: int, end: int, out: Any) -> tuple[int, int]:
            if type(start) is not int or type(end) is not int:
                start, end = u64("start", start), u64("end", end)
            c = last
            if (c[0] is not out or len(out) != c[1] or not out.flags.writeable or c[6].value != c[3]
                    or out.dtype is not c[7]):
                c = remember(out, start, end)
            t = target
            if t is None:
                t = _target_mod._self  # reset after fork by an at-fork hook
                if t is None or t._fd < 0:
                    t = self_target()
            free = c[2]
            try:
                q = free.pop()
            except IndexError:
                q = request(c)
            try:
                try:
                    q[2] = start  # refuses a negative or 65-bit value: ValueError
                    q[3] = end
                except ValueError:
                    u64("start", start), u64("end", end)  # the error that names the argument
                    raise
                q[4] = 0
                try:
                    n: int = ioctl(t._fd, req, q, True)
                except OSError as err:
                    n = _again(t, q, err)
                except ValueError:
                    if t._fd < 0:  # fcntl says "file descriptor cannot be a negative integer"
                        raise t._closed_error() from None
                    raise
                walk_end: int = q[4]
            except OSError as err:
                if on_enotty is None or err.errno != errno.ENOTTY:
                    raise
                return on_enotty(start, end, out)
            finally:
                free.append(q)
            if n and walk_end < end:
                words = c[5]
                if not words:
                    words.append(_words(out))
                walk_end = _corrected(t, flags, walk_end, end, n, words[0])
            return n, walk_end

        return scan_into


def _again(target: Target, arg: Request | pm_scan_arg, err: OSError) -> int:
    """After a failed ioctl: retry on EINTR (a fatal signal is pending at a chunk
    boundary: we are dying anyway), else raise the explained error."""
    while True:
        if not isinstance(err, InterruptedError):
            if target._fd < 0:
                target.fd  # raises ValueError: closed Target
            raise _explain(err, target, arg if isinstance(arg, pm_scan_arg) else pm_scan_arg.from_buffer_copy(arg)) from None
        try:
            n: int = _ioctl(target._fd, PAGEMAP_SCAN, arg, True)
            return n
        except OSError as again:
            err = again


def _words(out: np.ndarray) -> memoryview:
    """A ``u64`` view of a C-contiguous region array, three words per region: reading
    one word from it costs a third of ``ndarray.item`` right after a walk of a large
    range has evicted numpy's code and data from the caches. (Of the array's memory:
    a subclass such as ``np.ma.MaskedArray`` has its own ``.data``.)"""
    return np.asarray(out).view(np.uint64).data


def _corrected(target: Target, flags: int, walk_end: int, end: int, n: int, out: np.ndarray | memoryview) -> int:
    """``walk_end`` after a call that returned ``n`` regions (``out``: the array, or its
    :func:`_words`) and stopped before ``end``."""
    if not isinstance(out, memoryview) and type(out) is not np.ndarray:
        out = np.asarray(out)  # a subclass's item() may be its own (MaskedArray's is)
    last_end: int = out[3 * n - 2] if isinstance(out, memoryview) else out.item(n - 1)[1]
    if walk_end < last_end and _is_stale(target.pid, flags, walk_end, out, n):
        return -(-end // _PAGE_SIZE) * _PAGE_SIZE  # completed; the kernel rounds end up
    return walk_end


def _is_stale(pid: int, flags: int, walk_end: int, out: np.ndarray | memoryview, n: int) -> bool:
    """``walk_end`` lies below the last region returned: stale, or a skipped hugetlb page?

    A stale value is the restart point of an internal buffer flush, and the walk
    restarted there with a new region, so it is always the start of a returned region.
    A hugetlb page withdrawn under WP_MATCHING is never reported, so its start never is.
    Only when neither test decides (the memory changed between passes) is smaps read.
    """
    if not flags & _WP_MATCHING:
        return True  # only WP_MATCHING withdraws pages
    # Each flush but the last writes a full bounce buffer, so the last restart point is
    # the start of the region at the last multiple of 512: one read, where a search of
    # the regions costs 3-30 us after a large walk (a tenth of a 1 GiB get+WP).
    i = (n - 1) // _BOUNCE * _BOUNCE
    if i and (out[3 * i] if isinstance(out, memoryview) else out.item(i)[0]) == walk_end:
        return True
    starts = np.asarray(out)[0:3 * n:3] if isinstance(out, memoryview) else out[:n]["start"]
    i = int(np.searchsorted(starts, walk_end))
    if i < n and int(starts[i]) == walk_end:
        return True
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
