"""Supervisor metrics for Prometheus, computed from the ledger at each scrape.

    llmctl_train_goodput_ratio{cluster, run_id}        productive training time / wall time
    llmctl_train_restarts_total{cluster, run_id, cause} restarts (new attempts and in-attempt
                                                        worker replacements) by cause

`llmctl supervise --metrics-port P` serves them on 127.0.0.1:P.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane.context import Context
from controlplane.rundir import RunDir
from controlplane.states import RunState
from controlplane.supervisor.goodput import Goodput, compute

RECENT_S = 7 * 24 * 3600.0  # ended runs stay exported this long
LIVE_REFRESH_S = 60.0  # a live run's goodput is recomputed (a pass over its events) at most this often


def run_goodput(ctx: Context, run: dict[str, Any], now: float | None = None) -> Goodput:
    ledger = ctx.ledger
    events = RunDir(Path(run["run_dir"])).events()
    return compute(ledger.attempts(run["run_id"]), ledger.transitions(run["run_id"]), events, now or time.time())


class SupervisorCollector(Collector):
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._cache: dict[str, tuple[Any, float, Goodput]] = {}

    def _goodput(self, run: dict[str, Any], now: float) -> Goodput:
        """Cached: an ended run's until its record changes; a live run's for LIVE_REFRESH_S unless
        its state moved (a scrape every 15 s must not re-read a month of events each time)."""
        events = RunDir(Path(run["run_dir"])).events_file
        size = events.stat().st_size if events.exists() else 0
        key = (size, run["state"], run["updated_at"])
        hit = self._cache.get(run["run_id"])
        if hit is not None:
            hit_key, at, g = hit
            if RunState(run["state"]).is_terminal:
                if hit_key == key:
                    return g
            elif hit_key[1] == run["state"] and now - at < LIVE_REFRESH_S:
                return g
        g = run_goodput(self.ctx, run, now)
        self._cache[run["run_id"]] = (key, now, g)
        return g

    def collect(self) -> Iterator[Any]:
        cluster = self.ctx.cluster.name
        ratio = GaugeMetricFamily(
            "llmctl_train_goodput_ratio", "Productive training time over wall time.", labels=["cluster", "run_id"]
        )
        restarts = CounterMetricFamily(
            "llmctl_train_restarts", "Restarts of a run by cause.", labels=["cluster", "run_id", "cause"]
        )
        now = time.time()
        for run in self.ctx.ledger.list_runs():
            if RunState(run["state"]).is_terminal and now - run["updated_at"] > RECENT_S:
                continue
            g = self._goodput(run, now)
            ratio.add_metric([cluster, run["run_id"]], g.ratio)
            for cause, n in sorted(g.restarts_by_cause.items()):
                restarts.add_metric([cluster, run["run_id"], cause], n)
        yield ratio
        yield restarts

    def describe(self) -> list[Any]:
        return []


def serve(ctx: Context, port: int, host: str = "127.0.0.1") -> Any:
    """Start the metrics endpoint in a background thread; returns the server (call .shutdown())."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(ctx))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
