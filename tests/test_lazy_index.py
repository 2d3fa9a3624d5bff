"""Version 4 checkpoints: the page index in blocks with a block table, read lazily.

A lazy load opens the file without reading the page index: it reads the block table
of each generation (one row per 1024 index entries) and, when a fault needs a chunk,
the one index block that can hold it (verified then). So damage in an index block or
in a data page is an error where it is used: the handler does not serve the page
(touching it raises SIGBUS), while the pages before it load. Eager readers (``verify``,
``restore``, ``inspect``, writers) still check every block at open. Version 3 and 2
files are still read.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pagescan
from pagescan._uapi.mman import MADV
from pagescan.snapshot import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpointError,
    compact,
    inspect,
    lazy_restore,
    load,
    restore,
    verify,
)
from pagescan.snapshot import _format as fmt
from pagescan.snapshot._store import Store

from .conftest import requires_thp, requires_wp_async
from .memory import Mapping, P, thp_size, vmflags
from .test_snapshot import Owner, _flip

pytestmark = requires_wp_async

NPAGES = 5000  # five index blocks in a full generation


def make(path: Path, seed: int = 1, steps: int = 2, per_step: int = 700) -> list[np.ndarray]:
    """A chain: a full generation of NPAGES random pages (some zero), then ``steps``
    incremental ones writing scattered pages. Returns the state after each generation."""
    rng = np.random.default_rng(seed)
    a = pagescan.empty((NPAGES, P), np.uint8)
    a[:] = rng.integers(0, 256, a.shape, dtype=np.uint8)
    a[100:150] = 0
    states = []
    with Checkpointer(path, {"a": a}) as ck:
        ck.checkpoint()
        states.append(a.copy())
        for _ in range(steps):
            pages = rng.choice(NPAGES, per_step, replace=False)
            a[pages, 5] ^= 0x5A
            a[pages[:50]] = 0
            ck.checkpoint()
            states.append(a.copy())
    return states


def entry_offset(path: Path, generation: int, position: int) -> int:
    """File offset of index entry ``position`` of ``generation``."""
    with Store(path) as st:
        g = st.generations[generation - 1]
        return g.offset + fmt.GEN_HEADER.size + position * fmt.ENTRY_SIZE


def data_offset(path: Path, chunk: int) -> int:
    """File offset of the newest data of ``chunk`` (a DATA chunk)."""
    with Store(path, lazy_index=True) as st:
        _gens, offs, _ = st.locate(len(st.generations), np.array([chunk]))
        assert offs[0] >= 0
        return int(offs[0])


def test_layout_block_table_and_lazy_lookups_match_the_index(tmp_path: Path) -> None:
    path = tmp_path / "c.ck"
    states = make(path)
    with Store(path) as st:
        assert st.version == fmt.VERSION == 4
        for g in st.generations:
            assert len(g.table) == fmt.nblocks(g.pages)
            flat = st.base[g.index["region"].astype(np.int64)] + g.index["page"].astype(np.int64)
            assert np.array_equal(g.table, fmt.block_table(g.index, flat))
            assert g.data_pages == int((g.index["kind"] == fmt.KIND_DATA).sum())
        eager = {n: st.latest_map(n) for n in range(1, len(st.generations) + 1)}
    rng = np.random.default_rng(2)
    with Store(path, lazy_index=True) as st:
        assert all(g._index is None for g in st.generations), "a lazy open reads no index"
        for n, (gen_of, _) in eager.items():
            chunks = np.unique(rng.integers(0, NPAGES, 300))
            gens, _offs, _ = st.locate(n, chunks)
            assert np.array_equal(gens, gen_of[chunks])
            rows = np.zeros((len(chunks), P), np.uint8)
            st.read_chunks(n, chunks, rows, fresh=True)
            assert np.array_equal(rows, states[n - 1][chunks])
        # Only the blocks used were read.
        assert 0 < len(st._blocks) <= sum(len(g.table) for g in st.generations)


def test_windows_over_several_generations_read_in_few_reads_are_exact(tmp_path: Path) -> None:
    """Consecutive chunks held by several generations (the prefetch's windows) are read
    with a few reads straight into place, gap pages included, then overwritten by the
    newer generations and zeroed where zero: exact for every generation, window and
    kind of destination; a damaged page among them is still named, and damage in a
    page a newer generation superseded (read as a gap, then overwritten) is harmless."""
    path = tmp_path / "c.ck"
    states = make(path, steps=3)
    rng = np.random.default_rng(5)
    spans = [(0, NPAGES), (0, 2048), (90, 1500), (2047, 2049), (4321, 600)]
    spans += [(int(a), int(n)) for a, n in zip(rng.integers(0, NPAGES - 64, 6), rng.integers(2, 64, 6))]
    preads = []
    real = os.preadv

    def counting(fd: int, bufs: list[memoryview], off: int) -> int:
        preads.append(off)
        return real(fd, bufs, off)

    with Store(path, lazy_index=True) as st:
        for n, want in enumerate(states, 1):
            for a, k in spans:
                chunks = np.arange(a, min(NPAGES, a + k), dtype=np.int64)
                for fresh in (True, False):
                    rows = np.zeros((len(chunks), P), np.uint8) if fresh else np.full((len(chunks), P), 0xA5, np.uint8)
                    preads.clear()
                    os.preadv = counting  # type: ignore[assignment]
                    try:
                        st.read_chunks(n, chunks, rows, fresh=fresh)
                    finally:
                        os.preadv = real
                    assert np.array_equal(rows, want[chunks]), (n, a, k, fresh)
                    if n == 4 and len(chunks) == NPAGES:
                        assert len(preads) < 60, f"{len(preads)} reads for the whole chain"  # one a run: ~4000
        gens, offs, _ = st.locate(4, np.arange(NPAGES, dtype=np.int64))
        newest = int(np.flatnonzero((gens == 3) & (offs >= 0))[10])  # data in generation 3, newest
    with Store(path) as st:
        g1 = st.generations[0]
        stale = int(np.flatnonzero(st.latest_map(4)[0] == 4)[0])  # superseded: generation 1 holds it too
        g1_off = int(st.data_offsets(g1)[int(np.flatnonzero(g1.index["page"] == stale)[0])])
        assert g1_off >= 0
    _flip(path, g1_off + 9)  # a stale page, read as a gap then overwritten
    with Store(path, lazy_index=True) as st:
        rows = np.zeros((NPAGES, P), np.uint8)
        st.read_chunks(4, np.arange(NPAGES, dtype=np.int64), rows, fresh=True)
        assert np.array_equal(rows, states[3])
    _flip(path, int(offs[newest]) + 9)
    with Store(path, lazy_index=True) as st, pytest.raises(CorruptCheckpointError,
                                                           match=f"generation 3, region 0, page {newest}:"):
        st.read_chunks(4, np.arange(NPAGES, dtype=np.int64), np.zeros((NPAGES, P), np.uint8), fresh=True)


def test_lazy_load_of_every_generation_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "c.ck"
    states = make(path)
    for n, want in enumerate(states, 1):
        prefetch = n % 2 == 1
        got = load(path, n, lazy=True, prefetch=prefetch)
        order = np.random.default_rng(n).permutation(NPAGES)[:400]
        assert np.array_equal(got["a"][order], want[order])  # touched out of order first
        if not prefetch:
            assert np.array_equal(got["a"], want)  # every page touched: the handler is done
        assert got.handler is not None and got.handler.wait(60)
        assert np.array_equal(got["a"], want)
        del got


def _expect_sigbus(body: Callable[[Callable[[bytes], None], int], None], first: bytes) -> None:
    o = Owner(body)
    assert o.read(len(first)) == first
    status, rest = o.finish()
    assert not rest.startswith(b"!"), rest.decode(errors="replace")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, f"owner status {status:#x}: {rest!r}"


def test_damaged_data_page_far_from_the_first_is_an_error_when_served(tmp_path: Path) -> None:
    path = tmp_path / "c.ck"
    states = make(path, steps=0)
    victim = 4321
    assert states[0][victim].any()
    _flip(path, data_offset(path, victim) + 1000)
    with pytest.raises(CorruptCheckpointError, match=f"generation 1, region 0, page {victim}:"):
        verify(path)

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        d = load(path, lazy=True, prefetch=False)  # opens: the damage is not read yet
        a = d["a"]
        ok = np.array_equal(a[0], states[0][0]) and np.array_equal(a[NPAGES - 1], states[0][NPAGES - 1])
        report(b"ok" if ok else b"!wrong data")
        _ = int(a[victim].sum())
        report(b"!damaged page served")

    _expect_sigbus(body, b"ok")


def test_damaged_index_block_is_an_error_when_used_not_at_lazy_open(tmp_path: Path) -> None:
    path = tmp_path / "c.ck"
    states = make(path, steps=0)
    position = 3500  # index block 3 of the full generation (entry i is chunk i)
    _flip(path, entry_offset(path, 1, position) + 17)  # the checksum field
    with pytest.raises(CorruptCheckpointError, match=f"generation 1, page index entry {position} "):
        verify(path)
    assert "page index entry 3500" in (inspect(path)["damage"] or "")
    with Store(path, lazy_index=True) as st:  # opens: the block is read when needed
        rows = np.zeros((2, P), np.uint8)
        st.read_chunks(1, np.array([0, 2047]), rows, fresh=True)
        assert np.array_equal(rows, states[0][[0, 2047]])
        with pytest.raises(CorruptCheckpointError, match=f"page index entry {position} .*entry check mismatch"):
            st.read_chunks(1, np.array([3072]), rows[:1])

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        d = load(path, lazy=True, prefetch=False)
        report(b"ok" if np.array_equal(d["a"][10], states[0][10]) else b"!wrong data")
        _ = int(d["a"][3100].sum())  # another chunk of the damaged block
        report(b"!page of a damaged index block served")

    _expect_sigbus(body, b"ok")


@pytest.mark.parametrize("damaged", [None, 4300])
def test_index_blocks_read_ahead_in_address_order(tmp_path: Path, damaged: int | None) -> None:
    """Reading on from one block to the next (a prefetch) reads and verifies the blocks
    after it together; a damaged entry among them is still the error of its own block."""
    path = tmp_path / "c.ck"
    states = make(path, steps=0)
    if damaged is not None:
        _flip(path, entry_offset(path, 1, damaged) + 17)
    with Store(path, lazy_index=True) as st:
        rows = np.zeros((1024, P), np.uint8)
        for c0 in range(0, NPAGES, 1024):
            chunks = np.arange(c0, min(NPAGES, c0 + 1024))
            if damaged is not None and c0 <= damaged < c0 + 1024:
                with pytest.raises(CorruptCheckpointError, match=f"page index entry {damaged} .*entry check mismatch"):
                    st.read_chunks(1, chunks, rows[: len(chunks)])
                break
            st.read_chunks(1, chunks, rows[: len(chunks)])
            assert np.array_equal(rows[: len(chunks)], states[0][chunks])
            if c0 == 1024:  # blocks 0 and 1 asked for: 2.. read ahead, unless damage is among them
                assert ((1, 4) in st._blocks) == (damaged is None)


def test_damaged_block_table_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "c.ck"
    make(path, steps=1)
    with Store(path) as st:
        g = st.generations[1]
        table_off = g.offset + fmt.GEN_HEADER.size + g.pages * fmt.ENTRY_SIZE
    _flip(path, table_off + 3)
    for lazy in (False, True):
        with Store(path, lazy_index=lazy) as st:
            assert st.damage is not None and "index block table is damaged" in str(st.damage)
            assert len(st.generations) == 1  # the generation before it is intact
        with pytest.raises(CorruptCheckpointError, match="generation 2: index block table is damaged"):
            load(path, lazy=lazy)


def to_version_3(path: Path) -> None:
    """Rewrite a version 4 file as version 3 (no block tables), byte by byte."""
    data = path.read_bytes()
    with Store(path) as st:
        gens = list(st.generations)
        assert not st.sections
    magic, _v, ps, n, r, meta, b, c, d, _ = fmt.FILE_HEADER.unpack(data[:64])
    head = fmt.FILE_HEADER.pack(magic, 3, ps, n, r, meta, b, c, d, b"\0" * 8)
    out = bytearray(head[:-8] + fmt.digest(head[:-8]) + data[64 : gens[0].offset])
    for g in gens:
        off = len(out)
        idx = g.index.tobytes()
        gh = fmt.GEN_HEADER.pack(fmt.MAGIC_GEN, g.number, g.pages, g.data_pages, g.parent, len(idx), 0, b"\0" * 8)
        gh = gh[:-8] + fmt.digest(gh[:-8])
        pages = data[g.data_offset : g.data_offset + g.data_pages * P]
        length = 64 + len(idx) + len(pages)
        cm = fmt.COMMIT.pack(fmt.MAGIC_COMMIT, g.number, off, length, fmt.digest(idx), gh[-8:], 0, b"\0" * 8)
        out += gh + idx + pages + cm[:-8] + fmt.digest(cm[:-8])
    path.write_bytes(bytes(out))


def test_version_3_files_are_read_not_continued(tmp_path: Path) -> None:
    path = tmp_path / "v3.ck"
    states = make(path, steps=2)
    to_version_3(path)
    assert inspect(path)["version"] == 3
    assert [g.number for g in verify(path)] == [1, 2, 3]
    for n, want in enumerate(states, 1):
        assert np.array_equal(load(path, n)["a"], want)
        got = load(path, n, lazy=True)
        assert got.handler is not None and got.handler.wait(60)
        assert np.array_equal(got["a"], want)
        del got
    tgt = pagescan.empty((NPAGES, P), np.uint8)
    restore(path, {"a": tgt}, 2)
    assert np.array_equal(tgt, states[1])
    tgt[:] = 0
    with lazy_restore(path, {"a": tgt}) as fh:
        assert fh.wait(60)
    assert np.array_equal(tgt, states[2])
    with pytest.raises(CheckpointError, match="version 3"):
        Checkpointer(path, {"a": tgt})
    compact(path)
    assert inspect(path)["version"] == fmt.VERSION
    assert np.array_equal(load(path)["a"], states[2])


# -- eager restore into huge-page memory --------------------------------------------------


@requires_thp
def test_restore_into_huge_page_memory_is_exact_and_leaves_neighbours(tmp_path: Path) -> None:
    """A target inside unpopulated ``MADV_HUGEPAGE`` memory, starting and ending inside
    huge-page extents: the target gets exactly its bytes, the bytes around it keep
    theirs (canaries on the first and last page of the mapping)."""
    h = thp_size()
    n = 3 * h
    rng = np.random.default_rng(7)
    src = rng.integers(1, 256, n - 200, dtype=np.uint8)
    path = tmp_path / "h.ck"
    with Checkpointer(path, [src]) as ck:
        ck.checkpoint()
    with Mapping(n // P, align=h) as m:
        m.madvise(MADV.HUGEPAGE)
        whole = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(m.addr))
        whole[:100] = 0xC3
        whole[n - 100 :] = 0x3C
        target = whole[100 : n - 100]
        assert restore(path, [target]) == 1
        assert np.array_equal(target, src)
        assert (whole[:100] == 0xC3).all() and (whole[n - 100 :] == 0x3C).all()
        assert "hg" in vmflags(m.addr), "the target's MADV_HUGEPAGE is kept"
        del target, whole


# -- the guardian of a large owner -----------------------------------------------------------


def test_guardian_of_a_large_owner_is_spawned_and_poisons(tmp_path: Path) -> None:
    """Above ``SPAWN_ABOVE`` of populated memory the guardian is a fresh interpreter
    (``posix_spawn``: no copy of the owner's page tables), in its own process group;
    the handler killed, it still poisons what was not served: SIGBUS, not zeros."""
    import struct

    import pagescan.handler as handler_mod

    path = tmp_path / "g.ck"
    states = make(path, steps=0)
    exp = states[0]

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        handler_mod.SPAWN_ABOVE = 0  # this small owner counts as large
        d = load(path, lazy=True, prefetch=False)
        fh = d.handler
        assert fh is not None
        a = d["a"]
        ok = all(np.array_equal(a[p], exp[p]) for p in range(4))
        with open(f"/proc/{fh.guardian_pid}/cmdline", "rb") as f:
            spawned = f.read().split(b"\0")[1:4] == [b"-I", b"-S", b"-c"]
        own_group = os.getpgid(fh.guardian_pid) == fh.guardian_pid != os.getpgid(0)
        report(struct.pack("iii", fh.pid, fh.guardian_pid, int(ok and spawned and own_group)).hex().encode())
        assert os.read(go_r, 1) == b"g"  # the parent has killed the handler
        _ = int(a[4000].sum())  # not served: must be SIGBUS
        report(b"!touched page 4000 and read " + (b"zeros" if not a[4000].any() else b"data"))

    from .test_snapshot import kill_handler_expect_sigbus

    kill_handler_expect_sigbus(body)


def test_hostile_block_tables_are_range_checked(tmp_path: Path) -> None:
    """Block tables rewritten with valid digests (a file made to hurt, not damage): rows
    out of range are refused at open, lazily or not; a row that points a block at the
    wrong chunks is refused when that block is read."""
    src = tmp_path / "ok.ck"
    make(src, steps=1, per_step=3000)  # generation 2: three index blocks
    with Store(src) as st:
        g = st.generations[1]
        table = g.table.copy()
        t_off = g.offset + fmt.GEN_HEADER.size + g.pages * fmt.ENTRY_SIZE
        c_off = g.end - fmt.COMMIT.size
    pristine = src.read_bytes()

    def rewrite(path: Path, t: np.ndarray) -> None:
        data = bytearray(pristine)
        raw = t.tobytes()
        data[t_off : t_off + len(raw)] = raw
        c = list(fmt.COMMIT.unpack(bytes(data[c_off : c_off + fmt.COMMIT.size])))
        c[4] = fmt.digest(raw)
        rec = fmt.COMMIT.pack(*c[:-1], b"\0" * 8)
        data[c_off : c_off + fmt.COMMIT.size] = rec[:-8] + fmt.digest(rec[:-8])
        path.write_bytes(bytes(data))

    bad_rows = []
    for field, k, value in [("first", 1, 1 << 63), ("first", 0, NPAGES), ("rank", 0, 5), ("rank", 1, 1 << 62),
                            ("first", 1, int(table["first"][0]))]:
        t = table.copy()
        t[field][k] = value
        bad_rows.append(t)
    for i, t in enumerate(bad_rows):
        p = tmp_path / f"h{i}.ck"
        rewrite(p, t)
        for lazy in (False, True):
            with Store(p, lazy_index=lazy) as st:
                assert st.damage is not None and "block table" in str(st.damage), (i, lazy, st.damage)
    # In range but wrong: block 1 said to start one chunk later than it does.
    t = table.copy()
    t["first"][1] += 1
    p = tmp_path / "shifted.ck"
    rewrite(p, t)
    with pytest.raises(CorruptCheckpointError, match="block 1 does not match the block table"):
        verify(p)
    with Store(p, lazy_index=True) as st:
        assert st.damage is None
        with pytest.raises(CorruptCheckpointError, match="block 1 does not match the block table"):
            st.read_chunks(2, np.arange(NPAGES, dtype=np.int64), np.zeros((NPAGES, P), np.uint8))


def test_lookups_skip_the_empty_generations_of_a_chain(tmp_path: Path) -> None:
    """A Checkpointer seals an empty generation whenever nothing was written: a lookup
    searched every one of them (a lazy load of a 4 MiB state behind 20,000 took 3.5 s).
    The chain a lookup searches holds only generations with entries, newest first."""
    path = tmp_path / "chain.ck"
    a = pagescan.zeros(64 * P // 8, np.float64)
    with Checkpointer(path, {"a": a}) as ck:
        a[::512] = 1.0
        ck.checkpoint()
        for _ in range(5):
            ck.checkpoint()  # nothing written: empty generations
        a[512] = 2.0
        ck.checkpoint()
        ck.checkpoint()
    with Store(path) as st:
        assert len(st.generations) == 8
        assert [g.number for g in st._stored_chain(8)] == [7, 1]
        assert st._stored_chain(8) is st._stored_chain(8)  # found once
    got = load(path, lazy=True)
    assert got.handler is not None and got.handler.wait(30)
    assert got["a"][0] == 1.0 and got["a"][512] == 2.0 and got["a"][1024] == 1.0
