"""The checkpoint file format (documented in ``docs/checkpoint-format.md``).

One append-only file, all integers little-endian::

    file header | region table | generation 1 | generation 2 | ... | (unsealed tail)

    file header (64 bytes)
        magic "PGSCANCK", u32 version (2), u32 page_size, u32 nregions, u32 reserved,
        u64 reserved x4, digest of the first 56 bytes
    region table (8 * nregions + 8 bytes)
        u64 length of each region, digest of those lengths
    generation
        record header (64 bytes): magic "PGSCGEN\\0", u64 generation, u64 npages (index
            entries), u64 ndata (pages with data), u64 parent (0: a full generation),
            u64 index_bytes (= 32 * npages), u64 reserved, digest of the first 56 bytes
        page index: npages entries of INDEX_DTYPE (32 bytes: u32 region, u32 kind,
            u64 page, u64 checksum of the page's contents, u64 entry check)
        page data: ndata pages, in index order, one for each entry of kind DATA
        commit record (64 bytes): magic "PGSCSEAL", u64 generation, u64 offset of the
            record header, u64 length from the record header to the commit record,
            digest of the page index, digest of the record header, u64 reserved,
            digest of the first 56 bytes

"digest" is an 8-byte BLAKE2b. The writer writes the data, then the header and index,
``fsync``s, and only then writes the commit record and ``fsync``s again. A reader
accepts a generation only with a complete, consistent commit record; bytes after the
last one are an unsealed tail (a writer that died) and are ignored.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

__all__ = [
    "COMMIT",
    "ENTRY_SIZE",
    "FILE_HEADER",
    "GEN_HEADER",
    "INDEX_DTYPE",
    "KIND_DATA",
    "KIND_ZERO",
    "MAGIC_COMMIT",
    "MAGIC_FILE",
    "MAGIC_GEN",
    "VERSION",
    "digest",
    "entry_checks",
    "page_checksums",
    "splitmix64",
]

MAGIC_FILE = b"PGSCANCK"
MAGIC_GEN = b"PGSCGEN\0"
MAGIC_COMMIT = b"PGSCSEAL"
VERSION = 2

FILE_HEADER = struct.Struct("<8sIII I 4Q 8s")  # magic, version, page_size, nregions, reserved, 4 x u64, digest
GEN_HEADER = struct.Struct("<8s6Q8s")  # magic, generation, npages, ndata, parent, index_bytes, reserved, digest
COMMIT = struct.Struct("<8s3Q8s8sQ8s")  # magic, generation, offset, length, index digest, header digest, reserved, digest
assert FILE_HEADER.size == 64 and GEN_HEADER.size == 64 and COMMIT.size == 64

KIND_ZERO = 0
KIND_DATA = 1

#: One page index entry (32 bytes).
INDEX_DTYPE = np.dtype(
    [("region", "<u4"), ("kind", "<u4"), ("page", "<u8"), ("checksum", "<u8"), ("check", "<u8")]
)
ENTRY_SIZE = INDEX_DTYPE.itemsize
assert ENTRY_SIZE == 32

#: Seeds of the weight sequences (part of the format).
PAGE_SEED = 0x70A6E5CA
ENTRY_SEED = 0x1DE8C4EC


def digest(*parts: bytes) -> bytes:
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


_ENTRY_W = splitmix64(ENTRY_SEED, 5)


def entry_checks(index: np.ndarray, generation: int) -> np.ndarray:
    """The ``check`` field of each entry of generation ``generation``'s page index.

    The entry's first three 64-bit words (region | kind << 32, page, checksum), its
    generation and its position ``i`` in the index, each times an odd weight
    (``splitmix64(ENTRY_SEED, 5)``), summed mod 2**64. It locates a damaged entry (and
    one copied from elsewhere); the index as a whole is covered by the commit record's
    digest.
    """
    words = index.view("<u8").reshape(len(index), 4)
    e = _ENTRY_W
    with np.errstate(over="ignore"):
        pos = np.arange(len(index), dtype=np.uint64)
        out: np.ndarray = (
            words[:, 0] * e[0] + words[:, 1] * e[1] + words[:, 2] * e[2]
            + np.uint64(generation) * e[3] + pos * e[4]
        )
    return out
