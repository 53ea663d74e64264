"""`llmctl simulate CLUSTER RUN`: a month of failures and restarts, decided by the supervisor's policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.common import JsonOpt, emit_json, err, out
from controlplane.cli.plan_cmd import FailuresOpt, MfuOpt, load_inputs, positive

SWEEPABLE = ("checkpoint.interval",)


def simulate(
    cluster_file: Annotated[Path, typer.Argument(metavar="CLUSTER", help="Cluster spec (YAML).")],
    run_file: Annotated[Path, typer.Argument(metavar="RUN", help="Run spec (YAML).")],
    days: Annotated[float, typer.Option("--days", help="Simulated wall-clock window, days.")] = 30.0,
    seeds: Annotated[int, typer.Option("--seeds", help="Independent simulated runs.")] = 100,
    first_seed: Annotated[int, typer.Option("--seed", help="First random seed.")] = 0,
    mfu: MfuOpt = 0.40,
    failures: FailuresOpt = None,
    failure_scale: Annotated[
        float, typer.Option("--failure-scale", help="Multiply every failure rate (2 = twice as many failures).")
    ] = 1.0,
    restart_s: Annotated[
        float | None, typer.Option("--restart-s", help="Restart: submission to first step, s (default 600).")
    ] = None,
    detect_s: Annotated[float | None, typer.Option("--detect-s", help="Crash detection time, s (default 30).")] = None,
    node_replace_s: Annotated[
        float, typer.Option("--node-replace-s", help="Extra wait when the policy excludes a node, s.")
    ] = 0.0,
    checkpoint_stall_s: Annotated[
        float | None, typer.Option("--checkpoint-stall-s", help="Blocking time per checkpoint, s.")
    ] = None,
    interval: Annotated[
        int | None, typer.Option("--interval", help="Checkpoint interval in steps (default: the run spec's).")
    ] = None,
    calibrate: Annotated[
        str | None, typer.Option("--calibrate", help="Run id whose events and ledger give measured costs.")
    ] = None,
    calibrate_cluster: Annotated[
        str | None,
        typer.Option("--calibrate-cluster", help="Cluster spec where the --calibrate run lives (default: local)."),
    ] = None,
    sweep: Annotated[
        str | None, typer.Option("--sweep", help="Parameter to sweep: checkpoint.interval (goodput curve).")
    ] = None,
    points: Annotated[int, typer.Option("--points", help="Sweep points (geometric, Young/Daly / 8 .. x 8).")] = 15,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the goodput curve and a timeline (PNG).")] = None,
    max_events: Annotated[int, typer.Option("--max-events", help="Bound on failures per simulated run.")] = 200_000,
    json_: JsonOpt = False,
) -> None:
    """Simulate the run under a failure model; restarts are decided by the supervisor's policy.

    Prints the goodput (ETTR) distribution, the expected finish and lost GPU-hours by cause.
    A failure model under which the run cannot make progress is reported in one line (exit 2)."""
    from controlplane.errors import ConfigurationError
    from controlplane.planning import scenario
    from controlplane.planning.failures import load_failure_model
    from controlplane.planning.plan import Assumptions, make_plan, require_fit
    from controlplane.planning.simulate import interval_grid, run_seeds, sweep_intervals

    positive("--days", days, 3650.0)
    positive("--mfu", mfu, 1.0)
    positive("--failure-scale", failure_scale)
    if not 1 <= seeds <= 100_000:
        raise ConfigurationError(f"--seeds: expected 1..100000, got {seeds}")
    if not 3 <= points <= 200:
        raise ConfigurationError(f"--points: expected 3..200, got {points}")
    if not 1 <= max_events <= 10_000_000:
        raise ConfigurationError(f"--max-events: expected 1..10000000, got {max_events}")
    for name, v in (("--restart-s", restart_s), ("--detect-s", detect_s), ("--checkpoint-stall-s", checkpoint_stall_s)):
        if v is not None and v < 0:
            raise ConfigurationError(f"{name}: expected a number >= 0, got {v}")
    if node_replace_s < 0:
        raise ConfigurationError(f"--node-replace-s: expected a number >= 0, got {node_replace_s}")
    if interval is not None and interval < 1:
        raise ConfigurationError(f"--interval: expected a positive number of steps, got {interval}")
    if sweep is not None and sweep not in SWEEPABLE:
        raise ConfigurationError(f"--sweep: expected one of {', '.join(SWEEPABLE)}, got {sweep!r}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigurationError(f"--plot: expected a .png file, got {plot}")

    cluster, run = load_inputs(cluster_file, run_file)
    model = load_failure_model(failures)
    cal = _calibration(calibrate, calibrate_cluster, run) if calibrate else None
    plan = make_plan(
        cluster,
        run,
        Assumptions(mfu=mfu, checkpoint_stall_s=checkpoint_stall_s),
        per_gpu_mtbf_hours=model.per_gpu_mtbf_hours() / failure_scale,
    )
    require_fit(plan)
    flags = scenario.CostFlags(
        restart_s=restart_s,
        detect_s=detect_s,
        node_replace_s=node_replace_s,
        checkpoint_stall_s=checkpoint_stall_s,
        interval_steps=interval,
        days=days,
        max_events=max_events,
    )
    sc = scenario.build(plan, run, cluster, flags, cal)
    summary, results = run_seeds(sc.config, model, run.fault_tolerance, sc.mtbf_s, seeds, first_seed)
    curve = None
    if sweep or plot is not None:
        grid = interval_grid(sc.young_daly_steps, points)
        curve = sweep_intervals(sc.config, model, run.fault_tolerance, sc.mtbf_s, seeds, grid)
    if plot is not None:
        from controlplane.planning.plot import draw

        draw(plot, sc, summary, results[0], curve)
        err.print(f"wrote {plot}")
    if json_:
        data = {"scenario": sc.to_dict(), "summary": summary.to_dict()}
        data["tokens_in_window_at_goodput"] = _window_tokens(plan, sc, summary)
        if cal:
            data["calibration"] = cal.to_dict()
        if sweep and curve:
            data["sweep"] = _sweep_dict(sc, curve)
        emit_json(data)
        return
    _print(plan, sc, summary, curve if sweep else None, cal)


def _calibration(run_id: str, cluster_file: str | None, run):
    from controlplane.context import Context
    from controlplane.errors import UserError
    from controlplane.planning.calibrate import calibrate as measure
    from controlplane.spec import check_run_id
    from controlplane.supervisor.rules import backoff_delay_s

    ctx = Context.load(cluster_file)
    attempts, checkpoints = [], []
    try:
        row = ctx.ledger.find_run(run_id)
        run_id = row["run_id"]
        attempts, checkpoints = ctx.ledger.attempts(run_id), ctx.ledger.checkpoints(run_id)
    except UserError:
        check_run_id(run_id)
    return measure(ctx.run_dir(run_id), attempts, checkpoints, backoff_s=backoff_delay_s(run.fault_tolerance, 0))


def _window_tokens(plan, sc, summary) -> float:
    """Tokens the window buys at the simulated mean goodput (at the simulated step time)."""
    tokens_per_step = plan.tokens / plan.steps
    return summary.horizon_days * 86400 * summary.goodput_mean * tokens_per_step / sc.config.step_s


def _sweep_dict(sc, curve) -> dict:
    best = max(curve, key=lambda s: s.goodput_mean)
    return {
        "young_daly_steps": sc.young_daly_steps,
        "best_steps": best.interval_steps,
        "points": [
            {"interval_steps": s.interval_steps, "goodput_mean": s.goodput_mean, "goodput_sem": s.goodput_sem}
            for s in curve
        ],
    }


def _print(plan, sc, s, curve, cal) -> None:
    from rich.table import Table

    cfg = sc.config
    out.print(
        f"[bold]{s.seeds} simulated runs[/bold] of {plan.parameters / 1e9:.1f}B on {plan.gpus} x {plan.gpu_model}, "
        f"{s.horizon_days:g}-day window; failure-free time to train {cfg.work_s / 86400:.1f} days"
    )
    out.print(
        f"cluster MTBF {s.cluster_mtbf_hours:.1f} h; {s.failures_mean:.1f} failures per run; "
        f"checkpoint every {cfg.interval_steps:,} steps ({cfg.interval_s / 60:.1f} min, Young/Daly "
        f"{sc.young_daly_steps:,}); stall {cfg.stall_s:.2f} s; detect {cfg.detect_s:.0f} s; restart {cfg.restart_s:.0f} s"
    )
    out.print(
        f"[bold]goodput (ETTR)[/bold]: mean {s.goodput_mean:.2%} ± {s.goodput_sem:.2%}, "
        f"p5 {s.goodput_p5:.2%}, p50 {s.goodput_p50:.2%}, p95 {s.goodput_p95:.2%}"
    )
    out.print(
        f"[bold]finish[/bold]: mean day {s.finish_days_mean:.1f} (p5 {s.finish_days_p5:.1f}, p50 "
        f"{s.finish_days_p50:.1f}, p95 {s.finish_days_p95:.1f}); {s.finished}/{s.seeds} finished within the window"
    )
    out.print(
        f"a {s.horizon_days:g}-day window at this goodput buys {_window_tokens(plan, sc, s) / 1e12:.2f}T tokens "
        f"({plan.tokens_in_window / 1e12:.2f}T failure-free)"
    )
    if s.gave_up:
        causes = ", ".join(f"{k} x{v}" for k, v in s.gave_up_causes.items())
        out.print(f"[red]the policy gave up on {s.gave_up}/{s.seeds} runs[/red] ({causes})")
    if s.events_bounded:
        out.print(f"[red]{s.events_bounded} runs hit the event bound[/red]")
    t = Table(title="GPU-hours per run (mean)")
    for col in ("cause", "lost work", "detection", "restart", "total"):
        t.add_column(col, justify="left" if col == "cause" else "right")
    for cause, row in s.lost_gpu_hours_by_cause.items():
        t.add_row(
            cause, *(f"{row[k]:,.0f}" for k in ("lost_work", "detection", "restart")), f"{sum(row.values()):,.0f}"
        )
    t.add_row("[bold]all failures[/bold]", "", "", "", f"[bold]{s.lost_gpu_hours_total:,.0f}[/bold]")
    t.add_row("checkpoint stalls", "", "", "", f"{s.checkpoint_stall_gpu_hours:,.0f}")
    t.add_row("productive", "", "", "", f"{s.productive_gpu_hours:,.0f}")
    out.print(t)
    for note in sc.notes:
        out.print(f"note: {note}")
    out.print("sources: " + ", ".join(f"{k} {v}" for k, v in sc.sources.items()))
    if curve:
        c = Table(title="goodput vs checkpoint interval")
        for col in ("interval (steps)", "minutes", "goodput", "± sem"):
            c.add_column(col, justify="right")
        best = max(curve, key=lambda x: x.goodput_mean)
        for p in curve:
            mark = " *" if p is best else (" YD" if p.interval_steps == sc.young_daly_steps else "")
            c.add_row(
                f"{p.interval_steps:,}{mark}",
                f"{p.interval_s / 60:.1f}",
                f"{p.goodput_mean:.3%}",
                f"{p.goodput_sem:.3%}",
            )
        out.print(c)
        out.print(f"best interval {best.interval_steps:,} steps; Young/Daly {sc.young_daly_steps:,} steps")
