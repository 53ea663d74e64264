"""The failure simulator: closed-form checks, convergence, the Young/Daly optimum, the policy's rules,
and a pathological failure model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from controlplane.planning.failures import LLAMA3, FailureCause, FailureModelSpec
from controlplane.planning.simulate import (
    PathologicalModelError,
    SimConfig,
    interval_grid,
    run_seeds,
    simulate_seed,
    sweep_intervals,
)
from controlplane.spec import FaultToleranceSpec

DAY = 86400.0
FT = FaultToleranceSpec(max_restarts=100_000)


def only(kind: str, name: str = "x") -> FailureModelSpec:
    return FailureModelSpec(
        observed_gpus=1, observed_days=1, causes=[FailureCause(name=name, count=1, kind=kind, node=kind != "hang")]
    )


CRASH = only("crash", "crash")


def cfg(**kw) -> SimConfig:
    base = dict(
        work_s=60 * DAY,
        step_s=1.0,
        interval_steps=1200,
        stall_s=10.0,
        persist_s=10.0,
        detect_s=30.0,
        restart_s=300.0,
        node_replace_s=0.0,
        gpus=64,
        nodes=8,
        horizon_s=30 * DAY,
    )
    base.update(kw)
    return SimConfig(**base)


def test_without_failures_only_checkpoint_stalls_cost():
    c = cfg(work_s=1000.0, interval_steps=100, stall_s=2.0, persist_s=2.0)
    r = simulate_seed(c, CRASH, FT, mtbf_s=1e15, seed=0)
    assert r.finished and r.failures == 0
    # 10 chunks of 100 s, a checkpoint after each but the last: 9 stalls of 2 s
    assert r.elapsed_s == pytest.approx(1018.0)
    assert r.goodput == pytest.approx(1000.0 / 1018.0)


@pytest.mark.parametrize("model", [CRASH, only("hang"), only("numerical"), LLAMA3], ids=lambda m: m.causes[0].kind)
def test_wall_time_is_fully_accounted_for(model):
    c = cfg(horizon_s=20 * DAY)
    ft = FaultToleranceSpec(max_restarts=100_000, max_rollbacks=100_000)
    for seed in range(20):
        r = simulate_seed(c, model, ft, mtbf_s=6 * 3600, seed=seed)
        lost = sum(sum(row.values()) for row in r.by_cause.values())
        assert r.productive_s + r.stall_s + lost + r.given_up_s == pytest.approx(r.elapsed_s, rel=1e-9)
        assert r.productive_s > 0 and r.failures > 20


def test_goodput_matches_first_order_theory():
    # Per failure: detection + backoff + restart + on average half a checkpoint cycle of lost work.
    M, tau, delta, D, R, backoff = 20 * 3600.0, 1200.0, 10.0, 30.0, 300.0, 1.0
    expected = tau / (tau + delta) * (1 - (D + R + backoff + (tau + delta) / 2) / M)
    s, _ = run_seeds(cfg(), CRASH, FT, M, seeds=150)
    assert s.goodput_mean == pytest.approx(expected, abs=0.002)
    assert s.failures_mean == pytest.approx(30 * DAY / M, rel=0.05)


def test_mean_converges_across_seeds():
    c = cfg(horizon_s=10 * DAY)
    a, _ = run_seeds(c, CRASH, FT, 8 * 3600, seeds=120, first_seed=0)
    b, _ = run_seeds(c, CRASH, FT, 8 * 3600, seeds=120, first_seed=10_000)
    small, _ = run_seeds(c, CRASH, FT, 8 * 3600, seeds=20, first_seed=20_000)
    assert abs(a.goodput_mean - b.goodput_mean) < 4 * math.hypot(a.goodput_sem, b.goodput_sem)
    assert a.goodput_sem < small.goodput_sem
    assert a.goodput_p5 <= a.goodput_p50 <= a.goodput_p95


def test_sweep_optimum_agrees_with_young_daly():
    M, delta, step = 10 * 3600.0, 10.0, 1.0
    young_steps = round(math.sqrt(2 * delta * M) / step)  # 849
    c = cfg(stall_s=delta, persist_s=delta, horizon_s=15 * DAY, work_s=40 * DAY)
    grid = interval_grid(young_steps, points=7, span=6.0)
    curve = sweep_intervals(c, CRASH, FT, M, seeds=80, intervals=grid)
    best = max(curve, key=lambda s: s.goodput_mean)
    at_young = next(s for s in curve if s.interval_steps == young_steps)
    assert young_steps / 2 <= best.interval_steps <= young_steps * 2
    assert at_young.goodput_mean >= best.goodput_mean - 3 * math.hypot(best.goodput_sem, at_young.goodput_sem)
    # and the ends of the grid are clearly worse
    assert curve[0].goodput_mean < at_young.goodput_mean - 0.005
    assert curve[-1].goodput_mean < at_young.goodput_mean - 0.005


def test_pathological_model_is_refused_in_one_line():
    c = cfg(restart_s=600.0, detect_s=30.0)
    with pytest.raises(PathologicalModelError) as exc:
        run_seeds(c, CRASH, FT, mtbf_s=300.0, seeds=10)
    assert "\n" not in str(exc.value) and "pathological" in str(exc.value)


def test_near_pathological_ends_quickly_through_the_policy():
    # MTBF only a little above one recovery: the policy's crash-loop rule ends most runs
    c = cfg(restart_s=600.0, detect_s=30.0, horizon_s=365 * DAY)
    s, results = run_seeds(c, CRASH, FaultToleranceSpec(max_restarts=1_000_000), mtbf_s=900.0, seeds=20)
    assert s.gave_up == 20 and set(s.gave_up_causes) == {"crash loop"}
    assert all(r.failures < 10_000 for r in results)
    assert s.goodput_mean < 0.05


def test_event_count_is_bounded():
    c = replace(cfg(restart_s=10.0, detect_s=1.0), max_events=50)
    r = simulate_seed(c, CRASH, FaultToleranceSpec(max_restarts=1_000_000, crash_loop_restarts=10**6), 120.0, seed=1)
    assert r.events_bounded and r.failures <= 50


def test_restart_budget_comes_from_the_policy():
    ft = FaultToleranceSpec(max_restarts=2)
    r = simulate_seed(cfg(), CRASH, ft, mtbf_s=3600.0, seed=3)
    assert r.gave_up is not None and r.gave_up.startswith("restart budget exhausted (2 of 2)")
    assert r.failures == 3 and not r.finished
    assert r.given_up_s > 0


def test_silent_data_corruption_rolls_back_until_the_policy_stops():
    ft = FaultToleranceSpec(max_restarts=100, max_rollbacks=3)
    r = simulate_seed(cfg(), only("numerical", "sdc"), ft, mtbf_s=6 * 3600.0, seed=0)
    assert r.gave_up is not None and r.gave_up.startswith("numerical faults: 3 rollbacks used")
    assert r.failures == 4


def test_hangs_cost_the_policy_hang_timeout():
    ft = FaultToleranceSpec(max_restarts=10_000, hang_timeout_factor=20, hang_timeout_min_s=120, hang_timeout_max_s=900)
    r = simulate_seed(cfg(step_s=1.0), only("hang", "nccl"), ft, mtbf_s=6 * 3600.0, seed=0)
    started = r.failures  # failures during a restart are crashes of the new attempt, noticed in detect_s
    detection = r.by_cause["nccl"]["detection"]
    assert started > 50
    assert 30.0 * started < detection <= 120.0 * started + 1  # clamp(20 x 1 s, 120, 900) = 120 s while running


def test_interval_grid_is_geometric_and_contains_the_center():
    g = interval_grid(100, points=9, span=8.0)
    assert 100 in g and g[0] in (12, 13) and g[-1] == 800 and g == sorted(set(g))
    assert interval_grid(1, points=5)[0] == 1
