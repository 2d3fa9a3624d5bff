"""``pagescan checkpoint inspect|verify|compact PATH`` and ``pagescan restore PATH PID ADDR...``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from ._common import human, parse_pid, parse_positive, print_json, printable, table


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "checkpoint",
        help="inspect, verify, load or compact a checkpoint file (pagescan.snapshot)",
        description="Work on a checkpoint file written by pagescan.snapshot.Checkpointer: an "
        "append-only chain of generations (the first full, later ones holding the pages written "
        "since), each sealed by a commit record. See docs/checkpoint-format.md.",
    )
    csub = p.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True

    q = csub.add_parser("inspect", help="list the entries and generations (no page data is read)",
                        description="Header, one row per entry (name, dtype, shape, bytes) and one row "
                        "per sealed generation: parent "
                        "(full or the generation it builds on), pages stored, pages with data, zero "
                        "pages, bytes in the file. Reports an unsealed tail (left by a writer that "
                        "died; ignored by readers) and damage (exit status 1).")
    q.add_argument("path", help="checkpoint file")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(run=run_inspect, subparser=q)

    v = csub.add_parser("verify", help="check every checksum of every sealed generation and section",
                        description="Read every page of every sealed generation and compare its "
                        "checksum, then every sealed section (a working-set record); exit status 1 "
                        "naming the generation and page, or the section, of the first damaged one. "
                        "An unsealed tail is not an error.")
    v.add_argument("path", help="checkpoint file")
    v.set_defaults(run=run_verify, subparser=v)

    ld = csub.add_parser("load", help="load a generation into new arrays (with --check: verify the file first)",
                         description="Load generation N (default: the newest) into new arrays, as "
                         "pagescan.snapshot.load does, verifying the checksum of every page read, and list "
                         "the entries loaded. --check first verifies every sealed generation (as `verify`).")
    ld.add_argument("path", help="checkpoint file")
    ld.add_argument("--check", action="store_true", help="verify every generation first")
    ld.add_argument("--generation", "-g", type=_positive, metavar="N", help="generation (default: newest)")
    ld.add_argument("--json", action="store_true", help="machine-readable output")
    ld.set_defaults(run=run_load, subparser=ld)

    c = csub.add_parser("compact", help="fold the chain into one full generation",
                        description="Rewrite the file as one full generation holding the memory of "
                        "generation N (default: the newest); later generations are dropped. The new "
                        "file replaces the old one atomically. Refused while a Checkpointer has the "
                        "file open.")
    c.add_argument("path", help="checkpoint file")
    c.add_argument("--generation", "-g", type=_positive, metavar="N", help="generation to keep (default: newest)")
    c.set_defaults(run=run_compact, subparser=c)

    r = sub.add_parser(
        "restore",
        help="write a checkpoint generation into another process's memory",
        description="Write generation N (default: the newest sealed one) of a checkpoint into the "
        "memory of process PID with process_vm_writev: one address per entry of the checkpoint, "
        "in order (`checkpoint inspect` lists them), where exactly the entry's bytes are written. "
        "Every page is checksum-verified before it is written.",
    )
    r.add_argument("path", help="checkpoint file")
    r.add_argument("pid", type=parse_pid, help="process id, or 'self'")
    r.add_argument("addresses", nargs="+", type=_address, metavar="ADDR[:BYTES]",
                   help="start address of each region in PID (hex, 0x optional, as `pagescan stat` prints); "
                   "with :BYTES (decimal), the length the object there has: refused unless the file's entry "
                   "is exactly that long (the file says how many bytes are written)")
    r.add_argument("--generation", "-g", type=_positive, metavar="N", help="generation (default: newest)")
    r.set_defaults(run=run_restore, subparser=r)


def _positive(text: str) -> int:
    return parse_positive(text)


def _address(text: str) -> tuple[int, int | None]:
    """``ADDR`` (hex) or ``ADDR:BYTES`` (decimal): ``(address, length or None)``."""
    addr, sep, size = text.partition(":")
    t = addr.lower()
    t = t[2:] if t.startswith("0x") else t
    try:
        value = int(t, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hex address: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not an address: {text!r}")
    if not sep:
        return value, None
    if not size.isascii() or not size.isdigit():
        raise argparse.ArgumentTypeError(f"not a decimal length after the address: {text!r}")
    return value, int(size)


class ProgressBar:
    """A one-line progress bar on ``stream`` (stderr), only if it is a terminal.

    Nothing is drawn for the first ``delay`` seconds, so short operations stay silent;
    redrawn at most ten times a second; erased when done.
    """

    def __init__(self, label: str, unit: int, stream: TextIO | None = None, delay: float = 0.3) -> None:
        self.label = label
        self.unit = unit  # bytes per counted item (pages)
        self.stream = sys.stderr if stream is None else stream
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.start = time.monotonic()
        self.delay = delay
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.delay or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        frac = done / total if total else 1.0
        width = 30
        fill = int(frac * width)
        rate = done * self.unit / max(now - self.start, 1e-9)
        line = (f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:3.0f}% "
                f"{human(done * self.unit)}/{human(total * self.unit)} {human(int(rate))}/s")
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_inspect(args: argparse.Namespace) -> int:
    from pagescan.snapshot import CorruptCheckpointError, inspect

    info = inspect(args.path)
    if args.json:
        print_json(info)
    else:
        gens = info["generations"]
        ents = info["entries"]
        print(f"{info['path']}: version {info['version']}, page size {info['page_size']}, {len(ents)} "
              f"entr{'y' if len(ents) == 1 else 'ies'} ({info['state']}, {human(sum(info['regions']))}), "
              f"{len(gens)} sealed generation(s), {human(info['file_size'])} ({info['file_size']} bytes)")
        erows = [
            [str(i) if e["name"] is None else printable(e["name"]), e["dtype"] if e["array"] else "bytes",
             "(" + ", ".join(map(str, e["shape"])) + ("," if len(e["shape"]) == 1 else "") + ")", str(e["bytes"])]
            for i, e in enumerate(ents)
        ]
        print(table(["ENTRY", "DTYPE", "SHAPE", "BYTES"], erows, "<<>>", last_free=False))
        for sec in info["sections"]:
            print(f"section: {sec['type']} for generation {sec['generation']} ({sec['bytes']} bytes)")
        if gens:
            rows = [
                [str(g["generation"]), "full" if g["full"] else str(g["parent"]), str(g["pages"]),
                 str(g["data_pages"]), str(g["zero_pages"]), human(g["bytes"])]
                for g in gens
            ]
            print(table(["GEN", "PARENT", "PAGES", "DATA", "ZERO", "SIZE"], rows, ">>>>>>", last_free=False))
        if info["unsealed_tail_bytes"]:
            print(f"unsealed tail: {info['unsealed_tail_bytes']} bytes after offset {info['sealed_bytes']} "
                  "(a writer that did not finish; ignored)")
    if info["damage"]:
        sys.stdout.flush()
        print(f"pagescan: {CorruptCheckpointError.__name__}: {info['damage']}", file=sys.stderr)
        return 1
    return 0


def run_verify(args: argparse.Namespace) -> int:
    import mmap

    from pagescan.snapshot import inspect, verify

    with ProgressBar("verify", mmap.PAGESIZE) as bar:
        gens = verify(args.path, progress=bar)
    for g in gens:
        kind = "full" if g.parent == 0 else f"on {g.parent}"
        print(f"generation {g.number} ({kind}): {g.pages} pages ({g.data_pages} with data) ok")
    info = inspect(args.path)
    tail, sections = info["unsealed_tail_bytes"], len(info["sections"])
    print(f"ok: {len(gens)} generation(s), {sum(g.pages for g in gens)} pages verified"
          + (f", {sections} section(s)" if sections else "")
          + (f"; {tail}-byte unsealed tail ignored" if tail else ""))
    return 0


def run_compact(args: argparse.Namespace) -> int:
    import os

    from pagescan.snapshot import compact, inspect

    before = inspect(args.path)
    n_before = len(before["generations"])
    with ProgressBar("compact", before["page_size"]) as bar:
        pages = compact(args.path, args.generation, progress=bar)
    after = os.path.getsize(args.path)
    kept = args.generation or n_before
    print(f"compacted {args.path}: generation {kept} of {n_before} -> 1 full generation of {pages} pages; "
          f"{human(before['file_size'])} -> {human(after)}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from pagescan.snapshot import CheckpointError, _restore, inspect

    info = inspect(args.path)
    lengths = info["regions"]
    if len(args.addresses) != len(lengths):
        raise CheckpointError(
            f"{args.path} has {len(lengths)} region(s) ({', '.join(human(n) for n in lengths)}): "
            f"give {len(lengths)} address(es), not {len(args.addresses)}"
        )
    for i, ((addr, want), n) in enumerate(zip(args.addresses, lengths)):
        if want is not None and want != n:
            raise CheckpointError(f"{args.path}: entry {i} is {n} bytes, not the {want} given for {addr:#x}: "
                                  "nothing written")
    pairs = [(addr, n) for (addr, _), n in zip(args.addresses, lengths)]
    state: Any = pairs
    if info["state"] == "mapping":
        state = {e["name"]: pr for e, pr in zip(info["entries"], pairs)}
    with ProgressBar("restore", info["page_size"]) as bar:
        gen = _restore(args.path, state, args.generation, args.pid, bar, exact_pairs=True)
    total = sum(lengths)
    print(f"restored generation {gen} of {args.path} into pid {args.pid}: {len(lengths)} region(s), "
          f"{human(total)} ({total} bytes)")
    return 0


def run_load(args: argparse.Namespace) -> int:
    import mmap

    from pagescan.snapshot import load, verify

    if args.check:
        with ProgressBar("verify", mmap.PAGESIZE) as bar:
            gens = verify(args.path, progress=bar)
        if not args.json:
            print(f"verified: {len(gens)} generation(s), {sum(g.pages for g in gens)} pages")
    loaded = load(args.path, args.generation)
    items = list(loaded.items()) if isinstance(loaded, dict) else list(enumerate(loaded))
    if args.json:
        rows = [{"name": k, "dtype": str(a.dtype), "shape": list(a.shape), "bytes": int(a.nbytes)} for k, a in items]
        print_json({"path": args.path, "generation": loaded.generation, "checked": bool(args.check), "entries": rows})
        return 0
    print(table(["ENTRY", "DTYPE", "SHAPE", "BYTES"],
                [[printable(str(k)), str(a.dtype), str(a.shape), str(a.nbytes)] for k, a in items], "<<>>",
                last_free=False))
    total = sum(int(a.nbytes) for _, a in items)
    print(f"ok: loaded generation {loaded.generation} of {args.path}: {len(items)} entr{'y' if len(items) == 1 else 'ies'}, "
          f"{human(total)} ({total} bytes)")
    return 0
