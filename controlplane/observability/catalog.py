"""What llmctl's dashboards and alert rules may query: metric names and the exporter behind each.

The names are the ones DESIGN.md fixes. Each belongs to one source, the process that exports
it: `gpu` (the node telemetry exporter, `llmctl telemetry serve`), `train` (rank 0 of a training
job), `energy` (the node exporter, from the energy records a run's meter writes) or `serve` (a
serving replica). A panel is generated only when its source is in
`EXPORTED_SOURCES`, so no dashboard ships a panel that no exporter can fill.
"""

from __future__ import annotations

import re

GPU_METRICS = (
    "llmctl_gpu_power_watts",
    "llmctl_gpu_energy_joules_total",
    "llmctl_gpu_power_limit_watts",
    "llmctl_gpu_utilization_ratio",
    "llmctl_gpu_memory_used_bytes",
    "llmctl_gpu_memory_total_bytes",
    "llmctl_gpu_temperature_celsius",
    "llmctl_gpu_sm_clock_hertz",
    "llmctl_gpu_throttle_active",
    "llmctl_gpu_ecc_errors_total",
    "llmctl_gpu_xid_errors_total",
    "llmctl_telemetry_up",
)
TRAIN_METRICS = (
    "llmctl_train_step",
    "llmctl_train_tokens_total",
    "llmctl_train_loss",
    "llmctl_train_tokens_per_second",
    "llmctl_train_mfu_ratio",
    "llmctl_train_restarts_total",
    "llmctl_train_goodput_ratio",
    "llmctl_train_checkpoint_seconds",
)
# Served by the node telemetry exporter from a run's energy records (written by the job's energy meter).
ENERGY_METRICS = ("llmctl_train_energy_joules_per_token",)
SERVE_METRICS = (
    "llmctl_serve_requests_total",
    "llmctl_serve_request_duration_seconds",
    "llmctl_serve_tokens_total",
    "llmctl_serve_time_to_first_token_seconds",
    "llmctl_serve_inter_token_latency_seconds",
    "llmctl_serve_kv_cache_usage_ratio",
    "llmctl_serve_running_requests",
    "llmctl_serve_waiting_requests",
    "llmctl_serve_running_requests_peak",
    "llmctl_rollout_traffic_ratio",
)

SOURCES: dict[str, tuple[str, ...]] = {
    "gpu": GPU_METRICS,
    "train": TRAIN_METRICS,
    "energy": ENERGY_METRICS,
    "serve": SERVE_METRICS,
}

# Sources with an exporter in this tree; panels of the others are left out of the dashboards.
EXPORTED_SOURCES: frozenset[str] = frozenset({"gpu", "train", "energy", "serve"})

# Prometheus scrape job names the alert rules use for `up`.
SCRAPE_JOBS = {"gpu": "llmctl-telemetry", "train": "llmctl-train", "serve": "llmctl-serve"}

_NAME = re.compile(r"\bllmctl_[a-z_]+\b")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def base_metric(name: str) -> str:
    """`llmctl_serve_request_duration_seconds_bucket` -> `llmctl_serve_request_duration_seconds`."""
    known = {m for names in SOURCES.values() for m in names}
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name


def metrics_in(expr: str) -> set[str]:
    """The llmctl metric names an expression reads (histogram series folded to their base name)."""
    return {base_metric(m) for m in _NAME.findall(expr)}


def source_of(metric: str) -> str:
    metric = base_metric(metric)
    for source, names in SOURCES.items():
        if metric in names:
            return source
    raise KeyError(f"{metric}: not a metric DESIGN.md lists")
