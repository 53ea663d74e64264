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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from controlplane.context import Context
from controlplane.errors import LlmctlError, RetryableError, UserError
from controlplane.rundir import RunDir
from controlplane.supervisor import observed as O


def submission_id(run_id: str, attempt: int) -> str:
    return f"{run_id}-a{attempt}"


# --------------------------------------------------------------------------- the Jobs API port


class JobsPort(Protocol):
    """What the loop needs from a job scheduler. Every method is idempotent."""

    def status(self, sid: str) -> O.JobStatus: ...

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

    # optional: `cluster_view() -> ClusterView` (node deaths, free resources); without it the
    # supervisor judges neither.


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
        except LlmctlError:
            self._client = None  # reconnect next time (the head may have moved or restarted)
            raise
        except (OSError, RuntimeError) as exc:  # the dashboard dropped the connection, timed out, ...
            self._client = None
            raise RetryableError(
                f"Ray Jobs API: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            ) from exc

    def status(self, sid: str) -> O.JobStatus:
        from controlplane import ray_cluster

        return O.JobStatus(self._call(lambda c: ray_cluster.job_status(self.cluster, sid, client=c)))

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

    def cluster_view(self) -> ClusterView:
        """Ray's node table (dead nodes and why) and the resources free now."""
        import httpx

        from controlplane import ray_cluster

        try:
            nodes = ray_cluster.node_table(self.cluster)
            free, pending = ray_cluster.free_resources(self.cluster)
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            raise RetryableError(f"Ray node table: {type(exc).__name__}: {str(exc)[:200]}") from exc
        return ClusterView(tuple(nodes), free, pending)


@dataclass(frozen=True)
class ClusterView:
    """What the cluster says about itself: its nodes (`ray_cluster.node_table` rows), the logical
    resources free now (None: unknown) and whether Ray holds resource requests it cannot place now."""

    nodes: tuple[dict[str, Any], ...] = ()
    free: dict[str, float] | None = None
    pending: bool = False


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
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # a holder removed the file as it let go: lock the one at the path now
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return self.acquire()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holder(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.path.read_text().strip())
        return None

    def release(self, remove: bool = False) -> None:
        """Let go; `remove`: delete the file first, so no pid is left behind for a reader."""
        if self._fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
