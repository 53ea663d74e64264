"""Run and attempt states, and which transitions are allowed.

    pending -> provisioning -> running -> (recovering -> running)* -> succeeded | failed | stopped

Any live state may also go to `failed` or `stopped`. Every transition is recorded in the
ledger with its cause.
"""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    RECOVERING = "recovering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_live(self) -> bool:
        return not self.is_terminal


TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED})

_FORWARD: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.PROVISIONING}),
    # provisioning -> succeeded: the attempt finished while no supervisor watched it start
    RunState.PROVISIONING: frozenset({RunState.RUNNING, RunState.RECOVERING, RunState.SUCCEEDED}),
    RunState.RUNNING: frozenset({RunState.RECOVERING, RunState.SUCCEEDED}),
    RunState.RECOVERING: frozenset({RunState.PROVISIONING, RunState.RUNNING, RunState.SUCCEEDED}),
}


def can_transition(src: RunState, dst: RunState) -> bool:
    if src.is_terminal:
        return False
    if dst in (RunState.FAILED, RunState.STOPPED):
        return True
    return dst in _FORWARD.get(src, frozenset())


class AttemptState(StrEnum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    FENCED = "fenced"  # superseded by a newer attempt; must not write

    @property
    def is_terminal(self) -> bool:
        return self not in (AttemptState.SUBMITTED, AttemptState.RUNNING)
