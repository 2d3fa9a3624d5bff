"""The package as a whole: import side effects, public names, fd hygiene, fork, and
the command's usage errors. ``capabilities()`` is tested in ``test_capabilities.py``."""

from __future__ import annotations

import __future__
import contextlib
import json
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
from pagescan import Category, Target, scan, scan_iter
from pagescan._uapi.mman import MADV

from .conftest import requires_pagemap_scan
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
    """One version, in the code and in pyproject.toml (which the wheel's metadata gets)."""
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", pagescan.__version__)
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.exists():  # a checkout or an sdist, not an installed wheel alone
        declared = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)
        assert declared is not None and declared.group(1) == pagescan.__version__


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


# -- command line -------------------------------------------------------------------


def test_cli_usage_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "pagescan"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr
    out = subprocess.run([sys.executable, "-m", "pagescan", "caps", "--nope"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "pagescan", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and pagescan.__version__ in out.stdout
