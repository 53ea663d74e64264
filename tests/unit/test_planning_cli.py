"""`llmctl plan` and `llmctl simulate` through the real CLI, and calibration from a real run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.planning.calibrate import calibrate
from controlplane.rundir import RunDir

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLUSTER = str(Path(__file__).parent / "data" / "cluster-a100-928.yaml")
RUN = str(EXAMPLES / "run-13b.yaml")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_plan_json_for_the_reference_workload():
    res = invoke("plan", CLUSTER, RUN, "--json")
    assert res.exit_code == 0, res.output
    p = json.loads(res.output)
    assert p["gpus"] == 928 and p["gpu_model"] == "A100-80GB"
    assert 17.3 < p["train_days"] < 17.5
    assert 3.43e12 < p["tokens_in_window"] < 3.45e12
    assert p["fits"] and p["parallelism"]["data"] == 928
    assert p["checkpoint_interval_steps"] >= 1


def test_plan_table_for_people():
    res = invoke("plan", CLUSTER, RUN, "--mfu", "0.5", "--gpu-power-watts", "320")
    assert res.exit_code == 0, res.output
    assert "time to train" in res.output and "CO2e" in res.output and "memory per GPU" in res.output


def test_plan_that_does_not_fit_exits_2_with_one_line(tmp_path):
    spec = yaml.safe_load(Path(RUN).read_text())
    spec["parallelism"]["zero_stage"] = 0  # replicated: 16 B/param
    bad = tmp_path / "run.yaml"
    bad.write_text(yaml.safe_dump(spec))
    res = invoke("plan", CLUSTER, str(bad))
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not fit" in lines[0] and "Traceback" not in res.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["plan", CLUSTER, RUN, "--mfu", "0"], "--mfu"),
        (["plan", CLUSTER, RUN, "--mfu", "1.2"], "--mfu"),
        (["plan", CLUSTER, "missing.yaml"], "no such file"),
        (["simulate", CLUSTER, RUN, "--sweep", "lr"], "--sweep"),
        (["simulate", CLUSTER, RUN, "--seeds", "0"], "--seeds"),
        (["simulate", CLUSTER, RUN, "--plot", "x.svg"], "--plot"),
        (["simulate", CLUSTER, RUN, "--calibrate", "no-such-run"], "no run directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_simulate_json_reference():
    res = invoke("simulate", CLUSTER, RUN, "--seeds", "30", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    s = d["summary"]
    assert s["seeds"] == 30 and s["finished"] == 30
    assert 0.95 < s["goodput_p5"] <= s["goodput_p50"] <= s["goodput_p95"] < 1.0
    assert 17.4 < s["finish_days_mean"] < 18.5
    assert "faulty GPU" in s["lost_gpu_hours_by_cause"]
    assert d["scenario"]["sources"]["restart_s"] == "default"


def test_simulate_sweep_table_and_plot(tmp_path):
    png = tmp_path / "sim.png"
    res = invoke(
        "simulate", CLUSTER, RUN, "--seeds", "10", "--sweep", "checkpoint.interval", "--points", "5", "--plot", str(png)
    )
    assert res.exit_code == 0, res.output
    assert "goodput vs checkpoint interval" in res.output and "Young/Daly" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_simulate_pathological_failure_rate_is_one_line():
    res = invoke("simulate", CLUSTER, RUN, "--failure-scale", "1000", "--seeds", "5")
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pathological" in lines[0]


def test_simulate_with_custom_failure_model_and_flags(tmp_path):
    model = tmp_path / "failures.yaml"
    model.write_text(
        yaml.safe_dump(
            {"observed_gpus": 1000, "observed_days": 10, "causes": [{"name": "gpu", "count": 50, "kind": "crash"}]}
        )
    )
    res = invoke("simulate", CLUSTER, RUN, "--failures", str(model), "--restart-s", "120", "--seeds", "10", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["scenario"]["cluster_mtbf_hours"] == pytest.approx(1000 * 10 * 24 / 50 / 928)
    assert set(d["summary"]["lost_gpu_hours_by_cause"]) == {"gpu"}
    assert d["scenario"]["config"]["restart_s"] == 120 and d["scenario"]["sources"]["restart_s"] == "flag"


def _fake_history(rd: RunDir, t0: float) -> None:
    """Two attempts: steps every 2 s, a checkpoint blocking 0.5 s, a crash, a restart 40 s after submission."""
    rd.create()
    lines = [{"ts": t0 + 1, "type": "start", "attempt": 1, "resume_step": 0}]
    lines += [{"ts": t0 + 2 + 2 * i, "type": "step", "attempt": 1, "step": i + 1} for i in range(10)]
    lines.append({"ts": t0 + 22, "type": "checkpoint", "attempt": 1, "step": 10, "blocking_s": 0.5, "persist_s": 3.0})
    lines.append({"ts": t0 + 25, "type": "failure", "attempt": 1, "kind": "worker_died"})
    lines.append({"ts": t0 + 75, "type": "start", "attempt": 2, "resume_step": 10})
    lines += [{"ts": t0 + 80 + 2 * i, "type": "step", "attempt": 2, "step": 11 + i} for i in range(5)]
    rd.events_file.write_text("".join(json.dumps(e) + "\n" for e in lines))


def test_calibrate_measures_a_run():
    t0 = 1_000_000.0
    rd = RunDir(Path(Context.load().storage) / "runs" / "cal-1")
    _fake_history(rd, t0)
    attempts = [
        {"attempt": 1, "started_at": t0, "ended_at": t0 + 26},
        {"attempt": 2, "started_at": t0 + 35, "ended_at": None},
    ]
    cal = calibrate(rd, attempts, [], backoff_s=1.0)
    assert cal.step_s == pytest.approx(2.0)
    assert cal.checkpoint_stall_s == pytest.approx(0.5) and cal.checkpoint_persist_s == pytest.approx(3.0)
    assert cal.detect_s == pytest.approx(35 - 25 - 1.0)  # failure -> next submission, less the backoff
    assert cal.restart_s == pytest.approx(75 - 35)  # submission -> the attempt's start


def test_simulate_calibrated_from_the_ledger():
    ctx = Context.load()
    run_id = "cal-2"
    rd = ctx.run_dir(run_id)
    ctx.ledger.create_run(run_id, "cal", {}, {}, str(rd.path))
    ctx.ledger.next_attempt(run_id, 0)
    ctx.ledger.next_attempt(run_id, 10)
    with ctx.ledger.tx() as c:
        c.execute("UPDATE attempts SET started_at = ?, ended_at = ? WHERE attempt = 1", (1_000_000.0, 1_000_026.0))
        c.execute("UPDATE attempts SET started_at = ?, ended_at = NULL WHERE attempt = 2", (1_000_035.0,))
    _fake_history(rd, 1_000_000.0)
    res = invoke("simulate", CLUSTER, RUN, "--calibrate", run_id, "--seeds", "5", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["calibration"]["restart_s"] == pytest.approx(40.0)
    sc = d["scenario"]
    assert sc["config"]["restart_s"] == pytest.approx(40.0) and sc["sources"]["restart_s"].startswith("measured")
    assert sc["config"]["stall_s"] == pytest.approx(0.5)
    # the fake run trained another workload: its step time must not be used for the 13B run
    assert sc["sources"]["step_s"].startswith("planned") and any("step time" in n for n in sc["notes"])
