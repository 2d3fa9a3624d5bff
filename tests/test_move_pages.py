"""pagescan.move_pages (UFFDIO_MOVE with resumption and a copy fallback) on real memory.

Oracles: ``/proc/self/pagemap`` (present bit, and the PFN -- readable as root -- which
proves a page was moved rather than copied), the bytes themselves, ``process_vm_readv``
into a forked child, and ``/proc/self/smaps`` VmFlags (``um``/``uw``: uffd-registered).
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np
import pytest

from pagescan import MoveResult, RegisterMode, Userfaultfd, WriteWatch, move_pages
from pagescan._uapi import libc
from pagescan._uapi.mman import MAP, PROT

from .conftest import requires_uffd_move
from .memory import Mapping, P, anon, child_process, memfd_mapping, pagemap_entries, shared_anon, vmflags

pytestmark = requires_uffd_move

PFN_MASK = (1 << 55) - 1


def present(m: Mapping) -> list[int]:
    return [int(e >> 63) for e in pagemap_entries(m.addr, m.npages)]


def pfns(m: Mapping) -> list[int]:
    return [e & PFN_MASK for e in pagemap_entries(m.addr, m.npages)]


def fill_random(m: Mapping, seed: int, pages: list[int] | None = None) -> bytes:
    """Random contents for ``pages`` of ``m`` (all by default); returns the whole image."""
    data = np.random.default_rng(seed).integers(0, 256, m.length, dtype=np.uint8).tobytes()
    for p in range(m.npages) if pages is None else pages:
        ctypes.memmove(m[p], data[p * P : (p + 1) * P], P)
    return data


def page(data: bytes, i: int) -> bytes:
    return data[i * P : (i + 1) * P]


def share_with_a_child(m: Mapping) -> None:
    """fork a child that exits at once: the parent's pages lose their exclusive flag."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0)
    os.waitpid(pid, 0)


# -- moving -----------------------------------------------------------------------------


def test_move_transfers_the_pages_and_leaves_holes() -> None:
    with anon(8) as src, anon(8) as dst:
        data = fill_random(src, 1)
        before = pfns(src)
        assert all(before), "needs PFNs (root)"
        assert move_pages(dst.addr, src.addr, src.length) == MoveResult(8 * P, 0)
        assert dst.read(0, 8) == data
        assert present(src) == [0] * 8
        assert pfns(dst) == before, "the same physical pages: moved, not copied"
        assert "um" not in vmflags(dst.addr), "the private registration is dropped"
        assert src.read(0, 8) == bytes(8 * P), "src is a hole: it reads zeros"


def test_move_part_of_a_range() -> None:
    with anon(8) as src, anon(8) as dst:
        data = fill_random(src, 2)
        assert move_pages(dst[2], src[4], 3 * P) == MoveResult(3 * P, 0)
        assert present(dst) == [0, 0, 1, 1, 1, 0, 0, 0]
        assert present(src) == [1, 1, 1, 1, 0, 0, 0, 1]
        assert dst.read(2, 3) == data[4 * P : 7 * P]
        assert src.read(0, 4) == data[: 4 * P] and src.read(7) == page(data, 7)


def test_source_hole_without_flag_stops_after_partial_progress_and_resumes() -> None:
    with anon(8) as src, anon(8) as dst:
        data = fill_random(src, 3, [0, 1, 2, 3, 5, 6, 7])
        with pytest.raises(FileNotFoundError) as ei:
            move_pages(dst.addr, src.addr, src.length)
        assert ei.value.errno == errno.ENOENT
        done = ei.value.result  # type: ignore[attr-defined]
        assert done == MoveResult(4 * P, 0), "the pages before the hole were moved"
        assert present(dst) == [1, 1, 1, 1, 0, 0, 0, 0]
        assert present(src) == [0, 0, 0, 0, 0, 1, 1, 1]
        # Resume after the hole.
        assert move_pages(dst[5], src[5], 3 * P) == MoveResult(3 * P, 0)
        assert [dst.read(i) for i in (0, 1, 2, 3, 5, 6, 7)] == [page(data, i) for i in (0, 1, 2, 3, 5, 6, 7)]


def test_allow_src_holes_moves_around_the_hole() -> None:
    with anon(8) as src, anon(8) as dst:
        data = fill_random(src, 4, [0, 1, 2, 3, 5, 6, 7])
        assert move_pages(dst.addr, src.addr, src.length, allow_src_holes=True) == MoveResult(8 * P, 0)
        assert present(dst) == [1, 1, 1, 1, 0, 1, 1, 1], "dst stays empty at the hole"
        assert present(src) == [0] * 8
        assert [dst.read(i) for i in (0, 1, 2, 3, 5, 6, 7)] == [page(data, i) for i in (0, 1, 2, 3, 5, 6, 7)]


def test_populated_destination_is_eexist() -> None:
    with anon(8) as src, anon(8) as dst:
        data = fill_random(src, 5)
        dst.write(2, 1, 0xEE)
        with pytest.raises(FileExistsError) as ei:
            move_pages(dst.addr, src.addr, src.length)
        assert ei.value.errno == errno.EEXIST
        assert ei.value.result == MoveResult(2 * P, 0)  # type: ignore[attr-defined]
        assert dst.read(2) == bytes([0xEE]) * P, "the populated page is left alone"
        assert present(src) == [0, 0, 1, 1, 1, 1, 1, 1]
        assert src.read(2, 6) == data[2 * P :], "pages not moved keep their data"
        with pytest.raises(FileExistsError) as ei:
            move_pages(dst[2], src[2], P, fallback="copy")  # no fallback for EEXIST
        assert ei.value.result == MoveResult(0, 0)  # type: ignore[attr-defined]


def test_a_populated_destination_under_the_callers_uffd_keeps_its_protection() -> None:
    """With the caller's uffd (write tracking on ``dst``), a populated ``dst`` is EEXIST
    before anything is done: the protection of its pages is left as it was (clearing
    it first made every page read as written)."""
    from pagescan import Category, UffdFeature, scan

    with anon(4) as src, anon(4) as dst, Userfaultfd(UffdFeature.WP_ASYNC) as uf:
        fill_random(src, 6)
        dst.write(0, 1, 0xEE)
        uf.register(dst.addr, dst.length, RegisterMode.WP)
        uf.writeprotect(dst.addr, dst.length)
        wr = int(Category.WRITTEN)
        assert len(scan(dst.addr, dst.end, category_mask=wr, return_mask=wr)) == 0
        with pytest.raises(FileExistsError) as ei:
            move_pages(dst.addr, src.addr, src.length, uffd=uf)
        assert ei.value.result == MoveResult(0, 0)  # type: ignore[attr-defined]
        assert len(scan(dst.addr, dst.end, category_mask=wr, return_mask=wr)) == 0
        assert present(src) == [1, 1, 1, 1]


# -- EBUSY: pages shared after fork -----------------------------------------------------


def test_shared_after_fork_without_fallback_raises_ebusy() -> None:
    with anon(8) as src, anon(8) as dst:
        data = fill_random(src, 6)
        with child_process(lambda: None):
            with pytest.raises(OSError) as ei:
                move_pages(dst.addr, src.addr, src.length, fallback=None)
            assert ei.value.errno == errno.EBUSY
            assert ei.value.result == MoveResult(0, 0)  # type: ignore[attr-defined]
        assert present(dst) == [0] * 8 and src.read(0, 8) == data
        # Still EBUSY after the child is gone (the exclusive flag is not restored) ...
        with pytest.raises(OSError) as ei:
            move_pages(dst.addr, src.addr, P, fallback=None)
        assert ei.value.errno == errno.EBUSY
        # ... until the parent writes the page.
        src.touch(0, 1, data[0])
        assert move_pages(dst.addr, src.addr, P, fallback=None) == MoveResult(P, 0)


def test_shared_after_fork_with_copy_fallback() -> None:
    with anon(8) as src, anon(8) as dst:
        data = fill_random(src, 7)
        with child_process(lambda: None) as pid:
            assert move_pages(dst.addr, src.addr, src.length, fallback="copy") == MoveResult(0, 8 * P)
            assert dst.read(0, 8) == data
            assert present(src) == [0] * 8, "the source pages were dropped"
            # The child's copy is untouched.
            buf = bytearray(src.length)
            assert libc.vm_read(pid, src.addr, buf) == src.length
            assert bytes(buf) == data
        assert "um" not in vmflags(dst.addr)


def test_resumes_past_a_shared_page_in_the_middle() -> None:
    """MOVE stops at the non-exclusive page; the rest is resumed around one copy."""
    with anon(8) as src, anon(8) as dst:
        fill_random(src, 8)
        share_with_a_child(src)
        data = fill_random(src, 9, [0, 1, 2, 3, 5, 6, 7])  # writing makes these exclusive again
        expected = data[: 4 * P] + src.read(4) + data[5 * P :]
        before = pfns(src)
        assert move_pages(dst.addr, src.addr, src.length) == MoveResult(7 * P, P)
        assert dst.read(0, 8) == expected
        assert present(src) == [0] * 8
        after = pfns(dst)
        assert [after[i] == before[i] for i in range(8)] == [True] * 4 + [False] + [True] * 3

    with anon(8) as src, anon(8) as dst:
        fill_random(src, 10)
        share_with_a_child(src)
        data = fill_random(src, 11, [0, 1, 2, 3, 5, 6, 7])
        with pytest.raises(OSError) as ei:
            move_pages(dst.addr, src.addr, src.length, fallback=None)
        assert ei.value.errno == errno.EBUSY
        assert ei.value.result == MoveResult(4 * P, 0)  # type: ignore[attr-defined]
        assert present(dst) == [1] * 4 + [0] * 4 and present(src) == [0] * 4 + [1] * 4
        assert dst.read(0, 4) == data[: 4 * P]


# -- registration -----------------------------------------------------------------------


def test_write_protected_destination_markers_are_cleared(uffd_wp: Userfaultfd) -> None:
    with anon(8) as src, anon(8) as dst:
        data = fill_random(src, 12)
        uffd_wp.register(dst.addr, dst.length, RegisterMode.WP)
        uffd_wp.writeprotect(dst.addr, dst.length)  # unpopulated: uffd-wp markers
        assert all(e >> 57 & 1 for e in pagemap_entries(dst.addr, 8)), "markers installed"
        with pytest.raises(FileExistsError):
            uffd_wp.move(dst.addr, src.addr, P)  # the raw ioctl trips over a marker
        assert move_pages(dst.addr, src.addr, src.length, uffd=uffd_wp) == MoveResult(8 * P, 0)
        assert dst.read(0, 8) == data and present(src) == [0] * 8
        assert "uw" in vmflags(dst.addr), "a passed-in uffd keeps its registration"


def test_destination_registered_with_another_uffd() -> None:
    with anon(4) as src, anon(4) as dst, Userfaultfd(0) as uf:
        data = fill_random(src, 13)
        uf.register(dst.addr, dst.length, RegisterMode.MISSING)
        with pytest.raises(OSError) as ei:
            move_pages(dst.addr, src.addr, src.length)
        assert ei.value.errno == errno.EBUSY
        assert present(src) == [1] * 4
        assert move_pages(dst.addr, src.addr, src.length, uffd=uf) == MoveResult(4 * P, 0)
        assert dst.read(0, 4) == data


def test_destination_of_a_write_watch_is_busy() -> None:
    with anon(4) as src, anon(4) as dst, WriteWatch(dst.addr, dst.length):
        src.write(0, 4)
        with pytest.raises(OSError) as ei:
            move_pages(dst.addr, src.addr, src.length)
        assert ei.value.errno == errno.EBUSY


def test_uffd_without_destination_registered_is_einval() -> None:
    with anon(2) as src, anon(2) as dst, Userfaultfd(0) as uf:
        src.write(0, 2)
        with pytest.raises(OSError) as ei:
            move_pages(dst.addr, src.addr, src.length, uffd=uf)
        assert ei.value.errno == errno.EINVAL
        assert present(src) == [1, 1]


# -- memory that cannot move, bad arguments ---------------------------------------------


@pytest.mark.parametrize("kind", ["shared_both", "shared_src", "shared_dst", "memfd_src"])
def test_shared_memory_is_einval(kind: str) -> None:
    src = anon(2) if kind == "shared_dst" else (memfd_mapping(2) if kind == "memfd_src" else shared_anon(2))
    dst = shared_anon(2) if kind in ("shared_both", "shared_dst") else anon(2)
    with src, dst:
        src.write(0, 2, 0x11)
        with pytest.raises(OSError) as ei:
            move_pages(dst.addr, src.addr, src.length)
        assert ei.value.errno == errno.EINVAL
        assert src.read(0, 2) == bytes([0x11]) * 2 * P and present(dst) == [0, 0]


def test_bad_arguments() -> None:
    with anon(4) as src, anon(4) as dst:
        src.write(0, 4)
        for args in (("0", src.addr, P), (dst.addr, 1.0, P), (dst.addr, src.addr, True), (dst.addr, src.addr, None)):
            with pytest.raises(TypeError):
                move_pages(*args)
        with pytest.raises(ValueError):
            move_pages(-P, src.addr, P)
        with pytest.raises(ValueError, match="fallback"):
            move_pages(dst.addr, src.addr, P, fallback="zero")
        for d, s, n in ((dst.addr + 1, src.addr, P), (dst.addr, src.addr + 8, P), (dst.addr, src.addr, 100),
                        (dst.addr, src.addr, 0)):
            with pytest.raises(OSError) as ei:
                move_pages(d, s, n)
            assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as ei:
            move_pages(src[1], src.addr, 2 * P)  # overlapping
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError, match="beyond user space") as ei:
            move_pages(dst.addr, src.addr, 2**63)  # (not "overlap": the range is the problem)
        assert ei.value.errno == errno.EINVAL
        with anon(4, prot=PROT.READ) as ro:
            with pytest.raises(OSError) as ei:
                move_pages(ro.addr, src.addr, P)  # protections differ
            assert ei.value.errno == errno.EINVAL
        assert present(src) == [1] * 4 and present(dst) == [0] * 4


def test_unmapped_source_or_destination() -> None:
    with anon(2) as src, anon(2) as dst:
        src.write(0, 2)
        with Mapping(12, prot=PROT.NONE) as res:
            libc.munmap(res[4], 4 * P)  # a hole that no new mapping can fill in this test
            hole = res[4]
            with pytest.raises(FileNotFoundError):
                move_pages(dst.addr, hole, 2 * P)
            with pytest.raises(FileNotFoundError):
                move_pages(dst.addr, hole, 2 * P, allow_src_holes=True)  # no VMA at all
            with pytest.raises(OSError) as ei:
                move_pages(hole, src.addr, 2 * P)
            assert ei.value.errno == errno.EINVAL
            libc.mmap(hole, 4 * P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)  # refill for close
        assert present(src) == [1, 1]
