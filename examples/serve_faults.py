"""Serve the page faults of a buffer from a file, in another process.

pagescan.FaultHandler registers the buffer for userfaultfd MISSING faults and serves
each page from the file on first touch (and prefetches ahead while idle), in a handler
process: a thread of this process could not, it would wait for the GIL held by the
faulting thread. If the handler dies, untouched pages raise SIGBUS instead of hanging.

Run: python examples/serve_faults.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

import pagescan


def main() -> None:
    n = 32 << 20                                          # 32 MiB
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.bin")
        data = np.random.default_rng(1).integers(0, 255, n, dtype=np.uint8)
        data.tofile(path)

        buf = pagescan.empty(n, dtype=np.uint8)           # no pages yet
        t0 = time.perf_counter()
        with pagescan.FileSource(path) as source, \
                pagescan.FaultHandler([(buf.ctypes.data, n)], source) as handler:
            first = int(buf[n - 1])                       # faults; served at once
            t1 = time.perf_counter()
            handler.wait()                                # every page is in
            served, total = handler.progress()
        print(f"first byte read after {1e3 * (t1 - t0):.1f} ms; {served}/{total} pages served")
        assert first == data[n - 1] and np.array_equal(buf, data)
        print("buffer equals the file")


if __name__ == "__main__":
    main()
