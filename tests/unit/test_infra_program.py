"""The Pulumi program under Pulumi's unit-test mocks (`pulumi.runtime.set_mocks`; no CLI, no cluster).

Each render runs in a fresh context (Pulumi's runtime settings are context variables), so the
tests do not share runtime state; the reference renders are pure, so they are made once per module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi
import pytest

from controlplane.errors import ConfigurationError
from controlplane.infra import addons
from controlplane.infra import manifests as m
from controlplane.infra.render import RecordingMocks, render, run_under_mocks, write_render
from controlplane.ray_cluster import ray_env
from controlplane.ray_settings import SERVE_PROXY_ENV
from controlplane.spec import ClusterSpec, load_spec, validate

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "examples" / "cluster-reference.yaml"
AWS = ROOT / "examples" / "cluster-aws.yaml"
TOKEN = "tok-0123456789abcdef-do-not-leak"
PASSWORD = "pw-fedcba9876543210-do-not-leak"


def _spec(path: Path = REFERENCE, **changes: Any) -> ClusterSpec:
    data = load_spec(ClusterSpec, path).model_dump(mode="json")
    for dotted, value in changes.items():
        target = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[leaf] = value
    return validate(ClusterSpec, data)


@pytest.fixture(scope="module")
def reference() -> RecordingMocks:
    return render(load_spec(ClusterSpec, REFERENCE))


def pod_specs(rec: RecordingMocks) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod labels, pod spec) of every pod the program would start."""
    found = []
    for rc in rec.of_kind("RayCluster"):
        head = rc["spec"]["headGroupSpec"]["template"]
        found.append((f"RayCluster/{rc['metadata']['name']}/head", head["metadata"]["labels"], head["spec"]))
        for wg in rc["spec"]["workerGroupSpecs"]:
            t = wg["template"]
            found.append((f"RayCluster/{wg['groupName']}", t["metadata"]["labels"], t["spec"]))
    for pt in rec.of_kind("PodTemplate"):
        found.append(
            (f"PodTemplate/{pt['metadata']['name']}", pt["template"]["metadata"]["labels"], pt["template"]["spec"])
        )
    for d in rec.of_kind("Deployment"):
        t = d["spec"]["template"]
        found.append((f"Deployment/{d['metadata']['name']}", t["metadata"]["labels"], t["spec"]))
    return found


def gpus_of(pod: dict[str, Any]) -> int:
    return sum(int(c["resources"]["limits"].get(m.GPU_RESOURCE, 0)) for c in pod["containers"] if "resources" in c)


def test_reference_ray_workers_add_up_to_928_gpus(reference):
    (rc,) = reference.of_kind("RayCluster")
    total = 0
    for wg in rc["spec"]["workerGroupSpecs"]:
        container = wg["template"]["spec"]["containers"][0]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests[m.GPU_RESOURCE] == limits[m.GPU_RESOURCE]
        assert wg["replicas"] == wg["minReplicas"] == wg["maxReplicas"]
        total += wg["replicas"] * int(limits[m.GPU_RESOURCE])
    assert total == 928 == load_spec(ClusterSpec, REFERENCE).total_gpus
    assert gpus_of(rc["spec"]["headGroupSpec"]["template"]["spec"]) == 0


def test_every_ray_process_gives_serve_proxies_the_same_check_bounds(reference, tmp_path):
    """A proxy on a busy node is not killed for a slow readiness or health answer, on Kubernetes
    as on the local cluster (controlplane.ray_cluster.ray_env)."""
    want = [{"name": k, "value": v} for k, v in SERVE_PROXY_ENV.items()]
    ray_pods = [(w, pod) for w, _labels, pod in pod_specs(reference) if w.startswith("RayCluster/")]
    assert len(ray_pods) >= 2  # the head and the worker groups
    for where, pod in ray_pods:
        env = pod["containers"][0]["env"]
        assert all(e in env for e in want), where
    local = ray_env(tmp_path / "token")
    assert {k: local[k] for k in SERVE_PROXY_ENV} == SERVE_PROXY_ENV


def test_every_gpu_pod_tolerates_the_taint_and_selects_its_product(reference):
    spec = load_spec(ClusterSpec, REFERENCE)
    groups = {g.name: g for g in spec.node_groups}
    gpu_pods = [(w, labels, pod) for w, labels, pod in pod_specs(reference) if gpus_of(pod)]
    assert len(gpu_pods) == 2  # the A100 worker group and the serving template
    for where, labels, pod in gpu_pods:
        group = groups[labels[m.GROUP_LABEL]]
        assert pod["nodeSelector"][spec.kubernetes.gpu_product_label] == m.GPU_PRODUCTS[group.gpu_model], where
        for key, value in group.node_labels.items():
            assert pod["nodeSelector"][key] == value, where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], where
        shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory", where


def test_rdma_settings_reach_training_pods_only_when_asked(reference):
    (rc,) = reference.of_kind("RayCluster")
    pod = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    assert {"name": "NCCL_IB_GID_INDEX", "value": "3"} in container["env"]
    assert "hostNetwork" not in pod
    plain = render(_spec(network__rdma=False, network__nccl_env={}))
    (rc2,) = plain.of_kind("RayCluster")
    c2 = rc2["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "rdma/rdma_shared_device_a" not in c2["resources"]["limits"] and "securityContext" not in c2


def _service_types(value: Any) -> list[str]:
    """Every `type` under a `service`/`serviceType` key anywhere in Helm values."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "service" and isinstance(v, dict) and "type" in v:
                found.append(v["type"])
            found += _service_types(v)
    elif isinstance(value, list):
        for v in value:
            found += _service_types(v)
    return found


def _assert_not_exposed(rec: RecordingMocks) -> None:
    for svc in rec.of_kind("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]
    assert not rec.of_kind("Ingress")
    (rc,) = rec.of_kind("RayCluster")
    head = rc["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert not head["template"]["spec"].get("hostNetwork")
    for where, _, pod in pod_specs(rec):
        for c in pod["containers"]:
            assert all("hostPort" not in p for p in c.get("ports", [])), where
    for release in rec.helm_releases():
        assert set(_service_types(release["values"])) <= {"ClusterIP"}, release["name"]


def test_nothing_exposes_the_ray_dashboard_or_jobs_api(reference):
    _assert_not_exposed(reference)
    policies = {
        (p["metadata"]["namespace"], p["metadata"]["name"]): p["spec"] for p in reference.of_kind("NetworkPolicy")
    }
    deny = policies[("llmctl", "default-deny-ingress")]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    ray_rules = [s for s in policies.values() if s["podSelector"].get("matchLabels", {}).get("ray.io/cluster")]
    for spec in ray_rules:
        for rule in spec["ingress"]:
            for peer in rule["from"]:
                if "namespaceSelector" in peer:  # only Prometheus, only the metrics port
                    assert peer["namespaceSelector"]["matchLabels"] == {
                        "kubernetes.io/metadata.name": "llmctl-monitoring"
                    }
                    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
                else:
                    assert peer == {"podSelector": {}}  # pods of the same namespace


def test_host_network_keeps_the_head_off_the_host_and_admits_only_node_cidrs():
    rec = render(_spec(network__host_network=True, network__node_cidrs=["10.10.0.0/16"]))
    _assert_not_exposed(rec)
    (rc,) = rec.of_kind("RayCluster")
    assert rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["hostNetwork"] is True
    (policy,) = [p for p in rec.of_kind("NetworkPolicy") if p["metadata"]["name"] == "ray-from-namespace"]
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": "10.10.0.0/16"}} in peers and len(peers) == 2


def test_serving_pods_request_exactly_one_gpu(reference):
    templates = reference.of_kind("PodTemplate")
    assert templates and all(t["metadata"]["namespace"] == "llmctl-serving" for t in templates)
    for t in templates:
        (container,) = t["template"]["spec"]["containers"]
        assert container["resources"]["requests"][m.GPU_RESOURCE] == "1"
        assert container["resources"]["limits"][m.GPU_RESOURCE] == "1"
    (limits,) = reference.of_kind("LimitRange")
    assert limits["spec"]["limits"] == [{"type": "Container", "max": {m.GPU_RESOURCE: "1"}}]
    (quota,) = reference.of_kind("ResourceQuota")
    assert quota["spec"]["hard"] == {f"requests.{m.GPU_RESOURCE}": "16"}


def _by_key(rec: RecordingMocks) -> dict[tuple[str, str, str], Any]:
    objs = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in rec.kubernetes_objects()}
    objs.update({("HelmRelease", r["namespace"], r["name"]): r for r in rec.helm_releases()})
    return objs


def test_changing_the_node_count_changes_only_the_worker_group_and_the_in_cluster_spec(reference):
    before = _by_key(reference)
    assert before == _by_key(render(load_spec(ClusterSpec, REFERENCE)))  # deterministic, isolated renders
    from pulumi.runtime.settings import ROOT, SETTINGS

    assert SETTINGS.monitor is None and ROOT.get() is None  # no render leaks runtime state into this context
    after = _by_key(render(_spec(node_groups__1__node_count=100)))
    assert before.keys() == after.keys()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("RayCluster", "llmctl", "reference"), ("ConfigMap", "llmctl", "llmctl-cluster")}
    old_rc, new_rc = before[("RayCluster", "llmctl", "reference")], after[("RayCluster", "llmctl", "reference")]
    (old_wg,), (new_wg,) = old_rc["spec"]["workerGroupSpecs"], new_rc["spec"]["workerGroupSpecs"]
    assert (new_wg["replicas"], new_wg["minReplicas"], new_wg["maxReplicas"]) == (100, 100, 100)
    strip = lambda wg: {k: v for k, v in wg.items() if k not in ("replicas", "minReplicas", "maxReplicas")}  # noqa: E731
    assert strip(old_wg) == strip(new_wg)
    assert old_rc["spec"]["headGroupSpec"] == new_rc["spec"]["headGroupSpec"]


def _with_secret_config(spec: ClusterSpec, mocks: RecordingMocks, then=None):
    def program_under_config():
        from controlplane.infra import program

        keys = ["llmctl:rayAuthToken", "llmctl:grafanaAdminPassword"]
        pulumi.runtime.set_all_config(dict(zip(keys, (TOKEN, PASSWORD), strict=True)), secret_keys=keys)
        return program.main(spec, None)

    return run_under_mocks(program_under_config, mocks, then)


def test_secrets_from_secret_config_stay_secret(tmp_path):
    mocks = RecordingMocks()
    _with_secret_config(load_spec(ClusterSpec, REFERENCE), mocks)
    holders = {(r.name, tuple(r.secret_paths)) for r in mocks.registrations if TOKEN in json.dumps(r.inputs)}
    assert holders == {("llmctl-ray-auth", ("stringData",))}
    holders = {(r.name, tuple(r.secret_paths)) for r in mocks.registrations if PASSWORD in json.dumps(r.inputs)}
    assert holders == {("llmctl-grafana-admin", ("stringData",))}
    for r in mocks.registrations:  # every other use is a reference to the Secret
        if r.type == "kubernetes:ray.io/v1:RayCluster":
            env = r.inputs["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in env
            (tok,) = [e for e in env if e["name"] == "RAY_AUTH_TOKEN"]
            assert tok["valueFrom"] == {"secretKeyRef": {"name": "llmctl-ray-auth", "key": "auth_token"}}
    files = write_render(mocks, tmp_path / "out")
    text = "".join(f.read_text() for f in files)
    assert TOKEN not in text and PASSWORD not in text and "llmctl-ray-auth" in text


def test_eks_stack_declares_node_groups_and_a_secret_kubeconfig():
    mocks = RecordingMocks()

    async def secrecy(outputs):
        return await outputs.kubeconfig.is_secret(), await outputs.ray_address.is_secret()

    assert _with_secret_config(load_spec(ClusterSpec, AWS), mocks, secrecy) == (True, False)
    groups = {r.name: r.inputs for r in mocks.registrations if r.type == "eks:index:ManagedNodeGroup"}
    assert set(groups) == {"reference-aws-system", "reference-aws-a100", "reference-aws-serve"}
    a100 = groups["reference-aws-a100"]
    assert a100["instanceTypes"] == ["p4de.24xlarge"] and a100["scalingConfig"]["desiredSize"] == 16
    assert a100["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
    assert a100["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert "taints" not in groups["reference-aws-system"]
    (cluster,) = [r for r in mocks.registrations if r.type == "eks:index:Cluster"]
    assert cluster.inputs["endpointPublicAccess"] is False
    k8s_objects = [r for r in mocks.registrations if r.type.startswith("kubernetes:") and r.custom]
    assert k8s_objects and all("reference-aws-k8s" in r.provider for r in k8s_objects)


def test_dashboards_become_labelled_configmaps(tmp_path):
    dashboards = tmp_path / "dashboards"
    dashboards.mkdir()
    (dashboards / "llmctl-training.json").write_text(json.dumps({"uid": "llmctl-training", "panels": []}))
    (dashboards / "llmctl-power.json").write_text(json.dumps({"uid": "llmctl-power", "panels": []}))
    (dashboards / "notes.txt").write_text("not a dashboard")
    rec = render(load_spec(ClusterSpec, REFERENCE), dashboards_dir=dashboards)
    cms = [c for c in rec.of_kind("ConfigMap") if c["metadata"]["labels"].get(addons.DASHBOARD_LABEL) == "1"]
    assert sorted(c["metadata"]["name"] for c in cms) == [
        "llmctl-dashboard-llmctl-power",
        "llmctl-dashboard-llmctl-training",
    ]
    assert all(c["metadata"]["namespace"] == "llmctl-monitoring" for c in cms)
    (release,) = [r for r in rec.helm_releases() if r["chart"] == "kube-prometheus-stack"]
    assert release["values"]["grafana"]["sidecar"]["dashboards"]["label"] == addons.DASHBOARD_LABEL
    assert release["values"]["grafana"]["admin"]["existingSecret"] == "llmctl-grafana-admin"
    (dashboards / "broken.json").write_text("{not json")
    with pytest.raises(ConfigurationError, match="broken.json: not valid JSON"):
        render(load_spec(ClusterSpec, REFERENCE), dashboards_dir=dashboards)


def test_alert_rules_become_one_prometheus_rule_with_runbook_links(tmp_path):
    """The repository's dashboards/alerts.yaml, every alert of it, with runbook links made absolute."""
    import yaml

    from controlplane.infra.settings import InfraSettings

    base = "https://example.org/llmctl/blob/main/"
    settings = InfraSettings(runbook_base_url=base)
    rec = render(load_spec(ClusterSpec, REFERENCE), settings=settings, dashboards_dir=ROOT / "dashboards")
    (rule,) = rec.of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["namespace"] == "llmctl-monitoring"
    source = yaml.safe_load((ROOT / "dashboards" / addons.ALERTS_FILE).read_text())
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    expected = [r for g in source["groups"] for r in g["rules"] if "alert" in r]
    assert [a["alert"] for a in alerts] == [a["alert"] for a in expected] and len(alerts) >= 14
    assert [a["expr"] for a in alerts] == [a["expr"] for a in expected]
    for a in alerts:
        url = a["annotations"]["runbook_url"]
        assert url.startswith(base + "runbooks/") and (ROOT / url.removeprefix(base)).is_file(), url
    # the chart selects rules from every namespace (no release label needed)
    (release,) = [r for r in rec.helm_releases() if r["chart"] == "kube-prometheus-stack"]
    assert release["values"]["prometheus"]["prometheusSpec"]["ruleSelectorNilUsesHelmValues"] is False
    # without a base URL the links stay as written; a broken rule file stops the program first
    plain = render(load_spec(ClusterSpec, REFERENCE), dashboards_dir=ROOT / "dashboards").of_kind("PrometheusRule")
    assert plain[0]["spec"]["groups"][0]["rules"][0]["annotations"]["runbook_url"].startswith("runbooks/")
    bad = tmp_path / "dashboards"
    bad.mkdir()
    (bad / addons.ALERTS_FILE).write_text("groups:\n  - name: g\n    rules:\n      - alert: NoExpr\n")
    with pytest.raises(ConfigurationError, match=r"groups\[0\]\.rules\[0\] needs `alert` \(or `record`\) and `expr`"):
        render(load_spec(ClusterSpec, REFERENCE), dashboards_dir=bad)
    assert not render(load_spec(ClusterSpec, REFERENCE), dashboards_dir=tmp_path / "none").of_kind("PrometheusRule")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "local"}, "kind: infra/ provisions kind 'kubernetes'"),
        ({"storage__root": "~/.llmctl"}, "storage.root: '~/.llmctl' must be an absolute path"),
        ({"node_groups__2__gpu_model": "B300", "node_groups__2__gpu_product": None}, "node_groups.2.gpu_product"),
        ({"node_groups__2__node_labels": {}, "node_groups__2__gpu_model": "A100-80GB"}, "selects the same nodes"),
        ({"node_groups__2__gpus_per_node": 0, "node_groups__2__gpu_model": None}, "node_groups.2.gpus_per_node"),
    ],
)
def test_specs_infra_cannot_provision_fail_with_one_line(changes, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        m.check_spec(_spec(**changes))
    assert "\n" not in str(info.value)


def test_host_network_without_node_cidrs_is_a_spec_error():
    with pytest.raises(ConfigurationError, match="host_network requires node_cidrs"):
        _spec(network__host_network=True)


def test_the_pulumi_project_entry_point_reads_the_stack_config(monkeypatch):
    import runpy

    monkeypatch.chdir(ROOT / "infra")
    mocks = RecordingMocks()

    def entry_point() -> None:
        secret = ["llmctl:rayAuthToken", "llmctl:grafanaAdminPassword"]
        config = {
            "llmctl:clusterSpec": "../examples/cluster-reference.yaml",
            "llmctl:prometheusStorageSize": "2Ti",
            "llmctl:rayAuthToken": TOKEN,
            "llmctl:grafanaAdminPassword": PASSWORD,
        }
        pulumi.runtime.set_all_config(config, secret_keys=secret)
        runpy.run_path("__main__.py", run_name="__main__")

    run_under_mocks(entry_point, mocks)
    (rc,) = mocks.of_kind("RayCluster")
    assert rc["spec"]["workerGroupSpecs"][0]["replicas"] == 116
    (kps,) = [r for r in mocks.helm_releases() if r["chart"] == "kube-prometheus-stack"]
    storage = kps["values"]["prometheus"]["prometheusSpec"]["storageSpec"]["volumeClaimTemplate"]["spec"]
    assert storage["resources"]["requests"]["storage"] == "2Ti"


def test_the_entry_point_without_secret_config_fails_before_declaring_secrets(monkeypatch):
    monkeypatch.chdir(ROOT / "infra")
    mocks = RecordingMocks()

    def entry_point() -> None:
        from controlplane.infra import program

        pulumi.runtime.set_all_config({"llmctl:clusterSpec": "../examples/cluster-reference.yaml"}, secret_keys=[])
        program.main()

    with pytest.raises(pulumi.ConfigMissingError, match="rayAuthToken"):
        run_under_mocks(entry_point, mocks)
    assert not [r for r in mocks.registrations if r.type == "kubernetes:core/v1:Secret"]


def test_rendered_objects_match_the_kubernetes_api_schema(reference):
    """Round-trip through the Kubernetes client's models: a misspelt or misplaced field is dropped, and shows."""
    from kubernetes.client import ApiClient

    api = ApiClient()

    def round_trip(obj: dict[str, Any], model: str) -> dict[str, Any]:
        return api.sanitize_for_serialization(api.deserialize(json.dumps(obj), model, "application/json"))

    checked = 0
    for obj in reference.kubernetes_objects():
        if obj["apiVersion"] in ("v1", "apps/v1", "networking.k8s.io/v1"):
            assert round_trip(obj, f"V1{obj['kind']}") == obj, obj["metadata"]["name"]
            checked += 1
    (rc,) = reference.of_kind("RayCluster")
    for template in [rc["spec"]["headGroupSpec"]["template"], *(w["template"] for w in rc["spec"]["workerGroupSpecs"])]:
        assert round_trip(template, "V1PodTemplateSpec") == template
    assert checked == len(reference.kubernetes_objects()) - 2  # all but the RayCluster and the PodMonitor
