"""``pagescan bench`` and the measurement code it shares with benchmarks/tracking.py.

Runs the real command on a small region (every method this kernel has), checks what a
user sees (no internal targets, no negative costs, every method either measured or
skipped with the reason), that the measurement catches a method that misreports, and
that the research harness still runs over the same code. No timing is asserted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pagescan import _tracking
from pagescan._units import fmt_ns, fmt_size, parse_size
from pagescan.cli import main
from pagescan.cli._bench import ABOUT, _summary

ROOT = Path(__file__).resolve().parent.parent
SMALL = "4M"  # 1024 pages: just over the 1000-page minimum


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["bench", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def expected_skips() -> set[str]:
    return {m for m in _tracking.METHODS if _tracking.skip_reason(m)}


def test_bench_table_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--size", SMALL)
    assert rc == 0 and err == "", err
    assert "a region of 4 MiB (1024 pages" in out
    for method in ABOUT:
        (row,) = [line for line in out.splitlines() if line.startswith(f"{method} ")][:1]
        if method in expected_skips():
            assert row.split()[1] == "skipped"
            assert re.search(rf"^{method} +skipped: \S", out, re.M), "the reason is printed"
        else:
            cells = row.split()
            assert len(cells) == 1 + 2 * 4 or cells[1] in ("none", "~0"), row  # value + unit per column
    assert not re.search(r"target|not met|\bmet\b", out), "no internal targets"
    assert not re.search(r"(?<![\w.])-\d", out), "no negative figures"
    assert re.search(r"^took \d+ s$", out, re.M)


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--size", SMALL, "--methods", "shadow,writewatch,hash", "--json")
    assert rc == 0 and err == ""
    doc = json.loads(out)
    assert doc["size"] == 4 << 20 and doc["rounds"] > 0
    measured = set(doc["methods"])
    assert measured | set(doc["skipped"]) == {"writewatch", "hash", "shadow"}
    assert set(doc["skipped"]) == expected_skips() & {"writewatch", "hash", "shadow"}
    for method, row in doc["methods"].items():
        if method in ("hash", "shadow"):
            assert row["write_ns"] is None, "they do not intercept writes"
        else:
            assert row["write_ns"] >= 0
        assert set(row["get_reset_ns"]) == {"0.1%", "1%", "10%"}
        assert all(v > 0 for v in row["get_reset_ns"].values())


def test_write_cost_is_never_negative() -> None:
    workloads = _tracking.big_workloads(4 << 20, 1)
    for net, plain, shown in ((-7.0, 20.0, 0.0), (15.0, 20.0, 0.0), (900.0, 20.0, 900.0)):
        results = {w.key: {"per_write_net_ns": net, "per_write_base_ns": plain, "get_reset_ns": 1e5}
                   for w in workloads}
        assert _summary(results, workloads, intercepts=True)["write_ns"] == shown
        assert _summary(results, workloads, intercepts=False)["write_ns"] is None


@pytest.mark.parametrize("argv, message", [
    (["--size", "1M"], "at least 1000 pages"),
    (["--size", "lots"], "not a size"),
    (["--methods", "shadow,psychic"], "unknown method(s) psychic"),
    (["--methods", ","], "unknown method(s) (none)"),
])
def test_bench_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""
    assert err.startswith("usage: pagescan bench") and message in err


class _Forgetful(_tracking.ShadowTracker):
    """Reports one page fewer than were written."""

    def get_reset(self) -> np.ndarray:
        return super().get_reset()[1:]


def test_measure_catches_a_method_that_misreports() -> None:
    (wl,) = _tracking.big_workloads(4 << 20, 1, percents=[1.0])
    with _tracking.Region(wl.npages) as region:
        with _tracking.ShadowTracker(region) as good:
            r = _tracking.measure(good, region, wl, seed=1, index=0)
            assert r["writes"] == wl.params["written"] and len(r["samples"]["get_ns"]) == 1
        with _Forgetful(region) as bad, pytest.raises(AssertionError, match="reported 9 pages, 10 written"):
            _tracking.measure(bad, region, wl, seed=1, index=0)


@pytest.mark.parametrize("method", [m for m in _tracking.METHODS])
def test_every_method_reports_exactly_the_written_pages(method: str) -> None:
    why = _tracking.skip_reason(method)
    if why:
        pytest.skip(f"{method}: {why}")
    workloads = _tracking.big_workloads(4 << 20, 2)
    res = _tracking.run([method], workloads)  # measure() raises on a wrong page set
    assert set(res["results"][method]) == {w.key for w in workloads}
    if method == "uffd-sync":
        counters = [r["counters"] for r in res["results"][method].values()]
        assert sum(c["handler_faults"] for c in counters) >= sum(w.params["written"] for w in workloads) * 2


def test_units() -> None:
    assert [parse_size(t) for t in ("4096", "64K", "1.5G", "256MiB", "2t")] == [
        4096, 64 << 10, 3 << 29, 256 << 20, 2 << 40]
    for bad in ("", "M", "-1M", "1X", "1e30"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    assert [fmt_size(n) for n in (1 << 30, 3 << 20, 4097, 64 << 40)] == ["1 GiB", "3 MiB", "4097 B", "64 TiB"]
    assert [fmt_ns(x) for x in (None, 7.4, 999, 1250, 37_100_000, 2.5e9)] == [
        "-", "7 ns", "999 ns", "1.25 us", "37.1 ms", "2.50 s"]


def test_research_harness_runs_over_the_same_code(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tracking.py"), "--quick", "--size", SMALL, "--rounds", "1",
         "--methods", "writewatch,shadow", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["config"]["size"] == 4 << 20
    assert {w["group"] for w in report["workloads"]} >= {"sweep-1", "wine", "big"}
    assert "target" in proc.stdout, "targets belong to the research harness"


def test_sync_tracker_whose_handler_is_killed_never_blocks_a_writer() -> None:
    """The uffd-sync method's handler killed from outside: the owner (which keeps the
    uffd, so the range stays registered) blocked for good in its next write, holding
    the GIL. Its guardian now unprotects the range, and the tracker says it failed."""
    import os
    import signal
    import time

    from .procs import children_of, run_in_child

    def owner() -> str:
        region = _tracking.Region(64)
        tr = _tracking.SyncUffdTracker(region)
        try:
            region.words[0] = 5  # served by the handler
            assert tr.handler is not None
            os.kill(tr.handler.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not tr.status[2] and time.monotonic() < deadline:
                time.sleep(0.01)
            region.words[8 * 512] = 5  # page 8, write-protected until the guardian ran
            try:
                tr.check()
            except RuntimeError as err:
                return str(err)
            return "no error"
        finally:
            tr.close()

    assert "handler process failed or was killed" in run_in_child(owner, timeout=30)
    assert not children_of()
