"""Factories for serving tests: a real tokenizer, dataset, run and committed checkpoints.

The tokenizer is a byte-level BPE trained with HF tokenizers on the Japanese text below; the
model is a tiny LlamaForCausalLM from transformers; checkpoints are committed through
controlplane.checkpoint in the layout of the job contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

JA_TEXT = [
    "今日はとても良い天気です。公園で子どもたちが元気に遊んでいます。",
    "日本の首都は東京です。東京には多くの人が住んでいます。",
    "富士山は日本で一番高い山です。冬になると山頂は雪で白くなります。",
    "猫は魚が好きです。犬は散歩が好きです。",
    "朝ごはんにパンと牛乳を食べました。昼ごはんはおにぎりでした。",
    "図書館で本を借りて、家でゆっくり読みました。",
    "電車は駅に止まります。私は毎朝七時の電車に乗ります。",
    "雨の日には傘を持って出かけます。晴れの日には帽子をかぶります。",
    "この機械学習モデルは日本語の文章を生成します。",
    "コンピュータのメモリが足りないときはスワップが使われます。",
    "manコマンドはマニュアルページを表示します。lsコマンドはファイルの一覧を表示します。",
    "春には桜が咲き、秋には紅葉が美しくなります。",
]
SPECIALS = ["<|endoftext|>", "<pad>"]


def make_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(JA_TEXT * 4, trainer)
    tok.save(str(path))
    return path


def make_dataset(root: Path) -> Path:
    from tokenizers import Tokenizer

    root.mkdir(parents=True, exist_ok=True)
    make_tokenizer(root / "tokenizer.json")
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for text in JA_TEXT * 3:
        ids += tok.encode(text).ids + [eos]
    arr = np.array(ids, dtype=np.uint16)
    split = len(arr) * 3 // 4
    arr[:split].tofile(root / "train.bin")
    arr[split:].tofile(root / "heldout.bin")
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "dtype": "uint16",
        "train_tokens": int(split),
        "heldout_tokens": int(len(arr) - split),
        "source": "test",
        "seed": 0,
        "bos_id": eos,
        "eos_id": eos,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def tiny_config(vocab_size: int, num_heads: int = 1):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,  # head_dim 64 with one head: vLLM's CPU attention serves it
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
    )


def make_model_dir(root: Path, dtype=None, **config) -> Path:
    """A Hugging Face model directory: the test tokenizer and a random tiny Llama (`config` overrides)."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(make_tokenizer(root / "tok.json")), eos_token="<|endoftext|>", pad_token="<pad>"
    )
    tok.save_pretrained(root)
    torch.manual_seed(0)
    cfg = tiny_config(len(tok))
    for key, value in config.items():
        setattr(cfg, key, value)
    model = LlamaForCausalLM(cfg)
    (model.to(dtype) if dtype is not None else model).save_pretrained(root)
    return root


def commit_checkpoint(ckpt_root: Path, step: int, vocab_size: int, seed: int = 0, num_heads: int = 1) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from controlplane import checkpoint as ckpt

    torch.manual_seed(seed + step)
    config = tiny_config(vocab_size, num_heads)
    model = LlamaForCausalLM(config)
    staging = ckpt.staging_dir(ckpt_root, step)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staging / "model.safetensors"))
    (staging / "config.json").write_text(json.dumps(config.to_dict()))
    torch.save({"optimizer": {}}, staging / "optimizer.pt")
    (staging / "trainer_state.json").write_text(
        json.dumps({"step": step, "tokens": step * 64, "loss": 5.0, "data_cursor": step, "seed": 0, "world_size": 1})
    )
    torch.save({"torch": torch.get_rng_state()}, staging / "rng.pt")
    return ckpt.commit(staging, ckpt_root, step, meta={"loss": 5.0, "tokens": step * 64, "attempt": 1}).path


def make_run(ctx, run_id: str = "ja-tiny", steps: tuple[int, ...] = (10, 20), num_heads: int = 1) -> Path:
    """A run in the ledger with a dataset and committed checkpoints; returns the run directory."""
    from controlplane.rundir import RunDir
    from controlplane.spec import ClusterSpec, RunSpec

    dataset = ctx.storage / "datasets" / "test-ja"
    if not (dataset / "meta.json").is_file():
        make_dataset(dataset)
    vocab = json.loads((dataset / "meta.json").read_text())["vocab_size"]
    rd = RunDir.of(ctx.storage, run_id).create()
    spec = RunSpec().model_dump(mode="json")
    cluster = ClusterSpec().model_dump(mode="json")
    rd.write_spec({"run_id": run_id, "run": spec, "cluster": cluster, "dataset_dir": str(dataset)})
    ctx.ledger.create_run(run_id, "quickstart", spec, cluster, str(rd.path))
    for step in steps:
        commit_checkpoint(rd.checkpoints, step, vocab, num_heads=num_heads)
    return rd.path
