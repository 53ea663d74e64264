"""The single-node server a Kubernetes serving pod runs: a real process on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from controlplane.context import Context
from controlplane.procs import free_port
from controlplane.rollout.export import export_checkpoint
from controlplane.rundir import RunDir
from tests.serving_factory import make_run

pytestmark = pytest.mark.integration
TOKEN = "test-token-4f1c"


def standalone(model_dir, version: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.serve",
        "standalone",
        "--model-dir",
        str(model_dir),
        "--version",
        version,
        *args,
    ]


def wait_healthy(base: str, log=None, timeout_s: float = 300) -> None:  # a vLLM engine starts in 30-120 s here
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    pytest.fail(f"server did not come up: {log.read_text()[-2000:] if log else ''}")


def test_token_required_metrics_exposed_token_never_logged(tmp_path):
    ctx = Context.load()
    make_run(ctx, "sa", steps=(10,))
    model_dir = export_checkpoint(RunDir.of(ctx.storage, "sa")).model_dir
    env = dict(os.environ, LLMCTL_SERVE_TOKEN=TOKEN, PYTHONPATH=os.getcwd(), LLMCTL_DRILL="")
    # Beyond loopback without a token: refused.
    bare = {k: v for k, v in env.items() if k != "LLMCTL_SERVE_TOKEN"}
    r = subprocess.run(
        standalone(model_dir, "v", "--host", "0.0.0.0"),
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "requires $LLMCTL_SERVE_TOKEN" in r.stderr

    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            standalone(model_dir, "sa-s10", "--port", str(port), "--engine", "transformers", "--cluster", "gpu-west"),
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, log)
        body = {"prompt": "日本の首都は", "max_tokens": 5}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert httpx.post(f"{base}/v1/completions", json=body, headers=bad, timeout=30).status_code == 401
        ok = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert ok.status_code == 200, ok.text
        data = ok.json()
        assert data["object"] == "text_completion" and data["model"] == "sa-s10"
        assert data["usage"]["completion_tokens"] <= 5 and isinstance(data["choices"][0]["text"], str)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        chat = {"messages": [{"role": "user", "content": "猫は"}], "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat, headers=auth, timeout=30) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]" and '"role": "assistant"' in lines[0]
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert 'llmctl_serve_requests_total{cluster="gpu-west",code="200",version="sa-s10"} 2.0' in metrics
        assert 'llmctl_serve_requests_total{cluster="gpu-west",code="401",version="none"} 2.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert TOKEN not in log.read_text()


def test_prometheus_windows_from_a_real_scrape(tmp_path):
    """PrometheusMetrics (the Kubernetes backend's window source) against a real Prometheus."""
    from controlplane.observability.prom import PrometheusServer
    from controlplane.rollout.k8s_backend import PrometheusMetrics

    ctx = Context.load()
    make_run(ctx, "pm", steps=(10,))
    model_dir = export_checkpoint(RunDir.of(ctx.storage, "pm")).model_dir
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.getcwd(), LLMCTL_DRILL='{"error_rate": 0.3, "seed": 3}')
    env.pop("LLMCTL_SERVE_TOKEN", None)
    cmd = standalone(model_dir, "pm-s10", "--port", str(port), "--enforce-eager")  # engine: auto, i.e. vLLM
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        with PrometheusServer({"llmctl-serve": [f"127.0.0.1:{port}"]}, tmp_path / "prom", scrape_interval_s=1) as prom:
            scraped = 'max(timestamp(llmctl_serve_requests_total{version="pm-s10"}))'
            prom.wait_for(scraped, timeout_s=60)
            since = time.time()
            prom.wait_for(f"{scraped} > {since:.3f}", timeout_s=60)  # a sample between `since` and the burst
            codes = [
                httpx.post(f"{base}/v1/completions", json={"prompt": "猫は", "max_tokens": 3}, timeout=30).status_code
                for _ in range(30)
            ]
            prom.wait_for(f"{scraped} > {time.time() + 1.0:.3f}", timeout_s=60)  # scraped after the burst
            w = PrometheusMetrics(prom.url).window("svc", "pm-s10", since - 1.5)
        engine_procs = psutil.Process(proc.pid).children(recursive=True)  # vLLM's engine core and worker
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    # SIGTERM takes the engine's processes with the server: none is left orphaned
    assert engine_procs
    _, alive = psutil.wait_procs(engine_procs, timeout=30)
    assert not alive, [p.pid for p in alive]
    errors = codes.count(500)
    assert 0 < errors < 30 and set(codes) <= {200, 500}
    # increase() extrapolates to the window's edges, and a loaded machine scrapes late: close, not
    # exact (a window that missed the burst reads 0; one that counted it twice reads ~60).
    assert abs(w["requests"] - 30) <= 12, w
    assert abs(w["errors"] - errors) <= max(3, errors // 2), (w, errors)
    assert w["p99_s"] is not None and 0 < w["p99_s"] <= 10
