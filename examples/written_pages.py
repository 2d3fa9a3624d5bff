"""Which pages did this function write?

Watch a buffer with pagescan.WriteWatch (the kernel tracks writes itself: userfaultfd
write-protect in asynchronous mode), call the function, and ask which pages it wrote.

Run: python examples/written_pages.py            (Linux 6.7 or later)
"""

from __future__ import annotations

import mmap

import numpy as np

import pagescan


def update(table: np.ndarray, rows: list[int]) -> None:
    """The function under test: it should write only the rows it is given."""
    table[rows] += 1.0


def written_pages(table: np.ndarray, rows: list[int]) -> np.ndarray:
    """Page numbers (from the start of ``table``) that ``update`` wrote."""
    with pagescan.WriteWatch(table) as ww:    # arms every page of the table
        update(table, rows)
        addresses = ww.get()                  # uint64 addresses of the written pages
    return (addresses - table.ctypes.data) // mmap.PAGESIZE


def main() -> None:
    # 1024 rows of 1024 float64: each row is two 4 KiB pages. pagescan.zeros puts the
    # array on pages of its own, so no other object's writes are reported.
    table = pagescan.zeros((1024, 1024))
    pages = written_pages(table, [3, 500, 1000])
    print("pages written:", pages.tolist())
    print("rows written:", sorted({int(p) * mmap.PAGESIZE // table[0].nbytes for p in pages}))


if __name__ == "__main__":
    main()
