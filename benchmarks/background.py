"""Background checkpoints: the pause, the writer's stalls and throughput, extra memory.

    python benchmarks/background.py                 # 1 GiB of state, 5 rounds each
    python benchmarks/background.py --size 4G --repeat 3 --json out.json
    python benchmarks/background.py --only "wait=False, fork twin;BGSAVE" --repeat 10

The state is ``--size`` bytes in 8 ``pagescan.zeros`` arrays, every page written
once in a warm-up (first touch of never-used memory costs 2-2.7 s/GiB in this VM).
A writer thread runs throughout: each step writes one int64 into each of 16 pages of
a hot 1% of the state (a fancy-index assignment, under the GIL) and records the time.
Before each round the main thread writes one value into 10% of the pages (random,
outside the timing). Side by side, in a shuffled order each round, ``--repeat`` rounds:

* ``sync (auto)``: ``Checkpointer.checkpoint()`` as it is: it picks, per checkpoint,
  the ptrace path or a fork, whichever its measured costs say is quicker;
* ``sync, ptrace``: its instant always taken by the helper process (pre-copy rounds,
  then every thread stopped with ptrace: ``docs/background-checkpoints.md``);
* ``sync, fork twin``: its instant always taken by forking a frozen twin (the
  fallback, and what ``checkpoint()`` did before the ptrace path);
* ``sync, old path``: what ``checkpoint()`` did before issue 13 (copy from the live
  process while it writes: fuzzy, torn under concurrent writes), for "no slower than
  before";
* ``background (auto)``, ``background, ptrace``, ``background, fork twin``: the same
  three with ``checkpoint(wait=False)``, then ``result()``; and ``wait=False, fork twin
  (walk, then fork)``: the fork path as before it forked first (the written pages
  found and re-armed inside the pause, as ``wait=True`` still does);
* ``fork() snapshot``: the Redis ``BGSAVE`` way: ``os.fork()``; the child writes every
  array to a file, ``fsync``, exits; the parent waits for it.

Reported: the pause (the call until it returns; for ``fork()`` the fork), the time
the helper held every thread stopped (ptrace path), the longest
gap between two writer steps that overlaps the pause (the stall the writer sees),
the writer's steps per second while the work runs against with nothing running, the
extra memory while it runs (PSS of this process and its children, sampled every
10 ms, minus this process's PSS before), and the total time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PAGE, fmt_ns, fmt_size, machine, print_table, size_arg, write_json  # noqa: E402

import pagescan  # noqa: E402
from pagescan.snapshot import Checkpointer  # noqa: E402
from pagescan.snapshot import PendingCheckpoint, _read_self  # noqa: E402

NARRAYS = 8


def pss_kib(pid: int | str = "self") -> int:
    """``Pss`` of a process in KiB (``smaps_rollup``); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def children() -> list[int]:
    out: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pass
    return out


class Writer:
    """A thread writing 16 pages of the hot set per step; it counts steps and records
    every gap between two steps longer than 0.1 ms (start, end)."""

    def __init__(self, flats: list[np.ndarray]) -> None:
        self.flat = flats[0]  # the hot 1% lies in the first array
        per_page = PAGE // 8
        hot = max(16, sum(f.size for f in flats) // per_page // 100)
        hot = min(hot, self.flat.size // per_page)
        self.idx = (np.arange(hot) * per_page).astype(np.int64)
        self.count = 0
        self.gaps: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.th = threading.Thread(target=self.run, name="writer")

    def run(self) -> None:
        rng = np.random.default_rng(7)
        picks = rng.integers(0, len(self.idx), (4096, 16))
        k = 0
        clock = time.perf_counter
        last = clock()
        while not self.stop.is_set():
            self.flat[self.idx[picks[k & 4095]]] = k
            k += 1
            self.count = k
            now = clock()
            if now - last > 1e-4:
                self.gaps.append((last, now))
            last = now

    def stall(self, t0: float, t1: float) -> float:
        """The longest gap between two steps that overlaps [t0, t1]."""
        return max((e - s for s, e in self.gaps if e >= t0 and s <= t1), default=1e-4)
def sample_memory(done: Callable[[], bool], base: int) -> int:
    """Peak (PSS of us + our children) - ``base``, in KiB, until ``done()``."""
    peak = 0
    while not done():
        peak = max(peak, pss_kib() + sum(pss_kib(c) for c in children()) - base)
        time.sleep(0.01)
    return peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=size_arg(NARRAYS * 64 * PAGE), default=1 << 30, help="state size (default 1G)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per method (default 5)")
    ap.add_argument("--written", type=float, default=0.10,
                    help="fraction of the pages written before each round (default 0.10)")
    ap.add_argument("--dir", default=None, help="directory for the files (default: a temporary one here)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON to this file")
    ap.add_argument("--only", default=None,
                    help="run only the methods whose names contain one of these ';'-separated strings "
                         "(e.g. 'fork twin;BGSAVE')")
    args = ap.parse_args(argv)

    d = tempfile.mkdtemp(prefix="bg-bench-", dir=args.dir or ".")
    try:
        return run(args, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(args: argparse.Namespace, d: str) -> int:
    n = args.size // NARRAYS // 8
    arrays = {f"a{i}": pagescan.zeros(n, np.int64) for i in range(NARRAYS)}
    flats = list(arrays.values())
    t = time.perf_counter()
    for i, a in enumerate(flats):
        a[:] = i + 1  # first touch: paid here
    print(f"state {fmt_size(args.size)} in {NARRAYS} arrays; first touch {time.perf_counter() - t:.1f} s")
    per_page = PAGE // 8
    npages = args.size // PAGE
    rng = np.random.default_rng(1)

    def dirty() -> None:
        """One value into ``--written`` of the pages (random)."""
        for a in flats:
            pages = rng.choice(a.size // per_page, int(a.size // per_page * args.written), replace=False)
            a[pages * per_page] += 1

    ck = Checkpointer(os.path.join(d, "state.ckpt"), arrays)
    ck.checkpoint()  # the full first generation (untimed)
    writer = Writer(flats)
    writer.th.start()
    time.sleep(0.5)
    t0, c0 = time.perf_counter(), writer.count
    time.sleep(1.0)
    idle_rate = (writer.count - c0) / (time.perf_counter() - t0)

    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, pause: float, t_start: float, t_ret: float, t_end: float, mem: int, c0: int,
               stop: float = float("nan")) -> None:
        gap = writer.stall(t_start, t_ret)
        rate = (writer.count - c0) / max(t_end - t_start, 1e-9)
        r = results.setdefault(name, {"pause": [], "stop": [], "stall": [], "rate": [], "mem": [], "total": []})
        r["stop"].append(stop)
        r["pause"].append(pause)
        r["stall"].append(gap)
        r["rate"].append(rate / idle_rate)
        r["mem"].append(mem * 1024)
        r["total"].append(t_end - t_start)

    def stopped(info: Any) -> float:
        return float(ck.last_instant.get("stop", float("nan"))) if info.method == "ptrace" else float("nan")

    def sync(how: bool | None = None) -> None:
        ck._use_ptrace = how
        try:
            c0, s = writer.count, time.perf_counter()
            info = ck.checkpoint()
            e = time.perf_counter()
        finally:
            ck._use_ptrace = None
        assert how is None or info.method == ("ptrace" if how else "fork"), info
        name = {None: "sync checkpoint() (auto)", True: "sync, ptrace", False: "sync, fork twin"}
        record(name[how], e - s, s, e, e, 0, c0, stopped(info))
        if how is None:
            picks.append(info.method)

    def sync_old() -> None:
        store = ck._store
        assert store is not None
        c0, s = writer.count, time.perf_counter()
        chunks = ck._find_written(False)
        ck._write(store, chunks, False, None, s, _read_self, PendingCheckpoint(0))
        ck._carry = np.empty(0, np.int64)
        e = time.perf_counter()
        record("sync, old path (fuzzy)", e - s, s, e, e, 0, c0)

    def background(how: bool | None = None, fork_first: bool = True) -> None:
        base = pss_kib() + sum(pss_kib(c) for c in children())  # the idle helper included
        ck._use_ptrace = how
        ck._fork_first = fork_first
        try:
            c0, s = writer.count, time.perf_counter()
            fut = ck.checkpoint(wait=False)
            r = time.perf_counter()
        finally:
            ck._use_ptrace = None
            ck._fork_first = True
        mem = sample_memory(fut.done, base)
        info = fut.result()
        e = time.perf_counter()
        assert how is None or info.method == ("ptrace" if how else "fork"), info
        name = {None: "checkpoint(wait=False) (auto)", True: "wait=False, ptrace", False: "wait=False, fork twin"}
        record(name[how] + ("" if fork_first else " (walk, then fork)"), r - s, s, r, e, mem, c0, stopped(info))
        if how is None:
            picks.append(info.method)

    def fork_snapshot() -> None:
        path = os.path.join(d, "fork.bin")
        base = pss_kib() + sum(pss_kib(c) for c in children())
        c0, s = writer.count, time.perf_counter()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: write everything, like BGSAVE
            try:
                with open(path, "wb") as f:
                    for a in flats:
                        f.write(a.reshape(-1).view(np.uint8).data)
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                os._exit(0)
        r = time.perf_counter()
        status: list[Any] = []
        waiter = threading.Thread(target=lambda: status.append(os.waitpid(pid, 0)))
        waiter.start()
        mem = sample_memory(lambda: bool(status), base)
        waiter.join()
        e = time.perf_counter()
        record("fork() snapshot (BGSAVE)", r - s, s, r, e, mem, c0)
        os.unlink(path)  # freeing 1 GiB of blocks: not on the next method's fsync
        os.sync()

    picks: list[str] = []
    named: dict[str, Callable[[], None]] = {
        "sync checkpoint() (auto)": sync, "sync, ptrace": lambda: sync(True),
        "sync, fork twin": lambda: sync(False), "sync, old path (fuzzy)": sync_old,
        "checkpoint(wait=False) (auto)": background, "wait=False, ptrace": lambda: background(True),
        "wait=False, fork twin": lambda: background(False),
        "wait=False, fork twin (walk, then fork)": lambda: background(False, False),
        "fork() snapshot (BGSAVE)": fork_snapshot}
    words = [w.strip() for w in args.only.split(";")] if args.only else [""]
    methods = [m for name, m in named.items() if any(w in name for w in words)]
    for m in methods:  # warm-up round
        dirty()
        m()
    results.clear()
    picks.clear()
    nm = len(methods)
    shuffle = np.random.default_rng(3)
    for _ in range(args.repeat):
        order = [methods[i] for i in shuffle.permutation(nm)]
        for m in order:
            dirty()
            m()
    writer.stop.set()
    writer.th.join()
    ck.close()

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q))

    print(f"{fmt_size(args.size)} of state ({npages} pages), {args.written:.0%} of the pages written per round, "
          f"{args.repeat} rounds; writer idle rate {idle_rate:,.0f} steps/s")
    rows = []
    for name, r in results.items():
        rows.append([
            name,
            fmt_ns(pct(r["pause"], 50) * 1e9), fmt_ns(pct(r["pause"], 99) * 1e9),
            "-" if np.isnan(r["stop"]).all() else fmt_ns(float(np.nanpercentile(r["stop"], 50)) * 1e9),
            fmt_ns(pct(r["stall"], 50) * 1e9), fmt_ns(pct(r["stall"], 99) * 1e9),
            f"{np.median(r['rate']):.0%}", f"{max(r['mem']) / 2**20:.0f} MiB", fmt_ns(pct(r["total"], 50) * 1e9),
        ])
    print_table(["method", "pause p50", "pause p99", "stopped p50", "writer stall p50", "stall p99", "writer rate",
                 "extra mem (max)", "total p50"], rows)
    print("(auto) picked: " + ", ".join(f"{m} {picks.count(m)}x" for m in sorted(set(picks))))
    if args.json:
        write_json(args.json, {"machine": machine(), "size": args.size, "written": args.written, "repeat": args.repeat,
                               "idle_rate": idle_rate, "results": results, "auto_picked": picks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
