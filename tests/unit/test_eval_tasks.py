"""JGLUE-format loaders, prompts and scoring rules (no model needed)."""

from __future__ import annotations

import json

import pytest

from jobs.evaluate.tasks import (
    SAMPLES,
    TaskDataError,
    jcqa_fewshot,
    load_jcommonsenseqa,
    load_jsquad,
    normalize_answer,
    shots_for,
)


def test_bundled_samples_have_the_jglue_layout():
    jc = load_jcommonsenseqa(SAMPLES / "jcommonsenseqa.jsonl")
    assert len(jc) >= 10 and all(len(i.choices) == 5 for i in jc)
    sq = load_jsquad(SAMPLES / "jsquad.json")
    doc = json.loads((SAMPLES / "jsquad.json").read_text())
    for article in doc["data"]:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                for a in qa["answers"]:
                    assert p["context"][a["answer_start"] :].startswith(a["text"])
    assert len(sq) >= 6


def test_shots_never_include_the_item_and_prompt_shape():
    jc = load_jcommonsenseqa(SAMPLES / "jcommonsenseqa.jsonl")
    shots = shots_for(jc, jc[0], 3)
    assert len(shots) == 3 and jc[0] not in shots
    prompt = jcqa_fewshot(shots, jc[0])
    assert prompt.count("質問：") == 4 and prompt.endswith("回答：")


def test_normalize_answer():
    assert normalize_answer("３７７６メートル ") == "3776メートル"
    assert normalize_answer("月曜日。") == "月曜日"


def test_bad_files(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(
        '{"q_id": 1, "question": "q", "choice0": "a", "choice1": "b", "choice2": "c", "choice3": "d", "choice4": "e", "label": 7}\n'
    )
    with pytest.raises(TaskDataError, match="label"):
        load_jcommonsenseqa(p)
    q = tmp_path / "x.json"
    q.write_text('{"data": [{"paragraphs": [{"context": "c"}]}]}')
    with pytest.raises(TaskDataError, match="not a JSQuAD file"):
        load_jsquad(q)
