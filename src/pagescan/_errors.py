"""Exceptions raised by pagescan.

Every kernel failure is an ``OSError`` carrying the kernel's errno, so the usual
subclasses apply (``PermissionError`` for EPERM/EACCES, ``ProcessLookupError`` for
ESRCH, ``FileExistsError`` for EEXIST, ``BlockingIOError`` for EAGAIN, ...). pagescan
adds meaning by subclassing, never by replacing the errno::

    OSError
     ├── KernelFeatureError        a kernel interface or flag this kernel lacks
     │                             (errno ENOTTY, EINVAL, ENOSYS or EOPNOTSUPP as the
     │                             kernel gave it; names the release that brings it)
     └── BlockingIOError (EAGAIN)
          └── PartialProgressError a userfaultfd operation stopped part-way; ``done``
                                   bytes were processed, retry the remainder

``ValueError``/``TypeError`` are raised only for bad Python arguments (a negative
address, a non-integer), before any syscall.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["KernelFeatureError", "PartialProgressError"]


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


for _cls in (KernelFeatureError, PartialProgressError):
    _cls.__module__ = "pagescan"
