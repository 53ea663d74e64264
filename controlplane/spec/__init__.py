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
    read_record,
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
    """Guess which spec a mapping is (for `spec validate` without --kind)."""
    if isinstance(data, dict):
        if "traffic_steps" in data or "min_eval" in data or ("model" in data and isinstance(data["model"], str)):
            return RolloutSpec
        if {"node_groups", "kind", "storage", "pue"} & data.keys():
            return ClusterSpec
    return RunSpec


def spec_json_schema(kind: str) -> dict[str, Any]:
    return SPEC_KINDS[kind].model_json_schema()
