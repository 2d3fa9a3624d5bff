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
"""

from __future__ import annotations

import argparse
import os
import select
import sys
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
from pagescan.userfaultfd import PagefaultEvent, Userfaultfd  # noqa: E402

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
          f"async WP {fmt_ns(fasync * 1e9)} (median of {min(FAULT_PAGES, npages)})")
    if args.json:
        write_json(args.json, {"machine": machine(), "size": n, "written": written, "runs": len(runs),
                               "repeat": args.repeat, "samples": s, "switch": switch, "back": back,
                               "fault_sync": fsync, "fault_async": fasync})
    return 0


if __name__ == "__main__":
    sys.exit(main())
