"""The pure scan engine: per-page categories in, ``PAGEMAP_SCAN`` regions out.

No syscalls and no knowledge of where categories come from: the emulated backend feeds
it categories derived from ``/proc/PID/pagemap``, and tests feed it arrays directly.
The rules are the kernel's (``docs/kernel-facts.md``, PAGEMAP_SCAN):

* matching: ``c = categories ^ inverted``; a page matches when ``c`` has every bit of
  ``mask`` and (``anyof == 0`` or ``c & anyof``). ``return_mask`` plays no part.
* output: a matching run whose start equals the previous region's end and whose
  ``categories & return_mask`` equal the previous region's categories extends it (even
  across VMAs); otherwise it needs a new slot.
* ``max_pages``: a run that would exceed the budget is cut to what is left, and the walk
  stops with ``walk_end`` at the cut. A budget used up exactly at a run's end does not
  stop the walk: the next matching page stops it (``walk_end`` = that page), and if
  there is none the walk completes.
* buffer full: a run that needs a new slot when ``vec_len`` slots are used stops the
  walk with ``walk_end`` = the run's start.
* ``vec_len == 0``: nothing is reported or counted and ``max_pages`` is ignored.
* ``walk_end`` is the documented value (never the kernel's stale one).

Everything is vectorised over the pages of a chunk; the only Python loop is over
chunks (typically one per VMA or per bounded slice of one). Categories may be any
unsigned dtype (the emulation passes uint16); a zero-stride array (``np.broadcast_to``)
says every page of the chunk has the same categories and is handled as one run; with
no masks every page matches and run boundaries come straight from changes of the
reported value.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import numpy as np

__all__ = ["Collector", "match", "runs", "validate"]

_U64 = np.uint64


def validate(
    *,
    start: int,
    end: int,
    flags: int,
    inverted: int,
    mask: int,
    anyof: int,
    return_mask: int,
    vec_is_null: bool,
    vec_len: int,
    known_flags: int,
    known_categories: int,
    page_size: int,
    task_size: int,
) -> int:
    """Check the arguments in the kernel's order; return the page-rounded ``end``.

    Raises ``OSError`` with the errno the kernel gives for the first failing check, and
    a message naming the argument: unknown flags, then unknown category bits (EINVAL);
    unaligned ``start`` (EINVAL); ``end < start`` or a range beyond user space
    (EFAULT); ``vec`` NULL with a non-zero ``vec_len`` (EINVAL).
    """
    # Plain ints: ``~`` of an IntFlag complements within the flag's own bits only.
    known_flags, known_categories = int(known_flags), int(known_categories)
    if flags & ~known_flags:
        raise _error(errno.EINVAL, f"flags has bits this kernel does not know: {flags & ~known_flags:#x}")
    for name, value in (("category_inverted", inverted), ("category_mask", mask),
                        ("category_anyof_mask", anyof), ("return_mask", return_mask)):
        if value & ~known_categories:
            raise _error(errno.EINVAL, f"{name} has category bits this kernel does not know: "
                                       f"{value & ~known_categories:#x}")
    if start & (page_size - 1):
        lo = start & ~(page_size - 1)
        raise _error(errno.EINVAL, f"start {start:#x} is not aligned to the page size ({page_size}); "
                                   f"the nearest aligned values are {lo:#x} and {lo + page_size:#x}")
    if end < start:
        raise _error(errno.EFAULT, f"end {end:#x} is below start {start:#x}")
    if end > task_size:
        raise _error(errno.EFAULT, f"end {end:#x} is beyond user space (which ends at {task_size:#x})")
    if vec_is_null and vec_len:
        raise _error(errno.EINVAL, f"vec is NULL but vec_len is {vec_len}")
    return (end + page_size - 1) & ~(page_size - 1)


def _error(err: int, detail: str) -> OSError:
    return OSError(err, f"{os.strerror(err)}: PAGEMAP_SCAN: {detail}")


def _as(categories: np.ndarray, *masks: int) -> tuple[np.ndarray, Any]:
    """``categories`` as an unsigned array wide enough for ``masks``, and its scalar type
    (per-page categories may be uint16: nine bits, a quarter of the memory traffic)."""
    t = categories.dtype.type
    if t is not _U64 and (categories.dtype.kind != "u" or any(m >> (8 * categories.dtype.itemsize) for m in masks)):
        categories, t = categories.astype(_U64), _U64
    return categories, t


def match(categories: np.ndarray, inverted: int, mask: int, anyof: int) -> np.ndarray:
    """Boolean array: which pages match (the kernel's ``pagemap_scan_is_interesting_page``)."""
    categories, t = _as(categories, inverted, mask, anyof)
    c = categories ^ t(inverted)
    m: np.ndarray = (c & t(mask)) == t(mask)
    if anyof:
        m &= (c & t(anyof)) != 0
    return m


def runs(
    categories: np.ndarray, matched: np.ndarray | None, return_mask: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of matching pages with equal ``categories & return_mask``.

    ``matched`` ``None`` means every page matches. Returns ``(first_page, end_page,
    reported)`` index arrays (end exclusive).
    """
    categories, t = _as(categories, return_mask)
    if matched is None:
        # Every page matches: runs end only where the reported value changes.
        n = categories.size
        if not n:
            empty = np.empty(0, np.int64)
            return empty, empty, np.empty(0, categories.dtype)
        if categories.strides[0] == 0:  # a zero-stride (broadcast) array: one value, one run
            return np.zeros(1, np.int64), np.full(1, n, np.int64), categories[:1] & t(return_mask)
        rep = categories & t(return_mask)
        change = np.flatnonzero(rep[1:] != rep[:-1])
        first = np.empty(change.size + 1, dtype=np.int64)
        first[0] = 0
        first[1:] = change + 1
        stop = np.empty_like(first)
        stop[:-1] = first[1:]
        stop[-1] = n
        return first, stop, rep[first]
    idx = np.flatnonzero(matched)
    if not idx.size:
        empty = np.empty(0, np.int64)
        return empty, empty, np.empty(0, categories.dtype)
    rep = categories[idx] & t(return_mask)
    brk = np.empty(idx.size, dtype=bool)
    brk[0] = True
    np.not_equal(np.diff(idx), 1, out=brk[1:])
    brk[1:] |= rep[1:] != rep[:-1]
    heads = np.flatnonzero(brk)
    first = idx[heads]
    last = np.empty_like(first)
    last[:-1] = idx[heads[1:] - 1]
    last[-1] = idx[-1]
    return first, last + 1, rep[heads]


class Collector:
    """Accumulates regions from chunks fed in ascending address order.

    ``out[index:index+vec_len]`` receives the regions. After a ``feed`` returns
    ``False`` the walk has stopped and :meth:`result` gives ``(n, walk_end)``.
    """

    __slots__ = (
        "anyof", "found", "index", "inverted", "mask", "max_pages", "n", "out",
        "page_size", "return_mask", "stopped", "vec_len", "walk_end",
    )

    def __init__(
        self,
        out: np.ndarray | None,
        index: int,
        vec_len: int,
        *,
        inverted: int,
        mask: int,
        anyof: int,
        return_mask: int,
        max_pages: int,
        page_size: int,
    ) -> None:
        self.out = out
        self.index = index
        self.vec_len = vec_len
        self.inverted = inverted
        self.mask = mask
        self.anyof = anyof
        self.return_mask = return_mask
        self.max_pages = max_pages if max_pages else (1 << 64) - 1
        self.page_size = page_size
        self.n = 0
        self.found = 0
        self.stopped = False
        self.walk_end = 0

    def feed(self, addr: int, categories: np.ndarray) -> bool:
        """Feed the categories of the contiguous pages starting at ``addr``."""
        if self.stopped:
            return False
        if not self.vec_len:
            return True  # nothing reported, nothing counted
        matched: np.ndarray | None = None  # no masks: every page matches (``inverted`` alone changes nothing)
        if self.mask or self.anyof:
            if categories.size > 1 and categories.strides[0] == 0:
                # One value for every page (a zero-stride array): match it once.
                if not match(categories[:1], self.inverted, self.mask, self.anyof)[0]:
                    return True
            else:
                matched = match(categories, self.inverted, self.mask, self.anyof)
        first, stop, rep = runs(categories, matched, self.return_mask)
        if not first.size:
            return True
        P = self.page_size
        out = self.out
        assert out is not None
        base = self.index
        # Does the first run extend the previous region?
        merge_first = False
        if self.n:
            prev = out[base + self.n - 1]
            merge_first = int(prev["end"]) == addr + int(first[0]) * P and int(prev["categories"]) == int(rep[0])

        if first.size <= 32:
            # Few runs (typical of populated memory): when all of them fit in the buffer
            # and the budget, emit them with plain ints.
            fl, sl, rl = first.tolist(), stop.tolist(), rep.tolist()
            pages = sum(sl) - sum(fl)
            if self.n + len(fl) - merge_first <= self.vec_len and self.found + pages <= self.max_pages:
                i = 0
                if merge_first:
                    out["end"][base + self.n - 1] = addr + sl[0] * P
                    i = 1
                j = base + self.n
                for f, e, c in zip(fl[i:], sl[i:], rl[i:]):
                    out[j] = (addr + f * P, addr + e * P, c)
                    j += 1
                self.n = j - base
                self.found += pages
                return True

        starts = first.astype(np.uint64) * _U64(P) + _U64(addr)
        ends = stop.astype(np.uint64) * _U64(P) + _U64(addr)
        lens = (stop - first).astype(np.uint64)

        # Slots needed: every run but a merged first one.
        new_slot = np.ones(first.size, dtype=bool)
        new_slot[0] = not merge_first
        slot_no = self.n + np.cumsum(new_slot)  # slots in use after each run
        over_vec = new_slot & (slot_no > self.vec_len)

        budget = self.max_pages - self.found
        csum = np.cumsum(lens, dtype=np.uint64)
        over_budget = csum > _U64(budget) if budget < (1 << 64) - 1 else np.zeros(first.size, dtype=bool)

        stop_at = first.size
        hit = np.flatnonzero(over_vec | over_budget)
        if hit.size:
            stop_at = int(hit[0])

        # Emit runs [0, stop_at) whole.
        k = stop_at
        if k:
            if merge_first:
                out["end"][base + self.n - 1] = ends[0]
                s, e, c = starts[1:k], ends[1:k], rep[1:k]
            else:
                s, e, c = starts[:k], ends[:k], rep[:k]
            j = base + self.n
            out["start"][j : j + s.size] = s
            out["end"][j : j + s.size] = e
            out["categories"][j : j + s.size] = c
            self.n += s.size
            self.found += int(csum[k - 1])
        if stop_at == first.size:
            return True

        # The run at stop_at ends the walk.
        run_start = int(starts[stop_at])
        left = int(budget - (int(csum[stop_at - 1]) if stop_at else 0))  # pages still allowed
        needs_slot = bool(new_slot[stop_at])
        if needs_slot and self.n >= self.vec_len:
            self.walk_end = run_start  # buffer full
        else:
            take = min(left, int(lens[stop_at]))
            cut = run_start + take * P
            if take:
                if needs_slot:
                    j = base + self.n
                    out[j] = (run_start, cut, int(rep[stop_at]))
                    self.n += 1
                else:
                    out["end"][base + self.n - 1] = cut
                self.found += take
            self.walk_end = cut
        self.stopped = True
        return False

    def result(self, end: int) -> tuple[int, int]:
        """``(regions written, walk_end)``; ``end`` is the page-rounded range end."""
        return self.n, (self.walk_end if self.stopped else end)
