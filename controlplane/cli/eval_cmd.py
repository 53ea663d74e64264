"""`llmctl eval MODEL`: held-out perplexity and JGLUE few-shot scores, recorded in the ledger.

The evaluation itself runs as `python -m jobs.evaluate` (the control plane never imports
jobs/); this command records the JSON it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, out


class _OneCommandGroup(TyperGroup):
    """`llmctl eval MODEL [OPTIONS]`: a group with no subcommands whose options may follow MODEL."""

    allow_interspersed_args = True

    def collect_usage_pieces(self, ctx):  # no "COMMAND [ARGS]...": there are no subcommands
        return [p for p in super().collect_usage_pieces(ctx) if p != self.subcommand_metavar]


app = typer.Typer(cls=_OneCommandGroup, help="Evaluate a model: held-out perplexity, JCommonsenseQA, JSQuAD.")


@app.callback(invoke_without_command=True)
def evaluate(
    model: Annotated[str, typer.Argument(help="Model directory, or RUN_ID\\[@STEP] (exported first).")],
    run: Annotated[str | None, typer.Option("--run", help="Run whose held-out split is used.")] = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Comma-separated: heldout,jcommonsenseqa,jsquad (default: all).")
    ] = None,
    jcommonsenseqa: Annotated[
        Path | None, typer.Option("--jcommonsenseqa", help="JCommonsenseQA file (default: bundled sample).")
    ] = None,
    jcommonsenseqa_train: Annotated[
        Path | None, typer.Option("--jcommonsenseqa-train", help="File the shots come from.")
    ] = None,
    jsquad: Annotated[Path | None, typer.Option("--jsquad", help="JSQuAD file (default: bundled sample).")] = None,
    jsquad_train: Annotated[Path | None, typer.Option("--jsquad-train", help="File the shots come from.")] = None,
    k_jcqa: Annotated[int, typer.Option("--jcommonsenseqa-k", min=0, help="JCommonsenseQA shots.")] = 3,
    k_jsquad: Annotated[int, typer.Option("--jsquad-k", min=0, help="JSQuAD shots.")] = 2,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate the first N items only.")] = None,
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Evaluate MODEL and record the scores."""
    from controlplane.context import Context
    from controlplane.rollout.evaluation import EvalRequest
    from controlplane.rollout.evaluation import evaluate as run_eval

    ctx = Context.load(cluster)
    req = EvalRequest(
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        jcommonsenseqa=str(jcommonsenseqa) if jcommonsenseqa else None,
        jcommonsenseqa_train=str(jcommonsenseqa_train) if jcommonsenseqa_train else None,
        jcommonsenseqa_k=k_jcqa,
        jsquad=str(jsquad) if jsquad else None,
        jsquad_train=str(jsquad_train) if jsquad_train else None,
        jsquad_k=k_jsquad,
        limit=limit,
    )
    row = run_eval(ctx, model, run, req)
    if json_:
        emit_json({k: v for k, v in row.items() if k != "detail"})
        return
    out.print(f"evaluation {row['id']} of {row['model_dir']}")
    for key, value in row["scores"].items():
        out.print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
