"""`llmctl cluster`: start, stop and inspect the local Ray cluster."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, err, out
from controlplane.context import Context

app = typer.Typer(help="Start, stop and inspect the Ray cluster.", no_args_is_help=True)


@app.command()
def up(
    cluster: ClusterOpt = None,
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", min=1, help="CPUs of the head node.")] = None,
    worker_nodes: Annotated[
        int | None, typer.Option("--worker-nodes", min=0, max=8, help="Extra raylet nodes on this machine.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Start a local Ray head (dashboard and Jobs API on 127.0.0.1, token auth on). Idempotent."""
    from controlplane import ray_cluster

    ctx = Context.load(cluster)
    state = ray_cluster.up(ctx.cluster, num_cpus=num_cpus, worker_nodes=worker_nodes)
    if json_:
        emit_json({"dashboard": state.dashboard_url, "gcs_address": state.gcs_address, "nodes": len(state.nodes)})
        return
    out.print(f"Ray cluster up: dashboard {state.dashboard_url}, {len(state.nodes)} node(s), token auth on")


@app.command()
def down(
    cluster: ClusterOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Stop it even while runs are live on it.")] = False,
) -> None:
    """Stop what `cluster up` started, and only that. Idempotent. Refuses while runs are live, unless --force."""
    import time

    from controlplane import ray_cluster
    from controlplane.errors import UserError
    from controlplane.supervisor import nodes, store

    ctx = Context.load(cluster)
    live = live_attempts(ctx)
    if live and not force:
        names = ", ".join(live[:5]) + (f" and {len(live) - 5} more" if len(live) > 5 else "")
        raise UserError(
            f"{len(live)} run(s) live on this cluster ({names}): stopping it kills their training; "
            "`llmctl run stop RUN` first, or `llmctl cluster down --force`"
        )
    info = ray_cluster.status(ctx.cluster)
    node_ids = [n["node_id"] for n in info.get("nodes") or [] if n.get("state") == "ALIVE"]
    at = time.time()
    if node_ids:  # the user stops these nodes: their deaths are no evidence against them
        nodes.record_cluster_down(ctx.storage, node_ids, at)
    if ray_cluster.down(ctx.cluster):
        out.print("Ray cluster stopped" + (f"; {len(live)} live run(s) lost their attempts" if live else ""))
    else:
        err.print("no local Ray cluster was running")
    for node in store.readmit_stopped(ctx.ledger, node_ids):
        err.print(f"node {node} readmitted: it was stopped by `cluster down`, not found bad")


def live_attempts(ctx: Context) -> list[str]:
    """Runs whose current attempt was submitted and has not ended."""
    from controlplane.states import AttemptState

    out = []
    for run in ctx.ledger.live_runs():
        cur = ctx.ledger.current_attempt(run["run_id"])
        if cur and cur.get("job_id") and not AttemptState(cur["state"]).is_terminal:
            out.append(run["run_id"])
    return out


@app.command()
def status(cluster: ClusterOpt = None, json_: JsonOpt = False) -> None:
    """Nodes and resources of the cluster, or that it is down (exit 0 either way)."""
    from controlplane import ray_cluster

    ctx = Context.load(cluster)
    info = ray_cluster.status(ctx.cluster)
    if json_:
        emit_json(info)
        return
    if not info["up"]:
        msg = "down" + (" (stale record of a stopped cluster)" if info.get("stale") else "")
        out.print(f"cluster {info['cluster']}: {msg}" + (f"; {info['error']}" if info.get("error") else ""))
        return  # "down" is an answer, not a failure
    out.print(f"cluster {info['cluster']} ({info['kind']}): up, dashboard {info.get('dashboard', '-')}")
    table = Table("NODE", "STATE", "HEAD", "CPU", "GPU")
    for n in info["nodes"]:
        res = n["resources"]
        table.add_row(
            n["node_id"][:12], n["state"], "yes" if n["is_head"] else "", str(res.get("CPU", 0)), str(res.get("GPU", 0))
        )
    out.print(table)
