"""``pagescan.mappings.mapping_stats``: the library behind ``pagescan stat``.

Against the kernel's own accounting (``/proc/self/smaps``) on mappings made here: the
smaps parse (numpy, and the line-by-line fallback) gives the kernel's fields, the page
classes come from ``PAGEMAP_SCAN`` whatever subset is asked for, and the Pss split is
exact where it is given.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import pytest

import pagescan
from pagescan._procfs import _open, task_size
from pagescan._uapi.mman import MAP, PROT
from pagescan.mappings import STAT_CATEGORIES, MappingStat, _parse_smaps, _parse_smaps_lines, mapping_stats

from .conftest import requires_pagemap_scan
from .memory import Mapping, P, memfd_mapping
from .test_cli import _free_pid

pytestmark = requires_pagemap_scan


def by_start(stats: list[MappingStat]) -> dict[int, MappingStat]:
    return {s.start: s for s in stats}


class Isolated(Mapping):
    """A mapping between two PROT_NONE pages, so the kernel never merges it with a
    neighbour: its smaps record is its own."""

    def __init__(self, npages: int, **kw: Any) -> None:
        from pagescan._uapi import libc

        self._outer = libc.mmap(0, (npages + 2) * P, PROT.NONE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE)
        kw["flags"] = kw.get("flags", MAP.PRIVATE | MAP.ANONYMOUS) | MAP.FIXED
        super().__init__(npages, addr=self._outer + P, **kw)
        self._reserve = (self._outer, (npages + 2) * P)  # close() unmaps all of it


def test_numpy_parse_equals_the_line_parser_on_real_smaps() -> None:
    pids = [os.getpid(), 1 if os.access("/proc/1/smaps", os.R_OK) else os.getppid()]
    for pid in pids:
        try:
            data = _open(pid, "smaps")
        except PermissionError:
            continue
        fast = _parse_smaps(data, task_size())
        slow = _parse_smaps_lines(data, task_size())
        assert fast == slow and len(fast[0]) > 5
        first = data.split(b"\n", 1)[0].decode()
        lo, hi = (int(x, 16) for x in first.split()[0].split("-"))
        assert fast[0][0][:2] == (lo, hi)
        rss = sum(int(m) for m in re.findall(rb"\nRss: +(\d+) kB", data))
        assert sum(f["Rss"] for f in fast[1]) == rss * 1024
        # [vsyscall] is above the limit: left out by both
        assert all(v[1] <= task_size() for v in fast[0])


def test_other_layouts_fall_back_to_the_line_parser() -> None:
    data = _open(os.getpid(), "smaps")
    # a record with one line less (another kernel's layout): not a table any more
    edited = data.replace(b"\nKSM:", b"\nKSM_:", 1)
    cut = edited.find(b"\nLocked:")
    edited = edited[:cut] + edited[edited.index(b"\n", cut + 1) :]
    fast = _parse_smaps(edited, task_size())
    assert fast == _parse_smaps_lines(edited, task_size())
    assert "Locked" not in fast[1][0] and "KSM_" in fast[1][0] and "Locked" in fast[1][1]
    assert _parse_smaps(b"", task_size()) == ([], [], [])


def test_names_with_a_carriage_return_or_trailing_spaces_are_read_whole(tmp_path: Any) -> None:
    """maps escapes only "\\n" in a file name: a name with a "\\r" is one line, and the
    spaces a name ends with are its own (maps pads before the name, never after)."""
    import mmap as mmap_mod

    from pagescan._procfs import read_maps

    path = os.path.join(str(tmp_path), "a\rb ")
    with open(path, "wb") as f:
        f.write(b"x" * P)
    with open(path, "rb") as f:
        m = mmap_mod.mmap(f.fileno(), P, prot=mmap_mod.PROT_READ)
        try:
            addr = pagescan.buffer_range(m)[0]
            vmas = read_maps(os.getpid())
            (vma,) = [v for v in vmas if v.start <= addr < v.end]
            assert vma.name == path
            (stat,) = [s for s in mapping_stats(os.getpid()) if s.start <= addr < s.end]
            assert stat.name == path
            assert pagescan.scan(addr, addr + P).complete  # the emulation and scan read maps too
        finally:
            m.close()


def test_fields_and_classes_of_known_mappings() -> None:
    with Isolated(16) as anon, Isolated(8, prot=PROT.READ) as zero, Isolated(4, flags=MAP.SHARED | MAP.ANONYMOUS) as shm:
        anon.write(0, 10)
        zero.read(0, 8)
        shm.write(0, 4)
        stats = by_start(mapping_stats())
        a, z, s = stats[anon.addr], stats[zero.addr], stats[shm.addr]
        assert a.smaps["Rss"] == 10 * P and a.smaps["Anonymous"] == 10 * P and a.uss == 10 * P
        assert a.pages == {**dict.fromkeys(STAT_CATEGORIES, 0), "present": 10, "written": 10}
        assert a.pss_split == (10 * P, 0, 0) and not a.shmem
        assert z.smaps["Rss"] == 0 and z.pages["zero"] == 8 and z.pages["present"] == 8
        assert s.shmem and s.pss_split == (0, 0, 4 * P) and s.pages["file"] == 4
        assert "wr" in a.vmflags and "sh" in s.vmflags and a.device == "00:00" and a.inode == 0
        d = a.as_dict()
        assert d["pages"]["written"] is None and d["uss"] == 10 * P and d["vmflags"] == sorted(a.vmflags)


def test_pss_split_of_files_and_shmem() -> None:
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        f.write(b"f" * 4 * P)
        f.flush()
        with Mapping(4, prot=PROT.READ, flags=MAP.PRIVATE, fd=f.fileno()) as fm, memfd_mapping(3) as mfd:
            fm.read(0, 4)
            mfd.write(0, 3)
            stats = by_start(mapping_stats())
            f_stat, m_stat = stats[fm.addr], stats[mfd.addr]
            assert not f_stat.shmem and f_stat.pss_split == (0, f_stat.smaps["Pss"], 0)
            assert m_stat.shmem and m_stat.pss_split == (0, 0, m_stat.smaps["Pss"])
            assert m_stat.name.startswith("/memfd:")
    # a private file mapping with a copied-on-write page: both kinds, no split
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        f.write(b"f" * 4 * P)
        f.flush()
        with Isolated(4, flags=MAP.PRIVATE, fd=f.fileno()) as fm:
            fm.read(0, 4)
            fm.write(1, 1)
            s = by_start(mapping_stats())[fm.addr]
            assert 0 < s.smaps["Anonymous"] < s.smaps["Rss"] and s.pss_split is None


def test_tmpfs_files_are_shmem() -> None:
    with open("/proc/self/mounts") as f:
        mounts = [ln.split() for ln in f]
    tmpfs = next((m[1] for m in mounts if m[2] == "tmpfs" and os.access(m[1], os.W_OK)), None)
    if tmpfs is None:
        pytest.fail("no writable tmpfs mount on this machine (/dev/shm, /run, /tmp)")
    with tempfile.NamedTemporaryFile(dir=tmpfs) as f:
        f.write(b"t" * 2 * P)
        f.flush()
        with Mapping(2, prot=PROT.READ, flags=MAP.SHARED, fd=f.fileno()) as m:
            m.read(0, 2)
            s = by_start(mapping_stats())[m.addr]
            assert s.shmem and s.pss_split == (0, 0, s.smaps["Pss"])


def test_subsets_of_classes_and_sources_agree() -> None:
    with Isolated(32) as anon, Isolated(8, prot=PROT.READ) as zero:
        anon.write(0, 32)
        zero.read(0, 8)
        full = by_start(mapping_stats())
        for cats in (("zero",), ("zero", "huge"), ("present", "file"), ("guard",), ("swapped", "written")):
            part = by_start(mapping_stats(categories=cats))
            for start in (anon.addr, zero.addr):
                assert part[start].pages == {c: full[start].pages[c] for c in cats}, cats
        nothing = by_start(mapping_stats(categories=()))
        assert nothing[anon.addr].pages == {} and nothing[anon.addr].smaps["Rss"] == 32 * P
        maps_only = by_start(mapping_stats(smaps=False))
        assert maps_only[anon.addr].smaps == {} and maps_only[anon.addr].uss is None
        assert maps_only[anon.addr].pages == full[anon.addr].pages
        assert maps_only[anon.addr].pss_split is None and maps_only[anon.addr].vmflags == frozenset()
    with pytest.raises(ValueError, match="categories: unknown class 'dirty'"):
        mapping_stats(categories=("dirty",))


def test_errors() -> None:
    with pytest.raises(ProcessLookupError):
        mapping_stats(_free_pid())
    with pytest.raises(TypeError):
        mapping_stats("1")
    assert pagescan.mappings.__all__ == ["SMAPS_FIELDS", "STAT_CATEGORIES", "MappingStat", "mapping_stats"]

