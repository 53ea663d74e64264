"""The driver's part of a world that changes: a smaller world when too few workers can be placed
(`workers.min_workers`), a checkpoint loaded by every rank (sharded: whatever world wrote it),
and the sharded tier-1 recovery that reloads the newest verified checkpoint in place."""

from __future__ import annotations

import json
from typing import Any

from controlplane import checkpoint as ckpt
from jobs.pretrain.placement import SHRINK_AFTER_S, elastic_world


class WorldMixin:
    """Methods of `Driver` (it owns the attributes they use)."""

    def _elastic(self, started: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """With `workers.min_workers`: if the full world is not placed in SHRINK_AFTER_S, run on the
        largest world placed that keeps the global batch (more accumulation per worker)."""
        import ray

        if self.run.workers.floor >= self.world:
            return started
        refs = [ref for _, ref in started]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=SHRINK_AFTER_S)
        world = elastic_world(len(ready), self.run) if len(ready) < len(refs) else None
        if world is None:
            return started  # all placed, or too few for any valid world: wait on as without a floor
        kept = [(a, r) for a, r in started if r in ready][:world]
        for actor, _ in (x for x in started if x not in kept):
            ray.kill(actor, no_restart=True)
        self.events.emit(
            "world_resized",
            world_size=world,
            num_workers=self.world,
            reason=f"{len(ready)} of {self.world} workers placed in {SHRINK_AFTER_S:.0f} s{self.workers.exclusions()}",
        )
        self.world = world
        return kept

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
