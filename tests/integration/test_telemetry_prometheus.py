"""A real Prometheus scrapes a real `llmctl telemetry serve --fake-gpus` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.observability.prom import PrometheusServer, prometheus_binary
from controlplane.telemetry.assignments import assign_gpus
from controlplane.telemetry.fake_nvml import FakeGpu

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def exporter(tmp_path, llmctl_home):
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMCTL_HOME": str(llmctl_home)}
    cmd = [sys.executable, "-m", "controlplane.cli.main", "telemetry", "serve", "--fake-gpus", "2"]
    cmd += ["--port", "0", "--port-file", str(port_file), "--interval", "0.5", "--node", "node-a"]
    log = open(tmp_path / "exporter.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"exporter did not start: {(tmp_path / 'exporter.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield int(port_file.read_text()), tmp_path / "exporter.log"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def test_prometheus_scrapes_fake_gpu_exporter(tmp_path, exporter, llmctl_home):
    try:
        prometheus_binary()
    except Exception as exc:  # pragma: no cover
        pytest.skip(str(exc))
    port, log = exporter
    assert "FAKE GPU" in log.read_text()
    uuid0 = FakeGpu(0).uuid
    assign_gpus(llmctl_home, "node-a", "run-prom", [(0, uuid0)])
    with PrometheusServer({"llmctl-gpu": [f"127.0.0.1:{port}"]}, tmp_path / "prom", scrape_interval_s=1) as prom:
        up = prom.wait_for("llmctl_telemetry_up == 1", timeout_s=60)
        assert up[0]["metric"]["node"] == "node-a" and up[0]["metric"]["cluster"] == "local"
        info = prom.wait_for('llmctl_telemetry_info{source="fake"}', timeout_s=30)
        assert info[0]["metric"]["status"] == "ok"
        power = prom.wait_for("llmctl_gpu_power_watts", lambda r: len(r) == 2, timeout_s=30)
        assert {r["metric"]["gpu"] for r in power} == {"0", "1"}
        assert all(float(r["value"][1]) > 0 for r in power)
        owned = prom.wait_for('llmctl_gpu_power_watts{run_id="run-prom"}', timeout_s=30)
        assert [r["metric"]["gpu_uuid"] for r in owned] == [uuid0]
        # the energy counter grows: a rate Prometheus can compute from two scrapes
        rate = prom.wait_for(
            "irate(llmctl_gpu_energy_joules_total[10s])",
            lambda r: len(r) == 2 and all(float(x["value"][1]) > 0 for x in r),
            timeout_s=60,
        )
        by_gpu = {r["metric"]["gpu"]: float(r["value"][1]) for r in rate}
        watts = {r["metric"]["gpu"]: float(r["value"][1]) for r in power}
        for g in ("0", "1"):
            assert by_gpu[g] == pytest.approx(watts[g], rel=0.25)  # J/s of the counter ~ the power gauge
        assert prom.query("llmctl_gpu_throttle_active")
        targets = prom.targets_health()
        assert targets[0]["health"] == "up"
