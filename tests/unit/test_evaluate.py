"""Evaluation: the job by entrypoint, real scores on a tiny model, recorded in the ledger."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from controlplane.cli.main import app
from controlplane.context import Context
from controlplane.rollout import store
from tests.serving_factory import make_run


def test_eval_cli_records_scores(tmp_path):
    ctx = Context.load()
    make_run(ctx, "ev1", steps=(5,))
    r = CliRunner().invoke(app, ["eval", "ev1", "--limit", "4", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    s = row["scores"]
    assert set(row["tasks"]) == {"heldout", "jcommonsenseqa", "jsquad"}
    assert 0 <= s["jcommonsenseqa_accuracy"] <= 1 and s["jcommonsenseqa_n"] == 4
    assert 0 <= s["jsquad_exact_match"] <= 1 and s["jsquad_n"] == 4
    # A random tiny model: loss near ln(vocab), perplexity its exponential.
    assert math.isclose(s["heldout_perplexity"], math.exp(s["heldout_loss"]), rel_tol=1e-6)
    assert 3.0 < s["heldout_loss"] < 9.0
    rows = store.evaluations(Context.load().ledger, row["model_dir"])
    assert rows and rows[0]["scores"] == s and rows[0]["run_id"] == "ev1" and rows[0]["step"] == 5


def test_eval_bad_task_file_is_one_line(tmp_path):
    ctx = Context.load()
    make_run(ctx, "ev2", steps=(5,))
    bad = tmp_path / "jcqa.jsonl"
    bad.write_text('{"q_id": 1, "question": "x"}\n')
    r = CliRunner().invoke(app, ["eval", "ev2", "--tasks", "jcommonsenseqa", "--jcommonsenseqa", str(bad)])
    assert r.exit_code == 2 and "not a JCommonsenseQA line" in r.output
    r = CliRunner().invoke(app, ["eval", "ev2", "--tasks", "bogus"])
    assert r.exit_code == 2 and "unknown bogus" in r.output
