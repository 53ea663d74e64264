"""Ledger: migrations, transitions with causes, attempts fencing, concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from controlplane.errors import CorruptFileError, NotFoundError, UserError
from controlplane.ledger import MIGRATIONS, Ledger
from controlplane.states import AttemptState, RunState


def make(ledger, run_id="r1"):
    return ledger.create_run(run_id, "r", {"a": 1}, {"c": 1}, f"/runs/{run_id}")


def test_schema_version_and_wal(tmp_path):
    led = Ledger(tmp_path / "l.db")
    assert led.schema_version == len(MIGRATIONS)
    mode = sqlite3.connect(tmp_path / "l.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    Ledger(tmp_path / "l.db")  # reopening applies nothing twice


def test_newer_schema_is_refused(tmp_path):
    led = Ledger(tmp_path / "l.db")
    with led.tx() as c:
        c.execute("INSERT INTO schema_migrations VALUES ('9999_future', 0)")
    with pytest.raises(UserError, match="newer llmctl"):
        Ledger(tmp_path / "l.db")


def test_corrupt_file(tmp_path):
    p = tmp_path / "l.db"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptFileError):
        Ledger(p)


def test_transitions_recorded_with_cause(tmp_path):
    led = Ledger(tmp_path / "l.db")
    make(led)
    assert led.transition("r1", RunState.PROVISIONING, "submitted", 1)
    assert led.transition("r1", RunState.RUNNING, "first step", 1)
    assert not led.transition("r1", RunState.PENDING, "backwards")
    assert led.transition("r1", RunState.SUCCEEDED, "final step reached", 1)
    assert not led.transition("r1", RunState.RUNNING, "after the end")
    states = [(t["to_state"], t["cause"]) for t in led.transitions("r1")]
    assert states == [
        ("pending", "submitted"),
        ("provisioning", "submitted"),
        ("running", "first step"),
        ("succeeded", "final step reached"),
    ]
    with pytest.raises(NotFoundError):
        led.transition("nope", RunState.RUNNING, "x")


def test_next_attempt_fences_older(tmp_path):
    led = Ledger(tmp_path / "l.db")
    make(led)
    assert led.next_attempt("r1", None) == 1
    led.update_attempt("r1", 1, state=AttemptState.RUNNING, job_id="r1-a1")
    assert led.next_attempt("r1", 10, {"cause": "worker died"}) == 2
    a1, a2 = led.attempts("r1")
    assert a1["state"] == "fenced" and a1["ended_at"] is not None
    assert a2["state"] == "submitted" and a2["resume_step"] == 10 and a2["info"]["cause"] == "worker died"


def test_find_run_by_prefix(tmp_path):
    led = Ledger(tmp_path / "l.db")
    make(led, "alpha-1")
    make(led, "alpha-2")
    make(led, "beta-1")
    assert led.find_run("beta")["run_id"] == "beta-1"
    with pytest.raises(UserError, match="ambiguous"):
        led.find_run("alpha")
    with pytest.raises(NotFoundError):
        led.find_run("gamma")
    with pytest.raises(UserError):
        led.create_run("beta-1", "x", {}, {}, "/x")


def _writer(path, worker, n):
    led = Ledger(path)
    for i in range(n):
        led.record_incident("r1", "test", {"worker": worker, "i": i})
        led.record_checkpoint("r1", worker * 1000 + i, "/ckpt", 1, 1, 0.1)


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "l.db"
    make(Ledger(path))
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    reader = Ledger(path)
    while any(p.is_alive() for p in procs):
        reader.incidents("r1")  # a reader alongside the writers never fails
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(reader.incidents("r1")) == 240
    assert len(reader.checkpoints("r1")) == 240
