"""Fenced event writing: every write to the run directory first checks the fence."""

from __future__ import annotations

from typing import Any

from controlplane.rundir import FencedError, RunDir

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_NUMERICAL = 3
EXIT_FENCED = 75

__all__ = ["EventLog", "FencedError", "JobExit", "EXIT_OK", "EXIT_CRASH", "EXIT_NUMERICAL", "EXIT_FENCED"]


class JobExit(Exception):
    """Ends the driver with an exit code (the attempt's end is already recorded, or is recorded by the catcher)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class EventLog:
    """Appends events for one attempt; raises FencedError once a newer attempt owns the run."""

    def __init__(self, run_dir: RunDir, attempt: int) -> None:
        self.run_dir, self.attempt = run_dir, attempt
        self.fenced = False

    def check(self) -> None:
        if self.fenced:
            raise FencedError(f"attempt {self.attempt} is fenced")
        try:
            self.run_dir.check_fence(self.attempt)
        except FencedError:
            self.fenced = True
            raise

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        self.check()
        return self.run_dir.append_event(type_, self.attempt, **fields)
