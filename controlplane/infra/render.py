"""Run the Pulumi program without an engine and write what it would create, as YAML.

`RecordingMocks` stands in for the Pulumi engine (Pulumi's documented unit-test mocks): it
keeps every resource registration - type, name, inputs - in order, and answers with the
inputs as the resource's state, as a provider would for these declarative objects. `render`
runs `program.build` under it in a fresh context (Pulumi's runtime settings are context
variables, so one render never sees another's), and `write_render` turns the recording into:

- `<namespace>/<kind>-<name>.yaml` (or `cluster/...` for cluster-scoped objects): each
  Kubernetes object as it would be applied, plus a `kustomization.yaml` listing them;
- `helm/<release>.yaml`: each Helm release as its chart, version, repository, namespace, values;
- `cloud/<type>-<name>.yaml`: cloud resources (EKS) as their inputs.

Secret values never reach the files: renders use placeholders for secret config, and every
Secret's `data`/`stringData` values are replaced by a note saying where the value comes from.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime.mocks import MockMonitor

from controlplane.infra.settings import InfraSecrets, InfraSettings
from controlplane.spec import ClusterSpec

HELM_RELEASE = "kubernetes:helm.sh/v3:Release"
REDACTED = "<set from Pulumi secret config; not rendered>"


@dataclass
class Registration:
    type: str
    name: str
    inputs: dict[str, Any]
    custom: bool
    secret_paths: list[str] = field(default_factory=list)  # inputs the program marked secret, e.g. "stringData"
    provider: str = ""  # provider reference (URN::id); empty for the default provider


def _unwrap(value: Any, path: str, secret_paths: list[str]) -> Any:
    """Plain data from engine inputs: secret envelopes opened (and their paths noted), 116.0 back to 116."""
    from pulumi.runtime import rpc

    if isinstance(value, dict):
        if value.get(rpc._special_sig_key) == rpc._special_secret_sig:
            secret_paths.append(path)
            return _unwrap(value.get("value"), path, [])
        return {k: _unwrap(v, f"{path}.{k}" if path else k, secret_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v, f"{path}[{i}]", secret_paths) for i, v in enumerate(value)]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    """A stateful stand-in for the engine: remembers every registration, answers with inputs as state."""

    registrations: list[Registration] = field(default_factory=list)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict]:
        secret_paths: list[str] = []
        inputs = _unwrap(dict(args.inputs), "", secret_paths)
        self.registrations.append(
            Registration(args.typ, args.name, inputs, bool(args.custom), secret_paths, args.provider or "")
        )
        meta = inputs.get("metadata") or {}
        rid = "/".join(p for p in (meta.get("namespace"), meta.get("name") or args.name) if p)
        return rid or args.name, dict(args.inputs)

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list[tuple[str, str]] | None]:
        return {}, None

    # -- views of the recording

    def kubernetes_objects(self) -> list[dict[str, Any]]:
        return [r.inputs for r in self.registrations if _is_k8s_object(r)]

    def helm_releases(self) -> list[dict[str, Any]]:
        return [r.inputs for r in self.registrations if r.type == HELM_RELEASE]

    def cloud_resources(self) -> list[Registration]:
        return [r for r in self.registrations if r.type.split(":")[0] in ("aws", "eks")]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.kubernetes_objects() if o.get("kind") == kind]


def _is_k8s_object(r: Registration) -> bool:
    return r.type.startswith("kubernetes:") and r.type != HELM_RELEASE and "kind" in r.inputs


def placeholder_secrets() -> InfraSecrets:
    return InfraSecrets(
        ray_auth_token=pulumi.Output.secret(REDACTED), grafana_admin_password=pulumi.Output.secret(REDACTED)
    )


class _PlainMonitor(MockMonitor):
    """The SDK's mock monitor, less resource references: a resource given as an input is sent as its URN or id.

    With references on, the mock monitor rebuilds each referenced resource while it decodes a registration, on the
    executor thread that serves that RPC; the rebuild queues a lookup on that thread's own event loop, which the
    program's loop then waits for, and, depending on timing, the program fails with "attached to a different loop"
    or waits forever (an EKS node group's `cluster` input did this about one render in four).
    """

    def GetDeploymentInfo(self, request):
        from pulumi.runtime.proto import resource_pb2

        info = super().GetDeploymentInfo(request)
        kept = [f for f in info.supportedFeatures if f != resource_pb2.RESOURCE_MONITOR_FEATURE_RESOURCE_REFERENCES]
        return resource_pb2.DeploymentInfo(supportedFeatures=kept)

    def SupportsFeature(self, request):
        if request.id == "resourceReferences":
            return type("SupportsFeatureResponse", (object,), {"hasSupport": False})
        return super().SupportsFeature(request)


def run_under_mocks(fn, mocks: pulumi.runtime.Mocks, then=None, stack: str = "render") -> Any:
    """Run `fn` (which declares resources) to completion under `mocks`, isolated in a fresh context.

    `then`, an async function, receives fn's result while the runtime is still up (to await outputs);
    what it returns is returned, else fn's result.
    """
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _sync_await

    result: dict[str, Any] = {}

    def inner() -> None:
        pulumi.runtime.set_mocks(mocks, project="llmctl", stack=stack, preview=False, monitor=_PlainMonitor(mocks))

        def body() -> Any:
            result["value"] = fn()
            if then is not None:

                async def after() -> None:
                    result["value"] = await then(result["value"])

                return after()
            return None

        _sync_await(run_pulumi_func(body))

    contextvars.Context().run(inner)
    return result.get("value")


def render(
    spec: ClusterSpec,
    settings: InfraSettings | None = None,
    dashboards_dir: Path | None = None,
    secrets: InfraSecrets | None = None,
) -> RecordingMocks:
    """Run the program for `spec` under recording mocks; return the recording."""
    from controlplane.infra import manifests
    from controlplane.infra.program import build

    manifests.check_spec(spec)  # a bad spec fails with its one line before the runtime starts
    mocks = RecordingMocks()
    settings = settings or InfraSettings()

    def program() -> None:
        build(spec, settings, secrets or placeholder_secrets(), dashboards_dir)

    run_under_mocks(program, mocks)
    return mocks


# --------------------------------------------------------------------------- writing


def _redact(obj: dict[str, Any]) -> dict[str, Any]:
    if obj.get("kind") != "Secret":
        return obj
    out = dict(obj)
    for key in ("data", "stringData"):
        if isinstance(out.get(key), dict):
            out[key] = {k: REDACTED for k in out[key]}
    return out


def _ordered(obj: dict[str, Any]) -> dict[str, Any]:
    head = ("apiVersion", "kind", "metadata")
    return {**{k: obj[k] for k in head if k in obj}, **{k: v for k, v in sorted(obj.items()) if k not in head}}


def _file_name(*parts: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", "-".join(parts).lower()).strip("-") + ".yaml"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the in-cluster spec, dashboards) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not any(c in value for c in "\t\r") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    path.write_text(text, encoding="utf-8")


def write_render(recording: RecordingMocks, out_dir: Path) -> list[Path]:
    """Write the recording under `out_dir`; returns the files written, in registration order."""
    written: list[Path] = []
    objects = {}
    for obj in recording.kubernetes_objects():
        meta = obj.get("metadata") or {}
        rel = Path(meta.get("namespace") or "cluster") / _file_name(obj["kind"], meta.get("name", "unnamed"))
        objects[str(rel)] = _ordered(_redact(obj))
    manifests = sorted(objects)
    for rel in manifests:
        _dump(out_dir / rel, objects[rel])
        written.append(out_dir / rel)
    for rel_obj in sorted(recording.helm_releases(), key=lambda r: str(r.get("name"))):
        record = {
            "name": rel_obj.get("name"),
            "namespace": rel_obj.get("namespace"),
            "repo": (rel_obj.get("repositoryOpts") or {}).get("repo"),
            "chart": rel_obj.get("chart"),
            "version": rel_obj.get("version"),
            "values": rel_obj.get("values") or {},
        }
        path = out_dir / "helm" / _file_name(str(record["name"]))
        _dump(path, record)
        written.append(path)
    for reg in recording.cloud_resources():
        path = out_dir / "cloud" / _file_name(reg.type.split(":")[-1], reg.name)
        _dump(path, {"type": reg.type, "name": reg.name, "inputs": _plain(reg.inputs)})
        written.append(path)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": manifests}
    _dump(out_dir / "kustomization.yaml", kustomization)
    written.append(out_dir / "kustomization.yaml")
    return written


def _plain(value: Any) -> Any:
    """Inputs as YAML-safe data (resource references already arrive as URNs or ids: see _PlainMonitor)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return f"<{type(value).__name__}>"
