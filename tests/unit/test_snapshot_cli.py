"""`dashboards snapshot` without a Prometheus: one line naming the URL; its time axis in one unit.
(With a real Prometheus, and a run-id prefix: tests/integration/test_observability_prometheus.py.)"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.observability.snapshot import time_unit
from controlplane.procs import free_port


def test_no_prometheus_is_one_line_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = CliRunner().invoke(app, ["dashboards", "snapshot", "some-run", str(tmp_path / "out"), "--prometheus", url])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and "RetryableError" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "does not answer" in lines[0]


def test_a_time_axis_has_one_unit_chosen_by_its_span():
    assert time_unit(90) == ("s", 1.0)
    assert time_unit(30 * 60) == ("min", 60.0)
    assert time_unit(6 * 3600) == ("h", 3600.0)
    assert time_unit(30 * 86400) == ("days", 86400.0)


def test_training_metrics_targets_come_from_the_run_directories(tmp_path):
    import json

    from controlplane.context import Context
    from controlplane.rundir import RunDir
    from controlplane.states import RunState

    ctx = Context.load()
    for run_id, port in (("live-run", 43111), ("ended-run", 43112)):
        rd = RunDir.of(ctx.storage, run_id).create()
        ctx.ledger.create_run(run_id, "t", {}, {}, str(rd.path))
        rd.append_event("start", 1, metrics_url=f"http://127.0.0.1:{port}/metrics")
    ctx.ledger.transition("ended-run", RunState.STOPPED, "stopped by user", None)
    res = CliRunner().invoke(app, ["dashboards", "targets"])
    assert res.exit_code == 0, res.output
    groups = json.loads(res.output)
    assert groups == [
        {
            "targets": ["127.0.0.1:43111"],
            "labels": {"run_id": "live-run", "attempt": "1", "__metrics_path__": "/metrics"},
        }
    ]
    out = tmp_path / "sd" / "llmctl.json"
    res = CliRunner().invoke(app, ["dashboards", "targets", "--out", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text()) == groups
    status = CliRunner().invoke(app, ["run", "status", "live-run"])
    assert "metrics http://127.0.0.1:43111/metrics" in status.output


def test_running_telemetry_exporters_are_targets_and_a_killed_ones_record_goes(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    def serve(node: str) -> tuple[subprocess.Popen, int]:
        port_file = tmp_path / f"{node}.port"
        cmd = [sys.executable, "-m", "controlplane", "telemetry", "serve", "--fake-gpus", "1", "--port", "0"]
        proc = subprocess.Popen([*cmd, "--node", node, "--port-file", str(port_file)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert port_file.exists(), f"exporter {node} did not start"
        return proc, int(port_file.read_text())

    def exporters() -> dict[str, dict]:
        res = CliRunner().invoke(app, ["dashboards", "targets"])
        assert res.exit_code == 0, res.output
        return {g["labels"]["node"]: g for g in json.loads(res.output) if g["labels"].get("job") == "llmctl-telemetry"}

    (a, port_a), (b, _) = serve("gpu-a"), serve("gpu-b")
    try:
        found = exporters()
        assert set(found) == {"gpu-a", "gpu-b"}
        assert found["gpu-a"]["targets"] == [f"127.0.0.1:{port_a}"]
        assert found["gpu-a"]["labels"]["__metrics_path__"] == "/metrics"
        b.send_signal(signal.SIGTERM)  # a clean stop takes its record with it
        b.wait(timeout=30)
        a.kill()  # a killed one leaves its record, which the next listing drops
        a.wait(timeout=30)
        assert exporters() == {}
        assert not list((Path(os.environ["LLMCTL_HOME"]) / "telemetry" / "exporters").glob("*.json"))
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
