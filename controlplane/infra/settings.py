"""The stack's own knobs: sizes (`InfraSettings`, plain stack config) and secrets (`InfraSecrets`).

What the cluster IS comes from the `ClusterSpec` file the stack names (`llmctl:clusterSpec`);
what only this deployment needs to know (volume sizes, retention) is stack config; secrets
come only from Pulumi secret config and travel as secret `Output`s, never as plain strings.

Stack config keys (namespace `llmctl`) are the camelCase field names below, e.g.
`pulumi config set llmctl:prometheusStorageSize 1Ti`; the secrets are
`pulumi config set --secret llmctl:rayAuthToken ...` and `llmctl:grafanaAdminPassword`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

from controlplane.spec import StrictModel

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d|w|y)$")
CONFIG_NAMESPACE = "llmctl"
SECRET_KEYS = ("rayAuthToken", "grafanaAdminPassword")


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 20Gi")
    return value


def _duration(value: str) -> str:
    if not _DURATION.match(value):
        raise ValueError(f"{value!r} is not a Prometheus duration such as 30d")
    return value


Quantity = Annotated[str, AfterValidator(_quantity)]


class InfraSettings(StrictModel):
    """Plain (non-secret) stack config of the `llmctl` namespace."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    cluster_spec: str | None = Field(
        None, description="Path of the ClusterSpec YAML, relative to the Pulumi project directory."
    )
    dashboards_dir: str | None = Field(
        None,
        description="Directory whose *.json files become Grafana dashboards; null: ../dashboards next to the project.",
    )
    runbook_base_url: str | None = Field(
        None,
        description="URL the alert rules' relative runbook_url paths are joined to (e.g. the repository's "
        "web view); null: left relative.",
    )
    ledger_volume_size: Quantity = Field("20Gi", description="Volume holding the supervisor's SQLite ledger.")
    ledger_storage_class: str | None = Field(
        None, description="StorageClass of the ledger volume (block storage; SQLite wants local locking semantics)."
    )
    models_volume_size: Quantity = Field("2Ti", description="Shared volume holding exported models for serving.")
    prometheus_storage_size: Quantity = Field("500Gi", description="Prometheus TSDB volume.")
    prometheus_retention: Annotated[str, AfterValidator(_duration)] = Field(
        "45d", description="How long Prometheus keeps samples (a month-long run and then some)."
    )
    grafana_storage_size: Quantity = Field("10Gi", description="Grafana's own volume.")
    monitoring_storage_class: str | None = Field(
        None, description="StorageClass of the Prometheus and Grafana volumes; null: the cluster default."
    )


@dataclass(frozen=True)
class InfraSecrets:
    """Secret inputs, as `pulumi.Output`s marked secret (or plain placeholders in a render)."""

    ray_auth_token: Any
    grafana_admin_password: Any


def settings_from_config(values: dict[str, str | None]) -> InfraSettings:
    """Build settings from raw config values keyed by camelCase name (None: unset)."""
    from controlplane.spec import validate

    return validate(InfraSettings, {k: v for k, v in values.items() if v is not None}, "stack config llmctl:*")


def config_keys() -> list[str]:
    return [field.alias or name for name, field in InfraSettings.model_fields.items()]
