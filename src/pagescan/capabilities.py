"""``capabilities()``: what this kernel and this process can do, found by probing.

Nothing is probed at import. The first call runs the probes (a few dozen syscalls on a
throw-away page and a throw-away userfaultfd) and the result is cached.

How each item is found:

* ``PAGEMAP_SCAN``: an empty-range call (``start == end``, no vector). ENOTTY means no
  ioctl (< 6.7). Every category bit and flag is validated before the range is looked
  at, so the same empty call with one bit set tells whether the kernel knows it.
* userfaultfd: ``UFFDIO_API`` with no features on a throw-away fd returns every
  feature the kernel supports (the handshake is one-shot, so never on a real fd).
* soft-dirty: a fresh VMA carries ``VM_SOFTDIRTY``, so bit 55 of its pagemap entry is
  set iff the kernel has ``CONFIG_MEM_SOFT_DIRTY``. No ``clear_refs`` write (that would
  reset the whole process's soft-dirty state, and it "succeeds" when compiled out).
* PFN visibility: the PFN field of a present page's pagemap entry is zeroed for
  openers without ``CAP_SYS_ADMIN``.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import mmap
import os
import struct
from typing import Any

from . import _probe
from ._scan import scan
from ._target import self_target
from ._uapi import libc
from ._uapi.since import since
from ._uapi.mman import MADV, MAP, PROT
from ._uapi.pagemap import CATEGORY_SINCE, PM, Category, ScanFlag
from ._uapi.userfaultfd import FEATURE_SINCE, RegisterMode, UffdFeature, UffdIoctl
from .userfaultfd import Userfaultfd

__all__ = ["Capabilities", "capabilities"]

PAGE_SIZE = mmap.PAGESIZE


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """The result of :func:`capabilities`. ``missing`` explains every absent item."""

    page_size: int
    kernel_release: str
    machine: str
    #: ``PAGEMAP_SCAN`` ioctl on /proc/PID/pagemap (6.7)
    pagemap_scan: bool
    #: category bits the ioctl accepts
    categories: Category
    #: ``pm_scan_arg.flags`` bits the ioctl accepts
    scan_flags: ScanFlag
    #: a userfaultfd could be created and initialised
    userfaultfd: bool
    #: features reported by ``UFFDIO_API``
    uffd_features: UffdFeature
    #: ioctls enabled by ``UFFDIO_API``
    uffd_ioctls: UffdIoctl
    #: ``UFFD_FEATURE_WP_ASYNC`` (6.7): write tracking without fault messages
    wp_async: bool
    #: ``UFFDIO_MOVE`` (6.8)
    uffd_move: bool
    #: ``CONFIG_MEM_SOFT_DIRTY`` (found by a round trip)
    soft_dirty: bool
    #: PFNs visible in /proc/PID/pagemap (needs ``CAP_SYS_ADMIN``)
    pfns_visible: bool
    #: /proc/kpageflags readable (root)
    kpageflags: bool
    #: ``MADV_GUARD_INSTALL`` (6.13)
    guard_regions: bool
    #: ``always``, ``madvise``, ``never`` or ``unavailable``
    thp_mode: str
    #: PMD THP size in bytes (0 if THP is unavailable)
    thp_pmd_size: int
    #: default hugetlb page size in bytes (0 if hugetlb is unavailable)
    hugetlb_page_size: int
    #: ``HugePages_Total`` / ``HugePages_Free`` of the default size
    hugetlb_pages: int
    hugetlb_free: int
    #: feature name -> "needs Linux X" / why it is unavailable
    missing: dict[str, str]
    #: kernel behaviour (``docs/kernel-facts.md``, "Categories of a page")s that changed in bug-fix releases, probed on this kernel:
    #: ``written_unpopulated_pte`` (2026: an empty PTE reads WRITTEN on the generic path),
    #: ``written_pmd_hole`` (2026: a PMD hole in a uffd-WP VMA reads WRITTEN),
    #: ``pfnzero_huge_zero`` (2025: the huge zero page reads PFNZERO). ``None``: not probed
    #: (no ioctl, no WP-async, or no THP/huge zero page to try it on).
    scan_generation: dict[str, bool | None] = dataclasses.field(default_factory=dict)
    #: categories the emulated backend derives exactly here (with this process's privileges)
    emulation_exact: Category = Category(0)
    #: category or flag -> when the emulated backend raises instead of guessing, or approximates
    emulation_limits: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (flags as lists of names)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (Category, ScanFlag, UffdFeature, UffdIoctl)):
                out[f.name] = [m.name for m in type(v) if m & v and m.name]
            else:
                out[f.name] = v
        return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def capabilities() -> Capabilities:
    """What this kernel supports; see the module docstring for how it is found.

    Kernel probes run once per process and are cached; the THP mode and the hugetlb
    pool, which an administrator can change at any time, are read on every call.
    """
    base = _base_report()
    missing = dict(base.missing)
    sysfs = _sysfs_state(missing)
    return dataclasses.replace(base, missing=missing, **sysfs)


def _sysfs_state(missing: dict[str, str]) -> dict[str, Any]:
    thp_text = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    thp_mode = "unavailable"
    if thp_text and "[" in thp_text:
        thp_mode = thp_text.split("[", 1)[1].split("]", 1)[0]
    pmd = _read("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    thp_pmd_size = int(pmd) if pmd and thp_mode != "unavailable" else 0
    if thp_mode in ("unavailable", "never"):
        missing["THP"] = f"transparent huge pages are {thp_mode}"

    meminfo: dict[str, int] = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            try:
                meminfo[key] = int(parts[0])
            except ValueError:
                pass
    hugetlb_page_size = meminfo.get("Hugepagesize", 0) * 1024
    hugetlb_pages = meminfo.get("HugePages_Total", 0)
    if not hugetlb_page_size:
        missing["hugetlb"] = "kernel built without hugetlbfs"
    elif not hugetlb_pages:
        missing["hugetlb pages"] = "no hugetlb pages reserved (/proc/sys/vm/nr_hugepages is 0)"
    return {
        "thp_mode": thp_mode,
        "thp_pmd_size": thp_pmd_size,
        "hugetlb_page_size": hugetlb_page_size,
        "hugetlb_pages": hugetlb_pages,
        "hugetlb_free": meminfo.get("HugePages_Free", 0),
    }


@functools.cache
def _base_report() -> Capabilities:
    missing: dict[str, str] = {}
    uname = os.uname()

    # A throw-away private page, written so it is present, and a neighbour for MADV probes.
    scan_probe = _probe.pagemap_scan()
    pagemap_scan, cats, flags = scan_probe.available, scan_probe.categories, scan_probe.flags
    why = None
    if not pagemap_scan:
        why = (f"needs Linux {since('PAGEMAP_SCAN')}" if scan_probe.error == errno.ENOTTY
               else f"probe failed: {os.strerror(scan_probe.error)}")
    with libc.RawMapping(2 * PAGE_SIZE, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS) as m:
        page = m.addr
        libc.vm_write(os.getpid(), page, b"\x01")
        entry = struct.unpack("<Q", os.pread(self_target().fd, 8, page // PAGE_SIZE * 8))[0]
        guard = True
        try:
            libc.madvise(page + PAGE_SIZE, PAGE_SIZE, MADV.GUARD_INSTALL)
        except OSError:
            guard = False

    if not pagemap_scan:
        missing["PAGEMAP_SCAN"] = why or "unavailable"
    else:
        for cat in Category.__members__.values():
            if not cats & cat:
                missing[f"PAGE_IS_{cat.name}"] = f"needs Linux {CATEGORY_SINCE[cat]}"
    soft_dirty = bool(entry & PM.SOFT_DIRTY)
    if not soft_dirty:
        missing["soft-dirty"] = "kernel built without CONFIG_MEM_SOFT_DIRTY"
    pfns = bool(entry & PM.PRESENT) and bool(entry & PM.PFN_MASK)
    if not pfns:
        missing["PFNs"] = "reading PFNs from /proc/PID/pagemap needs CAP_SYS_ADMIN"
    kpageflags = os.access("/proc/kpageflags", os.R_OK)
    if not kpageflags:
        missing["kpageflags"] = "/proc/kpageflags is readable by root only"
    if not guard:
        missing["guard regions"] = f"MADV_GUARD_INSTALL needs Linux {since('MADV_GUARD_INSTALL')}"

    uffd = _probe.uffd_api()
    uffd_ok, feats, ioctls = uffd.available, uffd.features, uffd.ioctls
    if not uffd_ok:
        missing["userfaultfd"] = uffd.why
    else:
        for feat in UffdFeature.__members__.values():
            if not feats & feat:
                missing[f"UFFD_FEATURE_{feat.name}"] = f"needs Linux {FEATURE_SINCE[feat]}"

    generation: dict[str, bool | None] = _probe_generation() if pagemap_scan else {
        "written_unpopulated_pte": None, "written_pmd_hole": None, "pfnzero_huge_zero": None}

    exact = Category.PRESENT | Category.SWAPPED | Category.GUARD | Category.SOFT_DIRTY | Category.FILE
    limits = {
        "WRITTEN": "approximate on empty slots: a PMD block whose pages were all zapped keeps its page "
        "table in the kernel (WRITTEN there), which pagemap cannot show",
        "WPALLOWED": "exact only for uffd-WP registrations made through pagescan in this process; "
        "others raise EOPNOTSUPP (smaps does not show whether a uffd is asynchronous)",
        "PM_SCAN_WP_MATCHING": "raises EOPNOTSUPP: write-protecting what a scan matched cannot be "
        "done atomically from user space",
    }
    if pfns:
        exact |= Category.PFNZERO
    else:
        limits["PFNZERO"] = "raises PermissionError where it matters: needs PFNs (CAP_SYS_ADMIN)"
    if pfns and kpageflags:
        exact |= Category.HUGE
        limits["HUGE"] = (
            "raises EOPNOTSUPP in a VMA holding both PMD-mapped THPs and THPs split to PTEs but "
            "mapped whole (no interface tells them apart)"
        )
    else:
        limits["HUGE"] = "THPs need PFNs and /proc/kpageflags (root); raises PermissionError where it matters"

    return Capabilities(
        page_size=PAGE_SIZE,
        kernel_release=uname.release,
        machine=uname.machine,
        pagemap_scan=pagemap_scan,
        categories=cats,
        scan_flags=flags,
        userfaultfd=uffd_ok,
        uffd_features=feats,
        uffd_ioctls=ioctls,
        wp_async=bool(feats & UffdFeature.WP_ASYNC),
        uffd_move=bool(feats & UffdFeature.MOVE),
        soft_dirty=soft_dirty,
        pfns_visible=pfns,
        kpageflags=kpageflags,
        guard_regions=guard,
        thp_mode="",
        thp_pmd_size=0,
        hugetlb_page_size=0,
        hugetlb_pages=0,
        hugetlb_free=0,
        missing=missing,
        emulation_exact=exact,
        emulation_limits=limits,
        scan_generation=generation,
    )


def _generic_written(start: int, end: int) -> int:
    """Pages the *generic* path reports WRITTEN (anyof, not the mask==return fast path)."""
    return scan(start, end, category_anyof_mask=int(Category.WRITTEN), return_mask=int(Category.WRITTEN)).pages


def _probe_generation() -> dict[str, bool | None]:
    """Which side of each kernel behaviour (``docs/kernel-facts.md``, "Categories of a page") change this kernel is on."""

    out: dict[str, bool | None] = {"written_unpopulated_pte": None, "written_pmd_hole": None, "pfnzero_huge_zero": None}
    pmd = 2 << 20
    span = 2 * pmd
    with libc.RawMapping(span + pmd, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE) as m:
        a = (m.addr + pmd - 1) & ~(pmd - 1)  # two PMD-aligned blocks: [a, a+pmd) and [a+pmd, a+2pmd)
        try:
            uf = Userfaultfd(UffdFeature.WP_ASYNC)
        except OSError:
            uf = None
        if uf is not None:
            with uf:
                try:
                    libc.madvise(a, span, MADV.NOHUGEPAGE)
                    uf.register(a, span, RegisterMode.WP)
                    # Block 1: a PTE table with one zapped page (pte_none, no marker: never armed).
                    libc.vm_write(os.getpid(), a, b"\x01")
                    libc.vm_write(os.getpid(), a + PAGE_SIZE, b"\x01")
                    libc.madvise(a, PAGE_SIZE, MADV.DONTNEED)
                    out["written_unpopulated_pte"] = _generic_written(a, a + PAGE_SIZE) == 1
                    # Block 2: never touched, so no page table at all (a PMD hole).
                    out["written_pmd_hole"] = _generic_written(a + pmd, a + 2 * pmd) == pmd // PAGE_SIZE
                except OSError:
                    pass
        # Huge zero page: a read fault in a MADV_HUGEPAGE block (needs THP and use_zero_page).
        c = a + pmd
        try:
            # A fresh mapping in place (MAP_FIXED replaces the uffd-registered one).
            libc.mmap(a, span, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.FIXED)
            libc.madvise(c, pmd, MADV.HUGEPAGE)
            libc.vm_read(os.getpid(), c, bytearray(1))
            res = scan(c, c + pmd, return_mask=int(Category.PFNZERO | Category.HUGE | Category.PRESENT))
            cats = [int(c) for c in res.regions["categories"]]
            if len(cats) == 1 and cats[0] & Category.HUGE:
                out["pfnzero_huge_zero"] = bool(cats[0] & Category.PFNZERO)
        except OSError:
            pass
    return out
