"""The GIL switch interval, lowered while pagescan's bulk work runs (one place for it)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quick_gil"]

_lock = threading.RLock()  # reentrant: a signal handler may nest a use in the same thread
#: Uses in progress, per thread (a signal handler's nest in the thread it interrupted).
_depth: dict[int, int] = {}
#: The program's interval, saved by the first use in.
_saved = [0.0]


@contextmanager
def quick_gil() -> Iterator[None]:
    """The GIL switch interval lowered to 0.1 ms (restored after).

    A checkpoint's pause and each batch of its write, a load, a restore, make system
    calls and numpy calls that release the GIL; a thread that holds it meanwhile (a
    busy Python loop) would otherwise keep it for a whole interval (5 ms by default)
    each time. Measured with such a loop running, 1 GiB with 10% written: a
    synchronous checkpoint took 1.4-1.9 s, 0.56 s with the interval lowered around
    each batch; ``load`` of it 45.6 s (3.1 s with no loop running), ``restore`` 44.7 s
    (0.6 s). The loop's own progress goes on at the usual switch points, more often.

    Uses may overlap (threads, a signal handler): the first one in saves the program's
    interval and the last one out restores it. The count goes up before the interval
    is saved and down after it is restored, so a use nested by a signal handler at any
    point neither saves the lowered value nor restores early. A child forked meanwhile
    keeps only its own thread's uses (the others' threads are not in it)."""
    me = threading.get_ident()
    with _lock:
        _depth[me] = _depth.get(me, 0) + 1
        if sum(_depth.values()) == 1:
            _saved[0] = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved[0], 1e-4))
    try:
        yield
    finally:
        with _lock:
            if sum(_depth.values()) == 1:
                sys.setswitchinterval(_saved[0])
            left = _depth[me] - 1
            if left:
                _depth[me] = left
            else:
                del _depth[me]


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # another thread may have held it at the fork
    me = threading.get_ident()
    mine = _depth.get(me, 0)
    others = sum(_depth.values()) - mine
    _depth.clear()
    if mine:
        _depth[me] = mine  # its uses end in this process too
    elif others:
        sys.setswitchinterval(_saved[0])  # lowered by threads the child does not have


os.register_at_fork(after_in_child=_after_fork_in_child)
