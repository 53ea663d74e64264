"""Dataset preparation: readers, shards, determinism across workers, restart, bad input, the CLI."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from controlplane import data
from controlplane.cli.main import app
from controlplane.data.store import TokenStore

WORDS = ["東京", "大阪", "ファイル", "ディレクトリ", "表示", "オプション", "設定", "コマンド", "the", "list"]
REPO = Path(__file__).resolve().parents[2]


def _text(rng, n=200) -> str:
    return "".join(rng.choice(WORDS) + ("。\n" if rng.random() < 0.1 else "") for _ in range(n))


def _corpus(root: Path, n_docs=40, seed=1) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs // 2):
        (root / f"doc{i:03d}.txt").write_text(_text(rng), encoding="utf-8")
    with open(root / "more.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_docs - n_docs // 2):
            f.write(
                json.dumps({"text": f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(150))}, ensure_ascii=False)
            )
            f.write("\n")
    return root


def _shard_bytes(root: Path) -> dict[str, bytes]:
    files = sorted((root / "shards").iterdir())
    return {p.name: p.read_bytes() for p in files} | {"tokenizer.json": (root / "tokenizer.json").read_bytes()}


def _stable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("prepare_s", "resumed_units", "peak_worker_rss_bytes")}


def test_roff_to_text_strips_markup():
    src = '.\\" comment\n.TH LS "1"\n.SH 名前\nls \\- 一覧を表示する\n.TP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\n\\&. で始まる要素\n.BR ls (1)\n'
    text = data.roff_to_text(src)
    assert text.splitlines() == ["名前", "ls - 一覧を表示する", "-a, --all", ". で始まる要素", "ls(1)"]
    assert "\\f" not in text and "comment" not in text


def test_shards_are_byte_identical_with_one_and_two_workers(tmp_path):
    src = _corpus(tmp_path / "src", n_docs=60)
    kw = dict(vocab_size=300, heldout_fraction=0.1, seed=3, unit_bytes=8 * 1024)
    a = data.prepare(src, tmp_path / "a", workers=1, **kw)
    b = data.prepare(src, tmp_path / "b", workers=2, **kw)
    assert a["units"] >= 4  # several shards, so two workers really split the work
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    assert _stable(a) == _stable(b)
    assert a["vocab_size"] == 300 and a["dtype"] == "uint16" and a["format"] == 2
    tokens = data.load_tokens(tmp_path / "a", "train")
    assert tokens.size == a["train_tokens"] and tokens.max() < a["vocab_size"]
    assert (tokens == a["eos_id"]).sum() == a["train_docs"]  # one end-of-text per document
    # The per-shard index holds the document boundaries.
    shard = next(s for s in a["shards"] if s["split"] == "train" and s["docs"])
    ends = np.fromfile(tmp_path / "a" / "shards" / f"{shard['name']}.idx", dtype=np.int64)
    toks = np.fromfile(tmp_path / "a" / "shards" / f"{shard['name']}.bin", dtype=np.uint16)
    assert ends[0] == 0 and ends[-1] == toks.size and len(ends) == shard["docs"] + 1
    assert (toks[ends[1:] - 1] == a["eos_id"]).all()
    # Another seed: another split.
    c = data.prepare(src, tmp_path / "c", workers=1, **{**kw, "seed": 4})
    assert c["heldout_docs"] != a["heldout_docs"] or _shard_bytes(tmp_path / "c") != _shard_bytes(tmp_path / "a")


def test_manifest_counts_per_source_and_split(tmp_path):
    src = _corpus(tmp_path / "src", n_docs=400)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.jsonl").write_text(
        "".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n" for i in range(30))
    )
    meta = data.prepare([str(src), str(tmp_path / "code")], tmp_path / "ds", vocab_size=300, heldout_fraction=0.05)
    s, code = meta["sources"]
    assert code["name"] == "code" and code["docs"] == 30 and code["heldout_docs"] >= 1
    assert meta["train_tokens"] == s["train_tokens"] + code["train_tokens"]
    assert s["name"] == "src" and s["docs"] == 400 and s["train_docs"] + s["heldout_docs"] == 400
    assert 8 <= s["heldout_docs"] <= 35  # by fraction (0.05 of 400 = 20), not one file of three
    assert len(s["sha256"]) == 64 and s["sha256"] != code["sha256"]
    assert meta["seed"] == 0 and len(meta["tokenizer_sha256"]) == 64
    held = data.heldout_by_source(tmp_path / "ds", 10**9)
    assert held["src"].size == s["heldout_tokens"] and held["code"].size == code["heldout_tokens"]


def test_every_source_with_two_documents_holds_one_out(tmp_path):
    src = _corpus(tmp_path / "src", n_docs=4)
    meta = data.prepare(src, tmp_path / "ds", vocab_size=300, heldout_fraction=0.01)
    assert meta["heldout_docs"] == 1 and meta["train_docs"] == 3


def test_readers_jsonl_gz_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "src"
    root.mkdir()
    with gzip.open(root / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(20):
            f.write(json.dumps({"content": f"圧縮された文書 {i} " * 20}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"content": [f"パーケット {i} " * 20 for i in range(30)]}), root / "b.parquet",
                   row_group_size=10)  # fmt: skip
    meta = data.prepare(root, tmp_path / "ds", vocab_size=300, text_field="content", heldout_fraction=0.1)
    assert meta["sources"][0]["docs"] == 50 and meta["units"] == 4  # one gz file, three row groups


@pytest.mark.parametrize(
    "write, message",
    [
        (
            lambda r: (r / "a.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n'),
            "a.jsonl:2: no string field 'text'",
        ),
        (lambda r: (r / "a.jsonl").write_text('{"text": "ok"}\n\n{"text": broken\n'), "a.jsonl:3: not valid JSON"),
        (lambda r: (r / "a.jsonl.gz").write_bytes(b"not gzip at all"), "a.jsonl.gz: cannot read"),
        (lambda r: (r / "a.parquet").write_bytes(b"PAR1 nope"), "a.parquet: not a readable Parquet file"),
        (lambda r: (r / "notes.md").write_text("# hi"), "no .txt, .jsonl, .jsonl.gz or .parquet files; skipped 1"),
        (lambda r: (r / "a.txt").write_text("   \n"), "no usable documents"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_exit_2(tmp_path, write, message):
    root = tmp_path / "src"
    root.mkdir()
    write(root)
    res = CliRunner().invoke(app, ["data", "prepare", str(root), "--out", str(tmp_path / "ds"), "--engine", "local"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "ds" / "meta.json").exists()


def test_invalid_utf8_is_counted_skipped_and_reported(tmp_path):
    src = _corpus(tmp_path / "src", n_docs=20)
    (src / "bad.txt").write_bytes(b"\xff\xfe broken \xc3\x28")
    with open(src / "more.jsonl", "ab") as f:
        f.write(b'{"text": "\xff\xff"}\n')
    res = CliRunner().invoke(app, ["data", "prepare", str(src), "--out", str(tmp_path / "ds"), "--vocab-size", "300",
                                   "--engine", "local"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "2 docs not valid UTF-8 (skipped)" in res.output
    meta = data.read_meta(tmp_path / "ds")
    assert meta["invalid_utf8_docs"] == 2 and meta["sources"][0]["docs"] == 20


def test_random_bytes_are_refused_and_too_few_documents_say_what_was_found(tmp_path):
    rnd = tmp_path / "rnd"
    rnd.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        (rnd / f"blob{i}.txt").write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    runner = CliRunner()
    res = runner.invoke(app, ["data", "prepare", str(rnd), "--out", str(tmp_path / "a"), "--engine", "local"])
    assert res.exit_code == 2, res.output
    assert "not valid UTF-8" in res.output and "0 usable document(s)" in res.output
    # Mostly invalid (3 of 4), with enough valid text to train a tokenizer: still refused.
    (rnd / "ok.txt").write_text("正しい文書です。" * 50, encoding="utf-8")
    (rnd / "blob2.txt").write_bytes(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
    res = runner.invoke(app, ["data", "prepare", str(rnd), "--out", str(tmp_path / "b"), "--engine", "local",
                              "--vocab-size", "300"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "3 of 4 documents are not valid UTF-8" in res.output and "mostly invalid" in res.output
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("ただ一つの文書。" * 50, encoding="utf-8")
    (one / "blank.txt").write_text("\n")
    (one / "README").write_text("x")
    res = runner.invoke(app, ["data", "prepare", str(one), "--out", str(tmp_path / "c"), "--engine", "local",
                              "--vocab-size", "300"])  # fmt: skip
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "need at least 2 documents" in out and "1 usable document(s)" in out and "1 empty (skipped)" in out
    assert "1 file(s) of other kinds skipped" in out


def test_workers_default_to_every_cpu_on_ray_and_zero_is_refused(tmp_path):
    from controlplane.errors import UserError

    data.PrepareOptions(engine="ray", workers=0).check()  # the CLI's default on Ray: one actor per CPU
    for engine in ("local", "ray"):
        with pytest.raises(UserError, match="--workers -1"):
            data.PrepareOptions(engine=engine, workers=-1).check()
    with pytest.raises(UserError, match="--workers 0"):
        data.PrepareOptions(engine="local", workers=0).check()
    src = _corpus(tmp_path / "src", n_docs=10, seed=1)
    res = CliRunner().invoke(app, ["data", "prepare", str(src), "--out", str(tmp_path / "o"), "--workers", "0"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == ["error: --workers 0: expected at least 1"]
    assert not (tmp_path / "o").exists()


def test_prepare_killed_midway_resumes_and_redoes_a_torn_shard(tmp_path):
    src = _corpus(tmp_path / "src", n_docs=1200, seed=2)
    out = tmp_path / "ds"
    args = ["data", "prepare", str(src), "--out", str(out), "--vocab-size", "300", "--unit-mb", "0.02",
            "--engine", "local", "--workers", "1", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMCTL_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "controlplane.cli.main", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list((out / "progress").glob("0*.json"))) < 3:
            assert proc.poll() is None, "prepare ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (out / "meta.json").exists()
    done = sorted((out / "progress").glob("0*.json"))
    assert len(done) >= 3
    first = json.loads(done[0].read_text())
    torn = out / "shards" / f"{first['shards']['train']['name']}.bin"
    with open(torn, "r+b") as f:  # a shard damaged after its record: must be redone, not trusted
        f.truncate(torn.stat().st_size // 2)
    second = json.loads(done[1].read_text())
    edited = out / "shards" / f"{second['shards']['train']['name']}.bin"
    raw = bytearray(edited.read_bytes())
    raw[0] ^= 0xFF  # same size, other bytes: only --verify's checksums see it
    edited.write_bytes(bytes(raw))
    kept_mtime = done[2].stat().st_mtime_ns
    res = CliRunner().invoke(app, [*args, "--verify"], env={"LLMCTL_HOME": str(tmp_path / "home")})
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    assert meta["resumed_units"] >= 1 and done[2].stat().st_mtime_ns == kept_mtime
    assert json.loads(done[1].read_text())["pid"] != second["pid"]  # the edited unit was redone
    clean = data.prepare(src, tmp_path / "clean", vocab_size=300, unit_bytes=int(0.02 * 1024 * 1024))
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "clean")
    assert _stable(data.read_meta(out)) == _stable(clean)


def test_user_tokenizer_is_used_and_hashed(tmp_path):
    src = _corpus(tmp_path / "src")
    a = data.prepare(src, tmp_path / "a", vocab_size=300)
    b = data.prepare(src, tmp_path / "b", tokenizer=tmp_path / "a" / "tokenizer.json", seed=5)
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"] and b["tokenizer"].endswith("tokenizer.json")
    (tmp_path / "bad.json").write_text("{}")
    res = CliRunner().invoke(
        app, ["data", "prepare", str(src), "--out", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "bad.json")]
    )
    assert res.exit_code == 2 and "not a readable tokenizers JSON file" in res.output


def test_cli_prepare_json_and_default_out_under_storage(tmp_path, llmctl_home):
    src = _corpus(tmp_path / "mycorpus")
    res = CliRunner().invoke(app, ["data", "prepare", str(src), "--vocab-size", "300", "--json"])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    assert meta["engine"] == "local" and meta["vocab_size"] == 300
    assert (llmctl_home / "datasets" / "mycorpus" / "meta.json").is_file()
    bad = CliRunner().invoke(app, ["data", "prepare", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not found" in bad.output and "Traceback" not in bad.output


def test_data_show_tokens_and_epochs(tmp_path, llmctl_home):
    src = _corpus(tmp_path / "src")
    meta = data.prepare(src, tmp_path / "ds", vocab_size=300)
    budget = meta["train_tokens"] * 3
    res = CliRunner().invoke(app, ["data", "show", str(tmp_path / "ds"), "--tokens", str(budget), "--json"])
    assert res.exit_code == 0, res.output
    (ds,) = json.loads(res.stdout)["datasets"]
    (row,) = ds["sources"]
    assert row["train_tokens"] == meta["train_tokens"] and row["epochs"] == pytest.approx(3.0)
    res = CliRunner().invoke(app, ["data", "show", str(tmp_path / "ds"), "--tokens", str(budget)])
    assert res.exit_code == 0 and "3.00" in res.output
    missing = CliRunner().invoke(app, ["data", "show", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "meta.json: missing" in missing.output


def test_token_store_maps_shards_without_reading_them_whole(tmp_path):
    src = _corpus(tmp_path / "src", n_docs=60)
    data.prepare(src, tmp_path / "ds", vocab_size=300, unit_bytes=8 * 1024)
    store = TokenStore(tmp_path / "ds")
    assert len(store.shards) >= 4 and isinstance(store.shard(0), np.memmap)
    assert store.tokens == data.read_meta(tmp_path / "ds")["train_tokens"]


def test_a_bad_line_deep_in_a_later_unit_is_named_by_its_line_number(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    lines = [json.dumps({"text": f"文書 {i} " * 10}, ensure_ascii=False) for i in range(500)]
    lines.append(json.dumps({"body": "wrong field"}))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["data", "prepare", str(root), "--out", str(tmp_path / "ds"), "--engine", "local",
                                   "--unit-mb", "0.01", "--vocab-size", "300"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "a.jsonl:501: no string field 'text'" in " ".join(res.output.split())
