"""The ledger always says what happened: the reconcile loop against attempts that are real local
processes (tests/unit/scripted_job.py), a Jobs API that forgets (a cluster restart) and a
cluster view (Ray's node table, free resources) the test sets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.errors import UserError
from controlplane.procs import pid_alive
from controlplane.supervisor import nodes, store
from controlplane.supervisor.observed import JobStatus, PolicyConfig
from controlplane.supervisor.ports import SupervisorLock
from tests.unit.supervisor_harness import (
    ProcessJobs,
    env_fixture,
    make_run,
    start_and_wait_for_a_step,
    wait_terminal,
)
from tests.unit.supervisor_harness import scripted_spec as spec

CONFIG = PolicyConfig(heartbeat_stale_s=0.6, stop_grace_s=3.0, unschedulable_after_s=1.0)

env = env_fixture(CONFIG)


def wait_job(jobs: ProcessJobs, sid: str, timeout: float = 30) -> JobStatus:
    deadline = time.monotonic() + timeout
    while jobs.status(sid).is_live and time.monotonic() < deadline:
        time.sleep(0.05)
    return jobs.status(sid)


def decisions(ctx, run_id):
    return [d["action"] for d in store.decisions(ctx.ledger, run_id)]


# --------------------------------------------------------------------------- finished unwatched


def test_a_run_that_finished_with_no_supervisor_watching_succeeds_once(env):
    ctx, jobs, sup = env
    make_run(ctx.ledger, ctx.storage, "unwatched", spec(steps=8), {"steps": 8, "step_s": 0.01})
    sup.reconcile_run("unwatched")  # `run submit --no-supervise`: one pass, which submits
    assert ctx.ledger.get_run("unwatched")["state"] == "provisioning"
    assert wait_job(jobs, "unwatched-a1") is JobStatus.SUCCEEDED
    for _ in range(4):  # `supervise --once`, again and again
        sup.reconcile_run("unwatched")
    run = ctx.ledger.get_run("unwatched")
    assert run["state"] == "succeeded" and run["cause"] == "attempt 1 reached step 8"
    assert decisions(ctx, "unwatched") == ["Submit", "MarkSucceeded"]  # applied once, recorded once
    assert [t["to_state"] for t in ctx.ledger.transitions("unwatched")][-2:] == ["provisioning", "succeeded"]


def test_a_finished_run_is_not_trained_again_after_a_cluster_restart(env):
    ctx, jobs, sup = env
    make_run(ctx.ledger, ctx.storage, "done", spec(steps=6), {"steps": 6, "step_s": 0.01})
    sup.reconcile_run("done")
    assert wait_job(jobs, "done-a1") is JobStatus.SUCCEEDED
    jobs.forget_all()  # the cluster restarted before any supervisor saw the end
    for _ in range(3):
        sup.reconcile_run("done")
    assert ctx.ledger.get_run("done")["state"] == "succeeded"
    assert jobs.submissions() == ["done-a1"]
    assert [a["attempt"] for a in ctx.ledger.attempts("done")] == [1]


# --------------------------------------------------------------------------- the cause of an attempt's end


def test_the_cause_is_the_last_unrecovered_failure_and_watch_and_status_show_the_restart(env, capsys):
    from controlplane.cli.watch import watch_run

    ctx, jobs, _ = env
    script = {"steps": 20, "interval": 5, "step_s": 0.02, "faults": {"1": {"replace_at": 7, "die_at": 13}}}
    make_run(ctx.ledger, ctx.storage, "cause", spec(steps=20), script)
    assert watch_run(ctx, "cause", poll_s=0.05, jobs=jobs) == 0
    rec = [t["cause"] for t in ctx.ledger.transitions("cause") if t["to_state"] == "recovering"]
    assert rec == ["crash in attempt 1 at step 12"]  # not the worker replaced at step 7
    assert ctx.ledger.attempts("cause")[0]["cause"] == "crash"
    printed = capsys.readouterr().err
    assert "attempt 1 ended: crash in attempt 1 at step 12" in printed
    assert "attempt 2 submitted" in printed
    res = CliRunner().invoke(app, ["run", "status", "cause", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["progress"]["resumed"] == {"1": 0, "2": 10}
    table = CliRunner().invoke(app, ["run", "status", "cause"])
    row = next(line for line in table.output.splitlines() if line.strip().startswith("│ 2") or " 2 " in line[:12])
    assert " 10 " in row, table.output


# --------------------------------------------------------------------------- Ctrl-C on --watch


class InterruptedJobs(ProcessJobs):
    """The user presses Ctrl-C during the Nth pass (the Jobs API call it was in)."""

    def __init__(self, state_dir, after: int):
        super().__init__(state_dir)
        self.calls, self.after = 0, after

    def status(self, sid):
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return super().status(sid)


def test_ctrl_c_on_watch_hands_the_run_to_a_background_supervisor(env, tmp_path, capsys):
    from controlplane.cli.watch import watch_run

    ctx, _, _ = env
    jobs = InterruptedJobs(tmp_path / "jobs-int", after=6)
    make_run(ctx.ledger, ctx.storage, "ctrlc", spec(steps=400), {"steps": 400, "step_s": 0.05})
    try:
        assert watch_run(ctx, "ctrlc", poll_s=0.05, jobs=jobs) == 130
        printed = capsys.readouterr().err
        assert "guards it now" in printed and "llmctl run stop ctrlc" in printed, printed
        lock = SupervisorLock(ctx.storage)
        deadline = time.monotonic() + 30
        while lock.holder() in (None, os.getpid()) and time.monotonic() < deadline:  # it writes its pid
            time.sleep(0.1)
        pid = lock.holder()
        assert pid and pid != os.getpid() and pid_alive(pid) and f"pid {pid}" in printed
        with pytest.raises(UserError):  # it holds the storage root's lock: it is the run's supervisor now
            lock.acquire()
    finally:  # the supervisor it started is stopped, even when it had not yet written its pid
        deadline = time.monotonic() + 30
        while SupervisorLock(ctx.storage).holder() in (None, os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = SupervisorLock(ctx.storage).holder()
        if pid and pid != os.getpid() and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while pid_alive(pid) and time.monotonic() < deadline:
                with_child_reaped(pid)
                time.sleep(0.1)
        jobs.kill_all()


def with_child_reaped(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# --------------------------------------------------------------------------- node death from Ray's node table


DEATH = "Unexpected termination: health check failed due to missing too many heartbeats"


def dead_node(node_id: str, message: str = DEATH) -> dict:
    return {"node_id": node_id, "alive": False, "state_message": message, "expected": False, "resources_total": {}}


def test_a_node_ray_reports_dead_is_excluded_naming_ray_s_reason(env):
    ctx, jobs, sup = env
    script = {"steps": 60, "interval": 5, "step_s": 0.03}
    # Ray reports node-b dead from the start (the supervisor caches its view for a couple of
    # seconds, longer than this scripted run may last): it is evidence once the run's workers are on it.
    jobs.set_view(nodes=[dead_node("node-b")])  # no failure counted on it at all: Ray knows better
    rd = start_and_wait_for_a_step(sup, ctx.ledger, ctx.storage, "nodedead", spec(steps=60), script)
    assert wait_terminal(sup, ctx.ledger, "nodedead") == "succeeded"
    rec = {r["node"]: r for r in store.node_records(ctx.ledger)}
    assert rec["node-b"]["excluded"] and DEATH in rec["node-b"]["reason"] and "Ray" in rec["node-b"]["reason"]
    exclude = [d for d in store.decisions(ctx.ledger, "nodedead") if d["action"] == "ExcludeNode"]
    assert len(exclude) == 1 and DEATH in exclude[0]["cause"]
    assert jobs.args_of("nodedead-a2")["env"] == {"LLMCTL_EXCLUDE_NODES": "node-b"}
    assert "node-b" not in {w["node_id"] for w in rd.events({"start"})[-1]["workers"]}
    assert any(i["kind"] == "node_dead" for i in ctx.ledger.incidents("nodedead"))


def test_nodes_a_user_stopped_with_cluster_down_are_no_evidence(env):
    ctx, jobs, sup = env
    nodes.record_cluster_down(ctx.storage, ["node-b"], time.time() - 60)
    jobs.set_view(nodes=[dead_node("node-b", "Expected termination: received SIGTERM"), dead_node("node-b")])
    script = {"steps": 10, "interval": 5, "step_s": 0.02, "faults": {"1": {"crash_at": 4}}}
    make_run(ctx.ledger, ctx.storage, "stopped", spec(steps=10), script)
    assert wait_terminal(sup, ctx.ledger, "stopped") == "succeeded"
    assert store.excluded_nodes(ctx.ledger) == set()


def test_failures_after_a_cluster_down_do_not_count_and_its_exclusions_are_readmitted(env):
    ctx, jobs, sup = env
    store.exclude_node(ctx.ledger, "node-a", "2 failures on this node (threshold 2)", "old")
    store.exclude_node(ctx.ledger, "node-z", "operator: bad DIMM")
    assert store.readmit_stopped(ctx.ledger, ["node-a", "node-z", "node-q"]) == ["node-a"]
    assert store.excluded_nodes(ctx.ledger) == {"node-z"}  # the operator's own exclusion stays
    # both ranks die on node-b because the user stopped the cluster: no exclusion follows
    nodes.record_cluster_down(ctx.storage, ["node-b"], time.time())
    faults = {"1": {"crash_at": 3}, "2": {"crash_at": 6}}
    s = spec(steps=10, interval=2)
    make_run(ctx.ledger, ctx.storage, "downed", s, {"steps": 10, "interval": 2, "step_s": 0.02, "faults": faults})
    assert wait_terminal(sup, ctx.ledger, "downed") == "succeeded"
    assert "node-b" not in store.excluded_nodes(ctx.ledger)


# --------------------------------------------------------------------------- silent waits


def test_an_attempt_that_cannot_be_placed_says_so_then_fails_with_the_figures(env):
    ctx, jobs, sup = env
    cpu2 = {"node_id": "node-a", "alive": True, "state_message": None, "expected": False, "resources_total": {"CPU": 2}}
    jobs.set_view(nodes=[cpu2], free={"CPU": 2.0}, pending=True)
    script = {"steps": 6, "step_s": 0.02, "faults": {"1": {"start_after_s": 30}}}
    make_run(ctx.ledger, ctx.storage, "big", spec(steps=6, workers=4), script)
    sup.reconcile_run("big")
    sup.reconcile_run("big")
    res = CliRunner().invoke(app, ["run", "status", "big"])
    assert res.exit_code == 0, res.output
    assert "waiting for resources" in res.output and "4 CPU asked, 2 free of 2" in res.output, res.output
    assert wait_terminal(sup, ctx.ledger, "big", timeout=30) == "failed"
    cause = ctx.ledger.get_run("big")["cause"]
    assert cause.startswith("unschedulable: attempt 1 asks more than the cluster has") and "4 CPU asked" in cause
    assert wait_job(jobs, "big-a1") is JobStatus.STOPPED
    assert jobs.submissions() == ["big-a1"]


def test_an_attempt_that_may_shrink_waits_while_its_floor_fits(env):
    ctx, jobs, sup = env
    cpu2 = {"node_id": "node-a", "alive": True, "state_message": None, "expected": False, "resources_total": {"CPU": 2}}
    jobs.set_view(nodes=[cpu2], free={"CPU": 2.0}, pending=True)
    s = spec(steps=6, workers=4)
    s = s.model_copy(update={"workers": s.workers.model_copy(update={"min_workers": 2})})
    make_run(ctx.ledger, ctx.storage, "shrinks", s, {"steps": 6, "step_s": 0.02, "faults": {"1": {"start_after_s": 3}}})
    deadline = time.monotonic() + 2.0  # twice unschedulable_after_s
    while time.monotonic() < deadline:
        sup.reconcile_run("shrinks")
        time.sleep(0.1)
    assert ctx.ledger.get_run("shrinks")["state"] == "provisioning"  # 4 asked of 2 would have failed it
    jobs.set_view(nodes=[cpu2], free={"CPU": 0.0}, pending=False)  # it started on 2
    assert wait_terminal(sup, ctx.ledger, "shrinks", timeout=30) == "succeeded"


# --------------------------------------------------------------------------- a resized world


def test_a_world_the_job_resized_is_a_decision_with_its_size_and_reason(env):
    ctx, _, sup = env
    rd = make_run(ctx.ledger, ctx.storage, "elastic", spec(steps=8), {"steps": 8})
    reason = "shrunk: 1 of 2 workers placed within 60 s with nodes excluded: n2"
    rd.append_event("world_resized", 1, world_size=1, previous=2, num_workers=2, step=20, accumulation=4, reason=reason)
    rd.append_event(
        "world_resized", 1, world_size=2, previous=1, num_workers=2, step=35, accumulation=2, reason="grown"
    )
    track = store.load_track(ctx.ledger, "elastic")
    records = [r for _, ev in rd.iter_events(0) for r in track.ingest(ev)]
    store.commit_ingest(ctx.ledger, "elastic", track, records)
    rows = [d for d in store.decisions(ctx.ledger, "elastic") if d["action"] == "ResizeWorld"]
    assert [(r["attempt"], r["detail"]["world_size"], r["detail"]["step"]) for r in rows] == [(1, 1, 20), (1, 2, 35)]
    assert rows[0]["cause"] == f"world of 1 workers: {reason}" and rows[0]["detail"]["source"] == "job"
    result = CliRunner().invoke(app, ["run", "decisions", "elastic", "--json"])
    assert result.exit_code == 0, result.output
    assert [d["cause"] for d in json.loads(result.output) if d["action"] == "ResizeWorld"][0].startswith("world of 1")
