"""Exporter metrics, run attribution, node health files, and the `llmctl telemetry` commands."""

from __future__ import annotations

import json
import os
import time

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.rundir import RunDir
from controlplane.telemetry.assignments import assign_gpus, cuda_visible_gpus, gpu_runs, read_assignments
from controlplane.telemetry.exporter import TelemetryExporter
from controlplane.telemetry.fake_nvml import FakeNvml
from controlplane.telemetry.health import HealthTracker, health_reasons, read_node_health
from controlplane.telemetry.sampler import NvmlSampler

runner = CliRunner()


def scrape(exporter: TelemetryExporter) -> dict[str, list]:
    text = generate_latest(exporter.registry).decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def make_exporter(storage, gpus=2, node="n1", **kw):
    fake = FakeNvml(gpus)
    kw.setdefault("assignments_every_s", 0)
    exp = TelemetryExporter(NvmlSampler(fake), "c1", node, storage_root=storage, source="fake", **kw)
    return fake, exp


# ------------------------------------------------------------------ assignments


def test_assignments_attribute_gpus_newest_first_and_go_stale(tmp_path):
    gpus = [(0, "GPU-a"), (1, "GPU-b"), (2, "GPU-c")]
    assign_gpus(tmp_path, "n1", "run-old", [(0, "GPU-a"), (1, "GPU-b")], pid=1)
    time.sleep(0.01)
    newer = assign_gpus(tmp_path, "n1", "run-new", [(1, "GPU-b")], pid=2)
    assign_gpus(tmp_path, "n2", "run-x", [(2, "GPU-c")], pid=3)  # another node
    (tmp_path / "telemetry/assignments/n1/junk.json").write_text("{not json")
    recs = read_assignments(tmp_path, "n1")
    assert [r["run_id"] for r in recs] == ["run-new", "run-old"]
    assert gpu_runs(recs, gpus) == {0: "run-old", 1: "run-new"}
    assert gpu_runs(recs, [(0, ""), (1, "")]) == {0: "run-old", 1: "run-new"}  # by index without UUIDs
    assert gpu_runs(read_assignments(tmp_path, "n1", now=time.time() + 1000), gpus) == {}
    newer.release()
    newer.release()
    assert gpu_runs(read_assignments(tmp_path, "n1"), gpus) == {0: "run-old", 1: "run-old"}


def test_cuda_visible_gpus():
    gpus = [(0, "GPU-aaa"), (1, "GPU-bbb"), (2, "GPU-ccc")]
    assert cuda_visible_gpus(gpus, {}) == gpus
    assert cuda_visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "2,0"}) == [(2, "GPU-ccc"), (0, "GPU-aaa")]
    assert cuda_visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "GPU-bb"}) == [(1, "GPU-bbb")]
    assert cuda_visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert cuda_visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "1,7,2"}) == [(1, "GPU-bbb")]


# ------------------------------------------------------------------ health


def test_health_file_marks_xid_ecc_and_lost_gpus(tmp_path):
    fake = FakeNvml(3)
    sampler = NvmlSampler(fake)
    sampler.open()
    tracker = HealthTracker(tmp_path, "n1")
    assert tracker.update(sampler.sample())
    assert read_node_health(tmp_path)["n1"]["healthy"] is True
    assert not tracker.update(sampler.sample())  # nothing changed, nothing written
    fake.inject_xid(0, 45)  # a killed process: workload, not hardware
    assert health_reasons(sampler.sample()) == []
    fake.inject_xid(0, 79)
    fake.add_ecc_errors(1, uncorrected=2)
    fake.lose_gpu(2)
    assert tracker.update(sampler.sample())
    tracker.update(sampler.sample())  # sticky, not duplicated
    rec = read_node_health(tmp_path)["n1"]
    assert rec["healthy"] is False and rec["node"] == "n1" and rec["updated_at"]
    kinds = sorted((r["kind"], r["gpu"]) for r in rec["reasons"])
    assert kinds == [("ecc_uncorrectable", 1), ("gpu_lost", 2), ("xid", 0)]  # one reason per kind and GPU
    assert any("fallen off the bus" in r["detail"] for r in rec["reasons"])
    assert not list((tmp_path / "telemetry" / "health").glob(".*tmp*"))  # written atomically


def test_read_node_health_tolerates_a_bad_file(tmp_path):
    d = tmp_path / "telemetry" / "health"
    d.mkdir(parents=True)
    (d / "n9.json").write_text("{")
    assert read_node_health(tmp_path)["n9"]["healthy"] is None
    assert read_node_health(tmp_path / "nothing") == {}


# ------------------------------------------------------------------ exporter


def test_exporter_serves_the_design_metrics_with_run_labels(tmp_path):
    fake, exp = make_exporter(tmp_path)
    fake.set_load(0, 1.0)
    exp.sampler.open()
    a = assign_gpus(tmp_path, "n1", "run-7", [(0, fake.gpu(0).uuid)])
    exp.step()
    fake.inject_xid(1, 79)
    exp.step()
    m = scrape(exp)
    assert m["llmctl_telemetry_up"] == [({"cluster": "c1", "node": "n1"}, 1.0)]
    assert m["llmctl_telemetry_info"][0][0]["source"] == "fake"
    power = {lab["gpu"]: (lab, v) for lab, v in m["llmctl_gpu_power_watts"]}
    lab0, watts0 = power["0"]
    assert watts0 == 395.0 and lab0["run_id"] == "run-7" and lab0["gpu_uuid"] == fake.gpu(0).uuid
    assert power["1"][0]["run_id"] == ""
    assert set(lab0) == {"cluster", "node", "gpu", "gpu_uuid", "run_id"}
    for name in (
        "llmctl_gpu_energy_joules_total",
        "llmctl_gpu_power_limit_watts",
        "llmctl_gpu_utilization_ratio",
        "llmctl_gpu_memory_used_bytes",
        "llmctl_gpu_memory_total_bytes",
        "llmctl_gpu_temperature_celsius",
        "llmctl_gpu_sm_clock_hertz",
        "llmctl_gpu_throttle_active",
        "llmctl_gpu_ecc_errors_total",
        "llmctl_gpu_lost",
    ):
        assert name in m, name
    idle = {lab["gpu"]: v for lab, v in m["llmctl_gpu_throttle_active"] if lab["reason"] == "gpu_idle"}
    assert idle == {"0": 0.0, "1": 1.0}
    assert [(lab["gpu"], lab["xid"], v) for lab, v in m["llmctl_gpu_xid_errors_total"]] == [("1", "79", 1.0)]
    assert {lab["type"] for lab, _ in m["llmctl_gpu_ecc_errors_total"]} == {"corrected", "uncorrected"}
    assert read_node_health(tmp_path)["n1"]["healthy"] is False
    a.release()
    exp.step()
    assert all(lab["run_id"] == "" for lab, _ in scrape(exp)["llmctl_gpu_power_watts"])


def test_exporter_joules_per_token_of_runs_on_the_node(tmp_path):
    fake, exp = make_exporter(tmp_path, jpt_every_s=0)
    exp.sampler.open()
    rd = RunDir.of(tmp_path, "run-j").create()
    (rd.path / "telemetry" / "energy").mkdir(parents=True)
    (rd.path / "telemetry" / "energy" / "a1-n1-1.json").write_text(
        json.dumps({"node": "n1", "gpus": [{"index": 0, "energy_j": 5000.0, "samples": 3}]})
    )
    rd.append_event("step", 1, step=10, tokens=10_000)
    assign_gpus(tmp_path, "n1", "run-j", [(0, fake.gpu(0).uuid)])
    exp.step()
    assert scrape(exp)["llmctl_train_energy_joules_per_token"] == [
        ({"cluster": "c1", "node": "n1", "run_id": "run-j"}, 0.5)
    ]


def test_exporter_without_gpu_says_up_0(tmp_path):
    fake, exp = make_exporter(tmp_path)
    fake.driver_loaded = False
    exp.sampler.open()
    exp.step()
    m = scrape(exp)
    assert m["llmctl_telemetry_up"][0][1] == 0.0
    assert m["llmctl_telemetry_info"][0][0]["status"] == "no_driver"
    assert "llmctl_gpu_power_watts" not in m


def test_exporter_lost_gpu_keeps_a_lost_series(tmp_path):
    fake, exp = make_exporter(tmp_path)
    exp.sampler.open()
    fake.lose_gpu(1)
    exp.step()
    m = scrape(exp)
    assert {lab["gpu"]: v for lab, v in m["llmctl_gpu_lost"]} == {"0": 0.0, "1": 1.0}
    assert [lab["gpu"] for lab, _ in m["llmctl_gpu_power_watts"]] == ["0"]


# ------------------------------------------------------------------ CLI


def test_cli_sample_without_gpu_is_a_clear_status_exit_0():
    probe = NvmlSampler()
    status = probe.open()
    probe.close()
    if status == "ok":  # pragma: no cover - a machine with a GPU
        pytest.skip("this machine has an NVIDIA GPU")
    res = runner.invoke(app, ["telemetry", "sample"])
    assert res.exit_code == 0, res.output
    assert f": {status} - " in res.stdout and ("NVML library not found" in res.stdout or "not loaded" in res.stdout)


def test_cli_sample_fake_json():
    res = runner.invoke(app, ["telemetry", "sample", "--fake-gpus", "2", "--json", "--node", "x"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["source"] == "fake" and data["node"] == "x" and len(data["gpus"]) == 2


def test_cli_serve_bad_input_is_one_line(tmp_path):
    res = runner.invoke(app, ["telemetry", "serve", "--fake-gpus", "1", "--fake-arch", "vax", "--duration", "0.1"])
    assert res.exit_code == 2 and "--fake-arch" in res.output


def test_cli_serve_fake_for_a_moment(tmp_path):
    port_file = tmp_path / "port"
    res = runner.invoke(
        app,
        ["telemetry", "serve", "--fake-gpus", "2", "--port", "0", "--duration", "0.5", "--port-file", str(port_file)],
    )
    assert res.exit_code == 0, res.output
    assert "FAKE GPU" in res.output and int(port_file.read_text()) > 0
    health = read_node_health(os.environ["LLMCTL_HOME"])
    assert len(health) == 1 and next(iter(health.values()))["healthy"] is True


def test_cli_health_lists_nodes(tmp_path):
    HealthTracker(os.environ["LLMCTL_HOME"], "n5").write()
    res = runner.invoke(app, ["telemetry", "health"])
    assert res.exit_code == 0 and "n5: healthy" in res.stdout


@pytest.mark.parametrize("gpus", [8])
def test_exporter_many_gpus_collect_is_consistent(tmp_path, gpus):
    fake, exp = make_exporter(tmp_path, gpus=gpus)
    exp.sampler.open()
    exp.step()
    m = scrape(exp)
    assert len(m["llmctl_gpu_power_watts"]) == gpus
    assert len({lab["gpu_uuid"] for lab, _ in m["llmctl_gpu_power_watts"]}) == gpus
