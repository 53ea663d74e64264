"""`llmctl run export`: a verified checkpoint as a Hugging Face model directory (torch-free).

The exported config is then checked against what the serving engine accepts
(controlplane/rollout/engine_check.py): a model vLLM cannot load is refused in one line,
exit 2, before any rollout starts.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.common import ClusterOpt, JsonOpt, RunArg, emit_json, out


class Engine(StrEnum):
    auto = "auto"
    vllm = "vllm"
    transformers = "transformers"


def run_export(
    run: RunArg,
    step: Annotated[int | None, typer.Option("--step", help="Checkpoint step (default: newest verified).")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: <run>/artifacts/export-step_N).")
    ] = None,
    engine: Annotated[
        Engine,
        typer.Option("--engine", help="The engine it will be served with: its limits are checked (auto means vLLM)."),
    ] = Engine.auto,
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Export the newest (or a chosen) verified checkpoint for vLLM (and transformers)."""
    from controlplane.context import Context
    from controlplane.rollout.engine_check import check_model_dir
    from controlplane.rollout.export import export_checkpoint
    from controlplane.rundir import RunDir

    ctx = Context.load(cluster)
    row = ctx.ledger.find_run(run)
    result = export_checkpoint(RunDir(Path(row["run_dir"])), step, out_dir)
    check_model_dir(result.model_dir, engine.value)  # one line and exit 2 if the engine cannot load it
    if json_:
        emit_json(result.to_dict())
        return
    verb = "up to date" if result.reused else "exported"
    out.print(f"{verb}: step {result.step} of {result.run_id} -> {result.model_dir} (version {result.version})")
