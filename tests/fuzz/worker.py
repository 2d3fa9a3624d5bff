"""``python -m tests.fuzz.worker FAMILY SEED EXAMPLES LOG``: run one fuzz batch.

Runs ``EXAMPLES`` Hypothesis examples of one family (seeded, no shrinking: a finding is
recorded and the batch goes on) and appends JSON lines to ``LOG``: ``{"c": call}``
before every call, ``{"f": finding}`` for each finding, ``{"done": calls}`` at the end.
The parent reads the log after the worker exits, is killed on timeout, or dies: the
last ``c`` line of a worker that never wrote ``done`` is the call that killed or hung it.

Address space is capped (``RLIMIT_AS``) so that an unbounded allocation is a
``MemoryError`` finding, not a machine swapping.
"""

from __future__ import annotations

import faulthandler
import os
import resource
import shutil
import sys

AS_LIMIT = 6 << 30


def main(argv: list[str]) -> int:
    family, seed, examples, log = argv[0], int(argv[1]), int(argv[2]), argv[3]
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    faulthandler.enable()
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st
    from hypothesis.errors import Flaky, FlakyStrategyDefinition

    from .core import Ctx
    from .families import FAMILIES, Env

    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    ctx = Ctx(family, fd)
    env = Env(seed)
    fn = FAMILIES[family]

    ran = 0

    def one(data: object) -> None:
        nonlocal ran
        ran += 1
        ctx.log({"e": 1})
        fn(ctx, data, env)

    try:
        # Hypothesis stops early once a small search space is exhausted: go on with
        # further seeds until the batch has run its examples.
        for round_ in range(50):
            before = ran
            run = hseed(seed + round_)(settings(
                max_examples=examples - ran, database=None, deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck), derandomize=False, report_multiple_bugs=False,
            )(given(data=st.data())(one)))
            try:
                run()
            except (FlakyStrategyDefinition, Flaky):
                # The same choices drew differently (the family's draws followed the
                # outcome of a call, e.g. one made only once per worker). Hypothesis is
                # only the generator here: go on with the next seed.
                ctx.log({"n": "hypothesis: inconsistent data generation; next seed"})
            if ran >= examples or ran == before:
                break
    finally:
        shutil.rmtree(env.tmp, ignore_errors=True)
    ctx.log({"done": ctx.calls})
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
