"""Dataset preparation: roff stripping, determinism for a seed, the held-out split, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from controlplane import data
from controlplane.cli.main import app

WORDS = ["東京", "大阪", "ファイル", "ディレクトリ", "表示", "オプション", "設定", "コマンド", "the", "list"]


def _corpus(root, n_docs=40, seed=1):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs // 2):
        text = "".join(rng.choice(WORDS) + ("。\n" if rng.random() < 0.1 else "") for _ in range(200))
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    with open(root / "more.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_docs - n_docs // 2):
            text = " ".join(rng.choice(WORDS) for _ in range(150))
            f.write(json.dumps({"text": f"{i}: {text}"}, ensure_ascii=False) + "\n")
        f.write("not json\n")
    return root


def test_roff_to_text_strips_markup():
    src = '.\\" comment\n.TH LS "1"\n.SH 名前\nls \\- 一覧を表示する\n.TP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\n\\&. で始まる要素\n.BR ls (1)\n'
    text = data.roff_to_text(src)
    assert text.splitlines() == ["名前", "ls - 一覧を表示する", "-a, --all", ". で始まる要素", "ls(1)"]
    assert "\\f" not in text and "comment" not in text


def test_prepare_is_deterministic_for_a_seed(tmp_path):
    src = _corpus(tmp_path / "src")
    a = data.prepare(src, tmp_path / "a", vocab_size=300, heldout_fraction=0.1, seed=3)
    b = data.prepare(src, tmp_path / "b", vocab_size=300, heldout_fraction=0.1, seed=3)
    for name in ("tokenizer.json", "train.bin", "heldout.bin", "heldout_docs.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a.pop("prepare_s"), b.pop("prepare_s")
    assert a == b
    assert a["vocab_size"] == 300 and a["dtype"] == "uint16"
    tokens = data.load_tokens(tmp_path / "a", "train")
    assert tokens.size == a["train_tokens"] and tokens.max() < a["vocab_size"]
    assert (tokens == a["eos_id"]).sum() == a["train_docs"]  # one end-of-text per document


def test_heldout_split_is_disjoint_and_seeded(tmp_path):
    src = _corpus(tmp_path / "src")
    meta = data.prepare(src, tmp_path / "a", vocab_size=300, heldout_fraction=0.1, seed=3)
    held = [json.loads(line)["text"] for line in (tmp_path / "a" / "heldout_docs.jsonl").read_text().splitlines()]
    assert len(held) == meta["heldout_docs"] == 4 and meta["train_docs"] == 36
    docs = data.collect(src, seed=3, max_bytes=data.DEFAULT_MAX_BYTES)
    mask = data.split_heldout(len(docs), 0.1, 3)
    assert sorted(held) == sorted(d.text for d, h in zip(docs, mask, strict=True) if h)
    other = data.split_heldout(len(docs), 0.1, 4)
    assert not np.array_equal(mask, other)
    assert np.array_equal(mask, data.split_heldout(len(docs), 0.1, 3))


def test_max_bytes_caps_the_corpus(tmp_path):
    src = _corpus(tmp_path / "src")
    docs = data.collect(src, seed=0, max_bytes=5000)
    assert 1 <= len(docs) < 40
    assert sum(len(d.text.encode()) for d in docs) <= 5000


def test_bad_source_is_a_user_error(tmp_path):
    with pytest.raises(data.DataSourceError, match="not a directory"):
        data.prepare(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataSourceError, match="no documents"):
        data.prepare(tmp_path / "empty", tmp_path / "out")


def test_cli_prepare_json_and_bad_source(tmp_path):
    src = _corpus(tmp_path / "src")
    runner = CliRunner()
    res = runner.invoke(
        app, ["data", "prepare", str(src), "--out", str(tmp_path / "ds"), "--vocab-size", "300", "--json"]
    )
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    assert meta["vocab_size"] == 300 and (tmp_path / "ds" / "tokenizer.json").is_file()
    bad = runner.invoke(app, ["data", "prepare", str(tmp_path / "nope")])
    assert bad.exit_code == 2
    assert "not a directory" in bad.output and "Traceback" not in bad.output


def test_cli_prepare_default_out_under_storage(tmp_path, llmctl_home):
    src = _corpus(tmp_path / "mycorpus")
    res = CliRunner().invoke(app, ["data", "prepare", str(src), "--vocab-size", "300", "--json"])
    assert res.exit_code == 0, res.output
    assert (llmctl_home / "datasets" / "mycorpus" / "meta.json").is_file()
