"""pagescan.Userfaultfd against the real kernel.

Sources: the kernel selftest catalogue (``tools/testing/selftests/mm/pagemap_ioctl.c`` and ``uffd-unit-tests.c``) Part 2 (UF-API, register-ioctls, UF-MOVE) and
Part 5 X-14; ``docs/kernel-facts.md`` section 4 (every errno).

Rules kept here:

* The test process never touches a MISSING-registered page that is not present, and
  never writes a page that is synchronously write-protected: the access would block on
  a fault nobody serves.
* Faults are taken by forked children reading or writing *our* memory with
  ``process_vm_readv``/``process_vm_writev``: the fault is on our mm, so it is queued to
  our uffd, and the test process (the owner of the memory) resolves it, which is also
  the only process allowed to issue UFFDIO_MOVE.
* Non-cooperative events (REMOVE, UNMAP, REMAP) block the thread that causes them until
  the event is read. They are triggered from a helper thread blocked in a ctypes call
  (the GIL is released there); that thread takes no fault. Closing the uffd releases it.
* Every wait is bounded; every child is killed and reaped in ``finally``; children
  also arm ``alarm()`` so a stray one cannot outlive a hung test for long.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import os
import select
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import pagescan
from pagescan import (
    Category,
    ForkEvent,
    KernelFeatureError,
    PagefaultEvent,
    PagefaultFlag,
    PartialProgressError,
    RegisterMode,
    RemapEvent,
    RemoveEvent,
    UffdFeature,
    UffdIoctl,
    UnknownEvent,
    UnmapEvent,
    Userfaultfd,
    parse_uffd_msgs,
)
from pagescan._uapi import libc
from pagescan._uapi import userfaultfd as U
from pagescan._uapi.mman import MADV, MAP, PROT
from pagescan.userfaultfd import open_userfaultfd

from .conftest import requires_uffd_move
from .procs import Child, forked
from .memory import Mapping, P, anon, hugetlb_anon, memfd_mapping, pagemap_entries, shared_anon, smaps_field, thp_size

H = thp_size()
HT = 2 << 20  # hugetlb page size used here (the hugetlb_2m fixture's pool)
PID = os.getpid

PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_UFFD_WP = 1 << 57

MISSING, WP, MINOR = RegisterMode.MISSING, RegisterMode.WP, RegisterMode.MINOR

# Resolution ioctls: (request, struct, result field) for the raw checks.
RESOLVERS = {
    "COPY": (U.UFFDIO_COPY, U.uffdio_copy, "copy"),
    "ZEROPAGE": (U.UFFDIO_ZEROPAGE, U.uffdio_zeropage, "zeropage"),
    "MOVE": (U.UFFDIO_MOVE, U.uffdio_move, "move"),
    "POISON": (U.UFFDIO_POISON, U.uffdio_poison, "updated"),
    "CONTINUE": (U.UFFDIO_CONTINUE, U.uffdio_continue, "mapped"),
}


# -- helpers ------------------------------------------------------------------------


@contextlib.contextmanager
def expect_errno(code: int, cls: type[BaseException] = OSError) -> Iterator[Any]:
    """pytest.raises(cls) that also pins the errno."""
    with pytest.raises(cls) as info:
        yield info
    err = info.value
    assert isinstance(err, OSError)
    assert err.errno == code, f"expected {errno.errorcode[code]}, got {err!r}"


class Blocker:
    """Run a libc call that blocks on a uffd event in a helper thread (GIL released)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as err:  # reported by join()
                self.error = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 5.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the event-raising thread is still blocked"
        if self.error is not None:
            raise self.error
        return self.value


def wait_readable(uf: Userfaultfd, timeout: float = 5.0) -> None:
    """Poll until a message is pending, without consuming it."""
    poller = select.poll()
    poller.register(uf.fileno(), select.POLLIN)
    ready = poller.poll(int(timeout * 1000))
    assert ready and ready[0][1] & select.POLLIN, f"no uffd message within {timeout} s"


def one_fault(uf: Userfaultfd, timeout: float = 5.0) -> PagefaultEvent:
    events = uf.read_events(timeout=timeout)
    assert len(events) == 1, f"expected one page-fault message, got {events}"
    (ev,) = events
    assert isinstance(ev, PagefaultEvent)
    return ev


def raw_api(fd: int, api: int = U.UFFD_API, features: int = 0) -> U.uffdio_api:
    arg = U.uffdio_api(api, features, 0)
    libc.ioctl(fd, U.UFFDIO_API, arg)
    return arg


def cats(start: int, end: int, mask: int = 0x7F) -> list[tuple[int, int, int]]:
    """(first page, end page, categories) of each scan region, in pages from ``start``."""
    res = pagescan.scan(start, end, return_mask=mask)
    return [((r.start - start) // P, (r.end - start) // P, int(r.categories)) for r in res]


def words(addr: int, npages: int) -> np.ndarray:
    """(npages, P/8) u64 view of memory (no access until indexed)."""
    arr = (ctypes.c_uint64 * (npages * P // 8)).from_address(addr)
    return np.ctypeslib.as_array(arr).reshape(npages, P // 8)


def fill_tagged(m: Mapping, npages: int | None = None) -> None:
    """The selftests' page layout: word 1 is a counter initialised to 1; word 0 tags the page."""
    n = m.npages if npages is None else npages
    w = words(m.addr, n)
    w[:, 0] = np.arange(1, n + 1, dtype=np.uint64)
    w[:, 1] = 1


def remote_read(parent: int, addr: int, length: int) -> Callable[[], bytes]:
    def fn() -> bytes:
        buf = bytearray(length)
        got = libc.vm_read(parent, addr, buf)
        assert got == length, got
        return bytes(buf)

    return fn


ALL_UFFD_FEATURES = UffdFeature(sum(1 << b for b in range(17)))


def _maps() -> list[tuple[int, int]]:
    with open("/proc/self/maps") as f:
        return [tuple(int(x, 16) for x in line.split(" ", 1)[0].split("-")) for line in f]  # type: ignore[misc]


def no_vma(npages: int = 4) -> int:
    """An address with nothing mapped in [addr, addr + npages*P), that mmap will not hand out.

    Not a freshly unmapped range: the allocator may reuse that for the interpreter's own
    memory at any moment, and registering or MOVE-ing it would corrupt the test process.
    1 TiB lies far below both the top-down mmap area and the PIE executable and heap.
    """
    addr = 1 << 40
    assert all(hi <= addr or lo >= addr + npages * P for lo, hi in _maps()), "1 TiB is mapped?"
    return addr


# -- 4.1 creation, UF-API-1/2 handshake -----------------------------------------------


def _handshake_selftest(fd: int) -> None:
    """UF-API: wrong api, unknown feature, normal handshake, second handshake (same fd)."""
    bad = U.uffdio_api(0xAB, 0, 0)
    with expect_errno(errno.EINVAL):
        libc.ioctl(fd, U.UFFDIO_API, bad)
    assert (bad.api, bad.features, bad.ioctls) == (0, 0, 0)  # docs/kernel-facts.md rule 7: zeroed on failure
    with expect_errno(errno.EINVAL):
        raw_api(fd, features=1 << 63)
    # Before a successful handshake every other ioctl and read() fail with EINVAL.
    with expect_errno(errno.EINVAL):
        libc.ioctl(fd, U.UFFDIO_REGISTER, U.uffdio_register(U.uffdio_range(0, P), MISSING, 0))
    with expect_errno(errno.EINVAL):
        os.read(fd, 32)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(0) == [(fd, select.POLLERR)]
    arg = raw_api(fd)
    assert arg.api == U.UFFD_API
    assert arg.ioctls == UffdIoctl.REGISTER | UffdIoctl.UNREGISTER | UffdIoctl.API == 0x8000000000000003
    assert arg.features & ALL_UFFD_FEATURES == ALL_UFFD_FEATURES  # 6.18 has bits 0..16
    assert arg.features == pagescan.capabilities().uffd_features
    with expect_errno(errno.EINVAL):
        raw_api(fd, features=UffdFeature.PAGEFAULT_FLAG_WP)  # one-shot


def test_uf_api_1_syscall() -> None:
    fd = libc.syscall(libc.SYS_userfaultfd, U.O_CLOEXEC | U.O_NONBLOCK)
    try:
        _handshake_selftest(fd)
    finally:
        os.close(fd)


def test_uf_api_2_dev_userfaultfd() -> None:
    if not os.path.exists("/dev/userfaultfd"):
        pytest.skip(f"needs /dev/userfaultfd (Linux 6.1); this kernel is {os.uname().release}")
    dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert U.USERFAULTFD_IOC_NEW == 0xAA00
        with expect_errno(errno.EINVAL):
            libc.ioctl(dev, U.USERFAULTFD_IOC_NEW, 2)  # unknown creation flag
        with expect_errno(errno.EINVAL):
            libc.ioctl(dev, U.USERFAULTFD_IOC_NEW | 1, U.O_CLOEXEC)  # other commands
        fd = libc.ioctl(dev, U.USERFAULTFD_IOC_NEW, U.O_CLOEXEC | U.O_NONBLOCK)
    finally:
        os.close(dev)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_blocking(fd)
        _handshake_selftest(fd)
    except BaseException:
        os.close(fd)
        raise
    # The device's fd is a full uffd: adopt it and use it.
    with Userfaultfd.from_fd(fd) as uf, anon(2) as m:
        assert uf.register(m.addr, m.length) == 0x13C
        uf.copy_from(m[0], b"d" * P)
        assert m.read(0) == b"d" * P


def test_open_userfaultfd_flags() -> None:
    fd = open_userfaultfd(U.O_CLOEXEC)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.get_blocking(fd)
    finally:
        os.close(fd)
    for bad in (2, 4, 1 << 20, U.O_NONBLOCK << 1):
        with expect_errno(errno.EINVAL):
            open_userfaultfd(U.O_CLOEXEC | bad)
    fd = open_userfaultfd(U.O_NONBLOCK | U.UFFD_USER_MODE_ONLY)
    try:
        assert not os.get_blocking(fd)
        assert not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_effective_cap(cap: int) -> None:
    c = ctypes.CDLL(None, use_errno=True)
    hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    libc.check(c.capget(ctypes.byref(hdr), data))
    data[cap // 32].effective &= ~(1 << (cap % 32))
    libc.check(c.capset(ctypes.byref(hdr), data))


@pytest.fixture
def strict_uffd_sysctl() -> Iterator[None]:
    """vm.unprivileged_userfaultfd = 0 (the default since 5.11), restored after."""
    path = "/proc/sys/vm/unprivileged_userfaultfd"
    with open(path) as f:
        old = f.read().strip()
    if old != "0":
        with open(path, "w") as f:
            f.write("0")
    try:
        yield
    finally:
        if old != "0":
            with open(path, "w") as f:
                f.write(old)


def test_open_userfaultfd_falls_back_to_device_on_eperm(strict_uffd_sysctl: None) -> None:
    """Without CAP_SYS_PTRACE the syscall says EPERM; /dev/userfaultfd (file perms) works."""
    assert os.path.exists("/dev/userfaultfd")

    def child() -> tuple[int, str, int, bool]:
        _drop_effective_cap(19)  # CAP_SYS_PTRACE
        try:
            libc.syscall(libc.SYS_userfaultfd, U.O_CLOEXEC)
            syscall_errno = 0
        except OSError as err:
            syscall_errno = err.errno
        fd = open_userfaultfd(U.O_CLOEXEC | U.O_NONBLOCK)
        kind = os.readlink(f"/proc/self/fd/{fd}")
        api = raw_api(fd)
        os.close(fd)
        with Userfaultfd() as uf, anon(1) as m:
            ok = uf.register(m.addr, P) == 0x13C
        return syscall_errno, kind, api.ioctls, ok

    with forked(child) as c:
        syscall_errno, kind, ioctls, ok = c.result()
    assert syscall_errno == errno.EPERM
    assert kind == "anon_inode:[userfaultfd]"
    assert ioctls == 0x8000000000000003
    assert ok


def test_open_userfaultfd_reports_syscall_error_when_device_refused(strict_uffd_sysctl: None) -> None:
    """As nobody: syscall EPERM, device EACCES -> the syscall's EPERM, chained from EACCES."""

    def child() -> tuple[int, int | None, bool]:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        try:
            open_userfaultfd(U.O_CLOEXEC)
            got: tuple[int, int | None] = (0, None)
        except OSError as err:
            cause = err.__cause__
            got = (err.errno, cause.errno if isinstance(cause, OSError) else None)
        # UFFD_USER_MODE_ONLY is allowed to anyone through the syscall.
        fd = open_userfaultfd(U.O_CLOEXEC | U.UFFD_USER_MODE_ONLY)
        os.close(fd)
        return got[0], got[1], True

    with forked(child) as c:
        err, cause, user_mode_ok = c.result()
    assert (err, cause, user_mode_ok) == (errno.EPERM, errno.EACCES, True)


def test_userfaultfd_handshake_attributes() -> None:
    with Userfaultfd() as uf:
        assert uf.ioctls == UffdIoctl.REGISTER | UffdIoctl.UNREGISTER | UffdIoctl.API
        assert uf.features == 0
        assert uf.supported_features == pagescan.capabilities().uffd_features
        assert uf.supported_features & ALL_UFFD_FEATURES == ALL_UFFD_FEATURES
        with expect_errno(errno.EINVAL):  # the object's fd is already initialised
            raw_api(uf.fileno())
    with Userfaultfd(UffdFeature.WP_ASYNC) as uf:  # rule 3: WP_ASYNC implies WP_UNPOPULATED
        assert uf.features == UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED
    with Userfaultfd(UffdFeature.EVENT_FORK) as uf:  # we have CAP_SYS_PTRACE
        assert uf.features == UffdFeature.EVENT_FORK


@pytest.mark.parametrize("bit", [17, 31, 40, 63])
def test_unknown_feature_bit_is_einval(bit: int) -> None:
    with expect_errno(errno.EINVAL, KernelFeatureError) as info:
        Userfaultfd(1 << bit)
    assert isinstance(info.value, OSError)
    # Known plus unknown bits still fail: unknown bits are never ignored.
    with expect_errno(errno.EINVAL, KernelFeatureError):
        Userfaultfd(UffdFeature.MOVE | (1 << bit))


def test_unknown_ioctl_and_short_read_are_einval() -> None:
    with Userfaultfd() as uf:
        with expect_errno(errno.EINVAL):
            libc.ioctl(uf.fileno(), U.UFFDIO_POISON + 1, U.uffdio_range(0, P))  # nr 9: unknown
        with expect_errno(errno.EINVAL):
            os.read(uf.fileno(), 16)  # shorter than one uffd_msg
        with pytest.raises(BlockingIOError):
            os.read(uf.fileno(), 32)  # no message, O_NONBLOCK
        assert uf.read_events(timeout=0) == []
        assert uf.read_events(timeout=0.05) == []
        with pytest.raises(ValueError, match="timeout"):
            uf.read_events(timeout=10**400)  # beyond a float: a ValueError, not OverflowError


# -- register-ioctls (selftests Part 2) --------------------------------------------------

_REG_FEATURES = (
    UffdFeature.MISSING_HUGETLBFS
    | UffdFeature.MISSING_SHMEM
    | UffdFeature.PAGEFAULT_FLAG_WP
    | UffdFeature.WP_HUGETLBFS_SHMEM
    | UffdFeature.MINOR_HUGETLBFS
    | UffdFeature.MINOR_SHMEM
)


def _expected_register_ioctls(mode: int, hugetlb: bool) -> int:
    """docs/kernel-facts.md: full set 0x1FC (hugetlb 0x1CC), minus WRITEPROTECT without WP, minus CONTINUE without MINOR."""
    mask = 0x1CC if hugetlb else 0x1FC
    if not mode & WP:
        mask &= ~int(UffdIoctl.WRITEPROTECT)
    if not mode & MINOR:
        mask &= ~int(UffdIoctl.CONTINUE)
    return mask


def test_register_ioctls_observed_values() -> None:
    assert _expected_register_ioctls(MISSING, False) == 0x13C
    assert _expected_register_ioctls(WP, False) == 0x17C
    assert _expected_register_ioctls(MINOR, False) == 0x1BC
    assert _expected_register_ioctls(WP, True) == 0x14C


def _memory(kind: str) -> Mapping:
    if kind == "anon":
        return anon(1)
    if kind == "shmem":
        return memfd_mapping(1, shared=True)
    if kind == "shmem-private":
        return memfd_mapping(1, shared=False)
    if kind == "hugetlb":
        return memfd_mapping(1, shared=True, hugetlb=True, page_size=HT)
    if kind == "hugetlb-private":
        return memfd_mapping(1, shared=False, hugetlb=True, page_size=HT)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["anon", "shmem", "shmem-private", "hugetlb", "hugetlb-private"])
def test_register_ioctls(kind: str, request: pytest.FixtureRequest) -> None:
    hugetlb = kind.startswith("hugetlb")
    if hugetlb:
        request.getfixturevalue("hugetlb_2m")
    with Userfaultfd(_REG_FEATURES) as uf, _memory(kind) as m:
        seen = {}
        for mode in range(8):
            if mode == 0 or (kind == "anon" and mode & MINOR):
                with expect_errno(errno.EINVAL):
                    uf.register(m.addr, m.length, mode)
                seen[mode] = "EINVAL"
                continue
            got = uf.register(m.addr, m.length, mode)
            assert got & UffdIoctl.WAKE
            assert bool(got & UffdIoctl.COPY) >= bool(mode & MISSING)
            assert bool(got & UffdIoctl.WRITEPROTECT) == bool(mode & WP)
            assert bool(got & UffdIoctl.CONTINUE) == bool(mode & MINOR)
            assert got == _expected_register_ioctls(mode, hugetlb), f"mode {mode}: {int(got):#x}"
            seen[mode] = hex(got)
            uf.unregister(m.addr, m.length)
        assert len(seen) == 8


# -- 4.5 register errors ---------------------------------------------------------------


def test_register_argument_errors() -> None:
    with Userfaultfd() as uf, anon(4) as m:
        with expect_errno(errno.EINVAL):
            uf.register(m.addr, P, 0)
        for bad_mode in (8, 0x10, MISSING | 8, 1 << 63):
            with expect_errno(errno.EINVAL):
                uf.register(m.addr, P, bad_mode)
        with expect_errno(errno.EINVAL):
            uf.register(m.addr + 1, P)  # unaligned start
        with expect_errno(errno.EINVAL):
            uf.register(m.addr, P + 1)  # length not a page multiple
        with expect_errno(errno.EINVAL):
            uf.register(m.addr, 0)
        with expect_errno(errno.EINVAL):
            uf.register(1 << 47, P)  # beyond TASK_SIZE
        with expect_errno(errno.EINVAL):
            uf.register((1 << 64) - P, P)  # wraps
        with expect_errno(errno.EINVAL):
            uf.register(m.addr, 4 * P, MINOR)  # MINOR on anon
        with expect_errno(errno.EINVAL):
            uf.unregister(m.addr + 1, P)
        # Nothing above registered anything: a WP-only registration is accepted and clean.
        assert uf.register(m.addr, m.length, WP) == 0x17C


def test_register_no_vma_and_gaps() -> None:
    with Userfaultfd() as uf:
        addr = no_vma(3)
        with expect_errno(errno.EINVAL):
            uf.register(addr, 3 * P)  # no VMA at all
        with expect_errno(errno.EINVAL):
            uf.unregister(addr, 3 * P)
        # A gap between two VMAs inside the range is allowed: only the VMAs get registered.
        # The gap is carved from our own reservation and the pieces are unmapped one by one,
        # never the whole span, so a foreign mapping landing in the gap would never be ours to
        # unmap; the maps check below makes sure the gap really is empty while registered.
        base = libc.mmap(0, 3 * P, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS)
        libc.munmap(base + P, P)
        try:
            assert uf.register(base, 3 * P) == 0x13C
            assert all(hi <= base + P or lo >= base + 2 * P for lo, hi in _maps()), "the gap was reused"
            assert uf.copy_from(base + 2 * P, b"g" * P) == P  # page 2 really is registered
            assert ctypes.string_at(base + 2 * P, P) == b"g" * P
            assert uf.copy_from(base, b"h" * P) == P  # and page 0
            uf.unregister(base, 3 * P)
            with expect_errno(errno.ENOENT):
                uf.zeropage(base + 2 * P, P)  # ... and no longer
        finally:
            libc.munmap(base, P)
            libc.munmap(base + 2 * P, P)


def test_register_ebusy_with_another_uffd_and_foreign_unregister() -> None:
    with Userfaultfd() as uf1, Userfaultfd() as uf2, anon(4) as m:
        uf1.register(m.addr, 2 * P)
        with expect_errno(errno.EBUSY):
            uf2.register(m.addr, m.length)
        with expect_errno(errno.EBUSY):
            uf2.register(m[1], P, WP)
        with expect_errno(errno.EINVAL):
            uf2.unregister(m.addr, P)
        assert uf2.register(m[2], 2 * P) == 0x13C  # the other half is free
        # Re-registering with the same uffd is fine.
        assert uf1.register(m.addr, 2 * P) == 0x13C


def test_register_eperm_without_maywrite() -> None:
    """MAP_SHARED of a read-only fd (no VM_MAYWRITE) of an eligible (shmem) file: EPERM."""
    mfd = os.memfd_create("ro", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, 2 * P)
        ro = os.open(f"/proc/self/fd/{mfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(mfd)
    try:
        with Mapping(2, prot=PROT.READ, flags=MAP.SHARED, fd=ro) as m, Userfaultfd() as uf:
            with expect_errno(errno.EPERM, PermissionError):
                uf.register(m.addr, m.length, MISSING)
            with expect_errno(errno.EPERM, PermissionError):
                uf.register(m.addr, m.length, WP)
        # Same file through a MAP_PRIVATE mapping of the same fd: VM_MAYWRITE is set.
        with Mapping(2, prot=PROT.READ, flags=MAP.PRIVATE, fd=ro) as m, Userfaultfd() as uf:
            assert uf.register(m.addr, m.length, MISSING) == 0x13C
    finally:
        os.close(ro)


def test_register_regular_file(tmp_path: Any) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"f" * 4 * P)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        with Mapping(4, flags=MAP.PRIVATE, fd=fd) as m:
            with Userfaultfd() as uf:
                for mode in (MISSING, WP, MISSING | WP, MINOR):
                    with expect_errno(errno.EINVAL):
                        uf.register(m.addr, m.length, mode)
            with Userfaultfd(UffdFeature.WP_ASYNC) as uf:
                with expect_errno(errno.EINVAL):
                    uf.register(m.addr, m.length, MISSING | WP)  # WP must be the only mode
                assert uf.register(m.addr, m.length, WP) & UffdIoctl.WRITEPROTECT
    finally:
        os.close(fd)


def test_register_hugetlb_alignment(hugetlb_2m: int) -> None:
    with Userfaultfd() as uf, hugetlb_anon(2) as m:
        with expect_errno(errno.EINVAL):
            uf.register(m.addr + P, HT)  # start not huge-page aligned
        with expect_errno(errno.EINVAL):
            uf.register(m.addr, HT + P)  # end not huge-page aligned
        assert uf.register(m.addr, 2 * HT) == 0x10C
        with expect_errno(errno.EINVAL):
            uf.zeropage(m.addr, HT)  # ZEROPAGE on hugetlb
        with expect_errno(errno.EINVAL):
            uf.copy_from(m.addr, b"h" * P)  # len not huge-page aligned
        assert uf.copy_from(m.addr, b"h" * HT) == HT
        assert m.read(0, 1) == b"h" * P


# -- 4.7 resolution ioctls ---------------------------------------------------------------


def test_copy_contents_and_return_values() -> None:
    data = bytes(range(256)) * (2 * P // 256)
    with Userfaultfd() as uf, anon(6) as m, anon(2) as src:
        src.write(0, 2, value=0x77)
        ctypes.memmove(src[0] + 100, b"marker", 6)
        uf.register(m.addr, m.length)
        assert [e & PM_PRESENT for e in pagemap_entries(m.addr, 6)] == [0] * 6
        assert uf.copy_from(m[0], data) == 2 * P
        assert uf.copy_from(m[2], bytearray(b"\x05" * P)) == P
        assert uf.copy_from(m[3], np.full(P, 9, dtype=np.uint8)) == P
        assert uf.copy(m[4], src.addr, P) == P
        assert uf.copy(m[5], src[0] + 100, P) == P  # src need not be page aligned
        assert m.read(0, 2) == data
        assert m.read(2) == b"\x05" * P
        assert m.read(3) == b"\x09" * P
        assert m.read(4) == src.read(0)
        assert m.read(5) == src.read(0, 2)[100 : 100 + P]
        assert m.read(5)[:6] == b"marker"
        assert [bool(e & PM_PRESENT) for e in pagemap_entries(m.addr, 6)] == [True] * 6


def test_copy_errors() -> None:
    with Userfaultfd() as uf, anon(4) as m, anon(2) as plain:
        uf.register(m.addr, m.length)
        with expect_errno(errno.ENOENT, FileNotFoundError):
            uf.copy_from(plain[0], b"x" * P)  # dst not registered
        with expect_errno(errno.EINVAL):
            uf.copy_from(m[0], b"x" * P, wp=True)  # MODE_WP on a VMA without WP
        with expect_errno(errno.EINVAL):
            uf.copy(m[0] + 1, plain.addr, P)  # dst unaligned
        with expect_errno(errno.EINVAL):
            uf.copy(m[0], plain.addr, P + 1)
        with expect_errno(errno.EINVAL):
            uf.copy(m[0], plain.addr, 0)
        with expect_errno(errno.EFAULT):
            uf.copy(m[0], 0, P)  # unreadable src
        assert pagemap_entries(m[0], 1)[0] & PM_PRESENT == 0
        uf.copy_from(m[1], b"1" * P)
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.copy_from(m[1], b"2" * P)  # populated
        # Partial progress: page 0 done, page 1 populated -> EAGAIN with done == P.
        with pytest.raises(PartialProgressError) as info:
            uf.copy_from(m[0], b"3" * 2 * P)
        assert info.value.errno == errno.EAGAIN and info.value.done == P
        assert isinstance(info.value, BlockingIOError)
        assert m.read(0, 2) == b"3" * P + b"1" * P
        # Raw: the result field carries the count on partial progress and -errno otherwise.
        buf = ctypes.create_string_buffer(b"4" * 2 * P)
        arg = U.uffdio_copy(m[2], ctypes.addressof(buf), 2 * P, 0, 0)
        libc.ioctl(uf.fileno(), U.UFFDIO_COPY, arg)
        assert arg.copy == 2 * P
        arg = U.uffdio_copy(m[2], ctypes.addressof(buf), P, 0, 0)
        with expect_errno(errno.EEXIST):
            libc.ioctl(uf.fileno(), U.UFFDIO_COPY, arg)
        assert arg.copy == -errno.EEXIST


def test_copy_mode_wp_maps_write_protected() -> None:
    with Userfaultfd() as uf, anon(2) as m:
        assert uf.register(m.addr, m.length, MISSING | WP) == 0x17C
        uf.copy_from(m[0], b"w" * P, wp=True)
        uf.copy_from(m[1], b"n" * P)
        e0, e1 = pagemap_entries(m.addr, 2)
        assert e0 & PM_PRESENT and e0 & PM_UFFD_WP
        assert e1 & PM_PRESENT and not e1 & PM_UFFD_WP
        assert m.read(0) == b"w" * P  # reading a write-protected page does not fault
        uf.writeprotect(m[0], P, enable=False)
        assert not pagemap_entries(m.addr, 1)[0] & PM_UFFD_WP


def test_zeropage_maps_pfnzero() -> None:
    with Userfaultfd() as uf, anon(4) as m, anon(1) as plain:
        uf.register(m.addr, m.length)
        assert uf.zeropage(m[0], 2 * P) == 2 * P
        assert uf.zeropage(m[3], P, dontwake=True) == P
        z = Category.PFNZERO | Category.PRESENT
        got = [(a, b, c & z) for a, b, c in cats(m.addr, m.end)]
        assert got == [(0, 2, int(z)), (2, 3, 0), (3, 4, int(z))]
        assert m.read(0, 2) == bytes(2 * P)
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.zeropage(m[1], P)
        with expect_errno(errno.ENOENT):
            uf.zeropage(plain.addr, P)
        with expect_errno(errno.EINVAL):
            uf.zeropage(m[2] + 8, P)
        with expect_errno(errno.EINVAL):
            uf.zeropage(m[2], 0)


def test_poison_then_access_is_sigbus() -> None:
    with Userfaultfd(UffdFeature.POISON) as uf, anon(4) as m, anon(1) as plain:
        m.write(1, 1, value=0x42)  # page 1 present: the VMA has an anon_vma, fork copies its tables
        uf.register(m.addr, m.length)
        assert uf.poison(m[0], P) == P
        e = pagemap_entries(m.addr, 1)[0]
        assert e & (PM_PRESENT | PM_SWAP) == PM_SWAP  # a marker: swap bit only
        assert cats(m.addr, m[1], 0x7F) == [(0, 1, int(Category.SWAPPED | Category.WRITTEN))]
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.poison(m[0], P)  # marker already there
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.poison(m[1], P)  # populated
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.zeropage(m[0], P)
        with expect_errno(errno.ENOENT):
            uf.poison(plain.addr, P)

        def touch_poisoned() -> int:
            first = ctypes.string_at(m[1], 1)[0]
            ctypes.string_at(m[0], 1)  # SIGBUS
            return first

        with forked(touch_poisoned) as c:
            status = c.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, Child.describe(status)

        def touch_neighbour() -> int:
            return ctypes.string_at(m[1], 1)[0]

        with forked(touch_neighbour) as c:
            assert c.result() == 0x42


def test_continue_on_shmem_minor() -> None:
    mfd = os.memfd_create("minor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, 4 * P)
        a = Mapping(4, flags=MAP.SHARED, fd=mfd)
        b = Mapping(4, flags=MAP.SHARED, fd=mfd)  # alias: populates the page cache
    finally:
        os.close(mfd)
    with a, b, Userfaultfd(UffdFeature.MINOR_SHMEM) as uf:
        b.write(0, 2, value=0x5A)
        ctypes.memmove(b[1], b"second", 6)
        assert uf.register(a.addr, a.length, MINOR) == 0x1BC
        assert [e & PM_PRESENT for e in pagemap_entries(a.addr, 4)] == [0] * 4
        with expect_errno(errno.EINVAL):
            uf.continue_(a[0], P, wp=True)  # MODE_WP without WP registration
        assert uf.continue_(a[0], 2 * P) == 2 * P
        assert a.read(0, 2) == b.read(0, 2)
        assert a.read(1)[:6] == b"second"
        assert [bool(e & PM_PRESENT) for e in pagemap_entries(a.addr, 4)] == [True, True, False, False]
        # Same physical page: a write through one mapping shows through the other.
        ctypes.memmove(b[0], b"alias", 5)
        assert a.read(0)[:5] == b"alias"
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.continue_(a[1], P)  # already mapped
        with expect_errno(errno.EFAULT):
            uf.continue_(a[2], P)  # nothing in the page cache
        # MINOR|WP: CONTINUE in WP mode maps the page write-protected.
        uf.unregister(a.addr, a.length)
        assert uf.register(a.addr, a.length, MINOR | WP) == 0x1FC
        b.write(3, 1, value=0x33)
        uf.continue_(a[3], P, wp=True)
        e3 = pagemap_entries(a[3], 1)[0]
        assert e3 & PM_PRESENT and e3 & PM_UFFD_WP
        assert a.read(3) == b"\x33" * P


def test_continue_on_anon_is_einval() -> None:
    with Userfaultfd() as uf, anon(1) as m, anon(1) as plain:
        uf.register(m.addr, P)
        with expect_errno(errno.EINVAL):
            uf.continue_(m.addr, P)
        with expect_errno(errno.ENOENT):
            uf.continue_(plain.addr, P)


def test_writeprotect_errors() -> None:
    with Userfaultfd() as uf, anon(4) as m, anon(1) as plain:
        with expect_errno(errno.EINVAL):
            uf.writeprotect(m.addr, P, enable=True, dontwake=True)  # WP|DONTWAKE
        with expect_errno(errno.ENOENT):
            uf.writeprotect(plain.addr, P)  # not registered
        uf.register(m.addr, 2 * P, MISSING)
        with expect_errno(errno.ENOENT):
            uf.writeprotect(m.addr, P)  # registered, but not for WP
        uf.register(m[2], 2 * P, WP)
        with expect_errno(errno.ENOENT):
            uf.writeprotect(m[1], 2 * P)  # one VMA in range lacks WP
        with expect_errno(errno.EINVAL):
            uf.writeprotect(m[2] + 1, P)
        with expect_errno(errno.EINVAL):
            uf.writeprotect(m[2], 0)
        with expect_errno(errno.EINVAL):
            libc.ioctl(uf.fileno(), U.UFFDIO_WRITEPROTECT, U.uffdio_writeprotect(U.uffdio_range(m[2], P), 4))
        m.write(2, 2, value=1)
        uf.writeprotect(m[2], 2 * P)
        assert [bool(e & PM_UFFD_WP) for e in pagemap_entries(m[2], 2)] == [True, True]
        uf.writeprotect(m[2], P, enable=False, dontwake=True)  # disarm without wake is valid
        assert [bool(e & PM_UFFD_WP) for e in pagemap_entries(m[2], 2)] == [False, True]


def test_zeropage_and_poison_refuse_wp_markers_copy_overwrites() -> None:
    features = UffdFeature.WP_UNPOPULATED | UffdFeature.POISON
    with Userfaultfd(features) as uf, anon(4) as m:
        uf.register(m.addr, m.length, MISSING | WP)
        uf.writeprotect(m.addr, m.length)  # empty PTEs get uffd-wp markers
        entries = pagemap_entries(m.addr, 4)
        assert all(e & PM_UFFD_WP and not e & PM_PRESENT for e in entries)
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.zeropage(m[0], P)
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.poison(m[0], P)
        assert uf.copy_from(m[0], b"c" * P) == P  # COPY may replace a marker
        assert m.read(0) == b"c" * P


def test_resolvers_on_no_vma_are_enoent() -> None:
    addr = no_vma()
    with Userfaultfd(UffdFeature.POISON) as uf:
        for call in (
            lambda: uf.copy_from(addr, b"x" * P),
            lambda: uf.zeropage(addr, P),
            lambda: uf.poison(addr, P),
            lambda: uf.continue_(addr, P),
        ):
            with expect_errno(errno.ENOENT):
                call()


# -- fault messages from a remote actor -------------------------------------------------


def test_missing_fault_message_resolved_by_copy() -> None:
    parent = PID()
    with Userfaultfd(UffdFeature.THREAD_ID) as uf, anon(2) as m:
        uf.register(m.addr, m.length)
        with forked(remote_read(parent, m[1], P)) as c:
            ev = one_fault(uf)
            assert ev == PagefaultEvent(PagefaultFlag(0), m[1], c.pid)
            assert ev.kind == "missing" and not ev.is_write
            assert uf.read_events(timeout=0.05) == []  # one fault, one message
            uf.copy_from(m[1], b"r" * P)
            assert c.result() == b"r" * P
        assert pagemap_entries(m.addr, 1)[0] & PM_PRESENT == 0


def test_minor_fault_message_resolved_by_continue() -> None:
    parent = PID()
    mfd = os.memfd_create("minor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, 2 * P)
        a = Mapping(2, flags=MAP.SHARED, fd=mfd)
        b = Mapping(2, flags=MAP.SHARED, fd=mfd)
    finally:
        os.close(mfd)
    with a, b, Userfaultfd(UffdFeature.MINOR_SHMEM) as uf:
        b.write(1, 1, value=0x6D)
        uf.register(a.addr, a.length, MINOR)
        with forked(remote_read(parent, a[1], P)) as c:
            ev = one_fault(uf)
            assert ev.address == a[1] and ev.flags == PagefaultFlag.MINOR and ev.kind == "minor"
            uf.continue_(a[1], P)
            assert c.result() == b"\x6d" * P


def test_sync_wp_fault_from_remote_write() -> None:
    """A write through process_vm_writev to a write-protected page: WRITE|WP, writer blocks."""
    parent = PID()
    with Userfaultfd(UffdFeature.PAGEFAULT_FLAG_WP | UffdFeature.THREAD_ID) as uf, anon(2) as m:
        m.write(0, 2, value=ord("a"))
        assert uf.register(m.addr, m.length, WP) == 0x17C
        uf.writeprotect(m.addr, m.length)
        assert all(e & PM_UFFD_WP for e in pagemap_entries(m.addr, 2))

        def write() -> int:
            return libc.vm_write(parent, m[1], b"b" * 16)

        with forked(write) as c:
            ev = one_fault(uf)
            assert ev == PagefaultEvent(PagefaultFlag.WRITE | PagefaultFlag.WP, m[1], c.pid)
            assert ev.kind == "wp" and ev.is_write
            assert m.read(1)[:16] == b"a" * 16  # the writer is still blocked
            with pytest.raises(AssertionError):
                c.wait(0.1)
            uf.writeprotect(m[1], P, enable=False)  # resolve and wake
            assert c.result() == 16
        assert m.read(1)[:17] == b"b" * 16 + b"a"
        assert [bool(e & PM_UFFD_WP) for e in pagemap_entries(m.addr, 2)] == [True, False]


# -- non-cooperative events --------------------------------------------------------------


def test_remove_event_from_madv_dontneed() -> None:
    with Userfaultfd(UffdFeature.EVENT_REMOVE) as uf, anon(4) as m:
        m.write(0, 4, value=1)
        uf.register(m.addr, m.length, WP)
        blocker = Blocker(lambda: libc.madvise(m[1], 2 * P, MADV.DONTNEED))
        try:
            wait_readable(uf)
            assert blocker.thread.is_alive()  # blocked until the event is read
            with pytest.raises(BlockingIOError):
                uf.writeprotect(m[0], P)  # mmap_changing
            assert uf.read_events(timeout=1) == [RemoveEvent(m[1], m[3])]
            blocker.join()
        finally:
            uf.close()
            blocker.thread.join(5)
        assert [bool(e & PM_PRESENT) for e in pagemap_entries(m.addr, 4)] == [True, False, False, True]


def test_unmap_and_remap_events() -> None:
    mremap = ctypes.CDLL(None, use_errno=True).mremap
    mremap.restype = ctypes.c_void_p
    mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
    with Userfaultfd(UffdFeature.EVENT_UNMAP | UffdFeature.EVENT_REMAP) as uf:
        # munmap of a registered range: UNMAP [start, end).
        m = anon(4)
        m.closed = True  # the helper thread unmaps it
        uf.register(m.addr, m.length)
        blocker = Blocker(lambda: libc.munmap(m.addr, m.length))
        try:
            wait_readable(uf)
            assert blocker.thread.is_alive()
            assert uf.read_events(timeout=1) == [UnmapEvent(m.addr, m.end)]
            blocker.join()
        finally:
            blocker.thread.join(5)

        # mremap of a registered range to a new place: REMAP from, to, len.
        with anon(4) as target:
            m = anon(4)
            m.closed = True  # after the move, the mapping lives at target
            m.write(0, 1, value=0x11)
            uf.register(m.addr, m.length)
            blocker = Blocker(lambda: mremap(m.addr, m.length, m.length, MREMAP_MAYMOVE | MREMAP_FIXED, target.addr))
            events: list[Any] = []
            try:
                deadline = time.monotonic() + 5
                while blocker.thread.is_alive() and time.monotonic() < deadline:
                    events += uf.read_events(timeout=0.1)
                new = blocker.join()
            finally:
                blocker.thread.join(5)
            assert new == target.addr
            # REMAP, then (EVENT_UNMAP) the implicit unmap of the source range.
            assert events == [RemapEvent(m.addr, target.addr, 4 * P), UnmapEvent(m.addr, m.end)]
            assert ctypes.string_at(target.addr, 1) == b"\x11"  # page 0 moved along, present
            # With EVENT_REMAP the registration follows the VMA.
            with expect_errno(errno.EEXIST):
                uf.copy_from(target.addr, b"x" * P)
            assert uf.copy_from(target[1], b"y" * P) == P
            # Unregister before unmapping: an UNMAP event would block this thread.
            uf.unregister(target.addr, target.length)


@requires_uffd_move
def test_uf_move_4_mmap_changing_eagain() -> None:
    """UF-MOVE-4: while a REMOVE event is pending every resolver says EAGAIN, field -EAGAIN."""
    features = UffdFeature.EVENT_REMOVE | UffdFeature.MOVE | UffdFeature.POISON | UffdFeature.MINOR_SHMEM
    mfd = os.memfd_create("mmap-changing", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, 4 * P)
        dst = Mapping(4, flags=MAP.SHARED, fd=mfd)
    finally:
        os.close(mfd)
    with dst, anon(1) as src, Userfaultfd(features) as uf:
        src.write(0, 1, value=3)
        uf.register(dst.addr, dst.length, MISSING | WP)
        blocker = Blocker(lambda: libc.madvise(dst[0], P, MADV.REMOVE))
        try:
            wait_readable(uf)
            for name, (request, struct_type, field) in RESOLVERS.items():
                arg = struct_type()
                setattr(arg, field, 1)
                with expect_errno(errno.EAGAIN):
                    libc.ioctl(uf.fileno(), request, arg)
                assert getattr(arg, field) == -errno.EAGAIN, name
            calls = {
                "COPY": lambda: uf.copy(dst[1], src.addr, P),
                "ZEROPAGE": lambda: uf.zeropage(dst[1], P),
                "MOVE": lambda: uf.move(dst[1], src.addr, P),
                "POISON": lambda: uf.poison(dst[1], P),
                "CONTINUE": lambda: uf.continue_(dst[1], P),
                "COPY(0)": lambda: uf.copy(0, 0, 0),
                "ZEROPAGE(0)": lambda: uf.zeropage(0, 0),
                "MOVE(0)": lambda: uf.move(0, 0, 0),
                "POISON(0)": lambda: uf.poison(0, 0),
                "CONTINUE(0)": lambda: uf.continue_(0, 0),
            }
            for name, call in calls.items():
                with pytest.raises(PartialProgressError) as info:
                    call()
                assert info.value.errno == errno.EAGAIN and info.value.done == 0, name
            with pytest.raises(BlockingIOError) as winfo:
                uf.writeprotect(dst[1], P)
            assert winfo.value.errno == errno.EAGAIN
            assert blocker.thread.is_alive()
            assert uf.read_events(timeout=1) == [RemoveEvent(dst[0], dst[1])]
            blocker.join()
        finally:
            uf.close()
            blocker.thread.join(5)
    # After the event was read the same call succeeds (checked on a fresh setup).
    with anon(2) as m, anon(1) as src, Userfaultfd(UffdFeature.EVENT_REMOVE) as uf:
        src.write(0, 1, value=4)
        uf.register(m.addr, m.length)
        blocker = Blocker(lambda: libc.madvise(m[0], P, MADV.DONTNEED))
        try:
            wait_readable(uf)
            with pytest.raises(PartialProgressError):
                uf.move(m[1], src.addr, P)
            assert uf.read_events(timeout=1) == [RemoveEvent(m[0], m[1])]
            blocker.join()
        finally:
            blocker.thread.join(5)
        assert uf.move(m[1], src.addr, P) == P
        assert m.read(1) == b"\x04" * P


# -- UF-MOVE-1..3 ------------------------------------------------------------------------


def _move_retrying_busy(uf: Userfaultfd, dst: int, src: int, length: int) -> None:
    """MOVE a whole chunk, retrying EBUSY a bounded number of times.

    Moving part of a THP source splits it first, and the split fails with EBUSY while
    anything else holds a reference to the folio for a moment (seen once under load:
    the selftest does not retry, and nothing in this test shares the page)."""
    for _ in range(100):
        try:
            assert uf.move(dst, src, length, allow_src_holes=True) == length
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.002)
    assert uf.move(dst, src, length, allow_src_holes=True) == length


def _move_selftest(src: Mapping, dst: Mapping, chunk: int) -> None:
    """The UF-MOVE body: a child reads dst chunk by chunk through process_vm_readv;
    each missing fault is resolved by the owner with MOVE(ALLOW_SRC_HOLES) of a whole chunk."""
    parent = PID()
    npages = src.npages
    nchunks = src.length // chunk
    per = chunk // P
    fill_tagged(src)
    src.madvise(MADV.DONTFORK)  # a fork must never make src pages non-exclusive
    src_words = words(src.addr, npages)
    with Userfaultfd(UffdFeature.MOVE) as uf:
        assert uf.register(dst.addr, dst.length, MISSING) & UffdIoctl.MOVE

        def reader() -> np.ndarray:
            out = np.empty((npages, 2), dtype=np.uint64)
            for i in range(nchunks):
                buf = bytearray(chunk)
                assert libc.vm_read(parent, dst.addr + i * chunk, buf) == chunk
                out[i * per : (i + 1) * per] = np.frombuffer(buf, dtype="<u8").reshape(per, P // 8)[:, :2]
            return out

        missing = minor = 0
        moved = set()
        with forked(reader, alarm=40) as c:
            poller = select.poll()
            poller.register(uf.fileno(), select.POLLIN)
            poller.register(c.rfd, select.POLLIN)
            deadline = time.monotonic() + 30
            done = False
            while not done:
                assert time.monotonic() < deadline, f"stuck after {missing} faults"
                for fd, _ in poller.poll(1000):
                    if fd == c.rfd:
                        done = True
                        continue
                    for ev in uf.read_events(timeout=0):
                        assert isinstance(ev, PagefaultEvent)
                        assert not ev.flags & (PagefaultFlag.WP | PagefaultFlag.MINOR | PagefaultFlag.WRITE)
                        minor += bool(ev.flags & PagefaultFlag.MINOR)
                        off = (ev.address - dst.addr) // chunk * chunk
                        first, last = off // P, off // P + per
                        assert (src_words[first:last, 1] == 1).all()
                        try:
                            _move_retrying_busy(uf, dst.addr + off, src.addr + off, chunk)
                        except FileExistsError:  # raced with an earlier move of the chunk
                            uf.wake(dst.addr + off, chunk)
                            continue
                        missing += 1
                        moved.add(off)
                        assert (src_words[first:last, 1] == 0).all()  # src is now a hole
            got = c.result()
        assert missing == nchunks and minor == 0
        assert moved == {i * chunk for i in range(nchunks)}
        assert (got[:, 1] == 1).all()  # every dst counter is 1
        assert (got[:, 0] == np.arange(1, npages + 1)).all()  # each page landed at its own offset
        assert (src_words[:, :2] == 0).all()
        assert all(e & PM_PRESENT for e in pagemap_entries(dst.addr, npages))


@requires_uffd_move
def test_uf_move_1_move() -> None:
    with Mapping(64) as src, Mapping(64) as dst:
        src.madvise(MADV.NOHUGEPAGE)
        _move_selftest(src, dst, P)


def _thp_src(n_huge: int) -> Mapping:
    src = Mapping(n_huge * H // P, align=H)
    src.madvise(MADV.HUGEPAGE)
    src.write(0, src.npages, value=0)
    if smaps_field(src, "AnonHugePages") * 1024 < src.length:
        with contextlib.suppress(OSError):
            src.madvise(MADV.COLLAPSE)
    assert smaps_field(src, "AnonHugePages") * 1024 == src.length, "src did not get THPs"
    return src


@requires_uffd_move
def test_uf_move_2_move_pmd() -> None:
    """THP src into a MADV_HUGEPAGE dst: the fault leaves the dst PMD empty, whole PMDs move."""
    with _thp_src(3) as src, Mapping(3 * H // P, align=H) as dst:
        dst.madvise(MADV.HUGEPAGE)
        _move_selftest(src, dst, H)
        assert smaps_field(dst, "AnonHugePages") * 1024 == dst.length
        assert smaps_field(src, "AnonHugePages") == 0


@requires_uffd_move
def test_uf_move_3_move_pmd_split() -> None:
    """THP src into a MADV_NOHUGEPAGE dst: the PTE-level fault allocated a page table, so the src THP is split."""
    with _thp_src(2) as src, Mapping(2 * H // P, align=H) as dst:
        dst.madvise(MADV.NOHUGEPAGE)
        _move_selftest(src, dst, H)
        assert smaps_field(dst, "AnonHugePages") == 0


# -- 4.8 MOVE errors and X-14 ----------------------------------------------------------


@pytest.fixture
def move_uffd() -> Iterator[Userfaultfd]:
    with Userfaultfd(UffdFeature.MOVE) as uf:
        yield uf


@requires_uffd_move
def test_move_basic_and_src_holes(move_uffd: Userfaultfd) -> None:
    uf = move_uffd
    with anon(4) as dst, anon(4) as src:
        uf.register(dst.addr, dst.length)
        src.write(0, 1, value=0x61)
        assert uf.move(dst[0], src[0], P) == P
        assert dst.read(0) == b"a" * P
        assert cats(dst.addr, dst[1]) == [(0, 1, int(Category.PRESENT | Category.WRITTEN))]
        assert not pagemap_entries(src.addr, 1)[0] & PM_PRESENT
        # src hole: ENOENT, field -ENOENT; with ALLOW_SRC_HOLES it "moves" and dst stays empty.
        with expect_errno(errno.ENOENT, FileNotFoundError):
            uf.move(dst[1], src[1], P)
        arg = U.uffdio_move(dst[1], src[1], P, 0, 0)
        with expect_errno(errno.ENOENT):
            libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
        assert arg.move == -errno.ENOENT
        assert uf.move(dst[1], src[1], P, allow_src_holes=True) == P
        arg = U.uffdio_move(dst[1], src[1], P, U.MoveMode.ALLOW_SRC_HOLES, 0)
        libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
        assert arg.move == P
        assert not pagemap_entries(dst[1], 1)[0] & PM_PRESENT
        # A zero-page src moves as a zero-page mapping.
        src.read(2)
        assert uf.move(dst[2], src[2], P, dontwake=True) == P
        z = Category.PFNZERO | Category.PRESENT | Category.WRITTEN
        assert cats(dst[2], dst[3]) == [(0, 1, int(z))]


@requires_uffd_move
def test_move_partial_progress(move_uffd: Userfaultfd) -> None:
    uf = move_uffd
    with anon(4) as dst, anon(4) as src:
        uf.register(dst.addr, dst.length)
        src.write(0, 4, value=0x70)
        src.madvise(MADV.DONTNEED, 2, 1)  # hole in the middle
        with pytest.raises(PartialProgressError) as info:
            uf.move(dst.addr, src.addr, 4 * P)
        assert info.value.errno == errno.EAGAIN and info.value.done == 2 * P
        assert [bool(e & PM_PRESENT) for e in pagemap_entries(dst.addr, 4)] == [True, True, False, False]
        assert [bool(e & PM_PRESENT) for e in pagemap_entries(src.addr, 4)] == [False, False, False, True]
        assert dst.read(0, 2) == b"\x70" * 2 * P
        # Retrying the remainder shows the real cause.
        with expect_errno(errno.ENOENT):
            uf.move(dst[2], src[2], 2 * P)


@requires_uffd_move
def test_move_eexist(move_uffd: Userfaultfd) -> None:
    uf = move_uffd
    with anon(2) as dst, anon(2) as src:
        uf.register(dst.addr, dst.length)
        src.write(0, 2, value=1)
        uf.copy_from(dst[0], b"p" * P)
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.move(dst[0], src[0], P)
        arg = U.uffdio_move(dst[0], src[0], P, 0, 0)
        with expect_errno(errno.EEXIST):
            libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
        assert arg.move == -errno.EEXIST
        assert dst.read(0) == b"p" * P and src.read(0) == b"\x01" * P


@requires_uffd_move
def test_move_into_wp_marker_is_eexist_until_unprotected() -> None:
    """X-14: WP_UNPOPULATED markers in dst make MOVE fail EEXIST; un-WP clears them."""
    with Userfaultfd(UffdFeature.WP_ASYNC | UffdFeature.MOVE) as uf, anon(2) as dst, anon(2) as src:
        src.write(0, 2, value=0x57)
        uf.register(dst.addr, dst.length, WP)
        uf.writeprotect(dst.addr, dst.length)
        wpa = int(Category.WPALLOWED)
        assert cats(dst.addr, dst.end) == [(0, 2, int(Category.SWAPPED) | wpa)]
        arg = U.uffdio_move(dst[0], src[0], P, 0, 0)
        with expect_errno(errno.EEXIST):
            libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
        assert arg.move == -errno.EEXIST
        with expect_errno(errno.EEXIST, FileExistsError):
            uf.move(dst[0], src[0], P)
        uf.writeprotect(dst.addr, dst.length, enable=False)
        assert cats(dst.addr, dst.end) == [(0, 2, int(Category.WRITTEN) | wpa)]
        assert uf.move(dst[0], src[0], P) == P
        # The moved page is present, written and not write-protected; src is a hole.
        assert cats(dst.addr, dst[1]) == [(0, 1, int(Category.PRESENT | Category.WRITTEN) | wpa)]
        assert cats(src.addr, src[1]) == [(0, 1, int(Category.WRITTEN))]
        assert dst.read(0) == b"\x57" * P


@requires_uffd_move
def test_move_ebusy_after_fork(move_uffd: Userfaultfd) -> None:
    uf = move_uffd
    with anon(1) as dst, anon(1) as src:
        uf.register(dst.addr, dst.length)
        src.write(0, 1, value=0x46)
        with forked(lambda: time.sleep(30)) as c:
            with expect_errno(errno.EBUSY):
                uf.move(dst.addr, src.addr, P)
            arg = U.uffdio_move(dst.addr, src.addr, P, 0, 0)
            with expect_errno(errno.EBUSY):
                libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
            assert arg.move == -errno.EBUSY
            c.close()
        with expect_errno(errno.EBUSY):  # still not exclusive after the child is gone
            uf.move(dst.addr, src.addr, P)
        src.write(0, 1, value=0x47)  # a write makes the page exclusive again
        assert uf.move(dst.addr, src.addr, P) == P
        assert dst.read(0) == b"\x47" * P


@requires_uffd_move
def test_move_einval_cases(move_uffd: Userfaultfd, tmp_path: Any) -> None:
    uf = move_uffd
    with anon(2) as dst, anon(2) as src, shared_anon(1) as shared, anon(1) as unreg, Userfaultfd() as other:
        uf.register(dst.addr, dst.length)
        src.write(0, 2, value=1)
        shared.write(0, 1, value=2)
        unreg_dst = anon(1)
        other_dst = anon(1)
        two_vmas = anon(3)  # [RW RW | R]: page 2 is a separate VMA we own
        two_vmas.write(0, 3, value=3)
        two_vmas.mprotect(PROT.READ, 2, 1)
        with unreg_dst, other_dst, two_vmas:
            other.register(other_dst.addr, P)
            cases = {
                "shared src": (dst[0], shared.addr, P, 0),
                "shared dst": (shared.addr, src[0], P, 0),
                "dst not registered": (unreg_dst.addr, src[0], P, 0),
                "dst registered with another uffd": (other_dst.addr, src[0], P, 0),
                "range spans two src VMAs": (dst[0], two_vmas[1], 2 * P, 0),
            }
            for name, (d, s, n, mode) in cases.items():
                with expect_errno(errno.EINVAL):
                    uf.move(d, s, n)
                arg = U.uffdio_move(d, s, n, mode, 0)
                with expect_errno(errno.EINVAL):
                    libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
                assert arg.move == -errno.EINVAL, name
            assert all(e & PM_PRESENT for e in pagemap_entries(two_vmas.addr, 3))
        # Validation failures leave the field untouched (docs/kernel-facts.md).
        for name, (d, s, n, mode) in {
            "unaligned src": (dst[0], src[0] + 8, P, 0),
            "unaligned dst": (dst[0] + 8, src[0], P, 0),
            "len 0": (dst[0], src[0], 0, 0),
            "len not a page multiple": (dst[0], src[0], P + 1, 0),
            "unknown mode bit": (dst[0], src[0], P, 4),
        }.items():
            arg = U.uffdio_move(d, s, n, mode, 12345)
            with expect_errno(errno.EINVAL):
                libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
            assert arg.move == 12345, name
            if mode == 0:
                with expect_errno(errno.EINVAL):
                    uf.move(d, s, n)
        # No VMA at dst or src: ENOENT.
        hole = no_vma()
        with expect_errno(errno.ENOENT):
            uf.move(hole, src[0], P)
        with expect_errno(errno.ENOENT):
            uf.move(dst[0], hole, P)
        # MAP_SHARED file src.
        path = tmp_path / "m"
        path.write_bytes(b"m" * P)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with Mapping(1, flags=MAP.SHARED, fd=fd) as fm:
                fm.read(0)
                arg = U.uffdio_move(dst[1], fm.addr, P, 0, 0)
                with expect_errno(errno.EINVAL):
                    libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
                assert arg.move == -errno.EINVAL
        finally:
            os.close(fd)
        # Nothing was moved by any of the above.
        assert [bool(e & PM_PRESENT) for e in pagemap_entries(src.addr, 2)] == [True, True]
        assert uf.move(dst.addr, src.addr, 2 * P) == 2 * P


@requires_uffd_move
def test_move_overlapping_ranges(move_uffd: Userfaultfd) -> None:
    """X-14: src [3,5) -> dst [4,6) in one registered VMA, page 4 empty: accepted, ascending order."""
    uf = move_uffd
    with anon(8) as m:
        m.write(0, 1, value=0xEE)  # anon_vma for the VMA
        uf.register(m.addr, m.length)
        uf.copy_from(m[3], b"3" * P)
        uf.copy_from(m[4], b"4" * P)
        with expect_errno(errno.EEXIST):  # page 4 populated: the first step fails
            uf.move(m[4], m[3], 2 * P)
        assert m.read(3) == b"3" * P and m.read(4) == b"4" * P
        m.madvise(MADV.DONTNEED, 4, 1)
        assert uf.move(m[4], m[3], 2 * P) == 2 * P
        present = [bool(e & PM_PRESENT) for e in pagemap_entries(m.addr, 8)]
        assert present == [True, False, False, False, False, True, False, False]
        assert m.read(5) == b"3" * P  # page 3 went to 4, then on to 5


@requires_uffd_move
def test_move_from_another_process_is_einval(move_uffd: Userfaultfd) -> None:
    """X-14: a forked child holding our uffd cannot MOVE in our mm (EINVAL, field unchanged)."""
    uf = move_uffd
    with anon(1) as dst, anon(1) as src:
        uf.register(dst.addr, dst.length)
        src.write(0, 1, value=0x4D)
        src.madvise(MADV.DONTFORK)

        def child() -> tuple[int, int, int]:
            arg = U.uffdio_move(dst.addr, src.addr, P, 0, 777)
            try:
                libc.ioctl(uf.fileno(), U.UFFDIO_MOVE, arg)
                raw = 0
            except OSError as err:
                raw = err.errno
            try:
                uf.move(dst.addr, src.addr, P)
                api = 0
            except OSError as err:
                api = err.errno
            return raw, arg.move, api

        with forked(child) as c:
            assert c.result() == (errno.EINVAL, 777, errno.EINVAL)
        assert uf.move(dst.addr, src.addr, P) == P  # the owner can
        assert dst.read(0) == b"\x4d" * P


# -- parse_uffd_msgs -----------------------------------------------------------------------


def _msg(event: int, a0: int = 0, a1: int = 0, a2: int = 0, reserved: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    return struct.pack("<BBHIQQQ", event, *reserved, a0, a1, a2)


def test_parse_uffd_msgs_every_event_type() -> None:
    high = 0xFFFF_FFFF_0000_0000
    data = b"".join(
        [
            _msg(0x12, 0, 0x7F00_0000_1000, 0),
            _msg(0x12, 3, 0x7F00_0000_2123, high | 4242),
            _msg(0x12, 4, 0x1000),
            _msg(0x13, high | 17),
            _msg(0x14, 0x1000, 0x9000, 0x3000),
            _msg(0x15, 0x2000, 0x4000),
            _msg(0x16, 0x5000, 0x8000),
            _msg(0x11, 1, 2, 3, reserved=(9, 8, 7)),
        ]
    )
    got = parse_uffd_msgs(data)
    assert got == [
        PagefaultEvent(PagefaultFlag(0), 0x7F00_0000_1000, 0),
        PagefaultEvent(PagefaultFlag.WRITE | PagefaultFlag.WP, 0x7F00_0000_2123, 4242),
        PagefaultEvent(PagefaultFlag.MINOR, 0x1000, 0),
        ForkEvent(17),
        RemapEvent(0x1000, 0x9000, 0x3000),
        RemoveEvent(0x2000, 0x4000),
        UnmapEvent(0x5000, 0x8000),
        UnknownEvent(0x11, data[7 * 32 :]),
    ]
    assert [type(e) for e in got] == [
        PagefaultEvent, PagefaultEvent, PagefaultEvent, ForkEvent, RemapEvent, RemoveEvent, UnmapEvent, UnknownEvent,
    ]
    assert [e.kind for e in got[:3]] == ["missing", "wp", "minor"]
    assert [e.is_write for e in got[:3]] == [False, True, False]
    assert isinstance(got[1].flags, PagefaultFlag)
    # Any buffer object.
    assert parse_uffd_msgs(bytearray(data)) == got
    assert parse_uffd_msgs(memoryview(data)) == got
    assert parse_uffd_msgs(np.frombuffer(data, dtype=np.uint8)) == got
    assert parse_uffd_msgs(b"") == []


@pytest.mark.parametrize("n", [1, 16, 31, 33, 63])
def test_parse_uffd_msgs_bad_length(n: int) -> None:
    with pytest.raises(ValueError):
        parse_uffd_msgs(bytes(n))


def test_parse_uffd_msgs_matches_uapi_struct() -> None:
    """The numpy decoding agrees with the ctypes struct uffd_msg."""
    msg = U.uffd_msg()
    msg.event = 0x12
    msg.arg.pagefault.flags = 2
    msg.arg.pagefault.address = 0xABC000
    msg.arg.pagefault.ptid = 99
    assert parse_uffd_msgs(bytes(msg)) == [PagefaultEvent(PagefaultFlag.WP, 0xABC000, 99)]
    msg = U.uffd_msg()
    msg.event = 0x14
    setattr(msg.arg.remap, "from", 0x10000)
    msg.arg.remap.to = 0x20000
    msg.arg.remap.len = 0x3000
    assert parse_uffd_msgs(bytes(msg)) == [RemapEvent(0x10000, 0x20000, 0x3000)]


# -- fd lifecycle and Python arguments ----------------------------------------------------


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as err:
        assert err.errno == errno.EBADF
        return False
    return True


def test_close_idempotent_closed_and_context_manager() -> None:
    uf = Userfaultfd()
    fd = uf.fileno()
    assert uf.fd == fd and not uf.closed
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    assert "closed" not in repr(uf)
    uf.close()
    assert uf.closed and not _fd_open(fd)
    uf.close()
    assert uf.closed
    assert "closed" in repr(uf)
    with Userfaultfd() as uf2:
        fd2 = uf2.fileno()
        assert _fd_open(fd2)
    assert uf2.closed and not _fd_open(fd2)


def test_methods_on_closed_object_raise_valueerror() -> None:
    with anon(1) as m:
        uf = Userfaultfd()
        uf.close()
        calls = [
            lambda: uf.fileno(),
            lambda: uf.fd,
            lambda: uf.detach(),
            lambda: uf.register(m.addr, P),
            lambda: uf.unregister(m.addr, P),
            lambda: uf.writeprotect(m.addr, P),
            lambda: uf.copy(m.addr, m.addr, P),
            lambda: uf.copy_from(m.addr, b"x" * P),
            lambda: uf.zeropage(m.addr, P),
            lambda: uf.continue_(m.addr, P),
            lambda: uf.poison(m.addr, P),
            lambda: uf.move(m.addr, m.addr, P),
            lambda: uf.wake(m.addr, P),
            lambda: uf.read_events(timeout=0),
        ]
        for call in calls:
            with pytest.raises(ValueError):
                call()


def test_del_closes_fd() -> None:
    uf = Userfaultfd()
    fd = uf.fileno()
    del uf
    gc.collect()
    assert not _fd_open(fd)


def test_fileno_works_with_poll() -> None:
    parent = PID()
    with Userfaultfd() as uf, anon(1) as m:
        poller = select.poll()
        poller.register(uf, select.POLLIN)  # uses fileno()
        assert poller.poll(0) == []
        uf.register(m.addr, P)
        with forked(remote_read(parent, m.addr, P)) as c:
            ready = poller.poll(5000)
            assert ready == [(uf.fileno(), select.POLLIN)]
            (ev,) = uf.read_events(timeout=0)
            assert ev.address == m.addr
            uf.zeropage(m.addr, P)
            assert c.result() == bytes(P)
        assert poller.poll(0) == []


def test_inheritable_and_nonblock_flags() -> None:
    with Userfaultfd() as uf:
        assert fcntl.fcntl(uf.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(uf.fileno())
        assert not os.get_blocking(uf.fileno())
    with Userfaultfd(inheritable=True) as uf:
        assert not fcntl.fcntl(uf.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.get_inheritable(uf.fileno())
    with Userfaultfd(nonblock=False) as uf:
        assert os.get_blocking(uf.fileno())
        poller = select.poll()
        poller.register(uf.fileno(), select.POLLIN)
        assert poller.poll(0) == [(uf.fileno(), select.POLLERR)]  # a blocking uffd cannot be polled
        with pytest.raises(OSError):
            uf.read_events(timeout=0)
    with Userfaultfd(user_mode_only=True) as uf, anon(1) as m:
        assert uf.register(m.addr, P) == 0x13C


def test_user_mode_only_refuses_kernel_mode_faults() -> None:
    """With UFFD_USER_MODE_ONLY a remote (kernel-mode) access is not delivered: EFAULT."""
    parent = PID()
    with Userfaultfd(user_mode_only=True) as uf, anon(1) as m:
        uf.register(m.addr, P)

        def read() -> int:
            try:
                libc.vm_read(parent, m.addr, bytearray(P))
            except OSError as err:
                return err.errno
            return 0

        with forked(read) as c:
            assert c.result() == errno.EFAULT
        assert uf.read_events(timeout=0) == []


def test_from_fd_and_detach() -> None:
    fd = open_userfaultfd(U.O_CLOEXEC | U.O_NONBLOCK)
    try:
        raw_api(fd, features=UffdFeature.POISON)
    except BaseException:
        os.close(fd)
        raise
    uf = Userfaultfd.from_fd(fd, UffdFeature.POISON)
    with uf, anon(1) as m:
        assert uf.fileno() == fd
        assert uf.features == UffdFeature.POISON
        assert uf.register(m.addr, P) == 0x13C
        assert uf.poison(m.addr, P) == P
    assert uf.closed and not _fd_open(fd)

    uf = Userfaultfd()
    fd = uf.fileno()
    assert uf.detach() == fd
    assert uf.closed
    del uf
    gc.collect()
    try:
        assert _fd_open(fd)  # detached: neither close() nor __del__ owns it any more
        with expect_errno(errno.EINVAL):
            raw_api(fd)  # still the initialised uffd
    finally:
        os.close(fd)


def test_bad_python_arguments() -> None:
    with Userfaultfd() as uf, anon(1) as m:
        value_errors = [
            lambda: uf.register(-P, P),
            lambda: uf.register(m.addr, -1),
            lambda: uf.register(m.addr, P, -1),
            lambda: uf.register(1 << 64, P),
            lambda: uf.unregister(m.addr, -P),
            lambda: uf.writeprotect(-1, P),
            lambda: uf.copy(m.addr, -1, P),
            lambda: uf.zeropage(m.addr, 1 << 64),
            lambda: uf.continue_(-m.addr, P),
            lambda: uf.poison(m.addr, -P),
            lambda: uf.move(-1, m.addr, P),
            lambda: uf.wake(m.addr, -1),
        ]
        for call in value_errors:
            with pytest.raises(ValueError) as info:
                call()
            assert not isinstance(info.value, OSError)
        type_errors = [
            lambda: uf.register(float(m.addr), P),
            lambda: uf.register("0", P),
            lambda: uf.register(m.addr, None),
            lambda: uf.register(True, P),
            lambda: uf.copy(m.addr, m.addr, 4096.0),
            lambda: uf.move(m.addr, m.addr, P * 1.0),
        ]
        for call in type_errors:
            with pytest.raises(TypeError):
                call()
        # None of the above reached the kernel: the range is still unregistered.
        assert uf.register(m.addr, P) == 0x13C
    with pytest.raises(ValueError):
        Userfaultfd(-1)
    with pytest.raises(ValueError):
        Userfaultfd(1 << 64)
    with pytest.raises(TypeError):
        Userfaultfd("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Userfaultfd(1.0)  # type: ignore[arg-type]
    # Arguments are checked before the fd is even looked at.
    uf = Userfaultfd()
    uf.close()
    with pytest.raises(TypeError):
        uf.register("x", P)  # type: ignore[arg-type]


def test_feature_bit_63_is_kernel_feature_error() -> None:
    with pytest.raises(KernelFeatureError) as info:
        Userfaultfd(1 << 63)
    err = info.value
    assert err.errno == errno.EINVAL
    assert isinstance(err, OSError)
    # The error names what is missing (KernelFeatureError.feature): an unknown bit by number.
    assert "None" not in err.feature and "63" in err.feature, err.feature


# -- close racing with use; buffers held through the call ---------------------------------


def test_close_during_a_call_keeps_the_number_from_another_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """``close()`` that runs while a call has the fd number in hand (another thread, a
    signal handler, a finalizer: here the ioctl itself calls it) releases the uffd but
    keeps the number taken until the call is out: the call fails (``ValueError``), and a
    uffd made meanwhile gets another number. Before, the number was freed at once, a new
    uffd took it, and the call meant for the old uffd registered the range with it."""
    import pagescan.userfaultfd as mod

    real = mod.libc.ioctl
    made: list[Userfaultfd] = []

    with anon(4) as m:
        a = Userfaultfd()

        def ioctl(fd: int, request: int, arg: Any) -> Any:
            if request == U.UFFDIO_REGISTER and not made:
                a.close()
                made.append(Userfaultfd())  # would take a's number if a's fd were closed
            return real(fd, request, arg)

        monkeypatch.setattr(mod.libc, "ioctl", ioctl)
        try:
            with pytest.raises(ValueError, match="closed"):
                a.register(m.addr, m.length)
        finally:
            monkeypatch.setattr(mod.libc, "ioctl", real)
        b = made[0]
        try:
            assert a.closed and b.fd != -1
            b.register(m.addr, m.length)  # nothing was registered with b (nor left with a)
            with pytest.raises(ValueError, match="closed"):
                a.register(m.addr, m.length)
        finally:
            b.close()
    assert "anon_inode:[userfaultfd]" not in _fd_links()


def _fd_links() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # (the listing's own fd)
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return links


def test_close_wakes_a_thread_waiting_in_read_events() -> None:
    uf = Userfaultfd()
    got: list[BaseException | list[Any]] = []

    def reader() -> None:
        try:
            got.append(uf.read_events(timeout=None))
        except BaseException as err:  # noqa: BLE001 - reported below
            got.append(err)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    uf.close()
    t.join(5)
    assert not t.is_alive(), "read_events still waits after close()"
    assert isinstance(got[0], ValueError) and "closed" in str(got[0])
    with pytest.raises(TypeError):
        Userfaultfd().read_events(timeout=True)  # type: ignore[arg-type]


class _BigNbytes(np.ndarray):
    @property  # type: ignore[misc]
    def nbytes(self) -> int:
        return 16 * P


def test_copy_from_holds_the_buffer_until_the_kernel_has_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer's export is held through ``UFFDIO_COPY``: a resize attempted meanwhile
    (here from inside the call) fails with ``BufferError`` and the page gets the bytes
    given; before, the bytearray was resized and the kernel copied freed heap. The length
    is the array's real one, whatever a subclass's ``nbytes`` says."""
    data = bytearray(b"A" * P)
    resized: list[BaseException] = []
    real = Userfaultfd.copy

    def copy(self: Userfaultfd, dst: int, src: int, length: int, **kw: Any) -> int:
        try:
            data.clear()
        except BufferError as err:
            resized.append(err)
        return real(self, dst, src, length, **kw)

    with anon(16) as m, Userfaultfd() as uf:
        uf.register(m.addr, m.length)
        monkeypatch.setattr(Userfaultfd, "copy", copy)
        assert uf.copy_from(m.addr, data) == P
        monkeypatch.setattr(Userfaultfd, "copy", real)
        assert resized and m.read(0) == b"A" * P
        assert uf.copy_from(m.addr + P, np.full(P, 7, np.uint8).view(_BigNbytes)) == P
        present = pagescan.scan(m.addr, m.end, category_anyof_mask=int(Category.PRESENT), return_mask=0)
        assert present.pages == 2 and m.read(1) == b"\x07" * P


def test_a_forked_child_closing_its_copy_does_not_end_the_parents_waits() -> None:
    """The wake pipe is the parent's: a child's ``close()`` (of its inherited copy) must
    not write to it, or every later wait of the parent returned at once."""
    uf = Userfaultfd()
    try:
        assert uf.read_events(timeout=0.01) == []  # (the wait makes the wake pipe)
        child = Child(lambda: (uf.close(), 0)[1])
        assert child.result(10) == 0
        t = time.monotonic()
        assert uf.read_events(timeout=0.3) == []
        assert time.monotonic() - t >= 0.25, "the child's close() ended the parent's wait"
    finally:
        uf.close()


def test_a_child_forked_during_a_call_can_close_its_copy() -> None:
    """A call in progress in another thread at the fork is not the child's: its close()
    closes its fd at once (before, it waited for that call for ever and the fd stayed)."""
    uf = Userfaultfd()
    waiting = threading.Thread(target=_read_quietly, args=(uf,))
    waiting.start()
    time.sleep(0.1)  # now inside read_events

    def child() -> list[str]:
        uf.close()
        return [ln for ln in _fd_links() if "userfaultfd" in ln]

    try:
        assert Child(child).result(10) == []
    finally:
        uf.close()
        waiting.join(5)
    assert not waiting.is_alive()


def _read_quietly(uf: Userfaultfd) -> None:
    with contextlib.suppress(ValueError):
        uf.read_events(timeout=None)


def test_a_close_before_the_wait_is_set_up_still_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``close()`` landing after a ``read_events`` began but before it made its wake
    pipe (here: from inside the pipe's creation) ends the wait at once."""
    uf = Userfaultfd()
    real = os.pipe2

    def pipe2(flags: int) -> tuple[int, int]:
        uf.close()
        return real(flags)

    monkeypatch.setattr(os, "pipe2", pipe2)
    t = time.monotonic()
    with pytest.raises(ValueError, match="closed"):
        uf.read_events(timeout=5)
    assert time.monotonic() - t < 2
    monkeypatch.setattr(os, "pipe2", real)
    assert "anon_inode:[userfaultfd]" not in _fd_links()


def test_a_call_cut_short_does_not_keep_the_uffd_open() -> None:
    """A call whose cleanup an exception from a signal handler cut short leaves its
    marker behind (Python cannot promise a ``finally`` runs to its end): ``close()``
    still releases the uffd at once, its number waits on a placeholder, and the object's
    collection closes that."""
    nulls = _fd_links().count("/dev/null")
    uf = Userfaultfd()
    uf._busy.append(object())  # the marker of such a call
    uf.close()
    links = _fd_links()
    assert "anon_inode:[userfaultfd]" not in links and links.count("/dev/null") == nulls + 1
    with pytest.raises(ValueError, match="closed"):
        uf.read_events()
    del uf
    gc.collect()
    assert _fd_links().count("/dev/null") == nulls
