"""The strict base of every user spec, and loading: YAML in, one-line errors, lenient reads."""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controlplane.errors import ConfigurationError

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$"
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000

PositiveInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class StrictModel(BaseModel):
    """Base of every user-facing spec: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


def _expanded_size(obj: Any, memo: dict[int, int]) -> int:
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, dict):
        size = 1 + sum(_expanded_size(v, memo) for v in obj.values()) + len(obj)
    elif isinstance(obj, list):
        size = 1 + sum(_expanded_size(v, memo) for v in obj)
    else:
        size = 1
    memo[key] = size
    return size


def parse_yaml(text: str, source: str = "<spec>") -> Any:
    """Safe YAML with size and alias-expansion bounds (a YAML bomb fails fast)."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise ConfigurationError(f"{source}: larger than {MAX_SPEC_BYTES} bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigurationError(f"{source}: not valid YAML{where}: {problem}") from None
    if _expanded_size(data, {}) > MAX_SPEC_NODES:
        raise ConfigurationError(f"{source}: expands to more than {MAX_SPEC_NODES} nodes (a YAML alias bomb?)")
    return data


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that holds `loc`'s last key ([] when the path leaves models)."""
    current: Any = model
    for key in loc[:-1]:
        field = current.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return list(current.model_fields)


def problem_lines(exc: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One line per problem: `field.path: what is wrong` (an unknown key gets a "did you mean")."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            known = _fields_at(model, tuple(err["loc"])) if model is not None else []
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        lines.append(f"{path}: {msg}")
    return lines


def format_validation_error(exc: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    parts = problem_lines(exc, model)
    more = f" (and {len(parts) - 1} more: `llmctl spec validate` lists them)" if len(parts) > 1 else ""
    return f"{source}: {parts[0]}{more}" if parts else f"{source}: invalid"


def validate(model: type[M], data: Any, source: str = "<spec>") -> M:
    if data is None:
        raise ConfigurationError(
            f"{source}: empty (no settings, only comments or nothing): expected a mapping of fields"
        )
    if not isinstance(data, dict):
        raise ConfigurationError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [f"{source}: {line}" for line in problem_lines(exc, model)]
        raise ConfigurationError(format_validation_error(exc, source, model), problems) from None


def read_spec_text(path: str | Path) -> str:
    """A spec file's text; a missing, unreadable or non-UTF-8 file is a one-line ConfigurationError."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ConfigurationError(f"{p}: is a directory, expected a YAML file") from None
    except OSError as exc:
        raise ConfigurationError(f"{p}: cannot read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{p}: not UTF-8 text") from None


def load_spec(model: type[M], path: str | Path) -> M:
    """Read and validate one spec file; every problem is a one-line ConfigurationError."""
    return validate(model, parse_yaml(read_spec_text(path), str(path)), str(path))


def _prune(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            value = _prune(ann, value)
        out[key] = value
    return out


def read_record(model: type[M], data: dict[str, Any] | str) -> M:
    """Lenient read of a spec we wrote earlier: fields a newer writer added are dropped."""
    if isinstance(data, str):
        data = json.loads(data)
    return model.model_validate(_prune(model, data))


def dump_spec(spec: BaseModel) -> dict[str, Any]:
    return spec.model_dump(mode="json")


_RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,80}$")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise ConfigurationError(f"run id {run_id!r}: expected lowercase letters, digits and '-'")
    return run_id
