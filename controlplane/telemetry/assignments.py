"""Which GPUs belong to which run: small files on the shared storage, read by each node's exporter.

A training worker says which GPUs it uses:

    a = assign_gpus(storage_root, node="node-3", run_id="r-abc", gpus=[(0, "GPU-..."), (1, "GPU-...")],
                    attempt=2)
    ...                    # a.refresh() now and then (the job's energy meter does it)
    a.release()            # at the end; a crashed worker's file goes stale instead

which writes `<storage>/telemetry/assignments/<node>/<run_id>.<pid>.json`:

    {"run_id", "node", "attempt", "pid", "gpus": [{"index", "uuid"}], "updated_at"}

atomically. The exporter on `<node>` re-reads the directory every few seconds (`gpu_runs`) and
labels those GPUs' metrics with `run_id`; a file not refreshed for `stale_after_s` (default
120 s) is ignored, so a worker that died without releasing stops labelling within minutes.
GPUs match by UUID when both sides know it, else by NVML index.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.errors import ConfigurationError
from controlplane.rundir import write_atomic

STALE_AFTER_S = 120.0
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def node_name(hostname: str) -> str:
    """A host's name for telemetry, reduced to safe characters."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", hostname).strip("-.") or "node"
    return name[:200]


def default_node_name() -> str:
    """This node's name for telemetry: the host name, reduced to safe characters."""
    return node_name(socket.gethostname())


def assignments_dir(storage_root: str | Path, node: str) -> Path:
    return Path(storage_root).expanduser() / "telemetry" / "assignments" / _safe(node, "node")


def _safe(name: str, what: str) -> str:
    if not _SAFE.match(name or ""):
        raise ConfigurationError(f"{what} {name!r}: expected letters, digits, '.', '_' or '-'")
    return name


@dataclass
class Assignment:
    path: Path
    record: dict[str, Any]

    def refresh(self) -> None:
        self.record["updated_at"] = time.time()
        write_atomic(self.path, json.dumps(self.record).encode())

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def assign_gpus(
    storage_root: str | Path,
    node: str,
    run_id: str,
    gpus: list[tuple[int, str]],
    attempt: int | None = None,
    pid: int | None = None,
) -> Assignment:
    """Record that `gpus` ([(nvml index, uuid)]) on `node` work for `run_id`. Idempotent per (run, pid)."""
    pid = os.getpid() if pid is None else pid
    path = assignments_dir(storage_root, node) / f"{_safe(run_id, 'run id')}.{pid}.json"
    record = {
        "run_id": run_id,
        "node": node,
        "attempt": attempt,
        "pid": pid,
        "gpus": [{"index": int(i), "uuid": str(u or "")} for i, u in gpus],
        "updated_at": time.time(),
    }
    a = Assignment(path, record)
    a.refresh()
    return a


def read_assignments(
    storage_root: str | Path, node: str, now: float | None = None, stale_after_s: float = STALE_AFTER_S
) -> list[dict[str, Any]]:
    """Live assignment records of `node`, newest first; unreadable or stale files are skipped."""
    d = assignments_dir(storage_root, node)
    now = time.time() if now is None else now
    out = []
    try:
        paths = sorted(d.glob("*.json"))
    except OSError:
        return []
    for p in paths:
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("gpus"), list) or not rec.get("run_id"):
            continue
        if now - float(rec.get("updated_at") or 0) > stale_after_s:
            continue
        out.append(rec)
    out.sort(key=lambda r: float(r.get("updated_at") or 0), reverse=True)
    return out


def gpu_runs(records: list[dict[str, Any]], gpus: list[tuple[int, str]]) -> dict[int, str]:
    """Map NVML index -> run_id for the GPUs `gpus` ([(index, uuid)]) given assignment records (pure)."""
    out: dict[int, str] = {}
    for index, uuid in gpus:
        for rec in records:  # newest first: a newer attempt wins
            for g in rec["gpus"]:
                if not isinstance(g, dict):
                    continue
                if (uuid and g.get("uuid") == uuid) or (not (uuid and g.get("uuid")) and g.get("index") == index):
                    out[index] = str(rec["run_id"])
                    break
            if index in out:
                break
    return out


def cuda_visible_gpus(nvml_gpus: list[tuple[int, str]], env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """The (NVML index, uuid) of the GPUs this process may use, from CUDA_VISIBLE_DEVICES (pure).

    Entries are NVML indices (Ray's convention) or UUIDs (`GPU-...`, also as a prefix); unset means
    all GPUs; an empty string means none.
    """
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(nvml_gpus)
    out = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        if item.isdigit():
            match = [g for g in nvml_gpus if g[0] == int(item)]
        else:
            match = [g for g in nvml_gpus if g[1] and g[1].startswith(item)]
        if not match:
            break  # CUDA stops at the first invalid entry
        out.append(match[0])
    return out
