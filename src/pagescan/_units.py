"""Sizes and durations as people write and read them (``256M``, ``1 GiB``, ``1.25 us``).

Used by ``pagescan bench`` and by the scripts in ``benchmarks/``.
"""

from __future__ import annotations

__all__ = ["fmt_ns", "fmt_size", "parse_size"]

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"4096"``, ``"64K"``, ``"1.5G"``, ``"256MiB"`` -> bytes (powers of 1024).

    Raises ``ValueError`` naming the text if it is not a size.
    """
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = _UNITS.get(t[-1:], 1)
    if t[-1:] in _UNITS:
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 64K, 256M, 1G)") from None
    if not 0 <= value < 1 << 64:
        raise ValueError(f"not a size: {text!r} (negative or too large)")
    return int(value * mult)


def fmt_size(n: int) -> str:
    """Bytes in the largest binary unit that divides them: ``1 GiB``, ``64 KiB``, ``4097 B``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def fmt_ns(ns: float | None) -> str:
    """Nanoseconds with three significant digits at most: ``850 ns``, ``1.25 us``, ``37.1 ms``;
    ``-`` for ``None``."""
    if ns is None:
        return "-"
    a = abs(ns)
    if a < 1e3:
        return f"{ns:.0f} ns"
    for div, unit in ((1e3, "us"), (1e6, "ms"), (1e9, "s")):
        if a < div * 1e3 or unit == "s":
            v = ns / div
            return f"{v:.2f} {unit}" if abs(v) < 10 else f"{v:.1f} {unit}" if abs(v) < 100 else f"{v:.0f} {unit}"
    raise AssertionError("unreachable")
