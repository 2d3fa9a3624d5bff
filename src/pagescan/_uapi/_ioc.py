"""The generic ``_IOC`` ioctl-number encoding (``include/uapi/asm-generic/ioctl.h``).

Valid on x86, arm64, riscv, s390 and loongarch. powerpc, mips, sparc and alpha use other
direction bits and size widths; :data:`GENERIC_IOC` says whether this machine is one of
the generic ones (importing never fails, the numbers are simply wrong elsewhere).
"""

from __future__ import annotations

import platform

__all__ = ["GENERIC_IOC", "IOC_NONE", "IOC_READ", "IOC_WRITE", "_IO", "_IOC", "_IOR", "_IOW", "_IOWR"]

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

GENERIC_IOC: bool = not platform.machine().startswith(("ppc", "mips", "sparc", "alpha"))


def _IOC(direction: int, type_: int | str, nr: int, size: int) -> int:
    if isinstance(type_, str):
        type_ = ord(type_)
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int | str, nr: int) -> int:
    return _IOC(IOC_NONE, type_, nr, 0)


def _IOR(type_: int | str, nr: int, size: int) -> int:
    return _IOC(IOC_READ, type_, nr, size)


def _IOW(type_: int | str, nr: int, size: int) -> int:
    return _IOC(IOC_WRITE, type_, nr, size)


def _IOWR(type_: int | str, nr: int, size: int) -> int:
    return _IOC(IOC_READ | IOC_WRITE, type_, nr, size)
