"""``FdHolder``: an owned file descriptor, after trio's ``_FdHolder``.

``_fd`` is -1 once closed; ``close()`` is idempotent; ``fileno()`` makes the object
usable with ``select``/``poll``; ``__del__`` closes a forgotten fd without raising.
"""

from __future__ import annotations

import os
from typing import TypeVar

__all__ = ["FdHolder"]

_T = TypeVar("_T", bound="FdHolder")


class FdHolder:
    __slots__ = ("_fd",)

    _fd: int
    #: Name used in "I/O operation on closed ..." errors.
    _what = "file"

    @property
    def fd(self) -> int:
        fd = self._fd
        if fd < 0:
            raise self._closed_error()
        return fd

    def _closed_error(self, detail: str = "") -> ValueError:
        """The error of a use after ``close()`` (``detail``: appended)."""
        return ValueError(f"I/O operation on closed {self._what}{detail}")

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._closing()
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership of the fd and return it."""
        fd, self._fd = self.fd, -1
        return fd

    def _closing(self) -> None:
        """Hook: runs in ``close()`` just before the fd is closed."""

    def _finalize(self) -> None:
        """Hook: runs in ``__del__`` whether or not the fd is still open."""

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        try:
            self._finalize()
        except Exception:  # interpreter shutdown
            pass
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
