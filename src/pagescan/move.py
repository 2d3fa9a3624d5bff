"""``move_pages``: ``UFFDIO_MOVE`` with resumption and a copy fallback.

``UFFDIO_MOVE`` (Linux 6.8) moves anonymous private pages from ``src`` to ``dst`` by
rewriting page tables: no copy, the source becomes a hole. The kernel requires:

* ``dst`` registered with the uffd issuing the move (any mode), and empty: a populated
  page, or a uffd-wp marker left by write-protecting an empty page, gives EEXIST;
* ``src`` and ``dst`` each inside one private anonymous VMA with the same protection;
* the caller to be the process that owns the memory (EINVAL from any other process);
* the source page to be exclusively owned (EBUSY after ``fork`` shared it, for KSM or
  DMA-pinned pages -- it stays EBUSY after the child exits, until the parent writes it).

On EBUSY (or a kernel without MOVE) the kernel review suggested user space copy the
page and drop the source; ``fallback="copy"`` does that, page by page for the pages that
cannot move: ``UFFDIO_COPY`` into ``dst`` (atomic with respect to faults on ``dst``)
then ``MADV_DONTNEED`` on the source page.
"""

from __future__ import annotations

import errno
import mmap
from typing import NamedTuple

from ._args import check_aligned, u64
from ._procfs import task_size as _task_size
from ._errors import InvalidArgumentError, KernelFeatureError, PartialProgressError
from ._uapi import libc
from ._uapi.mman import MADV
from ._scan import scan
from ._uapi.pagemap import Category
from ._uapi.userfaultfd import RegisterMode
from .userfaultfd import Userfaultfd

_PRESENT = int(Category.PRESENT)

__all__ = ["MoveResult", "move_pages"]

P = mmap.PAGESIZE
_FALLBACKS = ("copy", None)


class MoveResult(NamedTuple):
    """Bytes moved by ``UFFDIO_MOVE`` and bytes copied by the fallback."""

    moved: int
    copied: int


def move_pages(
    dst: int,
    src: int,
    length: int,
    *,
    fallback: str | None = "copy",
    allow_src_holes: bool = False,
    uffd: Userfaultfd | None = None,
) -> MoveResult:
    """Move ``length`` bytes of anonymous pages from ``src`` to ``dst`` in this process.

    Args:
        dst, src, length: page aligned; ``dst`` must be unpopulated.
        fallback: ``"copy"``: pages the kernel will not move (EBUSY: not exclusive) are
            copied then dropped from ``src``, and a kernel without ``UFFDIO_MOVE`` copies
            everything; ``None``: raise instead.
        allow_src_holes: treat unpopulated source pages as moved (``dst`` stays empty
            there) instead of failing with ENOENT.
        uffd: a userfaultfd that already has ``dst`` registered (for example one that
            write-protects it: its uffd-wp markers on empty pages are cleared first, or
            the move would fail with EEXIST). By default a private uffd registers
            ``dst`` for the duration of the call.

    Returns:
        :class:`MoveResult`.

    Raises:
        FileExistsError: ``dst`` is populated (EEXIST).
        FileNotFoundError: a source hole without ``allow_src_holes`` (ENOENT).
        OSError: EBUSY with ``fallback=None``; EINVAL for shared/file/hugetlb memory or
            misaligned arguments; EBUSY at registration when ``dst`` belongs to another
            uffd (pass that one as ``uffd``).
        KernelFeatureError: no ``UFFDIO_MOVE`` and ``fallback=None``.

    An error after partial progress leaves the pages before it moved (or copied); the
    exception's ``result`` attribute is the :class:`MoveResult` of that progress, so the
    caller can resume at ``dst + moved + copied``.
    """
    dst, src, length = (u64("dst", dst, bool_ok=False), u64("src", src, bool_ok=False),
                        u64("length", length, bool_ok=False))
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {_FALLBACKS}, not {fallback!r}")
    if uffd is not None and not isinstance(uffd, Userfaultfd):
        raise TypeError(f"uffd must be a pagescan.Userfaultfd or None, not {type(uffd).__name__}")
    check_aligned("move_pages", "dst", dst)
    check_aligned("move_pages", "src", src)
    if length == 0 or length % P:
        raise InvalidArgumentError(f"move_pages: length {length} is not a non-zero multiple of the page size ({P})")
    limit = _task_size()
    for name, at in (("src", src), ("dst", dst)):
        if at + length > limit:
            raise InvalidArgumentError(f"move_pages: {name} [{at:#x}, {at + length:#x}) ends beyond user space "
                                       f"({limit:#x})")
    if dst < src + length and src < dst + length:
        raise InvalidArgumentError(
            f"move_pages: src [{src:#x}, {src + length:#x}) and dst [{dst:#x}, {dst + length:#x}) overlap")

    own = uffd is None
    uf = Userfaultfd(0) if uffd is None else uffd
    try:
        if own:
            uf.register(dst, length, RegisterMode.MISSING)
        else:
            # Only the markers on empty pages are to go: with a page present the move
            # fails (EEXIST) anyway, so fail before touching the caller's protection.
            if len(scan(dst, dst + length, category_mask=_PRESENT, return_mask=_PRESENT, max_pages=1, vec_len=1)):
                err = FileExistsError(errno.EEXIST, f"move_pages: dst [{dst:#x}, {dst + length:#x}) is populated")
                err.result = MoveResult(0, 0)  # type: ignore[attr-defined]  # nothing done
                raise err
            try:
                uf.writeprotect(dst, length, enable=False)  # drop uffd-wp markers (EEXIST otherwise)
            except OSError as err:
                if err.errno != errno.ENOENT:  # ENOENT: dst is not WP-registered, nothing to clear
                    raise
        return _move(uf, dst, src, length, fallback, allow_src_holes)
    finally:
        if own:
            uf.close()


def _move(uf: Userfaultfd, dst: int, src: int, length: int, fallback: str | None, holes: bool) -> MoveResult:
    moved = copied = 0
    done = 0
    try:
        while done < length:
            try:
                uf.move(dst + done, src + done, length - done, allow_src_holes=holes)
                moved += length - done
                return MoveResult(moved, copied)
            except PartialProgressError as err:
                if err.done <= 0:
                    raise
                moved += err.done
                done += err.done  # retry the rest: the next call reports the real error, if any
            except OSError as err:
                missing = isinstance(err, KernelFeatureError) or err.errno == errno.ENOTTY
                if fallback != "copy" or not (err.errno == errno.EBUSY or missing):
                    raise
                if missing:
                    _copy_and_drop(uf, dst + done, src + done, length - done, holes)
                    return MoveResult(moved, copied + length - done)
                # EBUSY: this page is not exclusive; copy it and move on.
                _copy_and_drop(uf, dst + done, src + done, P, holes)
                copied += P
                done += P
    except OSError as err:
        err.result = MoveResult(moved, copied)  # type: ignore[attr-defined]  # what was done before
        raise
    return MoveResult(moved, copied)


def _copy_and_drop(uf: Userfaultfd, dst: int, src: int, length: int, holes: bool) -> None:
    """UFFDIO_COPY ``src`` to ``dst`` then ``MADV_DONTNEED`` the source."""
    if not holes:
        # Without allow_src_holes a hole is an error for MOVE; keep that for the copy.
        empty = int(Category.PRESENT | Category.SWAPPED)  # neither present nor swapped: a hole
        res = scan(src, src + length, category_mask=empty, category_inverted=empty, return_mask=0, vec_len=1)
        if len(res):
            raise FileNotFoundError(errno.ENOENT, f"source page {int(res.regions['start'][0]):#x} is not populated")
    off = 0
    while off < length:
        try:
            uf.copy(dst + off, src + off, length - off)
            off = length
        except PartialProgressError as err:
            if err.done <= 0:
                raise
            off += err.done
    libc.madvise(src, length, MADV.DONTNEED)
