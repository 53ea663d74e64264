"""`llmctl run export`: a verified checkpoint as a Hugging Face model directory (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.common import ClusterOpt, JsonOpt, RunArg, emit_json, out


def run_export(
    run: RunArg,
    step: Annotated[int | None, typer.Option("--step", help="Checkpoint step (default: newest verified).")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: <run>/artifacts/export-step_N).")
    ] = None,
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Export the newest (or a chosen) verified checkpoint for transformers and vLLM."""
    from controlplane.context import Context
    from controlplane.rollout.export import export_checkpoint
    from controlplane.rundir import RunDir

    ctx = Context.load(cluster)
    row = ctx.ledger.find_run(run)
    result = export_checkpoint(RunDir(Path(row["run_dir"])), step, out_dir)
    if json_:
        emit_json(result.to_dict())
        return
    verb = "up to date" if result.reused else "exported"
    out.print(f"{verb}: step {result.step} of {result.run_id} -> {result.model_dir} (version {result.version})")
