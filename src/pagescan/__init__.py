"""pagescan: page-level tracking and inspection of Linux process memory.

``scan()`` exposes ``PAGEMAP_SCAN`` (Linux 6.7) with the kernel's own argument names;
``scan_iter()`` walks a whole range; ``capabilities()`` probes the kernel;
``Userfaultfd`` wraps userfaultfd (write-protect, COPY, ZEROPAGE, CONTINUE, POISON,
MOVE and fault events).
"""

from __future__ import annotations

from ._errors import KernelFeatureError, PartialProgressError
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
from .capabilities import Capabilities, capabilities
from ._scan import PageRegion, ScanResult, buffer_range, masks, scan, scan_iter
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

__version__ = "0.1.0"

__all__ = [
    "MADV",
    "PAGE_REGION_DTYPE",
    "PM_SCAN_CHECK_WPASYNC",
    "PM_SCAN_WP_MATCHING",
    "Capabilities",
    "Category",
    "ForkEvent",
    "KernelFeatureError",
    "PageRegion",
    "PagefaultEvent",
    "PagefaultFlag",
    "PartialProgressError",
    "RegisterMode",
    "RemapEvent",
    "RemoveEvent",
    "ScanFlag",
    "ScanResult",
    "Target",
    "UffdEventType",
    "UffdFeature",
    "UffdIoctl",
    "UnknownEvent",
    "UnmapEvent",
    "Userfaultfd",
    "buffer_range",
    "capabilities",
    "masks",
    "parse_uffd_msgs",
    "scan",
    "scan_iter",
]

for _name in ("Category", "ScanFlag", "PageRegion", "ScanResult", "Capabilities", "UffdFeature",
              "UffdIoctl", "RegisterMode", "PagefaultFlag", "UffdEventType", "PagefaultEvent",
              "ForkEvent", "RemapEvent", "RemoveEvent", "UnmapEvent", "UnknownEvent"):
    globals()[_name].__module__ = "pagescan"
del _name
