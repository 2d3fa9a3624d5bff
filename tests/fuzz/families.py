"""The fuzz families: one function per group of public entry points.

Each family is ``fn(ctx, data, env)``: it draws one example's arguments from the
Hypothesis ``data`` object, makes its calls through :meth:`Ctx.call` (which logs the
call first and classifies the outcome) and checks results against an oracle: the raw
``PAGEMAP_SCAN`` ioctl (``tests.test_kernel_quirks.raw_scan``), the other scan backend,
the buffer protocol read with ``PyObject_GetBuffer``, or the memory itself.

Addresses are drawn only from memory the family owns, or beyond user space: a wild
``UFFDIO_REGISTER`` or ``UFFDIO_MOVE`` on the interpreter's own heap would hang or crash
the worker for a reason that is not pagescan's.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import gc
import io
import math
import mmap
import os
import re
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

import pagescan
from pagescan import PAGE_REGION_DTYPE, Category, UffdFeature, Userfaultfd

from .core import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    U64,
    Arena,
    Ctx,
    build,
    classify,
    errno_of,
    exiting_child,
    hostile,
    int_ok,
    intlike,
    mmap_anon,
    munmap,
    show,
)

P = mmap.PAGESIZE
C = Category
ALL = int(pagescan.capabilities().categories)
PRES, WR, ZERO = int(C.PRESENT), int(C.WRITTEN), int(C.PFNZERO)
WP = int(pagescan.PM_SCAN_WP_MATCHING)
CHK = int(pagescan.PM_SCAN_CHECK_WPASYNC)
DEFAULT_VEC_LEN = 1 << 16


def rare(data: Any, n: int) -> bool:
    """True about once in ``n`` draws. (Hypothesis favours the bounds of a range, so a
    test for ``== 0`` would come out true far more often.)"""
    return bool(data.draw(st.integers(0, n - 1)) == n // 2)


def raw_scan(*args: Any, **kw: Any) -> Any:
    from tests.test_kernel_quirks import raw_scan as raw

    return raw(*args, **kw)


class Env:
    """Per-worker state shared by the examples of one batch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.arena = Arena(64, seed)
        self.tmp = tempfile.mkdtemp(prefix="pagescan-fuzz-")
        self.keep: list[Any] = []
        self._ckpt: tuple[str, bytes, list[bytes], int] | None = None
        #: One-off probes already made by this worker (e.g. a FIFO as path, once).
        self.probed: set[str] = set()

    def once(self, what: str) -> bool:
        """True the first time ``what`` is asked for in this worker."""
        if what in self.probed:
            return False
        self.probed.add(what)
        return True


# -- scan -------------------------------------------------------------------------------

_SCAN_U64 = ("start", "end", "flags", "category_inverted", "category_mask", "category_anyof_mask",
             "return_mask", "max_pages")


def _masks() -> st.SearchStrategy[tuple[Any, ...]]:
    vals = st.sampled_from([0, 0, PRES, WR, ALL, PRES | ZERO, ZERO, 1 << 9, 1 << 20])
    flags = st.sampled_from(["Category.PRESENT", "Category.WRITTEN", "Category.PRESENT|Category.PFNZERO",
                             "Category(0)"]).map(lambda n: ("flag", n))
    return st.one_of(intlike(vals, hostile_weight=1, plain_weight=6), flags, flags)


def _expected_vec_len(start: int, end: int, max_pages: int, vec_len: int | None) -> int:
    cap = (end - start + P - 1) // P if end > start else 1
    if max_pages and max_pages < cap:
        cap = max_pages
    v = min(cap, DEFAULT_VEC_LEN) if vec_len is None else min(vec_len, cap)
    return min(v, DEFAULT_VEC_LEN)


def _same(a: tuple[bool, Any], b: tuple[bool, Any]) -> bool:
    """Same outcome: both results, or the same exception type and errno."""
    if a[0] != b[0]:
        return False
    if a[0]:
        return True
    return type(a[1]) is type(b[1]) and errno_of(a) == errno_of(b)


def fam_scan(ctx: Ctx, data: Any, env: Env) -> None:
    """scan()/scan_iter() with every argument drawn; the raw ioctl and the other backend
    as oracles; capabilities()/masks() now and then."""
    A = env.arena
    addr = A.addresses()
    recipes: dict[str, tuple[Any, ...]] = {
        "start": data.draw(intlike(addr, plain_weight=6)),
        "end": data.draw(intlike(addr, plain_weight=6)),
        "flags": data.draw(intlike(st.sampled_from([0, 0, 0, 0, WP, CHK, WP | CHK, 4, 1 << 40]), plain_weight=6)),
        "category_inverted": data.draw(_masks()),
        "category_mask": data.draw(_masks()),
        "category_anyof_mask": data.draw(_masks()),
        "return_mask": data.draw(_masks()),
        "max_pages": data.draw(intlike(st.sampled_from([0, 0, 0, 1, 2, 5, 100, U64]), plain_weight=6)),
    }
    vl = data.draw(st.one_of(st.just(None), st.just(None),
                             intlike(st.sampled_from([0, 1, 2, 3, 10, 512, 1 << 20, 1 << 40, U64]), plain_weight=6)))
    mode = data.draw(st.sampled_from(["random", "one-bad", "one-bad", "flag-masks", "wide", "neg-flag"]))
    if mode in ("one-bad", "flag-masks", "wide", "neg-flag"):
        # Every argument valid except (maybe) one, the masks IntFlag members: the fast
        # path ORs the arguments together (issue 9 item 3).
        for k in _SCAN_U64:
            if int_ok(recipes[k]) is not True:
                recipes[k] = ("int", 0) if k not in ("start", "end") else ("int", A.addr)
        for k in ("category_mask", "return_mask"):
            recipes[k] = ("flag", data.draw(st.sampled_from(["Category.PRESENT", "Category.WRITTEN"])))
        if mode == "one-bad":
            k = data.draw(st.sampled_from(_SCAN_U64))
            recipes[k] = data.draw(hostile())
        elif mode == "neg-flag":  # a negative start, end or max_pages beside IntFlag masks (item 3)
            k = data.draw(st.sampled_from(["start", "end", "max_pages"]))
            recipes[k] = ("int", data.draw(st.sampled_from([-P, -1, -(1 << 63)])))
    if mode == "wide":  # a range of the whole address space with a large vec_len (item 4)
        recipes["start"] = ("int", data.draw(st.sampled_from([0, P])))
        recipes["end"] = ("int", data.draw(st.sampled_from([(1 << 47) - P, 1 << 46])))
        vl = ("int", data.draw(st.sampled_from([1 << 30, 1 << 40, U64])))
    if vl == ("none",):
        vl = None  # vec_len=None is the documented default
    backend = data.draw(st.sampled_from(["kernel", "kernel", "emulated", "auto", "bogus", None]))
    fn_name = data.draw(st.sampled_from(["scan", "scan", "scan", "scan_iter"]))
    args = {k: build(r) for k, r in recipes.items()}
    vec_len = None if vl is None else build(vl)
    bad = [k for k, r in recipes.items() if int_ok(r) is False]
    ambiguous = [k for k, r in recipes.items() if int_ok(r) is None]
    if vl is not None:
        ok = int_ok(vl)
        if ok is False:
            bad.append("vec_len")
        elif ok is None:
            ambiguous.append("vec_len")
    if backend not in ("kernel", "emulated", "auto"):
        bad.append("backend")
    if args["end"] is None and "end" in bad and not _integer_like(args["start"]) \
            and buffer_oracle(args["start"])[0] == "range":
        # scan(buffer) is the buffer form: ``end`` omitted is right, and ``start`` is
        # judged by the buffer protocol, not as an int.
        bad = [k for k in bad if k not in ("start", "end")]
        ambiguous.append("start")
    valid: bool | None = False if bad else (None if ambiguous else True)
    kw = {k: v for k, v in args.items() if k not in ("start", "end")}
    desc = (f"pagescan.{fn_name}({show(recipes['start'])}, {show(recipes['end'])}, "
            + ", ".join(f"{k}={show(recipes[k])}" for k in kw)
            + f", vec_len={'None' if vl is None else show(vl)}, backend={backend!r})")

    def run(backend_: Any) -> Any:
        if fn_name == "scan":
            return pagescan.scan(args["start"], args["end"], vec_len=vec_len, backend=backend_, **kw)
        out = []
        for i, r in enumerate(pagescan.scan_iter(args["start"], args["end"], vec_len=vec_len, backend=backend_, **kw)):
            out.append(r)
            if i > 10000:
                raise AssertionError("scan_iter did not end")
        return out

    if rare(data, 21):
        _fuzz_masks(ctx, data)
    if rare(data, 51):
        c1 = ctx.call("pagescan.capabilities()", pagescan.capabilities)
        c2 = ctx.call("pagescan.capabilities()", pagescan.capabilities)
        if c1[0] and c2[0] and c1[1].as_dict() != c2[1].as_dict():
            ctx.finding("oracle-mismatch", "capabilities() changed between two calls")
    got = ctx.call(desc, lambda: run(backend), valid=valid, arg=(tuple(bad + ambiguous) + (("buffer",) if "end" in bad else ())) or None)
    if valid is not True or fn_name != "scan":
        return
    v = {k: int(classify(r)[1] or 0) for k, r in recipes.items()}  # all valid ints here
    vlen = None if vl is None else classify(vl)[1]
    raw = raw_scan(v["start"], v["end"], flags=v["flags"], vec_len=_expected_vec_len(v["start"], v["end"], v["max_pages"], vlen),
                   max_pages=v["max_pages"], inv=v["category_inverted"], req=v["category_mask"],
                   anyof=v["category_anyof_mask"], ret=v["return_mask"])
    inside = A.contains(v["start"], v["end"])
    if backend in ("kernel", "auto"):
        if raw.err:
            if got[0] or errno_of(got) != raw.err:
                ctx.finding("oracle-mismatch", f"raw ioctl errno {errno.errorcode.get(raw.err)}; scan(): "
                            f"{'result' if got[0] else repr(got[1])}")
        elif not got[0]:
            ctx.finding("oracle-mismatch", f"raw ioctl succeeded; scan() raised {got[1]!r}")
        elif inside:
            res = got[1]
            if res.regions.tolist() != raw.vec.tolist() or res.walk_end != raw.walk_end:
                ctx.finding("oracle-mismatch", f"scan() {res.regions.tolist()} walk_end {res.walk_end:#x}; raw ioctl "
                            f"{raw.vec.tolist()} walk_end {raw.walk_end:#x}")
    if backend != "emulated" or data.draw(st.booleans()):
        other = "emulated" if backend != "emulated" else "kernel"
        o = ctx.call(desc.replace(f"backend={backend!r}", f"backend={other!r}"), lambda: run(other), valid=True)
        emu = o if other == "emulated" else got
        wp_involved = v["flags"] & (WP | CHK) or (v["category_mask"] | v["category_anyof_mask"] | v["return_mask"]) & 1
        if not emu[0] and errno_of(emu) == errno.EOPNOTSUPP and wp_involved:
            pass  # documented: the emulation cannot write-protect, nor always tell WPALLOWED
        elif not _same(got, o):
            ctx.finding("backend-mismatch", f"{backend}: {_outcome(got)}; {other}: {_outcome(o)}")
        elif got[0] and inside and got[1].regions.tolist() != o[1].regions.tolist():
            ctx.finding("backend-mismatch", f"{backend}: {got[1].regions.tolist()}; {other}: {o[1].regions.tolist()}")


def _outcome(o: tuple[bool, Any]) -> str:
    return "result" if o[0] else f"{type(o[1]).__name__}({errno_of(o)}): {o[1]}"


def _fuzz_masks(ctx: Ctx, data: Any) -> None:
    names = ("require", "exclude", "anyof", "report")
    recipes = {n: data.draw(intlike(st.sampled_from([0, PRES, WR, ZERO, PRES | WR, ALL]), plain_weight=3)) for n in names}
    if data.draw(st.booleans()):
        recipes["report"] = ("none",)
    bad = [n for n, r in recipes.items() if not (n == "report" and r == ("none",)) and int_ok(r) is False]
    vals = {n: build(r) for n, r in recipes.items()}
    desc = "pagescan.masks(" + ", ".join(f"{n}={show(r)}" for n, r in recipes.items()) + ")"
    amb = [n for n, r in recipes.items() if not (n == "report" and r == ("none",)) and int_ok(r) is None]
    got = ctx.call(desc, lambda: pagescan.masks(**vals), valid=None if not bad else False,
                   arg=tuple(bad + amb) + ("required", "excluded", "anyof"))
    if got[0] and not bad:
        iv = {n: int(classify(r)[1] or 0) for n, r in recipes.items() if r != ("none",)}
        m = got[1]
        if m["category_mask"] != (iv["require"] | iv["exclude"]) or m["category_inverted"] != iv["exclude"]:
            ctx.finding("oracle-mismatch", f"masks() returned {m}")


# -- buffers --------------------------------------------------------------------------------


class Py_buffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.POINTER(ctypes.c_ssize_t)),
        ("strides", ctypes.POINTER(ctypes.c_ssize_t)), ("suboffsets", ctypes.POINTER(ctypes.c_ssize_t)),
        ("internal", ctypes.c_void_p),
    ]


_api = ctypes.pythonapi
_api.PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(Py_buffer), ctypes.c_int]
_api.PyBuffer_Release.argtypes = [ctypes.POINTER(Py_buffer)]
_api.PyBuffer_IsContiguous.argtypes = [ctypes.POINTER(Py_buffer), ctypes.c_char]
_PyBUF_FULL_RO = 0x0100 | 0x0010 | 0x0008 | 0x0004


def buffer_oracle(obj: Any) -> tuple[str, Any]:
    """What ``buffer_range(obj)`` must answer, from the buffer protocol itself:
    ``("range", (lo, hi))``, ``("ValueError", why)`` (not contiguous) or ``("TypeError", why)``.

    Policy on top of the protocol (issue 9 item 6): an integer -- a numpy integer
    scalar or a 0-d integer array, which do export a buffer -- is an address passed
    without its end, never a buffer to scan."""
    if isinstance(obj, (int, np.integer, np.bool_)) or (
            isinstance(obj, np.ndarray) and obj.ndim == 0 and obj.dtype.kind in "iub"):
        return "TypeError", "an integer is an address, not a buffer"
    if isinstance(obj, np.ndarray):
        arr_contig = obj.flags.c_contiguous or obj.flags.f_contiguous
        if not arr_contig:
            return "ValueError", "not contiguous"
    view = Py_buffer()
    try:
        _api.PyObject_GetBuffer(obj, ctypes.byref(view), _PyBUF_FULL_RO)
    except (TypeError, ValueError, BufferError) as err:
        return ("ValueError" if isinstance(err, ValueError) else "TypeError"), str(err)
    try:
        if not _api.PyBuffer_IsContiguous(ctypes.byref(view), b"A"):
            return "ValueError", "not contiguous"
        lo = int(view.buf or 0)
        n = int(view.len)
    finally:
        _api.PyBuffer_Release(ctypes.byref(view))
    if n == 0:
        return "range", (lo & ~(P - 1), lo & ~(P - 1))
    return "range", (lo & ~(P - 1), (lo + n + P - 1) & ~(P - 1))


def buffers() -> st.SearchStrategy[tuple[Any, ...]]:
    sizes = st.sampled_from([0, 1, 7, 100, P - 1, P, P + 1, 3 * P])
    return st.one_of(
        st.tuples(st.just("bytes"), sizes),
        st.tuples(st.just("bytearray"), sizes),
        st.tuples(st.just("mv"), sizes, st.sampled_from(["plain", "ro", "step2", "reversed", "cast2d", "empty", "released"])),
        st.tuples(st.just("mmap"), st.sampled_from([P, 3 * P]), st.booleans()),
        st.tuples(st.just("ndarray"), st.sampled_from([(0,), (5,), (3, 4), (4, 0), (0, 4), (2, 3, 4), ()]),
                  st.sampled_from(["uint8", "float64", "int16", "complex128", "V24", "bool"]),
                  st.sampled_from(["C", "F", "T", "step2", "ro", "neg"])),
        st.tuples(st.just("ndarray_page"), st.sampled_from([1, 2, 5])),
        st.tuples(st.just("ctypes"), sizes),
        st.tuples(st.just("array"), st.sampled_from(["b", "d", "Q"]), st.sampled_from([0, 1, 1000])),
        st.tuples(st.just("npint"), st.sampled_from(["uint64", "int64", "uint8", "int32"])),
        st.just(("npzerod",)),
        st.just(("int",)),
        st.just(("none",)),
        st.just(("str",)),
    )


def build_buffer(recipe: tuple[Any, ...], env: Env) -> Any:
    kind = recipe[0]
    if kind == "bytes":
        return bytes(recipe[1])
    if kind == "bytearray":
        return bytearray(recipe[1])
    if kind == "mv":
        n, how = recipe[1], recipe[2]
        base = bytearray(max(n, 2))
        mv = memoryview(base)
        if how == "ro":
            return memoryview(bytes(max(n, 2)))
        if how == "step2":
            return mv[::2]
        if how == "reversed":
            return mv[::-1]
        if how == "cast2d":
            return memoryview(bytearray(2 * max(n, 1))).cast("B", (2, max(n, 1)))
        if how == "empty":
            return mv[0:0]
        if how == "released":
            mv.release()
            return mv
        return mv
    if kind == "mmap":
        m = mmap.mmap(-1, recipe[1])
        if recipe[2]:
            m.close()
        else:
            env.keep.append(m)
        return m
    if kind == "ndarray":
        shape, dt, how = recipe[1], recipe[2], recipe[3]
        a = np.zeros(shape, dtype=dt, order="F" if how == "F" else "C")
        if how == "T":
            a = a.T
        elif how == "step2" and a.ndim:
            a = a[::2]
        elif how == "neg" and a.ndim:
            a = a[::-1]
        elif how == "ro":
            a.flags.writeable = False
        return a
    if kind == "ndarray_page":
        m = mmap.mmap(-1, recipe[1] * P)
        env.keep.append(m)
        return np.frombuffer(m, dtype=np.uint8)
    if kind == "ctypes":
        return (ctypes.c_char * recipe[1])()
    if kind == "array":
        return array.array(recipe[1], [0] * recipe[2])
    if kind == "npint":
        return np.dtype(recipe[1]).type(env.arena.addr & 0x7F)
    if kind == "npzerod":
        return np.array(env.arena.addr, dtype=np.uint64)
    if kind == "int":
        return env.arena.addr
    if kind == "none":
        return None
    if kind == "str":
        return "buffer"
    raise AssertionError(recipe)


def _integer_like(obj: Any) -> bool:
    """An integer (numpy integer or bool scalars, 0-d integer arrays): an address, never
    a buffer (the policy of :func:`buffer_oracle`)."""
    return buffer_oracle(obj) == ("TypeError", "an integer is an address, not a buffer")


def fam_buffers(ctx: Ctx, data: Any, env: Env) -> None:
    """buffer_range(), scan(buffer), scan_iter(buffer) against the buffer protocol."""
    recipe = data.draw(buffers())
    obj = build_buffer(recipe, env)
    kind, expect = buffer_oracle(obj)
    which = data.draw(st.sampled_from(["buffer_range", "scan", "scan", "scan_iter"]))
    desc = f"pagescan.{which}({_show_buffer(recipe)})"
    if which == "buffer_range":
        if _integer_like(obj):  # an integer-like object is an address, not a buffer (issue 9 item 6)
            ctx.call(desc, lambda: pagescan.buffer_range(obj), valid=False, arg=("buffer", "integer"))
            return
        got = ctx.call(desc, lambda: pagescan.buffer_range(obj), valid=(kind == "range"))
        if got[0] and kind == "range" and tuple(got[1]) != expect:
            ctx.finding("oracle-mismatch", f"buffer_range {tuple(map(hex, got[1]))}, buffer protocol {tuple(map(hex, expect))}")
        elif not got[0] and kind != "range" and type(got[1]).__name__ not in ("TypeError", "ValueError"):
            pass  # classified by Ctx.call already
        return
    if _integer_like(obj):  # issue 9 item 6: an integer-like start without an end is refused
        ctx.call(desc, lambda: pagescan.scan(obj) if which == "scan" else list(pagescan.scan_iter(obj)),
                 valid=False, arg=("start", "end", "buffer"))
        return
    fn: Callable[[], Any] = (lambda: pagescan.scan(obj)) if which == "scan" else (lambda: list(pagescan.scan_iter(obj)))
    got = ctx.call(desc, fn, valid=(kind == "range"))
    if got[0] and kind == "range":
        res = got[1] if which == "scan" else (got[1][0] if got[1] else None)
        if res is None or (res.start, res.end) != expect:
            ctx.finding("oracle-mismatch", f"scanned {res and (hex(res.start), hex(res.end))}, buffer covers "
                        f"{tuple(map(hex, expect))}")


def _show_buffer(recipe: tuple[Any, ...]) -> str:
    kind = recipe[0]
    forms: dict[str, Callable[[tuple[Any, ...]], str]] = {
        "bytes": lambda r: f"bytes({r[1]})",
        "bytearray": lambda r: f"bytearray({r[1]})",
        "mv": lambda r: f"memoryview(bytearray({r[1]}))<{r[2]}>",
        "mmap": lambda r: f"mmap.mmap(-1, {r[1]}){'<closed>' if r[2] else ''}",
        "ndarray": lambda r: f"np.zeros({r[1]}, {r[2]!r})<{r[3]}>",
        "ndarray_page": lambda r: f"np.frombuffer(mmap.mmap(-1, {r[1]}*P), np.uint8)",
        "ctypes": lambda r: f"(ctypes.c_char * {r[1]})()",
        "array": lambda r: f"array.array({r[1]!r}, [0] * {r[2]})",
        "npint": lambda r: f"np.{r[1]}(addr & 0x7f)",
        "npzerod": lambda r: "np.array(addr, np.uint64)",
        "int": lambda r: "addr",
        "none": lambda r: "None",
        "str": lambda r: "'buffer'",
    }
    return forms[kind](recipe)


# -- scan(out=...) --------------------------------------------------------------------------

CANARY = 0xAB
_OUT_PAD = 4096


def fam_out(ctx: Ctx, data: Any, env: Env) -> None:
    """scan(out=...) with arrays of every shape, dtype, order, stride and flag, carved out
    of a canary-filled buffer: a write outside the array's own bytes is a finding."""
    A = env.arena
    shape = data.draw(st.sampled_from([(4,), (0,), (1,), (64,), (4, 0), (16, 0), (2, 3), (3, 1), (1, 4), (2, 2, 2)]))
    dtype = data.draw(st.sampled_from(["region", "region", "region", "uint8", "uint64", "V24", "region_be"]))
    how = data.draw(st.sampled_from(["C", "C", "F", "step2", "ro", "offset1"]))
    other = data.draw(st.sampled_from(["none", "none", "none", "none", "list", "bytearray", "int", "real_empty"]))
    vl = data.draw(st.one_of(st.just(None), st.just(None), st.sampled_from([0, 1, 4, 64, 1000])))
    start = A.addr + P * data.draw(st.integers(0, 8))
    end = start + P * data.draw(st.integers(0, 48))
    big = np.full(1 << 16, CANARY, np.uint8)
    if dtype == "region":
        dt = PAGE_REGION_DTYPE
    elif dtype == "region_be":
        dt = PAGE_REGION_DTYPE.newbyteorder(">")
    else:
        dt = np.dtype(dtype)
    off = _OUT_PAD + (1 if how == "offset1" else 0)
    if other == "none":
        n = int(np.prod(shape)) * dt.itemsize
        if how == "step2":
            full = np.ndarray((shape[0] * 2,) + shape[1:], dt, buffer=big, offset=off)
            out: Any = full[::2]
            span = full.nbytes
        else:
            out = np.ndarray(shape, dt, buffer=big, offset=off, order="F" if how == "F" else "C")
            span = n
        if how == "ro":
            out.flags.writeable = False
        desc_out = f"np.ndarray({shape}, {dtype}, order/view={how})"
    elif other == "list":
        out, span, desc_out = [], 0, "[]"
    elif other == "bytearray":
        out, span, desc_out = bytearray(96), 0, "bytearray(96)"
    elif other == "int":
        out, span, desc_out = 4, 0, "4"
    else:  # a real heap allocation: an overflow here corrupts the heap (crash detection)
        out, span, desc_out = np.empty((16, 0), PAGE_REGION_DTYPE), 0, "np.empty((16, 0), PAGE_REGION_DTYPE)"
    valid = (
        isinstance(out, np.ndarray) and out.ndim == 1 and out.dtype == PAGE_REGION_DTYPE
        and out.flags.c_contiguous and out.flags.writeable and (vl is None or vl <= len(out))
    )  # vec_len may be smaller than out, never larger (issue 9 item 1)
    desc = f"pagescan.scan(A+{start - A.addr:#x}, A+{end - A.addr:#x}, return_mask=ALL, out={desc_out}, vec_len={vl})"
    got = ctx.call(desc, lambda: pagescan.scan(start, end, return_mask=ALL, out=out, vec_len=vl),
                   valid=valid, arg=("out", "vec_len"))
    outside = np.concatenate([big[:off], big[off + span:]]) if other == "none" else big
    if (outside != CANARY).any():
        first = int(np.flatnonzero(big != CANARY)[0]) if (big != CANARY).any() else -1
        ctx.finding("heap-overflow", f"the kernel wrote outside out's {span} bytes (first changed byte at "
                    f"offset {first - off} from out)")
    if got[0] and valid:
        raw = raw_scan(start, end, vec_len=len(out) if vl is None else vl, ret=ALL)
        if raw.err or got[1].regions.tolist() != raw.vec.tolist():
            ctx.finding("oracle-mismatch", f"scan(out=) {got[1].regions.tolist()}; raw {raw.err or raw.vec.tolist()}")
    elif got[0] and isinstance(out, np.ndarray):
        n = len(got[1].regions)
        if n > len(out):
            ctx.finding("oracle-mismatch", f"returned {n} regions for an out of length {len(out)}")


# -- userfaultfd ----------------------------------------------------------------------------------


def _registered(addr: int, npages: int) -> bool:
    from tests.memory import vmflags

    for i in range(npages):
        try:
            if {"uw", "um", "ui"} & set(vmflags(addr + i * P)):
                return True
        except Exception:  # noqa: BLE001 - not mapped
            pass
    return False


def _timeouts() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        st.sampled_from([0, 0, 0.0, 0.001]).map(lambda v: ("float", v) if isinstance(v, float) else ("int", v)),
        st.sampled_from([math.inf, math.nan, 1e300, -1.0, -math.inf]).map(lambda v: ("float", v)),
        st.sampled_from([("str", "0"), ("none",), ("np", "float64", 0), ("np", "uint64", 0), ("bool", False),
                         ("int", 1 << 70), ("int", -1), ("frac", 0)]),
    )


def _timeout_valid(recipe: tuple[Any, ...]) -> bool | None:
    if recipe == ("none",):
        return None  # forever: never drawn for a call that could block
    if recipe[0] == "bool":
        return None
    obj = build(recipe)
    if isinstance(obj, (int, float, np.integer, np.floating)) or recipe[0] == "frac":
        try:
            f = float(obj)
        except (OverflowError, TypeError):
            return False
        if math.isnan(f) or math.isinf(f):
            return False
        if f < 0:
            return None
        if f >= 1e6:
            return False
        # A plain int or float is a number of seconds; numpy scalars and fractions may
        # be refused (a policy, not a safety matter).
        return True if type(obj) in (int, float) else None
    return False


def _max_events() -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        st.sampled_from([1, 64, 64]).map(lambda v: ("int", v)),
        st.sampled_from([("int", 0), ("int", -1), ("int", 1 << 64), ("int", 1 << 40), ("float", 1.5), ("str", "4"),
                         ("none",), ("np", "uint64", 2), ("index", 3), ("bool", True)]),
    )


def _max_events_valid(recipe: tuple[Any, ...]) -> bool | None:
    ok = int_ok(recipe, 1, 1 << 20, above=None)
    return None if ok and recipe[0] != "int" else ok  # integer-likes other than int: policy


def fam_uffd(ctx: Ctx, data: Any, env: Env) -> None:
    """Userfaultfd(...) and each of its methods, on fresh memory and a fresh uffd."""
    npages = 8
    m = mmap_anon(npages)
    srcmap = mmap_anon(npages)
    ctypes.memset(srcmap, 0x42, npages * P)
    uf = None
    try:
        addr = st.one_of(
            st.tuples(st.integers(-1, npages + 1), st.sampled_from([0, 0, 0, 1])).map(lambda t: m + t[0] * P + t[1]),
            st.sampled_from([1 << 47, U64 - P + 1, 0]),
        )
        length = st.sampled_from([P, 2 * P, npages * P, 0, P - 1, (npages + 2) * P, 1 << 62])
        feat_r = data.draw(st.one_of(
            st.sampled_from([int(UffdFeature.WP_ASYNC), 0, int(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED),
                             int(UffdFeature.MOVE), int(UffdFeature.EVENT_REMOVE)]).map(lambda v: ("int", v)),
            st.sampled_from([("flag", "UffdFeature.WP_ASYNC"), ("int", 1 << 63), ("int", -1), ("float", 1.0),
                             ("index", 0), ("np", "uint64", 0), ("int", 1 << 64)]),
        ))
        features = build(feat_r)
        fvalid = int_ok(feat_r)
        got = ctx.call(f"pagescan.Userfaultfd({show(feat_r)})", lambda: Userfaultfd(features),
                       valid=None if fvalid is None else (None if fvalid else False), arg="features")
        if not got[0]:
            uf = Userfaultfd(UffdFeature.WP_ASYNC)
        else:
            uf = got[1]
        first = True
        for _ in range(data.draw(st.integers(1, 4))):
            op = data.draw(st.sampled_from(["register", "register", "unregister", "writeprotect", "copy", "zeropage",
                                            "continue_", "poison", "move", "wake", "read_events", "parse",
                                            "copy_from", "lifecycle"]))
            if op == "copy_from":
                brec = data.draw(buffers())
                obj = build_buffer(brec, env)
                d_r = data.draw(intlike(addr, plain_weight=8))
                dv = build(d_r)
                ctx.call(f"uf.copy_from({show(d_r)}, {_show_buffer(brec)})  # mapping at {m:#x}",
                         lambda: uf.copy_from(dv, obj), valid=False if int_ok(d_r) is False else None)
                continue
            if op == "lifecycle":
                _fuzz_uffd_lifecycle(ctx, data, m)
                continue
            if op == "read_events":
                t_r, me_r = data.draw(_timeouts()), data.draw(_max_events())
                if t_r == ("none",):
                    t_r = ("int", 0)
                tv, mv = _timeout_valid(t_r), _max_events_valid(me_r)
                valid = False if False in (tv, mv) else (None if None in (tv, mv) else True)
                arg = tuple(n for n, ok in (("timeout", tv), ("max_events", mv)) if ok is not True)
                t, me = build(t_r), build(me_r)
                ctx.call(f"uf.read_events(timeout={show(t_r)}, max_events={show(me_r)})",
                         lambda: uf.read_events(timeout=t, max_events=me), valid=valid, arg=arg)
                continue
            if op == "parse":
                _fuzz_parse(ctx, data, env)
                continue
            names: tuple[str, ...] = {"copy": ("dst", "src", "length"), "move": ("dst", "src", "length")}.get(
                op, ("start", "length"))
            recipes = []
            for name in names:
                if name == "src":
                    src_s = st.one_of(st.tuples(st.integers(0, npages), st.sampled_from([0, 0, 1])).map(
                        lambda t: srcmap + t[0] * P + t[1]), st.sampled_from([1 << 47, 0]))
                    recipes.append(data.draw(intlike(src_s, plain_weight=8)))
                elif name == "length":
                    recipes.append(data.draw(intlike(length, plain_weight=8)))
                else:
                    recipes.append(data.draw(intlike(addr, plain_weight=8)))
            kwargs: dict[str, Any] = {}
            if op == "register" and rare(data, 3):
                i = data.draw(st.integers(0, 1))  # an __index__-only start or length (issue 9 item 8)
                kind_, v_ = classify(recipes[i])
                if kind_ == "int" and v_ is not None:
                    recipes[i] = ("index", v_)
            if op == "register":
                mode_r = data.draw(st.one_of(intlike(st.sampled_from([1, 2, 3, 4, 8, 0]), plain_weight=4),
                                             st.sampled_from([("flag", "RegisterMode.WP"), ("flag", "RegisterMode.MISSING")])))
                recipes.append(mode_r)
                names = names + ("mode",)
            elif op in ("writeprotect", "copy", "continue_"):
                kw_name = {"writeprotect": "enable", "copy": "wp", "continue_": "wp"}[op]
                kwargs[kw_name] = data.draw(st.sampled_from([True, False, 1, None]))
            bad = [n for n, r in zip(names, recipes) if int_ok(r) is False]
            amb = [n for n, r in zip(names, recipes) if int_ok(r) is None]
            valid = False if bad else (None if amb else True)
            vals = [build(r) for r in recipes]
            desc = f"uf.{op}(" + ", ".join(show(r) for r in recipes) + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"
            desc += f"  # mapping at {m:#x}, source at {srcmap:#x}"
            method = getattr(uf, op)
            was = _registered(m, npages) if op == "register" and first else None
            got = ctx.call(desc, lambda: method(*vals, **kwargs), valid=valid, arg=tuple(bad + amb) or None)
            if op == "register" and first and not got[0] and isinstance(got[1], (TypeError, ValueError)) and not was:
                if _registered(m, npages):  # issue 9 item 8: the syscall ran before the error
                    ctx.finding("registration-leak", "register() raised but left the range registered", got[1])
            if op == "register":
                first = False
    finally:
        if uf is not None:
            uf.close()
        munmap(m, npages)
        munmap(srcmap, npages)


def _fuzz_uffd_lifecycle(ctx: Ctx, data: Any, m: int) -> None:
    """A closed Userfaultfd refuses every method with ValueError; from_fd() of a non-int
    is refused (never an fd the fuzzer does not own: the object would close it)."""
    what = data.draw(st.sampled_from(["closed", "closed", "from_fd"]))
    if what == "from_fd":
        r = data.draw(st.sampled_from([("str", "3"), ("none",), ("float", 3.0), ("int", -1), ("int", 1 << 70)]))
        v = build(r)
        got = ctx.call(f"pagescan.Userfaultfd.from_fd({show(r)})", lambda: Userfaultfd.from_fd(v),
                       valid=None if r == ("int", -1) else False, arg="fd")  # -1: a closed object
        if got[0]:
            with contextlib.suppress(Exception):
                got[1].detach() if got[1]._fd != -1 and isinstance(got[1]._fd, int) and got[1]._fd >= 0 else None
            got[1]._fd = -1  # never let it close an fd it does not own
        return
    uf = Userfaultfd(0)
    uf.close()
    ctx.call("uf.close() twice", uf.close)
    op = data.draw(st.sampled_from(["register", "unregister", "writeprotect", "zeropage", "wake", "read_events", "fileno",
                                    "detach"]))
    args: tuple[Any, ...] = () if op in ("read_events", "fileno", "detach") else (m, P)
    ctx.call(f"<closed Userfaultfd>.{op}{args}", lambda: getattr(uf, op)(*args), valid=False, arg="closed")


def _fuzz_parse(ctx: Ctx, data: Any, env: Env) -> None:
    n = data.draw(st.sampled_from([0, 32, 64, 96, 31, 33, 320]))
    raw = bytearray(data.draw(st.binary(min_size=n, max_size=n)))
    for i in range(0, len(raw) - 31, 32):
        raw[i] = data.draw(st.sampled_from([0x12, 0x13, 0x14, 0x15, 0x16, 0, 0xFF, raw[i]]))
    how = data.draw(st.sampled_from(["bytes", "bytes", "bytearray", "memoryview", "ndarray", "step2", "cast2d", "str", "none",
                                     "int", "released", "u64array"]))
    obj: Any
    if how == "bytes":
        obj = bytes(raw)
    elif how == "bytearray":
        obj = raw
    elif how == "memoryview":
        obj = memoryview(raw)
    elif how == "ndarray":
        obj = np.frombuffer(bytes(raw), np.uint8)
    elif how == "step2":
        obj = memoryview(bytes(raw) * 2)[::2]
    elif how == "cast2d":
        obj = memoryview(raw).cast("B", (1, len(raw))) if raw else memoryview(raw)
    elif how == "u64array":
        obj = np.frombuffer(bytes(raw[: len(raw) // 8 * 8]), np.uint64)
    elif how == "str":
        obj = "x" * n
    elif how == "none":
        obj = None
    elif how == "int":
        obj = n
    else:
        obj = memoryview(raw)
        obj.release()
    kind, _ = buffer_oracle(obj)
    nbytes = None
    valid: bool | None
    if kind != "range":
        valid = False
    else:
        length = memoryview(obj).nbytes
        valid = (length % 32 == 0) if length else None
        nbytes = length
    desc = f"pagescan.parse_uffd_msgs({how} of {n} bytes: {bytes(raw[:64]).hex()}...)"
    got = ctx.call(desc, lambda: pagescan.parse_uffd_msgs(obj), valid=valid)
    if got[0] and nbytes is not None:
        data_b = memoryview(obj).tobytes()
        want = []
        for i in range(0, nbytes, 32):
            ev = data_b[i]
            want.append({0x12: "PagefaultEvent", 0x13: "ForkEvent", 0x14: "RemapEvent", 0x15: "RemoveEvent",
                         0x16: "UnmapEvent"}.get(ev, "UnknownEvent"))
            if ev == 0x12:
                addr = struct.unpack_from("<Q", data_b, i + 16)[0]
                if got[1][i // 32].address != addr if len(got[1]) > i // 32 else True:
                    ctx.finding("oracle-mismatch", f"message {i // 32}: address {addr:#x} decoded wrong")
        if [type(e).__name__ for e in got[1]] != want:
            ctx.finding("oracle-mismatch", f"decoded {[type(e).__name__ for e in got[1]]}, messages are {want}")


def fam_parse(ctx: Ctx, data: Any, env: Env) -> None:
    _fuzz_parse(ctx, data, env)


# -- WriteWatch -----------------------------------------------------------------------------------


def _wholly_mapped(lo: int, hi: int) -> bool:
    """Whether ``[lo, hi)`` is covered by mappings of this process (any, not only ours)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            a, _, b = line.split(None, 1)[0].partition("-")
            spans.append((int(a, 16), int(b, 16)))
    cur = lo
    for a, b in sorted(spans):
        if a <= cur < b:
            cur = b
        if cur >= hi:
            return True
    return cur >= hi


def fam_writewatch(ctx: Ctx, data: Any, env: Env) -> None:
    """WriteWatch(...) and get/regions/reset, against the pages the example wrote."""
    npages = 16
    m = mmap_anon(npages)
    ww = None
    try:
        how = data.draw(st.sampled_from(["range", "range", "range", "buffer", "hostile"]))
        if how == "buffer":
            recipe = data.draw(buffers())
            obj = build_buffer(recipe, env)
            desc = f"pagescan.WriteWatch({_show_buffer(recipe)})"
            kind, _ = buffer_oracle(obj)
            if _integer_like(obj):
                got = ctx.call(desc, lambda: pagescan.WriteWatch(obj), valid=False, arg=("start", "length", "buffer"))
            else:
                got = ctx.call(desc, lambda: pagescan.WriteWatch(obj), valid=None if kind == "range" else False)
            if got[0]:
                got[1].close()
            return
        if how == "hostile":
            s_r = data.draw(intlike(st.sampled_from([m, m + 1, m + npages * P, 1 << 47]), plain_weight=2))
            l_r = data.draw(intlike(st.sampled_from([P, npages * P, 0, P - 1, (npages + 1) * P]), plain_weight=2))
        else:
            s_r, l_r = ("int", m), ("int", data.draw(st.sampled_from([P, 4 * P, npages * P, npages * P - 1])))
        s_ok, l_ok = int_ok(s_r), int_ok(l_r)
        valid = False if False in (s_ok, l_ok) else (None if None in (s_ok, l_ok) or s_r[0] != "int" or l_r[0] != "int" else True)
        if valid and ((classify(l_r)[1] or 0) <= 0 or (classify(s_r)[1] or 0) % P):
            valid = False  # length <= 0 or an unaligned start: ValueError
        s, ln = build(s_r), build(l_r)
        if l_r == ("none",):  # WriteWatch(obj, None): the buffer form
            valid = False if _integer_like(s) or buffer_oracle(s)[0] != "range" else None
        got = ctx.call(f"pagescan.WriteWatch({show(s_r)}, {show(l_r)})  # mapping at {m:#x}+{npages}p",
                       lambda: pagescan.WriteWatch(s, ln), valid=valid,
                       arg=("start", "length", "buffer"))
        if not got[0]:
            return
        ww = got[1]
        if not (m <= ww.start < ww.end <= m + npages * P):
            # Accepted arguments that are not this mapping (a finding already if they
            # were bad): never write to or remap memory the fuzzer does not own.
            if valid and not _wholly_mapped(ww.start, ww.end):  # another mapping beside ours is fine
                ctx.finding("accepted-invalid", f"WriteWatch covers {ww.start:#x}-{ww.end:#x}, outside the mapping "
                            f"{m:#x}+{npages * P:#x}")
            return
        watched = (ww.end - ww.start) // P
        written: set[int] = set()
        replaced = False
        if watched >= 8 and rare(data, 4):
            # Pages written before a replaced one, and a max_pages that stops short of it
            # (issue 9 item 7): still PermissionError, never pages.
            for i in range(3):
                ctypes.memset(ww.start + i * P, 1, 1)
            mmap_anon(1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, ww.start + 6 * P)
            mp = data.draw(st.sampled_from([1, 2, 3]))
            reset = data.draw(st.booleans())
            got = ctx.call(f"ww.get(max_pages={mp}, reset={reset})  # pages 0-2 written, page 6 replaced by a new mapping",
                           lambda: ww.get(max_pages=mp, reset=reset))
            if got[0] or not isinstance(got[1], PermissionError):
                ctx.finding("oracle-mismatch", f"get() after a page of the range was replaced: {_outcome(got)}, "
                            "documented PermissionError")
            return
        for _ in range(data.draw(st.integers(1, 6))):
            op = data.draw(st.sampled_from(["write", "write", "get", "regions", "reset", "replace", "get_max"]))
            if op == "write":
                pages_w = data.draw(st.lists(st.integers(0, watched - 1), max_size=4))
                ctx.note(f"write pages {pages_w} of the watch")
                for i in pages_w:
                    ctypes.memset(ww.start + i * P, 1, 1)
                    written.add(i)
                continue
            if op == "replace":  # a page of the range replaced by a new mapping (issue 9 item 7)
                i = data.draw(st.integers(0, watched - 1))
                ctx.note(f"page {i} of the watch replaced by a new mapping and written")
                mmap_anon(1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, ww.start + i * P)
                ctypes.memset(ww.start + i * P, 1, 1)
                replaced = True
                continue
            if op == "reset":
                got = ctx.call("ww.reset()", ww.reset, valid=None if replaced else True)
                if got[0]:
                    written.clear()
                    if replaced:
                        ctx.finding("oracle-mismatch", "reset() after a page was replaced did not raise PermissionError")
                continue
            mp_r = data.draw(st.one_of(st.just(("none",)), intlike(st.sampled_from([1, 2, 5, 100]), plain_weight=3)))
            reset = data.draw(st.sampled_from([False, True, False, 1, None]))
            mp = build(mp_r)
            mp_ok = True if mp_r == ("none",) else int_ok(mp_r)
            if mp_ok and mp_r != ("none",) and (classify(mp_r)[1] or 0) <= 0:
                mp_ok = False
            if mp_ok and mp_r[0] not in ("none", "int"):
                mp_ok = None
            if op == "get_max" and mp_r == ("none",):
                mp_r, mp, mp_ok = ("int", 1), 1, True
            meth = ww.get if op in ("get", "get_max") else ww.regions
            desc = f"ww.{meth.__name__}(max_pages={show(mp_r)}, reset={reset!r})" + ("  # after a page was replaced" if replaced else "")
            got = ctx.call(desc, lambda: meth(max_pages=mp, reset=reset), valid=False if mp_ok is False else (None if mp_ok is None else True),
                           arg="max_pages")
            if replaced:
                if got[0] or not isinstance(got[1], PermissionError):
                    if got[0] or not isinstance(got[1], (TypeError, ValueError)):
                        ctx.finding("oracle-mismatch", f"{meth.__name__}() after a page of the range was replaced: "
                                    f"{_outcome(got)}, documented PermissionError")
                continue
            if not got[0]:
                continue
            pages = got[1] if meth.__name__ == "get" else pagescan.regions_to_pages(got[1])
            got_idx = sorted(int(a - ww.start) // P for a in pages.tolist())
            if mp_ok is True:
                want = sorted(written)
                if mp is not None:
                    want = want[: int(mp)]
                if got_idx != want:
                    ctx.finding("oracle-mismatch", f"{meth.__name__}() pages {got_idx}, written {sorted(written)} "
                                f"(max_pages={mp})")
            if reset:
                written -= set(got_idx)  # re-armed: what was returned
    finally:
        if ww is not None:
            ww.close()
        munmap(m, npages)


# -- move_pages ------------------------------------------------------------------------------------


def fam_move(ctx: Ctx, data: Any, env: Env) -> None:
    n = 4
    src, dst = mmap_anon(n), mmap_anon(n)
    try:
        for i in range(n):
            ctypes.memset(src + i * P, 0x30 + i, P)
        before = ctypes.string_at(src, n * P)
        where = st.one_of(st.sampled_from([src, dst, src + P, dst + P, dst + 1, 1 << 47, 0]))
        d_r = data.draw(intlike(st.one_of(st.just(dst), where), plain_weight=8))
        s_r = data.draw(intlike(st.one_of(st.just(src), where), plain_weight=8))
        l_r = data.draw(intlike(st.sampled_from([n * P, P, 2 * P, 0, P + 1, 8 * P, 1 << 62]), plain_weight=8))
        fb = data.draw(st.sampled_from(["copy", "copy", None, "bogus", 1]))
        holes = data.draw(st.sampled_from([False, True, 1, None]))
        names = ("dst", "src", "length")
        rs = (d_r, s_r, l_r)
        bad = [k for k, r in zip(names, rs) if int_ok(r) is False]
        amb = [k for k, r in zip(names, rs) if int_ok(r) is None or r[0] != "int"]
        if fb not in ("copy", None):
            bad.append("fallback")
        valid = False if bad else (None if amb else True)
        vals = [build(r) for r in rs]
        desc = (f"pagescan.move_pages({show(d_r)}, {show(s_r)}, {show(l_r)}, fallback={fb!r}, allow_src_holes={holes!r})"
                f"  # src {src:#x}, dst {dst:#x}, {n} pages")
        uffd: Any = None
        if rare(data, 6):
            uffd = data.draw(st.sampled_from(["uffd", 5, "closed"]))
            if uffd == "closed":
                uffd = Userfaultfd(0)
                uffd.close()
            desc += f", uffd={uffd!r}"
            valid = False if valid is not True else False
            bad.append("uffd")
        # With several problems, naming any argument of the call will do (an overlap
        # names src and dst; a closed uffd says "closed Userfaultfd").
        got = ctx.call(desc, lambda: pagescan.move_pages(*vals, fallback=fb, allow_src_holes=holes, uffd=uffd), valid=valid,
                       arg=tuple(bad + amb) + (("dst", "src", "length", "Userfaultfd") if len(bad) > 1 or uffd is not None
                                               else ()) or None)
        if got[0] and valid and vals == [dst, src, n * P]:
            r = got[1]
            if r.moved + r.copied != n * P or ctypes.string_at(dst, n * P) != before:
                ctx.finding("oracle-mismatch", f"move_pages returned {r} but dst does not hold the source bytes")
    finally:
        munmap(src, n)
        munmap(dst, n)


# -- FaultHandler / FileSource -----------------------------------------------------------------------


def _fifo(env: Env) -> str:
    path = os.path.join(env.tmp, "fifo")
    if not os.path.exists(path):
        os.mkfifo(path)
    return path


def _paths(env: Env, good: str) -> st.SearchStrategy[tuple[str, Any]]:
    return st.sampled_from([
        ("good", good), ("good", good), ("good", good), ("missing", os.path.join(env.tmp, "missing")),
        ("dir", env.tmp), ("devnull", "/dev/null"), ("none", None), ("int", 12345), ("bytes", os.fsencode(good)),
        ("empty", ""), ("nul", "a\0b"), ("list", [good]),
    ])


def fam_handler(ctx: Ctx, data: Any, env: Env) -> None:
    """FileSource and FaultHandler: constructor arguments, reads, and real lazy fills."""
    good = os.path.join(env.tmp, "source")
    if not os.path.exists(good):
        with open(good, "wb") as f:
            f.write(bytes(range(256)) * (4 * P // 256))
    kind, path = data.draw(_paths(env, good))
    # A FIFO now and then, and once per batch (the draws do not depend on it: Hypothesis
    # requires the same draws for the same choices).
    if rare(data, 31) or env.once("handler-fifo"):
        kind, path = "fifo", _fifo(env)
    base_r = data.draw(intlike(st.sampled_from([0, 0, P, 100 * P]), plain_weight=6))
    base = build(base_r)
    pvalid = True if kind == "good" else (False if kind in ("none", "int", "list") else None)
    bvalid = int_ok(base_r)
    if base_r[0] != "int" and bvalid:
        bvalid = None
    valid = False if False in (pvalid, bvalid) else (None if None in (pvalid, bvalid) else True)
    got = ctx.call(f"pagescan.FileSource({kind}:{path!r}, base={show(base_r)})", lambda: pagescan.FileSource(path, base),
                   valid=valid if kind != "missing" else None)
    src = got[1] if got[0] else None
    read_now, use_src = data.draw(st.booleans()), data.draw(st.booleans())  # drawn whatever happened
    try:
        if src is not None and read_now:
            off_r = data.draw(intlike(st.sampled_from([0, P, 3 * P, 100 * P]), plain_weight=6))
            n = data.draw(st.sampled_from([P, 2 * P, 0]))
            buf = bytearray(n)
            off = build(off_r)
            got = ctx.call(f"FileSource.read({show(off_r)}, memoryview(bytearray({n})))",
                           lambda: src.read(off, memoryview(buf)), valid=None)
        npages = 4
        m = mmap_anon(npages)
        try:
            shape = data.draw(st.sampled_from(["good", "good", "unaligned", "empty", "negative", "notuple", "npint",
                                               "str", "none", "huge", "overlap", "populated"]))
            regions: Any = {
                "good": [(m, npages * P)], "unaligned": [(m + 1, P)], "empty": [(m, 0)], "negative": [(m, -P)],
                "notuple": [m], "npint": [(np.uint64(m), np.uint64(P))], "str": "regions", "none": None,
                "huge": [(m, 1 << 64)], "overlap": [(m, 2 * P), (m + P, 2 * P)], "populated": [(m, P)],
            }[shape]
            if shape == "populated":
                ctypes.memset(m, 1, 1)
            source: Any = src if src is not None and use_src else (
                lambda off, ln: bytes(ln) if off % 2 == 0 else None)
            rvalid = {"good": True, "npint": None, "overlap": None, "populated": True}.get(shape, False)
            got = ctx.call(f"pagescan.FaultHandler({shape}:{regions!r}, source)", lambda: pagescan.FaultHandler(regions, source),
                           valid=rvalid, arg="region" if rvalid is False else None)
            if got[0] and rare(data, 4):
                fh = got[1]
                started = ctx.call("fh.start(); fh.wait(10)", lambda: (fh.start(), fh.wait(10))[1], valid=None)
                try:
                    if started[0] and started[1] and shape == "good":
                        if src is not None and source is src:
                            want = b"".join(bytes(range(256)) * (P // 256) for _ in range(npages))
                            with open(good, "rb") as f:
                                f.seek(src.base if isinstance(src.base, int) else 0)
                                want = f.read(npages * P).ljust(npages * P, b"\0")
                        else:
                            want = b"".join(bytes(P) for _ in range(npages))
                        if ctypes.string_at(m, npages * P) != want:
                            ctx.finding("oracle-mismatch", "FaultHandler filled the pages with the wrong bytes")
                finally:
                    ctx.call("fh.close()", fh.close)
        finally:
            munmap(m, npages)
    finally:
        if src is not None:
            src.close()


# -- snapshot ----------------------------------------------------------------------------------------


def _pristine(env: Env) -> tuple[str, bytes, list[bytes], int]:
    """A valid two-generation checkpoint of 4 + 2 pages, made once per worker."""
    if env._ckpt is None:
        from pagescan.snapshot import Checkpointer

        a, b = mmap_anon(4), mmap_anon(2)
        for i in range(4):
            ctypes.memset(a + i * P, 0x10 + i, P if i != 2 else 0)
        ctypes.memset(b, 0x77, P)
        path = os.path.join(env.tmp, "pristine.ckpt")
        with Checkpointer(path, [(a, 4 * P), (b, 2 * P)]) as ck:
            ck.checkpoint()
            ctypes.memset(a + P, 0x99, 8)
            ck.checkpoint()
        contents = [ctypes.string_at(a, 4 * P), ctypes.string_at(b, 2 * P)]
        with open(path, "rb") as f:
            data = f.read()
        munmap(a, 4)
        munmap(b, 2)
        env._ckpt = (path, data, contents, 2)
    return env._ckpt


def _mutate(data: Any, raw: bytes) -> tuple[str, bytes]:
    from pagescan.snapshot._format import FILE_HEADER, GEN_HEADER, digest

    b = bytearray(raw)
    how = data.draw(st.sampled_from(["none", "flip", "flip", "flip", "truncate", "page_size", "page_size", "nregions",
                                     "length", "length", "gen_npages", "garbage", "empty"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(b) - 1))
        bit = data.draw(st.integers(0, 7))
        b[i] ^= 1 << bit
        return f"byte {i} bit {bit} flipped", bytes(b)
    if how == "truncate":
        n = data.draw(st.integers(0, len(b) - 1))
        return f"truncated to {n} bytes", bytes(b[:n])
    if how == "empty":
        return "empty file", b""
    if how == "garbage":
        return "64 bytes of garbage appended", bytes(b) + bytes(range(64))
    if how in ("page_size", "nregions"):
        f = list(FILE_HEADER.unpack_from(b, 0))
        v = data.draw(st.sampled_from([0, 1, 4095, 8192, (1 << 31) - 8, (1 << 32) - 1, 1000, 1 << 20]))
        f[2 if how == "page_size" else 3] = v
        f[-1] = b"\0" * 8
        packed = FILE_HEADER.pack(*f)
        b[:64] = packed[:56] + digest(packed[:56])
        return f"header {how}={v} (valid digest)", bytes(b)
    if how == "length":
        nreg = FILE_HEADER.unpack_from(b, 0)[3]
        v = data.draw(st.sampled_from([0, 1, P + 1, 1 << 62, U64, P << 30]))
        r = data.draw(st.integers(0, nreg - 1))
        struct.pack_into("<Q", b, 64 + 8 * r, v)
        table = bytes(b[64: 64 + 8 * nreg])
        b[64 + 8 * nreg: 64 + 8 * nreg + 8] = digest(table)
        return f"region {r} length={v:#x} (valid digest)", bytes(b)
    if how == "gen_npages":
        nreg = FILE_HEADER.unpack_from(b, 0)[3]
        off = 64 + 8 * nreg + 8
        f = list(GEN_HEADER.unpack_from(b, off))
        field = data.draw(st.sampled_from([2, 3, 5]))
        v = data.draw(st.sampled_from([0, 1 << 40, 1 << 62, U64]))
        f[field] = v
        f[-1] = b"\0" * 8
        packed = GEN_HEADER.pack(*f)
        b[off: off + 64] = packed[:56] + digest(packed[:56])
        return f"generation 1 header field {field}={v:#x} (valid digest)", bytes(b)
    return "pristine", bytes(b)


def fam_snapshot(ctx: Ctx, data: Any, env: Env) -> None:
    """verify/inspect/compact/restore/lazy_restore/Checkpointer on damaged and hostile files."""
    from pagescan import snapshot

    _, raw, contents, ngen = _pristine(env)
    what, mutated = _mutate(data, raw)
    path = os.path.join(env.tmp, f"case-{ctx.calls}.ckpt")
    with open(path, "wb") as f:
        f.write(mutated)
    pk, pth = data.draw(st.sampled_from([("file", path)] * 18 + [("fifo", None)] + [
        ("dir", env.tmp), ("dir", env.tmp), ("devnull", "/dev/null"), ("missing", path + ".none"), ("none", None), ("int", 7),
        ("bytes", os.fsencode(path))]))
    if env.once("snapshot-fifo"):  # every batch tries a FIFO once (issue 9 item 10)
        pk = "fifo"
    if pk == "fifo":
        pth = _fifo(env)
    op = data.draw(st.sampled_from(["verify", "verify", "inspect", "compact", "compact", "restore", "restore",
                                    "lazy_restore", "checkpointer"]))
    gen_r = data.draw(st.one_of(st.just(("none",)), st.just(("none",)), intlike(st.sampled_from([1, 2, 3, 0]), plain_weight=3)))
    pid_r = data.draw(st.sampled_from([("none",), ("none",), ("none",), ("self",), ("str", "x"), ("int", -1), ("int", 0),
                                       ("int", 1 << 70), ("bool", True), ("float", 1.0)]))
    a, b = mmap_anon(4), mmap_anon(2)
    try:
        regions = [(a, 4 * P), (b, 2 * P)]
        gen = build(gen_r)
        pid = os.getpid() if pid_r == ("self",) else build(pid_r)
        pvalid = {"file": True, "bytes": True, "missing": None, "dir": None, "devnull": None, "fifo": None}.get(pk, False)
        desc = f"snapshot.{op}({pk}: {what}, generation={show(gen_r)}" + (f", pid={show(pid_r) if pid_r != ('self',) else 'os.getpid()'}" if op == "restore" else "") + ")"
        gvalid = True if gen_r == ("none",) else (int_ok(gen_r) if gen_r[0] == "int" else None)
        valid: bool | None = None if pvalid is not False else False
        if gvalid is False or (gen_r[0] == "int" and (classify(gen_r)[1] or 0) <= 0):
            valid = None  # generation 0 / negative: a bad argument or "no such generation"
        if op == "restore" and pid_r not in (("none",), ("self",)):
            valid = None if pid_r[0] == "int" else False
        if op == "verify":
            got = ctx.call(desc, lambda: snapshot.verify(pth), valid=valid)
            if got[0] and what != "pristine" and "garbage" not in what and len(got[1]) >= ngen and pk in ("file", "bytes"):
                ctx.finding("undetected-corruption", f"verify() accepted every generation of a file with {what}")
        elif op == "inspect":
            ctx.call(desc, lambda: snapshot.inspect(pth), valid=valid)
        elif op == "compact":
            ctx.call(desc, lambda: snapshot.compact(pth, gen), valid=valid)
        elif op == "restore":
            got = ctx.call(desc, lambda: snapshot.restore(pth, regions, gen, pid=pid), valid=valid)
            if got[0] and what == "pristine" and gen in (None, 2):
                if [ctypes.string_at(a, 4 * P), ctypes.string_at(b, 2 * P)] != contents:
                    ctx.finding("oracle-mismatch", "restore() of the pristine file did not restore the memory bit-exactly")
        elif op == "lazy_restore":
            def lazy() -> bool:
                with snapshot.lazy_restore(pth, regions, gen) as fh:
                    return fh.wait(10)
            got = ctx.call(desc, lazy, valid=valid)
            if got[0] and got[1] and what == "pristine" and gen in (None, 2):
                if [ctypes.string_at(a, 4 * P), ctypes.string_at(b, 2 * P)] != contents:
                    ctx.finding("oracle-mismatch", "lazy_restore() of the pristine file served wrong bytes")
        else:
            def ckpt() -> Any:
                with snapshot.Checkpointer(pth, regions) as ck:
                    return ck.checkpoint()
            ctx.call(desc.replace("generation=", "then checkpoint(); generation ignored="), ckpt, valid=valid)
    finally:
        munmap(a, 4)
        munmap(b, 2)
        with contextlib.suppress(OSError):
            os.unlink(path)
        for name in os.listdir(env.tmp):
            if name.startswith(f"case-{ctx.calls}") or ".compact-" in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(env.tmp, name))


# -- the command line --------------------------------------------------------------------------------

_ERRNO_MSG = re.compile(r"^pagescan: \w+: \[Errno (\d+)\] (.*)$")


def _bare_errno(line: str) -> bool:
    """The message is only the errno's text (``[Errno 14] Bad address``)."""
    m = _ERRNO_MSG.match(line)
    return m is not None and m.group(2).strip() == os.strerror(int(m.group(1)))


def fam_cli(ctx: Ctx, data: Any, env: Env) -> None:
    """main([...]): exit status 0/1/2, one-line errors, never a traceback."""
    from pagescan.cli import main

    A = env.arena
    ck = _pristine(env)[0]
    pid = data.draw(st.sampled_from(["self", "self", str(os.getpid()), "1", "0", "-1", "99999999", "abc", str(1 << 64), "2",
                                     "exited"]))
    if pid == "exited":
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        pid = str(child)
    rng = data.draw(st.sampled_from([None, f"{A.addr:x}-{A.end:x}", f"{A.addr + 1:x}-{A.end:x}", f"{A.end:x}-{A.addr:x}",
                                     f"{A.addr:x}-{1 << 47:x}", f"{1 << 47:x}-{1 << 48:x}", f"{U64 - P + 1:x}-{U64:x}",
                                     f"0-{1 << 64:x}", "[heap]", "[stack]", "nothing", "0x-0x", "-", "libc.so.6"]))
    cats = data.draw(st.sampled_from([None, "present", "all", "bogus", "", "present,present", "zero,written"]))
    cmd = data.draw(st.sampled_from(["scan", "scan", "scan", "stat", "caps", "inspect", "verify", "compact", "restore",
                                     "garbage"]))
    if env.once("cli-beyond-user-space"):  # every batch: a range past user space (issue 9 item 12)
        cmd, pid, rng = "scan", "self", f"{A.addr:x}-{1 << 47:x}"
    argv: list[str]
    if cmd == "scan":
        argv = ["scan", pid] + ([rng] if rng else [])
        if cats is not None:
            argv += [data.draw(st.sampled_from(["--require", "--exclude", "--anyof", "--return"])), cats]
        argv += data.draw(st.sampled_from([[], ["--json"], ["--max-pages", "3"], ["--max-pages", "-1"], ["--backend", "emulated"],
                                           ["--backend", "bogus"], ["--max-pages", str(1 << 70)]]))
    elif cmd == "stat":
        argv = ["stat", pid] + data.draw(st.sampled_from([[], ["--json"], ["--all"], ["--sort", "bogus"]]))
    elif cmd == "caps":
        argv = ["caps"] + data.draw(st.sampled_from([[], ["--json"]]))
    elif cmd in ("inspect", "verify", "compact"):
        what, mutated = _mutate(data, open(ck, "rb").read())
        path = os.path.join(env.tmp, "cli.ckpt")
        with open(path, "wb") as f:
            f.write(mutated)
        target = data.draw(st.sampled_from([path] * 20 + [env.tmp, "/dev/null", os.path.join(env.tmp, "none"), "",
                                            _fifo(env)]))
        argv = ["checkpoint", cmd, target] + (["-g", data.draw(st.sampled_from(["1", "0", "x", "99"]))] if cmd == "compact" and data.draw(st.booleans()) else [])
        argv_desc = f"  # file: {what}"
    elif cmd == "restore":
        addrs = data.draw(st.sampled_from([[hex(A.addr)], [hex(A.addr), hex(A.addr + 8 * P)], ["zz"], [hex(1 << 47)], [hex(A.addr + 1)]]))
        argv = ["restore", ck, pid] + addrs
    else:
        argv = data.draw(st.sampled_from([[], ["bogus"], ["--version"], ["scan"], ["checkpoint"], ["scan", "self", "--json", "--json"]]))
    desc = f"pagescan.cli.main({argv!r})" + (argv_desc if cmd in ("inspect", "verify", "compact") else "")
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err

    def run() -> Any:
        try:
            return main(argv)
        except SystemExit as e:
            return ("exit", e.code)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    try:
        got = ctx.call(desc, run, valid=None, allowed=())
    finally:
        sys.stdout, sys.stderr = old
    err.seek(0)
    text = err.buffer.getvalue().decode(errors="replace") if hasattr(err, "buffer") else ""
    if not got[0]:
        return  # Ctx.call recorded the escaped exception
    status = got[1][1] if isinstance(got[1], tuple) else got[1]
    if status not in (0, 1, 2, None):
        ctx.finding("wrong-exit", f"exit status {status!r}; stderr {text[-300:]!r}")
    if "Traceback" in text:
        ctx.finding("traceback", text[-500:])
    if status == 1:
        lines = text.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("pagescan: "):
            ctx.finding("wrong-exit", f"exit status 1 without a one-line 'pagescan: ...' message: {text[-300:]!r}")
        elif _bare_errno(lines[0]):
            ctx.finding("bare-errno", f"error names neither the argument nor the call: {lines[0]}")


# -- processes that exit mid-call --------------------------------------------------------------------


def fam_pid_exit(ctx: Ctx, data: Any, env: Env) -> None:
    """scan(pid=child) while the child exits: ProcessLookupError, never another errno."""
    A = env.arena
    delay = data.draw(st.sampled_from([0, 0.0002, 0.0005, 0.001, 0.003]))
    backend = data.draw(st.sampled_from(["kernel", "emulated", "emulated", "emulated"]))
    big = data.draw(st.sampled_from([False, True, True]))
    child = exiting_child(delay)
    try:
        start, end = (A.addr, A.end) if not big else (0, (1 << 47) - P)  # all of user space
        for i in range(200):
            got = ctx.call(f"pagescan.scan({start:#x}, {end:#x}, pid=<child exiting after {delay * 1e6:.0f} us>, "
                           f"return_mask=ALL, backend={backend!r})  # attempt {i}",
                           lambda: pagescan.scan(start, end, pid=child, return_mask=ALL, backend=backend))
            if not got[0]:
                if not isinstance(got[1], ProcessLookupError):
                    ctx.finding("wrong-exception", "a process exiting mid-call must give ProcessLookupError", got[1])
                break
    finally:
        os.waitpid(child, 0)


# -- reentrancy ------------------------------------------------------------------------------------------


def fam_reentrancy(ctx: Ctx, data: Any, env: Env) -> None:
    """scan() from a signal handler (setitimer), from a progress= callback and from
    __del__ while another scan() is in progress; every result checked."""
    A = env.arena
    interval = data.draw(st.sampled_from([0.0001, 0.0001, 0.0002, 0.001]))
    seconds = data.draw(st.sampled_from([0.2, 0.3]))
    inner_vl = data.draw(st.sampled_from([None, 2, 5000]))
    outer_vl = data.draw(st.sampled_from([None, 3, 5000]))
    use_out = data.draw(st.booleans())
    ra, rb = (A.addr, A.addr + 40 * P), (A.addr + 8 * P, A.end)

    def expect(rng: tuple[int, int], vl: int | None) -> list[Any]:
        raw = raw_scan(rng[0], rng[1], vec_len=_expected_vec_len(rng[0], rng[1], 0, vl), ret=ALL)
        return list(raw.vec.tolist())

    want_a, want_b = expect(ra, outer_vl), expect(rb, inner_vl)
    want_out = expect(ra, 64)
    bad: list[str] = []
    inner = [0]

    def handler(signum: int, frame: Any) -> None:
        inner[0] += 1
        r = pagescan.scan(rb[0], rb[1], return_mask=ALL, vec_len=inner_vl)
        if r.regions.tolist() != want_b:
            bad.append(f"inner scan: {r.regions.tolist()[:4]}...")

    class Finalised:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            r = pagescan.scan(rb[0], rb[1], return_mask=ALL, vec_len=inner_vl)
            if r.regions.tolist() != want_b:
                bad.append("scan from __del__ wrong")

    out = np.empty(64, PAGE_REGION_DTYPE) if use_out else None
    desc = (f"reentrancy: scan(A, A+40p, vec_len={outer_vl}, out={'64 regions' if use_out else None}) in a loop for {seconds} s; "
            f"SIGALRM every {interval * 1e6:.0f} us runs scan(A+8p, A+64p, vec_len={inner_vl}); gc finalisers scan too")

    def loop() -> int:
        old = signal.signal(signal.SIGALRM, handler)
        thresholds = gc.get_threshold()
        gc.set_threshold(50)
        n = 0
        try:
            signal.setitimer(signal.ITIMER_REAL, interval, interval)
            t = time.monotonic() + seconds
            while time.monotonic() < t:
                Finalised()
                vl = len(out) if out is not None else outer_vl
                r = pagescan.scan(ra[0], ra[1], return_mask=ALL, vec_len=vl if out is None else None, out=out)
                if r.regions.tolist() != (want_a if out is None else want_out):
                    bad.append(f"outer scan: {r.regions.tolist()[:4]}...")
                n += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, old)
            gc.set_threshold(*thresholds)
            gc.collect()
        return n

    got = ctx.call(desc, loop, watchdog=False)
    ctx.calls += (got[1] if got[0] else 0) + inner[0]
    if bad:
        ctx.finding("oracle-mismatch", f"{len(bad)} wrong results of {got[1] if got[0] else '?'} outer and {inner[0]} inner "
                    f"calls; first: {bad[0]}")
    # scan() from a progress= callback of a checkpoint in progress
    if rare(data, 5):
        from pagescan.snapshot import Checkpointer

        m = mmap_anon(8)
        try:
            ctypes.memset(m, 3, 8 * P)
            path = os.path.join(env.tmp, "reent.ckpt")

            def progress(done: int, total: int) -> None:
                r = pagescan.scan(rb[0], rb[1], return_mask=ALL, vec_len=inner_vl)
                if r.regions.tolist() != want_b:
                    bad.append("scan from progress= wrong")

            def ckpt() -> Any:
                with Checkpointer(path, [(m, 8 * P)]) as ck:
                    return ck.checkpoint(progress=progress)

            ctx.call("Checkpointer(...).checkpoint(progress=<callback calling scan()>)", ckpt)
            if bad:
                ctx.finding("oracle-mismatch", bad[-1])
        finally:
            munmap(m, 8)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(env.tmp, "reent.ckpt"))


FAMILIES: dict[str, Callable[[Ctx, Any, Env], None]] = {
    "scan": fam_scan,
    "buffers": fam_buffers,
    "out": fam_out,
    "uffd": fam_uffd,
    "parse": fam_parse,
    "writewatch": fam_writewatch,
    "move": fam_move,
    "handler": fam_handler,
    "snapshot": fam_snapshot,
    "cli": fam_cli,
    "pid_exit": fam_pid_exit,
    "reentrancy": fam_reentrancy,
}
