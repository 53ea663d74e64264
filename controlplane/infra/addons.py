"""Helm values of the three charts infra/ installs, Grafana dashboards as ConfigMaps and the
alert rules as a PrometheusRule (pure; no Pulumi).

Every Service the charts create stays ClusterIP; Grafana's admin password is referenced
through `existingSecret`, never written into values; the GPU operator's daemons tolerate the
GPU taint so they land on the GPU nodes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from controlplane.errors import ConfigurationError
from controlplane.infra.manifests import Names, gpu_tolerations
from controlplane.spec import ClusterSpec

DASHBOARD_LABEL = "grafana_dashboard"
ALERTS_FILE = "alerts.yaml"  # Prometheus rule-file format, next to the dashboards
MAX_CONFIGMAP_BYTES = 900 * 1024  # the API server's object limit is 1 MiB, less metadata


def gpu_operator_values(spec: ClusterSpec) -> dict[str, Any]:
    tolerations = gpu_tolerations(spec)
    installed = spec.kubernetes.gpu_driver_installed
    return {
        "driver": {"enabled": not installed},
        "toolkit": {"enabled": not installed},
        "daemonsets": {"tolerations": tolerations},
        "node-feature-discovery": {"worker": {"tolerations": tolerations}},
        "dcgmExporter": {"serviceMonitor": {"enabled": True}},
    }


def kuberay_values(spec: ClusterSpec) -> dict[str, Any]:
    return {"watchNamespace": [spec.kubernetes.namespace], "singleNamespaceInstall": False}


def monitoring_values(spec: ClusterSpec, names: Names, settings: Any) -> dict[str, Any]:
    storage: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": settings.prometheus_storage_size}},
    }
    grafana_persistence: dict[str, Any] = {"enabled": True, "size": settings.grafana_storage_size}
    if settings.monitoring_storage_class:
        storage["storageClassName"] = settings.monitoring_storage_class
        grafana_persistence["storageClassName"] = settings.monitoring_storage_class
    return {
        "fullnameOverride": names.monitoring_release,
        "grafana": {
            "fullnameOverride": f"{names.monitoring_release}-grafana",
            "admin": {
                "existingSecret": spec.kubernetes.grafana_admin_secret,
                "userKey": "admin-user",
                "passwordKey": "admin-password",
            },
            "service": {"type": "ClusterIP"},
            "persistence": grafana_persistence,
            "sidecar": {"dashboards": {"enabled": True, "label": DASHBOARD_LABEL, "labelValue": "1"}},
        },
        "prometheus": {
            "service": {"type": "ClusterIP"},
            "prometheusSpec": {
                "retention": settings.prometheus_retention,
                "podMonitorSelectorNilUsesHelmValues": False,
                "serviceMonitorSelectorNilUsesHelmValues": False,
                "ruleSelectorNilUsesHelmValues": False,
                "storageSpec": {"volumeClaimTemplate": {"spec": storage}},
            },
        },
        "alertmanager": {"service": {"type": "ClusterIP"}},
    }


def ray_pod_monitor(names: Names) -> dict[str, Any]:
    return {
        "namespaceSelector": {"matchNames": [names.namespace]},
        "selector": {"matchLabels": {"ray.io/cluster": names.cluster}},
        "podMetricsEndpoints": [{"port": "metrics"}],
    }


# --------------------------------------------------------------------------- dashboards


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "dashboard"


def dashboard_files(directory: Any) -> list[tuple[str, str, str]]:
    """(ConfigMap name, file name, JSON text) for every `*.json` in `directory`, sorted; none if it is absent."""
    if directory is None or not Path(directory).is_dir():
        return []
    found = []
    for path in sorted(Path(directory).glob("*.json")):
        text = path.read_text(encoding="utf-8")
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
        if len(text.encode()) > MAX_CONFIGMAP_BYTES:
            raise ConfigurationError(f"{path}: larger than {MAX_CONFIGMAP_BYTES} bytes, too big for a ConfigMap")
        found.append((f"llmctl-dashboard-{_slug(path.stem)}"[:63].rstrip("-"), path.name, text))
    names = [n for n, _, _ in found]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{directory}: two dashboard files map to the same ConfigMap name")
    return found


# --------------------------------------------------------------------------- alert rules


def alert_rules(directory: Any, runbook_base_url: str | None = None) -> dict[str, Any] | None:
    """The PrometheusRule spec of `<directory>/alerts.yaml`, or None without one. Relative
    `runbook_url`s are joined to `runbook_base_url` when given (Alertmanager links need a URL)."""
    import yaml

    path = Path(directory) / ALERTS_FILE if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not groups:
        raise ConfigurationError(f"{path}: no rule groups (a Prometheus rule file starts with `groups:`)")
    for gi, group in enumerate(groups):
        rules = group.get("rules") if isinstance(group, dict) else None
        if not isinstance(group, dict) or not group.get("name") or not isinstance(rules, list):
            raise ConfigurationError(f"{path}: groups[{gi}] needs a name and a list of rules")
        for ri, rule in enumerate(rules):
            if not isinstance(rule, dict) or not (rule.get("alert") or rule.get("record")) or not rule.get("expr"):
                raise ConfigurationError(f"{path}: groups[{gi}].rules[{ri}] needs `alert` (or `record`) and `expr`")
            url = (rule.get("annotations") or {}).get("runbook_url")
            if runbook_base_url and url and "://" not in url:
                rule["annotations"]["runbook_url"] = f"{runbook_base_url.rstrip('/')}/{url.lstrip('/')}"
    if len(json.dumps(groups).encode()) > MAX_CONFIGMAP_BYTES:
        raise ConfigurationError(f"{path}: larger than {MAX_CONFIGMAP_BYTES} bytes, too big for one PrometheusRule")
    return {"groups": groups}
