"""Worker side of the fuzz harness: argument recipes, the call checker, the log.

An argument is drawn as a *recipe* (a small tuple such as ``("np", "uint64", 4096)``)
and built into the object passed to pagescan. The recipe's ``repr`` is the reproducing
input written to the log before each call, so a crash or a hang is reported with the
call that caused it even though the worker died.
"""

from __future__ import annotations

import ctypes
import enum
import json
import math
import operator
import os
import signal
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
from hypothesis import strategies as st

from pagescan import Category, PagefaultFlag, RegisterMode, ScanFlag, UffdFeature

P = os.sysconf("SC_PAGE_SIZE")
U64 = (1 << 64) - 1
#: A call slower than this is a finding (a bounded call must stay bounded).
SLOW_SECONDS = 2.5
#: A call still running after this long is interrupted (SIGALRM) and reported as a hang;
#: the parent's batch timeout is the backstop for a call no signal can interrupt.
HANG_SECONDS = 4.0


class CallTimeout(BaseException):
    """Raised by the watchdog's SIGALRM handler inside a call that hangs."""


class Watchdog:
    """Interrupts the main thread's call after a deadline: a thread sends SIGALRM to the
    main thread itself (``pthread_kill``; a process-directed timer signal may be taken by
    another thread, e.g. a library's worker, and never interrupt a blocking ``open``),
    whose handler raises :class:`CallTimeout` if the call is still armed."""

    def __init__(self) -> None:
        self.main = threading.main_thread().ident or 0
        self.cv = threading.Condition()
        self.deadline: float | None = None
        self.armed = False  # read by the handler, in the main thread
        threading.Thread(target=self._run, name="fuzz-watchdog", daemon=True).start()

    def _handler(self, signum: int, frame: Any) -> None:
        if self.armed:
            self.armed = False
            raise CallTimeout()

    def arm(self, seconds: float) -> None:
        signal.signal(signal.SIGALRM, self._handler)
        self.armed = True
        with self.cv:
            self.deadline = time.monotonic() + seconds
            self.cv.notify()

    def disarm(self) -> None:
        self.armed = False
        with self.cv:
            self.deadline = None

    def _run(self) -> None:
        with self.cv:
            while True:
                if self.deadline is None:
                    self.cv.wait()
                    continue
                left = self.deadline - time.monotonic()
                if left > 0:
                    self.cv.wait(left)
                    continue
                self.deadline = None
                signal.pthread_kill(self.main, signal.SIGALRM)


_watchdog: Watchdog | None = None

#: Exceptions the public API may raise (OSError subclasses must carry an errno).
DOCUMENTED = (OSError, TypeError, ValueError)


# -- recipes for integer-like arguments ------------------------------------------------


class OnlyIndex:
    """An object whose only integer protocol is ``__index__`` (not ``int``, no ``__int__``)."""

    __slots__ = ("v",)

    def __init__(self, v: int) -> None:
        self.v = v

    def __index__(self) -> int:
        return self.v

    def __repr__(self) -> str:
        return f"OnlyIndex({self.v})"


FLAGS: dict[str, enum.IntFlag] = {
    "Category.PRESENT": Category.PRESENT,
    "Category.WRITTEN": Category.WRITTEN,
    "Category.PRESENT|Category.PFNZERO": Category.PRESENT | Category.PFNZERO,
    "Category(0)": Category(0),
    "ScanFlag.WP_MATCHING": ScanFlag.WP_MATCHING,
    "RegisterMode.WP": RegisterMode.WP,
    "RegisterMode.MISSING": RegisterMode.MISSING,
    "UffdFeature.WP_ASYNC": UffdFeature.WP_ASYNC,
    "PagefaultFlag.WRITE": PagefaultFlag.WRITE,
}

INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
OTHER_DTYPES = ("float16", "float32", "float64", "longdouble", "complex64", "complex128", "bool",
                "timedelta64", "datetime64", "str", "bytes", "void")


def build(recipe: tuple[Any, ...]) -> Any:
    """The object a recipe stands for."""
    kind = recipe[0]
    if kind in ("int", "bool", "float", "str", "bytes"):
        return recipe[1]
    if kind == "none":
        return None
    if kind == "np":
        dt, v = recipe[1], recipe[2]
        if dt in INT_DTYPES:
            return np.array(v).astype(dt)[()]  # wraps like a C cast when out of range
        if dt == "timedelta64":
            return np.timedelta64(int(v), "s")
        if dt == "datetime64":
            return np.datetime64(int(v), "s")
        if dt == "str":
            return np.str_(str(v))
        if dt == "bytes":
            return np.bytes_(str(v).encode())
        if dt == "void":
            return np.void(b"\0" * 8)
        return np.array(v).astype(dt)[()]
    if kind == "flag":
        return FLAGS[recipe[1]]
    if kind == "index":
        return OnlyIndex(recipe[1])
    if kind == "frac":
        return Fraction(recipe[1], 1)
    if kind == "npzerod":
        return np.array(recipe[1], dtype=np.uint64)  # a 0-d array: has __index__ and a buffer
    raise AssertionError(recipe)


def classify(recipe: tuple[Any, ...]) -> tuple[str, int | None]:
    """``("int", value)`` for an integer-like argument (``operator.index`` works and it is
    no bool), ``("bool", v)`` (may be accepted as an int or refused), ``("nonint", None)``."""
    obj = build(recipe)
    if isinstance(obj, (bool, np.bool_)):
        return "bool", int(obj)
    try:
        return "int", operator.index(obj)
    except TypeError:
        return "nonint", None


def int_ok(recipe: tuple[Any, ...], lo: int = 0, hi: int = U64, above: bool | None = False) -> bool | None:
    """Whether an integer argument built from ``recipe`` is valid: True, False, None
    (either). Valid: ``lo <= value <= hi``; a value above ``hi`` gives ``above``."""
    kind, v = classify(recipe)
    if kind == "nonint":
        return False
    if kind == "bool":
        return None
    assert v is not None
    if v < lo:
        return False
    return True if v <= hi else above


def exiting_child(delay: float) -> int:
    """Fork a child that busy-waits ``delay`` seconds, then exits; returns its pid once
    it runs. The caller reaps it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        os.write(w, b"x")
        t = time.monotonic() + delay
        while time.monotonic() < t:
            pass
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    return pid


def show(recipe: tuple[Any, ...]) -> str:
    """A short, evaluable-looking form of a recipe for reports."""
    kind = recipe[0]
    if kind == "int":
        v = recipe[1]
        return hex(v) if abs(v) >= 4096 else str(v)
    if kind in ("bool", "float", "str", "bytes"):
        v = recipe[1]
        return f"float({str(v)!r})" if isinstance(v, float) and not math.isfinite(v) else repr(v)
    if kind == "none":
        return "None"
    if kind == "np":
        return f"np.{recipe[1]}({recipe[2]!r})"
    if kind == "flag":
        return str(recipe[1])
    if kind == "index":
        return f"OnlyIndex({recipe[1]:#x})"
    if kind == "frac":
        return f"Fraction({recipe[1]})"
    if kind == "npzerod":
        return f"np.array({recipe[1]:#x}, np.uint64)"
    return repr(recipe)


HUGE = [1 << 64, (1 << 64) + P, 1 << 100, 1 << 1000]
NEG = [-1, -P, -(1 << 63), -(1 << 64), -(1 << 100)]


def hostile() -> st.SearchStrategy[tuple[Any, ...]]:
    """Values that are not a valid u64 argument, or are valid in an unusual type."""
    return st.one_of(
        st.sampled_from(NEG + HUGE).map(lambda v: ("int", v)),
        st.booleans().map(lambda b: ("bool", b)),
        st.sampled_from([0.0, 4096.0, 0.5, math.nan, math.inf, -math.inf, 1e300]).map(lambda v: ("float", v)),
        st.tuples(st.just("np"), st.sampled_from(INT_DTYPES), st.sampled_from([0, 1, P, -1, 255])),
        st.tuples(st.just("np"), st.sampled_from(OTHER_DTYPES), st.sampled_from([0, 1, P])),
        st.sampled_from(sorted(FLAGS)).map(lambda n: ("flag", n)),
        st.sampled_from([0, 1, P, -1, -P, 1 << 64, 1 << 70]).map(lambda v: ("index", v)),
        st.sampled_from(["4096", "", "0x1000", "nan"]).map(lambda s: ("str", s)),
        st.just(("none",)),
        st.just(("bytes", b"\0" * 8)),
        st.sampled_from([0, P]).map(lambda v: ("frac", v)),
    )


def intlike(values: st.SearchStrategy[int], *, hostile_weight: int = 1, plain_weight: int = 4) -> st.SearchStrategy[tuple[Any, ...]]:
    """Mostly valid ints from ``values`` (plain or in another integer type), sometimes hostile."""
    plain = values.map(lambda v: ("int", v))
    dressed = st.tuples(st.sampled_from(["np", "index"]), values).map(
        lambda t: ("np", "uint64" if t[1] >= 0 else "int64", t[1]) if t[0] == "np" and -(1 << 63) <= t[1] <= U64
        else ("index", t[1])
    )
    return st.one_of(*([plain] * plain_weight), dressed, *([hostile()] * hostile_weight))


# -- the log and the call checker ---------------------------------------------------------


class Ctx:
    """One worker's state: the log fd, the call counter, findings."""

    def __init__(self, family: str, log_fd: int) -> None:
        self.family = family
        self.log_fd = log_fd
        self.calls = 0
        self.findings = 0
        self.current = ""

    def log(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, default=repr) + "\n").encode()
        os.write(self.log_fd, data)

    def begin(self, desc: str) -> None:
        """Record the call about to be made (the reproducer if the worker dies in it)."""
        self.calls += 1
        self.current = desc
        self.log({"c": desc[:2000]})

    def note(self, text: str) -> None:
        """Record a step of the example that is not a call (part of the reproducer)."""
        self.log({"n": text[:500]})

    def finding(self, kind: str, detail: str = "", exc: BaseException | None = None, **extra: Any) -> None:
        self.findings += 1
        rec: dict[str, Any] = {"family": self.family, "kind": kind, "call": self.current[:2000], "detail": detail[:1000]}
        if exc is not None:
            rec["exc_type"] = type(exc).__name__
            rec["errno"] = getattr(exc, "errno", None)
            rec["message"] = str(exc)[:500]
        rec.update(extra)
        self.log({"f": rec})

    def call(
        self,
        desc: str,
        fn: Callable[[], Any],
        *,
        valid: bool | None = True,
        arg: str | tuple[str, ...] | None = None,
        allowed: tuple[type[BaseException], ...] = DOCUMENTED,
        watchdog: bool = True,
    ) -> tuple[bool, Any]:
        """Run ``fn()`` as the call ``desc``; returns ``(True, result)`` or ``(False, exc)``.

        ``valid``: True (arguments are acceptable: only OSError may come back), False
        (bad Python arguments: TypeError/ValueError naming ``arg`` expected), None
        (either). Any exception outside ``allowed``, an OSError without errno, a result
        for bad arguments, or a slow call is recorded as a finding.
        """
        self.begin(desc)
        t0 = time.monotonic()
        global _watchdog
        if watchdog:
            if _watchdog is None:
                _watchdog = Watchdog()
            _watchdog.arm(HANG_SECONDS)
        try:
            try:
                result = fn()
            finally:
                if watchdog and _watchdog is not None:
                    _watchdog.disarm()
        except CallTimeout:
            self.finding("hang", f"still running after {HANG_SECONDS} s (interrupted by the watchdog)")
            return False, TimeoutError(f"hang: interrupted after {HANG_SECONDS} s")
        except BaseException as exc:  # noqa: BLE001 - everything is classified
            dt = time.monotonic() - t0
            if dt > SLOW_SECONDS:
                self.finding("slow", f"{dt:.1f} s", exc)
            if not isinstance(exc, allowed) or isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.finding("wrong-exception", "exception type outside the documented ones", exc)
            elif isinstance(exc, OSError) and not isinstance(exc.errno, int):
                self.finding("wrong-exception", "OSError without an errno", exc)
            elif valid is False and not isinstance(exc, (TypeError, ValueError)):
                self.finding("wrong-exception", "bad Python argument not refused with TypeError/ValueError", exc)
            elif valid is True and isinstance(exc, (TypeError, ValueError)) and not isinstance(exc, OSError):
                if not _is_checkpoint_error(exc):
                    self.finding("refused-valid", "valid arguments refused", exc)
            elif valid is False and arg and isinstance(exc, (TypeError, ValueError)) and not _names(exc, arg):
                self.finding("unnamed-argument", f"message does not name {arg!r}", exc)
            return False, exc
        dt = time.monotonic() - t0
        if dt > SLOW_SECONDS:
            self.finding("slow", f"{dt:.1f} s")
        if valid is False:
            self.finding("accepted-invalid", f"bad argument {arg or ''} accepted; returned {_short(result)}")
        return True, result


def _names(exc: BaseException, arg: str | tuple[str, ...]) -> bool:
    text = str(exc)
    return any(a in text for a in ((arg,) if isinstance(arg, str) else arg))


def _is_checkpoint_error(exc: BaseException) -> bool:
    return type(exc).__name__ in ("CheckpointError", "CorruptCheckpointError")


def _short(obj: Any) -> str:
    try:
        r = repr(obj)
    except Exception as exc:  # noqa: BLE001 - an object a bad argument broke
        return f"<{type(obj).__name__} whose repr raised {type(exc).__name__}: {exc}>"
    return r if len(r) < 200 else r[:200] + "..."


def errno_of(outcome: tuple[bool, Any]) -> int | str:
    """0 for a result, the errno for an OSError, the type name otherwise."""
    ok, v = outcome
    if ok:
        return 0
    if isinstance(v, OSError) and v.errno is not None:
        return int(v.errno)
    return type(v).__name__


# -- memory the fuzzer owns ----------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 1, 2, 0x10, 0x20
MADV_DONTNEED = 4


def mmap_anon(npages: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
              addr: int = 0) -> int:
    a = libc.mmap(addr or None, npages * P, prot, flags, -1, 0)
    if a in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(a)


def munmap(addr: int, npages: int) -> None:
    libc.munmap(addr, npages * P)


class Arena:
    """``npages`` pages laid out once and never changed: PROT_NONE guards at both ends,
    written, read (zero page), untouched, read-only and zapped runs, so scan answers over
    it are stable for the whole batch."""

    def __init__(self, npages: int = 64, seed: int = 0) -> None:
        self.npages = npages
        self.addr = mmap_anon(npages)
        self.end = self.addr + npages * P
        rng = np.random.default_rng(seed)
        kinds = rng.integers(0, 4, npages)
        for i in range(4, npages - 4):
            if kinds[i] == 1:
                ctypes.memset(self.addr + i * P, 0x5A, 1)
            elif kinds[i] == 2:
                ctypes.string_at(self.addr + i * P, 1)
        libc.mprotect(self.addr + 20 * P, 4 * P, PROT_READ)
        libc.madvise(self.addr + 30 * P, 2 * P, MADV_DONTNEED)
        libc.mprotect(self.addr, 4 * P, PROT_NONE)
        libc.mprotect(self.end - 4 * P, 4 * P, PROT_NONE)

    def contains(self, a: int, b: int) -> bool:
        return self.addr <= a <= self.end and self.addr <= b <= self.end

    def addresses(self) -> st.SearchStrategy[int]:
        """Addresses in and around the arena, mostly page aligned; and a few wild ones."""
        inside = st.tuples(st.integers(0, self.npages), st.sampled_from([0, 0, 0, 0, 1, P - 1])).map(
            lambda t: self.addr + t[0] * P + t[1]
        )
        wild = st.sampled_from([0, P, (1 << 47) - P, 1 << 47, (1 << 47) + P, 1 << 56, U64 - P + 1, U64])
        return st.one_of(inside, inside, inside, wild)
