"""Parent side of the fuzz harness: run a family's batches in worker processes.

A worker that dies (a signal: SIGSEGV, SIGABRT from a corrupted heap), exits with an
error, or outlives the batch timeout becomes a finding carrying the last call it
logged; the batch then resumes in a fresh worker with a new seed until the example
budget is spent (at most ``MAX_RESTARTS`` times).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Any

from . import KNOWN_DEFECTS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_RESTARTS = 4


@dataclasses.dataclass
class Report:
    family: str
    calls: int = 0
    examples: int = 0
    workers: int = 0
    findings: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def run_family(family: str, examples: int, seed: int, timeout: float) -> Report:
    rep = Report(family)
    left = examples
    for attempt in range(MAX_RESTARTS + 1):
        if left <= 0:
            break
        rep.workers += 1
        done, ran = _run_worker(rep, family, seed + 7919 * attempt, left, timeout)
        left -= max(ran, 1)
        if done:
            break
    return rep


def _run_worker(rep: Report, family: str, seed: int, examples: int, timeout: float) -> tuple[bool, int]:
    fd, log = tempfile.mkstemp(prefix=f"pagescan-fuzz-{family}-", suffix=".jsonl")
    os.close(fd)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzz.worker", family, str(seed), str(examples), log],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        hung = False
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # handler processes the worker forked
        calls, ran, last, done = 0, 0, "", False
        steps: list[str] = []  # calls and notes of the current example
        with open(log, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the death of the worker
                if "c" in rec:
                    calls += 1
                    last = rec["c"]
                    steps.append(last)
                elif "n" in rec:
                    steps.append(f"({rec['n']})")
                elif "e" in rec:
                    ran += 1
                    steps = []
                elif "f" in rec:
                    rep.findings.append(rec["f"])
                elif "done" in rec:
                    done = True
                    calls = rec["done"]
        rep.calls += calls
        rep.examples += ran
        tail = err.decode(errors="replace")[-1500:]
        example = " ; ".join(steps[-8:])
        rc = proc.returncode
        if hung:
            rep.findings.append({"family": family, "kind": "hang", "call": last,
                                 "detail": f"worker still running after {timeout:.0f} s (killed); seed {seed}; "
                                           f"the example so far: {example}",
                                 "stderr": tail})
        elif rc != 0 or not done:
            what = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            rep.findings.append({"family": family, "kind": "crash", "call": last,
                                 "detail": f"worker {what}{' after its last call' if done else ''}; seed {seed}; "
                                           f"the example so far: {example}",
                                 "stderr": tail})
        return done and rc == 0 and not hung, ran
    finally:
        with contextlib.suppress(OSError):
            os.unlink(log)


def known_defect(finding: dict[str, Any]) -> str | None:
    """The id of the issue-9 defect a finding is an instance of, if any."""
    for ident, pred in KNOWN_DEFECTS.items():
        try:
            if pred(finding):
                return ident
        except Exception:  # noqa: BLE001 - a predicate on a finding of another shape
            continue
    return None


def summary(findings: list[dict[str, Any]], limit: int = 3) -> str:
    """Findings grouped by kind and exception, with the first reproducing calls."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for f in findings:
        key = (f.get("known") or "-", f["kind"], f.get("exc_type") or "")
        groups.setdefault(key, []).append(f)
    lines = []
    for (known, kind, exc), fs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        tag = "NEW" if known == "-" else (f"known {known}" if known.startswith("N") else f"issue 9 item {known}")
        lines.append(f"{len(fs)} x {kind}{' ' + exc if exc else ''} [{tag}]")
        for f in fs[:limit]:
            lines.append(f"    call:   {f['call'][:400]}")
            detail = f.get("message") or f.get("detail") or ""
            lines.append(f"    result: {detail[:600]}")
            if f.get("stderr"):
                lines.append("    stderr: " + f["stderr"].strip().replace("\n", "\n            ")[-600:])
    return "\n".join(lines)


def counts(findings: list[dict[str, Any]]) -> Counter[str]:
    return Counter(f["kind"] for f in findings)
