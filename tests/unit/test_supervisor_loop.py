"""The reconcile loop end to end, with attempts as real local processes (no Ray).

Each test drives a scripted job (tests/unit/scripted_job.py) that keeps to the job contract
through real faults: it crashes, writes NaN, hangs, and the loop must bring the run to its
final step with the cause and the recovery in the ledger.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.errors import RetryableError
from controlplane.spec import RunSpec
from controlplane.supervisor import store
from controlplane.supervisor.loop import Supervisor
from controlplane.supervisor.observed import PolicyConfig
from controlplane.supervisor.ports import SupervisorBusy
from tests.unit.supervisor_harness import (
    ROOT,
    ProcessJobs,
    env_fixture,
    make_run,
    start_and_wait_for_a_step,
    wait_terminal,
)
from tests.unit.supervisor_harness import scripted_spec as spec

CONFIG = PolicyConfig(heartbeat_stale_s=0.6, stop_grace_s=3.0)

env = env_fixture(CONFIG)


def run(env, run_id, script, s=None, timeout=60):
    ctx, jobs, sup = env
    rd = make_run(ctx.ledger, ctx.storage, run_id, s or spec(steps=script["steps"]), script)
    state = wait_terminal(sup, ctx.ledger, run_id, timeout)
    return rd, state


def steps_of(rd):
    return [e["step"] for e in rd.events({"step"})]


def test_clean_run_is_submitted_once_and_succeeds(env):
    ctx, jobs, _ = env
    rd, state = run(env, "clean", {"steps": 12, "interval": 5, "step_s": 0.02})
    assert state == "succeeded"
    assert jobs.submissions() == ["clean-a1"]
    assert [c["step"] for c in ctx.ledger.checkpoints("clean")] == [5, 10, 12]
    assert [t["to_state"] for t in ctx.ledger.transitions("clean")] == [
        "pending",
        "provisioning",
        "running",
        "succeeded",
    ]
    assert ctx.ledger.attempts("clean")[0]["state"] == "succeeded"
    acts = [d["action"] for d in store.decisions(ctx.ledger, "clean")]
    assert acts[0] == "Submit" and acts[-1] == "MarkSucceeded"


def test_crash_restarts_from_the_newest_checkpoint(env):
    ctx, jobs, _ = env
    rd, state = run(env, "crash", {"steps": 20, "interval": 5, "step_s": 0.02, "faults": {"1": {"crash_at": 13}}})
    assert state == "succeeded"
    assert jobs.submissions() == ["crash-a1", "crash-a2"]
    start2 = [e for e in rd.events({"start"}) if e["attempt"] == 2][0]
    assert start2["resume_step"] == 10  # work lost: steps 11..12, under one interval
    attempts = ctx.ledger.attempts("crash")
    assert attempts[0]["state"] == "failed" and attempts[0]["cause"] == "worker_died"
    trans = ctx.ledger.transitions("crash")
    recovering = [t for t in trans if t["to_state"] == "recovering"]
    assert len(recovering) == 1 and recovering[0]["cause"] == "worker_died in attempt 1 at step 13"
    kinds = [(i["kind"], i["detail"]["source"]) for i in ctx.ledger.incidents("crash")]
    assert ("worker_died", "job") in kinds and ("worker_died", "supervisor") in kinds
    assert max(steps_of(rd)) == 20
    # what the supervisor did and why, as an operator reads it
    res = CliRunner().invoke(app, ["run", "decisions", "crash", "--json"])
    assert res.exit_code == 0, res.output
    acts = [(d["attempt"], d["action"], d["cause"]) for d in json.loads(res.stdout)]
    assert [a[1] for a in acts] == [
        "Submit", "MarkRunning", "RecordIncident", "MarkRecovering", "Backoff", "Submit", "MarkRunning", "MarkSucceeded"
    ]  # fmt: skip
    assert acts[0] == (None, "Submit", "initial submission")
    assert acts[5] == (1, "Submit", "worker_died in attempt 1 at step 13")  # decided in attempt 1, submits 2
    table = CliRunner().invoke(app, ["run", "decisions", "crash", "--tail", "2"])
    assert table.exit_code == 0 and "MarkSucceeded" in table.output and "initial submission" not in table.output


def test_nan_rolls_back_and_skips_the_window(env):
    ctx, jobs, _ = env
    rd, state = run(env, "nan", {"steps": 20, "interval": 5, "step_s": 0.02, "faults": {"1": {"nan_at": 12}}})
    assert state == "succeeded"
    args = jobs.args_of("nan-a2")["args"]
    assert args[args.index("--max-resume-step") + 1] == "10"
    assert args[args.index("--skip-steps") + 1] == "11:13"
    rollback = [i for i in ctx.ledger.incidents("nan") if i["kind"] == "rollback"]
    assert rollback and rollback[0]["detail"]["to_step"] == 10 and rollback[0]["detail"]["bad_step"] == 12


def test_hang_is_detected_and_names_the_silent_rank(env):
    ctx, jobs, _ = env
    script = {"steps": 12, "interval": 3, "step_s": 0.02, "faults": {"1": {"hang_at": 7, "hang_ranks": [1]}}}
    rd, state = run(env, "hang", script, timeout=60)
    assert state == "succeeded"
    hang = [i for i in ctx.ledger.incidents("hang") if i["kind"] == "hang"]
    assert hang and hang[0]["detail"]["stale_ranks"] == [1]
    assert "heartbeats stopped: ranks [1]" in hang[0]["detail"]["detail"]
    a1 = ctx.ledger.attempts("hang")[0]
    assert a1["cause"] == "hang" and a1["state"] == "stopped"
    assert [e["resume_step"] for e in rd.events({"start"})] == [0, 6]


def test_crash_loop_fails_the_run_with_a_clear_cause(env):
    ctx, jobs, _ = env
    faults = {str(n): {"crash_at": 0} for n in range(1, 10)}
    rd, state = run(env, "loop", {"steps": 10, "faults": faults}, s=spec(steps=10, crash_loop_restarts=2))
    assert state == "failed"
    run_row = ctx.ledger.get_run("loop")
    assert run_row["cause"].startswith("crash loop: 2 restarts without step progress")
    assert len(jobs.submissions()) == 3


def test_restart_budget(env):
    ctx, jobs, _ = env
    faults = {"1": {"crash_at": 3}, "2": {"crash_at": 6}, "3": {"crash_at": 9}}
    rd, state = run(env, "budget", {"steps": 20, "interval": 2, "step_s": 0.01, "faults": faults},
                    s=spec(steps=20, interval=2, max_restarts=2))  # fmt: skip
    assert state == "failed"
    assert "restart budget exhausted (2 of 2)" in ctx.ledger.get_run("budget")["cause"]


def test_interrupted_submission_is_finished_not_duplicated(env):
    ctx, jobs, sup = env
    rd = make_run(ctx.ledger, ctx.storage, "intr", spec(steps=6), {"steps": 6, "step_s": 0.02})
    # a supervisor died after recording attempt 1 and before submitting it
    ctx.ledger.next_attempt("intr", None, {"cause": "submitted"})
    assert wait_terminal(sup, ctx.ledger, "intr") == "succeeded"
    assert jobs.submissions() == ["intr-a1"]
    assert rd.current_fence() == 1

    # ...and one that died after submitting, before recording the job id: adopted
    rd2 = make_run(ctx.ledger, ctx.storage, "adopt", spec(steps=6), {"steps": 6, "step_s": 0.02})
    ctx.ledger.next_attempt("adopt", None, {"cause": "submitted"})
    rd2.set_fence(1)
    jobs.submit(rd2, 1, max_resume_step=None, skip_steps=[], env_vars={})
    assert wait_terminal(sup, ctx.ledger, "adopt") == "succeeded"
    assert jobs.submissions().count("adopt-a1") == 1
    assert ctx.ledger.attempts("adopt")[0]["job_id"] == "adopt-a1"


def test_unhealthy_node_is_excluded_and_the_attempt_moves(env):
    ctx, jobs, sup = env
    script = {"steps": 40, "interval": 5, "step_s": 0.03}
    rd = start_and_wait_for_a_step(sup, ctx.ledger, ctx.storage, "sick", spec(steps=40), script)
    health = ctx.storage / "telemetry" / "health"
    health.mkdir(parents=True)
    reason = {"kind": "xid", "gpu": 3, "detail": "Xid 79: GPU has fallen off the bus", "ts": time.time()}
    (health / "node-b.json").write_text(json.dumps({"node": "node-b", "healthy": False, "reasons": [reason]}))
    assert wait_terminal(sup, ctx.ledger, "sick") == "succeeded"
    assert store.excluded_nodes(ctx.ledger) == {"node-b"}
    assert jobs.args_of("sick-a2")["env"] == {"LLMCTL_EXCLUDE_NODES": "node-b"}
    assert "node-b" not in {w["node_id"] for w in rd.events({"start"})[-1]["workers"]}
    assert any(i["kind"] == "node_unhealthy" for i in ctx.ledger.incidents("sick"))


def test_auto_checkpoint_interval_is_written_for_the_job(env):
    ctx, jobs, _ = env
    s = RunSpec.model_validate(
        {"name": "auto", "train": {"max_steps": 15}, "checkpoint": {"interval_steps": "auto", "mtbf_hours": 0.001}}
    )
    rd, state = run(env, "auto", {"steps": 15, "interval": 4, "step_s": 0.02}, s=s)
    assert state == "succeeded"
    written = int((rd.path / "checkpoint_interval").read_text())
    assert written >= 1
    dec = [d for d in store.decisions(ctx.ledger, "auto") if d["action"] == "SetCheckpointInterval"]
    assert dec and "Young/Daly" in dec[0]["cause"]


def test_one_supervisor_per_storage_root(env):
    ctx, _, sup = env
    sup.lock.acquire()
    other = Supervisor(ctx, ProcessJobs(ctx.storage / "j2"))
    with pytest.raises(SupervisorBusy, match=f"pid {os.getpid()}"):
        other.lock.acquire()
    make_run(ctx.ledger, ctx.storage, "watched", spec(steps=5), {"steps": 5})
    assert other.reconcile_run("watched") == []  # a watcher without the lock only watches
    assert ctx.ledger.current_attempt("watched") is None
    sup.lock.release()
    assert other.reconcile_run("watched")[0].attempt == 1  # the lock is free: one pass, then let go
    assert not other.lock.held
    sup.lock.acquire()
    sup.lock.release()


DRIVER = """
import sys, time
from pathlib import Path
from controlplane.context import Context
from controlplane.errors import RetryableError
from controlplane.supervisor.loop import Supervisor
from controlplane.supervisor.observed import PolicyConfig
from tests.unit.supervisor_harness import ProcessJobs
sup = Supervisor(Context.load(), ProcessJobs(Path(sys.argv[1])), config=PolicyConfig(heartbeat_stale_s=0.6, stop_grace_s=3.0),
                 exclusive=True)
Path(sys.argv[2]).touch()  # ready: the kills below land in ticks, not in imports
while True:
    sup.tick()
    time.sleep(0.01)
"""


def test_supervisor_killed_at_random_moments_never_duplicates_an_attempt(env, tmp_path):
    ctx, jobs, _ = env
    faults = {"1": {"crash_at": 7}, "2": {"nan_at": 14}, "3": {"crash_at": 19}}
    rd = make_run(ctx.ledger, ctx.storage, "sigkill", spec(steps=24, interval=3),
                  {"steps": 24, "interval": 3, "step_s": 0.05, "faults": faults})  # fmt: skip
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT)}
    deadline = time.monotonic() + 150
    kills = 0
    delays = [0.15, 0.4, 0.05, 0.7, 0.25, 0.3, 0.1, 0.5]
    ready = tmp_path / "ready"
    while ctx.ledger.get_run("sigkill")["state"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        ready.unlink(missing_ok=True)
        p = subprocess.Popen([sys.executable, "-c", DRIVER, str(jobs.dir), str(ready)], env=env_vars, cwd=ROOT)
        up_by = time.monotonic() + 30
        while not ready.exists() and p.poll() is None and time.monotonic() < up_by:
            time.sleep(0.01)
        time.sleep(delays[kills % len(delays)] if kills < 24 else 3.0)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    subs = jobs.submissions()
    why = {"run": ctx.ledger.get_run("sigkill"), "submissions": subs, "kills": kills,
           "transitions": [(t["to_state"], t["cause"]) for t in ctx.ledger.transitions("sigkill")]}  # fmt: skip
    assert why["run"]["state"] == "succeeded", why
    assert subs == [f"sigkill-a{n}" for n in range(1, len(subs) + 1)], why  # each attempt exactly once, in order
    assert [a["attempt"] for a in ctx.ledger.attempts("sigkill")] == list(range(1, len(subs) + 1)), why
    assert len(subs) == 4 and kills >= 3, why
    assert max(steps_of(rd)) == 24


class LossyJobs(ProcessJobs):
    """The Jobs API's connection drops on the first submission: before the job is created, or after."""

    def __init__(self, state_dir, after: bool):
        super().__init__(state_dir)
        self.after, self.dropped = after, False

    def submit(self, run_dir, attempt, **kw):
        if not self.dropped:
            self.dropped = True
            if self.after:
                super().submit(run_dir, attempt, **kw)
            raise RetryableError("Ray Jobs API: ConnectionError: Remote end closed connection without response")
        return super().submit(run_dir, attempt, **kw)


@pytest.mark.parametrize("after", [False, True], ids=["before-create", "after-create"])
def test_dropped_submission_is_retried_without_a_duplicate(tmp_path, after):
    ctx = Context.load()
    jobs = LossyJobs(tmp_path / "lossy", after)
    sup = Supervisor(ctx, jobs, config=CONFIG)
    try:
        make_run(ctx.ledger, ctx.storage, "lossy", spec(steps=6), {"steps": 6, "step_s": 0.02})
        assert wait_terminal(sup, ctx.ledger, "lossy") == "succeeded"
        assert jobs.dropped and jobs.submissions() == ["lossy-a1"]
        assert [a["job_id"] for a in ctx.ledger.attempts("lossy")] == ["lossy-a1"]
    finally:
        sup.close()
        jobs.kill_all()


def test_excluded_names_map_to_ray_nodes_by_id_or_host():
    from controlplane.supervisor.nodes import excluded_names, ray_nodes_to_exclude

    names = excluded_names({"LLMCTL_EXCLUDE_NODES": " abc123, gpu-017 ,,"})
    assert names == {"abc123", "gpu-017"}
    assert excluded_names({}) == set()
    nodes = [
        {"NodeID": "abc123", "NodeManagerHostname": "gpu-001"},  # by Ray node id
        {"NodeID": "def456", "NodeManagerHostname": "gpu-017"},  # by host name (telemetry's view)
        {"NodeID": "fed789", "NodeManagerHostname": "gpu-017."},  # telemetry names it gpu-017 too
        {"NodeID": "0a0a0a", "NodeManagerHostname": "gpu-018"},
    ]
    assert ray_nodes_to_exclude(names, nodes) == {"abc123": "abc123", "def456": "gpu-017", "fed789": "gpu-017"}
    assert ray_nodes_to_exclude(set(), nodes) == {}
