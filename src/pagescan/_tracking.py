"""Dirty-page tracking methods, and how to measure them (``pagescan bench``).

Each method watches a region of private anonymous memory (4 KiB pages only --
``MADV_NOHUGEPAGE`` -- every page written once before tracking starts) and answers
"which pages were written since the last reset":

``writewatch``  :class:`pagescan.WriteWatch`: userfaultfd WP-async arms the pages; a
                write faults once and the kernel un-protects the page itself; ``get``
                is one ``PAGEMAP_SCAN`` walk that also re-arms the pages it reports.
``uffd-sync``   userfaultfd write-protect *without* WP_ASYNC: a write blocks until a
                handler un-protects the page. The handler is a forked child process
                (a fault taken while holding the GIL would deadlock a handler thread);
                it reads many fault messages per ``read``, records each page in a
                MAP_SHARED bitmap, then un-protects it (runs of pages in one ioctl).
``soft-dirty``  ``/proc/self/clear_refs`` (``4``) + pagemap bit 55 (needs
                ``CONFIG_MEM_SOFT_DIRTY``); ``clear_refs`` resets the whole process.
``hash``        a 64-bit hash of every page (xxhash's xxh3_64 if installed, else
                blake2b with an 8-byte digest), compared with the previous hashes.
``shadow``      numpy compare of the region against a shadow copy, then copy the
                changed pages into the shadow.

:func:`measure` runs a :class:`Workload` round by round: write the chosen pages (one
8-byte store per page through a numpy index assignment, which releases the GIL; with
several threads each writes its share), write them again (now unarmed), get (and
reset), and check the method reported exactly the pages written. Per-write cost "net"
is the first write's time per page minus the second's; get+reset is the time the
method takes to tell the pages and start tracking again. ``benchmarks/tracking.py``
is the research harness over this module (more workloads, targets, JSON, plots).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import itertools
import mmap
import os
import select
import signal
import statistics
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ._child import Child, fork
from ._units import fmt_size
from .capabilities import capabilities
from ._uapi.since import since
from ._uapi.userfaultfd import RegisterMode, UffdFeature
from .userfaultfd import PagefaultEvent, Userfaultfd
from .writewatch import WriteWatch

__all__ = ["BIG_PERCENTS", "METHODS", "SHADOW_CHUNK", "SYNC_BATCH", "TRACKERS", "WORDS", "HashTracker", "Region",
           "ShadowTracker", "SoftDirtyTracker", "SyncUffdTracker", "Tracker", "WriteWatchTracker", "Workload",
           "big_workloads", "hash_name", "measure", "run", "skip_reason"]

P = mmap.PAGESIZE
WORDS = P // 8  # uint64 words per page
PM_SOFT_DIRTY = np.uint64(1 << 55)  # /proc/PID/pagemap entry bit

METHODS = ("writewatch", "uffd-sync", "soft-dirty", "hash", "shadow")
#: Shares of a region's pages written per round by :func:`big_workloads`.
BIG_PERCENTS = (0.1, 1.0, 10.0)

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
    #: False where writes run untouched (the method compares contents afterwards).
    intercepts_writes = True

    def __init__(self, region: Region) -> None:
        raise NotImplementedError

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
        self.handler: Child | None = None
        self.guardian: Child | None = None
        self.ctrl = -1
        self.uf = Userfaultfd(UffdFeature.PAGEFAULT_FLAG_WP)
        # Shared with the handler: one byte per page, and [batches, events, failed, stopping].
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
        # The handler holds the only write end of `life`: the guardian reads EOF when the
        # handler ends, however it ends.
        life_r, life_w = os.pipe()
        uf, base, size, bitmap, status = self.uf, self.base, self.size, self.bitmap, self.status

        def main() -> int:
            try:
                os.close(w)
                os.close(life_r)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner stops us
                return _sync_handler(uf, base, size, bitmap, status, r)
            except BaseException:
                traceback.print_exc()
                return 1

        def guardian() -> int:
            # A handler killed from outside would leave every writer of the range blocked
            # in its fault for good (the owner holds the uffd: the range stays
            # registered), holding the GIL: unprotect the range, wake them, say so.
            os.close(w)
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            while True:
                try:
                    if not os.read(life_r, 1):
                        break
                except InterruptedError:
                    continue
            if not status[3]:  # not stopped by close()
                status[2] = 1
                _unprotect(uf.writeprotect, base, size)
            return 0

        try:
            with warnings.catch_warnings():
                # Python >= 3.12 warns about fork() with threads alive (e.g. a BLAS pool);
                # the children only run _sync_handler or guardian and leave with os._exit.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.handler = fork(main)
                os.close(life_w)
                life_w = -1
                self.guardian = fork(guardian)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
            os.close(life_r)
            if life_w >= 0:
                os.close(life_w)
        self.ctrl = w

    def get_reset(self) -> np.ndarray:
        self.check()  # (re-armed with no handler, the next write would block for good)
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
        self.check()
        self.bitmap[:] = 0
        self.uf.writeprotect(self.base, self.size)

    def check(self) -> None:
        if self.status[2]:
            raise RuntimeError("the uffd-sync handler process failed or was killed (see its traceback above, "
                               "if any): the writes since are not tracked")

    def stats(self) -> dict[str, Any]:
        return {"handler_reads": int(self.status[0]), "handler_faults": int(self.status[1])}

    def close(self) -> None:
        if "status" in self.__dict__:
            self.status[3] = 1  # stopping: the guardian leaves the range as it is
        if self.ctrl >= 0:
            try:
                os.write(self.ctrl, b"q")
            except OSError:
                pass
            os.close(self.ctrl)
            self.ctrl = -1
        handler, self.handler = self.handler, None
        if handler is not None and handler.wait(5.0) is None:  # "q" or EOF ends it at once
            handler.kill()
            handler.wait()
        guardian, self.guardian = self.guardian, None
        if guardian is not None and guardian.wait(5.0) is None:  # EOF once the handler is gone
            guardian.kill()
            guardian.wait()
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
    """The page hash the ``hash`` method uses here."""
    return "xxh3_64" if importlib.util.find_spec("xxhash") else "blake2b-64"


class HashTracker(Tracker):
    intercepts_writes = False
    def __init__(self, region: Region) -> None:
        assert region.map is not None
        self.mv = memoryview(region.map)
        self.offsets = range(0, region.size, P)
        self.algorithm = hash_name()
        self.digests = self._hash_all()

    def _hash_all(self) -> np.ndarray:
        mv = self.mv
        if self.algorithm == "xxh3_64":
            import xxhash  # type: ignore[import-not-found, unused-ignore]

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
    intercepts_writes = False
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


TRACKERS: dict[str, type[Tracker]] = {
    "writewatch": WriteWatchTracker,
    "uffd-sync": SyncUffdTracker,
    "soft-dirty": SoftDirtyTracker,
    "hash": HashTracker,
    "shadow": ShadowTracker,
}


def skip_reason(method: str) -> str | None:
    """Why ``method`` cannot run on this kernel, or None."""
    caps = capabilities()
    if method == "writewatch":
        if not caps.pagemap_scan or not caps.wp_async:
            why = caps.missing.get("PAGEMAP_SCAN") or caps.missing.get("UFFD_FEATURE_WP_ASYNC") or f"needs Linux {since('UFFD_FEATURE_WP_ASYNC')}"
            return f"needs PAGEMAP_SCAN and UFFD_FEATURE_WP_ASYNC: {why}"
    elif method == "uffd-sync":
        if not caps.userfaultfd or not caps.uffd_features & UffdFeature.PAGEFAULT_FLAG_WP:
            why = caps.missing.get("userfaultfd") or caps.missing.get("UFFD_FEATURE_PAGEFAULT_FLAG_WP") or f"needs Linux {since('UFFD_FEATURE_PAGEFAULT_FLAG_WP')}"
            return f"needs userfaultfd write-protect: {why}"
    elif method == "soft-dirty":
        if not caps.soft_dirty:
            return caps.missing.get("soft-dirty", "kernel without CONFIG_MEM_SOFT_DIRTY")
    return None


# -- workloads -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one :func:`measure` call does, round after round."""

    key: str
    label: str
    group: str  # workloads of a group run on one region (and tracker), in order
    npages: int  # region size
    threads: int
    fused: bool  # get and reset in one call (the reset flag)
    rounds: int
    warmup: int
    #: per round: each thread's page indices, in writing order
    choose: Callable[[np.random.Generator], list[np.ndarray]]
    params: dict[str, Any]


def big_workloads(size: int, rounds: int, percents: Iterable[float] = BIG_PERCENTS) -> list[Workload]:
    """One thread writes ``percent`` % of a ``size``-byte region's pages per round (random
    pages, seeded, the same for every method, in ascending order): one workload each."""
    npages = size // P
    out = []
    for pct in percents:
        k = max(1, round(npages * pct / 100))

        def pick(rng: np.random.Generator, k: int = k) -> list[np.ndarray]:
            return [np.sort(rng.choice(npages, size=k, replace=False))]

        out.append(Workload(
            key=f"big-{pct:g}%", label=f"{fmt_size(size)} {pct:g}%", group="big", npages=npages,
            threads=1, fused=True, rounds=rounds, warmup=0, choose=pick,
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
    counters = {k: v - before[k] for k, v in tracker.stats().items()}  # warm-up round included
    return {
        "counters": counters,
        **figures(wl, raw, base, get_ns, reset_ns),
        "reset_ns": statistics.median(reset_ns) if not wl.fused else None,
        "extra_pages_reported": extra if not tracker.exact else 0,
        "samples": {"per_write_raw_ns": raw, "per_write_base_ns": base, "get_ns": get_ns, "reset_ns": reset_ns},
    }


def figures(wl: Workload, raw: list[float], base: list[float], get_ns: list[int],
            reset_ns: list[int]) -> dict[str, Any]:
    """The medians (and bests) of one workload's rounds, for :func:`measure` and for the
    C reference's driver alike: per-write cost (raw, base, net) and get+reset time."""
    total = [g + r for g, r in zip(get_ns, reset_ns)]
    return {
        "writes": int(wl.params["written"]),
        "per_write_raw_ns": statistics.median(raw),
        "per_write_base_ns": statistics.median(base),
        "per_write_net_ns": statistics.median([a - b for a, b in zip(raw, base)]),
        "per_write_net_best_ns": min(a - b for a, b in zip(raw, base)),
        "get_reset_ns": statistics.median(total),
        "get_reset_best_ns": min(total),
        "get_ns": statistics.median(get_ns),
    }


def groups(workloads: Sequence[Workload]) -> Iterator[tuple[int, list[tuple[int, Workload]]]]:
    """Workloads grouped by region (in order), with their global index."""
    for _, members in itertools.groupby(enumerate(workloads), key=lambda iw: iw[1].group):
        items = list(members)
        yield items[0][1].npages, items


def run(methods: Sequence[str], workloads: Sequence[Workload], seed: int = 1,
        done: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Measure every method on every workload: ``{"results": {method: {workload key:
    measure() result}}, "skipped": {method: why}}``. ``done(method, seconds)`` is called
    after each method (``seconds`` < 0: skipped). The garbage collector is off meanwhile,
    as in ``timeit``."""
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for method in methods:
            why = skip_reason(method)
            if why:
                skipped[method] = why
                if done is not None:
                    done(method, -1.0)
                continue
            t0 = time.monotonic()
            results[method] = {}
            for npages, members in groups(workloads):
                with Region(npages) as region, TRACKERS[method](region) as tracker:
                    for index, wl in members:
                        results[method][wl.key] = measure(tracker, region, wl, seed, index)
                    gc.collect()
            if done is not None:
                done(method, time.monotonic() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"results": results, "skipped": skipped}
