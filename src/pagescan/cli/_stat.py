"""``pagescan stat PID``: pages per category for every mapping, and totals."""

from __future__ import annotations

import argparse
import os
from json.encoder import encode_basestring_ascii as _string
from typing import Any

from pagescan.mappings import STAT_CATEGORIES, MappingStat, mapping_stats

from ._common import RawJSON, human, parse_pid, print_json, table, terminal_width

_P = os.sysconf("SC_PAGE_SIZE")
_SORT_KEYS = ("address", "size", *STAT_CATEGORIES)
#: Columns dropped first (when all zero) if the table is too wide for the terminal.
_DROP_ORDER = ("guard", "swapped", "huge", "zero", "written", "file")
#: Headers when space is short.
_SHORT = {"present": "pres", "swapped": "swap", "written": "writ"}
#: The name column keeps at least this many characters before columns are dropped.
_MIN_NAME = 24


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stat",
        help="per-mapping page counts of a process (present, swapped, zero, huge, file, written, guard)",
        description="One row per mapping (start address, permissions, size, name) with the memory "
        "in each page category, from one PAGEMAP_SCAN walk, and a total row. Sizes are in bytes "
        "with binary units (K = KiB, M = MiB, G = GiB). 'present' minus 'zero' equals smaps Rss "
        "(hugetlb: Shared_Hugetlb + Private_Hugetlb); 'swapped' equals smaps Swap (it also counts "
        "uffd-wp and poison markers, not guard markers; swapped-out shmem is not in the page "
        "tables, so not seen); 'huge' equals AnonHugePages + "
        "ShmemPmdMapped + FilePmdMapped (+ hugetlb); 'written' counts present and swapped pages "
        "not write-protected by userfaultfd. When the table would not fit the terminal, columns "
        "that are all zero (then 'written', if it only repeats present + swapped) are left out, "
        "headers are abbreviated and mapping names keep their end.",
    )
    p.add_argument("pid", type=parse_pid, help="process id, or 'self'")
    p.add_argument("--sort", choices=_SORT_KEYS, default="address",
                   help="row order: by address (default), or largest first by size or a category")
    p.add_argument("--all", action="store_true",
                   help="also list mappings with nothing present, swapped or guarded")
    p.add_argument("--backend", choices=("auto", "kernel", "emulated"), default="auto",
                   help="kernel ioctl, or its emulation from /proc/PID/pagemap (default auto: the ioctl if present)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: every mapping (pages and bytes per category) and totals")
    p.set_defaults(run=run, subparser=p)


_KEYS = sorted(STAT_CATEGORIES)


def _mapping_json(s: MappingStat) -> RawJSON:
    """``json.dumps(s.as_dict(), sort_keys=True)``, several times faster (1,000s of rows)."""
    pages = s.pages
    p = ", ".join([f'"{k}": {pages[k]}' for k in _KEYS])
    b = ", ".join([f'"{k}": {pages[k] * _P}' for k in _KEYS])
    return RawJSON(
        f'{{"bytes": {{{b}}}, "end": {s.end}, "name": {_string(s.name)}, "offset": {s.offset}, '
        f'"pages": {{{p}}}, "perms": {_string(s.perms)}, "size": {s.size}, "start": {s.start}}}'
    )


def run(args: argparse.Namespace) -> int:
    stats = mapping_stats(args.pid, backend=args.backend)
    totals = {k: sum(s.pages[k] for s in stats) for k in STAT_CATEGORIES}
    if args.json:
        print_json(
            {
                "pid": args.pid,
                "page_size": _P,
                "mappings": [_mapping_json(s) for s in stats],
                "totals": {
                    "mappings": len(stats),
                    "size": sum(s.size for s in stats),
                    "pages": totals,
                    "bytes": {k: v * _P for k, v in totals.items()},
                },
            }
        )
        return 0
    rows_src = stats if args.all else [s for s in stats if s.pages["present"] or s.pages["swapped"] or s.pages["guard"]]
    if args.sort == "size":
        rows_src = sorted(rows_src, key=lambda s: (-s.size, s.start))
    elif args.sort != "address":
        rows_src = sorted(rows_src, key=lambda s: (-s.pages[args.sort], s.start))
    cols = list(STAT_CATEGORIES)

    def render(cols: list[str]) -> list[list[str]]:
        rows = [
            [f"{s.start:x}", s.perms, human(s.size)] + [human(s.pages[c] * _P) for c in cols] + [s.name]
            for s in rows_src
        ]
        rows.append(["total", "", human(sum(s.size for s in stats))] + [human(totals[c] * _P) for c in cols]
                    + [f"{len(stats)} mappings"])
        return rows

    def width(rows: list[list[str]], headers: list[str]) -> int:
        w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
        return sum(w) + 2 * len(w) + _MIN_NAME

    # Too wide for the terminal? Leave out columns with nothing to show, then 'written' if
    # it only repeats present + swapped (no uffd-wp anywhere), then abbreviate headers.
    term = terminal_width()
    notes: list[str] = []
    short = False
    while True:
        headers = ["ADDRESS", "PERM", "SIZE"] + [(_SHORT.get(c, c) if short else c).upper() for c in cols] + ["MAPPING"]
        rows = render(cols)
        if width(rows, headers) <= term:
            break
        victim = next((c for c in _DROP_ORDER if c in cols and not totals[c]), None)
        if victim is not None:
            cols.remove(victim)
            notes.append(f"{victim} (all zero)")
        elif "written" in cols and all(s.pages["written"] == s.pages["present"] + s.pages["swapped"] for s in stats):
            cols.remove("written")
            notes.append("written (= present + swapped)")
        elif not short:
            short = True
        else:
            break
    print(table(headers, rows, "<<>" + ">" * len(cols) + "<"))
    if notes:
        print(f"(not shown: {', '.join(notes)})")
    return 0
