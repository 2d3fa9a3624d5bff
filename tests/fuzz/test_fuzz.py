"""The fuzz families, one test each, every batch in a worker process (see the package
docstring for profiles, oracles and the known-defects switch)."""

from __future__ import annotations

import os
import random

import pytest

from .harness import Report, known_defect, run_family, summary

#: family -> (short examples, long examples, long minimum calls, batch timeout in s)
BUDGET = {
    "scan": (200, 20000, 40000, 900),
    "buffers": (120, 8000, 8000, 600),
    "out": (80, 5000, 5000, 600),
    "uffd": (60, 5000, 12000, 900),
    "parse": (100, 6000, 6000, 300),
    "writewatch": (50, 3000, 5000, 900),
    "move": (60, 3000, 3000, 600),
    "handler": (25, 600, 600, 900),
    "snapshot": (40, 1500, 1500, 1200),
    "cli": (40, 1500, 1500, 900),
    "pid_exit": (30, 300, 3000, 600),
    "reentrancy": (3, 60, 20000, 600),
}
SHORT_TIMEOUT = 60.0


def _seed(family: str, long: bool) -> int:
    env = os.environ.get("PAGESCAN_FUZZ_SEED")
    if env:
        return int(env)
    return random.randrange(1 << 30) if long else 1000 + sorted(BUDGET).index(family)


@pytest.mark.parametrize("family", sorted(BUDGET))
def test_fuzz(family: str, request: pytest.FixtureRequest) -> None:
    long = bool(request.config.getoption("--fuzz-long"))
    mode = request.config.getoption("--fuzz-known-defects") or os.environ.get("PAGESCAN_FUZZ_KNOWN_DEFECTS", "fail")
    short_n, long_n, long_calls, long_timeout = BUDGET[family]
    seed = _seed(family, long)
    rep: Report = run_family(family, long_n if long else short_n, seed, long_timeout if long else SHORT_TIMEOUT)
    for f in rep.findings:
        f["known"] = known_defect(f)
    head = (f"fuzz family {family!r}: {rep.calls} calls, {rep.examples} examples, {rep.workers} worker(s), "
            f"seed {seed} (PAGESCAN_FUZZ_SEED={seed} reproduces), {len(rep.findings)} finding(s)")
    if rep.findings:
        text = head + "\n" + summary(rep.findings)
        if mode == "xfail" and all(f["known"] for f in rep.findings):
            pytest.xfail(text)
        pytest.fail(text, pytrace=False)
    assert rep.examples > 0, head
    if long:
        assert rep.calls >= long_calls, head + f"; the long profile needs at least {long_calls} calls here"
