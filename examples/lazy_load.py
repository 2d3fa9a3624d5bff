"""Lazy-load a large state from a checkpoint and start at once.

load(path, lazy=True) returns new arrays immediately; each page is read from the file
when first touched (or sooner: a handler process prefetches the rest meanwhile). The
program starts working on the part it needs while the remainder streams in.

Run: python examples/lazy_load.py [--mib N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import pagescan
from pagescan.snapshot import Checkpointer, LoadedState, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="size of the state (default 256)")
    n = ap.parse_args().mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.ckpt")
        big = pagescan.empty(n // 8, dtype=np.float64)
        big[:] = np.arange(len(big), dtype=np.float64)
        with Checkpointer(path, {"big": big, "scale": np.array([2.0])}) as ck:
            ck.checkpoint()
        expected_tail = big[-1000:].copy()
        del big

        t0 = time.perf_counter()
        eager = load(path)
        t_eager = time.perf_counter() - t0
        del eager

        t0 = time.perf_counter()
        state = load(path, lazy=True)                  # returns at once
        assert isinstance(state, LoadedState)          # a dict: the checkpoint was of one
        t_return = time.perf_counter() - t0
        head = float(state["big"][:1000].sum() * state["scale"][0])   # touches 2 pages
        t_first = time.perf_counter() - t0
        assert state.handler is not None
        state.handler.wait()                           # the rest, if you need it all
        t_all = time.perf_counter() - t0

        assert head == 2 * sum(range(1000))
        assert np.array_equal(state["big"][-1000:], expected_tail)
        print(f"{n >> 20} MiB: eager load {t_eager * 1e3:.0f} ms; lazy load returned after "
              f"{t_return * 1e3:.1f} ms, first result after {t_first * 1e3:.1f} ms, "
              f"all pages in after {t_all * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
