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
    Observed, Heartbeat, Failure, NodeStatus, PendingRestart, Capacity, JobStatus  (inputs)
    Submit, StopJob, Backoff, MarkRunning, MarkRecovering, MarkSucceeded, MarkFailed,
    MarkStopped, RecordIncident, ExcludeNode, SetCheckpointInterval       (actions)
    decide

The rules (each unit-tested in tests/unit/test_supervisor_policy.py):
- Restart budget: a failed attempt is restarted while `restarts < max_restarts`; then
  the run fails with cause "restart budget exhausted".
- Backoff: the k-th restart in a row without progress waits
  min(backoff_initial_s * 2**k, backoff_max_s); a restart after progress waits the initial delay.
- Crash loop: when `crash_loop_restarts` restarts in a row made no step progress, the run
  fails with cause "crash loop: ..." naming the last failure.
- Hang: a RUNNING attempt with no new step for clamp(hang_timeout_factor x median step
  time, hang_timeout_min_s, hang_timeout_max_s) (before its first step: startup_timeout_s)
  is stopped and restarted; the incident names the ranks whose heartbeats went stale.
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
from dataclasses import dataclass, field
from enum import StrEnum

from controlplane.spec import CheckpointSpec, FaultToleranceSpec
from controlplane.states import RunState
from controlplane.supervisor.rules import (
    DEFAULT_MTBF_S,
    backoff_delay_s,
    hang_timeout_s,
    interval_steps,
    numerical_fault,
    rollback_plan,
)

NUMERICAL = frozenset({"nan_loss", "loss_spike"})


class JobStatus(StrEnum):
    """What the Ray Jobs API says about the current attempt's submission."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    MISSING = "MISSING"  # the Jobs API does not know the submission (cluster restarted, never submitted)

    @property
    def is_live(self) -> bool:
        return self in (JobStatus.PENDING, JobStatus.RUNNING)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    last_seen: float
    node: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class Failure:
    """A `failure` event (or a job exit the loop turned into one)."""

    kind: str  # worker_died | nan_loss | loss_spike | hang | checkpoint_error | driver_error | crash | ...
    at: float
    attempt: int
    step: int | None = None
    rank: int | None = None
    node: str | None = None
    detail: str = ""
    ranks: tuple[int, ...] = ()  # for a hang: the ranks whose heartbeats stopped
    recovered: bool = False  # the job replaced the worker inside the attempt: not why it ended


@dataclass(frozen=True)
class NodeStatus:
    node: str
    healthy: bool = True
    excluded: bool = False
    failures: int = 0  # failures attributed to this node during the run (all attempts)
    reasons: tuple[str, ...] = ()  # telemetry reasons when unhealthy, e.g. "xid 79 on gpu 3"
    dead: str | None = None  # Ray's node table says it died unexpectedly: its death reason


@dataclass(frozen=True)
class Capacity:
    """What the current attempt asks of the cluster, and what the cluster has (nodes not excluded).
    Each is a tuple of (resource, amount), e.g. (("CPU", 4.0),)."""

    asked: tuple[tuple[str, float], ...]
    total: tuple[tuple[str, float], ...]
    free: tuple[tuple[str, float], ...]

    def short(self) -> dict[str, tuple[float, float, float]]:
        """resource -> (asked, free, total), for the resources asked and not free."""
        total, free = dict(self.total), dict(self.free)
        return {r: (a, free.get(r, 0.0), total.get(r, 0.0)) for r, a in self.asked if a > free.get(r, 0.0) + 1e-9}

    def never_fits(self) -> bool:
        total = dict(self.total)
        return any(a > total.get(r, 0.0) + 1e-9 for r, a in self.asked)

    def describe(self) -> str:
        parts = [f"{a:g} {r} asked, {f:g} free of {t:g}" for r, (a, f, t) in self.short().items()]
        return "; ".join(parts) or "resources free; placing the workers"


@dataclass(frozen=True)
class PendingRestart:
    """A restart decided earlier (persisted by the loop) that waits for its backoff or the old job."""

    cause: str
    decided_at: float
    not_before: float
    max_resume_step: int | None = None
    skip_steps: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Observed:
    run_state: RunState
    final_step: int
    attempt: int = 0  # current attempt number; 0 = none submitted yet
    job_status: JobStatus = JobStatus.MISSING
    attempt_submitted_at: float | None = None
    attempt_started_at: float | None = None  # the attempt's `start` event; None = still starting
    attempt_nodes: tuple[str, ...] = ()  # nodes hosting the current attempt's workers
    attempt_progressed: bool = False  # the current attempt completed a step beyond the run's previous high-water
    end_status: str | None = None  # the current attempt's `end` event status, if written
    last_step: int = 0  # newest completed step of the current lineage
    last_step_at: float | None = None
    median_step_s: float | None = None
    heartbeats: tuple[Heartbeat, ...] = ()  # current attempt, one per rank
    failures: tuple[Failure, ...] = ()  # current attempt's failure events, oldest first
    recent_losses: tuple[float, ...] = ()  # current attempt's recent step losses, oldest first
    restarts: int = 0  # attempts after the first so far
    restarts_without_progress: int = 0  # consecutive previous restarts (attempt > 1) that made no progress
    rollbacks: int = 0  # numerical-fault rollbacks so far
    verified_steps: tuple[int, ...] = ()  # verified, trusted checkpoint steps on disk
    poisoned_steps: tuple[int, ...] = ()  # checkpoints written after a numerical fault: never resume from them
    skip_steps: tuple[tuple[int, int], ...] = ()  # half-open data windows every later attempt must skip
    nodes: tuple[NodeStatus, ...] = ()
    pending: PendingRestart | None = None
    stop_requested: bool = False  # an operator asked to stop the run
    capacity: Capacity | None = None  # None: unknown (no cluster view); judged only before the start event
    # checkpoint interval 'auto' inputs
    save_cost_s: float | None = None  # time training lost per recent checkpoint (blocking, + persist if sync)
    mtbf_s: float | None = None  # observed mean time between failures (None: not yet observed)
    interval_steps: int | None = None  # the interval currently written for the job

    @property
    def newest_verified_step(self) -> int | None:
        return max(self.verified_steps) if self.verified_steps else None


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs that are the supervisor's, not the user's."""

    startup_timeout_s: float | None = None  # RUNNING without a start/step event; None: hang_timeout_max_s
    heartbeat_stale_s: float = 15.0  # a rank not heard from for this long is named in a hang incident
    stop_grace_s: float = 30.0  # how long a restart waits for the old job to stop before submitting anyway
    interval_change_ratio: float = 0.2  # rewrite the 'auto' checkpoint interval when it moves by this much
    unschedulable_after_s: float = 60.0  # asks more than the whole cluster has for this long: fail the run
    provision_timeout_s: float = 900.0  # waits for resources another run holds for this long: fail the run


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Submit:
    """Start attempt `attempt`: `--max-resume-step` and `--skip-steps A:B` (half-open) as given."""

    attempt: int
    cause: str
    max_resume_step: int | None = None
    skip_steps: tuple[tuple[int, int], ...] = ()
    exclude_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class StopJob:
    attempt: int
    reason: str


@dataclass(frozen=True)
class Backoff:
    """Wait until `until`, then submit `then` (the loop persists it as a PendingRestart)."""

    until: float
    then: Submit


@dataclass(frozen=True)
class MarkRunning:
    cause: str


@dataclass(frozen=True)
class MarkRecovering:
    cause: str


@dataclass(frozen=True)
class MarkSucceeded:
    cause: str


@dataclass(frozen=True)
class MarkFailed:
    cause: str


@dataclass(frozen=True)
class MarkStopped:
    cause: str


@dataclass(frozen=True)
class RecordIncident:
    kind: str
    detail: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ExcludeNode:
    node: str
    evidence: str


@dataclass(frozen=True)
class SetCheckpointInterval:
    steps: int
    reason: str


Action = (
    Submit
    | StopJob
    | Backoff
    | MarkRunning
    | MarkRecovering
    | MarkSucceeded
    | MarkFailed
    | MarkStopped
    | RecordIncident
    | ExcludeNode
    | SetCheckpointInterval
)


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
