"""``pagescan ps`` against real processes: the totals are each process's
``smaps_rollup``, zero pages are counted apart, exiting processes are skipped and
unreadable ones counted."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pagescan.cli import _ps

from .conftest import requires_pagemap_scan
from .memory import P
from .procs import stop
from .test_cli_stat import read_rollup, steady_rollup
from .test_cli import _become_nobody, _cli, run, run_json

pytestmark = requires_pagemap_scan
KB = 1024

#: An idle process with a known amount of zero pages (a read-only private anonymous
#: mapping, every page read once) and private written memory.
IDLE = r"""
import ctypes, os, sys
from pagescan._uapi import libc
from pagescan._uapi.mman import MAP, PROT
P = os.sysconf("SC_PAGE_SIZE")
z = libc.mmap(0, 40 * P, PROT.READ, MAP.PRIVATE | MAP.ANONYMOUS)
for i in range(40):
    ctypes.string_at(z + i * P, 1)
w = libc.mmap(0, 100 * P, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS)
ctypes.memset(w, 1, 100 * P)
sibling = os.fork() if sys.argv[1:] == ["fork"] else -1  # shares every page with this one
if sibling != 0:
    print("ready", sibling, flush=True)
sys.stdin.read()  # EOF when the test closes the pipe: both exit
"""


@contextlib.contextmanager
def idle_processes(n: int, *argv: str) -> Iterator[list[subprocess.Popen[str]]]:
    """``n`` idle processes; ``p.sibling`` is the pid of the forked sibling with ``"fork"``."""
    procs = [subprocess.Popen([sys.executable, "-c", IDLE, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout is not None
            word, sibling = p.stdout.readline().split()
            assert word == "ready"
            p.sibling = int(sibling)  # type: ignore[attr-defined]
        yield procs
    finally:
        for p in procs:
            stop(p)


def stable_ps(capsys: pytest.CaptureFixture[str],
              pids: list[int]) -> tuple[dict[str, Any], dict[int, dict[str, int]], dict[int, dict[str, int]]]:
    """``ps --json`` bracketed by two identical smaps_rollup reads of ``pids`` (idle
    processes) -- or, if other processes keep mapping the same libraries, by two reads
    that agree but for the fields that drift with them (PSS, shared/private)."""
    steady = None
    for _ in range(20):
        before = {pid: read_rollup(pid) for pid in pids}
        doc = run_json(capsys, "ps")
        after = {pid: read_rollup(pid) for pid in pids}
        if after == before:
            return doc, before, after
        if steady is None and all(steady_rollup(after[p]) == steady_rollup(before[p]) for p in pids):
            steady = doc, before, after
    if steady is None:
        pytest.fail("the idle processes' smaps_rollup kept changing")
    return steady


def zero_pages(pid: int) -> int:
    """Zero-page entries, from /proc/PID/pagemap and /proc/kpageflags (KPF_ZERO_PAGE) --
    an oracle independent of PAGEMAP_SCAN."""
    from .memory import pagemap_entries

    total = 0
    with open(f"/proc/{pid}/maps") as f:
        vmas = [ln.split() for ln in f]
    with open("/proc/kpageflags", "rb") as kf:
        for v in vmas:
            lo, hi = (int(x, 16) for x in v[0].split("-"))
            if hi > 1 << 47 or (len(v) > 5 and v[5] in ("[vvar]", "[vvar_vclock]", "[vsyscall]")):
                continue
            for e in pagemap_entries(lo, (hi - lo) // P, pid):
                if e >> 63 & 1:
                    pfn = e & ((1 << 55) - 1)
                    kf.seek(pfn * 8)
                    flags = int.from_bytes(kf.read(8), "little")
                    if flags >> 24 & 1:  # KPF_ZERO_PAGE: the zero page or the huge zero page
                        total += P
    return total


def test_ps_totals_equal_smaps_rollup(capsys: pytest.CaptureFixture[str]) -> None:
    with idle_processes(3) as procs:
        pids = [p.pid for p in procs]
        doc, before, after = stable_ps(capsys, pids)
        rows = {p["pid"]: p for p in doc["processes"]}
        for pid in pids:
            r, kb = rows[pid], before[pid]
            assert r["rss"] == kb["Rss"] * KB and r["swap"] == kb["Swap"] * KB
            # PSS and shared/private follow the other processes mapping the same
            # libraries: exact when nothing moved, else what holds at any instant
            assert r["uss"] == r["rollup"]["Private_Clean"] + r["rollup"]["Private_Dirty"]
            assert r["uss"] <= r["pss"] <= r["rss"] and r["pss"] == r["rollup"]["Pss"]
            for kind in ("Clean", "Dirty"):
                assert r["rollup"][f"Shared_{kind}"] + r["rollup"][f"Private_{kind}"] == (
                    kb[f"Shared_{kind}"] + kb[f"Private_{kind}"]) * KB
            assert r["huge"] == (kb["AnonHugePages"] + kb["ShmemPmdMapped"] + kb["FilePmdMapped"]
                                 + kb["Shared_Hugetlb"] + kb["Private_Hugetlb"]) * KB
            assert steady_rollup(r["rollup"]) == {k: v * KB for k, v in steady_rollup(kb).items()}
            assert r["zero"] == zero_pages(pid) >= 40 * P
            assert r["user"] == "root" and r["uid"] == 0 and r["command"] == f"{sys.executable} -c {IDLE}"
    assert doc["totals"]["processes"] == len(doc["processes"])
    for k in _ps.NUMERIC:
        assert doc["totals"][k] == sum(p[k] for p in doc["processes"])
    me = {p["pid"]: p for p in doc["processes"]}[os.getpid()]
    assert me["rss"] > 0 and me["uid"] == 0
    assert kernel_thread() not in {p["pid"] for p in doc["processes"]}  # no address space


def test_ps_pss_halves_with_a_forked_sibling(capsys: pytest.CaptureFixture[str]) -> None:
    """After fork every page of the parent is shared with the sibling: its USS drops
    below the written pages' size and PSS counts the shared pages half."""
    with idle_processes(1) as (single,), idle_processes(1, "fork") as (forked,):
        pids = [single.pid, forked.pid, forked.sibling]  # type: ignore[attr-defined]
        doc, before, after = stable_ps(capsys, pids)
        rows = {p["pid"]: p for p in doc["processes"]}
        a, b, c = (rows[pid] for pid in pids)
        for r in (a, b, c):
            assert r["uss"] <= r["pss"] <= r["rss"] and r["pss"] == r["rollup"]["Pss"]
        assert b["rss"] >= 100 * P and a["uss"] - b["uss"] >= 100 * P
        shared_anon = before[b["pid"]]["Anonymous"] * KB
        assert b["pss"] < a["pss"] - shared_anon // 4  # the shared anonymous memory counts half
        assert c["command"] == b["command"]


def test_ps_table_sorted_with_footer(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with idle_processes(2):
        rc, out, err = run(capsys, "ps")
        assert rc == 0 and err == ""
        lines = out.splitlines()
        assert lines[0].split() == ["PID", "USER", "USS", "PSS", "RSS", "SWAP", "ZERO", "HUGE", "COMMAND"]
        assert all(len(ln) <= 100 for ln in lines)
        total = next(ln for ln in lines if ln.split()[0] == "total")
        assert re.search(r"\d+ processes$", total)
        doc = run_json(capsys, "ps", "--sort", "rss")
        rss = [p["rss"] for p in doc["processes"]]
        assert rss == sorted(rss, reverse=True)
        rc, out, _ = run(capsys, "ps", "--sort", "pid")
        body = out.splitlines()[1:]
        body = body[: next(i for i, ln in enumerate(body) if ln.split()[0] == "total")]
        pids = [int(ln.split()[0]) for ln in body]
        assert pids == sorted(pids) and os.getpid() in pids
        rc, out, _ = run(capsys, "ps", "--sort", "zero", "--wide")
        assert any(len(ln) > 100 for ln in out.splitlines())  # the idle processes' long command lines


def kernel_thread() -> int:
    """A kernel thread's pid (PF_KTHREAD in /proc/PID/stat's flags)."""
    for d in sorted(os.listdir("/proc"), key=lambda d: (len(d), d)):
        if d.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[6]) & 0x00200000:
                    return int(d)
    pytest.fail("no kernel thread found")


def _zombie() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    for _ in range(500):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return pid
        time.sleep(0.01)
    pytest.fail("the child did not become a zombie")


def test_ps_skips_processes_that_exit() -> None:
    """Listed, then gone before being read: skipped and counted as exited; a zombie (no
    address space any more) and a kernel thread are left out without a count."""
    with idle_processes(1) as procs:
        alive = procs[0].pid
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        zombie = _zombie()
        try:
            out, unreadable, exited = _ps.collect([kernel_thread(), zombie, gone.pid, alive])
        finally:
            os.waitpid(zombie, 0)
        assert [p["pid"] for p in out] == [alive] and (unreadable, exited) == (0, 1)


def test_ps_while_processes_come_and_go(capsys: pytest.CaptureFixture[str]) -> None:
    """Processes exit at random moments while ps runs: never an error."""
    procs = []
    try:
        rng = random.Random(14)
        for _ in range(12):
            procs.append(subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({rng.random() * 0.6})"]))
        deadline = time.monotonic() + 2
        runs = 0
        while time.monotonic() < deadline or runs < 3:
            doc = run_json(capsys, "ps")
            runs += 1
            assert doc["processes"] and doc["exited"] >= 0
            if all(p.poll() is not None for p in procs):
                break
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
            p.wait()


def test_ps_unreadable_processes_are_counted_not_fatal() -> None:
    assert os.getuid() == 0, "this test drops root to uid 65534"
    r = _cli("ps", "--json", preexec_fn=_become_nobody)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    import json

    doc: dict[str, Any] = json.loads(r.stdout)
    assert doc["unreadable"] >= 1  # pid 1 and this test run at least
    assert {p["uid"] for p in doc["processes"]} == {65534}  # only its own
    assert all(p["pid"] != os.getpid() for p in doc["processes"])
    r = _cli("ps", preexec_fn=_become_nobody)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert re.search(r"^\d+ process(es)? not readable \(no ptrace access", r.stdout.splitlines()[-1])


def test_rollup_fields_parsed_alike() -> None:
    """The table's fields (``parse_rollup(only=...)``) are those of the full parse, on
    the word-split path and on the line-by-line one (a line without ``kB``)."""
    from pagescan._procfs import parse_rollup, read_rollup_text

    text = read_rollup_text(os.getpid())
    for t in (text, text + b"Extra:  7\n"):
        full = parse_rollup(t)
        assert set(_ps._TABLE_FIELDS) <= set(full) and full["Rss"] > 0
        assert parse_rollup(t, _ps._TABLE_FIELDS) == {k: full[k] for k in _ps._TABLE_FIELDS}
    assert parse_rollup(text + b"Extra:  7\n")["Extra"] == 7  # the fallback ran
    assert parse_rollup(b"") == {} and parse_rollup(b"", ("Rss",)) == {}


def test_ps_on_the_emulation_without_pfns_lists_processes_with_zero_unknown() -> None:
    """On the emulation (a kernel without PAGEMAP_SCAN) without the privilege to read
    PFNs, the zero pages of most processes cannot be known (the walk raises
    PermissionError): they are listed all the same, their rollup read, zero unknown
    (``-``, JSON ``null``) -- before, every one of them was counted as not readable
    ("another user's") and the table was empty."""
    assert os.getuid() == 0, "this test drops root to uid 65534"
    import json

    # A process of the same user with pages that may be the zero page (read, never
    # written: present and not exclusively mapped), whatever the interpreter's own are.
    reader = subprocess.Popen([sys.executable, "-c", _ZERO_READER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, preexec_fn=_become_nobody)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "ready\n"
        env = {**os.environ, "PAGESCAN_BACKEND": "emulated"}
        r = _cli("ps", "--json", "--sort", "zero", preexec_fn=_become_nobody, env=env)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        doc: dict[str, Any] = json.loads(r.stdout)
        mine = doc["processes"]
        assert mine and {p["uid"] for p in mine} == {65534}, "its own processes are readable"
        assert [p["zero"] for p in mine if p["pid"] == reader.pid] == [None], "a zero count it cannot know"
        known = [p["zero"] for p in mine if p["zero"] is not None]
        assert [p["zero"] for p in mine] == sorted(known, reverse=True) + [None] * (len(mine) - len(known))
        r = _cli("ps", "--wide", preexec_fn=_become_nobody, env=env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        rows = [ln.split() for ln in r.stdout.splitlines() if ln.split()[1:2] == ["nobody"]]
        assert [row[6] for row in rows if row[0] == str(reader.pid)] == ["-"], r.stdout
    finally:
        stop(reader)


_ZERO_READER = """
import mmap, sys
m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
sum(m[i] for i in range(0, 1 << 20, 4096))  # read faults: the zero page
print("ready", flush=True)
sys.stdin.read()
"""


def test_an_error_in_the_walking_thread_is_raised_by_collect(monkeypatch: pytest.MonkeyPatch) -> None:
    """A defect in the zero-page walks (here: one injected into pagescan's own code, not
    the kernel's) surfaces in the caller's thread, not as a thread's printed traceback
    and a missing value."""
    def broken(pid: int, top: int, regions: Any = None) -> int:
        raise RuntimeError(f"walk of {pid} broke")

    monkeypatch.setattr(_ps, "zero_bytes", broken)
    with pytest.raises(RuntimeError, match=r"walk of \d+ broke"):
        _ps.collect([os.getpid()])


def test_ps_users_sums_the_processes_of_each_user(capsys: pytest.CaptureFixture[str]) -> None:
    """``ps --users`` (smem -u): one row per uid, its process count and sums; an idle
    process of nobody's is that user's, with its zero pages and at least its written
    memory; the rows add up to the totals."""
    proc = subprocess.Popen([sys.executable, "-c", IDLE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, preexec_fn=_become_nobody, cwd="/")
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        doc = run_json(capsys, "ps", "--users")
        by_uid = {u["uid"]: u for u in doc["users"]}
        assert len(by_uid) == len(doc["users"]) == doc["totals"]["users"]
        nobody = by_uid[65534]
        assert nobody["processes"] >= 1 and nobody["zero"] >= 40 * P and nobody["uss"] >= 100 * P
        assert sum(u["processes"] for u in doc["users"]) == doc["totals"]["processes"]
        for k in ("uss", "pss", "rss", "swap", "huge"):
            assert sum(u[k] for u in doc["users"]) == doc["totals"][k], k
        rc, out, err = run(capsys, "ps", "--users", "--sort", "rss")
        lines = out.splitlines()
        assert rc == 0 and lines[0].split() == ["USER", "PROCS", "USS", "PSS", "RSS", "SWAP", "ZERO", "HUGE"]
        assert lines[-1].startswith("total") or lines[-2].startswith("total")
        assert any(ln.split()[0] in ("nobody", "65534") for ln in lines[1:])
    finally:
        stop(proc)
