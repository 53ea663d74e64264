"""GPU power policy of a run (`RunSpec.power`): a fixed cap, or a calibrated one, always restored.

The training job calls, on each worker, before training:

    handle = apply_power_policy(run_spec.power, gpu_indices=[0], measure=run_steps, run_dir=..., attempt=N,
                                node=node_name)
    try:
        ...train...
    finally:
        handle.restore()

- `cap_watts: null`: nothing is touched (`status="unchanged"`).
- `cap_watts: 300`: every listed GPU gets a 300 W limit (clamped into the GPU's allowed range,
  which the message says); the previous limits are restored by `restore()`.
- `cap_watts: auto`: a calibration sweep. For each candidate limit (`candidate_limits`, from the
  maximum down in 25 W steps, at most 8) the limits are set and `measure()` is called; it must run
  `calibration_steps` real training steps and return `(tokens, seconds)`. The GPUs' energy over
  the call (counter, else integrated power) gives J/token. `choose_power_limit` (pure) then
  keeps the limit with the lowest J/token among those no more than `max_slowdown` slower than
  the fastest one, in the spirit of Zeus' power-limit optimizer. Data-parallel workers run in
  lockstep, so calling it at the same step on every worker measures the slowest worker; a job
  that wants one limit for all can allreduce the points and call `choose_power_limit` itself.
- Without permission to set limits (`NVML_ERROR_NO_PERMISSION`: not root, or a container
  without the capability) the handle logs one line and the run continues uncapped
  (`status="no_permission"`). Without a GPU or NVML: `status="no_gpu"`, nothing happens.

The decision is written to `<run_dir>/telemetry/power/a<attempt>-<node>-<pid>.json` when a run
directory is given; `llmctl run energy` records it in the ledger. With a `lease_dir`, every limit
set is also leased (`power_leases`): a worker killed before `restore()` leaves a lease from which
the next worker on that GPU, or the node's exporter, restores the limit it found.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controlplane.rundir import write_atomic
from controlplane.spec import PowerSpec
from controlplane.telemetry import power_leases
from controlplane.telemetry.sampler import STATUS_OK, NvmlSampler, nvml_error_kind

log = logging.getLogger(__name__)

STEP_W = 25.0
MAX_CANDIDATES = 8


# --------------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class CalibrationPoint:
    limit_w: float
    tokens_per_s: float
    joules_per_token: float


@dataclass(frozen=True)
class PowerChoice:
    limit_w: float
    fastest_limit_w: float
    slowdown: float  # time per token relative to the fastest limit, minus 1
    energy_saving: float  # 1 - J/token relative to the fastest limit
    feasible: tuple[float, ...]
    reason: str


def candidate_limits(
    min_w: float, max_w: float, step_w: float = STEP_W, max_candidates: int = MAX_CANDIDATES
) -> list[float]:
    """Limits to try: from `max_w` down in `step_w` steps, not below `min_w`, at most `max_candidates` (pure).

    The sweep starts at the top because under a small allowed slowdown the answer lies near it.
    """
    if max_w <= 0 or min_w <= 0 or min_w > max_w or step_w <= 0 or max_candidates < 1:
        raise ValueError(f"bad power limit range [{min_w}, {max_w}] / step {step_w}")
    out = []
    watts = float(max_w)
    while watts >= min_w - 1e-9 and len(out) < max_candidates:
        out.append(round(watts, 1))
        watts -= step_w
    return out


def choose_power_limit(points: list[CalibrationPoint], max_slowdown: float) -> PowerChoice:
    """The lowest-energy limit whose slowdown against the fastest point is within `max_slowdown` (pure).

    Slowdown is measured in time per token: `fastest_tps / tps - 1`. Ties in J/token go to the
    higher limit (the faster one). Points with no throughput are ignored.
    """
    valid = [p for p in points if p.tokens_per_s > 0 and p.joules_per_token > 0]
    if not valid:
        raise ValueError("no calibration point with positive throughput and energy")
    fastest = max(valid, key=lambda p: (p.tokens_per_s, p.limit_w))
    feasible = [p for p in valid if fastest.tokens_per_s / p.tokens_per_s - 1.0 <= max_slowdown + 1e-12]
    best = min(feasible, key=lambda p: (p.joules_per_token, -p.limit_w))
    slowdown = fastest.tokens_per_s / best.tokens_per_s - 1.0
    saving = 1.0 - best.joules_per_token / fastest.joules_per_token
    reason = (
        f"{best.limit_w:.0f} W: {saving:+.1%} energy/token saved at {slowdown:.1%} slowdown "
        f"(fastest {fastest.limit_w:.0f} W, allowed slowdown {max_slowdown:.1%})"
    )
    return PowerChoice(
        limit_w=best.limit_w,
        fastest_limit_w=fastest.limit_w,
        slowdown=slowdown,
        energy_saving=saving,
        feasible=tuple(sorted((p.limit_w for p in feasible), reverse=True)),
        reason=reason,
    )


def clamp_limit(cap_w: float, min_w: float | None, max_w: float | None) -> float:
    lo = min_w if min_w is not None else cap_w
    hi = max_w if max_w is not None else cap_w
    return float(min(max(cap_w, lo), hi))


# --------------------------------------------------------------------------- the I/O side


@dataclass
class PowerHandle:
    """What `apply_power_policy` did, and how to undo it."""

    status: str  # unchanged | capped | calibrated | no_permission | no_gpu | error
    message: str
    requested: float | str | None
    applied_limit_w: float | None = None
    original_limits_w: dict[int, float] = field(default_factory=dict)
    calibration: list[CalibrationPoint] = field(default_factory=list)
    choice: PowerChoice | None = None
    restored: bool = False
    _nvml: Any = field(default=None, repr=False)
    _handles: dict[int, Any] = field(default_factory=dict, repr=False)
    _sampler: NvmlSampler | None = field(default=None, repr=False)
    _lease_dir: Path | None = field(default=None, repr=False)
    _uuids: dict[int, str] = field(default_factory=dict, repr=False)
    _run_dir: Any = field(default=None, repr=False)

    def set_limits(self, watts: float) -> None:
        """Set every GPU's limit (leased first, so a death right after still restores it)."""
        if self._lease_dir is not None:
            for index in self._handles:
                original = self.original_limits_w.get(index)
                if original is not None and index in self._uuids:
                    power_leases.write_lease(self._lease_dir, index, self._uuids[index], original, watts, self._run_dir)
        _set_all(self._nvml, self._handles, watts)

    def restore(self) -> None:
        """Put every GPU's limit back as found. Idempotent; failures are logged, never raised."""
        if self.restored:
            return
        self.restored = True
        for index, watts in self.original_limits_w.items():
            handle = self._handles.get(index)
            if handle is None:
                continue
            try:
                self._nvml.nvmlDeviceSetPowerManagementLimit(handle, int(round(watts * 1000)))
            except Exception as exc:
                log.warning("power: could not restore GPU %d to %.0f W: %s", index, watts, exc)
                continue
            if self._lease_dir is not None and index in self._uuids:
                power_leases.remove_lease(self._lease_dir, self._uuids[index])
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None

    def __enter__(self) -> PowerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def to_record(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "requested": self.requested,
            "applied_limit_w": self.applied_limit_w,
            "original_limits_w": {str(k): v for k, v in self.original_limits_w.items()},
            "calibration": [asdict(p) for p in self.calibration],
            "choice": asdict(self.choice) if self.choice else None,
        }


class _NoPermission(Exception):
    pass


def _set_all(nvml: Any, handles: dict[int, Any], watts: float) -> None:
    for index, handle in handles.items():
        try:
            nvml.nvmlDeviceSetPowerManagementLimit(handle, int(round(watts * 1000)))
        except Exception as exc:
            if nvml_error_kind(nvml, exc) == "no_permission":
                raise _NoPermission from None
            raise RuntimeError(f"GPU {index}: setting {watts:.0f} W failed: {exc}") from None


def _window_energy(sampler: NvmlSampler, fn: Callable[[], Any], interval_s: float) -> tuple[Any, float]:
    """Run `fn` while sampling; returns (fn's result, joules of the sampled GPUs over the call)."""
    start = sampler.sample()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            sampler.sample()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        result = fn()
    finally:
        stop.set()
        t.join(timeout=5)
    end = sampler.sample()
    before = {g.index: g.energy_j or 0.0 for g in start.gpus}
    joules = sum((g.energy_j or 0.0) - before.get(g.index, 0.0) for g in end.gpus if not g.lost)
    return result, joules


def apply_power_policy(
    power: PowerSpec,
    gpu_indices: list[int],
    nvml: Any | None = None,
    measure: Callable[[], tuple[float, float]] | None = None,
    run_dir: str | Path | None = None,
    attempt: int | None = None,
    node: str | None = None,
    sample_interval_s: float = 0.1,
    warmup: bool = True,
    lease_dir: str | Path | None = None,
) -> PowerHandle:
    """Apply `power` to the GPUs `gpu_indices` (NVML indices) of this worker. See the module doc."""
    requested = power.cap_watts
    if requested is None:
        handle = PowerHandle("unchanged", "power: limits left as they are", requested)
        return _record(handle, run_dir, attempt, node)
    if requested == "auto" and measure is None:
        raise TypeError("cap_watts 'auto' needs a measure() callable that runs calibration steps")
    sampler = NvmlSampler(nvml, indices=list(gpu_indices), watch_events=False)
    if not gpu_indices or sampler.open() != STATUS_OK:
        sampler.close()
        handle = PowerHandle(
            "no_gpu", f"power: no GPU to cap ({sampler.message if gpu_indices else 'none'})", requested
        )
        return _record(handle, run_dir, attempt, node)
    nvml = sampler.nvml
    handles = sampler.handles()
    first = sampler.sample()
    uuids = {g.index: g.uuid for g in first.gpus if g.uuid}
    if lease_dir is not None and power_leases.reclaim(Path(lease_dir), nvml, handles, uuids):
        first = sampler.sample()  # the limits as they were before a dead worker capped them
    lo = max((g.power_limit_min_w for g in first.gpus if g.power_limit_min_w is not None), default=None)
    hi = min((g.power_limit_max_w for g in first.gpus if g.power_limit_max_w is not None), default=None)
    handle = PowerHandle("error", "", requested, _nvml=nvml, _handles=handles, _sampler=sampler, _uuids=uuids)
    handle._lease_dir, handle._run_dir = (Path(lease_dir) if lease_dir is not None else None), run_dir
    handle.original_limits_w = {g.index: g.power_limit_w for g in first.gpus if g.power_limit_w is not None}
    try:
        if requested == "auto":
            if lo is None or hi is None:
                handle.status, handle.message = "error", "power: GPU does not report its limit range; running uncapped"
            else:
                _calibrate(handle, power, sampler, measure, lo, hi, sample_interval_s, warmup)
        else:
            watts = clamp_limit(float(requested), lo, hi)
            handle.set_limits(watts)
            note = (
                "" if watts == float(requested) else f" (asked {float(requested):.0f} W, allowed {lo:.0f}-{hi:.0f} W)"
            )
            handle.status, handle.applied_limit_w = "capped", watts
            handle.message = f"power: {len(handles)} GPU(s) capped at {watts:.0f} W{note}"
    except _NoPermission:
        if handle._lease_dir is not None:
            for uuid in uuids.values():
                power_leases.remove_lease(handle._lease_dir, uuid)
        handle.status = "no_permission"
        handle.message = "power: no permission to set GPU power limits (needs root or CAP_SYS_ADMIN); running uncapped"
        handle.original_limits_w = {}
        handle.restored = True
        sampler.close()
        handle._sampler = None
    except (RuntimeError, ValueError) as exc:
        handle.restore()
        handle.status, handle.message = "error", f"power: {exc}; limits restored, running uncapped"
    (log.warning if handle.status in ("no_permission", "error") else log.info)("%s", handle.message)
    return _record(handle, run_dir, attempt, node)


def _calibrate(
    handle: PowerHandle,
    power: PowerSpec,
    sampler: NvmlSampler,
    measure: Callable[[], tuple[float, float]],
    lo: float,
    hi: float,
    interval_s: float,
    warmup: bool,
) -> None:
    limits = candidate_limits(lo, hi)
    handle.set_limits(limits[0])
    if warmup:
        measure()
    for watts in limits:
        handle.set_limits(watts)
        (tokens, seconds), joules = _window_energy(sampler, measure, interval_s)
        if tokens > 0 and seconds > 0:
            handle.calibration.append(CalibrationPoint(watts, tokens / seconds, joules / tokens))
    choice = choose_power_limit(handle.calibration, power.max_slowdown)
    handle.set_limits(choice.limit_w)
    handle.choice, handle.applied_limit_w, handle.status = choice, choice.limit_w, "calibrated"
    handle.message = f"power: calibrated over {len(limits)} limits, chose {choice.reason}"


def _record(handle: PowerHandle, run_dir: str | Path | None, attempt: int | None, node: str | None) -> PowerHandle:
    if run_dir is not None:
        rec = {"attempt": attempt, "node": node, "pid": os.getpid(), "ts": time.time(), **handle.to_record()}
        path = Path(run_dir) / "telemetry" / "power" / f"a{attempt}-{node}-{os.getpid()}.json"
        try:
            write_atomic(path, json.dumps(rec, indent=1).encode())
        except OSError as exc:
            log.warning("power: cannot record the decision in %s: %s", path, exc)
    return handle


def read_power_records(run_dir: str | Path) -> list[dict[str, Any]]:
    d = Path(run_dir) / "telemetry" / "power"
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
