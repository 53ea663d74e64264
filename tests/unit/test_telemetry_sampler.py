"""NvmlSampler against the stateful fake NVML (and the real pynvml where no driver exists)."""

from __future__ import annotations

import pynvml
import pytest

from controlplane.telemetry.fake_nvml import FakeGpu, FakeNvml
from controlplane.telemetry.sampler import (
    STATUS_ERROR,
    STATUS_NO_DRIVER,
    STATUS_NO_GPU,
    STATUS_NO_LIBRARY,
    STATUS_NO_PERMISSION,
    STATUS_OK,
    NvmlSampler,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


def make(clock, gpus=2, **kw):
    fake = FakeNvml(gpus, clock=clock, **kw)
    sampler = NvmlSampler(fake, clock=clock, wall=clock)
    return fake, sampler


# ------------------------------------------------------------------ the fake itself


def test_fake_raises_real_nvml_error_classes_with_real_codes(clock):
    fake = FakeNvml(1, clock=clock)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    fake.inject("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_UNKNOWN, times=1)
    with pytest.raises(pynvml.NVMLError_Unknown) as exc:
        fake.nvmlDeviceGetPowerUsage(h)
    assert exc.value.value == pynvml.NVML_ERROR_UNKNOWN
    assert fake.nvmlDeviceGetPowerUsage(h) > 0  # injected once only
    fake.allow_set_limit = False
    with pytest.raises(pynvml.NVMLError_NoPermission):
        fake.nvmlDeviceSetPowerManagementLimit(h, 300_000)
    fake.lose_gpu(0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
    assert fake.NVML_CLOCK_SM == pynvml.NVML_CLOCK_SM  # constants come from the real module


def test_fake_energy_counter_follows_time_load_and_limit(clock):
    fake = FakeNvml(1, clock=clock)
    fake.nvmlInit()
    h = fake.nvmlDeviceGetHandleByIndex(0)
    e0 = fake.nvmlDeviceGetTotalEnergyConsumption(h)
    clock.t += 10
    idle = fake.nvmlDeviceGetTotalEnergyConsumption(h) - e0
    assert idle == pytest.approx(55 * 10 * 1000, rel=1e-6)  # idle A100: 55 W for 10 s, in mJ
    fake.set_load(0, 1.0)
    clock.t += 10
    busy = fake.nvmlDeviceGetTotalEnergyConsumption(h) - e0 - idle
    assert busy == pytest.approx(395 * 10 * 1000, rel=1e-6)
    fake.nvmlDeviceSetPowerManagementLimit(h, 250_000)
    assert fake.nvmlDeviceGetPowerUsage(h) == 250_000
    assert fake.nvmlDeviceGetCurrentClocksEventReasons(h) & pynvml.nvmlClocksEventReasonSwPowerCap
    assert fake.throughput(0) < 1.0
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceSetPowerManagementLimit(h, 50_000)  # below the allowed minimum


# ------------------------------------------------------------------ start-up failures


def test_real_pynvml_without_driver_is_a_status_not_a_crash():
    sampler = NvmlSampler(pynvml)
    status = sampler.open()
    if status == STATUS_OK:  # pragma: no cover - a machine with a GPU
        pytest.skip("this machine has an NVIDIA GPU")
    assert status in (STATUS_NO_LIBRARY, STATUS_NO_DRIVER)
    s = sampler.sample()
    assert s.status == status and s.gpus == [] and s.message
    sampler.close()


@pytest.mark.parametrize(
    "setup,status",
    [
        (lambda f: setattr(f, "library_missing", True), STATUS_NO_LIBRARY),
        (lambda f: setattr(f, "driver_loaded", False), STATUS_NO_DRIVER),
        (lambda f: f.inject("nvmlInit", pynvml.NVML_ERROR_NO_PERMISSION), STATUS_NO_PERMISSION),
        (lambda f: f.inject("nvmlInit", pynvml.NVML_ERROR_UNKNOWN), STATUS_ERROR),
        (lambda f: f.inject("nvmlDeviceGetCount", pynvml.NVML_ERROR_UNKNOWN), STATUS_ERROR),
    ],
)
def test_start_up_failures_give_a_status(clock, setup, status):
    fake, sampler = make(clock)
    setup(fake)
    assert sampler.open() == status
    assert sampler.sample().gpus == []


def test_no_gpu_and_recovery_when_the_driver_loads(clock):
    fake, sampler = make(clock, gpus=[])
    assert sampler.open() == STATUS_NO_GPU
    fake2, sampler2 = make(clock)
    fake2.driver_loaded = False
    assert sampler2.open() == STATUS_NO_DRIVER
    fake2.driver_loaded = True
    clock.t += 5
    assert sampler2.sample().status == STATUS_NO_DRIVER  # retried only every retry_open_s
    clock.t += 30
    s = sampler2.sample()
    assert s.status == STATUS_OK and len(s.gpus) == 2


# ------------------------------------------------------------------ fields


def test_full_sample_on_ampere(clock):
    fake, sampler = make(clock)
    sampler.open()
    fake.set_load(0, 1.0, memory_used=30 << 30)
    s = sampler.sample()
    g0, g1 = s.gpus
    assert s.status == STATUS_OK and s.driver_version == "550.54.15"
    assert g0.power_source == "average" and g0.power_w == pytest.approx(395.0)
    assert g1.power_w == pytest.approx(55.0)
    assert (g0.power_limit_w, g0.power_limit_min_w, g0.power_limit_max_w, g0.power_limit_default_w) == (
        400.0,
        100.0,
        400.0,
        400.0,
    )
    assert g0.utilization == 1.0 and g1.utilization == 0.0
    assert g0.memory_used_bytes == 30 << 30 and g0.memory_total_bytes == 80 << 30
    assert g0.temperature_c > g1.temperature_c
    assert g0.sm_clock_hz == 1410e6
    assert g1.throttle["gpu_idle"] and not g0.throttle["gpu_idle"]
    assert g0.ecc_corrected == 0 and g0.ecc_uncorrected == 0
    assert g0.uuid.startswith("GPU-") and g0.uuid != g1.uuid
    assert not g0.unsupported and not g0.errors


def test_support_follows_architecture(clock):
    fake = FakeNvml([FakeGpu(0, arch="volta"), FakeGpu(1, arch="pascal", ecc=False)], clock=clock)
    sampler = NvmlSampler(fake, clock=clock, wall=clock)
    sampler.open()
    fake.set_load(0, 0.5)
    fake.set_load(1, 0.5)
    sampler.sample()
    clock.t += 2
    s = sampler.sample()
    volta, pascal = s.gpus
    assert volta.power_source == "usage" and "power_average" in volta.unsupported
    assert volta.energy_source == "counter" and volta.energy_counter_j == pytest.approx(175 * 2)
    assert pascal.energy_source == "integrated" and pascal.energy_counter_j is None
    assert pascal.energy_j == pytest.approx(140 * 2)  # 30 + 0.5 * 220 W for 2 s, integrated
    assert pascal.ecc_corrected is None and "ecc" in pascal.unsupported
    calls = fake.calls["nvmlDeviceGetTotalEccErrors"]
    sampler.sample()
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == calls + 2  # not asked again on the board without ECC


def test_transient_field_error_is_recorded_and_retried(clock):
    fake, sampler = make(clock, gpus=1)
    sampler.open()
    fake.inject("nvmlDeviceGetTemperatureV", pynvml.NVML_ERROR_UNKNOWN, times=1)
    s = sampler.sample()
    assert s.gpus[0].temperature_c is None and "temperature_v" in s.gpus[0].errors
    s = sampler.sample()
    assert s.gpus[0].temperature_c is not None and not s.gpus[0].errors
    fake.inject("nvmlDeviceGetClockInfo", pynvml.NVML_ERROR_NO_PERMISSION, times=1)
    s = sampler.sample()
    assert s.gpus[0].errors == {"sm_clock": "no_permission"} and "sm_clock" in s.gpus[0].unsupported


def test_old_driver_without_versioned_temperature_falls_back(clock):
    fake, sampler = make(clock, gpus=1)
    sampler.open()
    fake.inject("nvmlDeviceGetTemperatureV", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, times=None)
    s = sampler.sample()
    assert s.gpus[0].temperature_c == 34.0 and "temperature_v" in s.gpus[0].unsupported
    assert fake.calls["nvmlDeviceGetTemperature"] == 1


def test_counter_and_integral_agree_on_steady_load_and_counter_reset_is_detected(clock):
    fake, sampler = make(clock, gpus=1)
    sampler.open()
    fake.set_load(0, 0.8)
    for _ in range(5):
        sampler.sample()
        clock.t += 1
    s = sampler.sample()
    g = s.gpus[0]
    assert g.energy_counter_j == pytest.approx(g.energy_integrated_j, rel=1e-6)
    assert g.energy_counter_j == pytest.approx((55 + 0.8 * 340) * 5)
    before = g.energy_counter_j
    clock.t += 1
    fake.reload_driver()
    clock.t += 1
    s = sampler.sample()
    assert s.gpus[0].counter_resets == 1
    assert s.gpus[0].energy_counter_j == pytest.approx(before + 327.0)  # only the energy since the reload is added


def test_counter_and_integral_disagree_when_power_changes_between_samples(clock):
    fake, sampler = make(clock, gpus=1)
    sampler.open()
    sampler.sample()
    clock.t += 0.9
    fake.set_load(0, 1.0)  # a burst the 1 s samples mostly miss
    clock.t += 0.1
    fake.set_load(0, 0.0)
    s = sampler.sample()
    g = s.gpus[0]
    assert g.energy_counter_j == pytest.approx(55 * 0.9 + 395 * 0.1, abs=0.01)  # counter is in whole mJ
    assert g.energy_integrated_j == pytest.approx(55.0)
    assert g.energy_j == g.energy_counter_j


def test_xid_and_lost_gpu(clock):
    fake, sampler = make(clock)
    sampler.open()
    fake.inject_xid(1, 79)
    fake.inject_xid(1, 79)
    fake.inject_xid(0, 31)
    fake.lose_gpu(1)
    s = sampler.sample()
    assert [(e.gpu, e.kind, e.code) for e in s.events] == [(1, "xid", 79), (1, "xid", 79), (0, "xid", 31)]
    assert s.gpus[1].lost and s.gpus[1].power_w is None and s.gpus[1].xid_counts == {79: 2}
    assert not s.gpus[0].lost and s.gpus[0].power_w is not None
    s = sampler.sample()
    assert s.events == [] and s.gpus[1].lost  # sticky
    fake.add_ecc_errors(0, corrected=3, uncorrected=1)
    s = sampler.sample()
    assert s.gpus[0].ecc_corrected == 3 and s.gpus[0].ecc_uncorrected == 1
    assert [(e.gpu, e.kind) for e in s.events] == [(0, "ecc_uncorrectable")]


def test_gpu_lost_before_start_is_reported(clock):
    fake, sampler = make(clock)
    fake.lose_gpu(0)
    assert sampler.open() == STATUS_OK
    s = sampler.sample()
    assert s.gpus[0].lost and not s.gpus[1].lost


def test_indices_restrict_the_sampler(clock):
    fake = FakeNvml(4, clock=clock)
    sampler = NvmlSampler(fake, indices=[2, 3, 9], clock=clock, wall=clock)
    sampler.open()
    assert [g.index for g in sampler.sample().gpus] == [2, 3]
    sampler.close()
    assert fake._initialized == 0
