"""`llmctl node`: the nodes the supervisor knows, and which are kept out of training.

`list` merges telemetry health (`<storage>/telemetry/health/<node>.json`) with the ledger's
exclusions. An excluded node is passed to every new attempt (`LLMCTL_EXCLUDE_NODES`) until
it is readmitted. Reads the ledger only: no Ray, no torch.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, err, human_duration, out
from controlplane.context import Context
from controlplane.errors import ConfigurationError

app = typer.Typer(help="Node health and exclusions.", no_args_is_help=True)

NodeArg = Annotated[str, typer.Argument(help="Node name or Ray node id.")]


@app.command("list")
def list_cmd(cluster: ClusterOpt = None, json_: JsonOpt = False) -> None:
    """Nodes with their health and exclusion state."""
    from controlplane.supervisor import store
    from controlplane.supervisor.nodes import read_health

    ctx = Context.load(cluster)
    health = read_health(ctx.storage)
    records = {r["node"]: r for r in store.node_records(ctx.ledger)}
    rows = []
    for node in sorted(set(health) | set(records)):
        h, r = health.get(node), records.get(node)
        rows.append(
            {
                "node": node,
                "healthy": h.healthy if h else None,
                "reasons": list(h.reasons) if h else [],
                "excluded": bool(r and r["excluded"]),
                "reason": r["reason"] if r else None,
                "excluded_at": r["excluded_at"] if r else None,
                "readmitted_at": r["readmitted_at"] if r else None,
                "run_id": r["run_id"] if r else None,
            }
        )
    if json_:
        emit_json(rows)
        return
    if not rows:
        err.print("no nodes known yet (no telemetry health files, no exclusions)")
        return
    table = Table("NODE", "HEALTH", "EXCLUDED", "SINCE", "WHY")
    now = time.time()
    for r in rows:
        health_s = "-" if r["healthy"] is None else ("ok" if r["healthy"] else "UNHEALTHY")
        since = human_duration(now - r["excluded_at"]) if r["excluded"] else ""
        why = r["reason"] if r["excluded"] else "; ".join(r["reasons"])
        table.add_row(r["node"], health_s, "yes" if r["excluded"] else "no", since, why or "")
    out.print(table)


@app.command()
def exclude(
    node: NodeArg,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (recorded in the ledger).")],
    cluster: ClusterOpt = None,
) -> None:
    """Keep a node out of every new attempt."""
    from controlplane.supervisor import store

    if not node.strip() or not reason.strip():
        raise ConfigurationError("node and --reason must not be empty")
    ctx = Context.load(cluster)
    if store.exclude_node(ctx.ledger, node, f"operator: {reason}"):
        out.print(f"node {node} excluded")
    else:
        err.print(f"node {node} was already excluded")


@app.command()
def readmit(node: NodeArg, cluster: ClusterOpt = None) -> None:
    """Let an excluded node take training work again."""
    from controlplane.supervisor import store

    ctx = Context.load(cluster)
    if store.readmit_node(ctx.ledger, node):
        out.print(f"node {node} readmitted")
    else:
        err.print(f"node {node} was not excluded")
