"""Observation: what the reconcile loop knows of one run, put into the policy's `Observed`.

Reads the run's `RunTrack` (events.jsonl folded), the ledger's attempt and node records, node
health telemetry, `cluster down` records and Ray's node table; does no writing. The loop
(`controlplane.supervisor.loop`) calls `observe` once per pass, then `policy.decide`.
"""

from __future__ import annotations

import math
from typing import Any

from controlplane import checkpoint as ckpt
from controlplane.context import Context
from controlplane.rundir import RunDir
from controlplane.spec import RunSpec
from controlplane.states import RunState
from controlplane.supervisor import observed as O
from controlplane.supervisor import rules, store
from controlplane.supervisor.nodes import dead_by_ray, read_cluster_downs, read_health
from controlplane.supervisor.ports import ClusterView
from controlplane.supervisor.track import NODE_FAULTS, RunTrack

# failures seen from this long before a user's `cluster down` of their node are the user's doing
STOP_GRACE_S = 10.0


class VerifiedCheckpoints:
    """Committed checkpoints that verify (sha256), each verdict cached by its files' newest mtime."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[Any, bool]] = {}

    def steps(self, rd: RunDir) -> list[int]:
        out = []
        for step in ckpt.committed_steps(rd.checkpoints):
            path = rd.checkpoints / ckpt.step_dirname(step)
            try:
                key: Any = max((p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir())
            except (OSError, ValueError):
                continue
            cached = self._cache.get((str(rd.path), step))
            if cached is None or cached[0] != key:
                try:
                    ckpt.verify(path)
                    ok = True
                except (ckpt.CheckpointCorrupt, OSError):
                    ok = False
                cached = (key, ok)
                self._cache[(str(rd.path), step)] = cached
            if cached[1]:
                out.append(step)
        return out


def observe(
    ctx: Context,
    run: dict[str, Any],
    spec: RunSpec,
    rd: RunDir,
    track: RunTrack,
    cur: dict[str, Any] | None,
    status: O.JobStatus,
    now: float,
    *,
    verified: list[int],
    view: ClusterView | None,
) -> O.Observed:
    """The policy's view of run `run` now: `cur` is its current attempt row (None: none yet),
    `status` what the Jobs API says of it, `verified` the checkpoint steps that verify on disk,
    `view` the cluster's nodes and free resources (None: no view)."""
    n = cur["attempt"] if cur else 0
    a = track.attempts.get(str(n), {})
    poisoned = set(track.poisoned)
    heartbeats = tuple(
        O.Heartbeat(int(rank), float(v[0]), v[1], v[2])
        for rank, v in sorted(track.heartbeats.items())
        if v[3] == n and str(rank).lstrip("-").isdigit()
    )
    failures = tuple(
        O.Failure(
            f["kind"],
            f["at"],
            f["attempt"],
            f.get("step"),
            f.get("rank"),
            f.get("node"),
            f.get("detail", ""),
            recovered=bool(f.get("recovered")),
        )
        for f in track.failures_of(n)
    )
    records = {r["node"]: r for r in store.node_records(ctx.ledger)}
    excluded = {name for name, r in records.items() if r["excluded"]}
    health = read_health(ctx.storage)
    stopped = read_cluster_downs(ctx.storage)
    hosted = {str(node) for att in track.attempts.values() for node in (att.get("workers") or {}).values() if node}
    dead = dead_by_ray(view.nodes, hosted, stopped) if view else {}
    names = set(health) | excluded | set(track.node_failures) | set(dead)

    def failures_on(name: str) -> int:  # since an operator last readmitted it; not once a user stopped it
        since = (records.get(name) or {}).get("readmitted_at") or 0.0
        until = stopped.get(name, math.inf) - STOP_GRACE_S
        return node_fault_count(track.failures, name, since, until)

    nodes = tuple(
        O.NodeStatus(
            name,
            healthy=health[name].healthy if name in health else True,
            excluded=name in excluded,
            failures=failures_on(name),
            reasons=health[name].reasons if name in health else (),
            dead=dead.get(name),
        )
        for name in sorted(names)
    )
    asks = capacity(spec, view, excluded) if view and n and not a.get("started_at") else None
    progressed = [track.progressed(i) for i in range(1, n)]
    pending = None
    if track.pending:
        p = track.pending
        pending = O.PendingRestart(
            p["cause"],
            p["decided_at"],
            p["not_before"],
            p.get("max_resume_step"),
            tuple(tuple(w) for w in p.get("skip_steps", [])),
        )
    elapsed = now - (track.first_ts or run["created_at"])
    prior = spec.checkpoint.mtbf_hours * 3600 if spec.checkpoint.mtbf_hours else None
    return O.Observed(
        run_state=RunState(run["state"]),
        final_step=spec.train.steps,
        attempt=n,
        job_status=status,
        attempt_submitted_at=cur["started_at"] if cur else None,
        attempt_started_at=a.get("started_at"),
        attempt_nodes=tuple(a.get("nodes", ())),
        attempt_progressed=track.progressed(n) if n else False,
        end_status=a.get("end"),
        last_step=track.last_step,
        last_step_at=track.last_step_at,
        median_step_s=track.median_step_s(),
        heartbeats=heartbeats,
        failures=failures,
        recent_losses=tuple(track.losses) if track.losses_attempt == n else (),
        restarts=max(0, n - 1),
        restarts_without_progress=rules.restarts_without_progress(progressed),
        rollbacks=track.rollbacks,
        verified_steps=tuple(s for s in verified if s not in poisoned),
        poisoned_steps=tuple(sorted(poisoned)),
        skip_steps=tuple(tuple(w) for w in track.skip_steps),
        nodes=nodes,
        pending=pending,
        save_cost_s=track.save_cost_s(),
        mtbf_s=rules.mtbf_estimate_s(elapsed, track.failure_count, prior),
        interval_steps=track.interval_steps,
        capacity=asks,
    )


def node_fault_count(failures: list[dict[str, Any]], node: str, since: float = 0.0, until: float = math.inf) -> int:
    """The failures that count against `node` between `since` and `until`: each the job reported
    (a worker death, a driver error) and each hang the supervisor found there, except a hang in an
    attempt whose job already reported a failure on that node: the survivors stalled behind that
    death (or its replacement) is the same fault seen again, not a second one."""
    on_node = [f for f in failures if f.get("node") == node and f["kind"] in NODE_FAULTS and since < f["at"] < until]
    reported = {f.get("attempt") for f in on_node if f.get("source") != "supervisor"}
    return sum(1 for f in on_node if f.get("source") != "supervisor" or f.get("attempt") not in reported)


def capacity(spec: RunSpec, view: ClusterView, excluded: set[str]) -> O.Capacity | None:
    """What the attempt's workers ask against what the cluster's nodes (not excluded) have, while Ray
    holds requests it cannot place or the nodes not excluded cannot hold them (None otherwise, or
    when the free resources are unknown). Ray does not report a request that only the exclusions
    keep out (a label selector) as demand, so that case is judged here."""
    if view.free is None:
        return None
    w = spec.workers  # an attempt may start on workers.min_workers: that is what it needs
    asked = {"CPU": w.floor * w.cpus_per_worker}
    if w.gpus_per_worker:
        asked["GPU"] = w.floor * w.gpus_per_worker
    total: dict[str, float] = {}
    held: dict[str, float] = {}
    for node in view.nodes:
        if node.get("alive"):
            into = held if node.get("node_id") in excluded else total
            for k, v in (node.get("resources_total") or {}).items():
                into[k] = into.get(k, 0.0) + float(v)
    cap = O.Capacity(
        tuple(sorted(asked.items())),
        tuple(sorted((k, total.get(k, 0.0)) for k in asked)),
        # what is free on excluded nodes is no use to this attempt
        tuple(sorted((k, min(view.free.get(k, 0.0), total.get(k, 0.0))) for k in asked)),
        tuple(sorted((k, held.get(k, 0.0)) for k in asked)),
    )
    return cap if view.pending or cap.held_out() else None
