"""``pagescan stat PID``: ``pmap -X``'s columns and pagescan's page classes, per mapping.

Sizes come from where they are exact: ``/proc/PID/smaps`` for what the kernel accounts
(Rss, Pss, clean/dirty, Swap, ...; USS is ``Private_Clean + Private_Dirty``), one
``PAGEMAP_SCAN`` walk for the page classes smaps cannot show (zero page, guard markers,
file-backed, uffd-wp WRITTEN). Only the sources the shown columns need are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import operator
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from json.encoder import encode_basestring_ascii as _string
from typing import Any

import numpy as np

from pagescan import Category, UnknowablePagesError
from pagescan._procfs import process_uid, read_cmdline, read_rollup, read_statm
from pagescan.mappings import (
    SMAPS_FIELDS,
    STAT_CATEGORIES,
    MappingStat,
    _mapping_table,
    _MappingTable,
)

from ._common import (
    RawJSON,
    UsageError,
    human,
    nonneg_int,
    parse_pid,
    print_json,
    printable,
    table,
    terminal_width,
    user_name,
)

_P = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the table: its ``--columns``/``--sort`` name and where it comes from."""

    name: str
    header: str
    #: "maps", "smaps", "derived" (from smaps fields) or "scan" (PAGEMAP_SCAN)
    source: str
    #: "bytes" (shown with binary units), "int" or "text"
    kind: str
    get: Callable[[MappingStat], Any]


def _smaps_getter(field: str) -> Callable[[MappingStat], Any]:
    return lambda s: s.smaps.get(field)


def _scan_getter(cls: str) -> Callable[[MappingStat], Any]:
    if cls == "written":  # meaningful only where uffd-wp is registered
        return lambda s: s.pages["written"] * _P if s.uffd_wp else None
    return lambda s: s.pages[cls] * _P if cls in s.pages else None  # (not knowable: see collect)


def _split_getter(i: int) -> Callable[[MappingStat], Any]:
    def get(s: MappingStat) -> int | None:
        split = s.pss_split
        return None if split is None else split[i]

    return get


def _dirty(s: MappingStat) -> int | None:
    """``pmap -x``'s Dirty: ``Shared_Dirty + Private_Dirty``."""
    f = s.smaps
    return None if "Private_Dirty" not in f else f["Private_Dirty"] + f.get("Shared_Dirty", 0)


def _columns() -> dict[str, Column]:
    cols = [
        Column("size", "SIZE", "maps", "bytes", lambda s: s.size),
        Column("offset", "OFFSET", "maps", "text", lambda s: f"{s.offset:x}"),
        Column("device", "DEVICE", "maps", "text", lambda s: s.device),
        Column("inode", "INODE", "maps", "int", lambda s: s.inode),
    ]
    for f in SMAPS_FIELDS:
        if f == "Size":
            continue
        kind = "int" if f in ("THPeligible", "ProtectionKey") else "bytes"
        cols.append(Column(f.lower(), f.upper(), "smaps", kind, _smaps_getter(f)))
        if f == "Pss_Dirty":
            for i, sub in enumerate(("anon", "file", "shmem")):
                cols.append(Column(f"pss_{sub}", f"PSS_{sub.upper()}", "derived", "bytes", _split_getter(i)))
        if f == "Private_Dirty":
            cols.append(Column("uss", "USS", "derived", "bytes", lambda s: s.uss))
            cols.append(Column("dirty", "DIRTY", "derived", "bytes", _dirty))
    cols.append(Column("vmflags", "VMFLAGS", "smaps", "text", lambda s: " ".join(sorted(s.vmflags))))
    for c in STAT_CATEGORIES:
        cols.append(Column(c, c.upper(), "scan", "bytes", _scan_getter(c)))
    return {c.name: c for c in cols}


COLUMNS = _columns()
#: Shown unless ``--columns`` says otherwise: fits 100 columns with 24 for the name.
DEFAULT_COLUMNS = ("size", "rss", "pss", "uss", "swap", "zero", "huge")
#: Default columns left out first (when all zero) if the table is too wide.
_DROP_ORDER = ("huge", "zero", "swap", "uss")
_SORT_FIXED = ("address",)
#: The name column keeps at least this many characters before columns are dropped.
_MIN_NAME = 24


def _column_list(text: str) -> list[str]:
    """``--columns``: ``rss,pss``; a list with a ``+`` (``+referenced,file``) adds to the
    defaults; ``all``."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words == ["all"]:
        return list(COLUMNS)
    add = any(w.startswith("+") for w in words)
    out = list(DEFAULT_COLUMNS) if add else []
    for w in words:
        w = w.lstrip("+")
        if w not in COLUMNS:
            raise argparse.ArgumentTypeError(f"unknown column {w!r}; known: {', '.join(COLUMNS)}, all")
        if w not in out:
            out.append(w)
    if not out:
        raise argparse.ArgumentTypeError("no columns named")
    return out


def _sort_key(text: str) -> str:
    key = text.strip().lower()
    if key in _SORT_FIXED or (key in COLUMNS and COLUMNS[key].kind != "text"):
        return key
    names = ", ".join([*_SORT_FIXED, *(c for c, col in COLUMNS.items() if col.kind != "text")])
    raise argparse.ArgumentTypeError(f"cannot sort by {text!r}; choose from: {names}")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    value = nonneg_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stat",
        help="per-mapping memory of a process: pmap -X's columns (Rss, Pss, USS, Swap, ...) and "
        "page classes (zero, huge, guard, ...)",
        description="A header line (pid, user, command line), one row per mapping (start address, "
        "permissions, the chosen columns, name), a total row and a summary line. Sizes are in "
        "bytes with binary units (K = KiB, M = MiB, G = GiB). Columns named after smaps fields "
        "(rss, pss, pss_dirty, shared_clean, shared_dirty, private_clean, private_dirty, "
        "referenced, anonymous, ksm, lazyfree, anonhugepages, shmempmdmapped, filepmdmapped, "
        "shared_hugetlb, private_hugetlb, swap, swappss, locked, thpeligible, vmflags, ...) are "
        "the kernel's own numbers from /proc/PID/smaps, so totals match smaps_rollup and ps "
        "(RSS does not count the zero page; the PSS totals are smaps_rollup's own: each mapping's "
        "PSS is cut down to a KiB, so the rows add up to less). uss = private_clean + "
        "private_dirty; dirty = shared_dirty + private_dirty (pmap -x). pss_anon, "
        "pss_file, pss_shmem are per mapping only where the mapping holds one kind of page "
        "('-' otherwise; the totals come from smaps_rollup). Page classes from one PAGEMAP_SCAN "
        "walk: present (= rss + zero, + hugetlb), swapped, zero (the zero page and the huge "
        "zero page: mapped, but not in RSS), huge (PMD-mapped THPs and hugetlb, not the huge "
        "zero page), file, guard, and written: pages written since uffd write-protect, shown "
        "only in mappings registered for it (VmFlags 'uw'; '-' elsewhere, where it would only "
        "repeat present + swapped). Default columns: " + ",".join(DEFAULT_COLUMNS) + ". Names "
        "too long for the terminal are shortened in the middle, keeping the file name. --json "
        "also gives psutil's memory_full_info() fields, computed as psutil does (key 'psutil').",
    )
    p.add_argument("pid", type=parse_pid, help="process id, or 'self'")
    p.add_argument("--columns", "-c", type=_column_list, default=None, metavar="LIST",
                   help="comma-separated column names (see above), 'all', or a list with a + (+NAME,NAME,...) to add "
                   "to the defaults")
    p.add_argument("--sort", type=_sort_key, default="address", metavar="COLUMN",
                   help="row order: by address (default), or largest first by any numeric column (size, rss, "
                   "pss, uss, swap, zero, ...; a column not shown is added)")
    p.add_argument("--group", action="store_true",
                   help="one row per file (its mappings summed), anonymous memory under [anon], [heap], [stack]; "
                   "in the order of their first mappings unless --sort")
    p.add_argument("--all", action="store_true",
                   help="also list mappings with nothing resident, swapped or guarded")
    p.add_argument("--wide", "-w", action="store_true", help="never shorten names (lines may exceed the terminal)")
    p.add_argument("--watch", type=positive_float, metavar="SECONDS",
                   help="redraw every SECONDS in the terminal (curses), changed cells highlighted; q quits")
    p.add_argument("--count", type=positive_int, metavar="N",
                   help="with --watch: stop after N screens (default: until q or Ctrl-C)")
    p.add_argument("--backend", choices=("auto", "kernel", "emulated"), default="auto",
                   help="kernel ioctl, or its emulation from /proc/PID/pagemap (default auto: the ioctl if present)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output with all of it: header, every mapping (all smaps fields, "
                   "pages and bytes per class), groups and totals")
    p.set_defaults(run=run, subparser=p)


# -- collecting ---------------------------------------------------------------------------


def _needs(columns: Sequence[str]) -> tuple[bool, tuple[str, ...]]:
    """(read smaps?, page classes to scan) for these columns."""
    # written needs VmFlags (uw); swapped too: in a uffd-registered mapping it is Swap
    smaps = any(COLUMNS[c].source in ("smaps", "derived") or c in ("written", "swapped") for c in columns)
    classes = tuple(c for c in STAT_CATEGORIES if c in columns)
    return smaps, classes


@dataclasses.dataclass
class Snapshot:
    """What one ``stat`` run read: the table is rendered column by column; the
    :class:`MappingStat` objects are built only for what needs them (JSON, derived
    columns)."""

    pid: int
    table: _MappingTable
    columns: list[str]
    #: (command line, user name, uid), read right after the table.
    header: tuple[str, str, int] = ("", "", -1)
    rollup: dict[str, int] | None = None

    @property
    def stats(self) -> list[MappingStat]:
        return self.table.stats()


def collect(pid: int, columns: Sequence[str], backend: str = "auto") -> Snapshot:
    smaps, classes = _needs(columns)
    try:
        table = _mapping_table(pid, backend=backend, smaps=smaps, categories=classes)
    except UnknowablePagesError as err:
        # The emulation without the privilege to read PFNs: those classes show "-".
        unknown = {c for c, bit in (("zero", Category.PFNZERO), ("huge", Category.HUGE)) if err.categories & bit}
        unknown |= {"zero", "huge"} & set(classes)  # (both hang on the same PFNs)
        table = _mapping_table(pid, backend=backend, smaps=smaps, categories=[c for c in classes if c not in unknown])
    return Snapshot(pid, table, list(columns), header_line(pid))


def _exited(pid: int) -> ProcessLookupError:
    return ProcessLookupError(errno.ESRCH, f"pid {pid} exited while it was read")


def header_line(pid: int) -> tuple[str, str, int]:
    """(command line, user name, uid); ``ProcessLookupError`` if the process has gone
    (its mappings were just read: a report of them under an empty name would say
    nothing of the exit)."""
    try:
        uid = process_uid(pid)
        return read_cmdline(pid), user_name(uid), uid
    except (FileNotFoundError, ProcessLookupError):
        raise _exited(pid) from None


# -- rows ---------------------------------------------------------------------------------


def group_name(s: MappingStat) -> str:
    """The ``--group`` key: the file, ``[anon]`` for unnamed anonymous memory, or the
    bracketed name the kernel gives (``[heap]``, ``[stack]``, ``[anon:NAME]``, ``[vdso]``)."""
    return s.name or "[anon]"


@dataclasses.dataclass(slots=True)
class Row:
    """One line of the table: a mapping, a group of them or the total."""

    label: str
    perms: str
    name: str
    values: list[Any]
    count: int = 1
    start: int = 0
    busy: bool = True


def _busy(t: _MappingTable) -> list[bool]:
    """Per mapping: something resident, swapped or guarded."""
    cols: list[list[Any]] = [t.field(f) for f in ("Rss", "Swap", "Shared_Hugetlb", "Private_Hugetlb")]
    cols += [t.pages(c) for c in ("present", "swapped", "guard", "zero") if c in t.classes]
    return [any(x) for x in zip(*cols)]


_FIELD_OF = {f.lower(): f for f in SMAPS_FIELDS}


def _column_values(c: str, snap: Snapshot) -> list[Any]:
    """The column's value for every mapping, from the table's columns where they hold
    it (the rest from :class:`MappingStat`)."""
    col = COLUMNS[c]
    t = snap.table
    if col.source == "smaps" and col.kind != "text":
        return t.field(_FIELD_OF[c])
    if col.source == "scan" and c != "written":
        if c not in t.classes:  # not knowable here (see collect)
            return [None] * len(t)
        return [n * _P for n in t.pages(c)]
    if c == "size":
        return [v[1] - v[0] for v in t.vmas]
    if c == "uss":
        return [None if a is None else a + (b or 0)
                for a, b in zip(t.field("Private_Clean"), t.field("Private_Dirty"))]
    if c == "dirty":
        return [None if a is None else a + (b or 0)
                for a, b in zip(t.field("Private_Dirty"), t.field("Shared_Dirty"))]
    return [col.get(s) for s in snap.stats]


def mapping_order(snap: Snapshot, per_column: Sequence[list[Any]], every: bool, key: str) -> list[int]:
    """The mappings shown, in order (``every``: also those with nothing resident, swapped
    or guarded; ``key``: ``address`` or the column to sort by, largest first)."""
    t = snap.table
    order = list(range(len(t))) if every else [i for i, b in enumerate(_busy(t)) if b]
    if key != "address":
        if key == "size" and "size" not in snap.columns:
            raise UsageError("--sort size needs the size column")
        col, vmas = per_column[snap.columns.index(key)], t.vmas
        order.sort(key=lambda i: (-(col[i] or 0), vmas[i][0]))
    return order


def _add(a: Any, b: Any, kind: str) -> Any:
    """Two mappings' values in one group: sizes add up; other values stay if equal."""
    if kind != "bytes":
        return a if a == b else ("" if kind == "text" else None)
    if a is None or b is None:
        return None
    return a + b


def group_rows(snap: Snapshot, per_column: Sequence[list[Any]], columns: Sequence[str],
               every: bool) -> list[Row]:
    kinds = ["int" if c in _NOT_SUMMED else COLUMNS[c].kind for c in columns]  # "int": kept if equal
    groups: dict[str, Row] = {}
    vmas = snap.table.vmas
    values: Iterable[Sequence[Any]] = zip(*per_column) if per_column else ([] for _ in vmas)
    for (start, _, perms, _, name, _, _), v, busy in zip(vmas, values, _busy(snap.table)):
        key = name or "[anon]"  # group_name()
        g = groups.get(key)
        if g is None:
            groups[key] = Row("1 map", perms, key, list(v), 1, start, busy)
        else:
            g.values = [_add(a, b, k) for a, b, k in zip(g.values, v, kinds)]
            g.count += 1
            g.label = f"{g.count} maps"
            g.perms = g.perms if g.perms == perms else ""
            g.busy = g.busy or busy
    return [g for g in groups.values() if every or g.busy]


#: Columns whose sum means nothing.
_NOT_SUMMED = frozenset({"inode", "kernelpagesize", "mmupagesize", "thpeligible", "protectionkey"})
_NOT_SUMMED_SMAPS = frozenset({"KernelPageSize", "MMUPageSize", "THPeligible", "ProtectionKey"})
#: Columns smaps has only for the whole process: totals from smaps_rollup when a
#: mapping holds more than one kind of page.
_ROLLUP_ONLY = {"pss_anon": "Pss_Anon", "pss_file": "Pss_File", "pss_shmem": "Pss_Shmem"}
#: Totals taken from smaps_rollup whenever it can be read: the kernel sums PSS in a
#: finer unit than the KiB each smaps record is cut down to, so the per-mapping values
#: add up to less (a fifth less with 10,000 mappings shared with two other processes).
_PSS_TOTALS = {"pss": "Pss", "pss_dirty": "Pss_Dirty", "swappss": "SwapPss", **_ROLLUP_ONLY}


def total_row(snap: Snapshot, per_column: Sequence[list[Any]]) -> Row:
    values: list[Any] = []
    for i, c in enumerate(snap.columns):
        col = COLUMNS[c]
        if col.kind == "text":
            values.append("")
            continue
        xs = per_column[i]
        if c in _PSS_TOTALS and _PSS_TOTALS[c] in _rollup(snap):
            values.append(_rollup(snap)[_PSS_TOTALS[c]])
        elif c in _ROLLUP_ONLY and any(x is None for x in xs):
            values.append(None)
        elif c == "written":
            known = [x for x in xs if x is not None]
            values.append(sum(known) if known else None)
        elif c in _NOT_SUMMED or (col.source == "scan" and c not in snap.table.classes):  # (not knowable)
            values.append(None)
        else:
            values.append(sum([x for x in xs if x is not None]))
    return Row("total", "", f"{len(snap.table)} mappings", values, len(snap.table))


def _rollup(snap: Snapshot) -> dict[str, int]:
    if snap.rollup is None:
        try:
            snap.rollup = read_rollup(snap.pid)
        except (FileNotFoundError, ProcessLookupError):
            raise _exited(snap.pid) from None
        except OSError:
            snap.rollup = {}  # (not allowed: the totals are the mappings' sums)
    return snap.rollup


_human = functools.lru_cache(maxsize=4096)(human)  # sizes repeat: 0, 4.0K, ...


def _cells(values: list[Any], kind: str) -> list[str]:
    """One column's cells: sizes with units, ``-`` where there is no value."""
    if kind == "bytes":
        h = _human
        return ["-" if v is None else h(v) for v in values]
    return ["-" if v is None else str(v) for v in values]


def sort_rows(rows: list[Row], key: str, columns: Sequence[str]) -> list[Row]:
    if key == "address":
        return sorted(rows, key=lambda r: r.start)
    if key == "size" and "size" not in columns:
        raise UsageError("--sort size needs the size column")
    i = list(columns).index(key)
    return sorted(rows, key=lambda r: (-(r.values[i] or 0), r.start))


def render(snap: Snapshot, args: argparse.Namespace, explicit_columns: bool) -> list[str]:
    """The lines of the table (header line, column headers, rows, total, summary)."""
    columns = snap.columns
    per_column = [_column_values(c, snap) for c in columns]
    total = total_row(snap, per_column)
    kinds = [COLUMNS[c].kind for c in columns]
    if args.group:
        every = [*sort_rows(group_rows(snap, per_column, columns, args.all), args.sort, columns), total]
        labels = [r.label for r in every]
        perms = [r.perms for r in every]
        names = [printable(r.name) for r in every]
        col_cells = [_cells([r.values[i] for r in every], k) for i, k in enumerate(kinds)]
    else:  # straight from the columns, no row objects
        order = mapping_order(snap, per_column, args.all, args.sort)
        vmas = snap.table.vmas
        labels = [f"{vmas[i][0]:x}" for i in order] + [total.label]
        perms = [vmas[i][2] for i in order] + [total.perms]
        names = [printable(vmas[i][4]) for i in order] + [total.name]
        col_cells = [_cells([col[i] for i in order] + [total.values[j]], k)
                     for j, (col, k) in enumerate(zip(per_column, kinds))]
    shown = list(range(len(columns)))
    notes: list[str] = []
    first = "MAPS" if args.group else "ADDRESS"

    # widths from the columns (no row-by-row transposition)
    cell_w = [max(map(len, c)) for c in col_cells]
    fixed_w = [max(len(first), max(map(len, labels))), max(len("PERM"), max(map(len, perms)))]

    def widths_for(shown: list[int]) -> list[int]:
        return fixed_w + [max(len(COLUMNS[columns[i]].header), cell_w[i]) for i in shown]

    term = terminal_width()
    while True:
        widths = widths_for(shown)
        if explicit_columns or args.wide or sum(widths) + 2 * len(widths) + _MIN_NAME <= term:
            break
        # too wide: leave out default columns with nothing to show
        victim = next((columns.index(c) for c in _DROP_ORDER
                       if c in columns and columns.index(c) in shown and not total.values[columns.index(c)]), None)
        if victim is None:
            break
        shown.remove(victim)
        notes.append(f"{columns[victim]} (all zero)")
    headers = [first, "PERM"] + [COLUMNS[columns[i]].header for i in shown] + ["MAPPING"]
    body = list(zip(labels, perms, *[col_cells[i] for i in shown], names))
    align = "<<" + "".join("<" if kinds[i] == "text" else ">" for i in shown) + "<"
    cmd, user, _ = snap.header
    out = [f"pid {snap.pid} ({user or '?'}): {printable(cmd)}"]
    if not args.wide and len(out[0]) > term:
        out[0] = out[0][: max(term - 1, 20)] + "…"
    out.append(table(headers, body, align, cut="none" if args.wide else "middle",
                     widths=[*widths, max(len("MAPPING"), max(map(len, names)))]))
    line = summary(snap, total)
    out.extend([line] if args.wide else textwrap.wrap(line, max(term, 40), subsequent_indent="  ",
                                                      break_on_hyphens=False))
    if notes:
        out.append(f"(not shown: {', '.join(notes)})")
    return out


def summary(snap: Snapshot, total: Row) -> str:
    """``RSS 4.0M (PSS 961K, USS 328K), swap 0, zero pages 12K (not in RSS), ...``."""
    t = snap.table
    have = {c: total.values[i] for i, c in enumerate(snap.columns)}
    parts = []
    if len(t) and t.fields is not None:

        def tot(field: str) -> int:
            return sum([x for x in t.field(field) if x is not None])

        uss = tot("Private_Clean") + tot("Private_Dirty")
        pss = _rollup(snap).get("Pss", tot("Pss"))
        parts.append(f"RSS {human(tot('Rss'))} (PSS {human(pss)}, USS {human(uss)}), swap {human(tot('Swap'))}")
        private_hugetlb = tot("Private_Hugetlb")
        hugetlb = tot("Shared_Hugetlb") + private_hugetlb
        if hugetlb:  # psutil's uss is USS + Private_Hugetlb
            parts.append(f"hugetlb {human(hugetlb)} ({human(private_hugetlb)} private; not in RSS or USS)")
    unknown = "unknown (needs the privilege to read PFNs on this kernel)"
    if "zero" in have:
        parts.append(f"zero pages {unknown if have['zero'] is None else human(have['zero'])} (not in RSS)")
    if "huge" in have:
        parts.append(f"huge {unknown if have['huge'] is None else human(have['huge'])}")
    size = sum([v[1] - v[0] for v in t.vmas])
    parts.append(f"{len(t)} mappings, {human(size)} mapped")
    return "total: " + ", ".join(parts)


# -- JSON ---------------------------------------------------------------------------------

_KEYS = sorted(STAT_CATEGORIES)


_PAGES_TEMPLATE = "{" + ", ".join(f'"{k}": %s' for k in _KEYS) + "}"
_pages_of = operator.itemgetter(*_KEYS)
_WRITTEN_AT = _KEYS.index("written")


def _mapping_json(s: MappingStat, smaps_json: Callable[[dict[str, int]], str]) -> RawJSON:
    """``json.dumps(s.as_dict(), sort_keys=True)``, several times faster (1,000s of rows)."""
    pages = s.pages
    if len(pages) == len(_KEYS):
        counts = list(_pages_of(pages))
        nbytes: list[Any] = [v * _P for v in counts]
        if s.vmflags and "uw" not in s.vmflags:
            counts[_WRITTEN_AT] = nbytes[_WRITTEN_AT] = "null"
        p = _PAGES_TEMPLATE % tuple(counts)
        b = _PAGES_TEMPLATE % tuple(nbytes)
    else:  # a subset of the classes
        d = s.as_dict()
        p = _dumps_dict(d["pages"])
        b = _dumps_dict(d["bytes"])
    flags = ", ".join([_string(x) for x in sorted(s.vmflags)])
    split = s.pss_split or (None, None, None)
    return RawJSON(
        f'{{"bytes": {b}, "device": {_string(s.device)}, "end": {s.end}, "inode": {s.inode}, '
        f'"name": {_string(s.name)}, "offset": {s.offset}, "pages": {p}, "perms": {_string(s.perms)}, '
        f'"pss_anon": {_num(split[0])}, "pss_file": {_num(split[1])}, "pss_shmem": {_num(split[2])}, '
        f'"size": {s.end - s.start}, "smaps": {smaps_json(s.smaps)}, "start": {s.start}, '
        f'"uss": {_num(s.uss)}, "vmflags": [{flags}]}}'
    )


def _num(v: int | None) -> str:
    return "null" if v is None else str(v)


def _dumps_dict(d: dict[str, Any]) -> str:
    return "{" + ", ".join([f"{_string(k)}: {_num(v)}" for k, v in sorted(d.items())]) + "}"


def _smaps_encoder(stats: Sequence[MappingStat]) -> Callable[[dict[str, int]], str]:
    """Encodes an smaps dict, keys sorted: one ``%`` template when every mapping has
    the same fields (the kernel prints the same lines for each)."""
    keys = sorted(stats[0].smaps) if stats else []
    if not keys or any(len(s.smaps) != len(keys) for s in stats):
        return _dumps_dict
    template = "{" + ", ".join(f"{_string(k)}: %d" for k in keys) + "}"
    values = operator.itemgetter(*keys)
    if len(keys) == 1:
        return lambda d: template % (values(d),)
    return lambda d: template % values(d)


def to_json(snap: Snapshot, groups: bool = True) -> dict[str, Any]:
    stats = snap.stats
    cmd, user, uid = snap.header
    encode = _smaps_encoder(stats)
    sum_smaps = _sum_smaps(stats)
    pages_json = _sum_pages(stats)
    splits = [s.pss_split for s in stats]
    r = _rollup(snap) if stats else {}
    if "Pss_Anon" in r:
        pss3: list[int | None] = [r.get("Pss_Anon"), r.get("Pss_File"), r.get("Pss_Shmem")]
    elif all(x is not None for x in splits):
        pss3 = [sum(x[i] for x in splits if x is not None) for i in range(3)]
    else:
        pss3 = [None, None, None]
    for field in ("Pss", "Pss_Dirty", "SwapPss"):  # (see _PSS_TOTALS)
        if field in sum_smaps and field in r:
            sum_smaps[field] = r[field]
    doc: dict[str, Any] = {
        "pid": snap.pid,
        "command": cmd,
        "user": user,
        "uid": uid,
        "page_size": _P,
        "mappings": [_mapping_json(s, encode) for s in stats],
        "totals": {
            "mappings": len(stats),
            "size": sum(s.size for s in stats),
            "pages": pages_json,
            "bytes": {k: None if v is None else v * _P for k, v in pages_json.items()},
            "smaps": sum_smaps,
            "uss": sum(s.uss or 0 for s in stats),
            "pss_anon": pss3[0],
            "pss_file": pss3[1],
            "pss_shmem": pss3[2],
        },
        "psutil": _psutil_view(snap.pid, sum_smaps),
    }
    if groups:
        doc["groups"] = _groups_json(stats)
    return doc


def _psutil_view(pid: int, sums: dict[str, int]) -> dict[str, int | None]:
    """psutil's ``memory_full_info()`` fields for the process, computed as psutil does on
    Linux: ``/proc/PID/statm`` for ``rss vms shared text lib data dirty``, smaps for
    ``uss`` (``Private_Clean + Private_Dirty + Private_Hugetlb``), ``pss`` and ``swap``.
    ``sums``: the totals of the smaps fields (``Pss`` smaps_rollup's, as :func:`to_json`
    gives them; empty without smaps)."""
    try:
        out: dict[str, int | None] = dict(read_statm(pid))
    except (FileNotFoundError, ProcessLookupError):
        raise _exited(pid) from None
    if "Private_Clean" in sums:
        out["uss"] = sums["Private_Clean"] + sums.get("Private_Dirty", 0) + sums.get("Private_Hugetlb", 0)
        out["pss"], out["swap"] = sums.get("Pss"), sums.get("Swap")
    else:
        out["uss"] = out["pss"] = out["swap"] = None
    return out


def _sum_smaps(stats: Sequence[MappingStat]) -> dict[str, int]:
    keys: dict[str, None] = {}
    for s in stats:
        if len(s.smaps) != len(keys):
            keys.update(dict.fromkeys(s.smaps))
    return {k: sum([s.smaps.get(k, 0) for s in stats]) for k in keys if k not in _NOT_SUMMED_SMAPS}


def _sum_pages(stats: Sequence[MappingStat]) -> dict[str, int | None]:
    """Pages per class; ``written`` only over uffd-wp mappings (``None`` if there are none);
    ``None`` for a class that could not be counted (see :func:`collect`)."""
    out: dict[str, int | None] = {k: sum([s.pages.get(k, 0) for s in stats]) for k in STAT_CATEGORIES}
    if stats:
        for k in STAT_CATEGORIES:
            if k not in stats[0].pages:
                out[k] = None
    if stats and stats[0].smaps:
        written = [s.pages["written"] for s in stats if s.uffd_wp]
        out["written"] = sum(written) if written else None
    return out


def _groups_json(stats: Sequence[MappingStat]) -> list[dict[str, Any]]:
    """Sums per ``--group`` key, with numpy over a mappings x fields matrix."""
    index: dict[str, int] = {}
    gidx = np.array([index.setdefault(group_name(s), len(index)) for s in stats], dtype=np.intp)
    keys = [k for k in (stats[0].smaps if stats else {}) if k not in _NOT_SUMMED_SMAPS]
    if any(len(s.smaps) != len(stats[0].smaps) for s in stats):
        keys = list(_sum_smaps(stats))
    smaps = _group_sums(gidx, len(index), [[s.smaps.get(k, 0) for k in keys] for s in stats], len(keys))
    classes = list(STAT_CATEGORIES)
    unknown = [c for c in classes if stats and c not in stats[0].pages]  # not countable (see collect)
    pages = _group_sums(gidx, len(index), [[s.pages.get(c, 0) for c in classes] for s in stats], len(classes))
    written = _group_sums(gidx, len(index), [[s.pages.get("written", 0) if s.uffd_wp else 0, 1 if s.uffd_wp else 0,
                                              s.end - s.start, s.uss or 0, 1] for s in stats], 5)
    out = []
    for name, g in index.items():
        pg: dict[str, int | None] = dict(zip(classes, pages[g]))
        for c in unknown:
            pg[c] = None
        if stats[0].smaps:  # WRITTEN only where uffd-wp is registered
            pg["written"] = written[g][0] if written[g][1] else None
        out.append({
            "name": name,
            "mappings": written[g][4],
            "size": written[g][2],
            "uss": written[g][3],
            "smaps": dict(zip(keys, smaps[g])),
            "pages": pg,
            "bytes": {k: None if v is None else v * _P for k, v in pg.items()},
        })
    return out


def _group_sums(gidx: np.ndarray, ngroups: int, rows: list[list[int]], width: int) -> list[list[int]]:
    matrix = np.array(rows, dtype=np.int64).reshape(len(rows), width)
    out = np.zeros((ngroups, width), dtype=np.int64)
    np.add.at(out, gidx, matrix)
    result: list[list[int]] = out.tolist()
    return result


# -- run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    explicit = args.columns is not None
    columns = list(args.columns) if explicit else list(DEFAULT_COLUMNS)
    if args.sort not in _SORT_FIXED and args.sort not in columns:
        columns.append(args.sort)  # sorting by a column shows it
    if args.count is not None and args.watch is None:
        raise UsageError("--count needs --watch")
    if args.watch is not None:
        if args.json:
            raise UsageError("--watch and --json do not go together")
        from ._watch import watch

        return watch(args.watch, args.count,
                     lambda: render(collect(args.pid, columns, args.backend), args, explicit))
    if args.json:
        snap = collect(args.pid, list(COLUMNS), args.backend)
        print_json(to_json(snap))
        return 0
    snap = collect(args.pid, columns, args.backend)
    sys.stdout.write("\n".join(render(snap, args, explicit)) + "\n")
    return 0
