"""The supervisor's ports: the Jobs API it submits to, and the lock that keeps it alone.

`JobsPort` is what the reconcile loop needs from a job scheduler (every method idempotent);
`RayJobs` is the Ray Jobs API of a context's cluster, through controlplane.ray_cluster (token
auth, submission id `<run_id>-a<N>`). `SupervisorLock` is an fcntl.flock on
`<storage>/supervisor.pid`, released by the kernel when its holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from controlplane.context import Context
from controlplane.errors import UserError
from controlplane.rundir import RunDir
from controlplane.supervisor import policy as P


def submission_id(run_id: str, attempt: int) -> str:
    return f"{run_id}-a{attempt}"


# --------------------------------------------------------------------------- the Jobs API port


class JobsPort(Protocol):
    """What the loop needs from a job scheduler. Every method is idempotent."""

    def status(self, sid: str) -> P.JobStatus: ...

    def submit(
        self,
        run_dir: RunDir,
        attempt: int,
        *,
        max_resume_step: int | None,
        skip_steps: list[tuple[int, int]],
        env_vars: dict[str, str],
    ) -> str: ...

    def stop(self, sid: str) -> None: ...


class RayJobs:
    """The Ray Jobs API of the context's cluster (token auth), through controlplane.ray_cluster."""

    def __init__(self, ctx: Context):
        self.cluster = ctx.cluster
        self._client: Any = None

    def _c(self) -> Any:
        from controlplane import ray_cluster

        if self._client is None:
            self._client = ray_cluster.job_client(self.cluster)
        return self._client

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        try:
            return fn(self._c())
        except Exception:
            self._client = None  # reconnect next time (the head may have moved or restarted)
            raise

    def status(self, sid: str) -> P.JobStatus:
        from controlplane import ray_cluster

        return P.JobStatus(self._call(lambda c: ray_cluster.job_status(self.cluster, sid, client=c)))

    def submit(self, run_dir, attempt, *, max_resume_step, skip_steps, env_vars) -> str:
        from controlplane import ray_cluster

        return self._call(
            lambda c: ray_cluster.submit_attempt(
                self.cluster,
                run_dir,
                attempt,
                max_resume_step=max_resume_step,
                skip_steps=skip_steps,
                env_vars=env_vars,
                client=c,
            )
        )

    def stop(self, sid: str) -> None:
        from controlplane import ray_cluster

        self._call(lambda c: ray_cluster.stop_job(self.cluster, sid, client=c))


# --------------------------------------------------------------------------- one supervisor per storage root


class SupervisorBusy(UserError):
    """Another supervisor holds the lock on this storage root."""


class SupervisorLock:
    """fcntl.flock on `<storage>/supervisor.pid` (released by the kernel when the process dies)."""

    def __init__(self, storage_root: Path):
        self.path = Path(storage_root) / "supervisor.pid"
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SupervisorBusy(
                f"another supervisor (pid {self.holder() or '?'}) is running on {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holder(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.path.read_text().strip())
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
