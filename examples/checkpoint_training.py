"""Checkpoint a training loop, and resume it in a new process after a crash.

The state is a dict of numpy arrays. Each checkpoint stores only the pages written
since the previous one (the first stores everything); a checkpoint that was cut short
is never mistaken for a complete one. A new process resumes from the newest complete
checkpoint and ends with exactly the weights an uninterrupted run would have.

Run: python examples/checkpoint_training.py DIR [--steps N] [--crash-at N]
     (run it again with the same DIR to resume; it prints a digest of the final weights)
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np

import pagescan
from pagescan.snapshot import Checkpointer, restore

CHECKPOINT_EVERY = 5


def new_state() -> dict[str, np.ndarray]:
    return {
        "weights": pagescan.zeros((512, 1024), dtype=np.float32),   # 2 MiB
        "bias": pagescan.zeros(1024, dtype=np.float32),
        "step": np.zeros(1, dtype=np.int64),                        # small: on the heap
    }


def train_step(state: dict[str, np.ndarray], step: int) -> None:
    """A stand-in for one optimiser step: it updates a few rows, deterministically."""
    rng = np.random.default_rng(step)
    rows = rng.choice(len(state["weights"]), size=8, replace=False)
    state["weights"][rows] += rng.standard_normal((8, 1024), dtype=np.float32)
    state["bias"] *= np.float32(0.99)
    state["step"][0] = step + 1


def run(path: str, steps: int, crash_at: int | None) -> str:
    state = new_state()
    if os.path.exists(path):
        restore(path, state)                   # the newest complete checkpoint
        print(f"resumed at step {int(state['step'][0])}")
    with Checkpointer(path, state) as ck:      # continues an existing file
        for step in range(int(state["step"][0]), steps):
            train_step(state, step)
            if crash_at is not None and step + 1 == crash_at:
                print(f"crashing at step {step + 1}")
                os._exit(1)                    # no clean-up at all, as in a real crash
            if (step + 1) % CHECKPOINT_EVERY == 0:
                info = ck.checkpoint()
                print(f"step {step + 1}: checkpoint {info.generation}, "
                      f"{'full' if info.full else 'incremental'}, {info.bytes >> 10} KiB")
    digest = hashlib.sha256(state["weights"].tobytes() + state["bias"].tobytes()).hexdigest()[:16]
    print(f"done at step {int(state['step'][0])}, weights {digest}")
    return digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--crash-at", type=int, default=None)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    run(os.path.join(args.dir, "train.ckpt"), args.steps, args.crash_at)


if __name__ == "__main__":
    main()
