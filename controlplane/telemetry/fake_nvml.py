"""A stateful stand-in for `pynvml`, for machines without an NVIDIA GPU.

`FakeNvml` has the same function surface as the `pynvml` module for everything llmctl calls
(init/shutdown, device handles, power, energy, limits, utilization, memory, temperature,
clocks, clock-event reasons, ECC, XID event sets, field values) and raises the real
`pynvml.NVMLError` subclasses with the real return codes. It is a small physical model, not a
recording:

- Each GPU draws `idle_w + load * (peak_w - idle_w)`, but never more than its power limit; a
  capped GPU lowers its SM clock (`clock ~ ((P - idle) / (demand - idle)) ** (1 / 2.5)`) and
  reports the `SwPowerCap` clock-event reason. `throughput(i)` is the relative work rate, so a
  fake workload runs slower under a cap and uses less energy per unit of work, down to the
  point where idle power dominates (the U-shape a power-limit sweep looks for).
- The energy counter (mJ) integrates the drawn power over the injected clock; a driver reload
  (`reload_driver()`) resets it, like the real one.
- Support follows the architecture: `pascal` has no energy counter, `volta`/`ga100` no 1 s
  power-average field, consumer boards (`ecc=False`) no ECC.

Faults: `inject(func_name, code, times=1, gpu=None)` makes the next calls fail with that NVML
code; `lose_gpu(i)` makes every call on the GPU raise GPU_IS_LOST; `allow_set_limit = False`
answers NO_PERMISSION to limit changes; `library_missing` / `driver_loaded = False` make
`nvmlInit` fail as on a machine without the library or the kernel module. Unknown attribute
names resolve to the real module's constants (NVML_*, nvmlClocksEventReason*, NVMLError*).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

ARCH_PROFILES: dict[str, dict[str, Any]] = {
    # name, default/max limit W, min limit W, peak draw W, idle W, max SM MHz, memory bytes, ECC
    "ampere": dict(name="NVIDIA A100-SXM4-80GB", tdp=400, min_w=100, peak=395, idle=55, mhz=1410, mem=80 << 30),
    "hopper": dict(name="NVIDIA H100 80GB HBM3", tdp=700, min_w=200, peak=690, idle=70, mhz=1980, mem=80 << 30),
    "ga100": dict(name="NVIDIA A100-PCIE-40GB", tdp=250, min_w=150, peak=260, idle=35, mhz=1410, mem=40 << 30),
    "volta": dict(name="Tesla V100-SXM2-32GB", tdp=300, min_w=150, peak=310, idle=40, mhz=1530, mem=32 << 30),
    "pascal": dict(name="Tesla P100-PCIE-16GB", tdp=250, min_w=125, peak=250, idle=30, mhz=1328, mem=16 << 30),
}
CLOCK_EXPONENT = 2.5  # dynamic power ~ f^2.5 over the DVFS range


@dataclass
class FakeGpu:
    index: int
    arch: str = "ampere"
    ecc: bool = True
    uuid: str = ""
    load: float = 0.0
    memory_used: int = 512 << 20
    limit_mw: int = 0
    energy_mj: float = 0.0
    lost: bool = False
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    ecc_aggregate_corrected: int = 0
    ecc_aggregate_uncorrected: int = 0
    unsupported: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.arch not in ARCH_PROFILES:
            raise ValueError(f"unknown fake GPU architecture {self.arch!r}")
        self.profile = ARCH_PROFILES[self.arch]
        self.uuid = self.uuid or f"GPU-fa4e{self.index:04x}-0000-4000-8000-{self.index:012x}"
        self.limit_mw = self.limit_mw or self.profile["tdp"] * 1000
        self.default_limit_mw = self.profile["tdp"] * 1000
        self.handle = SimpleNamespace(fake_gpu_index=self.index)

    # ------------------------------------------------------------ the physical model
    @property
    def demand_w(self) -> float:
        p = self.profile
        return p["idle"] + max(0.0, min(1.0, self.load)) * (p["peak"] - p["idle"])

    @property
    def power_w(self) -> float:
        return min(self.demand_w, self.limit_mw / 1000.0)

    @property
    def capped(self) -> bool:
        return self.demand_w > self.limit_mw / 1000.0 + 1e-9

    @property
    def clock_ratio(self) -> float:
        """SM clock relative to the maximum: 1 uncapped, lower when the limit bites."""
        if not self.capped:
            return 1.0 if self.load > 0 else 0.3
        idle = self.profile["idle"]
        headroom = max(self.limit_mw / 1000.0 - idle, 0.0) / max(self.demand_w - idle, 1e-9)
        return max(0.05, headroom ** (1.0 / CLOCK_EXPONENT))

    @property
    def throughput(self) -> float:
        """Relative rate of useful work (1.0 = uncapped at full load)."""
        return max(0.0, min(1.0, self.load)) * (self.clock_ratio if self.capped else 1.0)


class FakeEventSet:
    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # gpu index -> event type mask
        self.freed = False


class FakeNvml:
    """Use an instance where the `pynvml` module would go: `sampler = NvmlSampler(nvml=FakeNvml(2))`."""

    NVMLError = pynvml.NVMLError

    def __init__(
        self,
        gpus: int | list[FakeGpu] = 1,
        arch: str = "ampere",
        clock: Callable[[], float] = time.monotonic,
        driver_version: str = "550.54.15",
        power_noise_w: float = 0.0,
        seed: int = 0,
    ):
        self._gpus = gpus if isinstance(gpus, list) else [FakeGpu(i, arch=arch) for i in range(gpus)]
        self._clock = clock
        self._last_t = clock()
        self._lock = threading.RLock()
        self._initialized = 0
        self._faults: list[list[Any]] = []  # [func, code, remaining or None, gpu or None]
        self._events: deque[tuple[int, int, int]] = deque()  # (gpu, event type, data)
        self._rng = random.Random(seed)
        self.driver_version = driver_version
        self.power_noise_w = power_noise_w
        self.library_missing = False
        self.driver_loaded = True
        self.allow_set_limit = True
        self.calls: dict[str, int] = {}

    # ------------------------------------------------------------ test controls
    def __getattr__(self, name: str) -> Any:
        if name.startswith("nvml") and callable(getattr(pynvml, name, None)):
            raise AttributeError(f"FakeNvml does not implement {name}")
        try:
            return getattr(pynvml, name)
        except AttributeError:
            raise AttributeError(name) from None

    def gpu(self, index: int) -> FakeGpu:
        return self._gpus[index]

    def set_load(self, index: int, load: float, memory_used: int | None = None) -> None:
        with self._lock:
            self._advance()
            self._gpus[index].load = load
            if memory_used is not None:
                self._gpus[index].memory_used = memory_used

    def set_all_loads(self, load: float) -> None:
        for g in self._gpus:
            self.set_load(g.index, load)

    def throughput(self, index: int) -> float:
        with self._lock:
            return self._gpus[index].throughput

    def inject(self, func: str, code: int, times: int | None = 1, gpu: int | None = None) -> None:
        """The next `times` calls of `func` (on `gpu`, or any) fail with NVML return `code`; None = forever."""
        with self._lock:
            self._faults.append([func, code, times, gpu])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def lose_gpu(self, index: int) -> None:
        with self._lock:
            self._advance()
            self._gpus[index].lost = True

    def inject_xid(self, index: int, xid: int) -> None:
        with self._lock:
            self._events.append((index, pynvml.nvmlEventTypeXidCriticalError, xid))

    def add_ecc_errors(self, index: int, corrected: int = 0, uncorrected: int = 0) -> None:
        with self._lock:
            g = self._gpus[index]
            g.ecc_corrected += corrected
            g.ecc_uncorrected += uncorrected
            g.ecc_aggregate_corrected += corrected
            g.ecc_aggregate_uncorrected += uncorrected
            if uncorrected:
                self._events.append((index, pynvml.nvmlEventTypeDoubleBitEccError, uncorrected))

    def reload_driver(self) -> None:
        """What a driver reload does to the counters: energy and volatile ECC back to zero."""
        with self._lock:
            self._advance()
            for g in self._gpus:
                g.energy_mj = 0.0
                g.ecc_corrected = g.ecc_uncorrected = 0

    # ------------------------------------------------------------ plumbing
    def _advance(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._last_t)
        self._last_t = now
        for g in self._gpus:
            if not g.lost:
                g.energy_mj += g.power_w * dt * 1000.0

    def _enter(self, func: str, handle: Any = None) -> FakeGpu | None:
        """Common checks of every call: injected faults, init state, lost GPU, support."""
        self.calls[func] = self.calls.get(func, 0) + 1
        gpu = None
        if handle is not None:
            idx = getattr(handle, "fake_gpu_index", None)
            if idx is None or not 0 <= idx < len(self._gpus):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            gpu = self._gpus[idx]
        for fault in self._faults:
            name, code, remaining, on_gpu = fault
            if name == func and (on_gpu is None or (gpu is not None and gpu.index == on_gpu)):
                if remaining is not None:
                    fault[2] -= 1
                    if fault[2] <= 0:
                        self._faults.remove(fault)
                raise pynvml.NVMLError(code)
        if func not in ("nvmlInit", "nvmlInitWithFlags") and not self._initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if gpu is not None:
            if gpu.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            if func in gpu.unsupported:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        self._advance()
        return gpu

    # ------------------------------------------------------------ init
    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlInitWithFlags(self, flags: int) -> None:
        with self._lock:
            if self.library_missing:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
            self._enter("nvmlInit")
            if not self.driver_loaded:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
            self._initialized += 1

    def nvmlShutdown(self) -> None:
        with self._lock:
            self._enter("nvmlShutdown")
            self._initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        with self._lock:
            self._enter("nvmlSystemGetDriverVersion")
            return self.driver_version

    # ------------------------------------------------------------ devices
    def nvmlDeviceGetCount(self) -> int:
        with self._lock:
            self._enter("nvmlDeviceGetCount")
            return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        with self._lock:
            self._enter("nvmlDeviceGetHandleByIndex")
            if not 0 <= index < len(self._gpus):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            g = self._gpus[index]
            if g.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return g.handle

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        with self._lock:
            return self._enter("nvmlDeviceGetIndex", handle).index

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        with self._lock:
            return self._enter("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        with self._lock:
            return self._enter("nvmlDeviceGetName", handle).profile["name"]

    # ------------------------------------------------------------ power and energy
    def _power_mw(self, g: FakeGpu) -> int:
        noise = self._rng.uniform(-self.power_noise_w, self.power_noise_w) if self.power_noise_w else 0.0
        return max(0, int(round((g.power_w + noise) * 1000)))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        with self._lock:
            return self._power_mw(self._enter("nvmlDeviceGetPowerUsage", handle))

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        with self._lock:
            g = self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
            if g.arch == "pascal":
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return int(g.energy_mj)

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[int]) -> list[Any]:
        with self._lock:
            g = self._enter("nvmlDeviceGetFieldValues", handle)
            out = []
            for fid in field_ids:
                ret, vtype, value = pynvml.NVML_SUCCESS, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, 0
                power_fields = (pynvml.NVML_FI_DEV_POWER_AVERAGE, pynvml.NVML_FI_DEV_POWER_INSTANT)
                if fid in power_fields and g.arch in ("ampere", "hopper"):
                    value = self._power_mw(g)
                elif fid == pynvml.NVML_FI_DEV_ENERGY and g.arch != "pascal":
                    vtype, value = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, int(g.energy_mj)
                else:
                    ret = pynvml.NVML_ERROR_NOT_SUPPORTED
                val = SimpleNamespace(
                    dVal=float(value), uiVal=value, ulVal=value, ullVal=value, sllVal=value, siVal=value, usVal=value
                )
                out.append(
                    SimpleNamespace(
                        fieldId=fid, scopeId=0, timestamp=int(time.time() * 1e6), latencyUsec=0,
                        valueType=vtype, nvmlReturn=ret, value=val,
                    )
                )  # fmt: skip
            return out

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        with self._lock:
            return self._enter("nvmlDeviceGetPowerManagementLimit", handle).limit_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        with self._lock:
            return self._enter("nvmlDeviceGetEnforcedPowerLimit", handle).limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        with self._lock:
            return self._enter("nvmlDeviceGetPowerManagementDefaultLimit", handle).default_limit_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]:
        with self._lock:
            g = self._enter("nvmlDeviceGetPowerManagementLimitConstraints", handle)
            return [g.profile["min_w"] * 1000, g.profile["tdp"] * 1000]

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit: int) -> None:
        with self._lock:
            g = self._enter("nvmlDeviceSetPowerManagementLimit", handle)
            if not self.allow_set_limit:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
            if not g.profile["min_w"] * 1000 <= int(limit) <= g.profile["tdp"] * 1000:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            g.limit_mw = int(limit)

    # ------------------------------------------------------------ utilization, memory, thermals, clocks
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        with self._lock:
            g = self._enter("nvmlDeviceGetUtilizationRates", handle)
            busy = int(round(100 * max(0.0, min(1.0, g.load))))
            return SimpleNamespace(gpu=busy, memory=busy // 2)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: Any = None) -> Any:
        with self._lock:
            g = self._enter("nvmlDeviceGetMemoryInfo", handle)
            total = g.profile["mem"]
            used = min(g.memory_used, total)
            return SimpleNamespace(total=total, used=used, free=total - used, reserved=0)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        with self._lock:
            g = self._enter("nvmlDeviceGetTemperature", handle)
            if sensor != pynvml.NVML_TEMPERATURE_GPU:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return int(round(28 + 0.1 * g.power_w))

    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int, version: Any = None) -> int:
        with self._lock:
            g = self._enter("nvmlDeviceGetTemperatureV", handle)
            if sensor != pynvml.NVML_TEMPERATURE_GPU:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return int(round(28 + 0.1 * g.power_w))

    def nvmlDeviceGetClockInfo(self, handle: Any, clock_type: int) -> int:
        with self._lock:
            g = self._enter("nvmlDeviceGetClockInfo", handle)
            if clock_type not in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS, pynvml.NVML_CLOCK_MEM):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if clock_type == pynvml.NVML_CLOCK_MEM:
                return 1593
            return int(round(g.profile["mhz"] * g.clock_ratio))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        with self._lock:
            g = self._enter("nvmlDeviceGetCurrentClocksEventReasons", handle)
            reasons = 0
            if g.load <= 0:
                reasons |= pynvml.nvmlClocksEventReasonGpuIdle
            if g.capped:
                reasons |= pynvml.nvmlClocksEventReasonSwPowerCap
            return reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self.nvmlDeviceGetCurrentClocksEventReasons(handle)

    # ------------------------------------------------------------ ECC
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        with self._lock:
            g = self._enter("nvmlDeviceGetTotalEccErrors", handle)
            if not g.ecc:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            volatile = counter_type == pynvml.NVML_VOLATILE_ECC
            if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED:
                return g.ecc_corrected if volatile else g.ecc_aggregate_corrected
            return g.ecc_uncorrected if volatile else g.ecc_aggregate_uncorrected

    # ------------------------------------------------------------ events (XID)
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        with self._lock:
            g = self._enter("nvmlDeviceGetSupportedEventTypes", handle)
            mask = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypePState
            return mask | (
                pynvml.nvmlEventTypeDoubleBitEccError | pynvml.nvmlEventTypeSingleBitEccError if g.ecc else 0
            )

    def nvmlEventSetCreate(self) -> FakeEventSet:
        with self._lock:
            self._enter("nvmlEventSetCreate")
            return FakeEventSet()

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: FakeEventSet) -> None:
        with self._lock:
            g = self._enter("nvmlDeviceRegisterEvents", handle)
            supported = self.nvmlDeviceGetSupportedEventTypes(handle)
            if event_types & ~supported:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            event_set.registered[g.index] = event_set.registered.get(g.index, 0) | int(event_types)

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        """Pops the next pending event of a registered GPU; TIMEOUT when none (without blocking)."""
        with self._lock:
            self._enter("nvmlEventSetWait_v2")
            for i, (gpu, etype, data) in enumerate(itertools.islice(self._events, None)):
                if event_set.registered.get(gpu, 0) & etype:
                    del self._events[i]
                    return SimpleNamespace(
                        device=self._gpus[gpu].handle, eventType=etype, eventData=data,
                        gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF,
                    )  # fmt: skip
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        with self._lock:
            self._enter("nvmlEventSetFree")
            event_set.freed = True
