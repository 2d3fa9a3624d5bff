#!/usr/bin/env python3
"""Dirty-page tracking methods side by side, on the same workloads and the same machine.

Methods (each watches a region of private anonymous memory, 4 KiB pages only --
``MADV_NOHUGEPAGE`` -- every page written once before tracking starts):

``writewatch``  ``pagescan.WriteWatch``: userfaultfd WP-async arms the pages; a write
                faults once and the kernel un-protects the page itself; ``get`` is one
                ``PAGEMAP_SCAN`` walk that also re-arms the pages it reports.
``uffd-sync``   userfaultfd write-protect *without* WP_ASYNC: a write blocks until a
                handler un-protects the page. The handler is a forked child process
                (a fault taken while holding the GIL would deadlock a handler thread);
                it reads many fault messages per ``read``, records each page in a
                MAP_SHARED bitmap, then un-protects it (runs of pages in one ioctl).
                ``get`` reads the bitmap; reset re-protects the pages it reported.
``soft-dirty``  ``/proc/self/clear_refs`` (``4``) + pagemap bit 55; skipped, with the
                reason, when the kernel lacks ``CONFIG_MEM_SOFT_DIRTY``. Note that
                ``clear_refs`` resets the whole process, not just the region.
``hash``        a 64-bit hash of every page (xxhash's xxh3_64 if installed, else
                blake2b with an 8-byte digest), compared with the previous hashes.
``shadow``      numpy compare of the region (uint64 words, one row per page) against a
                shadow copy, then copy the changed pages into the shadow.

Workloads:

``sweep N``     the process_memwatch RFC sweep: an N-page region (N = 1, 10, 100, 1000,
                10000), every page written, then one get+clear.
``wine``        Wine MR 7871's micro-benchmark shape: 8192 pages written by T threads
                (T = 1, 8; each thread writes its own contiguous share once), in
                sequential or random order; with the reset flag (get and re-arm in one
                call, ``GetWriteWatch(WRITE_WATCH_FLAG_RESET)``) or without it (get, then
                a separate full reset, ``ResetWriteWatch``).
``big``         a ``--size`` region (default 1 GiB) with 0.1 / 1 / 10 % of its pages
                written (random pages, seeded, the same for every method, in ascending
                order).

Metrics, medians over rounds (each round: write, write again, get(+reset), check that
the method reported exactly the pages written):

* per-write cost: time of the round's first writes (one 8-byte store per page through
  a numpy index assignment, which releases the GIL) divided by the number of writes
  ("raw"), minus the same stores repeated on the now unarmed pages ("net"). With T
  threads it is the wall time of the write phase over all writes (throughput).
* get+reset cost: the time the method takes to tell which pages were written and to
  start tracking again.

The C reference (``track_ref.c``, compiled here; column ``C``) does WriteWatch's work
with raw syscalls on its own region of the same size, for every workload and round:
the same pages stored by as many threads, the same stores again, then one
``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING`` and ``category_mask = return_mask =
WRITTEN`` (or, for Wine's ``get;reset``, the scan and then ``UFFDIO_WRITEPROTECT`` of
the region), checked like the Python methods. It runs right after ``writewatch``.

Targets (issue 12): ``writewatch`` get+reset <= 1.1x the C get+WP at 0.01 %, 1 % and
10 % of ``--size``; WP-async per-write cost (net, ``big 1%``) <= 1.1x the same writes
from C on an armed range; the synchronous handler <= 10 us per write where its reads
are batched (net, the 8-thread Wine workloads, median of the four variants). The ratios
to hashing and to the shadow diff are printed for information.

The methods and the measurement live in the package (``pagescan._tracking``, which
``pagescan bench`` runs in a compact form); this script adds the sweep and Wine
workloads, the targets, the tables, JSON and plots. Run ``python benchmarks/tracking.py
--help`` for the options.
"""

from __future__ import annotations

import argparse
import itertools
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pagescan._tracking import (
    METHODS,
    SHADOW_CHUNK,
    SYNC_BATCH,
    WORDS,
    Workload,
    big_workloads,
    figures,
    groups,
    hash_name,
    run,
)

from _common import compile_c, find_compiler, fmt_ns, machine, positive_int, size_arg, write_json

P = mmap.PAGESIZE
SWEEP = (1, 10, 100, 1000, 10000)
WINE_PAGES = 8192
WINE_THREADS = (1, 8)

#: Shares of the big region written per round (the package's three, and 0.01 %).
BIG_PERCENTS = (0.01, 0.1, 1.0, 10.0)
#: writewatch / C: get+reset at these shares of the big region, and per-write cost (1 %).
TARGET_GET_RATIO = 1.1
TARGET_GET_PERCENTS = (0.01, 1.0, 10.0)
TARGET_WRITE_RATIO = 1.1
#: net ns per write under the synchronous handler with batched reads.
TARGET_SYNC_NS = 10000.0
#: The C reference's column.
C_REF = "C"
HERE = Path(__file__).resolve().parent

_now = time.perf_counter_ns


# -- workloads -----------------------------------------------------------------------------


def make_workloads(size: int, rounds: dict[str, int], wine_warmup: int = 1) -> list[Workload]:
    """The sweep, then the Wine shapes, then ``big_workloads`` over ``size``."""
    out = []
    for n in SWEEP:

        def every_page(rng: np.random.Generator, pages: np.ndarray = np.arange(n)) -> list[np.ndarray]:
            return [pages]

        out.append(Workload(
            key=f"sweep-{n}", label=f"sweep {n} page{'s' if n > 1 else ''}", group=f"sweep-{n}",
            npages=n, threads=1, fused=True, rounds=rounds["sweep"], warmup=1,
            choose=every_page, params={"pages": n, "written": n},
        ))
    for threads in WINE_THREADS:
        for order in ("seq", "rand"):
            for fused in (True, False):
                shares = np.array_split(np.arange(WINE_PAGES), threads)

                def choose(rng: np.random.Generator, shares: list[np.ndarray] = shares,
                           order: str = order) -> list[np.ndarray]:
                    return [rng.permutation(s) for s in shares] if order == "rand" else shares

                out.append(Workload(
                    key=f"wine-{threads}t-{order}-{'reset' if fused else 'noreset'}",
                    label=f"wine {threads}T {order} {'reset' if fused else 'get;reset'}",
                    group="wine", npages=WINE_PAGES, threads=threads, fused=fused,
                    rounds=rounds["wine"], warmup=wine_warmup, choose=choose,
                    params={"pages": WINE_PAGES, "threads": threads, "order": order,
                            "reset_flag": fused, "written": WINE_PAGES},
                ))
    return out + big_workloads(size, rounds["big"], BIG_PERCENTS)


def calibrate() -> dict[str, float]:
    """Reference costs on this machine: a trivial syscall, a first-touch page fault."""
    n = 20000
    getppid = os.getppid
    t0 = _now()
    for _ in range(n):
        getppid()
    syscall = (_now() - t0) / n
    pages = 10000
    m = mmap.mmap(-1, pages * P, flags=mmap.MAP_PRIVATE)
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)
        words = np.frombuffer(m, dtype=np.uint64)
        t0 = _now()
        words[::WORDS] = 1
        fault = (_now() - t0) / pages
        del words
    finally:
        m.close()
    return {"syscall_ns": syscall, "first_touch_fault_ns": fault}



# -- the C reference -------------------------------------------------------------------------


def build_c_ref(out_dir: Path) -> Path | None:
    """Compile ``track_ref.c`` ($CC, cc, gcc or clang); None if no compiler runs."""
    compiler = find_compiler()
    if compiler is None:
        return None
    return compile_c(compiler, HERE / "track_ref.c", out_dir / "track_ref", "-pthread")


def _ask(proc: subprocess.Popen[str], line: str) -> list[int]:
    """One command to ``track_ref``; the numbers of its ``ok`` reply."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    reply = proc.stdout.readline().split()
    if not reply or reply[0] != "ok":
        raise RuntimeError(f"track_ref: {' '.join(reply) or 'no reply (crashed?)'}")
    return [int(x) for x in reply[1:]]


def run_c_ref(binary: Path, workloads: Sequence[Workload], seed: int) -> dict[str, Any]:
    """``measure()``'s figures for the C reference: one ``track_ref`` process per region
    group, the same page choices (same generator, same seed and index) round by round."""
    out: dict[str, Any] = {}
    for npages, members in groups(workloads):
        proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        try:
            _ask(proc, f"setup {npages}")
            for index, wl in members:
                rng = np.random.default_rng([seed, index])  # as measure() draws them
                raw: list[float] = []
                base: list[float] = []
                get_ns: list[int] = []
                reset_ns: list[int] = []
                for r in range(wl.warmup + wl.rounds):
                    parts = wl.choose(rng)
                    writes = sum(len(p) for p in parts)
                    line = " ".join(["round", str(int(wl.fused)), str(len(parts)), *(str(len(p)) for p in parts),
                                     *(" ".join(map(str, p.tolist())) for p in parts)])
                    t_raw, t_base, t_get, t_reset, pages = _ask(proc, line)
                    if pages != writes:
                        raise AssertionError(f"track_ref on {wl.key}: reported {pages} pages, {writes} written")
                    if r >= wl.warmup:
                        raw.append(t_raw / writes)
                        base.append(t_base / writes)
                        get_ns.append(t_get)
                        reset_ns.append(t_reset)
                total = [g + r for g, r in zip(get_ns, reset_ns)]
                out[wl.key] = {
                    **figures(wl, raw, base, get_ns, reset_ns),
                    "samples": {"per_write_raw_ns": raw, "per_write_base_ns": base, "get_reset_ns": total},
                }
        finally:
            try:
                stdin.write("quit\n")
                stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            stdout.close()
    return out


# -- targets, tables, files ---------------------------------------------------------------


def evaluate_targets(res: dict[str, Any], workloads: list[Workload]) -> list[dict[str, Any]]:
    results = res["results"]
    big1 = next(w for w in workloads if w.group == "big" and w.params["percent"] == 1.0)
    wine_mt = [w for w in workloads if w.group == "wine" and w.threads == max(WINE_THREADS)]
    targets: list[dict[str, Any]] = []

    def cell(method: str, key: str, metric: str) -> float | None:
        r = results.get(method, {}).get(key)
        return None if r is None else float(r[metric])

    def versus_c(name: str, key: str, metric: str, best: str, limit: float) -> dict[str, Any]:
        ours, theirs = cell("writewatch", key, metric), cell(C_REF, key, metric)
        ours_best, theirs_best = cell("writewatch", key, best), cell(C_REF, key, best)
        ratio = ours / theirs if ours is not None and theirs else None
        return {
            "name": name, "measured": ratio, "unit": "x", "target": f"<= {limit:g}x",
            "met": None if ratio is None else ratio <= limit,
            "best": ours_best / theirs_best if ours_best is not None and theirs_best else None,
            "detail": None if ratio is None else f"{fmt_ns(ours)} / {fmt_ns(theirs)}",
        }

    for pct in TARGET_GET_PERCENTS:
        wl = next((w for w in workloads if w.group == "big" and w.params["percent"] == pct), None)
        if wl is not None:
            targets.append(versus_c(f"get+reset {wl.label}: writewatch / C get+WP", wl.key, "get_reset_ns",
                                    "get_reset_best_ns", TARGET_GET_RATIO))
    targets.append(versus_c(f"per-write cost, WP async ({big1.label}, net): writewatch / C", big1.key,
                            "per_write_net_ns", "per_write_net_best_ns", TARGET_WRITE_RATIO))
    ww = cell("writewatch", big1.key, "get_reset_ns")
    for other in ("hash", "shadow"):
        theirs = cell(other, big1.key, "get_reset_ns")
        if ww and theirs:
            targets.append({
                "name": f"get+reset {big1.label}: {other} / writewatch (information)",
                "measured": theirs / ww, "unit": "x", "target": "none", "met": None,
                "detail": f"{fmt_ns(theirs)} / {fmt_ns(ww)}",
            })
    sync = [cell("uffd-sync", w.key, "per_write_net_ns") for w in wine_mt]
    sync_ok = [s for s in sync if s is not None]
    med = statistics.median(sync_ok) if sync_ok else None
    single = cell("uffd-sync", big1.key, "per_write_net_ns")
    targets.append({
        "name": f"per-write cost, sync uffd handler ({max(WINE_THREADS)}-thread wine, batched reads, net, "
                f"median of {len(wine_mt)})",
        "measured": med, "unit": "ns", "target": f"<= {TARGET_SYNC_NS:g} ns",
        "met": None if med is None else med <= TARGET_SYNC_NS,
        "best": min(b for w in wine_mt if (b := cell("uffd-sync", w.key, "per_write_net_best_ns")) is not None)
        if sync_ok else None,
        "range": [min(sync_ok), max(sync_ok)] if sync_ok else None,
        "single_thread_big_1pct_ns": single,
    })
    return targets


def print_tables(report: dict[str, Any], workloads: list[Workload]) -> None:
    cfg = report["config"]
    cal = cfg["calibration"]
    print()
    print(f"pagescan {cfg['pagescan']} on Linux {cfg['kernel']} {cfg['machine']}, {cfg['cpus']} CPUs, "
          f"Python {cfg['python']}, numpy {cfg['numpy']}; hash: {cfg['hash']}")
    print(f"this machine: a syscall {fmt_ns(cal['syscall_ns'])}, a first-touch page fault "
          f"{fmt_ns(cal['first_touch_fault_ns'])}, load average {cfg['loadavg_before_after'][0][0]:.1f}; "
          f"4 KiB pages only (MADV_NOHUGEPAGE); medians of "
          f"{cfg['rounds']['sweep']}/{cfg['rounds']['wine']}/{cfg['rounds']['big']} rounds (sweep/wine/big)")
    methods = cfg["methods"]
    results, skipped = report["results"], report["skipped"]

    def table(title: str, metric: Callable[[dict[str, Any]], str]) -> None:
        head = ["workload", *methods]
        rows = [head]
        for wl in workloads:
            row = [wl.label]
            for m in methods:
                if m in skipped:
                    row.append("skipped")
                else:
                    r = results.get(m, {}).get(wl.key)
                    row.append("-" if r is None else metric(r))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        print()
        print(title)
        for r in rows:
            print("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))

    table("per-write cost: net (raw - same stores on unarmed pages); with T threads: wall time / writes",
          lambda r: fmt_ns(r["per_write_net_ns"]))
    table("get+reset cost (wine 'get;reset': a get, then a separate reset of the whole region)",
          lambda r: fmt_ns(r["get_reset_ns"]))
    if C_REF in results and "writewatch" in results:
        print()
        print("writewatch against the C reference (same writes, same get+WP, this run): Python / C")
        print(f"{'workload'.ljust(22)}  {'per write (net)':>15}  {'get+reset':>10}")
        for wl in workloads:
            ww, c = results["writewatch"].get(wl.key), results[C_REF].get(wl.key)
            if ww is None or c is None:
                continue
            pw = ww["per_write_net_ns"] / c["per_write_net_ns"] if c["per_write_net_ns"] > 0 else float("nan")
            print(f"{wl.label.ljust(22)}  {pw:>14.2f}x  {ww['get_reset_ns'] / c['get_reset_ns']:>9.2f}x")
    for m, why in skipped.items():
        print(f"{m}: skipped: {why}")
    batching, single = [], [0, 0]
    for wl in workloads:
        c = results.get("uffd-sync", {}).get(wl.key, {}).get("counters")
        if c and c["handler_reads"]:
            if wl.threads > 1:
                batching.append(f"{wl.label} {c['handler_faults'] / c['handler_reads']:.1f}")
            else:
                single[0] += c["handler_faults"]
                single[1] += c["handler_reads"]
    if batching:
        print("uffd-sync handler, faults per read: " + ", ".join(batching)
              + (f"; single-thread workloads {single[0] / single[1]:.1f}" if single[1] else ""))
    print()
    big1_label = next(w.label for w in workloads if w.group == "big" and w.params["percent"] == 1.0)
    for t in report["targets"]:
        if t["measured"] is None:
            measured, status = "n/a", "not measured"
        else:
            m = t["measured"]
            measured = (f"{m:.0f}x" if m >= 100 else f"{m:.2f}x") if t["unit"] == "x" else fmt_ns(m)
            status = "information" if t["met"] is None else "met" if t["met"] else "not met"
        notes = []
        if t.get("detail"):
            notes.append(t["detail"])
        if t.get("best") is not None:
            b = t["best"]
            notes.append("best round " + ((f"{b:.0f}x" if b >= 100 else f"{b:.2f}x") if t["unit"] == "x"
                                          else fmt_ns(b)))
        if t.get("range"):
            notes.append(f"variants {fmt_ns(t['range'][0])} .. {fmt_ns(t['range'][1])}")
        if t.get("single_thread_big_1pct_ns") is not None:
            notes.append(f"single thread ({big1_label}) {fmt_ns(t['single_thread_big_1pct_ns'])}")
        line = f"target {t['name']}: {measured} ({t['target']}): {status}"
        print(line + (f" [{'; '.join(notes)}]" if notes else ""))


def write_png(path: str, report: dict[str, Any], workloads: list[Workload]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # type: ignore[import-not-found, unused-ignore]
    from matplotlib.figure import Figure  # type: ignore[import-not-found, unused-ignore]

    fig = Figure(figsize=(13, 9), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(workloads))
    markers = itertools.cycle("os^Dvx")
    for m in report["config"]["methods"]:
        if m not in report["results"]:
            continue
        res = report["results"][m]
        mk = next(markers)
        net = [max(res[w.key]["per_write_net_ns"], 1.0) if w.key in res else np.nan for w in workloads]
        gr = [res[w.key]["get_reset_ns"] / 1e3 if w.key in res else np.nan for w in workloads]
        top.plot(x, net, marker=mk, label=m)
        bottom.plot(x, gr, marker=mk, label=m)
    top.set_yscale("log")
    top.set_ylabel("per-write cost, net (ns; 1 = no fault)")
    for y, what in ((TARGET_SYNC_NS, "sync handler target"),):
        top.axhline(y, color="grey", ls=":", lw=1)
        top.annotate(what, (1, y), xycoords=("axes fraction", "data"), xytext=(-4, -2),
                     textcoords="offset points", ha="right", va="top", fontsize="x-small", color="grey")
    bottom.set_yscale("log")
    bottom.set_ylabel("get+reset (us)")
    bottom.set_xticks(x, [w.label for w in workloads], rotation=40, ha="right")
    for ax in (top, bottom):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    cfg = report["config"]
    skipped = "; ".join(f"{m} skipped: {why}" for m, why in report["skipped"].items())
    fig.suptitle(f"Dirty-page tracking, Linux {cfg['kernel']} {cfg['machine']}, {cfg['cpus']} CPUs"
                 + (f"\n{skipped}" if skipped else ""), fontsize="medium")
    fig.savefig(path, dpi=110)




# -- command line --------------------------------------------------------------------------


def parse_methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in names]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tracking.py", description=(__doc__ or "").split("\n\n")[0],
                                 epilog="See the module docstring for the methods, workloads and metrics.")
    ap.add_argument("--size", type=size_arg(1000 * P, ", so that 0.1 %% is at least one page"), default=None,
                    help="region of the 'big' workload, e.g. 1G, 256M (default 1G; 128M with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a 128 MiB big region")
    ap.add_argument("--methods", type=parse_methods, default=list(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    ap.add_argument("--rounds", type=positive_int, default=None,
                    help="timed rounds per workload (default 9 sweep / 7 wine / 5 big; --quick 3/2/2)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the page choices (default 1)")
    ap.add_argument("--json", metavar="PATH", help="write the results (with every sample) here")
    ap.add_argument("--png", metavar="PATH", help="plot the results here (needs matplotlib: pagescan[bench])")
    ap.add_argument("--no-c", action="store_true", help="skip the C reference (track_ref.c)")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 if a measured target is not met")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.png:
        try:
            import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            print("tracking.py: --png needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    if args.size is None:
        args.size = (128 << 20) if args.quick else (1 << 30)
    rounds = {"sweep": 3, "wine": 2, "big": 2} if args.quick else {"sweep": 9, "wine": 7, "big": 5}
    if args.rounds:
        rounds = dict.fromkeys(rounds, args.rounds)
    workloads = make_workloads(args.size, rounds, wine_warmup=0 if args.quick else 1)

    def done(method: str, seconds: float) -> None:
        print(f"{method}: skipped" if seconds < 0 else f"{method}: done in {seconds:.1f} s", flush=True)

    t0 = time.monotonic()
    load_before = os.getloadavg()
    calibration = calibrate()
    first = [m for m in args.methods if m == "writewatch"]
    res = run(first, workloads, args.seed, done)
    methods = list(args.methods)
    if first and not args.no_c:
        with tempfile.TemporaryDirectory(prefix="pagescan-bench-") as tmp:
            binary = build_c_ref(Path(tmp))
            if binary is None:
                print("no C compiler found ($CC, cc, gcc, clang): no C column", file=sys.stderr)
            else:
                t1 = time.monotonic()
                res["results"][C_REF] = run_c_ref(binary, workloads, args.seed)
                methods.insert(1, C_REF)
                done(C_REF, time.monotonic() - t1)
    rest = run([m for m in args.methods if m != "writewatch"], workloads, args.seed, done)
    res["results"].update(rest["results"])
    res["skipped"].update(rest["skipped"])
    report: dict[str, Any] = {
        "config": {
            **machine(),
            "methods": methods,
            "size": args.size,
            "quick": args.quick,
            "rounds": rounds,
            "seed": args.seed,
            "hash": hash_name(),
            "sync_batch": SYNC_BATCH,
            "shadow_chunk_pages": SHADOW_CHUNK,
            "page_size": P,
            "thp": "MADV_NOHUGEPAGE on every region (4 KiB PTEs only)",
            "calibration": calibration,
            "loadavg_before_after": [load_before, None],
            "seconds": None,
        },
        "workloads": [{"key": w.key, "label": w.label, "group": w.group, "threads": w.threads,
                       "reset_flag": w.fused, "rounds": w.rounds, **w.params} for w in workloads],
        **res,
    }
    report["targets"] = evaluate_targets(res, workloads)
    report["config"]["seconds"] = round(time.monotonic() - t0, 1)
    report["config"]["loadavg_before_after"][1] = os.getloadavg()
    print_tables(report, workloads)
    print(f"total {report['config']['seconds']} s")
    if args.json:
        write_json(args.json, report)
    if args.png:
        write_png(args.png, report, workloads)
        print(f"wrote {args.png}")
    if args.strict and any(t["met"] is False for t in report["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
