"""The Pulumi program: a `ClusterSpec` in, llmctl's cluster declared, its addresses out.

`build` takes typed inputs and is what the tests, `llmctl infra render` (under mocks) and the
Automation API (as an inline program) run. `main` is what `infra/__main__.py` runs under the
Pulumi CLI: it reads the spec path, sizes and secrets from the stack config, then calls `build`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi

from controlplane.infra import addons
from controlplane.infra import manifests as m
from controlplane.infra.components import (
    GpuOperator,
    Monitoring,
    Namespaces,
    RayPlatform,
    ServingPool,
    SharedStorage,
    Supervisor,
)
from controlplane.infra.settings import CONFIG_NAMESPACE, InfraSecrets, InfraSettings, config_keys, settings_from_config
from controlplane.spec import ClusterSpec, load_spec


@dataclass
class InfraOutputs:
    """What a stack exports (the same names as `pulumi stack output`)."""

    ray_address: pulumi.Output[str]
    grafana_url: pulumi.Output[str]
    storage_claim: pulumi.Output[str]
    serving_namespace: str
    kubeconfig: pulumi.Output[str] | None = None

    def export(self) -> None:
        pulumi.export("ray_address", self.ray_address)
        pulumi.export("grafana_url", self.grafana_url)
        pulumi.export("storage_claim", self.storage_claim)
        pulumi.export("serving_namespace", self.serving_namespace)
        if self.kubeconfig is not None:
            pulumi.export("kubeconfig", pulumi.Output.secret(self.kubeconfig))


def build(
    spec: ClusterSpec,
    settings: InfraSettings,
    secrets: InfraSecrets,
    dashboards_dir: Path | None,
) -> InfraOutputs:
    """Declare everything for `spec`. Raises ConfigurationError before declaring anything if the spec does not fit."""
    m.check_spec(spec)
    addons.dashboard_files(dashboards_dir)  # fail on a bad dashboard or rule file before any resource exists
    addons.alert_rules(dashboards_dir)
    names = m.Names.of(spec)
    providers: list[pulumi.ProviderResource] = []
    kubeconfig = None
    if spec.kubernetes.cloud == "aws":
        from controlplane.infra.eks import EksCluster

        eks = EksCluster(spec.name, spec)
        providers.append(eks.provider)
        kubeconfig = eks.kubeconfig
    elif spec.kubernetes.context:
        import pulumi_kubernetes as k8s

        providers.append(k8s.Provider("kubernetes", context=spec.kubernetes.context))

    def opts(*deps: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(providers=providers, depends_on=list(deps))

    namespaces = Namespaces("namespaces", names, opts())
    storage = SharedStorage("storage", spec, names, opts(namespaces))
    monitoring = Monitoring("monitoring", spec, names, settings, secrets, dashboards_dir, opts(namespaces))
    gpu = GpuOperator("gpu-operator", spec, names, opts(namespaces, monitoring))  # its ServiceMonitor needs the CRDs
    ray = RayPlatform("ray", spec, names, secrets, storage, opts(namespaces, gpu))
    Supervisor("supervisor", spec, names, settings, ray, opts(namespaces))
    ServingPool("serving", spec, names, settings, opts(namespaces, gpu))
    return InfraOutputs(
        ray_address=ray.ray_address,
        grafana_url=monitoring.grafana_url,
        storage_claim=storage.claim_name,
        serving_namespace=names.serving_namespace,
        kubeconfig=kubeconfig,
    )


def settings_from_stack() -> InfraSettings:
    cfg = pulumi.Config(CONFIG_NAMESPACE)
    return settings_from_config({key: cfg.get(key) for key in config_keys()})


def secrets_from_stack() -> InfraSecrets:
    cfg = pulumi.Config(CONFIG_NAMESPACE)
    return InfraSecrets(
        ray_auth_token=cfg.require_secret("rayAuthToken"),
        grafana_admin_password=cfg.require_secret("grafanaAdminPassword"),
    )


def resolve_paths(settings: InfraSettings, base: Path) -> tuple[Path, Path]:
    """(spec file, dashboards dir) from the settings, relative paths taken from `base` (the project directory)."""
    spec_path = settings.cluster_spec or os.environ.get("LLMCTL_CLUSTER")
    if not spec_path:
        from controlplane.errors import ConfigurationError

        raise ConfigurationError(
            "stack config llmctl:clusterSpec: not set (the ClusterSpec YAML this stack provisions)"
        )
    dashboards = Path(settings.dashboards_dir) if settings.dashboards_dir else base.parent / "dashboards"
    return base / Path(spec_path).expanduser(), base / dashboards


def main(spec: ClusterSpec | None = None, dashboards_dir: Path | None = None) -> InfraOutputs:
    """Entry point under the Pulumi engine. With no `spec`, the spec and dashboards come from the stack config
    (paths relative to the project directory, the engine's working directory)."""
    settings = settings_from_stack()
    if spec is None:
        spec_path, dashboards_dir = resolve_paths(settings, Path.cwd())
        spec = load_spec(ClusterSpec, spec_path)
    outputs = build(spec, settings, secrets_from_stack(), dashboards_dir)
    outputs.export()
    return outputs
