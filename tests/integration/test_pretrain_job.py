"""The pretraining job on a real local Ray instance, through its real entrypoint.

    python -m jobs.pretrain --run-dir DIR --attempt N     (RAY_ADDRESS set to the test's Ray)

Tiny preset, 2 CPU workers, seq_len 64, global batch 8, 30 steps. Same seed -> the loss
curve must not depend on failures: a worker SIGKILLed mid-run (replaced in-attempt from a
survivor's memory) and a whole-job kill + resume from the newest VERIFIED checkpoint (the
newest is corrupted on purpose) both end at the uninterrupted run's final loss. Tolerance:
exact equality. The replicas run the same float operations in the same order with the same
thread count, the replacement receives a byte copy of the survivor's state and a resume
reads back the exact bytes, so there is no source of divergence to tolerate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane import checkpoint as ckpt
from controlplane import ray_cluster
from controlplane.rundir import RunDir
from controlplane.spec import ClusterSpec, RunSpec, StorageSpec

pytestmark = [pytest.mark.integration, pytest.mark.training]
REPO = Path(__file__).resolve().parents[2]
STEPS = 30
# How long one training job may take, start to end: a bound, not an expectation. Beside the other
# stream's vLLM engines one job's first step came 240 s after its driver started.
JOB_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def ray_env(ray_home):
    """Environment that connects a driver to the session's local cluster (token auth on)."""
    state = ray_cluster.read_state(ClusterSpec(storage=StorageSpec(root=str(ray_home))))
    return {**ray_cluster.ray_env(Path(state.token_file)), "RAY_ADDRESS": state.gcs_address}


@pytest.fixture(scope="module")
def dataset(dataset_dir):
    return dataset_dir


SYNC_CHECKPOINTS = {"interval_steps": 10, "keep_last": 5, "async_save": False}


def make_run(root: Path, dataset: Path, name: str, **overrides) -> RunDir:
    spec = {
        "name": "itest",
        "train": {"max_steps": STEPS, "seq_len": 64, "global_batch_size": 8, "schedule": {"warmup_steps": 5}},
        "workers": {"num_workers": 2},
        "checkpoint": {"interval_steps": 10, "keep_last": 5},
        "seed": 0,
        **overrides,
    }
    rd = RunDir(root / "runs" / name).create()
    rd.write_spec(
        {
            "run_id": name,
            "run": RunSpec.model_validate(spec).model_dump(mode="json"),
            "cluster": ClusterSpec().model_dump(mode="json"),
            "dataset_dir": str(dataset),
        }
    )
    rd.set_fence(1)
    return rd


def run_job(rd: RunDir, attempt: int, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jobs.pretrain", "--run-dir", str(rd.path), "--attempt", str(attempt), *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def by_type(rd: RunDir, type_: str) -> list[dict]:
    return rd.events({type_})


def final_loss(rd: RunDir) -> float:
    return [e for e in by_type(rd, "step") if e["step"] == STEPS][-1]["loss"]


@pytest.fixture(scope="module")
def baseline(ray_env, dataset, tmp_path_factory):
    rd = make_run(tmp_path_factory.mktemp("base"), dataset, "base")
    proc = run_job(rd, 1, ray_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rd


def test_tiny_run_writes_events_and_checkpoints(baseline):
    rd = baseline
    (start,) = by_type(rd, "start")
    assert start["resume_step"] == 0 and start["world_size"] == 2 and len(start["workers"]) == 2
    assert start["metrics_url"].startswith("http://127.0.0.1:")
    steps = by_type(rd, "step")
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["tokens"] == STEPS * 8 * 64
    assert all(len(e["rank_step_times"]) == 2 and e["tokens_per_s"] > 0 for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3  # it learns
    hb_ranks = {(e["rank"], e["pid"]) for e in by_type(rd, "heartbeat")}
    assert {r for r, _ in hb_ranks} == {0, 1}
    cps = by_type(rd, "checkpoint")
    assert [c["step"] for c in cps] == [10, 20, 30]
    assert all(c["async"] and c["blocking_s"] >= 0 and c["persist_s"] > 0 for c in cps)
    assert ckpt.committed_steps(rd.checkpoints) == [10, 20, 30]
    info = ckpt.verify(rd.checkpoints / "step_000000030")
    trainer = json.loads((info.path / "trainer_state.json").read_text())
    assert trainer["step"] == 30 and trainer["data_cursor"] == 30 and trainer["world_size"] == 2
    assert info.manifest["meta"]["loss"] == final_loss(rd)
    (end,) = by_type(rd, "end")
    assert end["status"] == "succeeded" and end["step"] == STEPS


@pytest.mark.parametrize("spares,rank", [(0, 1), (1, 0)], ids=["new-worker", "warm-spare"])
def test_killed_worker_is_replaced_in_attempt(baseline, ray_env, dataset, tmp_path, spares, rank):
    rd = make_run(
        tmp_path,
        dataset,
        "kill",
        workers={"num_workers": 2, "spare_workers": spares},
        faults=[{"kind": "kill_worker", "at_step": 15, "rank": rank}],
    )
    proc = run_job(rd, 1, ray_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (failure,) = by_type(rd, "failure")
    assert failure["kind"] == "worker_died" and failure["rank"] == rank and failure["step"] == 15
    (rep,) = by_type(rd, "worker_replaced")
    assert rep["rank"] == rank and rep["from"] == ("spare" if spares else "new") and rep["new_pid"] != rep["old_pid"]
    assert 0 < rep["recovery_s"] < 60
    assert len(by_type(rd, "start")) == 1  # recovered inside the attempt, no restart
    assert [e["step"] for e in by_type(rd, "step")] == list(range(1, STEPS + 1))
    assert final_loss(rd) == final_loss(baseline)


def test_restart_resumes_from_newest_verified_checkpoint(baseline, ray_env, dataset, tmp_path):
    # Sync saves: each checkpoint is committed before the next step, so the dead driver leaves
    # exactly 10 and 20 (an async write still running when the driver dies is lost with it).
    rd = make_run(
        tmp_path,
        dataset,
        "resume",
        checkpoint=SYNC_CHECKPOINTS,
        faults=[{"kind": "exit_driver", "at_step": 25, "attempt": 1}],
    )
    first = run_job(rd, 1, ray_env)
    assert first.returncode == 1
    assert ckpt.committed_steps(rd.checkpoints) == [10, 20]
    weights = rd.checkpoints / "step_000000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same size, wrong checksum
    weights.write_bytes(bytes(data))
    rd.set_fence(2)
    second = run_job(rd, 2, ray_env)
    assert second.returncode == 0, second.stderr[-3000:]
    start = by_type(rd, "start")[-1]
    assert start["attempt"] == 2 and start["resume_step"] == 10
    assert [s for s, _ in start["skipped_checkpoints"]] == [20]
    resumed = [e for e in by_type(rd, "step") if e["attempt"] == 2]
    assert resumed[0]["step"] == 11 and resumed[0]["tokens"] == 11 * 8 * 64
    assert final_loss(rd) == final_loss(baseline)
    # The replay of steps 11..25 matches the first attempt's curve exactly.
    before = {e["step"]: e["loss"] for e in by_type(rd, "step") if e["attempt"] == 1}
    assert all(before[e["step"]] == e["loss"] for e in resumed if e["step"] in before)


def test_nan_loss_fails_without_checkpointing_bad_state(ray_env, dataset, tmp_path):
    rd = make_run(tmp_path, dataset, "nan", faults=[{"kind": "nan_loss", "at_step": 10, "rank": 1}])
    proc = run_job(rd, 1, ray_env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    (failure,) = by_type(rd, "failure")
    assert failure["kind"] == "nan_loss" and failure["step"] == 10
    assert ckpt.committed_steps(rd.checkpoints) == []
    assert by_type(rd, "end")[0]["status"] == "failed"


def test_enospc_during_checkpoint_never_leaves_a_loadable_checkpoint(ray_env, dataset, tmp_path):
    rd = make_run(
        tmp_path,
        dataset,
        "enospc",
        checkpoint={"interval_steps": 10, "async_save": False},
        faults=[{"kind": "checkpoint_enospc", "at_step": 10}],
    )
    proc = run_job(rd, 1, ray_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (failed,) = by_type(rd, "checkpoint_failed")
    assert failed["step"] == 10 and "No space left on device" in failed["error"]
    assert ckpt.committed_steps(rd.checkpoints) == [20, 30]
    assert not [p for p in rd.checkpoints.iterdir() if p.name.startswith(".staging")]
    assert all(c["async"] is False for c in by_type(rd, "checkpoint"))


def test_fenced_attempt_exits_75(ray_env, dataset, tmp_path):
    rd = make_run(tmp_path, dataset, "fenced")
    rd.set_fence(2)
    proc = run_job(rd, 1, ray_env)
    assert proc.returncode == 75
    assert by_type(rd, "start") == []


def test_attempt_fenced_mid_run_stops_writing(ray_env, dataset, tmp_path):
    # Slow steps so that the fence lands mid-run.
    rd = make_run(tmp_path, dataset, "fenced-mid", faults=[{"kind": "slow_worker", "at_step": 1, "seconds": 0.3}])
    cmd = [sys.executable, "-m", "jobs.pretrain", "--run-dir", str(rd.path), "--attempt", "1"]
    proc = subprocess.Popen(cmd, env=ray_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not [e for e in by_type(rd, "step") if e["step"] >= 3] and time.monotonic() < deadline:
            time.sleep(0.2)
        rd.set_fence(2)
        assert proc.wait(timeout=120) == 75
    finally:
        proc.kill()
    fenced_at = (rd.path / "fence").stat().st_mtime
    late = [e for e in rd.events() if e["ts"] > fenced_at + 1.5]  # one step and heartbeat period of slack
    assert late == [] and by_type(rd, "end") == []
    assert max(e["step"] for e in by_type(rd, "step")) < STEPS


def test_hung_worker_is_killed_and_replaced_and_straggler_reported(baseline, ray_env, dataset, tmp_path):
    rd = make_run(
        tmp_path,
        dataset,
        "hang",
        faults=[
            {"kind": "hang_worker", "at_step": 8, "rank": 1},
            {"kind": "slow_worker", "at_step": 20, "rank": 0, "seconds": 0.3},
        ],
    )
    proc = run_job(rd, 1, ray_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (failure,) = by_type(rd, "failure")
    assert failure["kind"] == "hang" and failure["rank"] == 1 and failure["step"] == 8
    (rep,) = by_type(rd, "worker_replaced")
    assert rep["cause"] == "hang" and rep["rank"] == 1
    assert rep["recovery_s"] >= 6  # the silence that proved the hang counts against recovery
    stragglers = by_type(rd, "straggler")
    assert stragglers and all(s["rank"] == 0 and s["step"] >= 22 for s in stragglers)
    assert final_loss(rd) == final_loss(baseline)


PROBE = """
import json, sys, time
from pathlib import Path
import ray
from controlplane.rundir import RunDir
from jobs.pretrain.driver import Driver
from jobs.pretrain.recovery import Slot

ray.init()
d = Driver(RunDir(Path(sys.argv[1])), 1)
actor, ready = d.workers.spawn(drills=True)
i = ray.get(ready, timeout=180)
d.slots[0] = Slot(0, actor, i["pid"], i["node_id"], i["node_ip"])
d._form_group()
step = actor.step.remote(1)  # the slow_worker drill holds it for 30 s
while ray.get(actor.probe.remote(), timeout=10)["in_step"] is None:
    time.sleep(0.05)
probe = ray.get(actor.probe.remote(), timeout=10)
print(json.dumps({"probe": probe, "step_done": bool(ray.wait([step], timeout=0)[0])}))
"""


def test_a_probe_is_answered_while_a_step_blocks_the_worker(ray_env, dataset, tmp_path):
    """The driver's probe runs in the actor's control concurrency group: a rank busy in a step (here
    a 30 s sleep inside it, as a collective stuck on a peer would be) still answers, so only a
    process that is stopped or gone goes unanswered."""
    rd = make_run(
        tmp_path, dataset, "probe", workers={"num_workers": 1},
        faults=[{"kind": "slow_worker", "at_step": 1, "rank": 0, "seconds": 30}],
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(rd.path)],
        env=ray_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["probe"]["in_step"] == 1 and out["probe"]["step"] == 0 and not out["step_done"]
