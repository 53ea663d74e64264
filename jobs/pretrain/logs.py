"""Driver and worker output kept in the run directory while the attempt runs.

    capture(run_dir, attempt, name)   # this process's stdout and stderr also go to
                                      # <run_dir>/logs/attempt-<N>/<name>.log

The driver calls it as `driver`, each worker actor as `worker-<pid>` (the `start` and
`worker_replaced` events map pids to ranks). The file lives with the run, so it outlives the
Ray cluster and its Jobs API (`llmctl run logs` reads it there).

How: file descriptors 1 and 2 are pointed at a pipe read by a `tee -a` process in a session of
its own. Ray still gets every line on the original stdout (job logs, log_to_driver), and the
copy survives the worst exits: a traceback at interpreter exit, `os._exit`, SIGKILL. The pipe's
last bytes are drained by `tee` after its writer is gone, since `tee` is not in the killed
process group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from controlplane.rundir import RunDir


def log_path(run_dir: RunDir | str | Path, attempt: int, name: str) -> Path:
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(Path(run_dir))
    return rd.logs / f"attempt-{int(attempt)}" / f"{name}.log"


def capture(run_dir: RunDir | str | Path, attempt: int, name: str) -> Path | None:
    """Copy this process's stdout and stderr into the run directory from now on. Returns the file,
    or None when it cannot be kept (no `tee`, the directory not writable): training goes on."""
    path = log_path(run_dir, attempt, name)
    tee = shutil.which("tee")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tee is None:
            raise OSError("no `tee` on PATH")
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        proc = subprocess.Popen(
            [tee, "-a", "-i", str(path)],
            stdin=subprocess.PIPE,
            stdout=1,  # the original stdout: Ray's job log still sees every line
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        print(f"llmctl: output not kept in {path}: {exc}", file=sys.stderr, flush=True)
        return None
    assert proc.stdin is not None
    for fd in (1, 2):
        os.dup2(proc.stdin.fileno(), fd)
    proc.stdin.close()  # fds 1 and 2 hold the pipe now; tee ends when they close
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    return path
