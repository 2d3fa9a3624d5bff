#!/usr/bin/env python3
"""How fast is the emulated PAGEMAP_SCAN, and is its memory bounded?

The emulated backend (``backend="emulated"``, for kernels without the ioctl) computes
the answer in user space from /proc/PID/pagemap, /proc/PID/smaps and, for some
categories, PFNs and /proc/kpageflags. This measures, in this process:

(1) dense: a full-category scan (``return_mask`` = every category this kernel supports,
    no masks) of ``--size`` bytes of populated private anonymous memory
    (``MADV_NOHUGEPAGE``, so 4 KiB PTEs only; ``--thp`` asks for ``MADV_HUGEPAGE`` on a
    2 MiB-aligned range instead), against
      * the floor: one bare ``os.pread`` of the same pagemap range (8 bytes per page),
      * the kernel's ``PAGEMAP_SCAN`` (``backend="kernel"``).
    Target: emulated <= 1.3x the bare pread.
(2) sparse: the same full-category scan of a ``--sparse-range`` (default 64 TiB) address
    range that holds only ``--sparse-maps`` small anonymous mappings (placed with
    ``MAP_FIXED_NOREPLACE`` in a window of user space no other mapping uses; every other
    page written), emulated against kernel. Measured twice: while the dense range of (1)
    is still mapped *outside* the scanned range, and after it is unmapped -- the
    emulation reads smaps of the whole process, so the first shows what memory elsewhere
    in the process costs it.
(3) memory: peak memory of one scan, each in a fresh subprocess, for sparse ranges of
    growing size (1 GiB, 1 TiB, ``--sparse-range``) and for the dense range: the growth
    of the resident set during the scan (``/proc/self/clear_refs`` resets the high-water
    mark, then VmHWM after the scan minus VmRSS before it) and the tracemalloc peak
    (numpy reports its buffers to tracemalloc). VmHWM is the mm's own peak;
    ``ru_maxrss`` is not usable here because exec carries the spawning process's peak
    (over 1 GiB with the dense range) into the child's ``ru_maxrss``. A per-page array
    over the whole range would be 8 bytes per page (128 GiB for 64 TiB); the
    emulation's memory must stay flat as the range grows.

Each time is the median over ``--repeat`` rounds; in each round the contenders run in a
rotating order so they share the machine's noise. Both backends' regions are compared
once before timing. ``--breakdown`` adds a profile of where the emulated dense scan's
time goes (smaps, pagemap reads, numpy categorisation, engine), taken by wrapping the
backend's internal functions in separate, untimed-for-the-table runs.

Run ``python benchmarks/emulated.py --help`` for the options; see README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any


import pagescan
from pagescan._uapi import libc
from pagescan._uapi.mman import MADV, MAP, PROT

from _common import (
    alternating_rounds,
    fmt_size,
    gc_paused,
    machine,
    median,
    positive_int,
    print_table,
    size_arg,
    timed,
    write_json,
)

PAGE = mmap.PAGESIZE
PMD = 2 << 20
GIB = 1 << 30
TIB = 1 << 40
#: Emulated / bare-pread ratio the dense scan must stay under.
DENSE_TARGET = 1.3
#: Emulated / kernel ratio for a small range above much populated memory (issue 12).
ABOVE_TARGET = 3.0
#: Emulated / kernel ratio for a huge, mostly empty reservation (issue 12).
RESERVED_TARGET = 10.0
#: The emulation's tracemalloc peak may grow by at most this much from the smallest to
#: the largest sparse range (it holds per-chunk arrays only, never per-range ones).
MEMORY_SLACK = 1 << 20


# -- helpers -------------------------------------------------------------------------


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def fmt_kib(b: float | None) -> str:
    return "-" if b is None else f"{b / 1024:,.0f}"


def all_categories() -> int:
    return int(pagescan.capabilities().categories)


def task_size() -> int:
    from pagescan._backend_emulated import task_size as ts

    return ts()


def self_vmas() -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            lo, _, hi = line.split(None, 1)[0].partition(b"-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def free_window(size: int, align: int = GIB) -> int:
    """Lowest ``align``-aligned start (>= ``align``) of ``size`` bytes no mapping touches."""
    limit = task_size()
    cur = align
    for lo, hi in sorted(self_vmas()):
        if lo >= cur + size:
            break
        if hi > cur:
            cur = -(-hi // align) * align
    if cur + size > limit:
        raise RuntimeError(f"no free {fmt_size(size)} window in user space (ends at {limit:#x})")
    return cur


def map_fixed(addr: int, length: int) -> int:
    got = libc.mmap(addr, length, PROT.READ | PROT.WRITE,
                    MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED_NOREPLACE)
    if got != addr:  # kernels before 4.17 treat FIXED_NOREPLACE as a hint
        libc.munmap(got, length)
        raise RuntimeError(f"could not map at {addr:#x} (got {got:#x})")
    return got


def regions_of(res: pagescan.ScanResult) -> list[tuple[int, int, int]]:
    return [tuple(r) for r in res.regions.tolist()]


# -- the memory --------------------------------------------------------------------------


class Dense:
    """``size`` bytes of written private anonymous memory."""

    def __init__(self, size: int, thp: bool) -> None:
        self.size = size
        self.thp = thp
        self.reserve = (0, 0)
        self.start = 0
        try:
            self._map(size, thp)
        except BaseException:
            self.close()
            raise

    def _map(self, size: int, thp: bool) -> None:
        if thp:
            # THPs need 2 MiB-aligned blocks: reserve, then map aligned inside.
            span = size + PMD
            base = libc.mmap(0, span, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE)
            self.reserve = (base, span)
            aligned = -(-base // PMD) * PMD
            self.start = libc.mmap(aligned, size, PROT.READ | PROT.WRITE,
                                   MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)
            libc.madvise(self.start, size, MADV.HUGEPAGE)
        else:
            self.start = libc.mmap(0, size, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS)
            libc.madvise(self.start, size, MADV.NOHUGEPAGE)
        self.end = self.start + size
        ctypes.memset(self.start, 1, size)

    def close(self) -> None:
        if self.reserve[1]:
            libc.munmap(*self.reserve)  # covers the mapping inside it
        elif self.start:
            libc.munmap(self.start, self.size)
        self.reserve = (0, 0)
        self.start = 0


class Sparse:
    """A ``span``-byte range with ``count`` small mappings in it, every other page written."""

    def __init__(self, span: int, count: int, map_size: int) -> None:
        if count * map_size > span:
            raise ValueError("the mappings do not fit in the range")
        self.span = span
        self.map_size = map_size
        self.start = free_window(span)
        self.end = self.start + span
        self.maps: list[int] = []
        try:
            for i in range(count):
                off = (span - map_size) * i // max(count - 1, 1)
                off -= off % PAGE
                addr = map_fixed(self.start + off, map_size)
                self.maps.append(addr)
                for p in range(0, map_size, 2 * PAGE):
                    ctypes.memset(addr + p, 1, PAGE)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for addr in self.maps:
            libc.munmap(addr, self.map_size)
        self.maps = []


# -- timing ----------------------------------------------------------------------------


def scan_fn(start: int, end: int, backend: str, rm: int) -> Callable[[], Any]:
    scan = pagescan.scan

    def run() -> Any:
        return scan(start, end, return_mask=rm, backend=backend)

    return run


def check_same(start: int, end: int, rm: int, what: str, kernel_ok: bool) -> tuple[int, int]:
    emu = pagescan.scan(start, end, return_mask=rm, backend="emulated")
    if not emu.complete:
        raise AssertionError(f"{what}: the emulated scan stopped at {emu.walk_end:#x}")
    if kernel_ok:
        ker = pagescan.scan(start, end, return_mask=rm, backend="kernel")
        if regions_of(emu) != regions_of(ker):
            raise AssertionError(f"{what}: emulated and kernel regions differ:\n"
                                 f"  emulated {regions_of(emu)[:4]}...\n  kernel   {regions_of(ker)[:4]}...")
    return emu.pages, len(emu)


def dense_round_set(d: Dense, rm: int, repeat: int, kernel_ok: bool) -> dict[str, list[int]]:
    npages = d.size // PAGE
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        off, length = d.start // PAGE * 8, npages * 8

        def bare() -> None:
            got = os.pread(fd, length, off)
            if len(got) != length:
                raise AssertionError(f"short pagemap read: {len(got)} of {length} bytes")

        contenders: dict[str, Callable[[], Any]] = {"pread": bare}
        if kernel_ok:
            contenders["kernel"] = scan_fn(d.start, d.end, "kernel", rm)
        contenders["emulated"] = scan_fn(d.start, d.end, "emulated", rm)
        samples = alternating_rounds(contenders, repeat)
        # Apart: the full-mask emulation walks the range twice (smaps too), which leaves
        # the caches cold for whatever runs next.
        other = alternating_rounds({"pread": bare, "emulated, no WPALLOWED": scan_fn(
            d.start, d.end, "emulated", rm & ~int(pagescan.Category.WPALLOWED))}, repeat)
        samples["emulated, no WPALLOWED"] = other["emulated, no WPALLOWED"]
        samples["pread (no-WPALLOWED rounds)"] = other["pread"]
        return samples
    finally:
        os.close(fd)


class Above:
    """``size`` bytes written, just above ``below`` bytes written (two VMAs, the larger
    one lower in the address space: smaps lists it first)."""

    def __init__(self, below: int, size: int) -> None:
        span = below + PMD + size
        self.base = libc.mmap(0, span, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE)
        self.span = span
        try:
            rw, anon = PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED
            low = libc.mmap(self.base, below, rw, anon)
            self.start = libc.mmap(self.base + span - size, size, rw, anon)
            self.end = self.start + size
            for addr, n in ((low, below), (self.start, size)):
                libc.madvise(addr, n, MADV.NOHUGEPAGE)
                ctypes.memset(addr, 1, n)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.span:
            libc.munmap(self.base, self.span)
            self.span = 0


class Reserved:
    """A ``size``-byte ``MAP_NORESERVE`` mapping (one VMA) with ``count`` runs of
    ``run`` bytes written, spread evenly: a huge, mostly empty reservation."""

    def __init__(self, size: int, count: int, run: int) -> None:
        self.start = libc.mmap(0, size, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE)
        self.end = self.start + size
        for i in range(count):
            off = size * (i + 1) // (count + 1)
            ctypes.memset(self.start + off - off % PMD, 1, run)

    def close(self) -> None:
        if self.start:
            libc.munmap(self.start, self.end - self.start)
            self.start = 0


def pagemap_reader(start: int, end: int) -> Callable[[], None]:
    """Read the pagemap entries of ``[start, end)`` in 512 KiB reads (the emulation's
    chunk), doing nothing with them: the least any pagemap-based emulation must pay."""
    buf = bytearray(512 << 10)
    lo, hi = start // PAGE * 8, end // PAGE * 8

    def run() -> None:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for off in range(lo, hi, len(buf)):
                os.preadv(fd, [memoryview(buf)[: min(len(buf), hi - off)]], off)
        finally:
            os.close(fd)

    return run


def smaps_reader(start: int, end: int) -> Callable[[], None]:
    """Read /proc/self/smaps as far as the records of ``[start, end)``: what knowing
    their ``VmFlags`` costs (every record below is generated first)."""
    from pagescan._procfs import read_smaps

    def run() -> None:
        read_smaps(os.getpid(), start, end, ())

    return run


def cliff_round_set(start: int, end: int, rm: int, repeat: int, floor: bool = False) -> dict[str, list[int]]:
    """The kernel's scan against the emulation's, with every category (and the smaps read
    that needs) and, in rounds of their own (the full mask's smaps walk leaves the caches
    cold), without WPALLOWED (and, with ``floor``, reading the range's pagemap alone)."""
    rm2 = rm & ~int(pagescan.Category.WPALLOWED)
    samples = alternating_rounds({"kernel": scan_fn(start, end, "kernel", rm),
                                  "emulated": scan_fn(start, end, "emulated", rm),
                                  "smaps read to the range": smaps_reader(start, end)}, repeat)
    contenders = {"kernel": scan_fn(start, end, "kernel", rm2),
                  "emulated, no WPALLOWED": scan_fn(start, end, "emulated", rm2)}
    if floor:
        contenders["pagemap read alone"] = pagemap_reader(start, end)
    other = alternating_rounds(contenders, repeat)
    if floor:
        samples["pagemap read alone"] = other["pagemap read alone"]
    samples["emulated, no WPALLOWED"] = other["emulated, no WPALLOWED"]
    samples["kernel (no-WPALLOWED rounds)"] = other["kernel"]
    return samples


def cliffs(args: argparse.Namespace, rm: int) -> dict[str, Any]:
    """(2) the cases of issue 12 where the emulation fell off a cliff."""
    out: dict[str, Any] = {}
    above = Above(args.below, args.above)
    try:
        check_same(above.start, above.end, rm, "above", True)
        with gc_paused():
            out["above"] = cliff_round_set(above.start, above.end, rm, args.cliff_repeat)
    finally:
        above.close()
    reserved = Reserved(args.reserved, 4, 64 << 10)
    try:
        check_same(reserved.start, reserved.end, rm, "reserved", True)
        with gc_paused():
            out["reserved"] = cliff_round_set(reserved.start, reserved.end, rm, args.cliff_repeat, floor=True)
    finally:
        reserved.close()
    return out


def sparse_round_set(s: Sparse, rm: int, repeat: int, kernel_ok: bool) -> dict[str, list[int]]:
    contenders: dict[str, Callable[[], Any]] = {}
    if kernel_ok:
        contenders["kernel"] = scan_fn(s.start, s.end, "kernel", rm)
    contenders["emulated"] = scan_fn(s.start, s.end, "emulated", rm)
    return alternating_rounds(contenders, repeat)


# -- where the emulated time goes ------------------------------------------------------------


class Profiler:
    """Exclusive time per wrapped function (nested wrapped calls are charged to themselves)."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.stack: list[list[int]] = []  # [start, time of wrapped children]
        self.undo: list[tuple[Any, str, Any]] = []
        self.missing: list[str] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        orig = getattr(owner, attr, None)
        if orig is None:
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        prof = self

        def wrapper(*args: Any, **kw: Any) -> Any:
            frame = [time.perf_counter_ns(), 0]
            prof.stack.append(frame)
            try:
                return orig(*args, **kw)
            finally:
                prof.stack.pop()
                inclusive = time.perf_counter_ns() - frame[0]
                prof.totals[label] = prof.totals.get(label, 0) + inclusive - frame[1]
                if prof.stack:
                    prof.stack[-1][1] += inclusive

        self.undo.append((owner, attr, owner.__dict__[attr] if attr in owner.__dict__ else orig))
        setattr(owner, attr, wrapper)

    def restore(self) -> None:
        for owner, attr, orig in reversed(self.undo):
            setattr(owner, attr, orig)
        self.undo = []


def breakdown(d: Dense, rm: int, repeat: int) -> dict[str, Any]:
    from pagescan import _backend_emulated as be
    from pagescan import _engine

    labels = {
        "smaps": "smaps: read + parse (read_smaps)",
        "entries": "pagemap reads (_Context.entries)",
        "kpageflags": "kpageflags reads (_Context.kpageflags)",
        "thp": "THP detection numpy (_thp_pmd/_thp_candidates)",
        "categories": "categorisation numpy (_Context.categories)",
        "feed": "engine (Collector.feed)",
    }
    prof = Profiler()
    prof.wrap(be, "read_smaps", labels["smaps"])
    ctx_cls = getattr(be, "_Context", None)
    if ctx_cls is not None:
        prof.wrap(ctx_cls, "entries", labels["entries"])
        prof.wrap(ctx_cls, "kpageflags", labels["kpageflags"])
        prof.wrap(ctx_cls, "_thp_pmd", labels["thp"])
        prof.wrap(ctx_cls, "_thp_candidates", labels["thp"])
        prof.wrap(ctx_cls, "categories", labels["categories"])
    else:
        prof.missing.append("_backend_emulated._Context")
    prof.wrap(_engine.Collector, "feed", labels["feed"])
    per_run: dict[str, list[int]] = {}
    raw_smaps: list[int] = []
    try:
        fn = scan_fn(d.start, d.end, "emulated", rm)
        fn()
        for _ in range(repeat):
            prof.totals = {}
            total = timed(fn)
            for label, ns in prof.totals.items():
                per_run.setdefault(label, []).append(ns)
            per_run.setdefault("other (Python glue, allocation)", []).append(total - sum(prof.totals.values()))
            per_run.setdefault("total", []).append(total)

            def read_raw() -> None:
                with open("/proc/self/smaps", "rb") as f:
                    f.read()

            raw_smaps.append(timed(read_raw))
    finally:
        prof.restore()
    rows = [{"part": k, "ms": statistics.median(v) / 1e6} for k, v in per_run.items()]
    return {"rows": rows, "smaps_raw_read_ms": statistics.median(raw_smaps) / 1e6,
            "not_instrumented": prof.missing}


# -- memory, in fresh subprocesses -----------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One memory measurement (runs in a fresh interpreter)."""
    rm, backend = spec["return_mask"], spec["backend"]
    mem: Dense | Sparse
    if spec["kind"] == "dense":
        mem = Dense(spec["size"], spec["thp"])
    else:
        mem = Sparse(spec["size"], spec["maps"], spec["map_size"])
    try:
        # Warm up on one page: lazy imports, the pagemap fd, caches. Not on the range
        # itself: a second scan could reuse memory freed by the first.
        probe = mem.maps[0] if isinstance(mem, Sparse) else mem.start
        pagescan.scan(probe, probe + PAGE, return_mask=rm, backend=backend)
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the RSS high-water mark (VmHWM) to the current RSS
            hwm_reset = True
        except OSError:
            hwm_reset = False
        rss0 = _status_kib("VmRSS") if hwm_reset else _status_kib("VmHWM")
        t0 = time.perf_counter_ns()
        res = pagescan.scan(mem.start, mem.end, return_mask=rm, backend=backend)
        ns = time.perf_counter_ns() - t0
        hwm1 = _status_kib("VmHWM")
        n_regions, complete = len(res), res.complete
        del res
        gc.collect()
        tracemalloc.start()
        pagescan.scan(mem.start, mem.end, return_mask=rm, backend=backend)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {
            "rss_growth": (hwm1 - rss0) * 1024,
            "hwm_reset": hwm_reset,
            "tracemalloc_peak": peak,
            "regions": n_regions,
            "complete": complete,
            "ms": ns / 1e6,
        }
    finally:
        mem.close()


def memory(args: argparse.Namespace, rm: int, kernel_ok: bool) -> list[dict[str, Any]]:
    ranges = sorted({GIB, TIB, args.sparse_range})
    specs = [{"kind": "sparse", "size": r, "maps": args.sparse_maps, "map_size": args.sparse_map_size}
             for r in ranges if r >= args.sparse_maps * args.sparse_map_size]
    specs.append({"kind": "dense", "size": args.size, "thp": args.thp})
    rows = []
    for spec in specs:
        for backend in (["kernel"] if kernel_ok else []) + ["emulated"]:
            full = {**spec, "backend": backend, "return_mask": rm}
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(full)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child {full} failed:\n{proc.stderr}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({**spec, "backend": backend, **out,
                         "per_page_array_bytes": spec["size"] // PAGE * 8})
    return rows


def memory_bounded(rows: list[dict[str, Any]]) -> bool | None:
    peaks = [r["tracemalloc_peak"] for r in rows if r["kind"] == "sparse" and r["backend"] == "emulated"]
    if len(peaks) < 2:
        return None
    return bool(max(peaks) - peaks[0] <= MEMORY_SLACK)


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    caps = pagescan.capabilities()
    rm = int(caps.categories)
    kernel_ok = bool(caps.pagemap_scan)
    result: dict[str, Any] = {}
    dense: Dense | None = None
    sparse: Sparse | None = None
    try:
        dense = Dense(args.size, args.thp)
        sparse = Sparse(args.sparse_range, args.sparse_maps, args.sparse_map_size)
        dense_check = check_same(dense.start, dense.end, rm, "dense", kernel_ok)
        if dense_check[0] != args.size // PAGE:
            raise AssertionError(f"dense: {dense_check[0]} pages reported, {args.size // PAGE} mapped")
        sparse_check = check_same(sparse.start, sparse.end, rm, "sparse", kernel_ok)
        sparse_start = sparse.start
        with gc_paused():  # nothing here makes reference cycles
            result["dense"] = dense_round_set(dense, rm, args.repeat, kernel_ok)
            result["sparse_with_dense"] = sparse_round_set(sparse, rm, args.repeat, kernel_ok)
            if args.breakdown:
                result["breakdown"] = breakdown(dense, rm, args.repeat)
            dense.close()
            dense = None
            result["sparse"] = sparse_round_set(sparse, rm, args.repeat, kernel_ok)
    finally:
        if dense is not None:
            dense.close()
        if sparse is not None:
            sparse.close()
    cliff = cliffs(args, rm) if kernel_ok and not args.no_cliffs else {}
    mem_rows = [] if args.no_memory else memory(args, rm, kernel_ok)

    def med_ms(key: str, name: str) -> float | None:
        m = median(result[key].get(name, []))
        return None if m is None else m / 1e6

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    pread, kern, emu, emu_nowpa = (med_ms("dense", name)
                                   for name in ("pread", "kernel", "emulated", "emulated, no WPALLOWED"))
    dense_ratio = over(emu, pread)

    def ratio_med(samples: dict[str, list[int]], name: str, base: str) -> float | None:
        """Median of the per-round ratios (each round's contenders shared its noise)."""
        if name not in samples or base not in samples:
            return None
        return statistics.median(x / b for x, b in zip(samples[name], samples[base]))

    goals = []
    dense_s = result["dense"]
    goals.append({"case": f"dense {fmt_size(args.size)} populated", "floor": "bare pread",
                  "floor_ms": pread, "goal": DENSE_TARGET,
                  "emulated_ms": emu, "ratio": ratio_med(dense_s, "emulated", "pread"),
                  "nowpa_ms": emu_nowpa,
                  "nowpa_ratio": ratio_med(dense_s, "emulated, no WPALLOWED", "pread (no-WPALLOWED rounds)")})
    for key, case, goal in (("above", f"{fmt_size(args.above)} above {fmt_size(args.below)} populated",
                             ABOVE_TARGET),
                            ("reserved", f"{fmt_size(args.reserved)} reserved, 4 x 64 KiB written", RESERVED_TARGET)):
        if key in cliff:
            c = cliff[key]
            goals.append({"case": case, "floor": "kernel", "floor_ms": median(c["kernel"]) / 1e6, "goal": goal,
                          "emulated_ms": median(c["emulated"]) / 1e6, "ratio": ratio_med(c, "emulated", "kernel"),
                          "nowpa_ms": median(c["emulated, no WPALLOWED"]) / 1e6,
                          "nowpa_ratio": ratio_med(c, "emulated, no WPALLOWED", "kernel (no-WPALLOWED rounds)"),
                          "pagemap_read_ms": (median(c["pagemap read alone"]) / 1e6
                                              if "pagemap read alone" in c else None),
                          "pagemap_read_ratio": ratio_med(c, "pagemap read alone", "kernel (no-WPALLOWED rounds)"),
                          "smaps_read_ms": median(c["smaps read to the range"]) / 1e6,
                          "smaps_read_ratio": ratio_med(c, "smaps read to the range", "kernel"),
                          "samples_ns": c})
    out: dict[str, Any] = {
        "config": {
            "size": args.size,
            "pages": args.size // PAGE,
            "thp": "MADV_HUGEPAGE, 2 MiB aligned" if args.thp else "MADV_NOHUGEPAGE (4 KiB PTEs only)",
            "repeat": args.repeat,
            "return_mask": rm,
            "sparse_range": args.sparse_range,
            "sparse_start": sparse_start,
            "sparse_maps": args.sparse_maps,
            "sparse_map_size": args.sparse_map_size,
            **machine(),
            "kernel_backend": kernel_ok,
        },
        "goals": goals,
        "dense": {
            "pread_ms": pread,
            "emulated_no_wpallowed_ms": emu_nowpa,
            "kernel_ms": kern,
            "emulated_ms": emu,
            "emulated_over_pread": dense_ratio,
            "kernel_over_pread": over(kern, pread),
            "target": DENSE_TARGET,
            "met": None if dense_ratio is None else dense_ratio <= DENSE_TARGET,
            "pages_regions": dense_check,
            "samples_ns": result["dense"],
        },
        "sparse": {
            key: {
                "kernel_ms": med_ms(key, "kernel"),
                "emulated_ms": med_ms(key, "emulated"),
                "emulated_over_kernel": over(med_ms(key, "emulated"), med_ms(key, "kernel")),
                "samples_ns": result[key],
            }
            for key in ("sparse_with_dense", "sparse")
        },
        "sparse_pages_regions": sparse_check,
        "memory": mem_rows,
        "memory_bounded": memory_bounded(mem_rows),
    }
    if "breakdown" in result:
        out["breakdown"] = result["breakdown"]
    return out


def over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_report(r: dict[str, Any]) -> None:
    cfg, d = r["config"], r["dense"]
    print(f"pagescan {cfg['pagescan']} on Linux {cfg['kernel']} {cfg['machine']}, {cfg['cpus']} CPUs, "
          f"Python {cfg['python']}, numpy {cfg['numpy']}; medians of {cfg['repeat']} rounds; "
          f"return_mask {cfg['return_mask']:#x}")
    print()
    print("the goals of issue 12, one run: the emulation against its floor, with every category and without "
          "WPALLOWED\n(what it computes on the kernels it is for, < 6.7, which have no UFFD_FEATURE_WP_ASYNC); "
          "ratios are medians of per-round ratios")
    rows = []
    for g in r["goals"]:
        met = "-" if g["ratio"] is None else ("met" if g["ratio"] <= g["goal"] else "NOT met")
        met2 = "-" if g["nowpa_ratio"] is None else ("met" if g["nowpa_ratio"] <= g["goal"] else "NOT met")
        rows.append((g["case"], g["floor"], fmt_ms(g["floor_ms"]), fmt_ms(g["emulated_ms"]), ratio(g["ratio"]),
                     fmt_ms(g["nowpa_ms"]), ratio(g["nowpa_ratio"]), f"<= {g['goal']:g}x", f"{met} / {met2}"))
    print_table(("case", "floor", "floor ms", "emulated ms", "x floor", "no-WPA ms", "x floor", "goal",
                 "met (all / no-WPA)"), rows, "<<>>>>>><")
    for g in r["goals"]:
        if g.get("smaps_read_ms") is not None and g["floor"] == "kernel":
            print(f"{g['case']}: reading smaps as far as the range (what its VmFlags cost) takes "
                  f"{fmt_ms(g['smaps_read_ms'])} ms, {ratio(g['smaps_read_ratio'])} the kernel's scan")
        if g.get("pagemap_read_ms") is not None:
            print(f"{g['case']}: reading its pagemap alone (512 KiB reads, nothing done with them) takes "
                  f"{fmt_ms(g['pagemap_read_ms'])} ms, {ratio(g['pagemap_read_ratio'])} the kernel's scan")
    print()
    pages, regions = d["pages_regions"]
    print(f"(1) dense: {fmt_size(cfg['size'])} = {cfg['pages']} pages populated, {cfg['thp']}, "
          f"THP mode {cfg['thp_mode']}; each scan {pages} pages in {regions} region(s)")
    status = "-" if d["met"] is None else ("met" if d["met"] else "NOT met")
    print_table(("", "ms", "x pread", "target"), [
        (f"bare os.pread of the pagemap range ({fmt_size(cfg['pages'] * 8)})", fmt_ms(d["pread_ms"]), "1.00x", ""),
        ("kernel PAGEMAP_SCAN", fmt_ms(d["kernel_ms"]), ratio(d["kernel_over_pread"]), ""),
        ("emulated", fmt_ms(d["emulated_ms"]), ratio(d["emulated_over_pread"]),
         f"<= {d['target']:.2f}x {status}"),
        ("emulated, return_mask without WPALLOWED (own rounds)", fmt_ms(d["emulated_no_wpallowed_ms"]),
         ratio(over(d["emulated_no_wpallowed_ms"], d["pread_ms"])), ""),
    ])
    print()
    pages, regions = r["sparse_pages_regions"]
    print(f"(2) sparse: {fmt_size(cfg['sparse_range'])} range at {cfg['sparse_start']:#x} holding "
          f"{cfg['sparse_maps']} mapping(s) of {fmt_size(cfg['sparse_map_size'])}; each scan {pages} pages "
          f"in {regions} regions")
    titles = {
        "sparse_with_dense": f"process also holds the populated {fmt_size(cfg['size'])} (outside the range)",
        "sparse": "after unmapping it",
    }
    print_table(("", "kernel ms", "emulated ms", "emulated/kernel"), [
        (title, fmt_ms(r["sparse"][key]["kernel_ms"]), fmt_ms(r["sparse"][key]["emulated_ms"]),
         ratio(r["sparse"][key]["emulated_over_kernel"]))
        for key, title in titles.items()
    ])
    if r["memory"]:
        print()
        bounded = r["memory_bounded"]
        verdict = "-" if bounded is None else ("bounded" if bounded else "NOT bounded")
        print("(3) peak memory of one scan, each in a fresh process (KiB): RSS growth during the scan, "
              f"tracemalloc peak; emulated: {verdict}")
        lines = []
        for m in r["memory"]:
            what = (f"sparse {fmt_size(m['size'])}, {m['maps']} maps" if m["kind"] == "sparse"
                    else f"dense {fmt_size(m['size'])} populated")
            lines.append((what, m["backend"], fmt_kib(m["rss_growth"]), fmt_kib(m["tracemalloc_peak"]),
                          fmt_kib(m["per_page_array_bytes"]), f"{m['ms']:.2f}"))
        print_table(("range", "backend", "RSS growth", "tracemalloc", "8 B/page would be", "ms (1 run)"), lines, "<<>")
        if not all(m["hwm_reset"] for m in r["memory"]):
            print("note: /proc/self/clear_refs was not writable: RSS growth is only what exceeded the "
                  "process's earlier peak")
    if "breakdown" in r:
        b = r["breakdown"]
        print()
        print(f"where the emulated dense scan's time goes (medians, exclusive ms; raw read of "
              f"/proc/self/smaps alone: {b['smaps_raw_read_ms']:.2f} ms)")
        print_table(("part", "ms"), [(row["part"], f"{row['ms']:.2f}") for row in b["rows"]])
        if b["not_instrumented"]:
            print(f"not found, so not instrumented: {', '.join(b['not_instrumented'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size_arg(), default=GIB, help="dense range (default 1G)")
    ap.add_argument("--repeat", type=positive_int, default=15, help="timed rounds per measurement (default 15)")
    ap.add_argument("--thp", action="store_true",
                    help="dense range with MADV_HUGEPAGE (2 MiB aligned) instead of MADV_NOHUGEPAGE")
    ap.add_argument("--sparse-range", type=size_arg(), default=64 * TIB,
                    help="sparse address range (default 64T)")
    ap.add_argument("--sparse-maps", type=positive_int, default=4,
                    help="small mappings in the sparse range (default 4)")
    ap.add_argument("--sparse-map-size", type=size_arg(), default=64 << 10,
                    help="size of each (default 64K)")
    ap.add_argument("--below", type=size_arg(), default=4 * GIB,
                    help="populated memory below the small range of the 'above' case (default 4G)")
    ap.add_argument("--above", type=size_arg(), default=16 << 20,
                    help="the small populated range scanned in the 'above' case (default 16M)")
    ap.add_argument("--reserved", type=size_arg(), default=TIB,
                    help="size of the mostly empty reservation scanned in the 'reserved' case (default 1T)")
    ap.add_argument("--cliff-repeat", type=positive_int, default=5,
                    help="timed rounds for the 'above' and 'reserved' cases (default 5)")
    ap.add_argument("--no-cliffs", action="store_true", help="skip the 'above' and 'reserved' cases")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile where the emulated dense scan's time goes")
    ap.add_argument("--json", metavar="PATH", help="also write the results (with every sample) here")
    ap.add_argument("--strict", action="store_true",
                    help="exit with status 1 if the dense target is missed or memory is not bounded")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.sparse_maps * args.sparse_map_size > args.sparse_range:
        ap.error("--sparse-maps x --sparse-map-size does not fit in --sparse-range")
    if args.sparse_range > task_size() - GIB:
        ap.error(f"--sparse-range must fit in user space ({fmt_size(task_size() + PAGE)})")

    t0 = time.perf_counter()
    result = run(args)
    result["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    print_report(result)
    print(f"\ntook {result['config']['seconds']} s")
    if args.json:
        write_json(args.json, result)
    if args.strict and (result["dense"]["met"] is False or result["memory_bounded"] is False):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
