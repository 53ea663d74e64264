"""Task files in JGLUE's own layouts, and the run's held-out tokens.

JCommonsenseQA (`train-v1.1.json`, `valid-v1.1.json`) is JSON lines with q_id, question,
choice0..choice4, label. JSQuAD (`train-v1.1.json`, `valid-v1.1.json`) is SQuAD-style JSON:
data / title / paragraphs / context (`title [SEP] text`) / qas / answers. A file in the other
task's layout, or a corrupt one, is a `TaskDataError` naming the file (and line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLES = Path(__file__).parent / "samples"


class TaskDataError(ValueError):
    """A task file that does not have the JGLUE layout."""


@dataclass(frozen=True)
class MCItem:
    qid: str
    question: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class QAItem:
    qid: str
    title: str
    context: str
    question: str
    answers: list[str]


def load_jcommonsenseqa(path: Path) -> list[MCItem]:
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices = [str(row[f"choice{i}"]) for i in range(5)]
            items.append(MCItem(str(row["q_id"]), str(row["question"]), choices, int(row["label"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise TaskDataError(f"{path}:{n}: not a JCommonsenseQA line ({type(exc).__name__}: {exc})") from None
        if not 0 <= items[-1].label < 5:
            raise TaskDataError(f"{path}:{n}: label must be 0..4")
    if not items:
        raise TaskDataError(f"{path}: no items")
    return items


def load_jsquad(path: Path) -> list[QAItem]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        items = [
            QAItem(
                str(qa["id"]),
                str(article.get("title", "")),
                p["context"],
                qa["question"],
                [a["text"] for a in qa.get("answers", [])],
            )
            for article in doc["data"]
            for p in article["paragraphs"]
            for qa in p["qas"]
            if not qa.get("is_impossible", False)
        ]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise TaskDataError(f"{path}: not a JSQuAD file ({type(exc).__name__}: {exc})") from None
    items = [i for i in items if i.answers]
    if not items:
        raise TaskDataError(f"{path}: no answerable questions")
    return items


def read_heldout(dataset_dir: Path, max_tokens: int) -> dict[str, Any]:
    """Each source's held-out token ids (1-D integer arrays), at most `max_tokens` of each.

    The one place that knows the dataset layout (the held-out shards of `controlplane.data`).
    """
    import numpy as np

    from controlplane.data.store import heldout_by_source

    return {s: np.asarray(a, dtype=np.int64) for s, a in heldout_by_source(dataset_dir, max_tokens).items()}
