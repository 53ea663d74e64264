"""Pure pieces of the training loop: LR schedule, data position, numerical-fault guard.

No torch, no Ray: unit-tested directly, and shared by the job and the benchmark.

Data position. The prepared `train.bin` is cut into W windows of `seq_len + 1` tokens
(stride `seq_len`). Batch index b holds global samples b*G .. b*G+G-1 (G = global batch);
sample i lives in epoch i // W at position i % W of that epoch's seeded permutation. Rank r of
n takes samples r*G/n .. (r+1)*G/n-1 of the batch. The batch a step trains on is the data
cursor, which advances by one per step and jumps over skipped windows, so the order of
batches depends only on the seed and the skip list, never on when failures happened.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based): linear warmup then decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def parse_skip(spec: str) -> tuple[int, int]:
    """'A:B' -> (A, B): the batches of global steps A..B-1 are skipped."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--skip-steps {spec!r}: expected A:B with integers") from None
    if a < 0 or b <= a:
        raise ValueError(f"--skip-steps {spec!r}: expected 0 <= A < B")
    return a, b


def advance_cursor(cursor: int, skips: list[tuple[int, int]]) -> int:
    """The batch index after `cursor`, jumping over skipped ranges."""
    nxt = cursor + 1
    return skip_forward(nxt, skips)


def skip_forward(cursor: int, skips: list[tuple[int, int]]) -> int:
    moved = True
    while moved:
        moved = False
        for a, b in skips:
            if a <= cursor < b:
                cursor, moved = b, True
    return cursor


@dataclass(frozen=True)
class BatchPlan:
    """Where the samples of each batch come from (see the module docstring)."""

    n_tokens: int
    seq_len: int
    global_batch: int
    seed: int

    @property
    def windows(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7, epoch]).permutation(self.windows)

    def sample_windows(self, batch_index: int, rank: int, world: int) -> np.ndarray:
        per = self.global_batch // world
        first = batch_index * self.global_batch + rank * per
        ids = np.arange(first, first + per, dtype=np.int64)
        out = np.empty(per, dtype=np.int64)
        for epoch in np.unique(ids // self.windows):
            sel = ids // self.windows == epoch
            out[sel] = self.permutation(int(epoch))[ids[sel] % self.windows]
        return out

    def batch(self, tokens: np.ndarray, batch_index: int, rank: int, world: int) -> np.ndarray:
        """[per_rank, seq_len + 1] int64 token ids of this rank's share of the batch."""
        starts = self.sample_windows(batch_index, rank, world) * self.seq_len
        return np.stack([np.asarray(tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])


class NumericGuard:
    """NaN/Inf, or a loss above `factor` x the median of the last `window` losses."""

    def __init__(self, factor: float, window: int, min_history: int | None = None) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)
        self.min_history = min_history if min_history is not None else max(3, window // 2)

    def check(self, loss: float) -> str | None:
        """'nan_loss', 'loss_spike' or None; only good losses enter the window."""
        if not math.isfinite(loss):
            return "nan_loss"
        if len(self.history) >= self.min_history and loss > self.factor * statistics.median(self.history):
            return "loss_spike"
        self.history.append(loss)
        return None

    def state(self) -> list[float]:
        return list(self.history)

    def load(self, history: list[float]) -> None:
        self.history.clear()
        self.history.extend(history)


class StragglerDetector:
    """A rank whose step time exceeds `factor` x the median of the others for `patience` steps."""

    def __init__(self, factor: float = 2.0, patience: int = 3) -> None:
        self.factor, self.patience = factor, patience
        self.streak: dict[int, int] = {}

    def observe(self, times: list[float]) -> list[tuple[int, float, float]]:
        """(rank, step_time_s, median_s) for each rank that just completed a streak."""
        found = []
        if len(times) < 2:
            return found
        for rank, t in enumerate(times):
            others = statistics.median(times[:rank] + times[rank + 1 :])
            if others > 0 and t > self.factor * others:
                self.streak[rank] = self.streak.get(rank, 0) + 1
                if self.streak[rank] == self.patience:
                    found.append((rank, t, others))
            else:
                self.streak[rank] = 0
        return found
