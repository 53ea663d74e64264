"""The `llmctl_serve_*` metrics, on a prometheus_client endpoint of their own.

Each process that serves (the Ray Serve router replica, a standalone pod) owns one
`ServeMetrics` with its own registry, and exposes it on a port it reports back, so the names
reach Prometheus exactly as DESIGN.md spells them (Ray's own metrics export would prefix them).
Besides the Prometheus series it keeps the recent raw samples per version, from which the
rollout analysis reads exact windows (count, errors, p99).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
MAX_SAMPLES = 50_000


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


class ServeMetrics:
    """Every series carries the `cluster` label, as the other llmctl_* series do."""

    def __init__(self, cluster: str = "local") -> None:
        self.cluster = cluster
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmctl_serve_requests",
            "Completion requests by serving version and HTTP status code.",
            ["cluster", "version", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "llmctl_serve_request_duration_seconds",
            "Completion request latency as the client sees it, by serving version.",
            ["cluster", "version"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "llmctl_serve_tokens",
            "Completion tokens generated, by serving version.",
            ["cluster", "version"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llmctl_serve_time_to_first_token_seconds",
            "Time from a request's arrival at its replica to its first generated token, by version.",
            ["cluster", "version"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "llmctl_serve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request, by version.",
            ["cluster", "version"],
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        # The engine's own figures, as its replica last reported them with a request (Engine.stats).
        self.engine = {
            key: Gauge(name, doc, ["cluster", "version", "replica"], registry=self.registry)
            for key, name, doc in (
                (
                    "kv_cache_usage",
                    "llmctl_serve_kv_cache_usage_ratio",
                    "Share of the engine's KV cache in use (0..1).",
                ),
                ("running", "llmctl_serve_running_requests", "Requests in the engine's running batch."),
                ("waiting", "llmctl_serve_waiting_requests", "Requests queued in the engine for a batch slot."),
                (
                    "peak_running",
                    "llmctl_serve_running_requests_peak",
                    "Most requests one engine step has run since the replica started (continuous batching at work).",
                ),
            )
        }
        self.traffic = Gauge(
            "llmctl_rollout_traffic_ratio",
            "Share of traffic routed to each version (0..1).",
            ["cluster", "rollout_id", "version"],
            registry=self.registry,
        )
        self._samples: dict[str, deque[tuple[float, int, float]]] = {}
        self._lock = threading.Lock()
        self._engine_labels: set[tuple[str, str]] = set()
        self._server: Any = None
        self.port: int | None = None

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start the HTTP endpoint (port 0 picks a free one); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def declare(self, version: str) -> None:
        """Create a version's series at zero, so Prometheus' increase() counts its first requests."""
        for code in ("200", "500"):
            self.requests.labels(cluster=self.cluster, version=version, code=code)
        for series in (self.duration, self.tokens, self.ttft, self.itl):
            series.labels(cluster=self.cluster, version=version)

    def observe(self, version: str, code: int, seconds: float, completion_tokens: int = 0) -> None:
        self.requests.labels(cluster=self.cluster, version=version, code=str(code)).inc()
        if version != "none":
            self.duration.labels(cluster=self.cluster, version=version).observe(seconds)
            if completion_tokens:
                self.tokens.labels(cluster=self.cluster, version=version).inc(completion_tokens)
            with self._lock:
                self._samples.setdefault(version, deque(maxlen=MAX_SAMPLES)).append((time.time(), code, seconds))

    def observe_tokens(self, version: str, meta: dict[str, Any], replica: str = "0") -> None:
        """The token timings and engine figures a replica reported with a request (see Responder)."""
        if meta.get("ttft_s") is not None:
            self.ttft.labels(cluster=self.cluster, version=version).observe(float(meta["ttft_s"]))
        itl = self.itl.labels(cluster=self.cluster, version=version)
        for gap in meta.get("itl_s") or ():
            itl.observe(float(gap))
        figures = meta.get("engine") or {}
        for key, gauge in self.engine.items():
            if figures.get(key) is not None:
                gauge.labels(cluster=self.cluster, version=version, replica=replica).set(float(figures[key]))
                self._engine_labels.add((version, replica))

    def forget(self, version: str) -> None:
        """Drop a removed version's engine gauges (its replicas are gone)."""
        for v, replica in [k for k in self._engine_labels if k[0] == version]:
            for gauge in self.engine.values():
                with contextlib.suppress(KeyError):  # an engine that does not report this figure
                    gauge.remove(self.cluster, v, replica)
            self._engine_labels.discard((v, replica))

    def set_traffic(self, rollout_id: str, ratios: dict[str, float], previous: dict[str, float]) -> None:
        for version in previous:
            if version not in ratios:
                self.traffic.labels(cluster=self.cluster, rollout_id=rollout_id, version=version).set(0.0)
        for version, ratio in ratios.items():
            self.declare(version)
            self.traffic.labels(cluster=self.cluster, rollout_id=rollout_id, version=version).set(ratio)

    def window(self, version: str, since: float) -> dict[str, Any]:
        """Exact figures of the requests of `version` that completed at or after `since`."""
        with self._lock:
            rows = [r for r in self._samples.get(version, ()) if r[0] >= since]
        durations = [d for _, _, d in rows]
        errors = sum(1 for _, code, _ in rows if code >= 500)
        return {
            "version": version,
            "requests": len(rows),
            "errors": errors,
            "p50_s": percentile(durations, 50),
            "p99_s": percentile(durations, 99),
            "since": since,
        }
