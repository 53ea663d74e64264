"""Foreground supervision with a live progress bar (`run submit --watch`, `run watch`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from controlplane.cli.common import err
from controlplane.context import Context
from controlplane.rundir import EventTail, RunDir
from controlplane.runs import load_run_spec, summarize
from controlplane.states import RunState

if TYPE_CHECKING:
    from controlplane.supervisor.ports import JobsPort


def watch_run(
    ctx: Context, run_id: str, poll_s: float = 1.0, cluster: str | None = None, jobs: JobsPort | None = None
) -> int:
    """Reconcile the run until it ends, drawing step, loss, tokens/s and ETA. Returns an exit code.

    A background supervisor holding the lock keeps reconciling; this one then only draws. On
    Ctrl-C a run still live is handed to a background supervisor (`cluster`: its spec file)."""
    from controlplane.supervisor.loop import Supervisor

    sup = Supervisor(ctx, jobs)
    try:
        return _watch(ctx, run_id, sup.reconcile_run, poll_s)
    except KeyboardInterrupt:
        sup.close()
        return _hand_over(ctx, run_id, cluster)
    finally:
        sup.close()


def _hand_over(ctx: Context, run_id: str, cluster: str | None) -> int:
    """Ctrl-C: the run keeps training, so a background supervisor takes it over (or the user is told
    plainly that nothing guards it). Exit code 130, as for any interrupted command."""
    from controlplane.cli.supervise_cmd import ensure_supervisor
    from controlplane.errors import LlmctlError

    state = RunState(ctx.ledger.get_run(run_id)["state"])
    if state.is_terminal:
        err.print(f"run {run_id} {state.value}")
        return 130
    try:
        pid, started = ensure_supervisor(ctx, cluster)
    except (LlmctlError, OSError) as exc:
        err.print(
            f"interrupted: run {run_id} is still {state.value} and NOTHING GUARDS IT NOW "
            f"(no supervisor: {exc}); start one with `llmctl supervise --detach`, or stop it with `llmctl run stop {run_id}`",
            markup=False,
        )
        return 130
    how = "started a background supervisor" if started else "the background supervisor"
    err.print(
        f"interrupted: run {run_id} is still {state.value}; {how} (pid {pid}) guards it now. "
        f"Follow with `llmctl run watch {run_id}`, stop with `llmctl run stop {run_id}`.",
        markup=False,
    )
    return 130


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
        seen = len(ctx.ledger.transitions(run_id))
        while True:
            reconcile(run_id)
            transitions = ctx.ledger.transitions(run_id)
            for t in transitions[seen:]:  # restarts and their causes, as they happen
                if t["to_state"] in ("recovering", "provisioning") and t["from_state"] != "pending":
                    progress.console.print(f"  {_describe_transition(t)}", markup=False, highlight=False)
            seen = len(transitions)
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


def _describe_transition(t: dict) -> str:
    n = t.get("attempt")
    if t["to_state"] == "recovering":
        return f"attempt {n} ended: {t['cause']}"
    return f"attempt {n} submitted (restart of attempt {(n or 1) - 1}): {t['cause']}"


def _describe(ev: dict) -> str:
    if ev.get("type") == "worker_replaced":
        return f"rank {ev.get('rank')} replaced in {ev.get('recovery_s', 0):.2f}s from a {ev.get('from', '?')} worker"
    return f"{ev.get('kind')} rank={ev.get('rank')} step={ev.get('step')} {ev.get('detail', '')}"
