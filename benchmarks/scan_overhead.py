#!/usr/bin/env python3
"""How much does pagescan add on top of the raw PAGEMAP_SCAN ioctl?

Three workloads, each run through pagescan's Python API and through a C reference
program (``scan_ref.c``, compiled here with the system C compiler) doing the same
thing with raw syscalls:

(a) one-page scan: ``pagescan.scan(p, p + PAGE, return_mask=<all supported
    categories>)`` on a present page, in batches of ``--calls`` calls (ns/call);
(p) the same call prepared: ``Scanner(return_mask=...).scan_into(p, p + PAGE, out)``
    with a one-region ``out`` (ns/call); the C side of both is the same loop;
(x), (y), (z) the floors of (a) and (p) in pure Python, against the same C loop: a bare
    ``fcntl.ioctl`` on a ready request; a closure that stores the range, makes the ioctl
    and reads ``walk_end`` (``scan_into`` without its checks); a function with
    ``scan()``'s signature that does the same and returns a ``ScanResult`` owning its
    regions (``scan()`` without its checks, dispatch and reentrancy). No targets;
(b) get-and-write-protect: ``--size`` bytes of private anonymous memory, written
    and then armed on a ``WP_ASYNC`` userfaultfd; each round writes
    ``--dirty-percent`` of its pages (random, seeded, identical on both sides) and
    times only ``scan(start, end, flags=PM_SCAN_WP_MATCHING, category_mask=WRITTEN,
    return_mask=WRITTEN)``, which must report exactly the pages written (µs/scan);
(w) the floor of (b) in pure Python: the same get+WP as a bare ``fcntl.ioctl`` into a
    fixed buffer, against the same C round (what the interpreter costs around a walk
    that has just evicted its code and data from the caches). No target;
(c) full-category scan of the same range (``return_mask`` = all supported
    categories, no masks) after one more dirtying round (µs/scan).

The two sides take turns batch by batch (C, Python, C, Python, ...) on one CPU
(``--cpu``) so that both see the same machine noise; each figure is the median over
``--repeat`` batches or rounds, and the ratio is median(Python) / median(C). Times are
the calling thread's CPU time by default (``--clock cpu``: time spent preempted by
other processes is not counted, on either side); ``--clock wall`` uses the monotonic
clock. The two ranges are populated in alternating chunks, so that both get their
physical pages under the same conditions. The range gets ``MADV_NOHUGEPAGE``, so (b)
and (c) measure 4 KiB PTEs only (no THP).

Run ``python benchmarks/scan_overhead.py --help`` for the options; see README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import pagescan
from pagescan import PM_SCAN_WP_MATCHING, Category, RegisterMode, UffdFeature, Userfaultfd
from pagescan._uapi import libc
from pagescan._uapi.mman import MADV, MAP, PROT

from _common import (compile_c, find_compiler, fmt_size, gc_paused, machine, positive_int, print_table, size_arg,
                     write_json)

PAGE = mmap.PAGESIZE
HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "scan_ref.c"
WRITTEN = int(Category.WRITTEN)
WP_MATCHING = int(PM_SCAN_WP_MATCHING)
_M64 = (1 << 64) - 1

#: The two sides populate their ranges taking turns in chunks of this size.
POPULATE_CHUNK = 4 << 20
#: Python/C ratio each workload must stay under (the floors, x, y and z, have none).
TARGETS: dict[str, float | None] = {"a": 3.0, "p": 2.2, "x": None, "y": None, "z": None, "b": 1.05, "w": None,
                                   "c": 1.05}
WORKLOADS = "apxyzbwc"
#: The one-page workloads: Python batches against the C loop.
ONE_PAGE = "apxyz"


# -- shared pieces -------------------------------------------------------------------


class SplitMix64:
    """splitmix64, bit for bit the generator in scan_ref.c (same seed, same pages)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _M64

    def next(self) -> int:
        self.state = z = (self.state + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)


def draw_pages(rng: SplitMix64, npages: int, count: int) -> np.ndarray:
    """``count`` distinct page indices, in drawing order (as scan_ref.c draws them)."""
    seen: set[int] = set()
    order: list[int] = []
    while len(order) < count:
        page = rng.next() % npages
        if page not in seen:
            seen.add(page)
            order.append(page)
    return np.array(order, dtype=np.int64)


# -- the Python side -----------------------------------------------------------------


CLOCKS = {"cpu": time.thread_time_ns, "wall": time.perf_counter_ns}


class PythonSide:
    """The benchmark's own memory and uffd, driven through pagescan's public API."""

    def __init__(self, size: int, dirty: int, seed: int, categories: int, clock: str) -> None:
        self.now = CLOCKS[clock]
        self.size = size
        self.npages = size // PAGE
        self.dirty = dirty
        self.rng = SplitMix64(seed)
        self.categories = categories
        self.page = 0
        self.start = 0
        self.uffd: Userfaultfd | None = None
        self.bytes: np.ndarray | None = None
        try:
            # (a): one written private anonymous page.
            self.page = libc.mmap(0, PAGE, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS)
            ctypes.memset(self.page, 1, PAGE)
            # (b), (c): the big range, 4 KiB pages only; populate() and arm() follow.
            self.start = libc.mmap(0, size, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS)
            self.end = self.start + size
            libc.madvise(self.start, size, MADV.NOHUGEPAGE)
            self.bytes = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(self.start))
        except BaseException:
            self.close()
            raise
        res = pagescan.scan(self.page, self.page + PAGE, return_mask=categories)
        if len(res) != 1 or not res[0].categories & Category.PRESENT:
            raise AssertionError(f"the (a) page is not one present region: {list(res)}")

    def populate(self, offset: int, length: int) -> None:
        ctypes.memset(self.start + offset, 1, length)  # every page present and written

    def arm(self) -> None:
        self.uffd = Userfaultfd(UffdFeature.WP_ASYNC)
        self.uffd.register(self.start, self.size, RegisterMode.WP)
        self.uffd.writeprotect(self.start, self.size)

    def a(self, calls: int) -> int:
        """Total ns of ``calls`` one-page scans."""
        scan, p, e, m, now = pagescan.scan, self.page, self.page + PAGE, self.categories, self.now
        loop = range(calls)
        t0 = now()
        for _ in loop:
            scan(p, e, return_mask=m)
        return now() - t0

    def p(self, calls: int) -> int:
        """Total ns of ``calls`` one-page scans through a prepared Scanner."""
        into = pagescan.Scanner(return_mask=self.categories).scan_into
        p, e, now = self.page, self.page + PAGE, self.now
        out = np.zeros(1, pagescan.PAGE_REGION_DTYPE)
        into(p, e, out)
        loop = range(calls)
        t0 = now()
        for _ in loop:
            into(p, e, out)
        return now() - t0

    # The floors: what the same one-page call costs in pure Python with nothing but the
    # work itself (no argument checks, no reentrancy, no fork detection).

    def _floor_request(self) -> tuple[int, int, bytearray, memoryview, bytearray]:
        from pagescan._uapi.pagemap import PAGEMAP_SCAN, pm_scan_arg

        regions = bytearray(24 * 512)
        vec = ctypes.addressof(ctypes.c_char.from_buffer(regions))
        arg = bytearray(bytes(pm_scan_arg(96, 0, self.page, self.page + PAGE, 0, vec, 1, 0, 0, 0, 0, self.categories)))
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        return fd, int(PAGEMAP_SCAN), arg, memoryview(arg).cast("Q"), regions

    def x(self, calls: int) -> int:
        """Floor: ``fcntl.ioctl`` on a fixed, ready request (ns/call)."""
        fd, req, arg, _, regions = self._floor_request()  # regions: kept alive, the kernel writes there
        ioctl, now = fcntl.ioctl, self.now
        try:
            loop = range(calls)
            t0 = now()
            for _ in loop:
                ioctl(fd, req, arg, True)
            return now() - t0
        finally:
            os.close(fd)
            del regions

    def y(self, calls: int) -> int:
        """Floor: a closure taking ``(start, end, out)`` that stores the range, makes the
        ioctl and reads ``walk_end`` back: ``scan_into`` without its checks."""
        fd, req, arg, q, regions = self._floor_request()  # regions: kept alive, the kernel writes there
        ioctl, p, e, now = fcntl.ioctl, self.page, self.page + PAGE, self.now

        def into(start: int, end: int, out: Any) -> tuple[int, int]:
            q[2] = start
            q[3] = end
            q[4] = 0
            n: int = ioctl(fd, req, arg, True)
            return n, q[4]

        out = np.zeros(1, pagescan.PAGE_REGION_DTYPE)
        try:
            loop = range(calls)
            t0 = now()
            for _ in loop:
                into(p, e, out)
            return now() - t0
        finally:
            os.close(fd)
            del regions

    def z(self, calls: int) -> int:
        """Floor: a function with ``scan()``'s signature that stores the range, makes the
        ioctl into a fixed buffer and returns a ``ScanResult`` owning a copy of its
        regions: ``scan()`` without its checks, dispatch and reentrancy."""
        from pagescan._scan import _result  # private: the result without a scan

        fd, req, arg, q, regions = self._floor_request()
        ioctl, view, m, p, e, now = fcntl.ioctl, memoryview(regions), self.categories, self.page, self.page + PAGE, self.now

        def scan(start: int, end: int | None = None, *, pid: Any = None, flags: int = 0, category_inverted: int = 0,
                 category_mask: int = 0, category_anyof_mask: int = 0, return_mask: int = 0, max_pages: int = 0,
                 vec_len: int | None = None, backend: str = "auto", out: Any = None) -> pagescan.ScanResult:
            q[2] = start
            q[3] = end
            q[4] = 0
            n = ioctl(fd, req, arg, True)
            return _result(view[:24 * n].tobytes(), q[4], start, end or 0)

        try:
            loop = range(calls)
            t0 = now()
            for _ in loop:
                scan(p, e, return_mask=m)
            return now() - t0
        finally:
            os.close(fd)
            del regions

    def dirty_round(self) -> None:
        assert self.bytes is not None
        self.bytes[draw_pages(self.rng, self.npages, self.dirty) * PAGE] = 2

    def b(self) -> tuple[int, int, int]:
        self.dirty_round()
        scan, start, end, k, now = pagescan.scan, self.start, self.end, self.dirty, self.now
        t0 = now()
        res = scan(start, end, flags=WP_MATCHING, category_mask=WRITTEN, return_mask=WRITTEN, vec_len=k)
        t1 = now()
        if not res.complete or res.pages != k:
            raise AssertionError(f"(b) reported {res.pages} pages (complete={res.complete}), dirtied {k}")
        return t1 - t0, res.pages, len(res)

    def w(self) -> tuple[int, int, int]:
        """Floor of (b): the same get+WP as a bare ``fcntl.ioctl`` on a ready request."""
        from pagescan._uapi.pagemap import PAGEMAP_SCAN, pm_scan_arg

        self.dirty_round()
        k = self.dirty
        regions = np.zeros(k, pagescan.PAGE_REGION_DTYPE)
        arg = pm_scan_arg(96, WP_MATCHING, self.start, self.end, 0, regions.ctypes.data, k, 0, 0, WRITTEN, 0,
                          WRITTEN)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        ioctl, req, now = fcntl.ioctl, int(PAGEMAP_SCAN), self.now
        try:
            t0 = now()
            n = ioctl(fd, req, arg, True)
            t1 = now()
        finally:
            os.close(fd)
        got = regions[:n]
        pages = int((got["end"] - got["start"]).sum()) // PAGE
        if pages != k:
            raise AssertionError(f"(w) reported {pages} pages, dirtied {k}")
        return t1 - t0, pages, n

    def c(self) -> tuple[int, int, int]:
        scan, start, end, m, now = pagescan.scan, self.start, self.end, self.categories, self.now
        t0 = now()
        res = scan(start, end, return_mask=m)
        t1 = now()
        if not res.complete or res.pages != self.npages:
            raise AssertionError(f"(c) covered {res.pages} of {self.npages} pages (complete={res.complete})")
        return t1 - t0, res.pages, len(res)

    def close(self) -> None:
        self.bytes = None
        if self.uffd is not None:
            self.uffd.close()  # unregisters the range
            self.uffd = None
        if self.start:
            libc.munmap(self.start, self.size)
            self.start = 0
        if self.page:
            libc.munmap(self.page, PAGE)
            self.page = 0


# -- the C side ----------------------------------------------------------------------


class CSide:
    """scan_ref (scan_ref.c) as a child process that answers one command per line."""

    def __init__(self, binary: Path, size: int, dirty: int, seed: int, categories: int, clock: str) -> None:
        self.proc = subprocess.Popen(
            [str(binary), clock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        try:
            (npages,) = self.ask(f"setup {size} {dirty} {seed} {categories}")
            if npages != size // PAGE:
                raise AssertionError(f"scan_ref mapped {npages} pages, expected {size // PAGE}")
        except BaseException:
            self.close()
            raise

    def ask(self, command: str) -> list[int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        if not reply or reply[0] != "ok":
            raise RuntimeError(f"scan_ref {command.split()[0]!r}: {' '.join(reply) or 'no reply (crashed?)'}")
        return [int(x) for x in reply[1:]]

    def populate(self, offset: int, length: int) -> None:
        self.ask(f"populate {offset} {length}")

    def arm(self) -> None:
        self.ask("arm")

    def a(self, calls: int) -> int:
        return self.ask(f"a {calls}")[0]

    p = x = y = z = a  # the C loop is the same for the prepared call and the floors

    def dirty_round(self) -> None:
        self.ask("dirty")

    def b(self) -> tuple[int, int, int]:
        ns, pages, regions = self.ask("b")
        return ns, pages, regions

    w = b  # the floor of (b) is measured against the same C round

    def c(self) -> tuple[int, int, int]:
        ns, pages, regions = self.ask("c")
        return ns, pages, regions

    def close(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- measuring -----------------------------------------------------------------------


def run(args: argparse.Namespace, binary: Path | None) -> dict[str, Any]:
    npages = args.size // PAGE
    dirty = max(1, round(npages * args.dirty_percent / 100))
    categories = int(pagescan.capabilities().categories)
    sides: dict[str, Any] = {}
    samples: dict[str, dict[str, list[float]]] = {w: {"python": [], "c": []} for w in WORKLOADS}
    counts: dict[str, dict[str, list[tuple[int, int]]]] = {w: {"python": [], "c": []} for w in "bc"}
    try:
        if binary is not None:
            sides["c"] = CSide(binary, args.size, dirty, args.seed, categories, args.clock)
        sides["python"] = PythonSide(args.size, dirty, args.seed, categories, args.clock)
        # Populate the two ranges in alternating chunks: both sides then get their physical
        # pages under the same conditions. (Populated one after the other, the side that
        # went first walked its page tables up to 25% slower here, whichever side it was;
        # two C processes populated this way scan within 1% of each other.)
        for offset in range(0, args.size, POPULATE_CHUNK):
            for side in sides.values():
                side.populate(offset, min(POPULATE_CHUNK, args.size - offset))
        for side in sides.values():
            side.arm()
        with gc_paused():  # nothing here makes reference cycles
            # (a), (p): warm up, then alternate batches.
            for w in ONE_PAGE:
                for side in sides.values():
                    getattr(side, w)(args.calls)
                for _ in range(args.repeat):
                    for name, side in sides.items():
                        samples[w][name].append(getattr(side, w)(args.calls) / args.calls)

            # (b): one warm-up round each, then alternate rounds (same pages on both sides).
            for side in sides.values():
                side.b()
            # (w), the floor of (b), takes turns with it round by round (its C side is
            # another round of (b)): the walk slows down and speeds up over a run.
            for _ in range(args.repeat):
                for name, side in sides.items():
                    ns, pages, regions = side.b()
                    samples["b"][name].append(ns / 1000)
                    counts["b"][name].append((pages, regions))
                for name, side in sides.items():
                    samples["w"][name].append(side.w()[0] / 1000)

            # (c): leave one round of written pages in place, then alternate scans.
            for side in sides.values():
                side.dirty_round()
                side.c()
            for _ in range(args.repeat):
                for name, side in sides.items():
                    ns, pages, regions = side.c()
                    samples["c"][name].append(ns / 1000)
                    counts["c"][name].append((pages, regions))
    finally:
        for side in sides.values():
            side.close()

    # Both sides dirtied the same pages, so they must have seen the same regions.
    if "c" in sides:
        for w in "bc":
            if counts[w]["python"] != counts[w]["c"]:
                raise AssertionError(f"({w}) pages/regions differ: python {counts[w]['python'][:3]}..., "
                                     f"C {counts[w]['c'][:3]}...")

    rows = []
    titles = {
        "a": ("one-page scan(), all categories", "ns/call"),
        "p": ("one-page Scanner.scan_into", "ns/call"),
        "x": ("floor: bare fcntl.ioctl, fixed request", "ns/call"),
        "y": ("floor: scan_into without checks", "ns/call"),
        "z": ("floor: scan() without checks", "ns/call"),
        "b": (f"get+WP written, {fmt_size(args.size)}, {args.dirty_percent:g}% dirty", "us/scan"),
        "w": ("floor: (b) as a bare fcntl.ioctl", "us/scan"),
        "c": (f"full-category scan, {fmt_size(args.size)}", "us/scan"),
    }
    for w in WORKLOADS:
        py = statistics.median(samples[w]["python"])
        c = statistics.median(samples[w]["c"]) if samples[w]["c"] else None
        ratio = py / c if c else None
        rows.append({
            "workload": w,
            "title": titles[w][0],
            "unit": titles[w][1],
            "python": py,
            "c": c,
            "ratio": ratio,
            "target": TARGETS[w],
            "met": None if ratio is None or TARGETS[w] is None else ratio <= TARGETS[w],
            "samples": samples[w],
            "pages_regions": counts[w]["python"][0] if w in counts else None,
        })
    return {
        "config": {
            "size": args.size,
            "pages": npages,
            "dirty_pages": dirty,
            "dirty_percent": args.dirty_percent,
            "repeat": args.repeat,
            "calls": args.calls,
            "seed": args.seed,
            "clock": args.clock,
            "return_mask": categories,
            "thp": "MADV_NOHUGEPAGE on the range (4 KiB PTEs only)",
            **machine(),
            "cpus": os.cpu_count(),
            "pinned_cpu": args.pinned,
            "compiler": args.compiler_used,
        },
        "rows": rows,
    }


def fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def print_report(result: dict[str, Any]) -> None:
    cfg = result["config"]
    pinned = "unpinned" if cfg["pinned_cpu"] is None else f"both sides on CPU {cfg['pinned_cpu']}"
    print(f"pagescan {cfg['pagescan']} on Linux {cfg['kernel']} {cfg['machine']}, {cfg['cpus']} CPUs ({pinned}), "
          f"Python {cfg['python']}; C reference: {cfg['compiler'] or 'none (no C compiler found)'}")
    print(f"range {fmt_size(cfg['size'])} = {cfg['pages']} pages, {cfg['dirty_pages']} dirtied per round; "
          f"{cfg['thp']}, THP mode {cfg['thp_mode']}")
    clock = "thread CPU time" if cfg["clock"] == "cpu" else "wall-clock time"
    print(f"{clock}, medians of {cfg['repeat']} alternating batches/rounds ((a): {cfg['calls']} calls per "
          f"batch); return_mask {cfg['return_mask']:#x}")
    print()
    head = ("workload", "unit", "pagescan", "C", "Py/C", "target", "status")
    lines = []
    for r in result["rows"]:
        if r["target"] is None:
            status, target = "", "-"
        else:
            status = "no C ref" if r["met"] is None else ("met" if r["met"] else "not met")
            target = f"<= {r['target']:.2f}x"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append((f"({r['workload']}) {r['title']}", r["unit"], fmt_num(r["python"]), fmt_num(r["c"]),
                      ratio, target, status))
    print_table(head, lines, "<<>>>><")
    for r in result["rows"]:
        if r["pages_regions"]:
            pages, regions = r["pages_regions"]
            checked = "checked on both sides" if r["c"] is not None else "checked"
            print(f"({r['workload']}) each scan: {pages} pages in {regions} regions ({checked})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=size_arg(), default=1 << 30,
                    help="range for (b) and (c), e.g. 1G, 256M (default 1G)")
    ap.add_argument("--repeat", type=positive_int, default=21,
                    help="batches for (a), rounds for (b) and (c), per side (default 21)")
    ap.add_argument("--calls", type=positive_int, default=20000,
                    help="one-page scans per (a) batch (default 20000)")
    ap.add_argument("--dirty-percent", type=float, default=1.0,
                    help="pages written per (b) round, in percent of the range (default 1)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the dirty-page generator (default 1)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="cpu: the calling thread's CPU time (default; robust on a busy machine); "
                         "wall: monotonic clock")
    ap.add_argument("--cpu", default="last",
                    help="pin both sides to this CPU (default: the last one this process may use; "
                         "'none': no pinning)")
    ap.add_argument("--json", metavar="PATH", help="also write the results (with every sample) here")
    ap.add_argument("--cc", metavar="COMPILER", help="C compiler command (default: $CC, cc, gcc or clang)")
    ap.add_argument("--build-dir", metavar="DIR", type=Path,
                    help="build scan_ref here and keep it (default: a temporary directory, removed)")
    ap.add_argument("--no-c", action="store_true", help="skip the C reference")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 if a target is not met")
    args = ap.parse_args(argv)
    if not 0 < args.dirty_percent <= 100:
        ap.error("--dirty-percent must be in (0, 100]")

    caps = pagescan.capabilities()
    if not caps.pagemap_scan or not caps.wp_async:
        print(f"needs PAGEMAP_SCAN and UFFD_FEATURE_WP_ASYNC (Linux 6.7); this kernel is {platform.release()}: "
              f"{caps.missing}", file=sys.stderr)
        return 2

    if args.cpu != "none":
        allowed = sorted(os.sched_getaffinity(0))
        cpu = allowed[-1] if args.cpu == "last" else int(args.cpu) if args.cpu.isdigit() else -1
        if cpu not in allowed:
            ap.error(f"--cpu must be 'last', 'none' or one of {allowed}")
        os.sched_setaffinity(0, {cpu})  # the C child inherits it
        args.pinned = cpu
    else:
        args.pinned = None

    compiler = None if args.no_c else find_compiler(args.cc)
    if compiler is None and not args.no_c:
        print("no C compiler found (looked for --cc, $CC, cc, gcc, clang): skipping the C column",
              file=sys.stderr)
    args.compiler_used = shlex.join(compiler) if compiler else None

    temp_dir = None
    try:
        binary = None
        if compiler is not None:
            if args.build_dir is not None:
                args.build_dir.mkdir(parents=True, exist_ok=True)
                out_dir = args.build_dir
            else:
                out_dir = temp_dir = Path(tempfile.mkdtemp(prefix="pagescan-bench-"))
            binary = compile_c(compiler, C_SOURCE, out_dir / "scan_ref")
        result = run(args, binary)
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)

    print_report(result)
    if args.json:
        write_json(args.json, result)
    if args.strict and any(r["met"] is False for r in result["rows"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
