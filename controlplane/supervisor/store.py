"""The supervisor's ledger tables (migration 0002_supervisor) and its atomic writes.

    supervisor_runs       per run: events offset + the RunTrack JSON (one row, one transaction)
    supervisor_decisions  every action the supervisor took, with its cause (and the job's resized worlds)
    node_exclusions       nodes kept out of training, why, and when they were readmitted

Each `commit_*` writes everything one step of the loop implies in ONE transaction, so a
supervisor killed at any moment leaves the ledger either before or after that step.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from controlplane.ledger import Ledger, apply_transition
from controlplane.states import AttemptState, RunState
from controlplane.supervisor.track import RunTrack

MARKS = frozenset({"MarkRunning", "MarkRecovering", "MarkSucceeded", "MarkFailed", "MarkStopped"})


def load_track(ledger: Ledger, run_id: str) -> RunTrack:
    rows = ledger.query("SELECT events_offset, state_json FROM supervisor_runs WHERE run_id = ?", (run_id,))
    if not rows:
        return RunTrack()
    track = RunTrack.from_json(rows[0].get("state") if isinstance(rows[0].get("state"), dict) else None)
    track.offset = int(rows[0]["events_offset"])
    return track


def _save_track(c: sqlite3.Connection, run_id: str, track: RunTrack, now: float) -> None:
    c.execute(
        "INSERT INTO supervisor_runs (run_id, events_offset, state_json, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(run_id) DO UPDATE SET events_offset = excluded.events_offset, "
        "state_json = excluded.state_json, updated_at = excluded.updated_at",
        (run_id, track.offset, json.dumps(track.to_json(), default=str), now),
    )


def _incident(c: sqlite3.Connection, run_id: str, kind: str, detail: dict[str, Any], attempt: int | None, now: float):
    c.execute(
        "INSERT INTO incidents (run_id, attempt, kind, detail_json, at) VALUES (?, ?, ?, ?, ?)",
        (run_id, attempt, kind, json.dumps(detail, default=str), now),
    )


def commit_ingest(
    ledger: Ledger, run_id: str, track: RunTrack, records: list[tuple[str, dict[str, Any]]], now: float | None = None
) -> None:
    """The checkpoints, incidents and job decisions read from events, with the new offset and track, at once."""
    now = now or time.time()
    with ledger.tx() as c:
        for kind, f in records:
            if kind == "checkpoint":
                c.execute(
                    "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run_id, f["step"], f["path"], f["bytes"], f["attempt"], f["save_seconds"], now),
                )
            elif kind == "incident":
                _incident(c, run_id, f["kind"], f["detail"], f["attempt"], now)
            elif kind == "decision":  # one the job took (a resized world), read from its events
                c.execute(
                    "INSERT INTO supervisor_decisions (run_id, attempt, action, cause, detail_json, at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, f["attempt"], f["action"], f["cause"], json.dumps({"source": "job", **f["detail"]}), now),
                )
        _save_track(c, run_id, track, now)


def commit_decision(
    ledger: Ledger,
    run_id: str,
    track: RunTrack,
    *,
    attempt: int | None,
    incidents: list[tuple[str, dict[str, Any]]] = (),
    transition: tuple[RunState, str] | None = None,
    attempt_fields: dict[str, Any] | None = None,
    decisions: list[tuple[str, str, dict[str, Any]]] = (),
    now: float | None = None,
) -> bool:
    """Incidents, a run transition, the attempt's cause/state, the decisions and the track, at once.
    Returns whether the transition happened."""
    now = now or time.time()
    moved = False
    with ledger.tx() as c:
        for kind, detail in incidents:
            _incident(c, run_id, kind, detail, attempt, now)
        if transition is not None:
            moved = apply_transition(c, run_id, transition[0], transition[1], attempt, now)
            if not moved:  # not allowed from the state the run is in: nothing was applied, so nothing is recorded
                decisions = [d for d in decisions if d[0] not in MARKS]
        if attempt_fields and attempt:
            sets = ", ".join(f"{k} = ?" for k in attempt_fields)
            c.execute(
                f"UPDATE attempts SET {sets} WHERE run_id = ? AND attempt = ?",
                (*attempt_fields.values(), run_id, attempt),
            )
        for action, cause, detail in decisions:
            c.execute(
                "INSERT INTO supervisor_decisions (run_id, attempt, action, cause, detail_json, at) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, attempt, action, cause, json.dumps(detail, default=str), now),
            )
        _save_track(c, run_id, track, now)
    return moved


def set_attempt_state(ledger: Ledger, run_id: str, attempt: int, state: AttemptState, cause: str | None = None) -> None:
    """Record a state the Jobs API reported; a terminal state is never overwritten."""
    now = time.time()
    with ledger.tx() as c:
        row = c.execute("SELECT state FROM attempts WHERE run_id = ? AND attempt = ?", (run_id, attempt)).fetchone()
        if row is None or AttemptState(row[0]).is_terminal or row[0] == state:
            return
        ended = now if state.is_terminal else None
        c.execute(
            "UPDATE attempts SET state = ?, ended_at = COALESCE(ended_at, ?), cause = COALESCE(cause, ?) "
            "WHERE run_id = ? AND attempt = ?",
            (state, ended, cause, run_id, attempt),
        )


def decisions(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    return ledger.query("SELECT * FROM supervisor_decisions WHERE run_id = ? ORDER BY id", (run_id,))


# --------------------------------------------------------------------------- nodes


def exclude_node(ledger: Ledger, node: str, reason: str, run_id: str | None = None, detail: dict | None = None) -> bool:
    """Exclude `node`; False if it already was (idempotent)."""
    now = time.time()
    with ledger.tx() as c:
        row = c.execute("SELECT excluded FROM node_exclusions WHERE node = ?", (node,)).fetchone()
        if row and row[0]:
            return False
        c.execute(
            "INSERT INTO node_exclusions (node, excluded, reason, run_id, detail_json, excluded_at, readmitted_at) "
            "VALUES (?, 1, ?, ?, ?, ?, NULL) ON CONFLICT(node) DO UPDATE SET excluded = 1, reason = excluded.reason, "
            "run_id = excluded.run_id, detail_json = excluded.detail_json, excluded_at = excluded.excluded_at, "
            "readmitted_at = NULL",
            (node, reason, run_id, json.dumps(detail or {}, default=str), now),
        )
    return True


def readmit_node(ledger: Ledger, node: str) -> bool:
    """Readmit `node`; False if it was not excluded."""
    with ledger.tx() as c:
        cur = c.execute(
            "UPDATE node_exclusions SET excluded = 0, readmitted_at = ? WHERE node = ? AND excluded = 1",
            (time.time(), node),
        )
        return cur.rowcount > 0


def readmit_stopped(ledger: Ledger, nodes: list[str]) -> list[str]:
    """`cluster down` stopped `nodes`: readmit those the supervisor excluded (an operator's own
    exclusion stays). Returns the readmitted ones."""
    out = []
    with ledger.tx() as c:
        for node in nodes:
            cur = c.execute(
                "UPDATE node_exclusions SET excluded = 0, readmitted_at = ? "
                "WHERE node = ? AND excluded = 1 AND reason NOT LIKE 'operator:%'",
                (time.time(), node),
            )
            if cur.rowcount:
                out.append(node)
    return out


def node_records(ledger: Ledger) -> list[dict[str, Any]]:
    return ledger.query("SELECT * FROM node_exclusions ORDER BY excluded_at")


def node_record(ledger: Ledger, node: str) -> dict[str, Any] | None:
    rows = ledger.query("SELECT * FROM node_exclusions WHERE node = ?", (node,))
    return rows[0] if rows else None


def excluded_nodes(ledger: Ledger) -> set[str]:
    return {r["node"] for r in ledger.query("SELECT node FROM node_exclusions WHERE excluded = 1")}
