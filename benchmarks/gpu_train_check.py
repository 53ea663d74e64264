"""bf16 FSDP2 training on one GPU with the job's own build (see gpu_train_check.sh).

For each model: tokens/s and MFU over timed steps (after warm-up), peak allocated memory
against the planner's weights + gradients + optimizer + activations + logits, and the time a
step is blocked by an async DCP save (copy to pinned host memory) vs a synchronous one, as a
ratio. One rank (a 1-GPU NCCL group): the sharding degree is 1, so this measures the compute
path (bf16 parameters, fp32 reduction, activation checkpointing off), not communication.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from controlplane.planning.plan import flops_per_token, memory_per_gpu
from controlplane.procs import free_port
from controlplane.spec import ModelSpec, ParallelismSpec, RunSpec
from jobs.pretrain import parallelize as pz
from jobs.pretrain import sharded
from jobs.pretrain import state as st
from jobs.pretrain.metrics import peak_flops


def check(name: str, dims_kw: dict, seq: int, micro: int, steps: int) -> None:
    dims = ModelSpec(**dims_kw).resolve(max_seq_len=seq)
    par = ParallelismSpec(zero_stage=3)
    device = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats()
    model = pz.build(st.llama_config(dims), 0, device, par, pz.data_mesh(1, par, "cuda"), "bf16")
    run = RunSpec.model_validate({"train": {"max_steps": 100}, "parallelism": {"zero_stage": 3}})
    opt, _ = st.build_optimizer(model, run, 100)
    params = list(model.parameters())

    def step() -> None:
        x = torch.randint(0, dims.vocab_size, (micro, seq + 1), device=device)
        logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        pz.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tps = micro * seq / dt
    peak = peak_flops(torch.cuda.get_device_name(0))
    mfu = flops_per_token(dims, seq) * tps / peak if peak else float("nan")
    mem = memory_per_gpu(dims, par, 1, seq, micro, 1, 0.0)
    predicted = sum(v for k, v in mem.items() if k != "reserve")
    measured = torch.cuda.max_memory_allocated()
    print(
        f"{name}: {dims.param_count() / 1e9:.2f}B params, {tps:,.0f} tokens/s, MFU {mfu:.3f}; "
        f"peak allocated {measured / 1e9:.2f} GB, planner {predicted / 1e9:.2f} GB = {predicted / measured:.3f} x"
    )
    with tempfile.TemporaryDirectory() as tmp:
        group = dist.new_group(backend="gloo")
        blocked = {}
        for mode in (True, False):
            staging = Path(tmp) / f"s{int(mode)}"
            t0 = time.perf_counter()
            pending = sharded.start_save(staging, model, opt, group, async_save=mode, fail_enospc=False, step=1)
            blocked[mode] = time.perf_counter() - t0
            if pending.future is not None:
                pending.future.result()
        print(f"{name}: DCP save blocking async {blocked[True]:.3f} s vs sync {blocked[False]:.3f} s, "
              f"ratio {blocked[True] / blocked[False]:.3f}")  # fmt: skip
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the 13B-shaped model")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    check("small", {"preset": "small", "vocab_size": 8192}, 512, 16, a.steps)
    check("13b-cut", {"preset": "13b", "num_layers": a.layers, "vocab_size": 32000}, 4096, 1, a.steps)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
