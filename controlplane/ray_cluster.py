"""Start, stop and reach a Ray cluster; submit job attempts through the Ray Jobs API.

Local kind: `up` starts a Ray head (and optional extra raylet nodes) on this machine, every socket
on 127.0.0.1 (see ray_launch), with Ray's token authentication ON: a random token is
written to `<storage>/cluster/auth_token` (mode 0600) and every client presents it. What `up`
started is recorded in `<storage>/cluster/local.json` (process-group ids, ports, temp dir), so
`down` stops only that, and a stale file (its processes gone) never breaks the next `up`.

Kinds `ray` and `kubernetes`: the cluster exists already; `address` in the spec names its
dashboard, and the token comes from `$RAY_AUTH_TOKEN` or the file in `$RAY_AUTH_TOKEN_PATH`.

Ray is imported lazily (inside functions): importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from controlplane.errors import LlmctlError, RetryableError, UserError
from controlplane.procs import free_port, pid_alive, stop_group
from controlplane.ray_launch import gave_up, start_failure
from controlplane.ray_settings import LOCAL_CLUSTER_ENV, RAY_PROCESS_ENV
from controlplane.rundir import RunDir, write_atomic
from controlplane.spec import ClusterSpec

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


class ClusterNotRunning(UserError):
    """No reachable cluster (the local one is not up)."""


@dataclass
class NodeProc:
    pid: int
    role: str  # "head" | "worker"
    log: str
    ports: dict[str, int] = field(default_factory=dict)
    log_from: int = 0  # where this start's output begins in `log` (appended to by every start)


@dataclass
class LocalClusterState:
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    token_file: str
    started_at: float
    num_cpus: int
    nodes: list[NodeProc]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LocalClusterState:
        nodes = [NodeProc(**{k: v for k, v in n.items() if k in NodeProc.__dataclass_fields__}) for n in data["nodes"]]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "nodes"}
        return cls(nodes=nodes, **known)


def _cluster_dir(cluster: ClusterSpec) -> Path:
    return cluster.storage_root() / "cluster"


def _state_file(cluster: ClusterSpec) -> Path:
    return _cluster_dir(cluster) / "local.json"


def _ray_start() -> list[str]:
    """`ray start`, keeping a loopback node address (see controlplane.ray_launch)."""
    return [sys.executable, "-m", "controlplane.ray_launch", "start"]


def ensure_token(cluster: ClusterSpec) -> Path:
    path = _cluster_dir(cluster) / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def ray_env(token_file: Path, only_ray: bool = False) -> dict[str, str]:
    """Environment for Ray processes and clients of this cluster: token auth on, loopback only
    (this machine is 127.0.0.1 to Ray: see ray_launch). `only_ray`: just the RAY_ variables."""
    env = {} if only_ray else {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    return {**env, **RAY_PROCESS_ENV, **LOCAL_CLUSTER_ENV, "RAY_AUTH_TOKEN_PATH": str(token_file)}


def read_state(cluster: ClusterSpec) -> LocalClusterState | None:
    path = _state_file(cluster)
    try:
        return LocalClusterState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # unreadable record: treated as stale


def _dashboard_ok(url: str, token: str, timeout: float = 2.0) -> bool:
    try:
        r = httpx.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def _start_node(cmd: list[str], env: dict[str, str], log: Path, role: str, ports: dict[str, int]) -> NodeProc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        log_from = f.tell()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return NodeProc(proc.pid, role, str(log), ports, log_from)


def up(cluster: ClusterSpec, num_cpus: int | None = None, worker_nodes: int | None = None) -> LocalClusterState:
    """Start the local cluster, or return the one already running. Idempotent."""
    if cluster.kind != "local":
        raise UserError(f"cluster {cluster.name}: kind {cluster.kind!r} is not started by llmctl (it exists already)")
    existing = read_state(cluster)
    if existing is not None:
        token = Path(existing.token_file).read_text().strip() if Path(existing.token_file).exists() else ""
        if pid_alive(existing.nodes[0].pid) and _dashboard_ok(existing.dashboard_url, token):
            return existing
        down(cluster)  # stale: whatever is left of it goes, then start afresh
    token_file = ensure_token(cluster)
    env = ray_env(token_file)
    num_cpus = num_cpus or os.cpu_count() or 2
    worker_nodes = cluster.ray.worker_nodes if worker_nodes is None else worker_nodes
    host = cluster.ray.dashboard_host
    log_dir = _cluster_dir(cluster) / "logs"
    token = token_file.read_text().strip()
    # a port picked free is taken by another process now and then before Ray binds it (two
    # clusters starting side by side, any process's outgoing connection): a head that gives up
    # during start is stopped and started once more on fresh ports
    for tries_left in (1, 0):
        state = _start_head(cluster, token_file, env, num_cpus, host, log_dir)
        try:
            _wait(partial(_dashboard_ok, state.dashboard_url, token), "Ray head", state.nodes[0])
            break
        except RetryableError:
            if not tries_left:
                raise
            down(cluster)  # whatever it started before it gave up, and its temp dir
    for i in range(worker_nodes):
        add_worker_node(cluster, num_cpus=max(1, num_cpus // max(1, worker_nodes)), index=i + 1)
    return read_state(cluster) or state


def _start_head(
    cluster: ClusterSpec, token_file: Path, env: dict[str, str], num_cpus: int, host: str, log_dir: Path
) -> LocalClusterState:
    temp_dir = tempfile.mkdtemp(prefix="llmctl-ray-")
    ports = {
        "gcs": free_port(),
        "dashboard": cluster.ray.dashboard_port or free_port(),
        "client": free_port(),
        "agent": free_port(),
        "metrics": free_port(),
    }
    head_cmd = [
        *_ray_start(), "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
        "--port", str(ports["gcs"]), "--num-cpus", str(num_cpus),
        "--include-dashboard", "true", "--dashboard-host", host, "--dashboard-port", str(ports["dashboard"]),
        "--ray-client-server-port", str(ports["client"]),
        "--dashboard-agent-listen-port", str(ports["agent"]), "--metrics-export-port", str(ports["metrics"]),
    ]  # fmt: skip
    log = log_dir / "head.log"
    state = LocalClusterState(
        gcs_address=f"127.0.0.1:{ports['gcs']}",
        dashboard_url=f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{ports['dashboard']}",
        temp_dir=temp_dir,
        token_file=str(token_file),
        started_at=time.time(),
        num_cpus=num_cpus,
        nodes=[_start_node(head_cmd, env, log, "head", ports)],
    )
    _save_state(cluster, state)  # recorded at once: a failure later still lets `down` clean up
    return state


def add_worker_node(cluster: ClusterSpec, num_cpus: int = 1, index: int | None = None) -> NodeProc:
    """Start one more raylet joined to the local head (a second 'node' on this machine); one that
    gives up or does not join in START_TIMEOUT_S (a loaded machine) is stopped and started again."""
    state = read_state(cluster)
    if state is None:
        raise ClusterNotRunning("the local cluster is not up: run `llmctl cluster up`")
    index = index or len(state.nodes)
    resource = f"llmctl_node_{index}"
    log = Path(state.nodes[0].log).with_name(f"worker-{index}.log")
    for tries_left in (1, 0):
        ports = {"agent": free_port(), "metrics": free_port()}
        cmd = [
            *_ray_start(), "--address", state.gcs_address, "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
            "--dashboard-agent-listen-port", str(ports["agent"]), "--metrics-export-port", str(ports["metrics"]),
            "--resources", json.dumps({resource: 1}),
            # every node of this cluster is on this machine and writes under the head's session
            # directory, which the head's log monitor already reads; a second one would read the
            # same files (Ray: one log monitor per physical host, to avoid log duplication on the
            # driver) and glob the directory 10 times a second
            "--include-log-monitor", "false",
        ]  # fmt: skip
        node = _start_node(cmd, ray_env(Path(state.token_file)), log, "worker", ports)
        _save_state(cluster, replace(state, nodes=[*state.nodes, node]))
        try:  # known by its own resource: counting alive nodes is fooled by a node dying meanwhile
            _wait(lambda: _alive_with(cluster, resource), "Ray worker node", node)
            return node
        except RetryableError:
            if not tries_left:
                raise
            stop_group(node.pid, STOP_TIMEOUT_S)  # whatever it started before it gave up; `state` is without it
            _save_state(cluster, state)
    raise AssertionError("unreachable")  # the second try returned or raised


def _alive_with(cluster: ClusterSpec, resource: str) -> bool:
    """An alive node holds `resource` (the dashboard writes resource names in camelCase)."""

    def norm(key: str) -> str:
        return key.replace("_", "").lower()

    try:
        return any(
            n["raylet"]["state"] == "ALIVE"
            and norm(resource) in {norm(k) for k in n["raylet"].get("resourcesTotal") or {}}
            for n in _dashboard_get(cluster, "/nodes?view=summary")["data"]["summary"]
        )
    except (LlmctlError, KeyError, TypeError, httpx.HTTPError):
        return False


def _wait(check: Any, what: str, node: NodeProc, timeout: float = START_TIMEOUT_S) -> None:
    """Until `check()`; a `ray start` that exits or writes its traceback (in this start's part of
    its log) has given up."""
    log = Path(node.log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not pid_alive(node.pid) or gave_up(log, node.log_from):
            raise RetryableError(f"{what} gave up during start: {start_failure(log, node.log_from)} (log: {log})")
        time.sleep(0.5)
    raise RetryableError(f"{what} did not come up within {timeout:.0f}s (log: {log})")


def _save_state(cluster: ClusterSpec, state: LocalClusterState) -> None:
    write_atomic(_state_file(cluster), json.dumps(asdict(state), indent=2).encode())


def down(cluster: ClusterSpec) -> bool:
    """Stop what `up` started (workers first). True if anything was running. Idempotent."""
    state = read_state(cluster)
    path = _state_file(cluster)
    if state is None:
        path.unlink(missing_ok=True)
        return False
    was_running = any(pid_alive(n.pid) for n in state.nodes)
    for node in reversed(state.nodes):
        stop_group(node.pid, STOP_TIMEOUT_S)
    path.unlink(missing_ok=True)
    if state.temp_dir and Path(state.temp_dir).name.startswith("llmctl-ray-"):
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    return was_running


def kill_node(cluster: ClusterSpec, index: int) -> int:
    """SIGKILL a local raylet node's whole process group (a node failure). Returns its pid."""
    state = read_state(cluster)
    if state is None or index >= len(state.nodes):
        raise UserError(f"no local node #{index}")
    pid = state.nodes[index].pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return pid


# --------------------------------------------------------------------------- clients


def _token_and_url(cluster: ClusterSpec) -> tuple[str, str]:
    if cluster.kind == "local":
        state = read_state(cluster)
        if state is None or not pid_alive(state.nodes[0].pid):
            raise ClusterNotRunning("the local Ray cluster is not up: run `llmctl cluster up`")
        return state.dashboard_url, Path(state.token_file).read_text().strip()
    if not cluster.address:
        raise UserError(f"cluster {cluster.name}: no address")
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    if not token:
        raise UserError(f"cluster {cluster.name}: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token")
    url = cluster.address if "://" in cluster.address else f"http://{cluster.address}"
    return url, token


def require_reachable(cluster: ClusterSpec) -> None:
    """Raise ClusterNotRunning (local) or UserError (remote) unless a client could reach the cluster."""
    url, token = _token_and_url(cluster)
    if cluster.kind == "local" and not _dashboard_ok(url, token):
        raise ClusterNotRunning(f"the local Ray cluster does not answer at {url}: run `llmctl cluster up`")


def _dashboard_get(cluster: ClusterSpec, path: str) -> Any:
    url, token = _token_and_url(cluster)
    r = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=5.0)
    r.raise_for_status()
    return r.json()


def status(cluster: ClusterSpec) -> dict[str, Any]:
    """What is running: nodes, resources, dashboard. Never raises for a stopped cluster."""
    out: dict[str, Any] = {"cluster": cluster.name, "kind": cluster.kind, "up": False}
    if cluster.kind == "local":
        state = read_state(cluster)
        if state is None:
            return out
        out.update(
            dashboard=state.dashboard_url,
            gcs_address=state.gcs_address,
            started_at=state.started_at,
            processes=[{"pid": n.pid, "role": n.role, "alive": pid_alive(n.pid)} for n in state.nodes],
        )
        if not pid_alive(state.nodes[0].pid):
            out["stale"] = True
            return out
    try:
        nodes = _dashboard_get(cluster, "/nodes?view=summary")["data"]["summary"]
    except (LlmctlError, httpx.HTTPError, KeyError, TypeError) as exc:
        out["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return out
    out["up"] = True
    out["nodes"] = [
        {
            "node_id": n["raylet"]["nodeId"],
            "state": n["raylet"]["state"],
            "ip": n.get("ip"),
            "is_head": n["raylet"].get("isHeadNode", False),
            "resources": n["raylet"].get("resourcesTotal", {}),
        }
        for n in nodes
    ]
    return out


def job_client(cluster: ClusterSpec) -> Any:
    """A JobSubmissionClient that presents the cluster's token."""
    url, token = _token_and_url(cluster)
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})


def _package_dirs() -> list[Path]:
    import controlplane

    root = Path(controlplane.__file__).resolve().parent.parent
    return [root / "controlplane", root / "jobs"]


def runtime_env(cluster: ClusterSpec, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """Local: the job imports this checkout directly. Remote: the packages travel as py_modules."""
    dirs = _package_dirs()
    env = {"PYTHONUNBUFFERED": "1", **(env_vars or {})}
    if cluster.kind == "local":
        env["PYTHONPATH"] = os.pathsep.join([str(dirs[0].parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return {"env_vars": env}
    return {"py_modules": [str(d) for d in dirs], "env_vars": env}


def python_for(cluster: ClusterSpec) -> str:
    """The interpreter a job entrypoint runs with: this one locally, the image's elsewhere."""
    return sys.executable if cluster.kind == "local" else "python"


def submission_id(run_id: str, attempt: int) -> str:
    return f"{run_id}-a{attempt}"


def submit_attempt(
    cluster: ClusterSpec,
    run_dir: RunDir,
    attempt: int,
    *,
    max_resume_step: int | None = None,
    skip_steps: list[tuple[int, int]] | None = None,
    env_vars: dict[str, str] | None = None,
    client: Any = None,
) -> str:
    """Submit one attempt of a run as a Ray job. Idempotent: an existing submission is adopted."""
    client = client or job_client(cluster)
    sid = submission_id(run_dir.run_id, attempt)
    args = [
        python_for(cluster),
        "-m",
        "jobs.pretrain",
        "--run-dir",
        str(run_dir.path.resolve()),
        "--attempt",
        str(attempt),
    ]
    if max_resume_step is not None:
        args += ["--max-resume-step", str(max_resume_step)]
    for a, b in skip_steps or []:
        args += ["--skip-steps", f"{a}:{b}"]
    try:
        client.submit_job(
            entrypoint=" ".join(args),
            submission_id=sid,
            runtime_env=runtime_env(cluster, env_vars),
            entrypoint_num_cpus=0,
            metadata={"llmctl_run_id": run_dir.run_id, "llmctl_attempt": str(attempt)},
        )
    except RuntimeError as exc:
        if "already exists" not in str(exc):
            raise RetryableError(f"submitting {sid}: {str(exc).splitlines()[0]}") from exc
    return sid


def job_status(cluster: ClusterSpec, sid: str, client: Any = None) -> str:
    """Ray job status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) or MISSING."""
    client = client or job_client(cluster)
    try:
        return str(client.get_job_status(sid).value)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "not found" in str(exc).lower():
            return "MISSING"
        raise RetryableError(f"job status of {sid}: {str(exc).splitlines()[0]}") from exc


def stop_job(cluster: ClusterSpec, sid: str, client: Any = None) -> bool:
    client = client or job_client(cluster)
    try:
        return bool(client.stop_job(sid))
    except RuntimeError:
        return False


def job_logs(cluster: ClusterSpec, sid: str, client: Any = None) -> str:
    return (client or job_client(cluster)).get_job_logs(sid)


# --------------------------------------------------------------------------- the node table, as evidence


def node_table(cluster: ClusterSpec) -> list[dict[str, Any]]:
    """Every node Ray's GCS knows, dead ones included, from the state API:
    [{"node_id", "alive", "state_message", "end_time", "expected", "resources_total"}].

    `state_message` is Ray's own account of a death ("Unexpected termination: health check failed
    ..."); `expected` is True when Ray calls it an expected termination (a graceful stop)."""
    body = _dashboard_get(cluster, "/api/v0/nodes?limit=10000&detail=true&timeout=10")
    rows = ((body.get("data") or {}).get("result") or {}).get("result") or []
    out = []
    for n in rows:
        message = n.get("state_message") or ""
        out.append(
            {
                "node_id": str(n.get("node_id") or ""),
                "alive": n.get("state") == "ALIVE",
                "state_message": message or None,
                "end_time": (n.get("end_time_ms") or 0) / 1000 or None,
                "expected": message.startswith("Expected termination"),
                "resources_total": {k: float(v) for k, v in (n.get("resources_total") or {}).items()},
            }
        )
    return out


def free_resources(cluster: ClusterSpec) -> tuple[dict[str, float] | None, bool]:
    """(logical resources not in use across the cluster, or None if unknown; whether Ray holds
    resource requests it cannot place now), from Ray's autoscaler report."""
    body = _dashboard_get(cluster, "/api/cluster_status")
    status = (body.get("data") or {}).get("clusterStatus") or {}
    report = status.get("loadMetricsReport") or status.get("load_metrics_report") or {}
    usage = report.get("usage")
    demand = report.get("resourceDemand") or report.get("resource_demand") or []
    pending = bool(demand) or bool(report.get("pgDemand") or report.get("pg_demand"))
    if not isinstance(usage, dict):
        return None, pending
    return {k: float(t) - float(u) for k, (u, t) in usage.items() if not k.startswith("node:")}, pending
