"""The driver's part of a world that changes: a smaller world when too few workers can be placed
(`workers.min_workers`), grown back at a checkpoint once they are; a checkpoint loaded by every
rank (sharded: whatever world wrote it); and the sharded tier-1 recovery that reloads the newest
verified checkpoint in place."""

from __future__ import annotations

import json
from typing import Any

from controlplane import checkpoint as ckpt
from jobs.pretrain.placement import PLACE_TIMEOUT_S, elastic_world
from jobs.pretrain.recovery import Slot


class WorldMixin:
    """Methods of `Driver` (it owns the attributes they use)."""

    def _elastic(self, started: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """With `workers.min_workers`: if the rest of the world is not up `workers.elastic_wait_s` after
        its first worker, run on the largest world up that keeps the global batch (more accumulation
        per worker). The others stay requested (`growers`): the world grows back at a checkpoint."""
        import ray

        w = self.run.workers
        if w.floor >= self.world:
            return started
        refs = [ref for _, ref in started]
        ray.wait(refs, num_returns=1, timeout=PLACE_TIMEOUT_S)  # a worker's start (imports, data) is not a wait
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=w.elastic_wait_s)
        world = elastic_world(len(ready), self.run) if len(ready) < len(refs) else None
        if world is None:
            return started  # all placed, or too few for any valid world: wait on as without a floor
        kept = [(a, r) for a, r in started if r in ready][:world]
        self.growers = [x for x in started if x not in kept]
        why = f"{len(ready)} of {w.num_workers} workers placed within {w.elastic_wait_s:g} s{self.workers.exclusions()}"
        self._resized(world, f"shrunk: {why}")
        return kept

    def _resized(self, world: int, reason: str) -> None:
        self.events.emit(
            "world_resized",
            world_size=world,
            previous=self.world,
            num_workers=self.run.workers.num_workers,
            step=self.step,
            accumulation=self._accumulation(world),
            reason=reason,
        )
        self.world = world

    def _accumulation(self, world: int) -> int:
        t = self.run.train
        share = t.global_batch_size // world
        return share // (t.micro_batch_size or share)

    def _grow(self, step_no: int) -> None:
        """At a checkpoint of a shrunk world: once more workers are placed, commit this checkpoint,
        add them and re-form the group (sharded: every rank reloads it, resharded to the new world;
        replicated: the new ranks copy rank 0's state from memory)."""
        import ray

        if not self.growers:
            return
        ready = [x for x in self.growers if ray.wait([x[1]], timeout=0)[0]]
        world = elastic_world(self.world + len(ready), self.run) if ready else None
        if world is None or world <= self.world:
            return
        self._reap_checkpoint(timeout=600)
        ray.get([s.actor.flush.remote() for s in self.slots.values()], timeout=600)  # committed (or failed)
        info, _ = ckpt.newest_verified(self.run_dir.checkpoints)
        if self.sharded and (info is None or info.step != step_no):
            return  # this checkpoint did not commit: try again at the next one
        for actor, ref in ready[: world - self.world]:
            i = ray.get(ref, timeout=60)
            rank = len(self.slots)
            self.slots[rank] = Slot(rank, actor, i["pid"], i["node_id"], i["node_ip"])
            self.growers.remove((actor, ref))
        self._resized(world, f"grown: {len(ready)} more of {self.run.workers.num_workers} workers placed again")
        if self.sharded:
            self._reload_in_place(step_no)
        else:
            self.metrics_url = self._form_group()[0].get("metrics_url")
            ray.get([s.actor.sync_state.remote(0) for s in self.slots.values()], timeout=600)
            ray.get([s.actor.disarm.remote(step_no) for s in self.slots.values()], timeout=60)

    def _load(self, info: ckpt.CheckpointInfo) -> None:
        """Every rank loads the checkpoint (sharded: its own shards, whatever the writers' world)."""
        import ray

        ray.get([s.actor.load_checkpoint.remote(str(info.path)) for s in self.slots.values()], timeout=600)
        trainer = json.loads((info.path / "trainer_state.json").read_text())
        self.step, self.tokens, self.loss = trainer["step"], trainer["tokens"], trainer.get("loss")
        self.guard.load(trainer.get("loss_history", []))

    def _reload_in_place(self, through_step: int) -> None:
        """Sharded tier 1: a dead rank's shards are in no survivor's memory. Every rank (survivors
        keep torch and the data loaded) rebuilds its model on the new group and loads the newest
        verified checkpoint, or starts from the seed when there is none; the attempt goes on."""
        import ray

        self._reap_checkpoint(timeout=0)
        self.ckpt_call = None  # a save of the old group never commits
        self.metrics_url = self._form_group()[0].get("metrics_url")
        info, skipped = ckpt.newest_verified(self.run_dir.checkpoints)
        if info is not None:
            self._load(info)
        else:
            self.step, self.tokens, self.loss = 0, 0, None
            self.guard.load([])
        self.events.emit(
            "reloaded",
            step=self.step,
            checkpoint=str(info.path) if info else None,
            skipped_checkpoints=[[s, why] for s, why in skipped],
        )
        ray.get([s.actor.disarm.remote(through_step) for s in self.slots.values()], timeout=60)
