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


def compare(description: str, baseline: tuple[str, str], measured: tuple[str, str], goal: float) -> int:
    """Median CPU-seconds of two snippets, each run `--repeat` times in fresh interpreters,
    interleaved (a busy moment of the machine weighs on both), and their ratio against `goal`.
    Each of `baseline` and `measured` is (what it is, its code)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeat", type=int, default=5)
    repeat = p.parse_args().repeat
    runs: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        runs[0].append(cpu_seconds(baseline[1]))
        runs[1].append(cpu_seconds(measured[1]))
    base, other = statistics.median(runs[0]), statistics.median(runs[1])
    width = max(len(baseline[0]) + 11, len(measured[0]))
    print(f"{baseline[0] + ' (baseline)':{width}}: {base:.2f} CPU-s   (median of {repeat})")
    print(f"{measured[0]:{width}}: {other:.2f} CPU-s")
    print(f"ratio: {other / base:.2f}  (goal <= {goal})")
    return 0


def main() -> int:
    return compare(__doc__.splitlines()[0], ("rank imports", RANK), ("driver imports", DRIVER), goal=0.3)


if __name__ == "__main__":
    sys.exit(main())
