"""Raw kernel ABI: structs, ioctl numbers and constants, mirrored literally.

One module per kernel interface:

* :mod:`._ioc` -- the ``_IOC`` encoding used to compute ioctl numbers.
* :mod:`.libc` -- the one place that calls libc / raw syscalls, and its errno policy.
* :mod:`.mman` -- ``mmap``/``madvise`` constants (``include/uapi/asm-generic/mman*.h``).
* :mod:`.procfs` -- ``PROCMAP_QUERY`` on ``/proc/PID/maps`` (``include/uapi/linux/fs.h``).
* :mod:`.pagemap` -- ``PAGEMAP_SCAN`` (``include/uapi/linux/fs.h``) and the
  ``/proc/PID/pagemap`` entry bits (``Documentation/admin-guide/mm/pagemap.rst``).
* :mod:`.userfaultfd` -- ``include/uapi/linux/userfaultfd.h``.

Nothing here is public API: :mod:`pagescan` re-exports what users need.
"""
