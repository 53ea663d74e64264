"""What the serving engine accepts, checked on exported configs (pure), and `run export`'s refusal."""

from __future__ import annotations

import json

import pytest

from controlplane.errors import UserError
from controlplane.rollout.engine_check import UnservableModel, check_model_dir, head_dim_of, problems, vllm_head_dims
from controlplane.spec import RunSpec
from controlplane.spec.run import PRESETS


def llama(**over):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "num_hidden_layers": 2,
        "intermediate_size": 176,
        "vocab_size": 4096,
        "torch_dtype": "float32",
    }
    cfg.update(over)
    return cfg


def test_presets_have_a_head_dim_vllm_serves():
    for name, dims in PRESETS.items():
        assert dims["hidden_size"] // dims["num_heads"] in vllm_head_dims(), name
        cfg = llama(hidden_size=dims["hidden_size"], num_attention_heads=dims["num_heads"])
        cfg["num_key_value_heads"] = dims["num_kv_heads"]
        assert problems(cfg) == [], name
    assert RunSpec().model.resolve(4096).hidden_size // RunSpec().model.resolve(4096).num_heads == 64


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        ({"num_attention_heads": 4}, "head_dim 16"),  # the old tiny shape: vLLM's CPU attention refuses it
        ({"head_dim": 48}, "head_dim 48"),  # a multiple of 8 the GPU takes, but not the CPU backend
        ({"hidden_size": 4096, "num_attention_heads": 4, "num_key_value_heads": 4}, "head_dim 1024"),
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"num_attention_heads": 2, "num_key_value_heads": 3, "hidden_size": 128}, "multiple of num_key_value_heads"),
        ({"hidden_size": 65, "num_attention_heads": 2, "num_key_value_heads": 2}, "not divisible"),
        ({"torch_dtype": "int8"}, "dtype"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_problems_name_what_vllm_refuses(over, msg):
    found = problems(llama(**over))
    assert found and any(msg in p for p in found), found


def test_transformers_checks_only_the_shape():
    assert problems(llama(num_attention_heads=4, architectures=["X"]), "transformers") == []
    assert problems(llama(hidden_size=65, num_attention_heads=2, num_key_value_heads=2), "transformers")
    assert head_dim_of(llama(head_dim=128)) == 128 and head_dim_of(llama(hidden_size=256, num_attention_heads=4)) == 64


def test_check_model_dir_is_one_line_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama(num_attention_heads=4)))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UnservableModel) as exc:
        check_model_dir(tmp_path)
    assert isinstance(exc.value, UserError) and "\n" not in str(exc.value)
    assert "head_dim 16" in str(exc.value) and "engine: transformers" in str(exc.value)
    assert check_model_dir(tmp_path, "transformers")["hidden_size"] == 64
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnservableModel, match="unreadable"):
        check_model_dir(tmp_path)


def test_run_export_refuses_a_model_vllm_cannot_load_and_writes_a_chat_template():
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from controlplane.cli.main import app
    from controlplane.context import Context
    from tests.serving_factory import make_run

    ctx = Context.load()
    make_run(ctx, "heads4", steps=(10,), num_heads=4)  # head_dim 16
    runner = CliRunner()
    r = runner.invoke(app, ["run", "export", "heads4"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "head_dim 16" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert runner.invoke(app, ["run", "export", "heads4", "--engine", "transformers"]).exit_code == 0

    make_run(ctx, "heads1", steps=(10,))
    ok = runner.invoke(app, ["run", "export", "heads1", "--json"])
    assert ok.exit_code == 0, ok.output
    tok = AutoTokenizer.from_pretrained(json.loads(ok.stdout)["model_dir"])
    text = tok.apply_chat_template(
        [{"role": "user", "content": "日本の首都は"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "user: 日本の首都は<|endoftext|>\nassistant: "
