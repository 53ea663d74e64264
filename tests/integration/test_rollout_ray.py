"""Serving and rollouts on a real Ray Serve with real vLLM (the CPU build), tiny models, real faults.

One Ray instance, one service and one ledger for the module (the stable version carries
over from test to test, as it would in production); continuous HTTP traffic from threads.
The OpenAI API tests come first and share the first version's vLLM engine: an engine
starts once per version, not once per test. Candidates that only exist to be rolled back by a
drill run the transformers engine, which starts in seconds.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from controlplane.context import Context
from controlplane.procs import free_port
from controlplane.ray_settings import SERVE_PROXY_ENV
from controlplane.rollout import store
from controlplane.rollout.controller import RolloutController
from controlplane.rollout.ray_backend import RayServeBackend
from controlplane.spec import DrillSpec, EvalFiles, EvalMinimums, RolloutSpec, ServeOptions
from tests.serving_factory import make_run

pytestmark = pytest.mark.integration
RUN = "canary"
JGLUE = Path(__file__).resolve().parent.parent / "unit" / "data" / "jglue"  # official JGLUE layouts


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("rollout-home")


@pytest.fixture(autouse=True)
def llmctl_home(home, monkeypatch):  # overrides the per-test home: the service outlives each test
    monkeypatch.setenv("LLMCTL_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def cluster(home):
    import ray
    from ray import serve

    env = pytest.MonkeyPatch()
    env.setenv("LLMCTL_HOME", str(home))
    for k, v in SERVE_PROXY_ENV.items():  # as the project's clusters set them (a proxy on a busy host)
        env.setenv(k, v)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ctx = Context.load()
    make_run(ctx, RUN, steps=(10, 20, 30, 40, 50))
    port = free_port()
    backend = RayServeBackend(ctx.cluster)
    base = dict(
        name="svc",
        replicas=1,  # one vLLM engine per version batches every request; 2 cores hold no more
        gpus_per_replica=0,
        traffic_steps=[10, 50, 100],
        analysis_window_s=2.0,
        min_requests=8,
        max_error_rate=0.05,
        max_p99_latency_s=2.0,
        max_latency_ratio=3.0,
        latency_slack_s=0.3,
        drain_s=0.5,
        deploy_timeout_s=600,  # a bound, not an expectation: a vLLM engine starts in 30-90 s here
        # eager: no graph compilation, so an engine starts sooner; continuous batching is the same
        serve=ServeOptions(port=port, cpus_per_replica=0.25, enforce_eager=True),
    )
    t0 = time.monotonic()
    first = RolloutController(ctx, backend).start(RolloutSpec(model=f"{RUN}@10", **base))
    print(f"first version (one vLLM engine) served after {time.monotonic() - t0:.1f}s")
    assert first["state"] == store.PROMOTED, first
    yield ctx, backend, base, f"http://127.0.0.1:{port}/svc/v1/completions"
    serve.shutdown()
    ray.shutdown()
    env.undo()


@dataclass
class Result:
    start: float
    end: float
    code: int
    version: str | None


class Traffic:
    """Threads that POST completions back to back and record every outcome."""

    def __init__(self, url: str, threads: int = 6):
        self.url, self.results, self.stop = url, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _loop(self, i: int) -> None:
        with httpx.Client(timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                t0 = time.time()
                try:
                    r = client.post(self.url, json={"prompt": f"日本の{i}-{n}", "max_tokens": 4})
                    code, version = r.status_code, r.headers.get("x-llmctl-version")
                except httpx.HTTPError:
                    code, version = 0, None
                with self.lock:
                    self.results.append(Result(t0, time.time(), code, version))
                n += 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def started_after(self, t: float, n: int = 6, timeout: float = 60.0) -> list[Result]:
        """The requests that started after `t`, once `n` of them have ended (bounded by `timeout`):
        under load one request can take more than a second, so a fixed sleep may see none."""
        deadline = time.time() + timeout
        while True:
            with self.lock:
                after = [r for r in self.results if r.start > t]
            if len(after) >= n or time.time() > deadline:
                return after
            time.sleep(0.1)

    def between(self, a: float, b: float) -> list[Result]:
        with self.lock:
            return [r for r in self.results if r.start >= a and r.end <= b]


def stable_of(ctx) -> str:
    return store.get_service(ctx.ledger, "svc")["stable_version"]


def sse_events(r: httpx.Response) -> list:
    """The data payloads of a server-sent event stream, [DONE] last."""
    out = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_completions_and_chat_streamed_and_not(cluster):
    ctx, _backend, _base, url = cluster
    version = stable_of(ctx)
    base = url.removesuffix("/completions")
    prompt = {"prompt": "日本の首都は", "max_tokens": 12, "temperature": 0}
    with httpx.Client(timeout=60) as c:
        whole = c.post(url, json=prompt)
        assert whole.status_code == 200, whole.text
        body = whole.json()
        assert body["object"] == "text_completion" and body["model"] == version
        assert whole.headers["x-llmctl-version"] == version
        usage = body["usage"]
        assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] >= 1
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        text = body["choices"][0]["text"]
        assert body["choices"][0]["finish_reason"] in ("stop", "length")

        with c.stream("POST", url, json={**prompt, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        assert events[-1] == "[DONE]" and events[-2]["usage"] == usage  # the usage chunk, then [DONE]
        chunks = events[:-2]
        assert len(chunks) >= 2 and all(e["object"] == "text_completion" for e in chunks)
        assert "".join(e["choices"][0]["text"] for e in chunks) == text  # greedy: the same text, in pieces
        assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]

        chat = {"messages": [{"role": "user", "content": "富士山は"}], "max_tokens": 8}
        answer = c.post(f"{base}/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        reply = answer.json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
        with c.stream("POST", f"{base}/chat/completions", json={**chat, "stream": True}) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert streamed == reply["choices"][0]["message"]["content"]

        models = c.get(f"{base}/models").json()
        assert [m["id"] for m in models["data"]] == [version]
        assert c.post(url, json={"prompt": "x", "max_tokens": 0}).status_code == 400
        bad = c.post(f"{base}/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        assert bad.status_code == 400 and "messages[0].role" in bad.json()["error"]["message"]

    svc = store.get_service(ctx.ledger, "svc")
    text = httpx.get(svc["info"]["metrics_url"], timeout=10).text
    c_ = ctx.cluster.name
    ttft = f'llmctl_serve_time_to_first_token_seconds_count{{cluster="{c_}",version="{version}"}}'
    assert ttft in text and float(text.split(ttft)[1].split()[0]) >= 4
    assert f'llmctl_serve_inter_token_latency_seconds_count{{cluster="{c_}",version="{version}"}}' in text
    kv = [ln for ln in text.splitlines() if ln.startswith("llmctl_serve_kv_cache_usage_ratio{")]
    assert kv and all(0.0 <= float(ln.split()[-1]) <= 1.0 for ln in kv) and f'version="{version}"' in kv[0]


def _peak_running(ctx: Context, version: str) -> float:
    """The engine's own count: the most requests one of its steps has run (0 before any report)."""
    text = httpx.get(store.get_service(ctx.ledger, "svc")["info"]["metrics_url"], timeout=10).text
    rows = [ln for ln in text.splitlines() if ln.startswith("llmctl_serve_running_requests_peak{")]
    return max((float(ln.split()[-1]) for ln in rows if f'version="{version}"' in ln), default=0.0)


def test_sixteen_concurrent_clients_share_the_engines_batches(cluster):
    """Continuous batching: 16 clients at once are run in the same engine steps, not one by one.

    Read from vLLM's scheduler (the most requests one step ran), not from wall times, which a
    loaded machine makes noise of.
    """
    ctx, _backend, _base, url = cluster
    version = stable_of(ctx)
    body = {"max_tokens": 96, "temperature": 0, "stop": [], "ignore_eos": True}
    with httpx.Client(timeout=120) as c:
        for i in range(3):  # one after another: each step runs one request
            c.post(url, json={**body, "prompt": f"一人目の{i}"}).raise_for_status()
    alone = _peak_running(ctx, version)

    def one(i: int) -> int:
        with httpx.Client(timeout=120) as c:
            r = c.post(url, json={**body, "prompt": f"同時に{i}番目の"})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(one, range(16)))
    assert all(n >= 1 for n in tokens)
    together = _peak_running(ctx, version)
    assert 1 <= alone < together, f"peak batch one at a time {alone}, 16 clients at once {together}"
    assert together >= 4, f"16 concurrent clients, but at most {together} ran in one engine step"


def test_candidate_below_minimums_never_serves(cluster, monkeypatch):
    """The gate scores official-layout files (relative paths, train splits); a second rollout
    of the same candidate with the same setup reuses that evaluation instead of running it again."""
    ctx, backend, base, url = cluster
    stable = stable_of(ctx)
    monkeypatch.chdir(JGLUE)
    files = EvalFiles(
        jcommonsenseqa="jcommonsenseqa-valid.json",
        jcommonsenseqa_train="./jcommonsenseqa-train.json",
        jsquad="jsquad-valid.json",
        jsquad_train="jsquad-train.json",
        prompt_version="0.2",
        limit=5,
    )
    spec = RolloutSpec(
        model=f"{RUN}@20",
        min_eval=EvalMinimums(jcommonsenseqa_accuracy=99.0, jsquad_exact_match=50.0),
        eval=files,
        **base,
    )
    with Traffic(url, threads=2) as traffic:
        row = RolloutController(ctx, backend).start(spec)
        time.sleep(0.5)
    assert row["state"] == store.REJECTED and "jcommonsenseqa_accuracy" in row["reason"]
    assert row["evaluation_id"] is not None
    assert not backend.has_version(spec, "canary-s20")
    assert backend.window(spec, "canary-s20", 0)["requests"] == 0
    assert {r.version for r in traffic.results} == {stable}
    assert all(r.code == 200 for r in traffic.results)
    ev = store.get_evaluation(ctx.ledger, row["evaluation_id"])
    d = ev["detail"]
    assert d["jcommonsenseqa"]["train"] == str(JGLUE / "jcommonsenseqa-train.json")
    assert d["jsquad"]["file"] == str(JGLUE / "jsquad-valid.json")
    assert d["jcommonsenseqa"]["task_version"] == "jcommonsenseqa-1.1-0.2" and d["jsquad"]["train_size"] == 6
    assert ev["scores"]["jcommonsenseqa_n"] == 5 and 0 <= ev["scores"]["jsquad_exact_match"] <= 100
    again = RolloutController(ctx, backend).start(spec)
    assert again["state"] == store.REJECTED and again["evaluation_id"] == row["evaluation_id"]
    assert [d["action"] for d in store.decisions(ctx.ledger, row["rollout_id"])] == ["reject"]


@pytest.mark.parametrize(
    ("step", "drill", "why"),
    [(30, DrillSpec(error_rate=0.5, seed=1), "error rate"), (50, DrillSpec(delay_s=2.5), "p99")],
    ids=["errors", "slow"],
)
def test_faulty_candidate_rolls_back_while_stable_serves(cluster, step, drill, why):
    """The drill is the replica's own (jobs/serve/responder.py, in front of the engine), so these
    candidates run the transformers engine: each starts in seconds instead of a vLLM engine's
    minute or two. The vLLM candidates of this module are the ones that get promoted."""
    ctx, backend, base, url = cluster
    stable = stable_of(ctx)
    serve = base["serve"].model_copy(update={"engine": "transformers"})
    spec = RolloutSpec(model=f"{RUN}@{step}", drill=drill, **{**base, "min_requests": 4, "serve": serve})
    with Traffic(url) as traffic:
        time.sleep(0.5)
        row = RolloutController(ctx, backend).start(spec)
        t_end = time.time()
        after = traffic.started_after(t_end)
    cand = f"canary-s{step}"
    assert row["state"] == store.ROLLED_BACK, row
    assert why in row["reason"]
    decisions = store.decisions(ctx.ledger, row["rollout_id"])
    assert decisions[-1]["action"] == "rollback" and decisions[-1]["traffic_percent"] == 10
    assert decisions[-1]["figures"]["candidate"]["requests"] > 0
    assert stable_of(ctx) == stable and not backend.has_version(spec, cand)
    # Stable served every request routed to it, before, during and after.
    to_stable = [r for r in traffic.results if r.version == stable]
    assert to_stable and all(r.code == 200 for r in to_stable)
    assert all(r.version in (stable, cand) for r in traffic.results)
    assert len(after) >= 6, f"{len(after)} requests ended after the rollback"
    assert all(r.code == 200 and r.version == stable for r in after)
    runbooks_on_an_ended_rollout(row["rollout_id"], store.ROLLED_BACK)


def runbooks_on_an_ended_rollout(rollout_id: str, state: str) -> None:
    """Every rollout runbook's commands, in their order, through the real CLI, on a rollout that has
    ended: the reads say what happened, and `promote`/`abort` are refused in one line, exit 2
    (a request to a controller that is gone would never be acted on)."""
    from typer.testing import CliRunner

    from controlplane.cli.main import app
    from controlplane.observability import runbooks as rb

    names = [n for n in rb.runbook_names() if "ROLLOUT_ID" in rb.read_runbook(n)]
    assert len(names) >= 3, names
    ran = set()
    for name in names:
        text = rb.read_runbook(name)
        for command in sorted(dict.fromkeys(rb.llmctl_commands(text)), key=text.find):
            argv = shlex.split(command.replace("ROLLOUT_ID", rollout_id))[1:]
            res = CliRunner().invoke(app, argv)
            said, where = res.stdout + res.stderr, f"{name}: `{command}`"
            ran.add(" ".join(argv[:2]))
            if argv[:2] in (["rollout", "promote"], ["rollout", "abort"]):
                assert res.exit_code == 2, f"{where}: exit {res.exit_code}: {said}"
                assert f"already ended ({state})" in said and len(said.strip().splitlines()) == 1, f"{where}: {said}"
                continue
            assert res.exit_code == 0, f"{where}: exit {res.exit_code}: {said[-1500:]}"
            if argv[:2] in (["rollout", "status"], ["rollout", "history"]):
                assert rollout_id in said and state in said, f"{where}: {said}"
            else:
                assert said.strip(), f"{where} said nothing"
    assert {"rollout status", "rollout history", "rollout promote", "rollout abort", "node list"} <= ran, ran


def test_healthy_rollout_under_traffic_loses_no_request(cluster):
    ctx, backend, base, url = cluster
    old = stable_of(ctx)
    spec = RolloutSpec(model=f"{RUN}@40", **{**base, "analysis_window_s": 3.0})
    with Traffic(url) as traffic:
        time.sleep(0.5)
        t0 = time.time()
        row = RolloutController(ctx, backend).start(spec)
        t1 = time.time()
        tail = traffic.started_after(t1)
    assert row["state"] == store.PROMOTED, row
    during = traffic.between(t0, t1)
    assert len(during) >= 500, f"only {len(during)} requests during the rollout"
    assert all(r.code == 200 for r in traffic.results), {r.code for r in traffic.results}
    assert {r.version for r in during} == {old, "canary-s40"}
    assert len(tail) >= 6, f"{len(tail)} requests ended after the promotion"
    assert all(r.version == "canary-s40" for r in tail)
    assert stable_of(ctx) == "canary-s40" and not backend.has_version(spec, old)
    actions = [d["action"] for d in store.decisions(ctx.ledger, row["rollout_id"])]
    assert actions == ["advance", "advance", "promote"]
    # The metrics endpoint carries the DESIGN.md names.
    svc = store.get_service(ctx.ledger, "svc")
    text = httpx.get(svc["info"]["metrics_url"], timeout=10).text
    c = ctx.cluster.name  # every series says which cluster it is from, as the dashboards filter on it
    assert f'llmctl_serve_requests_total{{cluster="{c}",code="200",version="canary-s40"}}' in text
    assert "llmctl_serve_request_duration_seconds_bucket" in text and "llmctl_serve_tokens_total" in text
    assert (
        f'llmctl_rollout_traffic_ratio{{cluster="{c}",rollout_id="{row["rollout_id"]}",version="canary-s40"}} 1.0'
        in text
    )
