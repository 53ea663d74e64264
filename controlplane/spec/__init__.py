"""User-facing specs: ClusterSpec, RunSpec, RolloutSpec. YAML in, typed objects out.

Every spec derives from `StrictModel` (`extra="forbid"`). Files are parsed once at the CLI
edge by `load_spec`, which turns any problem into a one-line `ConfigurationError` naming
the field path; everything inward receives typed objects. Help text lives in
`Field(description=...)`, so `llmctl spec schema` and the docs come from these models.

Records read back from disk (the frozen spec in a run directory, the ledger) go through
`read_record`, which tolerates fields a newer writer added (strict write, lenient read).
"""

from __future__ import annotations

from typing import Any

from controlplane.spec.base import (  # noqa: F401
    MAX_SPEC_BYTES,
    MAX_SPEC_NODES,
    NAME_PATTERN,
    NonNegFloat,
    PositiveInt,
    StrictModel,
    check_run_id,
    dump_spec,
    format_validation_error,
    load_spec,
    parse_yaml,
    problem_lines,
    read_record,
    read_spec_text,
    validate,
)
from controlplane.spec.cluster import (  # noqa: F401
    AwsOptions,
    ClusterSpec,
    HelmChart,
    HelmCharts,
    KubernetesOptions,
    NetworkSpec,
    NodeGroup,
    RayOptions,
    StorageSpec,
)
from controlplane.spec.rollout import (  # noqa: F401
    DrillSpec,
    EvalFiles,
    EvalMinimums,
    RolloutSpec,
    ServeOptions,
)
from controlplane.spec.run import (  # noqa: F401
    PRESET_DEFAULT_VOCAB,
    PRESETS,
    CheckpointSpec,
    DataSpec,
    FaultInjection,
    FaultToleranceSpec,
    LlamaDims,
    MetricsSpec,
    ModelSpec,
    ParallelismSpec,
    PowerSpec,
    RunSpec,
    ScheduleSpec,
    TrainSpec,
    WorkersSpec,
    elastic_world,
    job_refusals,
)

SPEC_KINDS: dict[str, type[StrictModel]] = {"cluster": ClusterSpec, "run": RunSpec, "rollout": RolloutSpec}


def detect_kind(data: Any) -> type[StrictModel]:
    """Guess which spec a mapping is (for `spec validate` without --kind): the one kind whose
    fields hold every top-level key, else by its telltale keys, else a run spec."""
    if isinstance(data, dict):
        fitting = [m for m in SPEC_KINDS.values() if data and set(data) <= set(m.model_fields)]
        if len(fitting) == 1:
            return fitting[0]
        if "traffic_steps" in data or "min_eval" in data or ("model" in data and isinstance(data["model"], str)):
            return RolloutSpec
        if {"node_groups", "kind", "storage", "pue", "ray", "address"} & data.keys():
            return ClusterSpec
    return RunSpec


def _factory_defaults(model: type[StrictModel], schema: dict[str, Any]) -> None:
    """Fill `default` where a field's default comes from a factory (pydantic leaves it out),
    so the schema says what `spec show` resolves (train.max_steps 200, not null)."""
    for name, field in model.model_fields.items():
        prop = schema.get("properties", {}).get(name)
        if prop is not None and field.default_factory is not None and "default" not in prop:
            value = field.default_factory()
            prop["default"] = value.model_dump(mode="json") if isinstance(value, StrictModel) else value


def spec_json_schema(kind: str) -> dict[str, Any]:
    model = SPEC_KINDS[kind]
    schema = model.model_json_schema()
    _factory_defaults(model, schema)
    return schema
