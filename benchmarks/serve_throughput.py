"""Serving throughput: llmctl on vLLM against vLLM's own OpenAI server, and against transformers.

Three servers of the same model, started one after another on this machine, each given the
same prompts at the same concurrency (closed loop, streamed, greedy, `ignore_eos` so every
request generates exactly --max-tokens tokens):

  1. llmctl: HTTP -> Ray Serve proxy -> router -> one replica driving vLLM's AsyncLLM;
  2. `vllm serve` (vLLM's own OpenAI-compatible server), same engine settings;
  3. llmctl with `engine: transformers` (the serving path before vLLM).

Prints output tokens/s of llmctl over `vllm serve` (goal >= 0.90), p50/p99 time-to-first-token
ratios (llmctl over vllm serve), and llmctl-on-vLLM over llmctl-on-transformers tokens/s.

    python benchmarks/serve_throughput.py [--model DIR] [--requests 256] [--concurrency 16] [--max-tokens 32]
        [--skip-transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving_common import (  # noqa: E402
    RayService,
    closed_loop,
    prompts,
    start_server,
    stop_server,
    tiny_model,
    vllm_server_cmd,
)

from controlplane.procs import free_port  # noqa: E402

KV_CACHE_GIB = 0.25


def vllm_serve(model: Path, texts: list[str], concurrency: int, max_tokens: int, max_num_seqs: int, log: Path):
    """vLLM's own server on 127.0.0.1, the same engine settings llmctl's replica uses."""
    port = free_port()
    cmd = vllm_server_cmd(
        sys.executable,
        model,
        "bench",
        port,
        "--max-num-seqs",
        str(max_num_seqs),
        "--kv-cache-memory-bytes",
        str(int(KV_CACHE_GIB * 2**30)),
        "--disable-log-stats",
    )
    proc = start_server(cmd, port, log, timeout_s=600)
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        closed_loop(url, texts[:concurrency], concurrency, max_tokens, model="bench")  # warm-up
        return closed_loop(url, texts, concurrency, max_tokens, model="bench")
    finally:
        stop_server(proc)


def llmctl(model: Path, engine: str, texts: list[str], concurrency: int, max_tokens: int, max_num_seqs: int):
    opts = {"cpus_per_replica": 1.0} if engine == "transformers" else {"kv_cache_gib": KV_CACHE_GIB}
    with RayService(model, engine, name=f"bench-{engine}", max_num_seqs=max_num_seqs, **opts) as url:
        closed_loop(url, texts[:concurrency], concurrency, max_tokens)  # warm-up
        return closed_loop(url, texts, concurrency, max_tokens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="A model directory (default: a tiny random Llama).")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--transformers-requests", type=int, default=64, help="Fewer: the baseline is slow.")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="serve-throughput-"))
    os.environ["LLMCTL_HOME"] = str(tmp / "home")
    model = args.model or tiny_model(tmp / "model", 0)
    texts = prompts(args.requests)
    n = (args.concurrency, args.max_tokens, args.max_num_seqs)

    ours = llmctl(model, "vllm", texts, *n)
    theirs = vllm_serve(model, texts, *n, log=tmp / "vllm-serve.log")
    base = None
    if not args.skip_transformers:
        base = llmctl(model, "transformers", texts[: args.transformers_requests], *n)

    result = {
        "llmctl_vllm": ours.summary(),
        "vllm_serve": theirs.summary(),
        "llmctl_transformers": base.summary() if base else None,
        "tokens_per_s_ratio_llmctl_over_vllm_serve": round(ours.tokens_per_s / theirs.tokens_per_s, 3),
        "ttft_p50_ratio_llmctl_over_vllm_serve": round(
            ours.summary()["ttft_p50_s"] / theirs.summary()["ttft_p50_s"], 3
        ),
        "ttft_p99_ratio_llmctl_over_vllm_serve": round(
            ours.summary()["ttft_p99_s"] / theirs.summary()["ttft_p99_s"], 3
        ),
        "tokens_per_s_ratio_vllm_over_transformers": round(ours.tokens_per_s / base.tokens_per_s, 2) if base else None,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "requests": args.requests,
    }
    print(json.dumps(result, indent=1))
    print(
        f"output tokens/s llmctl / vllm serve: {result['tokens_per_s_ratio_llmctl_over_vllm_serve']:.3f} (goal >= 0.90)  "
        f"TTFT p50 ratio {result['ttft_p50_ratio_llmctl_over_vllm_serve']:.2f}, "
        f"p99 ratio {result['ttft_p99_ratio_llmctl_over_vllm_serve']:.2f}"
        + (
            f"  vLLM / transformers tokens/s: {result['tokens_per_s_ratio_vllm_over_transformers']:.1f}x"
            if base
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
