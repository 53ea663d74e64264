"""Tier-1 recovery, the driver's part: a dead or hung rank is replaced inside the attempt.

A warm spare (or a new actor) takes the dead rank; the group is re-formed on a fresh store;
replicated, every replica realigns from the survivor with the most steps (`sync_state`);
sharded, every rank reloads the newest verified checkpoint in place (`world.py`). See
README.md in this package for the protocol.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from jobs.pretrain.events import EXIT_CRASH, JobExit

PROBE_S = 5.0  # a rank whose process does not answer a probe within this is hung (2 s: false hangs on a loaded host)


@dataclass
class Slot:
    rank: int
    actor: Any
    pid: int
    node_id: str | None
    node_ip: str


@dataclass
class Pending:
    """A replacement whose recovery time is reported at the first step completed after it."""

    rank: int
    old_pid: int
    new_pid: int
    source: str
    t_fail: float
    t_detect: float
    cause: str


class RecoveryMixin:
    """Methods of `Driver` (it owns the attributes they use)."""

    def _crash_info(self, rank: int) -> tuple[float | None, int]:
        """When the worker of `rank` failed (a drill's own timestamp, if it was a drill) and in which step."""
        self._stale_ranks(set())  # reads new events: fault_injected, heartbeats
        ts, step = self.injected.get((rank, self.slots[rank].pid), (None, None))
        if step is None:
            step = max(self.step, self.hb_step.get(rank, 0)) + 1
        return ts, step

    def _recover(
        self, dead: dict[int, tuple[str, str]], t_detect: float
    ) -> tuple[list[Pending], tuple[int, dict[int, dict]] | None]:
        """Tier 1: replace the dead ranks, re-form the group, copy the state from a survivor.

        Returns the replacements, and the step the survivors completed but the driver never
        saw (its results died with a worker), if any.
        """
        import ray

        lost: set[int] = set()  # dead ranks; their replacements hold no state, so are never a source
        replaced: list[Pending] = []
        status: dict[int, dict] = {}
        while True:
            crash = {r: self._crash_info(r) for r in dead}
            for r, (kind, detail) in dead.items():  # at detection: goodput reads the gap before it
                node = self.slots[r].node_id
                self.events.emit("failure", kind=kind, rank=r, node_id=node, step=crash[r][1], detail=detail)
            lost |= dead.keys()
            survivors = [r for r in self.slots if r not in lost]
            if not survivors:
                self._end("failed")
                raise JobExit(EXIT_CRASH)
            for rank, (kind, _) in dead.items():
                old = self.slots[rank]
                ray.kill(old.actor, no_restart=True)
                t_fail = crash[rank][0] or t_detect
                actor, source = self._take_spare()
                i = ray.get(actor.info.remote(), timeout=600)
                self.slots[rank] = Slot(rank, actor, i["pid"], i["node_id"], i["node_ip"])
                replaced.append(Pending(rank, old.pid, i["pid"], source, t_fail, t_detect, kind))
            dead = {}
            self._abort_groups([r for r in survivors if r not in status])
            for r in survivors:  # ordered after any step still queued on the survivor
                if r in status:
                    continue
                try:
                    status[r] = ray.get(self.slots[r].actor.status.remote(), timeout=self.pg_timeout_s)
                except Exception as exc:
                    dead[r] = ("worker_died", type(exc).__name__)
            if not dead:
                break
        survivors = [r for r in survivors if r in status]
        src = max(survivors, key=lambda r: status[r]["step"])
        src_step = status[src]["step"]
        from_memory = not self.sharded or self._replicas_hold(lost, survivors, status)
        if not from_memory:
            self._reload_in_place(max(src_step, self.step) + 1)
        elif self.sharded:
            self._restore_from_replicas(lost, survivors, src_step)
        else:
            self.metrics_url = self._form_group()[0].get("metrics_url")
            ray.get([s.actor.sync_state.remote(src) for s in self.slots.values()], timeout=600)
            ray.get([s.actor.disarm.remote(src_step + 1) for s in self.slots.values()], timeout=60)
        for p in replaced:
            self.slots[0].actor.note_restart.remote(p.cause)
        caught_up = None
        if src_step > self.step and from_memory:
            last = {r: status[r]["last"] for r in survivors if (status[r]["last"] or {}).get("step") == src_step}
            caught_up = (src_step, last)
        return replaced, caught_up

    def _abort_groups(self, ranks: list[int]) -> None:
        """Before asking the survivors where they stand: on NCCL, each aborts its communicators
        from its control thread, so a step stuck in a collective with the dead rank returns now,
        and the status call behind it is not held for the group's timeout (a no-op on gloo)."""
        import ray

        refs = [self.slots[r].actor.abort_group.remote() for r in ranks]
        with contextlib.suppress(Exception):  # a survivor that cannot answer is found by its status
            ray.get(refs, timeout=PROBE_S)

    def _replicas_hold(self, lost: set[int], survivors: list[int], status: dict[int, dict]) -> bool:
        """HSDP: every lost rank's mesh position has a survivor in another replica group, and the
        survivors stand at one step (none of them half a step ahead)."""
        replicate = self.run.parallelism.replicate
        if replicate <= 1 or len({status[r]["step"] for r in survivors}) != 1:
            return False
        shard = self.world // replicate
        return all(any(s % shard == d % shard for s in survivors) for d in lost)

    def _restore_from_replicas(self, lost: set[int], survivors: list[int], step: int) -> None:
        """HSDP tier 1: the survivors keep their shards in memory across the re-formed group, and each
        replacement gets its own from the rank at its mesh position in a healthy replica group."""
        import ray

        self._reap_checkpoint(timeout=0)
        self.ckpt_call = None  # a save of the old group never commits
        self.metrics_url = self._form_group(keep=True)[0].get("metrics_url")
        ray.get([s.actor.sync_replica.remote(survivors) for s in self.slots.values()], timeout=600)
        shard = self.world // self.run.parallelism.replicate
        sources = {d: next(s for s in sorted(survivors) if s % shard == d % shard) for d in sorted(lost)}
        self.events.emit("replica_restored", step=step, sources={str(d): s for d, s in sources.items()})
        ray.get([s.actor.disarm.remote(step + 1) for s in self.slots.values()], timeout=60)

    def _take_spare(self) -> tuple[Any, str]:
        """A warm spare if there is one (even one still starting beats a new actor), else a new actor."""
        import ray

        while self.spares:
            actor, ref = self.spares.pop(0)
            try:
                ray.get(ref, timeout=600)
                return actor, "spare"
            except Exception:
                ray.kill(actor, no_restart=True)
        actor, _ = self.workers.spawn(drills=False)
        return actor, "new"

    def _refill_spares(self) -> None:
        while len(self.spares) < self.run.workers.spare_workers:
            self.spares.append(self.workers.spawn(drills=False))
