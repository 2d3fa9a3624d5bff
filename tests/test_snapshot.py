"""pagescan.snapshot: incremental checkpoints, restore, lazy restore, the file format, the CLI.

Everything runs on real memory and real files: regions are mappings written through
their page tables (numpy views), checkpoints are files on the test's file system (a
small tmpfs for the full-disk tests). What is checked:

* a chain of generations restores each one bit-exactly, and each later generation
  stores exactly the pages written since the one before (zero pages as such);
* concurrent writers lose no write; a second writer is refused;
* crash safety: a child checkpointing in a loop is SIGKILLed at random moments (60
  times); every time, restore yields exactly the newest sealed generation, which is
  the last one the child saw sealed or the one it was writing;
* corruption: a flipped byte anywhere in page data or page index is reported with the
  generation and page; damaged record headers and commit records are damage, not an
  unsealed tail (nothing is truncated); a truncated file restores its sealed prefix;
* lazy restore: first touch while holding the GIL, many threads at once, prefetch with
  progress and wait, a killed handler (SIGBUS in the owner, never a hang or wrong
  data), a damaged page (not served), populated targets (refused);
* a full disk: a clear ENOSPC error, the previous generation intact, and the pages of
  the failed checkpoint stored by the next one;
* bad input: mismatched regions, files that are not checkpoints, unsealed files;
* the ``pagescan checkpoint``/``pagescan restore`` commands.

Owners that are expected to die run in forked children with an ``alarm()`` hang guard.
No process, mount or file outside ``tmp_path`` is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import hashlib
import json
import mmap
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import numpy as np
import pytest

import pagescan
import pagescan.cli
import pagescan.snapshot as snap
from pagescan.snapshot import (
    CheckpointError,
    Checkpointer,
    CorruptCheckpointError,
    compact,
    inspect,
    lazy_restore,
    restore,
    verify,
)
from pagescan.snapshot._format import BLOCK_SIZE, COMMIT, ENTRY_SIZE, GEN_HEADER, nblocks
from pagescan.snapshot._store import Store

from .conftest import requires_guard, requires_wp_async
from .memory import Mapping, P, vmflags
from .procs import wait_gone

pytestmark = requires_wp_async

HEADER = GEN_HEADER.size  # record header bytes
SEAL = COMMIT.size  # commit record bytes


def index_bytes(pages: int) -> int:
    """Page index and its block table."""
    return ENTRY_SIZE * pages + BLOCK_SIZE * nblocks(pages)


# -- helpers ----------------------------------------------------------------------------


def view(m: Mapping) -> np.ndarray:
    """A ``(npages, P)`` uint8 numpy view of a test mapping (writes go through its page tables)."""
    arr = (ctypes.c_uint8 * m.length).from_address(m.addr)
    return np.ctypeslib.as_array(arr).reshape(m.npages, P)


def region(m: Mapping) -> tuple[int, int]:
    return (m.addr, m.length)


def random_pages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, P), dtype=np.uint8)


def blake(data: np.ndarray | bytes) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray)
                           else data).hexdigest()


def file_hash(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read()).hexdigest()


def restored(path: str | os.PathLike[str], npages: list[int], generation: int | None = None) -> list[np.ndarray]:
    """Restore into fresh mappings (pre-filled with garbage: zero pages must be written); return copies."""
    maps = [Mapping(n) for n in npages]
    try:
        for m in maps:
            view(m)[:] = 0xA5
        got = restore(path, [region(m) for m in maps], generation)
        if generation is not None:
            assert got == generation
        return [view(m).copy() for m in maps]
    finally:
        for m in maps:
            m.close()


class Owner:  # binary reports are sent hex-encoded: a leading "!" marks a failure
    """A forked child running ``body(report)``; ``report(bytes)`` sends to the parent.

    The child is killed by SIGALRM if it hangs; an exception in it is reported as a
    traceback (prefix ``!``) and exit status 1.
    """

    def __init__(self, body: Callable[[Callable[[bytes], None], int], None], timeout: int = 15) -> None:
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                os.close(r)
                os.close(go_w)
                faulthandler.disable()  # an expected SIGBUS needs no traceback dump
                signal.alarm(timeout)
                body(lambda b: os.write(w, b), go_r)
            except BaseException:
                code = 1
                with contextlib.suppress(BaseException):
                    os.write(w, b"!" + traceback.format_exc().encode()[-6000:])
            finally:
                os._exit(code)
        os.close(w)
        os.close(go_r)
        self.pid, self.r, self.go_w = pid, r, go_w
        self.buf = b""
        self.status: int | None = None

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                pytest.fail(f"the owner did not report in time (got {self.buf!r})")
            chunk = os.read(self.r, 65536)
            if not chunk or chunk.startswith(b"!") or b"!Traceback" in chunk:
                self.finish()
                pytest.fail("owner failed:\n" + (self.buf + chunk).decode(errors="replace"))
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def go(self) -> None:
        os.write(self.go_w, b"g")

    def finish(self, timeout: float = 20.0) -> tuple[int, bytes]:
        """Reap (bounded: a hung owner is killed and the test fails); return (status, rest of report)."""
        try:
            if self.status is None:
                deadline = time.monotonic() + timeout
                while True:
                    done, status = os.waitpid(self.pid, os.WNOHANG)
                    if done:
                        self.status = status
                        break
                    if time.monotonic() > deadline:
                        os.kill(self.pid, signal.SIGKILL)
                        os.waitpid(self.pid, 0)
                        self.status = -1
                        pytest.fail("the owner hung (killed)")
                    time.sleep(0.005)
            os.set_blocking(self.r, False)
            with contextlib.suppress(BlockingIOError, OSError):
                while chunk := os.read(self.r, 65536):
                    self.buf += chunk
            return self.status, self.buf
        finally:
            for fd in (self.r, self.go_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.r = self.go_w = -1


def wait_go(go_r: int) -> None:
    assert os.read(go_r, 1) == b"g"


def make_chain(path: Path, rng: np.random.Generator, npages: list[int], steps: int = 3
               ) -> tuple[list[list[np.ndarray]], list[snap.CheckpointInfo]]:
    """Checkpoint random contents, then ``steps`` rounds of scattered changes.

    Returns the expected contents of every generation (one array per region) and the infos.
    """
    maps = [Mapping(n) for n in npages]
    try:
        views = [view(m) for m in maps]
        for v in views:
            v[:] = random_pages(rng, len(v))
            v[rng.choice(len(v), len(v) // 8, replace=False)] = 0  # some zero pages
        expected, infos = [], []
        with Checkpointer(path, [region(m) for m in maps]) as c:
            infos.append(c.checkpoint())
            expected.append([v.copy() for v in views])
            for _ in range(steps):
                for v in views:
                    pages = rng.choice(len(v), max(1, len(v) // 5), replace=False)
                    v[pages] = random_pages(rng, len(pages))
                    v[pages[: len(pages) // 4]] = 0
                infos.append(c.checkpoint())
                expected.append([v.copy() for v in views])
        return expected, infos
    finally:
        for m in maps:
            m.close()


# -- chains of generations -------------------------------------------------------------


@pytest.fixture(params=["direct", "threads"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How synchronous checkpoints take their instant: "direct" (as in a process whose only
    thread checkpoints; pytest's faulthandler watchdog is a second thread, which writes
    no memory) or as in a process with other threads ("fork" or "ptrace")."""
    monkeypatch.setattr(snap, "_single_thread", lambda: request.param == "direct")
    return str(request.param)


def test_chain_restores_every_generation_and_stores_only_changed_pages(tmp_path: Path, method: str) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "chain.ck"
    a, b = Mapping(64), Mapping(24)
    try:
        va, vb = view(a), view(b)
        va[:] = random_pages(rng, 64)
        vb[:] = 0
        vb[3] = random_pages(rng, 1)  # region b: mostly zero pages
        expected = []
        with Checkpointer(path, [region(a), region(b)]) as c:
            info = c.checkpoint()
            assert (info.generation, info.full, info.pages, info.zero_pages) == (1, True, 88, 23)
            assert info.bytes == 65 * P and info.seconds > 0
            expected.append((va.copy(), vb.copy()))
            size = os.path.getsize(path)
            for gen in range(2, 8):
                wa = sorted(rng.choice(64, int(rng.integers(1, 20)), replace=False).tolist())
                wb = sorted(rng.choice(24, int(rng.integers(0, 4)), replace=False).tolist())
                zeroed = set(wa[: len(wa) // 3])
                for p in wa:
                    if p in zeroed:
                        va[p] = 0
                    elif p % 5 == 0:
                        va[p, 100] = va[p, 100]  # written with the same value: still written
                    else:
                        va[p, int(rng.integers(0, P))] ^= 0xFF  # one byte changed
                for p in wb:
                    vb[p] = random_pages(rng, 1)
                info = c.checkpoint()
                zeros = sum(1 for p in wa if not va[p].any()) + sum(1 for p in wb if not vb[p].any())
                assert info.generation == gen and not info.full and (info.method == "direct") == (method == "direct")
                assert info.pages == len(wa) + len(wb), "exactly the pages written since the previous generation"
                assert info.zero_pages == zeros
                assert info.bytes == (len(wa) + len(wb) - zeros) * P
                new_size = os.path.getsize(path)
                assert new_size - size == HEADER + index_bytes(info.pages) + info.bytes + SEAL
                size = new_size
                expected.append((va.copy(), vb.copy()))
            # No writes: an empty generation (header, no index entries, commit).
            info = c.checkpoint()
            assert info.pages == 0 and os.path.getsize(path) - size == HEADER + SEAL
            expected.append((va.copy(), vb.copy()))
            assert c.generations == len(expected)
        for gen, (ea, eb) in enumerate(expected, 1):
            ga, gb = restored(path, [64, 24], gen)
            assert np.array_equal(ga, ea) and np.array_equal(gb, eb), f"generation {gen} not bit-exact"
        ga, gb = restored(path, [64, 24])  # default: the newest
        assert np.array_equal(ga, va) and np.array_equal(gb, vb)
        gens = inspect(path)["generations"]
        assert [g["parent"] for g in gens] == [0, 1, 2, 3, 4, 5, 6, 7]
        assert [g.number for g in verify(path)] == list(range(1, 9))
    finally:
        a.close()
        b.close()


def _guard_run(tmp_path: Path, fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[int, ...]], int]:
    """The guard-page scenario of the next test, with the "direct" checkpoint finding the
    written pages on the kernel's fast path (``fast``) or with the masked walk. Returns,
    per checkpoint, (method, pages, zero pages, stored chunks...) and how often a copy
    failed on a guard page and was redone without it."""
    from pagescan import MADV, Category

    wr, gd = int(Category.WRITTEN), int(Category.GUARD)
    monkeypatch.setattr(snap, "_single_thread", lambda: True)  # (pytest's faulthandler watchdog thread)
    monkeypatch.setattr(snap, "_fast_path_exact", (lambda: True) if fast else (lambda: False))
    redone = []
    real = Checkpointer._without_guards

    def spy(self: Checkpointer, err: OSError) -> np.ndarray | None:
        got = real(self, err)
        redone.append(got is not None)
        return got

    monkeypatch.setattr(Checkpointer, "_without_guards", spy)
    path = tmp_path / f"guard-{fast}.ck"
    out: list[tuple[int, ...]] = []
    with Mapping(64) as m, Checkpointer(path, [region(m)]) as c:

        def step(expect: list[int], fast_reports: list[int]) -> None:
            masked = pagescan.scan(m.addr, m.end, category_mask=wr | gd, category_inverted=gd, return_mask=wr)
            assert [(a - m.addr) // P for a in pagescan.regions_to_pages(masked.regions).tolist()] == expect, "oracle"
            raw = pagescan.scan(m.addr, m.end, category_mask=wr, return_mask=wr)  # the fast path, no re-arming
            assert [(a - m.addr) // P for a in pagescan.regions_to_pages(raw.regions).tolist()] == fast_reports
            for w in c._watches:
                w._sparse = fast  # without the fast path, the masked walk (not get's sparse strategy)
            info = c.checkpoint()
            with Store(path) as st:
                stored = sorted(st.generations[-1].index["page"].tolist())
            assert stored == expect
            out.append((info.method, info.pages, info.zero_pages, *stored))

        m.write(0, 64)
        c.checkpoint()  # full (no guard page yet: a full checkpoint cannot read one)
        m.touch(3)
        m.touch(10)
        m.touch(11)
        m.madvise(MADV.GUARD_INSTALL, 11, 1)  # written, then made a guard page
        m.madvise(MADV.GUARD_INSTALL, 20, 1)  # unwritten
        # The fast path reports both guard pages (not armed yet): the copy fails on them.
        step([3, 10], [3, 10, 11, 20])
        m.touch(40)
        # The fast path armed them; the masked walk leaves them as they were.
        step([40], [40] if fast else [11, 20, 40])
        m.madvise(MADV.GUARD_REMOVE, 11, 1)
        m.madvise(MADV.GUARD_REMOVE, 20, 1)
        step([11, 20], [11, 20])  # emptied slots read as written (and as zeros)
        step([], [])
        for gen, want in ((2, 0x01), (5, 0)):
            (got,) = restored(path, [64], gen)
            assert got[11].max() == want and got[20].max() == (1 if gen == 2 else 0)
    return out, sum(redone)


@pytest.mark.skipif(
    not (pagescan.capabilities().guard_regions and pagescan.capabilities().scan_generation.get("written_unpopulated_pte")),
    reason="needs MADV_GUARD_INSTALL with PAGE_IS_GUARD (Linux 6.16) and the 2026 fix under which an emptied "
    "slot reads WRITTEN on every path (6.18.44 has it)")
def test_direct_checkpoint_on_the_fast_path_leaves_guard_pages_out(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12.3/12.5: a "direct" checkpoint finds the written pages on the kernel's
    WRITTEN-only fast path, which also reports (once) guard pages not armed yet. Every
    page found is read, and a guard page cannot be read, so the copy fails exactly when
    one is among them; it is then redone without them. Proved against the masked walk
    (the oracle, scanned just before each checkpoint) and against the same checkpoints
    taken with the masked walk: the same generations, chunk for chunk, and the same
    restored memory -- for guard pages installed on written and unwritten pages after
    arming, armed by the fast path, and removed again."""
    fast, redone = _guard_run(tmp_path, True, monkeypatch)
    masked, never = _guard_run(tmp_path, False, monkeypatch)
    assert fast == masked
    assert fast == [("direct", 2, 0, 3, 10), ("direct", 1, 0, 40), ("direct", 2, 2, 11, 20), ("direct", 0, 0)]
    assert redone == 1 and never == 0


@pytest.mark.skipif(not pagescan.capabilities().guard_regions,
                    reason="needs MADV_GUARD_INSTALL with PAGE_IS_GUARD (Linux 6.16)")
def test_ptrace_checkpoint_leaves_guard_pages_out(tmp_path: Path) -> None:
    """The ptrace path's helper walks on the fast path, which reports (once) a guard page
    installed since arming; it cannot be read, so the helper finds the guard pages among
    what it copies and leaves them out. Before, the checkpoint failed with EFAULT, and so
    did every later one while the guard page existed."""
    from pagescan import MADV, Category

    wr, gd = int(Category.WRITTEN), int(Category.GUARD)
    path = tmp_path / "guard-ptrace.ck"
    with Mapping(64) as m, Checkpointer(path, [region(m)]) as c:
        c._use_ptrace = True  # (the pytest process has a second thread: never "direct")
        m.write(0, 64)
        c.checkpoint()
        stored: list[list[int]] = []

        def step(expect: list[int]) -> None:
            masked = pagescan.scan(m.addr, m.end, category_mask=wr | gd, category_inverted=gd, return_mask=wr)
            assert [(a - m.addr) // P for a in pagescan.regions_to_pages(masked.regions).tolist()] == expect, "oracle"
            info = c.checkpoint()
            assert info.method == "ptrace"
            with Store(path) as st:
                stored.append(sorted(st.generations[-1].index["page"].tolist()))

        m.touch(3)
        m.touch(10)
        m.touch(11)
        m.madvise(MADV.GUARD_INSTALL, 11, 1)  # written, then made a guard page
        m.madvise(MADV.GUARD_INSTALL, 20, 1)  # unwritten
        step([3, 10])
        m.touch(40)
        step([40])
        m.madvise(MADV.GUARD_REMOVE, 11, 1)
        m.madvise(MADV.GUARD_REMOVE, 20, 1)
        step([11, 20])  # emptied slots read as written (and as zeros)
        assert stored == [[3, 10], [40], [11, 20]]
        (got,) = restored(path, [64], 2)
        assert got[11].max() == 1 and got[20].max() == 1 and got[3].max() == 1
        (got,) = restored(path, [64], 4)
        assert got[11].max() == 0 and got[20].max() == 0 and got[40].max() == 1


@requires_guard
def test_a_page_that_cannot_be_read_fails_the_checkpoint_and_leaves_the_file(tmp_path: Path, method: str) -> None:
    """A guard page in the state (it cannot be read) fails a full checkpoint with the
    kernel's errno, after the bytes before it were copied or written; the file keeps its
    generations, and the next checkpoint, once the page is readable again, is whole."""
    from pagescan import MADV

    path = tmp_path / "unreadable.ck"
    with Mapping(64) as m, Checkpointer(path, [region(m)]) as c:
        m.write(0, 64, 7)
        m.madvise(MADV.GUARD_INSTALL, 40, 1)
        with pytest.raises(OSError) as exc:
            c.checkpoint()
        assert exc.value.errno in (errno.EFAULT, errno.EIO)
        if method == "direct":
            assert f"{m.addr + 40 * P:#x}" in str(exc.value)
        assert c.generations == 0 and inspect(path)["unsealed_tail_bytes"] == 0
        m.madvise(MADV.GUARD_REMOVE, 40, 1)
        info = c.checkpoint()
        assert info.full and info.pages == 64 and info.zero_pages == 1
        (got,) = restored(path, [64])
        want = np.full((64, P), 7, np.uint8)
        want[40] = 0
        assert np.array_equal(got, want)


def test_zero_pages_take_no_data(tmp_path: Path, method: str) -> None:
    path = tmp_path / "zero.ck"
    with Mapping(512) as m:
        v = view(m)
        v[[7, 100, 511], 5] = 1
        with Checkpointer(path, [region(m)]) as c:
            info = c.checkpoint()
        assert (info.pages, info.zero_pages, info.bytes) == (512, 509, 3 * P)
        st = Store(path)
        try:
            first = st.generations[0].offset
        finally:
            st.close()
        assert os.path.getsize(path) == first + HEADER + index_bytes(512) + 3 * P + SEAL
        (got,) = restored(path, [512])  # onto garbage: the zero pages are written as zeros
        assert np.array_equal(got, v)


def test_regions_as_buffer_objects_and_pairs(tmp_path: Path, method: str) -> None:
    path = tmp_path / "buf.ck"
    rng = np.random.default_rng(2)
    mm = mmap.mmap(-1, 8 * P)
    arr = np.zeros(3 * P + 100, dtype=np.uint8)  # numpy's own allocation: widened to its pages
    m = Mapping(4)
    try:
        mm[:] = random_pages(rng, 8).tobytes()
        view(m)[:] = random_pages(rng, 4)
        arr[:] = rng.integers(0, 256, arr.size, dtype=np.uint8)
        with Checkpointer(path, [mm, region(m), arr]) as c:
            c.checkpoint()
            mm[P : 2 * P] = bytes(P)
            arr[5] ^= 1
            info = c.checkpoint()
            assert info.pages >= 2
        lens = inspect(path)["regions"]
        assert lens == [8 * P, 4 * P, arr.size]  # buffers: their exact bytes; pairs: whole pages
        a2, m2 = mmap.mmap(-1, 8 * P), Mapping(4)
        arr2 = np.zeros(arr.size + 1, dtype=np.uint8)[1:]  # another alignment than arr's
        try:
            assert restore(path, [a2, region(m2), arr2]) == 2
            assert a2[:] == mm[:] and np.array_equal(view(m2), view(m))
            assert np.array_equal(arr2, arr)
        finally:
            a2.close()
            m2.close()
    finally:
        mm.close()
        m.close()
    with pytest.raises(ValueError, match="not page aligned"):
        Checkpointer(tmp_path / "x.ck", [(m.addr + 1, P)])
    for far in (1 << 63, (1 << 64) - P, 1 << 64):  # a ValueError, never an OverflowError after the file is read
        with pytest.raises(ValueError, match="beyond the address space"):
            restore(path, [(far, 4 * P)])
        with pytest.raises(ValueError, match="beyond the address space"), lazy_restore(path, [(far, 4 * P)]):
            pass
        with pytest.raises(ValueError, match="beyond the address space"):
            Checkpointer(tmp_path / "x.ck", [(far, P)])
    with pytest.raises(ValueError, match="no entries"):
        Checkpointer(tmp_path / "x.ck", [])
    with pytest.raises(TypeError):
        Checkpointer(tmp_path / "x.ck", [(1, 2, 3)])
    assert not (tmp_path / "x.ck").exists()


def test_concurrent_writes_are_never_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers race checkpoints; every page is written once: a write lost by a checkpoint
    (re-armed but not stored) would never be caught by a later one."""
    monkeypatch.setattr(snap, "BATCH_PAGES", 64)  # many batches: the copy/write pipeline races too
    path = tmp_path / "race.ck"
    n = 6000
    with Mapping(n) as m:
        v = view(m)
        libc = ctypes.CDLL(None)
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

        def writer(offset: int) -> None:
            # memset through ctypes releases the GIL: truly concurrent with the checkpoint
            for p in range(offset, n, 2):
                libc.memset(m[p], (p % 251) + 1, P)
                if p % 64 < 2:
                    time.sleep(0.004)

        with Checkpointer(path, [region(m)]) as c:
            c.checkpoint()
            threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
            for t in threads:
                t.start()
            infos = []
            while any(t.is_alive() for t in threads):
                infos.append(c.checkpoint())
            for t in threads:
                t.join()
            infos.append(c.checkpoint())
        racing = [i.pages for i in infos[:-1] if 0 < i.pages < n]
        assert len(racing) >= 2, f"too few checkpoints raced the writers: {[i.pages for i in infos]}"
        (got,) = restored(path, [n])
        assert np.array_equal(got, v), f"pages lost: {np.flatnonzero((got != v).any(axis=1))[:10]}"
        assert sum(i.pages for i in infos) >= n


def test_continuing_a_file_starts_with_a_full_generation(tmp_path: Path) -> None:
    path = tmp_path / "cont.ck"
    rng = np.random.default_rng(3)
    with Mapping(16) as m:
        v = view(m)
        v[:] = random_pages(rng, 16)
        with Checkpointer(path, [region(m)]) as c:
            c.checkpoint()
        first = v.copy()
        v[2] = 0
        v[9] = random_pages(rng, 1)  # written while nobody watched
        with Checkpointer(path, [region(m)]) as c:
            info = c.checkpoint()
            assert info.generation == 2 and info.full and info.pages == 16
            v[4, 0] ^= 1
            assert c.checkpoint().pages == 1
        assert np.array_equal(restored(path, [16], 1)[0], first)
        assert np.array_equal(restored(path, [16], 3)[0], v)
        assert [g["parent"] for g in inspect(path)["generations"]] == [0, 0, 2]


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lock.ck"
    with Mapping(4) as m, Mapping(4) as m2:
        with Checkpointer(path, [region(m)]) as c:
            c.checkpoint()
            h = file_hash(path)
            with pytest.raises(CheckpointError, match="in use"):
                Checkpointer(path, [region(m2)])
            with pytest.raises(CheckpointError, match="in use"):
                compact(path)
            assert file_hash(path) == h
            c.checkpoint()
        with Checkpointer(path, [region(m2)]) as c2:  # released by close()
            assert c2.checkpoint().generation == 3
        c.close()  # twice is fine
        with pytest.raises(ValueError, match="closed"):
            c.checkpoint()


# -- crash safety ------------------------------------------------------------------------


def _crash_child(path: Path, log: Path, npages: int, seed: int, ready_w: int) -> None:  # pragma: no cover - child
    rng = np.random.default_rng(seed)
    if seed % 2:
        snap.BATCH_PAGES = 16  # several batches: the writer-thread pipeline
    m = Mapping(npages)
    v = view(m)
    v[:] = random_pages(rng, npages)
    v[rng.choice(npages, npages // 10, replace=False)] = 0
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with Checkpointer(path, [region(m)]) as c:
        os.write(ready_w, b"r")
        while True:
            g = c.generations + 1
            h = blake(v)
            os.write(logfd, f"pre {g} {h}\n".encode())
            info = c.checkpoint()
            if info.generation != g:
                raise AssertionError(f"generation {info.generation}, expected {g}")
            os.write(logfd, f"post {g} {h}\n".encode())
            for p in rng.choice(npages, int(rng.integers(1, 12)), replace=False).tolist():
                r = rng.random()
                if r < 0.15:
                    v[p] = 0
                elif r < 0.25:
                    v[p, 0] = v[p, 0]
                else:
                    v[p] = random_pages(rng, 1)


def _parse_log(log: Path) -> list[tuple[str, int, str]]:
    data = log.read_bytes() if log.exists() else b""
    lines = data.split(b"\n")
    out = []
    for line in lines[:-1]:  # the part after the last newline is incomplete: never written
        kind, g, h = line.decode().split()
        out.append((kind, int(g), h))
    return out


def test_sigkill_at_random_moments_restores_the_last_sealed_generation(tmp_path: Path) -> None:
    path = tmp_path / "crash.ck"
    log = tmp_path / "crash.log"
    npages = 160
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    stats = {"sealed_unlogged": 0, "logged": 0, "tail": 0, "none": 0}
    kills = 0
    t0 = time.monotonic()
    with Mapping(npages) as target:
        while kills < 60:
            ready_r, ready_w = os.pipe()
            err_r, err_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 0
                try:
                    os.close(ready_r)
                    os.close(err_r)
                    signal.alarm(30)
                    _crash_child(path, log, npages, rng.randrange(1 << 30), ready_w)
                except BaseException:
                    code = 1
                    with contextlib.suppress(BaseException):
                        os.write(err_w, traceback.format_exc().encode()[-4000:])
                finally:
                    os._exit(code)
            os.close(ready_w)
            os.close(err_w)
            try:
                if not select.select([ready_r], [], [], 20)[0] or os.read(ready_r, 1) != b"r":
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    pytest.fail("crash child did not start: " + os.read(err_r, 4000).decode(errors="replace"))
                time.sleep(rng.uniform(0, 0.06))
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    pytest.fail(f"crash child ended by itself ({status:#x}): "
                                + os.read(err_r, 4000).decode(errors="replace"))
            finally:
                os.close(ready_r)
                os.close(err_r)
            kills += 1

            entries = _parse_log(log)
            last_pre: dict[int, str] = {}
            for kind, g, h in entries:
                if kind == "pre":
                    last_pre[g] = h
            posts = [(g, h) for kind, g, h in entries if kind == "post"]
            for g, h in posts:
                assert last_pre[g] == h  # no attempt at g after g was sealed and logged
            info = inspect(path)
            sealed = len(info["generations"])
            assert info["damage"] is None
            if info["unsealed_tail_bytes"]:
                stats["tail"] += 1
            last_kind, last_g = (entries[-1][0], entries[-1][1]) if entries else ("post", 0)
            if last_kind == "post":
                assert sealed == last_g, f"kill {kills} (seed {seed}): sealed {sealed}, child saw {last_g} sealed"
            else:
                assert sealed in (last_g - 1, last_g), f"kill {kills} (seed {seed}): sealed {sealed}, writing {last_g}"
            if sealed == 0:
                stats["none"] += 1
                with pytest.raises(CheckpointError, match="no complete"):
                    restore(path, [region(target)])
                continue
            stats["sealed_unlogged" if last_kind == "pre" and sealed == last_g else "logged"] += 1
            view(target)[:] = 0x5A
            assert restore(path, [region(target)]) == sealed
            assert blake(view(target)) == last_pre[sealed], (
                f"kill {kills} (seed {seed}): generation {sealed} does not hold what the child checkpointed"
            )
            if kills % 15 == 0:
                verify(path)
    elapsed = time.monotonic() - t0
    print(f"crash test: {kills} kills in {elapsed:.1f}s, {stats}, {len(inspect(path)['generations'])} generations")
    assert stats["tail"] + stats["sealed_unlogged"] > 0, f"no kill landed inside a checkpoint: {stats}"
    verify(path)


# -- corruption --------------------------------------------------------------------------


def _flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def _layout(path: Path) -> list[snap._store.Generation]:
    with Store(path) as st:
        return list(st.generations)


def test_flipped_page_data_byte_names_generation_and_page(tmp_path: Path) -> None:
    path = tmp_path / "data.ck"
    rng = np.random.default_rng(4)
    expected, _ = make_chain(path, rng, [40, 24], steps=3)
    gens = _layout(path)
    pristine = path.read_bytes()
    targets: list[tuple[int, int]] = []  # (file offset, generation)
    for g in gens:
        lo, hi = g.data_offset, g.data_offset + g.data_pages * P
        targets += [(lo, g.number), (hi - 1, g.number)]
        targets += [(int(x), g.number) for x in rng.integers(lo, hi, 8)]
    for off, gnum in targets:
        g = gens[gnum - 1]
        with Store(path) as st:
            offs = st.data_offsets(g)
        entry = g.index[int(np.flatnonzero(offs == off - (off - g.data_offset) % P)[0])]
        name = f"generation {gnum}, region {int(entry['region'])}, page {int(entry['page'])}:"
        _flip(path, off, int(rng.integers(1, 256)))
        try:
            with pytest.raises(CorruptCheckpointError, match=name):
                verify(path)
            with Mapping(40) as a, Mapping(24) as b:
                view(a)[:] = 0x11
                view(b)[:] = 0x11
                with pytest.raises(CorruptCheckpointError, match=name):
                    restore(path, [region(a), region(b)], gnum)
            if gnum > 1:  # the generations before it are unaffected
                got = restored(path, [40, 24], gnum - 1)
                assert all(np.array_equal(x, y) for x, y in zip(got, expected[gnum - 2]))
        finally:
            path.write_bytes(pristine)
    verify(path)


def test_flipped_index_byte_names_generation_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "index.ck"
    rng = np.random.default_rng(5)
    expected, _ = make_chain(path, rng, [30, 20], steps=2)
    gens = _layout(path)
    pristine = path.read_bytes()
    for g in gens:
        idx_off = g.offset + HEADER
        for i in sorted({0, g.pages // 2, g.pages - 1}):
            ent = g.index[i]
            for byte in range(ENTRY_SIZE):
                off = idx_off + i * ENTRY_SIZE + byte
                _flip(path, off, 1 << int(rng.integers(0, 8)))
                try:
                    where = rf"generation {g.number}, page index entry {i} \(region \d+, page \d+ as stored\)"
                    if 4 <= byte < 8 or byte >= 16:  # kind, checksum, check: region and page are intact
                        where = (rf"generation {g.number}, page index entry {i} \(region {int(ent['region'])}, "
                                 rf"page {int(ent['page'])} as stored\)")
                    for fn in (verify, inspect_raising, lambda p: restore(p, [(0, 30 * P), (30 * P, 20 * P)])):
                        with pytest.raises(CorruptCheckpointError, match=where):
                            fn(path)
                    if g.number > 1:  # the generations before the damage still restore
                        got = restored(path, [30, 20], g.number - 1)
                        assert all(np.array_equal(x, y) for x, y in zip(got, expected[g.number - 2]))
                    with Mapping(30) as m1, Mapping(20) as m2:  # a writer refuses; nothing is truncated
                        with pytest.raises(CorruptCheckpointError):
                            Checkpointer(path, [region(m1), region(m2)])
                    assert os.path.getsize(path) == len(pristine)
                finally:
                    path.write_bytes(pristine)


def inspect_raising(path: Path) -> None:
    info = inspect(path)
    if info["damage"]:
        raise CorruptCheckpointError(info["damage"])


def test_damaged_record_header_or_commit_is_damage_not_a_tail(tmp_path: Path) -> None:
    path = tmp_path / "rec.ck"
    rng = np.random.default_rng(6)
    expected, _ = make_chain(path, rng, [16], steps=3)  # generations 1..4
    gens = _layout(path)
    pristine = path.read_bytes()
    g2 = gens[1]
    commit2 = g2.end - SEAL
    spots = [g2.offset + k for k in range(0, HEADER, 7)] + [commit2 + k for k in range(0, SEAL, 5)]
    spots += [gens[-1].offset + k for k in (0, 9, 40, 63)]  # the last generation's header
    for off in spots:
        _flip(path, off)
        try:
            gnum = 2 if off < gens[2].offset else 4
            with pytest.raises(CorruptCheckpointError, match=f"generation {gnum} .*damaged"):
                restore(path, [(0, 16 * P)])
            with pytest.raises(CorruptCheckpointError):
                verify(path)
            assert inspect(path)["damage"]
            got = restored(path, [16], gnum - 1)[0]
            assert np.array_equal(got, expected[gnum - 2][0])
            with Mapping(16) as m, pytest.raises(CorruptCheckpointError):
                Checkpointer(path, [region(m)])
            cur = np.frombuffer(path.read_bytes(), np.uint8)
            assert len(cur) == len(pristine), "a damaged file was truncated"
            assert np.flatnonzero(cur != np.frombuffer(pristine, np.uint8)).tolist() == [off]
        finally:
            path.write_bytes(pristine)
    # The newest generation's commit record: a flipped bit there is damage too (a writer
    # that died while sealing leaves zeros, or a part of the record then zeros:
    # tests/test_hostile_files.py); the generations before it are still read by number.
    _flip(path, gens[-1].end - SEAL + 20)
    info = inspect(path)
    assert "its commit record, at the end of the file, is damaged" in str(info["damage"])
    assert len(info["generations"]) == 3
    assert np.array_equal(restored(path, [16], generation=3)[0], expected[2][0])
    path.write_bytes(pristine)


def test_damaged_file_header_and_region_table(tmp_path: Path) -> None:
    path = tmp_path / "fh.ck"
    make_chain(path, np.random.default_rng(7), [8], steps=1)
    pristine = path.read_bytes()
    first = _layout(path)[0].offset
    for off in range(8, first):
        _flip(path, off)
        with pytest.raises(CheckpointError, match="damaged|unsupported"):
            restore(path, [(0, 8 * P)])
        path.write_bytes(pristine)
    for off in range(8):
        _flip(path, off)
        with pytest.raises(CheckpointError, match="not a pagescan checkpoint"):
            inspect(path)
        path.write_bytes(pristine)


def test_truncated_file_restores_its_sealed_prefix(tmp_path: Path) -> None:
    path = tmp_path / "trunc.ck"
    rng = np.random.default_rng(8)
    expected, _ = make_chain(path, rng, [24, 8], steps=3)
    gens = _layout(path)
    pristine = path.read_bytes()
    cuts = {0, 7, 60, gens[0].offset}
    for g in gens:
        cuts |= {g.offset + 1, g.offset + HEADER, g.offset + HEADER + 5, g.data_offset + 3 * P + 1,
                 g.end - SEAL, g.end - 1, g.end, g.end + 1}
        cuts |= {int(x) for x in rng.integers(g.offset, g.end, 3)}
    copy = tmp_path / "cut.ck"
    for cut in sorted(c for c in cuts if c <= len(pristine)):
        copy.write_bytes(pristine[:cut])
        complete = [g for g in gens if g.end <= cut]
        if cut < gens[0].offset:
            with pytest.raises(CheckpointError):
                restore(copy, [(0, 24 * P), (24 * P, 8 * P)])
            continue
        if not complete:
            with pytest.raises(CheckpointError, match="no complete"):
                restore(copy, [(0, 24 * P), (24 * P, 8 * P)])
            continue
        info = inspect(copy)
        assert info["damage"] is None and len(info["generations"]) == len(complete)
        assert info["unsealed_tail_bytes"] == cut - complete[-1].end
        got = restored(copy, [24, 8])
        exp = expected[len(complete) - 1]
        assert all(np.array_equal(x, y) for x, y in zip(got, exp)), f"cut at {cut}"
    # A writer continues a truncated file: the tail goes, numbering continues.
    copy.write_bytes(pristine[: gens[2].data_offset + 5])
    with Mapping(24) as m1, Mapping(8) as m2:
        view(m1)[:] = 3
        with Checkpointer(copy, [region(m1), region(m2)]) as c:
            assert os.path.getsize(copy) == gens[1].end
            info = c.checkpoint()
            assert info.generation == 3 and info.full
        got = restored(copy, [24, 8])
        assert (got[0] == 3).all() and not got[1].any()


# -- lazy restore ------------------------------------------------------------------------


def test_lazy_first_touch_while_holding_the_gil(tmp_path: Path) -> None:
    path = tmp_path / "lazy.ck"
    expected, _ = make_chain(path, np.random.default_rng(9), [48, 16], steps=2)
    mm = mmap.mmap(-1, 48 * P)  # touched by mmap slicing and numpy: both fault with the GIL held
    m2 = Mapping(16)
    try:
        with lazy_restore(path, [mm, region(m2)], prefetch=False) as fh:
            assert mm[5 * P : 6 * P] == expected[-1][0][5].tobytes()  # the first touch
            assert fh.progress()[0] < fh.progress()[1]
            arr = np.frombuffer(mm, dtype=np.uint8).reshape(48, P)
            assert np.array_equal(arr, expected[-1][0])
            del arr
            assert np.array_equal(view(m2), expected[-1][1])
            assert fh.wait(20)
            assert fh.progress() == (64, 64)
            assert fh.pid == 0 and fh.guardian_pid == 0  # exited and reaped
        assert "um" not in vmflags(m2.addr), "still registered for missing faults"
    finally:
        mm.close()
        m2.close()


def test_lazy_many_threads_touch_at_once(tmp_path: Path) -> None:
    path = tmp_path / "threads.ck"
    expected, _ = make_chain(path, np.random.default_rng(10), [256], steps=2)
    exp = expected[-1][0]
    with Mapping(256) as m:
        v = view(m)
        errors: list[str] = []
        with lazy_restore(path, [region(m)], prefetch=False) as fh:
            barrier = threading.Barrier(16)

            def toucher(k: int) -> None:
                barrier.wait()
                for p in range(k, 256, 16):
                    if not np.array_equal(v[p], exp[p]):
                        errors.append(f"page {p}")

            threads = [threading.Thread(target=toucher, args=(k,)) for k in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads), "a toucher hung"
            assert fh.wait(20)
        assert not errors, errors
        assert np.array_equal(v, exp)


def test_lazy_prefetch_progress_and_wait(tmp_path: Path) -> None:
    path = tmp_path / "pf.ck"
    npages = 8192  # 32 MiB: several prefetch windows of up to 4 MiB
    rng = np.random.default_rng(11)
    with Mapping(npages) as src:
        vs = view(src)
        vs[:] = random_pages(rng, npages)
        vs[1000:3000] = 0
        with Checkpointer(path, [region(src)]) as c:
            c.checkpoint()
            vs[::7] = random_pages(rng, len(vs[::7]))
            c.checkpoint()
        with Mapping(npages) as m:
            with lazy_restore(path, [region(m)], prefetch=True) as fh:
                seen = []
                deadline = time.monotonic() + 30
                while fh.progress()[0] < npages and time.monotonic() < deadline:
                    seen.append(fh.progress()[0])
                    time.sleep(0.002)
                hpid = fh.pid
                assert fh.wait(30) is True
                assert fh.progress() == (npages, npages)
                assert seen == sorted(seen)
                wait_gone([hpid])
                assert np.array_equal(view(m), vs)  # no fault needed: everything is in


def test_lazy_prefetch_damaged_window_is_not_served(tmp_path: Path) -> None:
    """Prefetch reads and copies two windows at once (two threads of the handler): a
    damaged page far into the file fails its window before any of it is copied, the
    handler fails, and touching the page raises SIGBUS; pages served before are exact,
    and the restore leaves no fd, memfd or process behind."""
    path = tmp_path / "pfd.ck"
    npages = 8192  # 32 MiB: windows grow to 4 MiB, several in flight before the damage
    rng = np.random.default_rng(21)
    with Mapping(npages) as src:
        vs = view(src)
        vs[:] = random_pages(rng, npages)
        exp = vs.copy()
        with Checkpointer(path, [region(src)]) as c:
            c.checkpoint()
    victim = 6000
    with Store(path) as st:
        g = st.generations[0]
        _flip(path, g.data_offset + victim * P + 123)

    def open_fds() -> dict[str, str]:
        out = {}
        for f in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own fd
                out[f] = os.readlink(f"/proc/self/fd/{f}")
        return {f: t for f, t in out.items() if not t.endswith("/pagemap")}  # the scan backend's, kept open

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        m = Mapping(npages)
        v = view(m)
        fds = open_fds()
        said = ""
        try:
            with lazy_restore(path, [region(m)], prefetch=True) as fh:
                hpid, gpid = fh.pid, fh.guardian_pid
                done = fh.wait(30)
                served = fh.progress()[0]
        except RuntimeError as err:  # the block's end: not every page came in
            said = str(err)
        ok = (not done and 0 < served < npages and np.array_equal(v[:1000], exp[:1000])
              and "the fault handler failed" in said)
        left = open_fds()
        if left != fds:
            report(f"!fds before {fds}, after {left}".encode())
        report(struct.pack("iiii", hpid, gpid, int(ok), int(left == fds)).hex().encode())
        _ = int(v[victim].sum())
        report(b"!damaged page served")

    o = Owner(body)
    hpid, gpid, ok, fds_same = struct.unpack("iiii", bytes.fromhex(o.read(32).decode()))
    status, rest = o.finish()
    assert not rest.startswith(b"!"), rest.decode(errors="replace")
    assert ok == 1, "the handler finished, or served pages were wrong"
    assert fds_same == 1, "the restore left an fd behind"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, f"owner status {status:#x}: {rest!r}"
    wait_gone([hpid, gpid])


def test_lazy_handler_killed_midway_is_a_clear_failure(tmp_path: Path) -> None:
    path = tmp_path / "kill.ck"
    expected, _ = make_chain(path, np.random.default_rng(12), [64], steps=1)
    exp = expected[-1][0]

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        m = Mapping(64)
        v = view(m)
        with lazy_restore(path, [region(m)], prefetch=False) as fh:
            ok = all(np.array_equal(v[p], exp[p]) for p in range(4))
            report(struct.pack("iii", fh.pid, fh.guardian_pid, int(ok)).hex().encode())
            wait_go(go_r)  # the parent has killed the handler
            _ = int(v[40].sum())  # not served yet: must be SIGBUS, not zeros, not a hang
            report(b"!touched page 40 and read " + (b"zeros" if not v[40].any() else b"data"))

    kill_handler_expect_sigbus(body)


def kill_handler_expect_sigbus(body: Callable[[Callable[[bytes], None], int], None]) -> None:
    """Run ``body`` in an Owner: it reports (handler pid, guardian pid, served pages right) packed
    as "iii" and hex, waits for "go", then touches a page not served; we kill the handler in
    between. The owner must die of SIGBUS (not hang, not read zeros); both helpers must be gone."""
    o = Owner(body)
    hpid, gpid, ok = struct.unpack("iii", bytes.fromhex(o.read(24).decode()))
    assert ok == 1, "served pages were wrong"
    os.kill(hpid, signal.SIGKILL)
    o.go()
    status, rest = o.finish()
    assert not rest.startswith(b"!"), rest.decode(errors="replace")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, f"owner status {status:#x}: {rest!r}"
    wait_gone([hpid, gpid])


def test_lazy_damaged_page_is_not_served(tmp_path: Path) -> None:
    path = tmp_path / "dmg.ck"
    expected, _ = make_chain(path, np.random.default_rng(13), [32], steps=0)
    g = _layout(path)[0]
    with Store(path) as st:
        offs = st.data_offsets(g)
    victim = int(np.flatnonzero(offs >= 0)[-1])  # the last data page
    _flip(path, int(offs[victim]) + 77)
    page = int(g.index[victim]["page"])

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        m = Mapping(32)
        v = view(m)
        with lazy_restore(path, [region(m)], prefetch=False):
            report(b"ok")
            _ = int(v[page].sum())
            report(b"!damaged page served")

    o = Owner(body)
    assert o.read(2) == b"ok"
    status, rest = o.finish()
    assert not rest.startswith(b"!"), rest.decode(errors="replace")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, f"owner status {status:#x}: {rest!r}"


def test_lazy_restore_into_populated_targets(tmp_path: Path) -> None:
    path = tmp_path / "pop.ck"
    want = make_chain(path, np.random.default_rng(14), [16], steps=0)[0][-1][0]
    with Mapping(16) as m:
        view(m)[:] = 0x5A  # every page present: dropped, then served lazily
        with lazy_restore(path, [region(m)]) as fh:
            assert np.array_equal(view(m), want)
            assert fh.wait(timeout=30)
        assert np.array_equal(view(m), want)
        with pytest.raises(CheckpointError, match="do not match"), lazy_restore(path, [(m.addr, 8 * P)]):
            pytest.fail("entered")


# -- a full disk -------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_disk_full_clear_error_previous_generation_intact(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    with small_tmpfs(tmp_path / "small", "3M") as d, Mapping(256) as m:  # 1 MiB of memory
        path = d / "full.ck"
        filler = d / "filler"
        filler.write_bytes(b"x" * (1100 << 10))
        v = view(m)
        v[:] = random_pages(rng, 256)
        with Checkpointer(path, [region(m)]) as c:
            c.checkpoint()
            gen1 = v.copy()
            sealed = os.path.getsize(path)
            v[:] = random_pages(rng, 256)  # another MiB: does not fit
            with pytest.raises(OSError) as ei:
                c.checkpoint()
            assert ei.value.errno == errno.ENOSPC
            assert "generation 2" in str(ei.value) and "unchanged" in str(ei.value)
            assert os.path.getsize(path) == sealed, "the failed generation was not cut off"
            assert inspect(path)["unsealed_tail_bytes"] == 0
            assert np.array_equal(restored(path, [256])[0], gen1)
            verify(path)
            filler.unlink()  # room again: the next checkpoint stores what the failed one found
            info = c.checkpoint()
            assert info.generation == 2 and info.pages == 256
        assert np.array_equal(restored(path, [256])[0], v)

        # compact needs room for a second copy: refused cleanly, the file intact.
        filler.write_bytes(b"x" * (900 << 10))
        h = file_hash(path)
        with pytest.raises(OSError) as ei:
            compact(path)
        assert ei.value.errno == errno.ENOSPC
        assert file_hash(path) == h and sorted(os.listdir(d)) == ["filler", "full.ck"]

        # A new checkpoint on a disk with no room at all: no file is left behind.
        with open(d / "rest", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"y" * 65536)
        with pytest.raises(OSError) as ei, Checkpointer(d / "new.ck", [region(m)]):
            pass
        assert ei.value.errno == errno.ENOSPC
        assert not (d / "new.ck").exists()


# -- bad input ---------------------------------------------------------------------------


def test_regions_that_do_not_match_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "match.ck"
    make_chain(path, np.random.default_rng(16), [16, 8], steps=1)
    h = file_hash(path)
    with Mapping(16) as a, Mapping(8) as b, Mapping(9) as c:
        for regs in ([region(a)], [region(a), region(c)], [region(b), region(a)], [region(a), region(b), region(c)]):
            with pytest.raises(CheckpointError, match="do not match"):
                restore(path, regs)
            with pytest.raises(CheckpointError, match="do not match"):
                Checkpointer(path, regs)
        view(a)[:] = 1
        with pytest.raises(CheckpointError, match="do not match"):
            restore(path, [region(a), region(c)])
        assert (view(a) == 1).all(), "memory written despite the mismatch"
        for bad in (0, 3, -1, True):
            with pytest.raises(CheckpointError, match="generations 1..2"):
                restore(path, [region(a), region(b)], bad)
    assert file_hash(path) == h


def test_paths_that_are_not_checkpoints(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(10000))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    text = tmp_path / "text"
    text.write_text("PGSCANCK is not enough\n")
    with Mapping(4) as m:
        for p in (junk, empty, text):
            h = file_hash(p)
            for fn in (lambda q: restore(q, [region(m)]), verify, inspect, compact,
                       *(() if p is empty else (lambda q: Checkpointer(q, [region(m)]),))):  # starts in empty
                with pytest.raises(CheckpointError, match="not a pagescan checkpoint"):
                    fn(p)
            assert file_hash(p) == h, f"{p.name} was modified"
        with pytest.raises(CheckpointError, match="directory"):
            inspect(tmp_path)
        with pytest.raises(FileNotFoundError):
            restore(tmp_path / "missing", [region(m)])
        with pytest.raises(FileNotFoundError):
            Checkpointer(tmp_path / "no" / "dir.ck", [region(m)])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["empty", "junk", "text"]


def test_unsealed_file_has_no_generation_and_a_writer_recovers_it(tmp_path: Path) -> None:
    path = tmp_path / "unsealed.ck"
    make_chain(path, np.random.default_rng(17), [8], steps=0)
    g = _layout(path)[0]
    with open(path, "r+b") as f:
        f.truncate(g.end - 1)  # the commit record is incomplete
    for fn in (lambda p: restore(p, [(0, 8 * P)]), lambda p: compact(p)):
        with pytest.raises(CheckpointError, match="no complete"):
            fn(path)
    assert inspect(path)["unsealed_tail_bytes"] == g.end - 1 - g.offset
    assert verify(path) == []
    with Mapping(8) as m:
        view(m)[:] = 9
        with Checkpointer(path, [region(m)]) as c:
            assert c.generations == 0 and c.checkpoint().generation == 1
        assert (restored(path, [8])[0] == 9).all()


# -- compaction --------------------------------------------------------------------------


def test_compact_folds_the_chain_into_one_full_generation(tmp_path: Path) -> None:
    path = tmp_path / "compact.ck"
    rng = np.random.default_rng(18)
    expected, _ = make_chain(path, rng, [64, 16], steps=4)
    before = os.path.getsize(path)
    copy = tmp_path / "copy.ck"
    shutil.copy(path, copy)
    assert compact(path) == 80
    info = inspect(path)
    assert len(info["generations"]) == 1 and info["generations"][0]["full"]
    zeros = sum(int((~e.any(axis=1)).sum()) for e in expected[-1])
    assert info["generations"][0]["zero_pages"] == zeros
    assert os.path.getsize(path) < before
    got = restored(path, [64, 16])
    assert all(np.array_equal(x, y) for x, y in zip(got, expected[-1]))
    verify(path)
    assert compact(copy, 2) == 80  # an older generation: later ones are dropped
    got = restored(copy, [64, 16], 1)
    assert all(np.array_equal(x, y) for x, y in zip(got, expected[1]))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["compact.ck", "copy.ck"]
    with Mapping(64) as a, Mapping(16) as b:  # a compacted file can be continued
        view(a)[:] = 1
        with Checkpointer(path, [region(a), region(b)]) as c:
            assert c.checkpoint().generation == 2
        assert (restored(path, [64, 16])[0] == 1).all()


def test_restore_into_another_process(tmp_path: Path) -> None:
    path = tmp_path / "pid.ck"
    expected, _ = make_chain(path, np.random.default_rng(19), [32], steps=1)

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        m = Mapping(32)
        report(struct.pack("Q", m.addr).hex().encode())
        wait_go(go_r)
        report(blake(view(m)).encode())

    o = Owner(body)
    (addr,) = struct.unpack("Q", bytes.fromhex(o.read(16).decode()))
    try:
        assert restore(path, [(addr, 32 * P)], 1, pid=o.pid) == 1
    finally:
        o.go()
    assert o.read(128).decode() == blake(expected[0][0])
    status, _ = o.finish()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_restore_with_pid_takes_exact_pairs(tmp_path: Path) -> None:
    """With ``pid`` a pair is exact bytes at any address, as ``pagescan restore`` takes
    it: an entry of 1000 bytes goes to ``(address, 1000)``, and nothing around it is
    written (before, the length was rounded up to a page and the sizes never matched)."""
    path = tmp_path / "exact.ck"
    src = np.arange(125, dtype=np.uint64)  # 1000 bytes
    with snap.Checkpointer(path, {"a": src}) as ck:
        ck.checkpoint()
    with Mapping(2) as m:
        view(m)[:] = 0xEE
        at = m.addr + 16
        assert restore(path, {"a": (at, 1000)}, pid=os.getpid()) == 1
        assert ctypes.string_at(at, 1000) == src.tobytes()
        assert ctypes.string_at(m.addr, 16) == b"\xee" * 16
        assert ctypes.string_at(at + 1000, 2 * P - 1016) == b"\xee" * (2 * P - 1016)
        with pytest.raises(CheckpointError, match="4096 bytes here and 1000"):
            restore(path, {"a": (m.addr, P)}, pid=os.getpid())


# -- command line ------------------------------------------------------------------------


def test_cli_inspect_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.ck"
    make_chain(path, np.random.default_rng(20), [32, 8], steps=2)
    assert pagescan.cli.main(["checkpoint", "inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert "2 entries (sequence" in lines[0] and "3 sealed generation(s)" in lines[0]
    assert lines[1].split() == ["ENTRY", "DTYPE", "SHAPE", "BYTES"]
    assert lines[2].split() == ["0", "bytes", f"({32 * P},)", str(32 * P)]
    assert lines[4].split() == ["GEN", "PARENT", "PAGES", "DATA", "ZERO", "SIZE"]
    assert lines[5].split()[:3] == ["1", "full", "40"] and lines[6].split()[:2] == ["2", "1"]
    assert pagescan.cli.main(["checkpoint", "inspect", "--json", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out) == inspect(path)


def test_cli_verify_ok_and_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "v.ck"
    make_chain(path, np.random.default_rng(21), [16], steps=1)
    assert pagescan.cli.main(["checkpoint", "verify", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "ok: 2 generation(s)" in out and err == ""  # not a terminal: no progress bar
    g = _layout(path)[1]
    with Store(path) as st:
        offs = st.data_offsets(g)
    k = int(np.flatnonzero(offs >= 0)[0])
    _flip(path, int(offs[k]) + 5)
    assert pagescan.cli.main(["checkpoint", "verify", str(path)]) == 1
    out, err = capsys.readouterr()
    page = int(g.index[k]["page"])
    assert err.startswith("pagescan: CorruptCheckpointError: ")
    assert f"generation 2, region 0, page {page}:" in err and err.count("\n") == 1


def _two_generations(path: Path) -> tuple[snap.Checkpointer, np.ndarray]:
    """A Checkpointer (open) of one page-owning array, two generations sealed."""
    a = pagescan.zeros(4 * P, np.uint8)
    ck = snap.Checkpointer(path, {"a": a})
    ck.checkpoint()
    a[1] = 7
    ck.checkpoint()
    return ck, a


def test_a_writer_locks_the_file_its_path_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Checkpointer that opened the file just before ``compact`` renamed a new one over
    it (the lock holder before it) locks and continues the file the path names now:
    before, its generations went into the unnamed old inode, reported as sealed."""
    import pagescan.snapshot._store as store_mod

    path = tmp_path / "c.ck"
    ck, a = _two_generations(path)
    ck.close()
    newer = tmp_path / "newer.ck"
    shutil.copy(path, newer)
    compact(newer)
    real, swapped = store_mod._lock, []

    def lock(fd: int, name: str) -> None:
        if not swapped:  # as if preempted between open and flock while compact finished
            swapped.append(os.stat(path).st_ino)
            os.replace(newer, path)
        real(fd, name)

    monkeypatch.setattr(store_mod, "_lock", lock)
    with snap.Checkpointer(path, {"a": a}) as ck:
        a[0] = 42
        info = ck.checkpoint()
    assert swapped and os.stat(path).st_ino != swapped[0]
    assert snap.load(path)["a"][0] == 42 and len(inspect(path)["generations"]) == info.generation


@pytest.mark.parametrize("how", ["shortened", "replaced"])
def test_a_file_changed_under_a_checkpointer_is_not_written_to(tmp_path: Path, how: str) -> None:
    """Shortened (or removed, renamed over) by someone else while open: the next
    checkpoint raises ``CheckpointError`` and writes nothing; before, the hole was
    padded with zeros (or the unnamed inode written) and the generation reported sealed."""
    path = tmp_path / "t.ck"
    ck, a = _two_generations(path)
    with ck:
        if how == "shortened":
            os.truncate(path, os.path.getsize(path) // 2)
        else:
            shutil.copy(path, tmp_path / "copy.ck")
            os.replace(tmp_path / "copy.ck", path)
        before = path.read_bytes()
        a[2] = 9
        with pytest.raises(CheckpointError, match="shorter|replaced") as ei:
            ck.checkpoint()
        assert "generation 3 was not written" in str(ei.value)
        assert path.read_bytes() == before


def test_a_twin_that_dies_at_once_fails_the_checkpoint_clearly(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The frozen copy ending right after the fork is an ``OSError`` naming it and the
    generation not written (a twin that lived through the reads gave a good generation);
    what was found written is carried to the next checkpoint."""
    import pagescan.snapshot._twin as twin_mod

    path = tmp_path / "tw.ck"
    a = pagescan.zeros(4 * P, np.uint8)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # not alone: the fork path
    other.start()
    try:
        with snap.Checkpointer(path, {"a": a}) as ck:
            ck._use_ptrace = False
            ck.checkpoint()
            a[3] = 5
            real = twin_mod._twin_main
            monkeypatch.setattr(twin_mod, "_twin_main", lambda parent: os._exit(3))
            failed = 0
            for i in range(300):  # it may end later, in the reads (the same message), or after them (a success)
                if failed == 3:
                    break
                a[2] = i % 256  # something to read every time
                try:
                    ck.checkpoint()
                except OSError as err:
                    assert re.search(r"frozen copy.*ended.*generation \d+ was not written", str(err)), err
                    failed += 1
            assert failed
            monkeypatch.setattr(twin_mod, "_twin_main", real)
            ck.checkpoint()
    finally:
        stop.set()
        other.join()
    assert snap.load(path)["a"][3] == 5


def test_compact_keeps_the_files_mode_and_owner_and_follows_a_link(tmp_path: Path) -> None:
    """``compact`` writes a new file and renames it over the old one: it keeps the old
    file's mode (a private 0600 checkpoint stays private) and owner, and compacts the
    file a symbolic link names, leaving the link in place."""
    a = pagescan.zeros(8 * P, np.uint8)
    real = tmp_path / "data" / "real.ck"
    real.parent.mkdir()
    with Checkpointer(real, {"a": a}) as ck:
        ck.checkpoint()
        a[0] = 1
        ck.checkpoint()
    os.chmod(real, 0o600)
    os.chown(real, 65534, 65534)  # (the tests run as root)
    link = tmp_path / "link.ck"
    link.symlink_to(real)
    compact(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    st = os.stat(real)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 65534, 65534)
    assert len(inspect(real)["generations"]) == 1 and snap.load(real)["a"][0] == 1
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.ck"]


def test_cli_compact_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.ck"
    expected, _ = make_chain(path, np.random.default_rng(22), [16], steps=2)
    assert pagescan.cli.main(["checkpoint", "compact", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "generation 3 of 3 -> 1 full generation of 16 pages" in out
    assert np.array_equal(restored(path, [16])[0], expected[-1][0])
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    for argv in (["checkpoint", "inspect", str(junk)], ["checkpoint", "verify", str(tmp_path / "missing")],
                 ["checkpoint", "compact", str(path), "-g", "5"]):
        assert pagescan.cli.main(argv) == 1
        _, err = capsys.readouterr()
        assert err.startswith("pagescan: ") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as ei:
        pagescan.cli.main(["checkpoint", "compact", str(path), "-g", "0"])
    assert ei.value.code == 2
    capsys.readouterr()


def test_cli_restore_into_another_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.ck"
    expected, _ = make_chain(path, np.random.default_rng(23), [24, 8], steps=2)

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        a, b = Mapping(24), Mapping(8)
        report(struct.pack("QQ", a.addr, b.addr).hex().encode())
        wait_go(go_r)
        report((blake(view(a)) + blake(view(b))).encode())

    o = Owner(body)
    addr_a, addr_b = struct.unpack("QQ", bytes.fromhex(o.read(32).decode()))
    try:
        assert pagescan.cli.main(["restore", str(path), str(o.pid), hex(addr_a)]) == 1
        _, err = capsys.readouterr()
        assert "give 2 address(es), not 1" in err
        # ADDR:BYTES: the object's length there, checked against the file's entry first.
        assert pagescan.cli.main(["restore", str(path), str(o.pid), f"{addr_a:x}:{24 * P}", f"{addr_b:x}:{4 * P}"]) == 1
        _, err = capsys.readouterr()
        assert f"entry 1 is {8 * P} bytes, not the {4 * P} given" in err and "nothing written" in err
        with pytest.raises(SystemExit):
            pagescan.cli.main(["restore", str(path), str(o.pid), f"{addr_a:x}:12k", hex(addr_b)])
        assert "not a decimal length" in capsys.readouterr()[1]
        assert pagescan.cli.main(["restore", str(path), str(o.pid), f"{addr_a:x}:{24 * P}", hex(addr_b), "-g", "2"]) == 0
        out, err = capsys.readouterr()
        assert f"restored generation 2 of {path} into pid {o.pid}" in out and err == ""
    finally:
        o.go()
    assert o.read(256).decode() == blake(expected[1][0]) + blake(expected[1][1])
    status, _ = o.finish()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_cli_progress_bar_only_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real pseudo-terminal as stderr gets a progress bar; a pipe (capsys) gets none."""
    from pagescan.cli._checkpoint import ProgressBar

    path = tmp_path / "tty.ck"
    make_chain(path, np.random.default_rng(24), [64], steps=0)
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            bar = ProgressBar("verify", P, stream=tty, delay=0)
            verify(path, progress=bar)
            bar.close()
        drawn = ""
        deadline = time.monotonic() + 10  # the pty delivers the bytes when it gets to them
        while not drawn.endswith("\r\x1b[K") and select.select([master], [], [], max(0, deadline - time.monotonic()))[0]:
            drawn += os.read(master, 65536).decode()
        assert "verify [" in drawn and "100%" in drawn and drawn.endswith("\r\x1b[K")
    finally:
        os.close(master)
        os.close(slave)
    quiet = ProgressBar("verify", P, delay=0)  # capsys: stderr is not a terminal
    quiet(1, 2)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_bulk_work_lowers_the_gil_switch_interval_and_restores_the_programs(tmp_path: Path) -> None:
    """``restore`` runs with the switch interval at 0.1 ms (as do ``load`` and a
    checkpoint's pause and write: a busy Python thread would otherwise hold the GIL a
    whole interval after each of their thousands of GIL-releasing calls, measured 45 s
    instead of 3 s for a load), seen from its ``progress`` callback; the program's own
    interval is back after each of them, also when the call fails."""
    import sys

    import pagescan
    from pagescan.snapshot import Checkpointer, load, restore

    mine = 0.0023
    old = sys.getswitchinterval()
    sys.setswitchinterval(mine)
    try:
        state = {"a": pagescan.zeros(8 * snap.BATCH_PAGES * P // 8)}
        state["a"][::512] = 1
        seen: list[float] = []
        path = tmp_path / "gil.ckpt"
        with Checkpointer(path, state) as ck:
            ck.checkpoint()
            ck.checkpoint(progress=lambda done, total: None)
        assert sys.getswitchinterval() == pytest.approx(mine)
        restore(path, state, progress=lambda done, total: seen.append(sys.getswitchinterval()))
        assert sys.getswitchinterval() == pytest.approx(mine)
        assert len(seen) > 2 and seen == pytest.approx([1e-4] * len(seen))
        assert load(path)["a"][512] == 1
        assert sys.getswitchinterval() == pytest.approx(mine)
        with pytest.raises(FileNotFoundError):
            load(tmp_path / "missing.ckpt")
        with pytest.raises(ValueError):
            restore(path, {"b": state["a"]})
        assert sys.getswitchinterval() == pytest.approx(mine)
    finally:
        sys.setswitchinterval(old)


def test_a_nested_quick_gil_at_any_line_restores_the_programs_interval() -> None:
    """A signal handler (or ``__del__``) may nest a ``quick_gil`` use between any two
    lines of the one it interrupts: the nested use runs lowered or at the program's
    interval, never saves the lowered one, and the program's interval is back after
    the outer use, wherever the nest happened."""
    import sys

    from pagescan.snapshot import _gil

    code = _gil.quick_gil.__wrapped__.__code__  # type: ignore[attr-defined]
    lines = sorted({ln for _, _, ln in code.co_lines() if ln is not None})
    mine, old = 0.0031, sys.getswitchinterval()
    sys.setswitchinterval(mine)
    try:
        for at in lines:
            fired: list[float] = []

            def tracer(frame: Any, event: str, arg: Any) -> Any:
                if frame.f_code is not code:
                    return None
                if event == "line" and frame.f_lineno == at and not fired:
                    fired.append(-1.0)
                    sys.settrace(None)
                    try:
                        with _gil.quick_gil():
                            fired.append(sys.getswitchinterval())
                    finally:
                        sys.settrace(tracer)
                return tracer

            sys.settrace(tracer)
            try:
                with _gil.quick_gil():
                    pass
            finally:
                sys.settrace(None)
            assert sys.getswitchinterval() == pytest.approx(mine), f"nested at line {at}"
            assert not getattr(_gil, "_depth", None)
            if fired:
                assert fired[1] in (pytest.approx(1e-4), pytest.approx(mine))
    finally:
        sys.setswitchinterval(old)


def test_a_child_forked_during_quick_gil_keeps_only_its_own_thread_s_uses() -> None:
    """A child forked while another thread is inside ``quick_gil`` gets the program's
    interval back (that thread is not in the child); one forked from inside a use keeps
    it lowered until that use ends, then restores it."""
    import sys

    from pagescan.snapshot import _gil

    mine, old = 0.0027, sys.getswitchinterval()
    sys.setswitchinterval(mine)
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with _gil.quick_gil():
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert inside.wait(30)
        for nested in (False, True):
            r, w = os.pipe()
            during = 0.0
            with _gil.quick_gil() if nested else contextlib.nullcontext():
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child
                    during = sys.getswitchinterval()
            if pid == 0:  # pragma: no cover - the child, its use (if any) ended
                try:
                    ok = (abs(during - (1e-4 if nested else mine)) < 2e-6
                          and abs(sys.getswitchinterval() - mine) < 2e-6)
                    os.write(w, b"1" if ok else f"{during} {sys.getswitchinterval()}".encode())
                finally:
                    os._exit(0)
            os.close(w)
            got = os.read(r, 64)
            os.close(r)
            os.waitpid(pid, 0)
            assert got == b"1", (nested, got)
    finally:
        leave.set()
        t.join()
        sys.setswitchinterval(old)
    assert sys.getswitchinterval() == pytest.approx(old) and not _gil._depth


def test_reads_across_superseded_pages_give_every_generation_exactly(tmp_path: Path) -> None:
    """A generation's data pages lie in the file with pages a newer generation superseded
    between them: reads span those gaps (up to a few pages, dropped) or stop at larger
    ones. Every pattern of gaps, loaded and restored, gives each generation bit-exact."""
    from pagescan.snapshot import Checkpointer, load, restore

    n = 3000
    a = pagescan.zeros(n * P // 8, np.int64)
    rng = np.random.default_rng(11)
    a[:] = rng.integers(1, 1 << 62, a.size)
    path = tmp_path / "gaps.ckpt"
    want = []
    with Checkpointer(path, {"a": a}) as ck:
        ck.checkpoint()
        want.append(a.copy())
        page = np.arange(n)
        for rewrite in (page % 3 == 0, (page % 11 < 2) | (page % 17 == 5), rng.random(n) < 0.3, page % 5 == 4):
            rows = a.reshape(n, P // 8)
            rows[rewrite, 1] += 1
            ck.checkpoint()
            want.append(a.copy())
    for g, w in enumerate(want, 1):
        np.testing.assert_array_equal(load(path, g)["a"], w)
        b = pagescan.zeros(n * P // 8, np.int64)
        restore(path, {"a": b}, g)
        np.testing.assert_array_equal(b, w)
