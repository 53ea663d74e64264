"""An installed llmctl (a built wheel, away from the source tree) still finds its runbooks and rules."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_runbooks_and_runbook_show_works_from_it(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("llmctl-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "controlplane/observability/alerts.yaml" in names
        assert "controlplane/observability/runbooks/TrainingHang.md" in names
        z.extractall(site)
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import controlplane\n"
        "from controlplane.cli.main import app\n"
        f"assert controlplane.__file__.startswith({str(site)!r}), controlplane.__file__\n"
        "r = CliRunner().invoke(app, ['runbook', 'show', 'TrainingHang'])\n"
        "assert r.exit_code == 0 and '## Mitigate' in r.stdout, r.output\n"
        "r = CliRunner().invoke(app, ['runbook', 'list', '--json'])\n"
        "assert r.exit_code == 0 and 'GpuXidError' in r.stdout, r.output\n"
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    env.pop("LLMCTL_RUNBOOKS", None)
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
