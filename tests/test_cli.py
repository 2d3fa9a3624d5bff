"""The ``pagescan`` command line against real processes.

Most tests call ``pagescan.cli.main(argv)`` in-process (output through ``capsys``); a few
run ``python -m pagescan`` as a real subprocess (exit status, stderr, broken pipe,
another uid). The target is a child Python process that builds a known layout --
written anon pages, zero pages, a private file mapping, a PMD THP, the huge zero page,
hugetlb pages, swapped pages and guard pages, each its own mapping between PROT_NONE
separators -- prints the addresses as JSON and waits on stdin.

``stat`` and ``map`` are tested in test_cli_stat.py (with this module's target).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pagescan
from pagescan import Category
from pagescan._procfs import read_maps
from pagescan.cli import build_parser, main

from .conftest import requires_pagemap_scan
from .memory import P

pytestmark = requires_pagemap_scan

KB = 1024
HUGE = 2 << 20
HP = HUGE // P  # base pages per PMD
CAPS = pagescan.capabilities()
HAS_GUARD = CAPS.guard_regions and bool(CAPS.categories & Category.GUARD)
#: A file name that JSON must escape (quote, backslash, non-ASCII, tab).
WEIRD = 'we"ird\\ n\u00e4me\t.bin'
HAS_THP = CAPS.thp_mode in ("always", "madvise") and CAPS.thp_pmd_size == HUGE


# -- the target process ---------------------------------------------------------------

CHILD = r'''
import ctypes, json, os, struct, sys, time
from pagescan._uapi import libc
from pagescan._uapi.mman import MADV, MAP, PROT, MAP_HUGE_SHIFT

P = os.sysconf("SC_PAGE_SIZE")
H = 2 << 20
cfg = json.loads(sys.argv[1])
RW = PROT.READ | PROT.WRITE
ANON = MAP.PRIVATE | MAP.ANONYMOUS
# Every piece gets its own 2 MiB-aligned slot in a PROT_NONE reservation, so each is one
# VMA (never merged with a neighbour) with PROT_NONE separators around it.
base = libc.mmap(0, 48 * H, PROT.NONE, ANON | MAP.NORESERVE)
cur = ((base + H - 1) & ~(H - 1)) + H
out = {"pieces": {}}

def place(name, length, prot=RW, flags=ANON, fd=-1):
    global cur
    addr = libc.mmap(cur, length, prot, flags | MAP.FIXED, fd, 0)
    out["pieces"][name] = [addr, addr + length]
    cur += (length + P + H - 1) & ~(H - 1)
    return addr

def smaps_kb(addr, field):
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == addr
            elif inside and line.startswith(field + ":"):
                return int(line.split()[1])
    return -1

def swapped(addr, n):
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entries = struct.unpack(f"<{n}Q", os.pread(fd, 8 * n, addr // P * 8))
    finally:
        os.close(fd)
    return all(e >> 62 & 1 for e in entries)

a = place("written", 64 * P)
ctypes.memset(a, 7, 64 * P)
a = place("zero", 32 * P, prot=PROT.READ)
for i in range(32):
    ctypes.string_at(a + i * P, 1)
fd = os.open(cfg["file"], os.O_RDONLY)
a = place("file", 16 * P, prot=PROT.READ, flags=MAP.PRIVATE, fd=fd)
os.close(fd)
ctypes.string_at(a, 16 * P)
fd = os.open(cfg["weird"], os.O_RDONLY)
a = place("weird", P, prot=PROT.READ, flags=MAP.PRIVATE, fd=fd)
os.close(fd)
ctypes.string_at(a, 1)
if cfg["thp"]:
    a = place("thp", H)
    libc.madvise(a, H, MADV.HUGEPAGE)
    ctypes.memset(a, 9, H)
    if smaps_kb(a, "AnonHugePages") < H // 1024:
        try:
            libc.madvise(a, H, MADV.COLLAPSE)
        except OSError:
            pass
    out["thp_kb"] = smaps_kb(a, "AnonHugePages")
    a = place("hugezero", H, prot=PROT.READ)
    libc.madvise(a, H, MADV.HUGEPAGE)
    ctypes.string_at(a, 1)
a = place("hugetlb", 2 * H, flags=ANON | MAP.HUGETLB | (21 << MAP_HUGE_SHIFT))
ctypes.memset(a, 5, 2 * H)
if cfg["guard"]:
    a = place("guard", 16 * P)
    ctypes.memset(a, 3, 8 * P)
    libc.madvise(a + 8 * P, 4 * P, MADV.GUARD_INSTALL)
a = place("swap", 32 * P)
for i in range(32):
    ctypes.memset(a + i * P, i + 1, P)
for _ in range(100):
    libc.madvise(a, 32 * P, MADV.PAGEOUT)
    if swapped(a, 32):
        break
    time.sleep(0.05)
out["swapped_ok"] = swapped(a, 32)
print(json.dumps(out), flush=True)
sys.stdin.read()
'''


@dataclass
class Child:
    pid: int
    pieces: dict[str, tuple[int, int]]
    info: dict[str, Any]
    file: str
    proc: subprocess.Popen[str]

    def piece(self, name: str) -> tuple[int, int]:
        if name not in self.pieces:
            pytest.fail(f"the target has no {name!r} piece")
        return self.pieces[name]


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory, zram_swap: str, hugetlb_2m: int) -> Iterator[Child]:
    """The target process with a known layout; killed and reaped afterwards."""
    d = tmp_path_factory.mktemp("cli")
    script = d / "target.py"
    script.write_text(CHILD)
    data = d / "data.bin"
    data.write_bytes(os.urandom(16 * P))
    weird = d / WEIRD
    weird.write_bytes(b"w" * P)
    cfg = {"file": str(data), "weird": str(weird), "thp": HAS_THP, "guard": HAS_GUARD}
    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(cfg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=d,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        if not line:
            pytest.fail(f"target process did not start (exit status {proc.poll()})")
        info = json.loads(line)
        pieces = {k: (v[0], v[1]) for k, v in info.pop("pieces").items()}
        yield Child(proc.pid, pieces, info, str(data), proc)
    finally:
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        shutil.rmtree(d, ignore_errors=True)


# -- oracles ----------------------------------------------------------------------------

def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0 and err == "", err
    return json.loads(out)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""
    assert err.startswith("usage: pagescan") and "Traceback" not in err
    return err


def one_line_error(rc: int, out: str, err: str, kind: str) -> str:
    assert rc == 1 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"pagescan: {kind}: ") and "Traceback" not in err
    return err


# -- scan -------------------------------------------------------------------------------


def test_closed_standard_streams_are_no_traceback() -> None:
    """Started with stdout closed (``>&-``): exit 1 with a one-line message, no
    traceback; with stderr closed (``2>&-``) the report is still written."""
    def closing(fd: int) -> Any:
        return lambda: os.close(fd)

    out = subprocess.run([sys.executable, "-m", "pagescan", "ps"], stderr=subprocess.PIPE, text=True,
                         preexec_fn=closing(1), timeout=120)
    assert out.returncode == 1 and out.stderr == "pagescan: standard output is closed\n"
    out = subprocess.run([sys.executable, "-m", "pagescan", "caps"], stdout=subprocess.PIPE, text=True,
                         preexec_fn=closing(2), timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("kernel")


def test_scan_hex_range(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    lo, hi = child.piece("written")
    for text in (f"0x{lo:x}-0x{hi:x}", f"{lo:x}-{hi:x}"):
        doc = run_json(capsys, "scan", str(child.pid), text)
        assert doc["pid"] == child.pid
        assert doc["ranges"] == [{"start": lo, "end": hi, "name": text}]
        assert doc["regions"] == [{"start": lo, "end": hi, "pages": 64, "categories": ["written", "present"]}]
    # a range over two pieces and the separator between them
    zlo, zhi = child.piece("zero")
    doc = run_json(capsys, "scan", str(child.pid), f"{lo:x}-{zhi:x}")
    got = [(r["start"], r["end"], set(r["categories"])) for r in doc["regions"]]
    assert got[0] == (lo, hi, {"written", "present"})
    assert got[-1] == (zlo, zhi, {"written", "present", "pfnzero"})
    assert all(not ({"present", "swapped"} & c) for _, _, c in got[1:-1])


def test_scan_by_name(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    vmas = {v.name: v for v in read_maps(child.pid)}
    for name in ("[heap]", "[stack]"):
        doc = run_json(capsys, "scan", str(child.pid), name)
        v = vmas[name]
        assert doc["ranges"] == [{"start": v.start, "end": v.end, "name": name}]
        assert doc["regions"] and all(v.start <= r["start"] < r["end"] <= v.end for r in doc["regions"])
        assert any("present" in r["categories"] for r in doc["regions"])
    lo, hi = child.piece("file")
    for name in (child.file, os.path.basename(child.file)):
        doc = run_json(capsys, "scan", str(child.pid), name)
        assert doc["ranges"] == [{"start": lo, "end": hi, "name": child.file}]
        assert doc["regions"] == [{"start": lo, "end": hi, "pages": 16, "categories": ["written", "file", "present"]}]
    rc, out, err = run(capsys, "scan", str(child.pid), "/no/such/file")
    assert "no mapping named '/no/such/file'" in one_line_error(rc, out, err, "ValueError")


def test_scan_filters(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    pid = str(child.pid)
    doc = run_json(capsys, "scan", pid, "--require", "present", "--exclude", "file")
    assert doc["regions"]
    for r in doc["regions"]:
        assert "present" in r["categories"] and "file" not in r["categories"]
    assert any(r["start"] == child.piece("written")[0] for r in doc["regions"])

    cats = "swapped,guard" if HAS_GUARD else "swapped"
    doc = run_json(capsys, "scan", pid, "--anyof", cats, "--return", cats)
    got = [(r["start"], r["end"], r["categories"]) for r in doc["regions"]]
    slo, shi = child.piece("swap")
    assert (slo, shi, ["swapped"]) in got
    if HAS_GUARD:
        glo = child.piece("guard")[0]
        assert (glo + 8 * P, glo + 12 * P, ["swapped", "guard"]) in got

    doc = run_json(capsys, "scan", pid, "--require", "huge", "--exclude", "zero", "--return", "huge")
    spans = {(r["start"], r["end"]) for r in doc["regions"]}
    assert child.piece("hugetlb") in spans and all(r["categories"] == ["huge"] for r in doc["regions"])
    if HAS_THP:
        assert child.piece("thp") in spans and child.piece("hugezero") not in spans

    lo, hi = child.piece("written")
    doc = run_json(capsys, "scan", pid, f"{lo:x}-{hi:x}", "--max-pages", "10")
    assert doc["regions"] == [{"start": lo, "end": lo + 10 * P, "pages": 10, "categories": ["written", "present"]}]
    # --max-pages is one budget over every mapping of a name (python's several segments)
    libpy = [v for v in read_maps(child.pid) if v.name.startswith("/")]
    name = max({v.name for v in libpy}, key=lambda n: sum(v.name == n for v in libpy))
    assert sum(v.name == name for v in libpy) >= 3
    doc = run_json(capsys, "scan", pid, name, "--require", "present", "--max-pages", "7")
    assert sum(r["pages"] for r in doc["regions"]) == 7 and len(doc["ranges"]) >= 3
    doc = run_json(capsys, "scan", pid, name, "--require", "present")
    assert sum(r["pages"] for r in doc["regions"]) > 7


def test_scan_backends_agree(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    lo = min(lo for lo, _ in child.pieces.values())
    hi = max(hi for _, hi in child.pieces.values())
    docs = [run_json(capsys, "scan", str(child.pid), f"{lo:x}-{hi:x}", "--backend", b) for b in ("kernel", "emulated")]
    assert docs[0]["regions"] == docs[1]["regions"]
    assert len(docs[0]["regions"]) >= len(child.pieces)


def test_scan_table(child: Child, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    lo, hi = child.piece("file")
    rc, out, err = run(capsys, "scan", str(child.pid), f"{lo:x}-{hi:x}")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["RANGE", "PAGES", "SIZE", "PSWFZHDGA", "MAPPING"]
    assert lines[1].split() == [f"{lo:x}-{hi:x}", "16", "64K", "P.WF.....", child.file]
    assert lines[2] == "1 regions, 16 pages (64K)"


def test_scan_usage_errors(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    pid = str(child.pid)
    assert "unknown category 'bogus'" in usage_error(capsys, "scan", pid, "--require", "present,bogus")
    assert "unknown category" in usage_error(capsys, "scan", pid, "--return", "nope")
    assert "both in anyof and excluded" in usage_error(capsys, "scan", pid, "--anyof", "file", "--exclude", "file")
    assert "both required and excluded" in usage_error(capsys, "scan", pid, "--require", "zero", "--exclude", "zero")
    assert "must not be negative" in usage_error(capsys, "scan", pid, "--max-pages", "-1")
    lo = child.piece("written")[0]
    assert "not page aligned" in usage_error(capsys, "scan", pid, f"{lo + 1:x}-{lo + P:x}")
    assert "END must be above START" in usage_error(capsys, "scan", pid, f"{lo + P:x}-{lo:x}")
    assert "not a pid" in usage_error(capsys, "stat", "-5")
    assert "not a pid" in usage_error(capsys, "scan", "me")
    for odd in (" 5", "+5", "\u0663"):  # a space, a sign, an Arabic-Indic digit: not pid 5 nor 3
        assert "not a pid" in usage_error(capsys, "stat", odd)
    assert "beyond user space" in usage_error(capsys, "scan", pid, "0-ffffffffffffffff")
    with open(f"/proc/{pid}/maps") as f:
        has_vsyscall = "[vsyscall]" in f.read()
    if has_vsyscall:  # (x86-64 kernels with vsyscall emulation)
        assert "beyond user space" in usage_error(capsys, "scan", pid, "[vsyscall]")
    assert "must be from 600 to" in usage_error(capsys, "map", pid, "--png", "x.png", "--width", "100")
    assert "required" in usage_error(capsys, "map", pid)


def test_scan_ranges_half_written_and_files_named_like_ranges(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    """A half-written hex range is a usage error (it said "no mapping named", exit 1); a
    file called like a range ("add-bed") is the mapping, not the range 0xadd-0xbed."""
    for bad in ("0x1000-", "0x-0x1000", "-1000"):
        assert "bad range" in usage_error(capsys, "scan", "self", bad), bad
    path = tmp_path / "add-bed"
    path.write_bytes(b"x" * P)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), P, prot=mmap.PROT_READ) as mm:
        _ = mm[0]
        doc = run_json(capsys, "scan", "self", "add-bed")
        assert [r["name"] for r in doc["ranges"]] == [str(path)], doc["ranges"]


def test_stat_without_the_privilege_to_read_pfns_shows_zero_and_huge_as_unknown() -> None:
    """The emulated backend without CAP_SYS_ADMIN cannot tell the zero page from a page
    shared after fork: ``stat`` (the README's first command, on a kernel without
    ``PAGEMAP_SCAN``) failed with PermissionError; the classes it cannot know show ``-``."""
    env = {**os.environ, "PAGESCAN_BACKEND": "emulated"}

    def stat_with_a_zero_page(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """``pagescan stat self`` in a process that has read a page it never wrote (the
        zero page, to a kernel: a page mapped more than once), so the question is real
        (a fresh interpreter may have none: then the emulation answers 0, rightly)."""
        code = ("import mmap, sys; m = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE); _ = m[4096]; "
                "from pagescan.cli import main; sys.exit(main(sys.argv[1:]))")
        return subprocess.run([sys.executable, "-c", code, "stat", "self", *argv], capture_output=True, text=True,
                              timeout=60, cwd="/", **kw)

    r = stat_with_a_zero_page(preexec_fn=_become_nobody, env=env)
    assert r.returncode == 0, r.stderr
    total = next(ln for ln in r.stdout.splitlines() if ln.startswith("total "))
    header = r.stdout.splitlines()[1].split()
    cells = total.split()
    assert cells[header.index("ZERO") - 1] == "-" and cells[header.index("HUGE") - 1] == "-", (header, cells)
    assert "zero pages unknown" in r.stdout
    doc = json.loads(stat_with_a_zero_page("--json", preexec_fn=_become_nobody, env=env).stdout)
    assert doc["totals"]["pages"]["zero"] is None and doc["totals"]["pages"]["huge"] is None
    assert doc["totals"]["pages"]["present"] > 0
    assert all("zero" not in m["pages"] for m in doc["mappings"])
    assert doc["groups"] and all(g["pages"]["zero"] is None and g["pages"]["huge"] is None
                                 and g["bytes"]["zero"] is None for g in doc["groups"])  # (were 0)
    ok = stat_with_a_zero_page(env=env)  # as root: every class known
    assert ok.returncode == 0 and re.search(r"zero pages [1-9]", ok.stdout), ok.stdout  # (the page it read, at least)


# -- errors: no such process, no user memory, not allowed -----------------------------


def _free_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) - 1
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


@pytest.mark.parametrize("argv", [["stat"], ["scan"], ["scan", "[heap]"], ["map", "--png", "never.png"]])
def test_nonexistent_pid(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]) -> None:
    pid = _free_pid()
    args = [argv[0], str(pid), *(str(tmp_path / a) if a.endswith(".png") else a for a in argv[1:])]
    rc, out, err = run(capsys, *args)
    assert f"no process with pid {pid}" in one_line_error(rc, out, err, "ProcessLookupError")
    assert not (tmp_path / "never.png").exists()


def test_exited_process(capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            select.select([], [], [], 0.02)
        else:
            pytest.fail("the child did not become a zombie")
        for cmd in ("stat", "scan"):
            rc, out, err = run(capsys, cmd, str(proc.pid))
            assert "no user address space" in one_line_error(rc, out, err, "ProcessLookupError")
    finally:
        proc.wait()


_CAP_DAC_READ_SEARCH = 2


def _become_nobody() -> None:
    """preexec_fn: uid/gid 65534, keeping only CAP_DAC_READ_SEARCH (ambient) so the
    interpreter under /root stays readable. It grants no ptrace access."""
    libc = ctypes.CDLL(None, use_errno=True)

    def ok(ret: int, what: str) -> None:
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    ok(libc.prctl(8, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    bit = 1 << _CAP_DAC_READ_SEARCH
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)(bit, bit, bit, 0, 0, 0)  # effective, permitted, inheritable
    ok(libc.capset(header, data), "capset")
    ok(libc.prctl(47, 2, _CAP_DAC_READ_SEARCH, 0, 0), "PR_CAP_AMBIENT_RAISE")


def _cli(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagescan", *argv], capture_output=True, text=True,
                          timeout=60, cwd="/", **kw)


def test_untraceable_pid_as_another_user() -> None:
    assert os.getuid() == 0, "this test drops root to uid 65534"
    ok = _cli("stat", "self", "--json", preexec_fn=_become_nobody)
    assert ok.returncode == 0, ok.stderr  # the CLI itself works as that user
    with open("/proc/1/status") as f:
        assert re.search(r"^Uid:\s+0\s", f.read(), re.M), "pid 1 is not root's"
    for cmd in ("stat", "scan", "map"):
        extra = ["--png", "/nonexistent/x.png"] if cmd == "map" else []
        r = _cli(cmd, "1", *extra, preexec_fn=_become_nobody)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("pagescan: PermissionError: ") and "pid 1" in r.stderr, r.stderr


# -- caps ---------------------------------------------------------------------------------

_LIVE = ("hugetlb_pages", "hugetlb_free")  # read from /proc/meminfo on every call


def test_caps_json(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_json(capsys, "caps")
    want = pagescan.capabilities().as_dict()
    assert doc.keys() == want.keys()
    for key in want:
        if key not in _LIVE:
            assert doc[key] == want[key], key
    assert doc["categories"] == [c.name for c in Category if c & CAPS.categories]
    for why in doc["missing"].values():
        assert why


def test_caps_text(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "caps")
    assert rc == 0 and err == ""
    caps = pagescan.capabilities()
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["kernel", caps.kernel_release]
    assert re.search(rf"^PAGEMAP_SCAN\s+{'yes' if caps.pagemap_scan else 'no'}$", out, re.M)
    cats = next(ln for ln in lines if ln.strip().startswith("categories")).split()[1:]
    assert cats == [c.name for c in Category if c & caps.categories]
    assert re.search(rf"^guard regions\s+{'yes' if caps.guard_regions else 'no'}$", out, re.M)
    assert re.search(rf"^THP\s+{caps.thp_mode}\b", out, re.M)
    if caps.missing:
        tail = out.split("\nmissing:\n", 1)[1].split("\n\nemulated backend", 1)[0].splitlines()
        assert tail == [f"  {k}: {v}" for k, v in caps.missing.items()]
        for k, v in caps.missing.items():
            if k.startswith(("PAGE_IS_", "UFFD_FEATURE_")):
                assert re.fullmatch(r"needs Linux \d+\.\d+", v), (k, v)
    else:
        assert "missing:" not in out
    emu = out.split("\nemulated backend", 1)[1].splitlines()[1:]
    assert emu[0].split()[2:] == [c.name for c in Category if c & caps.emulation_exact]
    assert emu[1:] == [f"  {k}: {v}" for k, v in caps.emulation_limits.items()]


# -- map ----------------------------------------------------------------------------------


# -- help, version ------------------------------------------------------------------------


def test_help_of_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands: dict[str, Any] = dict(sub.choices or {})
    assert {"caps", "scan", "stat", "map"} <= set(commands)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    top = capsys.readouterr().out
    assert exc.value.code == 0
    for name in commands:
        assert re.search(rf"^\s+{name}\s+\S", top, re.M), name
    for name, p in commands.items():
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        text = capsys.readouterr().out
        assert exc.value.code == 0 and text.startswith(f"usage: pagescan {name}")
        for action in p._actions:
            for opt in action.option_strings:
                assert opt in text, (name, opt)
            if action.help and action.option_strings != ["-h", "--help"]:
                assert " ".join(action.help.split()[:3]) in " ".join(text.split()), (name, action.help)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"pagescan {pagescan.__version__}"
    usage_error(capsys)  # no command


# -- real subprocess runs -----------------------------------------------------------------


def test_subprocess_scan_self_and_errors() -> None:
    r = _cli("scan", "self", "[heap]", "--require", "present")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines()[0].split() == ["RANGE", "PAGES", "SIZE", "PSWFZHDGA", "MAPPING"]
    assert re.fullmatch(r"\d+ regions, \d+ pages \(\S+\)", r.stdout.splitlines()[-1])
    pid = _free_pid()
    r = _cli("stat", str(pid))
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr == f"pagescan: ProcessLookupError: [Errno 3] no process with pid {pid}\n"
    r = _cli("scan", "self", "--require", "bogus")
    assert r.returncode == 2 and "unknown category 'bogus'" in r.stderr and "Traceback" not in r.stderr


def test_python_m_pagescan_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "pagescan.cli", "scan", "self", "--max-pages", "1", "--json"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sum(x["pages"] for x in doc["regions"]) == 1


@pytest.mark.parametrize(("nbytes", "text"), [
    (0, "0"), (1, "1B"), (1023, "1023B"), (1024, "1.0K"), (1536, "1.5K"),
    (10200, "10K"),  # 9.96 KiB: printed "10.0K" before
    (1073217536, "1.0G"),  # 1023.5 MiB: printed "1024M" before
    (1023 << 20, "1023M"), (3 << 30, "3.0G"), ((1 << 40) + (1 << 39), "1.5T"), (1 << 70, "1024E"),
])
def test_human_sizes(nbytes: int, text: str) -> None:
    from pagescan.cli._common import human

    assert human(nbytes) == text
