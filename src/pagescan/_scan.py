"""``scan()`` and ``scan_iter()``: one ``PAGEMAP_SCAN`` call, and a resumable walk.

The keyword names are the kernel's ``struct pm_scan_arg`` field names and mean exactly
what the kernel means (``shared/spec/kernel.md`` 1.4-1.8). Where pagescan differs:

* ``walk_end`` is the documented value on every backend; the kernel's stale value after
  more than 512 regions is corrected (see :mod:`pagescan._backend_kernel`).
* The region buffer is allocated for you. ``vec_len`` only bounds how many regions the
  call may return; the allocation is clamped to what the range can hold, so a large
  ``vec_len`` costs nothing. ``vec_len=0`` keeps the kernel's meaning (walk, report
  nothing; with ``PM_SCAN_WP_MATCHING`` it write-protects *every* PTE in range,
  ignoring the masks and ``max_pages`` -- the kernel's "reset everything" fast path).
"""

from __future__ import annotations

import errno
import mmap
import operator
import os
from os import getpid as _getpid
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple, final

import numpy as np

from ._backend_kernel import KernelBackend
from ._errors import KernelFeatureError
from . import _target as _target_mod
from ._target import Target, target_for
from ._uapi.pagemap import PAGE_REGION_DTYPE, Category

__all__ = ["PageRegion", "ScanResult", "buffer_range", "masks", "scan", "scan_iter"]

PAGE_SIZE = mmap.PAGESIZE
_U64 = (1 << 64) - 1
#: Default region capacity of one call when ``vec_len`` is not given.
DEFAULT_VEC_LEN = 1 << 16
#: Calls needing at most this many slots reuse a per-thread buffer (results are copied).
_SCRATCH_REGIONS = 4096
_BACKENDS = ("auto", "kernel", "emulated")


class PageRegion(NamedTuple):
    """One ``struct page_region``: ``[start, end)`` with ``categories & return_mask``."""

    start: int
    end: int
    categories: Category


@final
class ScanResult:
    """What one ``PAGEMAP_SCAN`` call returned.

    Attributes:
        regions: numpy array of :data:`PAGE_REGION_DTYPE`, ascending, non-overlapping.
        walk_end: where the walk stopped; everything in ``[start, walk_end)`` was
            examined. Equals the page-rounded ``end`` when the walk completed.
        complete: ``walk_end`` reached ``end``.
    """

    __slots__ = ("complete", "end", "regions", "start", "walk_end")

    regions: np.ndarray
    walk_end: int
    complete: bool
    start: int
    end: int

    def __init__(self) -> None:
        raise TypeError("ScanResult has no public constructor; call pagescan.scan()")

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self) -> Iterator[PageRegion]:
        for s, e, c in self.regions.tolist():
            yield PageRegion(s, e, Category(c))

    def __getitem__(self, index: int) -> PageRegion:
        s, e, c = self.regions[index].tolist()
        return PageRegion(s, e, Category(c))

    @property
    def pages(self) -> int:
        """Total number of pages in the returned regions."""
        r = self.regions
        return int((r["end"] - r["start"]).sum()) // PAGE_SIZE

    def __repr__(self) -> str:
        return (
            f"<ScanResult regions={len(self.regions)} pages={self.pages} "
            f"walk_end={self.walk_end:#x} complete={self.complete}>"
        )


class _Arena(threading.local):
    """Per-thread bump allocator for small region vectors.

    The kernel writes a call's regions straight into ``buf[pos:]`` and the result is
    the zero-copy view ``buf[pos:pos+n]``; ``pos`` then moves past it, so a later call
    never overwrites a result handed out. A full arena is replaced (old results keep
    theirs alive). A small result pins at most one arena (96 KiB).
    """

    def __init__(self) -> None:
        self.new()

    def new(self) -> None:
        self.buf = np.empty(_SCRATCH_REGIONS, PAGE_REGION_DTYPE)
        self.addr = int(self.buf.ctypes.data)
        self.pos = 0


_arena = _Arena()
_kernel = KernelBackend()
_EMPTY = np.empty(0, PAGE_REGION_DTYPE)
_EMPTY.flags.writeable = False
_env_backend: str | None = None
_emulated: Any = None
#: Set once the kernel answered ENOTTY: "auto" then uses the emulation.
_kernel_missing = False


def _emulated_backend() -> Any:
    global _emulated
    if _emulated is None:
        from ._backend_emulated import EmulatedBackend

        _emulated = EmulatedBackend()
    return _emulated


def _pick_backend(backend: str) -> Any:
    global _env_backend
    if backend == "auto":
        if _env_backend is None:
            env = os.environ.get("PAGESCAN_BACKEND", "") or "auto"
            if env not in _BACKENDS:
                raise ValueError(f"PAGESCAN_BACKEND must be one of {_BACKENDS}, not {env!r}")
            _env_backend = env
        backend = _env_backend
        if backend == "auto":
            return _emulated_backend() if _kernel_missing else _kernel
    if backend == "kernel":
        return _kernel
    if backend == "emulated":
        return _emulated_backend()
    raise ValueError(f"backend must be one of {_BACKENDS}, not {backend!r}")


def _call(
    impl: Any, backend: str, target: Target, start: int, end: int, flags: int, inverted: int, mask: int,
    anyof: int, return_mask: int, max_pages: int, vec: Any, index: int, addr: int, vec_len: int,
) -> tuple[int, int]:
    """Run the backend; under "auto", fall back to the emulation when the ioctl is missing."""
    global _kernel_missing
    try:
        return impl.scan(  # type: ignore[no-any-return]
            target, start, end, flags, inverted, mask, anyof, return_mask, max_pages, vec, index, addr, vec_len
        )
    except KernelFeatureError as err:
        if impl is not _kernel or backend != "auto" or err.errno != errno.ENOTTY or _env_backend == "kernel":
            raise
        _kernel_missing = True
        return _emulated_backend().scan(  # type: ignore[no-any-return]
            target, start, end, flags, inverted, mask, anyof, return_mask, max_pages, vec, index, addr, vec_len
        )


_ARG_NAMES = (
    "start",
    "end",
    "flags",
    "category_inverted",
    "category_mask",
    "category_anyof_mask",
    "return_mask",
    "max_pages",
)


def _check_u64(values: tuple[Any, ...], names: tuple[str, ...]) -> tuple[int, ...]:
    out = []
    for name, value in zip(names, values):
        try:
            v = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
        if v < 0:
            raise ValueError(f"{name} must not be negative, got {v}")
        if v > _U64:
            raise ValueError(f"{name} does not fit in 64 bits: {v:#x}")
        out.append(v)
    return tuple(out)


def buffer_range(obj: Any) -> tuple[int, int]:
    """``(start, end)`` of the whole pages covering a buffer object (mmap, numpy array,
    bytearray, memoryview, ctypes array): start rounded down, end rounded up."""
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            arr = np.frombuffer(obj, dtype=np.uint8)
        except (TypeError, ValueError) as err:
            raise TypeError(f"expected a buffer object, not {type(obj).__name__}") from err
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        raise ValueError("buffer must be contiguous")
    lo = int(arr.__array_interface__["data"][0])
    if not arr.nbytes:
        return lo & ~(PAGE_SIZE - 1), lo & ~(PAGE_SIZE - 1)  # an empty buffer covers no page
    hi = lo + arr.nbytes
    return lo & ~(PAGE_SIZE - 1), (hi + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def scan(
    start: Any,
    end: Any = None,
    *,
    pid: Any = None,
    flags: Any = 0,
    category_inverted: Any = 0,
    category_mask: Any = 0,
    category_anyof_mask: Any = 0,
    return_mask: Any = 0,
    max_pages: Any = 0,
    vec_len: Any = None,
    backend: str = "auto",
    out: np.ndarray | None = None,
) -> ScanResult:
    """One ``PAGEMAP_SCAN`` call over ``[start, end)`` of process ``pid``.

    Args:
        start, end: the range (``start`` page aligned; ``end`` is rounded up). ``start``
            may instead be a buffer object (``end`` omitted): its whole pages are scanned.
        pid: ``None`` for this process, a pid, a :class:`Target`, or anything with ``.pid``.
        flags: ``PM_SCAN_WP_MATCHING`` | ``PM_SCAN_CHECK_WPASYNC``.
        category_inverted, category_mask, category_anyof_mask, return_mask: the kernel's
            masks: a page matches when ``c = categories ^ inverted`` has every bit of
            ``mask`` and, if ``anyof`` is non-zero, one of its bits. ``return_mask``
            selects the categories reported (and merged on).
        max_pages: stop after this many matching pages (0: no limit).
        vec_len: the most regions to return (default: what the range can hold, at most
            65536). 0 walks without reporting.
        backend: ``"auto"`` (kernel when available; the environment variable
            ``PAGESCAN_BACKEND``, read once, overrides), ``"kernel"`` or ``"emulated"``.
        out: optional preallocated C-contiguous writable array of ``PAGE_REGION_DTYPE``;
            its length is ``vec_len`` and ``result.regions`` is a view of it.

    Returns:
        :class:`ScanResult`.

    Raises:
        OSError: the kernel's errno: EINVAL (unknown bits, unaligned ``start``), EFAULT
            (``end < start``, range beyond user space), EPERM (``CHECK_WPASYNC`` on a VMA
            not registered for async uffd-WP), ESRCH (target exited), EINTR.
        KernelFeatureError: ``PAGEMAP_SCAN`` (Linux 6.7) or a category bit is missing.
        ProcessLookupError, PermissionError: no such process / may not trace it.
        TypeError, ValueError: bad Python arguments (non-int, negative, > 64 bits).
    """
    if end is None:
        start, end = buffer_range(start)
    inverted, mask, anyof = category_inverted, category_mask, category_anyof_mask
    try:
        v = start | end | flags | inverted | mask | anyof | return_mask | max_pages
        fast = isinstance(v, int) and 0 <= v <= _U64
    except (TypeError, OverflowError):  # non-ints; small numpy ints overflow against addresses
        fast = False
    if not fast:
        start, end, flags, inverted, mask, anyof, return_mask, max_pages = _check_u64(
            (start, end, flags, inverted, mask, anyof, return_mask, max_pages), _ARG_NAMES
        )
    impl = _pick_backend(backend)

    # The most regions this call can produce: one per page, and no more than max_pages.
    cap = (end - start + PAGE_SIZE - 1) // PAGE_SIZE if end > start else 1
    if max_pages and max_pages < cap:
        cap = max_pages
    if out is not None:
        if vec_len is not None and vec_len != len(out):
            raise ValueError("pass either out= or vec_len=, or make them agree")
        if out.dtype != PAGE_REGION_DTYPE or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writable C-contiguous array of PAGE_REGION_DTYPE")
        vec_len = len(out)
    elif vec_len is None:
        vec_len = cap if cap < DEFAULT_VEC_LEN else DEFAULT_VEC_LEN
    else:
        if type(vec_len) is not int or not 0 <= vec_len <= _U64:
            (vec_len,) = _check_u64((vec_len,), ("vec_len",))
        if vec_len > cap:
            vec_len = cap  # cannot change the outcome: the range holds at most cap regions

    target = _target_mod._self
    if pid is None and target is not None and target._fd >= 0 and target._owner_pid == _getpid():
        owned = False
    elif isinstance(pid, Target):
        target, owned = pid, False
    else:
        target, owned = target_for(pid)
    try:
        if out is not None:
            addr = int(out.ctypes.data) if vec_len else 0
            n, walk_end = _call(
                impl, backend, target, start, end, flags, inverted, mask, anyof, return_mask, max_pages,
                out, 0, addr, vec_len,
            )
            regions = out[:n]
        elif vec_len == 0:
            n, walk_end = _call(
                impl, backend, target, start, end, flags, inverted, mask, anyof, return_mask, max_pages,
                None, 0, 0, 0,
            )
            regions = _EMPTY
        elif vec_len <= _SCRATCH_REGIONS:
            a = _arena
            pos = a.pos
            if pos + vec_len > _SCRATCH_REGIONS:
                a.new()
                pos = 0
            buf = a.buf
            n, walk_end = _call(
                impl, backend, target, start, end, flags, inverted, mask, anyof, return_mask, max_pages,
                buf, pos, a.addr + pos * 24, vec_len,
            )
            a.pos = pos + n
            regions = buf[pos : pos + n]
        else:
            vec = np.empty(vec_len, PAGE_REGION_DTYPE)
            n, walk_end = _call(
                impl, backend, target, start, end, flags, inverted, mask, anyof, return_mask, max_pages,
                vec, 0, int(vec.ctypes.data), vec_len,
            )
            regions = vec[:n]
    finally:
        if owned:
            target.close()
    res = object.__new__(ScanResult)
    res.regions = regions
    res.walk_end = walk_end
    res.complete = walk_end >= end
    res.start = start
    res.end = end
    return res


def scan_iter(
    start: Any,
    end: int | None = None,
    *,
    pid: Any = None,
    flags: int = 0,
    category_inverted: int = 0,
    category_mask: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = 0,
    max_pages: int = 0,
    vec_len: int | None = None,
    backend: str = "auto",
    out: np.ndarray | None = None,
) -> Iterator[ScanResult]:
    """Walk ``[start, end)`` completely, one :func:`scan` call per yielded result.

    Each call resumes at the previous ``walk_end``; ``max_pages`` is a budget for the
    whole iteration. The concatenated regions equal those of one call with an unlimited
    buffer (a region is never split across results: a buffer stop happens exactly where
    a new region would start).

    It stops without looping when a call cannot make progress: under
    ``PM_SCAN_WP_MATCHING`` a hugetlb page only partly inside the range cannot be
    write-protected; the kernel skips it and reports its start as ``walk_end``. The last
    result then has ``complete == False`` and ``walk_end`` at that page.

    With ``out=``, each result's ``regions`` is a view of ``out``, valid until the next
    iteration.
    """
    if end is None:
        start, end = buffer_range(start)
    if max_pages:
        (max_pages,) = _check_u64((max_pages,), ("max_pages",))
    target, owned = (pid, False) if isinstance(pid, Target) else target_for(pid)
    try:
        cur = start
        budget = max_pages
        while True:
            res = scan(
                cur, end, pid=target, flags=flags, category_inverted=category_inverted,
                category_mask=category_mask, category_anyof_mask=category_anyof_mask,
                return_mask=return_mask, max_pages=budget, vec_len=vec_len, backend=backend, out=out,
            )
            yield res
            if res.complete or vec_len == 0:
                return
            if max_pages:
                budget -= res.pages
                if budget <= 0:
                    return
            nxt = res.walk_end
            if nxt <= cur or (len(res.regions) and nxt < int(res.regions["end"][-1])):
                return  # no progress possible (partial hugetlb page under WP_MATCHING)
            cur = nxt
    finally:
        if owned:
            target.close()


def masks(
    require: int = 0, exclude: int = 0, anyof: int = 0, report: int | None = None
) -> dict[str, int]:
    """Compile friendly filters to the kernel's masks, for ``scan(**masks(...))``.

    ``require``: every one of these categories; ``exclude``: none of these; ``anyof``:
    at least one of these; ``report``: the ``return_mask`` (default: every category
    this kernel supports, from :func:`capabilities`).
    ``exclude`` becomes ``category_inverted | category_mask``, so it must not overlap
    ``anyof`` (the kernel inverts before testing both).
    """
    require, exclude, anyof = int(require), int(exclude), int(anyof)
    if require & exclude:
        raise ValueError(f"categories both required and excluded: {Category(require & exclude)!r}")
    if anyof & exclude:
        raise ValueError(f"categories both in anyof and excluded: {Category(anyof & exclude)!r}")
    if report is None:
        from .capabilities import capabilities

        report = int(capabilities().categories)
    return {
        "category_inverted": exclude,
        "category_mask": require | exclude,
        "category_anyof_mask": anyof,
        "return_mask": int(report),
    }



