"""Serving overhead: the Ray Serve stack against direct model calls, and p99 during a rollout.

Prints two ratios, both measured in this run on this machine:
  1. requests/s through HTTP -> Serve proxy -> router -> one model replica, over requests/s of
     the same engine called directly in one process (same prompts, same concurrency);
  2. p99 latency while a rollout moves traffic 10% -> 50% -> 100% to a new version, over the
     p99 of the same traffic in steady state.

    python benchmarks/serve_overhead.py [--model DIR] [--requests 300] [--concurrency 4]

Both sides serve with vLLM's async engine (the CPU build without a GPU). Without --model it
builds a tiny random LlamaForCausalLM and a byte-level BPE tokenizer trained on a few
Japanese lines (a second seed for the rollout's candidate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_common import TEXT, tiny_model  # noqa: E402

from controlplane.procs import free_port  # noqa: E402


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

    # 1. Direct calls: the same engine (vLLM's AsyncLLM), same concurrency, one process.
    import asyncio

    from jobs.serve.engine import load_engine
    from jobs.serve.responder import Responder

    engine = load_engine(model_a, "vllm")
    responder = Responder(engine, "direct")

    async def direct() -> float:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)

        async def client() -> None:
            while not queue.empty():
                await responder.complete("completions", {"prompt": queue.get_nowait(), "max_tokens": args.max_tokens})

        await responder.complete("completions", {"prompt": "warm", "max_tokens": args.max_tokens})
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        return len(prompts) / (time.perf_counter() - t0)

    direct_rps = asyncio.run(direct())
    engine.shutdown()

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
