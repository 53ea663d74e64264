"""`llmctl run`: submit, watch and inspect training runs.

`list`, `status`, `events` and `logs` read the ledger and the run directory only: they import
neither Ray nor torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from controlplane.cli.common import ClusterOpt, JsonOpt, RunArg, emit_json, err, human_duration, id_table, out
from controlplane.context import Context
from controlplane.errors import UserError
from controlplane.rundir import EventTail, RunDir
from controlplane.spec import RunSpec, load_spec
from controlplane.states import RunState

app = typer.Typer(help="Submit, watch and inspect training runs.", no_args_is_help=True)


def _run(ctx: Context, run_id: str) -> tuple[dict, RunDir]:
    run = ctx.ledger.find_run(run_id)
    return run, RunDir(Path(run["run_dir"]))


def _total_steps(run: dict) -> int | None:
    try:
        from controlplane.runs import load_run_spec

        return load_run_spec(run).train.steps
    except Exception:  # a record from another version: progress without a total
        return None


@app.command()
def submit(
    spec_file: Annotated[Path, typer.Argument(help="Run spec (YAML).")],
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Supervise in the foreground with a progress bar.")
    ] = False,
    supervise: Annotated[
        bool,
        typer.Option("--supervise/--no-supervise", help="Without --watch: start a background supervisor if none runs."),
    ] = True,
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Record a run and submit its first attempt to the Ray cluster."""
    from controlplane.runs import check_runnable, create_run, require_cluster, start_run

    spec = load_spec(RunSpec, spec_file)
    check_runnable(spec)  # a spec the job cannot run is wrong whatever the cluster's state
    ctx = Context.load(cluster)
    require_cluster(ctx)  # a cluster that is not up: one line, exit 2, nothing recorded
    run_dir = create_run(ctx, spec)
    attempt = start_run(ctx, run_dir.run_id)
    supervisor = None
    if not watch and supervise:
        from controlplane.cli.supervise_cmd import ensure_supervisor

        supervisor, _ = ensure_supervisor(ctx, cluster)
    if json_:
        emit_json(
            {"run_id": run_dir.run_id, "attempt": attempt, "run_dir": str(run_dir.path), "supervisor_pid": supervisor}
        )
    else:
        what = (
            f"submitted (attempt {attempt})"
            if attempt is not None
            else "recorded; its first attempt waits for a supervisor pass"
        )
        out.print(f"run {run_dir.run_id} {what}; run dir {run_dir.path}")
        if supervisor:
            out.print(
                f"supervised in the background (pid {supervisor}); follow with `llmctl run watch {run_dir.run_id}`"
            )
    if watch:
        from controlplane.cli.watch import watch_run

        code = watch_run(ctx, run_dir.run_id, cluster=cluster)
        raise typer.Exit(code)


@app.command("watch")
def watch_cmd(run_id: RunArg, cluster: ClusterOpt = None) -> None:
    """Supervise a live run in the foreground with a progress bar until it ends."""
    from controlplane.cli.watch import watch_run

    ctx = Context.load(cluster)
    raise typer.Exit(watch_run(ctx, ctx.ledger.find_run(run_id)["run_id"], cluster=cluster))


@app.command("list")
def list_cmd(
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Include ended runs.")] = True,
) -> None:
    """Runs in the ledger, newest first."""
    from controlplane.runs import summarize

    ctx = Context.load(cluster)
    rows = []
    for run in ctx.ledger.list_runs():
        if not all_ and RunState(run["state"]).is_terminal:
            continue
        s = summarize(RunDir(Path(run["run_dir"])).recent_events(types={"step", "end"}))
        rows.append(
            {
                "run_id": run["run_id"],
                "state": run["state"],
                "step": s["step"],
                "loss": s["loss"],
                "created_at": run["created_at"],
                "cause": run["cause"],
            }
        )
    if json_:
        emit_json(rows)
        return
    table = id_table("RUN", [r["run_id"] for r in rows], "STATE", "STEP", "LOSS", "AGE", "CAUSE")
    now = time.time()
    for r in rows:
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        table.add_row(
            r["run_id"], r["state"], str(r["step"]), loss, human_duration(now - r["created_at"]), r["cause"] or ""
        )
    out.print(table)


@app.command()
def status(run_id: RunArg, cluster: ClusterOpt = None, json_: JsonOpt = False) -> None:
    """State, progress, attempts, checkpoints, incidents and stragglers of one run."""
    from controlplane.runs import status_summary

    ctx = Context.load(cluster)
    run, run_dir = _run(ctx, run_id)
    total = _total_steps(run)
    s = status_summary(ctx, run, run_dir, total)
    if RunState(run["state"]).is_terminal:
        s["eta_s"] = None  # an ended run has no time left
    attempts = ctx.ledger.attempts(run["run_id"])
    incidents = ctx.ledger.incidents(run["run_id"])
    data = {
        "run_id": run["run_id"],
        "state": run["state"],
        "cause": run["cause"],
        "run_dir": run["run_dir"],
        "progress": {k: v for k, v in s.items() if k not in ("failures", "replacements", "stragglers", "end")},
        "attempts": attempts,
        "checkpoints": ctx.ledger.checkpoints(run["run_id"]),
        "incidents": incidents,
        "failures": s["failures"],
        "worker_replacements": s["replacements"],
        "stragglers": s["stragglers"],
    }
    if json_:
        emit_json(data)
        return
    loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
    tps = f"{s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "-"
    out.print(f"[bold]{run['run_id']}[/bold]  {run['state']}" + (f"  ({run['cause']})" if run["cause"] else ""))
    out.print(
        f"  step {s['step']}/{total or '?'}  loss {loss}  tokens {s['tokens']:,}  tokens/s {tps}"
        + (f"  eta {human_duration(s['eta_s'])}" if s["eta_s"] is not None else "")
    )
    last = f" (last at step {s['last_checkpoint_step']})" if s["last_checkpoint_step"] is not None else ""
    out.print(f"  checkpoints {s['checkpoints']}{last}  run dir {run['run_dir']}")
    started = run_dir.metrics_start()
    if started and not RunState(run["state"]).is_terminal:
        out.print(f"  metrics {started['metrics_url']}  (all live runs: `llmctl dashboards targets`)")
    if s["events_window"]["from_byte"]:
        w = s["events_window"]
        out.print(
            f"  recent events: the last {w['bytes'] / 2**20:.0f} MiB of {w['size'] / 2**20:,.0f} MiB in events.jsonl"
        )
    if s.get("rank_step_times"):
        times = "  ".join(f"r{i}={t * 1000:.0f}ms" for i, t in enumerate(s["rank_step_times"]))
        out.print(f"  per-rank step time: {times}")
    if s["stragglers"]:
        last = s["stragglers"][-1]
        out.print(
            f"  stragglers: {len(s['stragglers'])} events; last rank {last.get('rank')} at {last.get('step_time_s', 0):.2f}s vs median {last.get('median_s', 0):.2f}s"
        )
    waiting = (attempts[-1].get("info") or {}).get("waiting") if attempts else None
    if waiting and not RunState(run["state"]).is_terminal:
        since = (attempts[-1].get("info") or {}).get("waiting_since") or time.time()
        out.print(
            f"  attempt {attempts[-1]['attempt']} waiting for resources for {human_duration(time.time() - since)}: {waiting}"
        )
    table = Table("ATTEMPT", "STATE", "RESUME", "JOB", "CAUSE", "DURATION")
    for a in attempts:
        dur = (a["ended_at"] or time.time()) - a["started_at"]
        resumed = s["resumed"].get(a["attempt"])  # what its start event says; else the cap it was given
        resume = resumed if resumed is not None else a["resume_step"]
        table.add_row(
            str(a["attempt"]),
            a["state"],
            str(resume if resume is not None else "-"),
            a["job_id"] or "-",
            a["cause"] or "",
            human_duration(dur),
        )
    out.print(table)
    for inc in incidents[-10:]:
        out.print(
            f"  incident #{inc['id']} {inc['kind']} (attempt {inc['attempt']}): {json.dumps(inc['detail'], ensure_ascii=False)[:160]}"
        )


@app.command()
def events(
    run_id: RunArg,
    cluster: ClusterOpt = None,
    type_: Annotated[list[str] | None, typer.Option("--type", "-t", help="Only these event types.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    tail: Annotated[int, typer.Option("--tail", "-n", help="Only the last N events (0 = all).")] = 0,
    json_: Annotated[
        bool, typer.Option("--json", help="One JSON array (with --follow: one JSON object a line, as without).")
    ] = False,
) -> None:
    """Print the run's events.jsonl, one JSON object a line."""
    ctx = Context.load(cluster)
    run, run_dir = _run(ctx, run_id)
    types = set(type_) if type_ else None
    tail_ = EventTail(run_dir)
    first = [ev for ev in tail_.poll() if types is None or ev.get("type") in types]
    if json_ and not follow:
        emit_json(first[-tail:] if tail else first)
        return
    for ev in first[-tail:] if tail else first:
        typer.echo(json.dumps(ev, ensure_ascii=False))
    while follow and not RunState(ctx.ledger.get_run(run["run_id"])["state"]).is_terminal:
        time.sleep(1.0)
        for ev in tail_.poll():
            if types is None or ev.get("type") in types:
                typer.echo(json.dumps(ev, ensure_ascii=False))


@app.command()
def logs(
    run_id: RunArg,
    cluster: ClusterOpt = None,
    attempt: Annotated[int | None, typer.Option("--attempt", help="Attempt number (default: the latest).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Driver and worker logs of an attempt, as kept in the run directory (else from the Ray Jobs API)."""
    ctx = Context.load(cluster)
    run, run_dir = _run(ctx, run_id)
    attempts = ctx.ledger.attempts(run["run_id"])
    if not attempts:
        raise UserError(f"run {run['run_id']}: no attempts yet")
    chosen = attempts[-1] if attempt is None else next((a for a in attempts if a["attempt"] == attempt), None)
    if chosen is None:
        raise UserError(f"--attempt: run {run['run_id']} has attempts 1..{attempts[-1]['attempt']}")
    n = chosen["attempt"]
    kept = saved_logs(run_dir, n)
    if kept and json_:
        files = [{"title": t, "path": str(p), "text": p.read_text(errors="replace")} for t, p in kept]
        emit_json({"run_id": run["run_id"], "attempt": n, "source": "run_dir", "files": files})
        return
    if kept:
        for title, path in kept:
            if len(kept) > 1:
                typer.echo(f"==> {title} ({path.name}) <==")
            typer.echo(path.read_text(errors="replace"), nl=False)
        return
    if not chosen.get("job_id"):
        raise UserError(f"run {run['run_id']}: attempt {n} was never submitted, so it has no logs")
    from controlplane import ray_cluster
    from controlplane.errors import LlmctlError

    try:
        text = ray_cluster.job_logs(ctx.cluster, chosen["job_id"])
    except (LlmctlError, RuntimeError, OSError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"run {run['run_id']}: attempt {n} kept no logs in {run_dir.logs} and the Ray Jobs API has none ({why})"
        ) from None
    if json_:
        files = [{"title": "driver", "path": None, "text": text}]
        emit_json({"run_id": run["run_id"], "attempt": n, "source": "ray_jobs_api", "files": files})
        return
    typer.echo(text, nl=False)


def saved_logs(run_dir: RunDir, attempt: int) -> list[tuple[str, Path]]:
    """(title, file) of an attempt's kept logs: the driver, then the workers by rank (pids from the
    start and worker_replaced events), then any other file."""
    d = run_dir.logs / f"attempt-{attempt}"
    files = sorted(d.glob("*.log")) if d.is_dir() else []
    legacy = run_dir.logs / f"attempt-{attempt}.log"
    if not files:
        return [("attempt", legacy)] if legacy.exists() else []
    ranks: dict[str, int] = {}
    for ev in run_dir.events({"start", "worker_replaced"}):
        if ev.get("attempt") != attempt:
            continue
        for w in ev.get("workers") or []:
            ranks[f"worker-{w.get('pid')}"] = w.get("rank")
        if ev.get("type") == "worker_replaced":
            ranks[f"worker-{ev.get('new_pid')}"] = ev.get("rank")

    def key(p: Path) -> tuple[int, int, str]:
        if p.stem == "driver":
            return (0, 0, p.stem)
        return (1, ranks[p.stem], p.stem) if p.stem in ranks else (2, 0, p.stem)

    out = []
    for p in sorted(files, key=key):
        title = "driver" if p.stem == "driver" else (f"rank {ranks[p.stem]}" if p.stem in ranks else p.stem)
        out.append((title, p))
    return out


@app.command()
def stop(run_id: RunArg, cluster: ClusterOpt = None) -> None:
    """Stop a run: its live attempt's job is stopped and the run is marked stopped."""
    from controlplane.runs import stop_run

    ctx = Context.load(cluster)
    run = ctx.ledger.find_run(run_id)
    if stop_run(ctx, run["run_id"]):
        out.print(f"run {run['run_id']} stopped")
    else:
        err.print(f"run {run['run_id']} already ended ({run['state']})")


# Verbs defined in other modules are attached here, one line each:
from controlplane.cli.export_cmd import run_export  # noqa: E402
from controlplane.cli.supervise_cmd import run_decisions, run_goodput  # noqa: E402
from controlplane.cli.telemetry_cmd import run_energy  # noqa: E402

app.command("goodput")(run_goodput)
app.command("decisions")(run_decisions)
app.command("energy")(run_energy)
app.command("export")(run_export)
