"""The `llmctl` command: one typer app, one module per command group.

Group modules import nothing heavy at module level (no Ray, no torch): read-only commands
such as `run list` must answer from the ledger alone.
"""

from __future__ import annotations

import typer

from controlplane import __version__
from controlplane.cli import eval_cmd, rollout_cmd, run_cmd, spec_cmd
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
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(rollout_cmd.app, name="rollout")


@app.command()
def version() -> None:
    """Print the llmctl version."""
    out.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
