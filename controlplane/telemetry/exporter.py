"""The node exporter: `llmctl_gpu_*` metrics of this node's GPUs for Prometheus.

One exporter per node (`llmctl telemetry serve`). A daemon thread samples NVML every
`interval_s` (default 1 s); Prometheus scrapes the latest sample, so a scrape never waits on
NVML. Labels: `cluster`, `node`, `gpu` (NVML index), `gpu_uuid`, and `run_id` when a run's
worker has claimed the GPU (`controlplane.telemetry.assignments`; empty otherwise, which
Prometheus treats as absent). Besides the GPU metrics of DESIGN.md it serves
`llmctl_telemetry_up` (1 when NVML answers), `llmctl_telemetry_info{source,status}`
(`source="fake"` when fed by the fake NVML), `llmctl_gpu_lost` (1 for a GPU NVML lost) and,
for each run on this node, `llmctl_train_energy_joules_per_token{run_id}` (whole-run GPU
energy from the run directory over its tokens, refreshed every `jpt_every_s`).
After each sample the node's health file is updated (`controlplane.telemetry.health`); once
every `leases_every_s` the power limits of GPUs whose capping worker died are given back
(`controlplane.telemetry.power_leases`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from controlplane.rundir import EV_STEP, RunDir
from controlplane.telemetry import power_leases
from controlplane.telemetry.assignments import gpu_runs, read_assignments
from controlplane.telemetry.health import HealthTracker
from controlplane.telemetry.meter import read_energy_records
from controlplane.telemetry.sampler import STATUS_OK, NodeSample, NvmlSampler

log = logging.getLogger(__name__)

GPU_LABELS = ["cluster", "node", "gpu", "gpu_uuid", "run_id"]


class TelemetryExporter:
    def __init__(
        self,
        sampler: NvmlSampler,
        cluster: str,
        node: str,
        storage_root: str | Path | None = None,
        source: str = "nvml",
        interval_s: float = 1.0,
        jpt_every_s: float = 15.0,
        assignments_every_s: float = 5.0,
        leases_every_s: float = 60.0,
    ):
        self.sampler = sampler
        self.cluster = cluster
        self.node = node
        self.storage_root = Path(storage_root).expanduser() if storage_root else None
        self.source = source
        self.interval_s = interval_s
        self.jpt_every_s = jpt_every_s
        self.assignments_every_s = assignments_every_s
        self.leases_every_s = leases_every_s
        self._leases_at: float | None = None
        self._records: list[dict[str, Any]] = []
        self._records_at: float | None = None
        self.health = HealthTracker(self.storage_root, node) if self.storage_root else None
        self._lock = threading.Lock()
        self._sample: NodeSample | None = None
        self._runs: dict[int, str] = {}
        self._xids: dict[tuple[int, int], int] = {}
        self._jpt: dict[str, float] = {}
        self._jpt_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # ------------------------------------------------------------ sampling loop
    def step(self) -> NodeSample:
        """Take one sample and refresh what depends on it (run labels, health, J/token)."""
        sample = self.sampler.sample()
        runs: dict[int, str] = {}
        if self.storage_root is not None:
            now = time.monotonic()
            if self._records_at is None or now - self._records_at >= self.assignments_every_s:
                self._records_at = now  # a directory listing on shared storage: not every second
                try:
                    self._records = read_assignments(self.storage_root, self.node)
                except OSError as exc:
                    log.debug("telemetry: assignments unreadable: %s", exc)
            runs = gpu_runs(self._records, [(g.index, g.uuid) for g in sample.gpus])
            if self._leases_at is None or now - self._leases_at >= self.leases_every_s:
                self._leases_at = now  # GPUs a killed worker left capped get their limit back
                handles = self.sampler.handles()
                uuids = {g.index: g.uuid for g in sample.gpus if g.uuid}
                power_leases.reclaim(
                    power_leases.lease_dir(self.storage_root, self.node), self.sampler.nvml, handles, uuids
                )
            if self.health is not None:
                try:
                    self.health.update(sample)
                except OSError as exc:
                    log.warning("telemetry: cannot write node health: %s", exc)
            now = time.monotonic()
            if now - self._jpt_at >= self.jpt_every_s:
                self._jpt_at = now
                self._jpt = self._joules_per_token(set(runs.values()))
        with self._lock:
            for ev in sample.events:
                if ev.kind == "xid":
                    self._xids[(ev.gpu, ev.code)] = self._xids.get((ev.gpu, ev.code), 0) + 1
            self._sample, self._runs = sample, runs
        return sample

    def _joules_per_token(self, run_ids: set[str]) -> dict[str, float]:
        from controlplane.telemetry.energy import tokens_from_events

        out = {}
        for run_id in sorted(run_ids):
            rd = RunDir.of(self.storage_root, run_id)
            try:
                joules = sum(
                    float(g.get("energy_j") or 0.0) for r in read_energy_records(rd.path) for g in r.get("gpus", [])
                )
                tokens = tokens_from_events(rd.recent_events(types={EV_STEP}))  # cumulative: the end suffices
            except (OSError, ValueError, TypeError):
                continue
            if tokens and joules > 0:
                out[run_id] = joules / tokens
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.step()
            except Exception as exc:  # never let one bad sample kill the exporter
                log.warning("telemetry: sample failed: %s", exc)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def start(self) -> TelemetryExporter:
        if self.sampler.status != STATUS_OK:
            self.sampler.open()
        self.step()
        self._thread = threading.Thread(target=self._loop, name="llmctl-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        self.sampler.close()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, int]:
        """Start the HTTP endpoint; returns (server, bound port). `server.shutdown()` stops it."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)

    # ------------------------------------------------------------ Prometheus collector
    def collect(self) -> Iterator[Any]:
        with self._lock:
            sample, runs, xids, jpt = self._sample, dict(self._runs), dict(self._xids), dict(self._jpt)
        base = [self.cluster, self.node]
        up = GaugeMetricFamily("llmctl_telemetry_up", "1 when NVML answers on this node.", labels=base_l())
        status = sample.status if sample else self.sampler.status
        up.add_metric(base, 1.0 if status == STATUS_OK else 0.0)
        yield up
        info = GaugeMetricFamily(
            "llmctl_telemetry_info",
            "Where this exporter's GPU data comes from.",
            labels=[*base_l(), "source", "status"],
        )
        info.add_metric([*base, self.source, status], 1.0)
        yield info
        if sample is None:
            return

        def g(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=GPU_LABELS + (extra or []))

        fams = {
            "power": g("llmctl_gpu_power_watts", "GPU power draw (1 s average where offered), W."),
            "limit": g("llmctl_gpu_power_limit_watts", "Enforced GPU power limit, W."),
            "util": g("llmctl_gpu_utilization_ratio", "Share of time a kernel was running, 0..1."),
            "mem_used": g("llmctl_gpu_memory_used_bytes", "GPU memory in use, bytes."),
            "mem_total": g("llmctl_gpu_memory_total_bytes", "GPU memory, bytes."),
            "temp": g("llmctl_gpu_temperature_celsius", "GPU temperature, degrees Celsius."),
            "clock": g("llmctl_gpu_sm_clock_hertz", "SM clock, Hz."),
            "throttle": g("llmctl_gpu_throttle_active", "1 while the clock-event reason holds.", ["reason"]),
            "lost": g("llmctl_gpu_lost", "1 when NVML reports the GPU lost (fallen off the bus)."),
        }
        energy = CounterMetricFamily(
            "llmctl_gpu_energy_joules", "GPU energy since the exporter started, J.", labels=GPU_LABELS
        )
        ecc = CounterMetricFamily(
            "llmctl_gpu_ecc_errors", "ECC errors since the driver loaded.", labels=[*GPU_LABELS, "type"]
        )
        xid = CounterMetricFamily(
            "llmctl_gpu_xid_errors", "XID errors seen by this exporter.", labels=[*GPU_LABELS, "xid"]
        )
        for gs in sample.gpus:
            labels = [*base, str(gs.index), gs.uuid, runs.get(gs.index, "")]
            fams["lost"].add_metric(labels, 1.0 if gs.lost else 0.0)
            for (gpu, code), n in sorted(xids.items()):
                if gpu == gs.index:
                    xid.add_metric([*labels, str(code)], float(n))
            if gs.lost:
                continue
            for key, value in (
                ("power", gs.power_w),
                ("limit", gs.power_limit_w),
                ("util", gs.utilization),
                ("mem_used", gs.memory_used_bytes),
                ("mem_total", gs.memory_total_bytes),
                ("temp", gs.temperature_c),
                ("clock", gs.sm_clock_hz),
            ):
                if value is not None:
                    fams[key].add_metric(labels, float(value))
            for reason, active in (gs.throttle or {}).items():
                fams["throttle"].add_metric([*labels, reason], 1.0 if active else 0.0)
            if gs.energy_j is not None:
                energy.add_metric(labels, gs.energy_j)
            if gs.ecc_corrected is not None:
                ecc.add_metric([*labels, "corrected"], float(gs.ecc_corrected))
            if gs.ecc_uncorrected is not None:
                ecc.add_metric([*labels, "uncorrected"], float(gs.ecc_uncorrected))
        yield from fams.values()
        yield energy
        yield ecc
        yield xid
        jpt_fam = GaugeMetricFamily(
            "llmctl_train_energy_joules_per_token",
            "GPU energy per trained token of the run, J.",
            labels=[*base_l(), "run_id"],
        )
        for run_id, value in sorted(jpt.items()):
            jpt_fam.add_metric([*base, run_id], value)
        yield jpt_fam


def base_l() -> list[str]:
    return ["cluster", "node"]
