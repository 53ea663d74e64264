"""Energy ledger: the meter's files, the pure report, the ledger row, `llmctl run energy`."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.rundir import RunDir
from controlplane.spec import PowerSpec
from controlplane.telemetry.energy import (
    J_PER_KWH,
    compute_energy_report,
    get_run_energy,
    run_energy_summary,
    summary_line,
    tokens_from_events,
)
from controlplane.telemetry.fake_nvml import FakeGpu, FakeNvml
from controlplane.telemetry.meter import EnergyMeter, read_energy_records
from controlplane.telemetry.power import apply_power_policy

runner = CliRunner()


def gpu(index, seconds, counter, integrated, uuid=None, samples=10):
    return {
        "index": index,
        "uuid": uuid or f"GPU-{index}",
        "seconds": seconds,
        "samples": samples,
        "energy_j": counter if counter is not None else integrated,
        "source": "counter" if counter is not None else "integrated",
        "counter_j": counter,
        "integrated_j": integrated,
        "counter_resets": 0,
    }


def test_tokens_from_events():
    events = [
        {"type": "start"},
        {"type": "step", "step": 1, "tokens": 1000},
        {"type": "step", "step": 2, "tokens": 2000},
        {"type": "step", "step": 1, "tokens": 1000},  # replay after a resume
        {"type": "heartbeat", "tokens": 10**9},
        {"type": "step", "tokens": "junk"},
    ]
    assert tokens_from_events(events) == 2000
    assert tokens_from_events([]) is None


def test_report_math_and_cross_check():
    records = [
        {"node": "a", "gpus": [gpu(0, 100, 30_000.0, 29_000.0), gpu(1, 100, 30_000.0, 31_000.0)]},
        {"node": "b", "gpus": [gpu(0, 50, None, 12_000.0)]},  # an older GPU without the counter
        {"node": "b", "gpus": [gpu(1, 0, None, 0.0, samples=0)]},  # never sampled: ignored
    ]
    r = compute_energy_report("r1", records, tokens=720_000, pue=1.5, carbon_intensity=0.4)
    assert r.gpus == 3 and r.gpu_seconds == 250
    assert r.gpu_joules == 72_000
    assert r.counter_joules == 60_000 and r.integrated_joules == 60_000 and r.disagreement == 0
    assert r.joules_per_token == pytest.approx(0.1)
    assert r.gpu_kwh == pytest.approx(72_000 / J_PER_KWH)
    assert r.facility_kwh == pytest.approx(r.gpu_kwh * 1.5)
    assert r.co2e_kg == pytest.approx(r.facility_kwh * 0.4)
    assert r.avg_power_w == pytest.approx(72_000 / 250)
    assert r.detail["sources"] == {"counter": 2, "integrated": 1}
    # the Zeus case: the same window, 187 J by one reading and 327 J by the other
    z = compute_energy_report("z", [{"node": "a", "gpus": [gpu(0, 1, 327.0, 187.0)]}], None, 1.0, 0.0)
    assert z.disagreement == pytest.approx((327 - 187) / 327)
    assert z.joules_per_token is None
    empty = compute_energy_report("e", [], 1000, 1.2, 0.45)
    assert not empty.measured and empty.gpu_kwh == 0
    assert summary_line(empty).startswith("energy: not measured")


def test_meter_writes_what_the_fake_gpus_used(tmp_path):
    fake = FakeNvml([FakeGpu(0), FakeGpu(1, arch="pascal")])
    fake.set_all_loads(1.0)
    meter = EnergyMeter(tmp_path, attempt=1, node="n1", gpu_indices=[0, 1], nvml=fake, interval_s=0.05)
    meter.start()
    time.sleep(0.6)
    rec = meter.stop()
    (on_disk,) = read_energy_records(tmp_path)
    assert on_disk == json.loads(json.dumps(rec))
    g0, g1 = sorted(rec["gpus"], key=lambda g: g["index"])
    assert g0["source"] == "counter" and g1["source"] == "integrated" and g1["counter_j"] is None
    assert g0["samples"] >= 5
    # 395 W (A100) and 250 W (P100) over the measured window
    assert g0["energy_j"] == pytest.approx(395 * g0["seconds"], rel=0.1)
    assert g1["energy_j"] == pytest.approx(250 * g1["seconds"], rel=0.1)
    assert g0["mean_power_w"] == pytest.approx(395)


def test_meter_without_gpu_writes_an_empty_record(tmp_path):
    fake = FakeNvml(1)
    fake.library_missing = True
    rec = EnergyMeter(tmp_path, 1, "n1", [0], nvml=fake).start().stop()
    assert rec["gpus"] == [] and rec["status"] == "no_library"


def _make_run(ctx: Context, run_id: str) -> RunDir:
    rd = RunDir.of(ctx.storage, run_id).create()
    ctx.ledger.create_run(run_id, "t", {}, {}, str(rd.path))
    return rd


def test_run_energy_cli_records_the_ledger_row(tmp_path):
    ctx = Context.load()
    rd = _make_run(ctx, "r-energy-1")
    fake = FakeNvml(2)
    fake.set_all_loads(0.9)
    power = apply_power_policy(PowerSpec(cap_watts=300), [0, 1], nvml=fake, run_dir=rd.path, attempt=1, node="n1")
    meter = EnergyMeter(rd.path, 1, "n1", [0, 1], nvml=fake, interval_s=0.05).start()
    for step in range(1, 4):
        time.sleep(0.1)
        rd.append_event("step", 1, step=step, loss=3.0, tokens=step * 4096)
    meter.stop()
    power.restore()

    res = runner.invoke(app, ["run", "energy", "r-energy", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["run_id"] == "r-energy-1" and data["gpus"] == 2 and data["tokens"] == 12_288
    assert data["joules_per_token"] == pytest.approx(data["gpu_joules"] / 12_288)
    assert data["avg_power_w"] == pytest.approx(300, rel=0.05)  # capped from 361 W demand
    assert data["facility_kwh"] == pytest.approx(data["gpu_kwh"] * 1.2)
    assert data["power"][0]["status"] == "capped"
    row = get_run_energy(ctx.ledger, "r-energy-1")
    assert row["gpu_joules"] == pytest.approx(data["gpu_joules"]) and row["power"][0]["applied_limit_w"] == 300

    res = runner.invoke(app, ["run", "energy", "r-energy-1"])
    assert res.exit_code == 0 and "J/token" in res.stdout and "cap 300 W" in res.stdout
    assert "kg CO2e" in run_energy_summary(ctx, "r-energy-1")


def test_run_energy_unknown_run_is_one_line_exit_2():
    res = runner.invoke(app, ["run", "energy", "nope"])
    assert res.exit_code == 2
    assert "no such run" in res.output and "Traceback" not in res.output


def test_run_energy_of_a_cpu_only_run():
    ctx = Context.load()
    rd = _make_run(ctx, "r-cpu")
    rd.append_event("step", 1, step=1, tokens=100)
    res = runner.invoke(app, ["run", "energy", "r-cpu"])
    assert res.exit_code == 0 and "not measured" in res.stdout
