"""Chaos on a real local Ray cluster (a head and a second raylet node, token auth on).

One `llmctl supervise` process watches every run of the module, as in production. Each case
records a tiny run (2 CPU workers, 24 steps, a checkpoint every 8), lets the supervisor
submit it, breaks something for real, and then checks the same four things:

- the run reaches its final step and ends `succeeded`;
- work lost is at most one checkpoint interval (per restart: the newest step the failed
  attempt reached minus the step the next attempt resumed from);
- no attempt ran twice: the Jobs API knows exactly `<run>-a1..aN`, one per ledger attempt,
  and each attempt wrote one `start` event;
- the ledger shows the cause (incidents, the `recovering` transition) and the recovery.

Cases that break only their own run (a killed worker or driver, a hang, a corrupt checkpoint)
run side by side, three at a time, from the module's start; those that break what every run
shares (the supervisor, a node) run alone after them.

A killed worker, a killed driver and a corrupt newest checkpoint also run with `zero_stage: 3`
(FSDP2 full sharding: sharded checkpoints, in-place reload after a worker's death);
`CHAOS_ZERO_STAGE=3` runs every case that way instead of with replicated workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

import pytest

from controlplane import checkpoint as ckpt
from controlplane import ray_cluster
from controlplane.context import Context
from controlplane.rundir import RunDir
from controlplane.runs import create_run, stop_run
from controlplane.spec import ClusterSpec, RunSpec, StorageSpec
from controlplane.supervisor import store
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.training]
REPO = Path(__file__).resolve().parents[2]
STEPS, INTERVAL = 24, 8
NAN_AT = INTERVAL + 5
# attempt 1 steps at ~6/s, so each fault lands mid-run (the tiny model alone does ~40/s)
SLOW = {"kind": "slow_worker", "at_step": 1, "rank": 0, "attempt": 1, "seconds": 0.15}
RUN_TIMEOUT_S = 420  # an in-attempt replacement alone took 108 s beside the other stream on a slow host
ZERO_STAGE = int(os.environ.get("CHAOS_ZERO_STAGE", "0"))
# the representative cases also run fully sharded (sharded checkpoints, in-place reload, DCP shards)
SHARDED_STAGES = sorted({ZERO_STAGE, 3})
SHARDED_TOO = pytest.mark.parametrize("stage", SHARDED_STAGES, ids=lambda s: f"zero{s}")


class SupervisorProcess:
    """`llmctl supervise` as a real process that a test can SIGKILL and start again."""

    def __init__(self, home: Path):
        self.home = home
        self.proc: subprocess.Popen | None = None
        self.log = home / "logs" / "chaos-supervisor.log"
        self.starts = 0

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LLMCTL_HOME": str(self.home), "PYTHONPATH": str(REPO)}
        env.pop("LLMCTL_CLUSTER", None)
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controlplane", "supervise", "--interval", "0.5"],
                env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.starts += 1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def supervisor(ray_home, module_ctx):
    sup = SupervisorProcess(ray_home)
    sup.start()
    yield sup
    sup.kill(signal.SIGTERM)
    # a run a failed case left behind would hold the session cluster from the next modules
    for run in module_ctx.ledger.list_runs():
        if run["run_id"].startswith("chaos-"):
            stop_run(module_ctx, run["run_id"], "the chaos module ended")


@pytest.fixture
def ctx(cluster_home, dataset_dir, supervisor):
    return Context.load()


@pytest.fixture(scope="module")
def module_ctx(ray_home):
    """The session cluster's context for the module's own threads and fixtures (not
    $LLMCTL_HOME: each test sets its own)."""
    return Context(ClusterSpec(storage=StorageSpec(root=str(ray_home))))


@pytest.fixture(scope="module")
def drills(module_ctx, dataset_dir, supervisor):
    """Runs whose faults are drills need no hand from the test: they start with the module and
    run beside the first cases (the cluster has room for three runs), to keep the suite short."""
    ctx = module_ctx
    nan = {"kind": "nan_loss", "at_step": NAN_AT, "rank": 0, "attempt": 1}
    enospc = {"kind": "checkpoint_enospc", "at_step": INTERVAL, "attempt": 1}
    return {"nan": submit(ctx, "chaos-nan", faults=[nan]), "enospc": submit(ctx, "chaos-enospc", faults=[enospc])}


_submitted = threading.local()  # the runs the current thread's case recorded


def submit(ctx: Context, name: str, faults=(), stage: int = ZERO_STAGE, **ft) -> RunDir:
    spec = {
        "name": name,
        "model": {"preset": "tiny"},
        "train": {"max_steps": STEPS, "global_batch_size": 8, "seq_len": 64, "schedule": {"warmup_steps": 4}},
        "workers": {"num_workers": 2},
        "checkpoint": {"interval_steps": INTERVAL, "keep_last": 5, "async_save": True},
        "fault_tolerance": {"backoff_initial_s": 0.5, "backoff_max_s": 4, "hang_timeout_min_s": 60, **ft},
        "faults": [SLOW, *faults],
        "parallelism": {"zero_stage": stage},
        "seed": 11,
    }
    rd = create_run(ctx, RunSpec.model_validate(spec))  # pending: the supervisor submits attempt 1
    _submitted.__dict__.setdefault("runs", []).append(rd.run_id)
    return rd


def tidy(case: Callable[[Context], None]) -> Callable[[Context], None]:
    """Run a case; if it fails, stop the runs it recorded and readmit the nodes they had excluded,
    so that one failure is reported as itself and does not hold the cluster from the next cases."""

    def run(ctx: Context) -> None:
        _submitted.runs = []
        try:
            case(ctx)
        except BaseException:
            for run_id in _submitted.runs:
                stop_run(ctx, run_id, "the chaos case failed")
            for record in store.node_records(ctx.ledger):
                if record["excluded"] and record.get("run_id") in _submitted.runs:
                    store.readmit_node(ctx.ledger, record["node"])
            raise

    return run


def step_reached(rd: RunDir, step: int, attempt: int | None = None) -> bool:
    return any(e["step"] >= step for e in rd.events({"step"}) if attempt is None or e["attempt"] == attempt)


def first_start(rd: RunDir, attempt: int = 1) -> dict:
    return wait_for(lambda: next((e for e in rd.events({"start"}) if e["attempt"] == attempt), None), 300, "start")


def recovered(ctx: Context, rd: RunDir, max_lost: int = INTERVAL) -> dict:
    """Wait for the end and check the four promises; return what the ledger holds for more checks."""
    run_id = rd.run_id
    wait_for(
        lambda: ctx.ledger.get_run(run_id)["state"] in ("succeeded", "failed", "stopped"), RUN_TIMEOUT_S, "the end"
    )
    run = ctx.ledger.get_run(run_id)
    attempts = ctx.ledger.attempts(run_id)
    incidents = ctx.ledger.incidents(run_id)
    transitions = ctx.ledger.transitions(run_id)
    why = {"run": run, "attempts": attempts, "incidents": incidents}
    assert run["state"] == "succeeded", why
    steps = rd.events({"step"})
    assert max(e["step"] for e in steps) == STEPS
    # no duplicate attempt
    starts = Counter(e["attempt"] for e in rd.events({"start"}))
    assert all(n == 1 for n in starts.values()), starts
    assert sorted(starts) == [a["attempt"] for a in attempts], (starts, attempts)
    jobs = ray_cluster.job_client(ctx.cluster).list_jobs()
    sids = sorted(j.submission_id for j in jobs if (j.submission_id or "").startswith(run_id + "-a"))
    assert sids == sorted(f"{run_id}-a{a['attempt']}" for a in attempts), sids
    # work lost per restart
    reached = {
        a["attempt"]: max((e["step"] for e in steps if e["attempt"] == a["attempt"]), default=0) for a in attempts
    }
    resumed = {e["attempt"]: e["resume_step"] for e in rd.events({"start"})}
    for n in range(2, len(attempts) + 1):
        lost = reached[n - 1] - resumed[n]
        assert lost <= max_lost, f"attempt {n} resumed at {resumed[n]} after attempt {n - 1} reached {reached[n - 1]}"
    # every checkpoint left on disk verifies; the ledger has them
    for s in ckpt.committed_steps(rd.checkpoints):
        ckpt.verify(rd.checkpoints / ckpt.step_dirname(s))
    assert STEPS in [c["step"] for c in ctx.ledger.checkpoints(run_id)]
    return {
        "attempts": attempts,
        "incidents": incidents,
        "transitions": transitions,
        "kinds": [i["kind"] for i in incidents],
    }


def recovering_causes(r: dict) -> list[str]:
    return [t["cause"] for t in r["transitions"] if t["to_state"] == "recovering"]


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# --------------------------------------------------------------------------- cases


def case_sigkill_a_training_worker(ctx: Context, stage: int) -> None:
    rd = submit(ctx, f"chaos-kill-worker-z{stage}", stage=stage)
    start = first_start(rd)
    wait_for(lambda: step_reached(rd, 5), 120, "step 5")
    kill(next(w["pid"] for w in start["workers"] if w["rank"] == 1))
    r = recovered(ctx, rd)
    assert "worker_died" in r["kinds"]
    assert "worker_replaced" in r["kinds"] or len(r["attempts"]) == 2, r["kinds"]
    # the failure names its rank and node; every process's output is kept in the run directory
    died = next(e for e in rd.events({"failure"}) if e["kind"] == "worker_died")
    assert died["rank"] == 1 and died["node_id"] == next(w["node_id"] for w in start["workers"] if w["rank"] == 1)
    logs = {p.name: p.read_text(errors="replace") for p in (rd.logs / "attempt-1").glob("*.log")}
    assert "driver.log" in logs and {f"worker-{w['pid']}.log" for w in start["workers"]} <= set(logs), sorted(logs)


def case_sigkill_a_worker_while_a_checkpoint_is_written(ctx: Context) -> None:
    rd = submit(ctx, "chaos-kill-in-ckpt")
    start = first_start(rd)
    rank0 = next(w["pid"] for w in start["workers"] if w["rank"] == 0)  # rank 0 writes checkpoints

    def writing() -> bool:
        with contextlib.suppress(FileNotFoundError):
            if any(n.startswith(".staging-") for n in os.listdir(rd.checkpoints)):
                return True
        return step_reached(rd, 2 * INTERVAL)  # never caught in the act: kill right after a due step

    wait_for(writing, 120, "a checkpoint being written", every=0.002)
    kill(rank0)
    r = recovered(ctx, rd)
    # the job replaces the worker in-attempt, or (a death inside the checkpoint call) its driver
    # fails and the supervisor resumes from the newest checkpoint that did commit
    assert "worker_died" in r["kinds"] or ("crash" in r["kinds"] and len(r["attempts"]) == 2), r["kinds"]


def case_kill_the_job_driver(ctx: Context, stage: int) -> None:
    rd = submit(ctx, f"chaos-kill-driver-z{stage}", stage=stage)
    start = first_start(rd)
    wait_for(lambda: step_reached(rd, INTERVAL + 4), 120, f"step {INTERVAL + 4}")
    kill(start["driver_pid"])
    r = recovered(ctx, rd)
    assert len(r["attempts"]) == 2 and r["attempts"][0]["state"] == "failed"
    assert recovering_causes(r) and recovering_causes(r)[0].startswith("crash in attempt 1 at step")
    # kept after the job is gone, read from the run directory
    res = subprocess.run(
        [sys.executable, "-m", "controlplane", "run", "logs", rd.run_id, "--attempt", "1"],
        env={**os.environ, "LLMCTL_HOME": str(ctx.storage), "PYTHONPATH": str(REPO)},
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0 and "==> driver" in res.stdout and "==> rank 0" in res.stdout, (
        res.stderr + res.stdout[-2000:]
    )


def case_sigstop_a_worker_hang(ctx: Context) -> None:
    rd = submit(ctx, "chaos-hang", hang_timeout_min_s=40)
    start = first_start(rd)
    wait_for(lambda: step_reached(rd, 5), 120, "step 5")
    victim = next(w["pid"] for w in start["workers"] if w["rank"] == 1)
    kill(victim, signal.SIGSTOP)
    try:
        r = recovered(ctx, rd)
    finally:
        kill(victim, signal.SIGKILL)
    assert "hang" in r["kinds"], r["kinds"]


def case_corrupt_newest_checkpoint_is_skipped(ctx: Context, stage: int) -> None:
    rd = submit(ctx, f"chaos-corrupt-z{stage}", stage=stage)
    start = first_start(rd)
    wait_for(lambda: any(e["step"] >= 2 * INTERVAL for e in rd.events({"checkpoint"})), 180, "two checkpoints")
    kill(start["driver_pid"])
    sid = ray_cluster.submission_id(rd.run_id, 1)
    wait_for(lambda: ray_cluster.job_status(ctx.cluster, sid) in ("FAILED", "STOPPED"), 60, "attempt 1 to end")
    newest = ckpt.committed_steps(rd.checkpoints)[-1]
    victim = rd.checkpoints / ckpt.step_dirname(newest) / ("__1_0.distcp" if stage else "model.safetensors")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit flipped: only the checksum can tell
    victim.write_bytes(bytes(data))
    r = recovered(ctx, rd, max_lost=2 * INTERVAL)  # the corrupt one costs one more interval
    start2 = first_start(rd, 2)
    assert start2["resume_step"] < newest and any(s == newest for s, _ in start2["skipped_checkpoints"])
    assert "checkpoint_skipped" in r["kinds"]


# Cases that break only their own run go side by side, SIDE_BY_SIDE at a time, from the module's
# start (beside the drills): much of a case is waiting (a process starting, a detection timeout),
# and the cluster has room for four runs. Each test then waits for its own case and reports it.
# Cases that break what every run shares (the supervisor, a node) run alone, after them.
SIDE_BY_SIDE = 3
CASES = {
    **{f"kill-worker-z{s}": partial(case_sigkill_a_training_worker, stage=s) for s in SHARDED_STAGES},
    "kill-in-checkpoint": case_sigkill_a_worker_while_a_checkpoint_is_written,
    **{f"kill-driver-z{s}": partial(case_kill_the_job_driver, stage=s) for s in SHARDED_STAGES},
    "hang": case_sigstop_a_worker_hang,
    **{f"corrupt-z{s}": partial(case_corrupt_newest_checkpoint_is_skipped, stage=s) for s in SHARDED_STAGES},
}
CASE_TIMEOUT_S = 2 * RUN_TIMEOUT_S + 240  # its start, its fault and its recovery, waiting for a place
ALL_CASES_TIMEOUT_S = CASE_TIMEOUT_S * len(CASES) / SIDE_BY_SIDE


@pytest.fixture(scope="module")
def side_by_side(module_ctx, dataset_dir, supervisor, drills):
    ctx = module_ctx
    pool = ThreadPoolExecutor(SIDE_BY_SIDE, thread_name_prefix="chaos")
    futures = {name: pool.submit(tidy(case), ctx) for name, case in CASES.items()}
    try:
        yield futures
    finally:
        for f in futures.values():
            f.cancel()
        pool.shutdown(wait=True)


@pytest.fixture
def alone(side_by_side):
    """Every side-by-side case has ended (whatever its outcome: its own test reports it)."""
    wait(list(side_by_side.values()), timeout=ALL_CASES_TIMEOUT_S)


def outcome(side_by_side: dict, name: str) -> None:
    side_by_side[name].result(timeout=ALL_CASES_TIMEOUT_S)  # re-raises its failure


@SHARDED_TOO
def test_sigkill_a_training_worker(side_by_side, stage):
    outcome(side_by_side, f"kill-worker-z{stage}")


def test_sigkill_a_worker_while_a_checkpoint_is_written(side_by_side):
    outcome(side_by_side, "kill-in-checkpoint")


@SHARDED_TOO
def test_kill_the_job_driver(side_by_side, stage):
    outcome(side_by_side, f"kill-driver-z{stage}")


def test_sigstop_a_worker_hang(side_by_side):
    outcome(side_by_side, "hang")


@SHARDED_TOO
def test_corrupt_newest_checkpoint_is_skipped(side_by_side, stage):
    outcome(side_by_side, f"corrupt-z{stage}")


def test_sigkill_the_supervisor_and_start_it_again(ctx, supervisor, alone):
    drill = {"kind": "exit_driver", "at_step": INTERVAL + 3, "attempt": 1}
    rd = submit(ctx, "chaos-kill-supervisor", faults=[drill])
    first_start(rd)
    wait_for(lambda: step_reached(rd, 4), 120, "step 4")
    supervisor.kill(signal.SIGKILL)  # the driver dies while no supervisor is watching
    sid = ray_cluster.submission_id(rd.run_id, 1)
    wait_for(lambda: ray_cluster.job_status(ctx.cluster, sid) == "FAILED", 120, "attempt 1 to fail")
    assert len(ctx.ledger.attempts(rd.run_id)) == 1
    supervisor.start()
    r = recovered(ctx, rd)
    assert len(r["attempts"]) == 2
    assert any("driver" in c or "crash" in c for c in recovering_causes(r)), recovering_causes(r)


def test_nan_loss_drill_rolls_back_and_skips_the_window(ctx, drills):
    bad, rd = NAN_AT, drills["nan"]
    r = recovered(ctx, rd)
    assert len(r["attempts"]) == 2
    rollback = next(i for i in r["incidents"] if i["kind"] == "rollback")
    assert rollback["detail"]["bad_step"] == bad and rollback["detail"]["to_step"] == INTERVAL
    assert rollback["detail"]["skip"] == [INTERVAL + 1, bad + 1]
    assert r["attempts"][1]["info"]["skip_steps"] == [[INTERVAL + 1, bad + 1]]
    assert first_start(rd, 2)["resume_step"] == INTERVAL


def test_checkpoint_enospc_drill(ctx, drills):
    rd = drills["enospc"]
    r = recovered(ctx, rd)
    assert "checkpoint_failed" in r["kinds"]
    failed = next(i for i in r["incidents"] if i["kind"] == "checkpoint_failed")
    assert "No space left" in (failed["detail"].get("error") or "")


def test_kill_a_raylet_node(ctx, alone):
    """Both workers on the second node (the head's CPUs held by a placeholder job); kill that node.
    The placeholder stays until Ray's node table says the node is dead, so the run waits for room
    while Ray's own evidence comes in; the supervisor excludes the node naming it, whatever the
    count of rank failures (or the count, if it comes first). Last in the module: the cluster carries on with its head alone."""
    client = ray_cluster.job_client(ctx.cluster)
    state = ray_cluster.read_state(ctx.cluster)
    hold = client.submit_job(
        entrypoint="sleep 600",
        entrypoint_num_cpus=state.num_cpus,
        entrypoint_resources={"node:__internal_head__": 0.001},
    )
    try:
        wait_for(lambda: str(client.get_job_status(hold).value) == "RUNNING", 60, "the placeholder job")
        rd = submit(ctx, "chaos-kill-node")
        start = first_start(rd)
        heads = {n["node_id"] for n in ray_cluster.status(ctx.cluster)["nodes"] if n["is_head"]}
        assert not {w["node_id"] for w in start["workers"]} & heads, "workers should be on the second node"
        wait_for(lambda: step_reached(rd, INTERVAL + 2), 120, f"step {INTERVAL + 2}")
        # and its checkpoint committed (a sharded one is written by both ranks, then gathered)
        wait_for(lambda: INTERVAL in ckpt.committed_steps(rd.checkpoints), 60, f"checkpoint {INTERVAL}")
        ray_cluster.kill_node(ctx.cluster, len(state.nodes) - 1)  # the raylet and its agents...
        for w in start["workers"]:  # ...and the worker processes it hosted, as a dead machine takes them
            kill(w["pid"])
        node = next(w["node_id"] for w in start["workers"])

        def dead_in_ray() -> bool:
            return any(n["node_id"] == node and not n["alive"] for n in ray_cluster.node_table(ctx.cluster))

        wait_for(dead_in_ray, 120, "Ray's node table to report the node dead", every=1.0)
        wait_for(lambda: node in store.excluded_nodes(ctx.ledger), 60, "the supervisor to exclude the node")
    finally:
        client.stop_job(hold)
    try:
        r = recovered(ctx, rd)
        assert "worker_died" in r["kinds"] and len(r["attempts"]) == 2
        record = next(x for x in store.node_records(ctx.ledger) if x["node"] == node)
        # whichever evidence came first: Ray's node table, or both ranks' failures counted on it
        reason = record["reason"]
        assert (
            "Ray's node table" in reason and "Unexpected termination" in reason
        ) or "failures on this node" in reason
        died = [e for e in rd.events({"failure"}) if e["attempt"] == 1 and e["kind"] == "worker_died"]
        assert died and all(e.get("node_id") == node and e.get("rank") is not None for e in died), died
    finally:
        for n in store.excluded_nodes(ctx.ledger):
            store.readmit_node(ctx.ledger, n)
