"""Goodput: productive training time / wall time, and where the rest went. Pure.

    compute(attempts, transitions, events, now=None) -> Goodput

`attempts` and `transitions` are the ledger's rows (dicts with `attempt`, `started_at`,
`ended_at`, `state`, `cause`; `to_state`, `at`), `events` the run's events.jsonl records.
Wall time runs from the run's first transition (submission) to its terminal transition
(or `now`). Every second of it lands in exactly one bucket:

- productive        step time of steps that survive into the final model
- lost_work         step time of steps thrown away: done after the checkpoint the next
                    attempt resumed from (a crash, or a rollback's discarded window)
- restart           failure -> detection -> backoff -> next attempt's first step, and
                    an in-attempt worker replacement (a `failure` event between two steps:
                    the gap beyond one typical step time)
- hang              from the last step of a hung attempt until the hang was detected (by
                    the supervisor, or by the job before it replaced the hung worker)
- checkpoint_stall  time training was blocked by checkpoint saves (`blocking_s`)
- queueing          submission -> the first step of the first attempt
- other             after the final step (shutdown), and anything unattributed

`productive_by_world` splits the step time of the surviving steps by the data-parallel world
they ran on (the `start` and `world_resized` events: a shrunk world with `workers.min_workers`).

Attempts may overlap in wall time (a new one submitted while an old one stops); each
moment is attributed once, to the newer attempt.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

BUCKETS = ("productive", "lost_work", "restart", "hang", "checkpoint_stall", "queueing", "other")
TERMINAL = {"succeeded", "failed", "stopped"}


@dataclass(frozen=True)
class Goodput:
    wall_s: float
    seconds: dict[str, float]  # bucket -> seconds, summing to wall_s
    restarts_by_cause: dict[str, int] = field(default_factory=dict)
    final_step: int = 0
    lost_steps: int = 0
    productive_by_world: dict[int, float] = field(default_factory=dict)  # workers -> step seconds kept

    @property
    def productive_s(self) -> float:
        return self.seconds.get("productive", 0.0)

    @property
    def ratio(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["fractions"] = {k: (v / self.wall_s if self.wall_s > 0 else 0.0) for k, v in self.seconds.items()}
        return d


def compute(
    attempts: Sequence[dict[str, Any]],
    transitions: Sequence[dict[str, Any]],
    events: Iterable[dict[str, Any]],
    now: float | None = None,
) -> Goodput:
    by_attempt: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if isinstance(e.get("attempt"), int) and isinstance(e.get("ts"), (int, float)):
            by_attempt.setdefault(e["attempt"], []).append(e)
    for evs in by_attempt.values():
        evs.sort(key=lambda e: e["ts"])
    rows = sorted(attempts, key=lambda a: a["attempt"])
    trans = sorted(transitions, key=lambda t: t.get("at") or 0)
    t0 = trans[0]["at"] if trans else (rows[0]["started_at"] if rows else 0.0)
    end = next((t["at"] for t in trans if t.get("to_state") in TERMINAL), None)
    if end is None:
        last_ts = max((e["ts"] for evs in by_attempt.values() for e in evs), default=t0)
        end = now if now is not None else last_ts
    secs = dict.fromkeys(BUCKETS, 0.0)
    if end <= t0:
        return Goodput(0.0, secs)

    # The step each later attempt resumed from decides which earlier steps were thrown away.
    resumed: dict[int, int] = {}
    for a in rows:
        start = next((e for e in by_attempt.get(a["attempt"], []) if e.get("type") == "start"), None)
        rs = start.get("resume_step") if start else a.get("resume_step")
        if isinstance(rs, int):
            resumed[a["attempt"]] = rs
    starts = [float(a["started_at"]) for a in rows]

    lost_steps = 0
    final_step = 0
    by_world: dict[int, float] = {}
    cursor = t0
    first_attempt = True
    for i, a in enumerate(rows):
        n = a["attempt"]
        a_start = max(float(a["started_at"]), cursor)
        a_stop = min(float(a.get("ended_at") or end), end)
        if i + 1 < len(rows):
            a_stop = min(a_stop, starts[i + 1])
        # gap before this attempt: queueing before the first, restart (backoff) otherwise
        if a_start > cursor:
            secs["queueing" if first_attempt else "restart"] += a_start - cursor
            cursor = a_start
        if a_stop <= a_start:
            first_attempt = first_attempt and not _steps(by_attempt.get(n, []))
            continue
        evs = [e for e in by_attempt.get(n, []) if a_start - 1e-9 <= e["ts"] <= a_stop + 1e-9]
        steps = _steps(evs)
        # the earliest later attempt that resumed: steps above its resume step were thrown away
        later = [resumed[r["attempt"]] for r in rows[i + 1 :] if r["attempt"] in resumed]
        keep_upto = min(later) if later else None
        if not steps:
            secs["queueing" if first_attempt else "restart"] += a_stop - a_start
            cursor = a_stop
            continue
        durations = _durations(steps, a_start)
        first_ts = steps[0]["ts"] - durations[0]
        secs["queueing" if first_attempt else "restart"] += max(0.0, first_ts - a_start)
        first_attempt = False
        stall = sum(float(e.get("blocking_s") or 0) for e in evs if e.get("type") == "checkpoint")
        failures = [e for e in evs if e.get("type") == "failure"]
        typical = _typical(steps, durations)
        good = lost = 0.0
        sizes = [e for e in evs if e.get("type") in ("start", "world_resized") and isinstance(e.get("world_size"), int)]
        for i, (ev, d) in enumerate(zip(steps, durations, strict=True)):
            inside = [f for f in failures if i > 0 and steps[i - 1]["ts"] < f["ts"] <= ev["ts"]]
            if inside:  # a worker died or hung and was replaced in-attempt between these two steps
                over = max(0.0, d - typical * max(1, ev["step"] - steps[i - 1]["step"]))
                before = min(over, max(0.0, inside[0]["ts"] - steps[i - 1]["ts"]))
                secs["hang" if inside[0].get("kind") == "hang" else "restart"] += before
                secs["restart"] += over - before
                d -= over
            if keep_upto is not None and ev["step"] > keep_upto:
                lost += d
                lost_steps += 1
            else:
                good += d
                final_step = max(final_step, ev["step"])
                world = next((e["world_size"] for e in reversed(sizes) if e["ts"] <= ev["ts"]), None)
                if world is not None:
                    by_world[world] = by_world.get(world, 0.0) + d
        overhead = min(good, stall)
        secs["checkpoint_stall"] += overhead
        secs["productive"] += good - overhead
        secs["lost_work"] += lost
        tail = max(0.0, a_stop - steps[-1]["ts"])
        last_failures = [f for f in failures if f["ts"] > steps[-1]["ts"]]
        hung = a.get("cause") == "hang" or bool(last_failures and last_failures[0].get("kind") == "hang")
        if hung:
            secs["hang"] += tail
        elif a.get("state") == "succeeded" or keep_upto is None:
            secs["other"] += tail
        else:
            secs["restart"] += tail
        cursor = a_stop
    if end > cursor:
        secs["other" if _terminal(trans) else "restart"] += end - cursor
    wall = end - t0
    restarts = Counter(str(a.get("cause") or "unknown") for a in rows[:-1])
    for evs in by_attempt.values():
        restarts["worker_replaced"] += sum(1 for e in evs if e.get("type") == "worker_replaced")
    restarts = Counter({k: v for k, v in restarts.items() if v})
    return Goodput(wall, secs, dict(restarts), final_step, lost_steps, dict(sorted(by_world.items())))


def _terminal(trans: Sequence[dict[str, Any]]) -> bool:
    return any(t.get("to_state") in TERMINAL for t in trans)


def _typical(steps: Sequence[dict[str, Any]], durations: Sequence[float]) -> float:
    """The median wall time of one step in this attempt."""
    per = [d / max(1, b["step"] - a["step"]) for a, b, d in zip(steps, steps[1:], durations[1:], strict=False)]
    return statistics.median(per) if per else (durations[0] if durations else 0.0)


def _steps(evs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in evs if e.get("type") == "step" and isinstance(e.get("step"), int)]


def _durations(steps: Sequence[dict[str, Any]], attempt_start: float) -> list[float]:
    """Wall time each step event accounts for: the gap since the previous step event (logging
    every N steps makes it N steps' worth); the first uses its own step_time_s."""
    gaps = [max(0.0, b["ts"] - a["ts"]) for a, b in zip(steps, steps[1:], strict=False)]
    own = steps[0].get("step_time_s")
    per_step = [g / max(1, b["step"] - a["step"]) for g, a, b in zip(gaps, steps, steps[1:], strict=False)]
    guess = (
        float(own) if isinstance(own, (int, float)) and own > 0 else (statistics.median(per_step) if per_step else 0.0)
    )
    first = min(guess, max(0.0, steps[0]["ts"] - attempt_start))
    return [first, *gaps]
