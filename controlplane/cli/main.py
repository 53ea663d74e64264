"""The `llmctl` command: one typer app, one module per command group.

Group modules import nothing heavy at module level (no Ray, no torch): read-only commands
such as `run list` must answer from the ledger alone.
"""

from __future__ import annotations

import typer

from controlplane import __version__
from controlplane.cli import dashboards_cmd, run_cmd, runbook_cmd, spec_cmd, telemetry_cmd
from controlplane.cli.common import LlmctlGroup, out

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
app.add_typer(telemetry_cmd.app, name="telemetry")
app.add_typer(dashboards_cmd.app, name="dashboards")
app.add_typer(runbook_cmd.app, name="runbook")


@app.command()
def version() -> None:
    """Print the llmctl version."""
    out.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
