"""``Scanner``, ``scan()`` and ``scan_iter()``: prepared and one-off ``PAGEMAP_SCAN`` calls.

The keyword names are the kernel's ``struct pm_scan_arg`` field names and mean exactly
what the kernel means (``docs/kernel-facts.md``, PAGEMAP_SCAN). Where pagescan differs:

* ``walk_end`` is the documented value on every backend; the kernel's stale value after
  more than 512 regions is corrected (see :mod:`pagescan._backend_kernel`).
* The region buffer is allocated for you, sized to what the call can return (one slot
  per page of the range at most, ``max_pages`` at most, ``vec_len`` at most), and a
  result keeps only its own regions. A large ``vec_len`` costs nothing: a call that
  could return more than a few thousand regions is made as several kernel calls that
  each resume at the previous ``walk_end``, which returns exactly what one call with a
  huge buffer would (a buffer stop happens exactly where a new region would start).
  ``vec_len=0`` keeps the kernel's meaning (walk, report nothing; with
  ``PM_SCAN_WP_MATCHING`` it write-protects *every* PTE in range, ignoring the masks
  and ``max_pages`` -- the kernel's "reset everything" fast path).
* ``end`` is rounded up to a page boundary, as the kernel does; an unaligned ``start``
  is ``EINVAL`` (:class:`~pagescan.InvalidArgumentError`-style message naming the
  nearest aligned addresses), as the kernel says.

Reentrancy: every call takes its own request struct and its own region buffer (spare
ones are kept in a list whose ``pop``/``append`` are atomic), so a ``scan()`` made from
a signal handler, a ``__del__`` or another thread while another call is in progress is
safe and correct.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, cast, final

import numpy as np

from . import _backend
from . import _target as _target_mod
from ._args import U64, Buffer, address_word, buffer_range, check_out, u64
from ._target import PidLike, Target, resolve_pid, self_target
from ._uapi.pagemap import PAGE_REGION_DTYPE, Category, ScanFlag, page_region

if TYPE_CHECKING:
    from ._backend import Backend, Runner

#: A backend's call for a small range: ``small(target, start, end) -> (regions as bytes,
#: walk_end)`` (see ``KernelBackend.prepare_small``).
Small = Callable[[Target, int, int], "tuple[bytes, int]"]

__all__ = ["PageRegion", "ScanResult", "Scanner", "buffer_range", "masks", "scan", "scan_iter"]

PAGE_SIZE = mmap.PAGESIZE
_P = PAGE_SIZE
#: Default region capacity of one call when ``vec_len`` is not given.
DEFAULT_VEC_LEN = 1 << 16
#: Calls over at most this many pages with the default ``vec_len`` take the backend's
#: small call (a reused buffer, the regions returned as bytes).
_SMALL = 512
#: Calls that can return at most this many regions get an exactly sized buffer the
#: kernel writes into, which becomes the result's (a 1 GiB get+WP sized by ``vec_len``
#: is then answered without reading its regions again: a copy of them costs ~20 us
#: after the walk, 5% of the call); larger calls go through a scratch buffer of this
#: many regions per kernel call.
_CHUNK = 4096
#: The widest range (bytes) that cannot return more than ``_SMALL`` regions.
_SMALL_SPAN = _SMALL * PAGE_SIZE
_REGION = PAGE_REGION_DTYPE.itemsize

_EMPTY = np.empty(0, PAGE_REGION_DTYPE)
_EMPTY.flags.writeable = False
_INT_TYPES = (int, Category, ScanFlag)


class PageRegion(NamedTuple):
    """One ``struct page_region``: ``[start, end)`` with ``categories & return_mask``."""

    start: int
    end: int
    categories: Category


@final
class ScanResult:
    """What one ``PAGEMAP_SCAN`` call returned.

    Attributes:
        regions: numpy array of :data:`PAGE_REGION_DTYPE`, ascending, non-overlapping
            (made on first use: from the bytes of a small answer, it owns only its
            regions; with ``out=``, a view of ``out``).
        walk_end: where the walk stopped; everything in ``[start, walk_end)`` was
            examined. Equals the page-rounded ``end`` when the walk completed.
        complete: ``walk_end`` reached ``end``.
        start, end: the range asked for.
    """

    __slots__ = ("_regions", "end", "start", "walk_end")

    #: an array, the bytes of a small answer, or ``(out, n)``: made an array on first use
    _regions: np.ndarray | bytes | tuple[np.ndarray, int]
    walk_end: int
    start: int
    end: int

    def __init__(self) -> None:
        raise TypeError("ScanResult has no public constructor; call pagescan.scan()")

    @property
    def regions(self) -> np.ndarray:
        r = self._regions
        if type(r) is np.ndarray:
            return r
        if isinstance(r, bytes):
            a: np.ndarray = np.frombuffer(bytearray(r), PAGE_REGION_DTYPE)
        elif type(r) is tuple:
            out, n = r  # the caller's out and the regions written into it
            a = out[:n]
        else:
            return cast("np.ndarray", r)  # a view of an ``out`` that is an ndarray subclass
        self._regions = a
        return a

    @property
    def complete(self) -> bool:
        return self.walk_end >= self.end

    def __len__(self) -> int:
        r = self._regions
        if type(r) is bytes:
            return len(r) // _REGION
        return r[1] if type(r) is tuple else len(r)

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
            f"<ScanResult regions={len(self)} pages={self.pages} "
            f"walk_end={self.walk_end:#x} complete={self.complete}>"
        )


_new_result = object.__new__


def _result(regions: np.ndarray | bytes | tuple[np.ndarray, int], walk_end: int, start: int, end: int) -> ScanResult:
    res: ScanResult = _new_result(ScanResult)
    res._regions = regions
    res.walk_end = walk_end
    res.start = start
    res.end = end
    return res


_array_types: dict[int, Any] = {}
_addressof = ctypes.addressof
_c_char = ctypes.c_char
_frombuffer = np.frombuffer


def _owned(cap: int) -> tuple[np.ndarray, int]:
    """A zeroed region array of ``cap`` slots that owns its memory, and its address
    (a ctypes array: its address is free to read, unlike ``ndarray.ctypes.data``)."""
    t = _array_types.get(cap)
    if t is None:
        t = _array_types[cap] = page_region * cap
    c = t()
    arr: np.ndarray = np.frombuffer(c, PAGE_REGION_DTYPE)  # type: ignore[arg-type]  # ctypes arrays are buffers
    return arr, ctypes.addressof(c)


@final
class Scanner:
    """A prepared ``PAGEMAP_SCAN``: arguments validated and packed once.

    Args:
        pid: ``None`` for this process (after ``fork``, the child's own memory), a pid,
            a :class:`Target`, or anything with ``.pid``. A Scanner that opened another
            process's pagemap owns it: :meth:`close` it (or use ``with``).
        flags: as for :func:`scan`, and so are ``category_inverted``, ``category_mask``,
            ``category_anyof_mask``, ``return_mask``, ``max_pages``, ``vec_len`` and
            ``backend``.

    :meth:`scan` returns the same :class:`ScanResult` as :func:`scan`; :meth:`scan_into`
    fills a caller's array and allocates nothing. A Scanner may be used from several
    threads and from signal handlers at once.

    Raises:
        TypeError, ValueError: bad arguments (checked here, not at each call).
    """

    __slots__ = (
        "__dict__", "__weakref__", "_fallback", "_impl", "_out", "_owned", "_run", "_scratch", "_small", "_target",
        "backend",
        "category_anyof_mask", "category_inverted", "category_mask", "flags", "max_pages",
        "return_mask", "vec_len",
    )

    def __init__(
        self,
        pid: PidLike = None,
        *,
        flags: int = 0,
        category_inverted: int = 0,
        category_mask: int = 0,
        category_anyof_mask: int = 0,
        return_mask: int = 0,
        max_pages: int = 0,
        vec_len: int | None = None,
        backend: str = "auto",
    ) -> None:
        self._target: Target | None = None
        self._owned = False
        self.flags = u64("flags", flags)
        self.category_inverted = u64("category_inverted", category_inverted)
        self.category_mask = u64("category_mask", category_mask)
        self.category_anyof_mask = u64("category_anyof_mask", category_anyof_mask)
        self.return_mask = u64("return_mask", return_mask)
        self.max_pages = u64("max_pages", max_pages)
        self.vec_len = None if vec_len is None else u64("vec_len", vec_len)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, not {type(backend).__name__}")
        impl, self._fallback = _backend.pick(backend)
        self._impl: Backend = impl
        self._run: Runner = self._prepare()
        self._small: Small | None = self._prepare_small()
        self.backend = backend
        self._scratch: list[tuple[np.ndarray, int]] = []
        self._out: tuple[np.ndarray, int, int, Any, Any] | None = None
        if isinstance(pid, Target):
            self._target = pid
        elif pid is not None:
            p = resolve_pid(pid)
            if p != os.getpid():
                self._target, self._owned = Target(p), True
        into = getattr(impl, "prepare_into", None)
        if into is not None:
            # The backend's one-frame closure, found before the method below (an instance
            # attribute wins over a plain function of the class): same checks, same result.
            args = (self.flags, self.category_inverted, self.category_mask, self.category_anyof_mask,
                    self.return_mask, self.max_pages, self.vec_len)
            fn = into(self._target, *args, _fall_back_into(self._target, *args) if self._fallback else None)
            fn.__doc__, fn.__qualname__ = Scanner.scan_into.__doc__, Scanner.scan_into.__qualname__
            self.__dict__["scan_into"] = fn

    def _prepare(self) -> Runner:
        return _backend.prepare(self._impl, self.flags, self.category_inverted, self.category_mask,
                                self.category_anyof_mask, self.return_mask)

    def _prepare_small(self) -> Small | None:
        """The backend's call for a range of at most ``_SMALL`` pages with the default
        ``vec_len`` (a reused buffer; the regions come back as bytes), if it has one."""
        own = getattr(self._impl, "prepare_small", None)
        if own is None:
            return None
        small: Small = own(self.flags, self.category_inverted, self.category_mask, self.category_anyof_mask,
                           self.return_mask, self.max_pages, _SMALL)
        return small

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close the pagemap this Scanner opened (not a :class:`Target` it was given)."""
        t, owned = self._target, self._owned
        self._owned = False
        if owned and t is not None:
            t.close()

    def __enter__(self) -> Scanner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        who = "self" if self._target is None else f"pid={self._target.pid}"
        return (f"<pagescan.Scanner {who} flags={self.flags:#x} inverted={self.category_inverted:#x} "
                f"mask={self.category_mask:#x} anyof={self.category_anyof_mask:#x} "
                f"return={self.return_mask:#x} max_pages={self.max_pages} backend={self.backend}>")

    # -- calls ------------------------------------------------------------------------

    def scan(self, start: int, end: int) -> ScanResult:
        """One ``PAGEMAP_SCAN`` over ``[start, end)`` with the prepared arguments."""
        if type(start) is not int or type(end) is not int or not (0 <= start <= U64 and 0 <= end <= U64):
            start, end = u64("start", start), u64("end", end)
        return self._scan(start, end, self.max_pages, self.vec_len)

    def scan_into(self, start: int, end: int, out: np.ndarray) -> tuple[int, int]:
        """Fill ``out`` (1-D, C-contiguous, writable ``PAGE_REGION_DTYPE``) with the
        regions; return ``(count, walk_end)``. At most ``len(out)`` regions (and at most
        ``vec_len``, if the Scanner has one). Allocates nothing.

        The Scanner keeps a reference to the last ``out`` it was given, with its
        address, so numpy refuses to resize that array in place meanwhile.
        """
        if type(start) is not int or type(end) is not int or not (0 <= start <= U64 and 0 <= end <= U64):
            start, end = u64("start", start), u64("end", end)
        c = self._out
        if (c is not None and c[0] is out and len(out) == c[2] and out.flags.writeable and c[3].value == c[1]
                and out.dtype is c[4]):
            addr, n = c[1], c[2]
        else:
            addr, n = self._out_address(out)
        vl = self.vec_len
        if vl is not None and vl < n:
            n = vl
        target = self._target
        if target is None:
            target = _target_mod._self  # reset after fork by an at-fork hook
            if target is None or target._fd < 0:
                target = self_target()
        try:
            return self._run(target, start, end, addr, n, self.max_pages, out if n else None)
        except OSError as err:
            return self._fall_back(err, target, start, end, addr, n, self.max_pages, out if n else None)
        except ValueError as err:
            raise _closed(target, err) from None

    # -- internals ----------------------------------------------------------------------

    def _out_address(self, out: Any, remember: bool = True) -> tuple[int, int]:
        """``(address, length)`` of a validated ``out``; the last one is remembered (with
        a reference, so numpy will not resize it in place) to skip the slow address
        lookup next time (it is used again while the array's data pointer and dtype are
        the same: ``ndarray.__setstate__`` gives the same object new memory)."""
        c = self._out
        if (c is not None and c[0] is out and len(out) == c[2] and out.flags.writeable and c[3].value == c[1]
                and out.dtype is c[4]):
            return c[1], c[2]
        addr, n = check_out(out)
        if remember:
            self._out = (out, addr, n, address_word(out), out.dtype)
        return addr, n

    def _fall_back(self, err: OSError, target: Target, start: int, end: int, vec: int, vec_len: int,
                   max_pages: int, out: np.ndarray | None) -> tuple[int, int]:
        """A call failed: under ``backend="auto"`` a missing ioctl (ENOTTY) switches this
        Scanner (and "auto" from now on) to the emulation; anything else is raised."""
        if not (self._fallback and err.errno == errno.ENOTTY):
            raise err
        self._switch()
        return self._run(target, start, end, vec, vec_len, max_pages, out)

    def _switch(self) -> None:
        self._impl, self._fallback = _backend.fall_back(), False
        self._run = self._prepare()
        self._small = None

    def _small_failed(self, err: OSError, start: int, end: int, max_pages: int,
                      on: Target | None = None) -> ScanResult:
        """The small call failed: ENOTTY under ``backend="auto"`` switches to the emulation
        (and repeats the call there); anything else is raised."""
        if not (self._fallback and err.errno == errno.ENOTTY):
            raise err
        self._switch()
        return self._scan(start, end, max_pages, None, on)

    def _call(self, start: int, end: int, vec: int, vec_len: int, max_pages: int,
              out: np.ndarray | None, on: Target | None = None) -> tuple[int, int]:
        """One call of the prepared runner on ``on`` (default: this Scanner's target)."""
        target = self._target if on is None else on
        if target is None:
            target = _target_mod._self  # reset after fork by an at-fork hook
            if target is None or target._fd < 0:
                target = self_target()
        try:
            return self._run(target, start, end, vec, vec_len, max_pages, out)
        except OSError as err:
            return self._fall_back(err, target, start, end, vec, vec_len, max_pages, out)
        except ValueError as err:
            raise _closed(target, err) from None

    def _scan(self, start: int, end: int, max_pages: int, vec_len: int | None,
              on: Target | None = None) -> ScanResult:
        small = self._small
        if small is not None and vec_len is None and start < end <= start + _SMALL_SPAN and max_pages == self.max_pages:
            target = self._target if on is None else on
            if target is None:
                target = _target_mod._self  # reset after fork by an at-fork hook
                if target is None or target._fd < 0:
                    target = self_target()
            try:
                raw, walk_end = small(target, start, end)
            except OSError as err:
                return self._small_failed(err, start, end, max_pages, on)
            except ValueError as err:
                raise _closed(target, err) from None
            res: ScanResult = _new_result(ScanResult)
            res._regions = raw
            res.walk_end = walk_end
            res.start = start
            res.end = end
            return res
        cap = (end - start + _P - 1) // _P if end > start else 1
        if max_pages and max_pages < cap:
            cap = max_pages
        if vec_len is None:
            if cap > DEFAULT_VEC_LEN:
                cap = DEFAULT_VEC_LEN
        elif vec_len < cap:
            cap = vec_len
        if cap == 0:
            n, walk_end = self._call(start, end, 0, 0, max_pages, None, on)
            return _result(_EMPTY, walk_end, start, end)
        if cap > _CHUNK:
            return self._scan_chunked(start, end, max_pages, cap, on)
        # The common call, inlined (every Python frame costs ~5% of a one-page call). The
        # buffer is a bytearray: cheaper to make than a ctypes array, and no type per size.
        mem = bytearray(cap * _REGION)
        addr = _addressof(_c_char.from_buffer(mem))  # (the ctypes object is dropped at once)
        buf = _frombuffer(mem, PAGE_REGION_DTYPE)
        target = self._target if on is None else on
        if target is None:
            target = _target_mod._self  # reset after fork by an at-fork hook
            if target is None or target._fd < 0:
                target = self_target()
        try:
            n, walk_end = self._run(target, start, end, addr, cap, max_pages, buf)
        except OSError as err:
            n, walk_end = self._fall_back(err, target, start, end, addr, cap, max_pages, buf)
        except ValueError as err:
            raise _closed(target, err) from None
        if n != cap:
            # A result keeps at most twice its regions when small, a seventh more when large.
            buf = buf[:n].copy() if cap > 16 and (2 * n < cap if cap <= _SMALL else 8 * n < 7 * cap) else buf[:n]
        return _result(buf, walk_end, start, end)

    def _scan_chunked(self, start: int, end: int, max_pages: int, cap: int,
                      on: Target | None = None) -> ScanResult:
        """A call that may return more than ``_CHUNK`` regions: kernel calls of at most
        ``_CHUNK`` regions into a scratch buffer, each resuming at the last ``walk_end``
        with what is left of ``cap`` and ``max_pages``; the result owns exactly its
        regions. Scratch buffers are reused (taken from and given back to a list, so
        reentrant and concurrent calls never share one): the kernel writes into memory
        that is already faulted in."""
        try:
            scratch, addr = self._scratch.pop()
        except IndexError:
            scratch, addr = _owned(_CHUNK)
        try:
            return self._chunks(start, end, max_pages, cap, scratch, addr, on)
        finally:
            self._scratch.append((scratch, addr))

    def _chunks(self, start: int, end: int, max_pages: int, cap: int, scratch: np.ndarray,
                addr: int, on: Target | None = None) -> ScanResult:
        end_r = -(-end // _P) * _P
        parts: list[np.ndarray] = []
        cur, left, budget = start, cap, max_pages
        while True:
            k = left if left < _CHUNK else _CHUNK
            n, walk_end = self._call(cur, end, addr, k, budget, scratch, on)
            if n:
                got = scratch[:n].copy()
                parts.append(got)
            if walk_end >= end_r or n < k or n == left:
                break  # complete, or stopped by max_pages or the caller's vec_len
            if budget:
                budget -= int((got["end"] - got["start"]).sum()) // _P
                if budget <= 0:
                    break
            if walk_end <= cur or walk_end < int(got["end"][-1]):
                break  # no progress possible (a partial hugetlb page under WP_MATCHING)
            cur, left = walk_end, left - n
        regions = parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else _EMPTY)
        return _result(regions, walk_end, start, end)

    def _scan_out(self, start: int, end: int, out: Any, vec_len: int | None, max_pages: int,
                  remember: bool = True, on: Target | None = None) -> ScanResult:
        addr, n = self._out_address(out, remember)
        if vec_len is not None:
            if vec_len > n:
                raise ValueError(f"vec_len ({vec_len}) is larger than out ({n} regions)")
            n = vec_len
        count, walk_end = self._call(start, end, addr if n else 0, n, max_pages, out if n else None, on)
        return _result(out[:count], walk_end, start, end)


def _closed(target: Target, err: ValueError) -> ValueError:
    """A runner's ``ValueError``: "I/O operation on closed pagescan.Target" if the
    target was closed (``fcntl.ioctl`` and ``os.pread`` only say the fd is negative),
    else the error itself."""
    return target._closed_error() if target._fd < 0 else err


def _fall_back_into(target: Target | None, flags: int, inverted: int, mask: int, anyof: int, return_mask: int,
                    max_pages: int, vec_len: int | None) -> Callable[[int, int, Any], tuple[int, int]]:
    """``scan_into`` on the emulation, for a prepared kernel closure whose ioctl turned out
    to be missing (ENOTTY under ``backend="auto"``)."""
    run: Runner | None = None

    def scan_into(start: int, end: int, out: Any) -> tuple[int, int]:
        nonlocal run
        if run is None:
            run = _backend.prepare(_backend.fall_back(), flags, inverted, mask, anyof, return_mask)
        addr, n = check_out(out)
        if vec_len is not None and vec_len < n:
            n = vec_len
        return run(self_target() if target is None else target, start, end, addr, n, max_pages,
                   out if n else None)

    return scan_into


_cache: dict[tuple[Any, ...], Scanner] = {}
#: The shared Scanners of calls that give only ``return_mask``, by return_mask.
_plain: dict[int, Scanner] = {}
_CACHE_MAX = 256
_ZERO = 0
_AUTO = "auto"


def _shared(key: tuple[Any, ...]) -> Scanner:
    """The shared Scanner of this process for ``(flags, category_inverted, category_mask,
    category_anyof_mask, return_mask, max_pages, backend)`` (types already checked)."""
    sc = _cache.get(key)
    if sc is None:
        flags, inverted, mask, anyof, return_mask, max_pages, backend = key
        sc = Scanner(None, flags=flags, category_inverted=inverted, category_mask=mask, category_anyof_mask=anyof,
                     return_mask=return_mask, max_pages=max_pages, backend=backend)
        if len(_cache) < _CACHE_MAX:
            _cache[key] = sc
    return sc


def scan(
    start: int | Buffer,
    end: int | None = None,
    *,
    pid: PidLike = None,
    flags: int = 0,
    category_inverted: int = 0,
    category_mask: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = 0,
    max_pages: int = 0,
    vec_len: int | None = None,
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
        out: optional 1-D C-contiguous writable array of ``PAGE_REGION_DTYPE`` that
            receives the regions (``vec_len`` defaults to its length and may not exceed
            it); ``result.regions`` is a view of it.

    Returns:
        :class:`ScanResult`.

    Raises:
        OSError: the kernel's errno: EINVAL (unknown bits, unaligned ``start``), EFAULT
            (``end < start``, range beyond user space), EPERM (``CHECK_WPASYNC`` on a VMA
            not registered for async uffd-WP), ESRCH (target exited), EINTR.
        KernelFeatureError: ``PAGEMAP_SCAN`` (Linux 6.7) or a category bit is missing.
        ProcessLookupError, PermissionError: no such process / may not trace it.
        TypeError, ValueError: bad Python arguments (non-int, negative, > 64 bits, an
            ``out`` array of the wrong shape, dtype or layout), before any syscall.
    """
    if end is None:
        start, end = buffer_range(start, "start")
    elif type(start) is not int or type(end) is not int:
        start, end = u64("start", start), u64("end", end)
    if (pid is None and vec_len is None and flags is _ZERO and category_inverted is _ZERO
            and category_mask is _ZERO and category_anyof_mask is _ZERO and max_pages is _ZERO and backend is _AUTO
            and type(return_mask) in _INT_TYPES):
        # The common one-off call (only ``return_mask`` given): a shared Scanner found by
        # its return_mask alone, and the small-range call inlined (a frame is ~5% of it).
        res: ScanResult
        sc = _plain.get(return_mask)
        if sc is None:
            sc = _shared((0, 0, 0, 0, return_mask, 0, "auto"))
            if len(_plain) < _CACHE_MAX:
                _plain[return_mask] = sc
        if out is not None:
            if type(out) is np.ndarray and len(out) <= _SMALL:  # the shared Scanner keeps only a small out
                n, walk_end = sc.scan_into(start, end, out)  # checks the range and out
                res = _new_result(ScanResult)
                res._regions = (out, n)
                res.walk_end = walk_end
                res.start = start
                res.end = end
                return res
            if not (0 <= start <= U64 and 0 <= end <= U64):
                start, end = u64("start", start), u64("end", end)
            return sc._scan_out(start, end, out, None, 0, remember=False)
        small = sc._small
        if small is not None and start < end <= start + _SMALL_SPAN:  # small() checks the range
            target = _target_mod._self  # reset after fork by an at-fork hook
            if target is None or target._fd < 0:
                target = self_target()
            try:
                raw, walk_end = small(target, start, end)
            except OSError as err:
                return sc._small_failed(err, start, end, 0)
            res = _new_result(ScanResult)
            res._regions = raw
            res.walk_end = walk_end
            res.start = start
            res.end = end
            return res
        if not (0 <= start <= U64 and 0 <= end <= U64):
            start, end = u64("start", start), u64("end", end)
        return sc._scan(start, end, 0, None)
    if not (0 <= start <= U64 and 0 <= end <= U64):
        start, end = u64("start", start), u64("end", end)
    # This process, or an open Target: one shared Scanner per set of arguments (its
    # runner takes the target per call), so a walk over many Targets prepares once.
    on = pid if type(pid) is Target else None
    if (pid is None or on is not None) and (
        type(flags) in _INT_TYPES and type(category_inverted) in _INT_TYPES and type(category_mask) in _INT_TYPES
        and type(category_anyof_mask) in _INT_TYPES and type(return_mask) in _INT_TYPES
        and type(max_pages) is int and (vec_len is None or type(vec_len) is int) and type(backend) is str
    ):
        sc = _shared((flags, category_inverted, category_mask, category_anyof_mask, return_mask, max_pages, backend))
        if vec_len is not None and not 0 <= vec_len <= U64:
            vec_len = u64("vec_len", vec_len)
        if out is not None:
            # The shared Scanner remembers a small ``out`` only: a big one is not kept
            # alive by a module-level cache.
            return sc._scan_out(start, end, out, vec_len, sc.max_pages,
                                remember=isinstance(out, np.ndarray) and out.size <= _SMALL, on=on)
        return sc._scan(start, end, sc.max_pages, vec_len, on)
    with Scanner(pid, flags=flags, category_inverted=category_inverted, category_mask=category_mask,
                 category_anyof_mask=category_anyof_mask, return_mask=return_mask, max_pages=max_pages,
                 vec_len=vec_len, backend=backend) as sc:
        if out is not None:
            return sc._scan_out(start, end, out, sc.vec_len, sc.max_pages)
        return sc._scan(start, end, sc.max_pages, sc.vec_len)


def scan_iter(
    start: int | Buffer,
    end: int | None = None,
    *,
    pid: PidLike = None,
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
    iteration. Arguments are checked before the first call (and before the first
    ``next()``: this is a generator).
    """
    if end is None:
        start, end = buffer_range(start, "start")
    else:
        start, end = u64("start", start), u64("end", end)
    sc = Scanner(pid, flags=flags, category_inverted=category_inverted, category_mask=category_mask,
                 category_anyof_mask=category_anyof_mask, return_mask=return_mask, max_pages=max_pages,
                 vec_len=vec_len, backend=backend)
    if out is not None:
        check_out(out)
    return _iterate(sc, start, end, out)


def _iterate(sc: Scanner, start: int, end: int, out: np.ndarray | None) -> Iterator[ScanResult]:
    with sc:
        yield from walk(sc, start, end, out, sc.max_pages)


def walk(sc: Scanner, start: int, end: int, out: np.ndarray | None, max_pages: int) -> Iterator[ScanResult]:
    """:func:`scan_iter`'s loop over a prepared Scanner (not closed at the end), with
    ``max_pages`` as the budget of the whole walk (validated ints: no checks here)."""
    cur = start
    budget = max_pages
    while True:
        if out is not None:
            res = sc._scan_out(cur, end, out, sc.vec_len, budget)
        else:
            res = sc._scan(cur, end, budget, sc.vec_len)
        yield res
        if res.complete or sc.vec_len == 0:
            return
        if max_pages:
            budget -= res.pages
            if budget <= 0:
                return
        nxt = res.walk_end
        if nxt <= cur or (len(res.regions) and nxt < int(res.regions["end"][-1])):
            return  # no progress possible (partial hugetlb page under WP_MATCHING)
        cur = nxt


def masks(
    require: int = 0, exclude: int = 0, anyof: int = 0, report: int | None = None
) -> dict[str, int]:
    """Compile friendly filters to the kernel's masks, for ``scan(**masks(...))``.

    ``require``: every one of these categories; ``exclude``: none of these; ``anyof``:
    at least one of these; ``report``: the ``return_mask`` (default: every category
    this kernel supports, probed).
    ``exclude`` becomes ``category_inverted | category_mask``, so it must not overlap
    ``anyof`` (the kernel inverts before testing both).
    """
    require, exclude, anyof = u64("require", require), u64("exclude", exclude), u64("anyof", anyof)
    if require & exclude:
        raise ValueError(f"categories both required and excluded: {Category(require & exclude)!r}")
    if anyof & exclude:
        raise ValueError(f"categories both in anyof and excluded: {Category(anyof & exclude)!r}")
    if report is None:
        from ._probe import pagemap_scan

        report = int(pagemap_scan().categories)
    return {
        "category_inverted": exclude,
        "category_mask": require | exclude,
        "category_anyof_mask": anyof,
        "return_mask": u64("report", report),
    }
