"""Ledger records of evaluations, services and rollouts (migration `0004_rollout`).

Plain functions over a `Ledger`: every write is one short transaction, every read returns
plain dicts (JSON columns decoded leniently by the ledger).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from controlplane.errors import NotFoundError, UserError
from controlplane.ledger import Ledger

# Rollout states. Terminal ones end the controller loop.
PENDING, GATING, DEPLOYING, CANARY = "pending", "gating", "deploying", "canary"
PROMOTED, ROLLED_BACK, REJECTED, ABORTED, FAILED = "promoted", "rolled_back", "rejected", "aborted", "failed"
TERMINAL = frozenset({PROMOTED, ROLLED_BACK, REJECTED, ABORTED, FAILED})
LIVE = frozenset({PENDING, GATING, DEPLOYING, CANARY})

# Operator requests a running controller picks up at its next poll.
REQUEST_PROMOTE, REQUEST_ABORT = "promote", "abort"


# --------------------------------------------------------------------------- evaluations


def record_evaluation(
    ledger: Ledger,
    model_dir: str,
    scores: dict[str, Any],
    tasks: list[str],
    run_id: str | None = None,
    step: int | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    with ledger.tx() as c:
        cur = c.execute(
            "INSERT INTO evaluations (model_dir, run_id, step, tasks_json, scores_json, detail_json, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (model_dir, run_id, step, json.dumps(tasks), json.dumps(scores), json.dumps(detail or {}), time.time()),
        )
        return int(cur.lastrowid)


def evaluations(ledger: Ledger, model_dir: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    if model_dir is None:
        return ledger.query("SELECT * FROM evaluations ORDER BY id DESC LIMIT ?", (limit,))
    return ledger.query("SELECT * FROM evaluations WHERE model_dir = ? ORDER BY id DESC LIMIT ?", (model_dir, limit))


def get_evaluation(ledger: Ledger, evaluation_id: int) -> dict[str, Any]:
    rows = ledger.query("SELECT * FROM evaluations WHERE id = ?", (evaluation_id,))
    if not rows:
        raise NotFoundError(f"evaluation {evaluation_id}: no such evaluation")
    return rows[0]


# --------------------------------------------------------------------------- services


def get_service(ledger: Ledger, name: str) -> dict[str, Any] | None:
    rows = ledger.query("SELECT * FROM services WHERE name = ?", (name,))
    return rows[0] if rows else None


def set_service(
    ledger: Ledger,
    name: str,
    backend: str,
    stable_version: str | None,
    stable_model: str | None,
    info: dict[str, Any] | None = None,
) -> None:
    with ledger.tx() as c:
        c.execute(
            "INSERT INTO services (name, backend, stable_version, stable_model, info_json, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET backend = excluded.backend, "
            "stable_version = excluded.stable_version, stable_model = excluded.stable_model, "
            "info_json = excluded.info_json, updated_at = excluded.updated_at",
            (name, backend, stable_version, stable_model, json.dumps(info or {}), time.time()),
        )


def delete_service(ledger: Ledger, name: str) -> None:
    with ledger.tx() as c:
        c.execute("DELETE FROM services WHERE name = ?", (name,))


# --------------------------------------------------------------------------- rollouts


def create_rollout(ledger: Ledger, name: str, backend: str, spec: dict[str, Any], stable_version: str | None) -> str:
    rollout_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    now = time.time()
    with ledger.tx() as c:
        live = c.execute(
            f"SELECT rollout_id FROM rollouts WHERE name = ? AND state IN ({','.join('?' * len(LIVE))})",
            (name, *sorted(LIVE)),
        ).fetchone()
        if live:
            raise UserError(f"rollout {live[0]} of {name!r} is still in progress (abort it first)")
        c.execute(
            "INSERT INTO rollouts (rollout_id, name, backend, state, spec_json, stable_version, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (rollout_id, name, backend, PENDING, json.dumps(spec), stable_version, now, now),
        )
    return rollout_id


def update_rollout(ledger: Ledger, rollout_id: str, **fields: Any) -> None:
    allowed = {
        "state",
        "request",
        "stable_version",
        "candidate_version",
        "candidate_model",
        "evaluation_id",
        "traffic_percent",
        "reason",
    }
    unknown = set(fields) - allowed
    if unknown:
        raise ValueError(f"unknown rollout fields {sorted(unknown)}")
    sets = ", ".join(f"{k} = ?" for k in fields)
    with ledger.tx() as c:
        c.execute(
            f"UPDATE rollouts SET {sets}, updated_at = ? WHERE rollout_id = ?",
            (*fields.values(), time.time(), rollout_id),
        )


def get_rollout(ledger: Ledger, rollout_id: str) -> dict[str, Any]:
    rows = ledger.query("SELECT * FROM rollouts WHERE rollout_id = ?", (rollout_id,))
    if not rows:
        raise NotFoundError(f"rollout {rollout_id!r}: no such rollout")
    return rows[0]


def find_rollout(ledger: Ledger, ref: str) -> dict[str, Any]:
    """A rollout by id, or the newest rollout of a service name."""
    rows = ledger.query("SELECT * FROM rollouts WHERE rollout_id = ?", (ref,)) or ledger.query(
        "SELECT * FROM rollouts WHERE name = ? ORDER BY created_at DESC LIMIT 1", (ref,)
    )
    if not rows:
        raise NotFoundError(f"rollout {ref!r}: no such rollout or service")
    return rows[0]


def list_rollouts(ledger: Ledger, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    if name:
        return ledger.query("SELECT * FROM rollouts WHERE name = ? ORDER BY created_at DESC LIMIT ?", (name, limit))
    return ledger.query("SELECT * FROM rollouts ORDER BY created_at DESC LIMIT ?", (limit,))


def request(ledger: Ledger, rollout_id: str, what: str) -> dict[str, Any]:
    """Ask the running controller to promote or abort; refused once the rollout has ended."""
    row = get_rollout(ledger, rollout_id)
    if row["state"] in TERMINAL:
        raise UserError(f"rollout {rollout_id} already ended ({row['state']})")
    update_rollout(ledger, rollout_id, request=what)
    return get_rollout(ledger, rollout_id)


def record_decision(
    ledger: Ledger,
    rollout_id: str,
    action: str,
    reason: str,
    figures: dict[str, Any] | None = None,
    step_index: int | None = None,
    traffic_percent: int | None = None,
) -> int:
    with ledger.tx() as c:
        cur = c.execute(
            "INSERT INTO rollout_decisions (rollout_id, step_index, traffic_percent, action, reason, figures_json, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rollout_id,
                step_index,
                traffic_percent,
                action,
                reason,
                json.dumps(figures or {}, default=str),
                time.time(),
            ),
        )
        return int(cur.lastrowid)


def decisions(ledger: Ledger, rollout_id: str) -> list[dict[str, Any]]:
    return ledger.query("SELECT * FROM rollout_decisions WHERE rollout_id = ? ORDER BY id", (rollout_id,))
