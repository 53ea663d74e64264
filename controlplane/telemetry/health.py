"""Node health from GPU telemetry, handed to the supervisor through one file per node.

    <storage>/telemetry/health/<node>.json =
        {"node", "healthy", "reasons": [{"kind", "gpu", "detail", "ts"}], "updated_at"}

`kind` is "xid" (an XID critical error), "ecc_uncorrectable" (volatile uncorrectable ECC
errors, or a double-bit ECC event) or "gpu_lost" (NVML says GPU_IS_LOST: fallen off the bus).
The exporter writes the file atomically after every sample that changes it, and at least every
30 s otherwise (so an old `updated_at` means the exporter is gone); the supervisor reads it
with `read_node_health`. Reasons are sticky for the exporter's lifetime: a GPU that
raised an XID needs an operator (or a reboot) before the node is trusted again.

XIDs 43 ("GPU stopped processing": the application faulted) and 45 ("preemptive cleanup":
a process was killed mid-kernel) are caused by the workload, not the hardware, and do not
mark the node unhealthy by default (`BENIGN_XIDS`); they are still counted in metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from controlplane.rundir import write_atomic
from controlplane.telemetry.sampler import NodeSample

BENIGN_XIDS = frozenset({43, 45})
XID_HINTS = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapper failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


def health_reasons(sample: NodeSample, benign_xids: frozenset[int] = BENIGN_XIDS) -> list[dict[str, Any]]:
    """The reasons `sample` makes a node unhealthy (pure; XIDs come from `sample.events`)."""
    reasons: list[dict[str, Any]] = []
    for g in sample.gpus:
        if g.lost:
            reasons.append({"kind": "gpu_lost", "gpu": g.index, "detail": "NVML: GPU is lost", "ts": sample.ts})
        if g.ecc_uncorrected:
            reasons.append(
                {
                    "kind": "ecc_uncorrectable",
                    "gpu": g.index,
                    "detail": f"{g.ecc_uncorrected} uncorrectable ECC error(s) since the driver loaded",
                    "ts": sample.ts,
                }
            )
    for ev in sample.events:
        if ev.kind == "xid" and ev.code not in benign_xids:
            hint = XID_HINTS.get(ev.code)
            detail = f"XID {ev.code}" + (f" ({hint})" if hint else "")
            reasons.append({"kind": "xid", "gpu": ev.gpu, "detail": detail, "ts": ev.ts})
        elif ev.kind == "ecc_uncorrectable":
            reasons.append(
                {"kind": "ecc_uncorrectable", "gpu": ev.gpu, "detail": "double-bit ECC error event", "ts": ev.ts}
            )
    return reasons


class HealthTracker:
    """Accumulates reasons (sticky, deduplicated by kind/gpu/detail) and writes the node's file."""

    def __init__(
        self,
        storage_root: str | Path,
        node: str,
        benign_xids: frozenset[int] = BENIGN_XIDS,
        refresh_s: float = 30.0,
    ):
        self.path = health_path(storage_root, node)
        self.refresh_s = refresh_s
        self._written_at = 0.0
        self.node = node
        self.benign_xids = benign_xids
        self.reasons: list[dict[str, Any]] = []
        self._seen: set[tuple[Any, Any, Any]] = set()
        self._written = False

    def update(self, sample: NodeSample) -> bool:
        """Fold in a sample; writes the file when something changed, or every `refresh_s`. True if written."""
        changed = not self._written or time.monotonic() - self._written_at >= self.refresh_s
        for r in health_reasons(sample, self.benign_xids):
            key = (r["kind"], r["gpu"], r["detail"] if r["kind"] == "xid" else None)
            if key not in self._seen:
                self._seen.add(key)
                self.reasons.append(r)
                changed = True
        if changed:
            self.write()
        return changed

    def write(self) -> None:
        record = {"node": self.node, "healthy": not self.reasons, "reasons": self.reasons, "updated_at": time.time()}
        write_atomic(self.path, json.dumps(record, indent=1).encode())
        self._written, self._written_at = True, time.monotonic()


def health_path(storage_root: str | Path, node: str) -> Path:
    return Path(storage_root).expanduser() / "telemetry" / "health" / f"{node}.json"


def read_node_health(storage_root: str | Path) -> dict[str, dict[str, Any]]:
    """Every node's health record, by node name. A torn or foreign file is reported unhealthy-unknown, not raised."""
    d = Path(storage_root).expanduser() / "telemetry" / "health"
    out: dict[str, dict[str, Any]] = {}
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
            if not isinstance(rec, dict) or not isinstance(rec.get("healthy"), bool):
                raise ValueError("not a health record")
        except (OSError, ValueError) as exc:
            out[p.stem] = {"node": p.stem, "healthy": None, "reasons": [], "error": str(exc), "updated_at": None}
            continue
        rec.setdefault("reasons", [])
        out[str(rec.get("node") or p.stem)] = rec
    return out
