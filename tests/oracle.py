"""The independent oracles the tests check pagescan against, one copy of each.

* :func:`raw_scan`: the ``PAGEMAP_SCAN`` ioctl itself, through ``fcntl`` and the raw
  ``pm_scan_arg`` struct only -- none of pagescan's argument handling, buffer
  management or ``walk_end`` correction.
* :func:`raw_register`: ``UFFDIO_REGISTER`` on a bare uffd fd, so that a registration
  pagescan did not make can be set up.
* :func:`smaps`: a plain parse of ``/proc/PID/smaps`` (the kernel's own accounting),
  sharing no code with ``pagescan._procfs``; :func:`smaps_sum` sums one field over a
  range.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from pagescan import PAGE_REGION_DTYPE
from pagescan._uapi import libc, pagemap
from pagescan._uapi import userfaultfd as U

__all__ = ["RawScan", "SmapsRecord", "raw_errno", "raw_register", "raw_scan", "smaps", "smaps_sum"]


class RawScan(NamedTuple):
    """What one raw ioctl returned: ``ret`` (-1 on error), ``err`` (errno, 0 on
    success), ``walk_end`` as the kernel wrote it, the regions written (``None`` on
    error or with a caller's ``vec``)."""

    ret: int
    err: int
    walk_end: int
    regions: np.ndarray | None


def raw_scan(
    start: int,
    end: int,
    *,
    fd: int | None = None,
    size: int = 96,
    flags: int = 0,
    vec: int | None = None,
    vec_len: int = 0,
    max_pages: int = 0,
    category_inverted: int = 0,
    category_mask: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = 0,
    walk_end: int = 0,
) -> RawScan:
    """One ``PAGEMAP_SCAN`` ioctl on our own pagemap (a fresh fd) unless ``fd`` is given.

    Without ``vec``, a zeroed buffer of ``vec_len`` regions is allocated (capped at
    2**20: a larger ``vec_len`` must come with a range that cannot fill it)."""
    buf = None
    if vec is None:
        buf = np.zeros(max(1, min(vec_len, 1 << 20)), PAGE_REGION_DTYPE)
        vec = int(buf.ctypes.data) if vec_len else 0
    arg = pagemap.pm_scan_arg(size, flags, start, end, walk_end, vec, vec_len, max_pages,
                              category_inverted, category_mask, category_anyof_mask, return_mask)
    own = fd is None
    if own:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            n, err = libc.ioctl(fd, pagemap.PAGEMAP_SCAN, arg), 0
        except OSError as exc:
            n, err = -1, exc.errno or -1
    finally:
        if own:
            os.close(fd)
    return RawScan(n, err, arg.walk_end, None if buf is None or n < 0 else buf[:n])


def raw_errno(start: int, end: int, **kw: Any) -> int:
    """errno of one raw ``PAGEMAP_SCAN`` (0 on success); ``vec_len`` defaults to 8."""
    kw.setdefault("vec_len", 8)
    return raw_scan(start, end, **kw).err


def raw_register(fd: int, start: int, length: int, mode: int) -> int:
    """``UFFDIO_REGISTER`` on a raw uffd fd; returns the ioctls the kernel enabled."""
    arg = U.uffdio_register(U.uffdio_range(start, length), mode, 0)
    libc.ioctl(fd, U.UFFDIO_REGISTER, arg)
    return int(arg.ioctls)


class SmapsRecord(NamedTuple):
    """One smaps entry: its range, name, VmFlags and every ``kB`` field, in bytes."""

    start: int
    end: int
    name: str
    vmflags: frozenset[str]
    fields: dict[str, int]
    perms: str = ""


def smaps(pid: int | str = "self") -> list[SmapsRecord]:
    """Every entry of ``/proc/PID/smaps``."""
    out: list[SmapsRecord] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head, _, rest = line.partition(":")
            if " " not in head and head[:1].isupper():
                if head == "VmFlags":
                    out[-1] = out[-1]._replace(vmflags=frozenset(rest.split()))
                elif rest.split()[-1:] == ["kB"]:
                    out[-1].fields[head] = int(rest.split()[0]) * 1024
            else:
                parts = line.split(None, 5)
                lo, _, hi = parts[0].partition("-")
                name = parts[5].strip() if len(parts) > 5 else ""
                out.append(SmapsRecord(int(lo, 16), int(hi, 16), name, frozenset(), {}, parts[1]))
    return out


def smaps_sum(field: str, lo: int, hi: int, pid: int | str = "self") -> int:
    """Sum of ``field`` (bytes) over the smaps entries that overlap ``[lo, hi)``."""
    return sum(r.fields.get(field, 0) for r in smaps(pid) if r.start < hi and r.end > lo)
