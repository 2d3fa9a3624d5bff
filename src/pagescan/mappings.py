"""Per-mapping page accounting of a process, from ``PAGEMAP_SCAN``.

One walk of the whole address space (``scan_iter`` asking for pages that are present or
swapped -- every column needs one of those -- so empty slots and unmapped gaps cost
no regions) reports regions of equal categories; regions merge across VMA boundaries,
so they are cut at the boundaries from ``/proc/PID/maps`` and summed per mapping and
per distinct categories value with numpy, then spread over the columns.

How the counts relate to the kernel's own accounting (``/proc/PID/smaps``):

* ``present - zero`` equals smaps ``Rss`` for ordinary mappings: the zero page and the
  huge zero page are mapped (PRESENT, PFNZERO) but are not "normal" pages, so smaps does
  not count them. hugetlb pages are PRESENT but smaps reports them in
  ``Shared_Hugetlb``/``Private_Hugetlb`` instead of ``Rss``.
* ``swapped`` counts non-present, non-empty entries other than guard markers: real swap
  entries, and uffd-wp and poison markers (the categories cannot tell those apart), so
  it equals smaps ``Swap`` unless such markers exist. Guard markers are reported by the
  kernel as SWAPPED|GUARD; they are counted in ``guard`` only. Swapped-out shmem pages
  leave no entry in the process's page tables (smaps counts them in ``Swap``; the scan
  cannot see them).
* ``huge`` counts PMD-mapped pages other than the huge zero page (smaps does not count
  it either), so it equals ``AnonHugePages + ShmemPmdMapped + FilePmdMapped`` plus the
  present hugetlb pages.
* ``written`` counts present and swapped pages without the uffd-wp bit: outside
  ranges registered for async uffd write-protection that is every present or swapped
  page. (The kernel also reports WRITTEN for empty slots of existing page tables; they
  are not counted.)
* VM_PFNMAP mappings (device memory, ``[vvar]``) are skipped by the kernel: all zero.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
from typing import Any

import numpy as np

from ._procfs import _open as _read_proc_file, task_size
from ._scan import scan_iter
from ._target import Target, resolve_pid
from ._uapi.pagemap import PAGE_REGION_DTYPE, Category

__all__ = ["STAT_CATEGORIES", "MappingStat", "mapping_stats"]

P = mmap.PAGESIZE

#: Column name -> category bit, in display order.
STAT_CATEGORIES: dict[str, Category] = {
    "present": Category.PRESENT,
    "swapped": Category.SWAPPED,
    "zero": Category.PFNZERO,
    "huge": Category.HUGE,
    "file": Category.FILE,
    "written": Category.WRITTEN,
    "guard": Category.GUARD,
}


@dataclasses.dataclass(frozen=True)
class MappingStat:
    """Pages per category of one mapping (one line of ``/proc/PID/maps``)."""

    start: int
    end: int
    perms: str
    offset: int
    name: str
    #: category column -> pages
    pages: dict[str, int]

    @property
    def size(self) -> int:
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "perms": self.perms,
            "offset": self.offset,
            "name": self.name,
            "size": self.size,
            "pages": dict(self.pages),
            "bytes": {k: v * P for k, v in self.pages.items()},
        }


def mapping_stats(pid: Any = None, *, backend: str = "auto") -> list[MappingStat]:
    """Pages per category for every mapping of ``pid`` (default: this process).

    Raises ``ProcessLookupError`` / ``PermissionError`` like :func:`pagescan.scan`.
    Categories the kernel does not support are left out of the counts (reported 0).
    """
    from .capabilities import capabilities

    supported = int(capabilities().categories) if backend != "emulated" else _ALL
    cols = tuple(k for k, v in STAT_CATEGORIES.items() if int(v) & supported)
    ret = _ALL & supported
    # Every column needs a present or a swapped page (guard markers are swap entries):
    # asking for those only skips the empty slots of existing page tables, which the
    # kernel would otherwise report as regions of their own.
    anyof = int(Category.PRESENT | Category.SWAPPED) & supported
    limit = task_size()
    with Target(resolve_pid(pid)) as target:
        vmas = _read_maps(target.pid, limit)
        if not vmas:
            return []
        parts = [
            r.regions
            for r in scan_iter(
                vmas[0][0], vmas[-1][1], pid=target, return_mask=ret, category_anyof_mask=anyof,
                backend=backend,
            )
        ]
    regions = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty(0, PAGE_REGION_DTYPE)
    return _account(vmas, regions, cols)


_ALL = 0
for _c in STAT_CATEGORIES.values():
    _ALL |= int(_c)
_NVALUES = 1 << _ALL.bit_length()  # category values are below this
_PRESENT = np.uint64(Category.PRESENT)
_SWAPPED = np.uint64(Category.SWAPPED)
_GUARD = np.uint64(Category.GUARD)
_ZERO = np.uint64(Category.PFNZERO)
_HUGE = np.uint64(Category.HUGE)
_WRITTEN = np.uint64(Category.WRITTEN)
_FILE = np.uint64(Category.FILE)
_NONE = np.uint64(0)


def _column(name: str, c: np.ndarray) -> np.ndarray:
    """Which regions (categories ``c``) count in column ``name`` (see the module doc)."""
    has: np.ndarray = _has(name, c)
    return has


def _has(name: str, c: np.ndarray) -> Any:
    if name == "present":
        return (c & _PRESENT) != _NONE
    if name == "swapped":
        return (c & (_SWAPPED | _GUARD)) == _SWAPPED
    if name == "zero":
        return (c & _ZERO) != _NONE
    if name == "huge":
        return (c & (_HUGE | _ZERO)) == _HUGE
    if name == "file":
        return (c & _FILE) != _NONE
    if name == "written":
        entry = ((c & _PRESENT) != _NONE) | ((c & (_SWAPPED | _GUARD)) == _SWAPPED)
        return entry & ((c & _WRITTEN) != _NONE)
    if name == "guard":
        return (c & _GUARD) != _NONE
    raise ValueError(f"unknown column {name!r}")


@functools.lru_cache(maxsize=8)
def _indicator(cols: tuple[str, ...]) -> np.ndarray:
    """``[value, column]``: 1.0 where a region with categories ``value`` counts in the column."""
    values = np.arange(_NVALUES, dtype=np.uint64)
    table = np.stack([_column(name, values) for name in cols], axis=1).astype(np.float64)
    table.flags.writeable = False
    return table


def _read_maps(pid: int, limit: int) -> list[tuple[int, int, str, int, str]]:
    """``(start, end, perms, offset, name)`` of each mapping below ``limit``, in order.

    A leaner :func:`pagescan._procfs.read_maps` (this runs once per ``mapping_stats``
    call, over possibly tens of thousands of lines)."""
    out = []
    for line in _read_proc_file(pid, "maps").split(b"\n"):
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition(b"-")
        end = int(hi, 16)
        if end <= limit:
            name = parts[5].strip().decode(errors="replace") if len(parts) > 5 else ""
            out.append((int(lo, 16), end, parts[1].decode(), int(parts[2], 16), name))
    return out


def _account(vmas: list[tuple[int, int, str, int, str]], regions: np.ndarray, cols: tuple[str, ...]) -> list[MappingStat]:
    nvma = len(vmas)
    counts = np.zeros((nvma, len(cols)), dtype=np.int64)
    if len(regions) and cols:
        starts = np.fromiter((v[0] for v in vmas), dtype=np.int64, count=nvma)
        ends = np.fromiter((v[1] for v in vmas), dtype=np.int64, count=nvma)
        rs = regions["start"].astype(np.int64)  # user addresses fit in 63 bits
        re = regions["end"].astype(np.int64)
        rc = (regions["categories"] & np.uint64(_NVALUES - 1)).astype(np.intp)
        first = np.searchsorted(ends, rs, side="right")  # first VMA whose end > region start
        last = np.searchsorted(starts, re, side="left")  # VMAs with start < region end
        n = last - first
        if (n == 1).all():  # the usual case: every region inside one VMA
            idx_vma = first
            idx_region = None
        else:  # regions merged across adjacent VMAs: pair each with every VMA it overlaps
            n = np.maximum(n, 0)
            idx_region = np.repeat(np.arange(len(rs)), n)
            idx_vma = np.repeat(first, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
            rs, re, rc = rs[idx_region], re[idx_region], rc[idx_region]
        pages = (np.minimum(re, ends[idx_vma]) - np.maximum(rs, starts[idx_vma])) // P
        # Sum pages per (VMA, distinct categories value), then spread over the columns.
        used = np.zeros(_NVALUES, dtype=bool)
        used[rc] = True
        values = np.flatnonzero(used)
        lut = np.zeros(_NVALUES, dtype=np.intp)
        lut[values] = np.arange(len(values))
        key = idx_vma * len(values) + lut[rc]
        per_value = np.bincount(key, weights=pages, minlength=nvma * len(values)).reshape(nvma, len(values))
        counts = np.rint(per_value @ _indicator(cols)[values]).astype(np.int64)  # exact: < 2**53
    out = []
    for (start, end, perms, offset, name), row_counts in zip(vmas, counts.tolist()):
        row = dict.fromkeys(STAT_CATEGORIES, 0)
        row.update(zip(cols, row_counts))
        out.append(MappingStat(start, end, perms, offset, name, row))
    return out
