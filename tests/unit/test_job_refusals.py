"""Every parallelism field is done by the job or refused by `run submit` (plan keeps it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.spec import RunSpec, job_refusals

REPO_EXAMPLES = "examples"


def spec(**parts) -> dict:
    return {"name": "refuse", "train": {"max_steps": 5}, **parts}


@pytest.mark.parametrize(
    "parts,field",
    [
        ({"parallelism": {"tensor": 2}}, "parallelism.tensor"),
        ({"parallelism": {"pipeline": 2}}, "parallelism.pipeline"),
        ({"workers": {"num_workers": 2, "gpus_per_worker": 8}}, "workers.gpus_per_worker"),
        ({"parallelism": {"zero_stage": 3}, "power": {"cap_watts": "auto"}}, "power.cap_watts"),
    ],
)
def test_run_submit_refuses_what_the_job_does_not_do_in_one_line(tmp_path, parts, field):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec(**parts)))
    result = CliRunner().invoke(app, ["run", "submit", str(path), "--no-supervise"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0], result.output
    assert "Traceback" not in result.output


def test_what_the_job_implements_is_not_refused():
    ok = RunSpec.model_validate(
        spec(
            workers={"num_workers": 4, "gpus_per_worker": 1},
            parallelism={"zero_stage": 3, "replicate": 2, "activation_checkpointing": "selective"},
        )
    )
    assert job_refusals(ok) == []


def test_plan_still_accepts_tensor_and_pipeline_for_what_if(tmp_path):
    run = yaml.safe_load(Path(f"{REPO_EXAMPLES}/run-13b.yaml").read_text())
    run["parallelism"].update(tensor=2, pipeline=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    result = CliRunner().invoke(app, ["plan", f"{REPO_EXAMPLES}/cluster-reference.yaml", str(path), "--json"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "parallelism,workers,needle",
    [
        ({"zero_stage": 0, "replicate": 2}, 2, "needs zero_stage"),
        ({"zero_stage": 3, "replicate": 3}, 2, "must divide workers.num_workers"),
    ],
)
def test_replicate_is_checked_against_the_world(parallelism, workers, needle):
    with pytest.raises(ValueError, match=needle):
        RunSpec.model_validate(spec(parallelism=parallelism, workers={"num_workers": workers}))


def test_min_workers_may_not_exceed_num_workers():
    with pytest.raises(ValueError, match="min_workers"):
        RunSpec.model_validate(spec(workers={"num_workers": 2, "min_workers": 3}))


def test_a_shrinking_world_is_accepted_when_some_smaller_world_keeps_the_batch():
    assert job_refusals(RunSpec.model_validate(spec(workers={"num_workers": 2, "min_workers": 1}))) == []
    assert job_refusals(RunSpec.model_validate(spec(workers={"num_workers": 2, "min_workers": 2}))) == []
    # 4 workers, at least 3: the only smaller world, 3, does not split a global batch of 8
    odd = spec(train={"max_steps": 5, "global_batch_size": 8}, workers={"num_workers": 4, "min_workers": 3})
    refused = job_refusals(RunSpec.model_validate(odd))
    assert len(refused) == 1 and refused[0].startswith("workers.min_workers: no world of 3 to 3 workers")


def test_elastic_world_keeps_the_global_batch():
    from jobs.pretrain.placement import elastic_world

    def run(workers, floor, batch=8, micro=None, replicate=1, stage=0):
        return RunSpec.model_validate(
            spec(
                train={"max_steps": 5, "global_batch_size": batch, "micro_batch_size": micro},
                workers={"num_workers": workers, "min_workers": floor},
                parallelism={"zero_stage": stage, "replicate": replicate},
            )
        )

    assert elastic_world(4, run(4, 1)) == 4
    assert elastic_world(3, run(4, 1)) == 2  # 8 does not split over 3
    assert elastic_world(1, run(4, 2)) is None  # below the floor
    assert elastic_world(3, run(4, 1, batch=24, micro=2)) == 3  # 24 = 2 x 4 accumulation x 3
    assert elastic_world(3, run(4, 1, batch=16, micro=4, stage=3)) == 2
    assert elastic_world(3, run(4, 1, replicate=2, stage=3)) == 2
