"""`run submit` against a cluster that is not up, `cluster down` while runs are live, and the
driver and worker logs kept in the run directory (`jobs/pretrain/logs.py`, `run logs`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.errors import UserError
from controlplane.runs import start_run
from controlplane.spec import RunSpec
from controlplane.states import AttemptState, RunState
from controlplane.supervisor.loop import Supervisor
from tests.unit.supervisor_harness import ROOT, ProcessJobs, make_run

runner = CliRunner()


def one_line_error(res) -> str:
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


# --------------------------------------------------------------------------- submit with the cluster down


def test_run_submit_with_the_cluster_down_leaves_nothing_behind(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\n")
    line = one_line_error(runner.invoke(app, ["run", "submit", str(spec)]))
    assert "the local Ray cluster is not up" in line and "llmctl cluster up" in line
    ctx = Context.load()
    assert ctx.ledger.list_runs() == []
    assert not list((ctx.storage / "runs").glob("*")) if (ctx.storage / "runs").exists() else True
    assert runner.invoke(app, ["supervise", "--once"]).exit_code == 0
    assert ctx.ledger.list_runs() == []


def test_a_first_submission_refused_for_good_leaves_a_failed_run_no_supervisor_starts(tmp_path):
    ctx = Context.load()
    make_run(ctx.ledger, ctx.storage, "refused", RunSpec.model_validate({"name": "r"}), {"steps": 4})
    with pytest.raises(UserError, match="not up"):
        start_run(ctx, "refused")  # the cluster went down between the check and the submission
    run = ctx.ledger.get_run("refused")
    assert run["state"] == RunState.FAILED and run["cause"].startswith("not submitted: the local Ray cluster")
    assert ctx.ledger.attempts("refused")[0]["state"] == AttemptState.FAILED
    jobs = ProcessJobs(tmp_path / "jobs")
    sup = Supervisor(ctx, jobs)
    try:
        sup.tick()
    finally:
        sup.close()
    assert jobs.submissions() == []


# --------------------------------------------------------------------------- cluster down while runs are live


def live_run(ctx: Context, run_id: str) -> None:
    make_run(ctx.ledger, ctx.storage, run_id, RunSpec.model_validate({"name": "r"}), {"steps": 4})
    ctx.ledger.transition(run_id, RunState.PROVISIONING, "submitted", 1)
    n = ctx.ledger.next_attempt(run_id, None, {})
    ctx.ledger.update_attempt(run_id, n, job_id=f"{run_id}-a{n}", state=AttemptState.RUNNING)


def test_cluster_down_refuses_while_runs_are_live_unless_forced():
    ctx = Context.load()
    live_run(ctx, "busy-1")
    line = one_line_error(runner.invoke(app, ["cluster", "down"]))
    assert "busy-1" in line and "--force" in line and "llmctl run stop" in line
    forced = runner.invoke(app, ["cluster", "down", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "no local Ray cluster was running" in forced.output


# --------------------------------------------------------------------------- logs


CHILD = textwrap.dedent(
    """
    import os, sys
    from jobs.pretrain.logs import capture
    capture(sys.argv[1], 3, "driver")
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    os.system("echo from a child process")
    if sys.argv[2] == "raise":
        raise RuntimeError("the reason it crashed")
    print("unflushed line", end="")
    os._exit(1)
    """
)


@pytest.mark.parametrize("how", ["raise", "os_exit"])
def test_capture_keeps_stdout_stderr_and_the_crash_in_the_run_dir(tmp_path, how):
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(run_dir), how],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    log = run_dir / "logs" / "attempt-3" / "driver.log"
    deadline = 50
    while deadline and ("to stderr" not in (log.read_text() if log.exists() else "")):
        deadline -= 1
        subprocess.run(["sleep", "0.1"])
    text = log.read_text()
    assert "to stdout" in text and "to stderr" in text and "from a child process" in text
    if how == "raise":
        assert "RuntimeError: the reason it crashed" in text and "Traceback" in text
    # the process's own stdout (what Ray's job log reads) still gets every line
    assert "to stdout" in res.stdout and "to stderr" in res.stdout


def test_run_logs_reads_the_run_directory_by_rank_and_says_when_there_are_none():
    ctx = Context.load()
    rd = make_run(ctx.ledger, ctx.storage, "logged", RunSpec.model_validate({"name": "r"}), {"steps": 4})
    ctx.ledger.transition("logged", RunState.PROVISIONING, "submitted", 1)
    ctx.ledger.next_attempt("logged", None, {})
    ctx.ledger.update_attempt("logged", 1, job_id="logged-a1")
    rd.append_event("start", 1, resume_step=0, workers=[{"rank": 0, "pid": 11}, {"rank": 1, "pid": 22}])
    d = rd.logs / "attempt-1"
    d.mkdir(parents=True)
    (d / "driver.log").write_text("driver says hi\n")
    (d / "worker-22.log").write_text("rank one output\n")
    (d / "worker-11.log").write_text("rank zero output\n")
    res = runner.invoke(app, ["run", "logs", "logged"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert out.index("==> driver") < out.index("==> rank 0") < out.index("==> rank 1")
    assert "rank zero output" in out and "driver says hi" in out
    # attempt 2 kept nothing and the cluster is gone: one line, no traceback
    ctx.ledger.next_attempt("logged", None, {})
    ctx.ledger.update_attempt("logged", 2, job_id="logged-a2")
    line = one_line_error(runner.invoke(app, ["run", "logs", "logged"]))
    assert "attempt 2 kept no logs" in line and str(Path(rd.logs)) in line
