"""What the CLI prints for people and for scripts: ids whole, no `None`s, no ETA on an ended
run, `--json` on `run events` and `run logs`, an `end` event for a stopped run, one line per
power message, `cluster status` of a down cluster as an answer."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.planning.plot import _duration
from controlplane.rundir import RunDir
from controlplane.runs import stop_run
from controlplane.spec import RunSpec, dump_spec
from controlplane.states import RunState

runner = CliRunner()
LONG_ID = "a-rather-long-run-name-for-the-table-1202-142410-1ddf-and-more-words"


def make_run(ctx: Context, run_id: str = "out-run", steps: int = 3) -> RunDir:
    rd = RunDir.of(ctx.storage, run_id).create()
    ctx.ledger.create_run(run_id, "out", dump_spec(RunSpec()), {}, str(rd.path))
    ctx.ledger.next_attempt(run_id, None)
    ctx.ledger.transition(run_id, RunState.PROVISIONING, "submitted", 1)
    rd.append_event("start", 1, resume_step=0)
    for s in range(1, steps + 1):
        rd.append_event("step", 1, step=s, loss=5.0 - s * 0.1, tokens=100 * s, tokens_per_s=50.0, step_time_s=0.5)
    return rd


def test_run_list_keeps_a_long_run_id_whole():
    make_run(Context.load(), LONG_ID)
    res = runner.invoke(app, ["run", "list"])
    assert res.exit_code == 0 and LONG_ID in res.output, res.output


def test_a_stopped_run_gets_an_end_event_and_no_eta_nor_none():
    ctx = Context.load()
    rd = make_run(ctx)
    assert stop_run(ctx, "out-run")
    ends = rd.events({"end"})
    assert len(ends) == 1 and ends[0]["status"] == "stopped" and ends[0]["attempt"] == 1 and ends[0]["step"] == 3
    assert not stop_run(ctx, "out-run") and len(rd.events({"end"})) == 1  # idempotent
    res = runner.invoke(app, ["run", "status", "out-run"])
    assert res.exit_code == 0, res.output
    assert "eta" not in res.output and "None" not in res.output
    assert "checkpoints 0 " in res.output
    data = json.loads(runner.invoke(app, ["run", "status", "out-run", "--json"]).output)
    assert data["progress"]["eta_s"] is None


def test_run_events_and_logs_take_json():
    ctx = Context.load()
    rd = make_run(ctx)
    res = runner.invoke(app, ["run", "events", "out-", "--json", "--type", "step"])
    assert res.exit_code == 0, res.output
    events = json.loads(res.output)
    assert [e["step"] for e in events] == [1, 2, 3]
    logs = rd.logs / "attempt-1"
    logs.mkdir(parents=True)
    (logs / "driver.log").write_text("driver says hello\n")
    res = runner.invoke(app, ["run", "logs", "out-run", "--json"])
    assert res.exit_code == 0, res.output
    body = json.loads(res.output)
    assert body["attempt"] == 1 and body["files"][0]["title"] == "driver"
    assert body["files"][0]["text"] == "driver says hello\n"


def test_run_energy_says_each_power_message_once():
    ctx = Context.load()
    rd = make_run(ctx)
    power = rd.path / "telemetry" / "power"
    power.mkdir(parents=True)
    for i in range(3):
        rec = {"attempt": 1, "node": f"n{i}", "status": "unchanged", "message": "power: limits left as they are"}
        (power / f"w{i}.json").write_text(json.dumps(rec))
    res = runner.invoke(app, ["run", "energy", "out-run"])
    assert res.exit_code == 0, res.output
    assert res.output.count("limits left as they are") == 1
    assert "(3 workers/attempts)" in res.output


def test_cluster_status_of_a_down_cluster_is_an_answer():
    res = runner.invoke(app, ["cluster", "status"])
    assert res.exit_code == 0, res.output
    assert "down" in res.output


def test_the_simulate_plot_says_seconds_for_a_short_restart():
    assert _duration(10) == "10 s" and _duration(600) == "10 min"
