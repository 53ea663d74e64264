"""Local processes: is one alive (by pid, read from /proc where there is one), stopping a
process group, and a free port to start one on.

A zombie counts as dead (its parent has not reaped it yet), and a pid that was reused by a new
process is told apart by the start time recorded with it (`proc_start`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: field 3 (state) first; None without it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22), or None."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """`pid` runs (and, given `start`, is still the process that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc to ask: the pid exists
    if fields[0] == "Z":
        return False
    return start is None or (len(fields) > 19 and fields[19] == start)


def group_alive(pgid: int) -> bool:
    """A process other than a zombie is in process group `pgid` (read from /proc)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                return True
    return False


def stop_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL what is left after `timeout` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not pid_alive(pid) and not group_alive(pid):
                return
            time.sleep(0.1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
