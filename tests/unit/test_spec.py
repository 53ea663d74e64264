"""Specs: good files load; each kind of bad input gives one line naming the field, fast."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.errors import ConfigurationError
from controlplane.spec import ClusterSpec, ModelSpec, RolloutSpec, RunSpec, load_spec, read_record

runner = CliRunner()

GOOD_RUN = """
name: tiny-ja
model: {preset: tiny}
train: {max_steps: 50, global_batch_size: 8, seq_len: 64}
workers: {num_workers: 2}
checkpoint: {interval_steps: 10, keep_last: 2}
"""


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_run_spec_loads(tmp_path):
    spec = load_spec(RunSpec, write(tmp_path, GOOD_RUN))
    assert spec.train.steps == 50
    assert spec.workers.num_workers == 2
    assert spec.checkpoint.interval_steps == 10


def test_13b_preset_is_llama2_13b_shaped():
    dims = ModelSpec(preset="13b").resolve()
    assert (dims.num_layers, dims.hidden_size, dims.num_heads, dims.ffn_size) == (40, 5120, 40, 13824)
    assert 12.9e9 < dims.param_count() < 13.1e9
    # vocab comes from the tokenizer when given
    assert ModelSpec(preset="13b").resolve(vocab_size=50_000).param_count() > dims.param_count()


def test_param_count_by_hand():
    dims = ModelSpec(preset=None, hidden_size=8, num_layers=1, num_heads=2, ffn_size=16, vocab_size=10).resolve()
    # attn 4*64 + mlp 3*8*16 + norms 2*8 + embed/unembed 2*10*8 + final norm 8
    assert dims.param_count() == 256 + 384 + 16 + 160 + 8


def test_tokens_budget_gives_steps():
    spec = RunSpec(train={"total_tokens": 10_000, "global_batch_size": 4, "seq_len": 100})
    assert spec.train.steps == 25


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train: [1, 2", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("train: {max_steps: ten}", "train.max_steps"),
        ("bogus: 1", "bogus: unknown field"),
        ("checkpoint: {interval_steps: -5}", "checkpoint.interval_steps"),
        ("train: {max_steps: 10, global_batch_size: 9}", "divisible by workers.num_workers"),
        ("train: {max_steps: 10, total_tokens: 100}", "exactly one of max_steps and total_tokens"),
        ("model: {preset: null, hidden_size: 64}", "without a preset"),
        ("workers: {num_workers: 0}", "workers.num_workers"),
        ("faults: [{kind: kill_worker, at_step: 3, rank: 5}]", "rank 5 does not exist"),
    ],
)
def test_bad_run_specs_fail_with_one_line(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError) as exc:
        load_spec(RunSpec, path)
    msg = str(exc.value)
    assert fragment in msg
    assert "\n" not in msg
    result = runner.invoke(app, ["spec", "validate", str(path), "--kind", "run"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_yaml_bomb_rejected_fast(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    path = write(tmp_path, "\n".join(lines))
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError, match="alias bomb"):
        load_spec(RunSpec, path)
    assert time.monotonic() - t0 < 1.0


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigurationError, match="no such file"):
        load_spec(RunSpec, tmp_path / "nope.yaml")
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        load_spec(RunSpec, path)


def test_cluster_spec_rules(tmp_path):
    with pytest.raises(ConfigurationError, match="address is required"):
        load_spec(ClusterSpec, write(tmp_path, "kind: ray"))
    with pytest.raises(ConfigurationError, match="expose_dashboard"):
        load_spec(ClusterSpec, write(tmp_path, "ray: {dashboard_host: 0.0.0.0}"))
    with pytest.raises(ConfigurationError, match="gpu_model is required"):
        load_spec(ClusterSpec, write(tmp_path, "node_groups: [{name: a, gpus_per_node: 8}]"))
    ref = load_spec(
        ClusterSpec,
        write(tmp_path, "node_groups: [{name: a100, gpu_model: A100-80GB, gpus_per_node: 8, node_count: 116}]"),
    )
    assert ref.total_gpus == 928


def test_rollout_steps_must_end_at_100():
    with pytest.raises(ValueError):
        RolloutSpec(name="x", model="m", traffic_steps=[10, 50])
    assert RolloutSpec(name="x", model="m").traffic_steps == [10, 50, 100]


def test_lenient_read_drops_fields_a_newer_writer_added():
    data = RunSpec().model_dump(mode="json")
    data["future_field"] = 1
    data["train"]["another"] = "x"
    assert read_record(RunSpec, data).train.steps == 200


def test_cli_schema_and_show(tmp_path):
    result = runner.invoke(app, ["spec", "schema", "run"])
    assert result.exit_code == 0 and '"RunSpec"' in result.output or '"title": "RunSpec"' in result.output
    result = runner.invoke(app, ["spec", "show", str(write(tmp_path, "model: {preset: 13b}\ntrain: {max_steps: 1}"))])
    assert result.exit_code == 0
    assert "13.02B" in result.output
    result = runner.invoke(app, ["spec", "schema", "nope"])
    assert result.exit_code == 2


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n\n# and another\n", "---\n"])
@pytest.mark.parametrize("kind", [None, "run", "cluster"])
def test_an_empty_or_all_comment_spec_is_refused_in_one_line(tmp_path, text, kind):
    path = write(tmp_path, text)
    with pytest.raises(ConfigurationError, match="empty"):
        load_spec(ClusterSpec if kind == "cluster" else RunSpec, path)
    result = runner.invoke(app, ["spec", "validate", str(path), *(["--kind", kind] if kind else [])])
    assert result.exit_code == 2
    assert "empty" in result.output and "valid" not in result.output.replace("invalid", "")
    assert len(result.output.strip().splitlines()) == 1


def test_an_unknown_key_gets_did_you_mean(tmp_path):
    path = write(tmp_path, "workers: {num_worker: 2}\ntrain: {max_steps: 5}\n")
    with pytest.raises(ConfigurationError, match=r"workers.num_worker: unknown field; did you mean 'num_workers'\?"):
        load_spec(RunSpec, path)
    far = write(tmp_path, "zzzz: 1\n", "far.yaml")
    with pytest.raises(ConfigurationError) as exc:
        load_spec(RunSpec, far)
    assert "did you mean" not in str(exc.value)


def test_spec_validate_prints_every_problem_one_line_each(tmp_path):
    path = write(tmp_path, "workers: {num_worker: 2}\ntrain: {max_step: 3, seq_len: -1}\nbogus: 1\n")
    result = runner.invoke(app, ["spec", "validate", str(path), "--kind", "run"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 4, result.output
    for fragment in ("workers.num_worker", "train.max_step", "train.seq_len", "bogus"):
        assert sum(fragment in line for line in lines) == 1, fragment
    assert "more" not in result.output
    with pytest.raises(ConfigurationError, match=r"\(and 3 more"):
        load_spec(RunSpec, path)  # elsewhere one line: the first problem and how many more


def test_a_cluster_spec_is_told_apart_without_kind(tmp_path):
    path = write(tmp_path, "name: lab\nray: {worker_nodes: 1}\n")
    result = runner.invoke(app, ["spec", "validate", str(path)])
    assert result.exit_code == 0 and "valid ClusterSpec" in result.output


def test_schema_defaults_are_what_spec_show_resolves(tmp_path):
    import json

    schema = json.loads(runner.invoke(app, ["spec", "schema", "run"]).output)
    shown = json.loads(runner.invoke(app, ["spec", "show", str(write(tmp_path, "name: x\n")), "--json"]).output)
    assert schema["properties"]["train"]["default"]["max_steps"] == shown["train"]["max_steps"] == 200
    for key, prop in schema["properties"].items():
        if "default" in prop and key != "name":  # name is the one field the file sets
            assert prop["default"] == shown[key], key


def test_spec_validate_and_run_submit_say_the_same_of_a_directory(tmp_path):
    said = []
    for args in (["spec", "validate", str(tmp_path)], ["run", "submit", str(tmp_path)]):
        result = runner.invoke(app, args, env={"LLMCTL_HOME": str(tmp_path / "home")})
        assert result.exit_code == 2
        said.append(result.output.strip())
    assert said[0] == said[1] and "is a directory" in said[0]


def test_spec_show_counts_a_small_model_in_its_unit(tmp_path):
    result = runner.invoke(app, ["spec", "show", str(write(tmp_path, GOOD_RUN))])
    assert result.exit_code == 0
    line = [x for x in result.output.splitlines() if x.startswith("# parameters")][0]
    assert "0.00" not in line and line.endswith(("K)", "M)")), line
