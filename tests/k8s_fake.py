"""A stateful fake of the Kubernetes API (AppsV1Api / CoreV1Api subset) and its data plane.

No API server exists on these machines, so the Kubernetes backend is tested against this:
Deployments own ReplicaSets own Pods; pods are scheduled onto nodes honouring what the
Deployment asks for (the `nvidia.com/gpu` limit against each node's GPUs, required pod
anti-affinity on kubernetes.io/hostname), start, and turn Ready only after their readiness
probe would pass (a `/health` probe is required; a model path listed in `broken_models`
never answers it). Time is simulated: `advance(dt)` moves the clock, reconciles, and sends
`rps` requests a second through the Service to a random Ready pod, whose outcome follows
the pod's LLMCTL_DRILL environment (the same drill switch the real server honours). The
backend reads its windows from that traffic (`window`, the MetricsSource interface).
Objects go in and come out as the kubernetes client's own model classes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

READY_AFTER_S = 10.0
BASE_LATENCY_S = 0.05


def _merge(dst: dict, patch: dict) -> dict:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        k, _, v = term.partition("=")
        if labels.get(k) != v:
            return False
    return True


class FakeCluster:
    def __init__(self, nodes: int = 4, gpus_per_node: int = 1, rps: float = 40.0, seed: int = 0):
        self.api = ApiClient()
        self.now = 1_000_000.0
        self.nodes = {f"gpu-node-{i}": {"gpus": gpus_per_node} for i in range(nodes)}
        self.deployments: dict[str, dict] = {}
        self.replica_sets: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.secrets: dict[str, dict] = {}
        self.broken_models: set[str] = set()
        self.rps = rps
        self.rng = random.Random(seed)
        self.samples: list[tuple[float, str | None, int, float]] = []  # (t, version, code, latency)
        self._pod_seq = 0
        self.apps = FakeAppsV1Api(self)
        self.core = FakeCoreV1Api(self)

    # ------------------------------------------------------------ plumbing

    def to_dict(self, body: Any) -> dict:
        return body if isinstance(body, dict) else self.api.sanitize_for_serialization(body)

    def to_model(self, data: dict, kind: str) -> Any:
        return self.api.deserialize(json.dumps(data), kind, "application/json")

    @staticmethod
    def not_found(name: str) -> ApiException:
        return ApiException(status=404, reason=f"{name} not found")

    # ------------------------------------------------------------ time and reconcile

    def clock(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        steps = max(1, int(dt / 0.1))
        for _ in range(steps):
            self.now += dt / steps
            self.reconcile()
            self._traffic(dt / steps)

    def reconcile(self) -> None:
        for name, d in self.deployments.items():
            template = d["spec"]["template"]
            h = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
            rs_name = f"{name}-{h}"
            for rs in self.replica_sets.values():
                if rs["owner"] == name and rs["name"] != rs_name:
                    rs["replicas"] = 0
            rs = self.replica_sets.setdefault(
                rs_name, {"name": rs_name, "owner": name, "template": template, "replicas": 0}
            )
            rs["replicas"] = d["spec"].get("replicas", 1)
        for rs_name in [n for n, rs in self.replica_sets.items() if rs["owner"] not in self.deployments]:
            del self.replica_sets[rs_name]
        for rs in self.replica_sets.values():
            mine = sorted((p for p in self.pods.values() if p["rs"] == rs["name"]), key=lambda p: p["seq"])
            for _ in range(rs["replicas"] - len(mine)):
                self._pod_seq += 1
                name = f"{rs['name']}-{self._pod_seq:05d}"
                self.pods[name] = {
                    "name": name,
                    "rs": rs["name"],
                    "seq": self._pod_seq,
                    "labels": dict(rs["template"]["metadata"]["labels"]),
                    "spec": rs["template"]["spec"],
                    "node": None,
                    "started": None,
                }
            for p in mine[rs["replicas"] :]:
                del self.pods[p["name"]]
        for name in [n for n, p in self.pods.items() if p["rs"] not in self.replica_sets]:
            del self.pods[name]
        for p in sorted(self.pods.values(), key=lambda p: p["seq"]):
            if p["node"] is None:
                node = self._schedule(p)
                if node:
                    p["node"], p["started"] = node, self.now

    def _gpu_request(self, pod: dict) -> int:
        limits = (pod["spec"]["containers"][0].get("resources") or {}).get("limits") or {}
        return int(limits.get("nvidia.com/gpu", 0))

    def _schedule(self, pod: dict) -> str | None:
        terms = (
            ((pod["spec"].get("affinity") or {}).get("podAntiAffinity") or {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution"
            )
        ) or []
        for node, cap in self.nodes.items():
            here = [p for p in self.pods.values() if p["node"] == node]
            if sum(self._gpu_request(p) for p in here) + self._gpu_request(pod) > cap["gpus"]:
                continue
            clash = False
            for term in terms:
                match = term["labelSelector"]["matchLabels"]
                if term["topologyKey"] == "kubernetes.io/hostname" and any(
                    all(p["labels"].get(k) == v for k, v in match.items()) for p in here
                ):
                    clash = True
            if not clash:
                return node
        return None

    def is_ready(self, pod: dict) -> bool:
        if pod["node"] is None or self.now - pod["started"] < READY_AFTER_S:
            return False
        container = pod["spec"]["containers"][0]
        probe = (container.get("readinessProbe") or {}).get("httpGet") or {}
        if probe.get("path") != "/health":
            return False
        args = container.get("args") or []
        model = args[args.index("--model-dir") + 1] if "--model-dir" in args else None
        return model not in self.broken_models

    # ------------------------------------------------------------ data plane

    def _traffic(self, dt: float) -> None:
        for svc in self.services.values():
            selector = svc["spec"]["selector"]
            endpoints = [
                p
                for p in self.pods.values()
                if all(p["labels"].get(k) == v for k, v in selector.items()) and self.is_ready(p)
            ]
            n = int(self.rps * dt + self.rng.random())
            for _ in range(n):
                if not endpoints:
                    self.samples.append((self.now, None, 503, 0.0))
                    continue
                pod = self.rng.choice(endpoints)
                env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
                drill = json.loads(env.get("LLMCTL_DRILL") or "{}")
                code = 500 if self.rng.random() < float(drill.get("error_rate", 0)) else 200
                latency = BASE_LATENCY_S * (1 + self.rng.random()) + float(drill.get("delay_s", 0))
                self.samples.append((self.now, pod["labels"]["llmctl.io/version"], code, latency))

    def window(self, service: str, version: str, since: float) -> dict[str, Any]:
        rows = [s for s in self.samples if s[1] == version and s[0] >= since]
        lat = sorted(s[3] for s in rows)
        p99 = lat[max(0, -(-len(lat) * 99 // 100) - 1)] if lat else None
        return {
            "version": version,
            "requests": len(rows),
            "errors": sum(1 for s in rows if s[2] >= 500),
            "p50_s": lat[len(lat) // 2] if lat else None,
            "p99_s": p99,
            "inflight": 0,
        }

    # ------------------------------------------------------------ views

    def deployment_status(self, name: str) -> dict:
        pods = [p for p in self.pods.values() if self.replica_sets.get(p["rs"], {}).get("owner") == name]
        ready = sum(1 for p in pods if self.is_ready(p))
        return {"replicas": len(pods), "readyReplicas": ready or None, "availableReplicas": ready or None}


class _List:
    def __init__(self, items):
        self.items = items


class FakeAppsV1Api:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster

    def _out(self, name: str):
        d = copy.deepcopy(self.c.deployments[name])
        d["status"] = self.c.deployment_status(name)
        return self.c.to_model(d, "V1Deployment")

    def create_namespaced_deployment(self, namespace: str, body: Any):
        d = self.c.to_dict(body)
        name = d["metadata"]["name"]
        if name in self.c.deployments:
            raise ApiException(status=409, reason=f"deployment {name} already exists")
        d["metadata"]["namespace"] = namespace
        d["metadata"]["generation"] = 1
        self.c.deployments[name] = d
        self.c.reconcile()
        return self._out(name)

    def read_namespaced_deployment(self, name: str, namespace: str):
        if name not in self.c.deployments:
            raise self.c.not_found(name)
        return self._out(name)

    def patch_namespaced_deployment(self, name: str, namespace: str, body: Any):
        if name not in self.c.deployments:
            raise self.c.not_found(name)
        _merge(self.c.deployments[name], self.c.to_dict(body))
        self.c.deployments[name]["metadata"]["generation"] += 1
        self.c.reconcile()
        return self._out(name)

    def delete_namespaced_deployment(self, name: str, namespace: str, **_: Any):
        if name not in self.c.deployments:
            raise self.c.not_found(name)
        del self.c.deployments[name]
        self.c.reconcile()

    def list_namespaced_deployment(self, namespace: str, label_selector: str | None = None):
        names = [n for n, d in self.c.deployments.items() if _selector_matches(label_selector, d["metadata"]["labels"])]
        return _List([self._out(n) for n in names])

    def list_namespaced_replica_set(self, namespace: str, label_selector: str | None = None):
        items = [
            self.c.to_model(
                {
                    "metadata": {"name": rs["name"], "labels": rs["template"]["metadata"]["labels"]},
                    "spec": {"replicas": rs["replicas"], "selector": {"matchLabels": {}}},
                },
                "V1ReplicaSet",
            )
            for rs in self.c.replica_sets.values()
            if _selector_matches(label_selector, rs["template"]["metadata"]["labels"])
        ]
        return _List(items)


class FakeCoreV1Api:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster

    def list_namespaced_pod(self, namespace: str, label_selector: str | None = None):
        items = []
        for p in self.c.pods.values():
            if not _selector_matches(label_selector, p["labels"]):
                continue
            ready = self.c.is_ready(p)
            items.append(
                self.c.to_model(
                    {
                        "metadata": {"name": p["name"], "labels": p["labels"]},
                        "spec": {**p["spec"], "nodeName": p["node"]},
                        "status": {
                            "phase": "Running" if p["node"] else "Pending",
                            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                        },
                    },
                    "V1Pod",
                )
            )
        return _List(items)

    def list_node(self):
        return _List([self.c.to_model({"metadata": {"name": n}}, "V1Node") for n in self.c.nodes])

    def read_namespaced_service(self, name: str, namespace: str):
        if name not in self.c.services:
            raise self.c.not_found(name)
        return self.c.to_model(self.c.services[name], "V1Service")

    def create_namespaced_service(self, namespace: str, body: Any):
        d = self.c.to_dict(body)
        if d["metadata"]["name"] in self.c.services:
            raise ApiException(status=409, reason="exists")
        self.c.services[d["metadata"]["name"]] = d
        return self.c.to_model(d, "V1Service")

    def delete_namespaced_service(self, name: str, namespace: str, **_: Any):
        if self.c.services.pop(name, None) is None:
            raise self.c.not_found(name)

    def read_namespaced_secret(self, name: str, namespace: str):
        if name not in self.c.secrets:
            raise self.c.not_found(name)
        return self.c.to_model(self.c.secrets[name], "V1Secret")

    def create_namespaced_secret(self, namespace: str, body: Any):
        d = self.c.to_dict(body)
        self.c.secrets[d["metadata"]["name"]] = d
        return self.c.to_model({"metadata": d["metadata"]}, "V1Secret")
