"""Data at scale on the real local Ray cluster: a 200 MB corpus through Ray Data, then a mixture run.

Memory bound: every Ray Data worker that tokenized a unit reports its peak resident set
(`ru_maxrss`, the whole process: Ray's worker runtime, pyarrow, the tokenizer and its buffers)
below WORKER_RSS_BOUND = 1 GiB, with 32 MB units of a 200 MB corpus. A worker holds one batch
of about 1 MB of text and its token ids at a time, so the bound does not grow with the corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from tests.corpus import write_corpus
from tests.integration.conftest import CORPUS_MB

pytestmark = pytest.mark.integration
runner = CliRunner()
WORKER_RSS_BOUND = 1 << 30


def llmctl(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`llmctl ARGS` in a process of its own, as a user runs it: a Ray driver joined with the
    cluster's token auth stays out of this test process (Ray keeps its auth mode per process)."""
    res = subprocess.run(
        [sys.executable, "-m", "controlplane", *args], capture_output=True, text=True, timeout=timeout, env=os.environ
    )
    res.exit_code, res.output = res.returncode, res.stdout + res.stderr  # CliRunner's names
    return res


def _shards(root):
    return {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}


def test_ray_engine_writes_the_local_engines_bytes(cluster_home, dataset_dir, tmp_path):
    src = tmp_path / "small"
    write_corpus(src, 1.5, seed=3, files=2)
    common = ["--tokenizer", str(dataset_dir / "tokenizer.json"), "--unit-mb", "0.25", "--json"]
    # No --workers: on Ray the pool has one actor per CPU of the cluster.
    ray_res = llmctl(["data", "prepare", str(src), "--out", str(tmp_path / "r"), *common])
    assert ray_res.exit_code == 0, ray_res.output
    assert json.loads(ray_res.stdout)["engine"] == "ray"  # auto: the cluster is up
    loc = runner.invoke(app, ["data", "prepare", str(src), "--out", str(tmp_path / "l"), "--engine", "local",
                              "--workers", "1", *common])  # fmt: skip
    assert loc.exit_code == 0, loc.output
    assert _shards(tmp_path / "r") == _shards(tmp_path / "l") and len(_shards(tmp_path / "l")) >= 12


def test_200mb_corpus_on_ray_with_bounded_worker_memory_then_a_mixture_run(
    cluster_home, dataset_dir, big_corpus, tmp_path
):
    out = cluster_home / "datasets" / "web"
    res = llmctl(
        ["data", "prepare", str(big_corpus), "--out", str(out), "--engine", "ray", "--workers", "2",
         "--tokenizer", str(dataset_dir / "tokenizer.json"), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)
    assert meta["engine"] == "ray" and meta["text_bytes"] >= CORPUS_MB * 1024 * 1024
    assert meta["units"] >= 7 and meta["train_tokens"] > 10_000_000
    recs = [json.loads(p.read_text()) for p in sorted((out / "progress").glob("0*.json"))]
    assert len(recs) == meta["units"]
    assert all(r["pid"] != os.getpid() for r in recs)  # tokenized in Ray workers, not here
    assert len({r["pid"] for r in recs}) == 2  # the two actors of the pool
    assert max(r["peak_rss_bytes"] for r in recs) < WORKER_RSS_BOUND
    (src,) = meta["sources"]
    assert src["heldout_docs"] > 0 and src["heldout_tokens"] == meta["heldout_tokens"]

    shown = runner.invoke(app, ["data", "show", str(out), "--tokens", "1000000", "--json"])
    assert shown.exit_code == 0, shown.output

    spec = {
        "name": "mixture",
        "model": {"preset": "tiny"},
        "train": {"max_steps": 6, "global_batch_size": 8, "seq_len": 64, "schedule": {"warmup_steps": 2}},
        "workers": {"num_workers": 2},
        "checkpoint": {"interval_steps": 100},
        "data": {"mixture": [{"path": str(dataset_dir), "weight": 0.6}, {"path": "datasets/web", "weight": 0.4}]},
        "seed": 3,
    }
    spec_file = tmp_path / "run.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    sub = runner.invoke(app, ["run", "submit", str(spec_file), "--watch", "--json"])
    assert sub.exit_code == 0, sub.output
    run_id = json.loads(sub.stdout[: sub.stdout.index("}") + 1])["run_id"]
    ctx = Context.load()
    assert ctx.ledger.get_run(run_id)["state"] == "succeeded"
    rd = ctx.run_dir(run_id)
    record = json.loads(rd.spec_file.read_text())
    assert [w for _, w in record["datasets"]] == pytest.approx([0.6, 0.4])
    assert [e["step"] for e in rd.events({"step"})][-1] == 6
