"""`llmctl supervise`, `llmctl node ...`, `llmctl run goodput` and the supervisor's metrics."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.rundir import RunDir
from controlplane.states import AttemptState, RunState
from controlplane.supervisor import store
from controlplane.supervisor.metrics import SupervisorCollector, serve
from controlplane.supervisor.ports import SupervisorLock

runner = CliRunner()


def recorded_run(ctx: Context, run_id: str = "gp-run") -> RunDir:
    """A run that crashed once at step 15 and finished at step 20 after resuming from step 10."""
    rd = RunDir.of(ctx.storage, run_id).create()
    ctx.ledger.create_run(run_id, "gp", {"train": {"max_steps": 20}}, {}, str(rd.path))
    ctx.ledger.next_attempt(run_id, None)
    ctx.ledger.transition(run_id, RunState.PROVISIONING, "submitted", 1)
    t = time.time() - 100
    rd.append_event("start", 1, resume_step=0)
    for s in range(1, 16):
        rd.append_event("step", 1, step=s, step_time_s=1.0)
    ctx.ledger.update_attempt(run_id, 1, state=AttemptState.FAILED, cause="worker_died")
    ctx.ledger.next_attempt(run_id, 10)
    rd.append_event("start", 2, resume_step=10)
    for s in range(11, 21):
        rd.append_event("step", 2, step=s, step_time_s=1.0)
    ctx.ledger.update_attempt(run_id, 2, state=AttemptState.SUCCEEDED)
    ctx.ledger.transition(run_id, RunState.RUNNING, "started", 2)
    ctx.ledger.transition(run_id, RunState.SUCCEEDED, "done", 2)
    # spread the timeline out: events were written within milliseconds
    lines = [json.loads(x) for x in rd.events_file.read_text().splitlines()]
    for i, e in enumerate(lines):
        e["ts"] = t + 5 + i
    rd.events_file.write_text("".join(json.dumps(e) + "\n" for e in lines))
    ctx.ledger._conn.execute("UPDATE attempts SET started_at = ?, ended_at = ? WHERE attempt = 1", (t, t + 22))
    ctx.ledger._conn.execute("UPDATE attempts SET started_at = ?, ended_at = ? WHERE attempt = 2", (t + 22, t + 40))
    ctx.ledger._conn.execute("UPDATE transitions SET at = ? WHERE to_state = 'pending'", (t,))
    ctx.ledger._conn.execute("UPDATE transitions SET at = ? WHERE to_state = 'succeeded'", (t + 40,))
    return rd


def test_run_goodput_json_and_table():
    ctx = Context.load()
    recorded_run(ctx)
    res = runner.invoke(app, ["run", "goodput", "gp-run", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["wall_s"] == 40 and data["lost_steps"] == 5
    assert data["restarts_by_cause"] == {"worker_died": 1}
    assert 0 < data["ratio"] < 1 and abs(sum(data["seconds"].values()) - 40) < 1e-6
    table = runner.invoke(app, ["run", "goodput", "gp"])
    assert table.exit_code == 0 and "goodput" in table.output and "lost work" in table.output


def test_run_goodput_unknown_run_is_one_line_exit_2():
    res = runner.invoke(app, ["run", "goodput", "nope"])
    assert res.exit_code == 2 and "no such run" in res.output and "Traceback" not in res.output


def test_node_exclude_list_readmit():
    ctx = Context.load()
    health = ctx.storage / "telemetry" / "health"
    health.mkdir(parents=True)
    bad = {"node": "gpu-7", "healthy": False, "reasons": [{"kind": "ecc_uncorrectable", "gpu": 2, "ts": 1.0}]}
    (health / "gpu-7.json").write_text(json.dumps(bad))
    (health / "gpu-8.json").write_text(json.dumps({"node": "gpu-8", "healthy": True, "reasons": []}))
    (health / "junk.json").write_text("{not json")
    typo = runner.invoke(app, ["node", "exclude", "gpu-3", "--reason", "fan noise"])  # no node has had the name
    assert typo.exit_code == 2 and "no node of cluster" in typo.output and "--force" in typo.output
    assert len(typo.output.strip().splitlines()) == 1 and store.node_records(ctx.ledger) == []
    assert runner.invoke(app, ["node", "exclude", "gpu-3", "--reason", "fan noise", "--force"]).exit_code == 0
    again = runner.invoke(app, ["node", "exclude", "gpu-3", "--reason", "x"])  # known now: no --force needed
    assert again.exit_code == 0 and "already excluded (operator: fan noise)" in again.output
    assert runner.invoke(app, ["node", "exclude", "gpu-7", "--reason", "ecc"]).exit_code == 0  # a health report
    assert runner.invoke(app, ["node", "readmit", "gpu-7"]).exit_code == 0
    rows = {r["node"]: r for r in json.loads(runner.invoke(app, ["node", "list", "--json"]).stdout)}
    assert rows["gpu-3"]["excluded"] and rows["gpu-3"]["reason"] == "operator: fan noise"
    assert rows["gpu-7"]["healthy"] is False and rows["gpu-7"]["reasons"] == ["ecc_uncorrectable on gpu 2"]
    assert rows["gpu-8"]["healthy"] is True and not rows["gpu-8"]["excluded"]
    assert "gpu-3" in runner.invoke(app, ["node", "list"]).output
    assert runner.invoke(app, ["node", "readmit", "gpu-3"]).exit_code == 0
    assert store.excluded_nodes(ctx.ledger) == set()
    assert "was not excluded" in runner.invoke(app, ["node", "readmit", "gpu-3"]).output
    bad_input = runner.invoke(app, ["node", "exclude", "gpu-1", "--reason", " "])
    assert bad_input.exit_code == 2 and "must not be empty" in bad_input.output


def test_supervise_once_and_the_lock():
    ctx = Context.load()
    res = runner.invoke(app, ["supervise", "--once"])
    assert res.exit_code == 0, res.output
    lock = SupervisorLock(ctx.storage)
    lock.acquire()
    try:
        busy = runner.invoke(app, ["supervise", "--once"])
        assert busy.exit_code == 2 and "another supervisor" in busy.output
    finally:
        lock.release()


def test_metrics_collector_and_endpoint():
    ctx = Context.load()
    recorded_run(ctx)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(ctx))
    text = generate_latest(registry).decode()
    assert 'llmctl_train_goodput_ratio{cluster="local",run_id="gp-run"}' in text
    assert 'llmctl_train_restarts_total{cause="worker_died",cluster="local",run_id="gp-run"} 1.0' in text
    server = serve(ctx, 0)
    try:
        body = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).text
        assert "llmctl_train_goodput_ratio" in body
    finally:
        server.shutdown()


def test_live_goodput_is_recomputed_at_most_every_refresh_interval(monkeypatch):
    from controlplane.supervisor import metrics

    ctx = Context.load()
    rd = recorded_run(ctx)
    ctx.ledger._conn.execute("UPDATE runs SET state = 'running' WHERE run_id = 'gp-run'")
    passes = []
    real = metrics.run_goodput
    monkeypatch.setattr(metrics, "run_goodput", lambda *a, **k: passes.append(1) or real(*a, **k))
    collector = SupervisorCollector(ctx)
    run, t0 = ctx.ledger.get_run("gp-run"), time.time()
    first = collector._goodput(run, t0)
    rd.append_event("step", 2, step=21, step_time_s=1.0)  # the file grows every second in a live run
    assert collector._goodput(run, t0 + 15) is first and len(passes) == 1  # the next scrape: cached
    assert collector._goodput(run, t0 + metrics.LIVE_REFRESH_S + 1) is not first and len(passes) == 2
    ctx.ledger._conn.execute("UPDATE runs SET state = 'recovering' WHERE run_id = 'gp-run'")
    collector._goodput(ctx.ledger.get_run("gp-run"), t0 + metrics.LIVE_REFRESH_S + 2)  # a state change: at once
    assert len(passes) == 3
