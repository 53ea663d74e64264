"""Pulumi components that declare llmctl's Kubernetes side. Each takes typed inputs (the spec,
the derived names, the stack's settings and secrets) and exposes its outputs as attributes.

The objects themselves come from `manifests` (pure); these classes only turn them into
resources, wire dependencies (CRDs before custom resources, Secrets before pods) and register
outputs. Children inherit the parent's provider, so the same classes serve an existing
cluster and a freshly made EKS one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import yaml

from controlplane.infra import addons
from controlplane.infra import manifests as m
from controlplane.infra.settings import InfraSecrets, InfraSettings
from controlplane.spec import ClusterSpec, HelmChart

PKG = "llmctl:infra"


def _meta(name: str, namespace: str | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**m.PART_OF, **(labels or {})}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _release(
    name: str, chart: HelmChart, namespace: str, values: dict[str, Any], opts: pulumi.ResourceOptions
) -> k8s.helm.v3.Release:
    return k8s.helm.v3.Release(
        name,
        name=name,
        chart=chart.chart,
        version=chart.version,
        repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=chart.repo),
        namespace=namespace,
        values=values,
        create_namespace=False,
        atomic=True,
        timeout=900,
        opts=opts,
    )


def _claim(name: str, namespace: str, size: str, mode: str, storage_class: str | None, opts) -> Any:
    spec: dict[str, Any] = {"accessModes": [mode], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return k8s.core.v1.PersistentVolumeClaim(name, metadata=_meta(name, namespace), spec=spec, opts=opts)


class Namespaces(pulumi.ComponentResource):
    """The four namespaces: training, serving, operators, monitoring."""

    def __init__(self, name: str, names: m.Names, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(f"{PKG}:Namespaces", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.by_name: dict[str, k8s.core.v1.Namespace] = {}
        for ns in (names.namespace, names.serving_namespace, names.system_namespace, names.monitoring_namespace):
            self.by_name[ns] = k8s.core.v1.Namespace(ns, metadata=_meta(ns), opts=child)
        self.register_outputs({"namespaces": list(self.by_name)})


class GpuOperator(pulumi.ComponentResource):
    """NVIDIA GPU operator: driver, toolkit, device plugin, feature discovery, DCGM exporter."""

    def __init__(self, name: str, spec: ClusterSpec, names: m.Names, opts: pulumi.ResourceOptions) -> None:
        super().__init__(f"{PKG}:GpuOperator", name, None, opts)
        chart = spec.kubernetes.charts.gpu_operator
        values = addons.gpu_operator_values(spec)
        self.release = _release(
            "gpu-operator", chart, names.system_namespace, values, pulumi.ResourceOptions(parent=self)
        )
        self.register_outputs({"release": self.release.name})


class SharedStorage(pulumi.ComponentResource):
    """The shared (ReadWriteMany, Lustre-class) claim for datasets, runs and checkpoints."""

    claim_name: pulumi.Output[str]

    def __init__(self, name: str, spec: ClusterSpec, names: m.Names, opts: pulumi.ResourceOptions) -> None:
        super().__init__(f"{PKG}:SharedStorage", name, None, opts)
        size = m.quantity_tib(spec.storage.size_tib)
        self.claim = _claim(
            names.shared_claim,
            names.namespace,
            size,
            "ReadWriteMany",
            spec.storage.storage_class,
            pulumi.ResourceOptions(parent=self),
        )
        self.claim_name = self.claim.id.apply(lambda _: f"{names.namespace}/{names.shared_claim}")
        self.register_outputs({"claim": self.claim_name, "size": size})


class RayPlatform(pulumi.ComponentResource):
    """KubeRay operator, the token Secret, the in-cluster spec, the RayCluster and its NetworkPolicies."""

    ray_address: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        spec: ClusterSpec,
        names: m.Names,
        secrets: InfraSecrets,
        storage: SharedStorage,
        opts: pulumi.ResourceOptions,
    ) -> None:
        super().__init__(f"{PKG}:RayPlatform", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        k = spec.kubernetes
        self.operator = _release(
            "kuberay-operator", k.charts.kuberay_operator, names.system_namespace, addons.kuberay_values(spec), child
        )
        self.token = k8s.core.v1.Secret(
            k.ray_auth_secret,
            metadata=_meta(k.ray_auth_secret, names.namespace),
            type="Opaque",
            string_data={"auth_token": secrets.ray_auth_token},
            opts=child,
        )
        self.spec_config = k8s.core.v1.ConfigMap(
            names.spec_configmap,
            metadata=_meta(names.spec_configmap, names.namespace),
            data={"cluster.yaml": yaml.safe_dump(m.in_cluster_spec(spec, names), sort_keys=False)},
            opts=child,
        )
        self.policies = [
            k8s.networking.v1.NetworkPolicy(f"{ns}-{pname}", metadata=_meta(pname, ns), spec=body, opts=child)
            for pname, ns, body in m.network_policies(spec, names)
            if ns == names.namespace
        ]
        self.cluster = k8s.apiextensions.CustomResource(
            names.cluster,
            api_version="ray.io/v1",
            kind="RayCluster",
            metadata=_meta(names.cluster, names.namespace),
            spec=m.ray_cluster_spec(spec, names),
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[self.operator, self.token, self.spec_config, storage, *self.policies]
            ),
        )
        self.ray_address = self.cluster.id.apply(lambda _: names.ray_address)
        self.register_outputs({"ray_address": self.ray_address})


class Monitoring(pulumi.ComponentResource):
    """kube-prometheus-stack with Grafana dashboards and alert rules from the dashboards directory, and Ray scraping."""

    grafana_url: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        spec: ClusterSpec,
        names: m.Names,
        settings: InfraSettings,
        secrets: InfraSecrets,
        dashboards_dir: Path | None,
        opts: pulumi.ResourceOptions,
    ) -> None:
        super().__init__(f"{PKG}:Monitoring", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        k = spec.kubernetes
        ns = names.monitoring_namespace
        self.admin = k8s.core.v1.Secret(
            k.grafana_admin_secret,
            metadata=_meta(k.grafana_admin_secret, ns),
            type="Opaque",
            string_data={"admin-user": "admin", "admin-password": secrets.grafana_admin_password},
            opts=child,
        )
        self.dashboards = [
            k8s.core.v1.ConfigMap(
                cm_name,
                metadata=_meta(cm_name, ns, {addons.DASHBOARD_LABEL: "1"}),
                data={file_name: text},
                opts=child,
            )
            for cm_name, file_name, text in addons.dashboard_files(dashboards_dir)
        ]
        self.release = _release(
            names.monitoring_release,
            k.charts.kube_prometheus_stack,
            ns,
            addons.monitoring_values(spec, names, settings),
            pulumi.ResourceOptions(parent=self, depends_on=[self.admin]),
        )
        self.ray_monitor = k8s.apiextensions.CustomResource(
            "ray-pods",
            api_version="monitoring.coreos.com/v1",
            kind="PodMonitor",
            metadata=_meta("ray-pods", ns),
            spec=addons.ray_pod_monitor(names),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.release]),
        )
        rules = addons.alert_rules(dashboards_dir, settings.runbook_base_url)
        self.alerts = (
            k8s.apiextensions.CustomResource(
                "llmctl-alerts",
                api_version="monitoring.coreos.com/v1",
                kind="PrometheusRule",
                metadata=_meta("llmctl-alerts", ns),
                spec=rules,
                opts=pulumi.ResourceOptions(parent=self, depends_on=[self.release]),  # the chart brings the CRD
            )
            if rules
            else None
        )
        self.grafana_url = self.release.id.apply(lambda _: names.grafana_url)
        self.register_outputs({"grafana_url": self.grafana_url, "dashboards": len(self.dashboards)})


class Supervisor(pulumi.ComponentResource):
    """The llmctl supervisor: one replica, its SQLite ledger on its own volume (or the spec's ledger_url)."""

    def __init__(
        self,
        name: str,
        spec: ClusterSpec,
        names: m.Names,
        settings: InfraSettings,
        ray: RayPlatform,
        opts: pulumi.ResourceOptions,
    ) -> None:
        super().__init__(f"{PKG}:Supervisor", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        k = spec.kubernetes
        volumes: list[dict[str, Any]] = [
            {"name": "shared", "persistentVolumeClaim": {"claimName": names.shared_claim}},
            {"name": "cluster-spec", "configMap": {"name": names.spec_configmap}},
            {"name": "tmp", "emptyDir": {}},  # the root file system is read-only
        ]
        mounts: list[dict[str, Any]] = [
            {"name": "shared", "mountPath": spec.storage.root},
            {"name": "cluster-spec", "mountPath": m.IN_CLUSTER_SPEC_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ]
        depends: list[pulumi.Resource] = [ray]
        if not spec.ledger_url:
            self.ledger = _claim(
                names.ledger_claim,
                names.namespace,
                settings.ledger_volume_size,
                "ReadWriteOnce",
                settings.ledger_storage_class,
                child,
            )
            volumes.append({"name": "ledger", "persistentVolumeClaim": {"claimName": names.ledger_claim}})
            mounts.append({"name": "ledger", "mountPath": m.LEDGER_DIR})
            depends.append(self.ledger)
        labels = {**m.PART_OF, "app.kubernetes.io/name": names.supervisor}
        self.deployment = k8s.apps.v1.Deployment(
            names.supervisor,
            metadata=_meta(names.supervisor, names.namespace),
            spec={
                "replicas": 1,
                "strategy": {"type": "Recreate"},  # one writer of the ledger, ever
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                        "containers": [
                            {
                                "name": "supervisor",
                                "image": k.supervisor_image,
                                "command": list(k.supervisor_command),
                                "env": [*m.ray_env(spec), {"name": "HOME", "value": "/tmp"}],
                                "volumeMounts": mounts,
                                "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
                                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
                            }
                        ],
                        "volumes": volumes,
                    },
                },
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends),
        )
        self.register_outputs({"deployment": self.deployment.id})


class ServingPool(pulumi.ComponentResource):
    """The serving namespace's pool: a one-GPU pod template per 'serve' group, a models volume, GPU limits."""

    def __init__(
        self,
        name: str,
        spec: ClusterSpec,
        names: m.Names,
        settings: InfraSettings,
        opts: pulumi.ResourceOptions,
    ) -> None:
        super().__init__(f"{PKG}:ServingPool", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        ns = names.serving_namespace
        groups = [g for g in spec.node_groups if g.role == "serve"]
        self.models = _claim(
            names.models_claim, ns, settings.models_volume_size, "ReadWriteMany", spec.storage.storage_class, child
        )
        self.limits = k8s.core.v1.LimitRange(
            "one-gpu-per-container",
            metadata=_meta("one-gpu-per-container", ns),
            spec={"limits": [{"type": "Container", "max": {m.GPU_RESOURCE: "1"}}]},
            opts=child,
        )
        total = sum(g.total_gpus for g in groups)
        self.quota = k8s.core.v1.ResourceQuota(
            "serving-gpus",
            metadata=_meta("serving-gpus", ns),
            spec={"hard": {f"requests.{m.GPU_RESOURCE}": str(total)}},
            opts=child,
        )
        self.policies = [
            k8s.networking.v1.NetworkPolicy(f"{pns}-{pname}", metadata=_meta(pname, pns), spec=body, opts=child)
            for pname, pns, body in m.network_policies(spec, names)
            if pns == ns
        ]
        self.templates = [
            k8s.core.v1.PodTemplate(
                f"{names.serve_template}-{g.name}",
                metadata=_meta(f"{names.serve_template}-{g.name}", ns),
                template=m.serve_pod_template(spec, names, g),
                opts=child,
            )
            for g in groups
        ]
        self.register_outputs({"serving_gpus": total, "namespace": ns})
