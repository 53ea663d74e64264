"""Shared CLI plumbing: consoles, the error boundary, and output helpers.

Diagnostics go to stderr through `err`; results go to stdout through `out` (tables for
people) or `emit_json` (for scripts). A `UserError` anywhere below the top-level group
becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from controlplane.errors import UserError

# Piped or captured, a table is not cut to 80 columns (ids in it are copied into the next command).
_PIPE_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
out = Console(highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ClusterOpt = Annotated[
    str | None,
    typer.Option("--cluster", "-c", envvar="LLMCTL_CLUSTER", help="Cluster spec file (default: local Ray cluster)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
RunArg = Annotated[str, typer.Argument(help="Run id (or a unique prefix of one).")]


class LlmctlGroup(TyperGroup):
    """Top-level group: turns user errors into one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def human_params(n: float) -> str:
    """A parameter count in the unit that shows it: 13.02B, 624.96K (not 0.00B)."""
    for div, suffix in ((1e9, "B"), (1e6, "M")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n / 1e3:.2f}K"


def id_table(id_header: str, ids: list[str], *headers: str) -> Any:
    """A table whose first column holds ids shown whole (copied into the next command), however
    narrow the terminal: the other columns give way first."""
    from rich.table import Table

    table = Table()
    table.add_column(id_header, no_wrap=True, min_width=max([len(i) for i in ids] + [len(id_header)]))
    for h in headers:
        table.add_column(h)
    return table
