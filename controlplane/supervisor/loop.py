"""The reconcile loop: observe every live run, `decide`, act, record. All the supervisor's I/O.

    sup = Supervisor(ctx)            # ctx: controlplane.context.Context
    sup.reconcile_run(run_id)        # one pass over one run (what `run submit --watch` calls)
    sup.tick()                       # one pass over every live run in the ledger
    sup.run_forever(interval_s=2.0)  # `llmctl supervise`

One pass over a run:
1. read new lines of events.jsonl from the persisted byte offset into the run's `RunTrack`;
   commit the checkpoints/incidents they imply together with the new offset (one transaction);
2. finish an interrupted submission: an attempt row without a job id is adopted if the Jobs
   API knows `<run_id>-a<N>`, else submitted now under that id (never a second attempt);
3. ask the Jobs API for the current attempt's status; verify checkpoints on disk (cached);
   build `Observed` (`observe.py`: the run track, node health telemetry, Ray's node table);
   call `policy.decide`;
4. commit incidents, the transition, the attempt's cause, the pending restart and one
   `supervisor_decisions` row per action (one transaction); then stop jobs, submit
   (ledger.next_attempt, RunDir.set_fence, then the Jobs API), write the checkpoint interval.

Crash safety: see README.md in this package. One supervisor per storage root: a
`SupervisorLock` (ports.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from controlplane import checkpoint as ckpt
from controlplane.context import Context
from controlplane.errors import LlmctlError, RetryableError
from controlplane.rundir import RunDir
from controlplane.spec import RunSpec, read_record
from controlplane.states import AttemptState, RunState
from controlplane.supervisor import actions as A
from controlplane.supervisor import observed as O
from controlplane.supervisor import policy as P
from controlplane.supervisor import store
from controlplane.supervisor.nodes import EXCLUDE_ENV
from controlplane.supervisor.observe import VerifiedCheckpoints, observe
from controlplane.supervisor.ports import (
    ClusterView,
    JobsPort,
    RayJobs,
    SupervisorBusy,
    SupervisorLock,
    submission_id,
)
from controlplane.supervisor.track import RunTrack

log = logging.getLogger("llmctl.supervisor")

# failures the job could not report itself: the supervisor counts them for the MTBF
UNREPORTED = frozenset(
    {"crash", "job_lost", "job_stopped", "early_exit", "node_unhealthy", "node_dead", "unschedulable"}
)
VIEW_TTL_S = 2.0
_ATTEMPT_STATE = {
    O.JobStatus.SUCCEEDED: AttemptState.SUCCEEDED,
    O.JobStatus.FAILED: AttemptState.FAILED,
    O.JobStatus.STOPPED: AttemptState.STOPPED,
}


# --------------------------------------------------------------------------- the loop


class Supervisor:
    def __init__(
        self,
        ctx: Context,
        jobs: JobsPort | None = None,
        *,
        config: O.PolicyConfig = O.PolicyConfig(),
        clock: Callable[[], float] = time.time,
        exclusive: bool = False,
    ):
        """`exclusive`: take the storage root's lock now (raise SupervisorBusy if held); otherwise
        it is taken on the first reconcile, and a pass is skipped while another process holds it."""
        self.ctx = ctx
        self.jobs: JobsPort = jobs if jobs is not None else RayJobs(ctx)
        self.config = config
        self.clock = clock
        self.lock = SupervisorLock(ctx.storage)
        self._verified = VerifiedCheckpoints()
        self._view: tuple[float, ClusterView | None] = (-1e9, None)
        if exclusive:
            self.lock.acquire()

    def close(self, remove_pid: bool = False) -> None:
        """Let the lock go; `remove_pid`: a supervisor that stops leaves no pid file behind."""
        self.lock.release(remove=remove_pid)

    # ------------------------------------------------------------------ passes

    def tick(self) -> dict[str, list[A.Action]]:
        """One pass over every live run (takes the lock for good). A run whose pass fails is logged
        and retried next tick."""
        self.lock.acquire()
        out: dict[str, list[A.Action]] = {}
        for run in self.ctx.ledger.live_runs():
            try:
                out[run["run_id"]] = self._reconcile(run["run_id"])
            except Exception as exc:  # a supervisor outlives transient errors; the pass is retried next tick
                log.warning("run %s: %s: %s (will retry)", run["run_id"], type(exc).__name__, str(exc).split("\n")[0])
        return out

    def run_forever(self, interval_s: float = 2.0, stop: threading.Event | None = None) -> None:
        self.lock.acquire()
        stop = stop or threading.Event()
        while not stop.is_set():
            started = time.monotonic()
            self.tick()
            stop.wait(max(0.05, interval_s - (time.monotonic() - started)))

    def reconcile_run(self, run_id: str) -> list[A.Action]:
        """One pass over one run. Without the lock held for good (`exclusive`, `run_forever`), the
        lock is taken for this pass only; if another supervisor holds it, the pass is skipped."""
        if self.lock.held:
            return self._reconcile(run_id)
        try:
            self.lock.acquire()
        except SupervisorBusy:
            return []  # the supervisor daemon owns the runs; a watcher only watches
        try:
            return self._reconcile(run_id)
        except RetryableError as exc:  # the Jobs API or the cluster blinked: look again next pass
            log.warning("run %s: %s (will retry)", run_id, exc)
            return []
        finally:
            self.lock.release()

    def _reconcile(self, run_id: str) -> list[A.Action]:
        ledger = self.ctx.ledger
        run = ledger.get_run(run_id)
        state = RunState(run["state"])
        rd = RunDir(Path(run["run_dir"]))
        spec = read_record(RunSpec, run["spec"])
        track = store.load_track(ledger, run_id)

        # 1. events since the persisted offset
        records: list[tuple[str, dict[str, Any]]] = []
        start_offset = track.offset
        for pos, ev in rd.iter_events(track.offset):
            records += track.ingest(ev)
            track.offset = pos
        cur = ledger.current_attempt(run_id)
        if track.pending and cur and cur["attempt"] > int(track.pending.get("after_attempt", 0)):
            track.pending = None  # that restart was carried out before a crash
        if track.offset != start_offset or records:
            store.commit_ingest(ledger, run_id, track, records, self.clock())
        if state.is_terminal:
            if cur and cur.get("job_id") and not AttemptState(cur["state"]).is_terminal:
                self._stop(cur["job_id"])
                store.set_attempt_state(ledger, run_id, cur["attempt"], AttemptState.STOPPED, f"run {state}")
            return []

        # 2. an interrupted submission: adopt or submit under the same id
        if cur is not None and not cur.get("job_id") and not AttemptState(cur["state"]).is_terminal:
            self._finish_submission(run_id, rd, cur)
            cur = ledger.current_attempt(run_id)

        # 3. observe and decide
        status = self.jobs.status(cur["job_id"]) if cur and cur.get("job_id") else O.JobStatus.MISSING
        if cur is not None:
            if status is O.JobStatus.RUNNING and cur["state"] == AttemptState.SUBMITTED:
                store.set_attempt_state(ledger, run_id, cur["attempt"], AttemptState.RUNNING)
            elif status in _ATTEMPT_STATE:
                store.set_attempt_state(ledger, run_id, cur["attempt"], _ATTEMPT_STATE[status])
        now = self.clock()
        observed = observe(
            self.ctx,
            run,
            spec,
            rd,
            track,
            cur,
            status,
            now,
            verified=self._verified.steps(rd),
            view=self.cluster_view(),
        )
        if cur is not None:
            self._note_waiting(run_id, cur, observed, now)
        actions = P.decide(observed, spec.fault_tolerance, now, checkpoint=spec.checkpoint, config=self.config)
        if actions:
            self._act(run_id, spec, rd, track, observed, actions, now)
        return actions

    # ------------------------------------------------------------------ observe

    def cluster_view(self) -> ClusterView | None:
        """The Jobs port's view of the cluster, at most one query per VIEW_TTL_S (None: no view)."""
        at, view = self._view
        if time.monotonic() - at < VIEW_TTL_S:
            return view
        fn = getattr(self.jobs, "cluster_view", None)
        try:
            view = fn() if fn is not None else None
        except LlmctlError as exc:  # no view this time: judged again on a later pass
            log.debug("cluster view: %s", exc)
            view = None
        self._view = (time.monotonic(), view)
        return view

    def _note_waiting(self, run_id: str, cur: dict[str, Any], o: O.Observed, now: float) -> None:
        """Keep in the attempt's info what it waits for (`run status` prints it); written only on change."""
        c = o.capacity
        waiting = c.describe() if c is not None and c.short() else None
        info = dict(cur.get("info") or {})
        if info.get("waiting") == waiting:
            return
        info["waiting"] = waiting
        info["waiting_since"] = now if waiting else None
        self.ctx.ledger.update_attempt(run_id, cur["attempt"], info=info)

    # ------------------------------------------------------------------ act

    def _act(
        self,
        run_id: str,
        spec: RunSpec,
        rd: RunDir,
        track: RunTrack,
        o: O.Observed,
        actions: list[A.Action],
        now: float,
    ) -> None:
        ledger = self.ctx.ledger
        incidents: list[tuple[str, dict[str, Any]]] = []
        transition: tuple[RunState, str] | None = None
        attempt_fields: dict[str, Any] = {}
        decisions = [(type(a).__name__, _cause(a), _detail(a)) for a in actions]
        submit: A.Submit | None = None
        stops: list[A.StopJob] = []
        interval: int | None = None
        for a in actions:
            if isinstance(a, A.RecordIncident):
                incidents.append((a.kind, {"source": "supervisor", **a.detail}))
                if a.kind != "rollback":
                    attempt_fields.setdefault("cause", a.kind)
                if a.kind == "hang":  # detected here, not reported by the job
                    track.add_failure(
                        {
                            "kind": "hang",
                            "at": now,
                            "attempt": o.attempt,
                            "node": a.detail.get("node"),
                            "source": "supervisor",
                        },
                        True,
                    )
                elif a.kind in UNREPORTED:
                    track.failure_count += 1
                elif a.kind == "rollback":
                    track.rollbacks += 1
                    bad = int(a.detail["bad_step"])
                    on_disk = ckpt.committed_steps(rd.checkpoints)
                    track.poisoned = sorted(set(track.poisoned) | {s for s in on_disk if s >= bad})
            elif isinstance(a, A.MarkRunning):
                transition = (RunState.RUNNING, a.cause)
            elif isinstance(a, A.MarkRecovering):
                transition = (RunState.RECOVERING, a.cause)
            elif isinstance(a, A.MarkSucceeded):
                transition = (RunState.SUCCEEDED, a.cause)
            elif isinstance(a, A.MarkFailed):
                transition = (RunState.FAILED, a.cause)
            elif isinstance(a, A.MarkStopped):
                transition = (RunState.STOPPED, a.cause)
            elif isinstance(a, A.Backoff):
                s = a.then
                track.pending = {
                    "cause": s.cause,
                    "decided_at": now,
                    "not_before": a.until,
                    "max_resume_step": s.max_resume_step,
                    "skip_steps": [list(w) for w in s.skip_steps],
                    "after_attempt": o.attempt,
                }
                track.skip_steps = [list(w) for w in s.skip_steps]
            elif isinstance(a, A.Submit):
                submit = a
                track.skip_steps = [list(w) for w in a.skip_steps]
            elif isinstance(a, A.StopJob):
                stops.append(a)
            elif isinstance(a, A.ExcludeNode):
                store.exclude_node(ledger, a.node, a.evidence, run_id, {"attempt": o.attempt})
            elif isinstance(a, A.SetCheckpointInterval):
                interval = a.steps
                track.interval_steps = a.steps
        if transition and transition[0] in (RunState.FAILED, RunState.STOPPED) and o.job_status.is_live:
            attempt_fields.update(state=AttemptState.STOPPED, ended_at=now)
        store.commit_decision(
            ledger,
            run_id,
            track,
            attempt=o.attempt or None,
            incidents=incidents,
            transition=transition,
            attempt_fields=attempt_fields,
            decisions=decisions,
            now=now,
        )
        if interval is not None:
            rd.set_checkpoint_interval(interval)
        cur = ledger.current_attempt(run_id)
        for s in stops:
            if cur and cur["attempt"] == s.attempt and cur.get("job_id"):
                self._stop(cur["job_id"])
        if submit is not None:
            self._submit(run_id, rd, submit)

    def _stop(self, sid: str) -> None:
        try:
            self.jobs.stop(sid)
        except LlmctlError as exc:
            log.warning("stopping %s: %s", sid, exc)

    def _submit(self, run_id: str, rd: RunDir, s: A.Submit) -> None:
        ledger = self.ctx.ledger
        cur = ledger.current_attempt(run_id)
        if (cur["attempt"] if cur else 0) != s.attempt - 1:
            log.warning("run %s: attempt %s already exists; not submitting again", run_id, s.attempt)
            return
        info = {
            "cause": s.cause,
            "max_resume_step": s.max_resume_step,
            "skip_steps": [list(w) for w in s.skip_steps],
            "exclude_nodes": list(s.exclude_nodes),
            "submission_id": submission_id(run_id, s.attempt),
        }
        n = ledger.next_attempt(run_id, s.max_resume_step, info)
        rd.set_fence(n)
        ledger.transition(run_id, RunState.PROVISIONING, s.cause, n)
        self._finish_submission(run_id, rd, ledger.current_attempt(run_id))

    def _finish_submission(self, run_id: str, rd: RunDir, cur: dict[str, Any]) -> None:
        """Attempt `cur` is in the ledger without a job id: adopt its submission, or make it."""
        n = cur["attempt"]
        sid = submission_id(run_id, n)
        info = cur.get("info") or {}
        if rd.current_fence() < n:
            rd.set_fence(n)
        if self.jobs.status(sid) is O.JobStatus.MISSING:
            env = {EXCLUDE_ENV: ",".join(info.get("exclude_nodes") or [])} if info.get("exclude_nodes") else {}
            sid = self.jobs.submit(
                rd,
                n,
                max_resume_step=info.get("max_resume_step"),
                skip_steps=[(int(a), int(b)) for a, b in info.get("skip_steps") or []],
                env_vars=env,
            )
        else:
            log.info("run %s: adopting submission %s", run_id, sid)
        self.ctx.ledger.update_attempt(run_id, n, job_id=sid)
        if RunState(self.ctx.ledger.get_run(run_id)["state"]) == RunState.PENDING:
            self.ctx.ledger.transition(run_id, RunState.PROVISIONING, info.get("cause") or "submitted", n)


def _cause(a: A.Action) -> str:
    for attr in ("cause", "reason", "evidence", "kind"):
        if hasattr(a, attr):
            return str(getattr(a, attr))
    if isinstance(a, A.Backoff):
        return a.then.cause
    return type(a).__name__


def _detail(a: A.Action) -> dict[str, Any]:
    return asdict(a)


def supervise_run(
    ctx: Context, run_id: str, *, interval_s: float = 1.0, timeout_s: float | None = None, jobs: JobsPort | None = None
) -> str:
    """Reconcile one run in the foreground until it ends (or `timeout_s`); returns its final state."""
    sup = Supervisor(ctx, jobs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            sup.reconcile_run(run_id)
            state = RunState(ctx.ledger.get_run(run_id)["state"])
            if state.is_terminal or (deadline is not None and time.monotonic() > deadline):
                return state.value
            time.sleep(interval_s)
    finally:
        sup.close()
