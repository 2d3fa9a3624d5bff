"""Reading and appending checkpoint files (format in :mod:`._format`)."""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import BinaryIO

import numpy as np

from ._format import (
    COMMIT,
    FILE_HEADER,
    GEN_HEADER,
    INDEX_DTYPE,
    KIND_DATA,
    MAGIC_COMMIT,
    MAGIC_FILE,
    MAGIC_GEN,
    VERSION,
    digest,
    page_checksums,
)

__all__ = ["CheckpointError", "CorruptCheckpointError", "Generation", "Store"]


class CheckpointError(ValueError):
    """A path is not a checkpoint, or regions do not match it."""


class CorruptCheckpointError(CheckpointError):
    """A sealed part of a checkpoint file is damaged (names the generation and page)."""


CheckpointError.__module__ = "pagescan.snapshot"
CorruptCheckpointError.__module__ = "pagescan.snapshot"


@dataclasses.dataclass(frozen=True)
class Generation:
    """One sealed generation: where its index and data live in the file."""

    number: int
    parent: int  # 0 for a full generation
    offset: int  # of the record header
    end: int  # just past the commit record
    index: np.ndarray  # INDEX_DTYPE
    data_offset: int  # file offset of the first data page

    @property
    def pages(self) -> int:
        return len(self.index)

    @property
    def data_pages(self) -> int:
        return int((self.index["kind"] == KIND_DATA).sum())


def _pread_exact(fd: int, n: int, off: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), off + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class Store:
    """An open checkpoint file: its header, sealed generations and the sealed length."""

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        self.path = os.fspath(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self.fd = os.open(self.path, flags)
        try:
            self._load()
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def create(cls, path: str | os.PathLike[str], page_size: int, lengths: list[int]) -> Store:
        """Create a new, empty checkpoint file (fails if it exists)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            head = FILE_HEADER.pack(MAGIC_FILE, VERSION, page_size, len(lengths), 0, 0, 0, 0, 0, b"\0" * 8)
            head = head[:-8] + digest(head[:-8])
            table = np.asarray(lengths, dtype="<u8").tobytes()
            os.write(fd, head + table + digest(table))
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path)
        return cls(path, writable=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------

    def _load(self) -> None:
        head = _pread_exact(self.fd, FILE_HEADER.size, 0)
        if len(head) < FILE_HEADER.size or head[:8] != MAGIC_FILE:
            raise CheckpointError(f"{self.path} is not a pagescan checkpoint (bad magic)")
        magic, version, page_size, nregions, _r, _a, _b, _c, _d, dig = FILE_HEADER.unpack(head)
        if digest(head[:-8]) != dig:
            raise CorruptCheckpointError(f"{self.path}: file header is damaged (checksum mismatch)")
        if version != VERSION:
            raise CheckpointError(f"{self.path}: unsupported checkpoint version {version}")
        table = _pread_exact(self.fd, 8 * nregions + 8, FILE_HEADER.size)
        if len(table) < 8 * nregions + 8 or digest(table[:-8]) != table[-8:]:
            raise CorruptCheckpointError(f"{self.path}: region table is damaged")
        self.page_size = page_size
        self.lengths = [int(x) for x in np.frombuffer(table[:-8], dtype="<u8")]
        self.generations: list[Generation] = []
        off = FILE_HEADER.size + len(table)
        size = os.fstat(self.fd).st_size
        while off + GEN_HEADER.size + COMMIT.size <= size:
            gen = self._read_generation(off, size)
            if gen is None:
                break
            self.generations.append(gen)
            off = gen.end
        #: Length of the sealed prefix; anything after it is an unsealed tail.
        self.sealed_end = off
        self.file_size = size

    def _read_generation(self, off: int, size: int) -> Generation | None:
        raw = _pread_exact(self.fd, GEN_HEADER.size, off)
        magic, number, npages, ndata, parent, index_bytes, _res, dig = GEN_HEADER.unpack(raw)
        if magic != MAGIC_GEN or digest(raw[:-8]) != dig:
            return None  # not a (complete) record header: unsealed tail
        if index_bytes != npages * INDEX_DTYPE.itemsize:
            return None
        data_off = off + GEN_HEADER.size + index_bytes
        commit_off = data_off + ndata * self.page_size
        if commit_off + COMMIT.size > size:
            return None
        craw = _pread_exact(self.fd, COMMIT.size, commit_off)
        cmagic, cgen, goff, length, idig, _x, _y, cdig = COMMIT.unpack(craw)
        if cmagic != MAGIC_COMMIT or digest(craw[:-8]) != cdig or cgen != number or goff != off:
            return None  # never sealed
        if length != commit_off - off:
            return None
        expected = self.generations[-1].number + 1 if self.generations else 1
        idx_raw = _pread_exact(self.fd, index_bytes, off + GEN_HEADER.size)
        if digest(idx_raw) != idig:
            raise CorruptCheckpointError(f"{self.path}: page index of generation {number} is damaged")
        if number != expected:
            raise CorruptCheckpointError(f"{self.path}: generation {number} follows {expected - 1}")
        index = np.frombuffer(idx_raw, dtype=INDEX_DTYPE)
        if int((index["kind"] == KIND_DATA).sum()) != ndata:
            raise CorruptCheckpointError(f"{self.path}: generation {number}: index and data disagree")
        if len(index) and (
            int(index["region"].max()) >= len(self.lengths)
            or bool((index["page"] * np.uint64(self.page_size) >= np.asarray(self.lengths, np.uint64)[index["region"]]).any())
        ):
            raise CorruptCheckpointError(f"{self.path}: generation {number}: index names pages outside the regions")
        return Generation(number, parent, off, commit_off + COMMIT.size, index, data_off)

    def generation(self, number: int | None) -> Generation:
        if not self.generations:
            raise CheckpointError(f"{self.path} has no complete (sealed) generation")
        if number is None:
            return self.generations[-1]
        if not 1 <= number <= len(self.generations):
            raise CheckpointError(f"{self.path} has generations 1..{len(self.generations)}, not {number}")
        return self.generations[number - 1]

    def latest_map(self, number: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For every page of every region: (generation number, index position) holding it.

        Generation 0 means "never stored". Pages are numbered region by region.
        """
        target = self.generation(number).number
        base = np.concatenate([[0], np.cumsum([n // self.page_size for n in self.lengths])]).astype(np.int64)
        total = int(base[-1])
        gen_of = np.zeros(total, dtype=np.int64)
        pos_of = np.zeros(total, dtype=np.int64)
        for g in self.generations[:target]:
            if g.parent == 0:
                gen_of[:] = 0
            flat = base[g.index["region"].astype(np.int64)] + g.index["page"].astype(np.int64)
            gen_of[flat] = g.number
            pos_of[flat] = np.arange(len(g.index))
        return gen_of, pos_of

    def data_offsets(self, g: Generation) -> np.ndarray:
        """File offset of each index entry's data (-1 for zero pages)."""
        is_data = g.index["kind"] == KIND_DATA
        rank = np.cumsum(is_data) - 1
        out = np.where(is_data, g.data_offset + rank * self.page_size, -1)
        return out.astype(np.int64)

    def read_pages(self, g: Generation, positions: np.ndarray, verify: bool = True) -> np.ndarray:
        """Pages at index ``positions`` of ``g`` as an ``(n, page_size)`` uint8 array."""
        P = self.page_size
        out = np.zeros((len(positions), P), dtype=np.uint8)
        offs = self.data_offsets(g)[positions]
        data = offs >= 0
        idx = np.flatnonzero(offs >= 0)
        if idx.size:
            # Read runs of consecutive file offsets with one preadv each, into a
            # contiguous buffer, then scatter the rows to their positions.
            o = offs[idx]
            tmp = np.empty((idx.size, P), dtype=np.uint8)
            cuts = np.flatnonzero(np.diff(o) != P) + 1
            for s0, e0 in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [idx.size]]).tolist()):
                want_bytes = (e0 - s0) * P
                got = os.preadv(self.fd, [memoryview(tmp[s0:e0]).cast("B")], int(o[s0]))
                if got != want_bytes:
                    raise CorruptCheckpointError(f"{self.path}: generation {g.number}: page data truncated")
            out[idx] = tmp
        if verify and len(positions):
            want = g.index["checksum"][positions]
            bad = np.flatnonzero(page_checksums(out) != want)
            if bad.size:
                ent = g.index[positions[bad[0]]]
                raise CorruptCheckpointError(
                    f"{self.path}: generation {g.number}, region {int(ent['region'])}, page {int(ent['page'])}: "
                    f"checksum mismatch (page data damaged; {bad.size} bad page(s) in this read)"
                )
        return out

    # -- writing --------------------------------------------------------------------

    def truncate_unsealed(self) -> None:
        """Drop an unsealed tail left by an interrupted writer."""
        if self.file_size != self.sealed_end:
            os.ftruncate(self.fd, self.sealed_end)
            os.fsync(self.fd)
            self.file_size = self.sealed_end

    def append(self, index: np.ndarray, pages: np.ndarray, parent: int) -> Generation:
        """Append and seal a generation: ``pages`` holds the DATA entries' pages, in order.

        On any failure (ENOSPC, ...) the file is cut back to its sealed prefix, so the
        previous generations stay intact, and the error is raised.
        """
        P = self.page_size
        number = (self.generations[-1].number + 1) if self.generations else 1
        off = self.sealed_end
        idx_raw = np.ascontiguousarray(index, dtype=INDEX_DTYPE).tobytes()
        ndata = len(pages)
        head = GEN_HEADER.pack(MAGIC_GEN, number, len(index), ndata, parent, len(idx_raw), 0, b"\0" * 8)
        head = head[:-8] + digest(head[:-8])
        length = GEN_HEADER.size + len(idx_raw) + ndata * P
        commit = COMMIT.pack(MAGIC_COMMIT, number, off, length, digest(idx_raw), 0, 0, b"\0" * 8)
        commit = commit[:-8] + digest(commit[:-8])
        try:
            _pwrite_all(self.fd, head + idx_raw, off)
            if ndata:
                _pwrite_all(self.fd, memoryview(np.ascontiguousarray(pages)).cast("B"), off + GEN_HEADER.size + len(idx_raw))
            os.fsync(self.fd)  # everything the commit record vouches for is durable first
            _pwrite_all(self.fd, commit, off + length)
            os.fsync(self.fd)
        except BaseException:
            try:
                os.ftruncate(self.fd, off)
                os.fsync(self.fd)
            except OSError:
                pass
            raise
        gen = Generation(number, parent, off, off + length + COMMIT.size, np.frombuffer(idx_raw, INDEX_DTYPE),
                         off + GEN_HEADER.size + len(idx_raw))
        self.generations.append(gen)
        self.sealed_end = gen.end
        self.file_size = gen.end
        return gen


def _pwrite_all(fd: int, data: bytes | memoryview, off: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], off + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
