"""An excluded node gets no workers: the supervisor hands the attempt its exclusions and the
job keeps every worker, warm spare and replacement off them (Ray label selector on the node id).

The head is excluded here: it is the node Ray prefers for the job's actors (the driver runs
there and the default policy packs the local node first), so without the exclusion the
workers would land on it.
"""

from __future__ import annotations

import pytest

from controlplane import ray_cluster
from controlplane.context import Context
from controlplane.runs import create_run, start_run
from controlplane.spec import RunSpec
from controlplane.supervisor import store
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def spare_node(cluster_home):
    """A raylet of its own with room for 2 workers and a spare (earlier tests may have killed
    the session's second node); SIGKILLed afterwards, as a node failure."""
    ctx = Context.load()
    ray_cluster.add_worker_node(ctx.cluster, num_cpus=3)
    index = len(ray_cluster.read_state(ctx.cluster).nodes) - 1
    yield
    ray_cluster.kill_node(ctx.cluster, index)


def test_workers_stay_off_an_excluded_node(cluster_home, dataset_dir, spare_node):
    ctx = Context.load()
    nodes = ray_cluster.status(ctx.cluster)["nodes"]
    head = next(n["node_id"] for n in nodes if n["is_head"])
    spec = {
        "name": "exclude-head",
        "model": {"preset": "tiny"},
        "train": {"max_steps": 16, "global_batch_size": 8, "seq_len": 64, "schedule": {"warmup_steps": 2}},
        "workers": {"num_workers": 2, "spare_workers": 1},
        "checkpoint": {"interval_steps": 8, "keep_last": 2},
        # a replacement (from the spare) and a new spare are placed mid-run as well
        "faults": [{"kind": "kill_worker", "at_step": 6, "rank": 1, "attempt": 1}],
        "seed": 3,
    }
    assert store.exclude_node(ctx.ledger, head, "test: keep workers off the head")
    try:
        rd = create_run(ctx, RunSpec.model_validate(spec))
        start_run(ctx, rd.run_id)  # one supervisor pass: attempt 1 with the exclusions
        wait_for(lambda: rd.events({"end"}), 240, "the run to end")
    finally:
        store.readmit_node(ctx.ledger, head)
    assert rd.events({"end"})[-1]["status"] == "succeeded"
    start = rd.events({"start"})[0]
    assert start["excluded_nodes"] == [head] and start["excluded_ray_nodes"] == [head]
    assert rd.events({"worker_replaced"}), "the drill should have replaced rank 1"
    placed = {w["node_id"] for w in start["workers"]} | {e.get("node_id") for e in rd.events({"heartbeat"})}
    assert placed and head not in placed, placed
