"""Per-mapping memory accounting of a process: ``/proc/PID/smaps`` plus ``PAGEMAP_SCAN``.

Two sources, each used where it is exact (see ``docs/smaps.md``):

* ``/proc/PID/smaps`` (the kernel's own accounting, read once and parsed with numpy):
  Rss, Pss, shared/private clean/dirty, Referenced, Anonymous, Swap, SwapPss, Locked,
  the PMD-mapped and hugetlb sizes, THPeligible and VmFlags -- what ``pmap -X`` shows.
  USS is ``Private_Clean + Private_Dirty``. smaps has no per-mapping Pss_Anon/File/Shmem
  (only ``smaps_rollup`` has them); they are derived where a mapping holds one kind of
  page (:attr:`MappingStat.pss_split`).
* One ``PAGEMAP_SCAN`` walk (``scan_iter`` asking only for the pages the requested
  classes need, so empty slots and unmapped gaps cost no regions) for the page classes
  smaps does not show: the zero page, guard markers, file-backed pages, and the uffd-wp
  WRITTEN bit. Regions merge across VMA boundaries, so they are cut at the boundaries of
  the mappings and summed per mapping and per distinct categories value with numpy.

How the scan's counts relate to smaps:

* ``present - zero`` equals smaps ``Rss`` for ordinary mappings: the zero page and the
  huge zero page are mapped (PRESENT, PFNZERO) but are not "normal" pages, so smaps does
  not count them. hugetlb pages are PRESENT but smaps reports them in
  ``Shared_Hugetlb``/``Private_Hugetlb`` instead of ``Rss``.
* ``swapped`` counts non-present, non-empty entries other than guard markers: real swap
  entries, and uffd-wp and poison markers (the categories cannot tell those apart). Such
  markers exist only in mappings registered with a userfaultfd (``uw`` or ``um`` in
  VmFlags; arming unpopulated pages puts one in every empty slot), so there, when smaps
  is read, ``swapped`` is smaps' ``Swap``; it equals ``Swap`` elsewhere too. Guard
  markers are reported by the kernel as SWAPPED|GUARD; they are counted in ``guard``
  only. Swapped-out shmem pages leave no entry in the process's page tables (smaps
  counts them in ``Swap``; the scan cannot see them).
* ``huge`` counts PMD-mapped pages other than the huge zero page (smaps does not count
  it either), so it equals ``AnonHugePages + ShmemPmdMapped + FilePmdMapped`` plus the
  present hugetlb pages.
* ``written`` counts present and swapped pages without the uffd-wp bit. It means
  "written since write-protected" only in mappings registered for uffd write-protect
  (``uw`` in VmFlags); elsewhere it is every present or swapped page, so
  :meth:`MappingStat.as_dict` reports it only there (``None`` elsewhere).
* VM_PFNMAP mappings (device memory, ``[vvar]``) are skipped by the kernel: all zero.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import mmap
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from ._procfs import _open as _read_proc_file
from ._procfs import _name, _open_fd, _parse_header, task_size
from ._scan import scan_iter
from ._target import Target, resolve_pid
from ._uapi.pagemap import PAGE_REGION_DTYPE, Category

__all__ = ["SMAPS_FIELDS", "STAT_CATEGORIES", "MappingStat", "mapping_stats"]

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

#: The per-mapping fields of ``/proc/PID/smaps`` on Linux 6.x, in the kernel's order
#: (``fs/proc/task_mmu.c``; ``KSM`` since 6.7, ``ProtectionKey`` only with memory
#: protection keys). Sizes are in bytes in :attr:`MappingStat.smaps`; ``THPeligible``
#: and ``ProtectionKey`` are plain numbers. Whatever a kernel prints is kept, known or not.
SMAPS_FIELDS = (
    "Size", "KernelPageSize", "MMUPageSize", "Rss", "Pss", "Pss_Dirty", "Shared_Clean",
    "Shared_Dirty", "Private_Clean", "Private_Dirty", "Referenced", "Anonymous", "KSM",
    "LazyFree", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped", "Shared_Hugetlb",
    "Private_Hugetlb", "Swap", "SwapPss", "Locked", "THPeligible", "ProtectionKey",
)

#: What each scan column needs: (``category_anyof_mask`` bits, ``return_mask`` bits).
_NEEDS: dict[str, tuple[Category, Category]] = {
    "present": (Category.PRESENT, Category.PRESENT),
    "swapped": (Category.SWAPPED, Category.SWAPPED | Category.GUARD),
    "zero": (Category.PFNZERO, Category.PFNZERO),
    "huge": (Category.HUGE, Category.HUGE | Category.PFNZERO),
    "file": (Category.PRESENT, Category.FILE),
    "written": (Category.PRESENT | Category.SWAPPED,
                Category.WRITTEN | Category.PRESENT | Category.SWAPPED | Category.GUARD),
    "guard": (Category.GUARD, Category.GUARD),
}


@dataclasses.dataclass(frozen=True)
class MappingStat:
    """One mapping (one line of ``/proc/PID/maps``): its pages per class, and its smaps
    fields when they were read."""

    start: int
    end: int
    perms: str
    offset: int
    name: str
    #: category column -> pages (only the columns asked for)
    pages: dict[str, int]
    device: str = ""
    inode: int = 0
    #: smaps ``VmFlags`` two-letter codes (empty unless smaps was read)
    vmflags: frozenset[str] = frozenset()
    #: smaps fields, sizes in bytes (empty unless smaps was read); see :data:`SMAPS_FIELDS`
    smaps: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the kind of file behind the mapping is shmem (tmpfs, memfd, SysV, shared anon)
    shmem: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def uss(self) -> int | None:
        """Unique set size: ``Private_Clean + Private_Dirty`` (``None`` without smaps)."""
        f = self.smaps
        if "Private_Clean" not in f:
            return None
        return f["Private_Clean"] + f.get("Private_Dirty", 0)

    @property
    def pss_split(self) -> tuple[int, int, int] | None:
        """``(Pss_Anon, Pss_File, Pss_Shmem)`` of this mapping, where they are exact.

        smaps gives them only for the whole process (``smaps_rollup``). A mapping whose
        resident pages are all anonymous (``Anonymous == Rss``: any anonymous mapping, or
        a private file mapping whose pages were all copied on write) has ``Pss_Anon ==
        Pss``; one without anonymous pages has its Pss in ``Pss_Shmem`` (a shmem file)
        or ``Pss_File``. A private file mapping holding both kinds is ``None``.
        """
        f = self.smaps
        if "Pss" not in f or "Anonymous" not in f:
            return None
        pss, anon, rss = f["Pss"], f["Anonymous"], f.get("Rss", 0)
        if anon == rss:
            return (pss, 0, 0)
        if anon == 0:
            return (0, 0, pss) if self.shmem else (0, pss, 0)
        return None

    @property
    def uffd_wp(self) -> bool:
        """Registered for uffd write-protect (``uw`` in VmFlags): only then does the
        WRITTEN class mean "written since write-protected"."""
        return "uw" in self.vmflags

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``written`` is ``None`` outside uffd-wp mappings (when smaps was read)."""
        pages: dict[str, int | None] = dict(self.pages)
        if self.vmflags and "written" in pages and not self.uffd_wp:
            pages["written"] = None
        split = self.pss_split
        return {
            "start": self.start,
            "end": self.end,
            "perms": self.perms,
            "offset": self.offset,
            "device": self.device,
            "inode": self.inode,
            "name": self.name,
            "size": self.size,
            "pages": pages,
            "bytes": {k: None if v is None else v * P for k, v in pages.items()},
            "smaps": dict(self.smaps),
            "vmflags": sorted(self.vmflags),
            "uss": self.uss,
            "pss_anon": None if split is None else split[0],
            "pss_file": None if split is None else split[1],
            "pss_shmem": None if split is None else split[2],
        }


def mapping_stats(
    pid: Any = None,
    *,
    backend: str = "auto",
    smaps: bool = True,
    categories: Iterable[str] | None = None,
) -> list[MappingStat]:
    """Every mapping of ``pid`` (default: this process), ``[vsyscall]`` included (above
    the top of user space, where no page is classified: its classes count 0).

    ``smaps``: also read ``/proc/PID/smaps`` (the mappings then come from it, with their
    fields and VmFlags); without it only ``/proc/PID/maps`` is read, and ``swapped``
    counts the uffd-wp and poison markers of registered mappings too (see the module
    doc). ``categories``: the page classes to count with ``PAGEMAP_SCAN`` (names of
    :data:`STAT_CATEGORIES`; default all, empty: no scan). Classes the kernel does not
    support count 0.

    Raises ``ProcessLookupError`` / ``PermissionError`` like :func:`pagescan.scan`.
    """
    return _mapping_table(pid, backend=backend, smaps=smaps, categories=categories).stats()


class _MappingTable:
    """What :func:`mapping_stats` reads, column by column: ``pagescan stat`` renders
    from the columns without building a :class:`MappingStat` (and its dicts) per
    mapping; :meth:`stats` builds them when wanted."""

    __slots__ = ("_shmem_devs", "_stats", "classes", "counts", "fields", "vmas")

    def __init__(self, vmas: _Vmas, classes: tuple[str, ...], counts: np.ndarray, fields: _Fields | None,
                 shmem_devs: frozenset[str]) -> None:
        self.vmas = vmas
        #: the page classes counted, in the order of ``counts``' columns
        self.classes = classes
        #: ``[mapping, class]`` pages
        self.counts = counts
        #: smaps fields and VmFlags (``None`` without smaps)
        self.fields = fields
        self._shmem_devs = shmem_devs
        self._stats: list[MappingStat] | None = None

    def __len__(self) -> int:
        return len(self.vmas)

    def pages(self, cls: str) -> list[int]:
        """Pages of class ``cls`` per mapping."""
        col: list[int] = self.counts[:, self.classes.index(cls)].tolist()
        return col

    def field(self, name: str) -> list[int | None]:
        """smaps field ``name`` per mapping (``None`` where absent or smaps was not read)."""
        if self.fields is None:
            return [None] * len(self.vmas)
        return self.fields.column(name)

    def stats(self) -> list[MappingStat]:
        if self._stats is None:
            cols = self.classes
            rows: list[list[int]] = self.counts.tolist()
            if self.fields is None:
                self._stats = [MappingStat(start, end, perms, offset, name, dict(zip(cols, c)), dev, inode)
                               for (start, end, perms, offset, name, dev, inode), c in zip(self.vmas, rows)]
            else:
                self._stats = [
                    MappingStat(start, end, perms, offset, name, dict(zip(cols, c)), dev, inode, flags, f, sh)
                    for (start, end, perms, offset, name, dev, inode), c, flags, f, sh
                    in zip(self.vmas, rows, self.fields.flags(), self.fields.rows(), self.shmem())
                ]
        return self._stats

    def shmem(self) -> list[bool]:
        """Per mapping: a mapping of a shmem file (see :attr:`MappingStat.shmem`)."""
        devs = self._shmem_devs
        return [_is_shmem(perms, name, dev, devs) for _, _, perms, _, name, dev, _ in self.vmas]


def _mapping_table(pid: Any = None, *, backend: str = "auto", smaps: bool = True,
                   categories: Iterable[str] | None = None) -> _MappingTable:
    """:func:`mapping_stats` as columns (same arguments, same errors)."""
    cols_wanted = tuple(STAT_CATEGORIES) if categories is None else tuple(categories)
    for c in cols_wanted:
        if c not in STAT_CATEGORIES:
            raise ValueError(f"categories: unknown class {c!r}; known: {', '.join(STAT_CATEGORIES)}")
    pid = resolve_pid(pid)
    limit = task_size()
    with Target(pid) as target:  # first: ESRCH/EPERM as scan() reports them
        # The maps or smaps text is read by another thread while this one scans the whole
        # of user space (the reads and the ioctl wait in the kernel with the GIL
        # released); the regions are then cut at the mappings that text lists. Parsing
        # the text while it is read would not help: every read's return needs the GIL.
        supported = 0
        if cols_wanted:
            from .capabilities import capabilities

            # before the reader thread starts: the first call probes the kernel with
            # mappings of its own, best made while no other thread of ours allocates
            supported = int(capabilities().categories) if backend != "emulated" else _ALL
        reader = _Reader(pid, "smaps" if smaps else "maps")
        try:
            parts = []
            if cols_wanted:
                anyof = ret = 0
                for c in cols_wanted:
                    anyof |= int(_NEEDS[c][0])
                    ret |= int(_NEEDS[c][1])
                parts = [
                    r.regions
                    for r in scan_iter(0, limit, pid=target, return_mask=ret & supported,
                                       category_anyof_mask=anyof & supported, backend=backend)
                ]
            text = reader.result()
            # A process that exits while its maps or smaps is read ends the text early,
            # with no error: a truncated table would pass for the whole one. Its pagemap
            # (opened while it lived) reads empty once its memory is gone.
            if not os.pread(target.fd, 8, 0):
                raise ProcessLookupError(errno.ESRCH, f"pid {pid} exited while its mappings were read")
        finally:
            reader.close()
    fields: _Fields | None = None
    shmem_devs: frozenset[str] = frozenset()
    # Every mapping the kernel lists, as pmap -X shows them: [vsyscall] too, above the
    # top of user space, where no page table is walked (its classes count 0).
    if smaps:
        vmas, fields = _smaps_columns(text, _EVERYWHERE)
        shmem_devs = _shmem_devices(pid) if vmas else frozenset()
    else:
        vmas = _parse_maps(text, _EVERYWHERE)
    cols = tuple(c for c in cols_wanted if int(STAT_CATEGORIES[c]) & supported)
    regions = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty(0, PAGE_REGION_DTYPE)
    counts = _account(vmas, regions, cols) if vmas else np.zeros((0, len(cols)), np.int64)
    if cols != cols_wanted:  # unsupported classes count 0
        full = np.zeros((len(vmas), len(cols_wanted)), np.int64)
        for j, c in enumerate(cols):
            full[:, cols_wanted.index(c)] = counts[:, j]
        counts = full
    if "swapped" in cols and fields is not None:
        _swap_where_markers(counts[:, cols_wanted.index("swapped")], fields)
    return _MappingTable(vmas, cols_wanted, counts, fields, shmem_devs)


def _swap_where_markers(swapped: np.ndarray, fields: _Fields) -> None:
    """Set ``swapped`` (pages, per mapping, in place) to smaps' ``Swap`` in the mappings
    registered with a userfaultfd (``uw``/``um`` in VmFlags): only there can page tables
    hold uffd-wp or poison markers, which ``PAGEMAP_SCAN`` reports as SWAPPED and smaps
    does not count (a mapping armed before it was populated holds one per empty page)."""
    swap = fields.column("Swap")
    for i, flags in enumerate(fields.flags()):
        if "uw" in flags or "um" in flags:
            swapped[i] = (swap[i] or 0) // P


_EVERYWHERE = 1 << 64  #: a limit above every address
_USER_END = (1 << 63) - 1  #: user addresses are below (they fit in an int64)
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


_Vmas = list[tuple[int, int, str, int, str, str, int]]


class _Reader:
    """A ``/proc/PID/NAME`` file read whole by another thread."""

    def __init__(self, pid: int, name: str) -> None:
        self._out: list[bytes | BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(pid, name), daemon=True)
        self._thread.start()

    def _run(self, pid: int, name: str) -> None:
        try:
            self._out.append(_read_big(pid, name))
        except BaseException as err:  # noqa: BLE001 - raised by result()
            self._out.append(err)

    def result(self) -> bytes:
        self._thread.join()
        item = self._out[0]
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._thread.join()


def _read_big(pid: int, name: str) -> bytes:
    """Like :func:`pagescan._procfs._open` with reads growing to 4 MiB: a seq_file fills
    as much of a read as it can, so a big file takes few system calls."""
    fd = _open_fd(pid, name)
    try:
        chunks: list[bytes] = []
        size = 1 << 16
        while True:
            data = os.read(fd, size)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            size = min(size * 4, 1 << 22)
    except PermissionError as err:  # the ptrace check is made at read time too
        raise PermissionError(err.errno, f"may not read /proc/{pid}/{name} (needs ptrace read access)") from None
    finally:
        os.close(fd)


def _parse_maps(text: bytes, limit: int) -> _Vmas:
    """``(start, end, perms, offset, name, device, inode)`` of each mapping below
    ``limit``, in order: a leaner :func:`pagescan._procfs.read_maps` (this runs once per
    call, over possibly tens of thousands of lines)."""
    out = []
    for line in text.split(b"\n"):
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition(b"-")
        end = int(hi, 16)
        if end <= limit:
            name = _name(parts[5]) if len(parts) > 5 else ""
            out.append((int(lo, 16), end, parts[1].decode(), int(parts[2], 16), name, parts[3].decode(),
                        int(parts[4])))
    return out


# -- smaps, parsed with numpy --------------------------------------------------------------
#
# Every record of smaps has the same lines in the same order (the kernel prints them
# unconditionally, ``show_smap``): a header, ``Name:  value kB`` lines, ``THPeligible:  N``
# (and ``ProtectionKey:  N``), and ``VmFlags:`` last. So the lines form a table: one
# row per record, one column per field, and each column's numbers are parsed at once by
# reading the digits before its line ends. A text that is not such a table (another
# kernel's layout) is parsed line by line instead.

_NL, _COLON = 10, 58


class _Fields:
    """The smaps fields and VmFlags of every mapping: parsed column by column when first
    asked for (from the numpy parse's line positions), or one dict per mapping (from the
    line parser, where records may differ)."""

    __slots__ = ("_buf", "_cols", "_data", "_flags", "_n", "_rows", "_spans", "_where")

    def __init__(self, n: int, *, rows: list[dict[str, int]] | None = None,
                 flags: list[frozenset[str]] | None = None, data: bytes = b"",
                 where: dict[str, tuple[np.ndarray, bool]] | None = None,
                 spans: tuple[list[int], list[int]] = ([], [])) -> None:
        self._n = n
        self._rows = rows
        self._flags = flags
        self._data = data
        self._buf = np.frombuffer(data, np.uint8)
        #: field -> (where each mapping's line ends, in kB?)
        self._where = where or {}
        #: where each mapping's VmFlags line starts and ends
        self._spans = spans
        self._cols: dict[str, list[int]] = {}

    def column(self, name: str) -> list[int | None]:
        if self._rows is not None:
            return [r.get(name) for r in self._rows]
        col = self._cols.get(name)
        if col is None:
            if name not in self._where:
                return [None] * self._n
            end, kb = self._where[name]
            col = self._cols[name] = (_digits_before(self._buf, end - 3 if kb else end) * (1024 if kb else 1)).tolist()
        return list(col)

    def rows(self) -> list[dict[str, int]]:
        if self._rows is None:
            keys = list(self._where)
            cols = [self.column(k) for k in keys]
            self._rows = [dict(zip(keys, row)) for row in zip(*cols)] if keys else [{} for _ in range(self._n)]
        return self._rows

    def flags(self) -> list[frozenset[str]]:
        if self._flags is None:
            data = self._data
            seen: dict[bytes, frozenset[str]] = {}  # most mappings share a few VmFlags lines
            flags = []
            for a, b in zip(*self._spans):
                raw = data[a + 8 : b]
                f = seen.get(raw)
                if f is None:
                    f = seen[raw] = frozenset(raw.decode().split())
                flags.append(f)
            self._flags = flags
        return self._flags


def _parse_smaps(data: bytes, limit: int) -> tuple[_Vmas, list[dict[str, int]], list[frozenset[str]]]:
    """Mappings, smaps fields (sizes in bytes) and VmFlags of the records below ``limit``."""
    vmas, fields = _smaps_columns(data, limit)
    return vmas, fields.rows(), fields.flags()


def _smaps_columns(data: bytes, limit: int) -> tuple[_Vmas, _Fields]:
    """:func:`_parse_smaps` with the fields parsed only when asked for, as columns."""
    if not data:
        return [], _Fields(0, rows=[], flags=[])
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == _NL)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    # "VmFlags:" lines close the records
    ok = starts + 8 <= len(buf)
    s = starts[ok]
    vm = np.flatnonzero(ok)[(buf[s] == ord("V")) & (buf[s + 1] == ord("m")) & (buf[s + 2] == ord("F"))
                            & (buf[np.minimum(s + 7, len(buf) - 1)] == _COLON)]
    n = int(vm[0]) + 1 if len(vm) else 0
    table = n >= 3 and len(ends) == len(vm) * n and bool((vm == np.arange(n - 1, len(ends), n)).all())
    if table:
        names = [bytes(data[starts[j] : data.index(b":", starts[j])]) for j in range(1, n - 1)]
        grid_s = starts.reshape(-1, n)
        grid_e = ends.reshape(-1, n)
        # the same field names in every row: the colon where the first row has it, and
        # the same first two letters
        for j, nm in enumerate(names, 1):
            col = grid_s[:, j]
            if not ((buf[col + len(nm)] == _COLON).all() and (buf[col] == nm[0]).all()
                    and (buf[col + 1] == nm[1]).all()):
                table = False
                break
    if not table:
        vmas, rows, flags = _parse_smaps_lines(data, limit)
        return vmas, _Fields(len(vmas), rows=rows, flags=flags)
    vmas = _parse_maps(b"\n".join([data[a:b] for a, b in zip(grid_s[:, 0].tolist(), grid_e[:, 0].tolist())]),
                       1 << 64)
    keep = np.array([v[1] <= limit for v in vmas], dtype=bool)
    if not keep.all():
        idx = np.flatnonzero(keep)
        vmas = [vmas[i] for i in idx.tolist()]
        grid_s, grid_e = grid_s[idx], grid_e[idx]
    where = {}
    for j, nm in enumerate(names, 1):
        e = int(ends[j])  # the first record's line: kB or a plain number
        where[nm.decode()] = (grid_e[:, j], data[e - 3 : e] == b" kB")
    spans = (grid_s[:, n - 1].tolist(), grid_e[:, n - 1].tolist())
    return vmas, _Fields(len(vmas), data=data, where=where, spans=spans)


def _digits_before(buf: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The decimal numbers whose last digit is at ``end - 1`` (one per element)."""
    value = np.zeros(len(end), np.int64)
    alive = np.ones(len(end), bool)
    scale = 1
    for k in range(1, 21):
        d = buf[end - k].astype(np.int64) - 48
        alive &= (d >= 0) & (d <= 9)
        if not alive.any():
            break
        value += np.where(alive, d * scale, 0)
        scale *= 10
    return value


def _parse_smaps_lines(data: bytes, limit: int) -> tuple[_Vmas, list[dict[str, int]], list[frozenset[str]]]:
    """The same as :func:`_parse_smaps`, one line at a time (any layout)."""
    vmas: _Vmas = []
    fields: list[dict[str, int]] = []
    flags: list[frozenset[str]] = []
    cur: dict[str, int] = {}
    for line in data.split(b"\n"):
        key, colon, rest = line.partition(b":")
        if colon and b" " not in key and b"-" not in key:
            if key == b"VmFlags":
                flags[-1] = frozenset(rest.decode().split())
                continue
            parts = rest.split()
            if parts and parts[0].isdigit():
                cur[key.decode()] = int(parts[0]) * (1024 if parts[1:] == [b"kB"] else 1)
        elif line:
            h = _parse_header(line)
            cur = {}
            vmas.append((h.start, h.end, h.perms, h.offset, h.name, h.dev, h.inode))
            fields.append(cur)
            flags.append(frozenset())
    keep = [i for i, v in enumerate(vmas) if v[1] <= limit]
    return [vmas[i] for i in keep], [fields[i] for i in keep], [flags[i] for i in keep]


_SHMEM_FS = frozenset({"tmpfs", "devtmpfs"})  # devtmpfs is tmpfs when the kernel has it


def _shmem_devices(pid: int) -> frozenset[str]:
    """``major:minor`` (as maps prints them) of the tmpfs mounts the process sees."""
    out = set()
    try:
        text = _read_proc_file(pid, "mountinfo")
    except OSError:
        return frozenset()
    for line in text.split(b"\n"):
        left, sep, right = line.partition(b" - ")
        parts = left.split()
        if sep and len(parts) > 2 and right.split(None, 1)[0].decode() in _SHMEM_FS:
            major, _, minor = parts[2].decode().partition(":")
            out.add(f"{int(major):02x}:{int(minor):02x}")
    return frozenset(out)


def _is_shmem(perms: str, name: str, dev: str, shmem_devs: frozenset[str]) -> bool:
    """A mapping of a shmem file: shared anonymous (``/dev/zero (deleted)``), memfd,
    SysV shm (on the kernel's internal mount), or a file on a tmpfs mount."""
    if dev in shmem_devs:
        return True
    return dev.startswith("00:") and name.startswith(("/dev/zero", "/memfd:", "/SYSV", "[anon_shmem"))


def _account(vmas: _Vmas, regions: np.ndarray, cols: tuple[str, ...]) -> np.ndarray:
    """``[mapping, column]`` page counts of ``regions`` (cut at the mappings' bounds)."""
    counts = np.zeros((len(vmas), len(cols)), dtype=np.int64)
    nvma = len(vmas)
    while nvma and vmas[nvma - 1][1] > _USER_END:  # [vsyscall]: nothing scanned up there
        nvma -= 1
    if len(regions) and cols and nvma:
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
        else:  # regions merged across adjacent VMAs (or in a gap): pair each with every VMA it overlaps
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
        counts[:nvma] = np.rint(per_value @ _indicator(cols)[values]).astype(np.int64)  # exact: < 2**53
    return counts
