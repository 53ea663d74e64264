"""NVML sampling: one `NodeSample` of every GPU on this node, whatever NVML can or cannot answer.

`NvmlSampler(nvml)` takes the NVML module as a parameter: the real `pynvml` (the default, from
`load_nvml()`) or `controlplane.telemetry.fake_nvml.FakeNvml`. Per GPU it reads

- power: the 1 s average field (`NVML_FI_DEV_POWER_AVERAGE`, Ampere except GA100 and newer),
  else `nvmlDeviceGetPowerUsage` (a 1 s average on those GPUs, instantaneous on older ones);
- energy: the cumulative counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ, Volta and newer,
  reset by a driver reload: a decrease is counted as a reset), and always also the trapezoidal
  integral of the power samples, so the two can be cross-checked; where the counter is missing
  the integral is the energy;
- power limit (enforced), its constraints and default; utilization; memory; temperature; SM
  clock; clock-event (throttle) reasons; volatile ECC counts;
- XID and double-bit-ECC events from an NVML event set, polled without blocking.

Every NVML failure is handled. At start: library not found, driver not loaded, no permission,
no GPU all give a status and a one-line message, never an exception. Per field: NOT_SUPPORTED
marks the field unsupported for that GPU (it is not asked again), NO_PERMISSION likewise,
anything else is recorded and retried next time. GPU_IS_LOST marks the GPU lost (sticky): it
stays in the sample with `lost=True` so the health check and the exporter can say so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.telemetry.nvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_XID,
    MAX_EVENTS_PER_POLL,
    THROTTLE_REASONS,
    field_value,
    handle_key,
    load_nvml,
    nvml_error_kind,
    text,
)

log = logging.getLogger(__name__)

__all__ = ["NvmlSampler", "NodeSample", "GpuSample", "GpuEvent", "load_nvml", "nvml_error_kind", "THROTTLE_REASONS"]

STATUS_OK = "ok"
STATUS_NO_LIBRARY = "no_library"
STATUS_NO_DRIVER = "no_driver"
STATUS_NO_PERMISSION = "no_permission"
STATUS_NO_GPU = "no_gpu"
STATUS_ERROR = "error"


@dataclass
class GpuSample:
    index: int
    uuid: str = ""
    name: str = ""
    lost: bool = False
    power_w: float | None = None
    power_source: str | None = None  # "average" | "usage"
    energy_j: float | None = None  # since the sampler started: counter if supported, else integrated
    energy_counter_j: float | None = None
    energy_integrated_j: float = 0.0
    energy_source: str | None = None  # "counter" | "integrated"
    counter_resets: int = 0
    power_limit_w: float | None = None
    power_limit_min_w: float | None = None
    power_limit_max_w: float | None = None
    power_limit_default_w: float | None = None
    utilization: float | None = None  # ratio 0..1
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    sm_clock_hz: float | None = None
    throttle: dict[str, bool] | None = None
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    xid_counts: dict[int, int] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class GpuEvent:
    gpu: int
    kind: str  # "xid" | "ecc_uncorrectable"
    code: int  # the XID number, or the error count
    ts: float


@dataclass
class NodeSample:
    ts: float
    status: str
    message: str = ""
    driver_version: str | None = None
    gpus: list[GpuSample] = field(default_factory=list)
    events: list[GpuEvent] = field(default_factory=list)  # new since the previous sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Lost(Exception):
    pass


@dataclass
class _Gpu:
    index: int
    handle: Any = None
    uuid: str = ""
    name: str = ""
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    last_counter_mj: int | None = None
    counter_j: float | None = None
    counter_resets: int = 0
    integrated_j: float = 0.0
    last_power_w: float | None = None
    last_t: float | None = None
    constraints: tuple[float | None, float | None, float | None] | None = None
    xid_counts: dict[int, int] = field(default_factory=dict)


class NvmlSampler:
    """Samples the GPUs of this node through `nvml` (real pynvml or FakeNvml). Thread-safe."""

    def __init__(
        self,
        nvml: Any | None = None,
        indices: list[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        retry_open_s: float = 30.0,
        watch_events: bool = True,
    ):
        self.nvml = nvml if nvml is not None else load_nvml()
        self.indices = indices
        self._clock = clock
        self._wall = wall
        self._retry_open_s = retry_open_s
        self._watch_events = watch_events
        self._lock = threading.RLock()
        self._gpus: list[_Gpu] = []
        self._event_set: Any = None
        self._initialized = False
        self._last_open: float | None = None
        self.status = STATUS_ERROR
        self.message = "not opened"
        self.driver_version: str | None = None

    # ------------------------------------------------------------ lifecycle
    def open(self) -> str:
        """Initialize NVML and find the GPUs. Returns the status; never raises for an NVML problem."""
        with self._lock:
            self._last_open = self._clock()
            nvml = self.nvml
            if nvml is None:
                return self._set(STATUS_NO_LIBRARY, "nvidia-ml-py (pynvml) is not installed: no GPU telemetry")
            try:
                nvml.nvmlInit()
            except Exception as exc:  # NVMLError, or OSError from a broken library
                kind = nvml_error_kind(nvml, exc)
                if kind == "library_not_found":
                    return self._set(STATUS_NO_LIBRARY, "NVML library not found (no NVIDIA driver on this machine)")
                if kind == "driver_not_loaded":
                    return self._set(STATUS_NO_DRIVER, "NVIDIA driver not loaded: no GPU telemetry")
                if kind == "no_permission":
                    return self._set(STATUS_NO_PERMISSION, "no permission to open NVML")
                return self._set(STATUS_ERROR, f"NVML init failed: {exc}")
            self._initialized = True
            try:
                self.driver_version = text(nvml.nvmlSystemGetDriverVersion())
            except Exception:
                self.driver_version = None
            try:
                count = nvml.nvmlDeviceGetCount()
            except Exception as exc:
                return self._set(STATUS_ERROR, f"NVML device count failed: {exc}")
            wanted = range(count) if self.indices is None else [i for i in self.indices if 0 <= i < count]
            if not wanted:
                return self._set(STATUS_NO_GPU, "no NVIDIA GPU on this node" if count == 0 else "no such GPU index")
            self._gpus = [self._open_gpu(i) for i in wanted]
            if self._watch_events:
                self._open_events()
            return self._set(STATUS_OK, f"{len(self._gpus)} GPU(s), driver {self.driver_version or 'unknown'}")

    def close(self) -> None:
        with self._lock:
            if self._event_set is not None:
                with contextlib.suppress(Exception):
                    self.nvml.nvmlEventSetFree(self._event_set)
                self._event_set = None
            if self._initialized:
                with contextlib.suppress(Exception):
                    self.nvml.nvmlShutdown()
                self._initialized = False

    def __enter__(self) -> NvmlSampler:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _set(self, status: str, message: str) -> str:
        if status != self.status or message != self.message:
            (log.warning if status == STATUS_ERROR else log.info)("telemetry: %s", message)
        self.status, self.message = status, message
        return status

    def _open_gpu(self, index: int) -> _Gpu:
        g = _Gpu(index=index)
        try:
            g.handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            if nvml_error_kind(self.nvml, exc) == "gpu_lost":
                g.lost = True
            g.errors["handle"] = str(exc)
            return g
        try:
            g.uuid = text(self.nvml.nvmlDeviceGetUUID(g.handle))
            g.name = text(self.nvml.nvmlDeviceGetName(g.handle))
        except Exception as exc:
            if nvml_error_kind(self.nvml, exc) == "gpu_lost":
                g.lost = True
            g.errors["identity"] = str(exc)
        return g

    def _open_events(self) -> None:
        nvml = self.nvml
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except Exception as exc:
            log.warning("telemetry: NVML event set unavailable (%s): XID events not watched", exc)
            return
        for g in self._gpus:
            if g.handle is None or g.lost:
                continue
            try:
                mask = nvml.nvmlDeviceGetSupportedEventTypes(g.handle) & (EVENT_XID | EVENT_DOUBLE_BIT_ECC)
                if mask:
                    nvml.nvmlDeviceRegisterEvents(g.handle, mask, self._event_set)
                else:
                    g.unsupported.add("events")
            except Exception as exc:
                if nvml_error_kind(nvml, exc) == "gpu_lost":
                    g.lost = True
                g.unsupported.add("events")

    # ------------------------------------------------------------ sampling
    def sample(self) -> NodeSample:
        with self._lock:
            if self.status != STATUS_OK:
                if self._last_open is None or self._clock() - self._last_open >= self._retry_open_s:
                    self.close()
                    self.open()
                if self.status != STATUS_OK:
                    return NodeSample(ts=self._wall(), status=self.status, message=self.message)
            events = self._poll_events()
            gpus = [self._sample_gpu(g) for g in self._gpus]
            return NodeSample(
                ts=self._wall(),
                status=self.status,
                message=self.message,
                driver_version=self.driver_version,
                gpus=gpus,
                events=events,
            )

    def _read(self, g: _Gpu, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One NVML call for one field; None when it cannot be answered (and why is recorded)."""
        if key in g.unsupported:
            return None
        try:
            value = fn(g.handle, *args)
        except Exception as exc:
            kind = nvml_error_kind(self.nvml, exc)
            if kind == "gpu_lost":
                g.lost = True
                raise _Lost from None
            if kind in ("not_supported", "no_permission", "function_not_found"):
                g.unsupported.add(key)
                if kind != "not_supported":
                    g.errors[key] = kind
            else:
                g.errors[key] = f"{kind}: {exc}"
            return None
        g.errors.pop(key, None)
        return value

    def _sample_gpu(self, g: _Gpu) -> GpuSample:
        s = GpuSample(index=g.index, uuid=g.uuid, name=g.name)
        if not g.lost and g.handle is not None:
            with contextlib.suppress(_Lost):
                self._fill(g, s)
        s.lost = g.lost
        s.counter_resets = g.counter_resets
        s.xid_counts = dict(g.xid_counts)
        s.unsupported = sorted(g.unsupported)
        s.errors = dict(g.errors)
        return s

    def _fill(self, g: _Gpu, s: GpuSample) -> None:
        nvml = self.nvml
        now = self._clock()
        # power: the 1 s average field where offered, else nvmlDeviceGetPowerUsage
        power_mw = None
        if "power_average" not in g.unsupported:
            fv = self._read(g, "power_average", nvml.nvmlDeviceGetFieldValues, [nvml.NVML_FI_DEV_POWER_AVERAGE])
            if fv is not None:
                if fv[0].nvmlReturn == nvml.NVML_SUCCESS:
                    power_mw, s.power_source = field_value(nvml, fv[0]), "average"
                elif fv[0].nvmlReturn == getattr(nvml, "NVML_ERROR_GPU_IS_LOST", -1):
                    g.lost = True
                    raise _Lost
                else:
                    g.unsupported.add("power_average")
        if power_mw is None:
            power_mw = self._read(g, "power_usage", nvml.nvmlDeviceGetPowerUsage)
            s.power_source = "usage" if power_mw is not None else None
        s.power_w = power_mw / 1000.0 if power_mw is not None else None

        # energy: the counter (deltas, resets detected) and the integral of power, side by side
        counter = self._read(g, "energy_counter", nvml.nvmlDeviceGetTotalEnergyConsumption)
        if counter is not None:
            if g.last_counter_mj is None:
                g.counter_j = 0.0
            elif counter < g.last_counter_mj:
                g.counter_resets += 1
                g.counter_j = (g.counter_j or 0.0) + counter / 1000.0
            else:
                g.counter_j = (g.counter_j or 0.0) + (counter - g.last_counter_mj) / 1000.0
            g.last_counter_mj = counter
        if s.power_w is not None:
            if g.last_power_w is not None and g.last_t is not None:
                g.integrated_j += (s.power_w + g.last_power_w) / 2.0 * max(0.0, now - g.last_t)
            g.last_power_w, g.last_t = s.power_w, now
        else:
            g.last_power_w = g.last_t = None
        s.energy_counter_j = g.counter_j
        s.energy_integrated_j = g.integrated_j
        if g.counter_j is not None and "energy_counter" not in g.unsupported:
            s.energy_j, s.energy_source = g.counter_j, "counter"
        else:
            s.energy_j, s.energy_source = g.integrated_j, "integrated"

        # limits
        limit = self._read(g, "power_limit", nvml.nvmlDeviceGetEnforcedPowerLimit)
        if limit is None:
            limit = self._read(g, "power_limit_setting", nvml.nvmlDeviceGetPowerManagementLimit)
        s.power_limit_w = limit / 1000.0 if limit is not None else None
        if g.constraints is None:
            c = self._read(g, "power_limit_constraints", nvml.nvmlDeviceGetPowerManagementLimitConstraints)
            d = self._read(g, "power_limit_default", nvml.nvmlDeviceGetPowerManagementDefaultLimit)
            g.constraints = (
                c[0] / 1000.0 if c else None,
                c[1] / 1000.0 if c else None,
                d / 1000.0 if d is not None else None,
            )
        s.power_limit_min_w, s.power_limit_max_w, s.power_limit_default_w = g.constraints

        util = self._read(g, "utilization", nvml.nvmlDeviceGetUtilizationRates)
        s.utilization = util.gpu / 100.0 if util is not None else None
        mem = self._read(g, "memory", nvml.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            s.memory_used_bytes, s.memory_total_bytes = int(mem.used), int(mem.total)
        temp = None
        if hasattr(nvml, "nvmlDeviceGetTemperatureV"):  # the versioned call; the plain one goes in CUDA 14
            temp = self._read(g, "temperature_v", nvml.nvmlDeviceGetTemperatureV, nvml.NVML_TEMPERATURE_GPU)
        if temp is None and (not hasattr(nvml, "nvmlDeviceGetTemperatureV") or "temperature_v" in g.unsupported):
            temp = self._read(g, "temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        s.temperature_c = float(temp) if temp is not None else None
        mhz = self._read(g, "sm_clock", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
        s.sm_clock_hz = float(mhz) * 1e6 if mhz is not None else None
        reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)  # older bindings: Throttle
        reasons = self._read(g, "throttle", reasons_fn or nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        if reasons is None and "throttle" in g.unsupported and "throttle_legacy" not in g.unsupported:
            reasons = self._read(g, "throttle_legacy", nvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        if reasons is not None:
            s.throttle = {name: bool(reasons & bit) for name, bit in THROTTLE_REASONS.items()}
        s.ecc_corrected = self._read(
            g, "ecc", nvml.nvmlDeviceGetTotalEccErrors, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC
        )
        if s.ecc_corrected is not None:
            s.ecc_uncorrected = self._read(
                g,
                "ecc",
                nvml.nvmlDeviceGetTotalEccErrors,
                nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                nvml.NVML_VOLATILE_ECC,
            )

    def _poll_events(self) -> list[GpuEvent]:
        if self._event_set is None:
            return []
        nvml, out = self.nvml, []
        for _ in range(MAX_EVENTS_PER_POLL):
            try:
                data = nvml.nvmlEventSetWait_v2(self._event_set, 0)
            except Exception as exc:
                if nvml_error_kind(nvml, exc) != "timeout":
                    log.debug("telemetry: event wait failed: %s", exc)
                break
            g = self._gpu_of_handle(data.device)
            gpu_index = g.index if g is not None else -1
            if int(data.eventType) & EVENT_XID:
                xid = int(data.eventData)
                if g is not None:
                    g.xid_counts[xid] = g.xid_counts.get(xid, 0) + 1
                out.append(GpuEvent(gpu=gpu_index, kind="xid", code=xid, ts=self._wall()))
            elif int(data.eventType) & EVENT_DOUBLE_BIT_ECC:
                out.append(GpuEvent(gpu=gpu_index, kind="ecc_uncorrectable", code=int(data.eventData), ts=self._wall()))
        return out

    def _gpu_of_handle(self, handle: Any) -> _Gpu | None:
        key = handle_key(handle)
        for g in self._gpus:
            if g.handle is not None and handle_key(g.handle) == key:
                return g
        try:
            index = self.nvml.nvmlDeviceGetIndex(handle)
        except Exception:
            try:
                uuid = text(self.nvml.nvmlDeviceGetUUID(handle))
            except Exception:
                return None
            return next((g for g in self._gpus if g.uuid == uuid), None)
        return next((g for g in self._gpus if g.index == index), None)

    # ------------------------------------------------------------ for the power policy
    def handles(self) -> dict[int, Any]:
        with self._lock:
            return {g.index: g.handle for g in self._gpus if g.handle is not None and not g.lost}

    def identities(self) -> list[tuple[int, str]]:
        with self._lock:
            return [(g.index, g.uuid) for g in self._gpus]
