"""What the scripts in benchmarks/ share: option types, formatting, tables, JSON, timing.

Imported as ``_common`` (each script runs with benchmarks/ first on ``sys.path``). Size
parsing and size/time formatting come from the installed package (``pagescan._units``),
which ``pagescan bench`` uses too.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import mmap
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import pagescan
from pagescan._units import fmt_ns, fmt_size, parse_size

__all__ = ["PAGE", "alternating_rounds", "fmt_ns", "fmt_size", "gc_paused", "machine", "median",
           "positive_int", "print_table", "size_arg", "timed", "write_json"]

PAGE = mmap.PAGESIZE


# -- options --------------------------------------------------------------------------------


def size_arg(minimum: int = PAGE, why: str = "") -> Callable[[str], int]:
    """An argparse type: a size (``4096``, ``64K``, ``1G``) rounded down to whole pages,
    at least ``minimum`` bytes (``why`` says why, in the error)."""

    def parse(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        value -= value % PAGE
        if value < minimum:
            raise argparse.ArgumentTypeError(f"size must be at least {fmt_size(minimum)}{why}")
        return value

    return parse


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


# -- timing -----------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float | None:
    """The median, ``None`` for no samples."""
    return statistics.median(xs) if xs else None


def timed(fn: Callable[[], Any]) -> int:
    """Wall-clock ns of one call."""
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def alternating_rounds(contenders: dict[str, Callable[[], Any]], repeat: int,
                       shuffle_seed: int | None = None) -> dict[str, list[int]]:
    """One warm-up call each, then ``repeat`` rounds in which every contender runs once,
    in a rotating order (so they share the machine's noise): ns per call, per contender.

    A rotation keeps the cyclic order, so each contender always runs right after the
    same other one; where one leaves the machine in a state that changes the next one's
    time (a command that reads every process's smaps evicts what the next reader of
    /proc would find cached), ``shuffle_seed`` gives every round its own random order
    instead (seeded: the same orders on every run)."""
    names = list(contenders)
    samples: dict[str, list[int]] = {n: [] for n in names}
    rng = None if shuffle_seed is None else random.Random(shuffle_seed)
    for name in names:
        contenders[name]()
    for r in range(repeat):
        if rng is None:
            k = r % len(names)
            order = names[k:] + names[:k]
        else:
            order = rng.sample(names, len(names))
        for name in order:
            samples[name].append(timed(contenders[name]))
    return samples


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The garbage collector off (as ``timeit`` does), restored afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# -- reporting --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where the figures come from: kernel, CPU count, versions, THP mode."""
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pagescan": pagescan.__version__,
        "thp_mode": pagescan.capabilities().thp_mode,
    }


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: str = "<>") -> None:
    """Columns padded to their widest cell; ``align`` has one ``<`` (left) or ``>``
    (right) per column, the last one repeated for the columns after it."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    align = align + align[-1] * (len(head) - len(align))
    for row in [head, *rows]:
        cells = [c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        print("  ".join(cells).rstrip())


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (a temporary file, renamed)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


# -- the C references (scan_ref.c, track_ref.c) ----------------------------------------------


def find_compiler(explicit: str | None = None) -> list[str] | None:
    """``explicit``, else ``$CC``, else the first of cc, gcc, clang on PATH; None if none runs."""
    for command in (explicit, os.environ.get("CC")):
        if command:
            words = shlex.split(command)
            return words if words and shutil.which(words[0]) else None
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def compile_c(compiler: list[str], source: Path, binary: Path, *flags: str) -> Path:
    """``compiler -O2 -Wall -Wextra FLAGS -o binary source``; exits with the compiler's
    message if it fails."""
    cmd = [*compiler, "-O2", "-Wall", "-Wextra", *flags, "-o", str(binary), str(source)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compiling the C reference failed:\n$ {shlex.join(cmd)}\n{proc.stderr}")
    return binary
