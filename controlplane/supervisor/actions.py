"""What the supervisor policy decides: one frozen dataclass per kind of action.

`controlplane.supervisor.policy.decide` returns a list of these; the reconcile loop
(`controlplane.supervisor.loop`) carries them out and records each one; the failure simulator
reads them back to play a month of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Submit:
    """Start attempt `attempt`: `--max-resume-step` and `--skip-steps A:B` (half-open) as given."""

    attempt: int
    cause: str
    max_resume_step: int | None = None
    skip_steps: tuple[tuple[int, int], ...] = ()
    exclude_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class StopJob:
    attempt: int
    reason: str


@dataclass(frozen=True)
class Backoff:
    """Wait until `until`, then submit `then` (the loop persists it as a PendingRestart)."""

    until: float
    then: Submit


@dataclass(frozen=True)
class MarkRunning:
    cause: str


@dataclass(frozen=True)
class MarkRecovering:
    cause: str


@dataclass(frozen=True)
class MarkSucceeded:
    cause: str


@dataclass(frozen=True)
class MarkFailed:
    cause: str


@dataclass(frozen=True)
class MarkStopped:
    cause: str


@dataclass(frozen=True)
class RecordIncident:
    kind: str
    detail: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ExcludeNode:
    node: str
    evidence: str


@dataclass(frozen=True)
class SetCheckpointInterval:
    steps: int
    reason: str


Action = (
    Submit
    | StopJob
    | Backoff
    | MarkRunning
    | MarkRecovering
    | MarkSucceeded
    | MarkFailed
    | MarkStopped
    | RecordIncident
    | ExcludeNode
    | SetCheckpointInterval
)
