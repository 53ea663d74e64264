"""Where the job opens its training tokens: prepared datasets -> `batch(batch_index, rank, world)`.

`TrainData` memory-maps every train shard of every dataset of the run (one, or a weighted
mixture), builds each dataset's window index once (kept beside the shards in `index/` when the
directory is writable, so every worker of a node maps the same pages, else in memory) and
answers the step loop's one question: the int64 tokens [per_rank, seq_len + 1] of this rank's
share of a global batch. Where the samples come from is `schedule.BatchPlan` (pure).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from controlplane.data.store import TokenStore, _advise_random, read_meta
from jobs.pretrain.schedule import BatchPlan, WindowIndex, build_permutation

INDEX_DIR = "index"


class TrainData:
    def __init__(self, datasets: list[tuple[str | Path, float]], seq_len: int, global_batch: int, seed: int) -> None:
        if not datasets:
            raise ValueError("no dataset")
        self.seq_len = seq_len
        self.stores = [TokenStore(d, "train") for d, _ in datasets]
        self.meta = self.stores[0].meta
        indexes = []
        for (d, _), store in zip(datasets, self.stores, strict=True):
            wps = store.windows_per_shard(seq_len)
            total = int(wps.sum())
            if total < 1:
                raise ValueError(f"{d}: {store.tokens} train tokens, no window of seq_len + 1 = {seq_len + 1}")
            indexes.append(WindowIndex(wps, seed, perm=_cached_permutation(Path(d), total, seq_len, seed)))
        self.indexes = indexes
        self.plan = BatchPlan(indexes, [w for _, w in datasets], global_batch, seed)

    @property
    def global_batch(self) -> int:
        return self.plan.global_batch

    def batch(self, batch_index: int, rank: int, world: int) -> np.ndarray:
        """[per_rank, seq_len + 1] int64 token ids of this rank's share of the batch."""
        s = self.plan.locate(self.plan.positions(batch_index, rank, world))
        n = self.seq_len + 1
        out = np.empty((len(s.source), n), dtype=np.int64)
        for i, (src, shard, w) in enumerate(zip(s.source, s.shard, s.window, strict=True)):
            start = int(w) * self.seq_len
            out[i] = self.stores[int(src)].shard(int(shard))[start : start + n]
        return out


def open_train_data(job: dict[str, Any], seq_len: int, global_batch: int, seed: int) -> TrainData:
    """The job record's datasets: `datasets` [[dir, weight], ...] or the single `dataset_dir`."""
    pairs = job.get("datasets") or [[job["dataset_dir"], 1.0]]
    return TrainData([(d, float(w)) for d, w in pairs], seq_len, global_batch, seed)


def dataset_meta(job: dict[str, Any]) -> dict[str, Any]:
    """The first dataset's manifest: the tokenizer (vocabulary, special ids) every dataset shares."""
    return read_meta(job["dataset_dir"])


def _cached_permutation(dataset: Path, windows: int, seq_len: int, seed: int) -> np.ndarray:
    meta_sha = read_meta(dataset).get("tokenizer_sha256", "v1")[:12]
    path = dataset / INDEX_DIR / f"windows-{windows}-s{seq_len}-seed{seed}-{meta_sha}.npy"
    with contextlib.suppress(OSError, ValueError):
        perm = np.load(path, mmap_mode="r")
        if perm.shape == (windows,):
            _advise_random(perm)
            return perm
    perm = build_permutation(windows, seed)
    with contextlib.suppress(OSError):
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, perm)
        os.replace(tmp, path)  # every writer writes the same bytes: a race is harmless
    return perm
