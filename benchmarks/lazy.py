"""Lazy restore until every page is in (prefetch, no touches), one fresh process per run.

    python benchmarks/lazy.py                            # 1 GiB, 6 rounds, about a minute
    python benchmarks/lazy.py --against /work/main/src   # also another pagescan tree, alternating
    python benchmarks/lazy.py --size 256 --rounds 3 --incremental --hold 1024 --json out.json

A checkpoint of ``--size`` MiB of random (incompressible, non-zero) memory is written
once, in a temporary directory under the current one (so on the file system you run
it on), and stays in the page cache. Each run is a fresh interpreter that maps
``--size`` MiB of new private anonymous memory, enters ``lazy_restore(prefetch=True)``,
reads the first byte and waits until the handler has every page in: the time from
entering to the end of ``wait()`` is the figure (as in ``snapshot.py``'s row "every page,
prefetch, no touches"). Target: >= 900,000 pages/s (CRIU 4.2's lazy-pages daemon served
264,847 pages in 0.30 s on this machine). Every run is checked bit-exact afterwards
(page checksums of the restored memory against the source's; outside the timing).

``--against DIR`` runs the same restores with the pagescan package found in ``DIR``
(a ``src`` directory of another checkout) too; the two alternate within each round,
the first of each round alternating too. Reported: the median of the rounds, the
spread (min-max), the ratio of the medians, the CPU time of the run's child processes
(handler and guardian) and the load average when the rounds ran. Each round also runs
the floor, in a fresh interpreter too: ``MADV_POPULATE_WRITE`` of as much fresh private
memory (the kernel allocating and zeroing the pages, no data copied), which any restore
into fresh memory pays at least (its CPU column is the process's own time). ``--incremental``
adds a second generation in which 10% of the pages changed (the restore then reads
from two generations); ``--hold`` makes each run's process populate that many MiB of
other memory first (its handler is a ``fork``: page tables are copied).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
from _common import machine, positive_int, print_table, write_json

P = mmap.PAGESIZE
MiB = 1 << 20
#: Pages per second a lazy restore with prefetch must reach.
LAZY_PPS = 900_000
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: One run, in a fresh interpreter: argv = checkpoint, size, hold (MiB). Prints JSON.
CHILD = r"""
import ctypes, hashlib, json, mmap, os, resource, sys, time
import numpy as np
from pagescan.snapshot import lazy_restore
from pagescan.snapshot._format import page_checksums
path, size, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if hold:
    other = mmap.mmap(-1, hold << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    np.frombuffer(other, np.uint8)[::4096] = 1
dst = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
view = np.frombuffer(dst, np.uint8)
if path == "-":  # the floor: the kernel populating as much fresh memory, no data
    from pagescan._uapi import libc
    from pagescan._uapi.mman import MADV
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    libc.madvise(addr, size, MADV.POPULATE_WRITE)
    t2, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"s": t2 - t0, "enter_s": 0.0, "ok": True, "digest": "",
                      "child_cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
                      "load": os.getloadavg()[0]}))
    sys.exit(0)
ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
t0 = time.perf_counter()
with lazy_restore(path, [(addr, size)], prefetch=True) as fh:
    t1 = time.perf_counter()
    _ = int(view[0])
    ok = fh.wait(300)
    t2 = time.perf_counter()
ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
digest = hashlib.blake2b(page_checksums(view.reshape(-1, 4096)).tobytes()).hexdigest() if ok else ""
print(json.dumps({"s": t2 - t0, "enter_s": t1 - t0, "ok": ok, "child_cpu_s": cpu, "digest": digest,
                  "load": os.getloadavg()[0], "pagescan": os.path.dirname(os.path.dirname(
                      __import__("pagescan").__file__))}))
"""


def make_checkpoint(path: str, size: int, incremental: bool) -> str:
    """Write the checkpoint; returns the digest of the newest generation's page checksums."""
    import ctypes
    import hashlib

    from pagescan.snapshot import Checkpointer
    from pagescan.snapshot._format import page_checksums

    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    v = np.frombuffer(mm, np.uint8)
    rng = np.random.default_rng(12)
    v.view(np.uint64)[:] = rng.integers(1, 2**63, size // 8, dtype=np.uint64)
    with Checkpointer(path, [(addr, size)]) as c:
        c.checkpoint()
        if incremental:
            n = size // P
            rows = v.reshape(n, P)
            pages = np.sort(rng.choice(n, n // 10, replace=False))
            rows[pages, 0] += np.uint8(1)
            rows[pages, 0] |= np.uint8(1)
            del rows
            c.checkpoint()
    digest = hashlib.blake2b(page_checksums(v.reshape(-1, P)).tobytes()).hexdigest()
    del v
    mm.close()
    return digest


def run(src_dir: str, path: str, size: int, hold: int) -> dict[str, Any]:
    """One run in a fresh interpreter with the pagescan in ``src_dir`` (``path`` "-": the floor)."""
    env = dict(os.environ, PYTHONPATH=src_dir)
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(size), str(hold)], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"a run with {src_dir} failed:\n{out.stderr}")
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=positive_int, default=1024, help="MiB restored (default 1024)")
    ap.add_argument("--rounds", type=positive_int, default=6, help="rounds (default 6)")
    ap.add_argument("--against", metavar="DIR", help="also run the pagescan package in DIR (a src directory)")
    ap.add_argument("--incremental", action="store_true", help="a second generation with 10%% of the pages changed")
    ap.add_argument("--hold", type=int, default=0, metavar="MIB", help="other memory each run populates first")
    ap.add_argument("--dir", default=".", help="where the checkpoint is written (default: here)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args()
    size = args.size * MiB
    npages = size // P
    sides = {"this": os.path.join(HERE, "src")}
    if args.against:
        sides["against"] = os.path.abspath(args.against)
    sides["floor"] = sides["this"]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="lazy-bench-") as d:
        path = os.path.abspath(os.path.join(d, "bench.ck"))  # (each run's interpreter starts elsewhere)
        want = make_checkpoint(path, size, args.incremental)
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
        names = list(sides)
        for r in range(args.rounds):
            for k in names if r % 2 == 0 else names[::-1]:
                res = run(sides[k], "-" if k == "floor" else path, size, args.hold)
                if k != "floor" and (not res["ok"] or res["digest"] != want):
                    raise SystemExit(f"lazy restore with {sides[k]} was not bit-exact (or did not finish)")
                results[k].append(res)
                print(f"round {r + 1} {k:8s} {res['s']:.3f} s  child cpu {res['child_cpu_s']:.3f} s  "
                      f"load {res['load']:.2f}", file=sys.stderr)
    med = {k: statistics.median(x["s"] for x in v) for k, v in results.items()}
    rows = []
    for k, v in results.items():
        s = sorted(x["s"] for x in v)
        name = "floor: MADV_POPULATE_WRITE of as much fresh memory" if k == "floor" else f"{k} ({sides[k]})"
        rows.append([name, f"{med[k]:.3f}", f"{npages / med[k]:,.0f}", f"{s[0]:.3f}-{s[-1]:.3f}",
                     f"{statistics.median(x['child_cpu_s'] for x in v):.3f}",
                     "" if k == "floor" else f"{statistics.median(x['enter_s'] for x in v) * 1e3:.1f}",
                     f"{med[k] / med['floor']:.2f}x",
                     f"{med['against'] / med[k]:.2f}x" if "against" in med and k != "floor" else ""])
    loads = [x["load"] for v in results.values() for x in v]
    print(f"lazy restore of {args.size} MiB ({npages} pages), prefetch, no touches; {args.rounds} rounds, "
          f"load average {min(loads):.2f}-{max(loads):.2f}{', incremental' if args.incremental else ''}"
          f"{f', {args.hold} MiB held' if args.hold else ''}")
    print_table(["run", "median s", "pages/s", "spread s", "CPU s", "enter ms", "vs floor", "speed-up"], rows, "<>")
    ok = npages / med["this"] >= LAZY_PPS
    print(f"target >= {LAZY_PPS:,} pages/s: {'met' if ok else 'NOT met'}")
    if args.json:
        write_json(args.json, {"machine": machine(), "args": vars(args), "sides": sides, "runs": results,
                               "median_s": med, "pages_per_s": {k: npages / m for k, m in med.items()}})


if __name__ == "__main__":
    main()
