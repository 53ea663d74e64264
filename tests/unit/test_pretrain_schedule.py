"""Pure pieces of the pretraining loop: LR schedule, data position, numerical and straggler guards."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controlplane.rundir import RunDir
from controlplane.spec import RunSpec
from jobs.pretrain.driver import checkpoint_interval
from jobs.pretrain.schedule import (
    BatchPlan,
    NumericGuard,
    StragglerDetector,
    WindowIndex,
    advance_cursor,
    lr_factor,
    parse_skip,
    skip_forward,
)


def test_lr_warmup_then_cosine_to_min():
    f = lambda s: lr_factor(s, warmup_steps=10, total_steps=110, decay="cosine", min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert lr_factor(50, warmup_steps=0, total_steps=100, decay="linear", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(99, warmup_steps=0, total_steps=100, decay="constant", min_ratio=0.0) == 1.0


def test_cursor_skips_windows():
    skips = [parse_skip("5:8"), parse_skip("8:9")]
    cursor, seen = skip_forward(0, skips), []
    for _ in range(8):
        seen.append(cursor)
        cursor = advance_cursor(cursor, skips)
    assert seen == [0, 1, 2, 3, 4, 9, 10, 11]
    assert skip_forward(0, [(0, 3)]) == 3
    for bad in ("5", "a:b", "7:7", "-1:3"):
        with pytest.raises(ValueError):
            parse_skip(bad)


def _plan(n_windows: int, global_batch: int, seed: int) -> BatchPlan:
    return BatchPlan([WindowIndex([n_windows], seed)], [1.0], global_batch, seed)


def test_batch_plan_is_a_seeded_permutation_per_epoch_and_splits_over_ranks():
    plan = _plan(10, 4, 5)
    a = plan.locate(plan.positions(3, rank=1, world=2)).window
    assert np.array_equal(a, _plan(10, 4, 5).locate(plan.positions(3, 1, 2)).window)
    # The ranks split the global batch: world 2 = world 1 cut in halves.
    whole = plan.locate(plan.positions(3, 0, 1)).window
    assert np.array_equal(np.concatenate([plan.locate(plan.positions(3, 0, 2)).window, a]), whole)
    # One epoch covers each window exactly once; the next epoch is a different permutation.
    first = np.concatenate([plan.locate(plan.positions(b, 0, 1)).window for b in range(5)])[:10]
    second = np.concatenate([plan.locate(plan.positions(b, 0, 1)).window for b in range(5, 10)])[:10]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert not np.array_equal(first, second)
    assert not np.array_equal(whole, _plan(10, 4, 6).locate(plan.positions(3, 0, 1)).window)
    with pytest.raises(ValueError, match="does not split"):
        plan.positions(0, 0, 3)


def test_numeric_guard_nan_and_spike():
    g = NumericGuard(factor=3.0, window=4)
    assert g.check(float("nan")) == "nan_loss" and g.check(math.inf) == "nan_loss"
    assert g.check(100.0) is None  # too little history to call a spike
    for loss in (5.0, 4.0, 4.5):
        assert g.check(loss) is None
    assert g.check(14.0) is None  # 14 < 3 x median(100, 5, 4, 4.5) = 14.25
    assert g.check(20.0) == "loss_spike"  # window is now 5, 4, 4.5, 14: 3 x median 4.75 = 14.25 < 20
    h = NumericGuard(factor=3.0, window=4)
    h.load([2.0, 2.0, 2.0, 2.0])
    assert h.check(6.5) == "loss_spike"
    assert h.state() == [2.0, 2.0, 2.0, 2.0]  # a bad loss never enters the window
    assert h.check(5.9) is None


def test_straggler_after_patience():
    d = StragglerDetector(factor=2.0, patience=3)
    assert d.observe([1.0]) == []
    assert d.observe([0.1, 0.5]) == [] and d.observe([0.1, 0.5]) == []
    assert d.observe([0.1, 0.5]) == [(1, 0.5, 0.1)]
    assert d.observe([0.1, 0.5]) == []  # reported once per streak
    assert d.observe([0.1, 0.1]) == []
    jitter = StragglerDetector(factor=2.0, patience=3)
    for _ in range(5):  # twice as slow, but by 8 ms: jitter on short steps, not a straggler
        assert jitter.observe([0.016, 0.008]) == []
    assert [jitter.observe([0.32, 0.01]) for _ in range(3)][-1] == [(0, 0.32, 0.01)]


def test_checkpoint_interval_auto_reads_supervisor_file(tmp_path):
    rd = RunDir(tmp_path).create()
    fixed = RunSpec.model_validate({"checkpoint": {"interval_steps": 7}})
    auto = RunSpec.model_validate({"checkpoint": {"interval_steps": "auto"}})
    assert checkpoint_interval(fixed, rd) == 7
    assert checkpoint_interval(auto, rd) == 25
    (tmp_path / "checkpoint_interval").write_text("40\n")
    assert checkpoint_interval(auto, rd) == 40 and checkpoint_interval(fixed, rd) == 7
    (tmp_path / "checkpoint_interval").write_text("garbage")
    assert checkpoint_interval(auto, rd) == 25
