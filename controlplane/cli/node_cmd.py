"""`llmctl node`: the cluster's nodes, and which are kept out of training.

`list` shows the cluster's live nodes (by Ray node id, from its dashboard) and merges telemetry health (`<storage>/telemetry/health/<node>.json`) with the ledger's
exclusions. An excluded node is passed to every new attempt (`LLMCTL_EXCLUDE_NODES`) until
it is readmitted. No Ray, no torch: the ledger, and the dashboard over HTTP.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, err, human_duration, id_table, out
from controlplane.context import Context
from controlplane.errors import ConfigurationError

app = typer.Typer(help="Node health and exclusions.", no_args_is_help=True)

NodeArg = Annotated[str, typer.Argument(help="Node name or Ray node id.")]


@app.command("list")
def list_cmd(cluster: ClusterOpt = None, json_: JsonOpt = False) -> None:
    """The cluster's live nodes, and every node with a health report or an exclusion."""
    from controlplane.supervisor import store
    from controlplane.supervisor.nodes import read_health

    ctx = Context.load(cluster)
    health = read_health(ctx.storage)
    records = {r["node"]: r for r in store.node_records(ctx.ledger)}
    live, reached = _live_nodes(ctx)
    rows = []
    for node in sorted(set(live) | set(health) | set(records), key=lambda n: (n not in live, n)):
        h, r, ray_node = health.get(node), records.get(node), live.get(node)
        rows.append(
            {
                "node": node,
                "ray_state": ray_node["state"] if ray_node else None,
                "head": bool(ray_node and ray_node["is_head"]),
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
    if not reached:
        err.print(f"cluster {ctx.cluster.name} is not reachable: its live nodes are not listed")
    if not rows:
        err.print("no nodes known yet (no live cluster, no telemetry health files, no exclusions)")
        return
    table = id_table("NODE", [r["node"] for r in rows], "RAY", "HEALTH", "EXCLUDED", "SINCE", "WHY")
    now = time.time()
    for r in rows:
        health_s = "-" if r["healthy"] is None else ("ok" if r["healthy"] else "UNHEALTHY")
        since = human_duration(now - r["excluded_at"]) if r["excluded"] else ""
        why = r["reason"] if r["excluded"] else "; ".join(r["reasons"])
        ray_s = (r["ray_state"] or "-") + (" (head)" if r["head"] else "")
        table.add_row(r["node"], ray_s, health_s, "yes" if r["excluded"] else "no", since, why or "")
    out.print(table)


def _node_table(ctx: Context) -> tuple[list[dict], bool]:
    """(the cluster's node table, dead nodes too; whether the cluster answered). Asks the dashboard
    over HTTP (no Ray import); a cluster that is down is no error."""
    from controlplane import ray_cluster

    info = ray_cluster.status(ctx.cluster)
    return info.get("nodes") or [], bool(info.get("up"))


def _cluster_nodes(ctx: Context) -> tuple[set[str], bool]:
    """(every node id and address the cluster's node table holds, whether it answered)."""
    nodes, reached = _node_table(ctx)
    return {n["node_id"] for n in nodes} | {n["ip"] for n in nodes if n.get("ip")}, reached


def _live_nodes(ctx: Context) -> tuple[dict[str, dict], bool]:
    """({Ray node id: node} of the cluster's alive nodes, whether the cluster answered)."""
    nodes, reached = _node_table(ctx)
    return {n["node_id"]: n for n in nodes if n.get("state") == "ALIVE"}, reached


@app.command()
def exclude(
    node: NodeArg,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (recorded in the ledger).")],
    force: Annotated[
        bool, typer.Option("--force", help="Exclude a name no node has had yet (one that is not up).")
    ] = False,
    cluster: ClusterOpt = None,
) -> None:
    """Keep a node out of every new attempt."""
    from controlplane.supervisor import store
    from controlplane.supervisor.nodes import read_health

    if not node.strip() or not reason.strip():
        raise ConfigurationError("node and --reason must not be empty")
    ctx = Context.load(cluster)
    records = {r["node"]: r for r in store.node_records(ctx.ledger)}
    if not force and node not in records and node not in read_health(ctx.storage):
        # a typo would otherwise exclude nothing and say it had: the name must be one a node has had
        seen, reached = _cluster_nodes(ctx)
        if node not in seen:
            where = "in its node table" if reached else "(it did not answer, so only the ledger was asked)"
            raise ConfigurationError(
                f"node {node}: no node of cluster {ctx.cluster.name} has had this name {where};"
                " see `llmctl node list`, or give --force"
            )
    if store.exclude_node(ctx.ledger, node, f"operator: {reason}"):
        out.print(f"node {node} excluded")
    else:
        err.print(f"node {node} was already excluded ({store.node_record(ctx.ledger, node)['reason']})")


@app.command()
def readmit(node: NodeArg, cluster: ClusterOpt = None) -> None:
    """Let an excluded node take training work again."""
    from controlplane.supervisor import store

    ctx = Context.load(cluster)
    if store.readmit_node(ctx.ledger, node):
        out.print(f"node {node} readmitted")
    else:
        err.print(f"node {node} was not excluded")
