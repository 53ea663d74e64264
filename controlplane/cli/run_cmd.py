"""`llmctl run`: submit, watch and inspect training runs.

`list`, `status`, `events` and `logs` read the ledger and the run directory only: they import
neither Ray nor torch.
"""

from __future__ import annotations

import typer

from controlplane.cli.export_cmd import run_export

app = typer.Typer(help="Submit, watch and inspect training runs.", no_args_is_help=True)

# Verbs defined in other modules are attached here, one line each:
app.command("export")(run_export)
