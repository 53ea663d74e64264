"""`llmctl infra`: provision the Kubernetes side of a cluster with Pulumi (preview, up, destroy, outputs),
or render what it would create as YAML without any Pulumi CLI.

Pulumi is imported inside the commands only, so the rest of the CLI stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from controlplane.cli.common import ClusterOpt, JsonOpt, emit_json, err, out
from controlplane.errors import ConfigurationError, UserError

app = typer.Typer(
    help="Provision the cluster with Pulumi (KubeRay, GPU operator, storage, monitoring, serving).",
    no_args_is_help=True,
)

StackOpt = Annotated[str | None, typer.Option("--stack", "-s", help="Pulumi stack name (default: the spec's name).")]
DashboardsOpt = Annotated[
    Path | None, typer.Option("--dashboards", help="Directory of Grafana dashboard JSON (default: ./dashboards).")
]
WorkDirOpt = Annotated[
    Path | None,
    typer.Option("--work-dir", help="Where the stack files live (default: ./infra if it holds Pulumi.yaml)."),
]
BackendOpt = Annotated[
    str | None, typer.Option("--backend", envvar="PULUMI_BACKEND_URL", help="Pulumi state backend URL.")
]
StackConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--stack-config", help="A Pulumi.<stack>.yaml whose llmctl:* sizes the render uses (secrets skipped)."
    ),
]


def _dashboards(path: Path | None) -> Path | None:
    if path is not None:
        if not path.is_dir():
            raise ConfigurationError(f"--dashboards: {path} is not a directory")
        return path
    default = Path("dashboards")
    return default if default.is_dir() else None


def _work_dir(path: Path | None) -> Path:
    if path is not None:
        return path
    if (Path("infra") / "Pulumi.yaml").is_file():
        return Path("infra")
    return Path(os.environ.get("LLMCTL_HOME", "~/.llmctl")).expanduser() / "infra"


def _spec(cluster: str | None, fallback: Path | None = None):
    from controlplane.spec import ClusterSpec, load_spec

    path = cluster or (str(fallback) if fallback else None)
    if not path:
        raise ConfigurationError("no cluster spec: pass --cluster FILE (a ClusterSpec with kind: kubernetes)")
    spec = load_spec(ClusterSpec, path)
    from controlplane.infra.manifests import check_spec

    check_spec(spec)
    return spec


def _stack_config(path: Path | None) -> tuple[dict[str, str], Path | None]:
    """Plain llmctl:* values of a stack file, and the spec path it names (relative to the file)."""
    if path is None:
        return {}, None
    from controlplane.spec import parse_yaml

    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except OSError as exc:
        raise ConfigurationError(f"--stack-config: cannot read {path} ({exc.strerror})") from None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        return {}, None
    values = {
        k.split(":", 1)[1]: str(v)
        for k, v in config.items()
        if isinstance(k, str) and k.startswith("llmctl:") and not isinstance(v, dict)  # {secure: ...} skipped
    }
    spec_path = values.pop("clusterSpec", None)
    return values, (path.parent / spec_path if spec_path else None)


def _print_lines(line: str) -> None:
    out.print(line.rstrip("\n"), markup=False, highlight=False)


def _run(fn, *args: Any, **kwargs: Any) -> Any:
    from controlplane.infra.automation import InfraCommandFailed

    try:
        return fn(*args, **kwargs)
    except InfraCommandFailed as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None


@app.command()
def render(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the manifests into.")],
    cluster: ClusterOpt = None,
    dashboards: DashboardsOpt = None,
    stack_config: StackConfigOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Write the Kubernetes objects the program would create, as YAML (no Pulumi CLI needed)."""
    from controlplane.infra.render import render as run_render
    from controlplane.infra.render import write_render
    from controlplane.infra.settings import settings_from_config

    values, spec_from_stack = _stack_config(stack_config)
    spec = _spec(cluster, spec_from_stack)
    settings = settings_from_config(values)
    _prepare_out_dir(out_dir)
    recording = run_render(spec, settings, _dashboards(dashboards))
    files = write_render(recording, out_dir)
    (out_dir / MARKER).write_text("".join(f"{f.relative_to(out_dir)}\n" for f in files), encoding="utf-8")
    if json_:
        emit_json({"dir": str(out_dir), "files": [str(f.relative_to(out_dir)) for f in files]})
        return
    kinds: dict[str, int] = {}
    for obj in recording.kubernetes_objects():
        kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    helm = ", ".join(f"{r['chart']} {r['version']}" for r in recording.helm_releases())
    out.print(f"{out_dir}: {len(files)} files ({summary}; helm: {helm})", markup=False)


MARKER = ".llmctl-render"


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse a directory with other content; clear what an earlier render wrote there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    marker = out_dir / MARKER
    if marker.is_file():
        for rel in marker.read_text(encoding="utf-8").split():
            target = (out_dir / rel).resolve()
            if target.is_file() and out_dir.resolve() in target.parents:
                target.unlink()
        marker.unlink()
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: not empty and not an earlier render; choose an empty or new directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def _engine_args(cluster, stack, dashboards, work_dir):
    from controlplane.infra.automation import require_cli

    require_cli()
    spec = _spec(cluster)
    return (stack or spec.name, spec, _dashboards(dashboards), _work_dir(work_dir))


@app.command()
def preview(
    cluster: ClusterOpt = None,
    stack: StackOpt = None,
    dashboards: DashboardsOpt = None,
    work_dir: WorkDirOpt = None,
    backend: BackendOpt = None,
) -> None:
    """Show what `up` would change."""
    from controlplane.infra import automation

    changes = _run(automation.preview, *_engine_args(cluster, stack, dashboards, work_dir), backend, _print_lines)
    out.print(", ".join(f"{k}: {v}" for k, v in sorted(changes.items())) or "no changes", markup=False)


@app.command()
def up(
    cluster: ClusterOpt = None,
    stack: StackOpt = None,
    dashboards: DashboardsOpt = None,
    work_dir: WorkDirOpt = None,
    backend: BackendOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Create or update the cluster's resources; print the stack outputs."""
    from controlplane.infra import automation

    outputs = _run(automation.up, *_engine_args(cluster, stack, dashboards, work_dir), backend, _print_lines)
    _show_outputs(outputs, json_)


@app.command()
def destroy(
    cluster: ClusterOpt = None,
    stack: StackOpt = None,
    dashboards: DashboardsOpt = None,
    work_dir: WorkDirOpt = None,
    backend: BackendOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete everything the stack created (the shared volume's claim included)."""
    from controlplane.infra import automation

    args = _engine_args(cluster, stack, dashboards, work_dir)
    if not yes and not typer.confirm(f"Destroy stack {args[0]!r} and everything it created?", err=True):
        raise typer.Exit(1)
    _run(automation.destroy, *args, backend, _print_lines)
    out.print(f"stack {args[0]}: destroyed", markup=False)


@app.command()
def outputs(
    cluster: ClusterOpt = None,
    stack: StackOpt = None,
    work_dir: WorkDirOpt = None,
    backend: BackendOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Print the stack outputs (Ray address, Grafana URL, storage claim); secret ones masked."""
    from controlplane.infra import automation

    _show_outputs(_run(automation.outputs, *_engine_args(cluster, stack, None, work_dir), backend), json_)


def _show_outputs(values: dict[str, Any], json_: bool) -> None:
    if json_:
        emit_json(values)
        return
    for key, value in sorted(values.items()):
        out.print(f"{key}: {value}", markup=False)
