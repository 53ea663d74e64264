"""The local cluster listens on loopback only.

The session cluster (a head and one extra raylet node, as `cluster up --worker-nodes 1` starts
them) runs a driver with an actor, as a job or the Ray Data engine does; then every socket any
process of it listens on (GCS, raylets, dashboard, agents, client server, metrics, the driver's
workers) must be bound to 127.0.0.1. The driver itself connects by the recorded GCS address, so
a client of the cluster reaches it on loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from controlplane import ray_cluster
from controlplane.procs import free_port
from controlplane.spec import ClusterSpec, StorageSpec

pytestmark = pytest.mark.integration

DRIVER = """
import os, sys
import ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0)
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
print(ray.get(probe.pid.remote()), flush=True)
sys.stdin.read()  # held until the test has listed the sockets
"""


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _cluster_processes(state: ray_cluster.LocalClusterState) -> list[psutil.Process]:
    procs: dict[int, psutil.Process] = {}
    for node in state.nodes:
        try:
            root = psutil.Process(node.pid)
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    return list(procs.values())


def _bound_sockets(procs: list[psutil.Process]) -> list[tuple[str, int, str, int]]:
    """(process name, pid, ip, port) of every listening TCP and bound UDP socket."""
    out = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                listening = c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr and not c.raddr)
                if listening and c.laddr:
                    out.append((p.name(), p.pid, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@contextlib.contextmanager
def _driver_with_an_actor(state: ray_cluster.LocalClusterState):
    """A driver connected to the cluster by its recorded GCS address, holding one actor: its pid."""
    env = {**ray_cluster.ray_env(Path(state.token_file)), "RAY_ADDRESS": state.gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([driver.stdout], [], [], 120)
        line = driver.stdout.readline() if ready else ""
        assert line.strip().isdigit(), f"the driver did not reach the cluster at {state.gcs_address}"
        yield int(line)
    finally:
        driver.stdin.close()
        try:
            driver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait(timeout=10)


def _session_state(ray_home) -> ray_cluster.LocalClusterState:
    state = ray_cluster.read_state(ClusterSpec(storage=StorageSpec(root=str(ray_home))))
    assert state is not None and len(state.nodes) >= 2, "the session cluster has a head and a worker node"
    return state


def test_every_socket_of_the_local_cluster_is_on_loopback(ray_home):
    state = _session_state(ray_home)
    with _driver_with_an_actor(state) as actor_pid:
        procs = _cluster_processes(state)
        assert actor_pid in {p.pid for p in procs}, "the actor runs under a node that `cluster up` started"
        sockets = _bound_sockets(procs)
    names = {name for name, *_ in sockets}
    assert {"gcs_server", "raylet"} <= names, f"the listing saw Ray's servers: {sorted(names)}"
    assert any(pid == actor_pid for _, pid, _, _ in sockets), "the actor's worker listens too"
    wide = [s for s in sockets if not _is_loopback(s[2])]
    assert not wide, "listening beyond loopback:\n" + "\n".join(json.dumps(s) for s in wide)


def test_a_head_that_exits_on_a_taken_port_is_started_again_and_starts_no_idle_workers(tmp_path, monkeypatch):
    """A port picked free can be taken before Ray binds it (two clusters starting side by side):
    the head that exits for it is stopped and started once more, and nothing of it is left.

    On that fresh cluster, a driver holding one actor has started one worker process: Ray
    prestarts workers without a runtime env when a driver connects, which no llmctl job or Serve
    app can use (each has its PYTHONPATH), so the local cluster starts none."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    picked: list[int] = []
    heads: list[ray_cluster.LocalClusterState] = []
    start_head = ray_cluster._start_head

    def free_port_with_one_taken() -> int:  # the first head's second port (its dashboard) is taken
        port = taken if len(picked) == 1 else free_port()
        picked.append(port)
        return port

    def recorded_start_head(*args):
        heads.append(start_head(*args))
        return heads[-1]

    monkeypatch.setattr(ray_cluster, "free_port", free_port_with_one_taken)
    monkeypatch.setattr(ray_cluster, "_start_head", recorded_start_head)
    cluster = ClusterSpec(storage=StorageSpec(root=str(tmp_path)))
    try:
        state = ray_cluster.up(cluster, num_cpus=2, worker_nodes=0)
        assert len(heads) == 2 and taken in heads[0].nodes[0].ports.values()
        assert taken not in state.nodes[0].ports.values(), "the second head runs on fresh ports"
        assert ray_cluster._dashboard_ok(state.dashboard_url, Path(state.token_file).read_text().strip())
        assert f"127.0.0.1:{taken}" in Path(state.nodes[0].log).read_text(), "the first head's output is kept"
        first = heads[0]
        assert not Path(first.temp_dir).exists(), "the first head's temp dir went"
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if first.temp_dir in " ".join(p.info["cmdline"] or [])]
        assert not left, f"processes of the first head are left: {left}"

        with _driver_with_an_actor(state) as actor_pid:
            time.sleep(3.0)  # prestarted workers come within a second of the driver's registration
            workers = {p.pid: p.name() for p in _cluster_processes(state) if p.name().startswith("ray::")}
        workers = {
            pid: name for pid, name in workers.items() if name not in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
        }
        assert list(workers) == [actor_pid], f"worker processes for a driver with one actor: {workers}"
    finally:
        ray_cluster.down(cluster)
        holder.close()
