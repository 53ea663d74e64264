"""`llmctl rollout`: gate, canary and automatic rollback onto single-GPU serving replicas.

`start` runs the controller in the foreground until the rollout ends. `promote` and `abort`
ask a running controller (through the ledger) to finish now. `status` and `history` read
the ledger only: they import neither Ray nor torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, out

app = typer.Typer(help="Roll a model out to serving replicas: evaluation gate, canary, rollback.", no_args_is_help=True)

RolloutArg = Annotated[str, typer.Argument(help="Rollout id, or a service name for its newest rollout.")]


def _figures_line(fig: dict[str, Any]) -> str:
    c = fig.get("candidate") or {}
    s = fig.get("stable") or {}
    if not c:
        scores = fig.get("scores")
        return ", ".join(f"{k}={v:.4g}" for k, v in scores.items() if isinstance(v, float)) if scores else ""

    def p99(w: dict[str, Any]) -> str:
        return f"{w['p99_s']:.3f}s" if w.get("p99_s") is not None else "-"

    return (
        f"candidate {c.get('requests', 0)} req {c.get('error_rate', 0):.1%} err p99 {p99(c)} | "
        f"stable {s.get('requests', 0)} req {s.get('error_rate', 0):.1%} err p99 {p99(s)}"
    )


def make_backend(ctx: Any, kind: str):
    if kind == "kubernetes":
        from controlplane.rollout.k8s_backend import KubernetesBackend

        return KubernetesBackend.from_kubeconfig(ctx.cluster)
    from controlplane.rollout.ray_backend import RayServeBackend

    return RayServeBackend(ctx.cluster)


@app.command()
def start(
    spec_file: Annotated[Path, typer.Argument(help="Rollout spec (YAML).")],
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Run a rollout to its end: gate, deploy, canary steps, promote or roll back."""
    from controlplane.context import Context
    from controlplane.rollout.controller import RolloutController
    from controlplane.spec import RolloutSpec, load_spec

    spec = load_spec(RolloutSpec, spec_file)
    ctx = Context.load(cluster)
    backend = make_backend(ctx, spec.backend)

    def show(rid: str, d) -> None:
        if not json_:
            out.print(f"{time.strftime('%H:%M:%S')} {rid} {d.action}: {d.reason}  {_figures_line(d.figures)}")

    row = RolloutController(ctx, backend, on_decision=show).start(spec)
    if json_:
        emit_json(row)
    else:
        out.print(f"{row['rollout_id']}: {row['state']} ({row['reason']})")
    if row["state"] not in ("promoted",):
        raise typer.Exit(1)


@app.command()
def status(ref: RolloutArg, cluster: ClusterOpt = None, json_: JsonOpt = False) -> None:
    """A rollout's state, traffic and every decision with its figures."""
    from controlplane.context import Context
    from controlplane.rollout import store

    ctx = Context.load(cluster)
    row = store.find_rollout(ctx.ledger, ref)
    decisions = store.decisions(ctx.ledger, row["rollout_id"])
    service = store.get_service(ctx.ledger, row["name"])
    if json_:
        emit_json({"rollout": row, "decisions": decisions, "service": service})
        return
    out.print(
        f"{row['rollout_id']}  {row['state']}  candidate {row['candidate_version'] or '-'} at "
        f"{row['traffic_percent']}%  stable {row['stable_version'] or '-'}"
    )
    if service and service.get("info"):
        out.print(f"endpoint {service['info'].get('url', '-')}  metrics {service['info'].get('metrics_url', '-')}")
    table = Table("time", "step", "traffic", "action", "reason", "figures", box=None)
    for d in decisions:
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(d["at"])),
            "-" if d["step_index"] is None else str(d["step_index"] + 1),
            "-" if d["traffic_percent"] is None else f"{d['traffic_percent']}%",
            d["action"],
            d["reason"],
            _figures_line(d.get("figures") or {}),
        )
    out.print(table)


def _request(ref: str, what: str, cluster: str | None) -> None:
    from controlplane.context import Context
    from controlplane.rollout import store

    ctx = Context.load(cluster)
    row = store.find_rollout(ctx.ledger, ref)
    store.request(ctx.ledger, row["rollout_id"], what)
    out.print(f"{row['rollout_id']}: {what} requested; the controller acts at its next poll")


@app.command()
def promote(ref: RolloutArg, cluster: ClusterOpt = None) -> None:
    """Promote the candidate of a running rollout now (skips the remaining steps)."""
    from controlplane.rollout.store import REQUEST_PROMOTE

    _request(ref, REQUEST_PROMOTE, cluster)


@app.command()
def abort(ref: RolloutArg, cluster: ClusterOpt = None) -> None:
    """Abort a running rollout: all traffic back to stable, the candidate removed."""
    from controlplane.rollout.store import REQUEST_ABORT

    _request(ref, REQUEST_ABORT, cluster)


@app.command()
def history(
    service: Annotated[str | None, typer.Argument(help="Service name (default: all).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 20,
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Past rollouts, newest first."""
    from controlplane.context import Context
    from controlplane.rollout import store

    rows = store.list_rollouts(Context.load(cluster).ledger, service, limit)
    if json_:
        emit_json(rows)
        return
    table = Table("rollout", "state", "candidate", "stable before", "traffic", "reason", box=None)
    for r in rows:
        table.add_row(
            r["rollout_id"],
            r["state"],
            r["candidate_version"] or "-",
            r["stable_version"] or "-",
            f"{r['traffic_percent']}%",
            (r["reason"] or "")[:80],
        )
    out.print(table)
