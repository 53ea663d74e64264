"""Evaluation speed: `llmctl eval`'s scorer against a one-question-at-a-time loop, same run.

Prints, for JCommonsenseQA and JSQuAD, questions/s of the evaluation job's transformers
scorer (the engine `llmctl eval` uses without a GPU: batched across questions sorted by
length, each prompt computed once for its five choices, shared-prefix cache, one right-padded prefill
per batch, newline stop, stopped rows leaving the batch) over questions/s of a
straightforward loop over the SAME model, dtype, threads, prompts, examples and stop rules
(one forward of five padded rows per question; one `generate` per question at batch 1,
capped at the longest gold answer's tokens and stopped at a newline token), as a ratio. The
two must give the same answer to every question and the same score, or the benchmark fails.
The two are timed in alternation `--repeat` times (this machine's speed drifts between runs);
the figures are medians, the speedup the median of the pairs' ratios. Model loading is not
counted on either side; with `--vllm` the vLLM scorer is timed against the same baseline,
steady state and with its engine start-up counted. Then the projected
wall time of the full validation sets (1,119 + 4,442 questions) for the 13b preset on one
GPU from the planner's FLOP count.

    python benchmarks/eval_speed.py [--jcommonsenseqa VALID --jcommonsenseqa-train TRAIN]
        [--jsquad VALID --jsquad-train TRAIN] [--limit 200] [--threads 2] [--repeat 5] [--vllm]

Without files it writes items in JGLUE's layouts from a few Japanese lines. The model is the
tiny preset's shape (2 layers, hidden 64) with a 2,048-token context, so that 3-shot and
2-shot prompts fit, and a byte-level BPE tokenizer trained on the same lines.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.evaluate.files import load_jcommonsenseqa, load_jsquad  # noqa: E402
from jobs.evaluate.harness import DEFAULT_PROMPT_VERSION, exact_match, first_line, percent, plan, template  # noqa: E402

LINES = [
    "富士山は静岡県と山梨県にまたがる山で、標高は3776メートルです。日本で一番高い山として知られています。",
    "東京は日本の首都で、約1400万人が住んでいます。江戸時代には江戸と呼ばれていました。",
    "梅雨は北海道と小笠原諸島を除く日本で、5月から7月にかけて来る雨の多い期間のことです。",
    "図書館では本を借りることができます。返す日を過ぎると次の本を借りられません。",
    "猫は魚が好きで、犬は散歩が好きです。鳥は朝早くから鳴いています。",
    "電車は駅に止まります。私は毎朝七時の電車に乗って会社へ行きます。",
]
WORDS = ["傘", "扇風機", "冷蔵庫", "布団", "鉛筆", "自転車", "靴下", "時計", "電話", "本棚", "蛇口", "煙"]


def write_items(root: Path, n_mc: int, n_qa: int) -> dict[str, Path]:
    rng = random.Random(0)
    paths = {}
    for split, n in (("valid", n_mc), ("train", 200)):
        rows = []
        for i in range(n):
            choices = rng.sample(WORDS, 5)
            q = f"{rng.choice(LINES)[: rng.randint(8, 30)]}とき、使うものは何ですか？"
            rows.append({"q_id": i, "question": q, **{f"choice{j}": c for j, c in enumerate(choices)}, "label": i % 5})
        paths[f"jcommonsenseqa_{split}"] = root / f"jcqa-{split}.json"
        paths[f"jcommonsenseqa_{split}"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for split, n in (("valid", n_qa), ("train", 200)):
        data = []
        for i in range(n):
            body = "".join(rng.sample(LINES, 3))
            start = rng.randint(0, len(body) - 12)
            answer = body[start : start + rng.randint(2, 10)]
            qa = {
                "question": f"{answer[:2]}について何と書かれていますか？",
                "id": f"{split}{i}",
                "is_impossible": False,
            }
            qa["answers"] = [{"text": answer, "answer_start": start}]
            data.append({"title": f"記事{i}", "paragraphs": [{"context": f"記事{i} [SEP] {body}", "qas": [qa]}]})
        paths[f"jsquad_{split}"] = root / f"jsquad-{split}.json"
        paths[f"jsquad_{split}"].write_text(json.dumps({"version": "v1.1", "data": data}, ensure_ascii=False))
    return paths


def tiny_model(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from controlplane.spec.run import PRESETS

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(LINES * 8 + WORDS * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    p = PRESETS["tiny"]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=p["hidden_size"],
        intermediate_size=p["ffn_size"],
        num_hidden_layers=p["num_layers"],
        num_attention_heads=p["num_heads"],
        num_key_value_heads=p["num_kv_heads"],
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- the baseline loop


def baseline_jcqa(scorer, todo, tpl) -> list[int]:
    """One forward per question over five rows that each repeat the whole prompt."""
    torch = scorer.torch
    preds = []
    for item, shots in todo:
        ctx = scorer.encode(tpl.prompt(item, shots))
        rows = [ctx + scorer.encode(c) for c in item.choices]
        width = max(len(r) for r in rows)
        ids = torch.zeros((5, width), dtype=torch.long)
        mask = torch.zeros((5, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        with torch.no_grad():
            lp = torch.log_softmax(scorer.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        scores = []
        for i, r in enumerate(rows):
            scores.append(float(lp[i, torch.arange(len(ctx) - 1, len(r) - 1), torch.tensor(r[len(ctx) :])].sum()))
        preds.append(max(range(5), key=scores.__getitem__))
    return preds


def baseline_jsquad(scorer, todo, tpl) -> list[str]:
    """One `generate` per question at batch 1, capped at the longest gold answer."""
    torch = scorer.torch
    out = []
    stops = sorted(scorer.newline_ids())
    for item, shots in todo:
        ids = torch.tensor([scorer.encode(tpl.prompt(item, shots))])
        cap = max(len(scorer.encode(a)) for a in item.answers)
        with torch.no_grad():
            gen = scorer.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=cap,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=scorer.tok.pad_token_id,
            )
        out.append(first_line(scorer.tok.decode(gen[0, ids.shape[1] :])))
    return out


# --------------------------------------------------------------------------- 13b projection


def project_13b(jcqa_chars: float, jsquad_chars: float, answer_tokens: float, tokens_per_char: float) -> dict:
    """Full-set wall time of the 13b preset on one A100-80GB, from the planner's FLOP count.

    Prefill: forward FLOPs = 1/3 of the planner's training FLOPs per token, at `MFU` of peak.
    JSQuAD decoding: each step reads every weight once (bf16), batch `DECODE_BATCH`, at the
    A100-80GB's 2,039 GB/s (NVIDIA A100 datasheet).
    """
    from controlplane.planning.gpus import gpu
    from controlplane.planning.plan import flops_per_token, matmul_params
    from controlplane.spec.run import ModelSpec

    mfu, decode_batch, hbm = 0.4, 32, 2039e9
    dims = ModelSpec(preset="13b").resolve()
    peak = gpu("A100-80GB").peak_flops
    out = {}
    for task, n, chars in (("jcommonsenseqa", 1119, jcqa_chars), ("jsquad", 4442, jsquad_chars)):
        seq = chars * tokens_per_char
        prefill = n * seq * flops_per_token(dims, int(seq)) / 3
        seconds = prefill / (peak * mfu)
        if task == "jsquad":
            steps = (n / decode_batch) * answer_tokens
            seconds += steps * matmul_params(dims) * 2 / hbm
        out[task] = {"prompt_tokens": round(seq), "seconds": round(seconds, 1)}
    out["total_seconds"] = round(sum(v["seconds"] for v in out.values() if isinstance(v, dict)), 1)
    out["assumptions"] = (
        f"A100-80GB bf16 peak, MFU {mfu} for prefill, {tokens_per_char} tokens/char, "
        f"decode batch {decode_batch} at {hbm / 1e9:.0f} GB/s"
    )
    return out


def baseline_scores(task: str, todo, base) -> float:
    if task == "jcommonsenseqa":
        return percent(sum(p == item.label for p, (item, _) in zip(base, todo, strict=True)), len(todo))
    return percent(sum(exact_match(p, item.answers) for p, (item, _) in zip(base, todo, strict=True)), len(todo))


def compare(task: str, scores: dict, preds: list, base: list, todo) -> dict:
    """How far a scorer's answers and score are from the baseline's."""
    key, score = (
        ("pred", "jcommonsenseqa_accuracy") if task == "jcommonsenseqa" else ("prediction", "jsquad_exact_match")
    )
    agree = sum(p[key] == b for p, b in zip(preds, base, strict=True))
    return {
        "answers_agreeing_with_baseline": f"{agree}/{len(todo)}",
        "score": round(scores[score], 2),
        "baseline_score": round(baseline_scores(task, todo, base), 2),
        "identical": agree == len(todo),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    for task in ("jcommonsenseqa", "jsquad"):
        ap.add_argument(f"--{task}", type=Path)
        ap.add_argument(f"--{task}-train", type=Path)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="timed pairs (scorer, baseline) a task; medians reported")
    ap.add_argument("--batch-tokens", type=int, default=None, help="the scorer's batch budget (default: its own)")
    ap.add_argument("--tasks", default="jcommonsenseqa,jsquad")
    ap.add_argument("--prompt-version", default=DEFAULT_PROMPT_VERSION)
    ap.add_argument("--tokens-per-char", type=float, default=0.8, help="of a 32k Japanese tokenizer (projection)")
    ap.add_argument("--vllm", action="store_true", help="also time the vLLM scorer against the same baseline")
    args = ap.parse_args()

    import torch

    from jobs.evaluate.hf_scorer import HFScorer, keep_freed_memory
    from jobs.evaluate.tasks import eval_jcommonsenseqa, eval_jsquad

    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as the evaluation job does for itself on a CPU
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        root = Path(tmp)
        made = write_items(root, args.limit, args.limit)
        files = {}
        for task in ("jcommonsenseqa", "jsquad"):
            files[task] = getattr(args, task) or made[f"{task}_valid"]
            files[f"{task}_train"] = getattr(args, f"{task}_train") or made[f"{task}_train"]
        model = tiny_model(root / "model")
        scorer = HFScorer(model, "cpu", batch_tokens=args.batch_tokens)
        scorer.newline_ids()  # the stop tokens, found once per tokenizer, are shared by both ways
        report: dict = {"threads": args.threads, "limit": args.limit, "dtype": scorer.dtype}
        report["batch_tokens"] = scorer.batch_tokens
        report["freed_memory_kept"] = kept
        report["counted"] = "scoring only: the model is loaded once and shared by both ways (vLLM: see its startup_s)"
        runs = {
            "jcommonsenseqa": (load_jcommonsenseqa, eval_jcommonsenseqa, 3),
            "jsquad": (load_jsquad, eval_jsquad, 2),
        }
        tasks = [t for t in runs if t in args.tasks.split(",")]
        chars, work = {}, {}
        for task in tasks:
            load, run, k = runs[task]
            items, train = load(files[task]), load(files[f"{task}_train"])
            tpl = template(task, args.prompt_version)
            todo = plan(items, train, k, args.limit)
            chars[task] = sum(len(tpl.prompt(i, s)) for i, s in todo) / len(todo)
            fasts, slows = [], []
            for _ in range(args.repeat):  # alternated, so that both ways see the same machine
                t0 = time.perf_counter()
                scores, preds = run(scorer, items, train, k, args.prompt_version, args.limit)
                fasts.append(len(todo) / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                base = (baseline_jcqa if task == "jcommonsenseqa" else baseline_jsquad)(scorer, todo, tpl)
                slows.append(len(todo) / (time.perf_counter() - t0))
            fast, slow = statistics.median(fasts), statistics.median(slows)
            same = compare(task, scores, preds, base, todo)
            report[task] = {
                "questions": len(todo),
                "questions_per_s": round(fast, 1),
                "baseline_questions_per_s": round(slow, 1),
                "speedup": round(statistics.median(f / b for f, b in zip(fasts, slows, strict=True)), 2),
                "speedups": [round(f / b, 2) for f, b in zip(fasts, slows, strict=True)],
                **same,
                "truncated": scores[f"{task}_truncated"],
            }
            if not same["identical"] or same["score"] != same["baseline_score"]:
                sys.exit(f"error: {task}: the scorer's answers differ from the baseline's: {same}")
            work[task] = (items, train, k, todo, base, slow)
            if task == "jsquad":
                answer_chars = sum(max(len(a) for a in i.answers) for i, _ in todo) / len(todo)
        if args.vllm:
            report["vllm"] = time_vllm(model, runs, work, args)
        if len(chars) == 2:
            report["projected_13b_one_gpu"] = project_13b(
                chars["jcommonsenseqa"], chars["jsquad"], answer_chars * args.tokens_per_char, args.tokens_per_char
            )
    print(json.dumps(report, ensure_ascii=False, indent=1))


def time_vllm(model: Path, runs: dict, work: dict, args: argparse.Namespace) -> dict:
    """The vLLM scorer over the same items, against the same baseline: steady state, and with
    the engine's start-up spread over the questions (what a one-off evaluation pays)."""
    from jobs.evaluate import vllm_scorer

    if not vllm_scorer.available():
        return {"skipped": "vllm does not import here"}
    t0 = time.perf_counter()
    scorer = vllm_scorer.VLLMScorer(model, max_model_len=2048, memory_fraction=0.1)
    out: dict = {"startup_s": round(time.perf_counter() - t0, 1)}
    for task, (items, train, k, todo, base, slow) in work.items():
        t0 = time.perf_counter()
        scores, preds = runs[task][1](scorer, items, train, k, args.prompt_version, args.limit)
        seconds = time.perf_counter() - t0
        out[task] = {
            "questions_per_s": round(len(todo) / seconds, 1),
            "speedup": round(len(todo) / seconds / slow, 2),
            "speedup_with_startup": round(len(todo) / (seconds + out["startup_s"]) / slow, 2),
            **compare(task, scores, preds, base, todo),
        }
    return out


if __name__ == "__main__":
    main()
