"""Raw kernel probes, cached: what ``PAGEMAP_SCAN`` and ``UFFDIO_API`` accept here.

The low layer of feature discovery. It uses only the raw ABI (:mod:`._uapi`) and the
cached pagemap fd (:mod:`._target`), so the backends, :class:`~pagescan.Userfaultfd`,
:class:`~pagescan.WriteWatch` and :func:`~pagescan.masks` can read it without
importing the public report, :func:`pagescan.capabilities`, which is built on top of
this module and of the public API.

* ``PAGEMAP_SCAN``: every flag and category bit is validated before the range is
  looked at, so an empty-range call (``start == end``, no vector) with one bit set
  returns 0 if the kernel knows the bit and fails with EINVAL if not; ENOTTY means the
  ioctl does not exist (Linux < 6.7). See ``docs/kernel-facts.md``.
* userfaultfd: ``UFFDIO_API`` with no features on a throw-away fd returns every feature
  the kernel supports (the handshake is one-shot, so never on a caller's fd).

Nothing runs at import; each probe runs once per process, on first use.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
from typing import NamedTuple

from ._target import self_target
from ._uapi import libc
from ._uapi.mman import MAP, PROT
from ._uapi.pagemap import PAGEMAP_SCAN, Category, ScanFlag, pm_scan_arg
from ._uapi.userfaultfd import O_CLOEXEC, UFFD_API, UFFD_USER_MODE_ONLY, UFFDIO_API, UffdFeature, UffdIoctl, uffdio_api

__all__ = ["ScanProbe", "UffdProbe", "pagemap_scan", "uffd_api"]

_P = mmap.PAGESIZE


class ScanProbe(NamedTuple):
    """What the ``PAGEMAP_SCAN`` ioctl accepts on this kernel."""

    available: bool
    categories: Category
    flags: ScanFlag
    #: errno of the failed probe (ENOTTY: no ioctl), 0 when available
    error: int


class UffdProbe(NamedTuple):
    """What ``UFFDIO_API`` reported on a throw-away userfaultfd."""

    available: bool
    features: UffdFeature
    ioctls: UffdIoctl
    #: why no userfaultfd could be made (``""`` when available)
    why: str
    #: errno of that failure, 0 when available
    error: int


@functools.cache
def pagemap_scan() -> ScanProbe:
    """Probe ``PAGEMAP_SCAN`` on an empty range of a throw-away page of our own."""
    with libc.RawMapping(_P, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS) as page:
        fd = self_target().fd
        arg = pm_scan_arg(size=96, start=page.addr, end=page.addr)

        def accepted(flags: int, return_mask: int) -> int:
            arg.flags, arg.return_mask = flags, return_mask
            try:
                libc.ioctl(fd, PAGEMAP_SCAN, arg)
                return 0
            except OSError as err:
                return err.errno or errno.EIO

        first = accepted(0, 0)
        if first:
            return ScanProbe(False, Category(0), ScanFlag(0), first)
        cats = flags = 0
        for bit in range(64):
            if not accepted(0, 1 << bit):
                cats |= 1 << bit
            if not accepted(1 << bit, 0):
                flags |= 1 << bit
    return ScanProbe(True, Category(cats), ScanFlag(flags), 0)


@functools.cache
def uffd_api() -> UffdProbe:
    """Every userfaultfd feature and ioctl this kernel offers (a raw handshake).

    Tries a plain uffd, then ``UFFD_USER_MODE_ONLY`` (allowed to unprivileged users
    under ``vm.unprivileged_userfaultfd=0``)."""
    why, error = "", 0
    for extra in (0, UFFD_USER_MODE_ONLY):
        try:
            fd = libc.open_userfaultfd(O_CLOEXEC | extra)
        except OSError as err:
            why, error = f"cannot create a userfaultfd: {err.strerror}", err.errno or errno.EIO
            continue
        try:
            api = uffdio_api(UFFD_API, 0, 0)
            libc.ioctl(fd, UFFDIO_API, api)
            return UffdProbe(True, UffdFeature(api.features), UffdIoctl(api.ioctls), "", 0)
        except OSError as err:
            why, error = f"UFFDIO_API failed: {err.strerror}", err.errno or errno.EIO
        finally:
            os.close(fd)
    return UffdProbe(False, UffdFeature(0), UffdIoctl(0), why, error)
