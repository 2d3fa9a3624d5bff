"""``pagescan caps``: what this kernel supports, and what each missing piece needs."""

from __future__ import annotations

import argparse
from typing import Any

from ..capabilities import capabilities
from ._common import print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "caps",
        help="show what this kernel supports (probed)",
        description="Probe PAGEMAP_SCAN categories and flags, userfaultfd features, soft-dirty, "
        "PFN visibility, THP and hugetlb, and say what each missing piece needs.",
    )
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: every field of pagescan.capabilities(), with 'missing'")
    p.set_defaults(run=run, subparser=p)


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def run(args: argparse.Namespace) -> int:
    caps = capabilities()
    if args.json:
        print_json(caps.as_dict())
        return 0

    def yes(v: bool) -> str:
        return "yes" if v else "no"

    d = caps.as_dict()
    rows = [
        ("kernel", f"{caps.kernel_release} ({caps.machine}), page size {caps.page_size}"),
        ("PAGEMAP_SCAN", yes(caps.pagemap_scan)),
        ("  categories", " ".join(d["categories"]) or "-"),
        ("  flags", " ".join(d["scan_flags"]) or "-"),
        ("userfaultfd", yes(caps.userfaultfd)),
        ("  features", " ".join(d["uffd_features"]) or "-"),
        ("  WP async", yes(caps.wp_async)),
        ("  MOVE", yes(caps.uffd_move)),
        ("soft-dirty", yes(caps.soft_dirty)),
        (
            "scan fixes",
            " ".join(f"{k}={'?' if v is None else yes(v)}" for k, v in caps.scan_generation.items()) or "-",
        ),
        ("PFNs visible", yes(caps.pfns_visible)),
        ("kpageflags", yes(caps.kpageflags)),
        ("guard regions", yes(caps.guard_regions)),
        ("THP", f"{caps.thp_mode}" + (f", PMD {_mib(caps.thp_pmd_size)}" if caps.thp_pmd_size else "")),
        (
            "hugetlb",
            f"{_mib(caps.hugetlb_page_size)} pages: {caps.hugetlb_pages} reserved, {caps.hugetlb_free} free"
            if caps.hugetlb_page_size
            else "unavailable",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if caps.missing:
        print("\nmissing:")
        for key, why in caps.missing.items():
            print(f"  {key}: {why}")
    print("\nemulated backend (for kernels without PAGEMAP_SCAN; backend='emulated'):")
    print(f"  exact here: {' '.join(d['emulation_exact']) or '-'}")
    for key, why in caps.emulation_limits.items():
        print(f"  {key}: {why}")
    return 0
