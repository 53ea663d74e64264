"""Mixtures of prepared datasets: the checks `run submit` makes and the figures `data show` prints.

The job draws a position's dataset by the mixture's weights (`jobs/pretrain/schedule.Blend`),
and inside a dataset a window uniformly, so a source of a dataset gets the dataset's share
times its share of the dataset's windows (about its share of train tokens). A run of B tokens
then reads source s  B * share_s / train_tokens_s  times: its effective epochs. Pure except for
reading the manifests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controlplane.data.store import read_meta
from controlplane.errors import UserError


def check_mixture(datasets: list[tuple[Path, float]]) -> list[dict[str, Any]]:
    """The manifests of a run's datasets; they must exist and share one tokenizer."""
    metas = []
    for d, _ in datasets:
        metas.append(read_meta(d))
    first = metas[0]
    for (d, _), m in zip(datasets[1:], metas[1:], strict=True):
        a, b = first.get("tokenizer_sha256"), m.get("tokenizer_sha256")
        if a is None or b is None or a != b or first["vocab_size"] != m["vocab_size"]:
            raise UserError(
                f"{d}: its tokenizer differs from {datasets[0][0]}'s; prepare every dataset of a mixture with "
                f"the same `--tokenizer FILE`"
            )
    return metas


def source_rows(meta: dict[str, Any], weight: float = 1.0, budget_tokens: int | None = None) -> list[dict[str, Any]]:
    """One row per source of a dataset: its tokens, share of the run and effective epochs."""
    sources = meta.get("sources") or [
        {
            "name": meta.get("source", "?"),
            "docs": meta.get("train_docs", 0) + meta.get("heldout_docs", 0),
            "train_tokens": meta["train_tokens"],
            "heldout_tokens": meta.get("heldout_tokens", 0),
            "train_docs": meta.get("train_docs", 0),
            "heldout_docs": meta.get("heldout_docs", 0),
            "invalid_utf8_docs": 0,
        }
    ]
    total = sum(s["train_tokens"] for s in sources) or 1
    rows = []
    for s in sources:
        share = weight * s["train_tokens"] / total
        row = {
            "source": s["name"],
            "docs": s.get("docs", 0),
            "train_tokens": s["train_tokens"],
            "heldout_tokens": s.get("heldout_tokens", 0),
            "heldout_docs": s.get("heldout_docs", 0),
            "invalid_utf8_docs": s.get("invalid_utf8_docs", 0),
            "share": share,
        }
        if budget_tokens is not None:
            row["epochs"] = budget_tokens * share / s["train_tokens"] if s["train_tokens"] else float("inf")
        rows.append(row)
    return rows
