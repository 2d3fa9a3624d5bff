"""The package as a whole: import side effects, public names, fd hygiene, fork,
``capabilities()`` against independent sources, and the ``pagescan caps`` command."""

from __future__ import annotations

import __future__
import contextlib
import dataclasses
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import pagescan
from pagescan import Category, Target, UffdFeature, scan, scan_iter
from pagescan._uapi import libc
from pagescan._uapi import userfaultfd as U
from pagescan._uapi.mman import MADV

from . import oracle
from .conftest import hugetlb_pool, requires_pagemap_scan
from .memory import P, anon, child_process

CAPS_MODULE = sys.modules["pagescan.capabilities"]  # pagescan.capabilities is the function


# -- import probes nothing ------------------------------------------------------------

_IMPORT_STATE = """
import json, os, sys
import pagescan
caps_mod = sys.modules["pagescan.capabilities"]
probes = sys.modules["pagescan._probe"]
fds = []
for fd in os.listdir("/proc/self/fd"):
    try:
        fds.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
state = {
    "fds": fds,
    "self_target": pagescan._target._self is not None,
    "probe_cache": caps_mod._base_report.cache_info().currsize + probes.pagemap_scan.cache_info().currsize
    + probes.uffd_api.cache_info().currsize,
    "libc_loaded": pagescan._uapi.libc.libc.cache_info().currsize,
}
if len(sys.argv) > 1:
    pagescan.scan(0, 0)
    pagescan.capabilities()
    state["after"] = [pagescan._target._self is not None, caps_mod._base_report.cache_info().currsize]
print(json.dumps(state))
"""


def test_import_leaves_no_state() -> None:
    out = subprocess.run([sys.executable, "-c", _IMPORT_STATE], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert not any("pagemap" in f or "userfaultfd" in f for f in state["fds"]), state["fds"]
    assert state["self_target"] is False
    assert state["probe_cache"] == 0
    assert state["libc_loaded"] == 0  # libc is loaded lazily, on first use
    # The positive control: using the library does create the cached state.
    out = subprocess.run([sys.executable, "-c", _IMPORT_STATE, "use"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["after"] == [True, 1]


def _strace(tmp_path: Path, code: str) -> str:
    log = tmp_path / "strace.log"
    out = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=ioctl,userfaultfd,openat,open", "-o", str(log), sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return log.read_text()


_PAGEMAP_SCAN_RE = re.compile(r"ioctl\([^)]*(PAGEMAP_SCAN|0x66, 0x10, 0x60|0xc0606610)", re.IGNORECASE)
_UFFD_RE = re.compile(r"userfaultfd\(|/dev/userfaultfd|UFFDIO_API|0xaa, 0x3f")
_PAGEMAP_OPEN_RE = re.compile(r"open(at)?\([^)]*/proc/[^/]+/pagemap")


def _probes(trace: str) -> list[str]:
    return [line for line in trace.splitlines()
            if _PAGEMAP_SCAN_RE.search(line) or _UFFD_RE.search(line) or _PAGEMAP_OPEN_RE.search(line)]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_import_makes_no_probing_syscalls(tmp_path: Path) -> None:
    assert _probes(_strace(tmp_path, "import pagescan, pagescan.cli")) == []
    # Positive control: the detector sees the probes when they happen.
    used = _probes(_strace(tmp_path, "import pagescan; pagescan.capabilities()"))
    assert any(_PAGEMAP_SCAN_RE.search(line) for line in used), used
    assert any(_UFFD_RE.search(line) for line in used), used
    assert any(_PAGEMAP_OPEN_RE.search(line) for line in used), used


# -- public names -------------------------------------------------------------------


def test_all_names_exist_and_nothing_public_is_missing() -> None:
    names = pagescan.__all__
    assert len(names) == len(set(names)), "duplicates in __all__"
    for name in names:
        assert hasattr(pagescan, name), f"{name} is in __all__ but missing"
    public = {
        n for n, v in vars(pagescan).items()
        if not n.startswith("_")
        and not isinstance(v, types.ModuleType)
        and not isinstance(v, __future__._Feature)  # `from __future__ import annotations`
    }
    assert public - set(names) == set(), "public attributes missing from __all__"
    assert set(names) - public == set()
    ns: dict[str, Any] = {}
    exec("from pagescan import *", ns)
    assert set(ns) - {"__builtins__"} == set(names)


def test_required_names_are_public() -> None:
    for name in ("scan", "scan_iter", "capabilities", "Category", "PAGE_REGION_DTYPE",
                 "PM_SCAN_WP_MATCHING", "PM_SCAN_CHECK_WPASYNC", "Userfaultfd", "Target"):
        assert name in pagescan.__all__
    assert int(pagescan.PM_SCAN_WP_MATCHING) == 1 and int(pagescan.PM_SCAN_CHECK_WPASYNC) == 2
    assert [(c.name, int(c)) for c in Category] == [
        ("WPALLOWED", 1), ("WRITTEN", 2), ("FILE", 4), ("PRESENT", 8), ("SWAPPED", 16),
        ("PFNZERO", 32), ("HUGE", 64), ("SOFT_DIRTY", 128), ("GUARD", 256),
    ]


def test_public_classes_live_in_pagescan() -> None:
    wrong = {
        name: obj.__module__
        for name in pagescan.__all__
        if isinstance(obj := getattr(pagescan, name), type) and obj.__module__ != "pagescan"
    }
    assert wrong == {}, f"public classes whose __module__ is not 'pagescan': {wrong}"


def test_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", pagescan.__version__)


# -- fd hygiene ---------------------------------------------------------------------


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


@requires_pagemap_scan
def test_no_fd_leak_across_a_burst_of_scans() -> None:
    with anon(16) as m:
        m.touch(0, 16)
        scan(m.addr, m.end)  # the cached self fd exists before we count
        with child_process(lambda: m.touch(3)) as pid:
            before = _fds()
            for i in range(300):
                scan(m.addr, m.end, return_mask=Category.PRESENT, vec_len=1 + i % 5)
            for _ in range(100):
                scan(m.addr, m.end, pid=pid, return_mask=Category.PRESENT)
                scan(m.addr, m.end, pid=os.getpid(), return_mask=Category.PRESENT)
            for _ in range(20):
                list(scan_iter(m.addr, m.end, pid=pid, vec_len=1, return_mask=Category.PRESENT))
                with Target(pid) as t:
                    scan(m.addr, m.end, pid=t)
                with pytest.raises(OSError):
                    scan(m.addr, m.end, pid=pid, flags=4)  # fails inside the ioctl
                with pytest.raises(PermissionError):
                    scan(m.addr, m.end, pid=pid, flags=2)
                with pytest.raises(ValueError):
                    scan(m.addr, m.end, pid=pid, max_pages=-1)
            assert _fds() == before
            assert sum("pagemap" in v for v in _fds().values()) == 1


# -- fork --------------------------------------------------------------------------


@requires_pagemap_scan
def test_pagemap_fd_is_reopened_after_fork() -> None:
    with anon(4) as m:
        m.write(0, 4)
        scan(m.addr, m.end)  # cache our pagemap fd before forking
        cached = pagescan._target._self
        assert cached is not None and cached.pid == os.getpid()
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(go_w)
                os.close(res_r)
                reset_at_fork = pagescan._target._self is None
                m.madvise(MADV.DONTNEED, 0, 1)
                m.write(3, 1, value=9)
                os.read(go_r, 1)  # wait for the parent to change its own mm
                res = scan(m.addr, m.end, category_mask=Category.PRESENT, return_mask=Category.PRESENT)
                t = pagescan._target._self
                answer = {
                    "reset_at_fork": reset_at_fork,
                    "regions": [[(s - m.addr) // P, (e - m.addr) // P] for s, e, _ in res.regions.tolist()],
                    "target_pid": None if t is None else t.pid,
                    "pid": os.getpid(),
                }
                os.write(res_w, json.dumps(answer).encode())
            finally:
                os._exit(0)
        os.close(go_r)
        os.close(res_w)
        try:
            m.madvise(MADV.DONTNEED, 1, 1)
            m.madvise(MADV.DONTNEED, 3, 1)
            os.write(go_w, b"1")
            data = b""
            for _ in range(100):
                chunk = os.read(res_r, 4096)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(go_w)
            os.close(res_r)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        answer = json.loads(data)
        assert answer["reset_at_fork"] is True
        assert answer["target_pid"] == answer["pid"] == pid
        assert answer["regions"] == [[1, 4]]  # the child's mm, not the parent's
        mine = scan(m.addr, m.end, category_mask=Category.PRESENT, return_mask=Category.PRESENT)
        assert [((s - m.addr) // P, (e - m.addr) // P) for s, e, _ in mine.regions.tolist()] == [(0, 1), (2, 3)]
        assert pagescan._target._self is cached and not cached.closed  # the parent keeps its fd


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


def test_capabilities_against_system_files() -> None:
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
        block = text[text.index(f"{m.addr:x}-"):]
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


def test_cli_caps_json() -> None:
    out = subprocess.run([sys.executable, "-m", "pagescan", "caps", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    _check_json(out.stdout)
    script = Path(sys.executable).with_name("pagescan")
    if script.exists():
        out = subprocess.run([str(script), "caps", "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _check_json(out.stdout)


def test_cli_usage_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "pagescan"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pagescan", "caps", "--nope"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "pagescan", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and pagescan.__version__ in out.stdout
