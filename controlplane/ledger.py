"""The ledger: the durable record of runs, attempts, transitions, checkpoints and incidents.

SQLite in WAL mode, so the CLI and a long-running supervisor read and write at the same
time. Every write is one short `BEGIN IMMEDIATE` transaction; a busy database is waited on
(bounded), never failed. The schema is a list of named migrations, applied once each and
recorded in `schema_migrations`; `PRAGMA user_version` holds how many have run. A later
feature adds a migration to the end of `MIGRATIONS`, never edits an applied one.

Rows read back are plain dicts; JSON columns are decoded leniently.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from controlplane.errors import CorruptFileError, NotFoundError, UserError
from controlplane.states import AttemptState, RunState, can_transition

BUSY_TIMEOUT_S = 30.0

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_core",
        """
        CREATE TABLE runs (
            run_id      TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            state       TEXT NOT NULL,
            cause       TEXT,
            spec_json   TEXT NOT NULL,
            cluster_json TEXT NOT NULL,
            run_dir     TEXT NOT NULL,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL
        );
        CREATE TABLE attempts (
            run_id      TEXT NOT NULL REFERENCES runs(run_id),
            attempt     INTEGER NOT NULL,
            state       TEXT NOT NULL,
            job_id      TEXT,
            resume_step INTEGER,
            cause       TEXT,
            info_json   TEXT NOT NULL DEFAULT '{}',
            started_at  REAL NOT NULL,
            ended_at    REAL,
            PRIMARY KEY (run_id, attempt)
        );
        CREATE TABLE transitions (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id      TEXT NOT NULL REFERENCES runs(run_id),
            from_state  TEXT,
            to_state    TEXT NOT NULL,
            cause       TEXT NOT NULL,
            attempt     INTEGER,
            at          REAL NOT NULL
        );
        CREATE TABLE checkpoints (
            run_id      TEXT NOT NULL REFERENCES runs(run_id),
            step        INTEGER NOT NULL,
            path        TEXT NOT NULL,
            bytes       INTEGER NOT NULL,
            attempt     INTEGER,
            save_seconds REAL,
            committed_at REAL NOT NULL,
            PRIMARY KEY (run_id, step)
        );
        CREATE TABLE incidents (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id      TEXT NOT NULL REFERENCES runs(run_id),
            attempt     INTEGER,
            kind        TEXT NOT NULL,
            detail_json TEXT NOT NULL DEFAULT '{}',
            at          REAL NOT NULL
        );
        CREATE INDEX transitions_run ON transitions(run_id, id);
        CREATE INDEX incidents_run ON incidents(run_id, id);
        """,
    ),
    (
        "0002_supervisor",
        """
        CREATE TABLE supervisor_runs (
            run_id      TEXT PRIMARY KEY REFERENCES runs(run_id),
            events_offset INTEGER NOT NULL DEFAULT 0,
            state_json  TEXT NOT NULL DEFAULT '{}',
            updated_at  REAL NOT NULL
        );
        CREATE TABLE supervisor_decisions (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id      TEXT NOT NULL REFERENCES runs(run_id),
            attempt     INTEGER,
            action      TEXT NOT NULL,
            cause       TEXT NOT NULL,
            detail_json TEXT NOT NULL DEFAULT '{}',
            at          REAL NOT NULL
        );
        CREATE TABLE node_exclusions (
            node        TEXT PRIMARY KEY,
            excluded    INTEGER NOT NULL,
            reason      TEXT NOT NULL,
            run_id      TEXT,
            detail_json TEXT NOT NULL DEFAULT '{}',
            excluded_at REAL NOT NULL,
            readmitted_at REAL
        );
        CREATE INDEX supervisor_decisions_run ON supervisor_decisions(run_id, id);
        """,
    ),
    (
        # Energy accounting per run (controlplane/telemetry/energy.py reads and writes it).
        "0003_telemetry",
        """
        CREATE TABLE run_energy (
            run_id            TEXT PRIMARY KEY REFERENCES runs(run_id),
            gpus              INTEGER NOT NULL,
            gpu_seconds       REAL NOT NULL,
            gpu_joules        REAL NOT NULL,
            counter_joules    REAL,
            integrated_joules REAL,
            disagreement      REAL,
            tokens            INTEGER,
            joules_per_token  REAL,
            gpu_kwh           REAL NOT NULL,
            facility_kwh      REAL NOT NULL,
            co2e_kg           REAL NOT NULL,
            avg_power_w       REAL,
            pue               REAL NOT NULL,
            carbon_intensity  REAL NOT NULL,
            power_json        TEXT NOT NULL DEFAULT '[]',
            detail_json       TEXT NOT NULL DEFAULT '{}',
            updated_at        REAL NOT NULL
        )
        """,
    ),
    (
        "0004_rollout",
        """
        CREATE TABLE evaluations (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            model_dir   TEXT NOT NULL,
            run_id      TEXT,
            step        INTEGER,
            tasks_json  TEXT NOT NULL DEFAULT '[]',
            scores_json TEXT NOT NULL DEFAULT '{}',
            detail_json TEXT NOT NULL DEFAULT '{}',
            created_at  REAL NOT NULL
        );
        CREATE TABLE services (
            name        TEXT PRIMARY KEY,
            backend     TEXT NOT NULL,
            stable_version TEXT,
            stable_model TEXT,
            info_json   TEXT NOT NULL DEFAULT '{}',
            updated_at  REAL NOT NULL
        );
        CREATE TABLE rollouts (
            rollout_id  TEXT PRIMARY KEY,
            name        TEXT NOT NULL,
            backend     TEXT NOT NULL,
            state       TEXT NOT NULL,
            request     TEXT,
            spec_json   TEXT NOT NULL,
            stable_version TEXT,
            candidate_version TEXT,
            candidate_model TEXT,
            evaluation_id INTEGER,
            traffic_percent INTEGER NOT NULL DEFAULT 0,
            reason      TEXT,
            created_at  REAL NOT NULL,
            updated_at  REAL NOT NULL
        );
        CREATE TABLE rollout_decisions (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            rollout_id  TEXT NOT NULL REFERENCES rollouts(rollout_id),
            step_index  INTEGER,
            traffic_percent INTEGER,
            action      TEXT NOT NULL,
            reason      TEXT NOT NULL,
            figures_json TEXT NOT NULL DEFAULT '{}',
            at          REAL NOT NULL
        );
        CREATE INDEX evaluations_model ON evaluations(model_dir, id);
        CREATE INDEX rollouts_name ON rollouts(name, created_at);
        CREATE INDEX rollout_decisions_rollout ON rollout_decisions(rollout_id, id);
        """,
    ),
]


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in list(out):
        if key.endswith("_json") and isinstance(out[key], str):
            try:
                out[key.removesuffix("_json")] = json.loads(out[key])
            except json.JSONDecodeError:
                out[key.removesuffix("_json")] = None
            del out[key]
    return out


def apply_transition(
    c: sqlite3.Connection, run_id: str, to: RunState, cause: str, attempt: int | None, now: float
) -> bool:
    """Inside an open write transaction: move a run to `to` with its cause, if allowed now."""
    row = c.execute("SELECT state FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"run {run_id!r}: no such run")
    src = RunState(row[0])
    if src == to or not can_transition(src, to):
        return False
    c.execute("UPDATE runs SET state = ?, cause = ?, updated_at = ? WHERE run_id = ?", (to, cause, now, run_id))
    c.execute(
        "INSERT INTO transitions (run_id, from_state, to_state, cause, attempt, at) VALUES (?, ?, ?, ?, ?, ?)",
        (run_id, src, to, cause, attempt, now),
    )
    return True


class Ledger:
    """One connection per Ledger object; safe to share across threads of one process."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise CorruptFileError(f"{self.path}: not a readable llmctl ledger ({exc})") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- plumbing

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front (no upgrade deadlocks)."""
        with self._lock:
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            while True:
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(r) for r in self._conn.execute(sql, args).fetchall()]

    def _migrate(self) -> None:
        with self.tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {r[0] for r in c.execute("SELECT name FROM schema_migrations")}
            known = {name for name, _ in MIGRATIONS}
            if done - known:
                raise UserError(
                    f"{self.path}: written by a newer llmctl (unknown migrations: {', '.join(sorted(done - known))})"
                )
            for name, sql in MIGRATIONS:
                if name not in done:
                    for stmt in filter(str.strip, sql.split(";")):
                        c.execute(stmt)
                    c.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, time.time()))
            c.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # ---------------------------------------------------------------- runs

    def create_run(
        self, run_id: str, name: str, spec: dict[str, Any], cluster: dict[str, Any], run_dir: str
    ) -> dict[str, Any]:
        now = time.time()
        with self.tx() as c:
            if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                raise UserError(f"run {run_id} already exists")
            c.execute(
                "INSERT INTO runs VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                (run_id, name, RunState.PENDING, json.dumps(spec), json.dumps(cluster), run_dir, now, now),
            )
            c.execute(
                "INSERT INTO transitions (run_id, from_state, to_state, cause, attempt, at) VALUES (?, NULL, ?, ?, NULL, ?)",
                (run_id, RunState.PENDING, "submitted", now),
            )
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> dict[str, Any]:
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise NotFoundError(f"run {run_id!r}: no such run in {self.path}")
        return rows[0]

    def find_run(self, prefix: str) -> dict[str, Any]:
        """A run by id or unique id prefix."""
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", (prefix,)) or self.query(
            "SELECT * FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY created_at",
            (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
        )
        if not rows:
            raise NotFoundError(f"run {prefix!r}: no such run")
        if len(rows) > 1:
            raise UserError(f"run {prefix!r}: ambiguous, matches {', '.join(r['run_id'] for r in rows[:5])}")
        return rows[0]

    def list_runs(self, states: set[RunState] | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [r for r in rows if states is None or RunState(r["state"]) in states]

    def live_runs(self) -> list[dict[str, Any]]:
        return [r for r in self.list_runs() if RunState(r["state"]).is_live]

    def transition(self, run_id: str, to: RunState, cause: str, attempt: int | None = None) -> bool:
        """Move a run to `to`, recording the cause. False (and no write) if not allowed now."""
        with self.tx() as c:
            return apply_transition(c, run_id, to, cause, attempt, time.time())

    def transitions(self, run_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM transitions WHERE run_id = ? ORDER BY id", (run_id,))

    # ---------------------------------------------------------------- attempts

    def next_attempt(self, run_id: str, resume_step: int | None, info: dict[str, Any] | None = None) -> int:
        """Record a new attempt and fence every older live one. Returns its number."""
        now = time.time()
        with self.tx() as c:
            n = c.execute("SELECT COALESCE(MAX(attempt), 0) FROM attempts WHERE run_id = ?", (run_id,)).fetchone()[0]
            c.execute(
                "UPDATE attempts SET state = ?, ended_at = ?, cause = COALESCE(cause, 'superseded') "
                "WHERE run_id = ? AND state IN (?, ?)",
                (AttemptState.FENCED, now, run_id, AttemptState.SUBMITTED, AttemptState.RUNNING),
            )
            c.execute(
                "INSERT INTO attempts (run_id, attempt, state, resume_step, info_json, started_at) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, n + 1, AttemptState.SUBMITTED, resume_step, json.dumps(info or {}), now),
            )
        return n + 1

    def update_attempt(self, run_id: str, attempt: int, **fields: Any) -> None:
        allowed = {"state", "job_id", "cause", "ended_at", "resume_step"}
        sets, args = [], []
        for key, value in fields.items():
            if key == "info":
                sets.append("info_json = ?")
                args.append(json.dumps(value))
            elif key in allowed:
                sets.append(f"{key} = ?")
                args.append(value)
            else:
                raise ValueError(f"unknown attempt field {key}")
        if fields.get("state") and AttemptState(fields["state"]).is_terminal and "ended_at" not in fields:
            sets.append("ended_at = ?")
            args.append(time.time())
        with self.tx() as c:
            c.execute(
                f"UPDATE attempts SET {', '.join(sets)} WHERE run_id = ? AND attempt = ?", (*args, run_id, attempt)
            )

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM attempts WHERE run_id = ? ORDER BY attempt", (run_id,))

    def current_attempt(self, run_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM attempts WHERE run_id = ? ORDER BY attempt DESC LIMIT 1", (run_id,))
        return rows[0] if rows else None

    # ---------------------------------------------------------------- checkpoints & incidents

    def record_checkpoint(
        self, run_id: str, step: int, path: str, nbytes: int, attempt: int | None, save_seconds: float | None
    ) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, step, path, nbytes, attempt, save_seconds, time.time()),
            )

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step", (run_id,))

    def record_incident(self, run_id: str, kind: str, detail: dict[str, Any], attempt: int | None = None) -> int:
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO incidents (run_id, attempt, kind, detail_json, at) VALUES (?, ?, ?, ?, ?)",
                (run_id, attempt, kind, json.dumps(detail, default=str), time.time()),
            )
            return int(cur.lastrowid)

    def incidents(self, run_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM incidents WHERE run_id = ? ORDER BY id", (run_id,))
