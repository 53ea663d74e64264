"""Render the dashboards (panels.py) as Grafana JSON with the grafana-foundation-sdk.

`render_all()` returns {uid: dashboard JSON}; `write_dashboards(dir)` writes
`<dir>/<uid>.json` and Grafana provisioning files under `<dir>/provisioning/`. The output is
deterministic (sorted keys, fixed ids), so the committed JSON can be checked against a fresh
generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from controlplane.observability.panels import DashboardDef, PanelDef, exported_dashboards

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
PROVISIONED_FOLDER = "llmctl"
PROVISIONED_PATH = "/var/lib/grafana/dashboards/llmctl"
_REF_IDS = "ABCDEFGH"


def _variables() -> list[Any]:
    ds = gd.DatasourceVariable("datasource").label("Prometheus").type("prometheus")

    def label_var(name: str, label: str, query: str) -> Any:
        return (
            gd.QueryVariable(name)
            .label(label)
            .datasource(DATASOURCE)
            .query({"query": query, "refId": f"{name}-values", "qryType": 1})
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )

    return [
        ds,
        label_var("cluster", "Cluster", "label_values(llmctl_gpu_power_watts, cluster)"),
        label_var("run", "Run", 'label_values(llmctl_train_step{cluster=~"$cluster"}, run_id)'),
        label_var("node", "Node", 'label_values(llmctl_gpu_power_watts{cluster=~"$cluster"}, node)'),
    ]


def _panel(p: PanelDef) -> Any:
    builder = stat.Panel() if p.kind == "stat" else timeseries.Panel().fill_opacity(10).line_width(1)
    builder = builder.title(p.title).datasource(DATASOURCE).unit(p.unit).height(8).span(p.width)
    if p.description:
        builder = builder.description(p.description)
    for ref, query in zip(_REF_IDS, p.queries, strict=False):
        target = prometheus.Dataquery().expr(query.expr).legend_format(query.legend or "__auto").ref_id(ref)
        builder = builder.with_target(target.datasource(DATASOURCE))
    return builder


def build(d: DashboardDef) -> dict[str, Any]:
    b = (
        gd.Dashboard(d.title)
        .uid(d.uid)
        .description(d.description)
        .tags(list(d.tags))
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
    )
    for var in _variables():
        b = b.with_variable(var)
    for a in d.annotations:
        b = b.annotation(
            gd.AnnotationQuery().name(a.name).datasource(DATASOURCE).enable(True).icon_color(a.color).expr(a.expr)
        )
    for i, p in enumerate(d.panels, start=1):
        b = b.with_panel(_panel(p).id(i))
    data = json.loads(json.dumps(b.build(), cls=JSONEncoder))
    # Annotation title/step options the SDK has no setter for.
    for a, ann in zip(d.annotations, data["annotations"].get("list", []), strict=True):
        ann.update({"titleFormat": a.title, "step": "60s", "useValueForTime": False})
    return data


def render_all() -> dict[str, dict[str, Any]]:
    return {d.uid: build(d) for d in exported_dashboards()}


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


DATASOURCE_PROVISIONING = """\
# Grafana datasource provisioning: the Prometheus that scrapes llmctl's exporters.
apiVersion: 1
datasources:
  - name: Prometheus
    type: prometheus
    uid: llmctl-prometheus
    access: proxy
    url: ${LLMCTL_PROMETHEUS_URL}
    isDefault: true
    jsonData:
      timeInterval: 15s
"""

DASHBOARD_PROVISIONING = f"""\
# Grafana dashboard provisioning: load the generated llmctl dashboards from disk.
apiVersion: 1
providers:
  - name: llmctl
    folder: {PROVISIONED_FOLDER}
    type: file
    disableDeletion: false
    allowUiUpdates: false
    updateIntervalSeconds: 60
    options:
      path: {PROVISIONED_PATH}
      foldersFromFilesStructure: false
"""


def rendered_files() -> dict[str, str]:
    """Every generated file, by path relative to the dashboards directory."""
    files = {f"{uid}.json": dump(data) for uid, data in render_all().items()}
    files["provisioning/datasources/llmctl.yaml"] = DATASOURCE_PROVISIONING
    files["provisioning/dashboards/llmctl.yaml"] = DASHBOARD_PROVISIONING
    return files


def write_dashboards(out_dir: Path) -> list[Path]:
    """Write the dashboards and provisioning files; remove stale generated dashboards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = rendered_files()
    for stale in out_dir.glob("llmctl-*.json"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for rel, text in sorted(files.items()):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
