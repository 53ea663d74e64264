"""Serving overhead: the Ray Serve stack against direct model calls, and p99 during a rollout.

Prints two ratios, both measured in this run on this machine:
  1. requests/s through HTTP -> Serve proxy -> router -> one model replica, over requests/s of
     the same engine called directly in one process (same prompts, same concurrency);
  2. p99 latency while a rollout moves traffic 10% -> 50% -> 100% to a new version, over the
     p99 of the same traffic in steady state.

    python benchmarks/serve_overhead.py [--model DIR] [--requests 300] [--concurrency 4]

Without --model it builds a tiny random LlamaForCausalLM and a byte-level BPE tokenizer
trained on a few Japanese lines (a second seed for the rollout's candidate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.procs import free_port  # noqa: E402

TEXT = [
    "日本の首都は東京です。東京には多くの人が住んでいます。",
    "富士山は日本で一番高い山です。冬になると山頂は雪で白くなります。",
    "図書館で本を借りて、家でゆっくり読みました。",
    "manコマンドはマニュアルページを表示します。",
]


def tiny_model(out: Path, seed: int) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TEXT * 8,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, -(-len(s) * 99 // 100) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    os.environ["LLMCTL_HOME"] = str(tmp / "home")
    model_a = args.model or tiny_model(tmp / "model-a", 0)
    model_b = tiny_model(tmp / "model-b", 1)
    prompts = [f"{TEXT[i % len(TEXT)][:8]}{i}" for i in range(args.requests)]

    # 1. Direct calls: the same engine, same concurrency, one process.
    os.environ.setdefault("LLMCTL_SERVE_THREADS", "1")
    from jobs.serve.engine import load_engine
    from jobs.serve.openai import parse_completion_request

    engine = load_engine(model_a, "transformers")
    reqs = [parse_completion_request({"prompt": p, "max_tokens": args.max_tokens}) for p in prompts]
    engine.complete(reqs[0])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(engine.complete, reqs))
    direct_rps = len(reqs) / (time.perf_counter() - t0)
    del engine

    # 2. Through Ray Serve: one replica of the same model behind the router.
    import httpx
    import ray
    from ray import serve

    from controlplane.context import Context
    from controlplane.rollout.controller import RolloutController
    from controlplane.rollout.ray_backend import RayServeBackend
    from controlplane.spec import RolloutSpec, ServeOptions

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ctx = Context.load()
    port = free_port()
    base = dict(
        name="bench",
        replicas=1,
        gpus_per_replica=0,
        analysis_window_s=3.0,
        min_requests=5,
        max_p99_latency_s=10.0,
        max_latency_ratio=100.0,
        serve=ServeOptions(port=port, cpus_per_replica=0.5),
    )
    backend = RayServeBackend()
    RolloutController(ctx, backend).start(RolloutSpec(model=str(model_a), **base))
    url = f"http://127.0.0.1:{port}/bench/v1/completions"

    def fire(client_prompts: list[str], latencies: list[float], stop: threading.Event | None = None) -> None:
        with httpx.Client(timeout=60) as c:
            i = 0
            while (stop is None and i < len(client_prompts)) or (stop is not None and not stop.is_set()):
                t = time.perf_counter()
                r = c.post(url, json={"prompt": client_prompts[i % len(client_prompts)], "max_tokens": args.max_tokens})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)
                i += 1

    fire(prompts[:5], [])
    shards = [prompts[i :: args.concurrency] for i in range(args.concurrency)]
    lat: list[float] = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=fire, args=(s, lat)) for s in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    serve_rps = len(prompts) / (time.perf_counter() - t0)
    steady_p99 = p99(lat)

    # 3. p99 during a rollout to a second version, under the same closed-loop traffic.
    stop = threading.Event()
    during: list[float] = []
    threads = [threading.Thread(target=fire, args=(s, during, stop)) for s in shards]
    for t in threads:
        t.start()
    row = RolloutController(ctx, backend).start(RolloutSpec(model=str(model_b), **base))
    stop.set()
    for t in threads:
        t.join()
    rollout_p99 = p99(during)
    serve.shutdown()
    ray.shutdown()

    result = {
        "direct_requests_per_s": round(direct_rps, 2),
        "serve_requests_per_s": round(serve_rps, 2),
        "serve_over_direct_throughput_ratio": round(serve_rps / direct_rps, 3),
        "steady_p99_s": round(steady_p99, 4),
        "rollout_p99_s": round(rollout_p99, 4),
        "rollout_over_steady_p99_ratio": round(rollout_p99 / steady_p99, 3),
        "rollout_state": row["state"],
        "rollout_requests": len(during),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
    }
    print(json.dumps(result, indent=1))
    print(
        f"throughput through the serving stack / direct: {result['serve_over_direct_throughput_ratio']:.3f}  "
        f"p99 during rollout / steady: {result['rollout_over_steady_p99_ratio']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
