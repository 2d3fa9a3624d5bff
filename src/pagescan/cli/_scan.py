"""``pagescan scan PID [RANGE]``: regions with their categories."""

from __future__ import annotations

import argparse
import bisect
import os
import re
from typing import Any

from pagescan import Target, masks, scan_iter
from pagescan._procfs import read_maps

from ._common import (
    UsageError,
    category_letters,
    category_names,
    human,
    nonneg_int,
    parse_categories,
    parse_pid,
    print_json,
    printable,
    table,
)

_P = os.sysconf("SC_PAGE_SIZE")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "scan",
        help="list regions of a process's memory and their page categories",
        description="Run PAGEMAP_SCAN over a process's memory (or RANGE) and print the regions "
        "of pages with equal categories. CATS are comma-separated category names: present, "
        "swapped (swap), written, file, zero (pfnzero), huge, soft-dirty, guard, wpallowed (wp), "
        "or 'all'. The table's PSWFZHDGA column shows one letter per reported category.",
    )
    p.add_argument("pid", type=parse_pid, help="process id, or 'self'")
    p.add_argument(
        "range", nargs="?", default=None,
        help="START-END in hex (0x7f00-0x7f80; START page aligned), or a mapping name: [heap], "
        "[stack], a path or a file name (every mapping of that name) (default: the whole "
        "address space)",
    )
    p.add_argument("--require", type=parse_categories, default=0, metavar="CATS",
                   help="report only pages that have all of these categories")
    p.add_argument("--exclude", type=parse_categories, default=0, metavar="CATS",
                   help="report only pages that have none of these categories")
    p.add_argument("--anyof", type=parse_categories, default=0, metavar="CATS",
                   help="report only pages that have at least one of these categories")
    p.add_argument(
        "--return", dest="ret", type=parse_categories, default=None, metavar="CATS",
        help="categories to report, and to merge adjacent pages on (default: all this kernel supports)",
    )
    p.add_argument("--max-pages", type=nonneg_int, default=0, metavar="N",
                   help="stop after N matching pages (default 0: no limit)")
    p.add_argument("--backend", choices=("auto", "kernel", "emulated"), default="auto",
                   help="kernel ioctl, or its emulation from /proc/PID/pagemap (default auto: the ioctl if present)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: pid, the ranges scanned and the regions")
    p.set_defaults(run=run, subparser=p)


def _hex(text: str) -> int:
    return int(text, 16)


def resolve_range(pid: int, text: str | None) -> list[tuple[int, int, str]]:
    """``[(start, end, label)]`` for a hex range or a mapping name."""
    from pagescan._procfs import task_size

    limit = task_size()
    vmas = read_maps(pid)
    beyond = [v for v in vmas if v.end > limit]  # [vsyscall]: no page tables to scan
    vmas = [v for v in vmas if v.end <= limit]
    if text is None:
        return [(vmas[0].start, vmas[-1].end, "")] if vmas else []
    # A mapping's name first: a file may be called "add-bed" (or "1000-2000").
    found = [(v.start, v.end, v.name) for v in vmas if v.name and (v.name == text or os.path.basename(v.name) == text)]
    if found:
        return found
    lo_s, sep, hi_s = text.partition("-")
    if sep and lo_s and hi_s:
        try:
            lo, hi = _hex(lo_s), _hex(hi_s)
        except ValueError:
            pass
        else:
            if lo % _P:
                raise UsageError(f"range start {lo:#x} is not page aligned (page size {_P:#x})")
            if hi <= lo:
                raise UsageError(f"empty range {text!r}: END must be above START")
            if hi > limit:
                raise UsageError(f"range {text!r} ends beyond user space ({limit:#x})")
            return [(lo, hi, text)]
    if any(v.name == text for v in beyond):
        raise UsageError(f"{text} lies beyond user space ({limit:#x}): PAGEMAP_SCAN does not walk it")
    if re.fullmatch(r"(0[xX])?[0-9a-fA-F]*-(0[xX])?[0-9a-fA-F]*", text):  # a range, half written
        raise UsageError(f"bad range {text!r}: START-END, both in hex")
    raise ValueError(f"no mapping named {text!r} in pid {pid} (and not a START-END hex range)")


def run(args: argparse.Namespace) -> int:
    try:
        m = masks(require=args.require, exclude=args.exclude, anyof=args.anyof, report=args.ret)
    except ValueError as err:
        raise UsageError(str(err)) from None
    out: list[tuple[int, int, int]] = []
    budget = args.max_pages
    with Target(args.pid) as target:
        ranges = resolve_range(args.pid, args.range)
        for lo, hi, _ in ranges:
            for res in scan_iter(
                lo, hi, pid=target, max_pages=budget, backend=args.backend,
                category_inverted=m["category_inverted"], category_mask=m["category_mask"],
                category_anyof_mask=m["category_anyof_mask"], return_mask=m["return_mask"],
            ):
                out.extend(res.regions.tolist())
                if budget:
                    budget -= res.pages
            if args.max_pages and budget <= 0:
                break
        vmas = read_maps(args.pid) if not args.json else []
    if args.json:
        print_json(
            {
                "pid": args.pid,
                "page_size": _P,
                "ranges": [{"start": lo, "end": hi, "name": name} for lo, hi, name in ranges],
                "regions": [
                    {"start": s, "end": e, "pages": (e - s) // _P, "categories": category_names(c)}
                    for s, e, c in out
                ],
            }
        )
        return 0
    starts = [v.start for v in vmas]
    rows = []
    for s, e, c in out:
        i = bisect.bisect_right(starts, s) - 1
        label = printable(vmas[i].name) if i >= 0 and vmas[i].end > s else ""
        rows.append([f"{s:x}-{e:x}", str((e - s) // _P), human(e - s), category_letters(c), label])
    print(table(["RANGE", "PAGES", "SIZE", "PSWFZHDGA", "MAPPING"], rows, "<>><<"))
    total = sum(e - s for s, e, _ in out)
    print(f"{len(out)} regions, {total // _P} pages ({human(total)})")
    return 0
