"""Creating runs and launching their attempts: the thin layer between the CLI and Ray.

`create_run` freezes the spec into the run directory and records the run (state `pending`).
`start_run` makes one supervisor pass, which records attempt 1, moves the fence to it and
submits `<run_id>-a1` through the Jobs API; every later attempt is the supervisor's too. A
first submission the cluster refuses for good leaves the run `failed` with that cause
(`require_cluster` checks before anything is recorded, so `run submit` leaves nothing).
`summarize` condenses a run's events for `run status`, `--watch` and the quickstart summary
(pure; no Ray, no torch).
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

from controlplane.context import Context
from controlplane.data.mixture import check_mixture
from controlplane.errors import ConfigurationError, CorruptFileError, LlmctlError, UserError
from controlplane.rundir import RunDir
from controlplane.spec import RunSpec, dump_spec, job_refusals, read_record
from controlplane.states import AttemptState, RunState


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_runnable(spec: RunSpec) -> None:
    """Raise ConfigurationError (one line naming the field) for what the job does not implement."""
    refused = job_refusals(spec)
    if refused:
        raise ConfigurationError(refused[0])


def create_run(ctx: Context, spec: RunSpec, run_id: str | None = None) -> RunDir:
    check_runnable(spec)
    datasets = resolve_datasets(ctx, spec)
    dataset_dir = datasets[0][0]
    run_id = run_id or new_run_id(spec.name)
    run_dir = ctx.run_dir(run_id).create()
    run_dir.write_spec(
        {
            "run_id": run_id,
            "run": dump_spec(spec),
            "cluster": dump_spec(ctx.cluster),
            "dataset_dir": str(dataset_dir),
            "datasets": [[str(d), w] for d, w in datasets],
        }
    )
    ctx.ledger.create_run(run_id, spec.name, dump_spec(spec), dump_spec(ctx.cluster), str(run_dir.path))
    return run_dir


def resolve_datasets(ctx: Context, spec: RunSpec) -> list[tuple[Path, float]]:
    """The run's datasets as absolute directories with weights; one line naming a bad one."""
    field = "data.mixture" if spec.data.mixture else "data.path"
    pairs = [(ctx.dataset_dir(p).resolve(), w) for p, w in spec.data.datasets()]
    try:
        check_mixture(pairs)
    except CorruptFileError as exc:
        raise UserError(f"{field}: {exc}") from None
    return pairs


def load_run_spec(run: dict[str, Any]) -> RunSpec:
    return read_record(RunSpec, run["spec"])


def require_cluster(ctx: Context) -> None:
    """Raise ClusterNotRunning (a UserError) unless the run's cluster can take a submission now."""
    from controlplane import ray_cluster

    ray_cluster.require_reachable(ctx.cluster)


def start_run(ctx: Context, run_id: str) -> int | None:
    """One supervisor pass over a new run: it records, fences and submits attempt 1.

    A submission refused for good (the cluster is not up, a bad token) leaves the run `failed`
    with that cause, so no supervisor ever starts it unasked; the error is raised again."""
    from controlplane.supervisor.loop import Supervisor

    sup = Supervisor(ctx)
    try:
        sup.reconcile_run(run_id)
    except LlmctlError as exc:
        if not exc.retryable:
            abandon_run(ctx, run_id, f"not submitted: {str(exc).splitlines()[0]}")
        raise
    finally:
        sup.close()
    current = ctx.ledger.current_attempt(run_id)
    return current["attempt"] if current else None


def abandon_run(ctx: Context, run_id: str, cause: str) -> None:
    """A run whose first submission failed: it and its unsubmitted attempt end `failed` with `cause`."""
    current = ctx.ledger.current_attempt(run_id)
    if current and not current.get("job_id") and not AttemptState(current["state"]).is_terminal:
        ctx.ledger.update_attempt(run_id, current["attempt"], state=AttemptState.FAILED, cause=cause)
    ctx.ledger.transition(run_id, RunState.FAILED, cause, current["attempt"] if current else None)


def stop_run(ctx: Context, run_id: str, cause: str = "stopped by user") -> bool:
    """Stop the live attempt's Ray job and mark the run stopped. Idempotent."""
    run = ctx.ledger.get_run(run_id)
    if RunState(run["state"]).is_terminal:
        return False
    current = ctx.ledger.current_attempt(run_id)
    if current and current.get("job_id") and not AttemptState(current["state"]).is_terminal:
        from controlplane import ray_cluster

        with contextlib.suppress(ray_cluster.ClusterNotRunning):  # nothing left to stop
            ray_cluster.stop_job(ctx.cluster, current["job_id"])
        ctx.ledger.update_attempt(run_id, current["attempt"], state=AttemptState.STOPPED, cause=cause)
    stopped = ctx.ledger.transition(run_id, RunState.STOPPED, cause, current["attempt"] if current else None)
    if stopped and current:  # its job was stopped before it could say so: the run dir says it ended
        rd = RunDir(Path(run["run_dir"]))
        recent = rd.recent_events(types={"step", "end"}) if rd.path.is_dir() else None
        if recent is not None and not any(
            e["type"] == "end" and e.get("attempt") == current["attempt"] for e in recent
        ):
            rd.append_event("end", current["attempt"], status="stopped", cause=cause, step=summarize(recent)["step"])
    return stopped


# --------------------------------------------------------------------------- summaries


def status_summary(ctx: Context, run: dict[str, Any], run_dir: RunDir, total_steps: int | None) -> dict[str, Any]:
    """`summarize` over the recent events only, so it costs the same on day 30 as on day 1;
    what the window cannot know comes from the ledger (checkpoints) and the file's head (first loss)."""
    start = run_dir.recent_offset()
    s = summarize([e for _, e in run_dir.iter_events(start)], total_steps)
    size = run_dir.events_file.stat().st_size if run_dir.events_file.exists() else 0
    s["events_window"] = {"from_byte": start, "bytes": size - start, "size": size}
    from controlplane.supervisor.store import load_track  # the ledger's copy, for starts before the window

    track = load_track(ctx.ledger, run["run_id"])
    older = {int(n): a.get("resume_step") for n, a in track.attempts.items() if a.get("started_at")}
    s["resumed"] = {**older, **s["resumed"]}
    if start:
        first = run_dir.first_event("step")
        s["first_loss"] = first.get("loss") if first else None
        recorded = [c["step"] for c in ctx.ledger.checkpoints(run["run_id"])]
        if recorded:
            s["checkpoints"] = max(s["checkpoints"], len(recorded))
            s["last_checkpoint_step"] = max(s["last_checkpoint_step"] or 0, *recorded)
    return s


def summarize(events: list[dict[str, Any]], total_steps: int | None = None) -> dict[str, Any]:
    """Condense a run's events: progress, speed, checkpoints, failures, stragglers."""
    steps = [e for e in events if e.get("type") == "step"]
    ckpts = [e for e in events if e.get("type") == "checkpoint"]
    out: dict[str, Any] = {
        "step": 0,
        "loss": None,
        "first_loss": None,
        "tokens": 0,
        "tokens_per_s": None,
        "checkpoints": len(ckpts),
        "last_checkpoint_step": ckpts[-1].get("step") if ckpts else None,
        "failures": [e for e in events if e.get("type") == "failure"],
        "replacements": [e for e in events if e.get("type") == "worker_replaced"],
        "stragglers": [e for e in events if e.get("type") == "straggler"],
        "attempts": sorted({e.get("attempt") for e in events if e.get("attempt") is not None}),
        "end": next((e for e in reversed(events) if e.get("type") == "end"), None),
        # attempt -> the step its `start` event says it resumed from
        "resumed": {e["attempt"]: e.get("resume_step") for e in events if e.get("type") == "start" and "attempt" in e},
        "eta_s": None,
    }
    if steps:
        last = steps[-1]
        out.update(step=last.get("step", 0), loss=last.get("loss"), tokens=last.get("tokens", 0))
        out["first_loss"] = steps[0].get("loss")
        recent = [s.get("tokens_per_s") for s in steps[-20:] if s.get("tokens_per_s")]
        out["tokens_per_s"] = statistics.median(recent) if recent else None
        times = [s.get("step_time_s") for s in steps[-20:] if s.get("step_time_s")]
        if total_steps and times:
            out["eta_s"] = max(0, total_steps - out["step"]) * statistics.median(times)
        rank_times = last.get("rank_step_times") or []
        if rank_times:
            med = statistics.median(rank_times)
            out["rank_step_times"] = rank_times
            out["slowest_rank"] = {
                "rank": rank_times.index(max(rank_times)),
                "ratio": max(rank_times) / med if med else None,
            }
    if total_steps:
        out["total_steps"] = total_steps
    return out
