"""``pagescan stat`` and ``pagescan map`` against real processes.

The target with a known layout is test_cli's ``child`` fixture (written anon pages, zero
pages, a private file mapping, a PMD THP, the huge zero page, hugetlb pages, swapped
pages and guard pages, each its own mapping). Every column is checked against the
child's ``/proc/PID/smaps`` (the kernel's own accounting), the totals against
``smaps_rollup``, and the page classes against the layout. Real processes too: the test
runner, a ``sleep``, and a forked sibling sharing pages (PSS halves).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import pagescan
from pagescan._procfs import task_size
from pagescan._uapi.mman import MAP
from pagescan.cli._common import human, printable
from pagescan.cli._stat import COLUMNS, DEFAULT_COLUMNS
from pagescan.mappings import SMAPS_FIELDS, mapping_stats

from . import oracle
from .conftest import requires_pagemap_scan, requires_wp_async
from .memory import Mapping, P, child_process, file_mapping
from .procs import stop
from .test_mapping_stats import Isolated
from .test_cli import (  # the target with a known layout, and the CLI helpers
    HAS_GUARD,
    HAS_THP,
    HP,
    KB,
    WEIRD,
    Child,
    _cli,
    child,
    run,
    run_json,
    usage_error,
)

pytestmark = requires_pagemap_scan
__all__ = ["child"]  # a fixture, used by name


def _use_zero_page() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/use_zero_page") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def read_smaps(pid: int) -> list[dict[str, Any]]:
    """``/proc/PID/smaps`` from the tests' oracle: start, end, perms, name, kB fields, VmFlags."""
    return [{"start": r.start, "end": r.end, "perms": r.perms, "name": r.name,
             "kb": {k: v // KB for k, v in r.fields.items()}, "flags": set(r.vmflags)} for r in oracle.smaps(pid)]


def by_start(doc: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {m["start"]: m for m in doc["mappings"]}


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


#: smaps fields whose per-mapping values are not additive
_NOT_SUMMED = {"KernelPageSize", "MMUPageSize", "THPeligible", "ProtectionKey"}


def rows_of(lines: list[str]) -> list[str]:
    """The table's rows: after the header line and the column headers, before the total."""
    end = next(i for i, ln in enumerate(lines) if ln.startswith("total "))
    return lines[2:end]


def read_rollup(pid: int | str) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` parsed independently: field -> kB."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f.readlines()[1:]:
            key, _, rest = line.partition(":")
            if rest.strip().endswith(" kB"):
                out[key] = int(rest.split()[0])
    return out


#: smaps fields that change with no action of the target: PSS, and shared vs private,
#: when other processes map or unmap the same pages (a busy machine starts processes
#: that map the same libraries all the time); Referenced when reclaim ages pages.
DRIFT = ("Pss", "Pss_Dirty", "SwapPss", "Referenced", "Shared_Clean", "Private_Clean", "Shared_Dirty",
         "Private_Dirty")


_DRIFT_COLUMNS = {*(f.lower() for f in DRIFT), "uss"}


def steady(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """smaps records without the :data:`DRIFT` fields."""
    return [{**r, "kb": {k: v for k, v in r["kb"].items() if k not in DRIFT}} for r in records]


def stable(capsys: pytest.CaptureFixture[str], pid: int,
           *argv: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """``stat --json`` bracketed by two identical smaps reads -- or, if other processes
    keep mapping the same libraries, two that agree but for :data:`DRIFT`."""
    found = None
    for _ in range(20):
        before = read_smaps(pid)
        doc = run_json(capsys, "stat", str(pid), *argv)
        after = read_smaps(pid)
        if after == before:
            return doc, before, after
        if found is None and steady(after) == steady(before):
            found = doc, before, after
    if found is None:
        pytest.fail("the target's smaps kept changing")
    return found


def check_against_smaps(m: dict[str, Any], s: dict[str, Any], s2: dict[str, Any] | None = None) -> None:
    """Every smaps-derived value of one JSON mapping equals the oracle's record ``s``
    (read before; ``s2`` read after: :data:`DRIFT` fields lie between the two)."""
    where = f"{s['start']:x} {s['name']}"
    kb, kb2 = s["kb"], (s2 or s)["kb"]
    assert (m["start"], m["end"], m["perms"], m["name"]) == (s["start"], s["end"], s["perms"], s["name"])
    smaps = m["smaps"]
    # Nothing shared with another process in either reading: nothing drifts, every field
    # is exact. Shared pages: PSS and the shared/private split follow the other
    # processes, so only what holds at any instant is checked.
    private = kb["Shared_Clean"] + kb["Shared_Dirty"] + kb2["Shared_Clean"] + kb2["Shared_Dirty"] == 0
    for field, value in kb.items():
        if field not in DRIFT or (private and kb2[field] == value):
            assert smaps[field] == value * KB, (where, field)
    uss = smaps["Private_Clean"] + smaps["Private_Dirty"]
    assert uss <= smaps["Pss"] <= smaps["Rss"] and smaps["Pss_Dirty"] <= smaps["Pss"], where
    assert smaps["SwapPss"] <= smaps["Swap"] and smaps["Referenced"] <= smaps["Rss"], where
    assert set(smaps) - set(kb) <= {"THPeligible", "ProtectionKey"}, where
    assert set(m["vmflags"]) == s["flags"], where
    for kind in ("Clean", "Dirty"):  # shared + private does not drift
        assert smaps[f"Shared_{kind}"] + smaps[f"Private_{kind}"] == (kb[f"Shared_{kind}"] + kb[f"Private_{kind}"]) * KB
    assert m["uss"] == uss, where
    split = (m["pss_anon"], m["pss_file"], m["pss_shmem"])
    if kb["Anonymous"] == kb["Rss"]:
        assert split == (smaps["Pss"], 0, 0), where
    elif kb["Anonymous"] == 0:
        assert sorted(split) == [0, 0, smaps["Pss"]], where
        assert split[0] == 0
    else:
        assert split == (None, None, None), where
    pages = m["pages"]
    pmd_kb = kb.get("AnonHugePages", 0) + kb.get("ShmemPmdMapped", 0) + kb.get("FilePmdMapped", 0)
    assert pages["swapped"] * P == kb["Swap"] * KB, where
    if "ht" in s["flags"]:
        hugetlb_kb = kb["Shared_Hugetlb"] + kb["Private_Hugetlb"]
        assert pages["present"] * P == hugetlb_kb * KB > 0, where
        assert pages["huge"] * P == (pmd_kb + hugetlb_kb) * KB, where
        assert kb["Rss"] == 0 and pages["zero"] == 0, where
    else:
        assert (pages["present"] - pages["zero"]) * P == kb["Rss"] * KB, where
        assert pages["huge"] * P == pmd_kb * KB, where
    assert pages["file"] <= pages["present"], where
    if "uw" in s["flags"]:
        assert pages["written"] is not None and pages["written"] <= pages["present"] + pages["swapped"], where
    else:
        assert pages["written"] is None and m["bytes"]["written"] is None, where
    assert m["bytes"] == {k: None if v is None else v * P for k, v in pages.items()}
    if "pf" in s["flags"]:  # VM_PFNMAP ([vvar]): the kernel skips it
        assert not any(pages.values()), where


# -- the known layout -------------------------------------------------------------------------


def test_stat_agrees_with_smaps_for_every_mapping(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    doc, smaps, after = stable(capsys, child.pid)
    assert len(doc["mappings"]) == len(smaps)  # every record, as pmap -X: [vsyscall] too
    vsyscall = [m for m in doc["mappings"] if m["start"] >= task_size()]
    assert [m["name"] for m in vsyscall] == ["[vsyscall]"] and not any(vsyscall[0]["pages"].values())
    assert doc["pid"] == child.pid and doc["page_size"] == P
    assert doc["user"] == "root" and doc["uid"] == 0
    assert doc["command"].startswith(sys.executable) and "target.py" in doc["command"]
    kinds = set()
    for m, s, s2 in zip(doc["mappings"], smaps, after):
        check_against_smaps(m, s, s2)
        kinds |= {k for k in ("zero", "huge", "swapped", "file", "guard") if m["pages"][k]}
        if "ht" in s["flags"]:
            kinds.add("hugetlb")
    assert {"zero", "file", "swapped", "hugetlb", "huge"} | ({"guard"} if HAS_GUARD else set()) <= kinds
    total = doc["totals"]
    assert total["mappings"] == len(doc["mappings"])
    assert total["size"] == sum(m["size"] for m in doc["mappings"])
    for k, v in total["pages"].items():
        if k == "written":
            assert v is None  # no mapping of the target is registered for uffd-wp
        else:
            assert v == sum(m["pages"][k] for m in doc["mappings"]) and total["bytes"][k] == v * P
    rollup = read_rollup(child.pid)  # the target holds still
    for field in doc["mappings"][0]["smaps"]:
        if field in ("Pss", "Pss_Dirty", "SwapPss"):
            # smaps_rollup's own total: each record's PSS is cut down to a KiB, so the rows
            # add up to less, by less than a KiB a mapping.
            rows = sum(m["smaps"][field] for m in doc["mappings"])
            assert total["smaps"][field] == rollup[field] * KB, field
            assert rows <= total["smaps"][field] < rows + KB * len(doc["mappings"]), field
        elif field not in _NOT_SUMMED:
            assert total["smaps"][field] == sum(m["smaps"][field] for m in doc["mappings"]), field
    assert [total["pss_anon"], total["pss_file"], total["pss_shmem"]] == [
        rollup["Pss_Anon"] * KB, rollup["Pss_File"] * KB, rollup["Pss_Shmem"] * KB]
    assert total["uss"] == sum(m["uss"] for m in doc["mappings"])


ROLLUP_DRIFT = (*DRIFT, "Pss_Anon", "Pss_File", "Pss_Shmem")


def steady_rollup(r: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in r.items() if k not in ROLLUP_DRIFT}


def between(value: int, a_kb: int, b_kb: int, slack_kb: int = 0) -> bool:
    """``value`` (bytes) lies between two readings in kB, the lower one less ``slack_kb``."""
    lo, hi = sorted((a_kb, b_kb))
    return (lo - slack_kb) * KB <= value <= hi * KB


def test_stat_totals_match_smaps_rollup(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    found = None
    for _ in range(20):
        before = read_rollup(child.pid)
        doc = run_json(capsys, "stat", str(child.pid))
        after = read_rollup(child.pid)
        if after == before:
            break
        if found is None and steady_rollup(after) == steady_rollup(before):
            found = doc, before, after
    else:
        if found is None:
            pytest.fail("the target's smaps_rollup kept changing")
        doc, before, after = found
    t = doc["totals"]
    # Page-granular sums are exact; PSS is rounded down to a KiB per mapping in smaps
    # and only once in smaps_rollup.
    for field in ("Rss", "Anonymous", "AnonHugePages", "Swap", "Locked", "Shared_Hugetlb", "Private_Hugetlb"):
        assert t["smaps"][field] == before[field] * KB, field
    for kind in ("Clean", "Dirty"):  # which of them is shared follows the other processes
        assert t["smaps"][f"Shared_{kind}"] + t["smaps"][f"Private_{kind}"] == (
            before[f"Shared_{kind}"] + before[f"Private_{kind}"]) * KB
    # The target's anonymous memory is its own (it never forks): its PSS does not drift.
    n = len(doc["mappings"])
    for field in ("Pss_Dirty", "SwapPss"):
        assert between(t["smaps"][field], before[field], after[field], n), field
    for key, field in (("pss_anon", "Pss_Anon"), ("pss_shmem", "Pss_Shmem")):
        assert between(t[key], before[field], after[field], n), field
    # PSS of the libraries follows how many processes map them: what holds at any instant
    assert t["uss"] == t["smaps"]["Private_Clean"] + t["smaps"]["Private_Dirty"]
    assert t["uss"] <= t["smaps"]["Pss"] <= t["smaps"]["Rss"] and t["smaps"]["Referenced"] <= t["smaps"]["Rss"]
    assert t["pss_anon"] + t["pss_file"] + t["pss_shmem"] <= t["smaps"]["Rss"]
    # RSS does not count the zero pages: they are apart
    assert t["bytes"]["present"] - t["bytes"]["zero"] == (before["Rss"] + before["Shared_Hugetlb"]
                                                          + before["Private_Hugetlb"]) * KB
    assert t["pages"]["zero"] >= 32


@pytest.mark.parametrize("backend", ["kernel", "emulated"])
def test_stat_exact_counts_of_the_known_layout(child: Child, capsys: pytest.CaptureFixture[str], backend: str) -> None:
    assert child.info["swapped_ok"], "MADV_PAGEOUT did not swap the target's pages out"
    if HAS_THP:
        assert child.info["thp_kb"] == 2048, "no PMD THP formed (MADV_HUGEPAGE and MADV_COLLAPSE)"
    doc = run_json(capsys, "stat", str(child.pid), "--backend", backend)
    maps = by_start(doc)
    for name, want in _expected_layout().items():
        lo, hi = child.piece(name)
        m = maps[lo]
        assert m["end"] == hi, name
        assert m["pages"] == {**want, "written": None}, name  # no uffd-wp: WRITTEN means nothing
        sep = maps[hi]  # the PROT_NONE separator after each piece: nothing in it
        assert sep["perms"] == "---p" and not any(sep["pages"].values()), name
    lo, _ = child.piece("written")
    assert maps[lo]["uss"] == 64 * P and maps[lo]["smaps"]["Rss"] == 64 * P
    lo, _ = child.piece("zero")  # zero pages: present, not resident in smaps' sense
    assert maps[lo]["smaps"]["Rss"] == 0 and maps[lo]["pages"]["zero"] == 32


def test_stat_json_is_mapping_stats(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    from pagescan.mappings import mapping_stats

    for _ in range(5):
        rc, out, err = run(capsys, "stat", str(child.pid), "--json")
        want = [s.as_dict() for s in mapping_stats(child.pid)]
        assert rc == 0 and err == "" and out.isascii()
        doc = json.loads(out)
        if doc["mappings"] == want:
            break
    else:
        pytest.fail("stat --json and mapping_stats() differ")
    lo, _ = child.piece("weird")
    assert by_start(doc)[lo]["name"] == os.path.join(os.path.dirname(child.file), WEIRD)
    lines = out.splitlines()  # one line per mapping
    assert len([ln for ln in lines if ln.startswith('    {"bytes": ') and '"device": ' in ln]) == len(doc["mappings"])
    assert {"command", "user", "uid", "pid", "page_size", "mappings", "groups", "totals"} <= set(doc)


def test_stat_table(child: Child, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, err = run(capsys, "stat", str(child.pid))
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert re.fullmatch(rf"pid {child.pid} \(root\): {re.escape(sys.executable)} \S*target.py .*", lines[0])
    assert lines[1].split() == ["ADDRESS", "PERM", "SIZE", "RSS", "PSS", "USS", "SWAP", "ZERO", "HUGE", "MAPPING"]
    rows = {int(ln.split()[0], 16): ln.split() for ln in rows_of(lines)}
    assert rows[child.piece("written")[0]][1:9] == ["rw-p", "256K", "256K", "256K", "256K", "0", "0", "0"]
    assert rows[child.piece("zero")[0]][1:9] == ["r--p", "128K", "0", "0", "0", "0", "128K", "0"]
    assert rows[child.piece("file")[0]][-1] == child.file
    assert rows[child.piece("file")[0]][2:4] == ["64K", "64K"]
    assert rows[child.piece("swap")[0]][3:6] == ["0", "0", "0"] and rows[child.piece("swap")[0]][6] == "128K"
    assert rows[child.piece("hugetlb")[0]][2:4] == ["4.0M", "0"]  # hugetlb is not in RSS
    assert rows[child.piece("hugetlb")[0]][8] == "4.0M"
    assert child.piece("written")[1] not in rows  # empty separators only with --all
    doc = run_json(capsys, "stat", str(child.pid))
    total = lines[2 + len(rows_of(lines))].split()
    assert total[0] == "total" and total[-2:] == [str(len(doc["mappings"])), "mappings"]
    t = doc["totals"]
    assert total[2] == pagescan.cli._common.human(t["smaps"]["Rss"])
    summary = " ".join(lines[3 + len(rows_of(lines)):])
    assert summary.startswith("total: RSS ") and "zero pages" in summary and "(not in RSS)" in summary
    assert "hugetlb 4.0M (4.0M private; not in RSS or USS)" in summary  # psutil's USS adds the private part
    assert f"{len(doc['mappings'])} mappings" in summary
    starts = [int(ln.split()[0], 16) for ln in rows_of(lines)]
    assert starts == sorted(starts)

    rc, out, _ = run(capsys, "stat", str(child.pid), "--all")
    assert len(rows_of(out.splitlines())) == len(doc["mappings"])
    for key, field in (("rss", "Rss"), ("swap", "Swap")):
        rc, out, _ = run(capsys, "stat", str(child.pid), "--sort", key)
        got = [by_start(doc)[int(ln.split()[0], 16)]["smaps"][field] for ln in rows_of(out.splitlines())]
        assert got == sorted(got, reverse=True) and got[0] > 0, key
    # PSS drifts between runs (other processes map the same libraries): the order of the
    # values shown (rounding keeps it)
    rc, out, _ = run(capsys, "stat", str(child.pid), "--sort", "pss")
    units = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    shown = [ln.split()[4] for ln in rows_of(out.splitlines())]
    got = [0.0 if x == "0" else float(x[:-1]) * units[x[-1]] for x in shown]
    assert got == sorted(got, reverse=True) and got[0] > 0
    rc, out, _ = run(capsys, "stat", str(child.pid), "--sort", "zero")
    got = [by_start(doc)[int(ln.split()[0], 16)]["pages"]["zero"] for ln in rows_of(out.splitlines())]
    assert got == sorted(got, reverse=True) and got[0] >= 32


def test_stat_columns_by_name(child: Child, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    doc = run_json(capsys, "stat", str(child.pid))
    names = [f.lower() for f in SMAPS_FIELDS if f not in ("Size", "ProtectionKey")]
    assert set(names) <= set(COLUMNS)
    want = ["rss", "pss", "pss_dirty", "shared_clean", "shared_dirty", "private_clean", "private_dirty",
            "referenced", "anonymous", "lazyfree", "anonhugepages", "swappss", "locked", "uss", "file", "guard"]
    rc, out, err = run(capsys, "stat", str(child.pid), "--columns", ",".join(want), "--all")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[1].split() == ["ADDRESS", "PERM", *(COLUMNS[c].header for c in want), "MAPPING"]
    human = pagescan.cli._common.human
    docs = [by_start(doc), by_start(run_json(capsys, "stat", str(child.pid)))]  # before and after

    def cell(m: dict[str, Any], c: str) -> str:
        if c == "uss":
            return human(m["uss"])
        if c in ("file", "guard"):
            return human(m["bytes"][c])
        return human(m["smaps"][next(f for f in SMAPS_FIELDS if f.lower() == c)])

    for ln in rows_of(lines):
        cells = ln.split()
        start = int(cells[0], 16)
        shared = any(d[start]["smaps"]["Shared_Clean"] + d[start]["smaps"]["Shared_Dirty"] for d in docs)
        for c, got in zip(want, cells[2:]):
            if shared and c in _DRIFT_COLUMNS:
                continue  # PSS and shared/private of shared pages follow the other processes
            assert got in {cell(d[start], c) for d in docs}, (cells, c)
    # +NAME adds to the defaults; the VmFlags text column; THPeligible as a number
    rc, out, _ = run(capsys, "stat", str(child.pid), "--columns", "+thpeligible,+vmflags")
    header = out.splitlines()[1].split()
    assert header[:2 + len(DEFAULT_COLUMNS)] == ["ADDRESS", "PERM", *(COLUMNS[c].header for c in DEFAULT_COLUMNS)]
    assert header[-3:] == ["THPELIGIBLE", "VMFLAGS", "MAPPING"]
    rc, out, _ = run(capsys, "stat", str(child.pid), "--columns", "all", "--wide")
    assert out.splitlines()[1].split()[2:-1] == [c.header for c in COLUMNS.values()]
    assert "unknown column 'colour'" in usage_error(capsys, "stat", str(child.pid), "--columns", "rss,colour")
    assert "cannot sort by 'colour'" in usage_error(capsys, "stat", str(child.pid), "--sort", "colour")
    assert "cannot sort by 'vmflags'" in usage_error(capsys, "stat", str(child.pid), "--sort", "vmflags")
    assert "--count needs --watch" in usage_error(capsys, "stat", str(child.pid), "--count", "2")


def test_stat_group(child: Child, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    doc = run_json(capsys, "stat", str(child.pid))
    groups = {g["name"]: g for g in doc["groups"]}
    for name in ("[anon]", "[heap]", "[stack]", child.file, sys.executable):
        members = [m for m in doc["mappings"] if (m["name"] or "[anon]") == name]
        if name == sys.executable:
            members = [m for m in doc["mappings"] if m["name"] == os.path.realpath(sys.executable)]
            name = os.path.realpath(sys.executable)
        g = groups[name]
        assert members and g["mappings"] == len(members), name
        assert g["size"] == sum(m["size"] for m in members)
        assert g["smaps"]["Rss"] == sum(m["smaps"]["Rss"] for m in members)
        assert g["smaps"]["Pss"] == sum(m["smaps"]["Pss"] for m in members)
        assert g["uss"] == sum(m["uss"] for m in members)
        assert g["pages"]["zero"] == sum(m["pages"]["zero"] for m in members)
    assert sum(g["mappings"] for g in doc["groups"]) == len(doc["mappings"])
    assert sum(g["smaps"]["Rss"] for g in doc["groups"]) == doc["totals"]["smaps"]["Rss"]
    rc, out, err = run(capsys, "stat", str(child.pid), "--group", "--sort", "rss")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["MAPS", "PERM"]
    names = sorted(groups, key=len, reverse=True)  # the longest name a line ends with is its own
    order = [next(n for n in names if ln.endswith("  " + printable(n))) for ln in rows_of(lines)]
    row = {name: ln.split() for name, ln in zip(order, rows_of(lines))}
    libpython = max((g for g in doc["groups"] if g["name"].startswith("/")), key=lambda g: g["mappings"])
    assert row[libpython["name"]][:2] == [str(libpython["mappings"]), "maps"]
    assert row["[anon]"][0] == str(groups["[anon]"]["mappings"])
    rss = [groups[name]["smaps"]["Rss"] for name in order]
    assert rss == sorted(rss, reverse=True) and len(order) == len(set(order))


def test_stat_fits_100_columns_and_shortens_names_in_the_middle(
    child: Child, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    rc, out, err = run(capsys, "stat", str(child.pid))
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert all(len(ln) <= 100 for ln in lines), max(lines, key=len)
    assert lines[1].split() == ["ADDRESS", "PERM", "SIZE", "RSS", "PSS", "USS", "SWAP", "ZERO", "HUGE", "MAPPING"]
    # a long path: shortened in its middle, the file name kept
    long_dir = tmp_path / ("d" * 60) / ("e" * 40)
    long_dir.mkdir(parents=True)
    path = long_dir / "libexample-1.2.so"
    path.write_bytes(b"x" * P)
    code = ("import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); "
            "m[0]; print('ready', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        rc, out, _ = run(capsys, "stat", str(proc.pid))
        row = next(ln for ln in out.splitlines() if ln.endswith("/libexample-1.2.so"))
        assert len(row) <= 100 and "…/" in row and row.split()[-1].startswith(str(tmp_path)[:8])
        rc, out, _ = run(capsys, "stat", str(proc.pid), "--wide")
        assert str(path) in out.split()
    finally:
        stop(proc)
    # too narrow: default columns with nothing in them go (a sleep has no swap, no THP)
    monkeypatch.setenv("COLUMNS", "70")
    proc = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while not _maps_have(proc.pid, "libc.so.6"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        doc = run_json(capsys, "stat", str(proc.pid))
        rc, out, _ = run(capsys, "stat", str(proc.pid))
    finally:
        stop(proc)
    lines = out.splitlines()
    dropped = re.findall(r"(\w+) \(all zero\)", lines[-1])
    assert lines[-1].startswith("(not shown: ") and {"huge", "swap"} <= set(dropped)
    for name in dropped:
        assert name.upper() not in lines[1].split()
        assert doc["totals"]["smaps"]["Swap"] == 0 if name == "swap" else doc["totals"]["pages"][name] == 0


# -- real processes ---------------------------------------------------------------------------


def _unchanged(before: list[dict[str, Any]],
               after: list[dict[str, Any]]) -> dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any]]]:
    """(before, after) of the smaps records that agree in both reads but for
    :data:`DRIFT`, by address range."""
    b = {(s["start"], s["end"]): s for s in before}
    return {(s["start"], s["end"]): (b[s["start"], s["end"]], s) for s in after
            if (s["start"], s["end"]) in b and steady([b[s["start"], s["end"]]]) == steady([s])}


def _maps_have(pid: int, name: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(ln.rstrip().endswith(name) for ln in f)


def test_stat_real_processes_agree_with_smaps(capsys: pytest.CaptureFixture[str]) -> None:
    """The test runner (busy: only the mappings that did not change while reading), init,
    and idle ``sleep`` and ``bash`` processes (every mapping)."""
    before = read_smaps(os.getpid())
    doc = run_json(capsys, "stat", "self")
    same = _unchanged(before, read_smaps(os.getpid()))
    checked = 0
    for m in doc["mappings"]:
        if (m["start"], m["end"]) in same:
            check_against_smaps(m, *same[m["start"], m["end"]])
            checked += 1
    assert checked > len(doc["mappings"]) // 2
    # init: every mapping agrees, or (not ours to read, e.g. in a VM whose init is not
    # dumpable) the one-line PermissionError that reading its smaps gives us too
    try:
        with open("/proc/1/smaps"):
            pass
    except PermissionError:
        rc, out, err = run(capsys, "stat", "1")
        assert rc == 1 and out == "" and err.startswith("pagescan: PermissionError: ") and err.count("\n") == 1
    else:
        doc, smaps, after = stable(capsys, 1)
        for m, s, s2 in zip(doc["mappings"], smaps, after):
            check_against_smaps(m, s, s2)
    for argv in (["sleep", "60"], ["bash", "-c", "read x"]):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not _maps_have(proc.pid, "libc.so.6"):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            doc, smaps, after = stable(capsys, proc.pid)
            assert len(doc["mappings"]) == len(smaps) > 5
            for m, s, s2 in zip(doc["mappings"], smaps, after):
                check_against_smaps(m, s, s2)
            assert doc["command"] == " ".join(argv)
        finally:
            stop(proc)


def test_stat_pss_halves_with_a_forked_sibling(capsys: pytest.CaptureFixture[str]) -> None:
    with Isolated(64) as m:  # private anonymous, its own VMA
        m.write(0, 64)
        with child_process(lambda: None) as pid:
            for who in ("self", str(pid)):
                row = by_start(run_json(capsys, "stat", who))[m.addr]
                sm = row["smaps"]
                assert sm["Rss"] == 64 * P and sm["Shared_Dirty"] == 64 * P, who
                assert sm["Pss"] == 32 * P and row["uss"] == 0, who
                assert row["pss_anon"] == 32 * P, who
        row = by_start(run_json(capsys, "stat", "self"))[m.addr]  # the sibling has gone
        assert row["smaps"]["Pss"] == 64 * P and row["uss"] == 64 * P


@requires_wp_async
def test_stat_written_only_where_uffd_wp_is_registered(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with Mapping(16, flags=MAP.SHARED | MAP.ANONYMOUS) as m, pagescan.WriteWatch(m.addr, m.length):
        m.touch(2, 3)
        doc = run_json(capsys, "stat", "self")
        row = by_start(doc)[m.addr]
        assert "uw" in row["vmflags"]
        assert row["pages"]["written"] == 3 and row["bytes"]["written"] == 3 * P
        others = [r for r in doc["mappings"] if r["start"] != m.addr]
        assert all(r["pages"]["written"] is None for r in others)
        assert doc["totals"]["pages"]["written"] == 3
        monkeypatch.setenv("COLUMNS", "200")
        rc, out, _ = run(capsys, "stat", "self", "--columns", "rss,written")
        cells = {int(ln.split()[0], 16): ln.split() for ln in rows_of(out.splitlines())}
        assert cells[m.addr][3] == "12K"
        assert {c[3] for a, c in cells.items() if a != m.addr} == {"-"}


@requires_wp_async
def test_stat_swapped_is_swap_where_uffd_wp_markers_are(capsys: pytest.CaptureFixture[str]) -> None:
    """Arming unpopulated pages installs uffd-wp markers, which ``PAGEMAP_SCAN`` reports
    as SWAPPED; smaps' ``Swap`` (and ``pmap -X``) counts real swap entries only. In a
    mapping registered for uffd (``uw``/``um``), ``swapped`` is smaps' ``Swap``."""
    with Mapping(64) as m, pagescan.WriteWatch(m.addr, m.length):
        m.touch(0, 4)  # 4 pages present, 60 slots hold markers
        sw = int(pagescan.Category.SWAPPED)
        res = pagescan.scan(m.addr, m.end, category_anyof_mask=sw, return_mask=sw)
        assert sum(int(e - s) for s, e, _ in res.regions.tolist()) == 60 * P, "no markers: the case is not made"
        doc = run_json(capsys, "stat", "self")
        row = by_start(doc)[m.addr]
        assert "uw" in row["vmflags"] and row["smaps"]["Swap"] == 0
        assert row["pages"]["swapped"] == 0 and row["bytes"]["swapped"] == 0
        assert row["pages"]["present"] == 4
        assert doc["totals"]["pages"]["swapped"] == sum(r["pages"]["swapped"] for r in doc["mappings"])
        stats = {s.start: s for s in mapping_stats()}
        assert stats[m.addr].pages["swapped"] == 0
        # Whatever other columns are asked for (smaps is read for swapped alone too).
        rc, out, _ = run(capsys, "stat", "self", "--columns", "swapped", "--all")
        cells = {int(ln.split()[0], 16): ln.split() for ln in rows_of(out.splitlines())}
        assert rc == 0 and cells[m.addr][2] == "0", cells[m.addr]


def test_file_names_that_are_not_utf8_stay_distinct(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are the kernel's bytes: two files whose names differ only in bytes that are
    not UTF-8 are two names (``os.fsencode`` gives the bytes back), in ``mapping_stats``,
    ``stat --json`` and ``--group``; shown with ``?`` for what cannot be printed."""
    paths = [os.path.join(os.fsencode(tmp_path), b"bad" + bytes([c])) for c in (0xFF, 0xFE)]
    with contextlib.ExitStack() as stack:
        maps = [stack.enter_context(file_mapping(os.fsdecode(p), 4, shared=True)) for p in paths]
        for m in maps:
            m.touch(0)
        stats = {s.start: s for s in mapping_stats()}
        assert [os.fsencode(stats[m.addr].name) for m in maps] == paths
        doc = run_json(capsys, "stat", "self", "--group")
        groups = {g["name"]: g for g in doc["groups"]}
        assert [groups[os.fsdecode(p)]["mappings"] for p in paths] == [1, 1]
        monkeypatch.setenv("COLUMNS", "200")
        rc, out, _ = run(capsys, "stat", "self", "--group")
        assert rc == 0 and out.count(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"bad?"))) == 2
        rc, out, err = run(capsys, "map", "self", "--png", str(tmp_path / "map.png"))
        assert rc == 0, err


# -- --watch ----------------------------------------------------------------------------------


def _watch_in_a_pty(pid: int, *args: str) -> tuple[int, str]:
    """``pagescan stat PID --watch ...`` in a 60x120 pseudo-terminal: (exit code, what it drew)."""
    child_pid, fd = pty.fork()
    if child_pid == 0:  # pragma: no cover - child
        try:
            os.environ.update(TERM="xterm", COLUMNS="120", LINES="60")
            os.execv(sys.executable, [sys.executable, "-m", "pagescan", "stat", str(pid), "--watch", *args])
        finally:
            os._exit(127)
    chunks = []
    try:
        fcntl.ioctl(fd, 0x5414, b"\x3c\x00\x78\x00\x00\x00\x00\x00")  # TIOCSWINSZ: 60 rows, 120 columns
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
        _, status = os.waitpid(child_pid, 0)
        child_pid = 0
    finally:
        if child_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, 9)
            os.waitpid(child_pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def _attributes(screen: str) -> set[str]:
    """Every SGR parameter curses sent (``ESC [ 0;1 m``: "0", "1"): 1 is bold, 7 reverse video."""
    return {a for params in re.findall(r"\x1b\[([0-9;]*)m", screen) for a in params.split(";")}


def test_stat_watch_under_a_pty(child: Child) -> None:
    """Three screens in a pseudo-terminal, then exit 0; without a terminal: a clear error.
    (Even an idle process's PSS moves as other processes map and unmap the libraries
    it shares, so whether a cell is highlighted here is not fixed; see the next test.)"""
    code, screen = _watch_in_a_pty(child.pid, "0.2", "--count", "3")
    assert code == 0, screen[-2000:]
    assert "q quits" in screen and "RSS" in screen and "USS" in screen
    assert f"pid {child.pid}" in screen and os.path.basename(child.file) in screen
    assert "\x1b[" in screen  # drawn by curses, not printed
    r = _cli("stat", str(child.pid), "--watch", "1", stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "pagescan: stat --watch needs a terminal (stdin and stdout); use --json for scripts\n"


def test_stat_watch_says_when_the_process_exits() -> None:
    """The watched process exits: the terminal is restored, then one line on stderr and
    exit status 1 (it used to end silently, with 0)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(1.0)"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        code, screen = _watch_in_a_pty(proc.pid, "0.2")
    finally:
        stop(proc)
    assert code == 1, screen[-2000:]
    assert "pagescan: ProcessLookupError" in screen.split("q quits")[-1], screen[-2000:]


def test_a_column_list_with_a_plus_adds_to_the_defaults() -> None:
    """The documented ``--columns +referenced,file`` (one ``+`` for the list)."""
    from pagescan.cli._stat import _column_list

    assert _column_list("+referenced,file") == [*DEFAULT_COLUMNS, "referenced", "file"]
    assert _column_list("referenced,+file") == [*DEFAULT_COLUMNS, "referenced", "file"]
    assert _column_list("rss,pss") == ["rss", "pss"]


def test_no_column_is_cut_when_the_table_is_wider_than_the_terminal(child: Child) -> None:
    """``--columns all`` on an 80-column terminal (or piped: 120): lines are left long, as
    ``pmap -X`` leaves them; before, every row was cut at the width, losing columns."""
    r = _cli("stat", str(child.pid), "--columns", "all", env={**os.environ, "COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert not any(ln.endswith("…") for ln in lines[1:])
    header = lines[1].split()
    assert header[-1] == "MAPPING" and {COLUMNS[c].header for c in COLUMNS} <= set(header)


_GROWING = """
import mmap, sys, time
m = mmap.mmap(-1, 256 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
print("ready", flush=True)
for off in range(0, 256 << 20, 1 << 20):  # 1 MiB more every 20 ms, for about 5 s
    m[off:off + (1 << 20)] = b"x" * (1 << 20)
    time.sleep(0.02)
sys.stdin.read()
"""


def test_stat_watch_highlights_what_changed() -> None:
    """A process writing 1 MiB every 20 ms: from the second screen on, its growing
    mapping's row is redrawn with the changed cells in bold and its address in reverse
    video (the row is found by address and name, so it is compared with itself)."""
    proc = subprocess.Popen([sys.executable, "-c", _GROWING], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        code, screen = _watch_in_a_pty(proc.pid, "0.3", "--count", "4")
    finally:
        stop(proc)
    assert code == 0, screen[-2000:]
    assert _attributes(screen) >= {"1", "7"}, screen[-2000:]


def test_stat_of_a_process_that_exits_while_its_smaps_is_read_is_an_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The kernel ends smaps early, with no error, once the process is gone: the
    process is killed after the first read of its smaps, and ``stat`` reports that it
    exited (exit 1) instead of a table of the mappings read so far (exit 0)."""
    import signal

    import pagescan.mappings as mappings_mod
    from pagescan.cli import main

    proc = subprocess.Popen([sys.executable, "-c", "import mmap, time\nms = [mmap.mmap(-1, 4096) for _ in range(3000)]\n"
                             "[m.write(b'x') for m in ms]\nprint('ok', flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"

        def first_read_then_kill(pid: int, name: str) -> bytes:
            fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
            try:
                first = os.read(fd, 1 << 16)
                time.sleep(0.5)  # the other thread's scan of the process is over by then
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.3)  # dead, not reaped: its memory is gone
                rest = os.read(fd, 1 << 22)  # the kernel: EOF, no error
            finally:
                os.close(fd)
            return first + rest

        monkeypatch.setattr(mappings_mod, "_read_big", first_read_then_kill)
        assert main(["stat", str(proc.pid)]) == 1
        assert "total" not in capsys.readouterr().out
    finally:
        stop(proc)


def test_stat_watch_highlights_the_first_row_and_fits_lines_to_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen loop itself, on a recording screen of 30x100: the first mapping row
    (screen row 3, under the pid line and the headers) is highlighted when it changes,
    like any other, and the table is fitted to the 99 columns a line may use."""
    import curses

    from pagescan.cli import _watch

    monkeypatch.setattr(curses, "curs_set", lambda n: None)
    monkeypatch.setattr(curses, "napms", lambda ms: None)
    monkeypatch.setenv("COLUMNS", "80")

    class Screen:
        def __init__(self) -> None:
            self.calls: list[Any] = []

        def timeout(self, t: int) -> None: ...
        def getmaxyx(self) -> tuple[int, int]: return (30, 100)
        def erase(self) -> None: self.calls.append("erase")
        def addnstr(self, y: int, x: int, text: str, n: int, attr: int = 0) -> None:
            self.calls.append((y, x, text[:n], attr))
        def refresh(self) -> None: ...
        def getch(self) -> int: return -1

    widths: list[str] = []
    frames = iter([
        ["pid 1 (root): x", "ADDRESS  PERM   RSS  MAPPING", "1000     rw-p  4.0K  [heap]", "2000     rw-p  4.0K  [stack]"],
        ["pid 1 (root): x", "ADDRESS  PERM   RSS  MAPPING", "1000     rw-p  9.0M  [heap]", "2000     rw-p  4.0K  [stack]"],
    ])

    def draw() -> list[str]:
        widths.append(os.environ["COLUMNS"])
        return next(frames)

    scr = Screen()
    _watch._loop(scr, 0.0, 2, draw, [])
    second = scr.calls[scr.calls.index("erase", 1):]
    marked = {(c[0], c[2], c[3]) for c in second if c != "erase" and c[3] in (curses.A_BOLD, curses.A_REVERSE)}
    assert marked == {(3, "1000", curses.A_REVERSE), (3, "9.0M", curses.A_BOLD)}
    assert widths == ["99", "99"]


# -- map --------------------------------------------------------------------------------------


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


def test_map_png_all_is_taller(child: Child, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from PIL import Image

    heights = []
    for extra in ([], ["--all"]):
        path = tmp_path / f"m{len(extra)}.png"
        assert run(capsys, "map", str(child.pid), "--png", str(path), *extra)[0] == 0
        with Image.open(path) as img:
            heights.append(img.height)
    assert heights[1] > heights[0]


_MANY = r"""
import ctypes, os, sys
from pagescan._uapi import libc
from pagescan._uapi.mman import MAP, PROT
P = os.sysconf("SC_PAGE_SIZE")
n = int(sys.argv[2])
fd = os.open(sys.argv[1], os.O_RDONLY)
base = libc.mmap(0, n * P, PROT.READ, MAP.PRIVATE, fd, 0)
for i in range(0, n, 2):  # alternate protections: n mappings of one file, side by side
    libc.mprotect(base + i * P, P, PROT.READ | PROT.EXEC)
ctypes.string_at(base, n * P)  # every page present
print(base, flush=True)
sys.stdin.read()
"""


def test_map_png_row_with_more_mappings_than_pixels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """2,000 adjacent mappings of one file in one bar of ~500 pixels: the bar is the
    file colour, not white boundary lines; the title names the process."""
    from PIL import Image

    from pagescan.cli._map import CLASSES

    n = 2000
    data = tmp_path / "many.bin"
    data.write_bytes(b"m" * (n * P))
    proc = subprocess.Popen([sys.executable, "-c", _MANY, str(data), str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base = int(proc.stdout.readline())
        with open(f"/proc/{proc.pid}/maps") as f:
            assert len([ln for ln in f if ln.rstrip().endswith(str(data))]) == n
        path = tmp_path / "many.png"
        rc, out, err = run(capsys, "map", str(proc.pid), "--png", str(path), "--width", "900")
        assert rc == 0 and err == "", err
        rc, doc_out, _ = run(capsys, "stat", str(proc.pid), "--json")
        doc = json.loads(doc_out)
    finally:
        stop(proc)
    assert base == by_start(doc)[base]["start"]
    file_colour = dict(CLASSES)["file"]
    from pagescan.cli._map import layout

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        geo = layout(img.width)
        ys = [y for y in range(geo.top, img.height) if rgb.getpixel((geo.bar_x + 5, y)) == file_colour]
        assert ys, "no bar in the file colour"
        rows = {}
        for y in ys:  # the rows drawn in the file colour; the 2,000-mapping one is fully covered
            pixels = [rgb.getpixel((x, y)) for x in range(geo.bar_x, geo.bar_x + geo.bar_w)]
            rows[y] = sum(p == file_colour for p in pixels) / len(pixels)
        assert max(rows.values()) == 1.0, rows
        drawn = img.crop((0, 0, img.width, 24)).getcolors(1 << 16)
        title = img.text["Title"]  # the PNG text chunk
    assert drawn is not None and len(drawn) > 1  # some text drawn in the title strip
    assert title.startswith(f"pid {proc.pid} (") and "-c" in title, title  # pid, user, command line
    assert re.search(r" -- present \S+ \(zero pages \S+\), swapped \S+, \d+ mappings$", title), title
    assert out.strip().endswith("rows)")


_SEPARATE = r"""
import ctypes, os, sys
from pagescan._uapi import libc
from pagescan._uapi.mman import MAP, PROT
P = os.sysconf("SC_PAGE_SIZE")
n = int(sys.argv[1])
base = libc.mmap(0, 2 * n * P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS, -1, 0)
for i in range(n):  # n separate anonymous mappings (PROT_NONE between them), each written
    libc.mprotect(base + 2 * i * P, P, PROT.READ | PROT.WRITE)
    ctypes.memset(base + 2 * i * P, 1, P)
print(base, flush=True)
sys.stdin.read()
"""


def test_map_of_more_rows_than_a_picture_can_hold(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than fit in Pillow's own pixel limit (its viewers refuse more as a
    "decompression bomb"; 40,000 mappings drew a 1400x640,274 image in 60 s and 3.5 GB):
    runs of rows share a bar, and the picture stays within the limit. The limit is
    lowered here so that 400 mappings exceed it. ``--width`` has a maximum."""
    from PIL import Image

    from pagescan.cli import _map

    monkeypatch.setattr(_map, "MAX_PIXELS", 900 * (86 + 50 * 30))  # 50 rows at 900 pixels
    proc = subprocess.Popen([sys.executable, "-c", _SEPARATE, "400"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and int(proc.stdout.readline())
        path = tmp_path / "rows.png"
        rc, out, err = run(capsys, "map", str(proc.pid), "--png", str(path), "--width", "900")
    finally:
        stop(proc)
    assert rc == 0 and err == "", err
    with Image.open(path) as img:
        assert img.width * img.height <= _map.MAX_PIXELS
        rows = int(re.search(r"(\d+) rows\)", out).group(1))  # type: ignore[union-attr]
        assert rows <= 50
    assert "must be from 600 to" in usage_error(capsys, "map", "self", "--png", "x.png", "--width", "20000000")


def test_map_without_pillow(child: Child, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    path = tmp_path / "x.png"
    rc, out, err = run(capsys, "map", str(child.pid), "--png", str(path))
    assert rc == 1 and out == "" and not path.exists()
    assert err.startswith("pagescan: map --png needs Pillow (") and err.endswith("): install pagescan[png]\n")


# -- real subprocess runs -----------------------------------------------------------------------


def test_subprocess_stat_equals_in_process(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    diff: list[str] = []
    for _ in range(5):
        r = _cli("stat", str(child.pid), "--json")
        assert r.returncode == 0 and r.stderr == ""
        doc = _without_pss(run_json(capsys, "stat", str(child.pid)))
        sub = _without_pss(json.loads(r.stdout))
        if sub == doc:
            return
        diff = [f"{m['start']:x} {k}" for m, n in zip(sub["mappings"], doc["mappings"]) for k in m if m[k] != n[k]]
    pytest.fail(f"python -m pagescan stat --json differs from main(['stat', ...]): {diff or 'totals'}")


_PSS = (*DRIFT, "pss_anon", "pss_file", "pss_shmem", "uss", "pss")  # ("pss", "uss": the psutil block)


def _without_pss(doc: Any) -> Any:
    """``doc`` without the :data:`DRIFT` values (the shared libraries' PSS and
    shared/private split in the target depend on how many processes map them, and the
    command run as a subprocess is one more)."""
    if isinstance(doc, dict):
        return {k: _without_pss(v) for k, v in doc.items() if k not in _PSS}
    if isinstance(doc, list):
        return [_without_pss(x) for x in doc]
    return doc


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
    assert first.startswith(b"pid ") and err == b""



@pytest.mark.parametrize("as_json", [False, True])
def test_stat_of_a_process_that_exits_after_its_mappings_were_read(
        as_json: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The process ends (and is reaped) right after its mappings were read: one line,
    ProcessLookupError, exit 1 (before: a report of its mappings under an empty command
    line and user, exit 0, and PSS totals silently summed from the mappings)."""
    from pagescan.cli import _stat, main

    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; print(flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"
        real = _stat._mapping_table

        def read_then_end(*args: Any, **kw: Any) -> Any:
            table = real(*args, **kw)
            proc.kill()
            proc.wait()
            return table

        monkeypatch.setattr(_stat, "_mapping_table", read_then_end)
        rc = main(["stat", str(proc.pid), *(["--json"] if as_json else [])])
        out, err = capsys.readouterr()
        assert rc == 1 and out == "", out
        assert err == f"pagescan: ProcessLookupError: [Errno 3] pid {proc.pid} exited while it was read\n", err
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_newline_in_a_file_name_is_a_newline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """maps and smaps write a newline in a path as the four characters ``\\012``;
    pagescan reads it back as the newline, as PROCMAP_QUERY gives it: JSON holds the
    real name (``os.fsencode`` of it opens the file), the table shows ``?``, and the
    smaps and query paths agree (before: ``new\\012line.dat`` in JSON and the table)."""
    from pagescan._procfs import query_maps, read_maps, read_smaps

    path = tmp_path / "new\nline.dat"
    with file_mapping(path, 2) as m:
        want = os.fspath(path)
        got = {"maps": [v.name for v in read_maps(os.getpid(), m.addr, m.end)],
               "smaps": [v.name for v in read_smaps(os.getpid(), m.addr, m.end)]}
        q = query_maps(os.getpid(), m.addr, m.end)
        if q is not None:  # PROCMAP_QUERY: Linux 6.11
            got["query"] = [v.name for v in q]
        assert all(names == [want] for names in got.values()), got
        doc = run_json(capsys, "stat", "self", "--all")
        names = [r["name"] for r in doc["mappings"] if r["start"] == m.addr]
        assert names == [want] and os.path.exists(os.fsencode(names[0]))
        rc, table, _ = run(capsys, "stat", "self", "--all", "--wide")
        assert rc == 0 and printable(want) in table and "\\012" not in table


def test_stat_is_a_superset_of_psutil_and_pmap_x(child: Child, capsys: pytest.CaptureFixture[str]) -> None:
    """psutil as the oracle (its ``memory_full_info()`` on Linux: statm, then smaps'
    sums): ``stat --json`` carries every field under ``psutil``, equal for the idle
    target; ``pmap -x``'s Dirty is the ``dirty`` column (Shared_Dirty + Private_Dirty)."""
    import psutil

    want = psutil.Process(child.pid).memory_full_info()._asdict()
    doc = run_json(capsys, "stat", str(child.pid), "--columns", "+dirty")
    assert set(doc["psutil"]) == set(want)
    assert doc["psutil"] == want, {k: (doc["psutil"][k], v) for k, v in want.items() if doc["psutil"][k] != v}
    sm = doc["totals"]["smaps"]
    rc, table, _ = run(capsys, "stat", str(child.pid), "--columns", "dirty", "--all", "--wide")
    total = next(ln for ln in table.splitlines() if ln.startswith("total "))
    assert rc == 0 and total.split()[1] == human(sm["Shared_Dirty"] + sm["Private_Dirty"]), total
