"""``ptrace(2)`` and ``prctl(2)`` constants used to stop a process's threads
(``include/uapi/linux/ptrace.h``, ``include/uapi/linux/prctl.h``, ``include/uapi/linux/wait.h``).

Values are the generic ones (every architecture pagescan runs on).
"""

from __future__ import annotations

import enum

__all__ = ["PR_SET_PTRACER", "PTRACE", "PTRACE_EVENT_CLONE", "PTRACE_EVENT_STOP", "PTRACE_O", "WALL"]


class PTRACE(enum.IntEnum):
    CONT = 7
    DETACH = 17
    SEIZE = 0x4206
    INTERRUPT = 0x4207


class PTRACE_O(enum.IntFlag):
    TRACECLONE = 0x08  #: auto-attach threads cloned by a tracee (they start in PTRACE_EVENT_STOP)


#: ``status >> 16`` of a stop caused by ``PTRACE_INTERRUPT`` (or a group stop) of a seized tracee.
PTRACE_EVENT_STOP = 128
#: ``status >> 16`` of the stop of a tracee that just cloned a thread (with ``TRACECLONE``).
PTRACE_EVENT_CLONE = 3

#: ``prctl(PR_SET_PTRACER, pid)``: Yama's exception letting ``pid`` trace us (``ptrace_scope`` 1).
PR_SET_PTRACER = 0x59616D61

#: ``waitpid`` option ``__WALL``: wait for threads (clone children) too, as a tracer must.
WALL = 0x40000000
