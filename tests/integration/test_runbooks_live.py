"""The TrainingHang runbook, run: its `llmctl` commands, in its order, against the session's
real Ray cluster and a real tiny run (examples/run-tiny.yaml, as a user submits it), each through
the real CLI.

RUN_ID is the submitted run; NODE is a live node that `llmctl node list` shows. What each
command must do: `supervise status` names the supervisor `run submit` started and the run it
guards; `supervise --detach` is refused while that one runs (the runbook says: if it is not
running); `node exclude NODE` keeps the node out (readmitted after, the session shares the
cluster); `run stop` is left for last, and the stopped run stays stopped with an `end` event.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.observability import runbooks as rb
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Said:
    returncode: int
    stdout: str
    stderr: str


def llmctl(*args: str) -> Said:
    """The real CLI, in this process (a process each costs seconds on a loaded machine): the
    commands that start something (`run submit`'s supervisor) start real processes."""
    res = CliRunner().invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Said(res.exit_code, res.stdout, res.stderr)


def in_document_order(text: str) -> list[str]:
    commands = rb.llmctl_commands(text)
    return sorted(dict.fromkeys(commands), key=lambda c: text.find(c))


def test_training_hang_runbook_runs_against_a_live_run(cluster_home, dataset_dir):
    before = json.loads(llmctl("supervise", "status", "--json").stdout)
    sub = llmctl("run", "submit", str(REPO / "examples" / "run-tiny.yaml"), "--json")
    assert sub.returncode == 0, sub.stderr
    run_id = json.loads(sub.stdout)["run_id"]
    supervisor = json.loads(sub.stdout)["supervisor_pid"]
    node = None
    try:
        rd = Path(cluster_home) / "runs" / run_id
        events = rd / "events.jsonl"
        wait_for(lambda: events.exists() and '"type":"step"' in events.read_text(errors="replace"), 150, "a step")
        nodes = json.loads(llmctl("node", "list", "--json").stdout)
        alive = [n for n in nodes if n["ray_state"] == "ALIVE"]
        assert alive and sum(n["head"] for n in alive) == 1, nodes
        # the head: an extra raylet may die under the load of the other test stream while this
        # runs (Ray then excludes it with its own reason, and the runbook's exclusion finds it done)
        node = next(n["node"] for n in alive if n["head"])

        commands = in_document_order(rb.read_runbook("TrainingHang"))
        assert any(c.startswith("llmctl supervise status") for c in commands)
        stop = [c for c in commands if c.startswith("llmctl run stop")]
        for command in [c for c in commands if c not in stop] + stop:
            argv = shlex.split(command.replace("RUN_ID", run_id).replace("NODE", node))[1:]
            res = llmctl(*argv)
            said = res.stdout + res.stderr
            if argv[:2] == ["supervise", "--detach"]:
                assert res.returncode == 2 and "another supervisor" in said, said
                continue
            assert res.returncode == 0, f"`{command}`: exit {res.returncode}: {said[-1500:]}"
            assert said.strip(), f"`{command}` said nothing"
            if argv[:2] == ["supervise", "status"]:
                assert re.search(rf"running, pid {supervisor}\b", said) and run_id in said, said
            if argv[:2] == ["node", "exclude"]:
                row = next(n for n in json.loads(llmctl("node", "list", "--json").stdout) if n["node"] == node)
                assert row["excluded"] and "hang" in row["reason"], row
            if argv[:2] == ["run", "stop"]:
                assert f"run {run_id} stopped" in said
        status = json.loads(llmctl("run", "status", run_id, "--json").stdout)
        assert status["state"] == "stopped"
        time.sleep(2 * 2.0)  # two supervisor passes: a stopped run is not resubmitted
        status = json.loads(llmctl("run", "status", run_id, "--json").stdout)
        assert status["state"] == "stopped" and len(status["attempts"]) == 1
        ends = [json.loads(x) for x in (rd / "events.jsonl").read_text().splitlines() if '"type":"end"' in x]
        assert ends and ends[-1]["status"] == "stopped"
    finally:
        if node is not None:
            llmctl("node", "readmit", node)
        llmctl("run", "stop", run_id)
        if not before["running"] and supervisor:  # the supervisor `run submit` started: SIGTERM, as a user would
            os.kill(supervisor, signal.SIGTERM)
            wait_for(lambda: not json.loads(llmctl("supervise", "status", "--json").stdout)["running"], 30, "it ends")
            assert not (Path(cluster_home) / "supervisor.pid").exists()
