"""`python -m jobs.evaluate`: evaluate a model directory and write JSON results.

    python -m jobs.evaluate --model DIR [--dataset-dir D] [--tasks heldout,jcommonsenseqa,jsquad]
        [--jcommonsenseqa VALID] [--jcommonsenseqa-train TRAIN] [--jcommonsenseqa-k 3]
        [--jsquad VALID] [--jsquad-train TRAIN] [--jsquad-k 2] [--prompt-version 0.3]
        [--seed 42] [--limit N] [--engine auto|transformers|vllm] [--dtype auto] [--out results.json]

Prints (or writes to --out) {"scores": {...}, "tasks": [...], "detail": {...}, "notes": [...]}.
Exit 2 on bad input with one line on stderr. The bundled sample files are used when no file
is given; without a train file the examples come from the scored file (a note says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jobs.evaluate.files import SAMPLES, TaskDataError, load_jcommonsenseqa, load_jsquad
from jobs.evaluate.harness import DEFAULT_PROMPT_VERSION, PROMPT_VERSIONS, SEED

TASKS = ("heldout", "jcommonsenseqa", "jsquad")
LOADERS = {"jcommonsenseqa": load_jcommonsenseqa, "jsquad": load_jsquad}


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
    p.add_argument("--prompt-version", choices=PROMPT_VERSIONS, default=DEFAULT_PROMPT_VERSION)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--heldout-max-tokens", type=int, default=65536)
    p.add_argument("--engine", choices=("auto", "transformers", "vllm"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _tasks(args: argparse.Namespace) -> list[str]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(TASKS)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise TaskDataError(f"--tasks: unknown {', '.join(sorted(unknown))} (known: {', '.join(TASKS)})")
    if "heldout" in tasks and args.dataset_dir is None:
        if args.tasks:
            raise TaskDataError("--tasks heldout needs --dataset-dir (the run's prepared dataset)")
        tasks.remove("heldout")
    return tasks


def load_inputs(args: argparse.Namespace, tasks: list[str]) -> dict[str, tuple[Path, list, Path | None, list | None]]:
    """Every task file read and checked before the model loads: (valid path, items, train path, items)."""
    out = {}
    for task in ("jcommonsenseqa", "jsquad"):
        if task not in tasks:
            continue
        valid, train = getattr(args, task), getattr(args, f"{task}_train")
        for path in (valid, train):
            if path is not None and not path.is_file():
                raise TaskDataError(f"{path}: no such {task} file")
        load = LOADERS[task]
        out[task] = (valid.resolve(), load(valid), train.resolve() if train else None, load(train) if train else None)
    return out


def make_scorer(args: argparse.Namespace):
    import torch

    from jobs.evaluate import vllm_scorer

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    engine = args.engine
    if engine == "auto":
        engine = "vllm" if device.startswith("cuda") and vllm_scorer.available() else "transformers"
    if engine == "vllm":
        if not vllm_scorer.available():
            raise TaskDataError("--engine vllm: vllm is not installed (pip install vllm)")
        return vllm_scorer.VLLMScorer(args.model, dtype=args.dtype), device
    from jobs.evaluate.hf_scorer import HFScorer, keep_freed_memory

    if device == "cpu":
        keep_freed_memory()
    return HFScorer(args.model, device, dtype=args.dtype, batch_tokens=args.batch_tokens), device


def run(args: argparse.Namespace) -> dict:
    tasks = _tasks(args)
    if not (args.model / "config.json").is_file():
        raise TaskDataError(f"{args.model}: not a model directory (no config.json)")
    inputs = load_inputs(args, tasks)
    from jobs.evaluate.tasks import eval_heldout, eval_jcommonsenseqa, eval_jsquad, setup

    t0 = time.monotonic()
    scorer, device = make_scorer(args)
    scores: dict = {}
    notes: list[str] = []
    detail: dict = {
        "device": device,
        "engine": scorer.engine,
        "dtype": scorer.dtype,
        "max_len": scorer.max_len,
        "prompt_version": args.prompt_version,
        "seed": args.seed,
        "limit": args.limit,
        "seconds": {},
    }
    runners = {"jcommonsenseqa": eval_jcommonsenseqa, "jsquad": eval_jsquad}
    for task in tasks:
        t = time.monotonic()
        if task == "heldout":
            scores.update(eval_heldout(scorer, args.dataset_dir, args.heldout_max_tokens))
        else:
            valid, items, train, train_items = inputs[task]
            k = getattr(args, f"{task}_k")
            s, preds = runners[task](scorer, items, train_items, k, args.prompt_version, args.limit, args.seed)
            scores.update(s)
            info = setup(task, items, train_items, k, args.prompt_version, args.limit, args.seed)
            detail[task] = {**info, "file": str(valid), "train": str(train) if train else None, "predictions": preds}
            if train is None and k:
                notes.append(f"{task}: no train file; examples drawn from {valid} itself (never the question scored)")
            if s[f"{task}_truncated"]:
                notes.append(
                    f"{task}: {s[f'{task}_truncated']} of {s[f'{task}_n']} prompts longer than the model's "
                    f"{scorer.max_len}-token context, cut from the left"
                )
        detail["seconds"][task] = round(time.monotonic() - t, 3)
    detail["seconds"]["total"] = round(time.monotonic() - t0, 3)
    return {"model": str(args.model.resolve()), "tasks": tasks, "scores": scores, "detail": detail, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (TaskDataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
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
