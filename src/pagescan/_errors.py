"""Exceptions raised by pagescan.

Every kernel failure is an ``OSError`` carrying the kernel's errno, so the usual
subclasses apply (``PermissionError`` for EPERM/EACCES, ``ProcessLookupError`` for
ESRCH, ``FileExistsError`` for EEXIST, ``BlockingIOError`` for EAGAIN, ...). pagescan
adds meaning by subclassing, never by replacing the errno::

    OSError
     ├── KernelFeatureError        a kernel interface or flag this kernel lacks
     │                             (errno ENOTTY, EINVAL, ENOSYS or EOPNOTSUPP as the
     │                             kernel gave it; names the release that brings it)
     ├── InvalidArgumentError      (EINVAL, also a ValueError) an argument the kernel
     │                             would refuse, caught before the syscall: an
     │                             unaligned address, an empty or wrapping range
     └── BlockingIOError (EAGAIN)
          └── PartialProgressError a userfaultfd operation stopped part-way; ``done``
                                   bytes were processed, retry the remainder

``ValueError``/``TypeError`` are raised only for bad Python arguments (a negative
address, a non-integer, a value over 64 bits, an output array of the wrong shape),
before any syscall. What the kernel itself would refuse (an unaligned address, an
empty range) is reported as the kernel reports it, ``OSError`` with its errno --
:class:`InvalidArgumentError` when pagescan catches it first -- and every such error
says which call and which argument (:func:`with_context`).

``CheckpointError`` (:mod:`pagescan.snapshot`) is a ``ValueError``: a file that is not
a usable checkpoint; ``CorruptCheckpointError`` below it names the damaged part.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["InvalidArgumentError", "KernelFeatureError", "PartialProgressError", "UnknowablePagesError", "feature_error",
           "with_context"]


class KernelFeatureError(OSError):
    """A kernel feature pagescan needs is missing.

    Attributes:
        feature: what is missing, e.g. ``"PAGEMAP_SCAN"`` or ``"UFFD_FEATURE_MOVE"``.
        since: the first kernel release that has it (``"6.7"``), or ``None``.
    """

    feature: str
    since: str | None

    def __init__(self, err: int, feature: str, since: str | None = None, detail: str = "") -> None:
        msg = f"{feature} is not available on this kernel ({os.uname().release})"
        if since:
            msg += f"; it needs Linux {since} or later"
        if detail:
            msg += f": {detail}"
        super().__init__(err, msg)
        self.feature = feature
        self.since = since

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_feature_error, (self.errno, self.feature, self.since, self.strerror))


def _rebuild_feature_error(err: int, feature: str, since: str | None, msg: str) -> KernelFeatureError:
    exc = KernelFeatureError(err, feature, since)
    exc.strerror = msg
    exc.args = (err, msg)
    return exc


class UnknowablePagesError(PermissionError):
    """``PermissionError(EPERM)`` of the emulated backend: ``categories`` (PFNZERO, HUGE)
    would change the answer and cannot be known without the privilege to read PFNs
    (``CAP_SYS_ADMIN``) or ``/proc/kpageflags`` (root). A scan that leaves them out of
    its masks can be answered."""

    def __init__(self, categories: int, message: str) -> None:
        super().__init__(_errno.EPERM, message)
        self.categories = categories

    def __reduce__(self) -> tuple[type[UnknowablePagesError], tuple[int, str]]:
        return (type(self), (self.categories, self.strerror or ""))


class InvalidArgumentError(OSError, ValueError):
    """``OSError(EINVAL)`` for an argument the kernel would refuse, raised before the
    syscall with a message naming it. Also a ``ValueError``, so either handler works."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, f"{os.strerror(_errno.EINVAL)}: {message}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_invalid, (self.strerror,))


def _rebuild_invalid(msg: str) -> InvalidArgumentError:
    exc = InvalidArgumentError("")
    exc.strerror = msg
    exc.args = (_errno.EINVAL, msg)
    return exc


def feature_error(err: int, names: list[str], detail: str = "") -> KernelFeatureError:
    """The :class:`KernelFeatureError` for missing ``names`` (interfaces, ``PAGE_IS_*``
    or ``UFFD_FEATURE_*``), naming the newest release among them (``_uapi.since``)."""
    from ._uapi.since import latest

    return KernelFeatureError(err, " | ".join(names), latest(names), detail)


def with_context(err: OSError, context: str) -> OSError:
    """The same kind of error (same class, same errno) with ``context`` -- which call,
    which argument -- added to its message; for ``raise with_context(e, ...) from e``."""
    if isinstance(err, (KernelFeatureError, PartialProgressError, InvalidArgumentError, UnknowablePagesError)):
        return err  # already says what it is about
    text = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    new = OSError(err.errno, f"{text}: {context}") if err.errno is not None else type(err)(f"{err}: {context}")
    if type(new) is not type(err):  # a subclass OSError() would not pick (e.g. our own)
        try:
            new = type(err)(err.errno, f"{text}: {context}")
        except TypeError:
            return err
    return new


class PartialProgressError(BlockingIOError):
    """A userfaultfd resolution ioctl returned EAGAIN after processing ``done`` bytes.

    The kernel reports why it stopped only as EAGAIN (the real cause is lost); retry
    ``[start + done, start + length)`` to continue or to see the underlying error.
    ``done`` is 0 when the mm was changing (a non-cooperative event is pending).
    """

    done: int

    def __init__(self, done: int, operation: str) -> None:
        super().__init__(
            _errno.EAGAIN,
            f"{operation} stopped after {done} bytes ({os.strerror(_errno.EAGAIN)}); retry the rest",
        )
        self.done = done

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_partial, (self.done, self.strerror))


def _rebuild_partial(done: int, msg: str) -> PartialProgressError:
    exc = PartialProgressError(done, "")
    exc.strerror = msg
    exc.args = (_errno.EAGAIN, msg)
    return exc


for _cls in (InvalidArgumentError, KernelFeatureError, PartialProgressError, UnknowablePagesError):
    _cls.__module__ = "pagescan"
