"""Export: a verified checkpoint becomes a directory transformers loads as is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.errors import NotFoundError
from controlplane.rollout.export import export_checkpoint, resolve_model
from controlplane.rundir import RunDir
from tests.serving_factory import make_run


def test_export_newest_verified_loads_with_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = Context.load()
    make_run(ctx, "r1", steps=(10, 20))
    result = CliRunner().invoke(app, ["run", "export", "r1", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["step"] == 20 and info["version"] == "r1-s20"
    model_dir = info["model_dir"]
    config = json.loads(Path(model_dir, "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads(Path(model_dir, "generation_config.json").read_text())["eos_token_id"] is not None
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("日本の首都は", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "日本の首都は"
    assert tok.eos_token == "<|endoftext|>"
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3 or tok.eos_token_id in out[0].tolist()


def test_export_skips_corrupt_newest_and_reuses():
    ctx = Context.load()
    rd = RunDir.of(ctx.storage, "r2")
    make_run(ctx, "r2", steps=(10, 20))
    (rd.checkpoints / "step_000000020" / "model.safetensors").write_bytes(b"torn")
    first = export_checkpoint(rd)
    assert first.step == 10 and not first.reused
    again = export_checkpoint(rd)
    assert again.reused and again.model_dir == first.model_dir
    assert resolve_model(ctx, "r2@10").model_dir == first.model_dir
    assert resolve_model(ctx, str(first.model_dir)).version == "r2-s10"


def test_export_errors_are_one_line():
    ctx = Context.load()
    rd = RunDir.of(ctx.storage, "r3")
    make_run(ctx, "r3", steps=(10,))
    runner = CliRunner()
    r = runner.invoke(app, ["run", "export", "r3", "--step", "99"])
    assert r.exit_code == 2 and "no checkpoint at step 99" in r.output
    r = runner.invoke(app, ["run", "export", "nope"])
    assert r.exit_code == 2 and "no such run" in r.output
    shutil.rmtree(rd.checkpoints / "step_000000010")
    with pytest.raises(NotFoundError):
        export_checkpoint(rd)


def test_export_of_a_dataset_prepared_by_llmctl_data(tmp_path):
    """The real `data prepare` tokenizer (its <|bos|>/<|endoftext|> ids in meta.json) round-trips."""
    from transformers import AutoTokenizer

    from controlplane.data import prepare

    src = tmp_path / "corpus"
    src.mkdir()
    lines = ["日本語の文章です。マニュアルページを読みます。", "富士山は高い山です。", "猫は魚が好きです。"]
    for i in range(30):
        (src / f"doc{i}.txt").write_text(lines[i % 3] * (1 + i % 4), encoding="utf-8")
    ctx = Context.load()
    dataset = ctx.storage / "datasets" / "test-ja"
    meta = prepare(src, dataset, vocab_size=300, heldout_fraction=0.1, seed=0)
    make_run(ctx, "real-data", steps=(10,))
    exported = export_checkpoint(RunDir.of(ctx.storage, "real-data"))
    tok = AutoTokenizer.from_pretrained(str(exported.model_dir))
    assert tok.bos_token_id == meta["bos_id"] and tok.eos_token_id == meta["eos_id"]
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|endoftext|>"
    config = json.loads((exported.model_dir / "config.json").read_text())
    assert config["eos_token_id"] == meta["eos_id"] and config["bos_token_id"] == meta["bos_id"]
