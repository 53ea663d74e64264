"""Where this machine's telemetry exporters listen, so a Prometheus can find them.

Each `llmctl telemetry serve` registers its metrics URL under
`<storage>/telemetry/exporters/` while it runs (its pid and the pid's start time with it) and
removes the record when it stops; `llmctl dashboards targets` lists the records whose process
still runs, beside the live runs' training endpoints. On Kubernetes the exporters are a
DaemonSet that the ServiceMonitor finds instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from controlplane.procs import pid_alive, proc_start
from controlplane.rundir import write_atomic


def _dir(storage_root: str | Path) -> Path:
    return Path(storage_root) / "telemetry" / "exporters"


def register(storage_root: str | Path, node: str, url: str) -> Path:
    """Record this process's exporter at `url`; returns the record's path (remove it on stop)."""
    pid = os.getpid()
    path = _dir(storage_root) / f"{node}-{pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"node": node, "url": url, "pid": pid, "pid_start": proc_start(pid)}
    write_atomic(path, json.dumps(record).encode())
    return path


def live(storage_root: str | Path) -> list[dict[str, Any]]:
    """The exporters that still run, by node; a record left by a killed exporter is dropped."""
    out = []
    for path in sorted(_dir(storage_root).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            alive = pid_alive(int(record["pid"]), record.get("pid_start"))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # torn or foreign: not an exporter of ours
        if alive:
            out.append(record)
        else:
            path.unlink(missing_ok=True)
    return out
