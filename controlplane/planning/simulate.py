"""Discrete-event simulation of a long training run under failures, restarts driven by the
supervisor's real policy.

The world: failures arrive as a Poisson process (the failure model, scaled to the run's GPUs)
at any time, running or restarting. A running attempt alternates `interval` seconds of compute
with a checkpoint that blocks the step for `stall_s`; the checkpoint is durable `persist_s`
after its blocking part began (async persist), and a failure before then loses it. When a
failure happens, the supervisor notices it after `detect_s` (a crash) or after the policy's
hang timeout (a hang); `decide` then says give up, or restart after a backoff, from which step,
and which node to take out (a taken-out node costs `node_replace_s` before the restart). A
restart costs `restart_s` (schedule, start workers, load the checkpoint) before its first step;
failures during it count as failures of an attempt that made no progress, so a cluster that
fails faster than it restarts meets the policy's crash-loop rule.

Only failures are events: checkpoints inside a stretch of compute are counted in closed form,
so a month on a thousand GPUs is a few dozen loop iterations per seed. Every seed's event count
is bounded (`max_events`).

Wall time is split into productive compute, checkpoint stalls, and per failure cause: lost work
(compute since the last durable checkpoint), detection and restart. Goodput (ETTR) =
productive / elapsed, elapsed being the time to finish or the horizon, whichever comes first.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from controlplane.errors import UserError
from controlplane.planning.failures import FailureModelSpec
from controlplane.planning.policy_driver import PolicyDriver
from controlplane.spec import FaultToleranceSpec


@dataclass(frozen=True)
class SimConfig:
    work_s: float  # failure-free compute time to finish the run
    step_s: float
    interval_steps: int
    stall_s: float  # the step blocks this long per checkpoint
    persist_s: float  # checkpoint durable this long after its blocking part began
    detect_s: float  # a crash is noticed after this long
    restart_s: float  # submit -> first step of the next attempt (includes loading the checkpoint)
    node_replace_s: float  # extra wait when the policy takes a node out
    gpus: int
    nodes: int
    horizon_s: float
    keep_last: int = 3  # verified checkpoints kept (a rollback may go back this far)
    max_events: int = 200_000

    @property
    def interval_s(self) -> float:
        return self.interval_steps * self.step_s

    @property
    def final_step(self) -> int:
        return max(1, math.ceil(self.work_s / self.step_s))


CATEGORIES = ("lost_work", "detection", "restart")


@dataclass
class SeedResult:
    elapsed_s: float = 0.0
    productive_s: float = 0.0
    stall_s: float = 0.0
    finished: bool = False
    gave_up: str | None = None  # the policy's MarkFailed cause
    given_up_s: float = 0.0  # wall time after the policy gave up, up to the horizon
    failures: int = 0
    events_bounded: bool = False
    remaining_work_s: float = 0.0
    by_cause: dict[str, dict[str, float]] = field(default_factory=dict)  # cause -> category -> wall s
    timeline: list[tuple[float, str, str, float]] = field(default_factory=list)  # (t, what, cause, work_s)

    @property
    def goodput(self) -> float:
        return self.productive_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def charge(self, cause: str, category: str, seconds: float) -> None:
        if seconds > 0:
            row = self.by_cause.setdefault(cause, dict.fromkeys(CATEGORIES, 0.0))
            row[category] += seconds


def _kept(step: int, interval: int, keep: int) -> tuple[int, ...]:
    """The verified checkpoint steps on disk: the newest `keep` multiples of the interval."""
    newest = step - step % interval
    return tuple(s for s in range(newest, newest - keep * interval, -interval) if s > 0)


class _Causes:
    """Cumulative weights for drawing a cause."""

    def __init__(self, model: FailureModelSpec):
        self.causes = [c for c in model.causes if c.count > 0]
        total = sum(c.count for c in self.causes)
        acc, self.cum = 0.0, []
        for c in self.causes:
            acc += c.count / total
            self.cum.append(acc)

    def draw(self, u: float):
        for c, edge in zip(self.causes, self.cum, strict=True):
            if u < edge:
                return c
        return self.causes[-1]


def simulate_seed(
    cfg: SimConfig,
    model: FailureModelSpec,
    ft: FaultToleranceSpec,
    mtbf_s: float,
    seed: int,
    *,
    timeline: bool = False,
    causes: _Causes | None = None,
) -> SeedResult:
    rng = random.Random(seed)
    causes = causes or _Causes(model)
    res = SeedResult()
    driver = PolicyDriver(ft, cfg.final_step, cfg.step_s)
    H, tau, stall = cfg.horizon_s, cfg.interval_s, cfg.stall_s
    cycle = tau + stall
    persist_after = max(0.0, cfg.persist_s - stall)  # durable this long after the blocking part ends
    rate = 1.0 / mtbf_s
    nodes = [f"node-{i}" for i in range(cfg.nodes)]
    spare = cfg.nodes
    t = 0.0
    durable = 0.0  # compute seconds safely in a checkpoint
    high_water = 0.0  # furthest compute ever reached
    startup = 0.0  # the first attempt starts at once; later ones pay restart_s
    prev_cause = "startup"
    submitted = 0.0

    def note(what: str, cause: str, work: float) -> None:
        if timeline:
            res.timeline.append((t, what, cause, work))

    for _ in range(cfg.max_events):
        gap = rng.expovariate(rate)
        # ---- startup of this attempt
        if startup > 0:
            if t + min(gap, startup) >= H:
                res.charge(prev_cause, "restart", H - t)
                t = H
                break
            if gap < startup:
                res.charge(prev_cause, "restart", gap)
                t += gap
                fail_at_start = True
            else:
                res.charge(prev_cause, "restart", startup)
                t += startup
                gap -= startup
                fail_at_start = False
        else:
            fail_at_start = False
        started_at = None if fail_at_start else t
        if not fail_at_start:
            note("start", prev_cause, durable)
            # ---- compute from `durable`
            remaining = cfg.work_s - durable
            n_ckpt = max(0, math.ceil(remaining / tau) - 1)
            finish = remaining + n_ckpt * stall
            run_for = min(gap, finish, H - t)
            k = min(int(run_for // cycle), n_ckpt)
            into = run_for - k * cycle
            computed = k * tau + min(into, tau)
            stalled = k * stall + max(0.0, into - tau)
            if run_for >= finish:  # done
                t += finish
                res.productive_s += remaining
                res.stall_s += n_ckpt * stall
                res.finished = True
                note("finish", "", cfg.work_s)
                break
            if run_for < gap:  # the horizon cuts the run: work in progress counts as productive
                t = H
                res.productive_s += computed
                res.stall_s += stalled
                durable += computed
                note("horizon", "", durable)
                break
            # a failure at t + run_for: only checkpoints whose persist has finished are durable
            durable_k = max(0, min(k, int((run_for - persist_after) // cycle))) if run_for >= persist_after else 0
            reached = durable + computed
            saved = durable_k * tau
            lost = computed - saved
            res.productive_s += saved
            res.stall_s += stalled
            progressed = reached > high_water + 1e-9
            high_water = max(high_water, reached)
            t += run_for
            last_step = int(reached // cfg.step_s)
            durable += saved
        else:
            lost = 0.0
            progressed = False
            last_step = int(durable // cfg.step_s)
            reached = durable
        # ---- the failure
        res.failures += 1
        cause = causes.draw(rng.random())
        node = nodes[rng.randrange(cfg.nodes)] if cause.node else None
        note("failure", cause.name, reached)
        res.charge(cause.name, "lost_work", lost)
        if cause.kind == "hang" and started_at is not None:
            detect = driver.hang_timeout_s() + 1e-6
            last_step_at = t
        else:
            detect = cfg.detect_s
            last_step_at = t if started_at is not None else None
        if t + detect >= H:
            res.charge(cause.name, "detection", H - t)
            t = H
            break
        res.charge(cause.name, "detection", detect)
        t += detect
        verdict = driver.on_failure(
            now=t,
            kind=cause.kind,
            cause=cause.name,
            node=node,
            started_at=started_at,
            submitted_at=submitted,
            last_step=last_step,
            last_step_at=last_step_at,
            verified_steps=_kept(int(round(durable / cfg.step_s)), cfg.interval_steps, cfg.keep_last),
            progressed=progressed,
        )
        if verdict.give_up is not None:
            res.gave_up = verdict.give_up
            res.given_up_s = H - t
            note("gave up", cause.name, durable)
            t = H
            break
        if verdict.resume_cap is not None and verdict.resume_cap * cfg.step_s < durable:
            rolled = durable - verdict.resume_cap * cfg.step_s
            res.productive_s -= rolled
            res.charge(cause.name, "lost_work", rolled)
            durable = verdict.resume_cap * cfg.step_s
        replace = 0.0
        for bad in verdict.excluded:
            if bad in nodes:
                nodes[nodes.index(bad)] = f"node-{spare}"
                spare += 1
                replace = cfg.node_replace_s
        startup = verdict.delay_s + replace + cfg.restart_s
        submitted = t + verdict.delay_s + replace
        prev_cause = cause.name
    else:
        res.events_bounded = True
    res.elapsed_s = min(t, H)
    res.remaining_work_s = max(0.0, cfg.work_s - durable) if not res.finished else 0.0
    return res


# --------------------------------------------------------------------------- many seeds


class PathologicalModelError(UserError):
    """The cluster fails faster than a run can recover: simulating it would say nothing new."""


def check_pathological(cfg: SimConfig, mtbf_s: float) -> None:
    recovery = cfg.detect_s + cfg.restart_s
    if mtbf_s <= recovery:
        raise PathologicalModelError(
            f"pathological: the cluster fails every {mtbf_s / 60:.1f} min on average (MTBF), sooner than one "
            f"recovery takes ({recovery / 60:.1f} min): the run would almost never make progress"
        )


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


@dataclass
class Summary:
    seeds: int
    interval_steps: int
    interval_s: float
    cluster_mtbf_hours: float
    goodput_mean: float
    goodput_sem: float  # standard error of the mean over seeds
    goodput_p5: float
    goodput_p50: float
    goodput_p95: float
    finished: int
    gave_up: int
    gave_up_causes: dict[str, int]
    events_bounded: int
    failures_mean: float
    finish_days_mean: float  # finished seeds: their finish; others: projected at their goodput
    finish_days_p5: float
    finish_days_p50: float
    finish_days_p95: float
    lost_gpu_hours_by_cause: dict[str, dict[str, float]]  # mean per seed
    lost_gpu_hours_total: float
    checkpoint_stall_gpu_hours: float
    productive_gpu_hours: float
    horizon_days: float

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def run_seeds(
    cfg: SimConfig, model: FailureModelSpec, ft: FaultToleranceSpec, mtbf_s: float, seeds: int, first_seed: int = 0
) -> tuple[Summary, list[SeedResult]]:
    check_pathological(cfg, mtbf_s)
    causes = _Causes(model)
    results = [
        simulate_seed(cfg, model, ft, mtbf_s, first_seed + i, timeline=(i == 0), causes=causes) for i in range(seeds)
    ]
    return summarize(cfg, mtbf_s, results), results


def summarize(cfg: SimConfig, mtbf_s: float, results: list[SeedResult]) -> Summary:
    n = len(results)
    goodputs = [r.goodput for r in results]
    mean = sum(goodputs) / n
    var = sum((g - mean) ** 2 for g in goodputs) / (n - 1) if n > 1 else 0.0
    finish = []
    for r in results:
        if r.finished:
            finish.append(r.elapsed_s / 86400)
        elif r.gave_up is None and r.goodput > 0:
            finish.append((r.elapsed_s + r.remaining_work_s / r.goodput) / 86400)
    gpu_h = cfg.gpus / 3600.0
    by_cause: dict[str, dict[str, float]] = {}
    for r in results:
        for cause, row in r.by_cause.items():
            acc = by_cause.setdefault(cause, dict.fromkeys(CATEGORIES, 0.0))
            for k, v in row.items():
                acc[k] += v * gpu_h / n
    by_cause = dict(sorted(by_cause.items(), key=lambda kv: -sum(kv[1].values())))
    gave_up: dict[str, int] = {}
    for r in results:
        if r.gave_up:
            key = r.gave_up.split(";")[0].split(":")[0]
            gave_up[key] = gave_up.get(key, 0) + 1
    return Summary(
        seeds=n,
        interval_steps=cfg.interval_steps,
        interval_s=cfg.interval_s,
        cluster_mtbf_hours=mtbf_s / 3600,
        goodput_mean=mean,
        goodput_sem=math.sqrt(var / n) if n else 0.0,
        goodput_p5=_pct(goodputs, 5),
        goodput_p50=_pct(goodputs, 50),
        goodput_p95=_pct(goodputs, 95),
        finished=sum(r.finished for r in results),
        gave_up=sum(r.gave_up is not None for r in results),
        gave_up_causes=gave_up,
        events_bounded=sum(r.events_bounded for r in results),
        failures_mean=sum(r.failures for r in results) / n,
        finish_days_mean=sum(finish) / len(finish) if finish else float("nan"),
        finish_days_p5=_pct(finish, 5),
        finish_days_p50=_pct(finish, 50),
        finish_days_p95=_pct(finish, 95),
        lost_gpu_hours_by_cause=by_cause,
        lost_gpu_hours_total=sum(sum(v.values()) for v in by_cause.values()),
        checkpoint_stall_gpu_hours=sum(r.stall_s for r in results) * gpu_h / n,
        productive_gpu_hours=sum(r.productive_s for r in results) * gpu_h / n,
        horizon_days=cfg.horizon_s / 86400,
    )


def sweep_intervals(
    cfg: SimConfig,
    model: FailureModelSpec,
    ft: FaultToleranceSpec,
    mtbf_s: float,
    seeds: int,
    intervals: list[int],
) -> list[Summary]:
    """Goodput at each checkpoint interval (steps), the same seeds at every point (common random numbers)."""
    from dataclasses import replace

    return [run_seeds(replace(cfg, interval_steps=k), model, ft, mtbf_s, seeds)[0] for k in intervals]


def interval_grid(center_steps: int, points: int = 15, span: float = 8.0) -> list[int]:
    """Geometric grid of intervals from center/span to center*span, distinct and >= 1."""
    lo, hi = math.log(center_steps / span), math.log(center_steps * span)
    grid = {max(1, round(math.exp(lo + (hi - lo) * i / (points - 1)))) for i in range(points)}
    return sorted(grid | {max(1, center_steps)})
