"""The checkpoint file format (documented in ``docs/checkpoint-format.md``).

One append-only file::

    file header | generation 1 | generation 2 | ... | (unsealed tail, ignored)

    file header  (64 bytes + 8 per region)
        magic "PGSCANCK", u32 version, u32 page_size, u32 nregions, u32 reserved,
        u64 reserved x4, blake2b-64 of what precedes it, then the region lengths (u64 each)
        and a blake2b-64 of those.
    generation
        record header (64 bytes): magic "PGSCGEN\\0", u64 generation, u64 npages (index
        entries), u64 ndata (pages with data), u64 parent generation (0: full),
        u64 index_bytes, u64 reserved, blake2b-64 of the first 56 bytes
        page index: npages entries of INDEX_DTYPE (region, page, kind, checksum)
        page data: ndata pages, in index order, for entries whose kind is DATA
        commit record (64 bytes): magic "PGSCSEAL", u64 generation, u64 offset of the
        record header, u64 length from record header to commit record, blake2b-64 of the
        index, u64 reserved x2, blake2b-64 of the first 56 bytes

A generation counts only once its commit record is complete and consistent: writers
``fsync`` the header, index and data before writing the commit record, then ``fsync``
again. Readers stop at the first record that is not a complete sealed generation.
Every page carries a checksum (:func:`page_checksums`); zero pages are stored as such
(kind ZERO, no data).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

__all__ = [
    "COMMIT",
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
    "page_checksums",
]

MAGIC_FILE = b"PGSCANCK"
MAGIC_GEN = b"PGSCGEN\0"
MAGIC_COMMIT = b"PGSCSEAL"
VERSION = 1

FILE_HEADER = struct.Struct("<8sIII I 4Q 8s")  # magic, version, page_size, nregions, reserved, 4 x u64, digest
GEN_HEADER = struct.Struct("<8s6Q8s")  # magic, generation, npages, ndata, parent, index_bytes, reserved, digest
COMMIT = struct.Struct("<8s3Q8s2Q8s")  # magic, generation, gen_offset, length, index digest, 2 x reserved, digest
assert FILE_HEADER.size == 64 and GEN_HEADER.size == 64 and COMMIT.size == 64

KIND_ZERO = 0
KIND_DATA = 1

#: One page index entry.
INDEX_DTYPE = np.dtype([("region", "<u4"), ("kind", "<u4"), ("page", "<u8"), ("checksum", "<u8")])


def digest(*parts: bytes) -> bytes:
    """8-byte blake2b of the concatenated parts (record integrity)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p)
    return h.digest()


_MULT_CACHE: dict[int, np.ndarray] = {}


def _multipliers(words: int) -> np.ndarray:
    m = _MULT_CACHE.get(words)
    if m is None:
        rng = np.random.Generator(np.random.PCG64(0x70A6E5CA4))  # fixed: part of the format
        m = rng.integers(0, 1 << 63, size=words, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        _MULT_CACHE[words] = m
    return m


def page_checksums(pages: np.ndarray) -> np.ndarray:
    """64-bit checksum of each row of a ``(n, page_size)`` uint8 array, vectorised.

    A weighted sum mod 2**64 of the page's 64-bit words (after an xor-shift) with fixed
    odd weights: any change confined to one word changes the sum, so a flipped byte is
    always detected. Not cryptographic; it guards against corruption, not attack.
    """
    n, size = pages.shape
    w = pages.view(np.uint64).reshape(n, size // 8)
    mixed = w ^ (w >> np.uint64(29))
    with np.errstate(over="ignore"):
        return (mixed * _multipliers(size // 8)).sum(axis=1, dtype=np.uint64)
