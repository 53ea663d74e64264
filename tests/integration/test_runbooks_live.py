"""The runbooks, run: their `llmctl` commands, in their order, against the session's real Ray
cluster and a real tiny run (examples/run-tiny.yaml, as a user submits it), each through the
real CLI.

RUN_ID is the submitted run; NODE is a live node that `llmctl node list` shows.

- TrainingHang: `supervise status` names the supervisor `run submit` started and the run it
  guards; `supervise --detach` is refused while that one runs (the runbook says: if it is not
  running); `node exclude NODE` keeps the node out (readmitted after, the session shares the
  cluster); `run stop` is left for last, and the stopped run stays stopped with an `end` event.
- Every other runbook with a RUN_ID or NODE, against one run whose worker was SIGKILLed: each
  command exits 0 and says what the runbook reads it for (the failure with its rank, the node
  excluded with the runbook's reason, then readmitted); `telemetry serve` runs as a process on a
  free port with one fake GPU and is scraped. The rollout runbooks need a rollout: their
  commands run in test_rollout_ray.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
import urllib.request
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
        typo = llmctl("node", "exclude", node[:-1], "--reason", "hang")  # a name the live node table lacks
        assert typo.returncode == 2 and "in its node table" in typo.stderr, typo.stdout + typo.stderr

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


TRAINING_RUNBOOKS = [
    n for n in rb.runbook_names() if n != "TrainingHang" and "ROLLOUT_ID" not in rb.read_runbook(n)
]  # TrainingHang has its own test above; the rollout runbooks need a rollout (test_rollout_ray)


def test_every_training_and_node_runbook_runs_against_a_live_run_with_a_failure(cluster_home, dataset_dir):
    """Each runbook with RUN_ID/NODE, its commands in its order, against one live run whose worker
    was SIGKILLed (so the failure, the decision and the logs the runbooks read are there).
    `telemetry serve` runs as its own process on a free port with a fake GPU, bounded, and is
    scraped; `run stop` goes last, once; every exclusion is checked in `node list` and undone."""
    assert len(TRAINING_RUNBOOKS) >= 8, TRAINING_RUNBOOKS
    before = json.loads(llmctl("supervise", "status", "--json").stdout)
    sub = llmctl("run", "submit", str(REPO / "examples" / "run-tiny.yaml"), "--json")
    assert sub.returncode == 0, sub.stderr
    run_id, supervisor = json.loads(sub.stdout)["run_id"], json.loads(sub.stdout)["supervisor_pid"]
    rd = Path(cluster_home) / "runs" / run_id
    node = None
    try:
        events = rd / "events.jsonl"

        def read(kind: str) -> list[dict]:
            text = events.read_text(errors="replace") if events.exists() else ""
            return [json.loads(x) for x in text.splitlines() if f'"type":"{kind}"' in x]

        wait_for(lambda: read("step"), 150, "a step")
        start = read("start")[-1]
        os.kill(next(w["pid"] for w in start["workers"] if w["rank"] == 1), signal.SIGKILL)
        wait_for(lambda: read("failure"), 60, "the failure event")
        died = read("failure")[0]
        alive = [n for n in json.loads(llmctl("node", "list", "--json").stdout) if n["ray_state"] == "ALIVE"]
        node = next(n["node"] for n in alive if n["head"])  # see the TrainingHang test

        ran: dict[str, int] = {}
        for name in TRAINING_RUNBOOKS:
            for command in in_document_order(rb.read_runbook(name)):
                argv = shlex.split(command.replace("RUN_ID", run_id).replace("NODE", node))[1:]
                if argv[:2] in (["run", "stop"], ["telemetry", "serve"]):
                    ran[" ".join(argv[:2])] = ran.get(" ".join(argv[:2]), 0) + 1
                    continue
                res = llmctl(*argv)
                said = res.stdout + res.stderr
                where = f"{name}: `{command}`"
                assert res.returncode == 0, f"{where}: exit {res.returncode}: {said[-1500:]}"
                if argv[:2] == ["run", "events"] and "--type" in argv:
                    wanted = argv[argv.index("--type") + 1]
                    shown = [json.loads(x) for x in res.stdout.splitlines()]
                    assert shown and {e["type"] for e in shown} == {wanted}, f"{where}: {said[-800:]}"
                    assert any(e.get("rank") == died.get("rank") for e in shown), f"{where}: {said[-800:]}"
                    continue
                assert said.strip(), f"{where} said nothing"
                if argv[:2] == ["run", "status"]:
                    assert run_id in said, f"{where}: {said}"
                if argv[:2] == ["run", "logs"]:
                    kept = json.loads(llmctl("run", "logs", run_id, "--json").stdout)  # driver and every rank, kept
                    assert kept["source"] == "run_dir" and len(kept["files"]) >= 3, f"{where}: {kept}"
                if argv[:2] == ["node", "list"]:
                    assert node in said, f"{where}: {said}"
                if argv[:2] == ["node", "exclude"]:
                    reason = argv[argv.index("--reason") + 1]
                    row = next(n for n in json.loads(llmctl("node", "list", "--json").stdout) if n["node"] == node)
                    assert row["excluded"] and reason in row["reason"], f"{where}: {row}"
                if argv[:2] == ["node", "readmit"]:
                    row = next(n for n in json.loads(llmctl("node", "list", "--json").stdout) if n["node"] == node)
                    assert not row["excluded"], f"{where}: {row}"
                ran[" ".join(argv[:2])] = ran.get(" ".join(argv[:2]), 0) + 1
            llmctl("node", "readmit", node)  # a runbook that leaves the node out leaves it for the next one too
        assert {"run status", "run events", "run logs", "run goodput", "run energy", "run decisions"} <= set(ran)
        assert {"node list", "node exclude", "node readmit", "cluster status", "telemetry serve"} <= set(ran), ran

        # `llmctl telemetry serve`: a process of its own, serving this node's GPUs (one fake one here)
        port_file = Path(cluster_home) / "exporter.port"
        cmd = [str(REPO / ".venv" / "bin" / "llmctl"), "telemetry", "serve", "--port", "0"]
        cmd += ["--port-file", str(port_file), "--fake-gpus", "1", "--duration", "60", "--interval", "0.2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 60, "the exporter's port")
            url = f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"
            wait_for(
                lambda: "llmctl_gpu_power_watts" in urllib.request.urlopen(url, timeout=5).read().decode(),
                30,
                "a sample",
            )
            targets = llmctl("dashboards", "targets")
            assert port_file.read_text().strip() in targets.stdout, targets.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)

        res = llmctl("run", "stop", run_id)
        assert res.returncode == 0 and f"run {run_id} stopped" in res.stdout, res.stdout + res.stderr
        again = llmctl("run", "stop", run_id)  # the other runbooks' `run stop`: the run has ended
        assert "already ended (stopped)" in again.stdout + again.stderr
        status = json.loads(llmctl("run", "status", run_id, "--json").stdout)
        assert status["state"] == "stopped"
    finally:
        if node is not None:
            llmctl("node", "readmit", node)
        llmctl("run", "stop", run_id)
        if not before["running"] and supervisor:
            os.kill(supervisor, signal.SIGTERM)
            wait_for(lambda: not json.loads(llmctl("supervise", "status", "--json").stdout)["running"], 30, "it ends")
