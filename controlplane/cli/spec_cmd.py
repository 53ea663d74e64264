"""`llmctl spec`: schema, validate, show."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.common import JsonOpt, emit_json, err, human_params, out
from controlplane.errors import ConfigurationError
from controlplane.spec import (
    SPEC_KINDS,
    ClusterSpec,
    RunSpec,
    detect_kind,
    parse_yaml,
    read_spec_text,
    spec_json_schema,
    validate,
)

app = typer.Typer(help="Inspect and check spec files (cluster, run, rollout).", no_args_is_help=True)

KindOpt = Annotated[str | None, typer.Option("--kind", "-k", help="cluster | run | rollout (default: guessed).")]


def _load(path: Path, kind: str | None):
    if kind is not None and kind not in SPEC_KINDS:
        raise ConfigurationError(f"--kind: expected one of {', '.join(SPEC_KINDS)}, got {kind!r}")
    data = parse_yaml(read_spec_text(path), str(path))
    model = SPEC_KINDS[kind] if kind else detect_kind(data)
    return validate(model, data, str(path))


@app.command()
def schema(kind: Annotated[str, typer.Argument(help="cluster | run | rollout")] = "run") -> None:
    """Print the JSON schema of a spec kind."""
    if kind not in SPEC_KINDS:
        raise ConfigurationError(f"kind: expected one of {', '.join(SPEC_KINDS)}, got {kind!r}")
    emit_json(spec_json_schema(kind))


@app.command("validate")
def validate_cmd(file: Path, kind: KindOpt = None) -> None:
    """Check a spec file; one line per problem, exit 2 if invalid."""
    try:
        spec = _load(file, kind)
    except ConfigurationError as exc:
        for line in exc.problems:
            err.print(f"error: {line}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    out.print(f"{file}: valid {type(spec).__name__}")


@app.command()
def show(file: Path, kind: KindOpt = None, json_: JsonOpt = False) -> None:
    """Print the resolved spec, with the model's parameter count for a run spec."""
    spec = _load(file, kind)
    data = spec.model_dump(mode="json")
    if isinstance(spec, RunSpec):
        dims = spec.model.resolve(max_seq_len=spec.train.seq_len)
        data["resolved"] = {
            "model": dims.model_dump(),
            "parameters": dims.param_count(),
            "steps": spec.train.steps,
            "tokens": spec.train.steps * spec.train.tokens_per_step,
        }
    elif isinstance(spec, ClusterSpec):
        data["resolved"] = {"train_gpus": spec.total_gpus}
    if json_:
        emit_json(data)
        return
    import yaml

    out.print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())
    if isinstance(spec, RunSpec):
        p = data["resolved"]["parameters"]
        out.print(f"# parameters: {p:,} ({human_params(p)})")
