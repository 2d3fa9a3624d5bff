"""Readers for ``/proc/PID/maps`` and ``/proc/PID/smaps``, and ``PROCMAP_QUERY``.

``maps`` is cheap (no page-table walk). ``smaps`` walks the page tables of every VMA it
shows to count RSS -- for a populated VMA that costs more than reading its pagemap -- so
callers read it only when they need ``VmFlags`` or per-VMA counters, and only as far as
they need: the kernel generates smaps one VMA record at a time, in address order, as the
reader asks for more, so a reader that stops early never walks the VMAs above where it
stopped (:class:`SmapsStream`). It cannot skip the VMAs *below* a range: seeking a
seq_file regenerates every record before the offset. ``PROCMAP_QUERY`` (Linux 6.11,
:func:`query_maps`) finds the VMAs of a range by address, without formatting maps below
it; it shows no ``VmFlags`` beyond the permissions.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import errno
import functools
import mmap
import os
import platform

from ._uapi import libc
from ._uapi.procfs import PROCMAP_QUERY, ProcmapQueryFlag, procmap_query

__all__ = ["SmapsStream", "Vma", "mem_available", "query_maps", "read_maps", "read_smaps", "task_size"]

_PAGE_SIZE = mmap.PAGESIZE


@dataclasses.dataclass
class Vma:
    """One line of maps, plus the smaps fields when they were read."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    name: str
    #: smaps ``VmFlags`` two-letter codes (empty if smaps was not read)
    vmflags: frozenset[str] = frozenset()
    #: smaps ``kB`` fields, in bytes (empty if smaps was not read)
    fields: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def shared(self) -> bool:
        return self.perms[3:4] == "s"

    @property
    def anonymous(self) -> bool:
        """Private anonymous memory: the kernel's ``vma_is_anonymous``.

        maps names such VMAs ``""``, ``[heap]``, ``[stack]`` (``[stack:TID]`` before 4.5)
        or ``[anon:NAME]`` (``PR_SET_VMA_ANON_NAME``), with inode 0. ``MAP_PRIVATE`` of
        ``/dev/zero`` keeps the file for ``/proc`` but is set up as anonymous memory.
        Every other bracketed name is a special mapping (``[vdso]``, ``[vvar]``,
        ``[uprobes]``, ...), not anonymous memory; shared anonymous memory is shmem
        (``/dev/zero (deleted)``). Such VMAs are never hugetlb and never ``VM_PFNMAP``.
        """
        if self.shared:
            return False
        name = self.name
        if self.inode == 0:
            return name in ("", "[heap]", "[stack]") or name.startswith(("[anon:", "[stack:"))
        return name == "/dev/zero"

    @property
    def hugetlb(self) -> bool:
        return "ht" in self.vmflags

    @property
    def kernel_page_size(self) -> int:
        return self.fields.get("KernelPageSize", 0)

    @property
    def pmd_mapped(self) -> int:
        """Bytes mapped by PMD-level THPs (anon, shmem and file)."""
        f = self.fields
        return f.get("AnonHugePages", 0) + f.get("ShmemPmdMapped", 0) + f.get("FilePmdMapped", 0)


def _path(pid: int, name: str) -> str:
    return f"/proc/{pid}/{name}"


def _open_fd(pid: int, name: str) -> int:
    path = _path(pid, name)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process with pid {pid}") from None
    except PermissionError as err:
        raise PermissionError(err.errno, f"may not read {path} (needs ptrace read access)") from None


def _open(pid: int, name: str) -> bytes:
    """The whole file, read to its end."""
    return _read(pid, name, one_piece=False)


def _open_small(pid: int, name: str) -> bytes:
    """A small file the kernel writes in one piece (``smaps_rollup`` and ``status`` are
    one-record seq files, ``cmdline`` and ``comm`` plain reads): a read shorter than
    asked for is the end, so it takes one ``read``, not two. Not for ``smaps`` or
    ``maps``: a seq file of many records returns short reads before its end."""
    return _read(pid, name, one_piece=True)


def _read(pid: int, name: str, *, one_piece: bool) -> bytes:
    fd = _open_fd(pid, name)
    try:
        chunks: list[bytes] = []
        while True:
            data = os.read(fd, 1 << 16)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            if one_piece and len(data) < 1 << 16:
                return b"".join(chunks)
    except PermissionError as err:  # the ptrace check is made at read time too
        raise PermissionError(err.errno, f"may not read {_path(pid, name)} (needs ptrace read access)") from None
    finally:
        os.close(fd)


def read_maps_text(pid: int, end: int = 1 << 64) -> bytes:
    """``/proc/PID/maps`` as far as the first VMA at or above ``end`` (the kernel
    generates maps as it is read, so the VMAs above are never formatted)."""
    fd = _open_fd(pid, "maps")
    buf = bytearray()
    try:
        while True:
            data = os.read(fd, 1 << 16)
            if not data:
                return bytes(buf)
            buf += data
            last_nl = buf.rfind(b"\n")
            if last_nl < 0 or end >= 1 << 64:
                continue
            line = buf[buf.rfind(b"\n", 0, last_nl) + 1 : last_nl]  # the last complete line
            dash = line.find(b"-")
            if dash > 0 and int(line[:dash], 16) >= end:
                return bytes(buf[: last_nl + 1])
    except PermissionError as err:
        raise PermissionError(err.errno, f"may not read {_path(pid, 'maps')} (needs ptrace read access)") from None
    finally:
        os.close(fd)


def _parse_header(line: bytes) -> Vma:
    parts = line.split(None, 5)
    lo, _, hi = parts[0].partition(b"-")
    return Vma(
        start=int(lo, 16),
        end=int(hi, 16),
        perms=parts[1].decode(),
        offset=int(parts[2], 16),
        dev=parts[3].decode(),
        inode=int(parts[4]),
        name=_name(parts[5]) if len(parts) > 5 else "",
    )


def _name(field: bytes) -> str:
    """A maps line's name: its leading spaces are padding, trailing ones the name's; a
    newline in a path is written as ``\\012`` (``seq_path``), read back as one, as
    ``PROCMAP_QUERY`` gives it (a name holding those four characters themselves cannot
    be told apart in maps)."""
    raw = field.lstrip()
    return os.fsdecode(raw.replace(b"\\012", b"\n") if b"\\" in raw else raw)


def _vma_end(line: bytes) -> int:
    dash = line.find(b"-")
    return int(line[dash + 1 : line.find(b" ", dash)], 16)


def maps_in_range(data: bytes, start: int, end: int) -> tuple[list[Vma], int]:
    """The VMAs of maps text ``data`` that intersect ``[start, end)``, and how many
    VMAs come before the first of them (its record's index in smaps)."""
    lines = [line for line in data.split(b"\n") if line]  # (a file name may hold a "\r": only "\n" is escaped)
    # maps is in address order: find the first VMA ending above ``start`` by bisection.
    below = bisect.bisect_right(lines, start, key=_vma_end)
    out: list[Vma] = []
    for line in lines[below:]:
        if int(line[: line.find(b"-")], 16) >= end:
            break
        out.append(_parse_header(line))
    return out, below


#: Whether ``PROCMAP_QUERY`` works here: ``None`` until tried, ``False`` once the kernel
#: said ENOTTY (before Linux 6.11 maps has no ioctl).
procmap_query_works: bool | None = None


def query_maps(pid: int, start: int, end: int) -> list[Vma] | None:
    """The VMAs of ``pid`` that intersect ``[start, end)``, one ``PROCMAP_QUERY`` ioctl
    on ``/proc/PID/maps`` each: no line of maps is generated for the VMAs below
    ``start`` (reading maps formats every one of them first). The same fields as
    :func:`read_maps`; names are not escaped (maps writes a newline in a file name as
    ``\\012``). ``None`` where the kernel has no such ioctl (Linux < 6.11): read maps.
    """
    global procmap_query_works
    if procmap_query_works is False:
        return None
    fd = _open_fd(pid, "maps")
    try:
        q = procmap_query()
        name = ctypes.create_string_buffer(_NAME_BUF)
        out: list[Vma] = []
        addr = start
        while addr < end:
            q.size = ctypes.sizeof(q)
            q.query_flags = _COVERING_OR_NEXT
            q.query_addr = addr
            q.vma_name_size = len(name)
            q.vma_name_addr = ctypes.addressof(name)
            q.build_id_size = 0
            q.build_id_addr = 0
            try:
                libc.ioctl(fd, PROCMAP_QUERY, q)
            except OSError as err:
                if err.errno == errno.ENOENT:
                    break  # no VMA at or above addr
                if err.errno == errno.ENOTTY and not out:
                    procmap_query_works = False
                    return None
                if err.errno == errno.ENAMETOOLONG:
                    name = ctypes.create_string_buffer(len(name) * 4)
                    continue
                if isinstance(err, PermissionError):
                    raise PermissionError(err.errno, f"may not read {_path(pid, 'maps')} "
                                                     "(needs ptrace read access)") from None
                if err.errno == errno.ESRCH:  # the mm is gone (exited meanwhile)
                    raise ProcessLookupError(errno.ESRCH, f"pid {pid} has no address space (it exited, or is "
                                                          "a zombie or a kernel thread)") from None
                raise
            procmap_query_works = True
            if q.vma_start >= end:
                break
            f = q.vma_flags
            perms = "".join((
                "r" if f & _R else "-", "w" if f & _W else "-", "x" if f & _X else "-", "s" if f & _S else "p",
            ))
            out.append(Vma(
                start=q.vma_start, end=q.vma_end, perms=perms, offset=q.vma_offset,
                dev=f"{q.dev_major:02x}:{q.dev_minor:02x}", inode=q.inode,
                name=name.raw[: q.vma_name_size - 1].decode(errors="replace") if q.vma_name_size else "",
            ))
            addr = q.vma_end  # a VMA reaching ``end`` is the last: no call to find none above
        return out
    finally:
        os.close(fd)


_COVERING_OR_NEXT = int(ProcmapQueryFlag.COVERING_OR_NEXT_VMA)
_R, _W, _X, _S = (int(f) for f in (ProcmapQueryFlag.VMA_READABLE, ProcmapQueryFlag.VMA_WRITABLE,
                                    ProcmapQueryFlag.VMA_EXECUTABLE, ProcmapQueryFlag.VMA_SHARED))

#: First size of the name buffer (a path can be PATH_MAX, 4096, plus " (deleted)").
_NAME_BUF = 512


def read_maps(pid: int, start: int = 0, end: int = 1 << 64) -> list[Vma]:
    """VMAs of ``pid`` that intersect ``[start, end)``, in address order."""
    return maps_in_range(read_maps_text(pid, end), start, end)[0]


#: The smaps fields :class:`SmapsStream` parses by default (what the emulation uses).
SCAN_FIELDS = ("AnonHugePages", "ShmemPmdMapped", "FilePmdMapped", "KernelPageSize")


class SmapsStream:
    """``/proc/PID/smaps`` read incrementally, one record at a time, in address order.

    :meth:`next` returns the next record that intersects ``[start, end)`` (records below
    are skipped unparsed), ``None`` once past the range or at the end. Reads are as
    small as the caller's ``read_size`` (the kernel generates records only until the
    read is filled), so stopping early leaves the VMAs above unwalked. Only the
    ``fields`` named are parsed (``None``: every ``kB`` field) plus ``VmFlags``.
    """

    __slots__ = ("_buf", "_eof", "_fd", "_pos", "end", "fields", "pid", "records_seen", "start")

    def __init__(self, pid: int, start: int = 0, end: int = 1 << 64,
                 fields: tuple[str, ...] | None = SCAN_FIELDS) -> None:
        self.pid = pid
        self.start = start
        self.end = end
        self.fields = fields
        self._buf = b""
        self._pos = 0
        self._eof = False
        #: complete records consumed so far (in range or not)
        self.records_seen = 0
        self._fd = _open_fd(pid, "smaps")

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SmapsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, size: int) -> bool:
        if self._eof or self._fd < 0:
            return False
        try:
            data = os.read(self._fd, size)
        except PermissionError as err:
            raise PermissionError(
                err.errno, f"may not read {_path(self.pid, 'smaps')} (needs ptrace read access)"
            ) from None
        if not data:
            self._eof = True
            return False
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        else:
            self._buf += data
        return True

    def _record(self, read_size: int) -> bytes | None:
        """The next complete record (ending with its ``VmFlags`` line), or ``None`` at the end."""
        while True:
            buf, pos = self._buf, self._pos
            i = buf.find(b"\nVmFlags:", pos)
            if i >= 0:
                j = buf.find(b"\n", i + 1)
                if j >= 0:
                    self._pos = j + 1
                    self.records_seen += 1
                    return buf[pos : j + 1]
            if not self._read(read_size):
                return None

    def next(self, read_size: int = 4096) -> Vma | None:
        while True:
            rec = self._record(read_size)
            if rec is None:
                return None
            nl = rec.find(b"\n")
            head = rec[:nl]
            dash = head.find(b"-")
            if int(head[dash + 1 : head.find(b" ", dash)], 16) <= self.start:
                continue
            if int(head[:dash], 16) >= self.end:
                self.close()  # nothing further is wanted: never generate it
                return None
            return self._parse(head, rec, nl)

    def _parse(self, head: bytes, rec: bytes, nl: int) -> Vma:
        vma = _parse_header(head)
        f = rec.rfind(b"\nVmFlags:")
        if f >= 0:
            vma.vmflags = frozenset(rec[f + 9 :].decode().split())
        fields = vma.fields
        if self.fields is None:
            for line in rec[nl + 1 : f if f >= 0 else len(rec)].splitlines():
                key, _, rest = line.partition(b":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == b"kB":
                    fields[key.decode()] = int(parts[0]) * 1024
        else:
            for name in self.fields:
                k = rec.find(b"\n" + name.encode() + b":")
                if k >= 0:
                    parts = rec[k + len(name) + 2 : rec.find(b"\n", k + 1)].split()
                    if len(parts) == 2 and parts[1] == b"kB":
                        fields[name] = int(parts[0]) * 1024
        return vma


def read_smaps(pid: int, start: int = 0, end: int = 1 << 64,
               fields: tuple[str, ...] | None = None) -> list[Vma]:
    """Like :func:`read_maps`, with ``VmFlags`` and the ``kB`` fields (all of them, or
    only ``fields``) filled in. Stops reading at the first VMA beyond ``end``."""
    out: list[Vma] = []
    with SmapsStream(pid, start, end, fields) as s:
        while (v := s.next(1 << 16)) is not None:
            out.append(v)
    return out


@functools.cache
def task_size() -> int:
    """Highest user address + 1 as ``access_ok`` sees it (x86-64 4/5-level, arm64 48-bit)."""
    machine = platform.machine()
    if machine == "x86_64":
        try:
            with open("/proc/cpuinfo") as f:
                la57 = " la57" in f.read(1 << 16)
        except OSError:
            la57 = False
        # 5-level paging also needs a kernel that enabled it; VmallocTotal tells.
        bits = 56 if la57 and _vmalloc_total() > (1 << 46) else 47
        return (1 << bits) - _PAGE_SIZE
    return 1 << 48


def mem_available() -> int | None:
    """Bytes this process may still allocate without swapping, as far as can be read:
    ``MemAvailable`` of ``/proc/meminfo`` (the kernel's estimate), bounded by the
    headroom (limit less usage, reclaimable file cache not counted) of every memory
    cgroup above this process, v1 or v2, as its mounts show them (a container's limit
    is not in meminfo). ``None`` if nothing can be read."""
    avail = _meminfo(b"MemAvailable:")
    for limit, usage in _cgroup_memory():
        headroom = max(limit - usage, 0)
        avail = headroom if avail is None else min(avail, headroom)
    return avail


#: The memory controller's (limit, usage, memory.stat key of reclaimable file cache)
#: under cgroup v2 and v1.
_CGROUP_V2 = ("memory.max", "memory.current", b"inactive_file")
_CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", b"total_inactive_file")


def _cgroup_mounts() -> list[tuple[str, str, str]]:
    """``(version, root, mount point)`` of the cgroup file systems that hold the memory
    controller, from ``/proc/self/mountinfo`` (``root``: the cgroup the mount shows at
    its top, ``/`` unless a container's view starts lower)."""
    found = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                head, _, tail = line.partition(b" - ")
                fields, rest = head.split(), tail.split()
                if len(fields) < 5 or len(rest) < 3:
                    continue
                root, point = fields[3].decode(errors="replace"), fields[4].decode(errors="replace")
                if rest[0] == b"cgroup2":
                    found.append(("2", root, point))
                elif rest[0] == b"cgroup" and b"memory" in rest[2].split(b","):
                    found.append(("1", root, point))
    except OSError:
        pass
    return found


def _cgroup_memory() -> list[tuple[int, int]]:
    """``(limit, usage less reclaimable file cache)`` in bytes of each memory cgroup of
    this process with a limit, from its own up to the top of the mount."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts = _cgroup_mounts()
    found = []
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and not controllers:
            version, (limit_file, usage_file, cache_key) = "2", _CGROUP_V2
        elif "memory" in controllers.split(","):
            version, (limit_file, usage_file, cache_key) = "1", _CGROUP_V1
        else:
            continue
        for v, root, point in mounts:
            if v != version:
                continue
            # The process's cgroup as seen under this mount: its path below the mount's
            # root (a container's mount may start at its own cgroup).
            rel = os.path.relpath(path or "/", root)
            if rel.startswith(".."):
                rel = "."  # outside what the mount shows: its top is the nearest we see
            level = os.path.normpath(os.path.join(point, rel))
            if not os.path.exists(os.path.join(level, usage_file)):
                continue
            while True:
                try:
                    with open(os.path.join(level, limit_file)) as f:
                        text = f.read().strip()
                    with open(os.path.join(level, usage_file)) as f:
                        usage = int(f.read())
                    if text != "max":
                        found.append((int(text), usage - _stat_value(level, cache_key)))
                except (OSError, ValueError):
                    pass  # the root has no limit file
                if level == point or len(level) <= len(point):
                    break
                level = os.path.dirname(level)
            break
    return found


def _stat_value(directory: str, key: bytes) -> int:
    """A value of ``memory.stat`` (0 if absent)."""
    try:
        with open(os.path.join(directory, "memory.stat"), "rb") as f:
            for line in f:
                name, _, value = line.partition(b" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _meminfo(key: bytes) -> int | None:
    """A ``/proc/meminfo`` field (``key`` with its colon) in bytes, ``None`` if absent."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _vmalloc_total() -> int:
    return _meminfo(b"VmallocTotal:") or 0


# -- whole-process views: smaps_rollup, command line, owner (for `pagescan stat` / `ps`) --


def read_rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup``: every field of the process's sums, sizes in bytes.

    Empty for a process without an address space (a kernel thread, a zombie). The sums
    are taken in the kernel's finer unit before rounding, so ``Pss`` can exceed the sum
    of the per-mapping smaps values (each rounded down to a KiB) by up to a KiB per
    mapping.
    """
    return parse_rollup(read_rollup_text(pid))


def read_rollup_text(pid: int) -> bytes:
    """``/proc/PID/smaps_rollup`` as the kernel wrote it: one ``open``, one ``read``
    (the kernel formats the whole record in one go), one ``close``; empty without an
    address space (a kernel thread, a zombie: the kernel refuses the open with ESRCH)."""
    try:
        fd = os.open(f"/proc/{pid}/smaps_rollup", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process with pid {pid}") from None
    except ProcessLookupError:
        return b""
    except PermissionError as err:
        raise PermissionError(err.errno, f"may not read /proc/{pid}/smaps_rollup (needs ptrace read access)") from None
    try:
        return os.read(fd, _ROLLUP_READ)
    except PermissionError as err:  # the ptrace check is made at read time too
        raise PermissionError(err.errno, f"may not read /proc/{pid}/smaps_rollup (needs ptrace read access)") from None
    finally:
        os.close(fd)


#: smaps_rollup's field names, decoded, and the index of each, by their bytes joined
#: with spaces.
_ROLLUP_KEYS: dict[bytes, tuple[list[str], dict[str, int]]] = {}

#: One read of smaps_rollup (about 1 KiB: a header and two dozen ``Name: N kB`` lines).
_ROLLUP_READ = 1 << 14


def parse_rollup(text: bytes, only: tuple[str, ...] | None = None) -> dict[str, int]:
    """The fields of smaps_rollup ``text`` (:func:`read_rollup_text`), in bytes: all of
    them, or those named in ``only`` (the ones present).

    The record is a maps-style header of six words, then ``Name: N kB`` lines: split
    into words, every third from the seventh is a name. Anything else (a field without
    ``kB``, a name with a space) is parsed line by line."""
    words = text.split()
    names = b" ".join(words[6::3])
    n = len(words) // 3 - 2
    if len(words) % 3 == 0 and words[8::3].count(b"kB") == n:
        known = _ROLLUP_KEYS.get(names)  # the same names every time: decoded once
        if known is None and names.count(b":") == n and len(_ROLLUP_KEYS) < 8:
            keys = names.decode().replace(":", "").split()
            known = _ROLLUP_KEYS[names] = (keys, {k: i for i, k in enumerate(keys)})
        if known is not None and len(known[0]) == n:
            values = words[7::3]
            if only is None:
                return dict(zip(known[0], [int(v) << 10 for v in values]))
            index = known[1]
            return {k: int(values[index[k]]) << 10 for k in only if k in index}
    out: dict[str, int] = {}
    for line in text.split(b"\n")[1:]:
        key, _, rest = line.partition(b":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.decode()] = int(parts[0]) * (1024 if parts[1:] == [b"kB"] else 1)
    return out if only is None else {k: out[k] for k in only if k in out}


#: ``/proc/PID/statm``'s fields, in pages; psutil's ``memory_info()`` on Linux is them in
#: bytes, under these names (``lib`` and ``dirty`` have been 0 since Linux 2.6).
STATM_FIELDS = ("vms", "rss", "shared", "text", "lib", "data", "dirty")


def read_statm(pid: int) -> dict[str, int]:
    """``/proc/PID/statm`` in bytes, by psutil's names (:data:`STATM_FIELDS`): ``vms``
    the mapped size (``VmSize``: not ``[vsyscall]``), ``rss``, ``shared`` (resident
    file and shmem pages), ``text`` (the executable's code), ``data`` (data + stack).
    Raises ``ProcessLookupError`` if there is no such process."""
    words = _open_small(pid, "statm").split()
    return {k: int(v) * _PAGE_SIZE for k, v in zip(STATM_FIELDS, words)}


def read_cmdline(pid: int) -> str:
    """The command line, arguments joined by spaces; ``[comm]`` when it is empty (a
    kernel thread, a zombie). Raises ``ProcessLookupError`` if there is no such process."""
    data = _open_small(pid, "cmdline")
    if data:
        return data.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return "[" + _open_small(pid, "comm").rstrip(b"\n").decode(errors="replace") + "]"


def process_uid(pid: int) -> int:
    """The owner of the ``/proc/PID`` directory: the process's effective uid, even when
    the process is not dumpable (the files in it then belong to root)."""
    try:
        return os.stat(_path(pid, "")).st_uid
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process with pid {pid}") from None
