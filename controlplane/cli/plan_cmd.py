"""`llmctl plan CLUSTER RUN`: time, energy, memory and checkpoint cadence before a GPU is spent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.common import JsonOpt, emit_json, human_params, out

MfuOpt = Annotated[float, typer.Option("--mfu", help="Model FLOPs utilization to plan at (measured or assumed).")]
PowerOpt = Annotated[
    float | None, typer.Option("--gpu-power-watts", help="Average board power per GPU, W (default: the GPU's TDP).")
]
TokensOpt = Annotated[float | None, typer.Option("--tokens", help="Token budget (default: the run spec's).")]
DaysOpt = Annotated[float, typer.Option("--days", help="Window for 'tokens this many days buy'.")]
MtbfOpt = Annotated[
    float | None, typer.Option("--mtbf-hours", help="Cluster MTBF, h (default: Llama 3 failure rates per GPU).")
]
StallOpt = Annotated[
    float | None, typer.Option("--checkpoint-stall-s", help="Measured blocking time per checkpoint, s.")
]
FailuresOpt = Annotated[
    str | None, typer.Option("--failures", help="Failure model YAML (default: Llama 3's published rates).")
]


def load_inputs(cluster_file: Path, run_file: Path):
    from controlplane.spec import ClusterSpec, RunSpec, load_spec

    return load_spec(ClusterSpec, cluster_file), load_spec(RunSpec, run_file)


def positive(name: str, value: float | None, upper: float | None = None) -> None:
    from controlplane.errors import ConfigurationError

    if value is None:
        return
    if not value > 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ConfigurationError(f"{name}: expected a number {bound}, got {value}")


def plan(
    cluster_file: Annotated[Path, typer.Argument(metavar="CLUSTER", help="Cluster spec (YAML).")],
    run_file: Annotated[Path, typer.Argument(metavar="RUN", help="Run spec (YAML).")],
    mfu: MfuOpt = 0.40,
    gpu_power_watts: PowerOpt = None,
    tokens: TokensOpt = None,
    days: DaysOpt = 30.0,
    mtbf_hours: MtbfOpt = None,
    checkpoint_stall_s: StallOpt = None,
    failures: FailuresOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Plan a run before a GPU is spent: FLOPs, time, GPU-hours, energy, CO2e, memory per GPU,
    checkpoint size and interval. Exits 2 with one line if the parallelism does not fit."""
    from controlplane.planning.failures import load_failure_model
    from controlplane.planning.plan import Assumptions, make_plan, require_fit

    positive("--mfu", mfu, 1.0)
    positive("--gpu-power-watts", gpu_power_watts)
    positive("--tokens", tokens)
    positive("--days", days)
    positive("--mtbf-hours", mtbf_hours)
    if checkpoint_stall_s is not None and checkpoint_stall_s < 0:
        positive("--checkpoint-stall-s", checkpoint_stall_s)
    cluster, run = load_inputs(cluster_file, run_file)
    model = load_failure_model(failures)
    a = Assumptions(
        mfu=mfu,
        gpu_power_watts=gpu_power_watts,
        mtbf_hours=mtbf_hours,
        checkpoint_stall_s=checkpoint_stall_s,
        days=days,
        tokens=tokens,
    )
    p = make_plan(cluster, run, a, per_gpu_mtbf_hours=model.per_gpu_mtbf_hours())
    require_fit(p)
    if json_:
        emit_json(p.to_dict())
        return
    print_plan(p)


def _si(x: float, unit: str = "") -> str:
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def print_plan(p) -> None:
    from rich.table import Table

    par = p.parallelism
    t = Table(title=f"Plan: {human_params(p.parameters)} parameters on {p.gpus} x {p.gpu_model}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_column("how", style="dim")
    rows = [
        ("tokens", _si(p.tokens), f"{p.steps:,} steps"),
        ("FLOPs per token", _si(p.flops_per_token), f"6N + 12·L·s·h; attention {p.attention_flops_fraction:.1%}"),
        ("training FLOPs", f"{p.total_flops:.3e}", ""),
        ("peak / achieved", f"{p.peak_pflops:.1f} / {p.achieved_pflops:.1f} PFLOP/s", f"dense bf16, MFU {p.mfu:.0%}"),
        ("throughput", f"{_si(p.tokens_per_second)} tokens/s", f"step {p.step_seconds:.2f} s"),
        ("time to train", f"{p.train_days:.1f} days", "failure-free; see `llmctl simulate`"),
        (f"tokens in {p.window_days:g} days", _si(p.tokens_in_window), "failure-free"),
        ("GPU-hours", f"{p.gpu_hours:,.0f}", ""),
        ("GPU energy", f"{p.gpu_energy_mwh:,.1f} MWh", f"{p.gpu_power_watts:.0f} W per GPU"),
        ("facility energy", f"{p.facility_energy_mwh:,.1f} MWh", f"PUE {p.pue}"),
        ("CO2e", f"{p.co2e_tonnes:,.1f} t", f"{p.carbon_intensity_kg_per_kwh} kg/kWh"),
        (
            "parallelism",
            f"tensor {par['tensor']} x pipeline {par['pipeline']} x data {par['data']}",
            f"ZeRO {par['zero_stage']}, activation checkpointing {par['activation_checkpointing']}, "
            f"micro-batch {par['micro_batch']}",
        ),
        (
            "memory per GPU",
            f"{p.memory_total_gb:.1f} / {p.memory_capacity_gb:.0f} GB",
            ", ".join(f"{k} {v:.1f}" for k, v in p.memory_gb.items()),
        ),
        ("checkpoint", f"{p.checkpoint_gb:,.0f} GB", f"persist {p.checkpoint_persist_seconds:.1f} s"),
        ("checkpoint stall", f"{p.checkpoint_stall_seconds:.2f} s", "blocking time per save"),
        ("cluster MTBF", f"{p.cluster_mtbf_hours:.1f} h", ""),
        (
            "checkpoint every",
            f"{p.checkpoint_interval_steps:,} steps",
            f"{p.checkpoint_interval_seconds / 60:.1f} min (Young/Daly)",
        ),
    ]
    for r in rows:
        t.add_row(*r)
    out.print(t)
