"""Foreground supervision with a live progress bar (`run submit --watch`, `run watch`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from controlplane.cli.common import err
from controlplane.context import Context
from controlplane.rundir import EventTail, RunDir
from controlplane.runs import load_run_spec, summarize
from controlplane.states import RunState


def watch_run(ctx: Context, run_id: str, poll_s: float = 1.0) -> int:
    """Reconcile the run until it ends, drawing step, loss, tokens/s and ETA. Returns an exit code.

    A background supervisor holding the lock keeps reconciling; this one then only draws."""
    from controlplane.supervisor.loop import Supervisor

    sup = Supervisor(ctx)
    try:
        return _watch(ctx, run_id, sup.reconcile_run, poll_s)
    finally:
        sup.close()


def _watch(ctx: Context, run_id: str, reconcile: Callable[[str], object], poll_s: float) -> int:
    run = ctx.ledger.get_run(run_id)
    run_dir = RunDir(Path(run["run_dir"]))
    total = load_run_spec(run).train.steps
    events: deque[dict] = deque(maxlen=2000)  # enough for the progress line; bounded over a month
    tail = EventTail(run_dir, run_dir.recent_offset())
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task(run_id, total=total, info="starting")
        while True:
            reconcile(run_id)
            for ev in tail.poll():
                if ev.get("type") != "heartbeat":
                    events.append(ev)
                if ev.get("type") in ("failure", "worker_replaced"):
                    progress.console.print(f"  {ev['type']}: {_describe(ev)}")
            s = summarize(list(events), total)
            state = RunState(ctx.ledger.get_run(run_id)["state"])
            loss = f"loss {s['loss']:.4f}" if s["loss"] is not None else "loss -"
            tps = f"{s['tokens_per_s']:.0f} tok/s" if s["tokens_per_s"] else ""
            progress.update(task, completed=s["step"], info=f"{state.value}  {loss}  {tps}")
            if state.is_terminal:
                break
            time.sleep(poll_s)
    final = ctx.ledger.get_run(run_id)
    err.print(f"run {run_id} {final['state']}" + (f": {final['cause']}" if final["cause"] else ""))
    return 0 if final["state"] == RunState.SUCCEEDED else 1


def _describe(ev: dict) -> str:
    if ev.get("type") == "worker_replaced":
        return f"rank {ev.get('rank')} replaced in {ev.get('recovery_s', 0):.2f}s from a {ev.get('from', '?')} worker"
    return f"{ev.get('kind')} rank={ev.get('rank')} step={ev.get('step')} {ev.get('detail', '')}"
