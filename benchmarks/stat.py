#!/usr/bin/env python3
"""``pagescan stat`` against parsing ``/proc/PID/smaps`` on a process with many mappings.

A child Python process maps ``--mappings`` (1,000) private anonymous mappings totalling
``--size-gib`` (8 GiB) with ``MAP_NORESERVE``, each its own VMA (a one-page hole
between neighbours), and populates a fraction of them (well under 1 GiB resident):

* every 4th mapping: its first MiB written (contiguous);
* every 4th, offset 1: its first 512 KiB read (zero pages);
* every 4th, offset 2: every 8th page written (256 scattered pages per 8 MiB: many
  small regions for PAGEMAP_SCAN, nothing special for smaps);
* every 50th: ``MADV_HUGEPAGE`` and 4 MiB written (PMD THPs where THP allows it);
* the rest: untouched.

The parent then times, with ``_common.alternating_rounds`` (one warm-up call each, then
``--repeat`` rounds in a rotating order; median and min; each ratio is the median of the
per-round ratios, which keeps machine load that drifts between rounds out of it):

* **smaps parse**: read ``/proc/PID/smaps`` and parse it into one dict per mapping
  (address range, permissions, path and every ``kB`` field in bytes) -- what
  ``psutil.Process.memory_maps(grouped=False)`` does, written here;
* **smaps read only**: the read alone (the kernel's share of the above);
* **mapping_stats**: ``pagescan.mappings.mapping_stats(pid)`` (smaps parsed with numpy
  while one PAGEMAP_SCAN walk runs: every smaps field plus present, swapped, zero, huge,
  file, written, guard per mapping);
* **pagescan stat**: the whole command with its default columns (size, rss, pss, uss,
  swap, zero, huge), ``main(["stat", PID])``, output to /dev/null;
* **pagescan stat --json**: the whole command with everything;
* **psutil memory_maps**: ``psutil.Process(pid).memory_maps(grouped=False)``, if psutil
  is installed (a benchmark-only dependency);
* **pmap -X** and **smem -m** (``smem -m -P`` this target, if installed: Debian package
  ``smem``): run as commands, so their times include starting them (pmap is C; smem a
  Python program that parses smaps).

Then the whole machine, ``pagescan ps`` against reading every process's
``smaps_rollup`` (the kernel's per-process sums, the least any such tool must read):
as a tight Python loop (``os.listdir``, then ``os.open``, one ``os.read``, ``os.close``
per pid: the reference of the target), the same loop in C (``rollup_ref.c``, one process
serving every round over a pipe; its rows are the round trip, its own time is in the
JSON; needs a C compiler, ``--no-c`` skips it) and ``cat /proc/[0-9]*/smaps_rollup``
(a command: with its start-up). Also ``psutil`` ``memory_full_info()`` for every
process (which reads smaps_rollup too) and ``smem`` (every process's smaps). ``--idle N``
(10) idle Python processes of about 50 MiB each are started first so that there is
memory to account; the 1,000-mapping target is still running. The whole-machine rounds
run twice: on the machine as it is, then with ``--load N`` (default: one per CPU)
processes spinning on a CPU each (``--load 0`` skips that part).

Before timing, every mapping's counts are checked against smaps (``present - zero ==
Rss``, ``huge == AnonHugePages``, ``swapped == Swap``). Targets: ``pagescan stat`` is
not slower than the smaps parse (ratio <= 1.0) while reporting more; ``pagescan ps`` is
within 1.5x of the smaps_rollup loop and faster than smem.

    python benchmarks/stat.py [--repeat 11] [--idle 10] [--load N] [--no-c] [--json PATH] [--strict]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    alternating_rounds,
    compile_c,
    find_compiler,
    machine,
    positive_int,
    print_table,
    write_json,
)

import pagescan
from pagescan._procfs import task_size
from pagescan.cli import main as cli_main
from pagescan.mappings import mapping_stats

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "rollup_ref.c"

CHILD = r"""
import ctypes, json, os, sys
from pagescan._uapi import libc
from pagescan._uapi.mman import MADV, MAP, PROT

P = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
H = 2 * MIB
n, total = int(sys.argv[1]), int(sys.argv[2])
base_size = (total // n) & ~(H - 1)
sizes = [base_size] * n
extra = total - base_size * n  # spread what is left in 1 MiB steps
i = 0
while extra >= MIB:
    sizes[i % n] += MIB
    extra -= MIB
    i += 7
slots = [(s + P + H - 1) & ~(H - 1) for s in sizes]  # 2 MiB-aligned slots, >= 1 page hole
span = sum(slots) + H
RW = PROT.READ | PROT.WRITE
ANON = MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE
res = libc.mmap(0, span, PROT.NONE, ANON)
cur = (res + H - 1) & ~(H - 1)
if cur > res:
    libc.munmap(res, cur - res)
addrs = []
for i, (size, slot) in enumerate(zip(sizes, slots)):
    a = libc.mmap(cur, size, RW, ANON | MAP.FIXED)
    libc.munmap(cur + size, slot - size)  # the hole: unmapped, so not a mapping
    addrs.append(a)
    if i % 50 == 0:
        libc.madvise(a, 4 * MIB, MADV.HUGEPAGE)
        ctypes.memset(a, 1, 4 * MIB)
    elif i % 4 == 0:
        ctypes.memset(a, 1, MIB)
    elif i % 4 == 1:
        for off in range(0, MIB // 2, P):
            ctypes.string_at(a + off, 1)
    elif i % 4 == 2:
        for off in range(0, size, 8 * P):
            ctypes.memset(a + off, 2, 1)
    cur += slot
tail = res + span - cur
if tail > 0:
    libc.munmap(cur, tail)
print(json.dumps({"mapped": sum(sizes), "mappings": n}), flush=True)
sys.stdin.read()
"""


# -- what psutil's memory_maps(grouped=False) does, written here ---------------------


def smaps_parse(pid: int) -> list[dict[str, Any]]:
    """One dict per mapping: addr, perms, path and every ``kB`` field in bytes."""
    with open(f"/proc/{pid}/smaps", "rb") as f:
        data = f.read()
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for line in data.split(b"\n"):
        if not line:
            continue
        fields = line.split(None, 5)
        if fields[0].endswith(b":"):
            if cur is not None and len(fields) == 3 and fields[2] == b"kB":
                cur[fields[0][:-1].decode()] = int(fields[1]) * 1024
            continue
        cur = {
            "addr": fields[0].decode(),
            "perms": fields[1].decode(),
            "path": fields[5].strip().decode() if len(fields) > 5 else "",
        }
        out.append(cur)
    return out


def smaps_read(pid: int) -> bytes:
    with open(f"/proc/{pid}/smaps", "rb") as f:
        return f.read()


def quiet_cli(*argv: str) -> None:
    """``pagescan ARGV`` in this process, output to /dev/null."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        rc = cli_main(list(argv))
    if rc != 0:
        raise RuntimeError(f"pagescan {' '.join(argv)} exited {rc}")


def command(*argv: str) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

    return run


def rollup_loop() -> int:
    """Read every process's smaps_rollup (what any per-process memory tool must read):
    one ``open``, one ``read`` (the kernel writes the record in one piece), one
    ``close`` per pid, nothing parsed; kernel threads fail to open and are skipped."""
    n = 0
    open_, read, close = os.open, os.read, os.close
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fd = open_(f"/proc/{d}/smaps_rollup", os.O_RDONLY)
            except OSError:
                continue
            try:
                n += len(read(fd, 1 << 14))
            except OSError:
                pass
            close(fd)
    return n


@contextlib.contextmanager
def c_rollup_loop(compiler: list[str] | None) -> Iterator[tuple[Callable[[], int], list[int]] | None]:
    """The loop in C (rollup_ref.c), compiled into a temporary directory, one process
    serving every round: ``(call, own_ns)``, where each call asks for one pass and
    ``own_ns`` collects the passes' times measured inside the C process. ``None``
    without a compiler."""
    if compiler is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="pagescan-bench-") as tmp:
        binary = compile_c(compiler, C_SOURCE, Path(tmp) / "rollup_ref")
        proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        own: list[int] = []

        def call() -> int:
            stdin.write("\n")
            stdin.flush()
            nbytes, ns = stdout.readline().split()
            own.append(int(ns))
            return int(nbytes)

        try:
            yield call, own
        finally:
            stdin.close()
            proc.wait()
            stdout.close()


def cat_rollups() -> None:
    """``cat /proc/[0-9]*/smaps_rollup`` by the shell (kernel threads: errors, ignored)."""
    subprocess.run(["sh", "-c", "exec cat /proc/[0-9]*/smaps_rollup"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)


@contextlib.contextmanager
def cpu_load(n: int) -> Iterator[None]:
    """``n`` processes spinning on a CPU each."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.2)  # let them get going
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def psutil_full_info_loop() -> int:
    import psutil  # type: ignore[import-untyped]

    n = 0
    for p in psutil.process_iter():
        try:
            n += p.memory_full_info().uss
        except (psutil.Error, OSError):
            pass
    return n


@contextlib.contextmanager
def idle_processes(n: int) -> Any:
    """``n`` Python processes holding ~50 MiB each (written, read as zero pages, a file)."""
    code = ("import mmap, sys; a = bytearray(40 << 20); z = mmap.mmap(-1, 10 << 20); "
            "[z[i] for i in range(0, 10 << 20, 4096)]; print('ready', flush=True); sys.stdin.read()")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()


# -- the target -------------------------------------------------------------------------


@contextlib.contextmanager
def target(n: int, total: int) -> Any:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(n), str(total)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"target did not start (exit status {proc.poll()})")
        yield proc.pid, json.loads(line)
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def check(pid: int) -> dict[str, int]:
    """mapping_stats and the smaps parse describe the same mappings consistently."""
    limit = task_size()
    sm = [m for m in smaps_parse(pid) if int(m["addr"].split("-")[1], 16) <= limit]
    st = mapping_stats(pid)
    if [f"{s.start:x}-{s.end:x}" for s in st] != [m["addr"] for m in sm]:
        raise AssertionError("mapping_stats and smaps list different mappings")
    for s, m in zip(st, sm):
        if "Shared_Hugetlb" in m and (m["Shared_Hugetlb"] or m["Private_Hugetlb"]):
            continue
        pmd = m.get("AnonHugePages", 0) + m.get("ShmemPmdMapped", 0) + m.get("FilePmdMapped", 0)
        got = ((s.pages["present"] - s.pages["zero"]) * PAGE, s.pages["huge"] * PAGE, s.pages["swapped"] * PAGE)
        if got != (m["Rss"], pmd, m["Swap"]):
            raise AssertionError(f"{m['addr']} {m['path']}: stat {got} != smaps {(m['Rss'], pmd, m['Swap'])}")
    return {
        "mappings": len(st),
        "rss": sum(m["Rss"] for m in sm),
        "mapped": sum(s.size for s in st),
        "huge": sum(s.pages["huge"] for s in st) * PAGE,
        "zero": sum(s.pages["zero"] for s in st) * PAGE,
        # what mapping_stats asks the kernel for: pages with an entry, every category
        "regions": sum(len(r.regions) for r in pagescan.scan_iter(
            st[0].start, st[-1].end, pid=pid, return_mask=int(pagescan.capabilities().categories),
            category_anyof_mask=int(pagescan.Category.PRESENT | pagescan.Category.SWAPPED))),
    }


def rows_of(samples: dict[str, list[int]], base_name: str) -> list[dict[str, Any]]:
    """Ratios are taken round by round (both sides saw the same machine load), then the
    median of those; the medians of the times are shown too (samples in ns)."""
    base = samples[base_name]
    return [{"method": name, "median_ms": statistics.median(xs) / 1e6, "min_ms": min(xs) / 1e6,
             "ratio": statistics.median(x / b for x, b in zip(xs, base))} for name, xs in samples.items()]


def print_rows(rows: list[dict[str, Any]], base_name: str) -> None:
    print_table(("method", "median ms", "min ms", f"vs {base_name}"),
                [(r["method"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['ratio']:.2f}x") for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--mappings", type=int, default=1000, help="mappings in the target (default 1000)")
    ap.add_argument("--size-gib", type=float, default=8.0, help="total size of those mappings (default 8)")
    ap.add_argument("--repeat", type=positive_int, default=11, help="timed rounds (default 11)")
    ap.add_argument("--ps-repeat", type=positive_int, default=31,
                    help="rounds of pagescan ps against the smaps_rollup loops (default 31)")
    ap.add_argument("--idle", type=int, default=10, help="idle ~50 MiB processes started for the ps part (default 10)")
    ap.add_argument("--load", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPU-bound processes running during the second whole-machine part (default: one per "
                    "CPU; 0 skips it)")
    ap.add_argument("--cc", metavar="COMPILER", help="C compiler for rollup_ref.c (default: $CC, cc, gcc or clang)")
    ap.add_argument("--no-c", action="store_true", help="skip the C smaps_rollup loop")
    ap.add_argument("--json", metavar="PATH", help="write every sample and the summary here")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is not met")
    args = ap.parse_args(argv)

    try:
        import psutil
    except ImportError:
        psutil = None
    smem = shutil.which("smem")
    pmap = shutil.which("pmap")
    total = int(args.size_gib * (1 << 30))
    t0 = time.perf_counter()
    compiler = None if args.no_c else find_compiler(args.cc)
    if compiler is None and not args.no_c:
        print("no C compiler found (looked for --cc, $CC, cc, gcc, clang): skipping the C loop", file=sys.stderr)
    with target(args.mappings, total) as (pid, info), idle_processes(args.idle), c_rollup_loop(compiler) as c_loop:
        build = time.perf_counter() - t0
        facts = check(pid)
        methods: dict[str, Callable[[], Any]] = {
            "smaps parse": lambda: smaps_parse(pid),
            "smaps read only": lambda: smaps_read(pid),
            "mapping_stats": lambda: mapping_stats(pid),
            "pagescan stat": lambda: quiet_cli("stat", str(pid)),
            "pagescan stat --json": lambda: quiet_cli("stat", str(pid), "--json"),
        }
        if psutil is not None:
            methods["psutil memory_maps"] = lambda: psutil.Process(pid).memory_maps(grouped=False)
        if pmap:
            methods["pmap -X (command)"] = command(pmap, "-X", str(pid))
        if smem:
            methods["smem -m (command)"] = command(smem, "-m", "-P", f"^{sys.executable} -c ")
        samples = alternating_rounds(methods, args.repeat)
        # pagescan ps and the loops in rounds of their own; the commands and psutil in
        # others, with the loop again: a command that reads every smaps (smem) leaves
        # the machine slower for whatever reads /proc next. Random order in every round.
        whole: dict[str, Callable[[], Any]] = {
            "smaps_rollup loop": rollup_loop,
            "pagescan ps": lambda: quiet_cli("ps"),
            "pagescan ps --json": lambda: quiet_cli("ps", "--json"),
        }
        if c_loop is not None:
            whole["smaps_rollup loop, C (round trip)"] = c_loop[0]
        others: dict[str, Callable[[], Any]] = {
            "smaps_rollup loop": rollup_loop,
            "cat smaps_rollup (command)": cat_rollups,
        }
        if psutil is not None:
            others["psutil memory_full_info"] = psutil_full_info_loop
        if smem:
            others["smem (command)"] = command(smem)
        nprocs = len([d for d in os.listdir("/proc") if d.isdigit()])
        cases: dict[str, dict[str, Any]] = {}
        for label, load in (("as found", 0), (f"{args.load} CPU-bound processes running", args.load)):
            if label != "as found" and not load:
                continue
            with cpu_load(load):
                own = c_loop[1] if c_loop is not None else []
                del own[:]
                ps_samples = alternating_rounds(whole, args.ps_repeat, shuffle_seed=14)
                own_ns = own[1:]  # the first pass is the warm-up
                other_samples = alternating_rounds(others, args.repeat, shuffle_seed=15)
                cases[label] = {"samples_ns": ps_samples, "c_own_ns": own_ns, "other_samples_ns": other_samples}
    rows = rows_of(samples, "smaps parse")
    by_name = {r["method"]: r for r in rows}
    ratio: float = by_name["pagescan stat"]["ratio"]
    ratio_json: float = by_name["pagescan stat --json"]["ratio"]
    met = ratio <= 1.0
    ps_met = True
    for case in cases.values():
        ps_rows = rows_of(case["samples_ns"], "smaps_rollup loop")
        case["rows"] = ps_rows + rows_of(case["other_samples_ns"], "smaps_rollup loop")[1:]
        ps_by_name = {r["method"]: r for r in case["rows"]}
        case["ps_ratio"] = ps_by_name["pagescan ps"]["ratio"]
        # smem ran in other rounds: compared through the ratios to the loop of each
        case["smem_ratio"] = ps_by_name["smem (command)"]["ratio"] if smem else None
        case["met"] = case["ps_ratio"] <= 1.5 and (smem is None or case["ps_ratio"] < case["smem_ratio"])
        ps_met = ps_met and case["met"]

    print(f"target pid {pid}: {facts['mappings']} mappings, {facts['mapped'] / (1 << 30):.2f} GiB mapped "
          f"({info['mappings']} made, {info['mapped'] / (1 << 30):.2f} GiB), "
          f"RSS {facts['rss'] / MIB:.0f} MiB, THP {facts['huge'] / MIB:.0f} MiB, zero pages "
          f"{facts['zero'] / MIB:.0f} MiB, {facts['regions']} PAGEMAP_SCAN regions; built in {build:.1f} s")
    m = machine()
    print(f"pagescan {m['pagescan']} on Linux {m['kernel']} {m['machine']}, {m['cpus']} CPUs, "
          f"Python {m['python']}, numpy {m['numpy']}; {args.repeat} rounds\n")
    print_rows(rows, "smaps parse")
    print(f"\ntarget: `pagescan stat` not slower than the smaps parse: {'met' if met else 'not met'} "
          f"(stat {ratio:.2f}x, stat --json {ratio_json:.2f}x, mapping_stats {by_name['mapping_stats']['ratio']:.2f}x)")
    for name, case in cases.items():
        print(f"\nthe whole machine, {name}: {nprocs} processes (kernel threads included), "
              f"{args.idle} idle ones started\n")
        print_rows(case["rows"], "smaps_rollup loop")
        print(f"({args.ps_repeat} rounds of the first {len(whole)}; the rest in {args.repeat} rounds of their own "
              "with the loop again, each against that loop)")
        if case["c_own_ns"]:
            print(f"(the C loop's own time, without the round trip: median "
                  f"{statistics.median(case['c_own_ns']) / 1e6:.2f} ms)")
        print(f"target: `pagescan ps` within 1.5x of the smaps_rollup loop and faster than smem: "
              f"{'met' if case['met'] else 'not met'} (ps {case['ps_ratio']:.2f}x"
              + (f", smem {case['smem_ratio']:.2f}x)" if smem else ", smem not installed)"))
    if args.json:
        write_json(args.json, {
            **m, "target": facts, "made": info, "repeat": args.repeat, "rows": rows, "samples_ns": samples,
            "ratio": ratio, "ratio_json": ratio_json, "met": met, "processes": nprocs, "whole_machine": cases,
            "ps_met": ps_met,
        })
    return 1 if args.strict and not (met and ps_met) else 0


if __name__ == "__main__":
    sys.exit(main())
