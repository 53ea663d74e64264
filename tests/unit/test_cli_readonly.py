"""Read-only commands answer from the ledger alone: no Ray, no torch imported."""

from __future__ import annotations

import json
import subprocess
import sys

from controlplane.ledger import Ledger
from controlplane.rundir import RunDir

PROBE = """
import sys
from typer.testing import CliRunner
from controlplane.cli.main import app
r = CliRunner()
out = []
for args in (["run", "list"], ["run", "status", "demo-run"], ["run", "events", "demo-run"], ["run", "list", "--json"],
             ["run", "decisions", "demo-run"], ["supervise", "status"], ["node", "list"], ["cluster", "status"],
             ["runbook", "show", "TrainingHang"]):
    res = r.invoke(app, args)
    out.append([args, res.exit_code, res.output])
heavy = [m for m in ("ray", "torch", "transformers") if m in sys.modules]
print(__import__("json").dumps({"results": out, "heavy": heavy}))
"""


def test_read_only_commands_import_neither_ray_nor_torch(llmctl_home):
    led = Ledger(llmctl_home / "ledger.db")
    rd = RunDir.of(llmctl_home, "demo-run").create()
    from controlplane.spec import RunSpec, dump_spec

    led.create_run("demo-run", "demo", dump_spec(RunSpec()), {}, str(rd.path))
    rd.append_event("step", 1, step=3, loss=4.2, tokens=300, tokens_per_s=100.0, step_time_s=0.1)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["heavy"] == []
    for args, code, output in data["results"]:
        assert code == 0, (args, output)
    assert "4.2" in data["results"][1][2]


def test_unknown_run_is_one_line_exit_2():
    from typer.testing import CliRunner

    from controlplane.cli.main import app

    res = CliRunner().invoke(app, ["run", "status", "no-such-run"])
    assert res.exit_code == 2
    assert "no such run" in res.output
    assert "Traceback" not in res.output
