#!/usr/bin/env python3
"""Dirty-page tracking methods side by side, on the same workloads and the same machine.

Methods (each watches a region of private anonymous memory, 4 KiB pages only --
``MADV_NOHUGEPAGE`` -- every page written once before tracking starts):

``writewatch``  ``pagescan.WriteWatch``: userfaultfd WP-async arms the pages; a write
                faults once and the kernel un-protects the page itself; ``get`` is one
                ``PAGEMAP_SCAN`` walk that also re-arms the pages it reports.
``uffd-sync``   userfaultfd write-protect *without* WP_ASYNC: a write blocks until a
                handler un-protects the page. The handler is a forked child process
                (a fault taken while holding the GIL would deadlock a handler thread);
                it reads many fault messages per ``read``, records each page in a
                MAP_SHARED bitmap, then un-protects it (runs of pages in one ioctl).
                ``get`` reads the bitmap; reset re-protects the pages it reported.
``soft-dirty``  ``/proc/self/clear_refs`` (``4``) + pagemap bit 55; skipped, with the
                reason, when the kernel lacks ``CONFIG_MEM_SOFT_DIRTY``. Note that
                ``clear_refs`` resets the whole process, not just the region.
``hash``        a 64-bit hash of every page (xxhash's xxh3_64 if installed, else
                blake2b with an 8-byte digest), compared with the previous hashes.
``shadow``      numpy compare of the region (uint64 words, one row per page) against a
                shadow copy, then copy the changed pages into the shadow.

Workloads:

``sweep N``     the process_memwatch RFC sweep: an N-page region (N = 1, 10, 100, 1000,
                10000), every page written, then one get+clear.
``wine``        Wine MR 7871's micro-benchmark shape: 8192 pages written by T threads
                (T = 1, 8; each thread writes its own contiguous share once), in
                sequential or random order; with the reset flag (get and re-arm in one
                call, ``GetWriteWatch(WRITE_WATCH_FLAG_RESET)``) or without it (get, then
                a separate full reset, ``ResetWriteWatch``).
``big``         a ``--size`` region (default 1 GiB) with 0.1 / 1 / 10 % of its pages
                written (random pages, seeded, the same for every method, in ascending
                order).

Metrics, medians over rounds (each round: write, write again, get(+reset), check that
the method reported exactly the pages written):

* per-write cost: time of the round's first writes (one 8-byte store per page through
  a numpy index assignment, which releases the GIL) divided by the number of writes
  ("raw"), minus the same stores repeated on the now unarmed pages ("net"). With T
  threads it is the wall time of the write phase over all writes (throughput).
* get+reset cost: the time the method takes to tell which pages were written and to
  start tracking again.

Targets (issue 3, item 5): get+reset over ``--size`` with 1 % written at least 200x
faster than hashing and than the shadow diff; WP-async per-write cost (net, ``big
1%``) <= 1 us; the synchronous handler <= 10 us per write where its reads are batched
(net, the 8-thread Wine workloads, median of the four variants).

Run ``python benchmarks/tracking.py --help`` for the options. ``run(argv)`` is the
entry point (returns the exit status); importing this module does no work.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import itertools
import json
import mmap
import os
import platform
import select
import signal
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import pagescan
from pagescan import PagefaultEvent, RegisterMode, UffdFeature, Userfaultfd, WriteWatch

P = mmap.PAGESIZE
WORDS = P // 8  # uint64 words per page
PM_SOFT_DIRTY = np.uint64(1 << 55)  # /proc/PID/pagemap entry bit

METHODS = ("writewatch", "uffd-sync", "soft-dirty", "hash", "shadow")
SWEEP = (1, 10, 100, 1000, 10000)
BIG_PERCENTS = (0.1, 1.0, 10.0)
WINE_PAGES = 8192
WINE_THREADS = (1, 8)

#: get+reset over the big region with 1 % written: hashing / WriteWatch, shadow / WriteWatch.
TARGET_RATIO = 200.0
#: net ns per write under WP-async, and under the synchronous handler with batched reads.
TARGET_WP_ASYNC_NS = 1000.0
TARGET_SYNC_NS = 10000.0

#: uffd-sync handler: messages per read(2).
SYNC_BATCH = 512
#: Shadow diff: pages compared per numpy call (keeps the temporaries in cache).
SHADOW_CHUNK = 1024

_now = time.perf_counter_ns


# -- memory ------------------------------------------------------------------------------


class Region:
    """``npages`` of private anonymous memory, no THP, not inherited by fork, all present.

    ``words`` is the memory as uint64, ``pages`` the same with one row per page.
    """

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.size = npages * P
        self.map: mmap.mmap | None = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE)
        try:
            self.map.madvise(mmap.MADV_NOHUGEPAGE)
            self.map.madvise(mmap.MADV_DONTFORK)  # keeps the uffd-sync handler's fork cheap
            self.words: np.ndarray = np.frombuffer(self.map, dtype=np.uint64)
            self.words.fill(1)
            self.pages: np.ndarray = self.words.reshape(npages, WORDS)
            self.base = int(self.words.ctypes.data)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.__dict__.pop("words", None)
        self.__dict__.pop("pages", None)
        m, self.map = self.map, None
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive somewhere: unmapped when the last one goes

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the methods ---------------------------------------------------------------------------


class Tracker:
    """One method watching one region. Results are what the method naturally returns;
    ``page_indices`` turns them into sorted page indices for the check."""

    #: False where the method may report more than was written (soft-dirty and VMA merges).
    exact = True

    def get_reset(self) -> np.ndarray:
        raise NotImplementedError

    def get(self) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def page_indices(self, result: np.ndarray) -> np.ndarray:
        return np.asarray(result, dtype=np.int64)

    def check(self) -> None:
        """Raise if the method broke down (used after each write phase)."""

    def stats(self) -> dict[str, Any]:
        """Counters of the method (cumulative); ``measure`` reports their growth."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WriteWatchTracker(Tracker):
    def __init__(self, region: Region) -> None:
        self.base = region.base
        self.ww = WriteWatch(region.base, region.size, nohugepage=True)

    def get_reset(self) -> np.ndarray:
        return self.ww.get(reset=True)

    def get(self) -> np.ndarray:
        return self.ww.get()

    def reset(self) -> None:
        self.ww.reset()

    def page_indices(self, result: np.ndarray) -> np.ndarray:
        indices: np.ndarray = ((result - np.uint64(self.base)) // np.uint64(P)).astype(np.int64)
        return indices

    def close(self) -> None:
        self.ww.close()


class SyncUffdTracker(Tracker):
    """Synchronous uffd write-protect, served by a forked handler process."""

    def __init__(self, region: Region) -> None:
        self.base, self.size, self.npages = region.base, region.size, region.npages
        self.pid = 0
        self.ctrl = -1
        self.uf = Userfaultfd(UffdFeature.PAGEFAULT_FLAG_WP)
        # Shared with the handler: one byte per page, and [batches, events, failed].
        self._bitmap_map: mmap.mmap | None = mmap.mmap(-1, self.npages)
        self._status_map: mmap.mmap | None = mmap.mmap(-1, 64)
        self.bitmap = np.frombuffer(self._bitmap_map, dtype=np.uint8)
        self.status = np.frombuffer(self._status_map, dtype=np.int64)
        try:
            self.uf.register(self.base, self.size, RegisterMode.WP)
            self.uf.writeprotect(self.base, self.size)
            self._start_handler()
        except BaseException:
            self.close()
            raise

    def _start_handler(self) -> None:
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() with threads alive (e.g. a BLAS pool);
            # the child only runs _sync_handler and leaves with os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(w)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner stops us
                code = _sync_handler(self.uf, self.base, self.size, self.bitmap, self.status, r)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(r)
        self.pid, self.ctrl = pid, w

    def get_reset(self) -> np.ndarray:
        written = np.flatnonzero(self.bitmap)
        if not written.size:
            return written
        self.bitmap[written] = 0
        # Re-protect the runs of written pages, or the whole range when there are many.
        breaks = np.flatnonzero(written[1:] - written[:-1] != 1)
        if breaks.size + 1 > max(1, self.npages // 64):
            self.uf.writeprotect(self.base, self.size)
            return written
        firsts = written[:1].tolist() + written[breaks + 1].tolist()
        lasts = written[breaks].tolist() + written[-1:].tolist()
        wp, base = self.uf.writeprotect, self.base
        for first, last in zip(firsts, lasts):
            wp(base + first * P, (last + 1 - first) * P)
        return written

    def get(self) -> np.ndarray:
        return np.flatnonzero(self.bitmap)

    def reset(self) -> None:
        self.bitmap[:] = 0
        self.uf.writeprotect(self.base, self.size)

    def check(self) -> None:
        if self.status[2]:
            raise RuntimeError("the uffd-sync handler process failed (see its traceback above)")

    def stats(self) -> dict[str, Any]:
        return {"handler_reads": int(self.status[0]), "handler_faults": int(self.status[1])}

    def close(self) -> None:
        if self.ctrl >= 0:
            try:
                os.write(self.ctrl, b"q")
            except OSError:
                pass
            os.close(self.ctrl)
            self.ctrl = -1
        if self.pid:
            pid, self.pid = self.pid, 0
            deadline = time.monotonic() + 5
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.001)
        self.uf.close()  # unregisters the range
        self.__dict__.pop("bitmap", None)
        self.__dict__.pop("status", None)
        for name in ("_bitmap_map", "_status_map"):
            m = getattr(self, name)
            setattr(self, name, None)
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass


def _sync_handler(uf: Userfaultfd, base: int, size: int, bitmap: np.ndarray, status: np.ndarray,
                  ctrl: int) -> int:
    """The uffd-sync handler (runs in the forked child). Returns the exit status."""
    poller = select.poll()
    poller.register(uf.fd, select.POLLIN)
    poller.register(ctrl, select.POLLIN)
    wp = uf.writeprotect
    try:
        while True:
            ready = poller.poll()
            if any(fd == ctrl for fd, _ in ready):
                return 0  # "q" from the owner, or POLLHUP: the owner is gone
            events = uf.read_events(timeout=0, max_events=SYNC_BATCH)
            pages = sorted({(ev.address - base) // P for ev in events if isinstance(ev, PagefaultEvent)})
            if not pages:
                continue
            bitmap[pages] = 1  # recorded before the writer resumes
            status[0] += 1
            status[1] += len(events)
            start = prev = pages[0]
            for page in itertools.chain(pages[1:], (-2,)):
                if page != prev + 1:
                    _unprotect(wp, base + start * P, (prev + 1 - start) * P)
                    start = page
                prev = page
    except BaseException:
        status[2] = 1
        # Never leave a writer blocked: drop the protection of the whole range.
        wp(base, size, enable=False)
        raise


def _unprotect(wp: Callable[..., None], addr: int, length: int) -> None:
    for _ in range(100):
        try:
            wp(addr, length, enable=False)
            return
        except BlockingIOError:  # EAGAIN: the mm is changing; retry
            continue
    wp(addr, length, enable=False)


class SoftDirtyTracker(Tracker):
    exact = False  # VM_SOFTDIRTY (new or merged VMAs) can report extra pages

    def __init__(self, region: Region) -> None:
        self.offset = region.base // P * 8
        self.length = region.npages * 8
        self.buf = bytearray(self.length)
        self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self.pagemap)
            raise
        self.reset()

    def get(self) -> np.ndarray:
        view, done = memoryview(self.buf), 0
        while done < self.length:
            n = os.preadv(self.pagemap, [view[done:]], self.offset + done)
            if n <= 0:
                raise OSError(f"short read from /proc/self/pagemap ({done} of {self.length} bytes)")
            done += n
        view.release()
        entries = np.frombuffer(self.buf, dtype=np.uint64)
        return np.flatnonzero(entries & PM_SOFT_DIRTY)

    def reset(self) -> None:
        os.write(self.clear_refs, b"4")  # clears soft-dirty in the whole process

    def get_reset(self) -> np.ndarray:
        written = self.get()
        self.reset()
        return written

    def close(self) -> None:
        for fd in (self.pagemap, self.clear_refs):
            if fd >= 0:
                os.close(fd)
        self.pagemap = self.clear_refs = -1


def hash_name() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "blake2b-64"
    return "xxh3_64"


class HashTracker(Tracker):
    def __init__(self, region: Region) -> None:
        assert region.map is not None
        self.mv = memoryview(region.map)
        self.offsets = range(0, region.size, P)
        self.algorithm = hash_name()
        self.digests = self._hash_all()

    def _hash_all(self) -> np.ndarray:
        mv = self.mv
        if self.algorithm == "xxh3_64":
            import xxhash

            h = xxhash.xxh3_64_digest
            joined = b"".join([h(mv[o : o + P]) for o in self.offsets])
        else:
            b2 = hashlib.blake2b
            joined = b"".join([b2(mv[o : o + P], digest_size=8).digest() for o in self.offsets])
        return np.frombuffer(joined, dtype=np.uint64)

    def get_reset(self) -> np.ndarray:
        new = self._hash_all()
        written = np.flatnonzero(new != self.digests)
        self.digests = new
        return written

    def get(self) -> np.ndarray:
        return np.flatnonzero(self._hash_all() != self.digests)

    def reset(self) -> None:
        self.digests = self._hash_all()

    def close(self) -> None:
        self.mv.release()


class ShadowTracker(Tracker):
    def __init__(self, region: Region) -> None:
        self.current = region.pages
        self.shadow = region.pages.copy()

    def _diff(self, update: bool) -> np.ndarray:
        cur, shadow, n = self.current, self.shadow, len(self.current)
        found = []
        for s in range(0, n, SHADOW_CHUNK):
            e = min(n, s + SHADOW_CHUNK)
            changed = np.flatnonzero((cur[s:e] != shadow[s:e]).any(axis=1))
            if changed.size:
                changed += s
                if update:
                    shadow[changed] = cur[changed]
                found.append(changed)
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def get_reset(self) -> np.ndarray:
        return self._diff(update=True)

    def get(self) -> np.ndarray:
        return self._diff(update=False)

    def reset(self) -> None:
        np.copyto(self.shadow, self.current)

    def close(self) -> None:
        self.__dict__.pop("current", None)
        self.__dict__.pop("shadow", None)


TRACKERS: dict[str, Callable[[Region], Tracker]] = {
    "writewatch": WriteWatchTracker,
    "uffd-sync": SyncUffdTracker,
    "soft-dirty": SoftDirtyTracker,
    "hash": HashTracker,
    "shadow": ShadowTracker,
}


def skip_reason(method: str) -> str | None:
    """Why ``method`` cannot run on this kernel, or None."""
    caps = pagescan.capabilities()
    if method == "writewatch":
        if not caps.pagemap_scan or not caps.wp_async:
            why = caps.missing.get("PAGEMAP_SCAN") or caps.missing.get("UFFD_FEATURE_WP_ASYNC") or "needs Linux 6.7"
            return f"needs PAGEMAP_SCAN and UFFD_FEATURE_WP_ASYNC: {why}"
    elif method == "uffd-sync":
        if not caps.userfaultfd or not caps.uffd_features & UffdFeature.PAGEFAULT_FLAG_WP:
            why = caps.missing.get("userfaultfd") or caps.missing.get("UFFD_FEATURE_PAGEFAULT_FLAG_WP") or "needs Linux 5.7"
            return f"needs userfaultfd write-protect: {why}"
    elif method == "soft-dirty":
        if not caps.soft_dirty:
            return caps.missing.get("soft-dirty", "kernel without CONFIG_MEM_SOFT_DIRTY")
    return None


# -- workloads -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    label: str
    group: str  # "sweep", "wine" or "big": workloads of a group share one region
    npages: int  # region size
    threads: int
    fused: bool  # get and reset in one call (reset flag)
    rounds: int
    warmup: int
    #: per round: each thread's page indices, in writing order
    choose: Callable[[np.random.Generator], list[np.ndarray]]
    params: dict[str, Any]


def fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def make_workloads(size: int, rounds: dict[str, int], wine_warmup: int = 1) -> list[Workload]:
    out = []
    for n in SWEEP:

        def every_page(rng: np.random.Generator, pages: np.ndarray = np.arange(n)) -> list[np.ndarray]:
            return [pages]

        out.append(Workload(
            key=f"sweep-{n}", label=f"sweep {n} page{'s' if n > 1 else ''}", group=f"sweep-{n}",
            npages=n, threads=1, fused=True, rounds=rounds["sweep"], warmup=1,
            choose=every_page, params={"pages": n, "written": n},
        ))
    for threads in WINE_THREADS:
        for order in ("seq", "rand"):
            for fused in (True, False):
                shares = np.array_split(np.arange(WINE_PAGES), threads)

                def choose(rng: np.random.Generator, shares: list[np.ndarray] = shares,
                           order: str = order) -> list[np.ndarray]:
                    return [rng.permutation(s) for s in shares] if order == "rand" else shares

                out.append(Workload(
                    key=f"wine-{threads}t-{order}-{'reset' if fused else 'noreset'}",
                    label=f"wine {threads}T {order} {'reset' if fused else 'get;reset'}",
                    group="wine", npages=WINE_PAGES, threads=threads, fused=fused,
                    rounds=rounds["wine"], warmup=wine_warmup, choose=choose,
                    params={"pages": WINE_PAGES, "threads": threads, "order": order,
                            "reset_flag": fused, "written": WINE_PAGES},
                ))
    npages = size // P
    for pct in BIG_PERCENTS:
        k = max(1, round(npages * pct / 100))

        def pick(rng: np.random.Generator, k: int = k) -> list[np.ndarray]:
            return [np.sort(rng.choice(npages, size=k, replace=False))]

        out.append(Workload(
            key=f"big-{pct:g}%", label=f"{fmt_size(size)} {pct:g}%", group="big", npages=npages,
            threads=1, fused=True, rounds=rounds["big"], warmup=0, choose=pick,
            params={"pages": npages, "percent": pct, "written": k},
        ))
    return out


# -- measuring -----------------------------------------------------------------------------


def timed_write(words: np.ndarray, offsets: list[np.ndarray], value: np.uint64) -> int:
    """Store ``value`` at each offset (one thread per array); wall ns of the stores."""
    if len(offsets) == 1:
        t0 = _now()
        words[offsets[0]] = value
        return _now() - t0
    n = len(offsets)
    starts, ends = [0] * n, [0] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            mine = offsets[i]
            barrier.wait()
            starts[i] = _now()
            words[mine] = value  # numpy releases the GIL for the stores
            ends[i] = _now()
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return max(ends) - min(starts)


_values = itertools.count(2)  # every round stores a value never seen before (regions start at 1)


def measure(tracker: Tracker, region: Region, wl: Workload, seed: int, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, index])
    before = tracker.stats()
    raw: list[float] = []
    base: list[float] = []
    get_ns: list[int] = []
    reset_ns: list[int] = []
    extra = 0
    for r in range(wl.warmup + wl.rounds):
        parts = wl.choose(rng)
        expected = np.sort(np.concatenate(parts)) if len(parts) > 1 else np.sort(parts[0])
        offsets = [p * WORDS for p in parts]
        value = np.uint64(next(_values))
        t_raw = timed_write(region.words, offsets, value)
        tracker.check()
        t_base = timed_write(region.words, offsets, value)
        if wl.fused:
            t0 = _now()
            result = tracker.get_reset()
            t_get, t_reset = _now() - t0, 0
        else:
            t0 = _now()
            result = tracker.get()
            t1 = _now()
            tracker.reset()
            t_get, t_reset = t1 - t0, _now() - t1
        got = tracker.page_indices(result)
        if tracker.exact:
            if not np.array_equal(got, expected):
                raise AssertionError(f"{type(tracker).__name__} on {wl.key}: reported {got.size} pages, "
                                     f"{expected.size} written; first differences: "
                                     f"{np.setxor1d(got, expected)[:5].tolist()}")
        else:
            missed = np.setdiff1d(expected, got)
            if missed.size:
                raise AssertionError(f"{type(tracker).__name__} on {wl.key}: missed {missed.size} written pages")
            extra = max(extra, got.size - expected.size)
        if r >= wl.warmup:
            writes = expected.size
            raw.append(t_raw / writes)
            base.append(t_base / writes)
            get_ns.append(t_get)
            reset_ns.append(t_reset)
    total = [g + s for g, s in zip(get_ns, reset_ns)]
    counters = {k: v - before[k] for k, v in tracker.stats().items()}  # warm-up round included
    return {
        "counters": counters,
        "writes": int(wl.params["written"]),
        "per_write_raw_ns": statistics.median(raw),
        "per_write_base_ns": statistics.median(base),
        "per_write_net_ns": statistics.median([a - b for a, b in zip(raw, base)]),
        "per_write_net_best_ns": min(a - b for a, b in zip(raw, base)),
        "get_reset_ns": statistics.median(total),
        "get_reset_best_ns": min(total),
        "get_ns": statistics.median(get_ns),
        "reset_ns": statistics.median(reset_ns) if not wl.fused else None,
        "extra_pages_reported": extra if not tracker.exact else 0,
        "samples": {"per_write_raw_ns": raw, "per_write_base_ns": base, "get_ns": get_ns, "reset_ns": reset_ns},
    }


def calibrate() -> dict[str, float]:
    """Reference costs on this machine: a trivial syscall, a first-touch page fault."""
    n = 20000
    getppid = os.getppid
    t0 = _now()
    for _ in range(n):
        getppid()
    syscall = (_now() - t0) / n
    pages = 10000
    m = mmap.mmap(-1, pages * P, flags=mmap.MAP_PRIVATE)
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)
        words = np.frombuffer(m, dtype=np.uint64)
        t0 = _now()
        words[::WORDS] = 1
        fault = (_now() - t0) / pages
        del words
    finally:
        m.close()
    return {"syscall_ns": syscall, "first_touch_fault_ns": fault}


def groups(workloads: Sequence[Workload]) -> Iterator[tuple[int, list[tuple[int, Workload]]]]:
    """Workloads grouped by region (in order), with their global index."""
    for _, members in itertools.groupby(enumerate(workloads), key=lambda iw: iw[1].group):
        items = list(members)
        yield items[0][1].npages, items


def run_all(args: argparse.Namespace, workloads: list[Workload]) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does
    try:
        for method in args.methods:
            why = skip_reason(method)
            if why:
                skipped[method] = why
                print(f"{method}: skipped: {why}", flush=True)
                continue
            t_method = time.monotonic()
            results[method] = {}
            for npages, members in groups(workloads):
                with Region(npages) as region, TRACKERS[method](region) as tracker:
                    for index, wl in members:
                        results[method][wl.key] = measure(tracker, region, wl, args.seed, index)
                    gc.collect()
            print(f"{method}: done in {time.monotonic() - t_method:.1f} s", flush=True)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"results": results, "skipped": skipped}


# -- targets, table, files -------------------------------------------------------------


def evaluate_targets(res: dict[str, Any], workloads: list[Workload]) -> list[dict[str, Any]]:
    results = res["results"]
    big1 = next(w for w in workloads if w.group == "big" and w.params["percent"] == 1.0)
    wine_mt = [w for w in workloads if w.group == "wine" and w.threads == max(WINE_THREADS)]
    targets: list[dict[str, Any]] = []

    def cell(method: str, key: str, metric: str) -> float | None:
        r = results.get(method, {}).get(key)
        return None if r is None else float(r[metric])

    ww = cell("writewatch", big1.key, "get_reset_ns")
    ww_best = cell("writewatch", big1.key, "get_reset_best_ns")
    for other in ("hash", "shadow"):
        theirs = cell(other, big1.key, "get_reset_ns")
        theirs_best = cell(other, big1.key, "get_reset_best_ns")
        ratio = theirs / ww if ww and theirs else None
        targets.append({
            "name": f"get+reset {big1.label}: {other} / writewatch",
            "measured": ratio, "unit": "x", "target": f">= {TARGET_RATIO:g}x",
            "met": None if ratio is None else ratio >= TARGET_RATIO,
            "best": theirs_best / ww_best if ww_best and theirs_best else None,
            "detail": None if ratio is None else f"{fmt_ns(theirs)} / {fmt_ns(ww)}",
        })
    per_write = cell("writewatch", big1.key, "per_write_net_ns")
    targets.append({
        "name": f"per-write cost, WP async ({big1.label}, net)",
        "measured": per_write, "unit": "ns", "target": f"<= {TARGET_WP_ASYNC_NS:g} ns",
        "met": None if per_write is None else per_write <= TARGET_WP_ASYNC_NS,
        "best": cell("writewatch", big1.key, "per_write_net_best_ns"),
    })
    sync = [cell("uffd-sync", w.key, "per_write_net_ns") for w in wine_mt]
    sync_ok = [s for s in sync if s is not None]
    med = statistics.median(sync_ok) if sync_ok else None
    single = cell("uffd-sync", big1.key, "per_write_net_ns")
    targets.append({
        "name": f"per-write cost, sync uffd handler ({max(WINE_THREADS)}-thread wine, batched reads, net, "
                f"median of {len(wine_mt)})",
        "measured": med, "unit": "ns", "target": f"<= {TARGET_SYNC_NS:g} ns",
        "met": None if med is None else med <= TARGET_SYNC_NS,
        "best": min(b for w in wine_mt if (b := cell("uffd-sync", w.key, "per_write_net_best_ns")) is not None)
        if sync_ok else None,
        "range": [min(sync_ok), max(sync_ok)] if sync_ok else None,
        "single_thread_big_1pct_ns": single,
    })
    return targets


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    a = abs(ns)
    if a < 1e3:
        return f"{ns:.0f} ns"
    for div, unit in ((1e3, "us"), (1e6, "ms"), (1e9, "s")):
        if a < div * 1e3 or unit == "s":
            v = ns / div
            return f"{v:.2f} {unit}" if abs(v) < 10 else f"{v:.1f} {unit}" if abs(v) < 100 else f"{v:.0f} {unit}"
    raise AssertionError


def print_tables(report: dict[str, Any], workloads: list[Workload]) -> None:
    cfg = report["config"]
    cal = cfg["calibration"]
    print()
    print(f"pagescan {cfg['pagescan']} on Linux {cfg['kernel']} {cfg['machine']}, {cfg['cpus']} CPUs, "
          f"Python {cfg['python']}, numpy {cfg['numpy']}; hash: {cfg['hash']}")
    print(f"this machine: a syscall {fmt_ns(cal['syscall_ns'])}, a first-touch page fault "
          f"{fmt_ns(cal['first_touch_fault_ns'])}, load average {cfg['loadavg_before_after'][0][0]:.1f}; "
          f"4 KiB pages only (MADV_NOHUGEPAGE); medians of "
          f"{cfg['rounds']['sweep']}/{cfg['rounds']['wine']}/{cfg['rounds']['big']} rounds (sweep/wine/big)")
    methods = cfg["methods"]
    results, skipped = report["results"], report["skipped"]

    def table(title: str, metric: Callable[[dict[str, Any]], str]) -> None:
        head = ["workload", *methods]
        rows = [head]
        for wl in workloads:
            row = [wl.label]
            for m in methods:
                if m in skipped:
                    row.append("skipped")
                else:
                    r = results.get(m, {}).get(wl.key)
                    row.append("-" if r is None else metric(r))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        print()
        print(title)
        for r in rows:
            print("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))

    table("per-write cost: net (raw - same stores on unarmed pages); with T threads: wall time / writes",
          lambda r: fmt_ns(r["per_write_net_ns"]))
    table("get+reset cost (wine 'get;reset': a get, then a separate reset of the whole region)",
          lambda r: fmt_ns(r["get_reset_ns"]))
    for m, why in skipped.items():
        print(f"{m}: skipped: {why}")
    batching, single = [], [0, 0]
    for wl in workloads:
        c = results.get("uffd-sync", {}).get(wl.key, {}).get("counters")
        if c and c["handler_reads"]:
            if wl.threads > 1:
                batching.append(f"{wl.label} {c['handler_faults'] / c['handler_reads']:.1f}")
            else:
                single[0] += c["handler_faults"]
                single[1] += c["handler_reads"]
    if batching:
        print("uffd-sync handler, faults per read: " + ", ".join(batching)
              + (f"; single-thread workloads {single[0] / single[1]:.1f}" if single[1] else ""))
    print()
    big1_label = next(w.label for w in workloads if w.group == "big" and w.params["percent"] == 1.0)
    for t in report["targets"]:
        if t["measured"] is None:
            measured, status = "n/a", "not measured"
        else:
            measured = f"{t['measured']:.0f}x" if t["unit"] == "x" else fmt_ns(t["measured"])
            status = "met" if t["met"] else "not met"
        notes = []
        if t.get("detail"):
            notes.append(t["detail"])
        if t.get("best") is not None:
            notes.append("best round " + (f"{t['best']:.0f}x" if t["unit"] == "x" else fmt_ns(t["best"])))
        if t.get("range"):
            notes.append(f"variants {fmt_ns(t['range'][0])} .. {fmt_ns(t['range'][1])}")
        if t.get("single_thread_big_1pct_ns") is not None:
            notes.append(f"single thread ({big1_label}) {fmt_ns(t['single_thread_big_1pct_ns'])}")
        line = f"target {t['name']}: {measured} ({t['target']}): {status}"
        print(line + (f" [{'; '.join(notes)}]" if notes else ""))


def write_json(path: str, report: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_png(path: str, report: dict[str, Any], workloads: list[Workload]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(workloads))
    markers = itertools.cycle("os^Dvx")
    for m in report["config"]["methods"]:
        if m not in report["results"]:
            continue
        res = report["results"][m]
        mk = next(markers)
        net = [max(res[w.key]["per_write_net_ns"], 1.0) if w.key in res else np.nan for w in workloads]
        gr = [res[w.key]["get_reset_ns"] / 1e3 if w.key in res else np.nan for w in workloads]
        top.plot(x, net, marker=mk, label=m)
        bottom.plot(x, gr, marker=mk, label=m)
    top.set_yscale("log")
    top.set_ylabel("per-write cost, net (ns; 1 = no fault)")
    for y, what in ((TARGET_WP_ASYNC_NS, "WP-async target"), (TARGET_SYNC_NS, "sync handler target")):
        top.axhline(y, color="grey", ls=":", lw=1)
        top.annotate(what, (1, y), xycoords=("axes fraction", "data"), xytext=(-4, -2),
                     textcoords="offset points", ha="right", va="top", fontsize="x-small", color="grey")
    bottom.set_yscale("log")
    bottom.set_ylabel("get+reset (us)")
    bottom.set_xticks(x, [w.label for w in workloads], rotation=40, ha="right")
    for ax in (top, bottom):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    cfg = report["config"]
    skipped = "; ".join(f"{m} skipped: {why}" for m, why in report["skipped"].items())
    fig.suptitle(f"Dirty-page tracking, Linux {cfg['kernel']} {cfg['machine']}, {cfg['cpus']} CPUs"
                 + (f"\n{skipped}" if skipped else ""), fontsize="medium")
    fig.savefig(path, dpi=110)


# -- command line --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = units.get(t[-1:], 1)
    if t[-1:] in units:
        t = t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1G, 256M)") from None
    value -= value % P
    if value < 1000 * P:
        raise argparse.ArgumentTypeError(f"size must be at least 1000 pages ({fmt_size(1000 * P)}), "
                                         "so that 0.1 % is at least one page")
    return value


def parse_methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in names]


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser(prog: str = "tracking.py") -> argparse.ArgumentParser:
    """The benchmark's options (shared by ``benchmarks/tracking.py`` and ``pagescan bench``)."""
    ap = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0],
                                 epilog="See the module docstring for the methods, workloads and metrics.")
    ap.add_argument("--size", type=parse_size, default=None,
                    help="region of the 'big' workload, e.g. 1G, 256M (default 1G; 128M with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a 128 MiB big region (about 30 s)")
    ap.add_argument("--methods", type=parse_methods, default=list(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    ap.add_argument("--rounds", type=positive_int, default=None,
                    help="timed rounds per workload (default 9 sweep / 7 wine / 5 big; --quick 3/2/2)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the page choices (default 1)")
    ap.add_argument("--json", metavar="PATH", help="write the results (with every sample) here")
    ap.add_argument("--png", metavar="PATH", help="plot the results here (needs matplotlib)")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 if a measured target is not met")
    return ap


def run(argv: Sequence[str] | None = None, prog: str = "tracking.py") -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status."""
    return run_args(build_parser(prog).parse_args(argv))


def run_args(args: argparse.Namespace) -> int:
    """Run the benchmark with parsed options."""

    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("tracking.py: --png needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    if args.size is None:
        args.size = (128 << 20) if args.quick else (1 << 30)
    rounds = {"sweep": 3, "wine": 2, "big": 2} if args.quick else {"sweep": 9, "wine": 7, "big": 5}
    if args.rounds:
        rounds = dict.fromkeys(rounds, args.rounds)
    workloads = make_workloads(args.size, rounds, wine_warmup=0 if args.quick else 1)

    t0 = time.monotonic()
    load_before = os.getloadavg()
    calibration = calibrate()
    res = run_all(args, workloads)
    report: dict[str, Any] = {
        "config": {
            "methods": args.methods,
            "size": args.size,
            "quick": args.quick,
            "rounds": rounds,
            "seed": args.seed,
            "hash": hash_name(),
            "sync_batch": SYNC_BATCH,
            "shadow_chunk_pages": SHADOW_CHUNK,
            "page_size": P,
            "thp": "MADV_NOHUGEPAGE on every region (4 KiB PTEs only)",
            "thp_mode": pagescan.capabilities().thp_mode,
            "kernel": platform.release(),
            "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pagescan": pagescan.__version__,
            "calibration": calibration,
            "loadavg_before_after": [load_before, None],
            "seconds": None,
        },
        "workloads": [{"key": w.key, "label": w.label, "group": w.group, "threads": w.threads,
                       "reset_flag": w.fused, "rounds": w.rounds, **w.params} for w in workloads],
        **res,
    }
    report["targets"] = evaluate_targets(res, workloads)
    report["config"]["seconds"] = round(time.monotonic() - t0, 1)
    report["config"]["loadavg_before_after"][1] = os.getloadavg()
    print_tables(report, workloads)
    print(f"total {report['config']['seconds']} s")
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    if args.png:
        write_png(args.png, report, workloads)
        print(f"wrote {args.png}")
    if args.strict and any(t["met"] is False for t in report["targets"]):
        return 1
    return 0


main = run

if __name__ == "__main__":
    sys.exit(run())
