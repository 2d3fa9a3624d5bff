"""``pagescan map PID --png FILE``: a picture of a process's address space.

One row per mapping, in address order: its name, size and a bar in which every pixel
column covers an equal share of the mapping's pages and takes the colour of the page
class that covers most of that share. Large unmapped gaps are drawn as a labelled
separator instead of to scale, so a 47-bit address space fits on one page.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import numpy as np

from pagescan import Category, Target, __version__, scan_iter
from pagescan._procfs import read_maps

from ._common import human, parse_pid

_P = os.sysconf("SC_PAGE_SIZE")

#: Page classes and their colours. A page takes the first class that applies, except
#: that the huge zero page is "zero page", not "huge" (as in ``pagescan stat``). Empty
#: slots are "not present" whatever their WRITTEN bit: outside uffd-WP ranges it only
#: says that a page table exists.
CLASSES: list[tuple[str, tuple[int, int, int]]] = [
    ("guard", (220, 40, 40)),
    ("swapped", (150, 70, 190)),
    ("huge", (245, 145, 30)),
    ("zero page", (170, 200, 230)),
    ("file", (60, 160, 80)),
    ("anon", (40, 100, 200)),
    ("not present", (232, 232, 232)),
]
_NOT_PRESENT = len(CLASSES) - 1


def classify(cats: np.ndarray) -> np.ndarray:
    """Class index (into CLASSES) for each categories value."""
    c = cats.astype(np.uint64)
    out = np.full(c.shape, _NOT_PRESENT, dtype=np.int64)
    present = (c & np.uint64(Category.PRESENT)) != 0
    rules = [  # later rules win: highest priority last
        (present, 5),
        (present & ((c & np.uint64(Category.FILE)) != 0), 4),
        ((c & np.uint64(Category.HUGE)) != 0, 2),
        ((c & np.uint64(Category.PFNZERO)) != 0, 3),  # the huge zero page is a zero page
        ((c & np.uint64(Category.SWAPPED)) != 0, 1),
        ((c & np.uint64(Category.GUARD)) != 0, 0),
    ]
    for cond, idx in rules:
        out[cond] = idx
    return out


def bucket_classes(lo: int, hi: int, regions: np.ndarray, width: int) -> np.ndarray:
    """Dominant class per pixel column for the mapping [lo, hi)."""
    edges = np.linspace(lo, hi, width + 1)
    cover = np.zeros((len(CLASSES), width))
    if len(regions):
        rs = regions["start"].astype(np.float64)
        re = regions["end"].astype(np.float64)
        cls = classify(regions["categories"])
        for k in range(len(CLASSES)):
            sel = cls == k
            if not sel.any():
                continue
            s, e = rs[sel], re[sel]
            # bytes of class k below x: sum over regions of clip(x - s, 0, e - s)
            order_s = np.argsort(s)
            s, e = s[order_s], e[order_s]
            cum = np.concatenate([[0.0], np.cumsum(e - s)])

            def below(x: np.ndarray, s: np.ndarray = s, e: np.ndarray = e, cum: np.ndarray = cum) -> np.ndarray:
                i = np.searchsorted(s, x, side="right")  # regions starting at or below x
                done = cum[np.maximum(i - 1, 0)]
                part = np.where(i > 0, np.clip(x - s[np.maximum(i - 1, 0)], 0, None), 0)
                part = np.minimum(part, np.where(i > 0, e[np.maximum(i - 1, 0)] - s[np.maximum(i - 1, 0)], 0))
                return done + part

            b = below(edges)
            cover[k] = np.diff(b)
    covered = cover.sum(axis=0)
    cover[_NOT_PRESENT] += np.maximum(np.diff(edges) - covered, 0)  # not reported at all
    best: np.ndarray = np.argmax(cover, axis=0)
    return best


#: Boundaries between the mappings of a row are drawn only if there are at most one per
#: this many pixels of bar (else they would paint over it).
_MIN_SEGMENT_PX = 4


@dataclasses.dataclass(frozen=True)
class Layout:
    """Geometry of the picture, in pixels."""

    width: int
    top: int = 76  #: first row
    label_w: int = 380
    row_h: int = 16
    gap_h: int = 14

    @property
    def bar_x(self) -> int:
        return self.label_w + 10

    @property
    def bar_w(self) -> int:
        return self.width - self.bar_x - 20


def layout(width: int) -> Layout:
    return Layout(width)


def _title(pid: int, regions: np.ndarray, nvmas: int) -> str:
    """``pid 123 (root): cmdline: present 300M (zero pages 10M), swapped 0``."""
    from pagescan._procfs import process_uid, read_cmdline

    from ._common import printable, user_name

    try:  # (a command line may hold newlines: ``python -c`` with a script)
        who = f"pid {pid} ({user_name(process_uid(pid))}): {printable(read_cmdline(pid))}"
    except OSError:
        who = f"pid {pid}"
    if len(who) > 110:
        who = who[:109] + "…"
    pages = (regions["end"] - regions["start"]) if len(regions) else np.zeros(0, np.uint64)
    cats = regions["categories"] if len(regions) else np.zeros(0, np.uint64)

    def total(bit: Category) -> int:
        return int(pages[(cats & np.uint64(bit)) != 0].sum())

    return (f"{who} -- present {human(total(Category.PRESENT))} (zero pages {human(total(Category.PFNZERO))}), "
            f"swapped {human(total(Category.SWAPPED) - total(Category.GUARD))}, {nvmas} mappings")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "map",
        help="draw a picture of a process's address space (PNG)",
        description="A title (pid, user, command line, present/zero/swapped totals), a legend, then "
        "one row per mapping (adjacent mappings of one file share a row), each pixel coloured by "
        "the page class covering most of its share of the mapping; big gaps compressed. More rows "
        "than a picture can hold (89,478,485 pixels: Pillow's limit) are drawn a run of rows to a "
        "bar. Needs Pillow (pip install pagescan[png]).",
    )
    p.add_argument("pid", type=parse_pid, help="process id, or 'self'")
    p.add_argument("--png", required=True, metavar="FILE", help="output file (always PNG, whatever its name)")
    p.add_argument("--all", action="store_true", help="also draw mappings with nothing present or swapped")
    p.add_argument("--width", type=_width, default=1400, help="image width in pixels, 600 to 16000 (default 1400)")
    p.add_argument("--backend", choices=("auto", "kernel", "emulated"), default="auto",
                   help="kernel ioctl, or its emulation from /proc/PID/pagemap (default auto: the ioctl if present)")
    p.set_defaults(run=run, subparser=p)


def _width(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 600 <= value <= MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"must be from 600 to {MAX_WIDTH}: {text!r}")
    return value


#: Widest picture drawn (pixels).
MAX_WIDTH = 16000
#: Most pixels in a picture: Pillow's own limit for opening one (``MAX_IMAGE_PIXELS``),
#: above which viewers built on it refuse the file as a "decompression bomb".
MAX_PIXELS = 89_478_485


def max_rows(geo: Layout) -> int:
    """Rows that fit in :data:`MAX_PIXELS` at this width (counting a gap above each)."""
    return max(1, (MAX_PIXELS // geo.width - geo.top - 10) // (geo.row_h + geo.gap_h))


def merge_rows(rows: list[tuple[list[Any], int, int, np.ndarray]], limit: int
               ) -> list[tuple[list[Any], int, int, np.ndarray]]:
    """At most ``limit`` rows: runs of consecutive rows drawn as one bar, their mappings
    side by side (the unmapped space between them left out), when there are more."""
    if len(rows) <= limit:
        return rows
    k = -(-len(rows) // limit)
    out = []
    for i in range(0, len(rows), k):
        part = rows[i : i + k]
        g = [v for row in part for v in row[0]]
        subs, off = [], 0
        for _, lo, hi, sub in part:  # mapped spans end to end: [0, total)
            sub = sub.copy()
            if len(sub):
                sub["start"] = sub["start"] - np.uint64(lo) + np.uint64(off)
                sub["end"] = sub["end"] - np.uint64(lo) + np.uint64(off)
            subs.append(sub)
            off += hi - lo
        out.append((g, part[0][1], part[-1][2], np.concatenate(subs)))
    return out


def run(args: argparse.Namespace) -> int:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as err:  # Pillow is the optional extra pagescan[png]
        print(f"pagescan: map --png needs Pillow ({err}): install pagescan[png]", file=sys.stderr)
        return 1
    from pagescan._procfs import task_size

    ret = 0
    for c in Category:
        ret |= c
    from pagescan import capabilities

    ret &= int(capabilities().categories) if args.backend != "emulated" else ret
    limit = task_size()
    with Target(args.pid) as target:
        vmas = [v for v in read_maps(target.pid) if v.end <= limit]
        if not vmas:
            raise ValueError(f"pid {args.pid} has no mappings")
        parts = [r.regions for r in scan_iter(vmas[0].start, vmas[-1].end, pid=target, return_mask=ret, backend=args.backend)]
    regions = np.concatenate(parts)
    rs = regions["start"]

    # One row per run of contiguous mappings of the same file (a library's segments).
    groups: list[list[Any]] = []
    for v in vmas:
        g = groups[-1] if groups else None
        if g and v.name.startswith("/") and g[-1].name == v.name and g[-1].end == v.start:
            g.append(v)
        else:
            groups.append([v])
    rows = []
    for g in groups:
        lo, hi = g[0].start, g[-1].end
        i0 = int(np.searchsorted(regions["end"], lo, side="right"))
        i1 = int(np.searchsorted(rs, hi, side="left"))
        sub = regions[i0:i1].copy()
        if len(sub):
            sub["start"] = np.maximum(sub["start"], lo)
            sub["end"] = np.minimum(sub["end"], hi)
        busy = bool(((sub["categories"] & np.uint64(Category.PRESENT | Category.SWAPPED)) != 0).any()) if len(sub) else False
        if busy or args.all:
            rows.append((g, lo, hi, sub))

    font = ImageFont.load_default(size=12) if hasattr(ImageFont, "load_default") else None
    geo = layout(args.width)
    nrows = len(rows)
    rows = merge_rows(rows, max_rows(geo))
    merged = len(rows) < nrows
    W, bar_x, bar_w, row_h, gap_h = geo.width, geo.bar_x, geo.bar_w, geo.row_h, geo.gap_h
    # Gaps are drawn only above rows 1 GiB or more past the previous one: the image is
    # sized for those (sized for a gap per row, it took twice the memory, then a copy).
    gaps = 0 if merged else sum(1 for prev, row in zip(rows, rows[1:]) if row[1] - prev[2] >= 1 << 30)
    height = geo.top + row_h * len(rows) + gap_h * gaps + 10  # (10: the bottom margin)
    img = Image.new("RGB", (W, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    total = sum(v.end - v.start for g, _, _, _ in rows for v in g)
    nmaps = sum(len(g) for g, _, _, _ in rows)
    title = _title(args.pid, regions, len(vmas))
    d.text((10, 4), title, fill=(0, 0, 0), font=font)
    what = (f"each bar is up to {-(-nrows // len(rows))} rows' mappings side by side: {nrows} rows do not fit"
            if merged else "each bar is one mapping, or one file's adjacent mappings")
    d.text((10, 20), f"{nmaps} mappings in {len(rows)} rows, {human(total)} mapped ({what}; bars are not to scale)",
           fill=(90, 90, 90), font=font)
    x = 10
    for name, colour in CLASSES:
        d.rectangle([x, 40, x + 14, 54], fill=colour, outline=(90, 90, 90))
        d.text((x + 19, 41), name, fill=(0, 0, 0), font=font)
        x += 24 + int(d.textlength(name, font=font)) + 14
    y = geo.top
    prev_end = None
    for g, lo, hi, sub in rows:
        if not merged and prev_end is not None and lo - prev_end >= 1 << 30:
            d.line([bar_x, y + 5, bar_x + bar_w, y + 5], fill=(160, 160, 160), width=1)
            d.text((10, y - 1), f"··· {human(lo - prev_end)} unmapped ···", fill=(120, 120, 120), font=font)
            y += gap_h
        span = sum(v.end - v.start for v in g) if merged else hi - lo  # (merged: the mappings end to end)
        cls = bucket_classes(0 if merged else lo, span if merged else hi, sub, bar_w)
        colours = np.array([c for _, c in CLASSES], dtype=np.uint8)[cls]
        strip = np.repeat(colours[np.newaxis, :, :], row_h - 4, axis=0)
        img.paste(Image.fromarray(strip, "RGB"), (bar_x, y + 2))
        if (len(g) - 1) * _MIN_SEGMENT_PX <= bar_w:  # segment boundaries, if they leave the bar visible
            at = 0
            for prev_v, v in zip(g, g[1:]):
                at = at + (prev_v.end - prev_v.start) if merged else v.start - lo
                xb = bar_x + int(at / span * bar_w)
                d.line([xb, y + 2, xb, y + row_h - 3], fill=(255, 255, 255), width=1)
        d.rectangle([bar_x - 1, y + 1, bar_x + bar_w, y + row_h - 2], outline=(120, 120, 120))
        v = g[0]
        name = v.name or "[anon]"
        short = os.path.basename(name) if name.startswith("/") else name
        perms = v.perms if len(g) == 1 else f"{len(g)} maps"
        label = f"{lo:012x} {perms:>6} {human(span):>6} {short}"
        while d.textlength(label, font=font) > geo.label_w and len(label) > 10:
            label = label[:-2] + "…"
        d.text((10, y + 1), label, fill=(0, 0, 0), font=font)
        y += row_h
        prev_end = hi
    if y + 10 < height:
        img = img.crop((0, 0, W, y + 10))
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("Title", title)  # the drawn title, also as the PNG's own text (image viewers, scripts)
    info.add_text("Software", f"pagescan {__version__}")
    img.save(args.png, format="PNG", pnginfo=info)
    print(f"wrote {args.png} ({img.width}x{img.height}, {len(rows)} rows)")
    return 0
