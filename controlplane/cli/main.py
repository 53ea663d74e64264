"""The `llmctl` command: one typer app, one module per command group.

Group modules import nothing heavy at module level (no Ray, no torch): read-only commands
such as `run list` must answer from the ledger alone.
"""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane import __version__
from controlplane.cli import (
    cluster_cmd,
    dashboards_cmd,
    data_cmd,
    doctor_cmd,
    eval_cmd,
    infra_cmd,
    node_cmd,
    plan_cmd,
    rollout_cmd,
    run_cmd,
    runbook_cmd,
    simulate_cmd,
    spec_cmd,
    supervise_cmd,
    telemetry_cmd,
)
from controlplane.cli.common import ClusterOpt, LlmctlGroup, err, out

app = typer.Typer(
    name="llmctl",
    cls=LlmctlGroup,
    help="Control plane for training and serving foundation models on GPU clusters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(spec_cmd.app, name="spec")
app.add_typer(run_cmd.app, name="run")
app.add_typer(cluster_cmd.app, name="cluster")
app.add_typer(data_cmd.app, name="data")
app.command("doctor")(doctor_cmd.doctor)
app.command("plan")(plan_cmd.plan)
app.command("simulate")(simulate_cmd.simulate)
app.add_typer(node_cmd.app, name="node")
app.add_typer(supervise_cmd.app, name="supervise")
app.add_typer(telemetry_cmd.app, name="telemetry")
app.add_typer(infra_cmd.app, name="infra")
app.add_typer(dashboards_cmd.app, name="dashboards")
app.add_typer(runbook_cmd.app, name="runbook")
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(rollout_cmd.app, name="rollout")


@app.command()
def quickstart(
    cluster: ClusterOpt = None,
    steps: Annotated[int, typer.Option("--steps", min=10, max=100_000, help="Training steps.")] = 300,
    fault: Annotated[bool, typer.Option("--fault/--no-fault", help="Inject one real worker kill.")] = True,
    keep_cluster: Annotated[bool, typer.Option("--keep-cluster", help="Leave the Ray cluster running.")] = False,
) -> None:
    """Run the whole life on the embedded default: cluster, data, training with a fault, summary."""
    from controlplane import quickstart as qs
    from controlplane.context import Context

    q = qs.Quickstart(Context.load(cluster), steps=steps, inject_fault=fault, keep_cluster=keep_cluster)
    raise typer.Exit(qs.run(q, lambda line: err.print(line, markup=False, highlight=False)))


@app.command()
def version() -> None:
    """Print the llmctl version."""
    out.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
