"""preview / up / destroy / outputs through the Pulumi Automation API (`pulumi.automation`).

The program runs inline (in this process), so an installed llmctl needs no checkout of the
repository; the workspace directory only holds the stack files (`Pulumi.<stack>.yaml`, the
stack's config and encrypted secrets). The Automation API drives the Pulumi CLI, which must be
installed: `require_cli` says so in one line when it is not.

Secrets come from the stack's secret config, or from `$LLMCTL_RAY_AUTH_TOKEN` and
`$LLMCTL_GRAFANA_ADMIN_PASSWORD`, which are stored as secret config (encrypted) before the run.
Secret outputs are reported as `[secret]`, never their value.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlplane.errors import LlmctlError, MissingDependencyError
from controlplane.spec import ClusterSpec

PROJECT = "llmctl-infra"
INSTALL_HINT = "install it with `curl -fsSL https://get.pulumi.com | sh` (see https://www.pulumi.com/docs/install/)"
SECRET_ENV = {
    "LLMCTL_RAY_AUTH_TOKEN": "llmctl:rayAuthToken",
    "LLMCTL_GRAFANA_ADMIN_PASSWORD": "llmctl:grafanaAdminPassword",
}


class InfraCommandFailed(LlmctlError):
    """The Pulumi engine reported a failed operation (the message is its last error line)."""


def find_cli() -> str | None:
    """Path of the Pulumi CLI: $PATH first, then the installer's default place."""
    found = shutil.which("pulumi")
    if found:
        return found
    home = Path(os.environ.get("PULUMI_HOME", Path.home() / ".pulumi")) / "bin" / "pulumi"
    return str(home) if home.is_file() and os.access(home, os.X_OK) else None


def require_cli() -> str:
    cli = find_cli()
    if cli is None:
        raise MissingDependencyError(f"the Pulumi CLI is not installed (`pulumi` not on PATH); {INSTALL_HINT}")
    return cli


def _stack(stack_name: str, spec: ClusterSpec, dashboards: Path | None, work_dir: Path, backend: str | None):
    from pulumi import automation as auto

    from controlplane.infra import program

    cli = require_cli()
    command = auto.PulumiCommand(root=str(Path(cli).parent.parent)) if "/" in cli else None
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {"PULUMI_BACKEND_URL": backend} if backend else {}
    opts = auto.LocalWorkspaceOptions(
        work_dir=str(work_dir),
        pulumi_command=command,
        env_vars=env,
    )  # no project_settings: an existing Pulumi.yaml in work_dir is kept, else a default one is written
    stack = auto.create_or_select_stack(
        stack_name=stack_name,
        project_name=PROJECT,
        program=lambda: program.main(spec, dashboards),
        opts=opts,
    )
    for env_name, key in SECRET_ENV.items():
        if os.environ.get(env_name):
            stack.set_config(key, auto.ConfigValue(value=os.environ[env_name], secret=True))
    return stack


def _run(fn: Callable[[], Any]) -> Any:
    from pulumi import automation as auto

    try:
        return fn()
    except auto.CommandError as exc:
        lines = [ln for ln in (exc.stderr or str(exc)).splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "failed")
        raise InfraCommandFailed(error.strip()) from None


def preview(stack_name, spec, dashboards, work_dir, backend=None, on_output=print) -> dict[str, int]:
    stack = _stack(stack_name, spec, dashboards, work_dir, backend)
    result = _run(lambda: stack.preview(on_output=on_output))
    return dict(result.change_summary)


def up(stack_name, spec, dashboards, work_dir, backend=None, on_output=print) -> dict[str, Any]:
    stack = _stack(stack_name, spec, dashboards, work_dir, backend)
    result = _run(lambda: stack.up(on_output=on_output))
    return redact_outputs(result.outputs)


def destroy(stack_name, spec, dashboards, work_dir, backend=None, on_output=print) -> None:
    stack = _stack(stack_name, spec, dashboards, work_dir, backend)
    _run(lambda: stack.destroy(on_output=on_output))


def outputs(stack_name, spec, dashboards, work_dir, backend=None) -> dict[str, Any]:
    stack = _stack(stack_name, spec, dashboards, work_dir, backend)
    return redact_outputs(_run(stack.outputs))


def redact_outputs(values: dict[str, Any]) -> dict[str, Any]:
    """Stack outputs for display: secret ones as "[secret]"."""
    return {k: "[secret]" if getattr(v, "secret", False) else getattr(v, "value", v) for k, v in values.items()}
