"""Node health from telemetry files, and the supervisor's view of nodes.

Telemetry writes one file per node: `<storage>/telemetry/health/<node>.json`

    {"node": "gpu-017", "healthy": false,
     "reasons": [{"kind": "xid" | "ecc_uncorrectable" | "gpu_lost", "gpu": 3, "detail": "...", "ts": 1.7e9}]}

A missing directory means no telemetry (every node presumed healthy); an unreadable file is
skipped, never fatal.

Nodes are named by Ray node id (failures seen by the job) or by host name (telemetry). The
supervisor hands an attempt its excluded names in `LLMCTL_EXCLUDE_NODES`; the job maps them
to Ray node ids with `ray_nodes_to_exclude` and keeps its workers off those nodes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXCLUDE_ENV = "LLMCTL_EXCLUDE_NODES"


def excluded_names(environ: Mapping[str, str]) -> set[str]:
    return {n.strip() for n in (environ.get(EXCLUDE_ENV) or "").split(",") if n.strip()}


def ray_nodes_to_exclude(names: set[str], ray_nodes: list[dict[str, Any]]) -> dict[str, str]:
    """Ray node id -> the excluded name it matches: its own id, or its host's name (every
    raylet of an excluded host, as telemetry judges hosts)."""
    from controlplane.telemetry.assignments import node_name

    out: dict[str, str] = {}
    for n in ray_nodes:
        node_id, host = str(n.get("NodeID") or ""), str(n.get("NodeManagerHostname") or "")
        for candidate in (node_id, host, node_name(host) if host else ""):
            if candidate and candidate in names:
                out[node_id] = candidate
                break
    return out


@dataclass(frozen=True)
class NodeHealth:
    node: str
    healthy: bool
    reasons: tuple[str, ...]
    updated_at: float | None = None


def health_dir(storage_root: Path) -> Path:
    return Path(storage_root) / "telemetry" / "health"


def _describe(r: Any) -> str:
    if not isinstance(r, dict):
        return str(r)
    where = f" on gpu {r['gpu']}" if r.get("gpu") is not None else ""
    detail = f": {r['detail']}" if r.get("detail") else ""
    return f"{r.get('kind', 'unknown')}{where}{detail}"


def read_health(storage_root: Path) -> dict[str, NodeHealth]:
    out: dict[str, NodeHealth] = {}
    d = health_dir(storage_root)
    if not d.is_dir():
        return out
    for f in sorted(d.glob("*.json")):
        try:
            data = json.loads(f.read_text())
            node = str(data.get("node") or f.stem)
            reasons = tuple(_describe(r) for r in data.get("reasons") or [])
            ts = [r.get("ts") for r in data.get("reasons") or [] if isinstance(r, dict) and r.get("ts")]
            out[node] = NodeHealth(node, bool(data.get("healthy", True)), reasons, max(ts) if ts else None)
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return out


# --------------------------------------------------------------------------- nodes a user stopped


def _downs_file(storage_root: Path) -> Path:
    return Path(storage_root) / "cluster" / "stopped_nodes.json"


def record_cluster_down(storage_root: Path, nodes: list[str], at: float) -> None:
    """`cluster down` stopped these nodes at `at`: their death is the user's doing, not the node's."""
    from controlplane.rundir import write_atomic

    downs = read_cluster_downs(storage_root)
    downs.update({n: at for n in nodes if n})
    newest = dict(sorted(downs.items(), key=lambda kv: kv[1])[-1000:])
    write_atomic(_downs_file(storage_root), json.dumps(newest).encode())


def read_cluster_downs(storage_root: Path) -> dict[str, float]:
    """node -> when a user's `cluster down` stopped it (unreadable: none)."""
    try:
        data = json.loads(_downs_file(storage_root).read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def dead_by_ray(
    table: list[dict[str, Any]] | tuple[dict[str, Any], ...], hosted: set[str], stopped: dict[str, float]
) -> dict[str, str]:
    """Nodes that hosted the run's workers and that Ray's node table says died unexpectedly:
    node id -> Ray's account of the death. A graceful stop, or a node the user's `cluster down`
    stopped, is not evidence against the node."""
    out = {}
    for n in table:
        node = n.get("node_id")
        if n.get("alive") or node not in hosted or n.get("expected") or node in stopped:
            continue
        out[node] = n.get("state_message") or "DEAD, no reason given"
    return out
