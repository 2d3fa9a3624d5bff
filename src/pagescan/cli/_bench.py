"""``pagescan bench``: which dirty-page tracking method suits this kernel and machine?

Measures each method of :mod:`pagescan._tracking` on one region of ``--size`` bytes with
0.1 %, 1 % and 10 % of its pages written per round, and prints what a program pays:
the extra cost of a write while tracking, and the time to collect the written pages
and start tracking again. ``benchmarks/tracking.py`` (in the source tree) is the
research harness over the same code, with more workloads and options.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

from .._uapi.since import since
from ._common import UsageError, print_json, table

#: One line per method, for the table's legend.
ABOUT = {
    "writewatch": f"pagescan.WriteWatch: userfaultfd WP-async + PAGEMAP_SCAN (Linux {since('PAGEMAP_SCAN')})",
    "uffd-sync": f"userfaultfd write-protect served by a handler process (Linux {since('UFFDIO_WRITEPROTECT')})",
    "soft-dirty": "/proc/PID/clear_refs + pagemap soft-dirty bits (CONFIG_MEM_SOFT_DIRTY)",
    "hash": "hash every page, compare with the previous hashes",
    "shadow": "compare with a copy of the region, then update the copy",
}
DEFAULT_SIZE = 128 << 20
ROUNDS = 5


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="compare dirty-page tracking methods on this machine (about 5 s)",
        description="Compare dirty-page tracking methods (WriteWatch, synchronous userfaultfd, "
        "soft-dirty, hashing, a shadow copy) on this kernel and machine: the extra cost of a "
        "write while tracking, and the time to collect the written pages and re-arm. "
        "Takes about 5 s with the default 128 MiB region; the time grows with --size "
        "(about 35 s for 1G, mostly hashing).",
    )
    p.add_argument("--size", default="128M",
                   help="region to track, e.g. 64M, 1G (default 128M; at least 1000 pages)")
    p.add_argument("--methods", default=",".join(ABOUT),
                   help=f"comma-separated subset of {','.join(ABOUT)} (default: all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=run, subparser=p)


def _options(args: argparse.Namespace) -> tuple[int, list[str]]:
    from .._units import fmt_size, parse_size

    page = os.sysconf("SC_PAGE_SIZE")
    try:
        size = parse_size(args.size)
    except ValueError as err:
        raise UsageError(f"--size: {err}") from None
    size -= size % page
    if size < 1000 * page:
        raise UsageError(f"--size must be at least 1000 pages ({fmt_size(1000 * page)}), "
                         "so that 0.1 % is at least one page")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABOUT]
    if unknown or not names:
        raise UsageError(f"--methods: unknown method(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(ABOUT)}")
    return size, [m for m in ABOUT if m in names]


def run(args: argparse.Namespace) -> int:
    from .. import _tracking

    size, methods = _options(args)
    t0 = time.monotonic()
    workloads = _tracking.big_workloads(size, ROUNDS)
    res = _tracking.run(methods, workloads)
    seconds = time.monotonic() - t0
    rows = {m: _summary(res["results"][m], workloads, _tracking.TRACKERS[m].intercepts_writes)
            for m in methods if m in res["results"]}
    if args.json:
        print_json({
            "kernel": platform.release(), "machine": platform.machine(), "cpus": len(os.sched_getaffinity(0)),
            "size": size, "rounds": ROUNDS, "hash": _tracking.hash_name(), "seconds": round(seconds, 1),
            "methods": rows, "skipped": res["skipped"],
        })
    else:
        _print(size, workloads, rows, res["skipped"], seconds)
    return 0


def _summary(results: dict[str, Any], workloads: list[Any], intercepts: bool) -> dict[str, Any]:
    """The extra cost per write (from the workload with the most writes: the least noise;
    ``None`` for a method that does not intercept writes; 0 when not measurably above a
    plain store) and get+reset per workload."""
    most = results[max(workloads, key=lambda w: w.params["written"]).key]
    net, plain = most["per_write_net_ns"], most["per_write_base_ns"]
    return {
        "write_ns": None if not intercepts else net if net > plain else 0.0,
        "plain_store_ns": plain,
        "get_reset_ns": {f"{w.params['percent']:g}%": results[w.key]["get_reset_ns"] for w in workloads},
    }


def _print(size: int, workloads: list[Any], rows: dict[str, dict[str, Any]], skipped: dict[str, str],
           seconds: float) -> None:
    from .._units import fmt_ns, fmt_size

    page = os.sysconf("SC_PAGE_SIZE")
    print(f"Dirty-page tracking on Linux {platform.release()} {platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} CPUs: a region of {fmt_size(size)} ({size // page} pages of "
          f"{page // 1024} KiB), medians of {ROUNDS} rounds")
    print()
    pcts = [f"{w.params['percent']:g}%" for w in workloads]
    head = ["method", "extra per write", *(f"get+reset {p}" for p in pcts)]
    body = []
    for m, r in rows.items():
        write = "none" if r["write_ns"] is None else fmt_ns(r["write_ns"]) if r["write_ns"] else "~0"
        body.append([m, write, *(fmt_ns(r["get_reset_ns"][p]) for p in pcts)])
    for m in skipped:
        body.append([m, "skipped", *("" for _ in pcts)])
    print(table(head, body, "<" + ">" * (len(head) - 1), last_free=False))
    print()
    plain = [r["plain_store_ns"] for r in rows.values()]
    noise = f" ({fmt_ns(min(plain))} to {fmt_ns(max(plain))} here)" if plain else ""
    print("extra per write: what the first write to a tracked page costs on top of a plain 8-byte")
    print(f"  store{noise}; ~0: less than one more plain store, within run-to-run noise;")
    print("  none: the method lets writes run untouched and compares contents afterwards.")
    print("get+reset p%: the time to report which pages were written, with p% of the region's")
    print("  pages written, and to start tracking again.")
    print("Timings vary from run to run on a busy machine.")
    print()
    for m in rows:
        print(f"{m:<11} {ABOUT[m]}")
    for m, why in skipped.items():
        print(f"{m:<11} skipped: {why}")
    print(f"\ntook {seconds:.0f} s")
