"""The one place that calls into libc or makes raw syscalls, and its errno policy.

Policy (every wrapper follows it):

* libc is loaded lazily, with ``use_errno=True``; each function has declared
  ``argtypes``/``restype`` so a Python int can never be truncated silently.
* A return of ``-1`` means "read errno". ``EINTR`` is retried. Anything else raises
  ``OSError(errno, strerror)``, which Python turns into the matching subclass
  (``FileNotFoundError``, ``PermissionError``, ...). errno is never turned into
  ``ValueError``/``MemoryError``.
* ioctls go through :func:`ioctl`, a thin ``fcntl.ioctl`` wrapper with the same policy.

Addresses handed to these functions are passed to the kernel only, never dereferenced
by Python: a bad address is ``EFAULT``, not a crash.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import platform
from typing import Any, Callable

import numpy as np

__all__ = [
    "IOVEC",
    "SYS_userfaultfd",
    "RawMapping",
    "check",
    "ioctl",
    "libc",
    "madvise",
    "mmap",
    "mprotect",
    "msync",
    "munmap",
    "open_userfaultfd",
    "prctl",
    "ptrace",
    "preadv",
    "pwrite_runs",
    "sync_file_range",
    "process_vm_readv",
    "process_vm_writev",
    "raise_errno",
    "read_runs",
    "syscall",
    "vm_read",
    "vm_write",
    "write_runs",
]

# Syscall numbers (arch/*/entry/syscalls, include/uapi/asm-generic/unistd.h).
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"userfaultfd": 323, "ptrace": 101, "prctl": 157},
    "aarch64": {"userfaultfd": 282, "ptrace": 117, "prctl": 167},
    "riscv64": {"userfaultfd": 282, "ptrace": 117, "prctl": 167},
    "loongarch64": {"userfaultfd": 282, "ptrace": 117, "prctl": 167},
    "i686": {"userfaultfd": 374, "ptrace": 26, "prctl": 172},
    "i386": {"userfaultfd": 374, "ptrace": 26, "prctl": 172},
    "armv7l": {"userfaultfd": 388, "ptrace": 26, "prctl": 172},
    "s390x": {"userfaultfd": 355, "ptrace": 26, "prctl": 172},
    "ppc64le": {"userfaultfd": 364, "ptrace": 26, "prctl": 171},
}

#: ``__NR_userfaultfd`` for this machine, or ``None`` where we do not know it.
SYS_userfaultfd: int | None = _SYSCALLS.get(platform.machine(), {}).get("userfaultfd")

MAP_FAILED = ctypes.c_void_p(-1).value


def _sys(name: str) -> int:
    nr = _SYSCALLS.get(platform.machine(), {}).get(name)
    if nr is None:
        raise OSError(errno.ENOSYS, f"{os.strerror(errno.ENOSYS)}: {name} (no syscall number known for "
                      f"{platform.machine()})")
    return nr


def ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """Raw ``ptrace(request, tid, addr, data)`` (the requests that take no pointer out)."""
    return syscall(_sys("ptrace"), request, tid, addr, data)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """Raw ``prctl(option, arg2, ...)``."""
    return syscall(_sys("prctl"), option, arg2, arg3, arg4, arg5)


#: A ``sigset_t`` with every bit set (glibc's is 128 bytes; the kernel's, 8).
_ALL_SIGNALS = ctypes.create_string_buffer(b"\xff" * 128, 128)
_SIG_BLOCK, _SIG_SETMASK = 0, 2


def block_all_signals() -> Any:
    """Block every signal in the calling thread; return the old mask for
    :func:`restore_signals`. ``signal.pthread_sigmask`` does the same but turns each of
    the 64 signals of both sets into an enum member (about 110 us a pair here; this
    takes about 2 us). glibc leaves its own two internal signals unblocked, as there."""
    old = ctypes.create_string_buffer(128)
    err = libc().pthread_sigmask(_SIG_BLOCK, _ALL_SIGNALS, old)  # returns the error number
    if err:
        raise_errno(err)
    return old


def restore_signals(old: Any) -> None:
    """Set the calling thread's signal mask back to ``old`` (from :func:`block_all_signals`)."""
    err = libc().pthread_sigmask(_SIG_SETMASK, old, None)
    if err:
        raise_errno(err)


def raise_errno(err: int | None = None, detail: str | None = None) -> None:
    """Raise ``OSError`` for ``err`` (default: the current ctypes errno)."""
    if err is None:
        err = ctypes.get_errno()
    msg = os.strerror(err)
    if detail:
        msg = f"{msg}: {detail}"
    raise OSError(err, msg)


@functools.cache
def libc() -> ctypes.CDLL:
    """libc, loaded on first use with errno capture; prototypes declared here."""
    lib = ctypes.CDLL(None, use_errno=True)
    c_void_p, c_size_t, c_int, c_long = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_long
    c_ssize_t, c_ulong = ctypes.c_ssize_t, ctypes.c_ulong
    protos: dict[str, tuple[Any, list[Any]]] = {
        "mmap": (c_void_p, [c_void_p, c_size_t, c_int, c_int, c_int, ctypes.c_int64]),
        "munmap": (c_int, [c_void_p, c_size_t]),
        "mprotect": (c_int, [c_void_p, c_size_t, c_int]),
        "madvise": (c_int, [c_void_p, c_size_t, c_int]),
        "msync": (c_int, [c_void_p, c_size_t, c_int]),
        "sync_file_range": (c_int, [c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]),
        "syscall": (c_long, [c_long]),  # variadic: extra args passed with explicit types
        "process_vm_readv": (c_ssize_t, [c_int, c_void_p, c_ulong, c_void_p, c_ulong, c_ulong]),
        "process_vm_writev": (c_ssize_t, [c_int, c_void_p, c_ulong, c_void_p, c_ulong, c_ulong]),
        "pwritev": (c_ssize_t, [c_int, c_void_p, c_int, ctypes.c_int64]),
        "preadv": (c_ssize_t, [c_int, c_void_p, c_int, ctypes.c_int64]),
        "pthread_sigmask": (c_int, [c_int, c_void_p, c_void_p]),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


@functools.cache
def _libc_holding_gil() -> ctypes.PyDLL:
    """libc again, as a ``PyDLL``: its calls keep the GIL (see :func:`preadv`)."""
    lib = ctypes.PyDLL(None, use_errno=True)
    lib.preadv.restype = ctypes.c_ssize_t
    lib.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    return lib


def preadv(fd: int, iov: int, count: int, offset: int, keep_gil: bool = False) -> int:
    """``preadv(fd, iov, count, offset)`` with the iovec array at address ``iov``; the
    bytes read. ``keep_gil``: the GIL is not released for the call. For many short
    reads made while another thread runs Python code: each release hands it the GIL,
    and taking it back waits until that thread lets go, up to a whole switch interval
    (5 ms by default) a call; kept, the other thread runs between our calls at the
    usual switch points instead. Only for reads that cannot wait on this process (a
    ``userfaultfd`` whose handler is one of our threads would need the GIL)."""
    fn = (_libc_holding_gil() if keep_gil else libc()).preadv
    return _retry(lambda: int(fn(fd, iov, count, offset)))


def check(result: int) -> int:
    """Return ``result`` unless it is -1, in which case raise from errno."""
    if result == -1:
        raise_errno()
    return result


def _retry(call: Callable[[], int]) -> int:
    while True:
        result = call()
        if result != -1:
            return result
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise_errno(err)


def syscall(number: int, *args: int) -> int:
    """``syscall(number, args...)`` with every argument passed as a C ``long``."""
    fn = libc().syscall
    cargs = [ctypes.c_long(a) for a in args]
    return _retry(lambda: int(fn(number, *cargs)))


def ioctl(fd: int, request: int, arg: Any = 0) -> int:
    """``ioctl(fd, request, arg)``; ``arg`` is an int or a mutable buffer (ctypes struct).

    Returns the ioctl's non-negative return value. A buffer argument is passed by
    address and may be updated by the kernel in place (also when the call fails, as
    the uffd ioctls and ``PAGEMAP_SCAN`` do).
    """
    while True:
        try:
            if isinstance(arg, int):
                return int(fcntl.ioctl(fd, request, arg))
            return int(fcntl.ioctl(fd, request, arg, True))
        except InterruptedError:
            continue


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """``mmap(2)``; returns the address."""
    result = libc().mmap(addr or None, length, prot, flags, fd, offset)
    if result is None or result == MAP_FAILED:
        raise_errno()
    return int(result)


def munmap(addr: int, length: int) -> None:
    check(libc().munmap(addr, length))


def mprotect(addr: int, length: int, prot: int) -> None:
    check(libc().mprotect(addr, length, prot))


def madvise(addr: int, length: int, advice: int) -> None:
    _retry(lambda: int(libc().madvise(addr, length, advice)))


MS_ASYNC = 1
SYNC_FILE_RANGE_WRITE = 2


def msync(addr: int, length: int, flags: int = MS_ASYNC) -> None:
    """``msync(2)``. With ``MS_ASYNC`` a no-op on the memory that fails with ENOMEM
    where ``[addr, addr+length)`` is not wholly mapped: a cheap "is it all mapped?"."""
    check(libc().msync(addr, length, flags))


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int = SYNC_FILE_RANGE_WRITE) -> None:
    """``sync_file_range(2)`` (default: start writeback of the range, do not wait)."""
    _retry(lambda: int(libc().sync_file_range(fd, offset, nbytes, flags)))


def open_userfaultfd(flags: int) -> int:
    """A raw uffd: the ``userfaultfd(2)`` syscall, or ``USERFAULTFD_IOC_NEW`` on
    ``/dev/userfaultfd`` (6.1) when the syscall is refused (EPERM under
    ``vm.unprivileged_userfaultfd=0``, ENOSYS under seccomp) or its number is unknown
    here. Raises the syscall's error when both fail (ENOSYS if there is neither)."""
    from .userfaultfd import USERFAULTFD_IOC_NEW

    first: OSError | None = None
    if SYS_userfaultfd is not None:
        try:
            return syscall(SYS_userfaultfd, flags)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOSYS):
                raise
            first = err
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        if first is not None:
            raise first from err
        raise OSError(errno.ENOSYS, f"{os.strerror(errno.ENOSYS)}: no userfaultfd syscall number for "
                      f"{platform.machine()} and no /dev/userfaultfd ({err.strerror})") from err
    try:
        return ioctl(dev, USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)


class RawMapping:
    """An anonymous (or ``fd``) mapping owned by this object: ``munmap`` on
    :meth:`close`, on leaving the ``with`` block, or when the object is collected.

    For pagescan's own scratch memory (probes, handler buffers); never handed to users
    as an address they could outlive.
    """

    __slots__ = ("__weakref__", "_finalizer", "addr", "length")

    def __init__(self, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0, addr: int = 0) -> None:
        import weakref

        self.length = length
        self.addr = mmap(addr, length, prot, flags, fd, offset)
        self._finalizer = weakref.finalize(self, _unmap_quietly, self.addr, length)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Unmap (idempotent)."""
        if self._finalizer.detach() is not None:
            munmap(self.addr, self.length)

    def __enter__(self) -> RawMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unmap_quietly(addr: int, length: int) -> None:
    try:
        munmap(addr, length)
    except OSError:
        pass


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def process_vm_readv(pid: int, local: Any, liovcnt: int, remote: Any, riovcnt: int) -> int:
    """Raw ``process_vm_readv(2)``; iovec arrays are passed by address."""
    return _retry(lambda: int(libc().process_vm_readv(pid, local, liovcnt, remote, riovcnt, 0)))


def process_vm_writev(pid: int, local: Any, liovcnt: int, remote: Any, riovcnt: int) -> int:
    """Raw ``process_vm_writev(2)``; iovec arrays are passed by address."""
    return _retry(lambda: int(libc().process_vm_writev(pid, local, liovcnt, remote, riovcnt, 0)))


def _buffer_address(buf: Any, writable: bool) -> tuple[int, int, Any]:
    """(address, nbytes, keepalive) of a contiguous buffer object."""
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    if writable and not arr.flags.writeable:
        raise TypeError("the destination buffer is read-only")
    return int(arr.ctypes.data), int(arr.nbytes), arr


def _vm_copy(fn: Callable[[int, Any, int, Any, int], int], pid: int, address: int, base: int, n: int) -> int:
    """Copy ``n`` bytes between local ``base`` and remote ``address`` with ``fn``
    (``process_vm_readv``/``writev``), resuming after partial transfers."""
    done = 0
    while done < n:
        local = _iovec(base + done, n - done)
        remote = _iovec(address + done, n - done)
        try:
            got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1)
        except OSError as err:
            if done and err.errno == errno.EFAULT:
                break  # ran into unmapped memory after a partial copy
            raise
        if got == 0:
            break
        done += got
    return done


def vm_read(pid: int, address: int, into: Any) -> int:
    """Copy ``len(into)`` bytes from ``address`` in ``pid`` into the writable buffer ``into``.

    Uses ``process_vm_readv``: an unmapped ``address`` raises ``OSError(EFAULT)``.
    Returns the number of bytes copied, which is short only where the remote range
    runs into unmapped memory after at least one byte was copied.
    """
    base, n, keep = _buffer_address(into, writable=True)
    done = _vm_copy(process_vm_readv, pid, address, base, n)
    del keep
    return done


def vm_write(pid: int, address: int, data: Any) -> int:
    """Copy the bytes of ``data`` to ``address`` in ``pid`` with ``process_vm_writev``."""
    base, n, keep = _buffer_address(data, writable=False)
    done = _vm_copy(process_vm_writev, pid, address, base, n)
    del keep
    return done


# -- batched copies between a process's memory and numpy buffers ------------------------
#
# ``process_vm_readv``/``process_vm_writev`` with up to ``IOV_MAX`` (1024) iovecs on each
# side per call, built with numpy. Each run of remote bytes is paired with its own place
# in the local buffer, so a run shorter than a page (the end of an entry) still starts
# the next run on a row boundary. An address that is not mapped fails with EFAULT;
# Python never dereferences it.

IOV_MAX = 1024
#: ``struct iovec``.
IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])


def _transfer(pid: int, local: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
              offsets: np.ndarray | None, write: bool) -> None:
    """Copy runs ``[starts[i], starts[i]+lengths[i])`` to/from ``local`` at byte ``offsets[i]``.

    ``offsets=None``: the runs are packed one after another. A partial transfer (the
    kernel stops at the first byte it cannot copy) is resumed where it stopped, so the
    error names the first address that failed.
    """
    if not len(starts):
        return
    starts = starts.astype(np.uint64, copy=True)
    lengths = lengths.astype(np.uint64, copy=True)
    if offsets is None:
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    else:
        offsets = offsets.astype(np.uint64, copy=True)
    if int((offsets + lengths).max()) > local.nbytes:
        raise ValueError("local buffer too small")
    base = np.uint64(local.ctypes.data)
    fn = process_vm_writev if write else process_vm_readv
    verb = "write" if write else "read"
    i, n = 0, len(starts)
    remote = np.empty(min(n, IOV_MAX), dtype=IOVEC)
    loc = np.empty(min(n, IOV_MAX), dtype=IOVEC)
    while i < n:
        j = min(n, i + IOV_MAX)
        k = j - i
        remote["base"][:k] = starts[i:j]
        remote["len"][:k] = lengths[i:j]
        loc["base"][:k] = offsets[i:j] + base
        loc["len"][:k] = lengths[i:j]
        want = int(lengths[i:j].sum())
        try:
            got = fn(pid, ctypes.c_void_p(int(loc.ctypes.data)), k, ctypes.c_void_p(int(remote.ctypes.data)), k)
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror}: cannot {verb} {int(starts[i]):#x} in pid {pid}"
                          + (" (not mapped there?)" if err.errno == errno.EFAULT else "")) from None
        if got == want:
            i = j
            continue
        if got == 0:
            raise OSError(errno.EFAULT, f"{os.strerror(errno.EFAULT)}: cannot {verb} {int(starts[i]):#x} in pid "
                          f"{pid} (not mapped there?)")
        # Resume at the first byte not transferred.
        ends = np.cumsum(lengths[i:j])
        r = i + int(np.searchsorted(ends, got, side="right"))
        done_in_r = got - (int(ends[r - i - 1]) if r > i else 0)
        if done_in_r:
            d = np.uint64(done_in_r)
            starts[r] += d
            offsets[r] += d
            lengths[r] -= d
        i = r


def read_runs(pid: int, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray,
              offsets: np.ndarray | None = None) -> None:
    """Read the runs of ``pid`` into ``out`` (at ``offsets``, or packed)."""
    _transfer(pid, out, np.asarray(starts, np.uint64), np.asarray(lengths, np.uint64),
              None if offsets is None else np.asarray(offsets, np.uint64), write=False)


def write_runs(pid: int, starts: np.ndarray, lengths: np.ndarray, data: np.ndarray,
               offsets: np.ndarray | None = None) -> None:
    """Write bytes of ``data`` (at ``offsets``, or packed) into the runs of ``pid``."""
    _transfer(pid, data, np.asarray(starts, np.uint64), np.asarray(lengths, np.uint64),
              None if offsets is None else np.asarray(offsets, np.uint64), write=True)


def pwrite_runs(fd: int, starts: np.ndarray, lengths: np.ndarray, offsets: np.ndarray, total: int, pos: int) -> None:
    """Write the runs ``[starts[i], starts[i]+lengths[i])`` of *this* process's memory to
    ``fd`` at ``pos + offsets[i]`` (ascending, disjoint), zeros in the gaps between them
    and after the last up to ``total`` bytes: ``pwritev(2)`` of up to ``IOV_MAX`` iovecs a
    call. The kernel reads the memory (Python never does): a run it cannot read is
    ``OSError(EFAULT)`` naming its address, after the bytes before it were written.
    """
    n = len(starts)
    if not n:
        return
    st = np.asarray(starts, np.uint64)
    ln = np.asarray(lengths, np.uint64)
    of = np.asarray(offsets, np.uint64)
    gaps = np.empty(n, np.uint64)
    gaps[:-1] = of[1:] - (of[:-1] + ln[:-1])
    gaps[-1] = np.uint64(total) - (of[-1] + ln[-1])
    iov = np.empty(2 * n, dtype=IOVEC)
    iov["base"][0::2] = st
    iov["len"][0::2] = ln
    zeros = _zeros(int(gaps.max()))
    iov["base"][1::2] = zeros.ctypes.data
    iov["len"][1::2] = gaps
    if not gaps.all():
        iov = iov[iov["len"] != 0]
    fn = libc().pwritev
    i, k = 0, len(iov)
    at = pos
    while i < k:
        j = min(k, i + IOV_MAX)
        want = int(iov["len"][i:j].sum())
        try:
            got = _retry(lambda: int(fn(fd, int(iov.ctypes.data) + i * IOVEC.itemsize, j - i, at)))
        except OSError as err:
            if err.errno != errno.EFAULT:
                raise
            raise OSError(err.errno, f"{err.strerror}: cannot read {int(iov['base'][i]):#x} in this process "
                          "(not mapped there, or a guard page?)") from None
        at += got
        if got == want:
            i = j
            continue
        if got == 0:
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: short write at offset {at}")
        # Resume at the first byte not written (the next call names a run it cannot read).
        ends = np.cumsum(iov["len"][i:j])
        r = i + int(np.searchsorted(ends, got, side="right"))
        done_in_r = got - (int(ends[r - i - 1]) if r > i else 0)
        if done_in_r:
            iov["base"][r] += np.uint64(done_in_r)
            iov["len"][r] -= np.uint64(done_in_r)
        i = r


@functools.cache
def _zero_block(n: int) -> np.ndarray:
    return np.zeros(max(n, 1), np.uint8)


def _zeros(n: int) -> np.ndarray:
    """A zeroed buffer of at least ``n`` bytes, kept (the iovecs of a write point into it)."""
    return _zero_block(1 << max(n - 1, 0).bit_length())
