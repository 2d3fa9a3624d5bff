"""What this process registered with userfaultfd through pagescan.

The emulated backend needs to know whether a VMA registered for uffd-WP (smaps ``uw``)
belongs to an *asynchronous* uffd (``PAGE_IS_WPALLOWED``); smaps does not say. pagescan's
own :class:`~pagescan.Userfaultfd` records its registrations here, so the emulation can
answer exactly for them.
"""

from __future__ import annotations

import threading

from ._uapi.userfaultfd import UffdFeature

__all__ = ["wp_async_registry"]


class _Registry:
    """uffd registrations this process made through pagescan's :class:`Userfaultfd`.

    Per uffd (keyed by the owning object's id): the ranges it registered, with whether
    the mode included WP, and whether the uffd is asynchronous (``WP_ASYNC``). A
    successful ``UFFDIO_REGISTER`` makes every VMA of its range that uffd's, in that
    mode (another uffd's registration there would have failed with EBUSY), so it replaces
    whatever was recorded for the range before.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()  # re-entered by a signal handler that registers: no deadlock
        self.spans: list[tuple[int, int, int, bool]] = []  # (start, end, key, wp)
        self.wp_async: dict[int, bool] = {}  # key -> the uffd is asynchronous

    @staticmethod
    def _cut(spans: list[tuple[int, int, int, bool]], start: int, end: int,
             key: int | None) -> list[tuple[int, int, int, bool]]:
        kept = []
        for s, e, k, wp in spans:
            if e <= start or s >= end or (key is not None and k != key):
                kept.append((s, e, k, wp))
                continue
            if s < start:
                kept.append((s, start, k, wp))
            if e > end:
                kept.append((end, e, k, wp))
        return kept

    def add(self, key: int, start: int, end: int, *, wp: bool, fd: int | None = None,
            wp_async: bool | None = None) -> None:
        """Record a successful registration of ``[start, end)`` by uffd ``key``.

        Whether the uffd is asynchronous is ``wp_async`` if given, else read once per uffd
        from the kernel (``/proc/self/fdinfo/FD``: ``API:\t<api>:<features>:<ioctls>``,
        the features the handshake enabled -- exact even for an adopted fd). If it
        cannot be known, the range is only forgotten."""
        if end <= start:
            return
        with self.lock:
            known = self.wp_async.get(key)
        if wp_async is None:
            wp_async = known if known is not None else _fd_wp_async(fd)
        with self.lock:
            spans = self._cut(self.spans, start, end, None)
            if wp_async is not None:
                spans.append((start, end, key, wp))
                spans.sort()
                self.wp_async[key] = wp_async
            self.spans = spans

    def remove(self, key: int, start: int | None = None, end: int | None = None) -> None:
        """Forget uffd ``key``'s registrations in ``[start, end)`` (all of them by default)."""
        with self.lock:
            if start is None or end is None:
                self.spans = [t for t in self.spans if t[2] != key]
                self.wp_async.pop(key, None)
            else:
                self.spans = self._cut(self.spans, start, end, key)

    def lookup(self, start: int, end: int) -> bool | None:
        """For a VMA ``[start, end)`` registered for uffd-WP: whether its uffd is
        asynchronous, if one recorded WP registration by a single uffd covers it all;
        ``None`` if the record does not tell."""
        with self.lock:
            spans = [t for t in self.spans if t[1] > start and t[0] < end]
            keys = {t[2] for t in spans}
            if len(keys) != 1 or not all(t[3] for t in spans):
                return None
            cur = start
            for s, e, _, _ in spans:
                if s > cur:
                    return None
                cur = max(cur, e)
            if cur < end:
                return None
            return self.wp_async.get(keys.pop())


def _fd_wp_async(fd: int | None) -> bool | None:
    """Whether uffd ``fd`` of this process has ``UFFD_FEATURE_WP_ASYNC`` enabled."""
    if fd is None or fd < 0:
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"API:"):
                    return bool(int(line.split(b":")[2], 16) & UffdFeature.WP_ASYNC)
    except (OSError, ValueError, IndexError):
        pass
    return None


#: Filled by :class:`pagescan.Userfaultfd` (its registrations, WP or not, async or not).
wp_async_registry = _Registry()
