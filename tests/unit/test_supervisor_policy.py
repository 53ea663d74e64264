"""Every rule of the supervisor policy, without Ray."""

from __future__ import annotations

import math

import pytest

from controlplane.spec import CheckpointSpec, FaultToleranceSpec
from controlplane.states import RunState
from controlplane.supervisor.actions import (
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
from controlplane.supervisor.observed import (
    Failure,
    Heartbeat,
    JobStatus,
    NodeStatus,
    Observed,
    PendingRestart,
    PolicyConfig,
)
from controlplane.supervisor.policy import decide
from controlplane.supervisor.rules import (
    backoff_delay_s,
    hang_timeout_s,
    interval_steps,
    mtbf_estimate_s,
    numerical_fault,
    restarts_without_progress,
    rollback_plan,
    young_daly_interval,
)

NOW = 10_000.0
FT = FaultToleranceSpec(
    max_restarts=5,
    backoff_initial_s=2,
    backoff_max_s=30,
    crash_loop_restarts=3,
    hang_timeout_factor=10,
    hang_timeout_min_s=20,
    hang_timeout_max_s=300,
    max_rollbacks=2,
    node_failure_threshold=2,
)


def running(**kw) -> Observed:
    base = dict(
        run_state=RunState.RUNNING,
        final_step=100,
        attempt=1,
        job_status=JobStatus.RUNNING,
        attempt_submitted_at=NOW - 100,
        attempt_started_at=NOW - 90,
        last_step=40,
        last_step_at=NOW - 1,
        median_step_s=0.5,
        verified_steps=(20, 40),
        attempt_progressed=True,
    )
    base.update(kw)
    return Observed(**base)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


# ------------------------------------------------------------------ the happy path


def test_first_attempt_is_submitted_for_a_new_run():
    acts = decide(Observed(RunState.PENDING, final_step=100), FT, NOW)
    assert acts == [Submit(1, "initial submission")]


def test_healthy_running_attempt_needs_nothing():
    assert decide(running(), FT, NOW) == []


def test_provisioning_becomes_running_at_the_start_event():
    acts = decide(running(run_state=RunState.PROVISIONING), FT, NOW)
    assert of(acts, MarkRunning)
    acts = decide(running(run_state=RunState.PROVISIONING, attempt_started_at=None, last_step_at=None), FT, NOW)
    assert not of(acts, MarkRunning)


def test_success_at_final_step():
    acts = decide(running(job_status=JobStatus.SUCCEEDED, last_step=100), FT, NOW)
    assert of(acts, MarkSucceeded) and not of(acts, Submit)


def test_exit_zero_before_final_step_is_restarted():
    acts = decide(running(job_status=JobStatus.SUCCEEDED, last_step=60), FT, NOW)
    assert of(acts, RecordIncident)[0].kind == "early_exit"
    assert of(acts, MarkRecovering)


def test_terminal_run_does_nothing_but_stops_a_leftover_job():
    assert decide(running(run_state=RunState.SUCCEEDED, job_status=JobStatus.SUCCEEDED), FT, NOW) == []
    assert decide(running(run_state=RunState.FAILED), FT, NOW) == [StopJob(1, "run is failed")]


def test_operator_stop():
    acts = decide(running(stop_requested=True), FT, NOW)
    assert of(acts, StopJob) and of(acts, MarkStopped)


# ------------------------------------------------------------------ restarts, backoff, budget


def test_crash_restarts_with_initial_backoff_and_the_cause_recorded():
    acts = decide(running(job_status=JobStatus.FAILED), FT, NOW)
    assert of(acts, RecordIncident)[0].kind == "crash"
    assert "crash in attempt 1" in of(acts, MarkRecovering)[0].cause
    (b,) = of(acts, Backoff)
    assert b.until == NOW + 2 and b.then.attempt == 2 and b.then.max_resume_step is None


def test_failure_event_names_the_cause():
    f = Failure("worker_died", NOW - 3, 1, step=41, rank=1, node="n1", detail="SIGKILL")
    acts = decide(running(job_status=JobStatus.FAILED, failures=(f,)), FT, NOW)
    inc = of(acts, RecordIncident)[0]
    assert inc.kind == "worker_died" and inc.detail["rank"] == 1 and inc.detail["node"] == "n1"


def test_zero_backoff_submits_at_once():
    ft = FT.model_copy(update={"backoff_initial_s": 0})
    acts = decide(running(job_status=JobStatus.FAILED), ft, NOW)
    assert of(acts, Submit) == [Submit(2, "crash in attempt 1 at step 40")]


def test_backoff_doubles_without_progress_and_is_capped():
    assert [backoff_delay_s(FT, k) for k in range(6)] == [2, 4, 8, 16, 30, 30]
    assert backoff_delay_s(FT, 10_000) == 30
    o = running(
        attempt=3, restarts=2, restarts_without_progress=1, attempt_progressed=False, job_status=JobStatus.FAILED
    )
    (b,) = of(decide(o, FT, NOW), Backoff)
    assert b.until == NOW + 8  # streak 2 now: 2 * 2**2


def test_restart_budget():
    o = running(attempt=6, restarts=5, job_status=JobStatus.FAILED)
    acts = decide(o, FT, NOW)
    (f,) = of(acts, MarkFailed)
    assert "restart budget exhausted (5 of 5)" in f.cause
    assert not of(acts, Submit) and not of(acts, Backoff)


def test_crash_loop_stops_the_run():
    o = running(
        attempt=4, restarts=3, restarts_without_progress=2, attempt_progressed=False, job_status=JobStatus.FAILED
    )
    (f,) = of(decide(o, FT, NOW), MarkFailed)
    assert f.cause.startswith("crash loop: 3 restarts without step progress")
    # one fewer, or progress in this attempt: restart
    assert not of(
        decide(
            running(
                attempt=3,
                restarts=2,
                restarts_without_progress=1,
                attempt_progressed=False,
                job_status=JobStatus.FAILED,
            ),
            FT,
            NOW,
        ),
        MarkFailed,
    )
    assert not of(
        decide(
            running(
                attempt=4, restarts=3, restarts_without_progress=2, attempt_progressed=True, job_status=JobStatus.FAILED
            ),
            FT,
            NOW,
        ),
        MarkFailed,
    )


def test_restarts_without_progress_helper():
    assert restarts_without_progress([]) == 0
    assert restarts_without_progress([False]) == 0  # attempt 1 is not a restart
    assert restarts_without_progress([True, False, False]) == 2
    assert restarts_without_progress([False, False, True, False]) == 1


def test_pending_restart_waits_for_backoff_then_submits_its_plan():
    p = PendingRestart("crash", decided_at=NOW - 5, not_before=NOW + 3, max_resume_step=20, skip_steps=((21, 31),))
    o = running(run_state=RunState.RECOVERING, job_status=JobStatus.FAILED, pending=p)
    assert decide(o, FT, NOW) == []
    assert decide(o, FT, NOW + 3) == [Submit(2, "crash", 20, ((21, 31),))]


def test_pending_restart_stops_a_live_job_first_then_gives_up_waiting():
    p = PendingRestart("hang", decided_at=NOW, not_before=NOW)
    o = running(run_state=RunState.RECOVERING, pending=p)
    assert decide(o, FT, NOW + 1) == [StopJob(1, "hang")]
    assert decide(o, FT, NOW + PolicyConfig().stop_grace_s + 1) == [Submit(2, "hang")]


def test_lost_and_externally_stopped_jobs_are_restarted():
    for status, kind in ((JobStatus.MISSING, "job_lost"), (JobStatus.STOPPED, "job_stopped")):
        acts = decide(running(job_status=status), FT, NOW)
        assert of(acts, RecordIncident)[0].kind == kind and of(acts, Backoff)


def test_queued_job_is_left_alone():
    assert decide(running(job_status=JobStatus.PENDING, attempt_started_at=None, last_step_at=None), FT, NOW) == []


# ------------------------------------------------------------------ hang


def test_hang_timeout_is_clamped():
    assert hang_timeout_s(FT, 0.5) == 20  # 10 x 0.5 = 5 -> min 20
    assert hang_timeout_s(FT, 5) == 50
    assert hang_timeout_s(FT, 100) == 300
    assert hang_timeout_s(FT, None) == 300


def test_hang_is_detected_and_names_the_stale_ranks():
    hb = (Heartbeat(0, NOW - 1, "n0"), Heartbeat(1, NOW - 60, "n1"), Heartbeat(2, NOW - 2, "n0"))
    o = running(last_step_at=NOW - 21, heartbeats=hb)
    acts = decide(o, FT, NOW)
    inc = of(acts, RecordIncident)[0]
    assert inc.kind == "hang" and inc.detail["stale_ranks"] == [1] and inc.detail["node"] == "n1"
    assert "ranks [1]" in inc.detail["detail"]
    assert of(acts, StopJob) == [StopJob(1, "hang")]
    assert of(acts, Backoff)[0].then.attempt == 2
    assert decide(running(last_step_at=NOW - 19, heartbeats=hb), FT, NOW) == []


def test_startup_is_not_a_hang_until_the_startup_timeout():
    o = running(attempt_started_at=None, last_step_at=NOW - 500, attempt_submitted_at=NOW - 200)
    assert decide(o, FT, NOW) == []  # the old step belongs to an earlier attempt
    assert of(decide(o, FT, NOW + 101), RecordIncident)[0].kind == "hang"
    cfg = PolicyConfig(startup_timeout_s=50)
    assert of(decide(o, FT, NOW, config=cfg), RecordIncident)[0].kind == "hang"


def test_after_the_final_step_only_the_hard_cap_is_a_hang():
    # The job is flushing its last checkpoint and stopping its workers: no step will come.
    o = running(last_step=100, last_step_at=NOW - 60, heartbeats=(Heartbeat(0, NOW - 50, "n0"),))
    assert decide(o, FT, NOW) == []
    late = of(decide(o, FT, NOW + FT.hang_timeout_max_s), RecordIncident)[0]
    assert late.kind == "hang" and "no end after the final step" in late.detail["detail"]


def test_a_rank_being_replaced_inside_the_attempt_has_the_startup_bound():
    # rank 1 died 30 s after the last step; the job is starting its replacement (a new process
    # that imports torch and loads its state): not a hang after the step bound (20 s) ...
    died = Failure("worker_died", NOW - 30, 1, 40, rank=1, node="n1")
    hb = (Heartbeat(0, NOW - 1, "n0"), Heartbeat(1, NOW - 31, "n1"))
    o = running(last_step_at=NOW - 60, failures=(died,), heartbeats=hb)
    assert decide(o, FT, NOW) == []
    cfg = PolicyConfig(startup_timeout_s=100)
    assert decide(o, FT, NOW + 69, config=cfg) == []
    # ... but one after the startup bound, counted from the death
    late = of(decide(o, FT, NOW + 71, config=cfg), RecordIncident)[0]
    assert late.kind == "hang" and "replacement began" in late.detail["detail"]
    # once replaced (a step completed since), the step bound applies again
    back = running(last_step_at=NOW - 21, failures=(Failure("worker_died", NOW - 30, 1, 40, rank=1, recovered=True),))
    assert of(decide(back, FT, NOW), RecordIncident)[0].kind == "hang"
    # a failure the job does not answer in-attempt (no rank) does not extend the bound
    stuck = running(last_step_at=NOW - 60, failures=(Failure("hang", NOW - 30, 1, 40, detail="step 41 stuck"),))
    assert of(decide(stuck, FT, NOW), RecordIncident)[0].kind == "hang"


def test_after_start_before_first_step_uses_the_step_timeout():
    o = running(attempt_started_at=NOW - 25, last_step_at=NOW - 500, attempt_submitted_at=NOW - 30)
    assert of(decide(o, FT, NOW), RecordIncident)[0].kind == "hang"


# ------------------------------------------------------------------ numerical faults


def test_rollback_plan():
    assert rollback_plan([10, 20, 30], 30) == (20, ((21, 31),))
    assert rollback_plan([10, 20, 30], 35) == (30, ((31, 36),))
    assert rollback_plan([], 7) == (0, ((1, 8),))
    assert rollback_plan([10], 15, [(3, 5)]) == (10, ((3, 5), (11, 16)))


def test_nan_failure_rolls_back_strictly_before_the_bad_step_and_skips_the_window():
    f = Failure("nan_loss", NOW - 1, 1, step=40, rank=0)
    acts = decide(running(job_status=JobStatus.FAILED, failures=(f,), verified_steps=(20, 40)), FT, NOW)
    (b,) = of(acts, Backoff)
    assert b.then.max_resume_step == 20 and b.then.skip_steps == ((21, 41),)
    assert [i.kind for i in of(acts, RecordIncident)] == ["nan_loss", "rollback"]
    assert "rollback to step 20, skip steps 21..40" in of(acts, MarkRecovering)[0].cause


def test_numerical_failure_outranks_the_later_crash_it_caused():
    fs = (Failure("nan_loss", NOW - 2, 1, step=33), Failure("driver_error", NOW - 1, 1, step=33))
    acts = decide(running(job_status=JobStatus.FAILED, failures=fs), FT, NOW)
    assert of(acts, Backoff)[0].then.max_resume_step == 20


def test_nan_seen_in_a_running_job_stops_it_and_rolls_back():
    losses = (3.0, 2.9, 2.8, float("nan"))
    acts = decide(running(recent_losses=losses, last_step=44), FT, NOW)
    assert of(acts, StopJob) and of(acts, Backoff)[0].then.skip_steps == ((41, 45),)


def test_loss_spike_detection():
    assert numerical_fault([2.0] * 10 + [7.0], 3.0, 20) == (10, "loss_spike")
    assert numerical_fault([2.0] * 10 + [5.0], 3.0, 20) is None
    assert numerical_fault([2.0, 9.0], 3.0, 20) is None  # too little history
    assert numerical_fault([1.0, math.inf], 3.0, 20) == (1, "nan_loss")


def test_rollbacks_are_bounded():
    f = Failure("loss_spike", NOW - 1, 3, step=60)
    acts = decide(running(attempt=3, restarts=2, rollbacks=2, job_status=JobStatus.FAILED, failures=(f,)), FT, NOW)
    assert "2 rollbacks used (max 2)" in of(acts, MarkFailed)[0].cause


def test_skip_windows_and_poisoned_checkpoints_carry_over_to_plain_restarts():
    o = running(
        attempt=3,
        restarts=2,
        job_status=JobStatus.FAILED,
        skip_steps=((21, 41),),
        verified_steps=(20, 30),
        poisoned_steps=(40,),
    )
    (b,) = of(decide(o, FT, NOW), Backoff)
    assert b.then.skip_steps == ((21, 41),) and b.then.max_resume_step == 30


# ------------------------------------------------------------------ nodes


def test_node_with_repeated_failures_is_excluded():
    nodes = (NodeStatus("n0", failures=1), NodeStatus("n1", failures=2), NodeStatus("n2", failures=5, excluded=True))
    acts = decide(running(nodes=nodes), FT, NOW)
    assert of(acts, ExcludeNode) == [ExcludeNode("n1", "2 failures on this node (threshold 2)")]
    assert not of(acts, StopJob)  # the attempt does not run there


def test_a_hang_behind_a_worker_death_on_a_node_is_counted_once():
    from controlplane.supervisor.observe import node_fault_count

    died = {"kind": "worker_died", "at": 10.0, "attempt": 1, "rank": 1, "node": "n1"}
    stalled = {"kind": "hang", "at": 70.0, "attempt": 1, "node": "n1", "source": "supervisor"}
    # the survivors stalled behind the death (or its slow replacement): one fault, not two
    assert node_fault_count([died, stalled], "n1") == 1
    # a hang the supervisor found in another attempt, or with no death reported there, counts
    again = {**stalled, "attempt": 2, "at": 200.0}
    assert node_fault_count([died, stalled, again], "n1") == 2
    assert node_fault_count([stalled, again], "n1") == 2
    # two ranks that died on the node are two failures (a machine that took them both)
    assert node_fault_count([died, {**died, "rank": 0, "at": 11.0}], "n1") == 2
    # only since the node was readmitted; not other nodes; not data faults
    assert node_fault_count([died, again], "n1", since=100.0) == 1
    assert node_fault_count([died, {**died, "node": "n0"}, {**died, "kind": "nan_loss"}], "n0") == 1


def test_capacity_sees_an_attempt_that_only_the_exclusions_keep_out():
    from controlplane.spec import RunSpec
    from controlplane.supervisor.observe import capacity
    from controlplane.supervisor.ports import ClusterView

    spec = RunSpec.model_validate({"name": "r", "workers": {"num_workers": 2}})
    nodes = (
        {"node_id": "a", "alive": True, "resources_total": {"CPU": 4.0}},
        {"node_id": "b", "alive": True, "resources_total": {"CPU": 4.0}},
        {"node_id": "c", "alive": False, "resources_total": {"CPU": 4.0}},
    )
    # Ray reports no demand for a request a label selector keeps off every node
    view = ClusterView(nodes, free={"CPU": 8.0}, pending=False)
    assert capacity(spec, view, excluded=set()) is None  # room, nothing pending: no judgement
    assert capacity(spec, view, excluded={"a"}) is None  # node b holds it
    held = capacity(spec, view, excluded={"a", "b"})
    assert held is not None and held.held_out() and not held.never_fits()
    assert dict(held.free) == {"CPU": 0.0}  # what is free on excluded nodes is no use to it
    assert "8 CPU on excluded nodes" in held.describe()


def test_unhealthy_node_under_the_attempt_restarts_it_elsewhere():
    nodes = (NodeStatus("n0"), NodeStatus("n1", healthy=False, reasons=("xid 79 on gpu 3",)))
    acts = decide(running(nodes=nodes, attempt_nodes=("n0", "n1")), FT, NOW)
    assert of(acts, ExcludeNode)[0].evidence == "unhealthy: xid 79 on gpu 3"
    assert of(acts, RecordIncident)[0].kind == "node_unhealthy"
    assert of(acts, StopJob) and of(acts, Backoff)[0].then.exclude_nodes == ("n1",)


def test_excluded_nodes_travel_with_every_submission():
    o = Observed(RunState.PENDING, final_step=10, nodes=(NodeStatus("n9", excluded=True),))
    assert decide(o, FT, NOW) == [Submit(1, "initial submission", exclude_nodes=("n9",))]


# ------------------------------------------------------------------ checkpoint interval


def test_young_daly():
    assert young_daly_interval(2.0, 3600.0) == pytest.approx(120.0)
    assert interval_steps(2.0, 3600.0, 0.5) == 240
    assert interval_steps(2.0, 3600.0, 0.5, max_steps=100) == 100
    assert interval_steps(0.001, 1.0, 10.0) == 1
    with pytest.raises(ValueError):
        young_daly_interval(0, 10)


def test_mtbf_estimate_is_smoothed_by_the_prior():
    assert mtbf_estimate_s(0, 0, 3600) == 3600
    assert mtbf_estimate_s(7200, 1, 3600) == 5400
    assert mtbf_estimate_s(1000, 0) == 1000 + 24 * 3600


def test_auto_interval_is_written_and_rewritten_only_on_real_change():
    ck = CheckpointSpec(interval_steps="auto", mtbf_hours=1)
    o = running(save_cost_s=2.0, median_step_s=0.5, final_step=1000)
    (a,) = of(decide(o, FT, NOW, checkpoint=ck), SetCheckpointInterval)
    assert a.steps == 240
    assert not of(
        decide(
            running(save_cost_s=2.0, median_step_s=0.5, final_step=1000, interval_steps=230), FT, NOW, checkpoint=ck
        ),
        SetCheckpointInterval,
    )
    o2 = running(save_cost_s=2.0, median_step_s=0.5, final_step=1000, interval_steps=240, mtbf_s=400.0)
    assert of(decide(o2, FT, NOW, checkpoint=ck), SetCheckpointInterval)[0].steps == 80
    assert not of(decide(o, FT, NOW, checkpoint=CheckpointSpec(interval_steps=25)), SetCheckpointInterval)


def test_decide_is_deterministic():
    o = running(job_status=JobStatus.FAILED, failures=(Failure("worker_died", NOW, 1, 40, 0),))
    assert decide(o, FT, NOW) == decide(o, FT, NOW)


# --------------------------------------------------------------------------- the ledger says what happened


def test_every_mark_the_policy_makes_is_a_transition_the_ledger_allows():
    """A decision the state machine refuses would be made again on every pass, and never applied."""
    from controlplane.states import can_transition

    marks = {
        MarkRunning: RunState.RUNNING,
        MarkRecovering: RunState.RECOVERING,
        MarkSucceeded: RunState.SUCCEEDED,
        MarkFailed: RunState.FAILED,
        MarkStopped: RunState.STOPPED,
    }
    # (pending has no attempt yet; recovering always holds a pending restart: other tests)
    for state in (RunState.PROVISIONING, RunState.RUNNING):
        for status in JobStatus:
            for end in (None, "succeeded", "failed"):
                o = running(run_state=state, job_status=status, end_status=end, last_step=100 if end else 40)
                for a in decide(o, FT, NOW):
                    if type(a) in marks:
                        assert can_transition(state, marks[type(a)]), (state, status, end, a)


def test_a_run_that_finished_unwatched_succeeds_from_provisioning():
    o = running(run_state=RunState.PROVISIONING, job_status=JobStatus.SUCCEEDED, end_status="succeeded", last_step=100)
    assert decide(o, FT, NOW) == [MarkSucceeded("attempt 1 reached step 100")]


@pytest.mark.parametrize("status", [JobStatus.MISSING, JobStatus.FAILED, JobStatus.STOPPED])
def test_a_finished_run_is_never_trained_again_when_the_jobs_api_forgot_it(status):
    o = running(run_state=RunState.PROVISIONING, job_status=status, end_status="succeeded", last_step=100)
    acts = decide(o, FT, NOW)
    assert acts == [MarkSucceeded("attempt 1 reached step 100")]
    assert not any(isinstance(a, (Submit, Backoff, MarkRecovering)) for a in acts)


def test_the_cause_is_the_last_failure_the_job_did_not_recover_from():
    replaced = Failure("worker_died", NOW - 60, 1, step=69, rank=1, node="n1", recovered=True)
    o = running(job_status=JobStatus.FAILED, failures=(replaced,), last_step=155)
    acts = decide(o, FT, NOW)
    rec = next(a for a in acts if isinstance(a, MarkRecovering))
    assert rec.cause == "crash in attempt 1 at step 155"
    inc = next(a for a in acts if isinstance(a, RecordIncident))
    assert inc.kind == "crash" and inc.detail["step"] == 155
    # an unrecovered one after it is the cause
    later = Failure("worker_died", NOW - 5, 1, step=150, rank=0, node="n2")
    acts = decide(running(job_status=JobStatus.FAILED, failures=(replaced, later), last_step=155), FT, NOW)
    assert next(a for a in acts if isinstance(a, MarkRecovering)).cause == "worker_died in attempt 1 at step 150"


def test_a_node_ray_reports_dead_is_excluded_with_ray_s_reason_and_the_attempt_moves():
    why = "Unexpected termination: health check failed due to missing too many heartbeats"
    o = running(attempt_nodes=("n1",), nodes=(NodeStatus("n1", dead=why),))
    acts = decide(o, FT, NOW)
    ex = next(a for a in acts if isinstance(a, ExcludeNode))
    assert ex.node == "n1" and why in ex.evidence and "Ray" in ex.evidence
    inc = next(a for a in acts if isinstance(a, RecordIncident))
    assert inc.kind == "node_dead" and inc.detail["node"] == "n1"
    assert any(isinstance(a, MarkRecovering) for a in acts)
    # already excluded: nothing more to say
    assert not decide(running(nodes=(NodeStatus("n1", excluded=True, dead=why),)), FT, NOW)


def _waiting(cap, **kw):
    from controlplane.supervisor.observed import Capacity

    c = Capacity(*cap)
    return running(
        run_state=RunState.PROVISIONING,
        job_status=JobStatus.RUNNING,
        attempt_started_at=None,
        last_step=0,
        last_step_at=None,
        capacity=c,
        **kw,
    )


def test_an_attempt_asking_more_than_the_cluster_has_fails_with_the_figures():
    cap = ((("CPU", 4.0),), (("CPU", 2.0),), (("CPU", 2.0),))
    cfg = PolicyConfig(unschedulable_after_s=60, provision_timeout_s=600)
    assert decide(_waiting(cap, attempt_submitted_at=NOW - 30), FT, NOW, config=cfg) == []  # still waiting
    acts = decide(_waiting(cap, attempt_submitted_at=NOW - 61), FT, NOW, config=cfg)
    fail = next(a for a in acts if isinstance(a, MarkFailed))
    assert fail.cause.startswith("unschedulable") and "4 CPU asked, 2 free of 2" in fail.cause
    assert StopJob(1, "unschedulable") in acts


def test_an_attempt_only_the_exclusions_keep_out_waits_for_the_provision_bound_and_says_so():
    # 4 CPUs asked; the nodes not excluded have 0, the excluded ones 8: a readmission (or a node
    # replaced) would let it run, so it is not "more than the cluster has"
    cap = ((("CPU", 4.0),), (("CPU", 0.0),), (("CPU", 0.0),), (("CPU", 8.0),))
    cfg = PolicyConfig(unschedulable_after_s=60, provision_timeout_s=600)
    assert decide(_waiting(cap, attempt_submitted_at=NOW - 500), FT, NOW, config=cfg) == []
    acts = decide(_waiting(cap, attempt_submitted_at=NOW - 601), FT, NOW, config=cfg)
    fail = next(a for a in acts if isinstance(a, MarkFailed))
    assert "waited 601s for resources" in fail.cause and "4 CPU asked, 0 free of 0" in fail.cause
    assert "8 CPU on excluded nodes" in fail.cause and "llmctl node readmit" in fail.cause


def test_an_attempt_waiting_for_resources_another_run_holds_gives_up_after_the_bound():
    cap = ((("CPU", 2.0),), (("CPU", 4.0),), (("CPU", 0.0),))
    cfg = PolicyConfig(unschedulable_after_s=60, provision_timeout_s=600)
    o = _waiting(cap, attempt_submitted_at=NOW - 500)
    assert decide(o, FT, NOW, config=cfg) == []  # no hang before its bound either
    acts = decide(_waiting(cap, attempt_submitted_at=NOW - 601), FT, NOW, config=cfg)
    fail = next(a for a in acts if isinstance(a, MarkFailed))
    assert "waited 601s for resources" in fail.cause and "2 CPU asked, 0 free of 4" in fail.cause
    # resources free: no judgement, the normal rules apply
    free = ((("CPU", 2.0),), (("CPU", 4.0),), (("CPU", 2.0),))
    assert not any(isinstance(a, MarkFailed) for a in decide(_waiting(free), FT, NOW, config=cfg))
