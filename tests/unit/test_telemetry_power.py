"""Power policy: the pure choice, and caps applied to / restored on the fake NVML."""

from __future__ import annotations

import json
import logging

import pynvml
import pytest

from controlplane.spec import PowerSpec
from controlplane.telemetry.fake_nvml import FakeNvml
from controlplane.telemetry.power import (
    CalibrationPoint,
    apply_power_policy,
    candidate_limits,
    choose_power_limit,
    clamp_limit,
    read_power_records,
)

# ------------------------------------------------------------------ pure


def test_candidate_limits():
    assert candidate_limits(100, 400) == [400, 375, 350, 325, 300, 275, 250, 225]
    assert candidate_limits(300, 350) == [350, 325, 300]
    assert candidate_limits(250, 250) == [250]
    assert candidate_limits(100, 400, step_w=50, max_candidates=3) == [400, 350, 300]
    with pytest.raises(ValueError):
        candidate_limits(300, 200)


def P(limit, tps, jpt):
    return CalibrationPoint(limit_w=limit, tokens_per_s=tps, joules_per_token=jpt)


def test_choose_lowest_energy_within_slowdown():
    points = [P(400, 1000, 0.40), P(375, 990, 0.38), P(350, 975, 0.36), P(325, 940, 0.35), P(300, 900, 0.345)]
    c = choose_power_limit(points, 0.03)
    assert c.limit_w == 350  # 1000/975 = 2.6% slower; 325 W would be 6.4% slower
    assert c.fastest_limit_w == 400
    assert c.slowdown == pytest.approx(1000 / 975 - 1)
    assert c.energy_saving == pytest.approx(1 - 0.36 / 0.40)
    assert c.feasible == (400, 375, 350)
    assert choose_power_limit(points, 0.0).limit_w == 400
    assert choose_power_limit(points, 0.5).limit_w == 300


def test_choose_handles_noise_ties_and_bad_points():
    # the fastest point need not be the highest limit (measurement noise)
    points = [P(400, 990, 0.40), P(375, 1000, 0.37), P(350, 0, 0.0)]
    c = choose_power_limit(points, 0.0)
    assert c.limit_w == 375 and c.fastest_limit_w == 375
    # equal J/token: the higher (faster) limit wins
    assert choose_power_limit([P(300, 1000, 0.3), P(250, 1000, 0.3)], 0.1).limit_w == 300
    with pytest.raises(ValueError):
        choose_power_limit([P(300, 0, 0.3)], 0.1)


def test_clamp():
    assert clamp_limit(50, 100, 400) == 100
    assert clamp_limit(500, 100, 400) == 400
    assert clamp_limit(300, None, None) == 300


def test_power_spec_validation():
    assert PowerSpec(cap_watts=300).cap_watts == 300
    assert PowerSpec(cap_watts="auto").cap_watts == "auto"
    with pytest.raises(ValueError):
        PowerSpec(cap_watts=-5.0)


# ------------------------------------------------------------------ against the fake NVML


def limits(fake):
    fake.nvmlInit()
    try:
        return [
            fake.nvmlDeviceGetPowerManagementLimit(fake.nvmlDeviceGetHandleByIndex(i)) / 1000
            for i in range(fake.nvmlDeviceGetCount())
        ]
    finally:
        fake.nvmlShutdown()


def test_fixed_cap_applied_and_restored(tmp_path):
    fake = FakeNvml(4)
    h = apply_power_policy(PowerSpec(cap_watts=300), [1, 2], nvml=fake, run_dir=tmp_path, attempt=1, node="n1")
    assert h.status == "capped" and h.applied_limit_w == 300
    assert limits(fake) == [400, 300, 300, 400]
    assert h.original_limits_w == {1: 400.0, 2: 400.0}
    h.restore()
    h.restore()  # idempotent
    assert limits(fake) == [400, 400, 400, 400]
    (rec,) = read_power_records(tmp_path)
    assert rec["status"] == "capped" and rec["applied_limit_w"] == 300 and rec["node"] == "n1"


def test_cap_outside_the_allowed_range_is_clamped_and_said():
    fake = FakeNvml(1)
    with apply_power_policy(PowerSpec(cap_watts=50), [0], nvml=fake) as h:
        assert h.applied_limit_w == 100
        assert "asked 50 W, allowed 100-400 W" in h.message
        assert limits(fake)[0] == 100
    assert limits(fake)[0] == 400


def test_no_permission_is_one_line_and_the_run_goes_on_uncapped(caplog):
    fake = FakeNvml(2)
    fake.allow_set_limit = False
    with caplog.at_level(logging.WARNING):
        h = apply_power_policy(PowerSpec(cap_watts=300), [0, 1], nvml=fake)
    assert h.status == "no_permission" and h.applied_limit_w is None
    assert "running uncapped" in h.message
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [h.message]
    h.restore()
    assert fake.calls["nvmlDeviceSetPowerManagementLimit"] == 1  # restore does not try again


def test_set_failure_mid_way_restores_what_was_changed():
    fake = FakeNvml(2)
    fake.inject("nvmlDeviceSetPowerManagementLimit", pynvml.NVML_ERROR_UNKNOWN, gpu=1)
    h = apply_power_policy(PowerSpec(cap_watts=250), [0, 1], nvml=fake)
    assert h.status == "error" and "restored" in h.message
    assert limits(fake)[:2] == [400, 400]


def test_no_gpu_and_null_cap_do_nothing(tmp_path):
    assert apply_power_policy(PowerSpec(), [0], nvml=FakeNvml(1)).status == "unchanged"
    fake = FakeNvml(1)
    fake.library_missing = True
    h = apply_power_policy(PowerSpec(cap_watts=300), [0], nvml=fake, run_dir=tmp_path, attempt=1, node="n")
    assert h.status == "no_gpu"
    h.restore()
    assert apply_power_policy(PowerSpec(cap_watts=300), [], nvml=FakeNvml(1)).status == "no_gpu"
    with pytest.raises(TypeError):
        apply_power_policy(PowerSpec(cap_watts="auto"), [0], nvml=FakeNvml(1))


def test_auto_calibration_picks_lowest_energy_within_slowdown(tmp_path):
    t = [0.0]
    fake = FakeNvml(2, clock=lambda: t[0])
    fake.set_all_loads(1.0)
    measured_at = []

    def measure():
        """10 'training steps' of 2048 tokens; the fake GPUs' clock sets the pace."""
        rate = 10_000.0 * min(fake.throughput(0), fake.throughput(1))
        measured_at.append(limits_now())
        tokens = 20_480
        t[0] += tokens / rate
        return tokens, tokens / rate

    def limits_now():
        return fake.gpu(0).limit_mw / 1000

    h = apply_power_policy(
        PowerSpec(cap_watts="auto", max_slowdown=0.05), [0, 1], nvml=fake, measure=measure, run_dir=tmp_path,
        attempt=1, node="n1",
    )  # fmt: skip
    assert h.status == "calibrated", h.message
    assert measured_at == [400, 400, 375, 350, 325, 300, 275, 250, 225]  # warm-up, then the sweep
    pts = {p.limit_w: p for p in h.calibration}
    # the fake's physics: uncapped 395 W at full speed; J/token falls as the cap bites
    assert pts[400].joules_per_token == pytest.approx(2 * 395 / 10_000, rel=1e-3)
    assert pts[350].joules_per_token < pts[400].joules_per_token
    assert pts[350].tokens_per_s < pts[400].tokens_per_s
    expected = choose_power_limit(h.calibration, 0.05)
    assert h.choice == expected and h.applied_limit_w == expected.limit_w
    assert 225 < h.applied_limit_w < 400 and h.choice.slowdown <= 0.05
    assert limits(fake)[:2] == [h.applied_limit_w] * 2
    h.restore()
    assert limits(fake)[:2] == [400, 400]
    rec = json.loads(next((tmp_path / "telemetry" / "power").glob("*.json")).read_text())
    assert rec["status"] == "calibrated" and len(rec["calibration"]) == 8


# ------------------------------------------------------------------ the one-call worker API


def test_worker_telemetry_on_fake_gpus_and_on_cpu(tmp_path):
    from controlplane.telemetry.assignments import read_assignments
    from controlplane.telemetry.meter import read_energy_records
    from controlplane.telemetry.worker import start_worker_telemetry

    fake = FakeNvml(4)
    fake.set_all_loads(1.0)
    run_dir = tmp_path / "runs" / "run-w"
    tel = start_worker_telemetry(
        PowerSpec(cap_watts=300), run_dir, 1, tmp_path, node="n1", nvml=fake, env={"CUDA_VISIBLE_DEVICES": "2"},
        meter_interval_s=0.05,
    )  # fmt: skip
    assert tel.gpus == [(2, fake.gpu(2).uuid)]
    assert tel.power.status == "capped" and limits(fake) == [400, 400, 300, 400]
    (rec,) = read_assignments(tmp_path, "n1")
    assert rec["run_id"] == "run-w" and rec["gpus"] == [{"index": 2, "uuid": fake.gpu(2).uuid}]
    tel.stop()
    tel.stop()
    assert limits(fake) == [400, 400, 400, 400]
    assert read_assignments(tmp_path, "n1") == []
    (energy,) = read_energy_records(run_dir)
    assert [g["index"] for g in energy["gpus"]] == [2]

    cpu = FakeNvml(1)
    cpu.library_missing = True
    tel = start_worker_telemetry(PowerSpec(cap_watts="auto"), run_dir, 2, tmp_path, node="n1", nvml=cpu)
    assert tel.gpus == [] and tel.meter is None and tel.power.status == "unchanged"
    tel.stop()


# ------------------------------------------------------------------ a worker killed before restore()


def _dead_lease_holder(directory, leases: list[tuple[int, str, float, float]]) -> int:
    """A real process writes leases (as a capping worker does), then is SIGKILLed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, time, json\n"
        "from controlplane.telemetry.power_leases import write_lease\n"
        f"for i, u, o, a in json.loads({json.dumps(json.dumps(leases))}):\n"
        f"    write_lease({str(directory)!r}, i, u, o, a, None)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    time.sleep(0.05)
    return proc.pid


def test_a_gpu_left_capped_by_a_killed_worker_gets_its_limit_back(tmp_path, caplog):
    from controlplane.telemetry import power_leases

    fake = FakeNvml(3)
    d = power_leases.lease_dir(tmp_path, "node-a")
    default_w = fake.gpu(0).default_limit_mw / 1000
    u = [fake.gpu(i).uuid for i in range(3)]
    pid = _dead_lease_holder(d, [(0, u[0], default_w, 250.0), (1, u[1], default_w, 250.0), (2, u[2], default_w, 250.0)])
    fake.gpu(0).limit_mw = 250_000  # what the dead worker left
    fake.gpu(1).limit_mw = 275_000  # changed by someone since: not ours to undo
    fake.gpu(2).limit_mw = 250_000
    with caplog.at_level(logging.WARNING):
        handle = apply_power_policy(PowerSpec(cap_watts=300), [0, 1], nvml=fake, lease_dir=d)
    assert f"GPU 0 was left at 250 W by pid {pid}" in caplog.text and "GPU 1 was left" not in caplog.text
    assert handle.original_limits_w == {0: default_w, 1: 275.0}
    assert fake.gpu(0).limit_mw == fake.gpu(1).limit_mw == 300_000
    mine = {json.loads(p.read_text())["gpu_index"]: json.loads(p.read_text()) for p in d.glob("*.json")}
    assert mine[0]["applied_w"] == 300 and mine[0]["original_w"] == default_w and mine[1]["original_w"] == 275.0
    assert mine[2]["pid"] == pid  # not a GPU of this worker: left for the exporter
    # a live holder is never touched
    assert power_leases.reclaim(d, fake, {0: fake.gpu(0).handle}, {0: u[0]}) == []
    handle.restore()
    assert fake.gpu(0).limit_mw == default_w * 1000 and fake.gpu(1).limit_mw == 275_000
    assert [json.loads(p.read_text())["gpu_index"] for p in d.glob("*.json")] == [2]

    # the node exporter gives GPU 2 back on its next look
    from controlplane.telemetry.exporter import TelemetryExporter
    from controlplane.telemetry.sampler import NvmlSampler

    exporter = TelemetryExporter(NvmlSampler(fake), "c", "node-a", storage_root=tmp_path, leases_every_s=0)
    exporter.sampler.open()
    exporter.step()
    assert fake.gpu(2).limit_mw == default_w * 1000 and not list(d.glob("*.json"))
