"""Checkpoint files that are damaged, forged or changing underfoot (review of 2026-12-03).

Each test builds a real file with the public API, damages or forges it the way a crash,
a racing writer or a hostile author would, and checks that every reader answers with a
clear error -- never another exception type, never a destroyed sealed generation, never
memory out of proportion to the state, never control characters on the terminal.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pagescan.snapshot import Checkpointer, CheckpointError, CorruptCheckpointError, inspect, load, verify
from pagescan.snapshot import _format as fmt
from pagescan.snapshot._store import Store


def _three_generations(path: Path) -> dict[str, np.ndarray]:
    st = {"a": np.arange(4096, dtype=np.float64), "b": np.zeros(3000, np.uint8)}
    with Checkpointer(path, st) as ck:
        ck.checkpoint()
        for g in range(2):
            st["a"][g * 600] = -1.0 - g
            st["b"][g] = 7
            ck.checkpoint()
    return st


def _records(path: Path) -> list[tuple[int, int]]:
    """(offset, end) of each sealed record."""
    with Store(path) as st:
        return [(g.offset, g.end) for g in st.generations] + [(s.offset, s.end) for s in st.sections]


def test_a_damaged_record_followed_by_sealed_ones_and_a_torn_tail_is_never_cut(tmp_path: Path) -> None:
    """One flipped bit in generation 2's header plus the partial tail of a writer that
    died: the walk stops at generation 2 and the file does not end sealed, so it looked
    like a torn tail -- and the next writer cut generations 2 and 3 (sealed, intact)
    away. Now: refused by the writer and by ``verify``, the file unchanged."""
    path = tmp_path / "c.ck"
    _three_generations(path)
    (_o1, _e1), (o2, _e2), _ = sorted(_records(path))[:3]
    data = bytearray(path.read_bytes())
    data[o2 + 17] ^= 1  # generation 2's npages
    data += bytes(64 + 32 * 3) + os.urandom(4096)  # generation 4, never sealed
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="a sealed record follows it"):
        verify(path)
    with pytest.raises(CorruptCheckpointError, match="a sealed record follows it"):
        Checkpointer(path, {"a": np.zeros(4096), "b": np.zeros(3000, np.uint8)})
    assert path.read_bytes() == bytes(data), "nothing was cut"


def test_a_torn_tail_alone_is_still_cut(tmp_path: Path) -> None:
    """The check above does not take a real torn tail for damage."""
    path = tmp_path / "t.ck"
    st = _three_generations(path)
    good = path.read_bytes()
    path.write_bytes(good + bytes(64 + 32 * 3) + os.urandom(8192))
    assert [g.number for g in verify(path)] == [1, 2, 3]
    with Checkpointer(path, st):
        pass
    assert path.read_bytes() == good


def _with_working_set(path: Path) -> None:
    """Make the file end with a section: a recording lazy restore saves one."""
    import pagescan
    from pagescan.snapshot import lazy_restore

    target = {"a": pagescan.zeros(4096, np.float64), "b": pagescan.zeros(3000, np.uint8)}
    with lazy_restore(path, target, record=True):
        _ = float(target["a"][1000])
    assert _records(path)[-1][1] == path.stat().st_size and len(_records(path)) == 4


@pytest.mark.parametrize("last", ["generation", "section"])
def test_a_damaged_commit_record_at_the_end_is_damage_not_a_tail(tmp_path: Path, last: str) -> None:
    """Every single-bit flip of the commit record that ends the file: the record before
    it is complete, so this is damage, not a writer that died while sealing (before:
    the newest generation silently vanished for every reader, and the next writer cut
    it away). What such a writer does leave -- zeros where the record goes, or a part
    of it written and the rest zeros -- is still a torn tail."""
    path = tmp_path / "c.ck"
    st = _three_generations(path)
    if last == "section":
        _with_working_set(path)
    good = path.read_bytes()
    rec = len(good) - 64
    for bit in range(0, 64 * 8, 7):  # a spread of bits over every field
        data = bytearray(good)
        data[rec + bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match="its commit record, at the end of the file, is damaged"):
            verify(path)
        if last == "generation":
            with pytest.raises(CorruptCheckpointError, match="commit record"):
                load(path)
        with pytest.raises(CorruptCheckpointError, match="commit record"):
            Checkpointer(path, st).close()
        assert path.read_bytes() == bytes(data), f"bit {bit}: the file was changed"
    for torn in (bytes(64), good[rec : rec + 20] + bytes(44), bytes(40) + good[rec + 40 :]):
        path.write_bytes(good[:rec] + torn)
        assert [g.number for g in verify(path)] == ([1, 2, 3] if last == "section" else [1, 2]), torn.hex()


def _cut_and_regrow(path: str, sealed: int, tail: bytes, stop: multiprocessing.synchronize.Event) -> None:
    fd = os.open(path, os.O_RDWR)
    while not stop.is_set():
        os.ftruncate(fd, sealed)  # what a writer's abort does
        os.pwrite(fd, tail, sealed)  # and the next writer's unsealed generation
    os.close(fd)


def test_readers_racing_a_writer_that_cuts_its_tail(tmp_path: Path) -> None:
    """A file shrinking between a reader's ``fstat`` and its reads: only the library's
    errors or a good answer (``struct.error`` escaped before: a commit record read short)."""
    path = tmp_path / "r.ck"
    _three_generations(path)
    raw = path.read_bytes()
    last = sorted(_records(path))[-1]
    sealed, tail = raw[: last[0]], bytearray(raw[last[0] : last[1]])
    tail[-fmt.COMMIT.size :] = bytes(fmt.COMMIT.size)  # its commit record not written yet
    path.write_bytes(sealed + bytes(tail))
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    proc = ctx.Process(target=_cut_and_regrow, args=(str(path), len(sealed), bytes(tail), stop))
    proc.start()
    answers = 0
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for call in (inspect, verify, load):
                try:
                    call(path)
                except CheckpointError:
                    pass
                answers += 1
    finally:
        stop.set()
        proc.join(10)
    assert proc.exitcode == 0 and answers > 100


def test_a_working_set_section_longer_than_the_state_allows_is_refused_unread(tmp_path: Path) -> None:
    """A sealed working-set section whose payload is a 256 MiB hole (a few KiB on disk):
    a valid record names each chunk at most once, so more than 8 bytes a chunk is damage,
    refused before it is read; ``verify`` reads unknown sections a MiB at a time."""
    path = tmp_path / "w.ck"
    _three_generations(path)
    size = path.stat().st_size
    n = 256 << 20
    for typ in (fmt.SECTION_WORKING_SET, 99):
        head = fmt.SECTION_HEADER.pack(fmt.MAGIC_SECTION, typ, 3, n, 0, 0, 0, b"\0" * 8)
        head = head[:-8] + fmt.digest(head[:-8])
        h = hashlib.blake2b(digest_size=8)
        zeros = bytes(1 << 24)
        for _ in range(n >> 24):
            h.update(zeros)
        rec = fmt.COMMIT.pack(fmt.MAGIC_COMMIT, 3, size, 64 + n, h.digest(), head[-8:], 0, b"\0" * 8)
        rec = rec[:-8] + fmt.digest(rec[:-8])
        with open(path, "r+b") as f:
            f.truncate(size)
            f.seek(size)
            f.write(head)
            f.truncate(size + 64 + n)  # the payload: a hole
            f.seek(size + 64 + n)
            f.write(rec)
        code = (
            "import sys\n"
            "from pagescan.snapshot import verify, load, CorruptCheckpointError\n"
            f"p = {str(path)!r}\n"
            "try:\n"
            "    verify(p); print('verified')\n"
            "except CorruptCheckpointError as e:\n"
            "    print('refused:', e)\n"
            "print([int(ln.split()[1]) >> 10 for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        lines = out.stdout.split("\n")
        assert out.returncode == 0, out.stderr
        if typ == fmt.SECTION_WORKING_SET:
            assert "more than its kind can hold" in lines[0], lines
        else:
            assert lines[0] == "verified", lines  # a valid (if odd) section of an unknown type
        assert int(lines[1]) < 150, f"peak RSS {lines[1]} MiB for a {n >> 20} MiB hole"  # (VmHWM: exec's own mm)


def test_a_sub_array_dtype_in_the_metadata_is_damage(tmp_path: Path) -> None:
    """An array's own dtype is never a sub-array dtype (numpy moves it into the shape):
    metadata naming one (shape ``[]``, dtype ``('<i4', (25,))``: 100 bytes, as the entry)
    is refused when the file is opened, not later by a ``reshape`` in ``load``."""
    good = fmt.encode_meta(True, [fmt.EntryMeta("x", 100, np.dtype(np.int32), (25,), True)])
    assert fmt.decode_meta(good, [100])[1][0].shape == (25,)
    forged = good.replace(b'"shape":[25]', b'"shape":[]').replace(
        repr(repr("<i4")).encode()[1:-1], repr(repr(("<i4", (25,)))).encode()[1:-1])
    assert forged != good
    with pytest.raises(ValueError, match="sub-array"):
        fmt.decode_meta(forged, [100])


def test_names_from_a_file_cannot_steer_the_terminal(tmp_path: Path) -> None:
    """Entry names are any ``str``: the CLI shows control characters and lone surrogates
    as ``?`` (they set the window title, erased lines, or failed to encode)."""
    path = tmp_path / "e.ck"
    name = "w\x1b]0;title\x07\x1b[2K\rfake\x1b[8mx"
    with Checkpointer(path, {name: np.zeros(8)}) as ck:
        ck.checkpoint()
    for cmd in (["checkpoint", "inspect", str(path)], ["checkpoint", "load", str(path)]):
        out = subprocess.run([sys.executable, "-m", "pagescan", *cmd], capture_output=True, timeout=60,
                             env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
        assert out.returncode == 0, out.stderr
        assert not set(out.stdout) & set(range(32)) - {10}, out.stdout
        assert b"w?]0;title??[2K?fake?[8mx" in out.stdout


def test_a_forged_last_record_costs_no_memory(tmp_path: Path) -> None:
    """A last record with a valid header digest but sizes of its own making (a 512 MiB
    table in a sparse file) and a commit record that is neither valid nor torn: before,
    the check that tells damage from a torn tail read the whole table in one piece
    (512 MiB allocated, 4.5 s); sizes that do not fit the header are refused first, and
    the table is read a MiB at a time."""
    import tracemalloc

    path = tmp_path / "forged.ck"
    with Checkpointer(path, {"a": np.zeros(4096, np.uint8)}) as ck:
        ck.checkpoint()
    off = path.stat().st_size
    table = 512 << 20
    head = fmt.GEN_HEADER.pack(fmt.MAGIC_GEN, 2, 0, 0, 1, 0, table, b"\0" * 8)
    head = head[:-8] + fmt.digest(head[:-8])
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(head)
        f.truncate(off + 64 + table)  # a hole: no disk
        f.seek(off + 64 + table)
        f.write(b"\x01" * 64)
    tracemalloc.start()
    try:
        with Store(path) as st:
            assert [g.number for g in st.generations] == [1] and st.damage is None  # (a torn tail)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
