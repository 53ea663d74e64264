"""Dashboards as code and alert rules: committed files match the generator; promtool passes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.observability.catalog import EXPORTED_SOURCES, SOURCES, metrics_in
from controlplane.observability.dashboards import render_all, rendered_files
from controlplane.observability.panels import DASHBOARDS, exported_dashboards, substitute
from controlplane.observability.runbooks import load_alerts

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = ROOT / "dashboards"
ALL_METRICS = {m for names in SOURCES.values() for m in names}


def test_committed_dashboards_match_the_generator():
    for rel, text in rendered_files().items():
        path = DASHBOARDS_DIR / rel
        assert path.is_file(), f"{rel} missing: run `llmctl dashboards generate`"
        assert path.read_text(encoding="utf-8") == text, f"{rel} is stale: run `llmctl dashboards generate`"
    committed = {p.name for p in DASHBOARDS_DIR.glob("llmctl-*.json")}
    assert committed == {f"{uid}.json" for uid in render_all()}


def test_generate_cli_writes_the_same_files_and_check_catches_drift(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["dashboards", "generate", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for rel, text in rendered_files().items():
        assert (tmp_path / rel).read_text(encoding="utf-8") == text
    assert runner.invoke(app, ["dashboards", "generate", "--out", str(tmp_path), "--check"]).exit_code == 0
    (tmp_path / "llmctl-power.json").write_text("{}", encoding="utf-8")
    res = runner.invoke(app, ["dashboards", "generate", "--out", str(tmp_path), "--check"])
    assert res.exit_code == 2 and "llmctl-power.json" in res.output


def test_dashboards_have_variables_and_read_only_listed_metrics():
    rendered = render_all()
    assert set(rendered) == {"llmctl-power", "llmctl-utilization", "llmctl-training", "llmctl-serving"} & set(
        d.uid for d in exported_dashboards()
    )
    for uid, d in rendered.items():
        names = {v["name"] for v in d["templating"]["list"]}
        assert {"cluster", "run", "node"} <= names, uid
        assert d["uid"] == uid and d["panels"]
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for panel in d["panels"]:
            for target in panel["targets"]:
                used = metrics_in(target["expr"])
                assert used and used <= ALL_METRICS, (panel["title"], used - ALL_METRICS)
    for d in exported_dashboards():
        for p in d.panels:
            assert p.sources <= EXPORTED_SOURCES


def test_panels_without_an_exporter_are_left_out():
    only_gpu = exported_dashboards(frozenset({"gpu"}))
    assert "llmctl-serving" not in {d.uid for d in only_gpu}
    power = next(d for d in only_gpu if d.uid == "llmctl-power")
    assert "Energy per token" not in {p.title for p in power.panels}  # needs the training job
    assert "Cluster power" in {p.title for p in power.panels}
    full = {d.uid: d for d in DASHBOARDS}
    assert len(power.panels) < len(full["llmctl-power"].panels)


def test_required_panels_exist():
    titles = {p.title for d in exported_dashboards() for p in d.panels}
    for needed in (
        "Cluster power",
        "Power per node",
        "Power per GPU",
        "Power against limit",
        "Energy per run",
        "Throttle reasons",
        "GPU temperature",
        "GPU utilization",
        "GPU memory used",
        "SM clock",
    ):
        assert needed in titles


def test_substitute_fills_every_grafana_variable():
    for d in DASHBOARDS:
        for p in d.panels:
            for q in p.queries:
                assert "$" not in substitute(q.expr), q.expr


def test_promtool_check_and_unit_tests_pass():
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: scripts/setup installs Debian's prometheus"
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yaml"], cwd=DASHBOARDS_DIR, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"], cwd=DASHBOARDS_DIR, capture_output=True, text=True, timeout=120
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    import yaml

    tests = yaml.safe_load((DASHBOARDS_DIR / "alerts_test.yaml").read_text(encoding="utf-8"))["tests"]
    fired = {at["alertname"] for t in tests for at in t["alert_rule_test"] if at["exp_alerts"]}
    assert fired == {a.name for a in load_alerts(DASHBOARDS_DIR / "alerts.yaml")}


def test_alert_rules_read_only_listed_metrics_and_link_their_runbook():
    alerts = load_alerts(DASHBOARDS_DIR / "alerts.yaml")
    assert len(alerts) >= 14
    for a in alerts:
        used = metrics_in(a.expr)
        assert used <= ALL_METRICS, (a.name, used - ALL_METRICS)
        assert used or re.search(r"\bup\{", a.expr), a.name
        assert a.runbook_url == f"runbooks/{a.name}.md", a.name
        assert a.severity in ("critical", "warning"), a.name
