"""``pagescan stat PID``: pages per category for every mapping, and totals."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pagescan.inspect import STAT_CATEGORIES, mapping_stats

from ._common import human, parse_pid, table

_P = os.sysconf("SC_PAGE_SIZE")
_SORT_KEYS = ("address", "size", *STAT_CATEGORIES)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stat",
        help="per-mapping page counts of a process (present, swapped, zero, huge, file, written, guard)",
        description="One row per mapping with the memory in each page category, from PAGEMAP_SCAN. "
        "'present' minus 'zero' equals smaps Rss; 'huge' equals AnonHugePages + ShmemPmdMapped + "
        "FilePmdMapped (+ hugetlb).",
    )
    p.add_argument("pid", type=parse_pid, help="process id, or 'self'")
    p.add_argument("--sort", choices=_SORT_KEYS, default="address", help="row order (largest first, except address)")
    p.add_argument("--all", action="store_true", help="also list mappings with nothing present or swapped")
    p.add_argument("--backend", choices=("auto", "kernel", "emulated"), default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output (bytes and pages)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    stats = mapping_stats(args.pid, backend=args.backend)
    totals = {k: sum(s.pages[k] for s in stats) for k in STAT_CATEGORIES}
    if args.json:
        from . import print_json

        print_json(
            {
                "pid": args.pid,
                "page_size": _P,
                "mappings": [s.as_dict() for s in stats],
                "totals": {"pages": totals, "bytes": {k: v * _P for k, v in totals.items()}},
            }
        )
        return 0
    rows_src = stats if args.all else [s for s in stats if s.pages["present"] or s.pages["swapped"]]
    if args.sort == "size":
        rows_src = sorted(rows_src, key=lambda s: -s.size)
    elif args.sort != "address":
        rows_src = sorted(rows_src, key=lambda s: -s.pages[args.sort])
    cols = list(STAT_CATEGORIES)
    rows = [
        [f"{s.start:x}", s.perms, human(s.size)] + [human(s.pages[c] * _P) for c in cols] + [s.name]
        for s in rows_src
    ]
    rows.append(["total", "", human(sum(s.size for s in stats))] + [human(totals[c] * _P) for c in cols] + [
        f"{len(stats)} mappings"
    ])
    headers = ["ADDRESS", "PERM", "SIZE"] + [c.upper() for c in cols] + ["MAPPING"]
    print(table(headers, rows, "<<>" + ">" * len(cols) + "<"))
    return 0
