"""Per-mapping page accounting of a process, from ``PAGEMAP_SCAN``.

One walk of the whole address space (``scan_iter`` with no masks: every page of every
VMA matches; unmapped gaps cost nothing) reports regions of equal categories; regions
merge across VMA boundaries, so they are cut at the boundaries from ``/proc/PID/maps``
and summed per mapping with numpy.

How the counts relate to the kernel's own accounting (``/proc/PID/smaps``):

* ``present - zero`` equals smaps ``Rss`` for ordinary mappings: the zero page and the
  huge zero page are mapped (PRESENT, PFNZERO) but are not "normal" pages, so smaps does
  not count them. hugetlb pages are PRESENT but smaps reports them in
  ``Shared_Hugetlb``/``Private_Hugetlb`` instead of ``Rss``.
* ``swapped`` counts swap entries *and* markers (uffd-wp, guard, poison), which are
  non-present non-empty entries; smaps ``Swap`` counts real swap only. Swapped-out
  shmem pages leave no entry in the process's page tables (smaps counts them in
  ``Swap``; the scan cannot see them).
* ``huge`` equals ``AnonHugePages + ShmemPmdMapped + FilePmdMapped`` plus present
  hugetlb pages.
* VM_PFNMAP mappings (device memory, ``[vvar]``) are skipped by the kernel: all zero.
"""

from __future__ import annotations

import dataclasses
import mmap
from typing import Any

import numpy as np

from ._procfs import Vma, read_maps
from ._scan import scan_iter
from ._target import Target, resolve_pid
from ._uapi.pagemap import Category

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

    supported = int(capabilities().categories) if backend != "emulated" else 0x1FF
    cols = {k: int(v) for k, v in STAT_CATEGORIES.items() if int(v) & supported}
    ret = 0
    for bit in cols.values():
        ret |= bit
    with Target(resolve_pid(pid)) as target:
        vmas = [v for v in read_maps(target.pid) if v.end <= _task_limit()]
        if not vmas:
            return []
        parts = [
            r.regions
            for r in scan_iter(vmas[0].start, vmas[-1].end, pid=target, return_mask=ret, backend=backend)
        ]
    regions = np.concatenate(parts) if parts else np.empty(0, dtype=[("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])
    return _account(vmas, regions, cols)


def _account(vmas: list[Vma], regions: np.ndarray, cols: dict[str, int]) -> list[MappingStat]:
    starts = np.array([v.start for v in vmas], dtype=np.uint64)
    ends = np.array([v.end for v in vmas], dtype=np.uint64)
    counts = np.zeros((len(vmas), len(cols)), dtype=np.int64)
    if len(regions):
        rs, re, rc = regions["start"], regions["end"], regions["categories"]
        # Cut regions at VMA boundaries: pair each region with every VMA it overlaps.
        first = np.searchsorted(ends, rs, side="right")  # first VMA whose end > region start
        last = np.searchsorted(starts, re, side="left")  # VMAs with start < region end
        n = np.maximum(last - first, 0)
        idx_region = np.repeat(np.arange(len(rs)), n)
        idx_vma = np.repeat(first, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        lo = np.maximum(rs[idx_region], starts[idx_vma])
        hi = np.minimum(re[idx_region], ends[idx_vma])
        pages = ((hi - lo) // np.uint64(P)).astype(np.int64)
        cats = rc[idx_region]
        for j, bit in enumerate(cols.values()):
            has = (cats & np.uint64(bit)) != 0
            np.add.at(counts[:, j], idx_vma[has], pages[has])
    out = []
    names = list(cols)
    for i, v in enumerate(vmas):
        row = {k: 0 for k in STAT_CATEGORIES}
        row.update({names[j]: int(counts[i, j]) for j in range(len(names))})
        out.append(MappingStat(v.start, v.end, v.perms, v.offset, v.name, row))
    return out


def _task_limit() -> int:
    from ._backend_emulated import task_size

    return task_size()
