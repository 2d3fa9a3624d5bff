"""Argument checks, in one place, before any syscall.

The rule (see :mod:`pagescan._errors`): what cannot even be said to the kernel -- not
an integer, negative, over 64 bits, a buffer of the wrong kind -- is ``TypeError`` or
``ValueError``; what the kernel would refuse -- an unaligned address, an empty range --
is reported as the kernel reports it, ``OSError(EINVAL)``
(:class:`~pagescan.InvalidArgumentError`, also a ``ValueError``). Every message names
the argument.

Integers: anything with ``__index__`` (Python ints, numpy integers, ``IntFlag``
members); ``bool`` counts as the int it is in ``scan()`` and ``Scanner`` (pagescan 0.1
decided so) and is refused where the userfaultfd methods, ``WriteWatch`` and
``move_pages`` refused it in 0.1; numpy's
``bool_`` is refused on every numpy version (numpy 2.x dropped its ``__index__``, 1.x
had it), and so are floats.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
import os
import stat
from typing import Any, Union

import numpy as np

from ._errors import InvalidArgumentError
from ._uapi.pagemap import PAGE_REGION_DTYPE

__all__ = ["U64", "Buffer", "NotRegularFileError", "address_word", "buffer_range", "buffer_span", "check_aligned", "check_out",
           "held_buffer", "open_regular", "plain_array", "seconds", "u64"]

#: What pagescan accepts as "a buffer object": anything with the buffer protocol; these
#: are the usual ones (``collections.abc.Buffer`` needs Python 3.12).
Buffer = Union[bytes, bytearray, memoryview, mmap.mmap, "np.ndarray[Any, Any]", "ctypes.Array[Any]"]

P = mmap.PAGESIZE
U64 = (1 << 64) - 1


def u64(name: str, value: Any, *, bool_ok: bool = True) -> int:
    """``value`` as a plain ``int`` in ``[0, 2**64)``, or ``TypeError``/``ValueError``.

    ``bool_ok=False`` refuses ``True``/``False`` too (the userfaultfd methods,
    ``WriteWatch`` and ``move_pages`` always have: an address or a length that is a
    bool is a bug, while ``scan()`` takes them as the ints they are)."""
    if type(value) is int and 0 <= value <= U64:
        return value
    if (isinstance(value, (np.bool_, float, complex, str, bytes)) or value is None
            or (not bool_ok and isinstance(value, bool))):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    v = int(v)  # an IntFlag member -> plain int (``~`` and ``|`` then mean what they say)
    if v < 0:
        raise ValueError(f"{name} must not be negative, got {v}")
    if v > U64:
        raise ValueError(f"{name} does not fit in 64 bits: {v:#x}")
    return v


def plain_array(arr: np.ndarray) -> np.ndarray:
    """The plain ``ndarray`` over an array's memory: its dtype, shape, flags and address
    as numpy keeps them, never what a subclass's overridden attributes (``__len__``,
    ``flags``, ``nbytes``, ``__array_interface__``, ...) say. Judge anything the kernel
    will read or write through by this (``ndarray.view`` of the base class: no code of
    the subclass runs)."""
    return arr if type(arr) is np.ndarray else np.ndarray.view(arr, np.ndarray)


#: ``PyArrayObject``'s first field, the data pointer, follows the object header
#: (numpy's C ABI; checked once, by :func:`address_word`).
_DATA_AT = object.__basicsize__
_layout_ok: bool | None = None


class _SlowWord:
    """:func:`address_word` where numpy's layout is not the one expected."""

    __slots__ = ("arr",)

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr

    @property
    def value(self) -> int:
        return int(self.arr.ctypes.data)


class _Word(ctypes.c_size_t):
    """The data pointer field of an array object, read in place; holds the array (``arr``)
    so that the field is never read after the object is gone."""

    arr: np.ndarray


def address_word(arr: np.ndarray) -> Any:
    """A live view of where ``arr``'s data is now: ``.value`` reads the array object's
    data pointer (~50 ns, where ``arr.ctypes.data`` takes ~900). A remembered ``out``
    is re-checked with it before every call: ``ndarray.__setstate__`` gives an array new
    memory (and frees the old) in place, buffer exports or not. The word keeps ``arr``
    alive."""
    global _layout_ok
    if _layout_ok is None:
        probe = np.zeros(4, np.uint8)[1:]
        _layout_ok = ctypes.c_size_t.from_address(id(probe) + _DATA_AT).value == probe.ctypes.data
    if not _layout_ok or not isinstance(arr, np.ndarray):
        return _SlowWord(arr)
    word = _Word.from_address(id(arr) + _DATA_AT)
    word.arr = arr
    return word


def check_out(out: Any, name: str = "out") -> tuple[int, int]:
    """Validate an array the kernel will write regions into; return its address and
    its number of slots.

    1-D, C-contiguous, writable, exactly :data:`PAGE_REGION_DTYPE`: anything else would
    let the kernel write where the array's memory is not (``ValueError``/``TypeError``).
    An ndarray subclass is judged by :func:`plain_array`.
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of PAGE_REGION_DTYPE, not {type(out).__name__}")
    out = plain_array(out)
    if out.dtype != PAGE_REGION_DTYPE:
        raise ValueError(f"{name} must have dtype PAGE_REGION_DTYPE {PAGE_REGION_DTYPE}, not {out.dtype}")
    if out.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not of shape {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (its stride is {out.strides[0]}, not 24)")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return int(out.ctypes.data), int(out.shape[0])


def unaligned(name: str, value: int, page_size: int = P) -> str:
    """Why ``value`` is refused, with the two nearest aligned values; ``""`` if aligned."""
    if not value % page_size:
        return ""
    lo = value - value % page_size
    return (f"{name} {value:#x} is not aligned to the page size ({page_size}); "
            f"the nearest aligned values are {lo:#x} and {lo + page_size:#x}")


def check_aligned(call: str, name: str, value: int, page_size: int = P) -> None:
    """``InvalidArgumentError`` unless ``value`` is a multiple of ``page_size``."""
    if why := unaligned(name, value, page_size):
        raise InvalidArgumentError(f"{call}: {why}")


def _as_bytes(obj: Any, name: str) -> np.ndarray:
    """A uint8 view of a buffer object's bytes; refuses integers and non-buffers."""
    if isinstance(obj, np.ndarray):
        arr = plain_array(obj)
    else:
        if isinstance(obj, (int, np.integer, np.bool_)) or hasattr(obj, "__index__"):
            raise TypeError(
                f"{name} is an integer ({type(obj).__name__}): pass the end or length too, "
                "or pass a buffer object"
            )
        try:
            with memoryview(obj) as mv:
                if not mv.contiguous:
                    raise ValueError(f"{name} must be a contiguous buffer (this {type(obj).__name__} is strided)")
        except TypeError:
            raise TypeError(f"{name} must be a buffer object (mmap, numpy array, bytearray, ...), "
                            f"not {type(obj).__name__}") from None
        except ValueError as err:
            if "released" in str(err) or "closed" in str(err):
                raise ValueError(f"{name}: {err}") from None
            raise
        try:
            arr = np.frombuffer(obj, dtype=np.uint8)
        except (TypeError, ValueError, BufferError) as err:
            raise ValueError(f"{name}: cannot use this {type(obj).__name__} as a buffer ({err})") from None
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        raise ValueError(f"{name} must be a contiguous buffer (this array has strides {arr.strides})")
    return arr


def buffer_span(obj: Any, name: str = "buffer") -> tuple[int, int]:
    """``(address, nbytes)`` of a contiguous buffer object's own bytes (for a range to
    scan or watch; nothing is read or written through it here)."""
    return held_buffer(obj, name)[1:]


def held_buffer(obj: Any, name: str = "buffer") -> tuple[np.ndarray, int, int]:
    """``(holder, address, nbytes)``: the holder keeps the object's buffer exported (not
    resized, not closed, not freed) while it lives; keep it until the kernel has read or
    written the bytes."""
    arr = _as_bytes(obj, name)
    return arr, int(arr.__array_interface__["data"][0]), int(arr.nbytes)


def buffer_range(obj: Any, name: str = "buffer") -> tuple[int, int]:
    """``(start, end)`` of the whole pages covering a buffer object (mmap, numpy array,
    bytearray, memoryview, ctypes array): start rounded down, end rounded up. An empty
    buffer covers no page (``start == end``). A 0-d integer array is refused like any
    integer: it is almost certainly an address meant with an end or length."""
    if isinstance(obj, np.ndarray) and obj.ndim == 0 and obj.dtype.kind in "iub":
        raise TypeError(f"{name} is a 0-d integer array ({obj.dtype}): pass the end or length too, "
                        "or pass a buffer object")
    lo, n = buffer_span(obj, name)
    start = lo & ~(P - 1)
    if not n:
        return start, start
    return start, (lo + n + P - 1) & ~(P - 1)


class NotRegularFileError(ValueError):
    """A path that had to be a regular file is a FIFO, a device, a directory, ..."""


def seconds(name: str, value: Any) -> float | None:
    """A timeout: ``None`` (no limit) or a finite number of seconds >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    return float(value)


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, name: str = "path") -> int:
    """``open`` without blocking (``O_NONBLOCK``), then refuse anything but a regular file.

    A FIFO (or a device) would block in ``open`` or ``read`` forever; ``O_NONBLOCK``
    makes ``open`` return at once and ``fstat`` tells what it is. The fd returned is
    blocking again and ``O_CLOEXEC``. Raises :class:`NotRegularFileError` (a
    ``ValueError``) naming ``name``, or the ``OSError`` of ``open``."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise NotRegularFileError(f"{name} {os.fspath(path)!r} is a directory, not a regular file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise NotRegularFileError(f"{name} {os.fspath(path)!r} is {what}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
