"""``pagescan`` command line: a thin shell over the public API.

Library errors print as ``pagescan: <Type>: <message>`` with exit status 1, never a
traceback; bad usage exits 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .. import __version__
from . import _caps, _map, _scan, _stat

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagescan",
        description="Page-level inspection of Linux process memory (PAGEMAP_SCAN, userfaultfd).",
    )
    parser.add_argument("--version", action="version", version=f"pagescan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _caps.add_parser(sub)
    _scan.add_parser(sub)
    _stat.add_parser(sub)
    _map.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:
        return 0
    except (OSError, ValueError, NotImplementedError) as err:
        print(f"pagescan: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
