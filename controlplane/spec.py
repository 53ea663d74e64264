"""User-facing specs: ClusterSpec, RunSpec, RolloutSpec. YAML in, typed objects out.

Every spec derives from `StrictModel` (`extra="forbid"`). Files are parsed once at the CLI
edge by `load_spec`, which turns any problem into a one-line `ConfigurationError` naming
the field path; everything inward receives typed objects. Help text lives in
`Field(description=...)`, so `llmctl spec schema` and the docs come from these models.

Records read back from disk (the frozen spec in a run directory, the ledger) go through
`read_record`, which tolerates fields a newer writer added (strict write, lenient read).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controlplane.errors import ConfigurationError

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$"
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000

PositiveInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class StrictModel(BaseModel):
    """Base of every user-facing spec: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


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


# --------------------------------------------------------------------------- run


class LlamaDims(StrictModel):
    """Resolved Llama architecture dimensions."""

    hidden_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    ffn_size: PositiveInt
    vocab_size: PositiveInt
    max_seq_len: PositiveInt = 2048
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> LlamaDims:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def param_count(self) -> int:
        h, f, v = self.hidden_size, self.ffn_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, o
        mlp = 3 * h * f  # gate, up, down
        per_layer = attn + mlp + 2 * h  # two RMSNorms
        embeddings = v * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h  # final norm


PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_size=176, max_seq_len=256),
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, ffn_size=688, max_seq_len=512),
    # Llama-2-13B shape.
    "13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, ffn_size=13824, max_seq_len=4096),
}
PRESET_DEFAULT_VOCAB = {"tiny": 4096, "small": 8192, "13b": 32000}


class ModelSpec(StrictModel):
    preset: Literal["tiny", "small", "13b"] | None = Field(
        "tiny", description="Named Llama shape; explicit dimensions below override it."
    )
    hidden_size: PositiveInt | None = Field(None, description="Model width.")
    num_layers: PositiveInt | None = Field(None, description="Transformer blocks.")
    num_heads: PositiveInt | None = Field(None, description="Attention heads.")
    num_kv_heads: PositiveInt | None = Field(None, description="Key/value heads (GQA); default num_heads.")
    ffn_size: PositiveInt | None = Field(None, description="SwiGLU intermediate size.")
    vocab_size: PositiveInt | None = Field(
        None, description="Vocabulary size; null takes it from the dataset's tokenizer."
    )
    tie_embeddings: bool = Field(False, description="Share input and output embeddings.")

    @model_validator(mode="after")
    def _explicit_or_preset(self) -> ModelSpec:
        if self.preset is None:
            missing = [k for k in ("hidden_size", "num_layers", "num_heads", "ffn_size") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"without a preset, set {', '.join(missing)}")
        return self

    def resolve(self, vocab_size: int | None = None, max_seq_len: int | None = None) -> LlamaDims:
        """Dimensions with preset defaults filled in; `vocab_size` comes from the tokenizer."""
        base: dict[str, Any] = dict(PRESETS[self.preset]) if self.preset else {}
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size"):
            if getattr(self, key) is not None:
                base[key] = getattr(self, key)
        if self.num_kv_heads is None and (self.num_heads is not None or "num_kv_heads" not in base):
            base["num_kv_heads"] = base["num_heads"]
        base["vocab_size"] = self.vocab_size or vocab_size or PRESET_DEFAULT_VOCAB.get(self.preset or "", 32000)
        if max_seq_len:
            base["max_seq_len"] = max(max_seq_len, base.get("max_seq_len", 0))
        base["tie_embeddings"] = self.tie_embeddings
        return LlamaDims(**base)


class DataSpec(StrictModel):
    path: str = Field(
        "datasets/manpages-ja",
        description="Prepared dataset directory (tokenizer.json, shards); relative paths are "
        "under the cluster's storage root.",
    )
    source: str = Field(
        "manpages-ja",
        description="What `data prepare` reads: 'manpages-ja' (Debian's Japanese manual pages) "
        "or a directory of .txt/.jsonl files.",
    )
    vocab_size: int = Field(4096, ge=256, le=262144, description="Byte-level BPE vocabulary size.")
    heldout_fraction: float = Field(0.02, gt=0, lt=0.5, description="Share of documents held out for evaluation.")


class ScheduleSpec(StrictModel):
    lr: float = Field(3e-3, gt=0, le=1.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")


class TrainSpec(StrictModel):
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps; or give total_tokens.")
    total_tokens: PositiveInt | None = Field(None, description="Token budget; steps = tokens / (batch x seq).")
    global_batch_size: PositiveInt = Field(8, description="Sequences per optimizer step, all workers together.")
    micro_batch_size: PositiveInt | None = Field(
        None, description="Sequences per worker forward pass; null for global/workers (no accumulation)."
    )
    seq_len: PositiveInt = Field(128, description="Tokens per sequence.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="'auto': bf16 on GPU, fp32 on CPU.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Optimizer and LR schedule.")
    log_every: PositiveInt = Field(1, description="Write a step event every N steps.")

    @model_validator(mode="after")
    def _steps_or_tokens(self) -> TrainSpec:
        if (self.max_steps is None) == (self.total_tokens is None):
            raise ValueError("set exactly one of max_steps and total_tokens")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.total_tokens / self.tokens_per_step))


class WorkersSpec(StrictModel):
    num_workers: PositiveInt = Field(2, description="Data-parallel training workers (Ray actors).")
    gpus_per_worker: float = Field(0, ge=0, le=8, description="GPUs per worker; 0 trains on CPU.")
    cpus_per_worker: float = Field(1, gt=0, le=256, description="CPUs per worker.")
    spare_workers: int = Field(
        0, ge=0, le=8, description="Warm spare workers kept alive to replace a failed one quickly."
    )


class CheckpointSpec(StrictModel):
    interval_steps: PositiveInt | Literal["auto"] = Field(
        25, description="Steps between checkpoints, or 'auto' for the Young/Daly interval."
    )
    keep_last: PositiveInt = Field(3, description="Verified checkpoints to retain.")
    async_save: bool = Field(True, description="Persist in the background after a copy to host memory.")
    mtbf_hours: float | None = Field(
        None, gt=0, description="Assumed mean time between failures for 'auto' until one is observed."
    )


class ParallelismSpec(StrictModel):
    """How the model is split across GPUs. The data-parallel degree is derived:
    GPUs / (tensor x pipeline)."""

    tensor: PositiveInt = Field(1, le=64, description="Tensor-parallel degree (GPUs sharing each layer).")
    pipeline: PositiveInt = Field(1, le=256, description="Pipeline-parallel stages (num_layers must divide).")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        1,
        description="ZeRO sharding over the data-parallel group: 0 none, 1 optimizer states, "
        "2 also gradients, 3 also weights (FSDP full sharding).",
    )
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none",
        description="'none' keeps every activation; 'selective' recomputes attention and shards the "
        "rest over the tensor group (sequence parallel); 'full' keeps only each layer's input.",
    )

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline


class FaultToleranceSpec(StrictModel):
    max_restarts: int = Field(20, ge=0, description="Attempts beyond the first before the run fails.")
    backoff_initial_s: float = Field(1.0, ge=0, description="First restart delay, doubled each time.")
    backoff_max_s: float = Field(60.0, ge=0, description="Cap on the restart delay.")
    crash_loop_restarts: PositiveInt = Field(
        3, description="Restarts in a row without step progress that end the run as failed."
    )
    hang_timeout_factor: float = Field(20.0, gt=1, description="A hang is no step for this many median step times...")
    hang_timeout_min_s: float = Field(30.0, gt=0, description="...but never sooner than this...")
    hang_timeout_max_s: float = Field(900.0, gt=0, description="...and always by this hard cap.")
    loss_spike_factor: float = Field(
        3.0, gt=1, description="A loss above this multiple of the recent median is a spike."
    )
    loss_window: PositiveInt = Field(20, description="Steps in the recent-loss window.")
    max_rollbacks: int = Field(3, ge=0, description="Numerical-fault rollbacks allowed per run.")
    node_failure_threshold: PositiveInt = Field(2, description="Failures on one node after which it is excluded.")

    @model_validator(mode="after")
    def _bounds(self) -> FaultToleranceSpec:
        if self.hang_timeout_min_s > self.hang_timeout_max_s:
            raise ValueError("hang_timeout_min_s must not exceed hang_timeout_max_s")
        return self


class PowerSpec(StrictModel):
    cap_watts: float | Literal["auto"] | None = Field(
        None, description="Power limit per GPU in W; 'auto' calibrates; null leaves limits alone."
    )
    max_slowdown: float = Field(0.03, ge=0, le=0.5, description="'auto': largest slowdown accepted.")
    calibration_steps: PositiveInt = Field(10, description="'auto': steps measured per candidate limit.")

    @model_validator(mode="after")
    def _positive_cap(self) -> PowerSpec:
        if isinstance(self.cap_watts, float) and self.cap_watts <= 0:
            raise ValueError("cap_watts must be positive")
        return self


class MetricsSpec(StrictModel):
    enabled: bool = Field(True, description="Expose llmctl_train_* metrics from rank 0.")
    port: int = Field(0, ge=0, le=65535, description="Port of the metrics endpoint; 0 picks a free one.")
    host: str = Field(
        "127.0.0.1", description="Bind address of the metrics endpoint; loopback unless a scraper needs more."
    )


class FaultInjection(StrictModel):
    """A real fault the job injects into itself: for drills, chaos tests and the quickstart."""

    kind: Literal["kill_worker", "hang_worker", "nan_loss", "checkpoint_enospc", "slow_worker", "exit_driver"] = Field(
        description="kill_worker: SIGKILL the rank's process; hang_worker: SIGSTOP it; nan_loss: the loss "
        "becomes NaN; checkpoint_enospc: the checkpoint write fails with ENOSPC; slow_worker: the rank "
        "sleeps `seconds` each step; exit_driver: the job driver exits abruptly."
    )
    at_step: int = Field(ge=0, description="Global step at which the fault fires.")
    rank: int = Field(0, ge=0, description="Worker rank that suffers it.")
    attempt: PositiveInt = Field(1, description="Only in this attempt (so the resume does not repeat it).")
    seconds: float = Field(0.5, ge=0, description="slow_worker: extra seconds per step.")


class RunSpec(StrictModel):
    name: str = Field("quickstart", pattern=NAME_PATTERN, description="Run name; run ids derive from it.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model architecture.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(max_steps=200), description="Training loop.")
    workers: WorkersSpec = Field(default_factory=WorkersSpec, description="Workers and resources.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint policy.")
    fault_tolerance: FaultToleranceSpec = Field(
        default_factory=FaultToleranceSpec, description="Restart, hang and numerical-fault policy."
    )
    power: PowerSpec = Field(default_factory=PowerSpec, description="GPU power policy.")
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="Model and data parallelism (sizes memory per GPU)."
    )
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Metrics endpoint.")
    seed: int = Field(0, ge=0, description="Seed for model init, data order and dropout.")
    faults: list[FaultInjection] = Field(
        default_factory=list, description="Faults to inject on purpose (drills, tests); empty in production."
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> RunSpec:
        train, n = self.train, self.workers.num_workers
        if train.global_batch_size % n:
            raise ValueError(
                f"train.global_batch_size ({train.global_batch_size}) must be divisible by workers.num_workers ({n})"
            )
        per_worker = train.global_batch_size // n
        if train.micro_batch_size is not None and per_worker % train.micro_batch_size:
            raise ValueError(
                f"train.micro_batch_size ({train.micro_batch_size}) must divide the per-worker batch ({per_worker})"
            )
        gpus = self.world_gpus
        mp = self.parallelism.model_parallel
        if mp > 1 and gpus % mp:
            raise ValueError(f"parallelism: tensor x pipeline ({mp}) must divide the GPUs of the run ({gpus})")
        for fault in self.faults:
            if fault.rank >= n:
                raise ValueError(f"faults: rank {fault.rank} does not exist with {n} workers")
        return self

    @property
    def world_gpus(self) -> int:
        """GPUs the run trains on: workers x GPUs per worker (0 for a CPU run)."""
        return int(self.workers.num_workers * self.workers.gpus_per_worker)


# --------------------------------------------------------------------------- rollout


class EvalMinimums(StrictModel):
    jcommonsenseqa_accuracy: float | None = Field(None, ge=0, le=1, description="Minimum JCommonsenseQA accuracy.")
    jsquad_exact_match: float | None = Field(None, ge=0, le=1, description="Minimum JSQuAD exact match.")
    max_heldout_perplexity: float | None = Field(None, gt=0, description="Maximum held-out perplexity.")


class EvalFiles(StrictModel):
    jcommonsenseqa: str | None = Field(
        None, description="JCommonsenseQA file (JGLUE JSON lines); null for the bundled sample."
    )
    jsquad: str | None = Field(None, description="JSQuAD file (JGLUE SQuAD-style JSON); null for the bundled sample.")
    jcommonsenseqa_k: int = Field(3, ge=0, le=16, description="JCommonsenseQA shots.")
    jsquad_k: int = Field(2, ge=0, le=16, description="JSQuAD shots.")
    limit: PositiveInt | None = Field(None, description="Evaluate only the first N items of each task.")


class DrillSpec(StrictModel):
    """A real fault the candidate's replicas inject into themselves (canary drills, tests)."""

    error_rate: float = Field(0.0, ge=0, le=1, description="Fraction of requests that raise a server error.")
    delay_s: float = Field(0.0, ge=0, le=60, description="Seconds each request sleeps before generating.")
    seed: int = Field(0, ge=0, description="Seed of the error draw.")


class ServeOptions(StrictModel):
    host: str = Field(
        "127.0.0.1",
        description="Bind address of the HTTP endpoint. Beyond loopback a bearer token is required "
        "(from the environment variable named by token_env).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the serving endpoint.")
    token_env: str = Field("LLMCTL_SERVE_TOKEN", description="Environment variable holding the bearer token.")
    metrics_host: str = Field("127.0.0.1", description="Bind address of the llmctl_serve_* metrics endpoint.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Metrics port; 0 picks a free one (recorded).")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="'auto': vLLM when it and a GPU are present, transformers otherwise."
    )
    cpus_per_replica: float = Field(1.0, gt=0, le=64, description="CPUs per replica (CPU-only hosts).")
    image: str = Field("llmctl/serve:0.1.0", description="Container image of a serving pod (kubernetes backend).")
    model_volume_claim: str | None = Field(
        None, description="PersistentVolumeClaim holding exported models (kubernetes backend)."
    )


class RolloutSpec(StrictModel):
    name: str = Field(pattern=NAME_PATTERN, description="Rollout (service) name.")
    model: str = Field(description="Exported model directory, or RUN_ID[@STEP] to export first.")
    backend: Literal["ray", "kubernetes"] = Field("ray", description="Ray Serve or Kubernetes Deployments.")
    replicas: PositiveInt = Field(2, description="Candidate replicas at 100%.")
    gpus_per_replica: Literal[0, 1] = Field(1, description="One GPU per replica; 0 on CPU-only hosts.")
    traffic_steps: list[Annotated[int, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [10, 50, 100], min_length=1, description="Candidate traffic %, ascending."
    )
    analysis_window_s: float = Field(30.0, gt=0, description="Seconds of traffic judged at each step.")
    min_requests: PositiveInt = Field(20, description="Requests the candidate must serve in a window.")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Highest candidate error rate allowed.")
    max_p99_latency_s: float = Field(2.0, gt=0, description="Highest candidate p99 latency allowed, s.")
    max_latency_ratio: float = Field(1.5, ge=1, description="Candidate p99 over stable p99 allowed.")
    min_eval: EvalMinimums = Field(default_factory=EvalMinimums, description="The evaluation gate.")
    eval: EvalFiles = Field(default_factory=EvalFiles, description="Task files of the gate's evaluation.")
    latency_slack_s: float = Field(
        0.05, ge=0, description="A p99 gap to stable below this many seconds never fails the ratio test."
    )
    insufficient_traffic_factor: float = Field(
        4.0, ge=1, description="With too few requests, wait up to this many windows, then roll back."
    )
    deploy_timeout_s: float = Field(600.0, gt=0, description="Seconds a version may take to become ready.")
    drain_s: float = Field(2.0, ge=0, description="Seconds a version keeps serving in-flight requests after 0%.")
    serve: ServeOptions = Field(default_factory=ServeOptions, description="Endpoint, engine and resources.")
    drill: DrillSpec | None = Field(None, description="Fault drill for the candidate; null in production.")

    @model_validator(mode="after")
    def _ascending(self) -> RolloutSpec:
        steps = self.traffic_steps
        if steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError("traffic_steps must be strictly ascending and end at 100")
        return self


# --------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)
SPEC_KINDS: dict[str, type[StrictModel]] = {"cluster": ClusterSpec, "run": RunSpec, "rollout": RolloutSpec}


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


def format_validation_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{path}: {msg}")
    more = f" (and {len(parts) - 1} more)" if len(parts) > 1 else ""
    return f"{source}: {parts[0]}{more}" if parts else f"{source}: invalid"


def validate(model: type[M], data: Any, source: str = "<spec>") -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigurationError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(exc, source)) from None


def load_spec(model: type[M], path: str | Path) -> M:
    """Read and validate one spec file; every problem is a one-line ConfigurationError."""
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{p}: not UTF-8 text") from None
    return validate(model, parse_yaml(text, str(p)), str(p))


def detect_kind(data: Any) -> type[StrictModel]:
    """Guess which spec a mapping is (for `spec validate` without --kind)."""
    if isinstance(data, dict):
        if "traffic_steps" in data or "min_eval" in data or ("model" in data and isinstance(data["model"], str)):
            return RolloutSpec
        if {"node_groups", "kind", "storage", "pue"} & data.keys():
            return ClusterSpec
    return RunSpec


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


def spec_json_schema(kind: str) -> dict[str, Any]:
    return SPEC_KINDS[kind].model_json_schema()


_RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,80}$")


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise ConfigurationError(f"run id {run_id!r}: expected lowercase letters, digits and '-'")
    return run_id
