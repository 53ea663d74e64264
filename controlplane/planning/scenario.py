"""From specs, flags and (optionally) a measured run to one simulator configuration.

Precedence for each cost: an explicit flag, else the measured value from `--calibrate RUN`,
else the planner's model. The `sources` map says where each figure came from, so a printed
goodput never hides an assumption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from controlplane.planning.calibrate import Calibration
from controlplane.planning.plan import Plan, checkpoint_interval_s
from controlplane.planning.simulate import SimConfig
from controlplane.spec import ClusterSpec, RunSpec

DEFAULT_RESTART_S = 600.0  # submit -> first step of a restarted attempt, until a run measures it
DEFAULT_DETECT_S = 30.0  # a crashed job noticed by the supervisor


@dataclass(frozen=True)
class CostFlags:
    restart_s: float | None = None
    detect_s: float | None = None
    node_replace_s: float = 0.0
    checkpoint_stall_s: float | None = None
    interval_steps: int | None = None
    days: float = 30.0
    max_events: int = 200_000


@dataclass
class Scenario:
    config: SimConfig
    mtbf_s: float
    young_daly_steps: int
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "config": asdict(self.config),
            "cluster_mtbf_hours": self.mtbf_s / 3600,
            "young_daly_steps": self.young_daly_steps,
            "sources": self.sources,
            "notes": self.notes,
        }


def _same_workload(cal: Calibration, run: RunSpec) -> bool:
    spec = cal.spec.get("run", cal.spec) if isinstance(cal.spec, dict) else {}
    if not isinstance(spec, dict):
        return False
    keys = ("model", "train", "workers", "parallelism")
    mine = run.model_dump(mode="json")
    return all(k in spec for k in keys[:3]) and all(spec.get(k) == mine.get(k) for k in keys if k in spec)


def build(plan: Plan, run: RunSpec, cluster: ClusterSpec, flags: CostFlags, cal: Calibration | None = None) -> Scenario:
    sources: dict[str, str] = {}
    notes: list[str] = []

    def pick(name: str, flag: float | None, measured: float | None, modelled: float, what: str) -> float:
        if flag is not None:
            sources[name] = "flag"
            return flag
        if measured is not None:
            sources[name] = f"measured ({cal.run_id})" if cal else "measured"
            return measured
        sources[name] = what
        return modelled

    step_s = plan.step_seconds
    if cal and cal.step_s:
        if _same_workload(cal, run):
            step_s = cal.step_s
            sources["step_s"] = f"measured ({cal.run_id})"
        else:
            notes.append(f"step time of {cal.run_id} not used: it trained a different model, batch or worker count")
    sources.setdefault("step_s", f"planned at MFU {plan.mfu:.2f}")
    m = cal if cal else None
    stall = pick(
        "checkpoint_stall_s",
        flags.checkpoint_stall_s,
        m.checkpoint_stall_s if m else None,
        plan.checkpoint_stall_seconds,
        "planned",
    )
    persist = max(stall, plan.checkpoint_persist_seconds)
    sources["checkpoint_persist_s"] = "planned from storage.write_bandwidth_gbps"
    detect = pick("detect_s", flags.detect_s, m.detect_s if m else None, DEFAULT_DETECT_S, "default")
    restart = pick("restart_s", flags.restart_s, m.restart_s if m else None, DEFAULT_RESTART_S, "default")
    mtbf_s = plan.cluster_mtbf_hours * 3600.0
    yd_s = checkpoint_interval_s(stall, mtbf_s, persist, step_s)
    work_steps = plan.steps
    yd_steps = work_steps if math.isinf(yd_s) else max(1, min(work_steps, math.ceil(yd_s / step_s)))
    if flags.interval_steps is not None:
        interval, sources["interval_steps"] = flags.interval_steps, "flag"
    elif run.checkpoint.interval_steps == "auto":
        interval, sources["interval_steps"] = yd_steps, "auto (Young/Daly)"
    else:
        interval, sources["interval_steps"] = int(run.checkpoint.interval_steps), "run spec"
    groups = [g for g in cluster.node_groups if g.role == "train" and g.gpus_per_node > 0]
    per_node = groups[0].gpus_per_node if groups else 8
    cfg = SimConfig(
        work_s=work_steps * step_s,
        step_s=step_s,
        interval_steps=max(1, interval),
        stall_s=stall,
        persist_s=persist,
        detect_s=detect,
        restart_s=restart,
        node_replace_s=flags.node_replace_s,
        gpus=plan.gpus,
        nodes=max(1, math.ceil(plan.gpus / per_node)),
        horizon_s=flags.days * 86400.0,
        keep_last=run.checkpoint.keep_last,
        max_events=flags.max_events,
    )
    return Scenario(cfg, mtbf_s, yd_steps, sources, notes)
