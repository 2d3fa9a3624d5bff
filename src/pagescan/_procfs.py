"""Readers for ``/proc/PID/maps`` and ``/proc/PID/smaps``.

``maps`` is cheap (no page-table walk); ``smaps`` walks every VMA's page tables to
compute RSS and costs about as much as reading the pagemap of the whole process, so
callers read it only when they need ``VmFlags`` or per-VMA counters.
"""

from __future__ import annotations

import dataclasses
import errno

__all__ = ["Vma", "read_maps", "read_smaps"]


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
    def anon_private(self) -> bool:
        """Private and not backed by a file (heap, stack, anonymous mmap)."""
        return not self.shared and self.inode == 0 and not self.name.startswith("/")

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


def _open(pid: int, name: str) -> bytes:
    path = f"/proc/{pid}/{name}"
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process with pid {pid}") from None
    except PermissionError as err:
        raise PermissionError(err.errno, f"may not read {path} (needs ptrace read access)") from None


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
        name=parts[5].strip().decode(errors="replace") if len(parts) > 5 else "",
    )


def read_maps(pid: int, start: int = 0, end: int = 1 << 64) -> list[Vma]:
    """VMAs of ``pid`` that intersect ``[start, end)``, in address order."""
    out = []
    for line in _open(pid, "maps").splitlines():
        if not line:
            continue
        vma = _parse_header(line)
        if vma.end > start and vma.start < end:
            out.append(vma)
    return out


def read_smaps(pid: int, start: int = 0, end: int = 1 << 64) -> list[Vma]:
    """Like :func:`read_maps`, with ``VmFlags`` and the ``kB`` fields filled in."""
    out: list[Vma] = []
    cur: Vma | None = None
    for line in _open(pid, "smaps").splitlines():
        if not line:
            continue
        head, _, rest = line.partition(b":")
        if b" " not in head and head[:1].isalpha() and rest[:1] in (b" ", b"\t", b""):
            if cur is None:
                continue
            if head == b"VmFlags":
                cur.vmflags = frozenset(rest.decode().split())
            else:
                parts = rest.split()
                if len(parts) == 2 and parts[1] == b"kB":
                    cur.fields[head.decode()] = int(parts[0]) * 1024
            continue
        vma = _parse_header(line)
        cur = vma if vma.end > start and vma.start < end else None
        if cur is not None:
            out.append(cur)
    return out
