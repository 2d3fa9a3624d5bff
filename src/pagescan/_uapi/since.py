"""Which kernel release brought each interface pagescan uses.

The one table every "needs Linux X" message is read from (:func:`since`); no release
number is written anywhere else. Category bits and userfaultfd feature bits have their
own tables next to their definitions (:data:`.pagemap.CATEGORY_SINCE`,
:data:`.userfaultfd.FEATURE_SINCE`); :func:`since` reads those too.
"""

from __future__ import annotations

from .pagemap import CATEGORY_SINCE, Category
from .userfaultfd import FEATURE_SINCE, UffdFeature

__all__ = ["INTERFACE_SINCE", "latest", "since"]

#: Interfaces that are not a single category or feature bit.
INTERFACE_SINCE: dict[str, str] = {
    "userfaultfd": "4.3",
    "UFFDIO_WRITEPROTECT": "5.7",
    "UFFD_USER_MODE_ONLY": "5.11",
    "UFFDIO_CONTINUE": "5.13",
    "/dev/userfaultfd": "6.1",
    "UFFDIO_POISON": "6.6",
    "PAGEMAP_SCAN": "6.7",
    "UFFDIO_MOVE": "6.8",
    "PROCMAP_QUERY": "6.11",
    "MADV_GUARD_INSTALL": "6.13",
}


def since(name: str) -> str | None:
    """The first release with ``name``: an interface (``"PAGEMAP_SCAN"``), a category
    (``"PAGE_IS_GUARD"``) or a userfaultfd feature (``"UFFD_FEATURE_MOVE"``)."""
    if name in INTERFACE_SINCE:
        return INTERFACE_SINCE[name]
    if name.startswith("PAGE_IS_"):
        cat = Category.__members__.get(name[len("PAGE_IS_"):])
        return CATEGORY_SINCE.get(cat) if cat is not None else None
    if name.startswith("UFFD_FEATURE_"):
        feat = UffdFeature.__members__.get(name[len("UFFD_FEATURE_"):])
        return FEATURE_SINCE.get(feat) if feat is not None else None
    return None


def _key(release: str) -> tuple[int, ...]:
    return tuple(int(x) for x in release.split("."))


def latest(names: list[str]) -> str | None:
    """The newest release among those that brought ``names`` (``None`` if none is known)."""
    known = [v for v in (since(n) for n in names) if v is not None]
    return max(known, key=_key) if known else None
