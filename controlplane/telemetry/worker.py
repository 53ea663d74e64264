"""Everything a training worker does for telemetry, in one call (see the package docstring).

    tel = start_worker_telemetry(run.power, run_dir, attempt, storage_root, measure=run_calibration_steps)
    try:
        ...train...
    finally:
        tel.stop()

finds this worker's GPUs (CUDA_VISIBLE_DEVICES against NVML), claims them for the run so the
node's exporter labels them with `run_id`, applies the power policy, and starts the energy
meter. On a CPU-only worker or without NVML each part is a no-op and `tel.gpus` is empty;
nothing here raises for a missing GPU. Job code may import this module (it needs neither the
ledger nor Ray nor torch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.spec import PowerSpec
from controlplane.telemetry.assignments import Assignment, assign_gpus, cuda_visible_gpus, default_node_name
from controlplane.telemetry.meter import EnergyMeter
from controlplane.telemetry.power import PowerHandle, apply_power_policy
from controlplane.telemetry.power_leases import lease_dir
from controlplane.telemetry.sampler import STATUS_OK, NvmlSampler

log = logging.getLogger(__name__)


@dataclass
class WorkerTelemetry:
    node: str
    gpus: list[tuple[int, str]]
    power: PowerHandle
    meter: EnergyMeter | None
    assignment: Assignment | None
    stopped: bool = False

    def stop(self) -> None:
        """Stop the meter, restore power limits, release the GPUs. Idempotent; never raises."""
        if self.stopped:
            return
        self.stopped = True
        for name, fn in (
            ("energy meter", self.meter.stop if self.meter else None),
            ("power restore", self.power.restore),
            ("assignment release", self.assignment.release if self.assignment else None),
        ):
            if fn is None:
                continue
            try:
                fn()
            except Exception as exc:  # the run's outcome must not depend on telemetry
                log.warning("telemetry: %s failed: %s", name, exc)


def start_worker_telemetry(
    power: PowerSpec,
    run_dir: str | Path,
    attempt: int,
    storage_root: str | Path,
    node: str | None = None,
    measure: Callable[[], tuple[float, float]] | None = None,
    nvml: Any | None = None,
    env: dict[str, str] | None = None,
    meter_interval_s: float = 1.0,
) -> WorkerTelemetry:
    node = node or default_node_name()
    run_dir = Path(run_dir)
    with NvmlSampler(nvml, watch_events=False) as probe:
        gpus = cuda_visible_gpus(probe.identities(), env) if probe.status == STATUS_OK else []
        nvml = probe.nvml
    indices = [i for i, _ in gpus]
    assignment = None
    if gpus:
        try:
            assignment = assign_gpus(storage_root, node, run_dir.name, gpus, attempt=attempt)
        except OSError as exc:
            log.warning("telemetry: cannot record the GPU assignment: %s", exc)
    if power.cap_watts == "auto" and measure is None:
        log.warning("telemetry: cap_watts 'auto' without a calibration callback; limits left alone")
        power = power.model_copy(update={"cap_watts": None})
    handle = apply_power_policy(
        power,
        indices,
        nvml=nvml,
        measure=measure,
        run_dir=run_dir,
        attempt=attempt,
        node=node,
        lease_dir=lease_dir(storage_root, node),
    )
    meter = None
    if gpus:
        meter = EnergyMeter(
            run_dir, attempt, node, indices, nvml=nvml, interval_s=meter_interval_s, assignment=assignment
        )
        meter.start()
    return WorkerTelemetry(node=node, gpus=gpus, power=handle, meter=meter, assignment=assignment)
