"""The training spine on a real local Ray cluster: submit through the CLI, kill, resume.

Loss tolerance: a resumed run restores model, optimizer, scheduler, data position and RNG,
and the data order depends only on the global step, so on the same machine it repeats the
uninterrupted run's arithmetic. Float reductions across 2 gloo ranks are summed in a fixed
order, so the final losses agree to float32 rounding; 1e-4 absolute leaves room for that
and nothing else (a run that lost or repeated a batch differs by ~1e-2).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import yaml
from typer.testing import CliRunner

from controlplane import ray_cluster
from controlplane.checkpoint import step_dirname
from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.runs import create_run, start_run
from controlplane.spec import RunSpec
from controlplane.supervisor.loop import Supervisor
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration
runner = CliRunner()


def tiny_spec(name: str, steps: int = 30, interval: int = 10) -> dict:
    return {
        "name": name,
        "model": {"preset": "tiny"},
        "train": {"max_steps": steps, "global_batch_size": 8, "seq_len": 64, "schedule": {"warmup_steps": 5}},
        "workers": {"num_workers": 2},
        "checkpoint": {"interval_steps": interval, "keep_last": 5, "async_save": True},
        "seed": 7,
    }


def final_loss(run_dir) -> float:
    steps = [e for e in run_dir.events({"step"})]
    return steps[-1]["loss"]


def test_cli_submit_tiny_run_succeeds(cluster_home, dataset_dir, tmp_path):
    spec_file = tmp_path / "run.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec("cli-tiny", steps=20)))
    result = runner.invoke(app, ["run", "submit", str(spec_file), "--watch", "--json"])
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.stdout[: result.stdout.index("}") + 1])["run_id"]
    ctx = Context.load()
    run = ctx.ledger.get_run(run_id)
    assert run["state"] == "succeeded"
    run_dir = ctx.run_dir(run_id)
    steps = run_dir.events({"step"})
    assert steps[-1]["step"] == 20
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (run_dir.checkpoints / step_dirname(20)).is_dir()
    assert [c["step"] for c in ctx.ledger.checkpoints(run_id)][-1] == 20
    listed = runner.invoke(app, ["run", "list", "--json"])
    assert any(r["run_id"] == run_id and r["state"] == "succeeded" for r in json.loads(listed.stdout))
    status = runner.invoke(app, ["run", "status", run_id])
    assert status.exit_code == 0 and "succeeded" in status.output


def test_killed_job_resumes_from_newest_verified_checkpoint(cluster_home, dataset_dir):
    ctx = Context.load()
    # The uninterrupted reference.
    ref_dir = create_run(ctx, RunSpec.model_validate(tiny_spec("ref", steps=40)))
    start_run(ctx, ref_dir.run_id)
    wait_for(lambda: ref_dir.events({"end"}), 240, "the reference run to end")
    assert ref_dir.events({"end"})[-1]["status"] == "succeeded"

    # The same run, killed after its step-20 checkpoint, with that checkpoint then corrupted.
    run_dir = create_run(ctx, RunSpec.model_validate(tiny_spec("killed", steps=40)))
    start_run(ctx, run_dir.run_id)
    wait_for(lambda: any(e["step"] >= 20 for e in run_dir.events({"checkpoint"})), 240, "the step-20 checkpoint")
    wait_for(lambda: any(e["step"] >= 25 for e in run_dir.events({"step"})), 120, "step 25")
    start = run_dir.events({"start"})[-1]
    os.kill(start["driver_pid"], signal.SIGKILL)  # the whole job dies: driver first, Ray reaps its actors
    for w in start["workers"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w["pid"], signal.SIGKILL)
    sid = ray_cluster.submission_id(run_dir.run_id, 1)
    wait_for(lambda: ray_cluster.job_status(ctx.cluster, sid) in ("FAILED", "STOPPED"), 60, "Ray to see the job die")
    newest = max(int(p.name.split("_")[1]) for p in run_dir.checkpoints.glob("step_*"))
    victim = run_dir.checkpoints / step_dirname(newest) / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])  # torn newest checkpoint: must be skipped

    # The supervisor sees the dead job and resubmits from the newest checkpoint that verifies.
    sup = Supervisor(ctx)
    try:
        wait_for(
            lambda: sup.reconcile_run(run_dir.run_id) is not None and run_dir.events({"end"}),
            300,
            "the resumed run to end",
            every=1.0,
        )
    finally:
        sup.close()
    start2 = [e for e in run_dir.events({"start"}) if e["attempt"] == 2][-1]
    assert start2["resume_step"] < newest
    assert any(s == newest for s, _ in start2["skipped_checkpoints"])
    assert run_dir.events({"end"})[-1]["status"] == "succeeded"
    assert final_loss(run_dir) == pytest.approx(final_loss(ref_dir), abs=1e-4)
