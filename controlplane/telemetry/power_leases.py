"""Power leases: per GPU, the power limit llmctl set and the limit it replaced.

A worker that sets a GPU's limit writes `<storage>/telemetry/power-leases/<node>/<gpu uuid>.json`

    {"pid", "pid_start", "pid_ns", "gpu_index", "gpu_uuid", "original_w", "applied_w", "run_dir", "ts"}

and removes it when it restores the limit. A worker SIGKILLed first cannot restore, and its GPU
would stay capped for whoever comes next. So the next `apply_power_policy` on that GPU, and the
node's exporter once a minute, look for leases whose process is gone and put those GPUs back to
`original_w`, but only when the limit is still the one the lease applied (a later change by
someone else is left alone) and only from the same PID namespace as the lease's writer (another
container cannot tell whether that process lives, so it does nothing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from controlplane.procs import pid_alive, proc_start
from controlplane.rundir import write_atomic

log = logging.getLogger(__name__)


def lease_dir(storage_root: str | Path, node: str) -> Path:
    return Path(storage_root).expanduser() / "telemetry" / "power-leases" / node


def _safe(uuid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in uuid) or "gpu"


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def write_lease(directory: Path, gpu_index: int, uuid: str, original_w: float, applied_w: float, run_dir: Any) -> None:
    rec = {
        "pid": os.getpid(),
        "pid_start": proc_start(os.getpid()),
        "pid_ns": _pid_ns(),
        "gpu_index": gpu_index,
        "gpu_uuid": uuid,
        "original_w": original_w,
        "applied_w": applied_w,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "ts": time.time(),
    }
    write_atomic(Path(directory) / f"{_safe(uuid)}.json", json.dumps(rec, indent=1).encode())


def remove_lease(directory: Path, uuid: str) -> None:
    with contextlib.suppress(OSError):
        (Path(directory) / f"{_safe(uuid)}.json").unlink()


def reclaim(directory: Path, nvml: Any, handles: dict[int, Any], uuids: dict[int, str]) -> list[str]:
    """Restore the GPUs (of `handles`, NVML index -> handle) that a dead lease holder left capped.
    Returns one line per GPU restored; never raises."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    by_uuid = {uuid: index for index, uuid in uuids.items() if index in handles}
    done = []
    for path in sorted(directory.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
            index = by_uuid.get(str(rec.get("gpu_uuid")))
            if index is None or rec.get("pid_ns") != _pid_ns():
                continue  # not a GPU of ours, or a process we cannot see
            if pid_alive(int(rec["pid"]), rec.get("pid_start")):
                continue
            handle = handles[index]
            current_w = nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0
            if abs(current_w - float(rec["applied_w"])) <= 1.0:
                nvml.nvmlDeviceSetPowerManagementLimit(handle, int(round(float(rec["original_w"]) * 1000)))
                done.append(
                    f"power: GPU {index} was left at {current_w:.0f} W by pid {rec['pid']}, which is gone; "
                    f"restored to {float(rec['original_w']):.0f} W"
                )
            path.unlink(missing_ok=True)
        except Exception as exc:  # a lease that cannot be read or acted on is left for the next look
            log.warning("power: lease %s not reclaimed: %s", path.name, exc)
    for line in done:
        log.warning("%s", line)
    return done
