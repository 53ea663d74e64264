"""Kubernetes backend: each version a Deployment of single-GPU serving pods.

    Service <svc>                 selects llmctl.io/service=<svc> (every version's pods)
    Deployment <svc>-<version>    pods: `python -m jobs.serve standalone`, nvidia.com/gpu: 1,
                                  required anti-affinity on kubernetes.io/hostname across the
                                  whole service (one serving pod per node), readiness on /health
    Secret <svc>-serve-token      the bearer token, created from the environment once

Without a service mesh the traffic split is the ratio of ready pods: a candidate starts with
one pod, and each step scales the candidate up and the stable down to the nearest pod
counts (surge first; if no node is free, the stable gives up a node first). The analysis
windows come from Prometheus, which scrapes each pod's /metrics (`PrometheusMetrics`).
Written against `kubernetes.client.AppsV1Api` / `CoreV1Api`; tests drive it with a stateful
fake of those two APIs (tests/k8s_fake.py) because no API server exists here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from controlplane.errors import MissingDependencyError, UserError
from controlplane.rollout.backend import DeployError
from controlplane.spec import ClusterSpec, RolloutSpec

SERVICE_LABEL = "llmctl.io/service"
VERSION_LABEL = "llmctl.io/version"
HTTP_PORT = 8000
STORAGE_MOUNT = "/llmctl"


class MetricsSource(Protocol):
    def window(self, service: str, version: str, since: float) -> dict[str, Any]: ...


class PrometheusMetrics:
    """Windows from the llmctl_serve_* series of the serving pods, via the Prometheus HTTP API."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time):
        self.url = url.rstrip("/")
        self.clock = clock

    def _scalar(self, query: str) -> float | None:
        import httpx

        r = httpx.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=10)
        r.raise_for_status()
        result = r.json()["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if value != value else value  # NaN: no samples

    def window(self, service: str, version: str, since: float) -> dict[str, Any]:
        rng = f"{max(1, int(self.clock() - since))}s"
        sel = f'version="{version}"'
        requests = self._scalar(f"sum(increase(llmctl_serve_requests_total{{{sel}}}[{rng}]))") or 0.0
        errors = self._scalar(f'sum(increase(llmctl_serve_requests_total{{{sel},code=~"5.."}}[{rng}]))') or 0.0
        q = "histogram_quantile({q}, sum by (le) (increase(llmctl_serve_request_duration_seconds_bucket{{{sel}}}[{rng}])))"
        return {
            "version": version,
            "requests": round(requests),
            "errors": round(errors),
            "p50_s": self._scalar(q.format(q=0.5, sel=sel, rng=rng)),
            "p99_s": self._scalar(q.format(q=0.99, sel=sel, rng=rng)),
            "inflight": 0,
        }


def split_replicas(total: int, ratios: dict[str, float]) -> dict[str, int]:
    """Pod counts for traffic shares: a live version keeps at least one pod; shares round to pods."""
    live = {v: r for v, r in ratios.items() if r > 0}
    if len(live) == 1:
        return {v: (total if r > 0 else 0) for v, r in ratios.items()}
    counts = {v: 0 for v in ratios}
    growing = min(live, key=live.get)  # the smaller share (the candidate during a canary)
    counts[growing] = min(total - 1, max(1, round(live[growing] * total)))
    for v in live:
        if v != growing:
            counts[v] = max(1, total - counts[growing])
    return counts


def _is_404(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


class KubernetesBackend:
    kind = "kubernetes"

    def __init__(
        self,
        apps: Any,
        core: Any,
        namespace: str,
        metrics: MetricsSource,
        *,
        storage_root: str | Path | None = None,
        gpu_taint_key: str = "nvidia.com/gpu",
        cluster_name: str = "local",
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        poll_s: float = 2.0,
    ):
        self.apps, self.core, self.ns, self.metrics = apps, core, namespace, metrics
        self.storage_root = Path(storage_root).expanduser() if storage_root else None
        self.gpu_taint_key = gpu_taint_key
        self.cluster_name = cluster_name
        self.sleep, self.clock, self.poll_s = sleep, clock, poll_s

    @classmethod
    def from_kubeconfig(cls, cluster: ClusterSpec) -> KubernetesBackend:
        try:
            from kubernetes import client, config
        except ImportError:
            raise MissingDependencyError("the kubernetes Python client is not installed") from None
        try:
            config.load_kube_config(context=cluster.kubernetes.context)
        except Exception as exc:  # ConfigException, missing file
            raise UserError(f"no usable kubeconfig for the kubernetes backend ({type(exc).__name__})") from None
        url = os.environ.get("LLMCTL_PROMETHEUS_URL")
        if not url:
            raise UserError(
                "the kubernetes backend reads its analysis windows from Prometheus: set $LLMCTL_PROMETHEUS_URL"
            )
        return cls(
            client.AppsV1Api(),
            client.CoreV1Api(),
            cluster.kubernetes.serving_namespace,
            PrometheusMetrics(url),
            storage_root=cluster.storage_root(),
            gpu_taint_key=cluster.kubernetes.gpu_taint_key,
            cluster_name=cluster.name,
        )

    # ------------------------------------------------------------ objects

    @staticmethod
    def deployment_name(spec: RolloutSpec, version: str) -> str:
        return f"{spec.name}-{version}"[:63].rstrip("-")

    def _pod_model_path(self, model_dir: str) -> str:
        path = Path(model_dir)
        if self.storage_root is not None:
            try:
                return f"{STORAGE_MOUNT}/{path.resolve().relative_to(self.storage_root.resolve())}"
            except ValueError:
                pass
        return str(path)

    def deployment_body(self, spec: RolloutSpec, version: str, model_dir: str, replicas: int, drill: Any):
        from kubernetes import client as k

        labels = {"app.kubernetes.io/name": "llmctl-serve", SERVICE_LABEL: spec.name, VERSION_LABEL: version}
        env = [
            k.V1EnvVar(
                name="LLMCTL_SERVE_TOKEN",
                value_from=k.V1EnvVarSource(
                    secret_key_ref=k.V1SecretKeySelector(name=f"{spec.name}-serve-token", key="token")
                ),
            )
        ]
        if drill is not None:
            env.append(k.V1EnvVar(name="LLMCTL_DRILL", value=json.dumps(drill.model_dump())))
        if spec.gpus_per_replica:
            resources = k.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}, requests={"nvidia.com/gpu": "1"})
        else:
            cpus = str(spec.serve.cpus_per_replica)
            resources = k.V1ResourceRequirements(requests={"cpu": cpus}, limits={"cpu": cpus})
        mounts, volumes = [], []
        if spec.serve.model_volume_claim:
            mounts.append(k.V1VolumeMount(name="storage", mount_path=STORAGE_MOUNT, read_only=True))
            volumes.append(
                k.V1Volume(
                    name="storage",
                    persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(
                        claim_name=spec.serve.model_volume_claim, read_only=True
                    ),
                )
            )
        container = k.V1Container(
            name="serve",
            image=spec.serve.image,
            command=["python", "-m", "jobs.serve", "standalone"],
            args=[
                "--model-dir",
                self._pod_model_path(model_dir),
                "--version",
                version,
                "--host",
                "0.0.0.0",
                "--port",
                str(HTTP_PORT),
                "--engine",
                spec.serve.engine,
                "--cluster",
                self.cluster_name,
                "--max-num-seqs",
                str(spec.serve.max_num_seqs),
                *(["--kv-cache-gib", str(spec.serve.kv_cache_gib)] if spec.serve.kv_cache_gib else []),
                *(["--enforce-eager"] if spec.serve.enforce_eager else []),
            ],
            ports=[k.V1ContainerPort(container_port=HTTP_PORT, name="http")],
            env=env,
            resources=resources,
            readiness_probe=k.V1Probe(
                http_get=k.V1HTTPGetAction(path="/health", port="http"),
                initial_delay_seconds=5,
                period_seconds=5,
                failure_threshold=3,
            ),
            volume_mounts=mounts or None,
        )
        anti = k.V1PodAntiAffinity(
            required_during_scheduling_ignored_during_execution=[
                k.V1PodAffinityTerm(
                    label_selector=k.V1LabelSelector(match_labels={SERVICE_LABEL: spec.name}),
                    topology_key="kubernetes.io/hostname",
                )
            ]
        )
        pod = k.V1PodSpec(
            containers=[container],
            affinity=k.V1Affinity(pod_anti_affinity=anti),
            tolerations=[k.V1Toleration(key=self.gpu_taint_key, operator="Exists", effect="NoSchedule")],
            volumes=volumes or None,
            termination_grace_period_seconds=30,
        )
        return k.V1Deployment(
            metadata=k.V1ObjectMeta(name=self.deployment_name(spec, version), labels=labels),
            spec=k.V1DeploymentSpec(
                replicas=replicas,
                selector=k.V1LabelSelector(match_labels={SERVICE_LABEL: spec.name, VERSION_LABEL: version}),
                template=k.V1PodTemplateSpec(
                    metadata=k.V1ObjectMeta(
                        labels=labels,
                        annotations={
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(HTTP_PORT),
                            "prometheus.io/path": "/metrics",
                        },
                    ),
                    spec=pod,
                ),
                strategy=k.V1DeploymentStrategy(type="Recreate"),
            ),
        )

    # ------------------------------------------------------------ helpers

    def _deployments(self, spec: RolloutSpec) -> dict[str, Any]:
        items = self.apps.list_namespaced_deployment(self.ns, label_selector=f"{SERVICE_LABEL}={spec.name}").items
        return {d.metadata.labels[VERSION_LABEL]: d for d in items}

    def _scale(self, spec: RolloutSpec, version: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment(
            self.deployment_name(spec, version), self.ns, {"spec": {"replicas": replicas}}
        )

    def _ready(self, spec: RolloutSpec, version: str) -> tuple[int, int]:
        d = self.apps.read_namespaced_deployment(self.deployment_name(spec, version), self.ns)
        return (d.status.ready_replicas or 0), (d.spec.replicas or 0)

    def _wait_ready(self, spec: RolloutSpec, versions: list[str], timeout_s: float) -> bool:
        deadline = self.clock() + timeout_s
        while True:
            if all(ready >= want for ready, want in (self._ready(spec, v) for v in versions)):
                return True
            if self.clock() >= deadline:
                return False
            self.sleep(self.poll_s)

    # ------------------------------------------------------------ the port

    def ensure_service(self, spec: RolloutSpec, stable: str | None, rollout_id: str) -> dict[str, Any]:
        from kubernetes import client as k

        secret = f"{spec.name}-serve-token"
        try:
            self.core.read_namespaced_secret(secret, self.ns)
        except Exception as exc:
            if not _is_404(exc):
                raise
            token = os.environ.get(spec.serve.token_env)
            if not token:
                raise UserError(
                    f"serving pods listen beyond loopback: set a bearer token in ${spec.serve.token_env}"
                ) from None
            body = k.V1Secret(metadata=k.V1ObjectMeta(name=secret), string_data={"token": token}, type="Opaque")
            self.core.create_namespaced_secret(self.ns, body)
        try:
            self.core.read_namespaced_service(spec.name, self.ns)
        except Exception as exc:
            if not _is_404(exc):
                raise
            body = k.V1Service(
                metadata=k.V1ObjectMeta(name=spec.name, labels={SERVICE_LABEL: spec.name}),
                spec=k.V1ServiceSpec(
                    selector={SERVICE_LABEL: spec.name},
                    ports=[k.V1ServicePort(name="http", port=80, target_port="http")],
                ),
            )
            self.core.create_namespaced_service(self.ns, body)
        return {"url": f"http://{spec.name}.{self.ns}.svc/v1", "metrics_url": getattr(self.metrics, "url", None)}

    def has_version(self, spec: RolloutSpec, version: str) -> bool:
        try:
            self.apps.read_namespaced_deployment(self.deployment_name(spec, version), self.ns)
            return True
        except Exception as exc:
            if _is_404(exc):
                return False
            raise

    def deploy_version(self, spec: RolloutSpec, version: str, model_dir: str, replicas: int, drill: Any) -> None:
        others = [v for v in self._deployments(spec) if v != version]
        start = 1 if others else replicas  # a canary starts with one pod: its traffic share is its pod share
        if not self.has_version(spec, version):
            self.apps.create_namespaced_deployment(
                self.ns, self.deployment_body(spec, version, model_dir, start, drill)
            )
        if not self._wait_ready(spec, [version], spec.deploy_timeout_s):
            ready, want = self._ready(spec, version)
            self.remove_version(spec, version)
            raise DeployError(
                f"{self.deployment_name(spec, version)}: {ready}/{want} pods ready after {spec.deploy_timeout_s:.0f}s"
            )

    def set_traffic(self, spec: RolloutSpec, ratios: dict[str, float], rollout_id: str) -> float:
        targets = split_replicas(spec.replicas, ratios)
        for v in self._deployments(spec):
            targets.setdefault(v, 0)  # a version given no share gives up its pods
        current = {v: self._ready(spec, v)[1] for v in targets}
        up = [v for v in targets if targets[v] > current[v]]
        down = [v for v in targets if targets[v] < current[v]]
        for v in up:  # surge first: never below the stable capacity while a node is free
            self._scale(spec, v, targets[v])
        if up and not self._wait_ready(spec, up, spec.deploy_timeout_s / 2):
            for v in down:  # no free node: the shrinking version gives its nodes first
                self._scale(spec, v, targets[v])
            down = []
            if not self._wait_ready(spec, up, spec.deploy_timeout_s / 2):
                raise DeployError(f"could not scale {', '.join(up)} to {[targets[v] for v in up]} ready pods")
        for v in down:
            self._scale(spec, v, targets[v])
        self._wait_ready(spec, list(targets), spec.deploy_timeout_s / 2)
        return self.clock()

    def window(self, spec: RolloutSpec, version: str, since: float) -> dict[str, Any]:
        return self.metrics.window(spec.name, version, since)

    def wait_idle(self, spec: RolloutSpec, version: str, min_s: float, max_s: float = 30.0) -> None:
        self.sleep(min_s)  # pods drain in their termination grace period once removed from the Service

    def remove_version(self, spec: RolloutSpec, version: str) -> None:
        try:
            self.apps.delete_namespaced_deployment(self.deployment_name(spec, version), self.ns)
        except Exception as exc:
            if not _is_404(exc):
                raise

    def teardown(self, spec: RolloutSpec) -> None:
        for version in list(self._deployments(spec)):
            self.remove_version(spec, version)
        try:
            self.core.delete_namespaced_service(spec.name, self.ns)
        except Exception as exc:
            if not _is_404(exc):
                raise
