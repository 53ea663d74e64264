"""`llmctl dashboards`: generate, export, push to Grafana, and snapshot a run as PNG plots."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, err, out
from controlplane.errors import ConfigurationError

app = typer.Typer(help="Grafana dashboards: generate, export, push, and PNG snapshots of a run.", no_args_is_help=True)

PromOpt = Annotated[
    str,
    typer.Option("--prometheus", envvar="LLMCTL_PROMETHEUS_URL", help="Prometheus base URL."),
]


def _cluster_name(cluster_file: str | None) -> str:
    from controlplane.context import load_cluster

    return load_cluster(cluster_file).name


@app.command()
def generate(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")] = Path("dashboards"),
    check: Annotated[bool, typer.Option("--check", help="Only report whether the files on disk are current.")] = False,
) -> None:
    """Write the dashboards as Grafana JSON plus provisioning files (the committed dashboards/)."""
    from controlplane.observability.dashboards import rendered_files, write_dashboards

    if check:
        stale = [
            rel
            for rel, text in sorted(rendered_files().items())
            if not (out_dir / rel).is_file() or (out_dir / rel).read_text(encoding="utf-8") != text
        ]
        if stale:
            raise ConfigurationError(f"{out_dir}: out of date: {', '.join(stale)} (run `llmctl dashboards generate`)")
        out.print(f"{out_dir}: up to date")
        return
    for path in write_dashboards(out_dir):
        out.print(str(path))


@app.command()
def export(
    out_dir: Annotated[Path, typer.Argument(help="Directory for the import-ready JSON files.")],
    cluster: ClusterOpt = None,
) -> None:
    """Write each dashboard as a Grafana import payload for one cluster (uid and folder scoped to it)."""
    from controlplane.observability.dashboards import dump, render_all
    from controlplane.observability.grafana import folder_uid, for_cluster

    name = _cluster_name(cluster)
    out_dir.mkdir(parents=True, exist_ok=True)
    for data in render_all().values():
        d = for_cluster(data, name)
        path = out_dir / f"{d['uid']}.json"
        path.write_text(dump({"dashboard": d, "folderUid": folder_uid(name), "overwrite": True}), encoding="utf-8")
        out.print(str(path))


@app.command()
def push(
    url: Annotated[str, typer.Option("--url", help="Grafana base URL, e.g. https://grafana.example:3000.")],
    token_env: Annotated[
        str, typer.Option("--token-env", help="Name of the environment variable holding the Grafana token.")
    ] = "GRAFANA_TOKEN",
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Create or update the dashboards in Grafana, one folder per cluster; unchanged ones are left alone."""
    from controlplane.observability.dashboards import render_all
    from controlplane.observability.grafana import folder_uid, redact
    from controlplane.observability.grafana import push as push_all

    token = os.environ.get(token_env)
    if not token:
        raise ConfigurationError(f"--token-env: environment variable {token_env} is not set or empty")
    name = _cluster_name(cluster)
    results = push_all(url, token, name, render_all())
    if json_:
        emit_json(
            [
                {"uid": r.uid, "title": r.title, "status": r.status, "version": r.version, "folder": folder_uid(name)}
                for r in results
            ]
        )
        return
    for r in results:
        out.print(f"{r.status:9} {r.uid}  v{r.version}  {r.title}")
    err.print(f"{len(results)} dashboards in folder {folder_uid(name)} at {redact(url)}")


@app.command()
def snapshot(
    run_id: Annotated[str, typer.Argument(help="Run id (or a unique prefix of one in this ledger).")],
    out_dir: Annotated[Path, typer.Argument(help="Directory for the PNG files.")],
    prometheus: PromOpt = "http://127.0.0.1:9090",
    since: Annotated[float, typer.Option("--since", help="Hours of history to plot.", min=0.01)] = 6.0,
    cluster: ClusterOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Plot a run's power, energy, loss and goodput from Prometheus as PNG files."""
    from controlplane.context import Context
    from controlplane.errors import NotFoundError
    from controlplane.observability.snapshot import snapshot as render

    with contextlib.suppress(NotFoundError):  # a prefix, as every `run` verb takes; else the id as given
        run_id = Context.load(cluster).ledger.find_run(run_id)["run_id"]

    result = render(prometheus, run_id, out_dir, since_s=since * 3600)
    if json_:
        emit_json({"files": [str(p) for p in result.files], "empty": result.empty})
        return
    for p in result.files:
        out.print(str(p))
    if result.empty:
        err.print(f"no data for: {', '.join(result.empty)}")


@app.command()
def targets(
    out_file: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (a Prometheus file_sd file) instead of stdout.")
    ] = None,
    cluster: ClusterOpt = None,
) -> None:
    """The training metrics endpoints of every live run (from the run directories) and this
    cluster's running telemetry exporters, as Prometheus file_sd targets: point
    `file_sd_configs` at the file, no spec edited."""
    import json
    from urllib.parse import urlparse

    from controlplane.context import Context
    from controlplane.rundir import RunDir, write_atomic
    from controlplane.telemetry import endpoints

    ctx = Context.load(cluster)
    groups = []
    for run in ctx.ledger.live_runs():
        start = RunDir(Path(run["run_dir"])).metrics_start()
        if start:
            url = urlparse(start["metrics_url"])
            labels = {"run_id": run["run_id"], "attempt": str(start.get("attempt")), "__metrics_path__": url.path}
            groups.append({"targets": [url.netloc], "labels": labels})
    for exporter in endpoints.live(ctx.storage):
        url = urlparse(exporter["url"])
        labels = {"job": "llmctl-telemetry", "node": exporter["node"], "__metrics_path__": url.path}
        groups.append({"targets": [url.netloc], "labels": labels})
    text = json.dumps(groups, indent=2) + "\n"
    if out_file is None:
        typer.echo(text, nl=False)
        return
    write_atomic(out_file, text.encode())
    err.print(f"{len(groups)} run target(s) written to {out_file}", markup=False)
