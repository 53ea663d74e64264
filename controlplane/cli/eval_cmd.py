"""`llmctl eval MODEL`: held-out perplexity and JGLUE few-shot scores, recorded in the ledger.

The evaluation itself runs as `python -m jobs.evaluate` (the control plane never imports
jobs/); this command records the JSON it writes.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, out
from controlplane.spec.rollout import DEFAULT_PROMPT_VERSION

PromptVersionOpt = Enum("PromptVersionOpt", {"v0_2": "0.2", "v0_3": "0.3"}, type=str)
EngineOpt = Enum("EngineOpt", {name: name for name in ("auto", "transformers", "vllm")}, type=str)


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
        Path | None,
        typer.Option("--jcommonsenseqa", help="JCommonsenseQA file scored, JGLUE valid-v1.1.json (default: sample)."),
    ] = None,
    jcommonsenseqa_train: Annotated[
        Path | None,
        typer.Option("--jcommonsenseqa-train", help="JGLUE train-v1.1.json the examples are drawn from."),
    ] = None,
    jsquad: Annotated[
        Path | None, typer.Option("--jsquad", help="JSQuAD file scored, JGLUE valid-v1.1.json (default: sample).")
    ] = None,
    jsquad_train: Annotated[
        Path | None, typer.Option("--jsquad-train", help="JGLUE train-v1.1.json the examples are drawn from.")
    ] = None,
    k_jcqa: Annotated[int, typer.Option("--jcommonsenseqa-k", min=0, max=16, help="JCommonsenseQA shots.")] = 3,
    k_jsquad: Annotated[int, typer.Option("--jsquad-k", min=0, max=16, help="JSQuAD shots.")] = 2,
    prompt_version: Annotated[
        PromptVersionOpt, typer.Option("--prompt-version", help="Harness prompt version (jsquad-1.1-V, ...).")
    ] = PromptVersionOpt(DEFAULT_PROMPT_VERSION),
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the shuffle and the example draw.")] = 42,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Evaluate N questions (the first N after the seeded shuffle).")
    ] = None,
    engine: Annotated[
        EngineOpt, typer.Option("--engine", help="auto: vLLM when it and a GPU are present, else transformers.")
    ] = EngineOpt.auto,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds the evaluation job may take.")] = 7200.0,
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
        prompt_version=prompt_version.value,
        seed=seed,
        limit=limit,
        engine=engine.value,
        timeout_s=timeout,
    )
    row = run_eval(ctx, model, run, req)
    if json_:
        emit_json({k: v for k, v in row.items() if k != "detail"})
        return
    detail = row.get("detail") or {}
    out.print(f"evaluation {row['id']} of {row['model_dir']}")
    out.print(f"  engine {detail.get('engine')}, dtype {detail.get('dtype')}, context {detail.get('max_len')} tokens")
    for task in ("jcommonsenseqa", "jsquad"):
        if d := detail.get(task):
            train = f"train {d['train_size']}" if d.get("train_size") is not None else "no train split"
            out.print(
                f"  {d['task_version']}: {d['k']}-shot, seed {d['seed']}, valid {d['valid_size']}, {train}, "
                f"scored {row['scores'].get(task + '_n')}"
            )
    for note in detail.get("notes", []):
        out.print(f"  note: {note}")
    for key, value in row["scores"].items():
        out.print(f"  {key:28s} {value:.2f}" if isinstance(value, float) else f"  {key:28s} {value}")
