"""Pure decisions: canary analysis and the evaluation gate."""

from __future__ import annotations

import pytest

from controlplane.rollout.analysis import Action, Thresholds, Window, analyze, gate, required_tasks

TH = Thresholds(max_error_rate=0.02, max_p99_latency_s=1.0, max_latency_ratio=1.5, min_requests=50, window_s=30)
STABLE = Window(requests=500, errors=0, p99_s=0.2)


def test_waits_while_window_open_and_advances_then_promotes():
    good = Window(requests=60, errors=0, p99_s=0.22)
    assert analyze(TH, good, STABLE, 10, 0, 3).action == Action.WAIT
    assert analyze(TH, good, STABLE, 30, 0, 3).action == Action.ADVANCE
    d = analyze(TH, good, STABLE, 30, 2, 3)
    assert d.action == Action.PROMOTE and d.figures["candidate"]["requests"] == 60


def test_errors_roll_back_early_without_waiting_for_the_window():
    d = analyze(TH, Window(requests=5, errors=2, p99_s=0.1), STABLE, 1, 0, 3)
    assert d.action == Action.ROLLBACK and "error rate" in d.reason
    # One error in five requests is within budget for a 50-request window (1 <= 0.02 * 50).
    assert analyze(TH, Window(requests=5, errors=1, p99_s=0.1), STABLE, 1, 0, 3).action == Action.WAIT


def test_error_rate_over_threshold_at_window_end():
    d = analyze(TH, Window(requests=100, errors=3), STABLE, 30, 1, 3)
    assert d.action == Action.ROLLBACK and d.figures["candidate"]["error_rate"] == 0.03


def test_latency_absolute_and_relative_to_stable():
    assert analyze(TH, Window(requests=100, p99_s=1.2), STABLE, 30, 0, 3).action == Action.ROLLBACK
    d = analyze(TH, Window(requests=100, p99_s=0.5), STABLE, 30, 0, 3)
    assert d.action == Action.ROLLBACK and "stable" in d.reason and d.figures["latency_ratio"] == 2.5
    # Within the slack a ratio does not count (tiny latencies are noisy).
    fast = Window(requests=500, p99_s=0.01)
    assert analyze(TH, Window(requests=100, p99_s=0.03), fast, 30, 0, 3).action == Action.ADVANCE
    # Without stable figures (100% step) only the absolute limit applies.
    assert analyze(TH, Window(requests=100, p99_s=0.9), Window(), 30, 2, 3).action == Action.PROMOTE


def test_insufficient_traffic_waits_then_rolls_back():
    few = Window(requests=10, p99_s=0.1)
    assert analyze(TH, few, STABLE, 60, 0, 3).action == Action.WAIT
    d = analyze(TH, few, STABLE, 120, 0, 3)
    assert d.action == Action.ROLLBACK and "insufficient traffic" in d.reason


def test_gate():
    # Scores are 0-100, like the community harness (and NEC's 82.3 / 82.1).
    mins = {"jcommonsenseqa_accuracy": 50.0, "jsquad_exact_match": None, "max_heldout_perplexity": 100.0}
    assert required_tasks(mins) == ["heldout", "jcommonsenseqa"]
    ok = gate(mins, {"jcommonsenseqa_accuracy": 60.0, "heldout_perplexity": 50.0})
    assert ok.passed and not ok.failures
    bad = gate(mins, {"jcommonsenseqa_accuracy": 40.0, "heldout_perplexity": 150.0})
    assert not bad.passed and len(bad.failures) == 2
    missing = gate(mins, {"jcommonsenseqa_accuracy": 90.0})
    assert not missing.passed and missing.failures == ["heldout_perplexity not measured"]
    assert gate({"jcommonsenseqa_accuracy": None}, {}).passed


def test_minimums_on_the_old_0_1_scale_are_refused():
    from pydantic import ValidationError

    from controlplane.spec import EvalMinimums

    assert EvalMinimums(jcommonsenseqa_accuracy=82.3).jcommonsenseqa_accuracy == 82.3
    with pytest.raises(ValidationError, match="0-100"):
        EvalMinimums(jsquad_exact_match=0.8)


def test_gate_reuses_an_evaluation_only_with_the_same_setup(tmp_path, monkeypatch):
    from controlplane.rollout.evaluation import EvalRequest, same_setup
    from controlplane.spec import EvalFiles

    def req(**kw):
        return EvalRequest.of(EvalFiles(**kw))

    sample = {"file": "/x/jobs/evaluate/samples/jcommonsenseqa.jsonl", "k": 3, "prompt_version": "0.3", "seed": 42}
    detail = {"limit": None, "jcommonsenseqa": {**sample, "train": None}}
    assert same_setup(detail, req(), ["jcommonsenseqa"])
    assert not same_setup(detail, req(jcommonsenseqa_k=0), ["jcommonsenseqa"])
    assert not same_setup(detail, req(limit=5), ["jcommonsenseqa"])
    assert not same_setup(detail, req(prompt_version="0.2"), ["jcommonsenseqa"])
    assert not same_setup(detail, req(seed=1), ["jcommonsenseqa"])
    assert not same_setup(detail, req(jcommonsenseqa="/data/jglue/valid-v1.1.json"), ["jcommonsenseqa"])
    assert not same_setup(detail, req(jcommonsenseqa_train="/data/jglue/train-v1.1.json"), ["jcommonsenseqa"])
    assert same_setup({"limit": None}, req(), ["heldout"])
    assert not same_setup({"limit": None, "jcommonsenseqa": {"k": 3}}, req(), ["jcommonsenseqa"])  # an older record
    # Relative paths in a spec match the absolute paths an evaluation records.
    monkeypatch.chdir(tmp_path)
    valid, train = tmp_path / "valid-v1.1.json", tmp_path / "train-v1.1.json"
    recorded = {"limit": None, "jcommonsenseqa": {**sample, "file": str(valid), "train": str(train)}}
    asked = req(jcommonsenseqa="valid-v1.1.json", jcommonsenseqa_train="./train-v1.1.json")
    assert same_setup(recorded, asked, ["jcommonsenseqa"])
