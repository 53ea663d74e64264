"""Where llmctl finds its cluster spec, storage root and ledger.

The cluster spec comes from `--cluster FILE`, else `$LLMCTL_CLUSTER`, else the embedded
default: a local Ray cluster on this machine. `$LLMCTL_HOME` overrides the embedded
default's storage root (tests and side-by-side installs use it). Import-light: the
read-only CLI path goes through here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from controlplane.ledger import Ledger
from controlplane.rundir import RunDir
from controlplane.spec import ClusterSpec, StorageSpec, load_spec


def default_cluster() -> ClusterSpec:
    root = os.environ.get("LLMCTL_HOME", "~/.llmctl")
    return ClusterSpec(storage=StorageSpec(root=root))


def load_cluster(path: str | Path | None = None) -> ClusterSpec:
    path = path or os.environ.get("LLMCTL_CLUSTER")
    return load_spec(ClusterSpec, path) if path else default_cluster()


@dataclass
class Context:
    """The cluster a command acts on, with lazily opened ledger."""

    cluster: ClusterSpec

    @classmethod
    def load(cls, cluster_file: str | Path | None = None) -> Context:
        return cls(load_cluster(cluster_file))

    @property
    def storage(self) -> Path:
        return self.cluster.storage_root()

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.cluster.ledger_path())

    def run_dir(self, run_id: str) -> RunDir:
        return RunDir.of(self.storage, run_id)

    def dataset_dir(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.storage / p
