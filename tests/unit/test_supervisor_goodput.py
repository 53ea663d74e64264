"""Goodput accounting from hand-built ledger rows and event streams."""

from __future__ import annotations

import pytest

from controlplane.supervisor.goodput import BUCKETS, compute


def steps(attempt, first, last, t_first, dt=1.0, step_time=1.0):
    return [
        {"type": "step", "attempt": attempt, "step": s, "ts": t_first + (s - first) * dt, "step_time_s": step_time}
        for s in range(first, last + 1)
    ]


def start(attempt, ts, resume_step):
    return {"type": "start", "attempt": attempt, "ts": ts, "resume_step": resume_step}


def trans(*pairs):
    return [{"to_state": s, "at": t} for s, t in pairs]


def check_sums(g):
    assert sum(g.seconds.values()) == pytest.approx(g.wall_s)
    assert set(g.seconds) == set(BUCKETS)


def test_clean_run():
    # submitted at 0, first step event at 10 (step takes 1 s: 9 s queueing), steps 1..10 at 1 s each
    attempts = [{"attempt": 1, "started_at": 2.0, "ended_at": 20.0, "state": "succeeded", "cause": None}]
    events = [start(1, 8.0, 0), *steps(1, 1, 10, 10.0)]
    g = compute(attempts, trans(("pending", 0.0), ("succeeded", 20.0)), events)
    check_sums(g)
    assert g.wall_s == 20
    assert g.seconds["queueing"] == pytest.approx(9.0)
    assert g.seconds["productive"] == pytest.approx(10.0)
    assert g.seconds["other"] == pytest.approx(1.0)
    assert g.ratio == pytest.approx(0.5)
    assert g.restarts_by_cause == {} and g.final_step == 10


def test_crash_loses_work_since_the_checkpoint_and_counts_the_restart():
    # attempt 1: steps 1..15 at t=10..24, crash; checkpoint at step 10 (blocked 0.5 s); detected at t=26
    # attempt 2: submitted t=28, resumes from 10, steps 11..20 at t=33..42; succeeded at t=43
    attempts = [
        {"attempt": 1, "started_at": 0.0, "ended_at": 26.0, "state": "failed", "cause": "worker_died"},
        {"attempt": 2, "started_at": 28.0, "ended_at": 43.0, "state": "succeeded", "cause": None},
    ]
    events = [
        start(1, 5.0, 0),
        *steps(1, 1, 15, 10.0),
        {"type": "checkpoint", "attempt": 1, "step": 10, "ts": 19.5, "blocking_s": 0.5, "persist_s": 2.0},
        start(2, 31.0, 10),
        *steps(2, 11, 20, 33.0),
    ]
    g = compute(attempts, trans(("pending", 0.0), ("succeeded", 43.0)), events)
    check_sums(g)
    assert g.lost_steps == 5
    assert g.seconds["lost_work"] == pytest.approx(5.0)
    assert g.seconds["checkpoint_stall"] == pytest.approx(0.5)
    assert g.seconds["queueing"] == pytest.approx(9.0)
    # 10 kept steps in attempt 1 (less the 0.5 s stall) + 10 in attempt 2
    assert g.seconds["productive"] == pytest.approx(19.5)
    # detection 24->26, backoff 26->28, startup 28->32
    assert g.seconds["restart"] == pytest.approx(2 + 2 + 4)
    assert g.restarts_by_cause == {"worker_died": 1}
    assert g.final_step == 20


def test_hang_until_detected():
    attempts = [
        {"attempt": 1, "started_at": 0.0, "ended_at": 60.0, "state": "failed", "cause": "hang"},
        {"attempt": 2, "started_at": 61.0, "ended_at": 80.0, "state": "succeeded", "cause": None},
    ]
    events = [start(1, 0.5, 0), *steps(1, 1, 10, 1.0), start(2, 62.0, 10), *steps(2, 11, 12, 64.0)]
    g = compute(attempts, trans(("pending", 0.0), ("succeeded", 80.0)), events)
    check_sums(g)
    assert g.seconds["hang"] == pytest.approx(50.0)  # last step at t=10 .. stopped at t=60
    assert g.restarts_by_cause == {"hang": 1}


def test_rollback_throws_away_the_window_and_in_attempt_replacement_is_restart_time():
    attempts = [
        {"attempt": 1, "started_at": 0.0, "ended_at": 22.0, "state": "failed", "cause": "nan_loss"},
        {"attempt": 2, "started_at": 22.0, "ended_at": None, "state": "running", "cause": None},
    ]
    events = [
        *steps(1, 1, 20, 1.0),
        {"type": "failure", "attempt": 1, "kind": "nan_loss", "step": 20, "ts": 20.5},
        start(2, 23.0, 10),
        *steps(2, 21, 25, 25.0),  # steps 21..25 at t=25..29
        {"type": "failure", "attempt": 2, "kind": "worker_died", "rank": 1, "step": 26, "ts": 29.5},
        *steps(2, 26, 30, 32.0),  # replaced: step 26 at t=32 (3 s gap, 1 s of it the step)
        {"type": "worker_replaced", "attempt": 2, "rank": 1, "recovery_s": 2.5, "ts": 32.0},
    ]
    g = compute(attempts, trans(("pending", 0.0)), events, now=40.0)
    check_sums(g)
    assert g.wall_s == 40
    assert g.lost_steps == 10 and g.seconds["lost_work"] == pytest.approx(10.0)
    # last step t=20 .. attempt 1 ended t=22, startup 22..24, and the in-attempt replacement 2 s
    assert g.seconds["restart"] == pytest.approx(2.0 + 2.0 + 2.0)
    assert g.seconds["productive"] == pytest.approx(10.0 + 10.0)  # steps 1..10 kept, 21..30
    assert g.restarts_by_cause == {"nan_loss": 1, "worker_replaced": 1}


def test_hang_handled_inside_the_attempt_counts_until_detection():
    attempts = [{"attempt": 1, "started_at": 0.0, "ended_at": 40.0, "state": "succeeded", "cause": None}]
    events = [
        *steps(1, 1, 5, 1.0),  # t=1..5
        {"type": "failure", "attempt": 1, "kind": "hang", "rank": 1, "step": 6, "ts": 18.0},  # seen after 13 s
        *steps(1, 6, 10, 21.0),  # replaced; step 6 at t=21
    ]
    g = compute(attempts, trans(("pending", 0.0), ("succeeded", 40.0)), events)
    check_sums(g)
    assert g.seconds["hang"] == pytest.approx(13.0)  # t=5 .. 18
    assert g.seconds["restart"] == pytest.approx(2.0)  # t=18 .. 21, less the 1 s step
    assert g.seconds["productive"] == pytest.approx(10.0)


def test_run_that_never_started_is_all_queueing():
    attempts = [{"attempt": 1, "started_at": 1.0, "ended_at": None, "state": "submitted", "cause": None}]
    g = compute(attempts, trans(("pending", 0.0)), [], now=30.0)
    check_sums(g)
    assert g.seconds["queueing"] == pytest.approx(30.0) and g.ratio == 0.0


def test_empty():
    g = compute([], [], [])
    assert g.wall_s == 0 and g.ratio == 0.0


def test_productive_time_is_split_by_the_world_it_ran_on():
    # 2 workers for steps 1..5, shrunk to 1 for 6..10 (a world_resized event between), back to 2 for 11..15
    attempts = [{"attempt": 1, "started_at": 0.0, "ended_at": 16.0, "state": "succeeded", "cause": None}]
    resized = [
        {"type": "world_resized", "attempt": 1, "ts": 5.5, "world_size": 1},
        {"type": "world_resized", "attempt": 1, "ts": 10.5, "world_size": 2},
    ]
    events = [{**start(1, 0.0, 0), "world_size": 2}, *steps(1, 1, 15, 1.0), *resized]
    g = compute(attempts, trans(("pending", 0.0), ("succeeded", 16.0)), events)
    check_sums(g)
    assert g.productive_by_world == {1: pytest.approx(5.0), 2: pytest.approx(10.0)}
    assert sum(g.productive_by_world.values()) == pytest.approx(g.seconds["productive"])
