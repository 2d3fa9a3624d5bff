"""Regression tests for issue 9 (memory safety and hostile input), items 1-8 and 11.

One focused test per defect, written against the behaviour the issue demands. Tests that
could corrupt the heap of the test runner while the defect exists run the call on memory
the test owns (a canary-filled buffer) or in a forked child. Items 9 and 10 (checkpoint
files) are covered with the snapshot tests; the fuzz suite (``tests/fuzz``) covers all.
"""

from __future__ import annotations

import faulthandler
import math
import os
import resource
import signal
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pagescan
from pagescan import PAGE_REGION_DTYPE, Category, RegisterMode, UffdFeature, Userfaultfd, WriteWatch, scan

from .conftest import requires_pagemap_scan, requires_wp_async
from .fuzz.core import exiting_child
from .memory import P, anon, vmflags
from .procs import run_in_child
from .test_kernel_quirks import raw_scan

pytestmark = [requires_pagemap_scan]

ALL = int(pagescan.capabilities().categories)
#: The highest address of user space (x86-64, 4-level page tables): TASK_SIZE.
TASK_SIZE = (1 << 47) - P


class OnlyIndex:
    """An integer-like object with ``__index__`` only."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __index__(self) -> int:
        return self.v


def fixed(item: int) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"issue 9 item {item}: fixed on main")


def uffd_registered(addr: int) -> bool:
    return bool({"uw", "um", "ui"} & set(vmflags(addr)))


# -- item 1: scan(out=...) is validated for what the kernel will write -------------------------


@pytest.mark.parametrize("shape", [(4, 0), (16, 0), (2, 3)])
def test_item1_scan_out_multidimensional_refused_before_syscall(shape: tuple[int, int]) -> None:
    # The array is a view into a canary-filled buffer the test owns: while the defect
    # exists the kernel writes into the canary, not into the interpreter's heap.
    big = np.full(1 << 16, 0xAB, np.uint8)
    out = np.ndarray(shape, PAGE_REGION_DTYPE, buffer=big, offset=4096)
    with anon(32) as m:
        for i in range(0, 32, 2):
            m.write(i)
        with pytest.raises(ValueError, match="out"):
            scan(m.addr, m.end, return_mask=ALL, out=out)
    assert (big == 0xAB).all(), "scan() wrote outside out's own bytes"


# -- item 2: scan() is reentrant -----------------------------------------------------------------


def test_an_out_subclass_cannot_widen_or_unlock_what_the_kernel_writes() -> None:
    """An ndarray subclass passed as ``out`` is judged by its plain-array view: a
    ``__len__`` that claims a million slots gets the kernel one (no heap overrun: this
    aborted the interpreter), a ``flags`` that claims a read-only view of ``bytes`` is
    writable is refused (the immutable object stayed unchanged). Run in a child: a
    regression would abort it, not the test run."""

    def attempt() -> tuple[int, int, bool, str]:
        class Long(np.ndarray):
            def __len__(self) -> int:
                return 1 << 20

        class FakeFlags:
            writeable = c_contiguous = True

        class Unlocked(np.ndarray):
            @property
            def flags(self) -> Any:  # type: ignore[override]
                return FakeFlags()

        m = anon(4096)
        for i in range(0, 4096, 2):
            m.write(i, 1)
        kw: dict[str, Any] = dict(category_mask=Category.PRESENT, return_mask=Category.PRESENT)
        slots = np.zeros(3, PAGE_REGION_DTYPE)
        out = slots[1:2].view(Long)  # one slot, between two sentinels
        res = scan(m.addr, m.end, out=out, **kw)
        n, _ = pagescan.Scanner(**kw).scan_into(m.addr, m.end, out)
        data = bytes(48)
        locked = np.frombuffer(data, PAGE_REGION_DTYPE).view(Unlocked)
        try:
            pagescan.Scanner(**kw).scan_into(m.addr, m.end, locked)
            refused = False
        except ValueError:
            refused = True
        m.close()
        return len(np.asarray(res.regions)), n, refused and data == bytes(48), slots[[0, 2]].tobytes().hex()

    reported, n, refused, sentinels = run_in_child(attempt)
    assert (reported, n, refused) == (1, 1, True)
    assert sentinels == "00" * 48


@pytest.mark.parametrize("primed", [True, False], ids=["cached-fd", "first-call-after-fork"])
def test_item2_scan_reentrant_from_signal_handler(primed: bool) -> None:
    """A 100 us timer whose handler scans one range while the main code scans another,
    for 0.5 s, in a forked child (a corrupted heap kills the child, not the runner);
    every result equals the raw ioctl's. ``first-call-after-fork``: the child's first
    scan() opens its own pagemap while the timer runs (a handler interrupting that
    must not deadlock on the lock guarding the cached fd)."""

    def child() -> tuple[int, int, int]:
        faulthandler.disable()  # a fatal error report of a corrupted heap is not the test's output
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        if primed:
            scan(0, 0)
        with anon(48) as m:
            for i in range(0, 48, 3):
                m.write(i)
            m.read(1)
            a, b = (m.addr, m[40]), (m[8], m.end)
            ra, rb = raw_scan(*a, vec_len=40, ret=ALL), raw_scan(*b, vec_len=40, ret=ALL)
            assert ra.vec is not None and rb.vec is not None
            want_a, want_b = ra.vec.tolist(), rb.vec.tolist()
            wrong, inner, outer = [0], [0], 0

            def handler(signum: int, frame: Any) -> None:
                inner[0] += 1
                if scan(*b, return_mask=ALL).regions.tolist() != want_b:
                    wrong[0] += 1

            signal.signal(signal.SIGALRM, handler)
            signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
            try:
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    if scan(*a, return_mask=ALL).regions.tolist() != want_a:
                        wrong[0] += 1
                    outer += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
            return wrong[0], inner[0], outer

    wrong, inner, outer = run_in_child(child, timeout=30)
    assert inner > 10 and outer > 10
    assert wrong == 0, f"{wrong} wrong results in {inner + outer} calls"


# -- item 3: an IntFlag mask does not switch off range checks --------------------------------------


@pytest.mark.parametrize("backend", ["kernel", "emulated"])
@pytest.mark.parametrize("arg", ["start", "end", "max_pages"])
def test_item3_intflag_mask_keeps_range_checks(arg: str, backend: str) -> None:
    with anon(4) as m:
        kw: dict[str, Any] = {"start": m.addr, "end": m.end, "max_pages": 0}
        kw[arg] = -P
        with pytest.raises(ValueError, match=arg):
            scan(kw.pop("start"), kw.pop("end"), category_mask=Category.PRESENT, return_mask=Category.PRESENT,
                 backend=backend, **kw)


# -- item 4: a large vec_len costs nothing ---------------------------------------------------------


def test_item4_large_vec_len_costs_nothing() -> None:
    """``vec_len=2**40`` over all of user space: the same answer as the default, and no
    allocation beyond what the regions found need (address space capped in the child)."""

    def child() -> tuple[bool, int]:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        tracemalloc.start()
        big = scan(0, TASK_SIZE, return_mask=Category.PRESENT, vec_len=1 << 40)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return big.complete, peak

    complete, peak = run_in_child(child)
    assert complete
    assert peak < 64 << 20, f"scan() allocated {peak >> 20} MiB for a large vec_len"


# -- item 5: a process exiting mid-call gives ProcessLookupError on every backend ---------------------


def test_item5_emulated_process_exiting_mid_call() -> None:
    errors: list[str] = []
    deadline = time.monotonic() + 10
    for trial in range(40):
        if time.monotonic() > deadline:
            break
        pid = exiting_child(0.0005 * (trial % 8))  # exits while we scan it
        try:
            for _ in range(200):
                try:
                    scan(0, TASK_SIZE, pid=pid, return_mask=ALL, backend="emulated")
                except ProcessLookupError:
                    break
                except OSError as err:
                    errors.append(f"trial {trial}: {err!r}")
                    break
        finally:
            os.waitpid(pid, 0)
    assert not errors, f"{len(errors)} trials ended in another error than ProcessLookupError: {errors[:3]}"


# -- item 6: an integer-like start without an end is refused -----------------------------------------


@pytest.mark.parametrize("make", [np.uint64, np.int64, lambda a: np.array(a, np.uint64)], ids=["uint64", "int64", "0-d"])
@pytest.mark.parametrize("call", ["scan", "scan_iter", "WriteWatch"])
def test_item6_numpy_integer_is_not_a_buffer(call: str, make: Any) -> None:
    with anon(2) as m:
        obj = make(m.addr)
        with pytest.raises(TypeError):
            if call == "scan":
                scan(obj)
            elif call == "scan_iter":
                list(pagescan.scan_iter(obj))
            else:
                WriteWatch(obj).close()


# -- item 7: WriteWatch.get(max_pages=n) after a page was replaced ----------------------------------


@requires_wp_async

@pytest.mark.parametrize("method", ["get", "regions"])
def test_item7_writewatch_max_pages_after_replaced_page(method: str) -> None:
    from pagescan._uapi import libc
    from pagescan._uapi.mman import MAP, PROT

    with anon(16) as m, WriteWatch(m.addr, m.length) as ww:
        m.touch(0, 3)
        libc.mmap(m[6], P, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)
        m.touch(6)
        with pytest.raises(PermissionError):
            getattr(ww, method)(max_pages=1)


# -- item 8: register/unregister validate before the syscall ------------------------------------------


@requires_wp_async

def test_item8_register_index_only_objects() -> None:
    """An ``__index__``-only start/length is either taken as an int (and the range is
    registered, and unregistered again, consistently) or refused before the syscall."""
    with anon(4) as m, Userfaultfd(UffdFeature.WP_ASYNC) as uf:
        try:
            uf.register(OnlyIndex(m.addr), OnlyIndex(m.length), RegisterMode.WP)  # type: ignore[arg-type]
        except TypeError:
            assert not uffd_registered(m.addr), "register() raised TypeError but left the range registered"
        else:
            assert uffd_registered(m.addr)
        uf.register(m.addr, m.length, RegisterMode.WP) if not uffd_registered(m.addr) else None
        try:
            uf.unregister(OnlyIndex(m.addr), OnlyIndex(m.length))  # type: ignore[arg-type]
        except TypeError:
            assert uffd_registered(m.addr), "unregister() raised TypeError after unregistering the range"
            uf.unregister(m.addr, m.length)
        assert not uffd_registered(m.addr)
        with Userfaultfd(UffdFeature.WP_ASYNC) as other:
            other.register(m.addr, m.length, RegisterMode.WP)  # no EBUSY: nothing left behind


# -- item 11: documented exception types, naming the argument -------------------------------------------


@pytest.fixture
def uffd() -> Any:
    with Userfaultfd(0) as uf:
        yield uf


@pytest.mark.parametrize("timeout", [math.inf, 1e300, math.nan], ids=["inf", "1e300", "nan"])
def test_item11_read_events_bad_timeout(uffd: Userfaultfd, timeout: float) -> None:
    with pytest.raises((ValueError, TypeError), match="timeout"):
        uffd.read_events(timeout=timeout)


@pytest.mark.parametrize("max_events", [0, -1])
def test_item11_read_events_bad_max_events_without_pending_event(uffd: Userfaultfd, max_events: int) -> None:
    with pytest.raises(ValueError, match="max_events"):
        uffd.read_events(timeout=0, max_events=max_events)


@pytest.mark.parametrize("call", ["scan", "buffer_range", "WriteWatch"])
def test_item11_non_contiguous_memoryview(call: str) -> None:
    mv = memoryview(bytearray(4 * P))[::2]
    fn: Any = {"scan": scan, "buffer_range": pagescan.buffer_range, "WriteWatch": WriteWatch}[call]
    with pytest.raises(ValueError, match="contiguous"):
        fn(mv)


@pytest.mark.parametrize("out", [[], bytearray(96), 4], ids=["list", "bytearray", "int"])
def test_item11_out_not_an_array(out: Any) -> None:
    with anon(2) as m, pytest.raises(TypeError, match="out"):
        scan(m.addr, m.end, out=out)


@requires_wp_async

def test_item11_restore_bad_pid(tmp_path: Path) -> None:
    from pagescan.snapshot import Checkpointer, restore

    with anon(2) as m:
        m.write(0)
        path = tmp_path / "c.ckpt"
        with Checkpointer(path, [(m.addr, m.length)]) as ck:
            ck.checkpoint()
        with pytest.raises(TypeError, match="pid"):
            restore(path, [(m.addr, m.length)], pid="x")  # type: ignore[arg-type]
