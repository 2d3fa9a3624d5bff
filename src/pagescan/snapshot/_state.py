"""The objects of a state: which bytes of this process each entry is, and how they map to chunks.

A *state* is a ``Mapping[str, buffer]`` (entries named by their keys) or a sequence
of buffers or ``(address, length)`` pairs (entries numbered). Each entry is an exact
byte range ``[addr, addr + nbytes)``; the file stores it in chunks of ``P`` bytes
counted from the entry's first byte (the last chunk padded with zeros). Write
tracking works on the pages that cover the entries; :func:`pages_to_chunks` turns
written pages into the chunks that intersect them.
"""

from __future__ import annotations

import dataclasses
import mmap
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._args import address_word, plain_array
from ._format import EntryMeta
from ._store import CheckpointError, Store

__all__ = ["Target", "chunk_runs", "match", "merged_page_runs", "metas", "pages_to_chunks", "targets"]

P = mmap.PAGESIZE


@dataclasses.dataclass
class Target:
    """One entry of a state in memory: exact bytes, and what they are."""

    label: str  # "entry 'name'" or "entry 3", for messages
    name: str | None
    addr: int
    nbytes: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    array: bool
    keep: Any = None  # a buffer export held while we use the bytes (no resize, no close)
    #: An array's live data pointer (:func:`~pagescan._args.address_word`): a buffer
    #: export does not stop ``ndarray.__setstate__`` from moving its data.
    word: Any = None

    def release(self) -> None:
        """Let go of the object: its buffer export, and the word that holds it too."""
        if isinstance(self.keep, memoryview):
            self.keep.release()
        self.keep = self.word = None

    def moved(self) -> bool:
        """The array's data is no longer at :attr:`addr` (``__setstate__`` moved it)."""
        return self.word is not None and self.word.value != self.addr

    @property
    def chunks(self) -> int:
        return (self.nbytes + P - 1) // P


def _label(name: str | None, i: int) -> str:
    return f"entry {name!r}" if name is not None else f"entry {i}"


#: No region of a process ends above this: its offsets in the file and its runs are
#: signed 64-bit (user space ends far below, at 2**47 or 2**56 on x86-64).
_ADDRESS_END = 1 << 63


def _pair(value: tuple[Any, ...], label: str, whole_pages: bool = True) -> tuple[int, int]:
    """An ``(address, length)`` pair, checked: two ints; with ``whole_pages`` (a state of
    pairs) the address page aligned and the length counted in whole pages, else exact
    bytes at any address (``restore(pid=...)``, the CLI)."""
    if len(value) != 2 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
                                  for x in value):
        raise TypeError(f"{label}: a region must be an (address, length) pair of ints or a buffer object, "
                        f"not {value!r}")
    a, n = int(value[0]), int(value[1])
    if a < 0 or n <= 0:
        raise ValueError(f"{label}: bad region ({a:#x}, {n}): the address must be >= 0 and the length > 0")
    if whole_pages and a % P:
        raise ValueError(f"{label}: region address {a:#x} is not page aligned")
    if a + ((n + P - 1) // P * P if whole_pages else n) > _ADDRESS_END:
        raise ValueError(f"{label}: region ({a:#x}, {n}) ends beyond the address space ({_ADDRESS_END:#x})")
    return a, n


def _holds_objects(fmt: str) -> bool:
    """A buffer format (PEP 3118, ``struct`` syntax) with an ``O`` item: object references.
    Field names (``:name:``) are left out of the test."""
    return "O" in re.sub(r":[^:]*:", "", fmt)


def _describable(dtype: np.dtype[Any], label: str) -> None:
    """Refuse a dtype the checkpoint's header cannot describe (numpy's ``descr``: e.g.
    structured fields that overlap or are out of order), naming the entry."""
    try:
        np.lib.format.dtype_to_descr(dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{label}: dtype {dtype} cannot be stored ({err})") from None


def _target(name: str | None, i: int, value: Any, writable: bool, exact_pairs: bool) -> Target:
    label = _label(name, i)
    if isinstance(value, tuple):
        value = tuple.__getitem__(value, slice(None))  # its real items, whatever a subclass says
        if exact_pairs:
            a, n = _pair(value, label, whole_pages=False)
        else:
            a, n = _pair(value, label)
            n = (n + P - 1) // P * P  # the 0.1 form: whole pages
        return Target(label, name, a, n, np.dtype(np.uint8), (n,), False)
    if isinstance(value, (str, int, float, complex, np.generic)) or value is None:
        raise TypeError(f"{label}: expected a buffer object (a numpy array, bytearray, mmap, ...), "
                        f"not {type(value).__name__}")
    if isinstance(value, np.ndarray):
        arr = plain_array(value)  # (a subclass's attributes may not steer where the kernel writes)
        if arr.dtype.hasobject:
            raise TypeError(f"{label}: dtype {arr.dtype} holds Python object references; only raw data "
                            "can be checkpointed")
        _describable(arr.dtype, label)
        if not arr.flags.c_contiguous:
            raise ValueError(f"{label}: the array is not C-contiguous (pass numpy.ascontiguousarray(...) of it, "
                             "or the array it is a view of)")
        if writable and not arr.flags.writeable:
            raise ValueError(f"{label}: the array is read-only")
        try:
            keep: Any = memoryview(arr)  # type: ignore[arg-type]  # ndarray is a buffer
        except (TypeError, ValueError, BufferError) as err:  # e.g. a dtype the buffer protocol cannot express
            keep = arr
            del err
        addr = int(arr.__array_interface__["data"][0])
        return Target(label, name, addr, int(arr.nbytes), arr.dtype, tuple(arr.shape), True, keep,
                      address_word(value))
    try:
        mv = memoryview(value)
    except TypeError:
        raise TypeError(f"{label}: expected a buffer object (a numpy array, bytearray, mmap, ...), "
                        f"not {type(value).__name__}") from None
    except (ValueError, BufferError) as err:  # a closed mmap, a released memoryview
        raise ValueError(f"{label}: cannot use the buffer ({err})") from None
    fmt = mv.format
    if _holds_objects(fmt):
        mv.release()
        raise TypeError(f"{label}: the buffer's items (format {fmt!r}) hold Python object references; "
                        "only raw data can be checkpointed")
    if not mv.c_contiguous:
        mv.release()
        raise ValueError(f"{label}: the buffer is not C-contiguous")
    if writable and mv.readonly:
        mv.release()
        raise ValueError(f"{label}: the buffer is read-only")
    flat = mv.cast("B") if mv.nbytes else mv
    addr = int(np.frombuffer(flat, dtype=np.uint8).__array_interface__["data"][0]) if mv.nbytes else 0
    return Target(label, name, addr, mv.nbytes, np.dtype(np.uint8), (mv.nbytes,), False, mv)


def targets(state: Any, *, writable: bool, exact_pairs: bool = False) -> tuple[bool, list[Target]]:
    """``(is_mapping, targets)`` for a state, validated; byte-wise overlaps refused.

    Raises ``TypeError``/``ValueError`` naming the entry, before any system call.
    """
    if isinstance(state, Mapping):
        items: list[tuple[str | None, Any]] = []
        for k in state:
            if not isinstance(k, str):
                raise TypeError(f"state keys must be str, not {type(k).__name__} ({k!r})")
            try:
                k.encode()
            except UnicodeEncodeError:  # (a lone surrogate: the file stores names as UTF-8)
                raise ValueError(f"state key {k!r} is not valid Unicode text (it holds a lone surrogate)") from None
            items.append((k, state[k]))
        mapping = True
    elif isinstance(state, (str, bytes, bytearray, memoryview, mmap.mmap, np.ndarray)) or not isinstance(
        state, Sequence
    ):
        raise TypeError("state must be a mapping of names to buffer objects, or a list of buffer objects or "
                        f"(address, length) pairs, not {type(state).__name__}")
    else:
        items = [(None, v) for v in state]
        mapping = False
    if not items:
        raise ValueError("the state has no entries")
    out = [_target(name, i, v, writable, exact_pairs) for i, (name, v) in enumerate(items)]
    check_overlap(out)
    return mapping, out


def check_overlap(ts: list[Target]) -> None:
    """Refuse entries that share a byte (naming both); sharing a page is fine."""
    live = sorted((t for t in ts if t.nbytes), key=lambda t: t.addr)
    for a, b in zip(live, live[1:]):
        if b.addr < a.addr + a.nbytes:
            raise ValueError(
                f"{a.label} ({a.addr:#x}+{a.nbytes}) and {b.label} ({b.addr:#x}+{b.nbytes}) overlap: entries "
                "must not share bytes (views of one array: pass the array, or disjoint slices)"
            )


def metas(ts: list[Target]) -> list[EntryMeta]:
    return [EntryMeta(t.name, t.nbytes, t.dtype, t.shape, t.array) for t in ts]


def match(store: Store, mapping: bool, ts: list[Target]) -> list[Target]:
    """The targets in the file's entry order, each checked against its entry.

    ``CheckpointError`` names the entry that is missing, extra, or of another size
    (and, for arrays checkpointed from arrays, of another dtype or shape).
    """
    where = store.path
    if mapping != store.mapping:
        have = "a mapping (dict) of entries" if store.mapping else "a sequence of entries"
        raise CheckpointError(f"{where}: the entries do not match: the checkpoint holds {have}; pass the state "
                              "the same way")
    if mapping:
        by_name = {t.name: t for t in ts}
        names = [e.name for e in store.entries]
        missing = [n for n in names if n not in by_name]
        extra = [t.name for t in ts if t.name not in set(names)]
        if missing or extra:
            raise CheckpointError(
                f"{where}: the entries do not match the checkpoint's"
                + (f"; missing: {', '.join(map(repr, missing))}" if missing else "")
                + (f"; not in the checkpoint: {', '.join(map(repr, extra))}" if extra else "")
            )
        ordered = [by_name[n] for n in names]
    else:
        if len(ts) != len(store.entries):
            raise CheckpointError(
                f"{where}: the entries do not match: {len(ts)} given, the checkpoint has "
                f"{len(store.entries)} (of lengths {store.lengths})"
            )
        ordered = ts
    for t, e in zip(ordered, store.entries):
        if t.nbytes != e.nbytes:
            raise CheckpointError(f"{where}: the entries do not match: {t.label} is {t.nbytes} bytes here and "
                                  f"{e.nbytes} bytes in the checkpoint (its size changed?)")
        if t.array and e.array and (t.dtype != e.dtype or t.shape != e.shape):
            raise CheckpointError(f"{where}: the entries do not match: {t.label} is {t.dtype} {t.shape} here and "
                                  f"{e.dtype} {e.shape} in the checkpoint")
    return ordered


def merged_page_runs(ts: list[Target]) -> list[tuple[int, int]]:
    """The union of the pages covering the targets, as sorted, disjoint ``(start, end)`` runs."""
    spans = sorted((t.addr // P * P, (t.addr + t.nbytes + P - 1) // P * P) for t in ts if t.nbytes)
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def pages_to_chunks(pages: np.ndarray, ts: list[Target], base: np.ndarray) -> np.ndarray:
    """Global chunk numbers (sorted, unique) of the chunks that intersect the written ``pages``.

    ``pages``: sorted page addresses. A chunk of an entry that does not start on a page
    boundary intersects two pages; a written page marks each chunk it touches.
    """
    if not pages.size:
        return np.empty(0, np.int64)
    pg = pages.astype(np.int64)
    parts = []
    for e, t in enumerate(ts):
        if not t.nbytes:
            continue
        lo = np.searchsorted(pg, t.addr // P * P)
        hi = np.searchsorted(pg, t.addr + t.nbytes)
        if lo == hi:
            continue
        off = pg[lo:hi] - t.addr
        if t.addr % P == 0:  # chunk k is page k: sorted and unique already
            parts.append(off // P + int(base[e]))
            continue
        k1 = np.floor_divide(off, P)
        k2 = k1 + (off % P != 0)
        ks = np.concatenate([k1, k2])
        ks = ks[(ks >= 0) & (ks < t.chunks)]
        parts.append(np.unique(ks) + int(base[e]))
    if not parts:
        return np.empty(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    return np.unique(np.concatenate(parts))


def chunk_runs(chunks: np.ndarray, ts: list[Target], base: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sorted global ``chunks`` held in rows ``0..len-1`` of a ``(n, P)`` buffer:
    ``(addresses, lengths, row byte offsets)`` of the runs of target memory they are.

    Consecutive chunks of one entry are one run; the last chunk of an entry is only as
    long as the entry's remaining bytes.
    """
    n = chunks.size
    if not n:
        e0 = np.empty(0, np.uint64)
        return e0, e0, e0
    addr = np.array([t.addr for t in ts], dtype=np.int64)
    nbytes = np.array([t.nbytes for t in ts], dtype=np.int64)
    ent = np.searchsorted(base, chunks, side="right") - 1
    k = chunks - base[ent]
    cuts = np.flatnonzero((np.diff(chunks) != 1) | (np.diff(ent) != 0)) + 1
    first = np.concatenate([[0], cuts]).astype(np.int64)
    last = np.concatenate([cuts, [n]]).astype(np.int64) - 1
    e_run = ent[first]
    start_off = k[first] * P
    end_off = np.minimum((k[last] + 1) * P, nbytes[e_run])
    return ((addr[e_run] + start_off).astype(np.uint64), (end_off - start_off).astype(np.uint64),
            (first * P).astype(np.uint64))


def zero_padding(rows: np.ndarray, chunks: np.ndarray, ts: list[Target], base: np.ndarray) -> None:
    """Zero the bytes of each row past the end of its entry (only an entry's last chunk has any)."""
    if not chunks.size:
        return
    nbytes = np.array([t.nbytes for t in ts], dtype=np.int64)
    ent = np.searchsorted(base, chunks, side="right") - 1
    tail = nbytes[ent] - (chunks - base[ent]) * P
    for r in np.flatnonzero(tail < P).tolist():
        rows[r, int(tail[r]):] = 0
