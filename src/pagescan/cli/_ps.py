"""``pagescan ps``: every process the caller may read, one line each: who uses the memory.

Per process: ``/proc/PID/smaps_rollup`` (the kernel's sums over all mappings: RSS, PSS,
USS = Private_Clean + Private_Dirty, swap, PMD-mapped and hugetlb sizes) and one
``PAGEMAP_SCAN`` walk asking only for zero pages (not in RSS: smaps does not count
them); the walks run in a second thread, from the other end of the process list, while
the main thread reads the rollups (both are kernel work with the GIL released). Processes
without an address space (kernel threads) are left out; processes that
exit while being read are skipped; those the caller may not read (no ptrace access)
are counted in the footer. On the emulation (``backend="emulated"``, a kernel without
``PAGEMAP_SCAN``) without the privilege to read PFNs, the walk of a process whose
rollup was read may refuse (``PermissionError``: its zero pages cannot be known): its
zero count is ``None``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from pagescan import PAGE_REGION_DTYPE, Category, Target, scan
from pagescan._procfs import (
    parse_rollup,
    process_uid,
    read_cmdline,
    read_rollup_text,
    task_size,
)

from ._common import human, print_json, printable, table, terminal_width, user_name

#: Columns of the table, in order; every numeric one is in bytes.
NUMERIC = ("uss", "pss", "rss", "swap", "zero", "huge")
SORT_KEYS = ("pid", "user", "command", *NUMERIC)
_ZERO = int(Category.PFNZERO)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ps",
        help="memory of every process you may read: USS, PSS, RSS, swap, zero pages, huge pages",
        description="One line per process with an address space that the caller may read (ptrace "
        "read access: your own processes, all of them as root): pid, user, USS (private memory: "
        "Private_Clean + Private_Dirty, as smem; psutil adds Private_Hugetlb), PSS, RSS, swap "
        "(the kernel's sums, from /proc/PID/smaps_rollup: they match ps and smaps_rollup), zero "
        "(zero-page and huge zero-page mappings, from PAGEMAP_SCAN: not in RSS; '-' where it "
        "cannot be known: a kernel without PAGEMAP_SCAN, and no privilege to read PFNs), huge "
        "(PMD-mapped THPs and hugetlb pages) and the command line. Processes that exit while being read are skipped; those "
        "you may not read are counted in the last line. Sizes in bytes with binary units.",
    )
    p.add_argument("--sort", choices=SORT_KEYS, default="pss",
                   help="row order: largest first by uss, pss (default), rss, swap, zero or huge; "
                   "or by pid, user, command")
    p.add_argument("--wide", "-w", action="store_true",
                   help="never cut command lines (they are cut at the terminal's width otherwise)")
    p.add_argument("--users", "-u", action="store_true",
                   help="one line per user instead (as smem -u): processes, and the sums of their "
                   "USS, PSS, RSS, swap, zero and huge; --sort by a size, or else by user name")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: every process (with all smaps_rollup fields) and totals "
                   "(with --users: every user)")
    p.set_defaults(run=run, subparser=p)


def per_user(procs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """smem -u's view: per user, the number of processes and the sums of :data:`NUMERIC`
    (an unknown value counts as nothing; unknown if it is unknown for all)."""
    users: dict[int, list[dict[str, Any]]] = {}
    for p in procs:
        users.setdefault(p["uid"], []).append(p)
    out = []
    for uid, ps in users.items():
        row: dict[str, Any] = {"user": ps[0]["user"], "uid": uid, "processes": len(ps)}
        for k in NUMERIC:
            row[k] = None if all(p[k] is None for p in ps) else sum(p[k] or 0 for p in ps)
        out.append(row)
    return out


def all_pids() -> list[int]:
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit())


def read_process(pid: int, top: int, regions: np.ndarray | None = None, full: bool = True) -> dict[str, Any] | None:
    """One process's line; ``None`` without an address space. Raises ``PermissionError``
    (may not read it) or ``ProcessLookupError`` (gone). ``regions``: a scratch buffer
    for the zero-page walk. ``full``: with every smaps_rollup field (``"rollup"``), else
    only the table's."""
    line = _rollup_line(pid, full)
    if line is not None:
        line["zero"] = zero_bytes(pid, top, regions)
    return line


def _rollup_line(pid: int, full: bool) -> dict[str, Any] | None:
    """A line without its ``"zero"``; ``None`` without an address space."""
    text = read_rollup_text(pid)
    if not text:
        return None  # kernel thread, zombie: no pagemap to open
    rollup = parse_rollup(text, None if full else _TABLE_FIELDS)
    line = _line(pid, rollup)
    if full:
        line["rollup"] = rollup
    return line


def zero_bytes(pid: int, top: int, regions: np.ndarray | None = None) -> int:
    """Bytes of ``pid``'s address space mapped to the zero page or the huge zero page:
    one ``PAGEMAP_SCAN`` walk up to ``top`` asking only for PFNZERO (more calls only if
    the zero-page runs do not fit in ``regions``)."""
    if regions is None:
        regions = np.empty(_REGIONS, PAGE_REGION_DTYPE)
    zero = 0
    with Target(pid) as target:
        cur = 0
        while cur < top:
            res = scan(cur, top, pid=target, category_anyof_mask=_ZERO, return_mask=_ZERO, out=regions)
            r = res.regions
            if len(r):
                zero += int((r["end"] - r["start"]).sum())
            cur = res.walk_end
    return zero


def _line(pid: int, rollup: dict[str, int]) -> dict[str, Any]:
    uid = process_uid(pid)
    cmd = read_cmdline(pid)
    get = rollup.get
    return {
        "pid": pid, "uid": uid, "user": user_name(uid), "command": cmd,
        "uss": get("Private_Clean", 0) + get("Private_Dirty", 0), "pss": get("Pss", 0), "rss": get("Rss", 0),
        "swap": get("Swap", 0), "zero": 0,
        "huge": get("AnonHugePages", 0) + get("ShmemPmdMapped", 0) + get("FilePmdMapped", 0)
        + get("Shared_Hugetlb", 0) + get("Private_Hugetlb", 0),
    }


#: The smaps_rollup fields the table needs.
_TABLE_FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Swap", "AnonHugePages", "ShmemPmdMapped",
                 "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb")


#: Regions per zero-page scan call (a process with more zero-page runs takes more calls).
_REGIONS = 256


class _ZeroWalks(threading.Thread):
    """The zero-page walks of ``pids``, last pid first, in a thread of their own.

    Both kinds of read spend their time in the kernel with the GIL released
    (``smaps_rollup`` and ``PAGEMAP_SCAN`` each walk every page table of the process),
    so with a second CPU the walks run while the main thread reads the rollups: from the
    other end of the list, so that the two seldom walk the same process at once (they
    would contend for its page-table locks). ``result(pid)`` waits for the thread: the
    bytes, or the ``OSError`` the walk raised (any other error is raised there, in the
    caller's thread). ``stop()`` makes it finish early."""

    def __init__(self, pids: list[int], top: int) -> None:
        super().__init__(name="pagescan-ps-zero", daemon=True)
        self._pids, self._top = pids, top
        self._done: dict[int, int | OSError] = {}
        self._error: BaseException | None = None
        self._stopping = False

    def run(self) -> None:
        regions = np.empty(_REGIONS, PAGE_REGION_DTYPE)
        done, top = self._done, self._top
        try:
            for pid in reversed(self._pids):
                if self._stopping:
                    return
                try:
                    done[pid] = zero_bytes(pid, top, regions)
                except OSError as err:  # gone, a kernel thread, not ours to read
                    done[pid] = err
        except BaseException as err:  # a bug: handed to the caller, not printed by threading
            self._error = err

    def stop(self) -> None:
        self._stopping = True

    def result(self, pid: int) -> int | OSError:
        if self.is_alive():
            self.join()
        if self._error is not None:
            raise self._error
        return self._done[pid]


def collect(pids: Iterable[int], full: bool = True) -> tuple[list[dict[str, Any]], int, int]:
    """(processes, how many may not be read, how many exited while being read);
    ``full``: as for :func:`read_process`."""
    pids = list(pids)
    walks = _ZeroWalks(pids, task_size())
    walks.start()
    lines: list[tuple[int, dict[str, Any] | OSError]] = []
    try:
        for pid in pids:
            try:
                line = _rollup_line(pid, full)
            except (PermissionError, ProcessLookupError, FileNotFoundError) as err:
                lines.append((pid, err))
                continue
            if line is not None:
                lines.append((pid, line))
    except BaseException:
        walks.stop()  # Ctrl-C: do not leave it walking
        raise
    out: list[dict[str, Any]] = []
    unreadable = gone = 0
    for pid, got in lines:
        if isinstance(got, dict):
            zero = walks.result(pid)
            if not isinstance(zero, OSError) or isinstance(zero, PermissionError):
                # Refused after its rollup was read: not ptrace access (the same check) but
                # the emulation, which cannot tell zero pages without PFNs: unknown.
                got["zero"] = None if isinstance(zero, OSError) else zero
                out.append(got)
                continue
            got = zero
        if isinstance(got, PermissionError):
            unreadable += 1
        elif isinstance(got, (ProcessLookupError, FileNotFoundError)):
            # ESRCH also means "no address space" (a kernel thread, a zombie): not counted
            if not os.path.exists(f"/proc/{pid}"):
                gone += 1
        else:
            raise got
    return out, unreadable, gone


def run(args: argparse.Namespace) -> int:
    procs, unreadable, gone = collect(all_pids(), full=args.json)
    key = args.sort
    if key in NUMERIC:  # largest first; unknown (None) last
        procs.sort(key=lambda p: (p[key] is None, -(p[key] or 0), p["pid"]))
    else:
        procs.sort(key=lambda p: (p[key], p["pid"]))
    # an unknown value counts as nothing in the total (unknown if all are)
    totals = {k: None if procs and all(p[k] is None for p in procs) else sum(p[k] or 0 for p in procs)
              for k in NUMERIC}
    if args.users:
        return _run_users(args, per_user(procs), totals, len(procs), unreadable, gone)
    if args.json:
        print_json({"processes": procs, "totals": {"processes": len(procs), **totals},
                    "unreadable": unreadable, "exited": gone})
        return 0
    headers = ["PID", "USER", "USS", "PSS", "RSS", "SWAP", "ZERO", "HUGE", "COMMAND"]
    # a line never shows more of a command than the terminal is wide: cut before replacing
    # the unprintable characters (a `python -c` script can be kilobytes)
    limit = None if args.wide else max(terminal_width(), 20) + 1

    def h(v: int | None) -> str:
        return "-" if v is None else human(v)

    rows = [[str(p["pid"]), p["user"][:12]] + [h(p[k]) for k in NUMERIC] + [printable(p["command"][:limit])]
            for p in procs]
    count = f"{len(procs)} {'process' if len(procs) == 1 else 'processes'}"
    rows.append(["", "total"] + [h(totals[k]) for k in NUMERIC] + [count])
    sys.stdout.write(table(headers, rows, ">" + "<" + ">" * len(NUMERIC) + "<",
                           cut="none" if args.wide else "right") + "\n")
    notes = []
    if unreadable:
        who = (" (the kernel refused ptrace read access)" if os.geteuid() == 0
               else " (no ptrace access: another user's; run as root to see them)")
        notes.append(f"{unreadable} {'process' if unreadable == 1 else 'processes'} not readable{who}")
    if gone:
        notes.append(f"{gone} exited while being read")
    if notes:
        line = "; ".join(notes)
        print(line if args.wide else line[: max(terminal_width(), 20)])
    return 0


def _run_users(args: argparse.Namespace, users: list[dict[str, Any]], totals: dict[str, Any], nprocs: int,
               unreadable: int, gone: int) -> int:
    key = args.sort
    if key in NUMERIC:
        users.sort(key=lambda u: (u[key] is None, -(u[key] or 0), u["user"]))
    else:
        users.sort(key=lambda u: u["user"])
    if args.json:
        print_json({"users": users, "totals": {"users": len(users), "processes": nprocs, **totals},
                    "unreadable": unreadable, "exited": gone})
        return 0

    def h(v: int | None) -> str:
        return "-" if v is None else human(v)

    rows = [[printable(u["user"]), str(u["processes"])] + [h(u[k]) for k in NUMERIC] for u in users]
    rows.append(["total", str(nprocs)] + [h(totals[k]) for k in NUMERIC])
    headers = ["USER", "PROCS", "USS", "PSS", "RSS", "SWAP", "ZERO", "HUGE"]
    sys.stdout.write(table(headers, rows, "<" + ">" * (1 + len(NUMERIC)), cut="none") + "\n")
    if unreadable or gone:
        print(f"{unreadable} not readable, {gone} exited while being read")
    return 0

