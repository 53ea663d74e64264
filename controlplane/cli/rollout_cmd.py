"""`llmctl rollout`: placeholder replaced below."""

from __future__ import annotations

import typer

app = typer.Typer(help="Roll a model out to serving replicas.", no_args_is_help=True)
