"""The dashboards as data: every panel's title, PromQL, unit and kind.

Kept apart from the Grafana rendering (dashboards.py) so that the tests, the snapshot
renderer and the query checks read the same queries Grafana will run. Queries use the
dashboard variables `$cluster`, `$node` and `$run` as regex matchers (`=~`), so the "All"
value `.*` also matches series without the label, and Grafana's `$__rate_interval` and
`$__range`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.observability.catalog import EXPORTED_SOURCES, metrics_in, source_of

GPU_SEL = 'cluster=~"$cluster",node=~"$node"'
RUN_SEL = 'cluster=~"$cluster",run_id=~"$run"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelDef:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    description: str = ""
    width: int = 12
    snapshot_key: str | None = None  # name of the panel in `llmctl dashboards snapshot`

    @property
    def sources(self) -> set[str]:
        return {source_of(m) for q in self.queries for m in metrics_in(q.expr)}


@dataclass(frozen=True)
class AnnotationDef:
    name: str
    expr: str
    title: str
    color: str = "red"


@dataclass(frozen=True)
class DashboardDef:
    uid: str
    title: str
    description: str
    panels: tuple[PanelDef, ...]
    annotations: tuple[AnnotationDef, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)

    def exported(self, sources: frozenset[str] = EXPORTED_SOURCES) -> DashboardDef:
        """This dashboard with only the panels whose every metric has an exporter."""
        return DashboardDef(
            uid=self.uid,
            title=self.title,
            description=self.description,
            panels=tuple(p for p in self.panels if p.sources <= sources),
            annotations=tuple(a for a in self.annotations if {source_of(m) for m in metrics_in(a.expr)} <= sources),
            tags=self.tags,
        )


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


POWER = DashboardDef(
    uid="llmctl-power",
    title="llmctl / Power & energy",
    description="Where the joules go: cluster power, per node and GPU, against limits, per run and per token.",
    tags=("llmctl", "power"),
    panels=(
        PanelDef(
            "Cluster power",
            (q(f"sum by (cluster) (llmctl_gpu_power_watts{{{GPU_SEL}}}) / 1000", "{{cluster}}"),),
            unit="kwatt",
            description="Sum of GPU board power, kW (multiply by the cluster's PUE for facility power).",
            snapshot_key="power",
        ),
        PanelDef(
            "Power per node",
            (q(f"sum by (node) (llmctl_gpu_power_watts{{{GPU_SEL}}})", "{{node}}"),),
            unit="watt",
        ),
        PanelDef(
            "Power per GPU",
            (q(f"llmctl_gpu_power_watts{{{GPU_SEL}}}", "{{node}} gpu{{gpu}}"),),
            unit="watt",
        ),
        PanelDef(
            "Power against limit",
            (
                q(
                    f"llmctl_gpu_power_watts{{{GPU_SEL}}} / llmctl_gpu_power_limit_watts{{{GPU_SEL}}}",
                    "{{node}} gpu{{gpu}}",
                ),
            ),
            unit="percentunit",
            description="Board power as a fraction of the enforced power limit; near 1.0 the GPU is power-capped.",
        ),
        PanelDef(
            "Energy per run",
            (
                q(
                    f'sum by (run_id) (increase(llmctl_gpu_energy_joules_total{{{RUN_SEL},node=~"$node"}}[$__range]))'
                    " / 3.6e6",
                    "{{run_id}}",
                ),
            ),
            unit="kwatth",
            kind="stat",
            description="GPU energy over the selected time range, kWh, by run.",
            snapshot_key="energy",
        ),
        PanelDef(
            "Energy per token",
            (q(f"llmctl_train_energy_joules_per_token{{{RUN_SEL}}}", "{{run_id}}"),),
            unit="J/token",
            description="GPU joules per trained token.",
        ),
        PanelDef(
            "Throttle reasons",
            (q(f"sum by (reason) (llmctl_gpu_throttle_active{{{GPU_SEL}}})", "{{reason}}"),),
            description="GPUs with each clock-throttle reason active.",
        ),
        PanelDef(
            "GPU temperature",
            (q(f"llmctl_gpu_temperature_celsius{{{GPU_SEL}}}", "{{node}} gpu{{gpu}}"),),
            unit="celsius",
        ),
    ),
)

UTILIZATION = DashboardDef(
    uid="llmctl-utilization",
    title="llmctl / Utilization",
    description="How busy the GPUs are and how much of it is useful model FLOPs.",
    tags=("llmctl", "utilization"),
    panels=(
        PanelDef(
            "GPU utilization",
            (q(f"llmctl_gpu_utilization_ratio{{{GPU_SEL}}}", "{{node}} gpu{{gpu}}"),),
            unit="percentunit",
        ),
        PanelDef(
            "GPU memory used",
            (
                q(
                    f"llmctl_gpu_memory_used_bytes{{{GPU_SEL}}} / llmctl_gpu_memory_total_bytes{{{GPU_SEL}}}",
                    "{{node}} gpu{{gpu}}",
                ),
            ),
            unit="percentunit",
        ),
        PanelDef(
            "SM clock",
            (q(f"llmctl_gpu_sm_clock_hertz{{{GPU_SEL}}}", "{{node}} gpu{{gpu}}"),),
            unit="hertz",
        ),
        PanelDef(
            "Model FLOPs utilization",
            (q(f"llmctl_train_mfu_ratio{{{RUN_SEL}}}", "{{run_id}}"),),
            unit="percentunit",
        ),
        PanelDef(
            "Training throughput",
            (q(f"llmctl_train_tokens_per_second{{{RUN_SEL}}}", "{{run_id}}"),),
            unit="tokens/s",
        ),
    ),
)

_RESTARTS = f"llmctl_train_restarts_total{{{RUN_SEL}}}"

TRAINING = DashboardDef(
    uid="llmctl-training",
    title="llmctl / Training run",
    description="One run's progress: loss, steps, goodput, checkpoints, restarts and hangs.",
    tags=("llmctl", "training"),
    annotations=(
        AnnotationDef(
            "Restarts",
            f"sum by (run_id, cause) ((changes({_RESTARTS}[2m]) > 0) or ({_RESTARTS} unless {_RESTARTS} offset 2m))",
            "restart: {{cause}}",
        ),
    ),
    panels=(
        PanelDef(
            "Loss",
            (q(f"llmctl_train_loss{{{RUN_SEL}}}", "{{run_id}}"),),
            snapshot_key="loss",
        ),
        PanelDef("Step", (q(f"llmctl_train_step{{{RUN_SEL}}}", "{{run_id}}"),)),
        PanelDef(
            "Goodput",
            (q(f"llmctl_train_goodput_ratio{{{RUN_SEL}}}", "{{run_id}}"),),
            unit="percentunit",
            description="Productive training time / wall time.",
            snapshot_key="goodput",
        ),
        PanelDef(
            "Tokens trained",
            (q(f"llmctl_train_tokens_total{{{RUN_SEL}}}", "{{run_id}}"),),
        ),
        PanelDef(
            "Checkpoint duration",
            (q(f"llmctl_train_checkpoint_seconds{{{RUN_SEL}}}", "{{run_id}}"),),
            unit="s",
            description="Time training was blocked by the latest checkpoint.",
        ),
        PanelDef(
            "Step progress (hang detector)",
            (q(f"delta(llmctl_train_step{{{RUN_SEL}}}[5m])", "{{run_id}}"),),
            description="Steps completed in the last 5 minutes; a flat zero while the job is up is a hang.",
        ),
        PanelDef(
            "Restarts by cause",
            (q(f"sum by (cause) (llmctl_train_restarts_total{{{RUN_SEL}}})", "{{cause}}"),),
        ),
    ),
)

_REQ = 'llmctl_serve_requests_total{cluster=~"$cluster"}'
_REQ_5XX = 'llmctl_serve_requests_total{cluster=~"$cluster",code=~"5.."}'
_DUR = 'llmctl_serve_request_duration_seconds_bucket{cluster=~"$cluster"}'
_TTFT = 'llmctl_serve_time_to_first_token_seconds_bucket{cluster=~"$cluster"}'
_ITL = 'llmctl_serve_inter_token_latency_seconds_bucket{cluster=~"$cluster"}'


def _p50_p99(series: str) -> tuple[Query, ...]:
    return tuple(
        q(
            f"histogram_quantile({p}, sum by (version, le) (rate({series}[$__rate_interval])))",
            f"{name} {{{{version}}}}",
        )
        for p, name in ((0.5, "p50"), (0.99, "p99"))
    )


SERVING = DashboardDef(
    uid="llmctl-serving",
    title="llmctl / Serving & rollout",
    description="Requests, errors and latency per model version, and the rollout's traffic split.",
    tags=("llmctl", "serving"),
    panels=(
        PanelDef(
            "Requests per second",
            (q(f"sum by (version) (rate({_REQ}[$__rate_interval]))", "{{version}}"),),
            unit="reqps",
        ),
        PanelDef(
            "Error rate",
            (
                q(
                    f"(sum by (version) (rate({_REQ_5XX}[$__rate_interval]))"
                    f" or sum by (version) (rate({_REQ}[$__rate_interval])) * 0)"
                    f" / sum by (version) (rate({_REQ}[$__rate_interval]))",
                    "{{version}}",
                ),
            ),
            unit="percentunit",
            description="Share of requests answered with a 5xx code.",
        ),
        PanelDef("Latency p50 / p99", _p50_p99(_DUR), unit="s"),
        PanelDef(
            "Time to first token p50 / p99",
            _p50_p99(_TTFT),
            unit="s",
            description="From a request's arrival at its replica to its first generated token (prefill and queueing).",
        ),
        PanelDef(
            "Inter-token latency p50 / p99",
            _p50_p99(_ITL),
            unit="s",
            description="Time between consecutive generated tokens of a request (decode speed under batching).",
        ),
        PanelDef(
            "KV cache usage",
            (
                q(
                    'max by (version, replica) (llmctl_serve_kv_cache_usage_ratio{cluster=~"$cluster"})',
                    "{{version}} r{{replica}}",
                ),
            ),
            unit="percentunit",
            description="Share of each replica's KV cache in use; near 1 the engine queues or preempts requests.",
        ),
        PanelDef(
            "Engine batch",
            (
                q('sum by (version) (llmctl_serve_running_requests{cluster=~"$cluster"})', "{{version}} running"),
                q('sum by (version) (llmctl_serve_waiting_requests{cluster=~"$cluster"})', "{{version}} waiting"),
            ),
            unit="short",
            description="Requests in the engines' running batches and queued for a slot; waiting above zero "
            "for long means the replicas are full (raise serve.max_num_seqs or add replicas).",
        ),
        PanelDef(
            "Traffic split",
            (q('llmctl_rollout_traffic_ratio{cluster=~"$cluster"}', "{{rollout_id}} {{version}}"),),
            unit="percentunit",
        ),
        PanelDef(
            "Generated tokens per second",
            (
                q(
                    'sum by (version) (rate(llmctl_serve_tokens_total{cluster=~"$cluster"}[$__rate_interval]))',
                    "{{version}}",
                ),
            ),
            unit="tokens/s",
        ),
    ),
)

DASHBOARDS: tuple[DashboardDef, ...] = (POWER, UTILIZATION, TRAINING, SERVING)


def exported_dashboards(sources: frozenset[str] = EXPORTED_SOURCES) -> list[DashboardDef]:
    """The dashboards to ship: each with only its exportable panels, none left empty."""
    return [d for d in (d.exported(sources) for d in DASHBOARDS) if d.panels]


def substitute(expr: str, range_: str = "10m", rate_interval: str = "1m", **values: str) -> str:
    """Fill Grafana's variables the way an "All" selection does (`.*`), for running a query directly."""
    for name in ("cluster", "node", "run"):
        expr = expr.replace(f"${name}", values.get(name, ".*"))
    return expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
