"""Whether a supervisor runs on a storage root, since when, which runs it guards, its last pass.

The running supervisor rewrites `<storage>/supervisor.status.json` after every pass; whether it
is alive is decided by its lock (`supervisor.pid`, an flock the kernel drops when the process
dies), never by the status file alone. A supervisor that ends (SIGTERM, Ctrl-C, `--once`)
removes both files, and one killed outright leaves files that `read_status` finds unlocked and
removes: a pid shown is always a supervisor that runs.

No Ray, no torch: `llmctl supervise status` answers from two small files.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from controlplane.rundir import write_atomic
from controlplane.supervisor.ports import SupervisorBusy, SupervisorLock


def status_file(storage: Path) -> Path:
    return Path(storage) / "supervisor.status.json"


class PassRecorder:
    """Kept by the supervisor process: one status write per pass."""

    def __init__(self, storage: Path, interval_s: float) -> None:
        self.path = status_file(storage)
        self.started_at = time.time()
        self.interval_s = interval_s
        self.passes = 0

    def record(self, run_ids: list[str]) -> None:
        self.passes += 1
        body = {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "interval_s": self.interval_s,
            "last_pass_at": time.time(),
            "passes": self.passes,
            "runs": sorted(run_ids),
        }
        write_atomic(self.path, json.dumps(body).encode())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def read_status(storage: Path) -> dict[str, Any]:
    """{"running": bool, "pid", "started_at", "last_pass_at", "passes", "runs", "interval_s"}.

    Not running: the lock is free; the files a killed supervisor left behind are removed."""
    lock = SupervisorLock(storage)
    left = lock.holder() is not None or status_file(storage).exists()
    try:
        lock.acquire()
    except SupervisorBusy:
        body: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            body = json.loads(status_file(storage).read_text())
        pid = lock.holder()
        if body.get("pid") != pid:  # it has not finished its first pass yet
            body = {"pid": pid}
        return {"running": True, "started_at": None, "last_pass_at": None, "passes": 0, "runs": [], **body}
    try:
        status_file(storage).unlink(missing_ok=True)
    finally:
        lock.release(remove=True)
    return {"running": False, "pid": None, "stale_cleaned": left}
