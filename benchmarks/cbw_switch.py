"""What copy-before-write under synchronous uffd write-protect would cost in the pause.

    python benchmarks/cbw_switch.py                     # 1 GiB, 10% written, 5 rounds
    python benchmarks/cbw_switch.py --size 4G --repeat 3 --json out.json

Issue 13 asks whether a background checkpoint can take its instant the QEMU
background-snapshot way: inside a short stop of every thread, switch the tracked
ranges from the asynchronous uffd write-protect of the write tracking
(:class:`pagescan.WriteWatch`) to a synchronous registration that a helper process
serves (it copies each page about to be written, then un-protects it). ``WP_ASYNC`` is
a property of the whole uffd and a VMA belongs to one uffd, so the switch is an
``UFFDIO_UNREGISTER`` of the async uffd (the kernel clears the uffd-wp bit of every
page of the range), an ``UFFDIO_REGISTER`` with a second uffd, and an
``UFFDIO_WRITEPROTECT`` of the whole range (it sets the bit again on every page); and
the reverse when the copy is done. Each step below is timed on ``--size`` bytes of
touched ``pagescan.zeros`` with ``--written`` of the pages written (random), against
a ``fork()`` of this process (the frozen-twin path's pause):

* ``get``: ``PAGEMAP_SCAN`` of the written pages (no re-arm); ``get, nothing
  written``: the same walk with no page written (the floor of any page-table walk);
* ``unregister async``, ``register sync``, ``writeprotect all``: the switch;
* ``writeprotect per run``: one ``UFFDIO_WRITEPROTECT`` per run of written pages (a
  design that would protect only the written set, had the range been registered
  synchronously already);
* ``unregister sync``, ``register async``, ``arm all``: the switch back;
* ``fork()``: ``os.fork()`` in the parent (the child exits at once);
* ``first write, sync WP``: per page, a first write to a protected page served by a
  helper process that reads the page (``process_vm_readv``) and un-protects it; and
  ``first write, async WP`` for comparison (the tracking's usual cost).

Then the other way to take an instant without a walk: move the page tables aside
(``--size`` bytes more of touched ``pagescan.zeros``, registered ``MISSING|WP`` on a
``WP_ASYNC|EVENT_REMAP`` uffd, armed, ``--written`` of it written):

* ``move aside``: ``mremap(MREMAP_DONTUNMAP)`` of the whole range to a reserved
  address S, while a thread of this process reads the uffd (with ``EVENT_REMAP`` the
  call returns only once its ``REMAP`` event is read). It moves page tables, not
  entries, so it costs a few µs per 2 MiB; the range stays mapped, empty, registered;
  S keeps the registration and every uffd-wp bit;
* ``written set, read from S``: the walk that finds the written pages, now after the
  instant (checked: exactly the pages written);
* ``move back``: ``mremap`` of S over the emptied range (the registration and bits go
  with it);
* ``first access, moved aside``: per page, a first write to the emptied range served
  by a helper process that reads the page from S (``process_vm_readv``) and installs
  a copy with ``UFFDIO_COPY`` mode ``WP`` (armed as it lands, so the tracking goes on
  exactly), the cost every first access would pay until the pages are back.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import sys
import threading
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PAGE, fmt_ns, fmt_size, machine, print_table, size_arg, write_json  # noqa: E402

import pagescan  # noqa: E402
from pagescan import WriteWatch  # noqa: E402
from pagescan._child import fork  # noqa: E402
from pagescan._uapi import libc  # noqa: E402
from pagescan._uapi.mman import MADV  # noqa: E402
from pagescan._uapi.userfaultfd import RegisterMode, UffdFeature  # noqa: E402
from pagescan.userfaultfd import PagefaultEvent, RemapEvent, Userfaultfd  # noqa: E402

#: Pages timed for the per-fault cost.
FAULT_PAGES = 2000


def _timed(samples: dict[str, list[float]], name: str, fn: Any, *args: Any) -> Any:
    t = time.perf_counter()
    out = fn(*args)
    samples.setdefault(name, []).append(time.perf_counter() - t)
    return out


def _serve(uf: Userfaultfd, parent: int, n: int) -> int:  # pragma: no cover - runs in the child
    """Serve ``n`` write faults: read the page from the parent, then un-protect it."""
    buf = bytearray(PAGE)
    done = 0
    p = select.poll()
    p.register(uf.fd, select.POLLIN)
    while done < n:
        if not p.poll(5000):
            return 2
        for ev in uf.read_events():
            if isinstance(ev, PagefaultEvent):
                page = ev.address // PAGE * PAGE
                libc.vm_read(parent, page, buf)
                uf.writeprotect(page, PAGE, enable=False)
                done += 1
    return 0


def fault_costs(npages: int) -> tuple[float, float]:
    """Median seconds of a first write to a page: under sync WP served by a helper
    process, and under async WP (resolved by the kernel)."""
    a = pagescan.zeros(npages * PAGE // 8, np.int64)
    a[::PAGE // 8] = 1
    lo, n = a.ctypes.data, a.nbytes
    libc.madvise(lo, n, MADV.DONTFORK)  # the helper needs no copy of it (no copy-on-write)
    per = PAGE // 8
    clock = time.perf_counter_ns
    uf = Userfaultfd(UffdFeature.WP_UNPOPULATED)
    try:
        uf.register(lo, n, RegisterMode.WP)
        uf.writeprotect(lo, n)
        child = fork(lambda: _serve(uf, os.getppid(), npages))
        sync = np.empty(npages, np.int64)
        for i in range(npages):
            t = clock()
            a[i * per] = 2
            sync[i] = clock() - t
        status = child.wait(10.0)
        if status is None:
            child.kill()
            child.wait()
        uf.unregister(lo, n)
    finally:
        uf.close()
    ww = WriteWatch(lo, n)
    try:
        asy = np.empty(npages, np.int64)
        for i in range(npages):
            t = clock()
            a[i * per] = 3
            asy[i] = clock() - t
    finally:
        ww.close()
    return float(np.median(sync)) * 1e-9, float(np.median(asy)) * 1e-9


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
_MAP_PRIVATE_ANON, _MAP_FIXED_NOREPLACE = 0x22, 0x100000
_PMD = 2 << 20


def _reserve(n: int, at: int | None = None) -> int:
    """``n`` bytes of PROT_NONE address space, 2 MiB aligned (or exactly at ``at``)."""
    if at is not None:
        got = _libc.mmap(at, n, 0, _MAP_PRIVATE_ANON | _MAP_FIXED_NOREPLACE, -1, 0)
        if got != at:
            raise OSError(ctypes.get_errno(), "mmap at the reserved address")
        return at
    got = _libc.mmap(None, n + _PMD, 0, _MAP_PRIVATE_ANON, -1, 0)
    if got in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    raw = int(got)
    lo = (raw + _PMD - 1) & ~(_PMD - 1)
    if lo > raw:
        _libc.munmap(raw, lo - raw)
    _libc.munmap(lo + n, raw + n + _PMD - lo - n)
    return lo


def _mremap(src: int, n: int, dst: int, dontunmap: bool) -> None:
    flags = MREMAP_MAYMOVE | MREMAP_FIXED | (MREMAP_DONTUNMAP if dontunmap else 0)
    if _libc.mremap(src, n, n, flags, dst) != dst:
        raise OSError(ctypes.get_errno(), "mremap")


class _RemapReader:
    """A thread that reads the uffd's events (``EVENT_REMAP`` makes mremap wait for it)."""

    def __init__(self, uf: Userfaultfd) -> None:
        self.uf, self.stop, self.remaps = uf, threading.Event(), 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        p = select.poll()
        p.register(self.uf.fd, select.POLLIN)
        while not self.stop.is_set():
            if p.poll(50):
                self.remaps += sum(isinstance(ev, RemapEvent) for ev in self.uf.read_events())

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def move_aside(nbytes: int, written: float, repeat: int, s: dict[str, list[float]]) -> None:
    """Time ``move aside``, ``written set, read from S`` and ``move back`` (module doc)."""
    a = pagescan.zeros(nbytes // 8, np.int64)
    a[::PAGE // 8] = 1
    lo, n = a.ctypes.data, a.nbytes
    npages, per = n // PAGE, PAGE // 8
    rng = np.random.default_rng(2)
    w = int(pagescan.Category.WRITTEN)

    def scan_written(start: int, end: int) -> np.ndarray:
        parts = [r.regions for r in pagescan.scan_iter(start, end, category_mask=w, return_mask=w)]
        return pagescan.regions_to_pages(np.concatenate(parts))
    uf = Userfaultfd(UffdFeature.WP_ASYNC | UffdFeature.EVENT_REMAP)
    reader = None
    hole = _reserve(n)
    try:
        uf.register(lo, n, RegisterMode.MISSING | RegisterMode.WP)
        reader = _RemapReader(uf)
        for _ in range(repeat + 1):
            uf.writeprotect(lo, n)
            pages = rng.choice(npages, int(npages * written), replace=False)
            a[pages * per] += 1
            _timed(s, "move aside", _mremap, lo, n, hole, True)
            found = _timed(s, "written set, read from S", scan_written, hole, hole + n)
            got = (found - np.uint64(hole)) // np.uint64(PAGE)
            if not np.array_equal(got, np.sort(pages).astype(np.uint64)):
                raise AssertionError("the written set read from S is not the pages written")
            _timed(s, "move back", _mremap, hole, n, lo, False)
            _reserve(n, hole)
        for name in ("move aside", "written set, read from S", "move back"):
            del s[name][0]
    finally:
        if reader is not None:
            reader.close()
        uf.close()
        _libc.munmap(hole, n)


def _serve_missing(uf: Userfaultfd, parent: int, lo: int, n: int) -> int:  # pragma: no cover - child
    """Serve the ``n // PAGE`` first accesses to ``[lo, lo + n)`` moved aside: read the
    page from where ``REMAP`` says it went, install a copy armed (``UFFDIO_COPY`` WP)."""
    buf = bytearray(PAGE)
    done, to = 0, None
    p = select.poll()
    p.register(uf.fd, select.POLLIN)
    while done < n // PAGE:
        if not p.poll(5000):
            return 2
        for ev in uf.read_events():
            if isinstance(ev, RemapEvent):
                to = ev.to
            elif isinstance(ev, PagefaultEvent) and to is not None:
                page = ev.address // PAGE * PAGE
                libc.vm_read(parent, to + page - lo, buf)
                uf.copy_from(page, buf, wp=True)
                done += 1
    return 0


def moved_fault_cost(npages: int) -> float:
    """Median seconds of a first write to a page of a range moved aside (module doc)."""
    a = pagescan.zeros(npages * PAGE // 8, np.int64)
    a[::PAGE // 8] = np.arange(npages)
    lo, n = a.ctypes.data, a.nbytes
    libc.madvise(lo, n, MADV.DONTFORK)  # the helper needs no copy of it
    per = PAGE // 8
    clock = time.perf_counter_ns
    uf = Userfaultfd(UffdFeature.WP_ASYNC | UffdFeature.EVENT_REMAP)
    hole = _reserve(n)
    try:
        uf.register(lo, n, RegisterMode.MISSING | RegisterMode.WP)
        uf.writeprotect(lo, n)
        child = fork(lambda: _serve_missing(uf, os.getppid(), lo, n))
        _mremap(lo, n, hole, True)  # returns once the helper has read the REMAP event
        times = np.empty(npages, np.int64)
        for i in range(npages):
            t = clock()
            a[i * per] += 1
            times[i] = clock() - t
        status = child.wait(10.0)
        if status is None:
            child.kill()
            child.wait()
        if not np.array_equal(a[::per], np.arange(npages) + 1):
            raise AssertionError("a page served from S came back wrong")
    finally:
        uf.close()
        _libc.munmap(hole, n)
    return float(np.median(times)) * 1e-9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=size_arg(64 * PAGE), default=1 << 30, help="state size (default 1G)")
    ap.add_argument("--written", type=float, default=0.10, help="fraction of the pages written (default 0.10)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON to this file")
    args = ap.parse_args(argv)

    a = pagescan.zeros(args.size // 8, np.int64)
    a[::PAGE // 8] = 1  # every page populated
    lo, n = a.ctypes.data, a.nbytes
    npages = n // PAGE
    per = PAGE // 8
    rng = np.random.default_rng(1)
    ww = WriteWatch(lo, n)
    aw = ww._uffd
    assert aw is not None
    sync = Userfaultfd(UffdFeature.WP_UNPOPULATED)
    s: dict[str, list[float]] = {}
    written = 0
    try:
        for _ in range(args.repeat + 1):  # the first round warms up (dropped)
            _timed(s, "get, nothing written", ww.get)
            pages = rng.choice(npages, int(npages * args.written), replace=False)
            a[pages * per] += 1
            found = _timed(s, "get", ww.get)
            written = len(found)
            runs = np.stack([found[np.concatenate([[True], np.diff(found) != PAGE])],
                             found[np.concatenate([np.diff(found) != PAGE, [True]])] + PAGE], axis=1)
            t = time.perf_counter()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                os._exit(0)
            s.setdefault("fork()", []).append(time.perf_counter() - t)
            os.waitpid(pid, 0)
            _timed(s, "unregister async", aw.unregister, lo, n)
            _timed(s, "register sync", sync.register, lo, n, RegisterMode.WP)
            _timed(s, "writeprotect all", sync.writeprotect, lo, n)
            sync.writeprotect(lo, n, enable=False)
            t = time.perf_counter()
            for r0, r1 in runs.tolist():
                sync.writeprotect(r0, r1 - r0)
            s.setdefault("writeprotect per run", []).append(time.perf_counter() - t)
            _timed(s, "unregister sync", sync.unregister, lo, n)
            _timed(s, "register async", aw.register, lo, n, RegisterMode.WP)
            _timed(s, "arm all", aw.writeprotect, lo, n)
        for v in s.values():
            del v[0]
        fsync, fasync = fault_costs(min(FAULT_PAGES, npages))
    finally:
        sync.close()
        ww.close()
    move_aside(n, args.written, args.repeat, s)
    fmoved = moved_fault_cost(min(FAULT_PAGES, npages))

    def med(name: str) -> float:
        return float(np.median(s[name]))

    switch = med("get") + med("unregister async") + med("register sync") + med("writeprotect all")
    back = med("unregister sync") + med("register async") + med("arm all")
    print(f"{fmt_size(n)} ({npages} pages), {written} written ({args.written:.0%}) in {len(runs)} runs, "
          f"{args.repeat} rounds (median, min-max)")
    rows = []
    for name, xs in s.items():
        rows.append([name, fmt_ns(med(name) * 1e9), f"{fmt_ns(min(xs) * 1e9)}-{fmt_ns(max(xs) * 1e9)}",
                     f"{med(name) / npages * 1e9:.1f} ns"])
    rows.append(["= switch in (get..writeprotect all)", fmt_ns(switch * 1e9), "", f"{switch / npages * 1e9:.1f} ns"])
    rows.append(["= switch back", fmt_ns(back * 1e9), "", f"{back / npages * 1e9:.1f} ns"])
    print_table(["step", "median", "spread", "per page of the range"], rows)
    print(f"first write to a page: sync WP served by a helper process {fmt_ns(fsync * 1e9)}, "
          f"async WP {fmt_ns(fasync * 1e9)}, moved aside and served by a helper process "
          f"{fmt_ns(fmoved * 1e9)} (median of {min(FAULT_PAGES, npages)})")
    if args.json:
        write_json(args.json, {"machine": machine(), "size": n, "written": written, "runs": len(runs),
                               "repeat": args.repeat, "samples": s, "switch": switch, "back": back,
                               "fault_sync": fsync, "fault_async": fasync, "fault_moved": fmoved})
    return 0


if __name__ == "__main__":
    sys.exit(main())
