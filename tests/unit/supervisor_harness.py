"""Helpers for supervisor loop tests: runs whose attempts are local processes.

`ProcessJobs` is a real JobsPort: each submission is a process group running the scripted
job (tests/unit/scripted_job.py); its state lives in files (pid, exit code, stop marker,
a log of every submission), so a supervisor process killed and started again sees the same
jobs, and a test can count how many times each submission id was really started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.context import Context
from controlplane.ledger import Ledger
from controlplane.procs import pid_alive
from controlplane.rundir import RunDir
from controlplane.spec import RunSpec, dump_spec
from controlplane.supervisor.loop import Supervisor
from controlplane.supervisor.observed import JobStatus, PolicyConfig
from controlplane.supervisor.ports import ClusterView

SCRIPT = Path(__file__).with_name("scripted_job.py")
ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and done
    return pid_alive(pid)


class ProcessJobs:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _f(self, sid: str, ext: str) -> Path:
        return self.dir / f"{sid}.{ext}"

    def submissions(self) -> list[str]:
        log = self.dir / "submissions.log"
        return log.read_text().split() if log.exists() else []

    def status(self, sid: str) -> JobStatus:
        if not self._f(sid, "pid").exists():
            return JobStatus.MISSING
        stopped = self._f(sid, "stopped").exists()
        rc = self._f(sid, "rc")
        if rc.exists():
            if stopped:
                return JobStatus.STOPPED
            return JobStatus.SUCCEEDED if rc.read_text().strip() == "0" else JobStatus.FAILED
        if _alive(int(self._f(sid, "pid").read_text())):
            return JobStatus.RUNNING
        return JobStatus.STOPPED if stopped else JobStatus.FAILED

    def submit(self, run_dir: RunDir, attempt: int, *, max_resume_step, skip_steps, env_vars) -> str:
        sid = f"{run_dir.run_id}-a{attempt}"
        if self._f(sid, "pid").exists():
            return sid  # already submitted: adopt
        args = [sys.executable, str(SCRIPT), "--run-dir", str(run_dir.path), "--attempt", str(attempt)]
        if max_resume_step is not None:
            args += ["--max-resume-step", str(max_resume_step)]
        for a, b in skip_steps:
            args += ["--skip-steps", f"{a}:{b}"]
        q = {k: shlex.quote(str(self._f(sid, k))) for k in ("rc", "pid")}
        log = shlex.quote(str(self.dir / "submissions.log"))
        # the job itself records its pid and its start, so a submitter killed right after the fork
        # still leaves a job that the next supervisor finds (as Ray's Jobs API would)
        cmd = (
            f"echo $$ > {q['pid']}.tmp && mv {q['pid']}.tmp {q['pid']} && echo {sid} >> {log} && "
            f"{shlex.join(args)}; echo $? > {q['rc']}.tmp && mv {q['rc']}.tmp {q['rc']}"
        )
        env = {**os.environ, **env_vars, "PYTHONPATH": str(ROOT)}
        self._f(sid, "args").write_text(json.dumps({"args": args, "env": env_vars}))
        subprocess.Popen(["sh", "-c", cmd], env=env, start_new_session=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._f(sid, "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return sid

    def stop(self, sid: str) -> None:
        pid_file = self._f(sid, "pid")
        if not pid_file.exists():
            return
        self._f(sid, "stopped").touch()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)

    def forget_all(self) -> None:
        """What a cluster restart does to the Jobs API: every submission is forgotten."""
        for f in self.dir.iterdir():
            if f.suffix in (".pid", ".rc", ".stopped"):
                f.unlink()

    def cluster_view(self) -> ClusterView:
        """A cluster whose node table and free resources a test sets (`view.json`), as Ray reports them."""
        f = self.dir / "view.json"
        if not f.exists():
            return ClusterView()
        v = json.loads(f.read_text())
        return ClusterView(tuple(v.get("nodes", ())), v.get("free"), bool(v.get("pending")))

    def set_view(self, nodes=(), free=None, pending=False) -> None:
        (self.dir / "view.json").write_text(json.dumps({"nodes": list(nodes), "free": free, "pending": pending}))

    def args_of(self, sid: str) -> dict:
        return json.loads(self._f(sid, "args").read_text())

    def kill_all(self) -> None:
        for pid_file in self.dir.glob("*.pid"):
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def scripted_spec(steps: int = 30, interval: int = 5, workers: int = 2, **ft) -> RunSpec:
    """A run spec with fast fault-tolerance clocks, for scripted jobs."""
    fault_tolerance = {
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "hang_timeout_factor": 20,
        "hang_timeout_min_s": 1.5,
        "hang_timeout_max_s": 8,
        **ft,
    }
    return RunSpec.model_validate(
        {
            "name": "sup",
            "train": {"max_steps": steps},
            "checkpoint": {"interval_steps": interval},
            "workers": {"num_workers": workers},
            "fault_tolerance": fault_tolerance,
        }
    )


@contextlib.contextmanager
def supervised(tmp_path: Path, config: PolicyConfig) -> Iterator[tuple[Context, ProcessJobs, Supervisor]]:
    """(ctx, jobs, supervisor) on the test's storage root; every scripted job is killed after."""
    ctx = Context.load()
    jobs = ProcessJobs(tmp_path / "jobs")
    sup = Supervisor(ctx, jobs, config=config)
    try:
        yield ctx, jobs, sup
    finally:
        sup.close()
        jobs.kill_all()


def env_fixture(config: PolicyConfig):
    """The `env` fixture of a test module: `env = env_fixture(CONFIG)` gives each test
    (ctx, jobs, supervisor) from `supervised` with that policy config."""

    @pytest.fixture
    def env(tmp_path):
        with supervised(tmp_path, config) as e:
            yield e

    return env


def make_run(
    ledger: Ledger, storage: Path, run_id: str, spec: RunSpec, script: dict, *, launch: bool = False
) -> RunDir:
    """Record a run (pending, no attempt yet) with its scripted behaviour."""
    rd = RunDir.of(storage, run_id).create()
    rd.write_spec({"run_id": run_id, "run": dump_spec(spec), "cluster": {}, "dataset_dir": ""})
    (rd.path / "script.json").write_text(json.dumps(script))
    ledger.create_run(run_id, spec.name, dump_spec(spec), {}, str(rd.path))
    return rd


def start_and_wait_for_a_step(sup, ledger: Ledger, storage: Path, run_id: str, spec: RunSpec, script: dict) -> RunDir:
    """Record a run, reconcile until its first step event (bounded)."""
    rd = make_run(ledger, storage, run_id, spec, script)
    deadline = time.monotonic() + 30
    while not rd.events({"step"}) and time.monotonic() < deadline:
        sup.reconcile_run(run_id)
        time.sleep(0.05)
    return rd


def wait_terminal(sup, ledger: Ledger, run_id: str, timeout: float = 60.0, every: float = 0.05) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup.reconcile_run(run_id)
        state = ledger.get_run(run_id)["state"]
        if state in ("succeeded", "failed", "stopped"):
            return state
        time.sleep(every)
    raise AssertionError(f"run {run_id} still {ledger.get_run(run_id)['state']} after {timeout}s")
