"""The one contract both scan backends implement, and the choice between them.

httpx-style: one small interface (:class:`Backend`), one request type, chosen once.
The request is the kernel's own ``struct pm_scan_arg`` (:class:`~._uapi.pagemap.pm_scan_arg`,
kernel field names): ``vec``/``vec_len`` describe ``out``, the array that receives the
regions (``out`` is ``None`` when ``vec_len`` is 0). A backend returns ``(regions
written, walk_end)`` with the *documented* ``walk_end`` (the kernel's stale value
corrected) and raises ``OSError`` with the kernel's errno and a message naming the
argument -- the same errno for the same bad input on both backends.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional, Protocol

# Imported with the package (about 2 ms), not at the first scan: a scan from a signal
# handler that interrupts the first scan's import of it would find the module half
# initialized (ImportError). The emulation is still loaded on first use.
from ._backend_kernel import KernelBackend

if TYPE_CHECKING:
    import numpy as np

    from ._target import Target
    from ._uapi.pagemap import pm_scan_arg

__all__ = ["BACKENDS", "Backend", "Runner", "fall_back", "kernel_missing", "pick", "prepare"]

BACKENDS = ("auto", "kernel", "emulated")


class Backend(Protocol):
    """A ``PAGEMAP_SCAN`` implementation."""

    name: str

    def scan(self, target: Target, arg: pm_scan_arg, out: np.ndarray | None) -> tuple[int, int]:
        """Run one call; ``out[:arg.vec_len]`` may be written. ``(n, walk_end)``."""
        ...


#: A prepared call: ``run(target, start, end, vec, vec_len, max_pages, out) -> (n,
#: walk_end)`` with the flags and masks fixed; ``vec`` is ``out``'s address (0 with
#: ``vec_len`` 0). Reentrant: every call takes its own request struct.
Runner = Callable[["Target", int, int, int, int, int, Optional["np.ndarray"]], "tuple[int, int]"]


def prepare(impl: Backend, flags: int, inverted: int, mask: int, anyof: int, return_mask: int) -> Runner:
    """A :data:`Runner` for ``impl`` (the kernel backend's own when it has one: it packs
    the request with ``struct`` rather than through ctypes field setters)."""
    own: Callable[[int, int, int, int, int], Runner] | None = getattr(impl, "prepare", None)
    if own is not None:
        return own(flags, inverted, mask, anyof, return_mask)
    from ._uapi.pagemap import pm_scan_arg

    free: list[pm_scan_arg] = []  # spare request structs: list pop/append are atomic
    scan = impl.scan

    def run(target: Target, start: int, end: int, vec: int, vec_len: int, max_pages: int,
            out: np.ndarray | None) -> tuple[int, int]:
        try:
            arg = free.pop()
        except IndexError:
            arg = pm_scan_arg(96, flags, 0, 0, 0, 0, 0, 0, inverted, mask, anyof, return_mask)
        arg.start, arg.end, arg.walk_end, arg.vec, arg.vec_len, arg.max_pages = start, end, 0, vec, vec_len, max_pages
        try:
            return scan(target, arg, out)
        finally:
            free.append(arg)

    return run


_backends: dict[str, Backend] = {}
_env: str | None = None
#: Set once the kernel answered ENOTTY: "auto" then means the emulation.
_kernel_missing = False


def _get(name: str) -> Backend:
    """The backend ``name``, loaded on first use. No lock around the load: a scan from a
    signal handler or a finalizer that runs meanwhile in the same thread would wait for
    it for good. Two threads loading at once each make one (stateless, cheap); the
    first stored is kept."""
    impl = _backends.get(name)
    if impl is None:
        if name == "kernel":
            impl = KernelBackend()
        else:
            from ._backend_emulated import EmulatedBackend

            impl = EmulatedBackend()
        impl = _backends.setdefault(name, impl)  # atomic
    return impl


def _env_choice() -> str:
    global _env
    if _env is None:
        env = os.environ.get("PAGESCAN_BACKEND", "") or "auto"
        if env not in BACKENDS:
            raise ValueError(f"PAGESCAN_BACKEND must be one of {BACKENDS}, not {env!r}")
        _env = env
    return _env


def pick(backend: str) -> tuple[Backend, bool]:
    """``(implementation, may_fall_back)`` for a ``backend=`` argument. ``"auto"`` is
    the environment variable ``PAGESCAN_BACKEND`` (read once) or, by default, the
    kernel -- falling back to the emulation if the ioctl turns out to be missing."""
    if backend == "auto":
        backend = _env_choice()
        if backend == "auto":
            return _get("emulated" if _kernel_missing else "kernel"), not _kernel_missing
    if backend in ("kernel", "emulated"):
        return _get(backend), False
    raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")


def kernel_missing() -> bool:
    """Whether "auto" has switched to the emulation (the ioctl answered ENOTTY)."""
    return _kernel_missing


def fall_back() -> Backend:
    """The kernel answered ENOTTY under "auto": use (and from now on pick) the emulation."""
    global _kernel_missing
    _kernel_missing = True
    return _get("emulated")
