"""Inference engines: vLLM when it and a GPU are present, `transformers` generation otherwise.

`load_engine(model_dir, engine="auto")` picks one and says why; asking for vLLM where it
cannot run is an error that names what is missing, never a silent fallback.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

from jobs.serve.openai import Completion, CompletionRequest, apply_stop


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run here; the message says what is missing."""


class Engine(Protocol):
    name: str
    device: str

    def complete(self, req: CompletionRequest) -> list[Completion]: ...


def vllm_status() -> tuple[bool, str]:
    """Whether vLLM can serve here, and if not, plainly why."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False, "vLLM is not installed (pip install vllm on a GPU node)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "vLLM is installed but no CUDA GPU is visible"
    except ImportError:
        return False, "torch is not installed"
    return True, "vLLM and a CUDA GPU are present"


class TransformersEngine:
    """Greedy or sampled generation with `transformers` on CPU or one GPU."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, device: str = "auto", threads: int | None = None):
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

    def complete(self, req: CompletionRequest) -> list[Completion]:
        return [self._one(p, req) for p in req.prompts]

    def _one(self, prompt: str, req: CompletionRequest) -> Completion:
        torch = self.torch
        ids = self.tok(prompt, add_special_tokens=False).input_ids or [self.tok.eos_token_id]
        budget = max(1, min(req.max_tokens, self.max_len - 1))
        ids = ids[-(self.max_len - budget) :]
        x = torch.tensor([ids], device=self.device)
        kwargs = {"max_new_tokens": budget, "pad_token_id": self.pad_id, "attention_mask": torch.ones_like(x)}
        if req.temperature > 0:
            if req.seed is not None:
                torch.manual_seed(req.seed)
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        else:
            kwargs.update(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(x, **kwargs)
        new = out[0, len(ids) :].tolist()
        eos = self.tok.eos_token_id
        hit_eos = eos is not None and eos in new
        if hit_eos:
            new = new[: new.index(eos)]
        text, hit_stop = apply_stop(self.tok.decode(new, skip_special_tokens=True), req.stop)
        reason = "stop" if hit_eos or hit_stop else "length"
        return Completion(text, len(ids), len(new), reason)


class VllmEngine:
    """vLLM's offline engine on one GPU; requests are serialised through one engine."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, gpu_memory_utilization: float = 0.85):
        ok, why = vllm_status()
        if not ok:
            raise EngineUnavailable(why)
        from vllm import LLM

        self.device = "cuda"
        self.llm = LLM(model=str(model_dir), gpu_memory_utilization=gpu_memory_utilization)
        self._lock = threading.Lock()

    def complete(self, req: CompletionRequest) -> list[Completion]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=list(req.stop) or None,
            seed=req.seed,
        )
        with self._lock:
            outs = self.llm.generate(req.prompts, params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            reason = "stop" if c.finish_reason == "stop" else "length"
            results.append(Completion(c.text, len(o.prompt_token_ids), len(c.token_ids), reason))
        return results


def load_engine(model_dir: str | Path, engine: str = "auto", device: str = "auto") -> Engine:
    """`engine`: 'auto' (vLLM if it and a GPU are present), 'vllm' (required), 'transformers'."""
    if not (Path(model_dir) / "config.json").is_file():
        raise EngineUnavailable(f"{model_dir}: not a model directory (no config.json)")
    if engine == "vllm":
        return VllmEngine(model_dir)
    if engine == "auto" and vllm_status()[0]:
        return VllmEngine(model_dir)
    if engine not in ("auto", "transformers"):
        raise EngineUnavailable(f"engine {engine!r}: expected auto, vllm or transformers")
    threads = int(os.environ.get("LLMCTL_SERVE_THREADS", "1"))
    return TransformersEngine(model_dir, device, threads=threads)
