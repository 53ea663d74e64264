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

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
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
    # On $PATH the Automation API finds it itself; the installer's place needs its root.
    command = None if shutil.which("pulumi") else auto.PulumiCommand(root=str(Path(cli).parent.parent))
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


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """A failed Pulumi command becomes one line: the last error line it printed."""
    from pulumi import automation as auto

    try:
        yield
    except auto.CommandError as exc:
        text = exc.stderr if getattr(exc, "stderr", None) else str(exc)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "failed")
        raise InfraCommandFailed(f"pulumi: {error.removeprefix('stderr:').strip()}") from None
    except (OSError, subprocess.CalledProcessError) as exc:
        raise InfraCommandFailed(f"pulumi: cannot run the CLI ({exc})") from None


def preview(stack_name, spec, dashboards, work_dir, backend=None, on_output=print) -> dict[str, int]:
    with _engine_errors():
        stack = _stack(stack_name, spec, dashboards, work_dir, backend)
        return dict(stack.preview(on_output=on_output).change_summary)


def up(stack_name, spec, dashboards, work_dir, backend=None, on_output=print) -> dict[str, Any]:
    with _engine_errors():
        stack = _stack(stack_name, spec, dashboards, work_dir, backend)
        return redact_outputs(stack.up(on_output=on_output).outputs)


def destroy(stack_name, spec, dashboards, work_dir, backend=None, on_output=print) -> None:
    with _engine_errors():
        _stack(stack_name, spec, dashboards, work_dir, backend).destroy(on_output=on_output)


def outputs(stack_name, spec, dashboards, work_dir, backend=None) -> dict[str, Any]:
    with _engine_errors():
        return redact_outputs(_stack(stack_name, spec, dashboards, work_dir, backend).outputs())


def redact_outputs(values: dict[str, Any]) -> dict[str, Any]:
    """Stack outputs for display: secret ones as "[secret]"."""
    return {k: "[secret]" if getattr(v, "secret", False) else getattr(v, "value", v) for k, v in values.items()}
