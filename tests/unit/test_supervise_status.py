"""`llmctl supervise status`: pid, since when, runs guarded, last pass; a stopped supervisor
leaves no pid behind (SIGTERM), and one killed outright is found out by its free lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.states import RunState
from controlplane.supervisor.status import status_file

runner = CliRunner()


def _status() -> dict:
    res = runner.invoke(app, ["supervise", "status", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _start_supervisor() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane", "supervise", "--interval", "0.2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def test_status_of_a_running_supervisor_then_of_one_stopped_by_sigterm():
    ctx = Context.load()
    ctx.ledger.create_run("guarded-run", "g", {"train": {"max_steps": 5}}, {}, str(ctx.storage / "runs" / "g"))
    ctx.ledger.create_run("ended-run", "e", {"train": {"max_steps": 5}}, {}, str(ctx.storage / "runs" / "e"))
    ctx.ledger.transition("ended-run", RunState.STOPPED, "stopped by user", None)
    assert _status()["running"] is False
    proc = _start_supervisor()
    try:
        st = _wait(lambda: (s := _status()).get("passes", 0) >= 2 and s, 60, "two supervisor passes")
        assert st["running"] and st["pid"] == proc.pid
        assert st["runs"] == ["guarded-run"]  # live runs only
        assert st["started_at"] <= st["last_pass_at"] <= time.time()
        text = runner.invoke(app, ["supervise", "status"]).output
        assert f"pid {proc.pid}" in text and "guarded-run" in text and "last pass" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert not (ctx.storage / "supervisor.pid").exists() and not status_file(ctx.storage).exists()
    st = _status()
    assert st == {"running": False, "pid": None, "stale_cleaned": False}
    assert "not running" in runner.invoke(app, ["supervise", "status"]).output


def test_files_of_a_killed_supervisor_are_found_stale_and_removed():
    ctx = Context.load()
    proc = _start_supervisor()
    try:
        _wait(lambda: _status().get("passes", 0) >= 1, 60, "a supervisor pass")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert (ctx.storage / "supervisor.pid").read_text().strip() == str(proc.pid)  # what SIGKILL leaves
    st = _status()
    assert st["running"] is False and st["stale_cleaned"] is True
    assert not (ctx.storage / "supervisor.pid").exists() and not status_file(ctx.storage).exists()
