"""Fuzz suite: every public entry point of pagescan with valid, edge and hostile input.

Issue 9. Arguments are drawn by Hypothesis from valid, edge and hostile values
(negative, huge, wider than 64 bits, floats/NaN/inf, bools, numpy scalars of every
dtype, ``IntFlag`` members, objects with only ``__index__``, strings, ``None``), buffer
objects of every kind (bytes, bytearray, memoryviews -- read-only, strided, reversed,
multi-dimensional, released --, mmaps including closed ones, numpy arrays of odd
shapes, dtypes and strides, ctypes arrays, ``array.array``), damaged and hostile
checkpoint files (byte flips, truncation, header fields with *valid* digests, a FIFO),
and processes that exit mid-call.

Each batch runs in a worker process (``python -m tests.fuzz.worker``), so a crash
(SIGSEGV, SIGABRT from a corrupted heap), a hang or an unbounded allocation is a test
failure that names the reproducing call, never a dead test runner. Per call the worker
checks: no crash, no hang (a SIGALRM watchdog, and the batch timeout as a backstop), an
exception of a documented type only (``OSError`` with an errno; ``TypeError`` /
``ValueError`` for bad Python arguments, naming the argument; never ``AttributeError``,
``struct.error``, ``ctypes.ArgumentError``, ``OverflowError``, ``BufferError``,
``MemoryError``, ...), bad arguments refused, and the result equal to an oracle: the raw
``PAGEMAP_SCAN`` ioctl (``tests.test_kernel_quirks.raw_scan``), the other scan backend
(kernel against emulated: same regions, same exception type and errno), the buffer
protocol itself (``PyObject_GetBuffer``), or the memory (WriteWatch against the pages
written, move_pages and restore against the bytes).

Profiles:

* short (default): part of the normal suite, one batch per family (12 tests, about
  25 s on two cores); fixed seeds, so a run is repeatable.
* long: ``python -m pytest --fuzz-long tests/fuzz`` runs 65 batches (one test each,
  each well under pytest's 120 s ``faulthandler_timeout``) and more than 100,000 calls:
  every batch asserts its share (``BUDGET`` in ``test_fuzz.py``). About 30 min on two
  cores. Seeds vary per run; ``PAGESCAN_FUZZ_SEED=N`` repeats one (batch ``i`` uses
  ``N + i``; a failure prints the value to use). Run it before every release: the
  release criterion (issue 9) is 0 findings -- 0 crashes, 0 hangs, 0 wrong exception
  types, 0 results differing from an oracle.

A finding names the reproducing call (for a crash or a hang: the call the worker was
in, and the steps of its example so far) and is one of: ``crash``, ``hang``, ``slow``,
``wrong-exception``, ``accepted-invalid`` (bad arguments not refused),
``refused-valid``, ``unnamed-argument`` (a TypeError/ValueError whose message names
none of the bad arguments), ``bare-errno`` (CLI error that is only the errno's text),
``oracle-mismatch``, ``backend-mismatch``, ``heap-overflow`` (the kernel wrote outside
``out``), ``registration-leak``, ``undetected-corruption``.

Known defects: the default is strict -- every finding fails its test. While defects
of issue 9 are still open, ``--fuzz-known-defects=xfail`` (or the environment variable
``PAGESCAN_FUZZ_KNOWN_DEFECTS=xfail``) turns a test whose findings are *all* instances
of :data:`KNOWN_DEFECTS` into an xfail that still lists them; any other finding fails.
Once the fixes are merged, entries are removed from :data:`KNOWN_DEFECTS` (empty it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Finding = dict[str, Any]


def _call(f: Finding) -> str:
    return str(f.get("call", ""))


#: Issue-9 defect id (or ``N<k>``: found by this suite, not listed in issue 9) -> a
#: predicate recognising a finding as an instance of it. Honoured only with
#: ``--fuzz-known-defects=xfail``; emptied once the fixes are merged.
KNOWN_DEFECTS: dict[str, Callable[[Finding], bool]] = {
    # 1: scan(out=) accepts a 2-D/empty-row out; the kernel writes past it.
    "1": lambda f: f["family"] == "out" and f["kind"] in ("heap-overflow", "crash", "accepted-invalid", "oracle-mismatch",
                                                         "refused-valid"),
    # 2: scan() from a signal handler / progress= / __del__ reuses per-thread buffers.
    "2": lambda f: f["family"] == "reentrancy",
    # 3: an IntFlag operand folds the OR range check: negative or > 64-bit values get
    #    through (struct.error / OverflowError on the kernel backend, EFAULT or a result
    #    on the emulated one).
    "3": lambda f: _call(f).startswith("pagescan.scan") and ("Category" in _call(f) or "Flag" in _call(f)) and (
        f["kind"] == "accepted-invalid"
        or (f["kind"] == "wrong-exception" and f.get("exc_type") in ("error", "OverflowError", "OSError"))),
    # 4: a large vec_len allocates the whole range's worth of regions.
    "4": lambda f: "MemoryError" in (str(f.get("exc_type")) + f.get("detail", "")) and "vec_len" in _call(f),
    # 5: emulated backend, process exiting mid-call: EFAULT "short pagemap read".
    "5": lambda f: f["family"] == "pid_exit" and f.get("errno") == 14 and "emulated" in _call(f),
    # 6: a numpy scalar (or 0-d array) without an end is taken as a buffer: its own
    #    memory is scanned or watched.
    "6": lambda f: f["kind"] in ("accepted-invalid", "wrong-exception") and bool(
        re.match(r"pagescan\.(scan|scan_iter|WriteWatch|buffer_range)\(np\.\w+\([^()]*\)(, None|\))", _call(f))
        or re.match(r"pagescan\.(scan|scan_iter|WriteWatch|buffer_range)\(np\.(array|zeros)\(", _call(f))),
    # 7: WriteWatch.get/regions(max_pages=n) after a page was replaced returns pages.
    "7": lambda f: f["family"] == "writewatch" and "after a page" in (f.get("detail", "") + _call(f)),
    # 8: register()/unregister() validate after the syscall (a range left registered).
    "8": lambda f: f["kind"] == "registration-leak" or (
        f["family"] == "uffd" and _call(f).startswith(("uf.register(", "uf.unregister("))
        and f["kind"] == "refused-valid" and f.get("exc_type") == "TypeError"),
    # 9: checkpoint header values trusted: huge allocations, long runs.
    "9": lambda f: f["family"] in ("snapshot", "cli") and "fifo" not in _call(f).lower() and (
        f.get("exc_type") == "MemoryError" or f["kind"] in ("slow", "hang", "crash")
        or (f["kind"] == "undetected-corruption" and "(valid digest)" in _call(f))),
    # 10: a FIFO as checkpoint path blocks in open().
    "10": lambda f: f["family"] in ("snapshot", "cli") and f["kind"] == "hang" and "fifo" in _call(f).lower(),
    # 11: wrong exception types (read_events timeout/max_events, BufferError, out=[],
    #     restore(pid="x")) and messages not naming the argument.
    "11": lambda f: ("read_events" in _call(f)) or (_call(f).startswith("snapshot.restore(") and "pid=" in _call(f)
                                                    and "pid=None" not in _call(f) and "pid=os.getpid()" not in _call(f)) or f.get("exc_type") in ("BufferError", "ArgumentError")
    or ("out=" in _call(f) and (f.get("exc_type") == "AttributeError" or f["kind"] == "unnamed-argument")),
    # 12: errors that do not name the argument or the call.
    "12": lambda f: f["kind"] in ("bare-errno", "unnamed-argument") and f["family"] not in ("handler",)
    and not _call(f).startswith("pagescan.masks("),
    # Found by this suite, not listed in issue 9:
    # N1: FileSource(path) on a FIFO blocks forever in open() (as issue 9 item 10 does
    #     for checkpoint paths).
    "N1": lambda f: f["family"] == "handler" and f["kind"] == "hang" and "fifo" in _call(f),
    # N2: FileSource(path, base) does not validate base (None, negative, Fraction,
    #     > 64 bits accepted; OSError from open() before the bad base is noticed), and
    #     FileSource.read() raises OverflowError for an offset past 2**63.
    "N2": lambda f: "FileSource" in _call(f) and f["kind"] in ("accepted-invalid", "wrong-exception"),
    # N3: FaultHandler(regions) accepts a length of 2**64 and refuses None/ints/strings
    #     with messages that do not name the argument.
    "N3": lambda f: "FaultHandler(" in _call(f) and f["kind"] in ("accepted-invalid", "unnamed-argument"),
    # N4: masks() converts with int(): floats, strings, negative and > 64-bit values pass.
    "N4": lambda f: _call(f).startswith("pagescan.masks(") and f["kind"] in ("accepted-invalid", "unnamed-argument",
                                                                             "wrong-exception"),
    # N5: move_pages validation order: uffd= is not validated (AttributeError for a
    #     non-Userfaultfd), and the alignment EINVAL comes before ValueError for values of
    #     64 bits or more and before a bad uffd.
    "N5": lambda f: _call(f).startswith("pagescan.move_pages(") and (
        "uffd=" in _call(f) or (f["kind"] == "wrong-exception" and "page aligned" in f.get("message", ""))),
    # N6: Userfaultfd.from_fd(fd) does not validate fd: a str, float, None or -1 is
    #     adopted (the object's repr and close() then raise TypeError).
    "N6": lambda f: "Userfaultfd.from_fd(" in _call(f) and f["kind"] in ("accepted-invalid", "crash"),
}
