"""`llmctl spec`: schema, validate, show."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.common import JsonOpt, emit_json, out
from controlplane.errors import ConfigurationError
from controlplane.spec import SPEC_KINDS, ClusterSpec, RunSpec, detect_kind, parse_yaml, spec_json_schema, validate

app = typer.Typer(help="Inspect and check spec files (cluster, run, rollout).", no_args_is_help=True)

KindOpt = Annotated[str | None, typer.Option("--kind", "-k", help="cluster | run | rollout (default: guessed).")]


def _load(path: Path, kind: str | None):
    if kind is not None and kind not in SPEC_KINDS:
        raise ConfigurationError(f"--kind: expected one of {', '.join(SPEC_KINDS)}, got {kind!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError, OSError) as exc:
        raise ConfigurationError(f"{path}: cannot read as UTF-8 text ({type(exc).__name__})") from None
    data = parse_yaml(text, str(path))
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
    spec = _load(file, kind)
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
        out.print(f"# parameters: {p:,} ({p / 1e9:.2f}B)")
