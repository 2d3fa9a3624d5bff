"""Batched copies between a process's memory and numpy buffers.

``process_vm_readv``/``process_vm_writev`` with up to ``IOV_MAX`` (1024) iovecs on
each side per call, built with numpy. Each run of remote bytes is paired with its own
place in the local buffer, so a run shorter than a page (the end of an entry) still
starts the next run on a row boundary. An address that is not mapped fails with
EFAULT; Python never dereferences it.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

from .._uapi import libc

__all__ = ["read_runs", "write_runs"]

IOV_MAX = 1024
_IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])


def _transfer(pid: int, local: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
              offsets: np.ndarray | None, write: bool) -> None:
    """Copy runs ``[starts[i], starts[i]+lengths[i])`` to/from ``local`` at byte ``offsets[i]``.

    ``offsets=None``: the runs are packed one after another. A partial transfer (the
    kernel stops at the first byte it cannot copy) is resumed where it stopped, so the
    error names the first address that failed.
    """
    if not len(starts):
        return
    starts = starts.astype(np.uint64, copy=True)
    lengths = lengths.astype(np.uint64, copy=True)
    if offsets is None:
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    else:
        offsets = offsets.astype(np.uint64, copy=True)
    if int((offsets + lengths).max()) > local.nbytes:
        raise ValueError("local buffer too small")
    base = np.uint64(local.ctypes.data)
    fn = libc.process_vm_writev if write else libc.process_vm_readv
    verb = "write" if write else "read"
    i, n = 0, len(starts)
    remote = np.empty(min(n, IOV_MAX), dtype=_IOVEC)
    loc = np.empty(min(n, IOV_MAX), dtype=_IOVEC)
    while i < n:
        j = min(n, i + IOV_MAX)
        k = j - i
        remote["base"][:k] = starts[i:j]
        remote["len"][:k] = lengths[i:j]
        loc["base"][:k] = offsets[i:j] + base
        loc["len"][:k] = lengths[i:j]
        want = int(lengths[i:j].sum())
        try:
            got = fn(pid, ctypes.c_void_p(int(loc.ctypes.data)), k, ctypes.c_void_p(int(remote.ctypes.data)), k)
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror}: cannot {verb} {int(starts[i]):#x} in pid {pid}"
                          + (" (not mapped there?)" if err.errno == errno.EFAULT else "")) from None
        if got == want:
            i = j
            continue
        if got == 0:
            raise OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: cannot {verb} {int(starts[i]):#x} in pid "
                          f"{pid} (not mapped there?)")
        # Resume at the first byte not transferred.
        ends = np.cumsum(lengths[i:j])
        r = i + int(np.searchsorted(ends, got, side="right"))
        done_in_r = got - (int(ends[r - i - 1]) if r > i else 0)
        if done_in_r:
            d = np.uint64(done_in_r)
            starts[r] += d
            offsets[r] += d
            lengths[r] -= d
        i = r


def read_runs(pid: int, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray,
              offsets: np.ndarray | None = None) -> None:
    """Read the runs of ``pid`` into ``out`` (at ``offsets``, or packed)."""
    _transfer(pid, out, np.asarray(starts, np.uint64), np.asarray(lengths, np.uint64),
              None if offsets is None else np.asarray(offsets, np.uint64), write=False)


def write_runs(pid: int, starts: np.ndarray, lengths: np.ndarray, data: np.ndarray,
               offsets: np.ndarray | None = None) -> None:
    """Write bytes of ``data`` (at ``offsets``, or packed) into the runs of ``pid``."""
    _transfer(pid, data, np.asarray(starts, np.uint64), np.asarray(lengths, np.uint64),
              None if offsets is None else np.asarray(offsets, np.uint64), write=True)
