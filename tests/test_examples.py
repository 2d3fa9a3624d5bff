"""Every program in examples/ runs as a user would run it (a fresh interpreter) and
prints what its docstring promises. Each takes a second or two."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import requires_pagemap_scan, requires_uffd_move, requires_wp_async

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(name: str, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)
    if check and proc.returncode:
        pytest.fail(f"{name} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_every_example_is_tested() -> None:
    tested = {"written_pages.py", "checkpoint_training.py", "lazy_load.py", "swapped_heap.py",
              "move_buffers.py", "serve_faults.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@requires_wp_async
def test_written_pages() -> None:
    out = run("written_pages.py").stdout
    # rows 3, 500, 1000 of 8 KiB each: pages 2*row and 2*row + 1, nothing else
    assert "pages written: [6, 7, 1000, 1001, 2000, 2001]" in out
    assert "rows written: [3, 500, 1000]" in out


@requires_wp_async
def test_checkpoint_training_resumes_after_a_crash(tmp_path: Path) -> None:
    whole = run("checkpoint_training.py", str(tmp_path / "a")).stdout
    crashed = run("checkpoint_training.py", str(tmp_path / "b"), "--crash-at", "13", check=False)
    assert crashed.returncode == 1 and "crashing at step 13" in crashed.stdout
    resumed = run("checkpoint_training.py", str(tmp_path / "b")).stdout
    assert "resumed at step 10" in resumed  # the newest complete checkpoint
    digest = re.compile(r"done at step 20, weights ([0-9a-f]{16})")
    a, b = digest.search(whole), digest.search(resumed)
    assert a and b and a.group(1) == b.group(1)
    assert "checkpoint 2, incremental" in whole


@requires_wp_async
def test_lazy_load() -> None:
    out = run("lazy_load.py", "--mib", "32").stdout
    assert re.search(r"32 MiB: eager load \d+ ms; lazy load returned after [\d.]+ ms", out), out


@requires_pagemap_scan
def test_swapped_heap_of_another_process(zram_swap: str) -> None:
    out = run("swapped_heap.py", "--demo").stdout
    m = re.search(r"pid (\d+): heap 0x[0-9a-f]+-0x[0-9a-f]+, (\d+) KiB; (\d+) pages swapped out", out)
    assert m, out
    assert int(m.group(1)) != os.getpid()
    # the child paged out 16 MiB of malloc'ed objects
    assert int(m.group(3)) >= (16 << 20) // os.sysconf("SC_PAGE_SIZE") * 3 // 4, out


@requires_pagemap_scan
def test_swapped_heap_of_this_test(zram_swap: str) -> None:
    out = run("swapped_heap.py", str(os.getpid())).stdout
    assert f"pid {os.getpid()}: heap" in out


@requires_uffd_move
def test_move_buffers() -> None:
    out = run("move_buffers.py").stdout
    assert "moved 16 MiB, copied 0 MiB" in out
    assert "source pages still present: 0" in out
    assert "source reads zeros: True" in out


def test_serve_faults() -> None:
    out = run("serve_faults.py").stdout
    assert "8192/8192 pages served" in out
    assert "buffer equals the file" in out
