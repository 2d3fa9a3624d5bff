"""Shared pieces of the CLI: pid and category parsing, sizes, tables."""

from __future__ import annotations

import argparse
import functools
import json
import os
import pwd
import shutil
import sys
from collections.abc import Sequence

from pagescan import Category

_ALIASES = {
    "wp": Category.WPALLOWED,
    "wpallowed": Category.WPALLOWED,
    "wp_allowed": Category.WPALLOWED,
    "written": Category.WRITTEN,
    "file": Category.FILE,
    "present": Category.PRESENT,
    "swapped": Category.SWAPPED,
    "swap": Category.SWAPPED,
    "pfnzero": Category.PFNZERO,
    "zero": Category.PFNZERO,
    "huge": Category.HUGE,
    "soft_dirty": Category.SOFT_DIRTY,
    "soft-dirty": Category.SOFT_DIRTY,
    "softdirty": Category.SOFT_DIRTY,
    "guard": Category.GUARD,
}

#: Short names used in tables (one letter per category).
LETTERS = [
    (Category.PRESENT, "P"),
    (Category.SWAPPED, "S"),
    (Category.WRITTEN, "W"),
    (Category.FILE, "F"),
    (Category.PFNZERO, "Z"),
    (Category.HUGE, "H"),
    (Category.SOFT_DIRTY, "D"),
    (Category.GUARD, "G"),
    (Category.WPALLOWED, "A"),
]


class UsageError(Exception):
    """Bad command-line input found after parsing: exit status 2 with the usage line."""


def nonneg_int(text: str) -> int:
    """A decimal integer >= 0 (argparse type)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def parse_positive(text: str, what: str = "an integer >= 1") -> int:
    """A decimal integer >= 1, ASCII digits only (``argparse`` type)."""
    try:
        value = int(text, 10) if text.isascii() and text.isdigit() else 0  # not " 5", "+5" nor "٣"
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}")
    return value


def parse_pid(text: str) -> int:
    """``self``, or a positive integer."""
    if text == "self":
        return os.getpid()
    return parse_positive(text, "a pid (a number or 'self')")


def parse_categories(text: str) -> int:
    """Comma-separated category names (``present,written``) or ``all``."""
    value = 0
    for word in text.replace("|", ",").split(","):
        word = word.strip().lower()
        if not word:
            continue
        if word == "all":
            for c in Category:
                value |= c
            continue
        if word not in _ALIASES:
            names = ", ".join(sorted({k for k in _ALIASES if "_" not in k and "-" not in k}))
            raise argparse.ArgumentTypeError(f"unknown category {word!r}; known: {names}, all")
        value |= _ALIASES[word]
    return value


def category_names(bits: int) -> list[str]:
    return [c.name.lower() for c in Category if c & bits and c.name]


def category_letters(bits: int) -> str:
    return "".join(letter if bits & cat else "." for cat, letter in LETTERS)


def human(nbytes: int) -> str:
    """1536 -> '1.5K' (powers of 1024), like psutil's bytes2human."""
    if nbytes < 1024:
        return f"{nbytes}B" if nbytes else "0"
    value = float(nbytes)
    for unit in "KMGTPE":
        value /= 1024
        # One decimal below 10 as printed (9.96 prints "10", not "10.0"); the next unit
        # once the printed value reaches 1024 (1023.5 MiB is "1.0G", not "1024M").
        text = f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
        if float(text) < 1024 or unit == "E":
            return text + unit
    raise AssertionError("unreachable")


def shorten(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, cut in the middle: a path keeps its
    directory's start and its whole file name (``/usr/lib/…/libc.so.6``); a file name
    too long for that is cut in its own middle, keeping more of its start than of its
    end (``_multiarray_um…linux-gnu.so``)."""
    if len(name) <= width:
        return name
    if width < 2:
        return name[:width]
    slash = name.rfind("/")
    base = name[slash + 1 :] if slash >= 0 else name
    if 0 <= slash and len(base) + 3 <= width:  # room for at least one leading character
        return name[: width - len(base) - 2] + "…/" + base
    head = (width - 1) * 3 // 5  # the start of a file name says more than its end
    tail = width - 1 - head
    return base[:head] + "…" + (base[-tail:] if tail else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str, last_free: bool = True,
          cut: str = "left", widths: Sequence[int] | None = None) -> str:
    """Fixed columns; the last column gets what is left of the terminal width.

    Cells of the last column that do not fit keep their end (a path's file name) behind
    a leading ``…`` (``cut="middle"``: shortened by :func:`shorten`; ``"right"``: keep
    their start; ``"none"``: left whole, lines may be wider than the terminal); if even
    the fixed columns are wider than the terminal, lines are left wider (no column is
    ever cut: ``pmap -X`` cuts none either). ``widths``: each
    column's widest cell or header, when the caller knows them already.
    """
    ncol = len(headers)
    if widths is None:
        widths = [len(h) for h in headers]
        if rows:
            widths = [max(w, max(map(len, col))) for w, col in zip(widths, zip(*rows))]
    term = terminal_width()
    fixed = sum(widths[:-1]) + 2 * (len(widths) - 1)
    room = term - fixed  # for the last column
    nfixed = ncol - 1 if last_free else ncol
    # one format string for the aligned columns (str.format pads like ljust/rjust)
    head_fmt = "  ".join("{:" + (">" if align[i] == ">" else "<") + str(widths[i]) + "}" for i in range(nfixed))
    if last_free and nfixed:
        head_fmt += "  "

    def fmt(cells: Sequence[str]) -> str:
        line = head_fmt.format(*cells[:nfixed])
        if last_free:
            cell = cells[-1]
            if cut == "none":
                return (line + cell).rstrip()
            if len(cell) > room >= 8:
                if cut == "middle":
                    cell = shorten(cell, room)
                elif cut == "right":
                    cell = cell[: room - 1] + "…"
                else:
                    cell = "…" + cell[len(cell) - room + 1 :]
            line += cell
        return line.rstrip()

    return "\n".join([fmt(headers)] + [fmt(r) for r in rows])


def terminal_width() -> int:
    """Columns of the terminal (``COLUMNS`` wins; 120 when not a terminal)."""
    return shutil.get_terminal_size((120, 24)).columns


class RawJSON(str):
    """Already-encoded JSON text, written as is by :func:`print_json`."""


def print_json(obj: object) -> None:
    """Write ``obj`` as JSON, keys sorted: a top-level list of objects (mappings,
    regions) gets one element per line, everything else is compact. json's C encoder
    does all the work (``indent=`` would use the slow pure-Python one)."""
    sys.stdout.write(_json_lines(obj))
    sys.stdout.write("\n")


def _json_lines(obj: object) -> str:
    dumps = json.dumps
    if not isinstance(obj, dict):
        return dumps(obj, sort_keys=True)
    parts = []
    for key in sorted(obj):
        value = obj[key]
        if isinstance(value, list) and value and all(isinstance(x, (dict, RawJSON)) for x in value):
            inner = ",\n    ".join([x if isinstance(x, RawJSON) else dumps(x, sort_keys=True) for x in value])
            parts.append(f"  {dumps(key)}: [\n    {inner}\n  ]")
        else:
            parts.append(f"  {dumps(key)}: {dumps(value, sort_keys=True)}")
    return "{\n" + ",\n".join(parts) + "\n}" if parts else "{}"


def printable(text: str) -> str:
    """``text`` with every unprintable character (newline, tab, escape) shown as ``?``, as ps does."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def user_name(uid: int) -> str:
    """The login name of ``uid``, or the number when it has none."""
    return _user_name(uid)


@functools.lru_cache(maxsize=256)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
