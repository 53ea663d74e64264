"""Measured costs from a real run: step time, checkpoint blocking/persist time, recovery times.

Reads the run's `events.jsonl` (controlplane.rundir) and its ledger rows (attempts, checkpoints),
tolerating fields it does not know and events it cannot use:
- step time: the median of (ts difference / step difference) between consecutive `step` events
  of one attempt;
- checkpoint blocking and persist: `checkpoint` events' `blocking_s` and `persist_s` (also
  `save_seconds`/`seconds`), else the ledger's `checkpoints.save_seconds`;
- detection: the next attempt's submission (ledger `attempts.started_at`) minus the failure
  (the attempt's last `failure` event, else the ledger's `ended_at`), less the policy's first backoff;
- restart: the first `step` (or `start`) event of an attempt minus its submission.
Medians, so one odd restart does not skew the figure.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from controlplane.errors import UserError
from controlplane.rundir import EV_CHECKPOINT, EV_FAILURE, EV_START, EV_STEP, RunDir


@dataclass
class Calibration:
    run_id: str
    step_s: float | None = None
    checkpoint_stall_s: float | None = None
    checkpoint_persist_s: float | None = None
    detect_s: float | None = None
    restart_s: float | None = None
    samples: dict[str, int] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("spec")
        return d


def _num(event: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = event.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
            return float(v)
    return None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def calibrate(
    run_dir: RunDir, attempts: list[dict[str, Any]], checkpoints: list[dict[str, Any]], backoff_s: float = 0.0
) -> Calibration:
    if not run_dir.path.exists():
        raise UserError(f"--calibrate: no run directory {run_dir.path}")
    events = run_dir.events()
    cal = Calibration(run_id=run_dir.run_id)
    try:
        cal.spec = run_dir.read_spec()
    except UserError:
        cal.spec = {}

    step_dts: list[float] = []
    last_step: dict[int, tuple[float, int]] = {}
    first_live: dict[int, float] = {}
    last_failure: dict[int, float] = {}
    stalls: list[float] = []
    persists: list[float] = []
    for ev in events:
        ts, attempt, kind = ev.get("ts"), ev.get("attempt"), ev.get("type")
        if not isinstance(ts, int | float) or not isinstance(attempt, int):
            continue
        if kind == EV_STEP and isinstance(ev.get("step"), int):
            step = ev["step"]
            prev = last_step.get(attempt)
            if prev and step > prev[1]:
                step_dts.append((ts - prev[0]) / (step - prev[1]))
            last_step[attempt] = (ts, step)
            first_live.setdefault(attempt, ts)
        elif kind == EV_START:
            first_live.setdefault(attempt, ts)
        elif kind == EV_FAILURE:
            last_failure[attempt] = ts
        elif kind == EV_CHECKPOINT:
            b = _num(ev, "blocking_s", "blocking_seconds")
            p = _num(ev, "persist_s", "save_seconds", "seconds")
            if b is not None:
                stalls.append(b)
            if p is not None:
                persists.append(p)
    if not persists:
        persists = [float(c["save_seconds"]) for c in checkpoints if c.get("save_seconds") is not None]

    detects, restarts = [], []
    by_n = {a["attempt"]: a for a in attempts}
    for n, a in sorted(by_n.items()):
        submitted = a.get("started_at")
        if n > 1 and submitted is not None:
            prev = by_n.get(n - 1, {})
            failed_at = last_failure.get(n - 1, prev.get("ended_at"))
            if failed_at is not None and submitted >= failed_at:
                detects.append(max(0.0, submitted - failed_at - backoff_s))
            if n in first_live and first_live[n] >= submitted:
                restarts.append(first_live[n] - submitted)

    cal.step_s = _median(step_dts)
    cal.checkpoint_stall_s = _median(stalls)
    cal.checkpoint_persist_s = _median(persists)
    cal.detect_s = _median(detects)
    cal.restart_s = _median(restarts)
    cal.samples = {
        "step": len(step_dts),
        "checkpoint_stall": len(stalls),
        "checkpoint_persist": len(persists),
        "detect": len(detects),
        "restart": len(restarts),
    }
    if not any(cal.samples.values()):
        raise UserError(f"--calibrate {run_dir.run_id}: no step, checkpoint or restart measurements in its events")
    return cal
