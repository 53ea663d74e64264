"""Energy accounting of a run: GPU kWh, J/token, W per GPU, facility kWh and kg CO2e.

Inputs are files in the run directory (the job cannot reach the ledger):
`telemetry/energy/*.json` from each worker's `EnergyMeter`, `telemetry/power/*.json` from
`apply_power_policy`, and the cumulative `tokens` of the last `step` event in `events.jsonl`.
`compute_energy_report` is pure; `account_run_energy` reads the files, computes, and upserts
the `run_energy` row of the ledger (migration 0003_telemetry).

The NVML energy counter and the integral of sampled power are both kept and compared over
the GPUs that have both: `disagreement = (counter - integrated) / counter`. They differ when
power changes faster than the sampling interval (Zeus users saw 187 J vs 327 J for one window),
so the counter is the figure reported and the disagreement is recorded next to it.

Facility energy is GPU energy times the cluster's PUE (host CPUs, memory and network are not
metered here, so it is a lower bound); CO2e is facility kWh times the grid's carbon intensity.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controlplane.ledger import Ledger
from controlplane.rundir import EV_STEP, RunDir
from controlplane.telemetry.meter import read_energy_records
from controlplane.telemetry.power import read_power_records

J_PER_KWH = 3.6e6


@dataclass
class EnergyReport:
    run_id: str
    gpus: int
    gpu_seconds: float
    gpu_joules: float
    counter_joules: float | None
    integrated_joules: float | None
    disagreement: float | None
    tokens: int | None
    joules_per_token: float | None
    gpu_kwh: float
    facility_kwh: float
    co2e_kg: float
    avg_power_w: float | None
    pue: float
    carbon_intensity: float
    power: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.gpus > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokens_from_events(events: list[dict[str, Any]]) -> int | None:
    """Cumulative tokens trained: the largest `tokens` of the `step` events (pure)."""
    values = [e.get("tokens") for e in events if e.get("type") == EV_STEP]
    values = [int(v) for v in values if isinstance(v, int | float) and v >= 0]
    return max(values) if values else None


def compute_energy_report(
    run_id: str,
    meter_records: list[dict[str, Any]],
    tokens: int | None,
    pue: float,
    carbon_intensity: float,
    power_records: list[dict[str, Any]] | None = None,
) -> EnergyReport:
    """Sum the meter files of a run into one report (pure)."""
    gpu_keys: set[tuple[str, str]] = set()
    seconds = joules = counter = integrated_same = integrated_all = 0.0
    with_counter = 0
    sources: dict[str, int] = {}
    resets = 0
    for rec in meter_records:
        node = str(rec.get("node") or "")
        for g in rec.get("gpus") or []:
            if not isinstance(g, dict) or not g.get("samples"):
                continue
            gpu_keys.add((node, str(g.get("uuid") or g.get("index"))))
            seconds += float(g.get("seconds") or 0.0)
            e = float(g.get("energy_j") or 0.0)
            joules += e
            integ = float(g.get("integrated_j") or 0.0)
            integrated_all += integ
            if g.get("counter_j") is not None:
                with_counter += 1
                counter += float(g["counter_j"])
                integrated_same += integ
            src = str(g.get("source") or "integrated")
            sources[src] = sources.get(src, 0) + 1
            resets += int(g.get("counter_resets") or 0)
    disagreement = (counter - integrated_same) / counter if with_counter and counter > 0 else None
    gpu_kwh = joules / J_PER_KWH
    facility_kwh = gpu_kwh * pue
    return EnergyReport(
        run_id=run_id,
        gpus=len(gpu_keys),
        gpu_seconds=seconds,
        gpu_joules=joules,
        counter_joules=counter if with_counter else None,
        integrated_joules=integrated_same if with_counter else (integrated_all if gpu_keys else None),
        disagreement=disagreement,
        tokens=tokens,
        joules_per_token=joules / tokens if tokens and joules > 0 else None,
        gpu_kwh=gpu_kwh,
        facility_kwh=facility_kwh,
        co2e_kg=facility_kwh * carbon_intensity,
        avg_power_w=joules / seconds if seconds > 0 else None,
        pue=pue,
        carbon_intensity=carbon_intensity,
        power=[
            {k: r.get(k) for k in ("attempt", "node", "status", "applied_limit_w", "message", "choice", "calibration")}
            for r in power_records or []
        ],
        detail={"meter_files": len(meter_records), "sources": sources, "counter_resets": resets},
    )


# --------------------------------------------------------------------------- ledger


def record_run_energy(ledger: Ledger, report: EnergyReport) -> None:
    row = (
        report.run_id, report.gpus, report.gpu_seconds, report.gpu_joules, report.counter_joules,
        report.integrated_joules, report.disagreement, report.tokens, report.joules_per_token, report.gpu_kwh,
        report.facility_kwh, report.co2e_kg, report.avg_power_w, report.pue, report.carbon_intensity,
        json.dumps(report.power, default=str), json.dumps(report.detail, default=str), time.time(),
    )  # fmt: skip
    with ledger.tx() as c:
        c.execute(f"INSERT OR REPLACE INTO run_energy VALUES ({', '.join('?' * len(row))})", row)


def get_run_energy(ledger: Ledger, run_id: str) -> dict[str, Any] | None:
    rows = ledger.query("SELECT * FROM run_energy WHERE run_id = ?", (run_id,))
    return rows[0] if rows else None


def account_run_energy(
    ledger: Ledger, run_id: str, run_dir: str | Path, pue: float, carbon_intensity: float
) -> EnergyReport:
    """Read the run directory, compute the report, and upsert it into the ledger."""
    rd = RunDir(Path(run_dir))
    report = compute_energy_report(
        run_id,
        read_energy_records(rd.path),
        tokens_from_events(rd.events({EV_STEP})),
        pue,
        carbon_intensity,
        read_power_records(rd.path),
    )
    record_run_energy(ledger, report)
    return report


def summary_line(report: EnergyReport) -> str:
    """One line for the quickstart summary and `run status`."""
    if not report.measured:
        return "energy: not measured (no GPU telemetry for this run)"
    jpt = f", {report.joules_per_token:.3g} J/token" if report.joules_per_token else ""
    watts = f", {report.avg_power_w:.0f} W/GPU avg" if report.avg_power_w else ""
    cap = next((p for p in report.power if p.get("applied_limit_w")), None)
    cap_txt = f", cap {cap['applied_limit_w']:.0f} W" if cap else ""
    return (
        f"energy: {report.gpu_kwh:.4g} kWh GPU on {report.gpus} GPU(s){jpt}{watts}{cap_txt}; "
        f"{report.facility_kwh:.4g} kWh facility (PUE {report.pue:g}), {report.co2e_kg:.3g} kg CO2e"
    )


def run_energy_summary(context: Any, run_id: str) -> str:
    """`summary_line` for a run of a `controlplane.context.Context` (accounts it into the ledger first)."""
    row = context.ledger.get_run(run_id)
    report = account_run_energy(
        context.ledger, run_id, row["run_dir"], context.cluster.pue, context.cluster.carbon_intensity_kg_per_kwh
    )
    return summary_line(report)
