"""The ``pagescan`` command line against real processes.

Most tests call ``pagescan.cli.main(argv)`` in-process (output through ``capsys``); a few
run ``python -m pagescan`` as a real subprocess (exit status, stderr, broken pipe,
another uid). The target is a child Python process that builds a known layout --
written anon pages, zero pages, a private file mapping, a PMD THP, the huge zero page,
hugetlb pages, swapped pages and guard pages, each its own mapping between PROT_NONE
separators -- prints the addresses as JSON and waits on stdin.

``stat`` is checked against the child's ``/proc/PID/smaps`` (the kernel's own
accounting) for every mapping, and against the layout for exact page counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
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
from pagescan._procfs import task_size
from pagescan._procfs import read_maps
from pagescan._uapi.mman import MAP
from pagescan.cli import build_parser, main

from .conftest import requires_pagemap_scan
from .memory import P, Mapping

pytestmark = requires_pagemap_scan

KB = 1024
HUGE = 2 << 20
HP = HUGE // P  # base pages per PMD
CAPS = pagescan.capabilities()
HAS_GUARD = CAPS.guard_regions and bool(CAPS.categories & Category.GUARD)
#: A file name that JSON must escape (quote, backslash, non-ASCII, tab).
WEIRD = 'we"ird\\ n\u00e4me\t.bin'
HAS_THP = CAPS.thp_mode in ("always", "madvise") and CAPS.thp_pmd_size == HUGE


def _use_zero_page() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/use_zero_page") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


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

_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def read_smaps(pid: int) -> list[dict[str, Any]]:
    """``/proc/PID/smaps`` parsed independently: start, end, perms, name, kB fields, VmFlags."""
    out: list[dict[str, Any]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _HEAD.match(line)
            if m:
                out.append({"start": int(m[1], 16), "end": int(m[2], 16), "perms": m[3], "name": m[4].strip(),
                            "kb": {}, "flags": set()})
                continue
            key, _, rest = line.partition(":")
            if key == "VmFlags":
                out[-1]["flags"] = set(rest.split())
            elif rest.strip().endswith(" kB"):
                out[-1]["kb"][key] = int(rest.split()[0])
    return out


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


def by_start(doc: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {m["start"]: m for m in doc["mappings"]}


def stable_stat(capsys: pytest.CaptureFixture[str], pid: int, *extra: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``stat --json`` bracketed by two identical smaps reads (the target is idle)."""
    for _ in range(5):
        before = read_smaps(pid)
        doc = run_json(capsys, "stat", str(pid), *extra)
        if read_smaps(pid) == before:
            return doc, before
    pytest.fail("the target's smaps kept changing")


# -- stat -------------------------------------------------------------------------------


def test_stat_agrees_with_smaps_for_every_mapping(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    doc, smaps = stable_stat(capsys, child.pid)
    limit = task_size()
    smaps = [s for s in smaps if s["end"] <= limit]  # [vsyscall] is above user space
    assert [(m["start"], m["end"], m["perms"], m["name"]) for m in doc["mappings"]] == [
        (s["start"], s["end"], s["perms"], s["name"]) for s in smaps
    ]
    assert doc["pid"] == child.pid and doc["page_size"] == P
    kinds = set()
    for m, s in zip(doc["mappings"], smaps):
        pages, kb, where = m["pages"], s["kb"], f"{s['start']:x} {s['name']}"
        assert m["size"] == m["end"] - m["start"] and m["bytes"] == {k: v * P for k, v in pages.items()}
        pmd_kb = kb.get("AnonHugePages", 0) + kb.get("ShmemPmdMapped", 0) + kb.get("FilePmdMapped", 0)
        assert pages["swapped"] * P == kb["Swap"] * KB, where
        if "ht" in s["flags"]:
            kinds.add("hugetlb")
            hugetlb_kb = kb["Shared_Hugetlb"] + kb["Private_Hugetlb"]
            assert pages["present"] * P == hugetlb_kb * KB > 0, where
            assert pages["huge"] * P == (pmd_kb + hugetlb_kb) * KB, where
            assert kb["Rss"] == 0 and pages["zero"] == 0, where
        else:
            assert (pages["present"] - pages["zero"]) * P == kb["Rss"] * KB, where
            assert pages["huge"] * P == pmd_kb * KB, where
        kinds |= {k for k in ("zero", "huge", "swapped", "file", "guard") if pages[k]}
        assert pages["written"] <= pages["present"] + pages["swapped"], where
        if "pf" in s["flags"]:  # VM_PFNMAP ([vvar]): the kernel skips it
            assert not any(pages.values()), where
    want = {"zero", "file", "swapped", "hugetlb", "huge"} | ({"guard"} if HAS_GUARD else set())
    assert want <= kinds
    total = doc["totals"]
    assert total["mappings"] == len(doc["mappings"])
    assert total["size"] == sum(m["size"] for m in doc["mappings"])
    for k, v in total["pages"].items():
        assert v == sum(m["pages"][k] for m in doc["mappings"]) and total["bytes"][k] == v * P


def _expected_layout() -> dict[str, dict[str, int]]:
    zeros = dict.fromkeys(("present", "swapped", "zero", "huge", "file", "written", "guard"), 0)
    want = {
        "written": {**zeros, "present": 64, "written": 64},
        "zero": {**zeros, "present": 32, "zero": 32, "written": 32},
        "file": {**zeros, "present": 16, "file": 16, "written": 16},
        "weird": {**zeros, "present": 1, "file": 1, "written": 1},
        "hugetlb": {**zeros, "present": 2 * HP, "huge": 2 * HP, "written": 2 * HP},
        "swap": {**zeros, "swapped": 32, "written": 32},
    }
    if HAS_THP:
        want["thp"] = {**zeros, "present": HP, "huge": HP, "written": HP}
        if _use_zero_page():  # one read maps the huge zero page: 512 zero pages, not "huge"
            want["hugezero"] = {**zeros, "present": HP, "zero": HP, "written": HP}
        else:  # the read allocates a real THP
            want["hugezero"] = {**zeros, "present": HP, "huge": HP, "written": HP}
    if HAS_GUARD:  # 8 written, 4 guard markers (SWAPPED|GUARD: guard only), 4 empty
        want["guard"] = {**zeros, "present": 8, "written": 8, "guard": 4}
    return want


@pytest.mark.parametrize("backend", ["kernel", "emulated"])
def test_stat_exact_counts_of_the_known_layout(child: Child, capsys: pytest.CaptureFixture[str], backend: str) -> None:
    assert child.info["swapped_ok"], "MADV_PAGEOUT did not swap the target's pages out"
    if HAS_THP:
        assert child.info["thp_kb"] == HUGE // KB, "no PMD THP formed (MADV_HUGEPAGE and MADV_COLLAPSE)"
    doc = run_json(capsys, "stat", str(child.pid), "--backend", backend)
    maps = by_start(doc)
    for name, want in _expected_layout().items():
        lo, hi = child.piece(name)
        m = maps[lo]
        assert m["end"] == hi, name
        assert m["pages"] == want, name
        # The PROT_NONE separator after each piece: nothing in it (no WRITTEN noise either).
        sep = maps[hi]
        assert sep["perms"] == "---p" and not any(sep["pages"].values()), name


def test_stat_json_is_mapping_stats(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    from pagescan.mappings import mapping_stats

    rc, out, err = run(capsys, "stat", str(child.pid), "--json")
    assert rc == 0 and err == "" and out.isascii()
    doc = json.loads(out)
    assert doc["mappings"] == [s.as_dict() for s in mapping_stats(child.pid)]
    lo, _ = child.piece("weird")
    assert by_start(doc)[lo]["name"] == os.path.join(os.path.dirname(child.file), WEIRD)
    # one line per mapping
    lines = out.splitlines()
    assert lines[:2] == ["{", '  "mappings": [']
    assert len([ln for ln in lines if ln.startswith('    {"bytes": ')]) == len(doc["mappings"])


def test_stat_table(child: Child, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, err = run(capsys, "stat", str(child.pid))
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ADDRESS", "PERM", "SIZE", "PRESENT", "SWAPPED", "ZERO", "HUGE", "FILE",
                                "WRITTEN", "GUARD", "MAPPING"]
    rows = {int(ln.split()[0], 16): ln.split() for ln in lines[1:-1]}
    assert rows[child.piece("written")[0]][1:5] == ["rw-p", "256K", "256K", "0"]
    assert rows[child.piece("file")[0]][-1] == child.file
    assert rows[child.piece("file")[0]][2:5] == ["64K", "64K", "0"]
    assert rows[child.piece("hugetlb")[0]][2:4] == ["4.0M", "4.0M"]
    assert rows[child.piece("swap")[0]][3:5] == ["0", "128K"]
    assert child.piece("written")[1] not in rows  # empty separators only with --all
    total = lines[-1].split()
    doc = run_json(capsys, "stat", str(child.pid))
    assert total[0] == "total" and total[-2:] == [str(len(doc["mappings"])), "mappings"]
    starts = [int(k, 16) for k in (ln.split()[0] for ln in lines[1:-1])]
    assert starts == sorted(starts)

    rc, out, _ = run(capsys, "stat", str(child.pid), "--all")
    assert len(out.splitlines()) == len(doc["mappings"]) + 2
    rc, out, _ = run(capsys, "stat", str(child.pid), "--sort", "present")
    present = [doc_m["pages"]["present"] for doc_m in
               (by_start(doc)[int(ln.split()[0], 16)] for ln in out.splitlines()[1:-1])]
    assert present == sorted(present, reverse=True) and present[0] > 0
    rc, out, _ = run(capsys, "stat", str(child.pid), "--sort", "size")
    sizes = [by_start(doc)[int(ln.split()[0], 16)]["size"] for ln in out.splitlines()[1:-1]]
    assert sizes == sorted(sizes, reverse=True)


def test_stat_table_fits_the_terminal(child: Child, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, err = run(capsys, "stat", str(child.pid))
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)
    file_row = next(ln for ln in lines if ln.startswith(f"{child.piece('file')[0]:x} "))
    assert file_row.endswith(os.path.basename(child.file))  # the name keeps its end
    # every category has something in the target: only 'written' (= present + swapped)
    # may go, and the headers are abbreviated
    assert lines[0].split() == (["ADDRESS", "PERM", "SIZE", "PRES", "SWAP", "ZERO", "HUGE", "FILE"]
                                + (["GUARD"] if HAS_GUARD else []) + ["MAPPING"])
    notes = ([] if HAS_GUARD else ["guard (all zero)"]) + ["written (= present + swapped)"]
    assert lines[-1] == f"(not shown: {', '.join(notes)})"
    monkeypatch.setenv("COLUMNS", "100")
    rc, out, err = run(capsys, "stat", "self")  # guard, swapped, huge: all zero here
    lines = out.splitlines()
    assert rc == 0 and all(len(ln) <= 100 for ln in lines)
    assert "PRESENT" in lines[0].split() and lines[-1].startswith("(not shown: guard (all zero)")


def test_stat_self(capsys: pytest.CaptureFixture[str]) -> None:
    with Mapping(8, flags=MAP.SHARED | MAP.ANONYMOUS) as m:  # shmem: never merged with a neighbour
        m.write(0, 5)
        doc = run_json(capsys, "stat", "self")
        assert doc["pid"] == os.getpid()
        row = by_start(doc)[m.addr]
        assert row["end"] == m.end and row["perms"] == "rw-s"
        assert row["pages"]["present"] == 5 and row["pages"]["file"] == 5 and row["pages"]["zero"] == 0


# -- scan -------------------------------------------------------------------------------


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
    assert "invalid choice" in usage_error(capsys, "stat", pid, "--sort", "colour")
    assert "must be at least 600" in usage_error(capsys, "map", pid, "--png", "x.png", "--width", "100")
    assert "required" in usage_error(capsys, "map", pid)


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


def test_map_png(child: Child, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from PIL import Image

    from pagescan.cli._map import CLASSES

    path = tmp_path / "map"  # no extension: still a PNG
    rc, out, err = run(capsys, "map", str(child.pid), "--png", str(path), "--width", "900")
    assert rc == 0 and err == ""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert out.strip().startswith(f"wrote {path} (900x{img.height}, ")
        assert img.width == 900 and img.height > 100
        legend = img.crop((0, 0, img.width, 60))
        bars = img.crop((0, 60, img.width, img.height))
        legend_colours = {c for _, c in legend.getcolors(1 << 16)}
        bar_colours = {c for _, c in bars.getcolors(1 << 16)}
    names = dict(CLASSES)
    assert set(names.values()) <= legend_colours
    want = {"anon", "zero page", "file", "huge", "swapped", "not present"} | ({"guard"} if HAS_GUARD else set())
    for name in want:
        assert names[name] in bar_colours, name
    (tmp_path / "map").unlink()


def test_map_png_all_is_taller(child: Child, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from PIL import Image

    heights = []
    for extra in ([], ["--all"]):
        path = tmp_path / f"m{len(extra)}.png"
        assert run(capsys, "map", str(child.pid), "--png", str(path), *extra)[0] == 0
        with Image.open(path) as img:
            heights.append(img.height)
        path.unlink()
    assert heights[1] > heights[0]


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


def test_subprocess_stat_equals_in_process(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    r = _cli("stat", str(child.pid), "--json")
    assert r.returncode == 0 and r.stderr == ""
    doc = run_json(capsys, "stat", str(child.pid))
    assert json.loads(r.stdout) == doc


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


def test_subprocess_broken_pipe() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pagescan", "stat", "self", "--all"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/", env={**os.environ, "COLUMNS": "300"})
    assert proc.stdout is not None and proc.stderr is not None
    try:
        fcntl.fcntl(proc.stdout.fileno(), 1031, 4096)  # F_SETPIPE_SZ: the rest must block
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert first.split()[0] == b"ADDRESS" and err == b""


def test_python_m_pagescan_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "pagescan.cli", "scan", "self", "--max-pages", "1", "--json"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sum(x["pages"] for x in doc["regions"]) == 1
