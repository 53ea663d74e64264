"""The simulator's side of the supervisor policy: simulated world in, the real `decide` out.

The supervisor's reconcile loop builds `Observed` from the ledger, Ray and events.jsonl; this
adapter builds it from the simulator's state at the moment a failure becomes visible, calls
the same `controlplane.supervisor.policy.decide`, and reads back what a real run would do:
give up (MarkFailed), wait (Backoff), resume from which step (Submit.max_resume_step), and
which node to take out (ExcludeNode). Hang detection is the policy's too: the simulator asks
at the moment the policy's hang timeout expires and checks that `decide` agrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.spec import FaultToleranceSpec
from controlplane.states import RunState
from controlplane.supervisor import actions as A
from controlplane.supervisor import observed as O
from controlplane.supervisor import policy as P
from controlplane.supervisor import rules

# How each failure kind of the failure model appears to the supervisor.
_FAILURE_KIND = {"crash": "worker_died", "numerical": "loss_spike"}


@dataclass(frozen=True)
class Verdict:
    give_up: str | None  # the MarkFailed cause, or None to restart
    delay_s: float  # backoff before the next submission
    resume_cap: int | None  # Submit.max_resume_step (a rollback), or None: the newest checkpoint
    excluded: tuple[str, ...]  # nodes the policy took out


@dataclass
class PolicyDriver:
    """Per-simulated-run bookkeeping the real loop would keep in the ledger."""

    spec: FaultToleranceSpec
    final_step: int
    step_s: float
    attempt: int = 1
    restarts: int = 0
    rollbacks: int = 0
    progressed: list[bool] = field(default_factory=list)  # per finished attempt
    skip_steps: tuple[tuple[int, int], ...] = ()

    def hang_timeout_s(self) -> float:
        return rules.hang_timeout_s(self.spec, self.step_s)

    def on_failure(
        self,
        *,
        now: float,
        kind: str,
        cause: str,
        node: str | None,
        started_at: float | None,
        submitted_at: float,
        last_step: int,
        last_step_at: float | None,
        verified_steps: tuple[int, ...],
        progressed: bool,
    ) -> Verdict:
        """The failure of the current attempt has become visible at `now`: what does the policy do?"""
        nodes = (O.NodeStatus(node, healthy=False, failures=1, reasons=(cause,)),) if node else ()
        common = dict(
            run_state=RunState.RUNNING if started_at is not None else RunState.RECOVERING,
            final_step=self.final_step,
            attempt=self.attempt,
            attempt_submitted_at=submitted_at,
            attempt_started_at=started_at,
            attempt_progressed=progressed,
            last_step=last_step,
            last_step_at=last_step_at,
            median_step_s=self.step_s,
            restarts=self.restarts,
            restarts_without_progress=rules.restarts_without_progress(self.progressed),
            rollbacks=self.rollbacks,
            verified_steps=tuple(v for v in verified_steps if v > 0),
            skip_steps=self.skip_steps,
            nodes=nodes,
        )
        if kind == "hang" and started_at is not None:
            obs = O.Observed(job_status=O.JobStatus.RUNNING, **common)
        else:
            fkind = _FAILURE_KIND.get(kind, "worker_died") if started_at is not None else "worker_died"
            failure = O.Failure(fkind, now, self.attempt, last_step, node=node, detail=cause)
            status = O.JobStatus.RUNNING if fkind == "loss_spike" else O.JobStatus.FAILED
            obs = O.Observed(job_status=status, failures=(failure,), **common)
        actions = P.decide(obs, self.spec, now)
        return self._read(actions, now, progressed)

    def _read(self, actions: list, now: float, progressed: bool) -> Verdict:
        give_up, delay, cap, excluded, submitted = None, None, None, [], False
        for act in actions:
            if isinstance(act, A.MarkFailed):
                give_up = act.cause
            elif isinstance(act, A.ExcludeNode):
                excluded.append(act.node)
            elif isinstance(act, A.Backoff):
                delay, cap, submitted = max(0.0, act.until - now), act.then.max_resume_step, True
                self.skip_steps = act.then.skip_steps
            elif isinstance(act, A.Submit):
                delay, cap, submitted = 0.0, act.max_resume_step, True
                self.skip_steps = act.skip_steps
            elif isinstance(act, A.RecordIncident) and act.kind == "rollback":
                self.rollbacks += 1
        if give_up is None and not submitted:
            # The policy saw nothing to act on: the adapter's picture of the failure is wrong.
            raise RuntimeError(f"policy did not react to a failure: {actions!r}")
        self.progressed.append(progressed)
        if give_up is None:
            self.attempt += 1
            self.restarts += 1
        return Verdict(give_up, delay or 0.0, cap, tuple(excluded))
