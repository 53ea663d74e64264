"""The community JGLUE harness's rules, as pure functions: prompts, example sampling, EM.

Everything here reproduces Stability-AI's lm-evaluation-harness (`jp-stable` branch) so that
a score from `llmctl eval` can stand beside a leaderboard's:

- prompts: `lm_eval/tasks/ja/jcommonsenseqa.py` and `jsquad.py`, task versions
  `jcommonsenseqa-1.1-0.2` / `-0.3` and `jsquad-1.1-0.2` / `-0.3`, byte for byte
  (description, few-shot separator, per-item text and target);
- examples: `lm_eval/evaluator.py` and `Task.fewshot_context` in `lm_eval/base.py`: one
  `random.Random(42)` shuffles the scored items, then draws each question's examples from the
  train split in that order (`rnd.sample(train, k)`); without a train split it draws k+1 from
  the scored file and drops the question itself; `--limit N` keeps the first N shuffled items;
- answers: `lm_eval/jasquad/evaluate.py`: neologdn normalisation, emoji removed, whitespace
  collapsed, punctuation kept; EM is the best over the gold answers; scores are 0-100.

No model and no torch here: the scorers get strings and return numbers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PROMPT_VERSIONS = ("0.2", "0.3")
DEFAULT_PROMPT_VERSION = "0.3"
SEED = 42
TASK_VERSION = "1.1"

ALPACA_DESCRIPTION = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
)
FEWSHOT_SEP = "\n\n"


class SamplingError(ValueError):
    """Too few items to draw the requested examples from."""


@dataclass(frozen=True)
class Template:
    """One harness task version: a description, then examples and the item joined by FEWSHOT_SEP."""

    task: str
    version: str
    description: str

    @property
    def name(self) -> str:
        return f"{self.task}-{TASK_VERSION}-{self.version}"

    def text(self, item: Any) -> str:
        return _TEXTS[(self.task, self.version)](item)

    def target(self, item: Any) -> str:
        if self.task == "jsquad":
            return item.answers[0]
        return str(item.label) if self.version == "0.2" else item.choices[item.label]

    def prefix(self) -> str:
        """The part every prompt of this version starts with."""
        return self.description

    def prompt(self, item: Any, examples: Sequence[Any]) -> str:
        shots = FEWSHOT_SEP.join(self.text(e) + self.target(e) for e in examples) + FEWSHOT_SEP if examples else ""
        return self.description + shots + self.text(item)


def _body(context: str) -> str:
    """JSQuAD contexts are `title [SEP] text`; the harness keeps the text."""
    return context.split("[SEP]")[-1].strip()


def _jcqa_02(item: Any) -> str:
    choices = ",".join(f"{i}.{c}" for i, c in enumerate(item.choices))
    return f"質問:{item.question}\n選択肢:{choices}\n回答:"


def _jcqa_03(item: Any) -> str:
    choices = "\n".join(f"- {c}" for c in item.choices)
    instruction = f"与えられた選択肢の中から、最適な答えを選んでください。出力は以下から選択してください：\n{choices}"
    return f"### 指示:\n{instruction}\n\n### 入力:\n{item.question}\n\n### 応答:\n"


def _jsquad_02(item: Any) -> str:
    return f"文章:{_body(item.context)}\n質問:{item.question}\n回答:"


def _jsquad_03(item: Any) -> str:
    text = f"文脈：{_body(item.context)}\n質問：{item.question}"
    return f"### 指示:\n与えられた文脈から、質問に対する答えを抜き出してください。\n\n### 入力:\n{text}\n\n### 応答:\n"


_TEXTS = {
    ("jcommonsenseqa", "0.2"): _jcqa_02,
    ("jcommonsenseqa", "0.3"): _jcqa_03,
    ("jsquad", "0.2"): _jsquad_02,
    ("jsquad", "0.3"): _jsquad_03,
}
_DESCRIPTIONS = {
    ("jcommonsenseqa", "0.2"): "質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。"
    "なお、回答は選択肢の番号(例:0)でするものとします。 \n\n",
    ("jcommonsenseqa", "0.3"): ALPACA_DESCRIPTION,
    ("jsquad", "0.2"): "質問に対する回答を文章から一言で抽出してください。回答は名詞で答えてください。\n\n",
    ("jsquad", "0.3"): ALPACA_DESCRIPTION,
}


def template(task: str, version: str = DEFAULT_PROMPT_VERSION) -> Template:
    if (task, version) not in _TEXTS:
        raise ValueError(f"prompt version {version!r} of {task}: known {', '.join(PROMPT_VERSIONS)}")
    return Template(task, version, _DESCRIPTIONS[(task, version)])


def plan(
    items: Sequence[Any], train: Sequence[Any] | None, k: int, limit: int | None = None, seed: int = SEED
) -> list[tuple[Any, list[Any]]]:
    """(item, examples) in the harness's order: shuffle with `seed`, keep `limit`, sample per item.

    With a train split, examples are `rnd.sample(train, k)`; without one they are drawn from the
    scored items themselves (k+1, the question itself dropped), as the harness does.
    """
    rnd = random.Random()
    rnd.seed(seed)
    order = list(items)
    rnd.shuffle(order)
    if limit:
        order = order[:limit]
    pool = list(train) if train is not None else list(items)
    need = k if train is not None else k + 1
    if k and len(pool) < need:
        where = "train split" if train is not None else "scored file (no train split)"
        raise SamplingError(f"{k}-shot needs {need} items in the {where}, it has {len(pool)}")
    out = []
    for item in order:
        if k == 0:
            shots: list[Any] = []
        elif train is not None:
            shots = rnd.sample(pool, k)
        else:
            shots = [x for x in rnd.sample(pool, k + 1) if x.qid != item.qid][:k]
        out.append((item, shots))
    return out


# --------------------------------------------------------------------------- answers

_EMOJI_RE = re.compile(
    "["
    "\U0001f600-\U0001f64f"  # emoticons
    "\U0001f300-\U0001f5ff"  # symbols & pictographs
    "\U0001f680-\U0001f6ff"  # transport & map symbols
    "\U0001f1e0-\U0001f1ff"  # flags
    "\U00002702-\U000027b0"
    "]+",
    flags=re.UNICODE,
)


def normalize_answer(text: str) -> str:
    """The harness's JSQuAD normalisation: emoji out, neologdn, whitespace collapsed."""
    import emoji
    import neologdn

    text = _EMOJI_RE.sub("", "".join("" if emoji.is_emoji(c) else c for c in text))
    return " ".join(neologdn.normalize(text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """EM as the best over the gold answers."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def first_line(generated: str) -> str:
    """The harness cuts a generation at the first newline (no strip: normalisation handles it)."""
    return generated.split("\n")[0]


def percent(hits: float, total: int) -> float:
    return 100.0 * hits / total if total else 0.0
