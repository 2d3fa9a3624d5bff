"""Move pages from one buffer to another without copying them (UFFDIO_MOVE, Linux 6.8).

The pages themselves change owner: afterwards the destination holds the data and the
source reads as zeros (its pages are gone). On a kernel without UFFDIO_MOVE, or for a
page the kernel will not move (shared with a forked child), move_pages copies instead
and says so in its result.

Run: python examples/move_buffers.py
"""

from __future__ import annotations

import numpy as np

import pagescan


def main() -> None:
    n = 16 << 20                                       # 16 MiB
    src = pagescan.zeros(n, dtype=np.uint8)            # private anonymous, page aligned
    src[:] = np.arange(n, dtype=np.uint64).view(np.uint8)[:n]   # some data
    expected = src[:1 << 20].copy()
    dst = pagescan.empty(n, dtype=np.uint8)            # never touched: no pages yet

    res = pagescan.move_pages(dst.ctypes.data, src.ctypes.data, n)
    print(f"moved {res.moved >> 20} MiB, copied {res.copied >> 20} MiB")

    assert np.array_equal(dst[:1 << 20], expected)
    present = pagescan.scan(src, category_mask=pagescan.Category.PRESENT).pages
    print(f"source pages still present: {present}")    # 0: the pages left with the data
    print("source reads zeros:", not src.any())


if __name__ == "__main__":
    main()
