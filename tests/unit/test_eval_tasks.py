"""JGLUE-format loaders: the bundled samples, the official layouts, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.evaluate.files import SAMPLES, TaskDataError, load_jcommonsenseqa, load_jsquad

DATA = Path(__file__).parent / "data" / "jglue"


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


def test_official_items_keep_title_and_every_gold_answer():
    sq = load_jsquad(DATA / "jsquad-valid.json")
    first = sq[0]
    assert (first.qid, first.title) == ("a10336p0q0", "梅雨")
    assert first.context.startswith("梅雨 [SEP] ") and first.answers == [
        "小笠原諸島",
        "小笠原諸島を除く日本",
        "小笠原諸島",
    ]
    jc = load_jcommonsenseqa(DATA / "jcommonsenseqa-valid.json")
    assert (jc[0].qid, jc[0].label, jc[0].choices[2]) == ("8939", 2, "マザーボード")


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
    # The two official files swapped: each names the file and what it is not.
    with pytest.raises(TaskDataError, match="jsquad-valid.json:1: not a JCommonsenseQA line"):
        load_jcommonsenseqa(DATA / "jsquad-valid.json")
    with pytest.raises(TaskDataError, match="jcommonsenseqa-valid.json: not a JSQuAD file"):
        load_jsquad(DATA / "jcommonsenseqa-valid.json")
