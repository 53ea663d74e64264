"""Pure functions from a `ClusterSpec` to Kubernetes objects and Helm values.

Nothing here imports Pulumi or talks to a cluster: the components in `components.py` wrap
these dicts in resources, and the unit tests read them directly. Every GPU pod built here
tolerates the GPU taint and selects its GPU product; the Ray head is never on the host
network and its Service is ClusterIP; the token reaches pods only as a Secret reference.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from controlplane.errors import ConfigurationError
from controlplane.ray_settings import RAY_PROCESS_ENV
from controlplane.spec import ClusterSpec, NodeGroup

PART_OF = {"app.kubernetes.io/part-of": "llmctl"}
GROUP_LABEL = "llmctl.io/node-group"
GPU_RESOURCE = "nvidia.com/gpu"
IN_CLUSTER_SPEC_DIR = "/etc/llmctl"
IN_CLUSTER_SPEC = f"{IN_CLUSTER_SPEC_DIR}/cluster.yaml"
LEDGER_DIR = "/var/lib/llmctl"
MODELS_DIR = "/models"
PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}

# Values of the GPU product label (GPU feature discovery) for the models specs name.
GPU_PRODUCTS = {
    "A100-80GB": "NVIDIA-A100-SXM4-80GB",
    "A100-40GB": "NVIDIA-A100-SXM4-40GB",
    "H100-80GB": "NVIDIA-H100-80GB-HBM3",
    "H200": "NVIDIA-H200",
    "L40S": "NVIDIA-L40S",
    "L4": "NVIDIA-L4",
    "A10G": "NVIDIA-A10G",
}
# EC2 instance types by (GPU model, GPUs per node).
AWS_INSTANCES = {
    ("A100-80GB", 8): "p4de.24xlarge",
    ("A100-40GB", 8): "p4d.24xlarge",
    ("H100-80GB", 8): "p5.48xlarge",
    ("H200", 8): "p5en.48xlarge",
    ("L40S", 1): "g6e.xlarge",
    ("L40S", 8): "g6e.48xlarge",
    ("L4", 1): "g6.xlarge",
    ("L4", 8): "g6.48xlarge",
    ("A10G", 1): "g5.xlarge",
}


@dataclass(frozen=True)
class Names:
    """Every name infra/ gives an object, derived from the spec in one place."""

    cluster: str
    namespace: str
    serving_namespace: str
    system_namespace: str
    monitoring_namespace: str
    shared_claim: str = "llmctl-shared"
    models_claim: str = "llmctl-models"
    ledger_claim: str = "llmctl-ledger"
    spec_configmap: str = "llmctl-cluster"
    supervisor: str = "llmctl-supervisor"
    serve_template: str = "llmctl-serve"
    monitoring_release: str = "llmctl-monitoring"

    @classmethod
    def of(cls, spec: ClusterSpec) -> Names:
        k = spec.kubernetes
        return cls(spec.name, k.namespace, k.serving_namespace, k.system_namespace, k.monitoring_namespace)

    @property
    def head_service(self) -> str:
        return f"{self.cluster}-head-svc"  # KubeRay's name for the head Service

    @property
    def ray_address(self) -> str:
        return f"http://{self.head_service}.{self.namespace}.svc.cluster.local:{PORTS['dashboard']}"

    @property
    def grafana_url(self) -> str:
        return f"http://{self.monitoring_release}-grafana.{self.monitoring_namespace}.svc.cluster.local"


# --------------------------------------------------------------------------- checks and sizes


def check_spec(spec: ClusterSpec) -> None:
    """What infra/ needs of a spec beyond what the spec itself validates. One line per problem."""
    if spec.kind != "kubernetes":
        raise ConfigurationError(f"kind: infra/ provisions kind 'kubernetes', the spec says {spec.kind!r}")
    if not PurePosixPath(spec.storage.root).is_absolute():
        raise ConfigurationError(
            f"storage.root: {spec.storage.root!r} must be an absolute path on Kubernetes (the shared volume's mount)"
        )
    if not any(g.role == "train" for g in spec.node_groups):
        raise ConfigurationError("node_groups: no group with role 'train'")
    for i, g in enumerate(spec.node_groups):
        if g.role == "serve" and g.gpus_per_node == 0:
            raise ConfigurationError(f"node_groups.{i}.gpus_per_node: a 'serve' group needs GPUs (one per pod)")
        if g.gpus_per_node:
            gpu_product(g, i)
        if spec.kubernetes.cloud == "aws":
            instance_type(g, i)
    if spec.kubernetes.cloud == "aws" and not any(g.role == "system" for g in spec.node_groups):
        raise ConfigurationError(
            "node_groups: kubernetes.cloud 'aws' needs a 'system' group for operators and the head"
        )
    _check_distinct_selectors(spec)


def _check_distinct_selectors(spec: ClusterSpec) -> None:
    """Two GPU groups of different roles must not select the same nodes (serving pods on training nodes)."""
    seen: dict[str, tuple[int, NodeGroup]] = {}
    for i, g in enumerate(spec.node_groups):
        if not g.gpus_per_node:
            continue
        key = json.dumps(node_selector(spec, g), sort_keys=True)
        if key in seen and seen[key][1].role != g.role:
            j, other = seen[key]
            raise ConfigurationError(
                f"node_groups.{i}.node_labels: group {g.name!r} selects the same nodes as {other.name!r} "
                f"(node_groups.{j}); give them distinct node_labels"
            )
        seen.setdefault(key, (i, g))


def gpu_product(group: NodeGroup, index: int = 0) -> str:
    if group.gpu_product:
        return group.gpu_product
    product = GPU_PRODUCTS.get(group.gpu_model or "")
    if product is None:
        raise ConfigurationError(
            f"node_groups.{index}.gpu_product: unknown for gpu_model {group.gpu_model!r}; set it to the node "
            f"label's value (known models: {', '.join(GPU_PRODUCTS)})"
        )
    return product


def instance_type(group: NodeGroup, index: int = 0) -> str:
    if group.instance_type:
        return group.instance_type
    if not group.gpus_per_node:
        return "m6i.4xlarge" if group.role == "system" else "c6i.8xlarge"
    found = AWS_INSTANCES.get((group.gpu_model or "", group.gpus_per_node))
    if found is None:
        raise ConfigurationError(
            f"node_groups.{index}.instance_type: no known instance for {group.gpus_per_node} x {group.gpu_model}"
        )
    return found


def quantity_gib(gib: float) -> str:
    return f"{max(1, math.floor(gib))}Gi"


def quantity_tib(tib: float) -> str:
    return f"{int(tib)}Ti" if float(tib).is_integer() else f"{max(1, math.ceil(tib * 1024))}Gi"


def pod_share(group: NodeGroup, pods_per_node: int = 1) -> tuple[int, int]:
    """(CPUs, memory GiB) of one pod when `pods_per_node` pods share a node, less kubelet headroom."""
    cpus = group.cpus_per_node - max(1, math.ceil(group.cpus_per_node / 16))
    mem = math.floor(group.memory_gib * 0.85)
    return max(1, cpus // pods_per_node), max(1, mem // pods_per_node)


# --------------------------------------------------------------------------- pod building blocks


def node_selector(spec: ClusterSpec, group: NodeGroup | None) -> dict[str, str]:
    if group is None:
        return {}
    sel = dict(group.node_labels)
    if spec.kubernetes.cloud != "none":
        sel[GROUP_LABEL] = group.name  # infra/ labels cloud nodes itself
    if group.gpus_per_node:
        sel[spec.kubernetes.gpu_product_label] = gpu_product(group)
    return sel


def gpu_tolerations(spec: ClusterSpec) -> list[dict[str, str]]:
    return [{"key": spec.kubernetes.gpu_taint_key, "operator": "Exists", "effect": "NoSchedule"}]


def ray_env(spec: ClusterSpec) -> list[dict[str, Any]]:
    """Token auth on for every Ray process; the token only as a reference to its Secret."""
    return [
        *({"name": k, "value": v} for k, v in RAY_PROCESS_ENV.items()),
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": spec.kubernetes.ray_auth_secret, "key": "auth_token"}},
        },
        {"name": "LLMCTL_CLUSTER", "value": IN_CLUSTER_SPEC},
    ]


def _volumes(names: Names, shm_gib: int | None) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [
        {"name": "shared", "persistentVolumeClaim": {"claimName": names.shared_claim}},
        {"name": "cluster-spec", "configMap": {"name": names.spec_configmap}},
    ]
    if shm_gib:
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": quantity_gib(shm_gib)}})
    return vols


def _mounts(spec: ClusterSpec, shm: bool) -> list[dict[str, Any]]:
    mounts = [
        {"name": "shared", "mountPath": spec.storage.root},
        {"name": "cluster-spec", "mountPath": IN_CLUSTER_SPEC_DIR, "readOnly": True},
    ]
    if shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return mounts


def _shm_gib(spec: ClusterSpec, mem_gib: int) -> int:
    return spec.ray.shm_gib or max(1, mem_gib // 3)


def _ray_version(image: str) -> str | None:
    m = re.search(r":(\d+\.\d+\.\d+)", image)
    return m.group(1) if m else None


def head_group(spec: ClusterSpec, names: Names) -> dict[str, Any]:
    system = next((g for g in spec.node_groups if g.role == "system"), None)
    cpus, mem = spec.ray.head_cpus, spec.ray.head_memory_gib
    resources = {"cpu": str(cpus), "memory": quantity_gib(mem)}
    shm = _shm_gib(spec, mem)
    pod: dict[str, Any] = {
        "containers": [
            {
                "name": "ray-head",
                "image": spec.ray.image,
                "resources": {"requests": resources, "limits": resources},
                "ports": [{"name": n, "containerPort": p} for n, p in PORTS.items()],
                "env": ray_env(spec),
                "volumeMounts": _mounts(spec, shm=True),
            }
        ],
        "volumes": _volumes(names, shm),
        "automountServiceAccountToken": False,
    }
    if sel := node_selector(spec, system):
        pod["nodeSelector"] = sel
    return {
        "serviceType": "ClusterIP",
        # In-pod bind on all interfaces so the ClusterIP Service reaches it; NetworkPolicy and the token
        # keep it to the cluster's own pods. The head runs no tasks.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
        "template": {"metadata": {"labels": dict(PART_OF)}, "spec": pod},
    }


def worker_group(spec: ClusterSpec, names: Names, group: NodeGroup) -> dict[str, Any]:
    """One Ray worker pod per node: it takes all the node's GPUs."""
    cpus, mem = pod_share(group)
    resources: dict[str, str] = {"cpu": str(cpus), "memory": quantity_gib(mem)}
    net = spec.network
    if group.gpus_per_node:
        resources[GPU_RESOURCE] = str(group.gpus_per_node)
        if net.rdma:
            resources[net.rdma_resource] = str(net.rdma_devices_per_pod)
    shm = _shm_gib(spec, mem)
    env = ray_env(spec)
    container: dict[str, Any] = {
        "name": "ray-worker",
        "image": spec.ray.image,
        "resources": {"requests": resources, "limits": dict(resources)},
        "ports": [{"name": "metrics", "containerPort": PORTS["metrics"]}],
        "env": env,
        "volumeMounts": _mounts(spec, shm=True),
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": _volumes(names, shm),
        "automountServiceAccountToken": False,
    }
    if sel := node_selector(spec, group):
        pod["nodeSelector"] = sel
    if group.gpus_per_node:
        pod["tolerations"] = gpu_tolerations(spec)
        if net.rdma:
            env.extend([{"name": "NCCL_IB_DISABLE", "value": "0"}])
            env.extend({"name": k, "value": v} for k, v in sorted(net.nccl_env.items()))
            container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    if net.host_network:
        pod["hostNetwork"] = True
        pod["dnsPolicy"] = "ClusterFirstWithHostNet"
    replicas = group.node_count
    return {
        "groupName": group.name,
        "replicas": replicas,
        "minReplicas": group.min_nodes if group.min_nodes is not None else replicas,
        "maxReplicas": replicas,
        "rayStartParams": {"num-gpus": str(group.gpus_per_node)} if group.gpus_per_node else {},
        "template": {"metadata": {"labels": {**PART_OF, GROUP_LABEL: group.name}}, "spec": pod},
    }


def ray_cluster_spec(spec: ClusterSpec, names: Names) -> dict[str, Any]:
    body: dict[str, Any] = {
        "enableInTreeAutoscaling": False,
        "headGroupSpec": head_group(spec, names),
        "workerGroupSpecs": [worker_group(spec, names, g) for g in spec.node_groups if g.role == "train"],
    }
    if version := _ray_version(spec.ray.image):
        body["rayVersion"] = version
    return body


def serve_pod_template(spec: ClusterSpec, names: Names, group: NodeGroup) -> dict[str, Any]:
    """The pod every serving replica starts from: exactly one GPU, on the serving pool's nodes."""
    cpus, mem = pod_share(group, pods_per_node=group.gpus_per_node)
    resources = {"cpu": str(cpus), "memory": quantity_gib(mem), GPU_RESOURCE: "1"}
    return {
        "metadata": {"labels": {**PART_OF, "app.kubernetes.io/component": "serve", GROUP_LABEL: group.name}},
        "spec": {
            "nodeSelector": node_selector(spec, group),
            "tolerations": gpu_tolerations(spec),
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "serve",
                    "image": spec.kubernetes.supervisor_image,
                    "resources": {"requests": resources, "limits": dict(resources)},
                    "ports": [{"name": "http", "containerPort": spec.kubernetes.serve_port}],
                    "volumeMounts": [
                        {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
                        {"name": "dshm", "mountPath": "/dev/shm"},
                    ],
                    "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
                }
            ],
            "volumes": [
                {"name": "models", "persistentVolumeClaim": {"claimName": names.models_claim, "readOnly": True}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": quantity_gib(max(1, mem // 4))}},
            ],
        },
    }


# --------------------------------------------------------------------------- network policies


def network_policies(spec: ClusterSpec, names: Names) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, namespace, spec) of every NetworkPolicy. Ingress is denied unless a rule admits it."""
    ray_pods = {"matchLabels": {"ray.io/cluster": names.cluster}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": names.monitoring_namespace}}}
    same_namespace: list[dict[str, Any]] = [{"podSelector": {}}]
    if spec.network.host_network:
        # Host-network pods speak from node addresses, which no podSelector matches.
        same_namespace += [{"ipBlock": {"cidr": c}} for c in spec.network.node_cidrs]
    tcp = lambda port: {"protocol": "TCP", "port": port}  # noqa: E731
    return [
        ("default-deny-ingress", names.namespace, {"podSelector": {}, "policyTypes": ["Ingress"]}),
        (
            "ray-from-namespace",
            names.namespace,
            {"podSelector": ray_pods, "policyTypes": ["Ingress"], "ingress": [{"from": same_namespace}]},
        ),
        (
            "ray-metrics-from-monitoring",
            names.namespace,
            {
                "podSelector": ray_pods,
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [monitoring], "ports": [tcp(PORTS["metrics"])]}],
            },
        ),
        ("default-deny-ingress", names.serving_namespace, {"podSelector": {}, "policyTypes": ["Ingress"]}),
        (
            "serve-from-cluster",
            names.serving_namespace,
            {
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "serve"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [tcp(spec.kubernetes.serve_port)]}],
            },
        ),
    ]


# --------------------------------------------------------------------------- the in-cluster spec


def in_cluster_spec(spec: ClusterSpec, names: Names) -> dict[str, Any]:
    """The spec pods read from $LLMCTL_CLUSTER: the Ray address filled in, the ledger on its volume."""
    data = spec.model_dump(mode="json")
    data["address"] = names.ray_address
    if not spec.ledger_url:
        data["ledger_url"] = f"{LEDGER_DIR}/ledger.db"
    return data
