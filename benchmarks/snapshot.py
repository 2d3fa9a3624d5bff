"""Checkpoint and restore throughput of ``pagescan.snapshot`` against a plain write.

    python benchmarks/snapshot.py                 # 256 MiB, 5 rounds, about 30 s
    python benchmarks/snapshot.py --size 1024 --fraction 0.05 --json out.json

Measured, in this process, on ``--size`` MiB of random (incompressible, non-zero)
private anonymous memory, with the files in ``--dir`` (default: a temporary directory
under the current one, so the file system is the one you run it on):

1. **full checkpoint**: ``checkpoint()`` of a fresh ``Checkpointer`` (every page), against
   a plain ``write`` + ``fsync`` of the same bytes to a new file in the same directory.
   Target: >= 70% of the plain write's throughput.
2. **incremental checkpoints**: for each of ``--fraction`` (default 0.1%, 1% and 10%),
   that share of the pages (scattered at random) rewritten, then ``checkpoint()``;
   against a plain ``write`` + ``fsync`` of as many bytes. Target: >= 70% at each.
   A small checkpoint runs first, untimed: the first incremental checkpoint of a
   process also imports and prepares the write tracking's scan (milliseconds).
3. **restore**: eager ``restore()`` of the newest generation (full + incremental chain)
   into fresh memory, with the file in the page cache and after
   ``posix_fadvise(DONTNEED)`` dropped it (cold); and into fresh ``MADV_HUGEPAGE``
   memory against fresh ``MADV_NOHUGEPAGE`` (4 KiB) memory, the order alternating by
   round. Target: huge pages no slower than 4 KiB pages.
4. **lazy restore**: time from entering ``lazy_restore()`` to the first byte read
   (against the whole eager restore), and pages per second until every page is in:
   with prefetch and no touches (target >= 900,000 pages/s), and without prefetch,
   touching every page in order (each fault served with a 64 KiB window).

Figures are medians of ``--repeat`` rounds. A checkpoint and its plain write share the
file system's writeback and journal, so which of the two runs first alternates from
round to round.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pagescan._uapi import libc
from pagescan._uapi.mman import MADV
from pagescan.snapshot import Checkpointer, lazy_restore, restore

from _common import write_json

P = mmap.PAGESIZE
MiB = 1 << 20


HUGE = 2 * MiB
#: Pages per second a lazy restore with prefetch must reach (CRIU's lazy-pages daemon
#: served 264,847 pages in 0.30 s on the reference machine).
LAZY_PPS = 900_000


class Region:
    """Anonymous private memory with a numpy view (unpopulated until touched).

    ``huge``: ``None`` leaves the system's THP policy alone; ``True`` starts the region
    on a 2 MiB boundary and asks for huge pages (``MADV_HUGEPAGE``); ``False`` refuses
    them (``MADV_NOHUGEPAGE``: 4 KiB pages)."""

    def __init__(self, nbytes: int, huge: bool | None = None) -> None:
        pad = HUGE if huge is not None else 0
        self.mm = mmap.mmap(-1, nbytes + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        if huge is not None:
            self.addr = -(-self.addr // HUGE) * HUGE
            libc.madvise(self.addr, nbytes, MADV.HUGEPAGE if huge else MADV.NOHUGEPAGE)
        self.nbytes = nbytes
        self.view = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.addr))

    def close(self) -> None:
        del self.view
        self.mm.close()

    @property
    def region(self) -> tuple[int, int]:
        return (self.addr, self.nbytes)


def fs_type(path: str) -> str:
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, typ = line.split()[:3]
            if os.path.abspath(path).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, f"{typ} on {dev}"
    return kind


def plain_write(path: str, data: Any) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += os.write(fd, mv[done : done + 64 * MiB])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def anon_huge_bytes(region: tuple[int, int]) -> float:
    """``AnonHugePages`` of the mapping holding ``region`` (``/proc/self/smaps``), in bytes."""
    a = region[0]
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= a < hi
            elif inside and head == "AnonHugePages:":
                return float(line.split()[1]) * 1024
    return 0.0


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def one_round(args: argparse.Namespace, src: Region, workdir: str, rng: np.random.Generator,
              rnd: int) -> dict[str, float]:
    size = src.nbytes
    npages = size // P
    out: dict[str, float] = {}
    ck = os.path.join(workdir, "bench.ck")
    plain = os.path.join(workdir, "plain.bin")
    unlink(ck)

    # (1) full checkpoint vs plain write of the same bytes, (2) incremental vs a plain
    # write of as many bytes. Each pair shares the file system's writeback and journal:
    # the one that runs first in a round alternates.
    plain_first = rnd % 2 == 0
    v = src.view.reshape(npages, P)

    def rewrite(k: int) -> None:
        pages = np.sort(rng.choice(npages, k, replace=False))  # scattered
        v[pages, 0] += np.uint8(1)  # one byte per page: the page is written
        v[pages, 0] |= np.uint8(1)  # never all-zero

    if plain_first:
        out["plain_full_s"] = plain_write(plain, src.mm)
        unlink(plain)
    with Checkpointer(ck, [src.region]) as c:
        info = c.checkpoint()
        assert info.full and info.bytes == size
        out["full_s"] = info.seconds
        if not plain_first:
            out["plain_full_s"] = plain_write(plain, src.mm)
            unlink(plain)
        rewrite(16)
        c.checkpoint()  # warm-up, untimed
        for fraction in args.fraction:
            k = max(1, int(npages * fraction))
            rewrite(k)
            if plain_first:
                out[f"plain_incr_s@{fraction}"] = plain_write(plain, src.view[: k * P])
                unlink(plain)
            info = c.checkpoint()
            assert info.pages == k and info.zero_pages == 0
            out[f"incr_s@{fraction}"] = info.seconds
            out[f"incr_bytes@{fraction}"] = info.bytes
            if not plain_first:
                out[f"plain_incr_s@{fraction}"] = plain_write(plain, src.view[: k * P])
                unlink(plain)
    if not args.restore:
        unlink(ck)
        return out

    # (3) eager restore, warm and cold
    for label in ("restore_warm_s", "restore_cold_s"):
        if label == "restore_cold_s":
            drop_cache(ck)
        dst = Region(size)
        t = time.perf_counter()
        restore(ck, [dst.region])
        out[label] = time.perf_counter() - t
        if label == "restore_warm_s" and not np.array_equal(dst.view, src.view):
            raise SystemExit("restore is not bit-exact")
        dst.close()

    # (3b) eager restore into huge-page memory against 4 KiB pages (fresh memory each
    # time; which runs first alternates)
    for huge in (rnd % 2 == 0, rnd % 2 == 1):
        dst = Region(size, huge=huge)
        t = time.perf_counter()
        restore(ck, [dst.region])
        out["restore_huge_s" if huge else "restore_small_s"] = time.perf_counter() - t
        if not np.array_equal(dst.view, src.view):
            raise SystemExit("restore into huge pages is not bit-exact" if huge else "restore is not bit-exact")
        if huge:
            out["huge_bytes"] = anon_huge_bytes(dst.region)
        dst.close()

    # (4) lazy: first access, then every page with prefetch
    dst = Region(size)
    t = time.perf_counter()
    with lazy_restore(ck, [dst.region], prefetch=True) as fh:
        _ = int(dst.view[0])
        out["lazy_first_s"] = time.perf_counter() - t
        if not fh.wait(300):
            raise SystemExit("lazy restore did not finish")
        out["lazy_prefetch_s"] = time.perf_counter() - t
    if not np.array_equal(dst.view, src.view):
        raise SystemExit("lazy restore is not bit-exact")
    dst.close()
    # ... and without prefetch, touching every page in order
    dst = Region(size)
    t = time.perf_counter()
    with lazy_restore(ck, [dst.region], prefetch=False) as fh:
        touch = dst.view.reshape(npages, P)[:, 0]
        int(touch.sum(dtype=np.uint64))  # one read per page, in address order, holding the GIL
        del touch
        if not fh.wait(60):
            raise SystemExit("lazy restore (touch-driven) did not finish")
        out["lazy_touch_s"] = time.perf_counter() - t
    dst.close()
    out["file_bytes"] = os.path.getsize(ck)
    unlink(ck)
    return out


def fractions_arg(text: str) -> list[float]:
    out = [float(x) for x in text.split(",") if x]
    if not out or not all(0 < f <= 1 for f in out):
        raise argparse.ArgumentTypeError(f"fractions in (0, 1], comma separated, not {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="MiB of memory (default 256)")
    ap.add_argument("--fraction", type=fractions_arg, default=[0.001, 0.01, 0.1], metavar="F[,F...]",
                    help="shares of pages rewritten, one incremental checkpoint each (default 0.001,0.01,0.1)")
    ap.add_argument("--no-restore", dest="restore", action="store_false",
                    help="checkpoints only (skip the eager and lazy restores)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (default 5); medians are reported")
    ap.add_argument("--dir", help="directory for the files (default: a temporary one under the current directory)")
    ap.add_argument("--json", metavar="PATH", help="also write every sample and the medians as JSON")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)

    size = args.size * MiB
    rng = np.random.default_rng(0)
    src = Region(size)
    for s in range(0, size, 64 * MiB):
        e = min(size, s + 64 * MiB)
        src.view[s:e] = rng.integers(1, 256, e - s, dtype=np.uint8)
    base = args.dir or os.getcwd()
    workdir = tempfile.mkdtemp(prefix="pagescan-bench-", dir=base)
    samples: list[dict[str, float]] = []
    try:
        for r in range(args.repeat):
            samples.append(one_round(args, src, workdir, rng, r))
            print(f"round {r + 1}/{args.repeat} done", file=sys.stderr)
    finally:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
        src.close()

    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    npages = size // P
    rate: Callable[[float, float], float] = lambda nbytes, secs: nbytes / secs / MiB
    full_ratio = med["plain_full_s"] / med["full_s"]
    incr = {}
    for f in args.fraction:
        per_round = [s[f"plain_incr_s@{f}"] / s[f"incr_s@{f}"] for s in samples]
        incr[f] = (med[f"plain_incr_s@{f}"] / med[f"incr_s@{f}"], min(per_round), max(per_round))
    targets = {"full >= 0.70": full_ratio >= 0.7}
    targets.update({f"incremental {f:.1%} >= 0.70": incr[f][0] >= 0.7 for f in args.fraction})
    results: dict[str, Any] = {
        "full_vs_plain": full_ratio,
        "incremental_vs_plain": {str(f): r[0] for f, r in incr.items()},
        "incremental_vs_plain_per_round_range": {str(f): [r[1], r[2]] for f, r in incr.items()},
    }

    def ok(flag: bool) -> str:
        return "met" if flag else "NOT met"

    print(f"\nsnapshot: {args.size} MiB of random private anonymous memory ({npages} pages); incremental: "
          f"{', '.join(f'{f:.1%}' for f in args.fraction)} of the pages, scattered; files on {fs_type(base)}; "
          f"median of {args.repeat} rounds")
    rows = [
        ("plain write + fsync, same bytes", med["plain_full_s"], rate(size, med["plain_full_s"]), "", ""),
        ("full checkpoint", med["full_s"], rate(size, med["full_s"]), f"{full_ratio:.2f}x",
         f">= 0.70x {ok(full_ratio >= 0.7)}"),
    ]
    for f in args.fraction:
        nb, (fr, lo, hi) = med[f"incr_bytes@{f}"], incr[f]
        rows += [
            (f"plain write + fsync, {nb / MiB:.1f} MiB", med[f"plain_incr_s@{f}"], rate(nb, med[f"plain_incr_s@{f}"]),
             "", ""),
            (f"incremental checkpoint, {f:.1%}", med[f"incr_s@{f}"], rate(nb, med[f"incr_s@{f}"]), f"{fr:.2f}x",
             f">= 0.70x {ok(fr >= 0.7)} (rounds {lo:.2f}-{hi:.2f}x)"),
        ]
    if args.restore:
        huge_ratio = med["restore_huge_s"] / med["restore_small_s"]
        lazy_pps = npages / med["lazy_prefetch_s"]
        touch_pps = npages / med["lazy_touch_s"]
        results.update({
            "lazy_prefetch_pages_per_s": lazy_pps,
            "lazy_touch_pages_per_s": touch_pps,
            "lazy_first_access_s": med["lazy_first_s"],
            "eager_restore_s": med["restore_warm_s"],
            "huge_restore_vs_4k": huge_ratio,
        })
        targets["lazy prefetch >= 900000 pages/s"] = lazy_pps >= LAZY_PPS
        targets["huge-page restore <= 1.00x 4 KiB"] = huge_ratio <= 1.0
        rows += [
            ("eager restore (file in page cache)", med["restore_warm_s"], rate(size, med["restore_warm_s"]), "", ""),
            ("eager restore (cold file)", med["restore_cold_s"], rate(size, med["restore_cold_s"]), "", ""),
            ("eager restore into 4 KiB pages", med["restore_small_s"], rate(size, med["restore_small_s"]), "", ""),
            (f"eager restore into huge pages ({med['huge_bytes'] / size:.0%} huge)", med["restore_huge_s"],
             rate(size, med["restore_huge_s"]), f"{huge_ratio:.2f}x", f"<= 1.00x 4 KiB {ok(huge_ratio <= 1.0)}"),
        ]
    results["targets_met"] = targets
    print(f"{'':40s} {'seconds':>8s} {'MiB/s':>8s} {'vs plain':>9s}  target")
    for name, secs, mibs, ratio, target in rows:
        print(f"{name:40s} {secs:8.3f} {mibs:8.0f} {ratio:>9s}  {target}")
    if args.restore:
        print()
        print(f"{'lazy restore':40s} {'seconds':>8s} {'pages/s':>9s}")
        print(f"{'first access (enter + first touch)':40s} {med['lazy_first_s']:8.4f} {'':>9s}  "
              f"eager restore: {med['restore_warm_s']:.3f} s "
              f"({med['restore_warm_s'] / med['lazy_first_s']:.0f}x longer)")
        print(f"{'every page, prefetch, no touches':40s} {med['lazy_prefetch_s']:8.3f} {lazy_pps:9.0f}  "
              f">= {LAZY_PPS} {ok(lazy_pps >= LAZY_PPS)}")
        print(f"{'every page, no prefetch, touched in order':40s} {med['lazy_touch_s']:8.3f} {touch_pps:9.0f}")
        print(f"\nfile after {len(args.fraction) + 2} generations: {med['file_bytes'] / MiB:.1f} MiB")

    if args.json:
        write_json(args.json, {"args": vars(args), "samples": samples, "medians": med, "results": results})
    if args.strict and not all(targets.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
