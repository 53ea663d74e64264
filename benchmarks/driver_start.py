"""CPU a training driver spends on imports before its first Ray call, against a rank's.

Every attempt starts a driver, and a driver that restarts after a crash is on the recovery
path. It defines the worker actor class, but a rank's heavy imports (torch, FSDP, DCP) are
deferred to the worker process (`jobs/pretrain/lazy.py`). This imports, each
in a fresh interpreter, `--repeat` times:

- baseline: what a rank imports before it builds its model (`jobs.pretrain.worker` with its
  deferred modules, the model and FSDP);
- driver: what the driver imports (`jobs.pretrain.entry`, `placement`, the `TrainWorker` class).

Prints the median user+system CPU-seconds of each and the ratio driver / baseline (goal <= 0.3:
a driver's start costs a fraction of one rank's).

    python benchmarks/driver_start.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRIVER = "import jobs.pretrain.entry, jobs.pretrain.placement\nfrom jobs.pretrain.worker import TrainWorker"
RANK = f"{DRIVER}\nfrom jobs.pretrain import llama, parallelize, sharded, state\nimport torch.distributed.fsdp"


def cpu_seconds(code: str) -> float:
    """User+system CPU of one fresh interpreter running `code` (its children included)."""
    before = os.times()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
    after = os.times()
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rank, driver = [], []
    for _ in range(args.repeat):  # interleaved: a busy moment weighs on both
        rank.append(cpu_seconds(RANK))
        driver.append(cpu_seconds(DRIVER))
    r, d = statistics.median(rank), statistics.median(driver)
    print(f"rank imports (baseline): {r:.2f} CPU-s   (median of {args.repeat})")
    print(f"driver imports:          {d:.2f} CPU-s")
    print(f"ratio driver/rank: {d / r:.2f}  (goal <= 0.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
