"""``pagescan bench``: dirty-page tracking methods side by side on this machine.

Runs :mod:`pagescan.bench.tracking` (WriteWatch, synchronous uffd-WP with a handler
process, soft-dirty, hashing, shadow diff). Without options it runs the quick
configuration (a 128 MiB region, about half a minute); ``--full`` runs the 1 GiB one.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from pagescan.bench.tracking import build_parser

    base = build_parser("pagescan bench")
    p = sub.add_parser(
        "bench",
        help="benchmark dirty-page tracking methods (quick by default)",
        description=base.description + " Without --full or --size, runs the quick configuration.",
        parents=[base],
        add_help=False,
        conflict_handler="resolve",
    )
    p.add_argument("--full", action="store_true", help="the full configuration (1 GiB region, a few minutes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pagescan.bench.tracking import run_args

    if not args.full and args.size is None:
        args.quick = True
    return run_args(args)
