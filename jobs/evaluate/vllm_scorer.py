"""Scoring with vLLM, used where `vllm` imports (as lm-evaluation-harness's vLLM backend does).

- Choices: one request per (prompt, choice) with `prompt_logprobs=1` and `max_tokens=1`;
  the choice's log-likelihood is the sum of the prompt log-probs over its tokens. Prefix
  caching computes the prompt shared by the five choices (and the description) once.
- The model runs in its saved dtype (config.json) unless told otherwise.
- Generation: greedy (`temperature=0`), stopped at a token that holds a newline, capped per
  item, decoded from the token ids as the transformers scorer does. Like the community
  harness, the end-of-text token neither stops it nor is hidden from the answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from jobs.evaluate.hf_scorer import ChoiceRequest, GenRequest, newline_token_ids


def saved_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint was saved in: vLLM's own "auto" would run a float32 model in 16 bits."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    value = config.get("dtype") or config.get("torch_dtype")  # renamed in transformers 5.x
    return value if value in ("float32", "bfloat16", "float16") else "auto"


def available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # an install that cannot load (no backend for this host) counts as absent
        return False
    return True


class VLLMScorer:
    engine = "vllm"

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "auto",
        max_model_len: int | None = None,
        memory_fraction: float | None = None,
    ) -> None:
        """`memory_fraction`: of the GPU (or, on vLLM's CPU backend, of host memory) to reserve."""
        from vllm import LLM

        dtype = saved_dtype(model_dir) if dtype == "auto" else dtype
        kwargs: dict = {"max_model_len": max_model_len} if max_model_len else {}
        if memory_fraction:
            kwargs["gpu_memory_utilization"] = memory_fraction
        self.llm = LLM(model=str(model_dir), dtype=dtype, enable_prefix_caching=True, seed=0, **kwargs)
        self.tok = self.llm.get_tokenizer()
        config = self.llm.llm_engine.model_config
        self.max_len = int(config.max_model_len)
        self.dtype = str(config.dtype).removeprefix("torch.")

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in one call (the tokenizer batches them)."""
        return self.tok(list(texts), add_special_tokens=False).input_ids if texts else []

    def choice_logprobs(self, requests: Sequence[ChoiceRequest]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        flat = [(p, c) for p, cs in requests for c in cs]
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p + c) for p, c in flat], params, use_tqdm=False)
        sums = []
        for (p, c), o in zip(flat, outs, strict=True):
            lps = o.prompt_logprobs
            sums.append(sum(lps[len(p) + i][t].logprob for i, t in enumerate(c)))
        out, at = [], 0
        for _, cs in requests:
            out.append(sums[at : at + len(cs)])
            at += len(cs)
        return out

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        stops = sorted(newline_token_ids(self.tok))
        params = [
            SamplingParams(temperature=0, max_tokens=cap, stop_token_ids=stops, ignore_eos=True, detokenize=False)
            for _, cap in requests
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests], params, use_tqdm=False)
        return [self.tok.decode(list(o.outputs[0].token_ids)) for o in outs]

    def sum_nll(self, windows: Sequence[Sequence[int]]) -> float:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(w)) for w in windows], params, use_tqdm=False)
        return -sum(
            o.prompt_logprobs[i][t].logprob for w, o in zip(windows, outs, strict=True) for i, t in enumerate(w) if i
        )

    def close(self) -> None:
        """Stop vLLM's engine core and its workers now, not at interpreter exit."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
