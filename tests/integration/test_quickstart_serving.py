"""The quickstart's serving leg end to end on a real (local) Ray Serve."""

from __future__ import annotations

import pytest

from controlplane.context import Context
from controlplane.rollout import store
from controlplane.rollout.quickstart import serve_and_sample
from tests.serving_factory import make_run

pytestmark = pytest.mark.integration


def test_serve_and_sample_on_a_private_ray():
    import ray

    ctx = Context.load()
    make_run(ctx, "qs", steps=(10,))
    report: dict = {}
    texts = serve_and_sample(ctx, "qs", ["日本の首都は", "富士山は"], max_tokens=6, report=report)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert "jcommonsenseqa_accuracy" in report["scores"] and "heldout_perplexity" in report["scores"]
    assert store.get_rollout(ctx.ledger, report["rollout_id"])["state"] == "promoted"
    assert store.get_service(ctx.ledger, "quickstart") is None
    assert not ray.is_initialized()


def test_serve_and_sample_on_the_project_local_cluster(cluster_home):
    """Through `llmctl cluster up`'s cluster: token auth on, replicas in `ray start` processes."""
    import ray

    from controlplane import ray_cluster

    ctx = Context.load()
    assert ray_cluster.status(ctx.cluster)["up"]
    make_run(ctx, "qs-local", steps=(10,))
    report: dict = {}
    texts = serve_and_sample(ctx, "qs-local", ["春には"], max_tokens=4, eval_limit=2, report=report)
    assert len(texts) == 1 and report["endpoint"].startswith("http://127.0.0.1:")
    assert store.get_service(ctx.ledger, "quickstart") is None
    assert not ray.is_initialized()  # the control plane ran no Ray driver of its own
    assert ray_cluster.status(ctx.cluster)["up"]
