"""``pagescan stat PID --watch SECONDS``: the stat table redrawn in place with curses.

Cells whose value changed since the previous screen are shown in bold (reverse video
for the row's address), so growth is visible at a glance. ``q`` quits; ``--count N``
stops after N screens (scripts, tests).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any


def watch(seconds: float, count: int | None, draw: Callable[[], list[str]]) -> int:
    """Show ``draw()``'s lines every ``seconds``, ``count`` times (``None``: until q)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("pagescan: stat --watch needs a terminal (stdin and stdout); use --json for scripts",
              file=sys.stderr)
        return 1
    try:
        import curses
    except ImportError as err:  # pragma: no cover - a Python built without curses
        print(f"pagescan: stat --watch needs the curses module ({err})", file=sys.stderr)
        return 1
    result: list[Any] = []
    curses.wrapper(_loop, seconds, count, draw, result)
    if result and isinstance(result[0], ProcessLookupError):  # printed once the screen is restored
        print(f"pagescan: ProcessLookupError: {' '.join(str(result[0]).split())}", file=sys.stderr)
        return 1
    return int(result[0]) if result else 0


def _loop(screen: Any, seconds: float, count: int | None, draw: Callable[[], list[str]], result: list[Any]) -> None:
    import curses

    curses.curs_set(0)
    screen.timeout(0)
    previous: dict[str, list[str]] = {}
    shown = 0
    while True:
        rows, cols = screen.getmaxyx()
        os.environ["COLUMNS"] = str(cols - 1)  # draw() fits the table to what a line may hold (cols - 1)
        try:
            lines = draw()
        except ProcessLookupError as err:
            result.append(err)
            return  # the process exited: said on stderr once curses has restored the terminal
        text = "\n".join(lines).split("\n")
        screen.erase()
        stamp = time.strftime("%H:%M:%S")
        screen.addnstr(0, 0, f"every {seconds:g}s, {stamp}; q quits", cols - 1, curses.A_DIM)
        current: dict[str, list[str]] = {}
        for y, line in enumerate(text[: rows - 1], start=1):
            cells = line.split()
            key = cells[0] + " " + (cells[-1] if cells else "") if cells else ""
            current[key] = cells
            old = previous.get(key)
            if old is None or not previous or old == cells or y <= 2:  # (the pid line and the headers)
                screen.addnstr(y, 0, line, cols - 1)
                continue
            # draw cell by cell, changed cells in bold
            x = 0
            for k, cell in enumerate(cells):
                pos = line.find(cell, x)
                if pos < 0 or pos >= cols - 1:
                    break
                if k == 0:  # the address (the row's key): reverse video, the row changed
                    attr = curses.A_REVERSE
                elif k >= len(old) or old[k] != cell:
                    attr = curses.A_BOLD
                else:
                    attr = curses.A_NORMAL
                screen.addnstr(y, pos, cell, cols - 1 - pos, attr)
                x = pos + len(cell)
        previous = current
        screen.refresh()
        shown += 1
        if count is not None and shown >= count:
            result.append(0)
            return
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            curses.napms(int(min(left, 0.1) * 1000) or 1)
            ch = screen.getch()
            if ch in (ord("q"), ord("Q")):
                result.append(0)
                return
