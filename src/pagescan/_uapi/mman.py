"""Memory-mapping constants (``include/uapi/asm-generic/mman-common.h``, ``mman.h``).

Values are those of x86, arm64, riscv and the other generic architectures.
"""

from __future__ import annotations

import enum

__all__ = ["MADV", "MAP", "MAP_HUGE_SHIFT", "PROT"]


class PROT(enum.IntFlag):
    NONE = 0
    READ = 0x1
    WRITE = 0x2
    EXEC = 0x4


class MAP(enum.IntFlag):
    SHARED = 0x01
    PRIVATE = 0x02
    FIXED = 0x10
    ANONYMOUS = 0x20
    NORESERVE = 0x4000
    POPULATE = 0x8000
    HUGETLB = 0x40000
    FIXED_NOREPLACE = 0x100000


#: ``MAP_HUGE_2MB == 21 << MAP_HUGE_SHIFT`` selects a non-default hugetlb size.
MAP_HUGE_SHIFT = 26


class MADV(enum.IntEnum):
    NORMAL = 0
    RANDOM = 1
    SEQUENTIAL = 2
    WILLNEED = 3
    DONTNEED = 4
    FREE = 8
    REMOVE = 9
    DONTFORK = 10
    DOFORK = 11
    MERGEABLE = 12
    UNMERGEABLE = 13
    HUGEPAGE = 14  #: 2.6.38
    NOHUGEPAGE = 15
    DONTDUMP = 16
    DODUMP = 17
    WIPEONFORK = 18
    KEEPONFORK = 19
    COLD = 20  #: 5.4
    PAGEOUT = 21  #: 5.4
    POPULATE_READ = 22  #: 5.14
    POPULATE_WRITE = 23  #: 5.14
    DONTNEED_LOCKED = 24  #: 5.18
    COLLAPSE = 25  #: 6.1
    GUARD_INSTALL = 102  #: 6.13
    GUARD_REMOVE = 103  #: 6.13
