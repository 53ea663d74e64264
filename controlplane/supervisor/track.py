"""What the supervisor remembers about a run between ticks, derived from its events.

`RunTrack` folds events.jsonl records in one at a time (`ingest`) and is persisted as JSON
beside the byte offset it has read up to, in the same ledger transaction, so a supervisor
killed at any moment resumes exactly where its last commit left it. `ingest` returns the
ledger records an event implies (checkpoints, incidents); it does no I/O itself.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# failures that say something about the node they happened on (not data, not storage)
NODE_FAULTS = frozenset({"worker_died", "hang", "driver_error"})
MAX_FAILURES = 200
MAX_TIMES = 50


@dataclass
class RunTrack:
    offset: int = 0
    first_ts: float | None = None
    high_water: int = 0
    last_step: int = 0
    last_step_at: float | None = None
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # newest attempt with steps
    losses_attempt: int = 0
    heartbeats: dict[str, list[Any]] = field(default_factory=dict)  # rank -> [ts, node, pid, attempt]
    attempts: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    failure_count: int = 0  # failures seen by the job or the supervisor (for the MTBF)
    node_failures: dict[str, int] = field(default_factory=dict)
    save_costs: list[float] = field(default_factory=list)
    checkpoint_attempt: dict[str, int | None] = field(default_factory=dict)  # step -> attempt that wrote it
    rollbacks: int = 0
    skip_steps: list[list[int]] = field(default_factory=list)
    poisoned: list[int] = field(default_factory=list)
    pending: dict[str, Any] | None = None
    interval_steps: int | None = None

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RunTrack:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})

    # ------------------------------------------------------------------ queries

    def attempt(self, n: int) -> dict[str, Any]:
        return self.attempts.setdefault(
            str(n),
            {
                "hw_before": self.high_water,
                "max_step": 0,
                "started_at": None,
                "resume_step": None,
                "workers": {},
                "nodes": [],
                "end": None,
            },
        )

    def progressed(self, n: int) -> bool:
        a = self.attempts.get(str(n))
        return bool(a) and a["max_step"] > a["hw_before"]

    def failures_of(self, n: int) -> list[dict[str, Any]]:
        return [f for f in self.failures if f.get("attempt") == n]

    def median_step_s(self) -> float | None:
        recent = [t for t in self.step_times[-20:] if t > 0]
        return statistics.median(recent) if recent else None

    def save_cost_s(self) -> float | None:
        return statistics.median(self.save_costs) if self.save_costs else None

    def node_of(self, attempt: int, rank: Any) -> str | None:
        a = self.attempts.get(str(attempt))
        return a["workers"].get(str(rank)) if a and rank is not None else None

    def add_failure(self, f: dict[str, Any], count_node: bool) -> None:
        self.failures.append(f)
        del self.failures[:-MAX_FAILURES]
        self.failure_count += 1
        node = f.get("node")
        if count_node and node and f.get("kind") in NODE_FAULTS:
            self.node_failures[node] = self.node_failures.get(node, 0) + 1

    # ------------------------------------------------------------------ ingestion

    def ingest(self, ev: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Fold one event in; return the ledger records it implies: ("checkpoint"|"incident"|"decision", fields)."""
        kind, ts, n = ev.get("type"), ev.get("ts"), ev.get("attempt")
        if not isinstance(ts, (int, float)) or not isinstance(n, int):
            return []
        if self.first_ts is None:
            self.first_ts = ts
        a = self.attempt(n)
        out: list[tuple[str, dict[str, Any]]] = []
        if kind == "start":
            a["started_at"] = ts
            a["resume_step"] = ev.get("resume_step")
            workers = ev.get("workers") or []
            a["workers"] = {str(w.get("rank")): w.get("node_id") for w in workers if isinstance(w, dict)}
            a["nodes"] = sorted(
                {str(w.get(k)) for w in workers if isinstance(w, dict) for k in ("node_id", "node_ip") if w.get(k)}
            )
            skipped = ev.get("skipped_checkpoints") or []
            if skipped:
                out.append(
                    (
                        "incident",
                        {"kind": "checkpoint_skipped", "attempt": n, "detail": {"source": "job", "skipped": skipped}},
                    )
                )
        elif kind == "heartbeat":
            self.heartbeats[str(ev.get("rank"))] = [ts, ev.get("node_id"), ev.get("pid"), n]
        elif kind == "step" and isinstance(ev.get("step"), int):
            step = ev["step"]
            a["max_step"] = max(a["max_step"], step)
            self.high_water = max(self.high_water, step)
            self.last_step, self.last_step_at = step, ts
            st = ev.get("step_time_s")
            if isinstance(st, (int, float)) and st > 0:
                self.step_times.append(float(st))
                del self.step_times[:-MAX_TIMES]
            if self.losses_attempt != n:
                self.losses, self.losses_attempt = [], n
            loss = ev.get("loss")
            if isinstance(loss, (int, float)):
                self.losses.append(float(loss) if math.isfinite(loss) else math.nan)
                del self.losses[:-64]
        elif kind == "checkpoint" and isinstance(ev.get("step"), int):
            step = ev["step"]
            # What training pays per save: `blocking_s` is the time it was held (the whole write
            # when synchronous); Young/Daly's cost is the time lost, not the time the write took.
            cost = float(ev.get("blocking_s") or 0)
            if cost > 0:
                self.save_costs.append(cost)
                del self.save_costs[:-10]
            self.checkpoint_attempt[str(step)] = n
            if step in self.poisoned:
                self.poisoned.remove(step)  # rewritten by the new lineage
            out.append(
                (
                    "checkpoint",
                    {
                        "step": step,
                        "path": str(ev.get("path", "")),
                        "bytes": int(ev.get("bytes") or 0),
                        "attempt": n,
                        "save_seconds": cost or None,
                    },
                )
            )
        elif kind == "failure":
            node = ev.get("node_id") or self.node_of(n, ev.get("rank"))
            f = {
                "kind": str(ev.get("kind") or "unknown"),
                "at": ts,
                "attempt": n,
                "step": ev.get("step"),
                "rank": ev.get("rank"),
                "node": node,
                "detail": str(ev.get("detail") or "")[:500],
            }
            self.add_failure(f, count_node=True)
            detail = {
                "source": "job",
                **{k: v for k, v in f.items() if k not in ("kind", "at", "attempt") and v is not None},
            }
            out.append(("incident", {"kind": f["kind"], "attempt": n, "detail": detail}))
        elif kind == "checkpoint_failed":
            out.append(
                (
                    "incident",
                    {
                        "kind": "checkpoint_failed",
                        "attempt": n,
                        "detail": {"source": "job", "step": ev.get("step"), "error": ev.get("error")},
                    },
                )
            )
        elif kind == "worker_replaced":
            # the failure it answers was recovered inside the attempt: it is not why the attempt ends
            for f in reversed(self.failures):
                if f.get("attempt") == n and f.get("rank") == ev.get("rank") and not f.get("recovered"):
                    f["recovered"] = True
                    break
            detail = {k: ev.get(k) for k in ("rank", "old_pid", "new_pid", "recovery_s", "from")}
            out.append(("incident", {"kind": "worker_replaced", "attempt": n, "detail": {"source": "job", **detail}}))
        elif kind == "world_resized" and isinstance(ev.get("world_size"), int):
            # the job's own decision (workers.min_workers), recorded beside the supervisor's
            detail = {k: ev.get(k) for k in ("world_size", "previous", "num_workers", "step", "accumulation")}
            cause = f"world of {ev['world_size']} workers: {ev.get('reason') or 'no reason given'}"
            out.append(("decision", {"action": "ResizeWorld", "attempt": n, "cause": cause, "detail": detail}))
        elif kind == "end":
            a["end"] = ev.get("status")
        return out
