"""Reading and appending checkpoint files (the format is in ``_format``)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import mmap
from collections.abc import Callable, Iterator

import numpy as np

from .._args import NotRegularFileError
from .._args import open_regular as _open_regular
from .._uapi import libc
from ._format import (
    BLOCK_DTYPE,
    BLOCK_SIZE,
    COMMIT,
    ENTRY_SIZE,
    FILE_HEADER,
    GEN_HEADER,
    INDEX_BLOCK,
    INDEX_DTYPE,
    KIND_DATA,
    KIND_ZERO,
    MAGIC_COMMIT,
    MAGIC_FILE,
    MAGIC_GEN,
    MAGIC_SECTION,
    MAX_STATE_BYTES,
    READABLE_VERSIONS,
    SECTION_HEADER,
    VERSION,
    EntryMeta,
    block_table,
    decode_meta,
    digest,
    encode_meta,
    entry_checks,
    nblocks,
    page_checksums,
)

__all__ = [
    "Appender",
    "CheckpointError",
    "CorruptCheckpointError",
    "EmptyFileError",
    "Generation",
    "Section",
    "Store",
    "fsync_dir",
    "link_fd",
    "new_file",
    "open_regular",
]


class CheckpointError(ValueError):
    """A path is not a checkpoint, is in use, lacks a generation, or regions do not match it."""


class CorruptCheckpointError(CheckpointError):
    """A sealed part of a checkpoint file is damaged (names the generation and page)."""


class EmptyFileError(CheckpointError):
    """The file is empty (0 bytes): not a checkpoint yet. A writer starts one in it."""


_HOST_PAGE = mmap.PAGESIZE

#: Index blocks :meth:`Store.locate` reads (and verifies) at once when a block follows
#: one already read: 16 blocks cover 64 MiB of pages.
BLOCKS_AHEAD = 16
#: :meth:`Store.read_chunks` reads this many consecutive chunks or more held by several
#: generations in a few reads (:meth:`Store._read_window`: a prefetch window; a fault's
#: 16 pages cost less the plain way, a read per run) ...
WINDOW_MIN = 128
#: ... where at least this many entries of one generation share a read straight into
#: place (fewer are read with their file neighbours into scratch memory) ...
DIRECT_MIN = 8
#: ... and the most pages skipped between two pages read together into scratch memory.
SCATTER_GAP = 16
#: :meth:`Store._read_at` reads data pages at most this many pages apart in the file
#: with one call (the pages between are read too, and dropped).
READ_GAP = 4

CheckpointError.__module__ = "pagescan.snapshot"
CorruptCheckpointError.__module__ = "pagescan.snapshot"
EmptyFileError.__module__ = "pagescan.snapshot"


@dataclasses.dataclass(eq=False)
class Generation:
    """One sealed generation: where its index and data live in the file.

    ``table`` is its index block table (version 4; for older versions one built from
    the index read at open). The whole ``index`` is read (and verified) on first use
    when the store was opened with ``lazy_index``; :meth:`Store.locate` reads only the
    blocks it needs.
    """

    number: int
    parent: int  # 0 for a full generation
    offset: int  # of the record header
    end: int  # just past the commit record
    npages: int  # index entries
    ndata: int  # DATA entries
    data_offset: int  # file offset of the first data page
    table: np.ndarray  # BLOCK_DTYPE
    _index: np.ndarray | None = None  # INDEX_DTYPE, once read
    _store: Store | None = dataclasses.field(default=None, repr=False)

    @property
    def index(self) -> np.ndarray:
        if self._index is None:
            assert self._store is not None
            self._index = self._store.read_index(self)
        return self._index

    @property
    def pages(self) -> int:
        return self.npages

    @property
    def data_pages(self) -> int:
        return self.ndata


@dataclasses.dataclass(frozen=True)
class Section:
    """One optional section (a working-set record, ...): type, the generation it is about, where."""

    type: int
    generation: int
    offset: int  # of the section header
    end: int  # just past its commit record
    payload_offset: int
    payload_bytes: int


def open_regular(path: str, flags: int) -> int:
    """``open`` without blocking, refusing anything but a regular file
    (:func:`pagescan._args.open_regular`) as a :class:`CheckpointError`."""
    try:
        return _open_regular(path, flags, "checkpoint path")
    except NotRegularFileError as err:
        raise CheckpointError(f"{err}, not a pagescan checkpoint") from None


def _pread_exact(fd: int, n: int, off: int) -> bytes:
    """Up to ``n`` bytes at ``off`` (fewer only at the end of the file), read in place."""
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [mv[got:]], off + got)
        if not k:
            break
        got += k
    mv.release()
    if got < n:
        del buf[got:]
    return bytes(buf) if n < 4096 else buf  # type: ignore[return-value]  # bytes-like either way


class Store:
    """An open checkpoint file: its header, sealed generations and the sealed length.

    A damaged sealed generation does not make the file unreadable: the generations
    before it stay usable, and :attr:`damage` holds the error, raised by
    :meth:`generation` for the newest generation or any at or after the damage.
    ``lock=True`` takes the writer's lock (``flock``), failing at once if another
    writer holds it.
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False, lock: bool = False,
                 lazy_index: bool = False, _fd: int | None = None, _unnamed: bool = False) -> None:
        self.path = os.fspath(path)
        #: A file being made (``O_TMPFILE``), linked once complete: no name to lose yet.
        self.unnamed = _unnamed
        self.writable = writable
        #: Version 4: read and verify index blocks when first used, not at open (a lazy
        #: load: the open costs the same at any size). Damage in an index is then an
        #: error when that block is used, never at open.
        self.lazy_index = lazy_index
        ours = _fd is None
        if _fd is None:
            _fd = open_regular(self.path, os.O_RDWR if writable else os.O_RDONLY)
        self.fd = _fd
        self._offsets: dict[int, np.ndarray] = {}
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        #: :meth:`_stored_chain` by (generation, generations in the file).
        self._chains: dict[tuple[int, int], list[Generation]] = {}
        try:
            if lock:
                _lock(self.fd, self.path)
                if ours:
                    # The lock holder before us (compact) may have renamed a new file over
                    # the one we opened: writes to that unnamed inode would be lost. Lock
                    # the file the path names now.
                    for _ in range(_RELOCK_TRIES):
                        if _names(self.path, self.fd):
                            break
                        os.close(self.fd)
                        self.fd = -1
                        self.fd = open_regular(self.path, os.O_RDWR if writable else os.O_RDONLY)
                        _lock(self.fd, self.path)
                    else:
                        raise CheckpointError(f"{self.path} keeps being replaced while it is opened")
            self._load()
        except BaseException:
            if self.fd >= 0:
                os.close(self.fd)
            self.fd = -1
            raise

    @classmethod
    def create(cls, path: str | os.PathLike[str], page_size: int, mapping: bool, entries: list[EntryMeta]) -> Store:
        """Create a new, empty checkpoint file, atomically (``FileExistsError`` if it exists).

        The header is written and ``fsync``'d in an unnamed file (``O_TMPFILE``) that is
        then linked at ``path``: a crash never leaves a half-written header behind.
        Returns the store, writable and locked.
        """
        path = os.fspath(path)
        fd, named_tmp = new_file(path, page_size, mapping, entries)
        try:
            link_fd(fd, named_tmp, path)  # EEXIST if taken
        except BaseException:
            os.close(fd)
            raise
        finally:
            if named_tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(named_tmp)
        return cls(path, writable=True, _fd=fd)

    @classmethod
    def create_in_empty(cls, path: str | os.PathLike[str], page_size: int, mapping: bool,
                        entries: list[EntryMeta]) -> Store:
        """Start a checkpoint in an existing empty file (made by ``tempfile``, say), in
        place: its inode, owner and mode stay. Under the writer's lock, if the file is
        still empty, the header is written and ``fsync``'d (one that another writer has
        started meanwhile is opened as it is). A crash while it is written leaves a
        short header, which is refused as not a checkpoint (nothing was in the file to
        lose). Returns the store, writable and locked."""
        path = os.fspath(path)
        fd = open_regular(path, os.O_RDWR)
        try:
            _lock(fd, path)
            if os.fstat(fd).st_size == 0:  # (else another writer started it meanwhile: continued)
                _pwrite_all(fd, header_blob(page_size, mapping, entries), 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, writable=True, _fd=fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        # Forgotten without close() (a Checkpointer dropped unclosed): the fd, and a
        # writer's lock on the file with it, must not outlive the object.
        with contextlib.suppress(Exception):
            if getattr(self, "fd", -1) >= 0:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------

    def _load(self) -> None:
        """Read and range-check the header, entry table and metadata, then walk the records.

        Every value is checked against the file size and this host before anything is
        allocated from it: the page size must be this host's, the entry table and
        metadata must lie in the file, the entries fit in an address space, and a full
        generation (which every sealed chain starts with) has an index entry for every
        page -- so the per-page arrays built later are bounded by the file's size.
        """
        size = os.fstat(self.fd).st_size
        if size == 0:
            raise EmptyFileError(f"{self.path} is empty (0 bytes): not a pagescan checkpoint yet")
        head = _pread_exact(self.fd, FILE_HEADER.size, 0)
        if len(head) < FILE_HEADER.size or head[:8] != MAGIC_FILE:
            raise CheckpointError(f"{self.path} is not a pagescan checkpoint (bad magic)")
        magic, version, page_size, nregions, _r, meta_bytes, _b, _c, _d, dig = FILE_HEADER.unpack(head)
        if digest(head[:-8]) != dig:
            raise CorruptCheckpointError(f"{self.path}: file header is damaged (checksum mismatch)")
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"{self.path}: unsupported checkpoint version {version} (this pagescan reads "
                                  f"versions {', '.join(map(str, READABLE_VERSIONS))} and writes version {VERSION})")
        self.version = int(version)
        if page_size != _HOST_PAGE:
            raise CheckpointError(f"{self.path}: page size {page_size} is not this host's page size {_HOST_PAGE}")
        table_off = FILE_HEADER.size
        if 8 * nregions + 8 > size - table_off:
            raise CorruptCheckpointError(f"{self.path}: file header is damaged ({nregions} entries do not fit "
                                         f"in a {size}-byte file)")
        table = _pread_exact(self.fd, 8 * nregions + 8, table_off)
        if len(table) < 8 * nregions + 8 or digest(table[:-8]) != table[-8:]:
            raise CorruptCheckpointError(f"{self.path}: entry table is damaged")
        self.page_size: int = int(page_size)
        lengths = [int(x) for x in np.frombuffer(table[:-8], dtype="<u8")]
        if sum(lengths) > MAX_STATE_BYTES:
            raise CorruptCheckpointError(f"{self.path}: entry table is damaged (entries total {sum(lengths)} bytes)")
        off = table_off + len(table)
        if version == 2:
            if meta_bytes or any(n % page_size for n in lengths):
                raise CorruptCheckpointError(f"{self.path}: version 2 region table is damaged")
            self.mapping = False
            self.entries = [EntryMeta(None, n, np.dtype(np.uint8), (n,), False) for n in lengths]
        else:
            if meta_bytes + 8 > size - off:
                raise CorruptCheckpointError(f"{self.path}: file header is damaged ({meta_bytes} bytes of metadata "
                                             f"do not fit in a {size}-byte file)")
            meta = _pread_exact(self.fd, meta_bytes + 8, off)
            if len(meta) < meta_bytes + 8 or digest(meta[:-8]) != meta[-8:]:
                raise CorruptCheckpointError(f"{self.path}: entry metadata is damaged (checksum mismatch)")
            try:
                self.mapping, self.entries = decode_meta(meta[:-8], lengths)
            except ValueError as err:
                raise CorruptCheckpointError(f"{self.path}: entry metadata is damaged: {err}") from None
            off += len(meta)
        #: Byte length of each entry (a multiple of the page size in version 2).
        self.lengths = lengths
        #: Global chunk number of each entry's first chunk (chunks of page_size bytes,
        #: counted from each entry's first byte, entry after entry).
        chunks = [(n + page_size - 1) // page_size for n in lengths]
        self.base = np.concatenate([[0], np.cumsum(chunks, dtype=np.int64)]).astype(np.int64)
        self.generations: list[Generation] = []
        self.sections: list[Section] = []
        #: The damage that stopped the walk through the generations, if any.
        self.damage: CorruptCheckpointError | None = None
        self.data_start = off
        while off < size:
            try:
                got = self._read_record(off, size)
            except CorruptCheckpointError as err:
                self.damage = err
                break
            if isinstance(got, str):
                # Not a sealed record: an unsealed tail left by a writer that died --
                # unless a sealed record follows (the commit record that ends the file
                # belongs to a record at or after this one): then this is damage.
                later = self._sealed_at_end(off, size)
                if later is not None:
                    expected = len(self.generations) + 1
                    self.damage = CorruptCheckpointError(
                        f"{self.path}: generation {expected} (at offset {off}) is damaged ({got}), "
                        f"but sealed data up to generation {later} follows it"
                    )
                elif what := self._commit_damaged(off, size):
                    # A complete record whose commit record holds what no writer leaves:
                    # damage, not a torn tail (cutting it would lose a sealed record).
                    self.damage = CorruptCheckpointError(
                        f"{self.path}: {what} (at offset {off}) is complete, but its commit record, at the end "
                        f"of the file, is damaged: nothing from there on is read or cut")
                break
            if isinstance(got, Section):
                self.sections.append(got)
            else:
                self.generations.append(got)
            off = got.end
        #: Length of the sealed prefix (up to the damage, if any); after it: unsealed tail.
        self.sealed_end = off
        self.file_size = size

    def _read_record(self, off: int, size: int) -> Generation | Section | str:
        raw = _pread_exact(self.fd, 8, off)
        if raw == MAGIC_SECTION and self.version >= 3:
            return self._read_section(off, size)
        return self._read_generation(off, size)

    def _read_section(self, off: int, size: int) -> Section | str:
        """The sealed section at ``off``, or why there is none (a string)."""
        raw = _pread_exact(self.fd, SECTION_HEADER.size, off)
        if len(raw) < SECTION_HEADER.size:
            return "section header incomplete"
        magic, typ, gen, nbytes, _a, _b, _c, dig = SECTION_HEADER.unpack(raw)
        if digest(raw[:-8]) != dig:
            return "section header damaged"
        commit_off = off + SECTION_HEADER.size + nbytes
        why = self._commit_mismatch(off, commit_off, size, gen, dig)
        if why:
            return f"section {why}"
        if not 1 <= gen <= len(self.generations):
            raise CorruptCheckpointError(f"{self.path}: section at offset {off} names generation {gen}, "
                                         f"which is not before it")
        # The payload digest is checked when the payload is read (it may be large).
        return Section(int(typ), int(gen), off, commit_off + COMMIT.size, off + SECTION_HEADER.size, int(nbytes))

    def read_section(self, sec: Section, limit: int | None = None) -> bytes:
        """A section's payload, checked against its digest (``CorruptCheckpointError``);
        one longer than ``limit`` bytes is refused as damaged before it is read."""
        if limit is not None and sec.payload_bytes > limit:
            raise CorruptCheckpointError(f"{self.path}: section of type {sec.type} at offset {sec.offset} is "
                                         f"damaged ({sec.payload_bytes} bytes, more than its kind can hold: {limit})")
        raw = _pread_exact(self.fd, sec.payload_bytes, sec.payload_offset)
        if len(raw) != sec.payload_bytes or digest(raw) != self._section_digest(sec):
            raise CorruptCheckpointError(f"{self.path}: section of type {sec.type} at offset {sec.offset} is "
                                         "damaged (checksum mismatch)")
        return raw

    def check_section(self, sec: Section) -> None:
        """Check a section's payload against its digest without keeping it (read a MiB
        at a time: its length is the file's word, whatever the file holds)."""
        dig, got = self._digest_of(sec.payload_offset, sec.payload_bytes)
        if got != sec.payload_bytes or dig != self._section_digest(sec):
            raise CorruptCheckpointError(f"{self.path}: section of type {sec.type} at offset {sec.offset} is "
                                         "damaged (checksum mismatch)")

    def _digest_of(self, off: int, length: int) -> tuple[bytes, int]:
        """``digest()`` of ``length`` bytes of the file at ``off``, read a MiB at a time
        (a length read from the file may be anything), and how many bytes were there."""
        h = hashlib.blake2b(digest_size=8)
        done = 0
        while done < length:
            raw = _pread_exact(self.fd, min(1 << 20, length - done), off + done)
            if not raw:
                break
            h.update(raw)
            done += len(raw)
        return h.digest(), done

    def _section_digest(self, sec: Section) -> bytes | None:
        craw = _pread_exact(self.fd, COMMIT.size, sec.payload_offset + sec.payload_bytes)
        return COMMIT.unpack(craw)[4] if len(craw) == COMMIT.size else None

    def append_section(self, type_: int, generation: int, payload: bytes) -> Section:
        """Append a sealed section at the sealed end (``fsync``'d; the writer's lock is needed)."""
        if not self.writable:
            raise CheckpointError(f"{self.path} is open read-only")
        if self.version < 3:  # its readers would take a section for a damaged generation
            raise CheckpointError(f"{self.path} is a version {self.version} checkpoint: it holds no sections")
        if self.damage is not None:
            raise self.damage
        off = self.sealed_end
        if self.file_size != off:
            self.check_tail()  # the tail is cut below: never a damaged file's sealed records
        head = SECTION_HEADER.pack(MAGIC_SECTION, type_, generation, len(payload), 0, 0, 0, b"\0" * 8)
        head = head[:-8] + digest(head[:-8])
        length = len(head) + len(payload)
        commit = _commit_record(generation, off, length, digest(payload), head[-8:])
        try:
            os.ftruncate(self.fd, off)
            _pwrite_all(self.fd, head + payload, off)
            os.fsync(self.fd)
            _pwrite_all(self.fd, commit, off + length)
            os.fsync(self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, off)
            raise
        sec = Section(type_, generation, off, off + length + COMMIT.size, off + len(head), len(payload))
        self.sections.append(sec)
        self.sealed_end = self.file_size = sec.end
        return sec

    def check_tail(self) -> None:
        """Refuse (``CorruptCheckpointError``, also kept as :attr:`damage`) an unsealed tail
        that holds a valid commit record of a record in it: the walk stopped at a damaged
        record with sealed generations after it, not at a writer's torn tail -- cutting
        the tail would destroy them. Reads the whole tail (a MiB at a time): done before
        anything is cut, and by ``verify``."""
        off, end = self.sealed_end, self.file_size
        pos, carry = off, b""
        while pos < end:
            chunk = carry + _pread_exact(self.fd, min(1 << 20, end - pos), pos)
            if len(chunk) == len(carry):
                break
            start = pos - len(carry)
            k = chunk.find(MAGIC_COMMIT)
            while k >= 0:
                if self._seals_tail_record(start + k, off, end):
                    if not isinstance(self._read_record(off, os.fstat(self.fd).st_size), str):
                        return  # sealed since the walk (a writer at work): not damage
                    self.damage = CorruptCheckpointError(
                        f"{self.path}: the record at offset {off} is damaged, but a sealed record follows it "
                        f"(commit record at offset {start + k}): nothing after it is read or cut")
                    raise self.damage
                k = chunk.find(MAGIC_COMMIT, k + 1)
            pos += len(chunk) - len(carry)
            carry = chunk[-(len(MAGIC_COMMIT) - 1):]

    def _seals_tail_record(self, at: int, off: int, end: int) -> bool:
        """Is there a valid commit record at ``at`` for a record that starts at or after ``off``?
        (The header it names is not checked: it may be the damaged part.)"""
        craw = _pread_exact(self.fd, COMMIT.size, at)
        if len(craw) < COMMIT.size:
            return False
        cmagic, _cgen, goff, length, _i, _h, _x, cdig = COMMIT.unpack(craw)
        return bool(cmagic == MAGIC_COMMIT and digest(craw[:-8]) == cdig and off <= goff and goff + length == at <= end)

    def _commit_damaged(self, off: int, size: int) -> str:
        """The record at ``off`` ends the file with its commit record in place, but that
        record is not the valid one -- nor what a writer that died while sealing leaves:
        zeros where the record was not written yet (``Appender.seal`` writes zeros there
        first and makes them durable), a sector boundary possibly splitting it into a
        written and an unwritten part. Returns what the record is ("generation 3"), or
        ``""`` (a torn tail, or not a complete record). Version 4 files."""
        if self.version < 4:
            return ""
        raw = _pread_exact(self.fd, GEN_HEADER.size, off)
        if len(raw) < GEN_HEADER.size or digest(raw[:-8]) != raw[-8:]:
            return ""
        if raw[:8] == MAGIC_SECTION:
            _m, _t, number, nbytes, _a, _b, _c, dig = SECTION_HEADER.unpack(raw)
            length = SECTION_HEADER.size + nbytes
            if off + length + COMMIT.size != size:
                return ""
            body, what = self._digest_of(off + SECTION_HEADER.size, nbytes)[0], f"the section of generation {number}"
        elif raw[:8] == MAGIC_GEN:
            _m, number, npages, ndata, _p, index_bytes, table_bytes, dig = GEN_HEADER.unpack(raw)
            if (index_bytes != npages * ENTRY_SIZE or ndata > npages
                    or table_bytes != nblocks(npages) * BLOCK_SIZE):  # as _read_generation checks
                return ""
            length = GEN_HEADER.size + index_bytes + table_bytes + ndata * self.page_size
            if off + length + COMMIT.size != size:
                return ""
            body, what = self._digest_of(off + GEN_HEADER.size + index_bytes, table_bytes)[0], f"generation {number}"
        else:
            return ""
        want = _commit_record(number, off, length, body, dig)
        got = _pread_exact(self.fd, COMMIT.size, off + length)
        zero = bytes(COMMIT.size)
        if len(got) != COMMIT.size or any(got in (want[:k] + zero[k:], zero[:k] + want[k:])
                                          for k in range(COMMIT.size + 1)):
            return ""
        return what

    def _sealed_at_end(self, off: int, size: int) -> int | None:
        """Generation number of a valid commit record ending the file, for a record at or after ``off``."""
        if size - COMMIT.size < off:
            return None
        craw = _pread_exact(self.fd, COMMIT.size, size - COMMIT.size)
        if len(craw) < COMMIT.size:
            return None
        cmagic, cgen, goff, length, _i, _h, _x, cdig = COMMIT.unpack(craw)
        if cmagic != MAGIC_COMMIT or digest(craw[:-8]) != cdig:
            return None
        if goff < off or goff + length + COMMIT.size != size:
            return None
        return int(cgen)

    def _commit_mismatch(self, off: int, commit_off: int, size: int, number: int, head_digest: bytes) -> str:
        """Why the commit record at ``commit_off`` does not seal the record at ``off`` ("" if it does)."""
        if commit_off + COMMIT.size > size:
            return "commit record missing"
        craw = _pread_exact(self.fd, COMMIT.size, commit_off)
        if len(craw) < COMMIT.size:  # the file shrank since it was measured (a writer cut its tail)
            return "commit record missing"
        cmagic, cgen, goff, length, _d, hdig, _x, cdig = COMMIT.unpack(craw)
        if cmagic != MAGIC_COMMIT or digest(craw[:-8]) != cdig:
            return "commit record missing or damaged"
        if cgen != number or goff != off or length != commit_off - off or hdig != head_digest:
            return "commit record does not match the record header"
        return ""

    def _read_generation(self, off: int, size: int) -> Generation | str:
        """The sealed generation at ``off``, or why there is none (a string).

        Raises ``CorruptCheckpointError`` for a generation that is sealed but damaged.
        Version 4: the block table is read and checked here; the index blocks too,
        unless the store has ``lazy_index`` (then each when first used).
        """
        raw = _pread_exact(self.fd, GEN_HEADER.size, off)
        if len(raw) < GEN_HEADER.size:
            return "record header incomplete"
        magic, number, npages, ndata, parent, index_bytes, table_bytes, dig = GEN_HEADER.unpack(raw)
        if magic != MAGIC_GEN or digest(raw[:-8]) != dig:
            return "record header missing or damaged"
        v4 = self.version >= 4
        if index_bytes != npages * ENTRY_SIZE or ndata > npages or table_bytes != (
                nblocks(npages) * BLOCK_SIZE if v4 else 0):
            return "record header inconsistent"
        data_off = off + GEN_HEADER.size + index_bytes + table_bytes
        commit_off = data_off + ndata * self.page_size
        why = self._commit_mismatch(off, commit_off, size, number, dig)  # bounds npages, ndata by the size
        if why:
            return why
        craw = _pread_exact(self.fd, COMMIT.size, commit_off)
        if len(craw) < COMMIT.size:  # cut since the check above
            return "commit record missing"
        idig = COMMIT.unpack(craw)[4]
        # Sealed: from here on, anything wrong is damage.
        expected = len(self.generations) + 1
        where = f"{self.path}: generation {number}"
        if number != expected:
            raise CorruptCheckpointError(f"{where} follows generation {expected - 1}")
        if parent >= number:
            raise CorruptCheckpointError(f"{where}: bad parent generation {parent}")
        if parent == 0 and npages != self.total_pages:
            raise CorruptCheckpointError(f"{where}: a full generation with {npages} pages, not the entries' "
                                         f"{self.total_pages}")
        gen = Generation(int(number), int(parent), off, commit_off + COMMIT.size, int(npages), int(ndata),
                         data_off, np.zeros(0, BLOCK_DTYPE), None, self)
        if v4:
            traw = _pread_exact(self.fd, table_bytes, off + GEN_HEADER.size + index_bytes)
            if digest(traw) != idig:
                raise CorruptCheckpointError(f"{where}: index block table is damaged (checksum mismatch)")
            gen.table = np.frombuffer(traw, BLOCK_DTYPE)
            self._check_table(gen, where)
            if not self.lazy_index:
                gen._index = self.read_index(gen)
            return gen
        idx_raw = _pread_exact(self.fd, index_bytes, off + GEN_HEADER.size)
        index = np.frombuffer(idx_raw, dtype=INDEX_DTYPE)
        if digest(idx_raw) != idig:
            self._check_entries(index, gen, 0, where)  # names the damaged entry, if one is
            raise CorruptCheckpointError(f"{where}: page index is damaged (checksum mismatch)")
        self._check_entries(index, gen, 0, where)
        flat = self.base[index["region"].astype(np.int64)] + index["page"].astype(np.int64)
        if int((index["kind"] == KIND_DATA).sum()) != ndata:
            raise CorruptCheckpointError(f"{where}: page index and data disagree")
        gen.table = block_table(index, flat)  # the same lookups as version 4
        gen._index = index
        return gen

    def _check_table(self, g: Generation, where: str) -> None:
        """Range checks of a version 4 block table (the index blocks are checked when read)."""
        t = g.table
        if not len(t):
            return
        first = t["first"]
        rank = t["rank"].astype(np.int64)
        sizes = np.minimum(INDEX_BLOCK, g.npages - np.arange(len(t)) * INDEX_BLOCK)
        if (int(first[-1]) >= self.total_pages or bool((first[1:] <= first[:-1]).any())
                or int(rank[0]) != 0 or bool((np.diff(rank) < 0).any()) or bool((np.diff(rank) > sizes[:-1]).any())
                or int(rank[-1]) > g.ndata or g.ndata - int(rank[-1]) > int(sizes[-1])):
            raise CorruptCheckpointError(f"{where}: index block table is damaged (out of range)")
        if g.parent == 0 and bool((first != np.arange(len(t), dtype=np.uint64) * INDEX_BLOCK).any()):
            raise CorruptCheckpointError(f"{where}: index block table of a full generation is damaged")

    def _check_entries(self, index: np.ndarray, g: Generation, first: int, where: str) -> np.ndarray:
        """Entry checks and range checks of index entries ``first..``; their global chunk numbers."""
        bad = np.flatnonzero(entry_checks(index, g.number, first) != index["check"])
        if bad.size:
            i = int(bad[0])
            ent = index[i]
            raise CorruptCheckpointError(
                f"{where}, page index entry {first + i} (region {int(ent['region'])}, page {int(ent['page'])} as "
                f"stored): damaged (entry check mismatch; {bad.size} damaged entr{'y' if bad.size == 1 else 'ies'}"
                f"{' in its block' if self.version >= 4 else ''})"
            )
        kinds = index["kind"]
        if bool(((kinds != KIND_DATA) & (kinds != KIND_ZERO)).any()):
            raise CorruptCheckpointError(f"{where}: page index and data disagree")
        if not len(index):
            return np.empty(0, np.int64)
        region = index["region"]
        if int(region.max()) >= len(self.lengths):
            raise CorruptCheckpointError(f"{where}: page index names a region that does not exist")
        npg = np.diff(self.base)
        if bool((index["page"] >= npg[region].astype(np.uint64)).any()):
            raise CorruptCheckpointError(f"{where}: page index names pages outside the regions")
        flat: np.ndarray = self.base[region.astype(np.int64)] + index["page"].astype(np.int64)
        if len(flat) > 1 and bool((np.diff(flat) <= 0).any()):
            raise CorruptCheckpointError(f"{where}: page index is not in ascending page order")
        return flat

    def _block(self, g: Generation, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Index block ``k`` of ``g``, verified: (entries, their global chunks, data offsets or -1)."""
        key = (g.number, k)
        got = self._blocks.get(key)
        if got is not None:
            return got
        lo = k * INDEX_BLOCK
        hi = min(g.npages, lo + INDEX_BLOCK)
        where = f"{self.path}: generation {g.number}"
        if g._index is not None:
            ents = g._index[lo:hi]
            flat = self.base[ents["region"].astype(np.int64)] + ents["page"].astype(np.int64)
        else:
            raw = _pread_exact(self.fd, (hi - lo) * ENTRY_SIZE, g.offset + GEN_HEADER.size + lo * ENTRY_SIZE)
            ents = np.frombuffer(raw, INDEX_DTYPE)
            if len(raw) != (hi - lo) * ENTRY_SIZE or int.from_bytes(digest(raw), "little") != int(g.table["digest"][k]):
                self._check_entries(ents, g, lo, where)  # names the damaged entry, if one is
                raise CorruptCheckpointError(f"{where}: page index block {k} (entries {lo}..{hi - 1}) is damaged "
                                             "(checksum mismatch)")
            flat = self._check_entries(ents, g, lo, where)
            nxt = int(g.table["first"][k + 1]) if k + 1 < len(g.table) else self.total_pages
            ndata_blk = (int(g.table["rank"][k + 1]) if k + 1 < len(g.table) else g.ndata) - int(g.table["rank"][k])
            if (int(flat[0]) != int(g.table["first"][k]) or int(flat[-1]) >= nxt
                    or int((ents["kind"] == KIND_DATA).sum()) != ndata_blk):
                raise CorruptCheckpointError(f"{where}: page index block {k} does not match the block table")
        is_data = ents["kind"] == KIND_DATA
        offs = np.where(is_data, g.data_offset + (int(g.table["rank"][k]) + np.cumsum(is_data) - 1) * self.page_size,
                        -1).astype(np.int64)
        got = (ents, flat, offs)
        self._blocks[key] = got
        return got

    def _read_blocks(self, g: Generation, k0: int, k1: int) -> None:
        """Index blocks ``[k0, k1)`` of ``g`` (version 4, index not read) in one ``pread``,
        verified together -- the checks of :meth:`_block`, vectorized -- into the block
        cache. Nothing is cached on any mismatch: :meth:`_block` then finds and names it."""
        lo, hi = k0 * INDEX_BLOCK, min(g.npages, k1 * INDEX_BLOCK)
        raw = _pread_exact(self.fd, (hi - lo) * ENTRY_SIZE, g.offset + GEN_HEADER.size + lo * ENTRY_SIZE)
        B = INDEX_BLOCK * ENTRY_SIZE
        if len(raw) != (hi - lo) * ENTRY_SIZE:
            return
        mv = memoryview(raw)
        digs = np.frombuffer(b"".join(digest(mv[i : i + B]) for i in range(0, len(mv), B)), "<u8")
        mv.release()
        t = g.table
        if not np.array_equal(digs, t["digest"][k0:k1]):
            return
        ents = np.frombuffer(raw, INDEX_DTYPE)
        try:
            flat = self._check_entries(ents, g, lo, f"{self.path}: generation {g.number}")
        except CorruptCheckpointError:
            return
        starts = np.arange(k1 - k0) * INDEX_BLOCK
        ends = np.minimum(starts + INDEX_BLOCK, hi - lo)
        nxt = np.append(t["first"][k0 + 1 : k1 + 1].astype(np.int64), [] if k1 < len(t) else [self.total_pages])
        rank = np.append(t["rank"][k0 : k1 + 1].astype(np.int64), [] if k1 < len(t) else [g.ndata])
        is_data = ents["kind"] == KIND_DATA
        before = np.concatenate([[0], np.cumsum(is_data)])
        if (bool((flat[starts] != t["first"][k0:k1].astype(np.int64)).any()) or bool((flat[ends - 1] >= nxt).any())
                or not np.array_equal(before[ends] - before[starts], np.diff(rank))):
            return
        offs = np.where(is_data, g.data_offset + (int(rank[0]) + before[1:] - 1) * self.page_size, -1).astype(np.int64)
        for k, s, e in zip(range(k0, k1), starts.tolist(), ends.tolist()):
            self._blocks[(g.number, k)] = (ents[s:e], flat[s:e], offs[s:e])

    def read_index(self, g: Generation) -> np.ndarray:
        """The whole page index of ``g``, every block verified."""
        if g._index is not None:
            return g._index
        parts = [self._block(g, k)[0] for k in range(len(g.table))]
        index = np.concatenate(parts) if parts else np.zeros(0, INDEX_DTYPE)
        for k in range(len(g.table)):
            self._blocks.pop((g.number, k), None)
        return index

    def generation(self, number: int | None) -> Generation:
        """Generation ``number`` (``None``: the newest sealed one)."""
        if self.damage is not None and (number is None or number > len(self.generations)):
            raise self.damage
        if not self.generations:
            raise CheckpointError(f"{self.path} has no complete (sealed) generation")
        if number is None:
            return self.generations[-1]
        if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or not 1 <= number <= len(self.generations):
            raise CheckpointError(f"{self.path} has generations 1..{len(self.generations)}, not {number!r}")
        return self.generations[int(number) - 1]

    @property
    def total_pages(self) -> int:
        return int(self.base[-1])

    def _chain(self, number: int | None) -> Iterator[tuple[Generation, np.ndarray]]:
        """The generations that make up generation ``number`` (from the newest full one),
        oldest first, each with the global chunk number of each index entry."""
        for g in self._chain_gens(self.generation(number).number):
            yield g, self.base[g.index["region"].astype(np.int64)] + g.index["page"].astype(np.int64)

    def latest_map(self, number: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For every chunk of every entry: (generation number, index position) holding it.

        Generation 0 means "never stored" (reads as zeros). Chunks are numbered entry by
        entry. Only the chain since the newest full generation is consulted.
        """
        gen_of = np.zeros(self.total_pages, dtype=np.int64)
        pos_of = np.zeros(self.total_pages, dtype=np.int64)
        for g, flat in self._chain(number):
            gen_of[flat] = g.number
            pos_of[flat] = np.arange(len(g.index))
        return gen_of, pos_of

    def data_map(self, number: int | None = None) -> np.ndarray:
        """For every chunk: whether generation ``number`` holds data for it (not zeros)."""
        out = np.zeros(self.total_pages, dtype=bool)
        for g, flat in self._chain(number):
            out[flat] = g.index["kind"] == KIND_DATA
        return out

    def locate(self, number: int, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the global ``chunks`` (sorted, unique) of generation ``number`` are:
        ``(generation holding each, 0 if never stored; file offset of its data, -1 for
        zeros; its checksum)``.

        A binary search in the block tables of the chain (newest generation first), then
        in the few index blocks that can hold the chunks (read and verified once, then
        cached): the cost does not grow with the size of the state.
        """
        chunks = np.asarray(chunks, dtype=np.int64)
        n = len(chunks)
        gens = np.zeros(n, np.int64)
        offs = np.full(n, -1, np.int64)
        cks = np.zeros(n, np.uint64)
        todo = np.arange(n)
        for g in self._stored_chain(number):
            if not todo.size:
                break
            c = chunks[todo]
            blk = np.searchsorted(g.table["first"], c.astype(np.uint64), side="right").astype(np.int64) - 1
            blk_ok = blk[blk >= 0]  # sorted: its distinct values without np.unique (which imports numpy.ma)
            for k in blk_ok[np.flatnonzero(np.diff(blk_ok, prepend=-1))].tolist():
                sel = todo[blk == k]
                if g._index is None and (g.number, k) not in self._blocks and (g.number, k - 1) in self._blocks:
                    # Reading on from the block before (a prefetch in address order): the
                    # next blocks too, verified together (one read, one pass).
                    k1 = k + 1
                    while k1 < min(len(g.table), k + BLOCKS_AHEAD) and (g.number, k1) not in self._blocks:
                        k1 += 1
                    self._read_blocks(g, k, k1)
                ents, flat, boffs = self._block(g, k)
                j = np.minimum(np.searchsorted(flat, chunks[sel]), len(flat) - 1)
                hit = flat[j] == chunks[sel]
                sel, j = sel[hit], j[hit]
                gens[sel] = g.number
                offs[sel] = boffs[j]
                cks[sel] = ents["checksum"][j]
            todo = todo[gens[todo] == 0]
        return gens, offs, cks

    def _stored_chain(self, number: int) -> list[Generation]:
        """The generations of :meth:`_chain_gens` that hold an entry, newest first: what a
        lookup searches (found once per chain; a long run of empty generations -- a
        Checkpointer seals one whenever nothing was written -- then costs nothing)."""
        key = (number, len(self.generations))
        got = self._chains.get(key)
        if got is None:
            got = [g for g in reversed(list(self._chain_gens(number))) if g.pages]
            if len(self._chains) >= 8:
                self._chains.clear()
            self._chains[key] = got
        return got

    def _chain_gens(self, number: int) -> Iterator[Generation]:
        """The generations that make up generation ``number``, from the newest full one, oldest first."""
        target = self.generation(number).number
        first = 0
        for g in self.generations[:target]:
            if g.parent == 0:
                first = g.number - 1
        yield from self.generations[first:target]

    def read_chunks(self, number: int, chunks: np.ndarray, out: np.ndarray, fresh: bool = False) -> bool:
        """Chunks (sorted, unique) of generation ``number`` into the rows of ``out``, verified.

        ``fresh``: ``out`` already reads as zeros. Returns ``False`` (and writes nothing)
        when every chunk is zeros. Only the index blocks holding the chunks are read
        (:meth:`locate`); a damaged page raises ``CorruptCheckpointError`` naming it.
        """
        gens, offs, cks = self.locate(number, chunks)
        if not bool((offs >= 0).any()):
            return False

        def where(i: int) -> str:
            return self._where_chunk(int(gens[i]), int(chunks[i]))

        n = len(chunks)
        if n >= WINDOW_MIN and int(chunks[-1]) - int(chunks[0]) == n - 1 and int(gens.min()) != int(gens.max()):
            self._read_window(offs, gens, cks, out, fresh, where)  # a window over several generations
        else:
            self._read_at(offs, cks, out, fresh, where)
        return True

    def _read_window(self, offs: np.ndarray, gens: np.ndarray, cks: np.ndarray, out: np.ndarray, fresh: bool,
                     where: Callable[[int], str]) -> None:
        """:meth:`_read_at` for consecutive chunks held by several generations, in a few
        reads instead of one per run (a window of a chain with a 10% incremental
        generation has hundreds of runs: a read and a pass through Python each).

        In file order, entries of one generation whose rows advance with their file
        pages (gaps allowed) are read straight into ``out`` with one read, gaps included:
        a gap page there is that generation's data for the chunk of the gap row (a
        generation stores its data pages in chunk order), superseded by a newer
        generation, whose pages are written later, or by a zero entry, zeroed last.
        The other entries are read by file neighbourhood into scratch memory and copied
        to their rows. Then every row is checked against its checksum, as always."""
        P = self.page_size
        n = len(offs)
        is_data = offs >= 0
        idx = np.flatnonzero(is_data)
        order = np.argsort(offs[idx], kind="stable")
        so, sr, sg = offs[idx][order], idx[order], gens[idx][order]
        dof = np.diff(so)
        link = (dof % P == 0) & (dof // P == np.diff(sr)) & (np.diff(sg) == 0)
        cuts = np.flatnonzero(~link) + 1
        starts = np.concatenate([[0], cuts]).tolist()
        ends = np.concatenate([cuts, [so.size]]).tolist()
        rest = np.ones(so.size, bool)
        covered = 0  # rows written by direct reads
        for s, e in zip(starts, ends):
            if e - s < DIRECT_MIN and e - s < so.size:
                continue
            r0, r1 = int(sr[s]), int(sr[e - 1]) + 1
            want = (r1 - r0) * P
            if os.preadv(self.fd, [out[r0:r1].data.cast("B")], int(so[s])) != want:
                raise CorruptCheckpointError(f"{where(r0)}: page data truncated (file changed after opening?)")
            rest[s:e] = False
            covered += r1 - r0 - (e - s)
        if rest.any():
            ro, rr, rg = so[rest], sr[rest], sg[rest]
            gcut = np.flatnonzero((np.diff(ro) > SCATTER_GAP * P) | (np.diff(rg) != 0)) + 1
            for a, b in zip(np.concatenate([[0], gcut]).tolist(), np.concatenate([gcut, [ro.size]]).tolist()):
                base = int(ro[a])
                tmp = np.empty(((int(ro[b - 1]) - base) // P + 1, P), np.uint8)
                if os.preadv(self.fd, [tmp.data.cast("B")], base) != tmp.nbytes:
                    raise CorruptCheckpointError(f"{where(int(rr[a]))}: page data truncated (file changed after opening?)")
                out[rr[a:b]] = tmp[(ro[a:b] - base) // P]
        if not bool(is_data.all()) and (covered or not fresh):
            out[:n][~is_data] = 0
        bad = np.flatnonzero(page_checksums(out[:n]) != cks)
        if bad.size:
            raise CorruptCheckpointError(
                f"{where(int(bad[0]))}: page data damaged (checksum mismatch; {bad.size} bad page(s) in this read)"
            )

    def _where_chunk(self, number: int, chunk: int) -> str:
        r = int(np.searchsorted(self.base, chunk, side="right")) - 1
        return f"{self.path}: generation {number}, region {r}, page {chunk - int(self.base[r])}"

    def data_offsets(self, g: Generation) -> np.ndarray:
        """File offset of each index entry's data (-1 for zero pages); cached."""
        out = self._offsets.get(g.number)
        if out is None:
            is_data = g.index["kind"] == KIND_DATA
            rank = np.cumsum(is_data) - 1
            out = np.where(is_data, g.data_offset + rank * self.page_size, -1).astype(np.int64)
            self._offsets[g.number] = out
        return out

    def read_pages(self, g: Generation, positions: np.ndarray, out: np.ndarray | None = None,
                   verify: bool = True, fresh: bool = False) -> np.ndarray:
        """Pages at index ``positions`` of ``g`` into ``out`` (a C-contiguous ``(n, page_size)`` uint8 array).

        ``fresh``: ``out`` already reads as zeros (ZERO entries are not written).
        With ``verify``, every page's checksum is compared with its index entry;
        ``CorruptCheckpointError`` names the generation, region and page of the first bad one.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if out is None:
            out = np.empty((len(positions), self.page_size), dtype=np.uint8)
        cks = g.index["checksum"][positions] if verify else None

        def where(i: int) -> str:
            ent = g.index[positions[i]]
            return f"{self.path}: generation {g.number}, region {int(ent['region'])}, page {int(ent['page'])}"

        self._read_at(self.data_offsets(g)[positions], cks, out, fresh, where)
        return out

    def _read_at(self, offs: np.ndarray, cks: np.ndarray | None, out: np.ndarray, fresh: bool,
                 where: Callable[[int], str]) -> None:
        """Pages at file offsets ``offs`` (-1: zeros) into the rows of ``out``, in as few
        reads as the runs allow; checked against ``cks`` unless it is ``None``."""
        P = self.page_size
        n = len(offs)
        if not out.flags.c_contiguous:  # (the reads go straight into its rows)
            rows = np.zeros((n, P), np.uint8)
            self._read_at(offs, cks, rows, True, where)
            out[:n] = rows
            return
        is_data = offs >= 0
        if not fresh and not is_data.all():
            out[:n][~is_data] = 0
        idx = np.flatnonzero(is_data)
        if idx.size:
            o = offs[idx]
            # Blocks: pages consecutive both in the file and in ``out``. One read per span
            # of blocks at most READ_GAP pages apart in the file, each block straight into
            # its rows, the pages between (superseded by a newer generation, say) into
            # scratch memory.
            brk = np.flatnonzero((np.diff(o) != P) | (np.diff(idx) != 1)) + 1
            b0 = np.concatenate([[0], brk])
            b1 = np.concatenate([brk, [idx.size]])
            gaps = np.concatenate([[-1], (o[b0[1:]] - o[b1[:-1] - 1]) // P - 1])  # pages skipped before a block
            gaps[1:][(o[b0[1:]] - o[b1[:-1] - 1]) % P != 0] = -1
            rows_mv = out.reshape(-1).data.cast("B")
            junk = memoryview(bytearray(READ_GAP * P))
            fd = self.fd
            bufs: list[memoryview] = []
            at = want = 0
            first = 0
            for s, e, g in zip(b0.tolist(), b1.tolist(), gaps.tolist()):
                if bufs and (g < 0 or g > READ_GAP or len(bufs) >= 1000):
                    if os.preadv(fd, bufs, at) != want:
                        raise CorruptCheckpointError(
                            f"{where(int(idx[first]))}: page data truncated (file changed after opening?)")
                    bufs = []
                if bufs:
                    if g:
                        bufs.append(junk[: g * P])
                        want += g * P
                else:
                    at, want, first = int(o[s]), 0, s
                r0 = int(idx[s])
                bufs.append(rows_mv[r0 * P : (r0 + e - s) * P])
                want += (e - s) * P
            if bufs and os.preadv(fd, bufs, at) != want:
                raise CorruptCheckpointError(
                    f"{where(int(idx[first]))}: page data truncated (file changed after opening?)")
        if cks is not None and n:
            bad = np.flatnonzero(page_checksums(out[:n]) != cks)
            if bad.size:
                raise CorruptCheckpointError(
                    f"{where(int(bad[0]))}: page data damaged (checksum mismatch; {bad.size} bad page(s) in this read)"
                )

    # -- writing --------------------------------------------------------------------

    def truncate_unsealed(self) -> None:
        """Drop an unsealed tail left by an interrupted writer (refused on a damaged file,
        and on a tail that holds a sealed record: :meth:`check_tail`)."""
        if self.damage is not None:
            raise self.damage
        if self.file_size != self.sealed_end:
            self.check_tail()
            os.ftruncate(self.fd, self.sealed_end)
            os.fsync(self.fd)
            self.file_size = self.sealed_end

    @contextlib.contextmanager
    def appending(self, npages: int) -> Iterator[Appender]:
        """Append one generation of ``npages`` index entries; call ``seal`` inside.

        On any failure, or if the block ends unsealed, the file is cut back to its
        sealed prefix: the previous generations stay intact.
        """
        if not self.writable:
            raise CheckpointError(f"{self.path} is open read-only")
        if self.damage is not None:
            raise self.damage
        if self.version != VERSION:
            raise CheckpointError(f"{self.path} is a version {self.version} checkpoint: generations are appended "
                                  f"only to version {VERSION} files")
        app = Appender(self, npages)
        try:
            yield app
            if not app.sealed:
                raise RuntimeError("generation not sealed")
        except BaseException:
            app.abort()
            raise


class Appender:
    """Writes one generation: data pages first (``reserve`` + ``write``), then ``seal``."""

    def __init__(self, store: Store, npages: int) -> None:
        self.store = store
        self.number = len(store.generations) + 1
        self.offset = store.sealed_end
        self.npages = npages
        self.table_bytes = nblocks(npages) * BLOCK_SIZE
        self.data_start = self.offset + GEN_HEADER.size + npages * ENTRY_SIZE + self.table_bytes
        self.ndata = 0
        self.high = 0  # end of the data written by write_memory
        self.sealed = False
        st = os.fstat(store.fd)
        if st.st_size < self.offset or (st.st_nlink == 0 and not store.unnamed):
            # Shortened, or removed or renamed over, by someone else since it was read:
            # a generation written now could never be read back.
            how = "was removed or replaced" if st.st_nlink == 0 else (
                f"is now {st.st_size} bytes, shorter than its sealed generations ({self.offset})")
            raise CheckpointError(f"{store.path} {how} while open for writing; generation {self.number} "
                                  "was not written")
        if st.st_size != self.offset:  # never write over a stale tail
            with self._io():
                os.ftruncate(store.fd, self.offset)

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """Turn an ``OSError`` into one that says what was not written (same errno)."""
        try:
            yield
        except OSError as err:
            n = self.number
            raise OSError(
                err.errno,
                f"{err.strerror}: cannot write generation {n} to {self.store.path}; the checkpoint is "
                f"unchanged (newest generation: {n - 1 if n > 1 else 'none'})",
            ) from err

    def reserve(self, nrows: int) -> int:
        """File offset for the next ``nrows`` data pages (call in index order)."""
        off = self.data_start + self.ndata * self.store.page_size
        self.ndata += nrows
        return off

    def write(self, rows: np.ndarray, off: int, writeback: bool = True) -> None:
        """Write data pages at an offset from :meth:`reserve` (any thread).

        Writeback of the pages starts at once (``sync_file_range``), so the device works
        while the caller copies the next batch and the ``fsync`` in :meth:`seal` finds
        little left to do.
        """
        mv = np.ascontiguousarray(rows).data.cast("B")
        with self._io():
            _pwrite_all(self.store.fd, mv, off)
        if writeback:
            _start_writeback(self.store.fd, off, len(mv))

    def write_memory(self, starts: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, nrows: int, off: int,
                     writeback: bool = True) -> None:
        """Write ``nrows`` data pages at an offset from :meth:`reserve` straight from this
        process's memory: the runs ``[starts[i], starts[i]+lengths[i])`` at byte
        ``offsets[i]`` of the rows, zeros elsewhere (``pwritev``: the kernel reads the
        memory; a run it cannot read is ``OSError(EFAULT)``)."""
        with self._io():
            libc.pwrite_runs(self.store.fd, starts, lengths, offsets, nrows * self.store.page_size, off)
        self.high = max(self.high, off + nrows * self.store.page_size)
        if writeback:
            _start_writeback(self.store.fd, off, nrows * self.store.page_size)

    def read_back(self, rows: np.ndarray, off: int) -> None:
        """Read the data pages just written at ``off`` into ``rows`` (from the page cache)."""
        mv = rows.data.cast("B")
        with self._io():
            got = os.preadv(self.store.fd, [mv], off)
        if got != len(mv):
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: short read of {self.store.path} at offset {off}")

    def give_back(self, nrows: int) -> None:
        """Return the last ``nrows`` rows reserved (their file bytes are written over or cut off)."""
        self.ndata -= nrows

    def seal(self, index: np.ndarray, parent: int) -> Generation:
        """Write the header and index (fills the entry checks), ``fsync``, commit, ``fsync``."""
        st = self.store
        P = st.page_size
        if len(index) != self.npages or int((index["kind"] == KIND_DATA).sum()) != self.ndata:
            raise ValueError("index does not match the pages written")
        index["check"] = entry_checks(index, self.number)
        idx_raw = index.tobytes()
        flat = st.base[index["region"].astype(np.int64)] + index["page"].astype(np.int64)
        table = block_table(index, flat)
        tab_raw = table.tobytes()
        head = GEN_HEADER.pack(MAGIC_GEN, self.number, self.npages, self.ndata, parent, len(idx_raw), len(tab_raw),
                               b"\0" * 8)
        head = head[:-8] + digest(head[:-8])
        length = GEN_HEADER.size + len(idx_raw) + len(tab_raw) + self.ndata * P
        commit = _commit_record(self.number, self.offset, length, digest(tab_raw), head[-8:])
        with self._io():
            if self.high > self.offset + length:  # rows given back after they were written
                os.ftruncate(st.fd, self.offset + length)
            _pwrite_all(st.fd, head + idx_raw + tab_raw, self.offset)
            # The commit record's place is written (zeros: no commit, an unsealed tail
            # after a crash) and made durable with the rest, so that writing the record
            # changes no file size or block map: the second fsync has no metadata to
            # journal (0.14 against 0.20 ms here).
            _pwrite_all(st.fd, bytes(len(commit)), self.offset + length)
            os.fsync(st.fd)  # everything the commit record vouches for is durable first
            _pwrite_all(st.fd, commit, self.offset + length)
            os.fsync(st.fd)
        self.sealed = True
        gen = Generation(self.number, parent, self.offset, self.offset + length + COMMIT.size, self.npages,
                         self.ndata, self.data_start, table, np.frombuffer(idx_raw, INDEX_DTYPE), st)
        st.generations.append(gen)
        st.sealed_end = st.file_size = gen.end
        return gen

    def abort(self) -> None:
        if self.sealed:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.store.fd, self.offset)
            os.fsync(self.store.fd)


def _commit_record(number: int, off: int, length: int, body_digest: bytes, head_digest: bytes) -> bytes:
    rec = COMMIT.pack(MAGIC_COMMIT, number, off, length, body_digest, head_digest, 0, b"\0" * 8)
    return rec[:-8] + digest(rec[:-8])


def header_blob(page_size: int, mapping: bool, entries: list[EntryMeta]) -> bytes:
    """A new file's first bytes: the header, the entry table and the metadata, each
    with its digest."""
    meta = encode_meta(mapping, entries)
    head = FILE_HEADER.pack(MAGIC_FILE, VERSION, page_size, len(entries), 0, len(meta), 0, 0, 0, b"\0" * 8)
    head = head[:-8] + digest(head[:-8])
    table = np.asarray([e.nbytes for e in entries], dtype="<u8").tobytes()
    return head + table + digest(table) + meta + digest(meta)


def new_file(path: str, page_size: int, mapping: bool, entries: list[EntryMeta]) -> tuple[int, str | None]:
    """A new checkpoint file with its header written and ``fsync``'d, not yet at ``path``.

    Returns ``(fd, None)`` for an unnamed file in ``path``'s directory (``O_TMPFILE``), or
    ``(fd, temporary name)`` where the file system has no ``O_TMPFILE``. The fd is locked.
    """
    blob = header_blob(page_size, mapping, entries)
    d = os.path.dirname(os.path.abspath(path))
    named_tmp = None
    try:
        fd = os.open(d, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        named_tmp = f"{path}.new-{os.getpid()}"
        fd = os.open(named_tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_all(fd, blob, 0)
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else has the file yet: cannot block
    except BaseException:
        os.close(fd)
        if named_tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(named_tmp)
        raise
    return fd, named_tmp




def _start_writeback(fd: int, off: int, length: int) -> None:
    """``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writeback, do not wait (a hint)."""
    try:
        libc.sync_file_range(fd, off, length)
    except (OSError, AttributeError):
        pass  # a hint only: the fsync in seal() follows


_RELOCK_TRIES = 8


def _names(path: str, fd: int) -> bool:
    """``path`` names the file open as ``fd`` (same device and inode, still linked)."""
    st = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_nlink > 0 and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _lock(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CheckpointError(
            f"{path} is in use: another writer (a Checkpointer or compact) holds its lock"
        ) from None


def _pwrite_all(fd: int, data: bytes | memoryview, off: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], off + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def link_fd(fd: int, named: str | None, path: str) -> None:
    """Give the file open as ``fd`` (unnamed, or called ``named``) the name ``path``; ``fsync`` the directory.

    ``FileExistsError`` if ``path`` exists. (``os.link`` follows the ``/proc/self/fd``
    symlink, i.e. uses ``linkat(AT_SYMLINK_FOLLOW)``, only when given a directory fd.)
    """
    d = os.path.dirname(os.path.abspath(path))
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        src = f"/proc/self/fd/{fd}" if named is None else os.path.abspath(named)
        os.link(src, os.path.basename(path), dst_dir_fd=dfd, follow_symlinks=True)
        os.fsync(dfd)
    finally:
        os.close(dfd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
