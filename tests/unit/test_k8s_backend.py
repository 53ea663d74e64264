"""The Kubernetes backend against a stateful fake of the API (no API server exists here)."""

from __future__ import annotations

import pytest

from controlplane.context import Context
from controlplane.rollout import store
from controlplane.rollout.controller import RolloutController
from controlplane.rollout.k8s_backend import SERVICE_LABEL, KubernetesBackend, split_replicas
from controlplane.spec import DrillSpec, RolloutSpec
from tests.k8s_fake import FakeCluster
from tests.serving_factory import make_run


@pytest.fixture
def setup(monkeypatch):
    monkeypatch.setenv("LLMCTL_SERVE_TOKEN", "s3cret-token")
    ctx = Context.load()
    make_run(ctx, "k8", steps=(10, 20, 30))
    fake = FakeCluster(nodes=4)
    backend = KubernetesBackend(
        fake.apps,
        fake.core,
        "llmctl-serving",
        fake,
        storage_root=ctx.storage,
        cluster_name="gpu-west",
        sleep=fake.advance,
        clock=fake.clock,
    )
    base = dict(
        name="chat",
        backend="kubernetes",
        replicas=2,
        traffic_steps=[10, 50, 100],
        analysis_window_s=30,
        min_requests=20,
        deploy_timeout_s=120,
    )

    def run(model: str, **kw) -> dict:
        ctrl = RolloutController(ctx, backend, poll_s=1.0, clock=fake.clock, sleep=fake.advance)
        return ctrl.start(RolloutSpec(model=model, **{**base, **kw}))

    return ctx, fake, backend, run


def pods_of(fake: FakeCluster, version: str) -> list[dict]:
    return [p for p in fake.pods.values() if p["labels"]["llmctl.io/version"] == version]


def test_split_replicas():
    assert split_replicas(4, {"s": 0.9, "c": 0.1}) == {"s": 3, "c": 1}
    assert split_replicas(4, {"s": 0.5, "c": 0.5}) == {"s": 2, "c": 2}
    assert split_replicas(2, {"s": 0.9, "c": 0.1}) == {"s": 1, "c": 1}
    assert split_replicas(4, {"c": 1.0}) == {"c": 4}


def test_first_version_pods_request_one_gpu_spread_across_nodes(setup):
    ctx, fake, backend, run = setup
    row = run("k8@10")
    assert row["state"] == "promoted"
    d = fake.deployments["chat-k8-s10"]
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname" and term["labelSelector"]["matchLabels"] == {
        SERVICE_LABEL: "chat"
    }
    assert c["args"][c["args"].index("--model-dir") + 1].startswith("/llmctl/runs/k8/artifacts/")
    assert c["args"][c["args"].index("--cluster") + 1] == "gpu-west"  # the metrics' cluster label
    assert c["args"][c["args"].index("--engine") + 1] == "auto"  # vLLM
    assert c["args"][c["args"].index("--max-num-seqs") + 1] == "64" and "--enforce-eager" not in c["args"]
    # The token reaches pods through a Secret, never the pod spec.
    assert "s3cret-token" not in str(d) and fake.secrets["chat-serve-token"]["stringData"]["token"] == "s3cret-token"
    nodes = [p["node"] for p in pods_of(fake, "k8-s10")]
    assert len(nodes) == 2 and len(set(nodes)) == 2 and None not in nodes
    assert fake.services["chat"]["spec"]["selector"] == {SERVICE_LABEL: "chat"}


def test_canary_promotes_without_dropping_requests(setup):
    ctx, fake, backend, run = setup
    run("k8@10")
    start = fake.clock()
    row = run("k8@20")
    assert row["state"] == "promoted", row
    during = [s for s in fake.samples if s[0] >= start]
    assert during and all(code == 200 for _, _, code, _ in during)
    assert {v for _, v, _, _ in during} == {"k8-s10", "k8-s20"}
    assert "chat-k8-s10" not in fake.deployments and len(pods_of(fake, "k8-s20")) == 2
    assert [d["action"] for d in store.decisions(ctx.ledger, row["rollout_id"])] == ["advance", "advance", "promote"]
    # At no moment did two serving pods share a node.
    assert len({p["node"] for p in fake.pods.values()}) == len(fake.pods)


def test_erroring_candidate_rolls_back(setup):
    ctx, fake, backend, run = setup
    run("k8@10")
    row = run("k8@20", drill=DrillSpec(error_rate=0.4))
    assert row["state"] == "rolled_back" and "error rate" in row["reason"]
    assert "chat-k8-s20" not in fake.deployments
    assert fake.deployments["chat-k8-s10"]["spec"]["replicas"] == 2
    assert all(fake.is_ready(p) for p in pods_of(fake, "k8-s10"))


def test_candidate_that_never_gets_ready_fails_and_stable_is_untouched(setup):
    ctx, fake, backend, run = setup
    run("k8@10")
    fake.broken_models.add("/llmctl/runs/k8/artifacts/export-step_000000020")  # its /health never answers
    row = run("k8@20", deploy_timeout_s=60)
    assert row["state"] == "failed" and "pods ready" in row["reason"]
    assert "chat-k8-s20" not in fake.deployments
    assert store.get_service(ctx.ledger, "chat")["stable_version"] == "k8-s10"


def test_no_free_gpu_node_fails_the_candidate_not_stable(setup):
    ctx, fake, backend, run = setup
    fake.nodes = {n: v for n, v in list(fake.nodes.items())[:2]}  # two single-GPU nodes, both busy
    run("k8@10")
    row = run("k8@20", deploy_timeout_s=60)
    # The candidate's first pod cannot be placed beside stable: it does not get ready in time.
    assert row["state"] == "failed"
    assert all(fake.is_ready(p) for p in pods_of(fake, "k8-s10")) and len(pods_of(fake, "k8-s10")) == 2
