"""Evaluation tasks: held-out loss/perplexity and JGLUE-format few-shot tasks.

- heldout: mean next-token cross-entropy over the held-out shards (each source's held-out split) in
  non-overlapping windows, and its exponential (perplexity).
- jcommonsenseqa: k-shot multiple choice (default k=3). Each of the five choices is scored
  by the log-likelihood of its tokens after the prompt; the argmax is the answer; accuracy.
- jsquad: k-shot extractive QA (default k=2) by greedy generation up to a newline; exact
  match against any gold answer after NFKC normalisation and whitespace removal.

File layouts are JGLUE's: JCommonsenseQA is JSON lines with q_id, question, choice0..choice4,
label; JSQuAD is SQuAD-v2-style JSON (data / paragraphs / context / qas / answers). Shots
come from a separate train file when given, else from the same file (never the item itself).
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLES = Path(__file__).parent / "samples"


class TaskDataError(ValueError):
    """A task file that does not have the JGLUE layout."""


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class MCItem:
    qid: str
    question: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class QAItem:
    qid: str
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
            QAItem(str(qa["id"]), p["context"], qa["question"], [a["text"] for a in qa.get("answers", [])])
            for article in doc["data"]
            for p in article["paragraphs"]
            for qa in p["qas"]
            if not qa.get("is_impossible", False)
        ]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TaskDataError(f"{path}: not a JSQuAD file ({type(exc).__name__}: {exc})") from None
    items = [i for i in items if i.answers]
    if not items:
        raise TaskDataError(f"{path}: no answerable questions")
    return items


def shots_for(pool: list, item: Any, k: int) -> list:
    return [p for p in pool if p.qid != item.qid][:k]


# --------------------------------------------------------------------------- prompts


def jcqa_prompt(item: MCItem) -> str:
    options = ",".join(f"{i}.{c}" for i, c in enumerate(item.choices))
    return f"質問：{item.question}\n選択肢：{options}\n回答："


def jcqa_fewshot(shots: list[MCItem], item: MCItem) -> str:
    return "".join(jcqa_prompt(s) + s.choices[s.label] + "\n\n" for s in shots) + jcqa_prompt(item)


def jsquad_prompt(item: QAItem) -> str:
    return f"文章：{item.context}\n質問：{item.question}\n回答："


def jsquad_fewshot(shots: list[QAItem], item: QAItem) -> str:
    return "".join(jsquad_prompt(s) + s.answers[0] + "\n\n" for s in shots) + jsquad_prompt(item)


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return "".join(text.split()).rstrip("。.")


# --------------------------------------------------------------------------- scoring (torch)


class Scorer:
    """Log-likelihoods and greedy generation with a transformers causal LM."""

    def __init__(self, model_dir: Path, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device).eval()
        self.device = device
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def loglikelihoods(self, context: str, continuations: list[str]) -> list[float]:
        torch = self.torch
        ctx_ids = self.encode(context)
        rows, spans = [], []
        for cont in continuations:
            cont_ids = self.encode(cont) or [self.tok.eos_token_id]
            ids = (ctx_ids + cont_ids)[-self.max_len :]
            rows.append(ids)
            spans.append(len(cont_ids))
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        batch = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=batch.to(self.device), attention_mask=mask.to(self.device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for i, r in enumerate(rows):
            n = spans[i]
            positions = torch.arange(len(r) - n - 1, len(r) - 1)
            targets = torch.tensor(r[len(r) - n :])
            out.append(float(logprobs[i, positions, targets].sum()))
        return out

    def greedy(self, prompt: str, max_new_tokens: int) -> str:
        torch = self.torch
        ids = self.encode(prompt)[-(self.max_len - max_new_tokens) :]
        x = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
            )
        text = self.tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        return text.split("\n")[0].strip()


# --------------------------------------------------------------------------- tasks


def eval_heldout(scorer: Scorer, dataset_dir: Path, max_tokens: int = 65536, seq_len: int = 256) -> dict[str, Any]:
    """Cross-entropy over each source's held-out split (at most `max_tokens` per source), and overall."""
    import numpy as np

    from controlplane.data import heldout_by_source

    torch = scorer.torch
    seq_len = min(seq_len, scorer.max_len)
    per_source: dict[str, dict[str, float]] = {}
    total, count = 0.0, 0
    for source, data in heldout_by_source(dataset_dir, max_tokens).items():
        s_total, s_count = 0.0, 0
        for start in range(0, len(data) - 1, seq_len):
            window = torch.from_numpy(np.asarray(data[start : start + seq_len + 1], dtype=np.int64))
            if len(window) < 2:
                break
            with torch.no_grad():
                logits = scorer.model(input_ids=window[None, :-1].to(scorer.device)).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits, window[1:].to(scorer.device), reduction="sum")
            s_total += float(loss)
            s_count += len(window) - 1
        if s_count:
            per_source[source] = {"loss": s_total / s_count, "tokens": s_count}
            total, count = total + s_total, count + s_count
    if count == 0:
        raise TaskDataError(f"{dataset_dir}: fewer than 2 held-out tokens in every source")
    mean = total / count
    scores: dict[str, Any] = {
        "heldout_loss": mean,
        "heldout_perplexity": math.exp(min(mean, 700.0)),
        "heldout_tokens": count,
    }
    if len(per_source) > 1:  # one perplexity per source of a multi-source dataset
        for source, s in per_source.items():
            scores[f"heldout_perplexity:{source}"] = math.exp(min(s["loss"], 700.0))
    return scores


def eval_jcommonsenseqa(scorer: Scorer, path: Path, k: int = 3, train: Path | None = None, limit: int | None = None):
    items = load_jcommonsenseqa(path)
    pool = load_jcommonsenseqa(train) if train else items
    items = items[:limit] if limit else items
    correct, predictions = 0, []
    for item in items:
        scores = scorer.loglikelihoods(jcqa_fewshot(shots_for(pool, item, k), item), item.choices)
        pred = max(range(len(scores)), key=scores.__getitem__)
        correct += pred == item.label
        predictions.append({"q_id": item.qid, "pred": pred, "label": item.label})
    return {"jcommonsenseqa_accuracy": correct / len(items), "jcommonsenseqa_n": len(items)}, predictions


def eval_jsquad(
    scorer: Scorer,
    path: Path,
    k: int = 2,
    train: Path | None = None,
    limit: int | None = None,
    max_new_tokens: int = 16,
):
    items = load_jsquad(path)
    pool = load_jsquad(train) if train else items
    items = items[:limit] if limit else items
    hits, predictions = 0, []
    for item in items:
        text = scorer.greedy(jsquad_fewshot(shots_for(pool, item, k), item), max_new_tokens)
        ok = normalize_answer(text) in {normalize_answer(a) for a in item.answers}
        hits += ok
        predictions.append({"id": item.qid, "prediction": text, "exact": ok})
    return {"jsquad_exact_match": hits / len(items), "jsquad_n": len(items)}, predictions
