"""The quickstart's serving leg end to end on a real (local) Ray Serve."""

from __future__ import annotations

import pytest
from serving_factory import make_run

from controlplane.context import Context
from controlplane.rollout import store
from controlplane.rollout.quickstart import serve_and_sample

pytestmark = pytest.mark.integration


def test_serve_and_sample_returns_completions_and_tears_down():
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
