"""Checkpoints of Python state (a dict of numpy arrays) against np.savez, np.load and pickle.

    python benchmarks/state.py                      # 1 GiB of state, 3 rounds (~1.5 min here)
    python benchmarks/state.py --size 256 --repeat 5 --json out.json
    python benchmarks/state.py --busy-thread        # with a thread looping in Python meanwhile
    python benchmarks/state.py --lazy-scale 1G,2G,4G,8G          # also time to first element at each size
    python benchmarks/state.py --lazy-only --lazy-scale 1G,2G,4G,8G  # only that (~1 min here)

The state is a dict of float64 arrays (one int64 ``step``) of sizes from 8 bytes to
256 MiB, totalling ``--size`` MiB, allocated with ``numpy.empty`` (malloc: small arrays
share heap pages) and filled with random (incompressible) values, so every page has
been touched before anything is timed (first touch of never-used memory costs 2-3 s
per GiB in some VMs; it is paid once, in the warm-up). All files go to ``--dir``
(default: a temporary directory under the current one: the same file system for
every method). Measured, each a median of ``--repeat`` rounds:

1. **full checkpoint**: ``Checkpointer(path, state).checkpoint()`` against
   ``np.savez`` of the dict + ``fsync``, and ``pickle.dump`` + ``fsync``.
   Target: >= 0.9x np.savez's throughput.
2. **incremental checkpoint** with 1% of the pages written (one value per page,
   scattered): against ``np.savez`` of the whole state. Target: >= 30x faster.
3. **eager load**: ``load(path)`` against ``np.load`` of the ``.npz`` (every member
   read into a dict) and ``pickle.load``. Both allocate new memory: first touch is in
   both. Target: >= 1x np.load.
4. **lazy load, time to first element**: ``load(path, lazy=True)`` and reading one
   element, in a fresh process that has started the fault server first
   (``start_fault_server(wait=...)``, as a program that lazy-loads does at its start;
   the time is counted from when the server is ready) (``--lazy-scale``: also for
   states of those sizes, mostly zero chunks with one page in 64 written, built in
   scratch files; the sizes are measured in alternating rounds; ``--forked-handler``:
   also without the server, the load forking its handler, alternating with it;
   ``--owner-holds MIB``: the loading process first populates that much other memory).
   Target: <= 5 ms, within 1.5x between 1 GiB and 8 GiB.
5. **working set**: a fresh process lazy-loads the state and touches 10% of its pages
   (one element each, a fixed random order), three times: plain (no working set), a
   recording run (``record=True``: every first touch faults alone and is recorded in
   the file), then a run that prefetches the recorded set first. Target: the third
   >= 3x faster than the first lazy run; recording off by default if it costs more
   than 5%.

``--busy-thread``: a thread of this process runs a Python loop throughout, on both
sides (a program's worker or server thread: every call of 1-3 that releases the GIL
then waits to get it back; 4 and 5 run in fresh processes, the loop takes a CPU).

The machine is whatever you run it on; figures from a shared, noisy VM are indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from pagescan.snapshot import Checkpointer, load
from pagescan.snapshot._store import Store

from _common import fmt_size, machine, median, print_table, size_arg, timed, write_json

P = mmap.PAGESIZE
MiB = 1 << 20


def make_state(total: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Arrays of 8 bytes .. 256 MiB totalling about ``total`` bytes (random values, all pages touched)."""
    sizes = [8, 100, 4096 + 8, 65536, MiB, 16 * MiB, 64 * MiB]
    out: dict[str, np.ndarray] = {"step": np.zeros(1, np.int64)}
    left = total - 8
    i = 0
    for s in sizes[1:]:
        if left <= 0:
            break
        n = min(s, left)
        out[f"a{i}"] = rng.random(max(1, n // 8))
        left -= out[f"a{i}"].nbytes
        i += 1
    while left > 0:
        n = min(256 * MiB, left)
        out[f"a{i}"] = rng.random(max(1, n // 8))
        left -= out[f"a{i}"].nbytes
        i += 1
    return out


def nbytes(state: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in state.values())


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seconds(fn: Any) -> float:
    return timed(fn) / 1e9


def savez(path: str, state: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **state)
        f.flush()
        os.fsync(f.fileno())


def npload(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def pdump(path: str, state: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=5)
        f.flush()
        os.fsync(f.fileno())


def pload(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def touch_pages(state: dict[str, np.ndarray], frac: float, rng: np.random.Generator) -> int:
    """Write one value in ``frac`` of each array's pages (scattered); return pages written."""
    n = 0
    for a in state.values():
        per_page = max(1, P // a.itemsize)
        pages = (a.size + per_page - 1) // per_page
        k = int(pages * frac)
        if k:
            idx = rng.choice(pages, k, replace=False) * per_page
            a[idx] += 1
            n += k
    return n


LAZY_FIRST = """
import sys, time, json
t0 = time.perf_counter()
from pagescan.snapshot import load, start_fault_server
import numpy as np
ballast = np.ones(int(sys.argv[5]) << 17)  # other state the program holds (MiB), populated
ready = 0.0
if sys.argv[4] == "server":  # a program that lazy-loads starts it first thing; timed once it is ready
    assert start_fault_server(wait=60)
    ready = time.perf_counter() - t0
t1 = time.perf_counter()
d = load(sys.argv[1], lazy=True)
x = float(d[sys.argv[2]][int(sys.argv[3])])
t2 = time.perf_counter()
d.handler.close()
print(json.dumps({"first": t2 - t1, "ready": ready}))
"""

WORKING_SET = """
import sys, time, json
import numpy as np
from pagescan.snapshot import load
path, frac, seed, mode = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
d = load(path, lazy=True, record=mode == "record", working_set=mode != "plain")
names = sorted(d)
rng = np.random.default_rng(seed)
plan = []
for k in names:
    a = d[k]
    per = max(1, 4096 // a.itemsize)
    pages = (a.size + per - 1) // per
    for p in rng.choice(pages, max(1, int(pages * frac)), replace=False).tolist():
        plan.append((k, p * per))
order = np.random.default_rng(seed + 1).permutation(len(plan))
s = 0.0
t1 = time.perf_counter()
for i in order.tolist():
    k, j = plan[i]
    s += float(d[k].flat[j])
t2 = time.perf_counter()
if mode != "record":
    d.handler.wait()
del d  # a recording is saved when the arrays are gone
print(json.dumps({"touch": t2 - t1, "total": t2 - t0, "pages": len(plan)}))
"""


def run_child(code: str, *argv: str) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr)
    out: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def drop_sections(path: str) -> None:
    """Cut optional sections (a recorded working set) off the end of a checkpoint."""
    with Store(path) as st:
        if not st.sections:
            return
        end = st.sections[0].offset
    os.truncate(path, end)


def lazy_first(path: str, name: str, index: int, server: bool = True, holds: int = 0) -> float:
    """``server``: with the fault server started (and ready) before the load; without
    it, the load forks the handler and its guardian. ``holds``: MiB of other memory the
    loading process has populated first."""
    return run_child(LAZY_FIRST, path, name, str(index), "server" if server else "fork", str(holds))["first"]


def scale_file(workdir: str, nbytes: int) -> str:
    """A checkpoint of ``nbytes`` of state: a page-owning array, one page in 64 written
    (the rest zero chunks), and one small random array."""
    path = os.path.join(workdir, f"scale-{nbytes >> 20}.ck")
    import pagescan

    st = {"zeros": pagescan.zeros(nbytes // 8), "x": np.random.default_rng(1).random(1000)}
    st["zeros"][:: 64 * P // 8] = 1.0
    with Checkpointer(path, st) as ck:
        ck.checkpoint()
    del st
    return path


def lazy_scale(workdir: str, sizes: list[int], repeat: int, forked: bool = False, holds: int = 0) -> dict[str, list[float]]:
    """Time to first element at each size, in alternating rounds (seconds per round);
    ``forked``: also without the fault server, alternating with it; ``holds``: see
    :func:`lazy_first`."""
    paths = {s: scale_file(workdir, s) for s in sizes}
    out: dict[str, list[float]] = {fmt_size(s): [] for s in sizes}
    if forked:
        out.update({f"{fmt_size(s)}, forked handler": [] for s in sizes})
    for r in range(repeat):
        k = r % len(sizes)
        for s in sizes[k:] + sizes[:k]:
            for server in ((r % 2 == 0, r % 2 == 1) if forked else (True,)):
                key = fmt_size(s) if server else f"{fmt_size(s)}, forked handler"
                out[key].append(lazy_first(paths[s], "x", 500, server, holds))
    for p in paths.values():
        os.unlink(p)
    return out


def sizes_arg(text: str) -> list[int]:
    parse = size_arg(1 << 20)
    return [parse(t) for t in text.split(",") if t]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="MiB of state (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per measurement (medians; default 3)")
    ap.add_argument("--dir", default=None, help="directory for the files (default: a temporary one under .)")
    ap.add_argument("--lazy-scale", type=sizes_arg, default=[], metavar="SIZES",
                    help="also time the first lazy element for states of these sizes (e.g. 1G,2G,4G,8G)")
    ap.add_argument("--lazy-only", action="store_true", help="only the --lazy-scale measurement")
    ap.add_argument("--owner-holds", type=int, default=0, metavar="MIB",
                    help="--lazy-scale: the loading process first populates this much other memory")
    ap.add_argument("--forked-handler", action="store_true",
                    help="--lazy-scale also without the fault server (the handler forked at load), in alternating rounds")
    ap.add_argument("--busy-thread", action="store_true",
                    help="a thread loops in Python throughout (both sides), as a program's worker or "
                         "server thread would")
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="pagescan-state-", dir=args.dir or ".")
    try:
        scale = lazy_scale(workdir, args.lazy_scale, args.repeat, args.forked_handler, args.owner_holds) if args.lazy_scale else {}
        r: dict[str, list[float]] = {}
        size = 0
        if not args.lazy_only:
            with busy_thread(args.busy_thread):
                r, size, nstate, pages_written = state_rounds(args, workdir)
        med = {k: m for k, v in r.items() if (m := median(v)) is not None}
        rows: list[tuple[str, float, str, str, str]] = []
        if r:
            gib = size / (1 << 30)
            rows += [
                ("full checkpoint", med["full"], f"{gib / med['full']:.2f} GiB/s",
                 f"{med['savez'] / med['full']:.2f}x np.savez", ">= 0.9x"),
                ("np.savez + fsync", med["savez"], f"{gib / med['savez']:.2f} GiB/s", "", ""),
                ("pickle.dump + fsync", med["pickle_dump"], f"{gib / med['pickle_dump']:.2f} GiB/s",
                 f"{med['savez'] / med['pickle_dump']:.2f}x np.savez", ""),
                (f"incremental, 1% of pages ({pages_written})", med["incr"], "",
                 f"{med['savez'] / med['incr']:.0f}x faster than np.savez", ">= 30x"),
                ("load (eager)", med["load"], f"{gib / med['load']:.2f} GiB/s",
                 f"{med['npload'] / med['load']:.2f}x np.load", ">= 1x"),
                ("np.load (.npz)", med["npload"], f"{gib / med['npload']:.2f} GiB/s", "", ""),
                ("pickle.load", med["pickle_load"], f"{gib / med['pickle_load']:.2f} GiB/s", "", ""),
                ("lazy load: first element", med["lazy_first"], "", f"{med['lazy_first'] * 1e3:.1f} ms", "<= 5 ms"),
                ("10% touched, lazy, no working set", med["ws_norecord"], "", "", ""),
                ("10% touched, lazy, recording", med["ws_first"], "",
                 f"recording costs {100 * (med['ws_first'] / med['ws_norecord'] - 1):+.0f}% (off by default)", "<= 5%"),
                ("10% touched, lazy, recorded set first", med["ws_second"], "",
                 f"{med['ws_first'] / med['ws_second']:.2f}x the recording run, "
                 f"{med['ws_norecord'] / med['ws_second']:.2f}x the plain one", ">= 3x"),
            ]
        smed = {k: m for k, v in scale.items() if (m := median(v)) is not None}
        for k, v in smed.items():
            spread = f"{min(scale[k]) * 1e3:.1f}-{max(scale[k]) * 1e3:.1f} ms"
            base, _, forked = k.partition(", ")
            rows.append((f"lazy first element, {base} of state{', ' + forked if forked else ''}", v, "",
                         f"{v * 1e3:.1f} ms (runs: {spread})", "" if forked else "<= 5 ms"))
        for k, v in list(smed.items()):
            if k.endswith(", forked handler") and (own := smed.get(k.split(",")[0])):
                rows.append((f"lazy first element, {k.split(',')[0]}: forked / fault server", own, "",
                             f"{v / own:.2f}x faster with the server", ""))
        smed = {k: v for k, v in smed.items() if not k.endswith(", forked handler")}
        if len(smed) > 1:
            lo, hi = min(smed.values()), max(smed.values())
            first, last = list(smed)[0], list(smed)[-1]
            rows.append((f"lazy first element, {first} .. {last}", hi, "",
                         f"largest / smallest median {hi / lo:.2f}x", "<= 1.5x"))
        print_table(["measurement", "seconds", "throughput", "ratio", "target"],
                    [(name, f"{secs:.4f}", thr, ratio, target) for name, secs, thr, ratio, target in rows], "<>><<")
        what = f"{size / MiB:.0f} MiB in {nstate} arrays; " if r else ""
        busy = "; a thread looping in Python throughout" if args.busy_thread and r else ""
        print(f"\n{what}medians of {args.repeat} round(s){busy}")
        if args.json:
            write_json(args.json, {"machine": machine(), "size_bytes": size, "repeat": args.repeat, "raw": r,
                                   "median": med, "lazy_scale": scale})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


@contextlib.contextmanager
def busy_thread(on: bool) -> Iterator[None]:
    """With ``on``: a thread incrementing a counter in a Python loop until the block ends."""
    if not on:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    th = threading.Thread(target=loop, name="busy", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def state_rounds(args: argparse.Namespace, workdir: str) -> tuple[dict[str, list[float]], int, int, int]:
    """Measurements 1-5 on a state of ``--size`` MiB: samples per measurement, size, arrays, pages written."""
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    state = make_state(args.size * MiB, rng)
    size = nbytes(state)
    print(f"state: {len(state)} arrays, {size / MiB:.0f} MiB (made and touched in {time.perf_counter() - t:.1f} s); "
          f"files in {workdir}", flush=True)
    npz, pkl, ck = (os.path.join(workdir, n) for n in ("state.npz", "state.pkl", "state.ck"))
    r: dict[str, list[float]] = {k: [] for k in (
        "savez", "npload", "pickle_dump", "pickle_load", "full", "incr", "load", "lazy_first",
        "ws_first", "ws_second", "ws_norecord")}
    pages_written = 0
    for rnd in range(args.repeat):
        r["savez"].append(seconds(lambda: savez(npz, state)))
        r["npload"].append(seconds(lambda: npload(npz)))
        os.unlink(npz)
        r["pickle_dump"].append(seconds(lambda: pdump(pkl, state)))
        r["pickle_load"].append(seconds(lambda: pload(pkl)))
        os.unlink(pkl)
        if os.path.exists(ck):
            os.unlink(ck)
        with Checkpointer(ck, state) as c:
            r["full"].append(c.checkpoint().seconds)
            pages_written = touch_pages(state, 0.01, rng)
            r["incr"].append(c.checkpoint().seconds)
        r["load"].append(seconds(lambda: load(ck)))
        big = max(state, key=lambda k: state[k].nbytes)
        r["lazy_first"].append(lazy_first(ck, big, state[big].size // 2))
        r["ws_norecord"].append(run_child(WORKING_SET, ck, "0.1", str(rnd), "plain")["total"])
        r["ws_first"].append(run_child(WORKING_SET, ck, "0.1", str(rnd), "record")["total"])
        r["ws_second"].append(run_child(WORKING_SET, ck, "0.1", str(rnd), "use")["total"])
        print(f"round {rnd + 1}/{args.repeat} done", flush=True)
    return r, size, len(state), pages_written


if __name__ == "__main__":
    sys.exit(main())
