"""Where and how the job's worker actors are created: their resources, their config, and the
nodes they must keep off (`LLMCTL_EXCLUDE_NODES`, set by the supervisor; see
`controlplane.supervisor.nodes`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from controlplane.spec import RunSpec, elastic_world
from controlplane.supervisor.nodes import excluded_names, ray_nodes_to_exclude

PLACE_TIMEOUT_S = 600.0  # a worker that cannot be placed for this long fails the attempt

__all__ = ["PLACE_TIMEOUT_S", "WorkerFactory", "elastic_world"]


@dataclass
class WorkerFactory:
    run: RunSpec
    config: dict[str, Any]  # what every TrainWorker is built from, less its `drills` flag
    exclude: set[str] = field(default_factory=lambda: excluded_names(os.environ))  # node ids or host names
    excluded: dict[str, str] = field(default_factory=dict)  # Ray node id -> the excluded name it matched

    def spawn(self, drills: bool) -> tuple[Any, Any]:
        """A new worker actor and the reference of its `info()` (ready once it is placed and built)."""
        import ray

        from jobs.pretrain.worker import CONTROL, TrainWorker

        w = self.run.workers
        opts: dict[str, Any] = {}
        if self.exclude:  # looked up at every spawn: a host may come back under a new node id
            self.excluded = ray_nodes_to_exclude(self.exclude, ray.nodes())
            if self.excluded:
                opts["label_selector"] = {"ray.io/node-id": f"!in({','.join(sorted(self.excluded))})"}
        # probe() is answered while step() runs (its own concurrency group); step calls stay in order
        cls = ray.remote(concurrency_groups={CONTROL: 1})(TrainWorker).options(
            num_cpus=w.cpus_per_worker,
            num_gpus=w.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
            **opts,
        )
        actor = cls.remote({**self.config, "drills": drills})
        return actor, actor.info.remote()

    def exclusions(self) -> str:
        """' with nodes excluded: a, b' for a placement error, or ''."""
        return f" with nodes excluded: {', '.join(sorted(set(self.excluded.values())))}" if self.excluded else ""
