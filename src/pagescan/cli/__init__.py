"""``pagescan`` command line: a thin shell over the public API.

Library errors print as ``pagescan: <Type>: <message>`` (one line) with exit status 1,
never a traceback; bad usage exits 2 with the usage line (argparse, ``SystemExit``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from . import _bench, _caps, _checkpoint, _map, _ps, _scan, _stat
from ._common import RawJSON, UsageError, print_json, printable

__all__ = ["RawJSON", "build_parser", "main", "print_json"]


#: Command name -> the module that adds its subparser (``_checkpoint`` adds two).
_COMMANDS = {"caps": _caps, "scan": _scan, "stat": _stat, "ps": _ps, "map": _map, "bench": _bench,
             "checkpoint": _checkpoint, "restore": _checkpoint}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``command``, one that knows only that command
    (all running it needs: building every subparser takes milliseconds, mostly
    argparse's gettext look-ups, which ``pagescan stat`` would pay each time)."""
    parser = argparse.ArgumentParser(
        prog="pagescan",
        description="Page-level inspection of Linux process memory (PAGEMAP_SCAN, userfaultfd).",
    )
    parser.add_argument("--version", action="version", version=f"pagescan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = dict.fromkeys(_COMMANDS.values()) if command is None else [_COMMANDS[command]]
    for module in modules:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if sys.stderr is None:  # started with it closed (``2>&-``): errors are dropped
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if sys.stdout is None:  # (``>&-``): the report has nowhere to go
        print("pagescan: standard output is closed", file=sys.stderr)
        return 1
    parser = build_parser(argv[0] if argv and argv[0] in _COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as err:
        args.subparser.error(str(err))  # exits 2
        raise  # pragma: no cover - error() does not return
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, NotImplementedError) as err:
        msg = printable(" ".join(str(err).split()))  # one line; a name from a file cannot steer the terminal
        pid = getattr(args, "pid", None)
        if isinstance(err, ProcessLookupError) and pid is not None and os.path.exists(f"/proc/{pid}/status"):
            msg = f"pid {pid} has no user address space (a kernel thread, or a process that has exited)"
        print(f"pagescan: {type(err).__name__}: {msg}", file=sys.stderr)
        return 1


def _quiet_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
