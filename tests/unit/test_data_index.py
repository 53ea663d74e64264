"""The data index: mixture proportions, positions independent of the world, the job's TrainData."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controlplane import data
from controlplane.data.mixture import check_mixture
from controlplane.errors import ConfigurationError, UserError
from controlplane.spec import RunSpec, dump_spec, read_record, validate
from jobs.pretrain.dataset import INDEX_DIR, TrainData
from jobs.pretrain.schedule import Blend, WindowIndex, blend_counts

WEIGHTS = [0.7, 0.2, 0.1]


def test_mixture_proportions_over_1e5_samples():
    blend = Blend(WEIGHTS, seed=0)
    src, idx = blend.locate(np.arange(100_000, dtype=np.int64))
    share = np.bincount(src, minlength=3) / 100_000
    # Stated tolerance: 0.2 percentage points at any prefix; 2 samples at a block boundary.
    assert np.abs(share - WEIGHTS).max() < 0.002
    n = 24 * 4096
    counts = np.bincount(src[:n], minlength=3)
    assert np.abs(counts - np.array(WEIGHTS) * n).max() <= 2
    # Each source's samples are taken in order 0, 1, 2, ... with no gap and no repeat.
    for s in range(3):
        assert np.array_equal(idx[src == s], np.arange((src == s).sum()))
    # Seeded: the same positions give the same draw, another seed another order.
    again, _ = Blend(WEIGHTS, seed=0).locate(np.arange(50_000, 50_100, dtype=np.int64))
    assert np.array_equal(again, src[50_000:50_100])
    other, _ = Blend(WEIGHTS, seed=1).locate(np.arange(4096, dtype=np.int64))
    assert not np.array_equal(other, src[:4096])


def test_blend_counts_never_decrease_from_block_to_block():
    for w in (np.array([0.5, 0.3, 0.2]), np.array([0.34, 0.33, 0.33]), np.array([0.999, 0.0005, 0.0005])):
        prev = blend_counts(w, 0)
        for b in range(1, 3000):
            cur = blend_counts(w, b * 4096)
            assert (cur >= prev).all() and cur.sum() == b * 4096
            assert np.abs(cur - w * b * 4096).max() < len(w)
            prev = cur
    with pytest.raises(ValueError, match="positive"):
        Blend([0.5, 0.0], seed=0)


def test_window_index_spans_shards_and_reshuffles_each_epoch():
    idx = WindowIndex([3, 0, 5, 2], seed=4)
    shard, win = idx.locate(np.arange(20, dtype=np.int64))
    per = np.array([3, 0, 5, 2])
    assert (win < per[shard]).all() and (shard != 1).all()
    flat = idx.starts[shard] + win
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])


def _corpus(root, n_docs, seed, words):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}, ensure_ascii=False) + "\n")
    return root


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    ja = _corpus(tmp / "ja", 120, 0, ["東京", "大阪", "表示", "設定", "ファイル"])
    code = _corpus(tmp / "code", 60, 1, ["def", "return", "x", "(", ")", ":"])
    data.prepare(ja, tmp / "ds-ja", vocab_size=300, unit_bytes=16 * 1024)
    tok = tmp / "ds-ja" / "tokenizer.json"
    data.prepare(code, tmp / "ds-code", tokenizer=tok, unit_bytes=16 * 1024)
    data.prepare(code, tmp / "ds-own", vocab_size=280)
    return tmp


def test_train_data_same_samples_for_any_world_and_weights_honoured(two_datasets):
    dirs = [(two_datasets / "ds-ja", 0.75), (two_datasets / "ds-code", 0.25)]
    td = TrainData(dirs, seq_len=16, global_batch=8, seed=3)
    for b in (0, 7, 123):
        whole = td.batch(b, 0, 1)
        assert whole.shape == (8, 17) and whole.dtype == np.int64
        for world in (2, 4):
            parts = [td.batch(b, r, world) for r in range(world)]
            assert np.array_equal(np.concatenate(parts), whole)
    # A fresh object (the index now comes from its cache file) gives the same batches.
    assert list((two_datasets / "ds-ja" / INDEX_DIR).glob("windows-*.npy"))
    assert np.array_equal(TrainData(dirs, 16, 8, 3).batch(7, 0, 1), td.batch(7, 0, 1))
    # Rows are contiguous windows of a shard of the dataset the blend chose.
    s = td.plan.locate(td.plan.positions(5, 0, 1))
    for row, src, shard, w in zip(td.batch(5, 0, 1), s.source, s.shard, s.window, strict=True):
        tokens = td.stores[src].shard(shard)
        assert np.array_equal(row, tokens[w * 16 : w * 16 + 17])
    share = np.bincount(td.plan.locate(np.arange(20_000, dtype=np.int64)).source, minlength=2) / 20_000
    assert share == pytest.approx([0.75, 0.25], abs=0.002)


def test_mixture_needs_one_tokenizer_and_a_valid_spec(two_datasets):
    check_mixture([(two_datasets / "ds-ja", 0.5), (two_datasets / "ds-code", 0.5)])
    with pytest.raises(UserError, match="tokenizer differs"):
        check_mixture([(two_datasets / "ds-ja", 0.5), (two_datasets / "ds-own", 0.5)])
    spec = validate(RunSpec, {"name": "m", "train": {"max_steps": 2},
                              "data": {"mixture": [{"path": "a", "weight": 7}, {"path": "b", "weight": 3}]}})  # fmt: skip
    assert spec.data.datasets() == [("a", 0.7), ("b", 0.3)]
    assert read_record(RunSpec, dump_spec(spec)).data == spec.data  # the frozen spec reads back
    for bad, msg in (
        ({"path": "x", "mixture": [{"path": "a", "weight": 1}]}, "not both"),
        ({"mixture": [{"path": "a", "weight": 0}]}, "weight"),
        ({"mixture": [{"path": "a", "weight": 1}, {"path": "a", "weight": 1}]}, "named twice"),
    ):
        with pytest.raises(ConfigurationError, match=msg):
            validate(RunSpec, {"name": "m", "train": {"max_steps": 2}, "data": bad})


def test_data_show_run_spec_gives_epochs_per_source_of_the_mixture(two_datasets, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from controlplane.cli.main import app

    ja, code = data.read_meta(two_datasets / "ds-ja"), data.read_meta(two_datasets / "ds-code")
    spec = {
        "name": "mix",
        "train": {"max_steps": 100, "global_batch_size": 8, "seq_len": 64},
        "data": {"mixture": [{"path": str(two_datasets / "ds-ja"), "weight": 0.7},
                             {"path": str(two_datasets / "ds-code"), "weight": 0.3}]},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["data", "show", "--run", str(tmp_path / "run.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    budget = 100 * 8 * 64
    assert report["budget_tokens"] == budget
    (row_ja,), (row_code,) = (d["sources"] for d in report["datasets"])
    assert row_ja["epochs"] == pytest.approx(0.7 * budget / ja["train_tokens"])
    assert row_code["epochs"] == pytest.approx(0.3 * budget / code["train_tokens"])
    spec["data"]["mixture"][1]["path"] = str(two_datasets / "ds-own")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    bad = CliRunner().invoke(app, ["data", "show", "--run", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2 and "tokenizer differs" in bad.output
