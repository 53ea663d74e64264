"""`llmctl infra` through typer's CliRunner: render writes reviewable YAML; engine commands need the Pulumi CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from controlplane.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = str(ROOT / "examples" / "cluster-reference.yaml")
runner = CliRunner()


def test_render_writes_every_object_and_the_helm_records(tmp_path):
    out = tmp_path / "manifests"
    result = runner.invoke(app, ["infra", "render", str(out), "--cluster", REFERENCE, "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(f for f in files if f.count("/") == 1 and f[:5] != "helm/")
    for rel in kustomization["resources"]:
        obj = yaml.safe_load((out / rel).read_text())
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], rel
    raycluster = yaml.safe_load((out / "llmctl" / "raycluster-reference.yaml").read_text())
    assert raycluster["spec"]["workerGroupSpecs"][0]["replicas"] == 116  # an int again, not 116.0
    charts = {yaml.safe_load((out / f).read_text())["chart"] for f in files if f.startswith("helm/")}
    assert charts == {"gpu-operator", "kuberay-operator", "kube-prometheus-stack"}
    secret = yaml.safe_load((out / "llmctl" / "secret-llmctl-ray-auth.yaml").read_text())
    assert secret["stringData"] == {"auth_token": "<set from Pulumi secret config; not rendered>"}
    in_cluster = yaml.safe_load((out / "llmctl" / "configmap-llmctl-cluster.yaml").read_text())["data"]["cluster.yaml"]
    assert yaml.safe_load(in_cluster)["address"] == "http://reference-head-svc.llmctl.svc.cluster.local:8265"


def test_render_again_replaces_its_own_output_but_refuses_other_directories(tmp_path):
    out = tmp_path / "manifests"
    assert runner.invoke(app, ["infra", "render", str(out), "-c", REFERENCE]).exit_code == 0
    (out / "llmctl" / "raycluster-reference.yaml").write_text("stale")
    assert runner.invoke(app, ["infra", "render", str(out), "-c", REFERENCE]).exit_code == 0
    assert "stale" not in (out / "llmctl" / "raycluster-reference.yaml").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["infra", "render", str(other), "-c", REFERENCE])
    assert result.exit_code == 2 and "not empty and not an earlier render" in result.stderr
    assert (other / "keep.txt").read_text() == "mine"


def test_render_takes_sizes_from_a_stack_file_and_skips_its_secrets(tmp_path):
    stack = tmp_path / "Pulumi.test.yaml"
    stack.write_text(
        yaml.safe_dump(
            {
                "config": {
                    "llmctl:clusterSpec": REFERENCE,
                    "llmctl:prometheusStorageSize": "3Ti",
                    "llmctl:rayAuthToken": {"secure": "v1:abc"},
                }
            }
        )
    )
    out = tmp_path / "manifests"
    result = runner.invoke(app, ["infra", "render", str(out), "--stack-config", str(stack)])
    assert result.exit_code == 0, result.output
    values = yaml.safe_load((out / "helm" / "llmctl-monitoring.yaml").read_text())["values"]
    claim = values["prometheus"]["prometheusSpec"]["storageSpec"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "3Ti"
    stack.write_text(yaml.safe_dump({"config": {"llmctl:clusterSpec": REFERENCE, "llmctl:ledgerVolumeSize": "lots"}}))
    result = runner.invoke(app, ["infra", "render", str(tmp_path / "x"), "--stack-config", str(stack)])
    assert result.exit_code == 2 and "ledgerVolumeSize" in result.stderr


def test_render_of_a_spec_infra_cannot_provision_is_one_line_exit_2(tmp_path):
    local = tmp_path / "local.yaml"
    local.write_text("name: laptop\n")
    result = runner.invoke(app, ["infra", "render", str(tmp_path / "out"), "-c", str(local)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "kind: infra/ provisions kind 'kubernetes'" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["preview", "up", "destroy", "outputs"])
def test_engine_commands_without_the_pulumi_cli_say_what_is_missing(verb, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `pulumi` anywhere on it
    monkeypatch.setenv("PULUMI_HOME", str(tmp_path / "pulumi-home"))
    result = runner.invoke(
        app, ["infra", verb, "-c", REFERENCE, "--yes"] if verb == "destroy" else ["infra", verb, "-c", REFERENCE]
    )
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Pulumi CLI is not installed" in line and "get.pulumi.com" in line


def test_the_cli_does_not_import_pulumi_until_an_infra_command_runs():
    code = "import sys, controlplane.cli.main; sys.exit(1 if any(m.startswith('pulumi') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_a_failing_pulumi_cli_is_one_line_and_exit_1(tmp_path, monkeypatch):
    """A stand-in `pulumi` (the real CLI cannot be installed here) that answers `version` and fails the rest."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "pulumi"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = version ]; then echo v3.200.0; exit 0; fi\n'
        f'echo "$@" >> {calls}\n'
        'echo "error: failed to reach the state backend" >&2\nexit 255\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    work = tmp_path / "work"
    result = runner.invoke(app, ["infra", "up", "-c", REFERENCE, "--work-dir", str(work)])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: pulumi: error: failed to reach the state backend"
    assert "stack select --stack reference" in calls.read_text()  # the stack is named after the spec
    assert (work / "Pulumi.yaml").is_file()
