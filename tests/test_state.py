"""Checkpoints of Python state (issue 11): named arrays, exact bytes, load(), lazy loads.

Real processes, real files, real memory. What is checked:

* the issue's example in two fresh Python processes (``subprocess``): a training loop
  checkpoints a state of big and tiny arrays; a new process makes many small
  allocations, then restores into arrays surrounded by canary bytes (in an arena and
  on the malloc heap): bit-exact, every canary intact; ``load`` in a third process;
* round trips of every dtype kind, 0-d and empty arrays, an entry beyond 2 GiB of
  state, bytes-like entries, mapping vs sequence, a chain of generations;
* objects sharing pages accepted, sharing bytes refused (naming both); non-contiguous,
  non-buffer, non-string keys, resized and closed objects, entries that do not match;
* ``load(lazy=True)``: first touch under the GIL, many threads, the handler killed
  (SIGBUS, no hang, no wrong data); the working set recorded and prefetched first;
  ``lazy_restore`` into heap arrays (eager edges, lazy interiors, canaries intact);
* hostile files (issue 9.9): header values with valid digests but out of range are
  refused before any allocation; FIFOs (9.10) refused without blocking; a damaged
  metadata or working-set section; version 2 (pagescan 0.1) files read;
* ``pagescan.empty/zeros/*_like``; the CLI's ``checkpoint inspect`` and ``load --check``.
"""

from __future__ import annotations

import gc
import hashlib
import errno
import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap
import tempfile
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pagescan
import pagescan.cli
from pagescan._uapi import libc
from pagescan._uapi.mman import MADV
from pagescan.snapshot import (
    CheckpointError,
    Checkpointer,
    CorruptCheckpointError,
    compact,
    inspect,
    lazy_restore,
    load,
    restore,
    verify,
)
from pagescan.snapshot import _format as fmt
from pagescan.snapshot._store import Store

from .conftest import requires_wp_async
from .memory import P
from .procs import run_in_child, wait_gone
from .test_snapshot import kill_handler_expect_sigbus, wait_go

pytestmark = requires_wp_async


def digest(a: Any) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(a)).cast("B") if isinstance(a, np.ndarray)
                           else bytes(a)).hexdigest()


def raw(a: np.ndarray) -> bytes:
    return a.tobytes()


def run_python(code: str, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (fail the test on an error)."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"status {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


# -- the issue's example, in fresh processes -------------------------------------------

WRITER = """
    import hashlib, json, sys
    import numpy as np
    from pagescan.snapshot import Checkpointer
    path, form = sys.argv[1:] if len(sys.argv) > 2 else (PATH, FORM)
    rng = np.random.default_rng(11)
    state = {"weights": rng.random(1 << 20), "grad": np.zeros(1 << 18),
             "step": np.zeros(1, np.int64), "lr": np.array([0.1])}
    arg = state if form == "mapping" else [state[k] for k in sorted(state)]
    with Checkpointer(path, arg) as ck:
        for step in range(1, 6):  # a training loop
            state["grad"][:] = rng.random(state["grad"].size) if step % 2 else 0
            state["weights"][rng.integers(0, 1 << 20, 100)] -= 0.01
            state["step"][0] = step
            state["lr"][0] *= 0.5
            ck.checkpoint()
    print(json.dumps({k: hashlib.blake2b(v.tobytes()).hexdigest() for k, v in state.items()}))
"""

RESTORER = """
    import hashlib, json
    import numpy as np
    from pagescan.snapshot import restore
    path, form = PATH, FORM
    junk = [np.full(int(n), 0x3C, np.uint8) for n in np.random.default_rng(5).integers(1, 300, 20000)]
    junk += [bytearray(b"\\x3c" * 40) for _ in range(5000)]
    sizes = {"weights": (1 << 20, np.float64), "grad": (1 << 18, np.float64), "step": (1, np.int64), "lr": (1, np.float64)}
    # Targets inside an arena of canary bytes (exact neighbours on both sides) ...
    arena = np.full(sum(n * np.dtype(t).itemsize for n, t in sizes.values()) + 64 * len(sizes), 0xCC, np.uint8)
    state, off = {}, 24
    for k, (n, t) in sizes.items():
        nb = n * np.dtype(t).itemsize
        state[k] = arena[off : off + nb].view(t)
        off += nb + 40
    # ... and on the malloc heap, each between two small canary arrays.
    heap, fences = {}, []
    for k, (n, t) in sizes.items():
        fences.append(np.full(3, 0xC3C3C3C3C3C3C3C3, np.uint64))
        heap[k] = np.empty(n, t)
        fences.append(np.full(3, 0xC3C3C3C3C3C3C3C3, np.uint64))
    before = arena.copy()
    for st in (state, heap):
        restore(path, st if form == "mapping" else [st[k] for k in sorted(st)])
    mask = np.ones(arena.size, bool)
    off = 24
    for k, (n, t) in sizes.items():
        nb = n * np.dtype(t).itemsize
        mask[off : off + nb] = False
        off += nb + 40
    ok_arena = bool((arena[mask] == before[mask]).all())
    ok_fences = all(bool((f == 0xC3C3C3C3C3C3C3C3).all()) for f in fences)
    ok_junk = all(bool((j == 0x3C).all()) for j in junk[:20000]) and all(b == bytearray(b"\\x3c" * 40) for b in junk[20000:])
    print(json.dumps({"state": {k: hashlib.blake2b(v.tobytes()).hexdigest() for k, v in state.items()},
                      "heap": {k: hashlib.blake2b(v.tobytes()).hexdigest() for k, v in heap.items()},
                      "step": int(state["step"][0]), "lr": float(heap["lr"][0]),
                      "canaries": [ok_arena, ok_fences, ok_junk]}))
"""


@pytest.mark.parametrize("form", ["sequence", "mapping"])
def test_issue_example_in_fresh_processes_exact_bytes_and_canaries(tmp_path: Path, form: str) -> None:
    path = str(tmp_path / "train.ck")
    sub = {"PATH": repr(path), "FORM": repr(form)}
    code_w = WRITER.replace("PATH", sub["PATH"]).replace("FORM", sub["FORM"])
    want = json.loads(run_python(code_w))
    got = json.loads(run_python(RESTORER.replace("PATH", sub["PATH"]).replace("FORM", sub["FORM"])))
    assert got["canaries"] == [True, True, True], "bytes outside the targets were written"
    assert got["state"] == want and got["heap"] == want
    assert got["step"] == 5 and got["lr"] == 0.1 / 32
    loaded = json.loads(run_python(f"""
        import hashlib, json
        from pagescan.snapshot import load
        st = load({path!r})
        items = st.items() if isinstance(st, dict) else zip(sorted({list(want)!r}), st)
        print(json.dumps({{k: [hashlib.blake2b(v.tobytes()).hexdigest(), str(v.dtype), list(v.shape),
                           v.ctypes.data % {P}] for k, v in items}}))
    """))
    for k, (h, dt, shape, align) in loaded.items():
        assert h == want[k] and align == 0, k
    assert loaded["step"][1:3] == ["int64", [1]]


# -- round trips -----------------------------------------------------------------------


def every_dtype(rng: np.random.Generator) -> dict[str, np.ndarray]:
    padded = np.dtype([("a", "u1"), ("b", "<f8"), ("c", ">i2")], align=True)  # padding after a and c
    s = np.zeros(37, padded)
    s["a"], s["b"], s["c"] = rng.integers(0, 255, 37), rng.random(37), rng.integers(-999, 999, 37)
    out: dict[str, np.ndarray] = {
        "bool": rng.random(1001) < 0.5,
        "i1": rng.integers(-128, 127, 17, dtype=np.int8),
        "u2": rng.integers(0, 65535, 5000, dtype=np.uint16),
        "i4": rng.integers(-(1 << 31), 1 << 31, (30, 7), dtype=np.int32),
        "u8": rng.integers(0, 1 << 63, 3, dtype=np.uint64),
        "f2": rng.random(9).astype(np.float16),
        "f4": rng.random((4, 5, 6)).astype(np.float32),
        "f8": rng.random(5000),
        "c8": (rng.random(11) + 1j * rng.random(11)).astype(np.complex64),
        "c16": rng.random(3) + 1j,
        "M8": np.array(["2026-12-02T07:15", "1970-01-01", "NaT"], "M8[ms]"),
        "m8": np.array([1, -5, 1 << 40], "m8[us]"),
        "struct": s,
        ">i8": np.arange(100, dtype=">i8"),
        ">f4": rng.random(13).astype(">f4"),
        "U": np.array(["grüße", "x", "日本語テキスト"]),
        "S": np.array([b"ab", b"\x00\xff"], "S2"),
        "V": np.frombuffer(rng.bytes(30), "V10"),
        "0d": np.array(2.5),
        "empty": np.zeros(0, np.int32),
        "empty2d": np.zeros((3, 0), np.float64),
    }
    return out


def test_every_dtype_kind_round_trips_through_a_chain(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    state = every_dtype(rng)
    path = tmp_path / "dtypes.ck"
    history = []
    with Checkpointer(path, state) as ck:
        for step in range(3):
            if step:
                state["f8"][step * 100] = -1.0
                state["struct"]["c"][3] = step
                state["U"][1] = "ü" * step
                state["0d"][()] = step
                state["M8"][0] += np.timedelta64(step, "D")
            ck.checkpoint()
            history.append({k: raw(v) for k, v in state.items()})
    info = inspect(path)
    assert [e["name"] for e in info["entries"]] == list(state)
    # Continued with the keys in another order: entries matched by name.
    backwards = dict(reversed(list(state.items())))
    with Checkpointer(path, backwards) as ck:
        state["i4"][0, 0] = 77
        ck.checkpoint()  # full again (a new Checkpointer)
    history.append({k: raw(v) for k, v in state.items()})
    for g, want in enumerate(history, 1):
        got = load(path, g)
        assert isinstance(got, dict) and list(got) == list(state) and got.generation == g
        for k, v in state.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert raw(got[k]) == want[k], (g, k)
            assert got[k].ctypes.data % P == 0 and got[k].flags.writeable and got[k].flags.c_contiguous
        fresh = {k: np.zeros_like(v) for k, v in state.items()}
        assert restore(path, fresh, g) == g
        assert all(raw(fresh[k]) == want[k] for k in state)
    assert load(path)["struct"].dtype == state["struct"].dtype  # the padding survives (itemsize, offsets)


def test_bytes_like_entries_and_sequences(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    ba = bytearray(rng.bytes(5000))
    mm = mmap.mmap(-1, 3 * P)
    mm[:] = rng.bytes(3 * P)
    ro = bytes(rng.bytes(77))
    arr = rng.random(10)
    path = tmp_path / "seq.ck"
    with Checkpointer(path, [ba, mm, ro, arr]) as ck:
        ck.checkpoint()
        with pytest.raises(BufferError):
            ba.extend(b"x")  # the Checkpointer holds the buffer: no resize under it
        ba[4999] ^= 1
        ck.checkpoint()
    got = load(path)
    assert isinstance(got, list) and [a.dtype for a in got] == [np.uint8, np.uint8, np.uint8, np.float64]
    assert [bytes(a) for a in got[:3]] == [bytes(ba), mm[:], ro] and raw(got[3]) == raw(arr)
    ba2, mm2, arr2 = bytearray(5000), mmap.mmap(-1, 3 * P), np.empty(10)
    with pytest.raises(ValueError, match="entry 2: the buffer is read-only"):
        restore(path, [ba2, mm2, bytes(77), arr2])
    restore(path, [ba2, mm2, bytearray(77), arr2])
    assert ba2 == ba and mm2[:] == mm[:] and raw(arr2) == raw(arr)
    with pytest.raises(CheckpointError, match="do not match.*holds a sequence"):
        restore(path, {"a": ba2})
    mm.close()
    mm2.close()


def test_entry_beyond_2_gib_of_state(tmp_path: Path) -> None:
    big = pagescan.zeros((2 << 30) + P, np.uint8)  # never written: zero pages, no memory
    tail = np.arange(1000, dtype=np.int64)
    state = {"big": big, "tail": tail}
    path = tmp_path / "big.ck"
    with Checkpointer(path, state) as ck:
        ck.checkpoint()
        big[(2 << 30) + 5] = 9  # byte offset beyond 2**31
        tail[999] = -1
        info = ck.checkpoint()
        assert info.pages <= 3
    assert os.path.getsize(path) < 32 << 20  # zero chunks take no data
    got = load(path)
    assert got["big"][(2 << 30) + 5] == 9 and int(got["big"][: 1 << 20].sum()) == 0
    assert raw(got["tail"]) == raw(tail)
    del got, big
    gc.collect()


# -- what is accepted, what is refused -------------------------------------------------


def test_shared_pages_accepted_shared_bytes_refused(tmp_path: Path) -> None:
    arena = np.arange(30000, dtype=np.float64)
    path = tmp_path / "share.ck"
    with pytest.raises(ValueError, match=r"'x'.*'y'.*overlap"):
        Checkpointer(path, {"x": arena[:16000], "y": arena[15000:]})
    with pytest.raises(ValueError, match=r"entry 0.*entry 1.*overlap"):
        Checkpointer(path, [arena[10:20], arena[15:30]])
    assert not path.exists()
    x, y = arena[:15001], arena[15001:]  # share a page, not a byte
    with Checkpointer(path, {"x": x, "y": y, "tiny": np.ones(1), "tiny2": np.ones(1)}) as ck:
        ck.checkpoint()
        y[0] = -7.0
        info = ck.checkpoint()
        assert info.pages <= 8  # chunks around the written page (and the heap pages of the tiny ones)
    got = load(path)
    assert raw(got["x"]) == raw(x) and raw(got["y"]) == raw(y) and got["y"][0] == -7.0


def test_bad_state_is_refused_naming_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "bad.ck"
    a = np.zeros((10, 10))
    cases: list[tuple[Any, type[Exception], str]] = [
        ({1: np.zeros(3)}, TypeError, "keys must be str"),
        ({"a": "text"}, TypeError, "entry 'a': expected a buffer"),
        ({"a": 3}, TypeError, "entry 'a'"),
        ({"a": np.uint64(5)}, TypeError, "entry 'a'"),
        ({"a": a[:, ::2]}, ValueError, "entry 'a'.*not C-contiguous"),
        ({"a": a.T}, ValueError, "entry 'a'.*not C-contiguous"),
        ({"o": np.array([object()])}, TypeError, "entry 'o'.*object"),
        ([np.zeros(3), "x"], TypeError, "entry 1"),
        (np.zeros(3), TypeError, "state must be"),
        ("abc", TypeError, "state must be"),
        ({}, ValueError, "no entries"),
    ]
    for state, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            Checkpointer(path, state)
    closed = mmap.mmap(-1, P)
    closed.close()
    with pytest.raises(ValueError, match="entry 'm'"):
        Checkpointer(path, {"m": closed})
    assert not path.exists()


def test_entries_that_do_not_match_are_refused_before_any_write(tmp_path: Path) -> None:
    path = tmp_path / "m.ck"
    state = {"a": np.arange(100.0), "b": np.arange(10, dtype=np.int32)}
    with Checkpointer(path, state) as ck:
        ck.checkpoint()
    h = hashlib.blake2b(path.read_bytes()).hexdigest()
    bad = [
        ({"a": np.zeros(101), "b": np.zeros(10, np.int32)}, "'a' is 808 bytes here and 800"),
        ({"a": np.zeros(100), "b": np.zeros(5, np.int64)}, "'b' is int64 .* int32"),
        ({"a": np.zeros(100)}, "missing: 'b'"),
        ({"a": np.zeros(100), "b": np.zeros(10, np.int32), "c": np.zeros(1)}, "not in the checkpoint: 'c'"),
        ([np.zeros(100), np.zeros(10, np.int32)], "holds a mapping"),
    ]
    for st, msg in bad:
        before = {k: raw(v) for k, v in st.items()} if isinstance(st, dict) else None
        for fn in (lambda s: restore(path, s), lambda s: Checkpointer(path, s),
                   lambda s: lazy_restore(path, s).__enter__()):
            with pytest.raises(CheckpointError, match=msg):
                fn(st)
        if before is not None:
            assert {k: raw(v) for k, v in st.items()} == before
    ro = {"a": np.zeros(100), "b": np.zeros(10, np.int32)}
    ro["a"].flags.writeable = False
    with pytest.raises(ValueError, match="'a'.*read-only"):
        restore(path, ro)
    assert hashlib.blake2b(path.read_bytes()).hexdigest() == h


def test_restore_pid_argument_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "pid.ck"
    with Checkpointer(path, [np.zeros(10)]) as ck:
        ck.checkpoint()
    for bad, exc in (("x", TypeError), (1.5, TypeError), (True, TypeError), (0, ValueError), (-3, ValueError)):
        with pytest.raises(exc, match="pid"):
            restore(path, [np.zeros(10)], pid=bad)


# -- lazy loads ------------------------------------------------------------------------


def lazy_state(path: Path, seed: int, npages: int = 2048) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {"big": pagescan.empty((npages, P // 8)), "small": np.arange(7, dtype=np.int16),
             "mid": rng.random(3000)}
    state["big"][:] = rng.random(state["big"].shape)
    state["big"][100:200] = 0
    with Checkpointer(path, state) as ck:
        ck.checkpoint()
        state["big"][::9] += 1
        ck.checkpoint()
    return state


class _Flags:
    c_contiguous = writeable = True


class _LiesAboutData(np.ndarray):
    """Says its data is elsewhere (``__array_interface__``)."""

    @property
    def __array_interface__(self) -> dict[str, Any]:
        d = dict(np.asarray(self).__array_interface__)
        d["data"] = (int(d["data"][0]) + (1 << 20), False)
        return d


class _LiesAboutFlags(np.ndarray):
    @property  # type: ignore[misc]
    def flags(self) -> Any:
        return _Flags()


class _LiesAboutSize(np.ndarray):
    @property  # type: ignore[misc]
    def nbytes(self) -> int:
        return 512 * 8

    @property  # type: ignore[misc]
    def shape(self) -> tuple[int, ...]:
        return (512,)


class _LiesAboutDtype(np.ndarray):
    @property  # type: ignore[misc]
    def dtype(self) -> Any:
        return np.dtype(np.uint64)


class _LongTuple(tuple):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 2


def test_buffers_that_misstate_what_they_are_are_judged_by_their_real_memory(tmp_path: Path) -> None:
    """What the kernel and pagescan write through is taken from the object's real buffer,
    never from attributes a subclass can override: a lying address, contiguity, size or
    dtype cannot steer a restore outside the object or over object references (in 0.2,
    each of these crashed the interpreter). A memoryview of an object array is refused
    like the array."""
    path = tmp_path / "lies.ck"
    src = np.arange(512, dtype=np.uint64)  # one 4 KiB entry
    with Checkpointer(path, [src]) as ck:
        ck.checkpoint()

    def outcome(make: Callable[[], Any]) -> Callable[[], str]:
        def body() -> str:
            t = make()
            try:
                restore(path, [t])
            except (TypeError, ValueError, CheckpointError) as err:
                return f"{type(err).__name__}: {err}"
            return "restored"
        return body

    base = np.zeros(1024, np.uint64)
    assert run_in_child(outcome(lambda: memoryview(np.zeros(512, object)))).startswith(("TypeError", "ValueError"))
    assert run_in_child(outcome(lambda: np.zeros(512, object).view(_LiesAboutDtype))).startswith(
        ("TypeError", "ValueError"))
    assert run_in_child(outcome(lambda: base[::-2].view(_LiesAboutFlags))).startswith("ValueError")
    assert run_in_child(outcome(lambda: np.zeros(2, np.uint64).view(_LiesAboutSize))).startswith("CheckpointError")

    def lying_address() -> bytes:
        real = np.zeros(512, np.uint64)
        restore(path, [real.view(_LiesAboutData)])  # into its real memory, exactly
        return real.tobytes()

    assert run_in_child(lying_address) == src.tobytes()
    # A region pair is read by the tuple's real items, whatever __len__ says.
    with pytest.raises(TypeError, match="pair"):
        restore(path, [_LongTuple((src.ctypes.data,))])
    # With pid, pairs are exact but still two ints each.
    for bad in [(src.ctypes.data, 4096, "junk"), (float(src.ctypes.data), 4096.0), (str(src.ctypes.data), "4096"),
                ()]:
        with pytest.raises(TypeError, match="pair"):
            restore(path, [bad], pid=os.getpid())
    # Items of object references in any buffer: refused naming the entry.
    import ctypes
    with pytest.raises(TypeError, match="entry 'objs'.*object references"):
        Checkpointer(tmp_path / "objs.ck", {"objs": (ctypes.py_object * 2)()})
    # A dtype numpy cannot describe (overlapping fields) is refused naming the entry.
    odd = np.zeros(4, np.dtype({"names": ["a", "b"], "formats": ["<u4", "<u4"], "offsets": [0, 2],
                                "itemsize": 8}))
    with pytest.raises(ValueError, match=r"odd.*dtype"):
        Checkpointer(tmp_path / "odd.ck", {"odd": odd})


def test_a_state_of_empty_arrays_checkpoints_with_threads_running(tmp_path: Path) -> None:
    """Nothing to track is a state too: with another thread alive (the helper paths),
    synchronous, background and with progress, each checkpoint seals a generation."""
    path = tmp_path / "empty.ck"
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        state = {"empty": np.zeros((0, 3)), "also": np.zeros(0, np.int8)}
        with Checkpointer(path, state) as ck:
            ck.checkpoint()
            ck.checkpoint(wait=False).result(30)
            ck.checkpoint(progress=lambda done, total: None)
    finally:
        stop.set()
        other.join()
    assert len(inspect(path)["generations"]) == 3
    got = load(path)
    assert got["empty"].shape == (0, 3) and got["also"].dtype == np.int8 and got["also"].size == 0


def test_a_signal_handler_touching_the_target_while_lazy_restore_starts_does_not_hang(tmp_path: Path) -> None:
    """A Python signal handler (or a finalizer) that reads the target while
    ``lazy_restore`` starts runs after the handler process is serving: before, a touch
    between the registration and the fork of the server waited for ever."""
    path = tmp_path / "sig.ck"
    a = pagescan.zeros(2 << 20, np.uint8)
    a[:] = 0x33
    with Checkpointer(path, {"a": a}) as ck:
        ck.checkpoint()

    def body() -> int:
        seen = []
        signal.signal(signal.SIGALRM, lambda s, f: seen.append(int(a[::4096].sum())))
        try:
            for i in range(60):
                signal.setitimer(signal.ITIMER_REAL, 0.0001 * (1 + i % 20), 0)
                try:
                    with lazy_restore(path, {"a": a}) as fh:
                        assert fh.wait(30)
                except FileExistsError:
                    pass  # touched between drop and registration: the documented refusal
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        assert all(v == 0x33 * 512 for v in seen)
        return len(seen)

    assert run_in_child(body, timeout=90) > 0


def test_verify_checks_sections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``verify`` (and ``pagescan checkpoint verify``) check every sealed section too: a
    damaged payload, and a working-set record that a lazy load would refuse (a length
    not a multiple of 8, a chunk outside the entries), are errors, not "ok"."""
    path = tmp_path / "sec.ck"
    lazy_state(path, 4, npages=64)
    with Store(path, writable=True, lock=True) as store:
        total = store.total_pages
        store.append_section(fmt.SECTION_WORKING_SET, 2, np.arange(5, dtype="<u8").tobytes())
    assert len(verify(path)) == 2
    assert pagescan.cli.main(["checkpoint", "verify", str(path)]) == 0
    assert "1 section(s)" in capsys.readouterr().out
    good = path.read_bytes()
    with Store(path) as store:
        payload = store.sections[0].payload_offset
    data = bytearray(good)
    data[payload + 3] ^= 0x40  # a flipped bit in the payload: its digest no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="section of type 1 .* damaged"):
        verify(path)
    assert pagescan.cli.main(["checkpoint", "verify", str(path)]) == 1
    assert "CorruptCheckpointError" in capsys.readouterr().err
    for bad, why in [(b"\0" * 12, "length 12"), (np.array([total], "<u8").tobytes(), "outside the entries")]:
        path.write_bytes(good)
        with Store(path, writable=True, lock=True) as store:
            store.append_section(fmt.SECTION_WORKING_SET, 2, bad)
        with pytest.raises(CorruptCheckpointError, match=why):
            verify(path)


def test_lazy_load_first_touch_under_the_gil_and_threads(tmp_path: Path) -> None:
    path = tmp_path / "lazy.ck"
    want = lazy_state(path, 3)
    t0 = time.perf_counter()
    got = load(path, lazy=True)
    first = float(got["big"][1000, 3])  # a fault taken while holding the GIL
    took = time.perf_counter() - t0
    assert first == want["big"][1000, 3] and took < 5
    fh = got.handler
    assert fh is not None and got["big"].ctypes.data % P == 0
    big = got["big"]
    errors: list[int] = []
    barrier = threading.Barrier(8)

    def toucher(k: int) -> None:
        barrier.wait()
        for row in range(k, big.shape[0], 8):
            if not np.array_equal(big[row], want["big"][row]):
                errors.append(row)

    threads = [threading.Thread(target=toucher, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    assert raw(got["small"]) == raw(want["small"]) and raw(got["mid"]) == raw(want["mid"])
    assert fh.wait(30)
    hpid = fh.pid
    del got, big
    gc.collect()
    wait_gone([hpid] if hpid else [])


def test_lazy_load_handler_killed_is_sigbus_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "kill.ck"
    want = lazy_state(path, 4, npages=1024)

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        got = load(path, lazy=True, prefetch=False)
        fh = got.handler
        assert fh is not None
        ok = np.array_equal(got["big"][0], want["big"][0])  # served before the kill: right data
        report(struct.pack("iii", fh.pid, fh.guardian_pid, int(ok)).hex().encode())
        wait_go(go_r)
        _ = float(got["big"][900].sum())  # never served: SIGBUS, not zeros, not a hang
        report(b"!read " + (b"zeros" if not got["big"][900].any() else b"data"))

    kill_handler_expect_sigbus(body)


def present_pages(a: np.ndarray) -> np.ndarray:
    """Indices of the pages of ``a`` present in memory (PAGEMAP_SCAN)."""
    lo = a.ctypes.data
    res = pagescan.scan(lo, lo + a.nbytes, category_mask=int(pagescan.Category.PRESENT), return_mask=0)
    return pagescan.regions_to_pages(res.regions).astype(np.int64) // P - lo // P  # type: ignore[no-any-return]


def test_working_set_is_recorded_then_prefetched_first(tmp_path: Path) -> None:
    path = tmp_path / "ws.ck"
    npages = 4096
    lazy_state(path, 5, npages=npages)
    rng = np.random.default_rng(6)
    hot = rng.choice(npages, 300, replace=False)  # the program's touches, in a fixed order
    got = load(path, lazy=True)  # not recording (the default): no section
    vals = [float(got["big"][r, 0]) for r in hot]
    assert got.handler is not None and got.handler.wait(30)
    del got
    gc.collect()
    assert inspect(path)["sections"] == []
    # A recording run: every first touch faults and is recorded, in order, saved when
    # the arrays are gone.
    got = load(path, lazy=True, record=True)
    big = got["big"]
    assert [float(big[r, 0]) for r in hot] == vals
    _ = float(big[hot[0], 1])  # touched again: recorded once
    assert got.handler is not None and not got.handler.wait(0.05)  # no prefetch while recording
    del got, big
    gc.collect()
    secs = inspect(path)["sections"]
    assert [(s["type"], s["generation"]) for s in secs] == [("working-set", 2)]
    with Store(path) as st:
        rec = np.frombuffer(st.read_section(st.sections[0]), "<u8").astype(np.int64)
    assert rec.tolist() == hot.tolist(), "not the pages touched, in first-touch order"

    # Next run without address-order prefetch: the recorded pages arrive with no fault,
    # and nothing else does.
    got = load(path, lazy=True, prefetch=False)
    big = got["big"]
    deadline = time.monotonic() + 20
    while not np.isin(rec, have := present_pages(big)).all() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert np.isin(rec, have).all(), "the working set was not prefetched"
    assert np.setdiff1d(have, rec).size == 0, "pages outside the working set were fetched"
    assert [float(big[r, 0]) for r in hot] == vals
    del got, big
    gc.collect()
    assert len(inspect(path)["sections"]) == 1  # not recording: nothing added


def test_lazy_restore_into_heap_arrays_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "heap.ck"
    rng = np.random.default_rng(7)
    state = {"w": rng.random(50_000), "s": np.arange(3, dtype=np.int64), "b": rng.random(700)}
    with Checkpointer(path, state) as ck:
        ck.checkpoint()
    arena = np.full(400_000 + 5_600 + 24 + 3 * 64, 0xEE, np.uint8)
    targets, off = {}, 8
    for k, v in state.items():
        targets[k] = arena[off : off + v.nbytes].view(v.dtype)
        off += v.nbytes + 64
    before = arena.copy()
    fence = np.full(3, 7, np.int64)
    small = np.empty(3, np.int64)
    fence2 = np.full(3, 7, np.int64)
    with lazy_restore(path, {"w": targets["w"], "s": small, "b": targets["b"]}) as fh:
        assert raw(targets["w"]) == raw(state["w"])
        assert raw(small) == raw(state["s"]) and raw(targets["b"]) == raw(state["b"])
        assert fh.wait(30)
    mask = np.ones(arena.size, bool)
    for k in ("w", "b"):
        s = targets[k].ctypes.data - arena.ctypes.data
        mask[s : s + targets[k].nbytes] = False
    assert (arena[mask] == before[mask]).all(), "bytes around the targets changed"
    assert (fence == 7).all() and (fence2 == 7).all()


def test_lazy_restore_block_ends_with_every_page_in(tmp_path: Path) -> None:
    """A block that touches nothing and does not call wait(): with prefetch, its end
    waits for the handler, so every page reads the checkpoint afterwards (before: the
    handler was stopped and the first touch after the block was SIGBUS)."""
    path = tmp_path / "ends.ck"
    rng = np.random.default_rng(12)
    want = rng.integers(1, 256, 512 * P, dtype=np.uint8)
    with Checkpointer(path, {"a": want}) as ck:
        ck.checkpoint()

    def body() -> bytes:
        a = pagescan.zeros(512 * P, np.uint8)
        with lazy_restore(path, {"a": a}) as fh:
            pass
        assert fh.progress() == (512, 512) and not fh.failed
        return bytes(a[::P]) + bytes(a[-P:])

    got = run_in_child(body)
    assert got == bytes(want[::P]) + bytes(want[-P:])


@pytest.mark.parametrize("how", ["no-prefetch", "exception"])
def test_lazy_restore_block_leaves_no_page_poisoned(tmp_path: Path, how: str) -> None:
    """Without prefetch, or when the block ends by an exception, its end brings the
    pages nobody touched in (before: the handler was stopped and the guardian poisoned
    them; a target on the malloc heap, once freed, left SIGBUS in whatever malloc put
    there next -- unrelated objects crashed the interpreter)."""
    path = tmp_path / "heap.ck"
    want = np.random.default_rng(3).random(12_500)  # 100 kB: on the malloc heap
    with Checkpointer(path, {"a": want}) as ck:
        ck.checkpoint()

    def body() -> bool:
        a = np.zeros_like(want)
        try:
            with lazy_restore(path, {"a": a}, prefetch=how != "no-prefetch") as fh:
                if how == "exception":
                    raise KeyError("left early")
        except KeyError:
            pass
        assert fh.progress() == (fh.total_pages, fh.total_pages) and not fh.failed
        assert raw(a) == raw(want)
        del a
        junk = [bytearray(200_000) for _ in range(64)]  # malloc hands the memory out again
        return len(junk) == 64

    assert run_in_child(body)


# -- hostile and foreign files ---------------------------------------------------------


def rewrite_header(path: Path, **fields: int) -> None:
    """Rewrite file header fields with a valid digest (a hostile but well-formed header)."""
    data = bytearray(path.read_bytes())
    magic, version, page_size, n, r, meta, b, c, d, _ = fmt.FILE_HEADER.unpack(bytes(data[:64]))
    vals = dict(version=version, page_size=page_size, nentries=n, meta_bytes=meta)
    vals.update(fields)
    head = fmt.FILE_HEADER.pack(magic, vals["version"], vals["page_size"], vals["nentries"], r, vals["meta_bytes"],
                                b, c, d, b"\0" * 8)
    data[:64] = head[:-8] + fmt.digest(head[:-8])
    path.write_bytes(bytes(data))


def rewrite_table(path: Path, lengths: list[int]) -> None:
    data = bytearray(path.read_bytes())
    table = np.asarray(lengths, "<u8").tobytes()
    data[64 : 64 + len(table) + 8] = table + fmt.digest(table)
    path.write_bytes(bytes(data))


def test_hostile_header_values_are_range_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "ok.ck"
    with Checkpointer(src, [pagescan.zeros(4 * P, np.uint8)]) as ck:
        ck.checkpoint()
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        (dict(page_size=(1 << 31) - 8), CheckpointError, "page size"),
        (dict(page_size=P * 2), CheckpointError, "page size"),
        (dict(nentries=(1 << 32) - 1), CorruptCheckpointError, "do not fit"),
        (dict(meta_bytes=1 << 62), CorruptCheckpointError, "do not fit"),
        (dict(version=1), CheckpointError, "version 1"),
        (dict(version=fmt.VERSION + 1), CheckpointError, f"version {fmt.VERSION + 1}"),
    ]
    for i, (fields, exc, msg) in enumerate(cases):
        p = tmp_path / f"h{i}.ck"
        p.write_bytes(src.read_bytes())
        rewrite_header(p, **fields)
        t0 = time.perf_counter()
        for fn in (inspect, verify, compact, load, lambda q: restore(q, [np.zeros(4 * P, np.uint8)])):
            with pytest.raises(exc, match=msg):
                fn(p)
        assert pagescan.cli.main(["checkpoint", "compact", str(p)]) != 0
        assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pagescan: " in err
    # Entry lengths of 2**62 bytes with valid digests: damage, found before any allocation.
    for lengths in ([1 << 62], [1 << 56, 1 << 56, 1 << 56]):
        p = tmp_path / "len.ck"
        p.write_bytes(src.read_bytes())
        rewrite_table(p, lengths[:1])
        with pytest.raises(CorruptCheckpointError):
            compact(p)
        with pytest.raises(CorruptCheckpointError):
            load(p)


def test_fifo_and_other_non_regular_paths_never_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    for fn in (inspect, verify, compact, load, lambda q: restore(q, [np.zeros(3)]),
               lambda q: Checkpointer(q, [np.zeros(3)]), lambda q: lazy_restore(q, [np.zeros(3)]).__enter__()):
        with pytest.raises(CheckpointError, match="not a regular file"):
            fn(fifo)
    for fn in (inspect, load, lambda q: Checkpointer(q, [np.zeros(3)])):
        with pytest.raises(CheckpointError, match="directory"):
            fn(tmp_path)
    assert time.perf_counter() - t0 < 5
    r = subprocess.run([sys.executable, "-m", "pagescan", "checkpoint", "inspect", str(fifo)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "not a regular file" in r.stderr
    with pytest.raises(CheckpointError, match="not a regular file"):
        Checkpointer("/dev/null", [np.zeros(3)])


def test_checkpointer_starts_in_an_existing_empty_file(tmp_path: Path) -> None:
    """An empty file made beforehand (``tempfile.mkstemp``, ``touch``) is started in
    place, keeping its inode and mode (before: "not a pagescan checkpoint (bad
    magic)"); readers still refuse it, saying it is empty; a file with anything in it
    that is not a checkpoint is still refused by the writer, unchanged."""
    fd, name = tempfile.mkstemp(dir=tmp_path, suffix=".ck")
    os.close(fd)
    os.chmod(name, 0o600)
    before = os.stat(name)
    for read in (inspect, load, verify):
        with pytest.raises(CheckpointError, match="is empty"):
            read(name)
    state = {"a": np.arange(5000, dtype=np.int64)}
    with Checkpointer(name, state) as ck:
        ck.checkpoint()
        state["a"][7] = -1
        ck.checkpoint()
    after = os.stat(name)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert raw(load(name)["a"]) == raw(state["a"]) and len(inspect(name)["generations"]) == 2
    other = tmp_path / "other"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="bad magic"):
        Checkpointer(other, state)
    assert other.read_bytes() == b"x"


def test_damaged_metadata_and_working_set_sections(tmp_path: Path) -> None:
    path = tmp_path / "meta.ck"
    lazy_state(path, 8, npages=64)
    got = load(path, lazy=True, record=True)
    _ = float(got["big"][40, 0])
    del got
    gc.collect()
    with Store(path) as st:
        meta_off = 64 + 8 * len(st.entries) + 8
        sec = st.sections[0]
    data = bytearray(path.read_bytes())
    data[sec.payload_offset] ^= 0xFF  # the working set only: loads still work (no prefetch hint)
    path.write_bytes(bytes(data))
    got = load(path, lazy=True)
    assert got.handler is not None and got.handler.wait(30)
    assert float(got["big"][40, 0]) == float(load(path)["big"][40, 0])
    del got
    gc.collect()
    data[meta_off + 5] ^= 0x01
    path.write_bytes(bytes(data))
    for fn in (inspect, load, verify):
        with pytest.raises(CorruptCheckpointError, match="entry metadata is damaged"):
            fn(path)


def write_v2(path: Path, pages: np.ndarray) -> None:
    """A version 2 (pagescan 0.1) file of one region and one full generation, byte by byte."""
    n = len(pages)
    head = fmt.FILE_HEADER.pack(fmt.MAGIC_FILE, 2, P, 1, 0, 0, 0, 0, 0, b"\0" * 8)
    head = head[:-8] + fmt.digest(head[:-8])
    table = np.asarray([n * P], "<u8").tobytes()
    out = head + table + fmt.digest(table)
    off = len(out)
    index = np.zeros(n, fmt.INDEX_DTYPE)
    index["page"] = np.arange(n)
    index["kind"] = fmt.KIND_DATA
    index["checksum"] = fmt.page_checksums(pages)
    index["check"] = fmt.entry_checks(index, 1)
    idx = index.tobytes()
    gh = fmt.GEN_HEADER.pack(fmt.MAGIC_GEN, 1, n, n, 0, len(idx), 0, b"\0" * 8)
    gh = gh[:-8] + fmt.digest(gh[:-8])
    length = 64 + len(idx) + n * P
    cm = fmt.COMMIT.pack(fmt.MAGIC_COMMIT, 1, off, length, fmt.digest(idx), gh[-8:], 0, b"\0" * 8)
    cm = cm[:-8] + fmt.digest(cm[:-8])
    path.write_bytes(out + gh + idx + pages.tobytes() + cm)


def test_version_2_files_are_read_not_continued(tmp_path: Path) -> None:
    path = tmp_path / "v2.ck"
    pages = np.random.default_rng(9).integers(0, 256, (5, P), dtype=np.uint8)
    write_v2(path, pages)
    assert inspect(path)["version"] == 2
    verify(path)
    got = load(path)
    assert isinstance(got, list) and got[0].dtype == np.uint8 and bytes(got[0]) == pages.tobytes()
    tgt = pagescan.empty(5 * P, np.uint8)
    restore(path, [tgt])
    assert bytes(tgt) == pages.tobytes()
    with pytest.raises(CheckpointError, match="version 2"):
        Checkpointer(path, [tgt])
    # A lazy load that records its working set leaves a version 2 file as it is (a
    # section appended to it would read as a damaged generation to every reader).
    lazy = load(path, lazy=True, record=True)
    assert bytes(lazy[0][:P]) == pages[0].tobytes()
    del lazy
    gc.collect()
    verify(path)
    assert bytes(load(path)[0]) == pages.tobytes()
    with Store(path, writable=True, lock=True) as store, pytest.raises(CheckpointError, match="version 2"):
        store.append_section(fmt.SECTION_WORKING_SET, 1, b"\0" * 8)
    compact(path)  # rewrites it in the current version
    assert inspect(path)["version"] == fmt.VERSION and bytes(load(path)[0]) == pages.tobytes()


# -- page-owning arrays ----------------------------------------------------------------


def mapped(addr: int) -> tuple[int, int] | None:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return lo, hi
    return None


def test_page_owning_arrays() -> None:
    a = pagescan.zeros((3, 1000), np.float32)
    assert a.shape == (3, 1000) and a.dtype == np.float32 and a.ctypes.data % P == 0 and not a.any()
    vma = mapped(a.ctypes.data)
    assert vma is not None and vma[1] >= a.ctypes.data + a.nbytes  # (the kernel may merge it with neighbours)
    b = pagescan.empty_like(a)
    c = pagescan.zeros_like(np.zeros((2, 2), ">i4"))
    assert b.shape == a.shape and b.dtype == a.dtype and c.dtype == np.dtype(">i4") and not c.any()
    e = pagescan.empty(0)
    assert e.size == 0 and e.dtype == np.float64
    d = pagescan.empty(5, [("x", "u1"), ("y", "<f8")])
    assert d.dtype.itemsize == 9
    with pytest.raises(TypeError):
        pagescan.empty(3, object)
    for huge in ((2**40, 2**40), 2**62, (2**31,) * 3):  # numpy says ValueError too; never OverflowError
        with pytest.raises(ValueError, match="too big"):
            pagescan.zeros(huge)
    with pytest.raises(ValueError, match="negative"):
        pagescan.zeros((2, -1))
    with pytest.raises(TypeError):
        pagescan.zeros(2.5)  # type: ignore[arg-type]
    addr = a.ctypes.data
    v = a[1:]
    del a
    gc.collect()
    assert mapped(addr) is not None  # a view keeps the mapping
    del v
    gc.collect()
    assert mapped(addr) is None  # unmapped with the last view


# -- CLI -------------------------------------------------------------------------------


def test_cli_inspect_entries_and_load_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.ck"
    state = {"weights": pagescan.zeros((4, 512)), "step": np.array([3], np.int64),
             "when": np.array(["2026-01-01"], "M8[D]")}
    with Checkpointer(path, state) as ck:
        ck.checkpoint()
        state["step"][0] = 4
        ck.checkpoint()
    assert pagescan.cli.main(["checkpoint", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("weights", "float64", "(4, 512)", "16384", "step", "int64", "(1,)", "datetime64[D]", "full"):
        assert text in out, text
    assert pagescan.cli.main(["checkpoint", "inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in info["entries"]] == ["weights", "step", "when"] and len(info["generations"]) == 2
    assert pagescan.cli.main(["checkpoint", "load", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "verified: 2 generation(s)" in out and "loaded generation 2" in out
    assert pagescan.cli.main(["checkpoint", "load", str(path), "--json", "-g", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["generation"] == 1
    data = bytearray(path.read_bytes())
    with Store(path) as st:
        g = st.generations[0]
        off = int(st.data_offsets(g)[np.flatnonzero(st.data_offsets(g) >= 0)[0]])
    data[off + 3] ^= 0x10
    path.write_bytes(bytes(data))
    assert pagescan.cli.main(["checkpoint", "load", str(path), "--check"]) == 1
    assert "CorruptCheckpointError" in capsys.readouterr().err


def test_lazy_restore_refuses_a_private_mapping_of_a_memfd(tmp_path: Path) -> None:
    """A ``MAP_PRIVATE`` mapping of a memfd takes MISSING faults, but once its private
    copies are dropped a touch maps the file's own page, raising no fault: the file's
    bytes would show through, silently. Refused with ``ValueError`` before anything is
    touched; eager ``restore`` into it is exact; ``MAP_SHARED`` of it is served lazily."""
    n = 8 * P
    src = pagescan.zeros(n, np.uint8)
    src[:] = 0x22
    path = tmp_path / "memfd.ck"
    with Checkpointer(path, {"a": src}) as ck:
        ck.checkpoint()
    fd = os.memfd_create("pagescan-test")
    try:
        os.ftruncate(fd, n)
        os.pwrite(fd, b"\x11" * n, 0)
        private = mmap.mmap(fd, n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        tgt = np.frombuffer(private, np.uint8)
        tgt[:] = 0x33  # private copies
        with pytest.raises(ValueError, match="private mapping"), lazy_restore(path, {"a": tgt}):
            pass
        assert (tgt == 0x33).all()  # nothing dropped
        restore(path, {"a": tgt})
        assert (tgt == 0x22).all()
        del tgt
        private.close()
        shared = mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        sh = np.frombuffer(shared, np.uint8)
        with lazy_restore(path, {"a": sh}, prefetch=False) as fh:
            assert (sh == 0x22).all()
            assert fh.wait(10)
        del sh
        shared.close()
    finally:
        os.close(fd)


_LOADS_UNDER_SIGNALS = r"""
import os, signal, sys, time
import numpy as np
import pagescan
from pagescan.snapshot import Checkpointer, load, restore
P, path = 4096, sys.argv[1]
src = pagescan.zeros(256 * P, np.uint8)
src[:] = np.arange(src.size) % 251
with Checkpointer(path, {"a": src}) as ck:
    ck.checkpoint()
bad, busy, seen = [0], [False], [0]
def handler(sig, frame):
    if busy[0]:
        return
    busy[0] = True
    try:
        seen[0] += 1
        r = load(path, lazy=True)
        bad[0] += not np.array_equal(r["a"], src)
        del r
        tgt = pagescan.zeros(256 * P, np.uint8)
        restore(path, {"a": tgt})
        bad[0] += not np.array_equal(tgt, src)
    finally:
        busy[0] = False
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
t0, n = time.monotonic(), 0
while time.monotonic() - t0 < 3:
    r = load(path, lazy=True)
    bad[0] += not np.array_equal(r["a"], src)
    del r
    n += 1
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print(n, seen[0], bad[0])
"""


def test_lazy_loads_in_a_signal_handler_during_lazy_loads_neither_hang_nor_differ(tmp_path: Path) -> None:
    """A signal handler that makes lazy loads and restores, every 2 ms, while the main
    thread makes lazy loads (each forks its handler): a signal never runs a handler
    inside the fork's at-fork hooks, where a second fork would wait for the hooks'
    locks for good; every load is exact."""
    out = subprocess.run([sys.executable, "-c", _LOADS_UNDER_SIGNALS, str(tmp_path / "sig.ck")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    loads, signals, bad = map(int, out.stdout.split())
    assert loads > 10 and signals > 10 and bad == 0


def test_lazy_restore_records_and_uses_a_working_set(tmp_path: Path) -> None:
    path = tmp_path / "lrws.ck"
    rng = np.random.default_rng(12)
    arena = np.zeros(64 * P + 16, np.uint8)
    state = {"a": arena[8 : 8 + 64 * P]}  # not page aligned: its pages straddle two chunks
    state["a"][:] = rng.integers(0, 256, 64 * P, dtype=np.uint8)
    want = state["a"].copy()
    with Checkpointer(path, state) as ck:
        ck.checkpoint()
    state["a"][:] = 0
    touch = [40 * P, 3 * P, 20 * P]
    with lazy_restore(path, state, prefetch=False, record=True) as fh:
        assert [int(state["a"][i]) for i in touch] == [int(want[i]) for i in touch]
        deadline = time.monotonic() + 5  # (the count is updated just after the copy wakes us)
        while fh.progress()[0] < len(touch) and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)
        assert fh.progress()[0] == len(touch)  # recording: only what was touched
    assert np.array_equal(state["a"], want)  # the end of the block brought in the rest
    with Store(path) as st:
        rec = np.frombuffer(st.read_section(st.sections[-1]), "<u8").astype(np.int64)
    # The page holding byte i of the entry starts in chunk (i - 8) // P + ... : the chunk of
    # the page's first byte, in first-touch order.
    first_byte = [((state["a"].ctypes.data + i) // P * P) - state["a"].ctypes.data for i in touch]
    assert rec.tolist() == [b // P for b in first_byte]
    state["a"][:] = 0
    with lazy_restore(path, state, prefetch=False) as fh:
        deadline = time.monotonic() + 20
        while fh.progress()[0] < len(touch) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert fh.progress()[0] == len(touch)  # the recorded pages, and nothing else, came in
        assert np.array_equal(state["a"], want)
        assert fh.wait(30)


def _vmas_over(lo: int, hi: int) -> int:
    """How many VMAs of this process meet ``[lo, hi)``."""
    n = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        a, b = (int(x, 16) for x in line.split()[0].split("-"))
        n += a < hi and b > lo
    return n


@pytest.mark.parametrize("record", [True, False], ids=["record", "prefetch"])
@pytest.mark.parametrize("advice", [MADV.HUGEPAGE, MADV.DONTDUMP], ids=["hugepage", "dontdump"])
def test_lazy_restore_into_a_target_split_across_vmas(tmp_path: Path, advice: MADV, record: bool) -> None:
    """A target whose pages lie in several VMAs (flags differing): on the malloc heap,
    numpy leaves ``MADV_HUGEPAGE`` on the memory of a big array it freed, and a later
    array may straddle its edge. The kernel resolves a span within one VMA only (ENOENT
    across the boundary): the handler's windows and prefetch spans crossing it must be
    split, never taken as gone (pages marked served, never filled: zeros at the end)."""
    path = tmp_path / "vmas.ck"
    rng = np.random.default_rng(5)
    arena = pagescan.zeros(66 * P, np.uint8)  # a mapping of its own: the VMAs are ours to cut
    state = {"a": arena[8 : 8 + 64 * P]}  # lazy pages: arena pages 1..63 (handler pages 0..62)
    state["a"][:] = rng.integers(1, 256, 64 * P, dtype=np.uint8)  # no zero byte: a zero page shows
    want = state["a"].copy()
    with Checkpointer(path, state) as ck:
        ck.checkpoint()
    state["a"][:] = 0
    base = arena.ctypes.data
    try:
        libc.madvise(base + 28 * P, 30 * P, advice)  # handler pages 27..56: off every window's alignment
    except OSError as err:
        if advice == MADV.HUGEPAGE and err.errno == errno.EINVAL:
            pytest.skip("needs transparent huge pages (CONFIG_TRANSPARENT_HUGEPAGE); "
                        f"this kernel is {os.uname().release}")
        raise
    assert _vmas_over(base, base + 66 * P) == 3
    with lazy_restore(path, state, prefetch=True, record=record) as fh:
        assert int(state["a"][20 * P]) == int(want[20 * P])
        if not record:
            assert fh.wait(30)
    assert np.array_equal(state["a"], want)


def test_lazy_restore_split_across_vmas_handler_killed_is_sigbus(tmp_path: Path) -> None:
    """The guardian poisons the empty pages of a target that spans several VMAs: a run of
    empty pages crossing a VMA boundary is refused whole by UFFDIO_POISON (ENOENT), so it
    must be split; unpoisoned, the pages would read zeros once the guardian exits."""
    path = tmp_path / "vmas-kill.ck"
    rng = np.random.default_rng(6)
    want = rng.integers(1, 256, 64 * P, dtype=np.uint8)
    with Checkpointer(path, {"a": want}) as ck:
        ck.checkpoint()

    def body(report: Callable[[bytes], None], go_r: int) -> None:
        arena = pagescan.zeros(66 * P, np.uint8)
        a = arena[8 : 8 + 64 * P]
        libc.madvise(arena.ctypes.data + 28 * P, 30 * P, MADV.DONTDUMP)  # handler pages 27..56
        assert _vmas_over(arena.ctypes.data, arena.ctypes.data + 66 * P) == 3
        with lazy_restore(path, {"a": a}, prefetch=False) as fh:
            ok = int(a[3 * P]) == int(want[3 * P])
            report(struct.pack("iii", fh.pid, fh.guardian_pid, int(ok)).hex().encode())
            wait_go(go_r)  # the parent has killed the handler
            _ = int(a[40 * P])  # never served, in the middle VMA: SIGBUS, not zeros, not a hang
            report(b"!read " + (b"zeros" if not a[40 * P : 41 * P].any() else b"data"))

    kill_handler_expect_sigbus(body)


def test_a_key_that_is_not_valid_unicode_is_refused_by_name(tmp_path: Path) -> None:
    """The file stores names as UTF-8: a key with a lone surrogate (``os.fsdecode`` of
    bytes that are not UTF-8) was a bare ``UnicodeEncodeError`` from deep in the writer."""
    from pagescan.snapshot import Checkpointer

    with pytest.raises(ValueError, match="not valid Unicode"):
        Checkpointer(tmp_path / "k.ck", {"a\udc80": np.zeros(4)})
    assert not (tmp_path / "k.ck").exists()


@pytest.mark.parametrize("threads", [False, True], ids=["one-python-thread", "two-python-threads"])
def test_memory_other_mappings_write_is_in_every_generation(tmp_path: Path, threads: bool) -> None:
    """State in shared memory (a memfd mapped twice, shared with a forked child) and in
    a private file mapping (pages the file's writes show through until copied on write):
    writes through another mapping, by another process or by ``write(2)`` fault nothing
    in this process's page tables, so write tracking never saw them and every later
    generation lacked them (before: 0 pages stored, load gave the old bytes for good).
    Such pages are stored in every generation; private anonymous state stays
    incremental. With another thread running, the shared state takes the ptrace path,
    which copies those pages in the stop."""
    fd = os.memfd_create("state")
    os.ftruncate(fd, 4 * P)
    shared = mmap.mmap(fd, 4 * P)
    alias = mmap.mmap(fd, 4 * P)
    shared[:] = b"\x01" * (4 * P)
    backing = tmp_path / "file.bin"
    backing.write_bytes(b"\x05" * (4 * P))
    with open(backing, "r+b") as f:
        private = mmap.mmap(f.fileno(), 4 * P, flags=mmap.MAP_PRIVATE)
    anon = pagescan.zeros(64 * P, np.uint8)
    state = {"shared": shared, "private": private, "anon": anon}
    stop = threading.Event()
    other = threading.Thread(target=stop.wait) if threads else None
    try:
        if other is not None:
            other.start()
        path = tmp_path / "c.ck"
        with Checkpointer(path, state) as ck:
            ck.checkpoint()
            alias[P : P + 8] = b"\x02" * 8  # another mapping of the same pages
            pid = os.fork()
            if pid == 0:
                shared[2 * P] = 3  # the child's mapping of them
                os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
            os.pwrite(fd, b"\x04", 3 * P)  # write(2) to the memfd
            with open(backing, "r+b") as f:
                os.pwrite(f.fileno(), b"\x06" * 8, 2 * P)  # shows through the private mapping
            anon[5 * P] = 9
            info = ck.checkpoint()
            assert info.method == "ptrace" or not threads  # (alone: "direct" where this is the only thread)
            assert info.pages == 4 + 4 + 1, "the other mappings' pages, and the one anonymous page written"
        got = load(path)
        assert bytes(got["shared"]) == shared[:] and got["shared"][P] == 2 and got["shared"][3 * P] == 4
        assert bytes(got["private"]) == private[:] and got["private"][2 * P] == 6
        assert bytes(got["anon"]) == bytes(anon)
    finally:
        stop.set()
        if other is not None:
            other.join()
        for m in (shared, alias, private):
            m.close()
        os.close(fd)


def test_an_array_given_new_memory_is_never_written_or_read_at_its_old_place(tmp_path: Path) -> None:
    """``ndarray.__setstate__`` moves an array's data (and frees the old block) though
    pagescan holds a buffer export: a restore's progress callback that did it had the
    next batch written into the freed block (an unrelated bytearray filled with the
    checkpoint's bytes); a Checkpointer went on tracking and reading the old block."""
    path = tmp_path / "moved.ck"
    a = np.zeros(1024 * P, np.uint8)  # one restore batch (BATCH_PAGES) before the callback
    b = np.full(8 * P, 0xAB, np.uint8)
    with Checkpointer(path, {"a": a, "b": b}) as ck:
        ck.checkpoint()

    def body() -> bool:
        b[:] = 0
        victims: list[bytearray] = []

        def progress(done: int, total: int) -> None:
            if done < total:
                b.__setstate__(np.zeros(8 * P, np.uint8).__reduce__()[2])  # b moves; its block is freed
                victims.extend(bytearray(8 * P) for _ in range(32))  # (one may take it)

        with pytest.raises(ValueError, match="entry 'b': the array was given new memory during the restore"):
            restore(path, {"a": a, "b": b}, progress=progress)
        assert not any(v.count(0xAB) for v in victims), "a freed block was written"
        with Checkpointer(tmp_path / "other.ck", {"b": b}) as ck2:
            ck2.checkpoint()
            b.__setstate__(np.ones(8 * P, np.uint8).__reduce__()[2])
            with pytest.raises(ValueError, match="entry 'b': the array was given new memory since"):
                ck2.checkpoint()
        return True

    assert run_in_child(body)


def test_a_temporary_subclass_view_as_state(tmp_path: Path) -> None:
    """An entry that is a temporary view of a subclass (``x.view(Sub)``): nothing but
    the Checkpointer holds it, so the live address word must (before: the object was
    collected, the word read freed memory, and checkpoint() said the array had moved)."""

    class Sub(np.ndarray):
        pass

    x = pagescan.zeros(4 * P, np.uint8)
    x[:] = 7
    with Checkpointer(tmp_path / "sub.ck", {"a": x.view(Sub)}) as ck:
        gc.collect()
        junk = [np.empty(0, np.uint8).view(Sub) for _ in range(2000)]  # objects of its size: its memory, reused
        ck.checkpoint()
        x[P] = 8
        assert ck.checkpoint().pages == 1 and len(junk) == 2000
    assert raw(load(tmp_path / "sub.ck")["a"]) == raw(x)


_GUARD_AND_ALIASED = """
import mmap, os, sys
import numpy as np
import pagescan
from pagescan import MADV
from pagescan._uapi import libc
from pagescan.snapshot import Checkpointer, load
P = mmap.PAGESIZE
fd = os.memfd_create("state")
os.ftruncate(fd, 4 * P)
m1, m2 = mmap.mmap(fd, 4 * P), mmap.mmap(fd, 4 * P)  # the state's mapping, and another
s = np.frombuffer(m1, np.uint8)
g = pagescan.zeros(4 * P, np.uint8)
with Checkpointer(sys.argv[1], {"s": s, "g": g}) as ck:
    ck.checkpoint()
    m2[0] = 0x42
    libc.madvise(g.ctypes.data + P, P, MADV.GUARD_INSTALL)  # not armed yet: the fast path reports it
    info = ck.checkpoint()
    assert info.method == "direct", info.method
print(load(sys.argv[1])["s"][0])
"""


def test_the_direct_fast_path_retry_keeps_the_aliased_pages(tmp_path: Path) -> None:
    """The "direct" checkpoint's fast path met a new guard page and redid its chunk list
    without it, leaving out the pages of memory other mappings write (those are in
    every generation): that generation had the old byte."""
    if not pagescan.capabilities().guard_regions:
        pytest.skip("needs MADV_GUARD_INSTALL (Linux 6.13)")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # one thread: "direct"
    r = subprocess.run([sys.executable, "-c", _GUARD_AND_ALIASED, str(tmp_path / "g.ck")], capture_output=True,
                       text=True, timeout=60, env=env, check=False)
    assert r.returncode == 0 and r.stdout.strip() == str(0x42), r.stderr[-2000:]
