"""Python signal handlers and the garbage collector held back while a call runs a
window in which their code, run by this thread, could do harm (one place for it)."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["HeldSignals", "held_still", "no_gc"]


#: ``signal.getsignal`` without its conversion of the result to an enum (60 us for the
#: 64 signals, against 2 us): the C function it wraps.
_getsignal: Callable[[int], Any] = getattr(signal, "_signal", signal).getsignal


class HeldSignals:
    """Python signal handlers held back while a call runs in the main thread, the only
    one that runs them (whichever thread the kernel delivered the signal to: its C
    handler only marks it due). A handler due meanwhile would run at the next bytecode
    of the call: in a checkpoint's pause, in the one thread the instant does not stop
    (its writes could tear the generation, its exception, ``KeyboardInterrupt``, would
    break off the exchange with the helper in the middle); while a lazy restore or a
    :class:`~pagescan.FaultHandler` starts, a touch of a registered page would wait for
    a handler process that only this thread can start (a hang). So each Python-level
    handler is swapped for a recorder during the call, and :meth:`release` puts them
    back and runs what came meanwhile, in order. (``signal.signal`` re-installs the C
    handler without ``SA_RESTART``: a ``siginterrupt(sig, False)`` is undone, as by any
    ``signal.signal``.) Nested calls (a finalizer's checkpoint) hold nothing more."""

    #: The one holding the handlers now (main thread only; a child forked meanwhile
    #: puts them back).
    live: HeldSignals | None = None

    def __init__(self) -> None:
        self.saved: dict[int, Callable[..., Any]] = {}
        self.due: list[tuple[int, Any]] = []
        self.owner = False
        if HeldSignals.live is not None or threading.current_thread() is not threading.main_thread():
            return
        self.owner = True
        HeldSignals.live = self
        try:
            with contextlib.suppress(ValueError):  # (not the main interpreter)
                for sig in range(1, signal.NSIG):
                    handler = _getsignal(sig)
                    if callable(handler):
                        signal.signal(sig, self._record)
                        self.saved[sig] = handler
        except BaseException:
            # A handler not swapped yet ran meanwhile and raised: put back those that
            # were (and run what they recorded), then let its exception out.
            self.release()
            raise

    def _record(self, signum: int, frame: Any) -> None:
        self.due.append((signum, frame))

    def release(self) -> None:
        """Put the handlers back and run those that came due (idempotent); raises the
        first exception one of them raised, after running the others."""
        saved = self._put_back()
        first: BaseException | None = None
        while self.due:
            signum, frame = self.due.pop(0)
            try:
                saved[signum](signum, frame)
            except BaseException as err:  # noqa: BLE001 - raised once the others have run
                first = first or err
        if first is not None:
            raise first

    def _put_back(self) -> dict[int, Callable[..., Any]]:
        """Stop holding: the program's handlers back in place (idempotent); returns them."""
        if not self.owner:
            return {}
        self.owner = False
        HeldSignals.live = None
        saved, self.saved = self.saved, {}
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        return saved


#: ``no_gc`` blocks open in this process (any thread), and whether the collector was on
#: when the first one opened: it is process-wide, so the last block out turns it back on.
_gc_depth = [0]
_gc_was_on = [False]
_gc_lock = threading.RLock()  # reentrant: a signal handler may open a block inside one


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No garbage collection in this process inside the block (blocks nest and overlap
    across threads; the collector comes back on when the last one ends, if it was on)."""
    with _gc_lock:
        if _gc_depth[0] == 0:
            _gc_was_on[0] = gc.isenabled()
        _gc_depth[0] += 1
        gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth[0] -= 1
            if _gc_depth[0] == 0 and _gc_was_on[0]:
                gc.enable()


def _after_fork_in_child() -> None:
    """A child forked while another thread held the handlers, or the collector: the
    program's handlers back (what came due meanwhile is the parent's, not run here), and
    the collector as it was before the parent's blocks (the blocks are not the child's)."""
    global _gc_lock
    _gc_lock = threading.RLock()
    if _gc_depth[0]:
        _gc_depth[0] = 0
        if _gc_was_on[0]:
            gc.enable()
    held = HeldSignals.live
    if held is not None:
        held.due = []
        with contextlib.suppress(ValueError):  # (not the main thread of the main interpreter)
            held._put_back()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def held_still() -> Iterator[None]:
    """No Python signal handler and no garbage collection runs inside the block (both run
    after it, what came due first): their code could touch memory that only this thread
    can make readable again, or change it mid-operation. Nests."""
    held = HeldSignals()
    try:
        with no_gc():
            yield
    finally:
        held.release()
