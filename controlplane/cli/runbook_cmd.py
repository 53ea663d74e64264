"""`llmctl runbook`: the on-call runbooks, one per alert rule. Reads files only (no Ray, no torch)."""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.cli.common import JsonOpt, emit_json, out

app = typer.Typer(help="On-call runbooks, one per alert.", no_args_is_help=True)


@app.command("list")
def list_cmd(json_: JsonOpt = False) -> None:
    """List the alerts with their severity and runbook."""
    from controlplane.observability.runbooks import load_alerts, read_runbook, runbook_names, title_of

    names = set(runbook_names())
    rows = [
        {
            "alert": a.name,
            "severity": a.severity,
            "group": a.group,
            "runbook": a.name if a.name in names else None,
            "title": title_of(read_runbook(a.name)) if a.name in names else "",
        }
        for a in load_alerts()
    ]
    if json_:
        emit_json(rows)
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("ALERT", "SEVERITY", "GROUP", "RUNBOOK"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["alert"], r["severity"], r["group"], r["title"] or "[red]missing[/red]")
    out.print(table)


@app.command()
def show(alert: Annotated[str, typer.Argument(help="Alert name, e.g. TrainingHang (case-insensitive).")]) -> None:
    """Print an alert's runbook (Markdown)."""
    from controlplane.observability.runbooks import read_runbook

    out.print(read_runbook(alert), markup=False, highlight=False)
