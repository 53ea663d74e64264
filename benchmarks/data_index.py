"""Per-step data cost of the job's `TrainData.batch` at 1M vs 100M windows: flat in corpus size.

Builds two prepared-dataset layouts whose shards are sparse files (holes read as zeros, so a
100M-window corpus of 12.8G tokens costs no disk), opens each with the job's `TrainData`
(memory-mapped shards; the window index built once at start), then times `batch(b, rank,
world)` over many batch indexes spread through the first epochs. Prints the one-off index
build, the per-step cost of each size and their ratio (flat: about 1.0), and for reference what
rebuilding a permutation every step (the previous scheme) costs at 1M windows.

    python benchmarks/data_index.py [--small 1000000] [--large 100000000] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from jobs.pretrain.dataset import TrainData  # noqa: E402

SEQ = 128
SHARDS = 64


def sparse_dataset(root: Path, windows: int) -> Path:
    """A format-2 dataset of SHARDS sparse uint16 shards holding `windows` windows in all."""
    (root / "shards").mkdir(parents=True)
    per = windows // SHARDS
    tokens = per * SEQ + 1
    shards = []
    for k in range(SHARDS):
        name = f"{k:05d}-train"
        with open(root / "shards" / f"{name}.bin", "wb") as f:
            f.truncate(tokens * 2)
        shards.append({"split": "train", "source": "synthetic", "name": name, "tokens": tokens, "docs": 1})
    meta = {"format": 2, "vocab_size": 4096, "dtype": "uint16", "train_tokens": tokens * SHARDS, "shards": shards}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def per_step(td: TrainData, steps: int, world: int = 8) -> tuple[float, float]:
    """Median seconds per global batch: (index lookups only, lookups + token reads)."""
    rng = np.random.default_rng(0)
    batches = rng.integers(0, 10 * td.indexes[0].windows // td.global_batch, steps)
    index, full = [], []
    for b in batches:
        t0 = time.perf_counter()
        for r in range(world):
            td.plan.locate(td.plan.positions(int(b), r, world))
        t1 = time.perf_counter()
        for r in range(world):
            td.batch(int(b), r, world)
        index.append(t1 - t0)
        full.append(time.perf_counter() - t1)
    return statistics.median(index), statistics.median(full)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=1_000_000)
    p.add_argument("--large", type=int, default=100_000_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--global-batch", type=int, default=256)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="data-index-") as tmp:
        for label, windows in (("small", args.small), ("large", args.large)):
            root = sparse_dataset(Path(tmp) / label, windows)
            t0 = time.perf_counter()
            td = TrainData([(root, 1.0)], SEQ, args.global_batch, seed=0)
            build = time.perf_counter() - t0
            results[label] = per_step(td, args.steps)
            print(
                f"{td.indexes[0].windows:>12,} windows: index built once in {build:.2f}s; per step (global batch "
                f"{args.global_batch}, 8 ranks): index {results[label][0] * 1e3:.3f} ms, with token reads "
                f"{results[label][1] * 1e3:.3f} ms"
            )
            del td
    (si, sf), (li, lf) = results["small"], results["large"]
    print(f"ratio large/small per-step cost: index {li / si:.2f}, with token reads {lf / sf:.2f} (flat = 1.0)")
    t0 = time.perf_counter()
    for e in range(5):
        np.random.default_rng([0, 7, e]).permutation(args.small)
    rebuild = (time.perf_counter() - t0) / 5
    print(f"for reference, rebuilding a {args.small:,}-window permutation each step: {rebuild * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
