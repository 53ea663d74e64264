"""Typed errors. Each says whether retrying can help (SkyPilot's habit).

A `UserError` is the user's to fix: the CLI prints its one line and exits 2, and the
supervisor never retries it. A `RetryableError` is the world's fault (lost capacity, a dead
node, a flaky API): policies may retry it.
"""

from __future__ import annotations


class LlmctlError(Exception):
    """Base of every error llmctl raises on purpose."""

    retryable: bool = False


class UserError(LlmctlError):
    """Bad input: a spec, a CLI argument, a run id, a corrupt file. Exit code 2."""

    exit_code = 2


class ConfigurationError(UserError):
    """A spec that does not validate. The message names the field path; `problems` holds
    every problem found, one line each (the message shows the first)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class NotFoundError(UserError):
    """A run, rollout, checkpoint or node that does not exist."""


class CorruptFileError(UserError):
    """A file on disk that cannot be read back (checkpoint, ledger, spec)."""


class MissingDependencyError(UserError):
    """An optional integration (NVML, Pulumi CLI, vLLM) is not present."""


class RetryableError(LlmctlError):
    """A transient failure: the caller may retry with backoff."""

    retryable = True
