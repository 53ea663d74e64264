"""The supervisor's decisions: a pure function of observed state.

    decide(observed: Observed, spec: FaultToleranceSpec, now: float,
           *, checkpoint: CheckpointSpec | None = None, config: PolicyConfig = PolicyConfig())
        -> list[Action]

No I/O, no clock, no randomness: the same `Observed` and `now` always give the same
actions. The reconcile loop (`controlplane.supervisor.loop`) builds `Observed` from the
ledger, the Ray Jobs API, the run's events.jsonl and node telemetry, then carries the
actions out; the month-long failure simulator (`controlplane.planning`) builds `Observed`
from its own model of the world and calls the same `decide`. Every input is plain data
(ints, floats, strings, tuples of frozen dataclasses); times are seconds since the epoch
(or any one clock, consistently); steps are 1-based completed global steps.

Stable API (keep it so the simulator keeps working; the arithmetic helpers — hang_timeout_s,
backoff_delay_s, rollback_plan, numerical_fault, young_daly_interval, interval_steps,
mtbf_estimate_s, restarts_without_progress — live in `controlplane.supervisor.rules`):
    controlplane.supervisor.observed: Observed, Heartbeat, Failure, NodeStatus, PendingRestart,
        Capacity, JobStatus, PolicyConfig                                     (inputs)
    controlplane.supervisor.actions: Submit, StopJob, Backoff, MarkRunning, MarkRecovering,
        MarkSucceeded, MarkFailed, MarkStopped, RecordIncident, ExcludeNode,
        SetCheckpointInterval, Action                                         (actions)
    controlplane.supervisor.policy: decide

The rules (each unit-tested in tests/unit/test_supervisor_policy.py):
- Restart budget: a failed attempt is restarted while `restarts < max_restarts`; then
  the run fails with cause "restart budget exhausted".
- Backoff: the k-th restart in a row without progress waits
  min(backoff_initial_s * 2**k, backoff_max_s); a restart after progress waits the initial delay.
- Crash loop: when `crash_loop_restarts` restarts in a row made no step progress, the run
  fails with cause "crash loop: ..." naming the last failure.
- Hang: a RUNNING attempt with no new step for clamp(hang_timeout_factor x median step
  time, hang_timeout_min_s, hang_timeout_max_s) (before its first step, and while the job
  replaces a failed rank inside the attempt: startup_timeout_s) is stopped and restarted;
  the incident names the ranks whose heartbeats went stale.
- Numerical fault (a `nan_loss` / `loss_spike` failure, or a NaN/spike in the recent
  losses): roll back to the newest verified checkpoint strictly before the bad step and
  skip the data window [ckpt_step+1 .. bad_step] in every later attempt, at most
  `max_rollbacks` times.
- Bad nodes: a node with `node_failure_threshold` failures, unhealthy per telemetry, or
  dead per Ray's node table (an unexpected death; the reason is named in the decision) is
  excluded; a running attempt with workers on such a node is restarted elsewhere.
- Finished: an attempt whose `end` event says succeeded at the final step makes the run
  succeeded, whatever the Jobs API says now (it forgets jobs when the cluster restarts).
- Cause: an attempt's end is blamed on its last failure the job did not recover from (a
  worker replaced inside the attempt is not the cause), else on how the job exited.
- Waiting for resources: before its start event, an attempt whose workers the cluster
  cannot place (asked vs free, in `Capacity`) fails the run after `unschedulable_after_s`
  when it asks more than the whole cluster has, else after `provision_timeout_s`.
- Checkpoint interval 'auto': Young/Daly sqrt(2 x save cost x MTBF), in steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from controlplane.spec import CheckpointSpec, FaultToleranceSpec
from controlplane.states import RunState
from controlplane.supervisor.actions import (
    Action,
    Backoff,
    ExcludeNode,
    MarkFailed,
    MarkRecovering,
    MarkRunning,
    MarkStopped,
    MarkSucceeded,
    RecordIncident,
    SetCheckpointInterval,
    StopJob,
    Submit,
)
from controlplane.supervisor.observed import Failure, JobStatus, Observed, PolicyConfig
from controlplane.supervisor.rules import (
    DEFAULT_MTBF_S,
    backoff_delay_s,
    hang_timeout_s,
    interval_steps,
    numerical_fault,
    rollback_plan,
)

NUMERICAL = frozenset({"nan_loss", "loss_spike"})


# --------------------------------------------------------------------------- decide


def decide(
    observed: Observed,
    spec: FaultToleranceSpec,
    now: float,
    *,
    checkpoint: CheckpointSpec | None = None,
    config: PolicyConfig = PolicyConfig(),
) -> list[Action]:
    """What to do now. An empty list means: nothing, look again later."""
    o = observed
    state = RunState(o.run_state)
    if state.is_terminal:
        return [StopJob(o.attempt, f"run is {state}")] if o.attempt and o.job_status.is_live else []
    if o.stop_requested:
        acts: list[Action] = []
        if o.attempt and o.job_status.is_live:
            acts.append(StopJob(o.attempt, "stop requested"))
        return [*acts, MarkStopped("stop requested by operator")]

    actions: list[Action] = list(_node_exclusions(o, spec))
    if o.attempt == 0:
        return [*actions, Submit(1, "initial submission", exclude_nodes=_excluded(o, actions))]

    if o.pending is not None:
        return actions + _pending_restart(o, now, config, actions)

    actions += _checkpoint_interval(o, checkpoint, config)
    status = o.job_status
    finished = o.end_status == "succeeded" and o.last_step >= o.final_step
    if status is JobStatus.SUCCEEDED or (finished and not status.is_live):
        # A finished run is never trained again, even when the Jobs API lost it (cluster restarted).
        if finished or o.last_step >= o.final_step or o.end_status == "succeeded":
            return [*actions, MarkSucceeded(f"attempt {o.attempt} reached step {o.last_step}")]
        fail = Failure("early_exit", now, o.attempt, o.last_step, detail="job exited 0 before the final step")
        return actions + _recover(o, spec, now, fail, actions)
    if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.MISSING):
        return actions + _recover(o, spec, now, _cause_of_exit(o, now), actions)
    waiting = _waiting_for_resources(o, now, config)
    if waiting is not None:
        return [*actions, *waiting]
    if status is JobStatus.PENDING:
        return actions

    # RUNNING: numerical fault, unhealthy node under the attempt, hang
    numeric = _numerical(o, spec)
    if numeric is not None:
        return actions + _recover(o, spec, now, numeric, actions)
    bad = [a for a in actions if isinstance(a, ExcludeNode) and a.node in o.attempt_nodes]
    if bad:
        dead = {n.node for n in o.nodes if n.dead}
        kind = "node_dead" if bad[0].node in dead else "node_unhealthy"
        fail = Failure(kind, now, o.attempt, o.last_step, node=bad[0].node, detail=bad[0].evidence)
        return actions + _recover(o, spec, now, fail, actions)
    hang = _hang(o, spec, now, config)
    if hang is not None:
        return actions + _recover(o, spec, now, hang, actions)
    if state in (RunState.PROVISIONING, RunState.RECOVERING, RunState.PENDING) and (
        o.attempt_started_at is not None or (o.last_step_at or 0) >= (o.attempt_submitted_at or math.inf)
    ):
        actions.append(MarkRunning(f"attempt {o.attempt} started"))
    return actions


def _excluded(o: Observed, actions: Sequence[Action]) -> tuple[str, ...]:
    names = {n.node for n in o.nodes if n.excluded} | {a.node for a in actions if isinstance(a, ExcludeNode)}
    return tuple(sorted(names))


def _node_exclusions(o: Observed, spec: FaultToleranceSpec) -> list[Action]:
    out: list[Action] = []
    for n in o.nodes:
        if n.excluded:
            continue
        if not n.healthy:
            out.append(ExcludeNode(n.node, "unhealthy: " + ("; ".join(n.reasons) or "telemetry says so")))
        elif n.dead:
            out.append(ExcludeNode(n.node, f"Ray's node table: node died ({n.dead})"))
        elif n.failures >= spec.node_failure_threshold:
            out.append(
                ExcludeNode(n.node, f"{n.failures} failures on this node (threshold {spec.node_failure_threshold})")
            )
    return out


def _waiting_for_resources(o: Observed, now: float, config: PolicyConfig) -> list[Action] | None:
    """Before its start event, an attempt whose workers cannot be placed: wait (a bounded time), then fail.
    None: not waiting for resources (or no view of them)."""
    c = o.capacity
    if c is None or o.attempt_started_at is not None or not c.short():
        return None
    since = o.attempt_submitted_at if o.attempt_submitted_at is not None else now
    waited = now - since
    if c.never_fits() and waited > config.unschedulable_after_s:
        why = f"unschedulable: attempt {o.attempt} asks more than the cluster has ({c.describe()})"
    elif waited > config.provision_timeout_s:
        why = f"waited {waited:.0f}s for resources (limit {config.provision_timeout_s:.0f}s): {c.describe()}"
    else:
        return []
    acts: list[Action] = [RecordIncident("unschedulable", {"attempt": o.attempt, "detail": why})]
    if o.job_status.is_live:
        acts.append(StopJob(o.attempt, "unschedulable"))
    return [*acts, MarkFailed(why)]


def _cause_of_exit(o: Observed, now: float) -> Failure:
    """The most telling failure of an attempt that ended: numerical > last unrecovered failure > exit.
    A worker the job replaced inside the attempt is not why the attempt ended."""
    for f in reversed(o.failures):
        if f.kind in NUMERICAL:
            return f
    unrecovered = [f for f in o.failures if not f.recovered]
    if unrecovered:
        return unrecovered[-1]
    kind = {JobStatus.FAILED: "crash", JobStatus.STOPPED: "job_stopped", JobStatus.MISSING: "job_lost"}[o.job_status]
    detail = {
        "crash": "job exited with an error and wrote no failure event",
        "job_stopped": "job was stopped outside the supervisor",
        "job_lost": "the Jobs API no longer knows the job (cluster restarted?)",
    }[kind]
    return Failure(kind, now, o.attempt, o.last_step, detail=detail)


def _numerical(o: Observed, spec: FaultToleranceSpec) -> Failure | None:
    for f in o.failures:
        if f.kind in NUMERICAL:
            return f
    hit = numerical_fault(o.recent_losses, spec.loss_spike_factor, spec.loss_window)
    if hit is None:
        return None
    idx, kind = hit
    step = o.last_step - (len(o.recent_losses) - 1 - idx)
    return Failure(kind, o.last_step_at or 0.0, o.attempt, step, detail=f"loss {o.recent_losses[idx]} at step {step}")


# failures of one rank that the job answers by replacing it inside the attempt (tier 1)
REPLACED = frozenset({"worker_died", "hang"})


def _hang(o: Observed, spec: FaultToleranceSpec, now: float, config: PolicyConfig) -> Failure | None:
    started = o.attempt_started_at
    submitted = o.attempt_submitted_at or started or now
    last_step_at = o.last_step_at if o.last_step_at is not None and o.last_step_at >= submitted else None
    if last_step_at is None and started is None:
        limit, since, what = config.startup_timeout_s or spec.hang_timeout_max_s, submitted, "no start event"
    elif o.final_step > 0 and o.last_step >= o.final_step and last_step_at is not None:
        # Past the final step the job flushes its last checkpoint and stops its workers: no more
        # steps will come, so only the hard cap applies.
        limit, since, what = spec.hang_timeout_max_s, last_step_at, "no end after the final step"
    else:
        limit, since, what = hang_timeout_s(spec, o.median_step_s), max(last_step_at or 0.0, started or 0.0), "no step"
        replacing = [
            f.at for f in o.failures if f.kind in REPLACED and f.rank is not None and not f.recovered and f.at >= since
        ]
        if replacing:
            # The job reported a rank's failure and is replacing it inside the attempt: a new
            # worker process starts and loads its state, so it has what a start has.
            limit = max(limit, config.startup_timeout_s or spec.hang_timeout_max_s)
            since, what = max(replacing), "no step since a worker failed and its replacement began"
    if now - since <= limit:
        return None
    stale = sorted(h.rank for h in o.heartbeats if now - h.last_seen > config.heartbeat_stale_s)
    stale_nodes = sorted({h.node for h in o.heartbeats if h.rank in stale and h.node})
    detail = f"{what} for {now - since:.0f}s (timeout {limit:.0f}s); "
    detail += f"heartbeats stopped: ranks {stale}" if stale else "all ranks still heartbeating"
    node = stale_nodes[0] if len(stale_nodes) == 1 else None
    rank = stale[0] if len(stale) == 1 else None
    return Failure("hang", now, o.attempt, o.last_step, rank=rank, node=node, detail=detail, ranks=tuple(stale))


def _recover(o: Observed, spec: FaultToleranceSpec, now: float, fail: Failure, prior: Sequence[Action]) -> list[Action]:
    """The attempt failed (or must be stopped): fail the run, or plan a restart with backoff."""
    acts: list[Action] = []
    detail = {"attempt": o.attempt, "step": fail.step, "detail": fail.detail}
    if fail.rank is not None:
        detail["rank"] = fail.rank
    if fail.node:
        detail["node"] = fail.node
    if fail.kind == "hang":
        detail["stale_ranks"] = list(fail.ranks)
    acts.append(RecordIncident(fail.kind, detail))
    if o.job_status.is_live:
        acts.append(StopJob(o.attempt, fail.kind))
    what = f"{fail.kind} in attempt {o.attempt}" + (f" at step {fail.step}" if fail.step else "")

    streak = 0 if o.attempt_progressed else o.restarts_without_progress + (1 if o.attempt > 1 else 0)
    if streak >= spec.crash_loop_restarts:
        return [*acts, MarkFailed(f"crash loop: {streak} restarts without step progress; last failure: {what}")]
    if o.restarts >= spec.max_restarts:
        return [
            *acts,
            MarkFailed(f"restart budget exhausted ({o.restarts} of {spec.max_restarts}); last failure: {what}"),
        ]

    max_resume, skips = None, tuple(o.skip_steps)
    trusted = o.newest_verified_step
    if o.poisoned_steps and any(p > (trusted or 0) for p in o.poisoned_steps):
        max_resume = trusted or 0
    cause = what
    if fail.kind in NUMERICAL:
        if o.rollbacks >= spec.max_rollbacks:
            return [
                *acts,
                MarkFailed(f"numerical faults: {o.rollbacks} rollbacks used (max {spec.max_rollbacks}); {what}"),
            ]
        bad = fail.step if fail.step is not None else o.last_step
        max_resume, skips = rollback_plan(o.verified_steps, bad, o.skip_steps)
        acts.append(RecordIncident("rollback", {"bad_step": bad, "to_step": max_resume, "skip": list(skips[-1])}))
        cause = f"{what}: rollback to step {max_resume}, skip steps {skips[-1][0]}..{skips[-1][1] - 1}"
    acts.append(MarkRecovering(cause))
    submit = Submit(o.attempt + 1, cause, max_resume, skips, _excluded(o, prior))
    until = now + backoff_delay_s(spec, streak)
    if o.job_status.is_live or until > now:
        acts.append(Backoff(until, submit))
    else:
        acts.append(submit)
    return acts


def _pending_restart(o: Observed, now: float, config: PolicyConfig, prior: Sequence[Action]) -> list[Action]:
    p = o.pending
    assert p is not None
    if o.job_status.is_live and now - p.decided_at < config.stop_grace_s:
        return [StopJob(o.attempt, p.cause)]
    if now < p.not_before:
        return []
    return [Submit(o.attempt + 1, p.cause, p.max_resume_step, p.skip_steps, _excluded(o, prior))]


def _checkpoint_interval(o: Observed, ck: CheckpointSpec | None, config: PolicyConfig) -> list[Action]:
    if ck is None or ck.interval_steps != "auto" or not o.save_cost_s or not o.median_step_s:
        return []
    mtbf = o.mtbf_s or (ck.mtbf_hours * 3600 if ck.mtbf_hours else DEFAULT_MTBF_S)
    steps = interval_steps(o.save_cost_s, mtbf, o.median_step_s, max_steps=max(1, o.final_step))
    cur = o.interval_steps
    if cur and abs(steps - cur) <= config.interval_change_ratio * cur:
        return []
    return [
        SetCheckpointInterval(
            steps,
            f"Young/Daly: sqrt(2 x {o.save_cost_s:.3g}s save x {mtbf:.0f}s MTBF) / {o.median_step_s:.3g}s per step",
        )
    ]
