"""ClusterSpec: the machines, storage, network and Kubernetes options a run lands on."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from controlplane.spec.base import NAME_PATTERN, NonNegFloat, PositiveInt, StrictModel

# --------------------------------------------------------------------------- cluster


class NodeGroup(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="Node group name, DNS-label style.")
    role: Literal["train", "serve", "system"] = Field(
        "train", description="What the group runs: training workers, serving replicas, or system pods."
    )
    gpu_model: str | None = Field(
        None, description="GPU model, e.g. 'A100-80GB', 'H100-80GB', 'L4'; null for CPU-only nodes."
    )
    gpus_per_node: int = Field(0, ge=0, le=16, description="GPUs on each node of the group.")
    node_count: PositiveInt = Field(1, description="Number of nodes in the group.")
    cpus_per_node: PositiveInt = Field(8, description="CPU cores on each node.")
    memory_gib: PositiveInt = Field(32, description="Memory on each node, GiB.")
    min_nodes: int | None = Field(
        None, ge=0, description="Autoscaling lower bound (defaults to node_count: no scaling)."
    )
    gpu_product: str | None = Field(
        None,
        description="Value of the GPU product node label on Kubernetes (e.g. 'NVIDIA-A100-SXM4-80GB'); "
        "null derives it from gpu_model.",
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels the group's nodes carry; its pods select them. On-premises you apply them to the "
        "nodes; in the cloud infra/ applies them.",
    )
    instance_type: str | None = Field(
        None, description="Cloud instance type when kubernetes.cloud is not 'none'; null derives it from gpu_model."
    )

    @model_validator(mode="after")
    def _gpu_consistency(self) -> NodeGroup:
        if self.gpus_per_node > 0 and not self.gpu_model:
            raise ValueError("gpu_model is required when gpus_per_node > 0")
        if self.min_nodes is not None and self.min_nodes > self.node_count:
            raise ValueError("min_nodes must not exceed node_count")
        return self

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.node_count


class StorageSpec(StrictModel):
    root: str = Field(
        "~/.llmctl",
        description="Where runs, datasets, checkpoints and the default ledger live (a shared "
        "file system on a multi-node cluster).",
    )
    size_tib: NonNegFloat = Field(1.0, description="Capacity to provision for data and checkpoints, TiB.")
    storage_class: str | None = Field(
        None, description="Kubernetes StorageClass of the shared volume (e.g. a Lustre CSI class)."
    )
    write_bandwidth_gbps: float = Field(
        10.0, gt=0, description="Aggregate write bandwidth to checkpoint storage, GB/s."
    )


class NetworkSpec(StrictModel):
    rdma: bool = Field(False, description="Use RDMA (RoCE v2 / InfiniBand) for collectives.")
    host_network: bool = Field(False, description="Run training pods on the host network.")
    bandwidth_gbps: float = Field(
        25.0, gt=0, description="Per-node inter-node bandwidth, Gb/s (200 for RoCE v2 reference)."
    )
    rdma_resource: str = Field(
        "rdma/rdma_shared_device_a",
        description="Kubernetes extended resource that hands a pod the RDMA devices when rdma is on (the NVIDIA "
        "network operator's shared device plugin; 'vpc.amazonaws.com/efa' on AWS).",
    )
    rdma_devices_per_pod: PositiveInt = Field(1, description="How many rdma_resource units each training pod asks.")
    nccl_env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra NCCL environment for training pods, e.g. NCCL_IB_HCA, NCCL_IB_GID_INDEX=3 for RoCE v2.",
    )
    node_cidrs: list[str] = Field(
        default_factory=list,
        description="CIDRs of the nodes' own addresses. Required with host_network: host-network pods reach the "
        "Ray head from these addresses, and infra/'s NetworkPolicy admits only them.",
    )

    @model_validator(mode="after")
    def _host_network_needs_cidrs(self) -> NetworkSpec:
        import ipaddress

        for cidr in self.node_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"node_cidrs: {cidr!r} is not a CIDR such as 10.0.0.0/16") from None
        if self.host_network and not self.node_cidrs:
            raise ValueError("host_network requires node_cidrs (the addresses host-network pods speak from)")
        return self


class RayOptions(StrictModel):
    dashboard_host: str = Field(
        "127.0.0.1",
        description="Bind address of the Ray dashboard and Jobs API. They run arbitrary code for "
        "whoever reaches them: keep loopback unless you opt in with expose_dashboard.",
    )
    expose_dashboard: bool = Field(False, description="Opt in to binding the dashboard beyond loopback.")
    dashboard_port: int = Field(0, ge=0, le=65535, description="Dashboard port; 0 picks a free one.")
    worker_nodes: int = Field(
        0, ge=0, le=8, description="Extra local raylet nodes to start beside the head (local kind)."
    )
    image: str = Field("rayproject/ray:2.60.0-py311", description="Container image on Kubernetes.")
    head_cpus: PositiveInt = Field(8, description="CPU cores of the Ray head pod on Kubernetes (it runs no tasks).")
    head_memory_gib: PositiveInt = Field(32, description="Memory of the Ray head pod on Kubernetes, GiB.")
    shm_gib: PositiveInt | None = Field(
        None, description="Size of /dev/shm in Ray pods on Kubernetes, GiB; null gives a third of the pod's memory."
    )

    @model_validator(mode="after")
    def _loopback_unless_opted_in(self) -> RayOptions:
        if self.dashboard_host not in ("127.0.0.1", "localhost", "::1") and not self.expose_dashboard:
            raise ValueError("dashboard_host beyond loopback requires expose_dashboard: true")
        return self


class HelmChart(StrictModel):
    repo: str = Field(description="Chart repository URL.")
    chart: str = Field(description="Chart name in the repository.")
    version: str = Field(description="Pinned chart version.")


class HelmCharts(StrictModel):
    gpu_operator: HelmChart = Field(
        default_factory=lambda: HelmChart(
            repo="https://helm.ngc.nvidia.com/nvidia", chart="gpu-operator", version="v25.3.4"
        ),
        description="NVIDIA GPU operator (driver, container toolkit, device plugin, DCGM exporter).",
    )
    kuberay_operator: HelmChart = Field(
        default_factory=lambda: HelmChart(
            repo="https://ray-project.github.io/kuberay-helm/", chart="kuberay-operator", version="1.5.1"
        ),
        description="KubeRay operator (RayCluster custom resource).",
    )
    kube_prometheus_stack: HelmChart = Field(
        default_factory=lambda: HelmChart(
            repo="https://prometheus-community.github.io/helm-charts", chart="kube-prometheus-stack", version="79.5.0"
        ),
        description="Prometheus operator, Prometheus, Alertmanager and Grafana.",
    )


class AwsOptions(StrictModel):
    kubernetes_version: str = Field("1.33", description="EKS Kubernetes version.")
    vpc_id: str | None = Field(None, description="Existing VPC; null uses the account's default VPC.")
    subnet_ids: list[str] = Field(
        default_factory=list, description="Subnets for the cluster and node groups; empty: the VPC's defaults."
    )
    endpoint_public_access: bool = Field(
        False, description="Expose the EKS API endpoint publicly (public_access_cidrs limit who reaches it)."
    )
    public_access_cidrs: list[str] = Field(
        default_factory=list, description="CIDRs allowed to the public API endpoint when it is on."
    )
    disk_size_gib: PositiveInt = Field(500, description="Root volume of each node, GiB (images, local scratch).")


class KubernetesOptions(StrictModel):
    namespace: str = Field("llmctl", pattern=NAME_PATTERN, description="Namespace for training.")
    serving_namespace: str = Field("llmctl-serving", pattern=NAME_PATTERN, description="Namespace for serving.")
    context: str | None = Field(None, description="kubeconfig context; null for the current one.")
    gpu_taint_key: str = Field("nvidia.com/gpu", description="Taint key on GPU nodes.")
    gpu_product_label: str = Field("nvidia.com/gpu.product", description="Node label carrying the GPU product name.")
    cloud: Literal["none", "aws"] = Field(
        "none", description="'none' for an existing (on-premises) cluster; 'aws' provisions EKS."
    )
    region: str | None = Field(None, description="Cloud region when cloud is not 'none'.")
    system_namespace: str = Field(
        "llmctl-system", pattern=NAME_PATTERN, description="Namespace of the GPU and KubeRay operators."
    )
    monitoring_namespace: str = Field(
        "llmctl-monitoring", pattern=NAME_PATTERN, description="Namespace of Prometheus and Grafana."
    )
    charts: HelmCharts = Field(default_factory=HelmCharts, description="Pinned Helm charts infra/ installs.")
    gpu_driver_installed: bool = Field(
        False,
        description="Nodes already carry the NVIDIA driver and container toolkit (DGX OS, cloud GPU images): the "
        "GPU operator then leaves them alone.",
    )
    ray_auth_secret: str = Field(
        "llmctl-ray-auth",
        pattern=NAME_PATTERN,
        description="Secret holding the Ray auth token (key 'auth_token', KubeRay's convention).",
    )
    grafana_admin_secret: str = Field(
        "llmctl-grafana-admin",
        pattern=NAME_PATTERN,
        description="Secret holding Grafana's admin user and password (keys 'admin-user', 'admin-password').",
    )
    supervisor_image: str = Field(
        "ghcr.io/llmctl/llmctl:0.1.0", description="Container image with llmctl installed, for the supervisor."
    )
    supervisor_command: list[str] = Field(
        default_factory=lambda: ["llmctl", "supervise"],
        min_length=1,
        description="Command of the supervisor container; it finds the cluster spec in $LLMCTL_CLUSTER.",
    )
    serve_port: int = Field(8000, ge=1, le=65535, description="Port serving pods listen on (HTTP).")
    aws: AwsOptions = Field(default_factory=AwsOptions, description="EKS options when cloud is 'aws'.")

    @model_validator(mode="after")
    def _cloud_needs_region(self) -> KubernetesOptions:
        if self.cloud != "none" and not self.region:
            raise ValueError(f"region is required when cloud is {self.cloud!r}")
        return self


class ClusterSpec(StrictModel):
    name: str = Field("local", pattern=NAME_PATTERN, description="Cluster name, used in metric labels.")
    kind: Literal["local", "ray", "kubernetes"] = Field(
        "local",
        description="'local': llmctl starts a Ray cluster on this machine; 'ray': an existing Ray "
        "cluster at `address`; 'kubernetes': a KubeRay cluster provisioned by infra/.",
    )
    address: str | None = Field(None, description="Ray dashboard/Jobs API address for kind 'ray'.")
    node_groups: list[NodeGroup] = Field(
        default_factory=lambda: [NodeGroup(name="local", cpus_per_node=2, memory_gib=8)],
        min_length=1,
        description="Groups of identical nodes.",
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Shared storage.")
    network: NetworkSpec = Field(default_factory=NetworkSpec, description="Interconnect.")
    ray: RayOptions = Field(default_factory=RayOptions, description="Ray cluster options.")
    kubernetes: KubernetesOptions = Field(default_factory=KubernetesOptions, description="Kubernetes options.")
    ledger_url: str | None = Field(None, description="SQLite path of the ledger; null for <storage.root>/ledger.db.")
    pue: float = Field(1.2, ge=1.0, le=3.0, description="Facility power usage effectiveness.")
    carbon_intensity_kg_per_kwh: float = Field(
        0.45, ge=0, le=2.0, description="Grid carbon intensity, kg CO2e per kWh."
    )

    @model_validator(mode="after")
    def _kind_needs(self) -> ClusterSpec:
        if self.kind == "ray" and not self.address:
            raise ValueError("address is required when kind is 'ray'")
        names = [g.name for g in self.node_groups]
        if len(set(names)) != len(names):
            raise ValueError("node_groups names must be unique")
        return self

    @property
    def total_gpus(self) -> int:
        return sum(g.total_gpus for g in self.node_groups if g.role == "train")

    def storage_root(self) -> Path:
        return Path(self.storage.root).expanduser()

    def ledger_path(self) -> Path:
        return Path(self.ledger_url).expanduser() if self.ledger_url else self.storage_root() / "ledger.db"
