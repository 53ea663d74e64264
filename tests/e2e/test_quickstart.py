"""The README's first command, end to end: `llmctl quickstart` in a fresh storage root.

A real local Ray cluster, a real corpus, a real training run with a real worker SIGKILL,
a real canary rollout and real completions; nothing here is stubbed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from controlplane.context import Context
from controlplane.quickstart import PROMPTS
from controlplane.rollout import store

pytestmark = pytest.mark.e2e


def test_quickstart_runs_the_whole_life(tmp_path, monkeypatch):
    env = {**os.environ, "LLMCTL_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("LLMCTL_CLUSTER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "controlplane", "quickstart", "--steps", "120"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "quickstart done" in out
    training = next(line for line in out.splitlines() if line.strip().startswith("training"))
    assert "120/120 steps" in training
    first, last = (float(x) for x in training.split("loss ")[1].split(",")[0].split(" -> "))
    assert last < first - 0.5, training  # a visibly falling loss
    assert "replaced in" in out and "injected SIGKILL" in out
    assert "goodput" in out and "serving      rollout" in out
    # serving: on the cluster's own Ray Serve (token auth, replicas in `ray start` processes),
    # a loopback endpoint, the rollout promoted on measured SLOs, and no service left behind
    serving = next(line for line in out.splitlines() if line.strip().startswith("serving"))
    rollout_id = serving.split("rollout ")[1].split()[0]
    assert " at http://127.0.0.1:" in serving, serving
    for prompt in PROMPTS:  # one completion per prompt
        assert any(ln.strip().startswith(f"{prompt!r} -> ") for ln in out.splitlines()), prompt
    monkeypatch.setenv("LLMCTL_HOME", str(tmp_path / "home"))
    ctx = Context.load()
    assert store.get_rollout(ctx.ledger, rollout_id)["state"] == store.PROMOTED
    assert store.get_service(ctx.ledger, "quickstart") is None
    assert any("jcommonsenseqa_accuracy" in e["scores"] for e in store.evaluations(ctx.ledger))
    # the quickstart stops the cluster it started: nothing of it is left running
    state = tmp_path / "home" / "cluster" / "local.json"
    assert not state.exists()
