"""`llmctl telemetry`: serve GPU metrics, look at a sample, read node health; `llmctl run energy`."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli.common import ClusterOpt, JsonOpt, RunArg, emit_json, err, out
from controlplane.errors import ConfigurationError

app = typer.Typer(help="GPU telemetry: the Prometheus exporter, samples, node health.", no_args_is_help=True)

FakeGpusOpt = Annotated[
    int,
    typer.Option("--fake-gpus", min=0, max=64, help="Use N simulated GPUs (fake NVML) instead of the real driver."),
]
NodeOpt = Annotated[str | None, typer.Option("--node", help="This node's name (default: the host name).")]


def _nvml(fake_gpus: int, fake_arch: str) -> tuple[Any, str]:
    if fake_gpus:
        from controlplane.telemetry.fake_nvml import ARCH_PROFILES, FakeNvml

        if fake_arch not in ARCH_PROFILES:
            raise ConfigurationError(f"--fake-arch: expected one of {', '.join(ARCH_PROFILES)}, got {fake_arch!r}")
        nvml = FakeNvml(fake_gpus, arch=fake_arch)
        for i in range(fake_gpus):  # a little life in the simulated GPUs
            nvml.set_load(i, 0.9 - 0.1 * (i % 4), memory_used=(20 + 5 * i) << 30)
        return nvml, "fake"
    from controlplane.telemetry.sampler import load_nvml

    return load_nvml(), "nvml"


def _animate(nvml: Any, gpus: int, done: threading.Event, period_s: float = 120.0) -> None:
    """Let the fake GPUs' load drift slowly, so dashboards fed by `--fake-gpus` show moving lines."""
    t0 = time.monotonic()
    while not done.wait(1.0):
        t = time.monotonic() - t0
        for i in range(gpus):
            nvml.set_load(i, 0.6 + 0.3 * math.sin(2 * math.pi * t / period_s + i))


@app.command()
def serve(
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port; 0 picks a free one.")] = 9835,
    host: Annotated[
        str, typer.Option("--host", help="Bind address. Keep loopback unless Prometheus scrapes from elsewhere.")
    ] = "127.0.0.1",
    interval: Annotated[float, typer.Option("--interval", min=0.05, max=300, help="Seconds between samples.")] = 1.0,
    node: NodeOpt = None,
    fake_gpus: FakeGpusOpt = 0,
    fake_arch: Annotated[str, typer.Option("--fake-arch", help="Fake GPU kind: ampere, hopper, volta, ...")] = "ampere",
    duration: Annotated[float, typer.Option("--duration", min=0, help="Stop after S seconds (0: until killed).")] = 0,
    port_file: Annotated[
        Path | None, typer.Option("--port-file", help="Write the bound port to this file once serving.")
    ] = None,
    cluster: ClusterOpt = None,
) -> None:
    """Serve this node's llmctl_gpu_* metrics for Prometheus (one exporter per node)."""
    from controlplane.context import load_cluster
    from controlplane.rundir import write_atomic
    from controlplane.telemetry import endpoints
    from controlplane.telemetry.assignments import default_node_name
    from controlplane.telemetry.exporter import TelemetryExporter
    from controlplane.telemetry.sampler import NvmlSampler

    spec = load_cluster(cluster)
    node = node or default_node_name()
    nvml, source = _nvml(fake_gpus, fake_arch)
    if source == "fake":
        err.print(f"telemetry: using {fake_gpus} FAKE GPU(s) (simulated NVML), not real hardware", markup=False)
    exporter = TelemetryExporter(
        NvmlSampler(nvml), spec.name, node, storage_root=spec.storage_root(), source=source, interval_s=interval
    )
    exporter.start()
    if exporter.sampler.status != "ok":
        err.print(f"telemetry: {exporter.sampler.message}; serving llmctl_telemetry_up 0", markup=False)
    try:
        server, bound = exporter.serve(host, port)
    except OSError as exc:
        exporter.stop()
        raise ConfigurationError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    err.print(f"telemetry: serving http://{host}:{bound}/metrics (node {node}, every {interval:g} s)", markup=False)
    if port_file is not None:
        write_atomic(port_file, str(bound).encode())
    record = endpoints.register(spec.storage_root(), node, f"http://{host}:{bound}/metrics")
    done = threading.Event()
    if source == "fake":
        threading.Thread(target=_animate, args=(nvml, fake_gpus, done), daemon=True).start()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, lambda *_: done.set())
    try:
        done.wait(duration if duration > 0 else None)
    finally:
        done.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        record.unlink(missing_ok=True)
        server.shutdown()
        exporter.stop()
        err.print("telemetry: stopped", markup=False)


@app.command()
def sample(node: NodeOpt = None, fake_gpus: FakeGpusOpt = 0, json_: JsonOpt = False) -> None:
    """Take one sample of this node's GPUs and print it (a machine without a GPU says so)."""
    from controlplane.telemetry.assignments import default_node_name
    from controlplane.telemetry.sampler import NvmlSampler

    nvml, source = _nvml(fake_gpus, "ampere")
    with NvmlSampler(nvml) as sampler:
        if sampler.status == "ok":
            sampler.sample()
            time.sleep(0.2)  # a second sample gives the energy integral something to integrate
        s = sampler.sample()
    data = {"node": node or default_node_name(), "source": source, **s.to_dict()}
    if json_:
        emit_json(data)
        return
    out.print(f"{data['node']}: {s.status} - {s.message}" + (" (fake GPUs)" if source == "fake" else ""), markup=False)
    if not s.gpus:
        return
    from rich.table import Table

    t = Table("gpu", "name", "power W", "limit W", "util", "mem GiB", "temp C", "SM MHz", "throttle", "state")
    for g in s.gpus:
        throttle = ",".join(k for k, v in (g.throttle or {}).items() if v) or "-"

        def f(v: float | None, fmt: str = "{:.0f}") -> str:
            return "-" if v is None else fmt.format(v)

        t.add_row(
            str(g.index),
            g.name or "?",
            f(g.power_w),
            f(g.power_limit_w),
            f(g.utilization, "{:.0%}"),
            f(g.memory_used_bytes and g.memory_used_bytes / 2**30, "{:.1f}"),
            f(g.temperature_c),
            f(g.sm_clock_hz and g.sm_clock_hz / 1e6),
            throttle,
            "LOST" if g.lost else "ok",
        )
    out.print(t)


@app.command()
def health(cluster: ClusterOpt = None, json_: JsonOpt = False) -> None:
    """Node health as the exporters report it (XID, uncorrectable ECC, lost GPUs)."""
    from controlplane.context import load_cluster
    from controlplane.telemetry.health import read_node_health

    records = read_node_health(load_cluster(cluster).storage_root())
    if json_:
        emit_json(records)
        return
    if not records:
        out.print("no node health reported yet (is `llmctl telemetry serve` running on the nodes?)")
        return
    for node, rec in records.items():
        state = {True: "healthy", False: "UNHEALTHY", None: "unknown"}[rec.get("healthy")]
        out.print(f"{node}: {state}")
        for r in rec.get("reasons", []):
            out.print(f"  gpu {r.get('gpu')}: {r.get('kind')}: {r.get('detail')}")


def run_energy(
    run: RunArg,
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Energy of a run: GPU kWh, J/token, W per GPU, facility kWh and kg CO2e (recorded in the ledger)."""
    from controlplane.context import Context
    from controlplane.telemetry.energy import account_run_energy, summary_line

    ctx = Context.load(cluster)
    row = ctx.ledger.find_run(run)
    report = account_run_energy(
        ctx.ledger, row["run_id"], row["run_dir"], ctx.cluster.pue, ctx.cluster.carbon_intensity_kg_per_kwh
    )
    if json_:
        emit_json(report.to_dict())
        return
    out.print(f"run {report.run_id}")
    out.print(summary_line(report))
    if report.measured:
        dis = "-" if report.disagreement is None else f"{report.disagreement:+.1%}"
        out.print(
            f"  GPU energy {report.gpu_joules:,.0f} J over {report.gpu_seconds:,.0f} GPU-seconds; "
            f"counter vs integrated power: {dis}"
        )
        out.print(f"  tokens {report.tokens if report.tokens is not None else '-'}")
    said: dict[str, int] = {}  # one power record per worker and attempt: each message once
    for p in report.power:
        said[str(p.get("message"))] = said.get(str(p.get("message")), 0) + 1
    for message, n in said.items():
        out.print(f"  {message}" + (f" ({n} workers/attempts)" if n > 1 else ""))
