"""Shared fixtures: kernel-feature markers, fd-leak guard, machine-state fixtures.

Skips happen only for a kernel feature this kernel lacks, and the reason says which
(and what this kernel is). Fixtures that change the machine (hugetlb pool, zram swap)
restore it afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

import pagescan
from pagescan import Category, RegisterMode, UffdFeature, Userfaultfd

from .memory import Mapping
from .procs import children_of

RELEASE = os.uname().release


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options of the fuzz suite (tests/fuzz): see its package docstring."""
    parser.addoption("--fuzz-long", action="store_true", help="run the long fuzz profile (>= 100,000 calls)")
    parser.addoption("--fuzz-known-defects", choices=("fail", "xfail"), default=None,
                     help="fuzz findings that are all known defects (tests/fuzz KNOWN_DEFECTS): fail (default) or xfail")


def _caps() -> pagescan.Capabilities:
    return pagescan.capabilities()


def _needs(ok: bool, what: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not ok, reason=f"needs {what}; this kernel is {RELEASE}")


requires_pagemap_scan = _needs(_caps().pagemap_scan, "PAGEMAP_SCAN (Linux 6.7)")
requires_wp_async = _needs(_caps().wp_async, "UFFD_FEATURE_WP_ASYNC (Linux 6.7)")
requires_uffd_move = _needs(_caps().uffd_move, "UFFDIO_MOVE (Linux 6.8)")
requires_soft_dirty = _needs(_caps().soft_dirty, "CONFIG_MEM_SOFT_DIRTY")
requires_guard = _needs(
    _caps().guard_regions and bool(_caps().categories & Category.GUARD),
    "MADV_GUARD_INSTALL and PAGE_IS_GUARD (Linux 6.16)",
)
requires_thp = _needs(_caps().thp_mode in ("always", "madvise"), "transparent huge pages enabled")

#: The feature set the kernel's pagemap_ioctl selftest asks for.
WP_FEATURES = UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED | UffdFeature.WP_HUGETLBFS_SHMEM


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every test leaves /proc/self/fd as it found it (pagescan's own cached fd aside)."""
    pagescan.scan(0, 0)  # opens (and caches) our own pagemap fd first
    before = set(os.listdir("/proc/self/fd"))
    yield
    after = set(os.listdir("/proc/self/fd"))
    leaked = {}
    for fd in after - before:
        with contextlib.suppress(OSError):
            leaked[fd] = os.readlink(f"/proc/self/fd/{fd}")
    assert not leaked, f"test leaked file descriptors: {leaked}"


@pytest.fixture(autouse=True)
def no_children_left() -> Iterator[None]:
    """Every test reaps the processes it started (5 s of grace for exiting ones)."""
    before = children_of()
    yield
    deadline = time.monotonic() + 5
    while (left := children_of() - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left, f"child processes left behind: {left}"


@pytest.fixture
def uffd_wp() -> Iterator[Userfaultfd]:
    """A WP-async userfaultfd (the pagemap selftest's feature set)."""
    with Userfaultfd(WP_FEATURES) as uf:
        yield uf


def arm(uf: Userfaultfd, m: Mapping, page: int = 0, npages: int | None = None) -> None:
    """The selftests' ARM: register WP and write-protect the range."""
    n = m.npages if npages is None else npages
    ioctls = uf.register(m[page], n * m.page_size, RegisterMode.WP)
    assert ioctls & pagescan.UffdIoctl.WRITEPROTECT
    uf.writeprotect(m[page], n * m.page_size)


def reset(start: int, end: int) -> None:
    """The selftests' RESET: WP|CHK scan with no vector (the kernel's fast path)."""
    pagescan.scan(
        start, end, flags=3, category_mask=Category.WRITTEN, return_mask=Category.WRITTEN, vec_len=0
    )


# -- machine state ------------------------------------------------------------------


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


_MACHINE_LOCK = "/sys/kernel/mm"
_held = {"fd": -1, "depth": 0}


@contextlib.contextmanager
def _machine_state() -> Iterator[None]:
    """Hold the machine-state lock: an ``flock`` on ``/sys/kernel/mm`` itself (no lock
    file is left behind), so that two test runs on one machine take turns with the
    hugetlb pool and the zram swap device instead of tearing them down under each
    other. One lock for all such state (no lock-order deadlock between runs), taken
    once per process however often the fixtures nest."""
    if _held["depth"] == 0:
        fd = os.open(_MACHINE_LOCK, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        _held["fd"] = fd
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if _held["depth"] == 0:
            fd, _held["fd"] = _held["fd"], -1
            os.close(fd)


@pytest.fixture
def machine_state_steady() -> Iterator[None]:
    """For a test that reads machine-wide state (the hugetlb pool, swap): another test
    run on this machine changes it only while holding the lock, so hold it too."""
    with _machine_state():
        yield


@contextlib.contextmanager
def hugetlb_pool(pages: int, size_kb: int = 2048) -> Iterator[int]:
    """Reserve ``pages`` hugetlb pages of ``size_kb``; restore the old count after."""
    path = f"/sys/kernel/mm/hugepages/hugepages-{size_kb}kB/nr_hugepages"
    with _machine_state():
        yield from _hugetlb_pool_locked(path, pages, size_kb)


def _hugetlb_pool_locked(path: str, pages: int, size_kb: int) -> Iterator[int]:
    old = int(_read(path))
    _write(path, str(old + pages))
    try:
        got = int(_read(path)) - old
        if got < pages:
            pytest.fail(f"could reserve only {got} of {pages} hugetlb pages of {size_kb} kB")
        yield got
    finally:
        _write(path, str(old))


@pytest.fixture(scope="session")
def hugetlb_2m() -> Iterator[int]:
    """Eight free 2 MiB hugetlb pages for the session."""
    with hugetlb_pool(8) as n:
        yield n


@pytest.fixture(scope="session")
def zram_swap() -> Iterator[str]:
    """A 256 MiB swap device on /dev/zram0, removed afterwards."""
    dev = "/dev/zram0"
    sysdir = "/sys/block/zram0"
    if not os.path.exists(dev):
        subprocess.run(["modprobe", "zram", "num_devices=1"], check=False)
    if not os.path.exists(dev):
        pytest.fail("/dev/zram0 is missing and the zram module could not be loaded")
    with _machine_state():
        yield from _zram_swap_locked(dev, sysdir)


def _zram_swap_locked(dev: str, sysdir: str) -> Iterator[str]:
    size = _read(f"{sysdir}/disksize")
    if size != "0":
        # We hold the lock every test run takes, so a configured zram0 of the size this
        # fixture makes was left behind by a run that was killed: take it back. Any
        # other size is somebody's real swap device: leave it alone.
        if size != str(256 << 20):
            pytest.fail(f"/dev/zram0 is in use ({size} bytes); refusing to take it over")
        with open("/proc/swaps") as f:
            if dev in f.read():
                subprocess.run(["swapoff", dev], check=True, capture_output=True)
        _write(f"{sysdir}/reset", "1")
    _write(f"{sysdir}/disksize", str(256 << 20))
    try:
        subprocess.run(["mkswap", dev], check=True, capture_output=True)
        subprocess.run(["swapon", dev], check=True, capture_output=True)
        try:
            yield dev
        finally:
            subprocess.run(["swapoff", dev], check=True, capture_output=True)
    finally:
        for _ in range(50):
            try:
                _write(f"{sysdir}/reset", "1")
                break
            except OSError:
                time.sleep(0.1)


def page_out(m: Mapping, page: int = 0, npages: int | None = None, tries: int = 20) -> None:
    """MADV_PAGEOUT until the pages are swapped (pagemap bit 62), or fail."""
    from .memory import pagemap_entries

    n = m.npages - page if npages is None else npages
    for _ in range(tries):
        m.madvise(pagescan.MADV.PAGEOUT, page, n)
        if all(e >> 62 & 1 for e in pagemap_entries(m[page], n)):
            return
        time.sleep(0.05)
    pytest.fail("MADV_PAGEOUT did not swap the pages out")
