"""Every file in examples/ is a valid spec of the kind its name says; the tiny run is the
quickstart's spec, and `llmctl plan` takes each run spec with its cluster. (Submitting the tiny
one to a real cluster: tests/integration/test_runbooks_live.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.quickstart import default_run_spec
from controlplane.runs import check_runnable
from controlplane.spec import RunSpec, load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()


def test_examples_hold_a_laptop_a_single_gpu_and_the_reference_run():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"run-tiny.yaml", "run-single-gpu.yaml", "run-13b.yaml", "cluster-reference.yaml"} <= names


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*"), key=lambda p: p.name), ids=lambda p: p.name)
def test_every_example_validates_as_its_kind(path):
    kind = "ClusterSpec" if path.name.startswith("cluster-") else "RunSpec"
    assert path.suffix == ".yaml", f"{path.name}: examples/ holds specs only"
    assert path.read_text().lstrip().startswith("#"), f"{path.name}: starts with a comment saying what it is for"
    result = runner.invoke(app, ["spec", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"valid {kind}" in result.output
    if kind == "RunSpec":
        check_runnable(load_spec(RunSpec, path))  # `run submit` would not refuse it


def test_the_tiny_run_is_the_quickstarts_spec():
    tiny = load_spec(RunSpec, EXAMPLES / "run-tiny.yaml").model_dump(mode="json")
    quick = default_run_spec(300, inject_fault=False).model_dump(mode="json")
    assert {k: v for k, v in tiny.items() if k != "name"} == {k: v for k, v in quick.items() if k != "name"}


@pytest.mark.parametrize(
    ("cluster", "run"),
    [("cluster-single-gpu.yaml", "run-single-gpu.yaml"), ("cluster-reference.yaml", "run-13b.yaml")],
)
def test_plan_takes_each_run_with_its_cluster(cluster, run):
    result = runner.invoke(app, ["plan", str(EXAMPLES / cluster), str(EXAMPLES / run), "--json"])
    assert result.exit_code == 0, result.output
