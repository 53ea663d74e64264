"""Stopping a process group: the leader and every process it started, SIGKILL after the bound."""

from __future__ import annotations

import subprocess
import time

from controlplane.procs import group_alive, pid_alive, stop_group


def _group(script: str) -> subprocess.Popen:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while not group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def test_a_group_and_its_children_stop_on_sigterm():
    proc = _group("sleep 60 & sleep 60 & wait")
    assert group_alive(proc.pid)
    stop_group(proc.pid, timeout=5)
    assert not pid_alive(proc.pid) and not group_alive(proc.pid)


def test_a_child_that_ignores_sigterm_is_killed_after_the_bound():
    proc = _group("trap '' TERM; sh -c \"trap '' TERM; sleep 60\" & wait")
    t0 = time.monotonic()
    stop_group(proc.pid, timeout=1)
    assert not group_alive(proc.pid)
    assert 1 <= time.monotonic() - t0 < 10
