"""What the supervisor policy sees: plain, frozen data about one run and its cluster.

The reconcile loop (`controlplane.supervisor.observe`) builds an `Observed` from the ledger,
the Ray Jobs API, the run's events.jsonl and node telemetry; the failure simulator
(`controlplane.planning.policy_driver`) builds one from its model of the world. Both hand it
to `controlplane.supervisor.policy.decide`. Times are seconds since the epoch (or any one
clock, consistently); steps are 1-based completed global steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from controlplane.states import RunState


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
    Each is a tuple of (resource, amount), e.g. (("CPU", 4.0),); `excluded`: what the live nodes
    that are excluded hold besides (an operator's readmission, or a replaced node, gives it back)."""

    asked: tuple[tuple[str, float], ...]
    total: tuple[tuple[str, float], ...]
    free: tuple[tuple[str, float], ...]
    excluded: tuple[tuple[str, float], ...] = ()

    def short(self) -> dict[str, tuple[float, float, float]]:
        """resource -> (asked, free, total), for the resources asked and not free."""
        total, free = dict(self.total), dict(self.free)
        return {r: (a, free.get(r, 0.0), total.get(r, 0.0)) for r, a in self.asked if a > free.get(r, 0.0) + 1e-9}

    def never_fits(self) -> bool:
        """More than the whole cluster has, excluded nodes included."""
        total, held = dict(self.total), dict(self.excluded)
        return any(a > total.get(r, 0.0) + held.get(r, 0.0) + 1e-9 for r, a in self.asked)

    def held_out(self) -> bool:
        """More than the nodes not excluded have, but not more than the cluster has: the
        exclusions are why it waits."""
        total = dict(self.total)
        return not self.never_fits() and any(a > total.get(r, 0.0) + 1e-9 for r, a in self.asked)

    def describe(self) -> str:
        parts = [f"{a:g} {r} asked, {f:g} free of {t:g}" for r, (a, f, t) in self.short().items()]
        if self.held_out():
            held = ", ".join(f"{v:g} {r}" for r, v in self.excluded if v)
            parts.append(f"{held} on excluded nodes (`llmctl node readmit NODE` puts one back)")
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
