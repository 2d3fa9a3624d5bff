"""Find the swapped-out pages of another process's heap.

Reads the [heap] range from /proc/PID/maps and asks PAGEMAP_SCAN for the pages that
are SWAPPED (and not guard pages, which the kernel also reports as swapped). Needs
ptrace access to PID (same user, or root).

Run: python examples/swapped_heap.py PID
     python examples/swapped_heap.py --demo   (starts a child that fills its heap and
                                               pages it out; needs a swap device)
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pagescan
from pagescan import Category


def heap_range(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = line.split()[0].split("-")
                return int(lo, 16), int(hi, 16)
    raise LookupError(f"process {pid} has no [heap] mapping")


def swapped_pages(pid: int) -> pagescan.ScanResult:
    start, end = heap_range(pid)
    # The kernel's masks: a page matches when (categories ^ inverted) has every bit of
    # category_mask, so this reads "SWAPPED and not GUARD".
    return pagescan.scan(start, end, pid=pid,
                         category_inverted=Category.GUARD,
                         category_mask=Category.SWAPPED | Category.GUARD,
                         return_mask=Category.SWAPPED)


# The demo child: malloc'ed objects (2 KiB bytes objects live on the brk heap), then
# MADV_PAGEOUT on its heap -- what memory pressure would do, on demand.
CHILD = r"""
import ctypes, os, sys, pagescan
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = [os.urandom(2048) for _ in range(8192)]           # 16 MiB on the heap
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
if libc.madvise(lo, hi - lo, pagescan.MADV.PAGEOUT):
    raise OSError(ctypes.get_errno(), "madvise(MADV_PAGEOUT)")
print("ready", flush=True)
sys.stdin.read()                                          # until the parent is done
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pid", nargs="?", type=int)
    ap.add_argument("--demo", action="store_true")
    args = ap.parse_args()
    if args.demo:
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            report(child.pid)
        finally:
            child.communicate("")
        return
    if args.pid is None:
        ap.error("give a PID, or --demo")
    report(args.pid)


def report(pid: int) -> None:
    start, end = heap_range(pid)
    res = swapped_pages(pid)
    print(f"pid {pid}: heap {start:#x}-{end:#x}, {(end - start) >> 10} KiB; "
          f"{res.pages} pages swapped out in {len(res)} regions")
    for r in list(res)[:5]:
        print(f"  {r.start:#x}-{r.end:#x}  {(r.end - r.start) >> 10} KiB")


if __name__ == "__main__":
    main()
