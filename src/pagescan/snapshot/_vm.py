"""Batched copies between a process's memory and numpy buffers.

``process_vm_readv``/``process_vm_writev`` with up to ``IOV_MAX`` (1024) remote iovecs
per call, built with numpy. An address that is not mapped fails with EFAULT; Python
never dereferences it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np

from .._uapi import libc

__all__ = ["read_runs", "write_runs"]

IOV_MAX = 1024
_IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])


def _transfer(pid: int, local: np.ndarray, starts: np.ndarray, lengths: np.ndarray, write: bool) -> None:
    """Copy runs ``[starts[i], starts[i]+lengths[i])`` to/from consecutive bytes of ``local``."""
    if not len(starts):
        return
    total = int(lengths.sum())
    if local.nbytes < total:
        raise ValueError("local buffer too small")
    base = int(local.ctypes.data)
    fn = libc.process_vm_writev if write else libc.process_vm_readv
    verb = "write" if write else "read"
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    i = 0
    n = len(starts)
    while i < n:
        j = min(n, i + IOV_MAX)
        remote = np.empty(j - i, dtype=_IOVEC)
        remote["base"] = starts[i:j]
        remote["len"] = lengths[i:j]
        want = int(lengths[i:j].sum())
        loc = np.empty(1, dtype=_IOVEC)
        loc["base"] = base + int(offsets[i])
        loc["len"] = want
        try:
            got = fn(pid, ctypes.c_void_p(int(loc.ctypes.data)), 1, ctypes.c_void_p(int(remote.ctypes.data)), j - i)
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror}: cannot {verb} {int(starts[i]):#x} in pid {pid}"
                          + (" (not mapped there?)" if err.errno == errno.EFAULT else "")) from None
        if got != want:
            # A partial transfer stops at the first iovec that fails; find it and retry
            # the rest so the caller gets the real error for that address.
            done_runs = int(np.searchsorted(np.cumsum(lengths[i:j]), got, side="right"))
            if done_runs == 0 or got == 0:
                # Runs are whole pages: the first page not transferred is the culprit.
                bad = int(starts[i]) + (got // mmap.PAGESIZE) * mmap.PAGESIZE
                raise OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: cannot {verb} {bad:#x} in pid {pid} "
                              "(not mapped there?)")
            i += done_runs
            continue
        i = j


def read_runs(pid: int, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
    """Read the runs of ``pid`` into consecutive bytes of ``out``."""
    _transfer(pid, out, np.asarray(starts, np.uint64), np.asarray(lengths, np.uint64), write=False)


def write_runs(pid: int, starts: np.ndarray, lengths: np.ndarray, data: np.ndarray) -> None:
    """Write consecutive bytes of ``data`` into the runs of ``pid``."""
    _transfer(pid, data, np.asarray(starts, np.uint64), np.asarray(lengths, np.uint64), write=True)
