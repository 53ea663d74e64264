"""The 13b preset on one GPU: llmctl's serving (on vLLM) against `vllm serve`, with J/token.

Run through `benchmarks/gpu_serve_check.sh`. The model is the `13b` preset's Llama shape with
random weights (vLLM's `load_format: dummy`: nothing to download or write, bf16 on the GPU) and a
byte-level BPE tokenizer padded to the preset's 32,000 entries. Each server in turn gets the same
closed-loop streamed load; NVML's energy counter (or integrated power) over the load gives J/token.
Prints tokens/s, TTFT p50/p99 and J/token of each, and the llmctl / vllm-serve ratios.

    benchmarks/gpu_serve_check.sh [--requests 128] [--concurrency 32] [--max-tokens 128] [--preset 13b]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_telemetry_check import Window  # noqa: E402
from serving_common import TEXT, closed_loop, prompts, start_server, stop_server, vllm_server_cmd  # noqa: E402

from controlplane.procs import free_port  # noqa: E402
from controlplane.spec.run import PRESET_DEFAULT_VOCAB, PRESETS  # noqa: E402
from controlplane.telemetry.sampler import STATUS_OK, NvmlSampler, load_nvml  # noqa: E402


def model_dir(out: Path, preset: str) -> Path:
    """config.json of the preset (bf16) and a tokenizer of exactly its vocabulary size; no weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    dims, vocab = PRESETS[preset], PRESET_DEFAULT_VOCAB[preset]
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 8, trainer)
    tok.add_tokens([f"<|pad{i}|>" for i in range(vocab - tok.get_vocab_size())])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=dims["hidden_size"],
        intermediate_size=dims["ffn_size"],
        num_hidden_layers=dims["num_layers"],
        num_attention_heads=dims["num_heads"],
        num_key_value_heads=dims["num_kv_heads"],
        max_position_embeddings=dims["max_seq_len"],
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(out)
    return out


def measure(name, cmd, port, url, model, texts, args, sampler, work) -> dict:
    t0 = time.monotonic()
    proc = start_server(cmd, port, work / f"{name}.log")
    startup = time.monotonic() - t0
    try:
        closed_loop(url, texts[: args.concurrency], args.concurrency, args.max_tokens, model=model)  # warm-up
        if sampler is not None:
            with Window(sampler, 0.1) as w:
                load = closed_loop(url, texts, args.concurrency, args.max_tokens, model=model)
            joules = w.joules
        else:
            load, joules = closed_loop(url, texts, args.concurrency, args.max_tokens, model=model), None
    finally:
        stop_server(proc)
    out = {**load.summary(), "startup_s": round(startup, 1)}
    out["joules_per_token"] = round(joules / load.output_tokens, 4) if joules and load.output_tokens else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="13b", choices=sorted(PRESETS))
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    args = ap.parse_args()

    sampler = None
    nvml = load_nvml()
    probe = NvmlSampler(nvml, indices=[0], watch_events=False)
    if probe.open() == STATUS_OK:
        sampler = probe
        g = sampler.sample().gpus[0]
        print(f"GPU 0: {g.name}, power limit {g.power_limit_w} W, energy source {g.energy_source}", flush=True)
    else:
        print(f"gpu_serve_check: no NVML ({probe.message}): J/token not measured", flush=True)

    work = Path(tempfile.mkdtemp(prefix="gpu-serve-check-"))
    model = model_dir(work / "model", args.preset)
    texts = prompts(args.requests)
    common = ["--max-num-seqs", str(args.max_num_seqs), "--load-format", "dummy"]

    port = free_port()
    ours = measure(
        "llmctl",
        [sys.executable, "-m", "jobs.serve", "standalone", "--model-dir", str(model), "--version", "v13b"]
        + ["--port", str(port), "--engine", "vllm", *common],
        port,
        f"http://127.0.0.1:{port}/v1/completions",
        None,
        texts,
        args,
        sampler,
        work,
    )
    print(f"llmctl: {json.dumps(ours)}", flush=True)
    port = free_port()
    theirs = measure(
        "vllm-serve",
        vllm_server_cmd(sys.executable, model, "v13b", port, "--disable-log-stats", *common),
        port,
        f"http://127.0.0.1:{port}/v1/completions",
        "v13b",
        texts,
        args,
        sampler,
        work,
    )
    print(f"vllm serve: {json.dumps(theirs)}", flush=True)
    if sampler is not None:
        sampler.close()

    def ratio(key: str) -> float | None:
        a, b = ours.get(key), theirs.get(key)
        return round(a / b, 3) if a and b else None

    print(
        f"{args.preset} on one GPU, {args.requests} requests x {args.max_tokens} tokens at concurrency {args.concurrency}:\n"
        f"  tokens/s  llmctl {ours['output_tokens_per_s']}  vllm serve {theirs['output_tokens_per_s']}  "
        f"ratio {ratio('output_tokens_per_s')} (goal >= 0.90)\n"
        f"  TTFT p50  llmctl {ours['ttft_p50_s']} s  vllm serve {theirs['ttft_p50_s']} s  ratio {ratio('ttft_p50_s')}\n"
        f"  TTFT p99  llmctl {ours['ttft_p99_s']} s  vllm serve {theirs['ttft_p99_s']} s  ratio {ratio('ttft_p99_s')}\n"
        f"  J/token   llmctl {ours['joules_per_token']}  vllm serve {theirs['joules_per_token']}  "
        f"ratio {ratio('joules_per_token')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
