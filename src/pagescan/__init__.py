"""pagescan: page-level tracking and inspection of Linux process memory.

``scan()`` exposes ``PAGEMAP_SCAN`` (Linux 6.7) with the kernel's own argument names;
``scan_iter()`` walks a whole range; ``capabilities()`` probes the kernel;
``Userfaultfd`` wraps userfaultfd (write-protect, COPY, ZEROPAGE, CONTINUE, POISON,
MOVE and fault events).
"""

from __future__ import annotations

from ._errors import InvalidArgumentError, KernelFeatureError, PartialProgressError, UnknowablePagesError
from ._target import Target
from ._uapi.mman import MADV
from ._uapi.pagemap import (
    PAGE_REGION_DTYPE,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    Category,
    ScanFlag,
)
from ._uapi.userfaultfd import PagefaultFlag, RegisterMode, UffdEventType, UffdFeature, UffdIoctl
from .arrays import empty, empty_like, zeros, zeros_like
from .capabilities import Capabilities, capabilities
from ._scan import PageRegion, Scanner, ScanResult, buffer_range, masks, scan, scan_iter
from .handler import FaultHandler, FileSource, Source
from .move import MoveResult, move_pages
from .userfaultfd import (
    ForkEvent,
    PagefaultEvent,
    RemapEvent,
    RemoveEvent,
    UnknownEvent,
    UnmapEvent,
    Userfaultfd,
    parse_uffd_msgs,
)
from .writewatch import WriteWatch, regions_to_pages

__version__ = "0.2.0.dev0"

__all__ = [
    "MADV",
    "PAGE_REGION_DTYPE",
    "PM_SCAN_CHECK_WPASYNC",
    "PM_SCAN_WP_MATCHING",
    "Capabilities",
    "Category",
    "FaultHandler",
    "FileSource",
    "ForkEvent",
    "InvalidArgumentError",
    "KernelFeatureError",
    "MoveResult",
    "PageRegion",
    "PagefaultEvent",
    "PagefaultFlag",
    "PartialProgressError",
    "RegisterMode",
    "RemapEvent",
    "RemoveEvent",
    "ScanFlag",
    "ScanResult",
    "Scanner",
    "Source",
    "Target",
    "UffdEventType",
    "UffdFeature",
    "UffdIoctl",
    "UnknowablePagesError",
    "UnknownEvent",
    "UnmapEvent",
    "Userfaultfd",
    "WriteWatch",
    "buffer_range",
    "capabilities",
    "empty",
    "empty_like",
    "masks",
    "move_pages",
    "parse_uffd_msgs",
    "regions_to_pages",
    "scan",
    "scan_iter",
    "zeros",
    "zeros_like",
]

for _name in ("MADV", "Category", "ScanFlag", "PageRegion", "ScanResult", "Capabilities", "UffdFeature",
              "UffdIoctl", "RegisterMode", "PagefaultFlag", "UffdEventType", "PagefaultEvent",
              "ForkEvent", "RemapEvent", "RemoveEvent", "UnmapEvent", "UnknownEvent", "MoveResult", "WriteWatch", "FaultHandler", "FileSource", "Scanner", "Source"):
    globals()[_name].__module__ = "pagescan"
del _name
