"""NVML access shared by the sampler and the power policy: loading pynvml, naming errors, reading field values."""

from __future__ import annotations

import ctypes
from typing import Any

# nvmlClocksEventReason* bit -> the `reason` label of llmctl_gpu_throttle_active.
THROTTLE_REASONS: dict[str, int] = {
    "gpu_idle": 0x1,
    "applications_clocks": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
    "display_clocks": 0x100,
}
EVENT_XID = 0x8  # nvmlEventTypeXidCriticalError
EVENT_DOUBLE_BIT_ECC = 0x2  # nvmlEventTypeDoubleBitEccError
MAX_EVENTS_PER_POLL = 256


def load_nvml() -> Any | None:
    """The real `pynvml` module (nvidia-ml-py), or None if the package is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def nvml_error_kind(nvml: Any, exc: BaseException) -> str:
    """A short name for an NVML error: not_supported, no_permission, gpu_lost, timeout, ..."""
    if type(exc).__name__ == "NVMLLibraryMismatchError":  # an unversioned call the library lacks
        return "function_not_found"
    code = getattr(exc, "value", None)
    names = {
        "NVML_ERROR_NOT_SUPPORTED": "not_supported",
        "NVML_ERROR_NO_PERMISSION": "no_permission",
        "NVML_ERROR_GPU_IS_LOST": "gpu_lost",
        "NVML_ERROR_LIBRARY_NOT_FOUND": "library_not_found",
        "NVML_ERROR_DRIVER_NOT_LOADED": "driver_not_loaded",
        "NVML_ERROR_TIMEOUT": "timeout",
        "NVML_ERROR_UNINITIALIZED": "uninitialized",
        "NVML_ERROR_FUNCTION_NOT_FOUND": "function_not_found",
        "NVML_ERROR_INVALID_ARGUMENT": "invalid_argument",
        "NVML_ERROR_RESET_REQUIRED": "reset_required",
    }
    for const, kind in names.items():
        if code is not None and code == getattr(nvml, const, object()):
            return kind
    return "unknown"


def handle_key(handle: Any) -> Any:
    """Identity of a device handle: the pointer value of a real one, the object of a fake one."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def field_value(nvml: Any, fv: Any) -> float:
    """The value of an nvmlFieldValue_t by its valueType (which varies by driver)."""
    by_type = {
        getattr(nvml, "NVML_VALUE_TYPE_DOUBLE", 0): "dVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_INT", 1): "uiVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG", 2): "ulVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3): "ullVal",
        getattr(nvml, "NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4): "sllVal",
        getattr(nvml, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
    }
    return float(getattr(fv.value, by_type.get(int(fv.valueType), "uiVal")))
