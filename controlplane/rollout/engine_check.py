"""Can the serving engine load this model? Checked on the exported config, before any rollout.

Pure (a config dict in, problems out) and torch-free; `check_model_dir` reads the files.
The rules are those of vLLM 0.32, on both of the builds llmctl serves with, because an
export must serve on the CPU quickstart and on the GPU serving nodes alike:

- architecture: what `run export` writes and vLLM implements (`LlamaForCausalLM`);
- head dimension: the CPU attention backend takes 32, 64, 80, 96, 112, 128, 160, 192, 224,
  256 or 512 (it refuses 16); the GPU backends (FlashAttention) a multiple of 8 up to 256;
- heads: num_attention_heads a multiple of num_key_value_heads; hidden_size divisible by
  num_attention_heads unless head_dim is given;
- dtype: float32, bfloat16 or float16; a tokenizer in the directory.

`engine: transformers` serves what vLLM cannot; for it only the basic shape is checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from controlplane.errors import UserError

VLLM_ARCHITECTURES = ("LlamaForCausalLM",)
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
GPU_MAX_HEAD_DIM = 256
DTYPES = ("float32", "bfloat16", "float16")


class UnservableModel(UserError):
    """The serving engine cannot load this model; the message says why and what to do."""


def gpu_head_dim_ok(head_dim: int) -> bool:
    return head_dim % 8 == 0 and 0 < head_dim <= GPU_MAX_HEAD_DIM


def vllm_head_dims() -> list[int]:
    """Head dimensions both vLLM builds serve."""
    return [d for d in CPU_HEAD_DIMS if gpu_head_dim_ok(d)]


def _int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def head_dim_of(config: dict[str, Any]) -> int | None:
    explicit = _int(config, "head_dim")
    if explicit:
        return explicit
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    if hidden and heads and hidden % heads == 0:
        return hidden // heads
    return None


def problems(config: dict[str, Any], engine: str = "vllm") -> list[str]:
    """What keeps `engine` ('vllm', 'auto' or 'transformers') from loading this config; [] if nothing."""
    out: list[str] = []
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads") or heads
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if _int(config, key) is None:
            out.append(f"{key}: expected a positive integer, got {config.get(key)!r}")
    if heads and kv_heads and heads % kv_heads:
        out.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = head_dim_of(config)
    if hidden and heads and head_dim is None:
        out.append(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if engine == "transformers":
        return out
    archs = config.get("architectures") or []
    if not any(a in VLLM_ARCHITECTURES for a in archs):
        out.append(f"architectures {archs}: vLLM serves {', '.join(VLLM_ARCHITECTURES)} exports")
    if head_dim is not None and not (head_dim in CPU_HEAD_DIMS and gpu_head_dim_ok(head_dim)):
        dims = ", ".join(map(str, vllm_head_dims()))
        out.append(
            f"head_dim {head_dim} (hidden_size {hidden} / num_attention_heads {heads}) is not one vLLM's CPU and "
            f"GPU attention both take ({dims})"
        )
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        out.append(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return out


def check_model_dir(model_dir: str | Path, engine: str = "vllm") -> dict[str, Any]:
    """Raise UnservableModel (one line) unless `engine` can load the model directory; returns its config."""
    path = Path(model_dir)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnservableModel(f"{path / 'config.json'}: unreadable ({type(exc).__name__})") from None
    found = problems(config if isinstance(config, dict) else {}, engine)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        found.append("no tokenizer (tokenizer.json) in the model directory")
    if found:
        fix = (
            "; export a model with a supported shape, or serve it with engine: transformers"
            if engine != "transformers"
            else ""
        )
        raise UnservableModel(f"{path}: {'; '.join(found)}{fix}")
    return config
