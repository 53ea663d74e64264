"""Evaluation: the job by entrypoint, real scores on a tiny model, recorded in the ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path

from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.rollout import store
from tests.serving_factory import make_run

DATA = Path(__file__).parent / "data" / "jglue"


def test_eval_cli_records_scores(tmp_path):
    ctx = Context.load()
    make_run(ctx, "ev1", steps=(5,))
    r = CliRunner().invoke(app, ["eval", "ev1", "--limit", "4", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    s = row["scores"]
    assert set(row["tasks"]) == {"heldout", "jcommonsenseqa", "jsquad"}
    assert 0 <= s["jcommonsenseqa_accuracy"] <= 100 and s["jcommonsenseqa_n"] == 4
    assert 0 <= s["jsquad_exact_match"] <= 100 and s["jsquad_n"] == 4
    # A random tiny model: loss near ln(vocab), perplexity its exponential.
    assert math.isclose(s["heldout_perplexity"], math.exp(s["heldout_loss"]), rel_tol=1e-6)
    assert 3.0 < s["heldout_loss"] < 9.0
    rows = store.evaluations(Context.load().ledger, row["model_dir"])
    assert rows and rows[0]["scores"] == s and rows[0]["run_id"] == "ev1" and rows[0]["step"] == 5
    # No train split: the examples come from the scored file, and the record says so.
    detail = rows[0]["detail"]
    assert detail["jcommonsenseqa"]["examples_from"] == "valid" and detail["jcommonsenseqa"]["train"] is None
    assert any(n.startswith("jcommonsenseqa: no train file; examples drawn from") for n in detail["notes"])


def test_eval_official_files_by_relative_path(tmp_path, monkeypatch):
    """Official train/valid layouts, relative paths: absolute in the record, setup printed and stored."""
    ctx = Context.load()
    make_run(ctx, "ev3", steps=(5,))
    monkeypatch.chdir(DATA)
    args = ["eval", "ev3", "--tasks", "jcommonsenseqa,jsquad", "--prompt-version", "0.2"]
    args += ["--jcommonsenseqa", "jcommonsenseqa-valid.json", "--jcommonsenseqa-train", "jcommonsenseqa-train.json"]
    args += ["--jsquad", "jsquad-valid.json", "--jsquad-train", "jsquad-train.json", "--limit", "3"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "jcommonsenseqa-1.1-0.2: 3-shot, seed 42, valid 6, train 8, scored 3" in r.output
    assert "jsquad-1.1-0.2: 2-shot, seed 42, valid 5, train 6, scored 3" in r.output
    assert "dtype float32" in r.output
    row = store.evaluations(Context.load().ledger)[0]
    d = row["detail"]
    assert d["jcommonsenseqa"]["file"] == str(DATA / "jcommonsenseqa-valid.json")
    assert d["jsquad"]["train"] == str(DATA / "jsquad-train.json")
    assert d["prompt_version"] == "0.2" and d["dtype"] == "float32" and d["seed"] == 42
    # The tiny model's context is shorter than these prompts: counted, reported, never silent.
    s = row["scores"]
    assert s["jsquad_truncated"] == 3 and "jsquad: 3 of 3 prompts longer than" in r.output
    assert [p["id"] for p in d["jsquad"]["predictions"]] == ["a10336p0q3", "a10336p0q1", "a10336p0q2"]


def test_eval_bad_task_file_is_one_line(tmp_path):
    ctx = Context.load()
    make_run(ctx, "ev2", steps=(5,))
    bad = tmp_path / "jcqa.jsonl"
    bad.write_text('{"q_id": 1, "question": "x"}\n')
    r = CliRunner().invoke(app, ["eval", "ev2", "--tasks", "jcommonsenseqa", "--jcommonsenseqa", str(bad)])
    assert r.exit_code == 2 and "not a JCommonsenseQA line" in r.output
    r = CliRunner().invoke(app, ["eval", "ev2", "--tasks", "bogus"])
    assert r.exit_code == 2 and "unknown bogus" in r.output
    # The official files swapped: one line naming the file.
    swapped = ["--jsquad", str(DATA / "jcommonsenseqa-valid.json"), "--jsquad-train", str(DATA / "jsquad-train.json")]
    r = CliRunner().invoke(app, ["eval", "ev2", "--tasks", "jsquad", *swapped])
    assert r.exit_code == 2 and "jcommonsenseqa-valid.json: not a JSQuAD file" in r.output
    r = CliRunner().invoke(app, ["eval", "ev2", "--tasks", "jsquad", "--jsquad-k", "9"])
    assert r.exit_code == 2 and "9-shot needs 10 items in the scored file (no train split)" in r.output
    r = CliRunner().invoke(app, ["eval", "ev2", "--prompt-version", "0.9"])
    assert r.exit_code == 2 and "0.9" in r.output
