"""The emulation without privilege: exact where it can know, a clear refusal where not.

A forked child prepares its memory as root (a random layout from
``test_emulated_differential`` plus a few fixed mappings), then drops to uid/gid 65534
(``nobody``). A ``/proc/self/pagemap`` opened after that shows no PFNs and
``/proc/kpageflags`` is unreadable, so two categories become unknowable for some pages:

* PFNZERO for a present page of an anonymous VMA that is not exclusively mapped (the zero
  page, or a page shared after ``fork``);
* HUGE for a fully mapped 2 MiB block of a VMA that has PMD-mapped THPs (a THP, or 512
  base pages).

The emulation must answer exactly like the kernel backend (which works unprivileged on
one's own memory) unless such a bit changes the answer -- whether a page the walk reaches
matches, or what it reports -- and then raise ``PermissionError`` naming the privilege.
The test states that rule independently and checks every case against it. The child
reports over a pipe; it is always reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pagescan
from pagescan import MADV, Category, RegisterMode, Userfaultfd, scan
from pagescan import _backend_emulated as emu

from . import oracle
from .conftest import WP_FEATURES, requires_pagemap_scan, requires_thp, requires_wp_async
from .memory import P, Mapping, anon, pagemap_entries
from .test_emulated_differential import ALL9, Builder, H, HP, random_args, rounded
from .procs import run_in_child

pytestmark = [requires_pagemap_scan, requires_wp_async, requires_thp]

WPA, WR, FILE, PRES, SWAP, ZERO, HUGE, SD, GUARD = (int(c) for c in Category)
NOBODY = 65534
PR_SET_DUMPABLE = 4
ANON_KINDS = {"anon", "checker", "devzero", "moved", "uffd_anon", "thp", "uffd_thp", "prot_none"}


# -- the child ---------------------------------------------------------------------------


def drop_privileges() -> None:
    """Become nobody. setuid clears the dumpable flag, which would make our own /proc
    files root-only; a process started unprivileged is dumpable, so restore that."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    libc_ = ctypes.CDLL(None, use_errno=True)
    if libc_.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")


def outcome(backend: str, start: int, end: int, **kw: Any) -> tuple[Any, ...]:
    try:
        r = scan(start, end, backend=backend, **kw)
    except OSError as exc:
        return ("err", exc.errno, type(exc).__name__, str(exc))
    return ("ok", r.regions.tolist(), r.walk_end)


def privilege_facts(addr: int) -> dict[str, Any]:
    """What the dropped child can see: its ids, PFNs in a fresh pagemap, kpageflags."""
    facts: dict[str, Any] = {"euid": os.geteuid(), "egid": os.getegid()}
    facts["entry"] = pagemap_entries(addr, 1)[0]  # opened now, after the drop
    try:
        with open("/proc/kpageflags", "rb"):
            facts["kpageflags"] = "readable"
    except PermissionError as exc:
        facts["kpageflags"] = f"errno {exc.errno}"
    return facts


def smaps_vmas(lo: int, hi: int) -> list[tuple[int, int, bool, int]]:
    """(start, end, registered uffd-WP, PMD-mapped bytes) of the VMAs in [lo, hi)."""
    pmd_fields = ("AnonHugePages", "ShmemPmdMapped", "FilePmdMapped")
    return [(r.start, r.end, "uw" in r.vmflags, sum(r.fields.get(f, 0) for f in pmd_fields))
            for r in oracle.smaps() if r.start < hi and r.end > lo]


def child_body(seed: int, tmp_path: Path, budget: int, shared_cow: Mapping, n_cases: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        uf = stack.enter_context(Userfaultfd(WP_FEATURES))
        lay = Builder(seed, tmp_path, uf, stack).build(budget, allow_fork=False)
        # Fixed mappings for the explicit checks, made while still root.
        fixed: dict[str, Mapping] = {}
        z = fixed["zero"] = stack.enter_context(anon(8))
        z.write(0, 4)  # 0-3 written (exclusive), 4-7 read: the zero page
        z.read(4, 4)
        t = fixed["thp"] = stack.enter_context(Mapping(HP + 8, align=H))
        t.madvise(MADV.HUGEPAGE)
        t.write(0, HP + 8, 3)
        with contextlib.suppress(OSError):
            t.madvise(MADV.COLLAPSE, 0, HP)
        t.madvise(MADV.NOHUGEPAGE)
        hz = fixed["huge_zero"] = stack.enter_context(Mapping(HP, align=H))
        hz.madvise(MADV.HUGEPAGE)
        hz.read_byte(3)
        hz.madvise(MADV.NOHUGEPAGE)
        w = fixed["wp"] = stack.enter_context(anon(8))
        w.write(0, 8)
        uf.register(w.addr, w.length, RegisterMode.WP)
        uf.writeprotect(w.addr, w.length)
        w.touch(2, 2)
        fixed["cow"] = shared_cow  # written by the parent before the fork: shared now
        as_root = {name: outcome("kernel", m.addr, m.end, return_mask=ALL9) for name, m in fixed.items()}
        as_root["layout"] = outcome("kernel", lay.base, lay.end, return_mask=ALL9)

        emu._zero_pfn.value = None  # as in a process that never had privilege
        drop_privileges()
        # pagescan's cached /proc/self/pagemap was opened as root and would keep showing
        # PFNs (visibility is the opener's); a process that starts unprivileged has none.
        pagescan._target._forget_self_after_fork()

        res: dict[str, Any] = {"facts": privilege_facts(z[0])}
        fd = pagescan._target.self_target().fd
        res["facts"]["pagescan_entry"] = int.from_bytes(os.pread(fd, 8, z[0] // P * 8), "little")
        res["base"], res["used"], res["end"] = lay.base, lay.used, lay.end
        res["pieces"] = [(p.kind, p.start, p.end, p.states) for p in lay.pieces]
        res["describe"] = lay.describe()
        res["vmas"] = smaps_vmas(lay.base, lay.end)
        res["entries"] = pagemap_entries(lay.base, lay.length // P)
        res["truth"] = outcome("kernel", lay.base, lay.end, return_mask=ALL9)
        res["as_root"] = as_root
        res["fixed"] = {name: (m.addr, m.end) for name, m in fixed.items()}
        res["fixed_smaps"] = {name: smaps_vmas(m.addr, m.end) for name, m in fixed.items()}
        res["unpriv_kernel"] = {name: outcome("kernel", m.addr, m.end, return_mask=ALL9) for name, m in fixed.items()}

        # Explicit checks: (name, start, end, kwargs) run on both backends.
        checks = [
            ("exclusive pages, PFNZERO reported", z[0], z[4], {"return_mask": ALL9}),
            ("zero pages, PFNZERO reported", z[0], z.end, {"return_mask": ALL9}),
            ("zero pages, PFNZERO required", z[0], z.end, {"category_mask": ZERO, "return_mask": PRES}),
            ("zero pages, PFNZERO cannot matter (SWAPPED required)", z[0], z.end,
             {"category_mask": SWAP | ZERO, "return_mask": ALL9}),
            ("zero pages, PFNZERO only inverted", z[0], z.end, {"category_inverted": ZERO, "return_mask": PRES}),
            ("zero pages, PFNZERO cannot matter (PRESENT in anyof)", z[0], z.end,
             {"category_anyof_mask": PRES | ZERO, "return_mask": PRES, "vec_len": 1, "max_pages": 2}),
            ("fork-shared pages, PFNZERO reported", shared_cow.addr, shared_cow.end, {"return_mask": ALL9}),
            ("fork-shared pages, PFNZERO excluded", shared_cow.addr, shared_cow.end,
             {"category_inverted": ZERO, "category_mask": ZERO, "return_mask": WR}),
            ("huge zero page", hz.addr, hz.end, {"return_mask": ALL9}),
            ("THP VMA, HUGE reported", t.addr, t.end, {"return_mask": ALL9}),
            ("THP VMA, HUGE required", t.addr, t.end, {"category_mask": HUGE, "return_mask": HUGE}),
            ("THP VMA, base pages only", t[HP], t.end, {"return_mask": ALL9}),
            ("THP VMA, HUGE not asked", t.addr, t.end, {"return_mask": ALL9 & ~HUGE}),
            ("uffd-WP range, WPALLOWED", w.addr, w.end, {"return_mask": ALL9}),
            ("uffd-WP range, CHECK_WPASYNC", w.addr, w.end,
             {"flags": 2, "category_mask": WR, "return_mask": WR | WPA}),
        ]
        res["checks"] = [(name, s, e, kw, outcome("kernel", s, e, **kw), outcome("emulated", s, e, **kw))
                         for name, s, e, kw in checks]

        # Random cases over the layout.
        rng = random.Random(seed ^ 0x5EED)
        cases = []
        for _ in range(n_cases):
            start, end, a = random_args(rng, lay)
            cases.append((start, end, a, outcome("kernel", start, end, **a), outcome("emulated", start, end, **a)))
        res["cases"] = cases
        res["entries_after"] = pagemap_entries(lay.base, lay.length // P)
        return res


# -- the rule, stated independently ----------------------------------------------------------


class Rule:
    """Which pages have a category the unprivileged emulation cannot know, and when
    that matters (see the module docstring)."""

    def __init__(self, res: dict[str, Any]) -> None:
        self.base = res["base"]
        self.n = (res["end"] - self.base) // P
        ents = np.array(res["entries"], dtype=np.uint64)
        present = (ents >> np.uint64(63)) & np.uint64(1) == 1
        excl = (ents >> np.uint64(56)) & np.uint64(1) == 1
        file = (ents >> np.uint64(61)) & np.uint64(1) == 1
        anon = np.zeros(self.n, dtype=bool)
        for kind, s, e, _ in res["pieces"]:
            if kind in ANON_KINDS:
                anon[(s - self.base) // P : (e - self.base) // P] = True
        self.unknown = np.zeros(self.n, dtype=np.uint64)
        # PFNZERO: present, not exclusive, not the huge zero page (bit 61), anonymous.
        self.unknown[anon & present & ~excl & ~file] |= np.uint64(ZERO)
        # HUGE: fully present, uniform 2 MiB blocks inside a VMA with PMD-mapped THPs.
        self.vmas = res["vmas"]
        for s, e, _, pmd in self.vmas:
            if not pmd:
                continue
            for b in range(-(-s // H) * H, e - H + 1, H):
                i = (b - self.base) // P
                blk = ents[i : i + HP]
                bits = blk & np.uint64(0x45 << 55)  # 55 soft-dirty, 57 uffd-wp, 61 file
                if present[i : i + HP].all() and (bits == bits[0]).all() and not (anon[i] and file[i]):
                    self.unknown[i : i + HP] |= np.uint64(HUGE)
        # True categories from the (unprivileged) kernel backend.
        self.cats = np.zeros(self.n, dtype=np.uint64)
        assert res["truth"][0] == "ok"
        for s, e, c in res["truth"][1]:
            self.cats[(s - self.base) // P : (e - self.base) // P] = c

    def reached(self, start: int, end: int, a: dict[str, int], walk_end: int) -> np.ndarray:
        """Pages of the VMAs the walk gets to (the emulation computes a VMA's pages in
        range together), minus VMAs the WPALLOWED pre-filter skips."""
        out = np.zeros(self.n, dtype=bool)
        end_r = rounded(end)
        want = a["category_mask"] & WPA
        for s, e, uw, _ in self.vmas:
            lo, hi = max(s, start), min(e, end_r)
            if lo >= hi:
                continue
            if ((WPA if uw else 0) ^ a["category_inverted"]) & want != want:
                continue
            if lo < walk_end or (lo == walk_end and walk_end < end_r):
                out[(lo - self.base) // P : (hi - self.base) // P] = True
        return out

    def matters(self, start: int, end: int, a: dict[str, int], walk_end: int) -> bool:
        idx = np.flatnonzero(self.reached(start, end, a, walk_end) & (self.unknown != 0))
        if not idx.size:
            return False
        u = self.unknown[idx]
        c = self.cats[idx] & ~u
        seen = []
        for guess in (0, ZERO, HUGE, ZERO | HUGE):
            cg = c | (u & np.uint64(guess))
            x = cg ^ np.uint64(a["category_inverted"])
            m = (x & np.uint64(a["category_mask"])) == np.uint64(a["category_mask"])
            if a["category_anyof_mask"]:
                m &= (x & np.uint64(a["category_anyof_mask"])) != 0
            seen.append(np.where(m, cg & np.uint64(a["return_mask"]), np.uint64(1 << 63)))
        return any((o != seen[0]).any() for o in seen[1:])


def assert_refusal(e: tuple[Any, ...], context: Any) -> None:
    assert e[0] == "err" and e[1] == errno.EPERM and e[2] == "UnknowablePagesError", context  # a PermissionError
    assert "CAP_SYS_ADMIN" in e[3] and "emulated" in e[3], context


# -- the test ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2, 5, 11])
def test_unprivileged_emulation(seed: int, tmp_path: Path, zram_swap: str, hugetlb_2m: int) -> None:
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
        budget = min(4, int(f.read()))
    with anon(8) as cow:
        cow.write(0, 8, 0x7E)  # the child inherits these: CoW-shared, not exclusive
        res = run_in_child(lambda: child_body(seed, tmp_path, budget, cow, 500))
        assert cow.read(0) == b"\x7e" * P

    # The child really was unprivileged.
    facts = res["facts"]
    assert facts["euid"] == NOBODY and facts["egid"] == NOBODY
    assert facts["entry"] >> 63 & 1 and facts["entry"] & ((1 << 55) - 1) == 0, "PFNs visible after the drop"
    assert facts["kpageflags"] == f"errno {errno.EACCES}"
    assert facts["pagescan_entry"] == facts["entry"]
    assert res["entries"] == res["entries_after"], "the layout changed under the test"

    # PAGEMAP_SCAN works unprivileged on our own memory, with the same answer as root.
    assert res["unpriv_kernel"] == {k: v for k, v in res["as_root"].items() if k != "layout"}
    assert res["truth"] == res["as_root"]["layout"]

    checks = {name: (s, e, kw, k, em) for name, s, e, kw, k, em in res["checks"]}
    for name, (s, e, kw, k, em) in checks.items():
        assert k[0] == "ok", (name, k)
    exact = ["exclusive pages, PFNZERO reported", "zero pages, PFNZERO cannot matter (SWAPPED required)",
             "zero pages, PFNZERO only inverted", "zero pages, PFNZERO cannot matter (PRESENT in anyof)", "huge zero page",
             "THP VMA, base pages only", "THP VMA, HUGE not asked", "uffd-WP range, WPALLOWED",
             "uffd-WP range, CHECK_WPASYNC"]
    refused = ["zero pages, PFNZERO reported", "zero pages, PFNZERO required", "fork-shared pages, PFNZERO reported",
               "fork-shared pages, PFNZERO excluded"]
    thp_is_pmd = any(pmd for _, _, _, pmd in res["fixed_smaps"]["thp"])
    if thp_is_pmd:
        refused += ["THP VMA, HUGE reported", "THP VMA, HUGE required"]
    for name in exact:
        _, _, _, k, em = checks[name]
        assert em == k, (name, k, em)
    for name in refused:
        assert_refusal(checks[name][4], (name, checks[name]))
    thp_msgs = [checks[n][4][3] for n in refused if n.startswith("THP")]
    assert all("/proc/kpageflags (root)" in m and "PAGE_IS_HUGE" in m for m in thp_msgs)
    assert "PAGE_IS_PFNZERO" in checks["zero pages, PFNZERO reported"][4][3]
    # What the kernel says about the pages the emulation refused to guess.
    z0, _ = res["fixed"]["zero"]
    assert checks["zero pages, PFNZERO reported"][3][1] == [(z0, z0 + 4 * P, PRES | WR), (z0 + 4 * P, z0 + 8 * P,
                                                                                        PRES | WR | ZERO)]
    cow0, cow1 = res["fixed"]["cow"]
    assert checks["fork-shared pages, PFNZERO reported"][3][1] == [(cow0, cow1, PRES | WR)]
    hz0, hz1 = res["fixed"]["huge_zero"]
    assert checks["huge zero page"][3][1] == [(hz0, hz1, PRES | WR | ZERO | HUGE)]

    # Every random case follows the rule.
    rule = Rule(res)
    assert (rule.unknown & np.uint64(ZERO)).any(), "the layout has no page whose PFNZERO is unknowable"
    refusals = exact_answers = 0
    for i, (start, end, a, k, em) in enumerate(res["cases"]):
        ctx = (i, hex(start), hex(end), a, k[:2] if k[0] == "err" else len(k[1]), em[:4] if em[0] == "err" else "",
               res["describe"])
        if k[0] == "err":
            assert em[0] == "err" and em[1] == k[1], ctx
            continue
        if rule.matters(start, end, a, k[2]):
            assert_refusal(em, ctx)
            refusals += 1
        else:
            assert em == k, ctx
            exact_answers += 1
    assert refusals >= 10 and exact_answers >= 200, (refusals, exact_answers)
