"""Entrypoint of the pretraining job.

python -m jobs.pretrain --run-dir DIR --attempt N [--max-resume-step S] [--skip-steps A:B ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from controlplane.rundir import FencedError, RunDir
from jobs.pretrain.driver import Driver
from jobs.pretrain.events import EXIT_FENCED, EventLog
from jobs.pretrain.logs import capture as capture_output
from jobs.pretrain.schedule import parse_skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.pretrain", description="Pretrain a Llama model on Ray.")
    p.add_argument("--run-dir", required=True, help="The run directory (spec.json inside).")
    p.add_argument("--attempt", type=int, required=True, help="Attempt number (fencing, fault drills).")
    p.add_argument("--max-resume-step", type=int, default=None, help="Resume from a checkpoint at or below S.")
    p.add_argument("--skip-steps", action="append", default=[], help="A:B: skip the batches of steps A..B-1.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = RunDir(Path(args.run_dir).resolve())
    try:
        skips = sorted(parse_skip(s) for s in args.skip_steps)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    try:
        run_dir.check_fence(args.attempt)
    except FencedError as exc:
        print(f"fenced: {exc}")
        return EXIT_FENCED
    capture_output(run_dir, args.attempt, "driver")
    try:
        driver = _start(run_dir, args, skips)
    except Exception as exc:  # before the driver's own loop: the failure event says why, the log has the traceback
        with contextlib.suppress(FencedError, OSError):
            EventLog(run_dir, args.attempt).emit(
                "failure", kind="driver_error", step=None, detail=f"starting: {type(exc).__name__}: {exc}"[:500]
            )
        raise
    return driver.run_job()


def _start(run_dir: RunDir, args: argparse.Namespace, skips: list[tuple[int, int]]) -> Driver:
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {}
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            # Started by hand, not through the Jobs API: the workers import this same code.
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=True, **kwargs)
    return Driver(run_dir, args.attempt, args.max_resume_step, skips)
