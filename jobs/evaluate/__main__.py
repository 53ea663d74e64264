"""`python -m jobs.evaluate`: evaluate a model directory and write JSON results.

    python -m jobs.evaluate --model DIR [--dataset-dir D] [--tasks heldout,jcommonsenseqa,jsquad]
        [--jcommonsenseqa FILE] [--jcommonsenseqa-train FILE] [--jcommonsenseqa-k 3]
        [--jsquad FILE] [--jsquad-train FILE] [--jsquad-k 2] [--limit N] [--out results.json]

Prints (or writes to --out) {"scores": {...}, "tasks": [...], "detail": {...}}. Exit 2 on bad
input with one line on stderr. The bundled sample files are used when no file is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jobs.evaluate.tasks import SAMPLES, TaskDataError

TASKS = ("heldout", "jcommonsenseqa", "jsquad")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--dataset-dir", type=Path, default=None)
    p.add_argument("--tasks", default=None, help="comma-separated; default: all that have their inputs")
    p.add_argument("--jcommonsenseqa", type=Path, default=SAMPLES / "jcommonsenseqa.jsonl")
    p.add_argument("--jcommonsenseqa-train", type=Path, default=None)
    p.add_argument("--jcommonsenseqa-k", type=int, default=3)
    p.add_argument("--jsquad", type=Path, default=SAMPLES / "jsquad.json")
    p.add_argument("--jsquad-train", type=Path, default=None)
    p.add_argument("--jsquad-k", type=int, default=2)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--heldout-max-tokens", type=int, default=65536)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise TaskDataError(f"--tasks: unknown {', '.join(sorted(unknown))} (known: {', '.join(TASKS)})")
    if "heldout" in tasks and args.dataset_dir is None:
        if args.tasks:
            raise TaskDataError("--tasks heldout needs --dataset-dir (the run's prepared dataset)")
        tasks.remove("heldout")
    if not (args.model / "config.json").is_file():
        raise TaskDataError(f"{args.model}: not a model directory (no config.json)")
    for t, path in (("jcommonsenseqa", args.jcommonsenseqa), ("jsquad", args.jsquad)):
        if t in tasks and not path.is_file():
            raise TaskDataError(f"{path}: no such {t} file")

    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    from jobs.evaluate.tasks import Scorer, eval_heldout, eval_jcommonsenseqa, eval_jsquad

    t0 = time.monotonic()
    scorer = Scorer(args.model, device)
    scores: dict = {}
    detail: dict = {"device": device, "seconds": {}, "limit": args.limit}
    for task in tasks:
        t = time.monotonic()
        if task == "heldout":
            scores.update(eval_heldout(scorer, args.dataset_dir, args.heldout_max_tokens))
        elif task == "jcommonsenseqa":
            s, preds = eval_jcommonsenseqa(
                scorer, args.jcommonsenseqa, args.jcommonsenseqa_k, args.jcommonsenseqa_train, args.limit
            )
            scores.update(s)
            detail["jcommonsenseqa"] = {
                "file": str(args.jcommonsenseqa),
                "k": args.jcommonsenseqa_k,
                "predictions": preds,
            }
        elif task == "jsquad":
            s, preds = eval_jsquad(scorer, args.jsquad, args.jsquad_k, args.jsquad_train, args.limit)
            scores.update(s)
            detail["jsquad"] = {"file": str(args.jsquad.resolve()), "k": args.jsquad_k, "predictions": preds}
        detail["seconds"][task] = round(time.monotonic() - t, 3)
    detail["seconds"]["total"] = round(time.monotonic() - t0, 3)
    return {"model": str(args.model), "tasks": tasks, "scores": scores, "detail": detail}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (TaskDataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, ensure_ascii=False, indent=1)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, args.out)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
