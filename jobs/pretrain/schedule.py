"""Pure pieces of the training loop: LR schedule, data position, numerical-fault guard.

No torch, no Ray: unit-tested directly, and shared by the job and the benchmark.

Data position. Each prepared dataset's train shards are cut into windows of `seq_len + 1`
tokens (stride `seq_len`, none crossing a shard); `WindowIndex` holds one seeded permutation of
them, built once. Batch index b holds global positions b*G .. b*G+G-1 (G = global batch); rank r
of n takes positions r*G/n .. (r+1)*G/n-1. A position goes to a dataset of the mixture by the
seeded `Blend` (in the mixture's weights), and to that dataset's k-th sample, which lives in
epoch k // W. So the sample at a position depends only on the seed and the position: never on
the number of workers (a resharded resume trains on the same data) and never on when failures
happened. The batch a step trains on is the data cursor, which advances by one per step and
jumps over skipped batches.
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


BLEND_BLOCK = 4096


def blend_counts(weights: np.ndarray, n: int) -> np.ndarray:
    """How many of the first `n` positions each source takes: floor(w * n) for every source but the
    heaviest, which takes the rest. Non-decreasing in `n` for every source (no Alabama paradox), and
    within 1 sample (the heaviest: within S - 1) of the exact share."""
    counts = np.floor(weights * n).astype(np.int64)
    top = int(np.argmax(weights))
    counts[top] = n - (counts.sum() - counts[top])
    return counts


class Blend:
    """Global position -> (source, index within that source), seeded, in O(block) per lookup.

    Positions are taken in blocks of `block`: block b holds blend_counts(b+1) - blend_counts(b)
    samples of each source in a seeded order (rng([seed, 13, b])), and a source's k-th sample is
    its (counts before the block + rank within the block)-th. Megatron's blend index without
    the index: nothing depends on how many positions a run will ever ask for.
    """

    def __init__(self, weights: list[float], seed: int, block: int = BLEND_BLOCK) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not len(w) or (w <= 0).any():
            raise ValueError(f"mixture weights {weights}: expected positive numbers")
        self.weights = w / w.sum()
        if block * self.weights.max() < len(w) - 1:
            raise ValueError("mixture block too small for this many sources")
        self.seed, self.block = seed, block
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(b)
        if hit is None:
            before = blend_counts(self.weights, b * self.block)
            here = blend_counts(self.weights, (b + 1) * self.block) - before
            order = np.random.default_rng([self.seed, 13, b]).permutation(np.repeat(np.arange(len(here)), here))
            rank = np.empty(self.block, dtype=np.int64)
            for s in range(len(here)):
                sel = order == s
                rank[sel] = before[s] + np.arange(int(sel.sum()))
            if len(self._cache) > 8:
                self._cache.clear()
            hit = self._cache[b] = (order, rank)
        return hit

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = np.empty(len(positions), dtype=np.int64)
        idx = np.empty(len(positions), dtype=np.int64)
        blocks = positions // self.block
        for b in np.unique(blocks):
            sel = blocks == b
            order, rank = self._block(int(b))
            off = positions[sel] % self.block
            src[sel], idx[sel] = order[off], rank[off]
        return src, idx


class WindowIndex:
    """A source's k-th sample -> (shard, window in shard). The shuffle is built once.

    The source's W windows (those of every shard, in shard order) are permuted once with
    rng([seed, 7]) into `perm` (uint32 below 2**32 windows). Epoch e = k // W visits
    perm[(perm[p] + shift_e) % W] for p = k % W (epoch 0: perm[p]), a fresh order per epoch at
    no extra memory. A lookup is O(1) in W: the per-step cost does not grow with the corpus.
    """

    def __init__(self, windows_per_shard: np.ndarray | list[int], seed: int, perm: np.ndarray | None = None) -> None:
        wps = np.asarray(windows_per_shard, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(wps)])
        self.windows = int(self.starts[-1])
        if self.windows < 1:
            raise ValueError("no window of seq_len + 1 tokens in any shard")
        self.seed = seed
        self.perm = build_permutation(self.windows, seed) if perm is None else perm
        if len(self.perm) != self.windows:
            raise ValueError(f"window index has {len(self.perm)} entries for {self.windows} windows")

    def shift(self, epoch: int) -> int:
        return 0 if epoch == 0 else int(np.random.default_rng([self.seed, 9, epoch]).integers(0, self.windows))

    def global_window(self, k: np.ndarray) -> np.ndarray:
        w = self.windows
        epochs, pos = k // w, k % w
        out = np.asarray(self.perm[pos], dtype=np.int64)
        for e in np.unique(epochs):
            if e:
                sel = epochs == e
                out[sel] = self.perm[(out[sel] + self.shift(int(e))) % w]
        return out

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = self.global_window(k)
        shard = np.searchsorted(self.starts, g, side="right") - 1
        return shard, g - self.starts[shard]


def build_permutation(windows: int, seed: int) -> np.ndarray:
    perm = np.random.default_rng([seed, 7]).permutation(windows)
    return perm.astype(np.uint32) if windows < 2**32 else perm


@dataclass(frozen=True)
class Sample:
    source: np.ndarray  # which dataset of the mixture
    shard: np.ndarray  # which train shard of it
    window: np.ndarray  # which window of that shard (tokens window*seq_len .. + seq_len + 1)


class BatchPlan:
    """Where the samples of each batch come from (see the module docstring). Pure, no I/O."""

    def __init__(self, indexes: list[WindowIndex], weights: list[float], global_batch: int, seed: int) -> None:
        if len(indexes) != len(weights):
            raise ValueError("one weight per dataset")
        self.indexes, self.global_batch = indexes, global_batch
        self.blend = Blend(weights, seed) if len(indexes) > 1 else None

    def positions(self, batch_index: int, rank: int, world: int) -> np.ndarray:
        if self.global_batch % world:
            raise ValueError(f"global batch {self.global_batch} does not split over {world} workers")
        per = self.global_batch // world
        first = batch_index * self.global_batch + rank * per
        return np.arange(first, first + per, dtype=np.int64)

    def locate(self, positions: np.ndarray) -> Sample:
        if self.blend is None:
            src, k = np.zeros(len(positions), dtype=np.int64), positions
        else:
            src, k = self.blend.locate(positions)
        shard = np.empty(len(positions), dtype=np.int64)
        window = np.empty(len(positions), dtype=np.int64)
        for s in np.unique(src):
            sel = src == s
            shard[sel], window[sel] = self.indexes[int(s)].locate(k[sel])
        return Sample(src, shard, window)


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
    """A rank whose step time exceeds `factor` x the median of the others, and that median by
    at least `min_excess_s`, for `patience` steps.

    The floor keeps jitter on short steps from counting: a 16 ms step beside an 8 ms one is
    twice as slow and costs nothing worth a report (seen on a shared machine's 10 ms steps).
    """

    def __init__(self, factor: float = 2.0, patience: int = 3, min_excess_s: float = 0.05) -> None:
        self.factor, self.patience, self.min_excess_s = factor, patience, min_excess_s
        self.streak: dict[int, int] = {}

    def observe(self, times: list[float]) -> list[tuple[int, float, float]]:
        """(rank, step_time_s, median_s) for each rank that just completed a streak."""
        found = []
        if len(times) < 2:
            return found
        for rank, t in enumerate(times):
            others = statistics.median(times[:rank] + times[rank + 1 :])
            if others > 0 and t > self.factor * others and t - others >= self.min_excess_s:
                self.streak[rank] = self.streak.get(rank, 0) + 1
                if self.streak[rank] == self.patience:
                    found.append((rank, t, others))
            else:
                self.streak[rank] = 0
        return found
