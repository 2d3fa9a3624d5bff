"""``pagescan scan PID [RANGE]``: regions with their categories."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pagescan import Target, masks, scan_iter
from pagescan._procfs import read_maps

from ._common import category_letters, category_names, human, parse_categories, parse_pid, table


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "scan",
        help="list regions of a process's memory and their page categories",
        description="Run PAGEMAP_SCAN over a process's memory (or RANGE) and print the regions. "
        "Categories: present, swapped, written, file, zero (pfnzero), huge, soft-dirty, guard, "
        "wpallowed; comma-separated, or 'all'.",
    )
    p.add_argument("pid", type=parse_pid, help="process id, or 'self'")
    p.add_argument(
        "range", nargs="?", default=None,
        help="START-END in hex (0x7f00-0x7f80), or a mapping name: [heap], [stack], a path "
        "(default: the whole address space)",
    )
    p.add_argument("--require", type=parse_categories, default=0, metavar="CATS", help="pages must have all of these")
    p.add_argument("--exclude", type=parse_categories, default=0, metavar="CATS", help="pages must have none of these")
    p.add_argument("--anyof", type=parse_categories, default=0, metavar="CATS", help="pages must have one of these")
    p.add_argument(
        "--return", dest="ret", type=parse_categories, default=None, metavar="CATS",
        help="categories to report (default: all this kernel supports)",
    )
    p.add_argument("--max-pages", type=int, default=0, metavar="N", help="stop after N matching pages")
    p.add_argument("--backend", choices=("auto", "kernel", "emulated"), default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def resolve_range(pid: int, text: str | None) -> list[tuple[int, int, str]]:
    """``[(start, end, label)]`` for a hex range or a mapping name."""
    vmas = read_maps(pid)
    if text is None:
        from pagescan._backend_emulated import task_size

        limit = task_size()
        vmas = [v for v in vmas if v.end <= limit]
        return [(vmas[0].start, vmas[-1].end, "")] if vmas else []
    lo_s, sep, hi_s = text.partition("-")
    if sep and lo_s and hi_s:
        try:
            return [(int(lo_s, 16), int(hi_s, 16), text)]
        except ValueError:
            pass
    found = [(v.start, v.end, v.name) for v in vmas if v.name == text or os.path.basename(v.name) == text]
    if not found:
        raise ValueError(f"no mapping named {text!r} in pid {pid} (and not a START-END hex range)")
    return found


def run(args: argparse.Namespace) -> int:
    if args.max_pages < 0:
        raise ValueError("--max-pages must not be negative")
    m = masks(require=args.require, exclude=args.exclude, anyof=args.anyof, report=args.ret)
    out: list[tuple[int, int, int]] = []
    budget = args.max_pages
    with Target(args.pid) as target:
        for lo, hi, _ in resolve_range(args.pid, args.range):
            for res in scan_iter(lo, hi, pid=target, max_pages=budget, backend=args.backend, **m):
                out.extend(res.regions.tolist())
                if budget:
                    budget -= res.pages
            if args.max_pages and budget <= 0:
                break
    if args.json:
        from . import print_json

        print_json(
            {
                "pid": args.pid,
                "regions": [
                    {"start": s, "end": e, "pages": (e - s) // _P, "categories": category_names(c)}
                    for s, e, c in out
                ],
            }
        )
        return 0
    names = {}
    for v in read_maps(args.pid):
        names[v.start] = v
    starts = sorted(names)
    import bisect

    rows = []
    for s, e, c in out:
        i = bisect.bisect_right(starts, s) - 1
        label = names[starts[i]].name if i >= 0 and names[starts[i]].end > s else ""
        rows.append([f"{s:x}-{e:x}", str((e - s) // _P), human(e - s), category_letters(c), label])
    print(table(["RANGE", "PAGES", "SIZE", "PSWFZHDGA", "MAPPING"], rows, "<>><<"))
    total = sum(e - s for s, e, _ in out)
    print(f"{len(out)} regions, {total // _P} pages ({human(total)})")
    return 0


_P = os.sysconf("SC_PAGE_SIZE")
