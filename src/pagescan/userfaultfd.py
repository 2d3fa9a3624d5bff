"""``Userfaultfd``: a userfaultfd file descriptor, its handshake and its ioctls.

Facts (``docs/kernel-facts.md``, userfaultfd):

* Created by ``userfaultfd(2)`` or, when the syscall is refused (EPERM under
  ``vm.unprivileged_userfaultfd=0`` without ``UFFD_USER_MODE_ONLY``, ENOSYS under
  seccomp), by ``USERFAULTFD_IOC_NEW`` on ``/dev/userfaultfd`` (6.1), whose access is
  governed by file permissions only.
* ``UFFDIO_API`` is one-shot per fd: every other ioctl and ``read()`` fail with EINVAL
  before it, a second one fails with EINVAL. Unknown feature bits fail with EINVAL.
* The resolution ioctls (COPY, ZEROPAGE, CONTINUE, POISON, MOVE) report progress in a
  signed output field: bytes done, or ``-errno``. The ioctl fails with EAGAIN when only
  part was done; that becomes :class:`PartialProgressError` with ``done`` set.
* ``poll`` works only on a non-blocking uffd (a blocking one always polls POLLERR).

.. warning::
   A thread of the process that owns the memory must never be the one that resolves
   its MISSING/sync-WP faults: a faulting access made while holding the GIL blocks
   until the fault is resolved, and a handler thread waiting for the GIL never runs.
   Serve faults from another process (hand it the fd with ``socket.send_fds`` or by
   inheritance). ``UFFDIO_MOVE`` is the exception that proves the rule: the kernel
   refuses it from any process but the owner of the memory (EINVAL).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import numbers
import os
import select
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np

from . import _probe
from ._args import held_buffer, u64, unaligned
from ._errors import KernelFeatureError, PartialProgressError, feature_error, with_context
from ._fdholder import FdHolder
from ._registry import wp_async_registry
from ._uapi import libc
from ._uapi import userfaultfd as U
from ._uapi.userfaultfd import (
    PagefaultFlag,
    RegisterMode,
    UffdEventType,
    UffdFeature,
    UffdIoctl,
)

__all__ = [
    "ForkEvent",
    "PagefaultEvent",
    "RemapEvent",
    "RemoveEvent",
    "UnmapEvent",
    "UnknownEvent",
    "Userfaultfd",
    "open_userfaultfd",
    "parse_uffd_msgs",
]

_MSG_SIZE = 32
#: The longest finite ``read_events`` timeout, in seconds: ``poll`` takes an int of ms.
MAX_TIMEOUT = (2**31 - 1) / 1000
_P = mmap.PAGESIZE


class PagefaultEvent(NamedTuple):
    """``UFFD_EVENT_PAGEFAULT``: ``flags`` has WRITE/WP/MINOR; neither WP nor MINOR = missing."""

    flags: PagefaultFlag
    address: int
    ptid: int

    @property
    def is_write(self) -> bool:
        return bool(self.flags & PagefaultFlag.WRITE)

    @property
    def kind(self) -> str:
        """``"wp"``, ``"minor"`` or ``"missing"``."""
        if self.flags & PagefaultFlag.WP:
            return "wp"
        if self.flags & PagefaultFlag.MINOR:
            return "minor"
        return "missing"


class ForkEvent(NamedTuple):
    """``UFFD_EVENT_FORK``: ``ufd`` is a new uffd fd already installed in our fd table."""

    ufd: int


class RemapEvent(NamedTuple):
    """``UFFD_EVENT_REMAP`` (mremap)."""

    from_: int
    to: int
    len: int


class RemoveEvent(NamedTuple):
    """``UFFD_EVENT_REMOVE`` (MADV_DONTNEED / MADV_REMOVE): ``[start, end)``."""

    start: int
    end: int


class UnmapEvent(NamedTuple):
    """``UFFD_EVENT_UNMAP`` (munmap): ``[start, end)``."""

    start: int
    end: int


class UnknownEvent(NamedTuple):
    event: int
    raw: bytes


UffdEvent = PagefaultEvent | ForkEvent | RemapEvent | RemoveEvent | UnmapEvent | UnknownEvent


def parse_uffd_msgs(buffer: Any) -> list[UffdEvent]:
    """Decode a buffer of ``struct uffd_msg`` (32 bytes each) read from a uffd.

    Pure: no syscalls. Raises ``ValueError`` if the length is not a multiple of 32.
    """
    data = memoryview(buffer).cast("B")
    if len(data) % _MSG_SIZE:
        raise ValueError(f"uffd message buffer length {len(data)} is not a multiple of {_MSG_SIZE}")
    msgs = np.frombuffer(data, dtype=U.UFFD_MSG_DTYPE)
    out: list[UffdEvent] = []
    for i, (event, a0, a1, a2) in enumerate(
        zip(msgs["event"].tolist(), msgs["a0"].tolist(), msgs["a1"].tolist(), msgs["a2"].tolist())
    ):
        if event == UffdEventType.PAGEFAULT:
            out.append(PagefaultEvent(PagefaultFlag(a0), a1, a2 & 0xFFFFFFFF))
        elif event == UffdEventType.FORK:
            out.append(ForkEvent(a0 & 0xFFFFFFFF))
        elif event == UffdEventType.REMAP:
            out.append(RemapEvent(a0, a1, a2))
        elif event == UffdEventType.REMOVE:
            out.append(RemoveEvent(a0, a1))
        elif event == UffdEventType.UNMAP:
            out.append(UnmapEvent(a0, a1))
        else:
            out.append(UnknownEvent(event, bytes(data[i * _MSG_SIZE : (i + 1) * _MSG_SIZE])))
    return out


def open_userfaultfd(flags: int) -> int:
    """A raw uffd (``userfaultfd(2)``, or ``/dev/userfaultfd`` when the syscall is
    refused); :class:`KernelFeatureError` (ENOSYS) when neither exists."""
    try:
        return libc.open_userfaultfd(flags)
    except OSError as err:
        if err.errno == errno.ENOSYS:
            raise feature_error(errno.ENOSYS, ["userfaultfd"], err.strerror or "") from err
        raise


def _u64(name: str, value: Any) -> int:
    return u64(name, value, bool_ok=False)


def _range(call: str, start: Any, length: Any, name: str = "start") -> tuple[int, int]:
    """``(start, length)`` as plain ints, checked before the syscall (``TypeError``,
    ``ValueError``). Alignment is left to the kernel: these methods mirror the ioctls,
    whose own order of checks (``-EAGAIN`` while the mm changes comes first, for
    example) decides the errno."""
    return _u64(name, start), _u64("length", length)


_R = TypeVar("_R")


class Userfaultfd(FdHolder):
    """A userfaultfd after its ``UFFDIO_API`` handshake.

    Args:
        features: ``UffdFeature`` bits to enable (unknown bits: EINVAL). ``WP_ASYNC``
            implies ``WP_UNPOPULATED``.
        nonblock: ``O_NONBLOCK`` (needed for ``poll``/``read_events(timeout=...)``).
        user_mode_only: ``UFFD_USER_MODE_ONLY``: faults in kernel mode (e.g. a
            ``read(2)`` into registered memory) are not delivered but fail.
        inheritable: leave ``O_CLOEXEC`` off, to hand the fd to a child process.

    Attributes:
        features: the features enabled on this fd.
        supported_features: every feature this kernel supports (as UFFDIO_API returned).
        ioctls: the ioctls the handshake enabled (``UffdIoctl``).

    Raises:
        OSError: EPERM (not allowed to create one), EINVAL (unknown feature bits),
            EPERM (``EVENT_FORK`` without ``CAP_SYS_PTRACE``).
    """

    __slots__ = ("__weakref__", "_box", "_busy", "_parked", "_wake", "features", "ioctls", "supported_features")
    _what = "Userfaultfd"

    def __init__(
        self,
        features: int = 0,
        *,
        nonblock: bool = True,
        user_mode_only: bool = False,
        inheritable: bool = False,
    ) -> None:
        self._own(-1)
        features = _u64("features", features)
        flags = (0 if inheritable else U.O_CLOEXEC) | (U.O_NONBLOCK if nonblock else 0)
        if user_mode_only:
            flags |= U.UFFD_USER_MODE_ONLY
        fd = open_userfaultfd(flags)
        try:
            api = U.uffdio_api(U.UFFD_API, features, 0)
            libc.ioctl(fd, U.UFFDIO_API, api)
        except OSError as err:
            os.close(fd)
            if err.errno == errno.EINVAL:
                raise _feature_error(features) or err from None
            raise
        self._own(fd)
        self.supported_features = UffdFeature(api.features)
        enabled = features
        if enabled & UffdFeature.WP_ASYNC:
            enabled |= UffdFeature.WP_UNPOPULATED
        self.features = UffdFeature(enabled)
        self.ioctls = UffdIoctl(api.ioctls)

    @classmethod
    def from_fd(cls, fd: int, features: int = 0) -> Userfaultfd:
        """Adopt an already initialized uffd (e.g. received with ``socket.recv_fds``).

        The handshake is not repeated (it is one-shot); ``features`` records what the
        creator enabled. The object owns ``fd`` from now on.

        Raises:
            TypeError, ValueError: ``fd`` is not an int >= 0, or not a userfaultfd.
            OSError: EBADF, ``fd`` is not open.
        """
        fd = _u64("fd", fd)
        if fd > 2**31 - 1:
            raise ValueError(f"fd {fd} is not a file descriptor")
        os.fstat(fd)  # EBADF if not open
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            link = ""
        if link and link != "anon_inode:[userfaultfd]":
            raise ValueError(f"fd {fd} is not a userfaultfd ({link})")
        features = _u64("features", features)
        self = object.__new__(cls)
        self._own(fd)
        self.features = UffdFeature(features)
        self.supported_features = UffdFeature(0)
        self.ioctls = UffdIoctl(0)
        return self

    # -- fd lifecycle (FdHolder) -------------------------------------------------------
    #
    # ``close()`` may run while another call has the fd number in hand: in another
    # thread, or in a signal handler or finalizer that interrupted one. Were the number
    # freed then, a file opened meanwhile could take it and get the call meant for this
    # uffd (a range registered with another uffd, a read of another file). So each call
    # puts a token of its own in ``_busy`` while it uses the number (list append and
    # remove are atomic under the GIL; no lock a signal handler could find held), and
    # ``close()`` with a call in progress puts a placeholder (``/dev/null``) on the
    # number with ``dup2``: the uffd is released at once (ranges unregistered, faulting
    # threads woken), the number stays taken until the last call is out (or, should an
    # exception raised by a signal handler have cut a call's cleanup short, until this
    # object is collected). A call that reaches the placeholder reports the uffd closed.

    def _own(self, fd: int) -> None:
        self._fd = fd
        self._box = [fd] if fd >= 0 else []  # popped once: by close() or detach()
        self._busy: list[object] = []
        self._parked: list[int] = []  # the number, on the placeholder, while calls are out
        self._wake: list[int] = []  # a pipe that close() writes to, made by a waiting read_events
        _live.add(self)

    def _use(self, fn: Callable[..., _R], *args: Any) -> _R:
        """``fn(fd, *args)`` with the number held (``ValueError`` if closed, before or
        meanwhile)."""
        token = object()
        busy = self._busy
        try:
            busy.append(token)
            fd = self._fd
            if fd < 0:
                raise self._closed_error()
            return fn(fd, *args)
        except OSError:
            if self._fd < 0:  # closed meanwhile (it may have reached the placeholder)
                raise self._closed_error() from None
            raise
        finally:
            try:
                busy.remove(token)
            except ValueError:  # (never appended: cut short before)
                pass
            if self._parked and not busy:
                self._unpark()

    def _unpark(self) -> None:
        """Close the parked number, and the wake pipe (no call is out any more)."""
        while True:
            try:
                fd = self._parked.pop()  # one caller each
            except IndexError:
                break
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._fd < 0:
            self._close_wake()

    def close(self) -> None:
        """Close the uffd: the kernel unregisters every range and wakes the faulting
        threads. A call in progress meanwhile (another thread, or one a signal handler
        interrupted) fails with ``ValueError``, never reaches another file; a
        :meth:`read_events` waiting on a non-blocking uffd (the default) returns at once
        with ``ValueError``."""
        try:
            fd = self._box.pop()
        except (IndexError, AttributeError):
            return
        self._fd = -1
        self._closing()
        if self._busy:  # a call has the number: the uffd goes, the number stays taken
            try:
                null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.dup2(null, fd, inheritable=False)  # the uffd is released here
                finally:
                    os.close(null)
            except OSError:  # no placeholder to be had: closed (its number may be reused)
                os.close(fd)
                return
        self._parked.append(fd)
        if not self._busy:  # none (left), or the last call left meanwhile: closed now
            self._unpark()

    def detach(self) -> int:
        """Give up ownership of the fd and return it (a waiting :meth:`read_events`
        returns with ``ValueError``)."""
        try:
            fd = self._box.pop()
        except (IndexError, AttributeError):
            raise self._closed_error() from None
        self._fd = -1
        self._closing()
        return fd

    def _ioctl(self, request: int, arg: ctypes.Structure) -> None:
        self._use(libc.ioctl, request, arg)

    def _closing(self) -> None:
        wp_async_registry.remove(id(self))
        if self._wake:
            with contextlib.suppress(OSError, IndexError):
                os.write(self._wake[1], b"x")

    def _close_wake(self) -> None:
        wake, self._wake = self._wake, []
        for w in wake:
            with contextlib.suppress(OSError):
                os.close(w)

    def _finalize(self) -> None:
        # Always: once this object is gone its id may be reused by another one, and
        # registrations of a detached fd are no longer this object's to vouch for.
        wp_async_registry.remove(id(self))
        if getattr(self, "_parked", None):
            self._unpark()
        if getattr(self, "_wake", None):
            self._close_wake()

    def _after_fork(self) -> None:
        """In a child: no call of the parent's threads is in progress here, and the wake
        pipe is shared with the parent (a byte written here would end its waits)."""
        self._busy = []
        self._close_wake()
        self._unpark()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<pagescan.Userfaultfd {state} features={self.features!r}>"

    # -- registration ---------------------------------------------------------------

    def register(self, start: int, length: int, mode: int = RegisterMode.MISSING) -> UffdIoctl:
        """``UFFDIO_REGISTER`` every VMA in ``[start, start+length)`` with ``mode``.

        Returns the ioctls usable on the range. Errors: EINVAL (bad range or mode, no
        VMA, memory type not eligible), EPERM (no ``VM_MAYWRITE``), EBUSY (registered
        with another uffd).
        """
        s, n = _range("UFFDIO_REGISTER", start, length)
        m = _u64("mode", mode)
        arg = U.uffdio_register(U.uffdio_range(s, n), m, 0)

        def register(fd: int) -> None:
            try:
                libc.ioctl(fd, U.UFFDIO_REGISTER, arg)
            except OSError as err:
                if self._fd < 0:
                    raise
                raise with_context(err, f"UFFDIO_REGISTER of [{s:#x}, {s + n:#x}) mode {RegisterMode(m)!r}"
                                   + (_range_hint(s, n, err) or _REGISTER_HINTS.get(err.errno or 0, ""))) from None
            # Recorded for the emulated PAGEMAP_SCAN (WPALLOWED, CHECK_WPASYNC): the range is
            # now this uffd's, in this mode (the registry asks the kernel whether it is
            # async), with the number still held.
            wp_async_registry.add(id(self), s, s + n, wp=bool(m & RegisterMode.WP), fd=fd)
            if self._fd < 0:  # closed meanwhile: its records went with it
                wp_async_registry.remove(id(self))

        self._use(register)
        return UffdIoctl(arg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        """``UFFDIO_UNREGISTER``: wakes MISSING waiters and clears uffd-wp state."""
        s, n = _range("UFFDIO_UNREGISTER", start, length)
        arg = U.uffdio_range(s, n)
        try:
            self._ioctl(U.UFFDIO_UNREGISTER, arg)
        except OSError as err:
            raise with_context(err, f"UFFDIO_UNREGISTER of [{s:#x}, {s + n:#x})" + (
                _range_hint(s, n, err) or (" (no mapping there, or it belongs to another userfaultfd)"
                                           if err.errno == errno.EINVAL else ""))) from None
        wp_async_registry.remove(id(self), s, s + n)

    # -- resolution -----------------------------------------------------------------

    def writeprotect(self, start: int, length: int, enable: bool = True, *, dontwake: bool = False) -> None:
        """``UFFDIO_WRITEPROTECT``: arm (``enable``) or disarm and wake the range.

        Errors: ENOENT (a VMA in range is not WP-registered), EINVAL (bad range; WP
        together with DONTWAKE), EAGAIN (mm changing).
        """
        s, n = _range("UFFDIO_WRITEPROTECT", start, length)
        mode = (U.WriteprotectMode.WP if enable else 0) | (U.WriteprotectMode.DONTWAKE if dontwake else 0)
        arg = U.uffdio_writeprotect(U.uffdio_range(s, n), mode)
        try:
            self._ioctl(U.UFFDIO_WRITEPROTECT, arg)
        except OSError as err:
            raise with_context(err, f"UFFDIO_WRITEPROTECT of [{s:#x}, {s + n:#x})" + _range_hint(s, n, err) + (
                " (a mapping in range is not registered for write-protect with this userfaultfd)"
                if err.errno == errno.ENOENT else "")) from None

    def copy(self, dst: int, src: int, length: int, *, wp: bool = False, dontwake: bool = False) -> int:
        """``UFFDIO_COPY`` ``length`` bytes from ``src`` (in the *calling* process) to ``dst``.

        Returns ``length``. Errors: EEXIST (already populated), ENOENT (dst not in a
        registered VMA), EFAULT (src unreadable), :class:`PartialProgressError`.
        """
        d, n = _range("UFFDIO_COPY", dst, length, "dst")
        mode = (U.CopyMode.WP if wp else 0) | (U.CopyMode.DONTWAKE if dontwake else 0)
        arg = U.uffdio_copy(d, _u64("src", src), n, mode, 0)
        return self._resolve(U.UFFDIO_COPY, arg, "copy", "UFFDIO_COPY", d, n)

    def copy_from(self, dst: int, data: Any, *, wp: bool = False, dontwake: bool = False) -> int:
        """``UFFDIO_COPY`` the bytes of a buffer object (length a page multiple) to ``dst``."""
        held, addr, n = held_buffer(data, "data")
        try:
            return self.copy(dst, addr, n, wp=wp, dontwake=dontwake)
        finally:
            del held  # the export ends once the kernel has copied the bytes

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """``UFFDIO_ZEROPAGE``: map zero pages (the shared zero page on private anon)."""
        s, n = _range("UFFDIO_ZEROPAGE", start, length)
        mode = U.ZeropageMode.DONTWAKE if dontwake else 0
        arg = U.uffdio_zeropage(U.uffdio_range(s, n), mode, 0)
        return self._resolve(U.UFFDIO_ZEROPAGE, arg, "zeropage", "UFFDIO_ZEROPAGE", s, n)

    def continue_(self, start: int, length: int, *, wp: bool = False, dontwake: bool = False) -> int:
        """``UFFDIO_CONTINUE``: map existing page-cache pages (MINOR faults; 5.13)."""
        s, n = _range("UFFDIO_CONTINUE", start, length)
        mode = (U.ContinueMode.WP if wp else 0) | (U.ContinueMode.DONTWAKE if dontwake else 0)
        arg = U.uffdio_continue(U.uffdio_range(s, n), mode, 0)
        return self._resolve(U.UFFDIO_CONTINUE, arg, "mapped", "UFFDIO_CONTINUE", s, n)

    def poison(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """``UFFDIO_POISON``: install poison markers; a later access raises SIGBUS (6.6)."""
        s, n = _range("UFFDIO_POISON", start, length)
        mode = U.PoisonMode.DONTWAKE if dontwake else 0
        arg = U.uffdio_poison(U.uffdio_range(s, n), mode, 0)
        return self._resolve(U.UFFDIO_POISON, arg, "updated", "UFFDIO_POISON", s, n)

    def move(
        self, dst: int, src: int, length: int, *, allow_src_holes: bool = False, dontwake: bool = False
    ) -> int:
        """``UFFDIO_MOVE`` anonymous pages from ``src`` to ``dst`` without copying (6.8).

        Only the process that owns the memory may call it (EINVAL otherwise). Errors:
        ENOENT (src hole without ``allow_src_holes``, no VMA), EEXIST (dst populated,
        including uffd-wp markers), EBUSY (src page not exclusive, e.g. after fork),
        EINVAL (shared/hugetlb VMAs, dst not registered with this uffd),
        :class:`PartialProgressError` after partial progress.
        """
        d, n = _range("UFFDIO_MOVE", dst, length, "dst")
        sr = _u64("src", src)
        mode = (U.MoveMode.ALLOW_SRC_HOLES if allow_src_holes else 0) | (U.MoveMode.DONTWAKE if dontwake else 0)
        arg = U.uffdio_move(d, sr, n, mode, 0)
        try:
            return self._resolve(U.UFFDIO_MOVE, arg, "move", "UFFDIO_MOVE", d, n)
        except OSError as err:
            if err.errno in (errno.ENOTTY, errno.EINVAL) and not (_probe.uffd_api().features & UffdFeature.MOVE):
                raise feature_error(err.errno or errno.EINVAL, ["UFFDIO_MOVE"]) from err
            raise

    def wake(self, start: int, length: int) -> None:
        """``UFFDIO_WAKE`` threads waiting on faults in the range."""
        s, n = _range("UFFDIO_WAKE", start, length)
        arg = U.uffdio_range(s, n)
        try:
            self._ioctl(U.UFFDIO_WAKE, arg)
        except OSError as err:
            raise with_context(err, f"UFFDIO_WAKE of [{s:#x}, {s + n:#x})" + _range_hint(s, n, err)) from None

    def _resolve(self, request: int, arg: ctypes.Structure, field: str, name: str, dst: int, length: int) -> int:
        setattr(arg, field, 0)
        try:
            self._ioctl(request, arg)
        except OSError as err:
            if err.errno == errno.EAGAIN:
                done = int(getattr(arg, field))
                raise PartialProgressError(max(done, 0), name) from None
            raise with_context(err, f"{name} to [{dst:#x}, {dst + length:#x})" + _range_hint(dst, length, err)
                                    + _RESOLVE_HINTS.get(err.errno or 0, "")) from None
        return length

    # -- events ---------------------------------------------------------------------

    def read_events(self, timeout: float | None = 0, max_events: int = 64) -> list[UffdEvent]:
        """Wait up to ``timeout`` seconds (``None``: forever) and read pending messages.

        Returns a possibly empty list (empty on timeout or EAGAIN). Reads up to
        ``max_events`` (1 to 65536) messages with one ``read``. Needs a non-blocking fd
        for a timeout other than ``None``.

        Raises:
            TypeError, ValueError: ``timeout`` not a number of seconds from 0 to
                ``MAX_TIMEOUT`` (about 24.8 days, what ``poll`` can wait; NaN and
                infinity too: pass ``None`` to wait forever); ``max_events`` not an int
                in range. Checked before waiting.
        """
        ms = -1
        if timeout is not None:
            if not isinstance(timeout, numbers.Real) or isinstance(timeout, (bool, np.bool_)):
                # (int, float, numpy scalars, Fraction; True is not a number of seconds)
                raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
            try:
                seconds = float(timeout)
            except OverflowError:  # an int beyond a float's range
                seconds = math.inf
            if not 0 <= seconds <= MAX_TIMEOUT:  # also NaN
                raise ValueError(f"timeout must be between 0 and {MAX_TIMEOUT} seconds (None waits forever), "
                                 f"got {timeout}")
            ms = int(math.ceil(seconds * 1000))
        max_events = u64("max_events", max_events)
        if not 1 <= max_events <= 65536:
            raise ValueError(f"max_events must be between 1 and 65536, got {max_events}")
        data = self._use(self._read, timeout is not None, ms, max_events)
        return parse_uffd_msgs(data) if data else []

    def _read(self, fd: int, timed: bool, ms: int, max_events: int) -> bytes:
        """:meth:`read_events`' wait and read, with ``fd`` held in use."""
        if timed or not os.get_blocking(fd):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if ms:  # a wait: close() from elsewhere ends it (through a pipe it writes to)
                if not self._wake:
                    self._wake.extend(os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK))
                poller.register(self._wake[0], select.POLLIN)
                if self._fd < 0:  # closed before the pipe was there to be written to
                    raise self._closed_error()
            ready = dict(poller.poll(ms))  # (retried after a signal handler: the number stays ours)
            if self._fd < 0:
                raise self._closed_error(" (closed while waiting)")
            events = ready.get(fd, 0)
            if not events:
                return b""
            if events & select.POLLERR:
                raise OSError(errno.EINVAL, "poll on userfaultfd gave POLLERR (a blocking fd cannot be polled)")
        try:
            data = os.read(fd, _MSG_SIZE * max_events)
        except BlockingIOError:
            return b""
        if self._fd < 0 and not data:  # the placeholder's end of file
            raise self._closed_error()
        return data


def _range_hint(start: int, length: int, err: OSError) -> str:
    """For EINVAL: say so if the range breaks the kernel's ``validate_range`` rules."""
    if err.errno != errno.EINVAL:
        return ""
    if why := unaligned("start", start, _P):
        return f" ({why})"
    if why := unaligned("length", length, _P):
        return f" ({why})"
    return " (length 0)" if length == 0 else ""


#: What an errno from UFFDIO_REGISTER usually means (docs/kernel-facts.md, userfaultfd).
_REGISTER_HINTS = {
    errno.EBUSY: " (already registered with another userfaultfd)",
    errno.EPERM: " (a mapping in range can never be written, e.g. a shared mapping of a read-only file)",
    errno.EINVAL: " (no mapping in range, or memory this mode cannot register)",
}
#: What an errno from COPY/ZEROPAGE/CONTINUE/POISON/MOVE usually means.
_RESOLVE_HINTS = {
    errno.ENOENT: " (the destination is not in a range registered with a userfaultfd, or, for MOVE, "
                  "the source has a hole)",
    errno.EEXIST: " (a destination page is already populated)",
    errno.EBUSY: " (a source page is not exclusively owned by this process, e.g. shared after fork)",
    errno.EFAULT: " (the source memory is not readable)",
}


Userfaultfd.__module__ = "pagescan"


def _feature_error(requested: int) -> KernelFeatureError | None:
    """A KernelFeatureError naming requested features this kernel lacks, if any."""
    probe = _probe.uffd_api()
    if not requested or not probe.available:
        return None
    missing = requested & ~int(probe.features)
    if not missing:
        return None
    known = {int(f): name for name, f in UffdFeature.__members__.items()}
    names = [f"UFFD_FEATURE_{known[1 << b]}" if (1 << b) in known else f"unknown feature bit {b}"
             for b in range(64) if missing >> b & 1]
    return feature_error(errno.EINVAL, names)


#: Every open Userfaultfd of this process (for the after-fork reset).
_live: weakref.WeakSet[Userfaultfd] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for uf in list(_live):
        uf._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
