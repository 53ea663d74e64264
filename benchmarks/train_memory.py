"""Memory per worker: zero_stage 0 vs 3 on 2 CPU workers (gloo), and the planner against it.

    python benchmarks/train_memory.py [--hidden 512 --layers 8]

Each of 2 processes builds the model with the job's own code (`parallelize.build`,
`state.build_optimizer`), trains two steps the way the worker does (stage 3 reduce-scatters
in backward) and, after the second backward, before the optimizer step, counts what it holds:
the local storage of its parameters, gradients and AdamW state (model+grads+optimizer), and
its peak resident memory over the process's baseline after imports. Printed: both figures per
worker for each stage, the ratio stage 3 / stage 0 (expect ~0.5 on 2 workers), and the
planner's `memory_per_gpu` (weights + gradients + optimizer, fp32 compute on a CPU) against
the counted bytes (goal: within 15%). The planner's stage-3 figure includes the two decoder
layers held unsharded while they compute, which the count after backward no longer sees.
The workers run with MALLOC_MMAP_THRESHOLD_=65536 (see the end of this file). Peak RSS also
holds activations, the loss's logits and AdamW's foreach temporaries, which sharding does not
divide, so its ratio sits above the state's.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from controlplane.procs import free_port  # noqa: E402
from controlplane.spec import ModelSpec, ParallelismSpec, RunSpec  # noqa: E402

WORLD = 2


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(rank: int, port: int, stage: int, dims_kw: dict, seq: int, micro: int, out: dict) -> None:
    from jobs.pretrain import llama  # noqa: F401 (imported before the baseline)
    from jobs.pretrain import parallelize as pz
    from jobs.pretrain import state as st

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dims = ModelSpec(preset=None, **dims_kw).resolve(max_seq_len=seq)
    par = ParallelismSpec(zero_stage=stage)
    model = pz.build(st.llama_config(dims), 0, torch.device("cpu"), par, pz.data_mesh(WORLD, par, "cpu"))
    run = RunSpec.model_validate({"train": {"max_steps": 10}, "parallelism": {"zero_stage": stage}})
    opt, _ = st.build_optimizer(model, run, 10)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(rank)
    counted = 0
    for step in range(2):
        x = torch.randint(0, dims.vocab_size, (micro, seq + 1), generator=gen)
        logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        if stage == 0:  # the worker's replicated path: one flat all-reduce of the gradients
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        if step == 1:
            counted = sum(local_bytes(p) + local_bytes(p.grad) for p in params)
            counted += sum(local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    out[(stage, rank)] = (counted, peak)
    dist.destroy_process_group()


def main() -> None:
    from controlplane.planning.plan import memory_per_gpu

    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2)
    a = ap.parse_args()
    dims_kw = dict(
        hidden_size=a.hidden, num_layers=a.layers, num_heads=8, ffn_size=a.hidden * 8 // 3 // 8 * 8, vocab_size=a.vocab
    )
    dims = ModelSpec(preset=None, **dims_kw).resolve(max_seq_len=a.seq)
    print(f"model: {dims.param_count() / 1e6:.1f}M parameters, {WORLD} CPU workers (gloo), fp32")
    manager = mp.Manager()
    out = manager.dict()
    for stage in (0, 3):
        mp.spawn(worker, args=(free_port(), stage, dims_kw, a.seq, a.micro, out), nprocs=WORLD, join=True)
    result = {}
    for stage in (0, 3):
        counted = max(out[(stage, r)][0] for r in range(WORLD))
        peak = max(out[(stage, r)][1] for r in range(WORLD))
        mem = memory_per_gpu(dims, ParallelismSpec(zero_stage=stage), WORLD, a.seq, a.micro, 1, 0.0, compute_bytes=4)
        predicted = mem["weights"] + mem["gradients"] + mem["optimizer"]
        result[stage] = (counted, peak)
        print(
            f"zero_stage {stage}: model+grads+optimizer {counted / 1e6:8.1f} MB per worker, peak RSS +{peak / 1e6:8.1f} MB;"
            f" planner {predicted / 1e6:8.1f} MB = {predicted / counted:.3f} x counted"
        )
    print(f"ratio zero_stage 3 / 0: model+grads+optimizer {result[3][0] / result[0][0]:.3f}, "
          f"peak RSS {result[3][1] / result[0][1]:.3f}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Large blocks straight from mmap, so a freed block leaves the resident set at once: with glibc's
    # adaptive threshold the per-layer all-gather buffers of stage 3 fragment the heap, and the RSS
    # peak then measures the allocator rather than what the worker holds.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    main()
