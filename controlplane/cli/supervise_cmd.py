"""`llmctl supervise` (the reconcile loop), `llmctl run goodput` (where a run's time went) and
`llmctl run decisions` (what the supervisor did, and why).

Nothing heavy at module level: `run goodput` and `run decisions` read the ledger and
events.jsonl only.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Annotated

import typer
from rich.table import Table

from controlplane.cli.common import ClusterOpt, JsonOpt, RunArg, emit_json, err, human_duration, out
from controlplane.context import Context
from controlplane.errors import UserError

app = typer.Typer(
    help="Keep every live run going (`llmctl supervise`), or say whether that runs (`supervise status`).",
    invoke_without_command=True,
)


@app.callback()
def supervise(
    typer_ctx: typer.Context,
    cluster: ClusterOpt = None,
    once: Annotated[bool, typer.Option("--once", help="One pass over every live run, then exit.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, max=3600, help="Seconds between passes.")] = 2.0,
    metrics_port: Annotated[
        int | None, typer.Option("--metrics-port", min=0, max=65535, help="Serve supervisor metrics on 127.0.0.1:PORT.")
    ] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Run in the background; log to <storage>/logs/.")] = False,
) -> None:
    """Keep every live run going: restart failures, detect hangs, roll back NaNs, exclude bad nodes."""
    if typer_ctx.invoked_subcommand is not None:
        return
    from controlplane.supervisor.loop import Supervisor
    from controlplane.supervisor.status import PassRecorder

    ctx = Context.load(cluster)
    if detach:
        pid = start_detached(ctx, cluster, interval, metrics_port)
        out.print(f"supervisor started (pid {pid}); log {ctx.storage / 'logs' / 'supervisor.log'}")
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    sup = Supervisor(ctx, exclusive=True)
    server = None
    if metrics_port is not None:
        from controlplane.supervisor.metrics import serve

        server = serve(ctx, metrics_port)
        err.print(f"metrics on http://127.0.0.1:{server.server_port}/metrics", markup=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    err.print(f"supervising {ctx.storage} (pid {os.getpid()})", markup=False)
    passes = PassRecorder(ctx.storage, interval)
    try:
        while True:
            done = sup.tick()
            passes.record(sorted(set(done) | {r["run_id"] for r in ctx.ledger.live_runs()}))
            for run_id, actions in done.items():
                for a in actions:
                    err.print(f"{run_id}: {a}", markup=False, highlight=False)
            if once or stop.wait(interval):
                break
    finally:
        if server is not None:
            server.shutdown()
        passes.clear()
        sup.close(remove_pid=True)


@app.command("status")
def status_cmd(cluster: ClusterOpt = None, json_: JsonOpt = False) -> None:
    """Whether a supervisor runs on this storage root: pid, since when, runs guarded, last pass.
    Exit 0 either way ("not running" is an answer)."""
    import time

    from controlplane.supervisor.status import read_status

    ctx = Context.load(cluster)
    st = read_status(ctx.storage)
    if json_:
        emit_json(st)
        return
    if not st["running"]:
        out.print(
            f"supervisor: not running on {ctx.storage}"
            + ("; removed the files a stopped supervisor left" if st.get("stale_cleaned") else "")
            + "; start it with `llmctl supervise --detach`"
        )
        return
    now = time.time()
    since = f"since {human_duration(now - st['started_at'])} ago" if st.get("started_at") else "starting"
    last = f"last pass {human_duration(now - st['last_pass_at'])} ago" if st.get("last_pass_at") else "no pass yet"
    runs = ", ".join(st["runs"]) if st["runs"] else "none live"
    out.print(f"supervisor: running, pid {st['pid']}, {since}, {last} ({st['passes']} passes); runs guarded: {runs}")


def start_detached(ctx: Context, cluster: str | None, interval: float = 2.0, metrics_port: int | None = None) -> int:
    """Start `llmctl supervise` in the background; SupervisorBusy if one already runs here."""
    from controlplane.supervisor.ports import SupervisorLock

    lock = SupervisorLock(ctx.storage)
    lock.acquire()  # fail here, in the foreground, if one is already running
    lock.release()
    log_file = ctx.storage / "logs" / "supervisor.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "controlplane", "supervise", "--interval", str(interval)]
    if cluster:
        args += ["--cluster", cluster]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    with open(log_file, "ab") as f:
        proc = subprocess.Popen(
            args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return proc.pid


def ensure_supervisor(ctx: Context, cluster: str | None) -> tuple[int | None, bool]:
    """(pid, started): the supervisor running on this storage root, started in the background if none."""
    from controlplane.supervisor.ports import SupervisorBusy, SupervisorLock

    try:
        return start_detached(ctx, cluster), True
    except SupervisorBusy:
        return SupervisorLock(ctx.storage).holder(), False


def run_goodput(
    run_id: RunArg,
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Goodput of a run: productive training time over wall time, and the rest by cause."""
    from controlplane.supervisor.metrics import run_goodput as compute_run

    ctx = Context.load(cluster)
    run = ctx.ledger.find_run(run_id)
    g = compute_run(ctx, run)
    if json_:
        emit_json({"run_id": run["run_id"], "state": run["state"], **g.as_dict()})
        return
    if g.wall_s <= 0:
        raise UserError(f"run {run['run_id']}: no time recorded yet")
    out.print(f"[bold]{run['run_id']}[/bold]  {run['state']}  goodput {g.ratio:.1%} of {human_duration(g.wall_s)}")
    table = Table("WHERE THE TIME WENT", "SECONDS", "SHARE")
    for k, v in sorted(g.seconds.items(), key=lambda kv: -kv[1]):
        table.add_row(k.replace("_", " "), f"{v:.1f}", f"{v / g.wall_s:.1%}")
    out.print(table)
    if g.restarts_by_cause:
        out.print("restarts: " + ", ".join(f"{c} x{n}" for c, n in sorted(g.restarts_by_cause.items())))
    out.print(f"final step {g.final_step}; steps thrown away {g.lost_steps}")
    if len(g.productive_by_world) > 1:
        out.print(
            "step time by world size: " + ", ".join(f"{n} workers {s:.1f} s" for n, s in g.productive_by_world.items())
        )


def run_decisions(
    run_id: RunArg,
    cluster: ClusterOpt = None,
    tail: Annotated[int, typer.Option("--tail", "-n", min=0, help="Only the last N decisions (0 = all).")] = 0,
    json_: JsonOpt = False,
) -> None:
    """Every action the supervisor took on a run, with its cause: submissions, restarts, stops."""
    import datetime as dt
    import json

    from controlplane.supervisor import store

    ctx = Context.load(cluster)
    run = ctx.ledger.find_run(run_id)
    rows = store.decisions(ctx.ledger, run["run_id"])
    rows = rows[-tail:] if tail else rows
    if json_:
        emit_json(rows)
        return
    if not rows:
        err.print(f"run {run['run_id']}: no supervisor decisions yet")
        return
    table = Table("TIME", "ATTEMPT", "ACTION", "CAUSE", "DETAIL")
    for r in rows:
        when = dt.datetime.fromtimestamp(r["at"]).strftime("%Y-%m-%d %H:%M:%S")
        detail = json.dumps(r["detail"], ensure_ascii=False, sort_keys=True) if r["detail"] else ""
        table.add_row(when, str(r["attempt"] or "-"), r["action"], r["cause"] or "", detail[:120])
    out.print(table)
