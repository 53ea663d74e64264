"""`llmctl rollout` and `llmctl eval` commands over the ledger; operator requests."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.rollout import store
from controlplane.rollout.controller import RolloutController
from controlplane.rollout.k8s_backend import KubernetesBackend
from controlplane.spec import RolloutSpec
from tests.k8s_fake import FakeCluster
from tests.serving_factory import make_run

runner = CliRunner()


def _controller(ctx, fake, hook=None):
    backend = KubernetesBackend(
        fake.apps, fake.core, "ns", fake, storage_root=ctx.storage, sleep=fake.advance, clock=fake.clock
    )

    def sleep(dt):
        fake.advance(dt)
        if hook:
            hook()

    return RolloutController(ctx, backend, poll_s=1.0, clock=fake.clock, sleep=sleep)


def _spec(model):
    return RolloutSpec(name="chat", backend="kubernetes", model=model, analysis_window_s=30, min_requests=20)


def test_start_rejects_bad_specs_in_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: chat\nmodel: x\ntraffic_steps: [50, 10]\n")
    r = runner.invoke(app, ["rollout", "start", str(bad)])
    assert r.exit_code == 2 and "traffic_steps must be strictly ascending" in r.output
    good = tmp_path / "g.yaml"
    good.write_text("name: chat\nmodel: x\n")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    r = runner.invoke(app, ["rollout", "start", str(good)])
    assert r.exit_code == 2 and "not connected to a Ray cluster" in r.output


def test_operator_abort_and_promote(monkeypatch):
    monkeypatch.setenv("LLMCTL_SERVE_TOKEN", "t")
    ctx = Context.load()
    make_run(ctx, "op", steps=(10, 20, 30))
    fake = FakeCluster(nodes=4)
    _controller(ctx, fake).start(_spec("op@10"))

    def abort_when_canary():
        row = store.list_rollouts(ctx.ledger, "chat", 1)[0]
        if row["state"] == "canary" and not row["request"]:
            r = runner.invoke(app, ["rollout", "abort", "chat"])
            assert r.exit_code == 0, r.output

    row = _controller(ctx, fake, abort_when_canary).start(_spec("op@20"))
    assert row["state"] == "aborted" and store.get_service(ctx.ledger, "chat")["stable_version"] == "op-s10"

    def promote_when_canary():
        row = store.list_rollouts(ctx.ledger, "chat", 1)[0]
        if row["state"] == "canary" and not row["request"]:
            assert runner.invoke(app, ["rollout", "promote", row["rollout_id"]]).exit_code == 0

    row = _controller(ctx, fake, promote_when_canary).start(_spec("op@30"))
    assert row["state"] == "promoted" and row["reason"] == "promoted by operator"
    assert store.get_service(ctx.ledger, "chat")["stable_version"] == "op-s30"

    r = runner.invoke(app, ["rollout", "abort", row["rollout_id"]])
    assert r.exit_code == 2 and "already ended" in r.output
    r = runner.invoke(app, ["rollout", "history", "chat", "--json"])
    states = [x["state"] for x in json.loads(r.stdout)]
    assert states == ["promoted", "aborted", "promoted"]
    r = runner.invoke(app, ["rollout", "status", "chat", "--json"])
    data = json.loads(r.stdout)
    assert data["rollout"]["candidate_version"] == "op-s30" and data["decisions"][-1]["action"] == "promote"
    r = runner.invoke(app, ["rollout", "status", "chat"])
    assert r.exit_code == 0 and "promoted by operator" in r.output
    r = runner.invoke(app, ["rollout", "status", "nope"])
    assert r.exit_code == 2 and "no such rollout" in r.output


def test_ray_address_is_never_guessed(monkeypatch):
    import pytest

    from controlplane.errors import UserError
    from controlplane.rollout.ray_backend import resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Context.load().cluster
    with pytest.raises(UserError, match="not connected to a Ray cluster"):
        resolve_address(cluster)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(cluster) == ("10.0.0.5:6379", {})
    assert resolve_address(cluster, "1.2.3.4:6379") == ("1.2.3.4:6379", {})
