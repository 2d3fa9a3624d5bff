"""Test-side memory helpers: real mappings made with libc, written and read directly.

Tests play the part of the user's program, so unlike the library they touch memory
directly (``ctypes.memset``/``string_at``). Never touch a MISSING-registered range from
the test process itself: the access would block on a fault nobody serves.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap as _mmap
import os
import time
from collections.abc import Iterator
from typing import Any

from pagescan._uapi import libc
from pagescan._uapi.mman import MADV, MAP, MAP_HUGE_SHIFT, PROT

P = _mmap.PAGESIZE


def thp_size() -> int:
    with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
        return int(f.read())


class Mapping:
    """An mmap'd region owned by a test. ``m[i]`` is the address of page ``i``."""

    def __init__(
        self,
        npages: int,
        *,
        prot: int = PROT.READ | PROT.WRITE,
        flags: int = MAP.PRIVATE | MAP.ANONYMOUS,
        fd: int = -1,
        offset: int = 0,
        addr: int = 0,
        page_size: int = P,
        align: int = 0,
    ) -> None:
        self.page_size = page_size
        self.npages = npages
        self.length = npages * page_size
        self._reserve: tuple[int, int] | None = None
        if align:
            # Reserve length+align, then map at an aligned address inside it.
            span = self.length + align
            base = libc.mmap(0, span, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE)
            aligned = (base + align - 1) & ~(align - 1)
            self._reserve = (base, span)
            addr = aligned
            flags |= MAP.FIXED
        self.addr = libc.mmap(addr, self.length, prot, flags, fd, offset)
        self.closed = False

    def __getitem__(self, page: int) -> int:
        return self.addr + page * self.page_size

    @property
    def end(self) -> int:
        return self.addr + self.length

    def write(self, page: int = 0, npages: int = 1, value: int = 1) -> None:
        """Write ``value`` to every byte of pages ``[page, page+npages)``."""
        ctypes.memset(self[page], value, npages * self.page_size)

    def touch(self, page: int = 0, npages: int = 1, value: int = 1) -> None:
        """Write one byte in each page of ``[page, page+npages)``."""
        for i in range(page, page + npages):
            ctypes.memset(self[i], value, 1)

    def read(self, page: int = 0, npages: int = 1) -> bytes:
        """Read every page (faults pages in; private anon maps the zero page)."""
        return ctypes.string_at(self[page], npages * self.page_size)

    def read_byte(self, page: int) -> int:
        return ctypes.string_at(self[page], 1)[0]

    def madvise(self, advice: int, page: int = 0, npages: int | None = None) -> None:
        n = self.npages - page if npages is None else npages
        libc.madvise(self[page], n * self.page_size, advice)

    def mprotect(self, prot: int, page: int = 0, npages: int | None = None) -> None:
        n = self.npages - page if npages is None else npages
        libc.mprotect(self[page], n * self.page_size, prot)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._reserve:
                libc.munmap(*self._reserve)
            else:
                libc.munmap(self.addr, self.length)

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def anon(npages: int, **kw: Any) -> Mapping:
    return Mapping(npages, **kw)


def shared_anon(npages: int) -> Mapping:
    return Mapping(npages, flags=MAP.SHARED | MAP.ANONYMOUS)


def memfd_mapping(npages: int, *, shared: bool = True, hugetlb: bool = False, page_size: int = P) -> Mapping:
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
    fd = os.memfd_create("pagescan-test", flags)
    try:
        if not hugetlb:
            os.ftruncate(fd, npages * page_size)
        return Mapping(npages, flags=MAP.SHARED if shared else MAP.PRIVATE, fd=fd, page_size=page_size)
    finally:
        os.close(fd)


def file_mapping(path: str | os.PathLike[str], npages: int, *, shared: bool = False, fill: int = ord("c"),
                 prot: int = PROT.READ | PROT.WRITE) -> Mapping:
    with open(path, "wb") as f:
        f.write(bytes([fill]) * (npages * P))
    fd = os.open(path, os.O_RDWR)
    try:
        return Mapping(npages, prot=prot, flags=MAP.SHARED if shared else MAP.PRIVATE, fd=fd)
    finally:
        os.close(fd)


def hugetlb_anon(n_huge: int, huge_size: int = 2 << 20, shared: bool = False) -> Mapping:
    bits = huge_size.bit_length() - 1
    flags = (MAP.SHARED if shared else MAP.PRIVATE) | MAP.ANONYMOUS | MAP.HUGETLB | (bits << MAP_HUGE_SHIFT)
    m = Mapping(n_huge * (huge_size // P), flags=flags)
    return m


def collapse(m: Mapping, offset: int = 0, npages: int | None = None) -> None:
    """MADV_COLLAPSE, retrying what is transient: EAGAIN (pages briefly off the LRU) and
    ENOMEM (no free huge page at that moment: memory fragmented by the suite's other
    tests; the kernel is asked to compact once, as root may)."""
    compacted = False
    for _ in range(50):
        try:
            m.madvise(MADV.COLLAPSE, offset, npages)
            return
        except BlockingIOError:
            time.sleep(0.01)
        except OSError as err:
            if err.errno != errno.ENOMEM:
                raise
            if not compacted:
                with contextlib.suppress(OSError), open("/proc/sys/vm/compact_memory", "w") as f:
                    f.write("1")
                compacted = True
            time.sleep(0.01)
    m.madvise(MADV.COLLAPSE, offset, npages)


def thp(n_huge: int = 1) -> Mapping:
    """PMD-aligned anonymous memory with MADV_HUGEPAGE, written so THPs form.

    Falls back to MADV_COLLAPSE if the fault path did not give huge pages.
    """
    h = thp_size()
    m = Mapping(n_huge * (h // P), align=h)
    m.madvise(MADV.HUGEPAGE)
    m.write(0, m.npages)
    if not is_thp(m):
        with contextlib.suppress(OSError):
            collapse(m)
    return m


def smaps_field(m: Mapping, field: str) -> int:
    """Sum of ``field`` (in kB) over the smaps entries that overlap ``m``."""
    from .oracle import smaps_sum

    return smaps_sum(field, m.addr, m.end) // 1024


def vmflags(addr: int) -> list[str]:
    """``VmFlags`` of our VMA holding ``addr`` (empty if unmapped): ``uw`` = uffd-WP, ..."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    return []


def is_thp(m: Mapping) -> bool:
    return smaps_field(m, "AnonHugePages") * 1024 >= thp_size()


def pagemap_entries(start: int, npages: int, pid: int | str = "self") -> list[int]:
    """Raw /proc/PID/pagemap entries (the independent oracle)."""
    import struct

    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        data = os.pread(fd, npages * 8, start // P * 8)
    finally:
        os.close(fd)
    return list(struct.unpack(f"<{npages}Q", data))


@contextlib.contextmanager
def child_process(fn: Any) -> Iterator[int]:
    """Fork a child running ``fn()`` then ``os._exit(0)``; kill and reap it after."""
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            fn()
            os.write(w, b"1")
            os.close(w)
            signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    try:
        os.read(r, 1)
        yield pid
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
