"""``capabilities()`` against independent sources (``/proc``, sysfs, the raw probes)
and the ``pagescan caps`` command."""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pagescan
from pagescan import Category, UffdFeature
from pagescan._uapi import libc
from pagescan._uapi import userfaultfd as U
from pagescan._uapi.mman import MADV

from . import oracle
from .conftest import hugetlb_pool
from .memory import P, anon

CAPS_MODULE = sys.modules["pagescan.capabilities"]  # pagescan.capabilities is the function


# -- capabilities() against independent sources ---------------------------------------


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out


def _sysfs(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def test_capabilities_against_system_files(machine_state_steady: None) -> None:
    caps = pagescan.capabilities()
    assert dataclasses.is_dataclass(caps)
    uname = os.uname()
    assert caps.kernel_release == uname.release and caps.machine == uname.machine
    assert caps.page_size == mmap.PAGESIZE == os.sysconf("SC_PAGE_SIZE")
    thp = _sysfs("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp is None:
        assert caps.thp_mode == "unavailable" and caps.thp_pmd_size == 0 and "THP" in caps.missing
    else:
        assert caps.thp_mode == re.search(r"\[(\w+)\]", thp).group(1)
        assert caps.thp_pmd_size == int(_sysfs("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") or 0)
        assert ("THP" in caps.missing) == (caps.thp_mode == "never")
    info = _meminfo()
    assert caps.hugetlb_page_size == info.get("Hugepagesize", 0) * 1024
    assert caps.hugetlb_pages == info.get("HugePages_Total", 0)
    assert caps.hugetlb_free == info.get("HugePages_Free", 0)
    assert ("hugetlb pages" in caps.missing) == (caps.hugetlb_page_size > 0 and caps.hugetlb_pages == 0)
    assert caps.kpageflags == os.access("/proc/kpageflags", os.R_OK)
    with open("/proc/self/status") as f:
        cap_eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    assert caps.pfns_visible == bool(cap_eff >> 21 & 1)  # CAP_SYS_ADMIN
    # A fresh VMA carries VM_SOFTDIRTY, shown as "sd" in smaps only with CONFIG_MEM_SOFT_DIRTY.
    with anon(1) as m:
        m.touch()
        with open("/proc/self/smaps") as f:
            text = f.read()
        # the VMA holding the page: it may start below m.addr (merged with a neighbour
        # of the same flags)
        heads = [(mt.start(), int(mt.group(1), 16), int(mt.group(2), 16))
                 for mt in re.finditer(r"(?m)^([0-9a-f]+)-([0-9a-f]+) ", text)]
        at = next(pos for pos, lo, hi in heads if lo <= m.addr < hi)
        block = text[at:]
        flags = next(line for line in block.splitlines() if line.startswith("VmFlags:")).split()[1:]
    assert caps.soft_dirty == ("sd" in flags)


def test_capabilities_track_the_hugetlb_pool() -> None:
    if not pagescan.capabilities().hugetlb_page_size:
        pytest.skip(f"kernel built without hugetlbfs; this kernel is {os.uname().release}")
    size_kb = pagescan.capabilities().hugetlb_page_size // 1024
    with hugetlb_pool(1, size_kb):
        caps = pagescan.capabilities()
        assert caps.hugetlb_pages == _meminfo()["HugePages_Total"] >= 1
        assert "hugetlb pages" not in caps.missing
    caps = pagescan.capabilities()
    assert caps.hugetlb_pages == _meminfo()["HugePages_Total"]
    assert ("hugetlb pages" in caps.missing) == (caps.hugetlb_pages == 0)


def _raw_scan_errno(fd: int, addr: int, flags: int = 0, ret: int = 0) -> int:
    return oracle.raw_errno(addr, addr, fd=fd, flags=flags, return_mask=ret, vec_len=0)


def test_capabilities_against_raw_probes() -> None:
    caps = pagescan.capabilities()
    with anon(2) as m:
        m.touch()
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert caps.pagemap_scan == (_raw_scan_errno(fd, m.addr) == 0)
            if caps.pagemap_scan:
                cats = sum(1 << b for b in range(64) if _raw_scan_errno(fd, m.addr, ret=1 << b) == 0)
                flags = sum(1 << b for b in range(64) if _raw_scan_errno(fd, m.addr, flags=1 << b) == 0)
                assert int(caps.categories) == cats
                assert int(caps.scan_flags) == flags
        finally:
            os.close(fd)
        try:
            libc.madvise(m[1], P, MADV.GUARD_INSTALL)
            guard = True
        except OSError:
            guard = False
        assert caps.guard_regions == guard
    # userfaultfd: a raw handshake with no features lists what the kernel supports.
    fd = libc.syscall(libc.SYS_userfaultfd, U.O_CLOEXEC | U.O_NONBLOCK)
    try:
        api = U.uffdio_api(U.UFFD_API, 0, 0)
        libc.ioctl(fd, U.UFFDIO_API, api)
    finally:
        os.close(fd)
    assert caps.userfaultfd
    assert int(caps.uffd_features) == api.features
    assert int(caps.uffd_ioctls) == api.ioctls
    assert caps.wp_async == bool(api.features & UffdFeature.WP_ASYNC)
    assert caps.uffd_move == bool(api.features & UffdFeature.MOVE)


def test_missing_explains_every_absent_feature() -> None:
    caps = pagescan.capabilities()
    for key, why in caps.missing.items():
        assert isinstance(key, str) and isinstance(why, str) and why.strip(), (key, why)
    flags = {
        "PAGEMAP_SCAN": caps.pagemap_scan,
        "soft-dirty": caps.soft_dirty,
        "PFNs": caps.pfns_visible,
        "kpageflags": caps.kpageflags,
        "guard regions": caps.guard_regions,
        "userfaultfd": caps.userfaultfd,
    }
    for key, present in flags.items():
        assert (key in caps.missing) == (not present), key
    if caps.pagemap_scan:
        for cat in Category:
            assert (f"PAGE_IS_{cat.name}" in caps.missing) == (not caps.categories & cat)
    if caps.userfaultfd:
        for feat in UffdFeature:
            assert (f"UFFD_FEATURE_{feat.name}" in caps.missing) == (not caps.uffd_features & feat)
    if not caps.soft_dirty:
        assert "CONFIG_MEM_SOFT_DIRTY" in caps.missing["soft-dirty"]
    # The cached probe is not mutated by callers.
    caps.missing["bogus"] = "x"
    assert "bogus" not in pagescan.capabilities().missing
    json.dumps(caps.as_dict())


# -- command line -------------------------------------------------------------------


def test_cli_caps_text() -> None:
    out = subprocess.run([sys.executable, "-m", "pagescan", "caps"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    caps = pagescan.capabilities()
    assert os.uname().release in out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith("PAGEMAP_SCAN"))
    assert line.split()[-1] == ("yes" if caps.pagemap_scan else "no")
    for key in caps.missing:
        assert key in out.stdout
    assert out.stderr == ""


def _check_json(stdout: str) -> None:
    data = json.loads(stdout)
    caps = pagescan.capabilities()
    assert set(data) == {f.name for f in dataclasses.fields(caps)}
    assert data["kernel_release"] == os.uname().release
    assert data["page_size"] == mmap.PAGESIZE
    assert data["categories"] == [c.name for c in Category if caps.categories & c]
    assert data["uffd_features"] == [f.name for f in UffdFeature if caps.uffd_features & f]
    assert data["thp_mode"] == caps.thp_mode
    assert data["hugetlb_pages"] == _meminfo().get("HugePages_Total", 0)
    assert data["missing"].keys() == caps.missing.keys()


def test_cli_caps_json(machine_state_steady: None) -> None:
    out = subprocess.run([sys.executable, "-m", "pagescan", "caps", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    _check_json(out.stdout)
    script = Path(sys.executable).with_name("pagescan")
    if script.exists():
        out = subprocess.run([str(script), "caps", "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _check_json(out.stdout)


