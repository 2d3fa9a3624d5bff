"""The checkpoint file format (documented in ``docs/checkpoint-format.md``).

One append-only file, all integers little-endian::

    file header | entry table | metadata | record | record | ... | (unsealed tail)

    file header (64 bytes)
        magic "PGSCANCK", u32 version (4), u32 page_size, u32 nentries, u32 reserved,
        u64 meta_bytes, u64 reserved x3, digest of the first 56 bytes
    entry table (8 * nentries + 8 bytes)
        u64 byte length of each entry, digest of those lengths
    metadata (meta_bytes + 8 bytes)
        UTF-8 JSON: kind of state and per entry name, dtype (numpy descr) and shape;
        digest of the JSON
    record: a generation, or an optional section (below)
    generation
        record header (64 bytes): magic "PGSCGEN\\0", u64 generation, u64 npages (index
            entries), u64 ndata (pages with data), u64 parent (0: a full generation),
            u64 index_bytes (= 32 * npages), u64 table_bytes (= 24 * nblocks), digest of
            the first 56 bytes
        page index: npages entries of INDEX_DTYPE (32 bytes: u32 region, u32 kind,
            u64 page, u64 checksum of the page's contents, u64 entry check), in blocks of
            INDEX_BLOCK entries
        block table: one BLOCK_DTYPE row per index block (24 bytes: u64 global chunk of
            its first entry, u64 DATA entries before it, u64 digest of the block)
        page data: ndata pages, in index order, one for each entry of kind DATA
        commit record (64 bytes): magic "PGSCSEAL", u64 generation, u64 offset of the
            record header, u64 length from the record header to the commit record,
            digest of the block table, digest of the record header, u64 reserved,
            digest of the first 56 bytes

    section (optional, skipped by readers that do not know its type)
        section header (64 bytes): magic "PGSCSECT", u64 type, u64 generation, u64
            payload_bytes, u64 reserved x3, digest of the first 56 bytes
        payload
        commit record as for a generation (its index digest is the payload's digest)

An entry is stored in chunks of ``page_size`` bytes counted from its first byte (the
index's "page" is the chunk number); the last chunk of an entry whose length is not a
multiple of the page size is stored padded with zeros. The block table locates the
data of any chunk from one index block, so a lazy reader reads index blocks as faults
need them. Version 3 has no block table (the commit record digests the whole index);
version 2 (pagescan 0.1) has in addition a region table of page-multiple lengths and
no metadata; both are read, never written.

"digest" is an 8-byte BLAKE2b. The writer writes the data, then the header and index,
``fsync``s, and only then writes the commit record and ``fsync``s again. A reader
accepts a generation only with a complete, consistent commit record; bytes after the
last one are an unsealed tail (a writer that died) and are ignored.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import struct
from typing import Any

import numpy as np

__all__ = [
    "COMMIT",
    "ENTRY_SIZE",
    "EntryMeta",
    "decode_meta",
    "encode_meta",
    "FILE_HEADER",
    "GEN_HEADER",
    "BLOCK_DTYPE",
    "BLOCK_SIZE",
    "INDEX_BLOCK",
    "INDEX_DTYPE",
    "block_table",
    "nblocks",
    "KIND_DATA",
    "KIND_ZERO",
    "MAGIC_COMMIT",
    "MAGIC_FILE",
    "MAGIC_GEN",
    "MAGIC_SECTION",
    "MAX_STATE_BYTES",
    "READABLE_VERSIONS",
    "SECTION_HEADER",
    "SECTION_WORKING_SET",
    "VERSION",
    "digest",
    "entry_checks",
    "page_checksums",
    "splitmix64",
]

MAGIC_FILE = b"PGSCANCK"
MAGIC_GEN = b"PGSCGEN\0"
MAGIC_COMMIT = b"PGSCSEAL"
MAGIC_SECTION = b"PGSCSECT"
VERSION = 4
#: Versions this code reads (2: pagescan 0.1, no entry metadata; 3: no index block table).
READABLE_VERSIONS = (2, 3, 4)
#: Section types.
SECTION_WORKING_SET = 1
#: Upper bound on the total length of the entries (bytes): no host maps more (57-bit
#: virtual addresses with 5-level page tables).
MAX_STATE_BYTES = 1 << 57

FILE_HEADER = struct.Struct("<8sIII I 4Q 8s")  # magic, version, page_size, nentries, reserved, meta_bytes, 3 x u64, digest
GEN_HEADER = struct.Struct("<8s6Q8s")  # magic, generation, npages, ndata, parent, index_bytes, reserved, digest
COMMIT = struct.Struct("<8s3Q8s8sQ8s")  # magic, generation, offset, length, index digest, header digest, reserved, digest
SECTION_HEADER = struct.Struct("<8s6Q8s")  # magic, type, generation, payload_bytes, 3 x reserved, digest
assert FILE_HEADER.size == 64 and GEN_HEADER.size == 64 and COMMIT.size == 64 and SECTION_HEADER.size == 64

KIND_ZERO = 0
KIND_DATA = 1

#: One page index entry (32 bytes).
INDEX_DTYPE = np.dtype(
    [("region", "<u4"), ("kind", "<u4"), ("page", "<u8"), ("checksum", "<u8"), ("check", "<u8")]
)
ENTRY_SIZE = INDEX_DTYPE.itemsize
assert ENTRY_SIZE == 32

#: Version 4: index entries per index block (the last block of an index may be shorter).
INDEX_BLOCK = 1024
#: Version 4: one block-table row per index block (24 bytes): the global chunk number of
#: the block's first entry, the DATA entries before the block, the block's digest (the
#: 8 digest bytes read as a little-endian u64).
BLOCK_DTYPE = np.dtype([("first", "<u8"), ("rank", "<u8"), ("digest", "<u8")])
BLOCK_SIZE = BLOCK_DTYPE.itemsize
assert BLOCK_SIZE == 24

#: Seeds of the weight sequences (part of the format).
PAGE_SEED = 0x70A6E5CA
ENTRY_SEED = 0x1DE8C4EC


def digest(*parts: bytes | bytearray | memoryview) -> bytes:
    """8-byte BLAKE2b of the concatenated parts (record integrity)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p)
    return h.digest()


def splitmix64(seed: int, n: int) -> np.ndarray:
    """The first ``n`` outputs of SplitMix64 started at ``seed``, as uint64, each made odd.

    ``x_i = seed + (i + 1) * 0x9E3779B97F4A7C15``; ``z = (x ^ x >> 30) * 0xBF58476D1CE4E5B9``;
    ``z = (z ^ z >> 27) * 0x94D049BB133111EB``; ``z ^ z >> 31``; then ``| 1`` (all mod 2**64).
    """
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    out: np.ndarray = z | np.uint64(1)
    return out


_WEIGHTS: dict[int, np.ndarray] = {}


def _page_weights(words: int) -> np.ndarray:
    w = _WEIGHTS.get(words)
    if w is None:
        w = _WEIGHTS[words] = splitmix64(PAGE_SEED, words)
    return w


def page_checksums(pages: np.ndarray) -> np.ndarray:
    """Checksum of each row of a C-contiguous ``(n, page_size)`` uint8 array.

    The page read as little-endian 64-bit words ``w_0..w_k``; the checksum is
    ``sum(w_i * W_i) mod 2**64`` with the odd weights ``W = splitmix64(PAGE_SEED, k+1)``.
    A change confined to one word changes the sum (an odd weight is invertible mod
    2**64), so every flipped byte is detected; random damage goes unnoticed with
    probability about 2**-64. It guards against corruption, not against an attacker.
    One pass over the data (an integer matrix-vector product).
    """
    n, size = pages.shape
    if n == 0:
        return np.empty(0, np.uint64)
    w = pages.view("<u8").reshape(n, size // 8)
    out: np.ndarray = w @ _page_weights(size // 8)
    return out


def nblocks(npages: int) -> int:
    """Index blocks of an index of ``npages`` entries (version 4)."""
    return -(-npages // INDEX_BLOCK)


def block_table(index: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """The block table (version 4) of a page index whose entry checks are filled in.

    ``flat``: the global chunk number of each entry. Row ``k`` describes entries
    ``[k * INDEX_BLOCK, (k + 1) * INDEX_BLOCK)``: the first one's chunk, the number of
    DATA entries before the block (so a data page is located without the rest of the
    index), and the digest of the block's bytes.
    """
    n = len(index)
    k = nblocks(n)
    table = np.zeros(k, BLOCK_DTYPE)
    if not k:
        return table
    starts = np.arange(k) * INDEX_BLOCK
    table["first"] = flat[starts]
    is_data = (index["kind"] == KIND_DATA).astype(np.int64)
    before = np.concatenate([[0], np.cumsum(is_data)])
    table["rank"] = before[starts]
    raw = index.tobytes()
    B = INDEX_BLOCK * ENTRY_SIZE
    table["digest"] = np.frombuffer(b"".join(digest(raw[i : i + B]) for i in range(0, len(raw), B)), "<u8")
    return table


_ENTRY_W = splitmix64(ENTRY_SEED, 5)


def entry_checks(index: np.ndarray, generation: int, first: int = 0) -> np.ndarray:
    """The ``check`` field of each entry of generation ``generation``'s page index.

    The entry's first three 64-bit words (region | kind << 32, page, checksum), its
    generation and its position ``i`` in the index, each times an odd weight
    (``splitmix64(ENTRY_SEED, 5)``), summed mod 2**64. It locates a damaged entry (and
    one copied from elsewhere); the index as a whole is covered by the commit record's
    digest. ``first``: the position of ``index[0]`` (a block of a larger index).
    """
    words = index.view("<u8").reshape(len(index), 4)
    e = _ENTRY_W
    with np.errstate(over="ignore"):
        pos = np.arange(first, first + len(index), dtype=np.uint64)
        out: np.ndarray = (
            words[:, 0] * e[0] + words[:, 1] * e[1] + words[:, 2] * e[2]
            + np.uint64(generation) * e[3] + pos * e[4]
        )
    return out


# -- entry metadata (version 3) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EntryMeta:
    """What the file records about one entry of the state.

    ``name`` is the mapping key (``None`` for an entry of a sequence); ``dtype`` and
    ``shape`` describe the array it came from (``uint8`` and ``(nbytes,)`` for other
    buffers, ``array=False``).
    """

    name: str | None
    nbytes: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    array: bool

    def label(self, i: int) -> str:
        return f"entry {self.name!r}" if self.name is not None else f"entry {i}"


#: Bounds on metadata written by other hands (checked before anything is built from it).
MAX_DESCR_CHARS = 1 << 16
MAX_NDIM = 64


def encode_meta(mapping: bool, entries: list[EntryMeta]) -> bytes:
    """The metadata JSON (version 3). dtypes as ``numpy.lib.format.dtype_to_descr``'s repr."""
    doc = {
        "state": "mapping" if mapping else "sequence",
        "entries": [
            {"name": e.name, "dtype": repr(np.lib.format.dtype_to_descr(e.dtype)), "shape": list(e.shape),
             "array": e.array}
            for e in entries
        ],
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def decode_meta(raw: bytes, lengths: list[int]) -> tuple[bool, list[EntryMeta]]:
    """Parse and check the metadata against the entry lengths; ``ValueError`` says what is wrong."""
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"metadata is not JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("state") not in ("mapping", "sequence") or not isinstance(
        doc.get("entries"), list
    ):
        raise ValueError("metadata lacks 'state' or 'entries'")
    mapping = doc["state"] == "mapping"
    items = doc["entries"]
    if len(items) != len(lengths):
        raise ValueError(f"metadata has {len(items)} entries, the entry table {len(lengths)}")
    out: list[EntryMeta] = []
    names: set[str] = set()
    for i, (it, nbytes) in enumerate(zip(items, lengths)):
        if not isinstance(it, dict):
            raise ValueError(f"entry {i}: not an object")
        name, descr, shape, array = it.get("name"), it.get("dtype"), it.get("shape"), it.get("array")
        if mapping:
            if not isinstance(name, str) or name in names:
                raise ValueError(f"entry {i}: name {name!r} is not a unique string")
            names.add(name)
        elif name is not None:
            raise ValueError(f"entry {i}: a sequence entry has a name")
        if not isinstance(descr, str) or len(descr) > MAX_DESCR_CHARS or not isinstance(array, bool):
            raise ValueError(f"entry {i}: bad dtype or array flag")
        dtype = _descr_to_dtype(descr, i)
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_STATE_BYTES for d in shape)):
            raise ValueError(f"entry {i}: bad shape {shape!r}")
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise ValueError(f"entry {i}: shape {tuple(shape)} of {dtype} is not {nbytes} bytes")
        out.append(EntryMeta(name, nbytes, dtype, tuple(shape), array))
    return mapping, out


def _descr_to_dtype(descr: str, i: int) -> np.dtype[Any]:
    try:
        dt = np.lib.format.descr_to_dtype(ast.literal_eval(descr))
    except (ValueError, TypeError, SyntaxError, KeyError, IndexError, RecursionError, MemoryError) as err:
        raise ValueError(f"entry {i}: bad dtype {descr[:80]!r} ({type(err).__name__})") from None
    if dt.hasobject:
        raise ValueError(f"entry {i}: dtype {dt} holds object references")
    if dt.subdtype is not None:  # an array's own dtype never is one: numpy moves it into the shape
        raise ValueError(f"entry {i}: dtype {dt} is a sub-array dtype")
    return dt
