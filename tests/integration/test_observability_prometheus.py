"""Every dashboard query and alert rule against a real Prometheus scraping the real exporters.

The stack: `llmctl telemetry serve --fake-gpus 4` as its own process (node-a, its GPUs
assigned to the run), a second telemetry exporter in this process whose fake GPUs suffer real
faults (node-b: an XID, uncorrectable ECC errors, a lost GPU), the run's energy meter writing
its records (so node-a's exporter serves J/token), a scrape target where nothing
listens (a dead node), and a real tiny training job on the local Ray cluster whose rank 0
serves `llmctl_train_*` and whose rank 1 is killed once (a restart), and a standalone serving
replica of that run's first checkpoint answering a steady client, a quarter of its answers
failed by its drill switch (`llmctl_serve_*`, `llmctl_rollout_traffic_ratio`). Debian's Prometheus
scrapes all of them every second with dashboards/alerts.yaml loaded.

A panel whose query returns nothing fails; so does a rule Prometheus cannot evaluate, an
alert that does not see the injected fault, or one that fires on the healthy node.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from controlplane.context import Context
from controlplane.observability.catalog import EXPORTED_SOURCES, SCRAPE_JOBS, metrics_in, source_of
from controlplane.observability.panels import exported_dashboards, substitute
from controlplane.observability.prom import PrometheusServer
from controlplane.observability.runbooks import load_alerts
from controlplane.procs import free_port
from controlplane.rollout.export import export_checkpoint
from controlplane.runs import create_run, start_run, stop_run
from controlplane.spec import RunSpec
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "dashboards" / "alerts.yaml"
SCRAPED_SOURCES = {"gpu", "train", "energy", "serve"}  # what this stack runs an exporter for


def _train_spec() -> RunSpec:
    return RunSpec.model_validate(
        {
            "name": "observed",
            "model": {"preset": "tiny"},
            "train": {"max_steps": 100_000, "global_batch_size": 8, "seq_len": 64, "schedule": {"warmup_steps": 5}},
            "workers": {"num_workers": 2},
            "checkpoint": {"interval_steps": 5, "keep_last": 2, "async_save": True},
            # rank 1 is killed once (a restart); then both ranks take a second a step: the stack needs
            # a live run with a few checkpoints, not the ~15 steps and 3 checkpoints a second a tiny
            # model makes flat out (2,000 steps in the module, CPU the vLLM replica loads with)
            "faults": [
                {"kind": "kill_worker", "at_step": 8, "rank": 1},
                {"kind": "slow_worker", "at_step": 12, "rank": 0, "seconds": 1.0},
                {"kind": "slow_worker", "at_step": 12, "rank": 1, "seconds": 1.0},
            ],
            "seed": 3,
        }
    )


@pytest.fixture(scope="module")
def stack(ray_home, dataset_dir, tmp_path_factory):
    from controlplane.telemetry.assignments import assign_gpus
    from controlplane.telemetry.exporter import TelemetryExporter
    from controlplane.telemetry.fake_nvml import FakeNvml
    from controlplane.telemetry.meter import EnergyMeter
    from controlplane.telemetry.sampler import NvmlSampler

    work = tmp_path_factory.mktemp("observability")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLMCTL_HOME", str(ray_home))
    procs: list[subprocess.Popen] = []
    closers = []
    try:
        # node-a: the real CLI exporter, its own process.
        port_file = work / "node-a.port"
        env = {**os.environ, "LLMCTL_HOME": str(ray_home), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "controlplane.cli.main", "telemetry", "serve", "--fake-gpus", "4"]
        cmd += ["--port", "0", "--port-file", str(port_file), "--interval", "0.25", "--node", "node-a"]
        log = open(work / "node-a.log", "wb")  # noqa: SIM115 - closed below
        closers.append(log.close)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        wait_for(lambda: port_file.is_file() and port_file.read_text().strip(), 60, "node-a's exporter port")
        node_a = f"127.0.0.1:{port_file.read_text().strip()}"

        # node-b: the same exporter in this process, so its fake GPUs can be broken on purpose.
        nvml_b = FakeNvml(2)
        nvml_b.set_all_loads(0.8)
        exp_b = TelemetryExporter(NvmlSampler(nvml_b), "local", "node-b", storage_root=ray_home, interval_s=0.25)
        exp_b.start()
        server_b, port_b = exp_b.serve("127.0.0.1", 0)
        closers += [exp_b.stop, server_b.shutdown]
        dead = f"127.0.0.1:{free_port()}"

        # A real training job; its rank 0 serves the training metrics.
        ctx = Context.load()
        run_dir = create_run(ctx, _train_spec())
        run_id = run_dir.run_id
        closers.append(lambda: stop_run(Context.load(), run_id, "observability test done"))
        start_run(ctx, run_id)
        start = wait_for(lambda: run_dir.events({"start"}), 300, "the training job to start")[-1]
        train = start["metrics_url"].removeprefix("http://").removesuffix("/metrics")
        # node-a's GPUs work for the run (what a worker on a GPU node records): its GPU series carry run_id.
        fake_a = FakeNvml(4)
        uuids = [(i, fake_a.gpu(i).uuid) for i in range(4)]
        assignment = assign_gpus(ray_home, "node-a", run_id, uuids, attempt=1)
        closers.append(assignment.release)
        # ... and the worker-side energy meter measures them into the run directory (J/token) and keeps
        # the assignment fresh, as a worker's does: the exporter ignores one not refreshed for 120 s.
        fake_a.set_all_loads(0.9)
        meter = EnergyMeter(
            run_dir.path,
            1,
            "node-a",
            [0, 1, 2, 3],
            nvml=fake_a,
            interval_s=0.25,
            flush_every_s=1.0,
            assignment=assignment,
        )
        closers.append(meter.start().stop)

        # A serving replica of the run's first checkpoint (standalone, as a serving pod runs it), with a
        # drill that fails a quarter of the requests, and a client that keeps asking.
        wait_for(lambda: run_dir.events({"checkpoint"}), 300, "the first checkpoint")
        exported = export_checkpoint(run_dir)
        serve_port = free_port()
        serve_env = {**env, "LLMCTL_DRILL": '{"error_rate": 0.25, "seed": 1}'}
        cmd = [sys.executable, "-m", "jobs.serve", "standalone", "--model-dir", str(exported.model_dir)]
        cmd += ["--version", exported.version, "--port", str(serve_port), "--enforce-eager"]  # vLLM, no compile
        serve_log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed below
        closers.append(serve_log.close)
        procs.append(subprocess.Popen(cmd, env=serve_env, stdout=serve_log, stderr=subprocess.STDOUT))
        serve_url = f"http://127.0.0.1:{serve_port}"
        # a vLLM engine on a CPU took 4.5 min to load this model beside the training stream's jobs
        wait_for(lambda: _healthy(serve_url), 600, "the serving replica to load its model (a vLLM engine)")
        stop_client = threading.Event()
        client = threading.Thread(target=_client, args=(serve_url, exported.version, stop_client), daemon=True)
        client.start()
        closers.append(lambda: (stop_client.set(), client.join(timeout=30)))

        prom = PrometheusServer(
            targets={
                SCRAPE_JOBS["gpu"]: [node_a, f"127.0.0.1:{port_b}", dead],
                SCRAPE_JOBS["train"]: [train],
                SCRAPE_JOBS["serve"]: [f"127.0.0.1:{serve_port}"],
            },
            workdir=work / "prometheus",
            scrape_interval_s=1.0,  # Prometheus 2.42 rejects fractional-second durations such as 0.5s
            evaluation_interval_s=1.0,
            rule_files=[ALERTS],
        ).start()
        closers.append(prom.stop)

        # Enough history for rate()/increase(), a restart, and a checkpoint.
        wait_for(lambda: run_dir.events({"worker_replaced"}), 300, "the killed worker to be replaced")
        prom.wait_for("llmctl_train_restarts_total", timeout_s=60)
        prom.wait_for('count_over_time(llmctl_gpu_energy_joules_total{run_id!=""}[1m]) >= 4', timeout_s=60)
        prom.wait_for("count_over_time(llmctl_train_step[1m]) >= 4", timeout_s=60)
        prom.wait_for('count_over_time(llmctl_serve_requests_total{code="500"}[1m]) >= 4', timeout_s=120)
        prom.wait_for("llmctl_train_energy_joules_per_token > 0", timeout_s=90)  # refreshed every 15 s

        # Break node-b: an XID on GPU 0, uncorrectable ECC on GPU 0, GPU 1 falls off the bus.
        nvml_b.inject_xid(0, 79)
        nvml_b.add_ecc_errors(0, uncorrected=2)
        nvml_b.lose_gpu(1)
        prom.wait_for('llmctl_gpu_xid_errors_total{node="node-b"}', timeout_s=30)
        prom.wait_for('llmctl_gpu_ecc_errors_total{node="node-b",type="uncorrected"} > 0', timeout_s=30)
        time.sleep(3.0)  # a few more scrapes and rule evaluations after the faults
        yield {"prom": prom, "run_id": run_id, "node_a": node_a, "dead": dead, "version": exported.version}
    finally:
        for close in reversed(closers):
            with contextlib.suppress(Exception):  # teardown goes on
                close()
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
        mp.undo()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _client(url: str, version: str, stop: threading.Event) -> None:
    """Completion requests, a few a second, until told to stop."""
    with httpx.Client(timeout=30.0) as http:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                http.post(f"{url}/v1/completions", json={"model": version, "prompt": "今日は", "max_tokens": 4})
            stop.wait(0.2)


def _has_finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


def test_stack_scrapes_every_exported_source():
    assert EXPORTED_SOURCES <= SCRAPED_SOURCES, "a source is shipped in dashboards but not tested here"


def test_every_panel_query_returns_data(stack):
    prom = stack["prom"]
    empty = []
    count = 0
    for d in exported_dashboards():
        for p in d.panels:
            for q in p.queries:
                count += 1
                expr = substitute(q.expr, range_="1m", rate_interval="5s")
                if not _has_finite(prom.query(expr)):
                    empty.append(f"{d.uid} / {p.title}: {expr}")
    assert count >= 15
    assert not empty, "panels with no data:\n" + "\n".join(empty)


def test_panels_filtered_to_the_cluster_run_and_node_return_data(stack):
    """A concrete selection, not "All": every series a panel reads must carry the labels it filters on."""
    prom = stack["prom"]
    for d in exported_dashboards():
        for p in d.panels:
            for q in p.queries:
                expr = substitute(
                    q.expr, range_="1m", rate_interval="5s", cluster="local", run=stack["run_id"], node="node-a"
                )
                assert prom.query(expr), f"{d.uid} / {p.title} with cluster, run and node selected: {expr}"


def test_variables_and_annotations_return_data(stack):
    prom = stack["prom"]
    assert {r["metric"].get("cluster") for r in prom.query("count by (cluster) (llmctl_gpu_power_watts)")} == {"local"}
    runs = {r["metric"].get("run_id") for r in prom.query('count by (run_id) (llmctl_train_step{cluster=~"local"})')}
    assert stack["run_id"] in runs
    nodes = {r["metric"].get("node") for r in prom.query('count by (node) (llmctl_gpu_power_watts{cluster=~"local"})')}
    assert {"node-a", "node-b"} <= nodes
    for d in exported_dashboards():
        for a in d.annotations:
            expr = substitute(a.expr)
            assert prom.query(expr), f"annotation {a.name}: {expr}"


def test_every_rule_is_evaluated_by_prometheus_without_error(stack):
    prom = stack["prom"]
    names = {a.name for a in load_alerts(ALERTS)}

    def evaluated():
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return rules if all(r.get("lastEvaluation", "").startswith("2") for r in rules) else None

    rules = wait_for(evaluated, 30, "every rule to be evaluated")
    assert {r["name"] for r in rules} == names
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad


def test_every_rule_selector_of_a_scraped_source_has_data(stack):
    prom = stack["prom"]
    for a in load_alerts(ALERTS):
        for metric in metrics_in(a.expr):
            if source_of(metric) in SCRAPED_SOURCES:
                assert prom.query(f'count({{__name__=~"{metric}|{metric}_bucket"}})'), (a.name, metric)
        if "up{" in a.expr:
            assert prom.query(f'up{{job="{SCRAPE_JOBS["gpu"]}"}}'), a.name


def _alert_series(prom, name: str) -> list[dict]:
    expr = next(a.expr for a in load_alerts(ALERTS) if a.name == name)
    return [r["metric"] for r in prom.query(expr)]


def test_gpu_fault_alerts_see_the_broken_node_and_not_the_healthy_one(stack):
    prom = stack["prom"]
    xid = _alert_series(prom, "GpuXidError")
    assert [(m["node"], m["gpu"], m["xid"]) for m in xid] == [("node-b", "0", "79")]
    ecc = _alert_series(prom, "GpuEccUncorrectable")
    assert [(m["node"], m["gpu"], m["type"]) for m in ecc] == [("node-b", "0", "uncorrected")]
    lost = _alert_series(prom, "GpuLost")
    assert [m["node"] for m in lost] == ["node-b"]
    down = _alert_series(prom, "NodeDown")
    assert [m["instance"] for m in down] == [stack["dead"]]
    burn = _alert_series(prom, "ServingErrorBudgetBurn")
    assert [m["version"] for m in burn] == [stack["version"]]
    for quiet in ("TelemetryDown", "GpuThrottlingSustained", "TrainingHang", "TrainingLossAnomaly", "RolloutStuck"):
        assert _alert_series(prom, quiet) == [], quiet
    active = {(a["labels"]["alertname"], a["state"]) for a in prom.api("alerts")["alerts"]}
    assert ("GpuXidError", "firing") in active
    assert ("GpuEccUncorrectable", "firing") in active
    assert {s for n, s in active if n == "GpuLost"} <= {"pending", "firing"} and any(n == "GpuLost" for n, _ in active)


def test_runbook_promql_runs(stack):
    from controlplane.observability import runbooks as rb

    exprs = [(n, e) for n in rb.runbook_names() for e in rb.promql_blocks(rb.read_runbook(n))]
    assert len(exprs) >= 14
    for name, expr in exprs:
        stack["prom"].query(expr)  # PrometheusError on a bad expression
        assert metrics_in(expr) or "up{" in expr, (name, expr)


def test_snapshot_renders_the_run_as_png(stack, tmp_path):
    from typer.testing import CliRunner

    from controlplane.cli.main import app

    out = tmp_path / "snap"
    res = CliRunner().invoke(
        app,
        [
            "dashboards",
            "snapshot",
            stack["run_id"],
            str(out),
            "--prometheus",
            stack["prom"].url,
            "--since",
            "0.2",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.stdout)
    assert data["empty"] == []
    names = sorted(Path(f).name for f in data["files"])
    run_id = stack["run_id"]
    assert names == sorted(f"{run_id}-{k}.png" for k in ("power", "energy", "loss", "goodput", "overview"))
    for f in data["files"]:
        blob = Path(f).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000
    res = CliRunner().invoke(
        app, ["dashboards", "snapshot", "no-such-run", str(out), "--prometheus", stack["prom"].url]
    )
    assert res.exit_code == 2 and "no data" in res.output
    # a prefix of a run this ledger holds works as in every `run` verb
    from controlplane.context import Context

    Context.load().ledger.create_run(run_id, "snap", {}, {}, str(tmp_path / "rd"))
    prefixed = tmp_path / "prefixed"
    res = CliRunner().invoke(
        app,
        ["dashboards", "snapshot", run_id[:-3], str(prefixed), "--prometheus", stack["prom"].url, "--since", "0.2"],
    )
    assert res.exit_code == 0, res.output
    assert (prefixed / f"{run_id}-overview.png").exists()
