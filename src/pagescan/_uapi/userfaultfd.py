"""userfaultfd ABI (``include/uapi/linux/userfaultfd.h``).

Struct field names match the header. The trailing signed output fields of the
resolution ioctls (``copy``, ``zeropage``, ``mapped``, ``updated``, ``move``) hold the
bytes processed, or ``-errno`` if nothing was processed.
"""

from __future__ import annotations

import ctypes
import enum

import numpy as np

from ._ioc import _IO, _IOR, _IOWR

__all__ = [
    "FEATURE_SINCE",
    "O_CLOEXEC",
    "O_NONBLOCK",
    "UFFDIO",
    "UFFDIO_API",
    "UFFDIO_CONTINUE",
    "UFFDIO_COPY",
    "UFFDIO_MOVE",
    "UFFDIO_POISON",
    "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE",
    "UFFDIO_WRITEPROTECT",
    "UFFDIO_ZEROPAGE",
    "UFFD_API",
    "UFFD_MSG_DTYPE",
    "UFFD_USER_MODE_ONLY",
    "USERFAULTFD_IOC_NEW",
    "ContinueMode",
    "CopyMode",
    "MoveMode",
    "PagefaultFlag",
    "PoisonMode",
    "RegisterMode",
    "UffdEventType",
    "UffdFeature",
    "UffdIoctl",
    "WriteprotectMode",
    "ZeropageMode",
    "uffd_msg",
    "uffdio_api",
    "uffdio_continue",
    "uffdio_copy",
    "uffdio_move",
    "uffdio_poison",
    "uffdio_range",
    "uffdio_register",
    "uffdio_writeprotect",
    "uffdio_zeropage",
]

UFFD_API = 0xAA
#: ``userfaultfd(2)`` flag: only user-mode faults are handled (5.11).
UFFD_USER_MODE_ONLY = 1
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000


class UffdFeature(enum.IntFlag):
    """``uffdio_api.features`` (``UFFD_FEATURE_*``)."""

    PAGEFAULT_FLAG_WP = 1 << 0  #: 5.7 (usable with MODE_WP)
    EVENT_FORK = 1 << 1  #: 4.11, needs CAP_SYS_PTRACE
    EVENT_REMAP = 1 << 2  #: 4.11
    EVENT_REMOVE = 1 << 3  #: 4.11
    MISSING_HUGETLBFS = 1 << 4  #: 4.11
    MISSING_SHMEM = 1 << 5  #: 4.11
    EVENT_UNMAP = 1 << 6  #: 4.11
    SIGBUS = 1 << 7  #: 4.14
    THREAD_ID = 1 << 8  #: 4.14
    MINOR_HUGETLBFS = 1 << 9  #: 5.13
    MINOR_SHMEM = 1 << 10  #: 5.14
    EXACT_ADDRESS = 1 << 11  #: 5.18
    WP_HUGETLBFS_SHMEM = 1 << 12  #: 5.19
    WP_UNPOPULATED = 1 << 13  #: 6.4
    POISON = 1 << 14  #: 6.6
    WP_ASYNC = 1 << 15  #: 6.7, implies WP_UNPOPULATED
    MOVE = 1 << 16  #: 6.8


#: Kernel release that introduced each feature bit.
FEATURE_SINCE: dict[UffdFeature, str] = {
    UffdFeature.PAGEFAULT_FLAG_WP: "5.7",
    UffdFeature.EVENT_FORK: "4.11",
    UffdFeature.EVENT_REMAP: "4.11",
    UffdFeature.EVENT_REMOVE: "4.11",
    UffdFeature.MISSING_HUGETLBFS: "4.11",
    UffdFeature.MISSING_SHMEM: "4.11",
    UffdFeature.EVENT_UNMAP: "4.11",
    UffdFeature.SIGBUS: "4.14",
    UffdFeature.THREAD_ID: "4.14",
    UffdFeature.MINOR_HUGETLBFS: "5.13",
    UffdFeature.MINOR_SHMEM: "5.14",
    UffdFeature.EXACT_ADDRESS: "5.18",
    UffdFeature.WP_HUGETLBFS_SHMEM: "5.19",
    UffdFeature.WP_UNPOPULATED: "6.4",
    UffdFeature.POISON: "6.6",
    UffdFeature.WP_ASYNC: "6.7",
    UffdFeature.MOVE: "6.8",
}


class UffdIoctl(enum.IntFlag):
    """Bits of ``uffdio_api.ioctls`` / ``uffdio_register.ioctls`` (``1 << _UFFDIO_*``)."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


class RegisterMode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class CopyMode(enum.IntFlag):
    DONTWAKE = 1 << 0
    WP = 1 << 1


class ZeropageMode(enum.IntFlag):
    DONTWAKE = 1 << 0


class WriteprotectMode(enum.IntFlag):
    WP = 1 << 0
    DONTWAKE = 1 << 1


class ContinueMode(enum.IntFlag):
    DONTWAKE = 1 << 0
    WP = 1 << 1


class PoisonMode(enum.IntFlag):
    DONTWAKE = 1 << 0


class MoveMode(enum.IntFlag):
    DONTWAKE = 1 << 0
    ALLOW_SRC_HOLES = 1 << 1


class UffdEventType(enum.IntEnum):
    """``uffd_msg.event`` (values start at 0x12 on purpose)."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class PagefaultFlag(enum.IntFlag):
    """``uffd_msg.arg.pagefault.flags``; neither WP nor MINOR means a missing fault."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


_u64 = ctypes.c_uint64
_s64 = ctypes.c_int64


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", _u64), ("features", _u64), ("ioctls", _u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", _u64), ("len", _u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", _u64), ("ioctls", _u64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", _u64), ("src", _u64), ("len", _u64), ("mode", _u64), ("copy", _s64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", _u64), ("zeropage", _s64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", _u64)]


class uffdio_continue(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", _u64), ("mapped", _s64)]


class uffdio_poison(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", _u64), ("updated", _s64)]


class uffdio_move(ctypes.Structure):
    _fields_ = [("dst", _u64), ("src", _u64), ("len", _u64), ("mode", _u64), ("move", _s64)]


class _uffd_pagefault(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("flags", _u64), ("address", _u64), ("ptid", ctypes.c_uint32)]


class _uffd_fork(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("ufd", ctypes.c_uint32)]


class _uffd_remap(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("from", _u64), ("to", _u64), ("len", _u64)]


class _uffd_remove(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("start", _u64), ("end", _u64)]


class _uffd_reserved(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("reserved1", _u64), ("reserved2", _u64), ("reserved3", _u64)]


class _uffd_msg_arg(ctypes.Union):
    _pack_ = 1
    _fields_ = [
        ("pagefault", _uffd_pagefault),
        ("fork", _uffd_fork),
        ("remap", _uffd_remap),
        ("remove", _uffd_remove),
        ("reserved", _uffd_reserved),
    ]


class uffd_msg(ctypes.Structure):
    """``struct uffd_msg`` (32 bytes, packed)."""

    _pack_ = 1
    _fields_ = [
        ("event", ctypes.c_uint8),
        ("reserved1", ctypes.c_uint8),
        ("reserved2", ctypes.c_uint16),
        ("reserved3", ctypes.c_uint32),
        ("arg", _uffd_msg_arg),
    ]


#: numpy view of ``struct uffd_msg``: the union is exposed as three u64 words
#: ``a0, a1, a2`` (pagefault: flags, address, ptid in the low 32 bits of ``a2``;
#: fork: ufd in the low 32 bits of ``a0``; remap: from, to, len; remove/unmap: start, end).
UFFD_MSG_DTYPE = np.dtype(
    [
        ("event", "u1"),
        ("reserved1", "u1"),
        ("reserved2", "<u2"),
        ("reserved3", "<u4"),
        ("a0", "<u8"),
        ("a1", "<u8"),
        ("a2", "<u8"),
    ]
)

for _struct, _size in (
    (uffdio_api, 24),
    (uffdio_range, 16),
    (uffdio_register, 32),
    (uffdio_copy, 40),
    (uffdio_zeropage, 32),
    (uffdio_writeprotect, 24),
    (uffdio_continue, 32),
    (uffdio_poison, 32),
    (uffdio_move, 40),
    (uffd_msg, 32),
):
    assert ctypes.sizeof(_struct) == _size, f"{_struct.__name__} must be {_size} bytes"
assert UFFD_MSG_DTYPE.itemsize == 32

_sz = ctypes.sizeof
UFFDIO_REGISTER = _IOWR(UFFD_API, 0x00, _sz(uffdio_register))
UFFDIO_UNREGISTER = _IOR(UFFD_API, 0x01, _sz(uffdio_range))
UFFDIO_WAKE = _IOR(UFFD_API, 0x02, _sz(uffdio_range))
UFFDIO_COPY = _IOWR(UFFD_API, 0x03, _sz(uffdio_copy))
UFFDIO_ZEROPAGE = _IOWR(UFFD_API, 0x04, _sz(uffdio_zeropage))
UFFDIO_MOVE = _IOWR(UFFD_API, 0x05, _sz(uffdio_move))  # 6.8
UFFDIO_WRITEPROTECT = _IOWR(UFFD_API, 0x06, _sz(uffdio_writeprotect))  # 5.7
UFFDIO_CONTINUE = _IOWR(UFFD_API, 0x07, _sz(uffdio_continue))  # 5.13
UFFDIO_POISON = _IOWR(UFFD_API, 0x08, _sz(uffdio_poison))  # 6.6
UFFDIO_API = _IOWR(UFFD_API, 0x3F, _sz(uffdio_api))
#: ``/dev/userfaultfd`` ioctl returning a new uffd (6.1).
USERFAULTFD_IOC_NEW = _IO(UFFD_API, 0x00)


class UFFDIO(enum.IntEnum):
    """The ioctl request numbers, by name (for messages and tests)."""

    REGISTER = UFFDIO_REGISTER
    UNREGISTER = UFFDIO_UNREGISTER
    WAKE = UFFDIO_WAKE
    COPY = UFFDIO_COPY
    ZEROPAGE = UFFDIO_ZEROPAGE
    MOVE = UFFDIO_MOVE
    WRITEPROTECT = UFFDIO_WRITEPROTECT
    CONTINUE = UFFDIO_CONTINUE
    POISON = UFFDIO_POISON
    API = UFFDIO_API
