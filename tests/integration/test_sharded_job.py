"""The pretraining job under FSDP2 (zero_stage 1-3, HSDP) with sharded DCP checkpoints, on real Ray.

Tiny preset, CPU workers over gloo, seq_len 64, global batch 8.

Parity: every layout trains on the same samples (each rank takes its contiguous share of the
fixed global batch) from the same initial weights (drawn per parameter from the seed), so
zero_stage 0/2/3 on 2 workers and HSDP 2x1 end within LOSS_TOL of a single-process run at
step 50. Not bit-equal: the gradient mean is summed in a different order (one process's full
backward vs two half-batch backwards plus an all-reduce or reduce-scatter), a ~1e-7 relative
difference per step that Adam carries along; 50 steps leave it orders of magnitude under
LOSS_TOL, while a wrong shard, a missed reduction or a different sample is off by far more.

Resharding: a checkpoint written by 2 ranks resumes on 1 and a checkpoint of that 1-rank run
resumes on 2 (the committed checkpoint is handed to a run with another num_workers, as a later
attempt with fewer or more workers sees it), ending within LOSS_TOL of the uninterrupted run.
Same world, same checkpoint: a resume or an in-place reload is exact, and so is an HSDP
replacement that gets its shards from a replica's memory.

Elastic world: on a raylet of its own with one of its 2 CPUs held, an attempt resumes a 2-rank
checkpoint on 1 worker and grows back to 2 once the CPU is released, within LOSS_TOL.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from controlplane import checkpoint as ckpt
from controlplane import ray_cluster
from controlplane.spec import ClusterSpec, StorageSpec
from tests.integration import test_pretrain_job as pj
from tests.integration.conftest import wait_for
from tests.integration.test_pretrain_job import SYNC_CHECKPOINTS, by_type, make_run, run_job

pytestmark = [pytest.mark.integration, pytest.mark.training]
ray_env, dataset = pj.ray_env, pj.dataset  # the same module-scoped fixtures
STEPS = 50
LOSS_TOL = 2e-3


def spec(stage: int, workers: int = 2, replicate: int = 1, **overrides) -> dict:
    return {
        "train": {"max_steps": STEPS, "seq_len": 64, "global_batch_size": 8, "schedule": {"warmup_steps": 5}},
        "workers": {"num_workers": workers},
        "parallelism": {"zero_stage": stage, "replicate": replicate},
        **overrides,
    }


def loss_at(rd, step: int) -> float:
    return [e for e in by_type(rd, "step") if e["step"] == step][-1]["loss"]


def ran(root, dataset, env, name: str, attempt: int = 1, **kw):
    rd = make_run(root, dataset, name, **spec(**kw))
    proc = run_job(rd, attempt, env)
    return rd, proc


@pytest.fixture(scope="module")
def reference(ray_env, dataset, tmp_path_factory):
    rd, proc = ran(tmp_path_factory.mktemp("ref"), dataset, ray_env, "ref", stage=0, workers=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rd


@pytest.fixture(scope="module")
def zero3(ray_env, dataset, tmp_path_factory):
    rd, proc = ran(tmp_path_factory.mktemp("z3"), dataset, ray_env, "z3", stage=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rd


@pytest.fixture(scope="module")
def hsdp(ray_env, dataset, tmp_path_factory):
    rd, proc = ran(tmp_path_factory.mktemp("hsdp"), dataset, ray_env, "hsdp", stage=1, replicate=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rd


@pytest.mark.parametrize("stage", [0, 2, "hsdp-2x1"], ids=["zero0", "zero2", "hsdp-2x1"])
def test_layouts_reach_the_single_process_loss(reference, ray_env, dataset, tmp_path, stage, request):
    if stage == "hsdp-2x1":
        rd = request.getfixturevalue("hsdp")
    else:
        rd, proc = ran(tmp_path, dataset, ray_env, f"z{stage}", stage=stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert loss_at(rd, STEPS) == pytest.approx(loss_at(reference, STEPS), abs=LOSS_TOL)
    assert loss_at(rd, STEPS) < loss_at(rd, 1) - 0.3  # it learns


def test_hsdp_replacement_gets_its_shards_from_a_replica(hsdp, ray_env, dataset, tmp_path):
    """HSDP 2x1: the killed rank's shards are held by the rank at its mesh position in the other
    replica group; the replacement gets them from there (no checkpoint read) and the run goes on
    from the step it was in, ending at the uninterrupted run's loss exactly."""
    rd, proc = ran(
        tmp_path, dataset, ray_env, "hsdp-kill", stage=1, replicate=2,
        faults=[{"kind": "kill_worker", "at_step": 35, "rank": 1}],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(by_type(rd, "start")) == 1 and not by_type(rd, "reloaded")
    (restored,) = by_type(rd, "replica_restored")
    assert restored["step"] == 34 and restored["sources"] == {"1": 0}
    (rep,) = by_type(rd, "worker_replaced")
    assert rep["rank"] == 1 and rep["cause"] == "worker_died"
    assert [e["step"] for e in by_type(rd, "step")] == list(range(1, STEPS + 1))
    assert loss_at(rd, STEPS) == loss_at(hsdp, STEPS)


def test_zero3_matches_and_writes_verified_shards(reference, zero3):
    assert loss_at(zero3, STEPS) == pytest.approx(loss_at(reference, STEPS), abs=LOSS_TOL)
    cps = by_type(zero3, "checkpoint")
    assert [c["step"] for c in cps] == [10, 20, 30, 40, 50] and all(c["shards"] == 2 and c["async"] for c in cps)
    info = ckpt.verify(zero3.checkpoints / ckpt.step_dirname(STEPS))
    files = set(info.manifest["files"])
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.json", "rng.pt"} <= files


def test_killed_worker_reloads_in_place_and_matches(zero3, ray_env, dataset, tmp_path):
    rd, proc = ran(
        tmp_path, dataset, ray_env, "z3-kill", stage=3,
        faults=[{"kind": "kill_worker", "at_step": 35, "rank": 1}],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(by_type(rd, "start")) == 1  # inside the attempt
    (reload,) = by_type(rd, "reloaded")
    assert reload["step"] == 30
    (rep,) = by_type(rd, "worker_replaced")
    assert rep["rank"] == 1 and rep["cause"] == "worker_died"
    assert loss_at(rd, STEPS) == loss_at(zero3, STEPS)


def test_corrupt_shard_skips_that_checkpoint(zero3, ray_env, dataset, tmp_path):
    rd, proc = ran(
        tmp_path, dataset, ray_env, "z3-corrupt", stage=3, checkpoint=SYNC_CHECKPOINTS,
        faults=[{"kind": "exit_driver", "at_step": 40, "attempt": 1}],
    )  # fmt: skip
    assert proc.returncode == 1
    assert ckpt.committed_steps(rd.checkpoints) == [10, 20, 30]  # the driver died before saving 40
    shard = rd.checkpoints / ckpt.step_dirname(30) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    rd.set_fence(2)
    proc = run_job(rd, 2, ray_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = by_type(rd, "start")[-1]
    assert start["resume_step"] == 20 and [s for s, _ in start["skipped_checkpoints"]] == [30]
    assert loss_at(rd, STEPS) == loss_at(zero3, STEPS)


def test_checkpoint_reshards_from_2_to_1_and_back_to_2(zero3, ray_env, dataset, tmp_path):
    one = make_run(
        tmp_path / "one", dataset, "one",
        **spec(3, workers=1, checkpoint=SYNC_CHECKPOINTS, faults=[{"kind": "exit_driver", "at_step": 40, "attempt": 1}]),
    )  # fmt: skip
    src = sorted(p for p in zero3.checkpoints.iterdir() if p.name == ckpt.step_dirname(20))[0]
    shutil.copytree(src, one.checkpoints / src.name)
    proc = run_job(one, 1, ray_env)
    assert proc.returncode == 1  # the drill
    assert by_type(one, "start")[0]["resume_step"] == 20 and by_type(one, "start")[0]["world_size"] == 1
    two = make_run(tmp_path / "two", dataset, "two", **spec(3, workers=2))
    shutil.copytree(one.checkpoints / ckpt.step_dirname(30), two.checkpoints / ckpt.step_dirname(30))
    proc = run_job(two, 1, ray_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert by_type(two, "start")[0]["resume_step"] == 30
    assert loss_at(two, STEPS) == pytest.approx(loss_at(zero3, STEPS), abs=LOSS_TOL)


def test_a_shard_write_failing_with_enospc_commits_nothing(ray_env, dataset, tmp_path):
    rd, proc = ran(
        tmp_path, dataset, ray_env, "z3-enospc", stage=3,
        checkpoint={"interval_steps": 20, "async_save": False},
        faults=[{"kind": "checkpoint_enospc", "at_step": 20, "rank": 1}],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (failed,) = by_type(rd, "checkpoint_failed")
    assert failed["step"] == 20 and "rank 1" in failed["error"] and "No space left on device" in failed["error"]
    assert ckpt.committed_steps(rd.checkpoints) == [40, 50]
    assert not [p for p in rd.checkpoints.iterdir() if p.name.startswith(".staging")]


HOLD = """
import sys, ray
ray.init()
hold = ray.remote(num_cpus=1, resources={sys.argv[1]: 0.01})(type("Hold", (), {"ping": lambda self: 1})).remote()
ray.get(hold.ping.remote(), timeout=120)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def two_places(ray_home):
    """A raylet of its own with 2 CPUs, the only node the job may use (the others are excluded);
    SIGKILLed afterwards, as a node failure."""
    cluster = ClusterSpec(storage=StorageSpec(root=str(ray_home)))
    alive = lambda: {n["node_id"] for n in ray_cluster.status(cluster)["nodes"] if n["state"] == "ALIVE"}  # noqa: E731
    others = alive()
    ray_cluster.add_worker_node(cluster, num_cpus=2)
    index = len(ray_cluster.read_state(cluster).nodes) - 1
    try:
        yield f"llmctl_node_{index}", sorted(others)
    finally:
        ray_cluster.kill_node(cluster, index)


def test_a_world_shrinks_to_the_places_left_and_grows_back(zero3, ray_env, dataset, tmp_path, two_places):
    """An attempt resumes a checkpoint of 2 ranks where one of its node's 2 CPUs is held by another
    actor: it runs on 1 worker (micro-batch 2: accumulation 4 instead of 2, same global batch),
    and once the CPU is released it grows back to 2 at a checkpoint, resharding 2 -> 1 -> 2."""
    resource, others = two_places
    env = {**ray_env, "LLMCTL_EXCLUDE_NODES": ",".join(others)}
    overrides = spec(3)
    overrides["train"]["micro_batch_size"] = 2
    overrides["workers"].update(min_workers=1, elastic_wait_s=5)
    rd = make_run(
        tmp_path, dataset, "elastic", **overrides,
        checkpoint={"interval_steps": 5, "keep_last": 3},
        # time for the released CPU's new worker process to start (import torch) before step 45
        faults=[{"kind": "slow_worker", "at_step": 21, "rank": 0, "seconds": 1.0}],
    )  # fmt: skip
    shutil.copytree(zero3.checkpoints / ckpt.step_dirname(20), rd.checkpoints / ckpt.step_dirname(20))
    hold = subprocess.Popen([sys.executable, "-c", HOLD, resource], env=ray_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert hold.stdout.readline().strip() == "held"
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.pretrain", "--run-dir", str(rd.path), "--attempt", "1"],
            env=env, cwd=pj.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(lambda: by_type(rd, "world_resized"), 180, "the world to shrink")
        finally:
            hold.kill()
            hold.wait(timeout=30)
        _, err = job.communicate(timeout=pj.JOB_TIMEOUT_S)
    finally:
        if hold.poll() is None:
            hold.kill()
    assert job.returncode == 0, err[-3000:]
    shrunk, grown = by_type(rd, "world_resized")
    assert shrunk["world_size"] == 1 and shrunk["accumulation"] == 4 and "1 of 2 workers placed" in shrunk["reason"]
    start = by_type(rd, "start")[0]
    assert start["resume_step"] == 20 and start["world_size"] == 1
    assert grown["world_size"] == 2 and grown["accumulation"] == 2 and grown["step"] in range(25, 50, 5)
    shards = {c["step"]: c["shards"] for c in by_type(rd, "checkpoint")}
    assert shards[25] == 1 and shards[50] == 2  # written by the world of the time
    assert [e["step"] for e in by_type(rd, "step")] == list(range(21, STEPS + 1))
    assert loss_at(rd, STEPS) == pytest.approx(loss_at(zero3, STEPS), abs=LOSS_TOL)
