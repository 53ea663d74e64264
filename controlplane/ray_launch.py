"""`ray start` for a cluster of this machine alone: every socket on 127.0.0.1.

Ray replaces a loopback node address with the machine's routable one (`--node-ip-address
127.0.0.1` becomes, say, 10.1.2.3), and its GCS, raylets, agents and client server then listen
there or on all interfaces. Every process of the local cluster, and every client of it, runs
with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (see `ray_cluster.ray_env`): Ray then resolves
"this machine" to 127.0.0.1, as it does on a laptop. That setting also refuses `ray start
--address` (a second node), which a local cluster needs for its extra raylets; this module runs
`ray start` with the refusal lifted in its own process only and the loopback address kept as
given.

Run as `python -m controlplane.ray_launch start ...` (the arguments of `ray start`).
"""

from __future__ import annotations

import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


_FAILURE_MARKS = ("Check failed:", "Address already in use", "Error:", "Exception:", "error:")


def _read_from(log: Path, since: int) -> str:
    with open(log, "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace")


def gave_up(log: Path, since: int = 0) -> bool:
    """`ray start` printed the traceback it exits with (in `log` after byte `since`). Its process
    can outlive that by minutes (a worker node that timed out registering was still there 90 s
    later), so the log says it first."""
    try:
        return "Traceback (most recent call last)" in _read_from(log, since)
    except OSError:
        return False


def start_failure(log: Path, since: int = 0, limit: int = 240) -> str:
    """The line of a `ray start` log that says why it stopped: Ray's own check failure (it names
    the port) before the Python traceback's last line; the log's last line if none matches."""
    try:
        lines = [ln.strip() for ln in _read_from(log, since).splitlines() if ln.strip()]
    except OSError:
        return "its log is unreadable"
    for mark in _FAILURE_MARKS:
        hits = [ln for ln in lines if mark in ln]
        if hits:
            line = hits[-1]  # Ray's check failure is at the end of a long log line
            return line[line.index(mark) if mark == "Check failed:" else 0 :][:limit]
    return lines[-1][:limit] if lines else "its log is empty"


def main() -> None:
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    resolve = services.resolve_ip_for_localhost

    def keep_loopback(host: str) -> str:
        return host if host in LOOPBACK else resolve(host)

    ray_constants.ENABLE_RAY_CLUSTER = True  # this process starts a node; its children keep the env's 0
    services.resolve_ip_for_localhost = keep_loopback
    sys.argv[0] = "ray"
    ray_main()


if __name__ == "__main__":
    main()
