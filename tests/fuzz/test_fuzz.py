"""The fuzz families, one test per batch, every batch in a worker process (see the
package docstring for profiles, oracles and the known-defects switch)."""

from __future__ import annotations

import os
import random
from typing import NamedTuple

import pytest

from .harness import Report, known_defect, run_family, summary


class Budget(NamedTuple):
    short: int  # examples in the short profile (one batch)
    long: int  # examples per batch in the long profile
    batches: int  # batches in the long profile (each a test, well under 120 s)
    calls: int  # calls each long batch must at least make (>= 100,000 in total)


BUDGET = {
    "buffers": Budget(120, 2000, 4, 1900),
    "cli": Budget(40, 300, 5, 280),
    "handler": Budget(25, 260, 3, 450),  # about 2.2 calls an example: margin over the floor
    "move": Budget(60, 1000, 3, 950),
    "out": Budget(80, 1000, 5, 950),
    "parse": Budget(100, 2000, 3, 1900),
    "pid_exit": Budget(30, 100, 3, 150),
    "reentrancy": Budget(3, 30, 2, 10000),
    "scan": Budget(200, 2000, 24, 2000),
    "snapshot": Budget(60, 300, 5, 280),
    "uffd": Budget(120, 1500, 5, 1500),
    "writewatch": Budget(100, 1000, 3, 2000),
}
#: Kill a worker batch after this long (a hang no watchdog could interrupt).
TIMEOUT = {False: 60.0, True: 300.0}
LONG_CALLS = sum(b.batches * b.calls for b in BUDGET.values())
assert LONG_CALLS >= 100_000


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "batch" in metafunc.fixturenames:
        long = bool(metafunc.config.getoption("--fuzz-long"))
        cases = [(f, i) for f in sorted(BUDGET) for i in range(BUDGET[f].batches if long else 1)]
        metafunc.parametrize(("family", "batch"), cases, ids=[f"{f}-{i}" if long else f for f, i in cases])


def _seed(family: str, batch: int, long: bool) -> int:
    env = os.environ.get("PAGESCAN_FUZZ_SEED")
    if env:
        return int(env) + batch
    if long:
        return random.randrange(1 << 30)
    return 1000 + sorted(BUDGET).index(family)


def test_fuzz(family: str, batch: int, request: pytest.FixtureRequest) -> None:
    long = bool(request.config.getoption("--fuzz-long"))
    mode = request.config.getoption("--fuzz-known-defects") or os.environ.get("PAGESCAN_FUZZ_KNOWN_DEFECTS", "fail")
    b = BUDGET[family]
    seed = _seed(family, batch, long)
    rep: Report = run_family(family, b.long if long else b.short, seed, TIMEOUT[long])
    for f in rep.findings:
        f["known"] = known_defect(f)
    head = (f"fuzz family {family!r} batch {batch}: {rep.calls} calls, {rep.examples} examples, {rep.workers} "
            f"worker(s), seed {seed} (PAGESCAN_FUZZ_SEED={seed - batch} reproduces), {len(rep.findings)} finding(s)")
    if rep.findings:
        text = head + "\n" + summary(rep.findings)
        if mode == "xfail" and all(f["known"] for f in rep.findings):
            pytest.xfail(text)
        pytest.fail(text, pytrace=False)
    assert rep.examples > 0, head
    if long:
        assert rep.calls >= b.calls, head + f"; a long batch must make at least {b.calls} calls"
