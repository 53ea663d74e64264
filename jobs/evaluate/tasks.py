"""The tasks on any scorer (transformers or vLLM): held-out perplexity, JCommonsenseQA, JSQuAD.

- heldout: mean next-token cross-entropy over each source's held-out split in non-overlapping
  windows, and its exponential (perplexity; one per source when there are several).
- jcommonsenseqa: k-shot multiple choice scored by the summed log-likelihood of each
  choice's tokens after the prompt (the harness's `acc`), 0-100.
- jsquad: k-shot extractive QA by greedy generation stopped at the newline and capped at the
  longest gold answer's token length; EM (best over the gold answers) 0-100.

Prompts, examples and answer rules are the community harness's (`harness.py`). A prompt that
does not fit the model's context is cut from the left as the harness does, and COUNTED:
`<task>_truncated` goes with the scores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from jobs.evaluate.files import MCItem, QAItem, TaskDataError, read_heldout
from jobs.evaluate.harness import SamplingError, exact_match, first_line, percent, plan, template


class Scorer(Protocol):
    engine: str
    dtype: str
    max_len: int

    def encode(self, text: str) -> list[int]: ...
    def encode_all(self, texts: list[str]) -> list[list[int]]: ...
    def choice_logprobs(self, requests: list[tuple[list[int], list[list[int]]]]) -> list[list[float]]: ...
    def generate(self, requests: list[tuple[list[int], int]]) -> list[str]: ...
    def sum_nll(self, windows: list[list[int]]) -> float: ...


def _plan(items: list, train: list | None, k: int, limit: int | None, seed: int) -> list:
    try:
        return plan(items, train, k, limit, seed)
    except SamplingError as exc:
        raise TaskDataError(str(exc)) from None


def setup(task: str, items: list, train: list | None, k: int, version: str, limit: int | None, seed: int) -> dict:
    """What an evaluation used, recorded with its scores."""
    return {
        "task_version": template(task, version).name,
        "prompt_version": version,
        "k": k,
        "seed": seed,
        "limit": limit,
        "valid_size": len(items),
        "train_size": len(train) if train is not None else None,
        "examples_from": "train" if train is not None else "valid",
    }


def eval_jcommonsenseqa(
    scorer: Scorer,
    items: list[MCItem],
    train: list[MCItem] | None,
    k: int = 3,
    version: str = "0.3",
    limit: int | None = None,
    seed: int = 42,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tpl = template("jcommonsenseqa", version)
    todo = _plan(items, train, k, limit, seed)
    requests, truncated = [], 0
    prompts = scorer.encode_all([tpl.prompt(item, shots) for item, shots in todo])
    choices = iter(scorer.encode_all([c for item, _ in todo for c in item.choices]))
    for (item, _), ctx in zip(todo, prompts, strict=True):
        conts = [next(choices) for _ in item.choices]
        if not all(conts):
            raise TaskDataError(f"jcommonsenseqa {item.qid}: a choice encodes to no tokens")
        room = scorer.max_len - max(len(c) for c in conts)
        if len(ctx) > room:
            truncated += 1
            ctx = ctx[-room:]
        requests.append((ctx, conts))
    results = scorer.choice_logprobs(requests)
    correct, predictions = 0, []
    for (item, _), lls in zip(todo, results, strict=True):
        pred = max(range(len(lls)), key=lls.__getitem__)
        correct += pred == item.label
        predictions.append({"q_id": item.qid, "pred": pred, "label": item.label})
    n = len(todo)
    scores = {
        "jcommonsenseqa_accuracy": percent(correct, n),
        "jcommonsenseqa_n": n,
        "jcommonsenseqa_truncated": truncated,
    }
    return scores, predictions


def eval_jsquad(
    scorer: Scorer,
    items: list[QAItem],
    train: list[QAItem] | None,
    k: int = 2,
    version: str = "0.3",
    limit: int | None = None,
    seed: int = 42,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tpl = template("jsquad", version)
    todo = _plan(items, train, k, limit, seed)
    requests, truncated = [], 0
    prompts = scorer.encode_all([tpl.prompt(item, shots) for item, shots in todo])
    answers = iter(scorer.encode_all([a for item, _ in todo for a in item.answers]))
    for (item, _), ctx in zip(todo, prompts, strict=True):
        cap = max([len(next(answers)) for _ in item.answers], default=0) or 1
        room = scorer.max_len - cap
        if len(ctx) > room:
            truncated += 1
            ctx = ctx[-room:]
        requests.append((ctx, cap))
    texts = scorer.generate(requests)
    hits, predictions = 0, []
    for (item, _), text in zip(todo, texts, strict=True):
        answer = first_line(text)
        ok = exact_match(answer, item.answers)
        hits += ok
        predictions.append({"id": item.qid, "prediction": answer, "exact": ok})
    n = len(todo)
    scores = {"jsquad_exact_match": percent(hits, n), "jsquad_n": n, "jsquad_truncated": truncated}
    return scores, predictions


def eval_heldout(scorer: Scorer, dataset_dir: Path, max_tokens: int = 65536, seq_len: int = 256) -> dict[str, Any]:
    """Cross-entropy over each source's held-out split (at most `max_tokens` per source), and overall."""
    seq_len = min(seq_len, scorer.max_len)
    total, count, per_source = 0.0, 0, {}
    for source, data in read_heldout(dataset_dir, max_tokens).items():
        windows = [data[s : s + seq_len + 1].tolist() for s in range(0, len(data) - 1, seq_len)]
        windows = [w for w in windows if len(w) >= 2]
        n = sum(len(w) - 1 for w in windows)
        if not n:
            continue
        nll = scorer.sum_nll(windows)
        per_source[source] = nll / n
        total, count = total + nll, count + n
    if count == 0:
        raise TaskDataError(f"{dataset_dir}: fewer than 2 held-out tokens in every source")
    mean = total / count
    scores: dict[str, Any] = {
        "heldout_loss": mean,
        "heldout_perplexity": math.exp(min(mean, 700.0)),
        "heldout_tokens": count,
    }
    if len(per_source) > 1:  # one perplexity per source of a multi-source dataset
        for source, loss in per_source.items():
            scores[f"heldout_perplexity:{source}"] = math.exp(min(loss, 700.0))
    return scores
