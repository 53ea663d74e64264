"""Overhead of the pretraining job: tokens/s on ONE Ray worker vs a plain torch loop.

Both sides train the same model (built by the job's own code, same seed) on the same
batches with the same optimizer, clipping and LR schedule, with the same number of torch
threads. The job runs through its real entrypoint (`python -m jobs.pretrain`) on a local
Ray instance, with its heartbeats, events, metrics endpoint and (async) checkpoints; its
throughput is read from its own `step` events. The baseline is measured before and after
the job and averaged, so a noisy machine hurts both sides alike. Goal: ratio >= 0.95.

With `--zero-stage S --workers N` (S >= 1) the job runs FSDP2 on N Ray workers and the baseline
is a plain torch FSDP2 loop in N processes (gloo): the same `fully_shard` layout, model, batches
(each rank its share of the global batch), optimizer, clipping and schedule, without Ray,
heartbeats, events or checkpoints.

    python benchmarks/train_overhead.py [--preset tiny] [--seq-len 128] [--batch 16] [--steps 120] [--rounds 3]
    python benchmarks/train_overhead.py --zero-stage 3 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_loop(run, dataset: Path, steps: int, warmup: int, threads: int) -> float:
    import torch
    import torch.nn.functional as F

    from controlplane.data import read_meta
    from jobs.pretrain import state as st
    from jobs.pretrain.dataset import TrainData

    torch.set_num_threads(threads)
    meta = read_meta(dataset)
    train = run.train
    dims = run.model.resolve(vocab_size=meta["vocab_size"], max_seq_len=train.seq_len)
    model = st.build_model(st.llama_config(dims, meta["bos_id"], meta["eos_id"]), run.seed, torch.device("cpu"))
    opt, sched = st.build_optimizer(model, run, train.steps)
    plan = TrainData([(dataset, 1.0)], train.seq_len, train.global_batch_size, run.seed)
    t0 = 0.0
    for i in range(steps):
        if i == warmup:
            t0 = time.perf_counter()
        batch = torch.from_numpy(plan.batch(i, 0, 1))
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.schedule.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return (steps - warmup) * train.tokens_per_step / (time.perf_counter() - t0)


def _fsdp_rank(rank: int, world: int, port: int, run_json: dict, dataset: str, steps: int, warmup: int, out) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from controlplane.data import read_meta
    from controlplane.spec import RunSpec
    from jobs.pretrain import parallelize as pz
    from jobs.pretrain import state as st
    from jobs.pretrain.dataset import TrainData

    run = RunSpec.model_validate(run_json)
    torch.set_num_threads(int(run.workers.cpus_per_worker))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    meta, train = read_meta(dataset), run.train
    dims = run.model.resolve(vocab_size=meta["vocab_size"], max_seq_len=train.seq_len)
    par = run.parallelism
    model = pz.build(st.llama_config(dims, meta["bos_id"], meta["eos_id"]), run.seed, torch.device("cpu"), par,
                     pz.data_mesh(world, par, "cpu"))  # fmt: skip
    params = list(model.parameters())
    opt, sched = st.build_optimizer(model, run, train.steps)
    plan = TrainData([(Path(dataset), 1.0)], train.seq_len, train.global_batch_size, run.seed)
    t0 = 0.0
    for i in range(steps):
        if i == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        batch = torch.from_numpy(plan.batch(i, rank, world))
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        pz.average(loss.detach(), world).item()
        pz.clip_grad_norm(params, train.schedule.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if rank == 0:
        out.put((steps - warmup) * train.tokens_per_step / (time.perf_counter() - t0))
    dist.destroy_process_group()


def plain_fsdp(run, dataset: Path, steps: int, warmup: int) -> float:
    """The plain FSDP2 loop on `num_workers` processes (each with the worker's thread count)."""
    import torch.multiprocessing as mp

    from controlplane.procs import free_port

    world = run.workers.num_workers
    os.environ["OMP_NUM_THREADS"] = str(int(run.workers.cpus_per_worker))
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    args = (world, free_port(), run.model_dump(mode="json"), str(dataset), steps, warmup, out)
    mp.start_processes(_fsdp_rank, args=args, nprocs=world, join=True, start_method="spawn")
    return float(out.get())


def plain_subprocess(run, dataset: Path, steps: int, warmup: int, threads: int) -> float:
    """The plain loop in a fresh process with the thread settings a Ray worker gets (OMP_NUM_THREADS)."""
    if run.parallelism.zero_stage >= 1:
        return plain_fsdp(run, dataset, steps, warmup)
    code = (
        "import sys, json; from pathlib import Path; from controlplane.spec import RunSpec; "
        "from benchmarks.train_overhead import plain_loop; a = json.loads(sys.argv[1]); "
        "print(plain_loop(RunSpec.model_validate(a['run']), Path(a['dataset']), a['steps'], a['warmup'], a['threads']))"
    )
    arg = json.dumps(
        {
            "run": run.model_dump(mode="json"),
            "dataset": str(dataset),
            "steps": steps,
            "warmup": warmup,
            "threads": threads,
        }
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-c", code, arg], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    return float(proc.stdout.strip().splitlines()[-1])


def job_run(run, dataset: Path, work: Path, steps: int, warmup: int, address: str) -> float:
    from controlplane.rundir import RunDir
    from controlplane.spec import ClusterSpec

    rd = RunDir(work / "runs" / "bench").create()
    rd.write_spec(
        {
            "run_id": "bench",
            "run": run.model_dump(mode="json"),
            "cluster": ClusterSpec().model_dump(mode="json"),
            "dataset_dir": str(dataset),
        }
    )
    rd.set_fence(1)
    env = dict(os.environ, RAY_ADDRESS=address)
    cmd = [sys.executable, "-m", "jobs.pretrain", "--run-dir", str(rd.path), "--attempt", "1"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    ev = {e["step"]: e for e in rd.events({"step"})}
    a, b = ev[warmup], ev[steps]
    return (b["tokens"] - a["tokens"]) / (b["ts"] - a["ts"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="Interleaved job/plain measurements (medians compared).")
    p.add_argument("--dataset", help="A prepared dataset directory (default: prepare a small manpages-ja one).")
    args = p.parse_args()

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    import ray

    from controlplane.data import prepare
    from controlplane.spec import RunSpec

    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        work = Path(tmp)
        dataset = Path(args.dataset) if args.dataset else work / "data"
        if not args.dataset:
            prepare("manpages-ja", dataset, vocab_size=4096, seed=0)
        run = RunSpec.model_validate(
            {
                "name": "bench",
                "model": {"preset": args.preset},
                "train": {"max_steps": args.steps, "seq_len": args.seq_len, "global_batch_size": args.batch},
                "workers": {"num_workers": args.workers, "cpus_per_worker": args.threads},
                "parallelism": {"zero_stage": args.zero_stage},
                "checkpoint": {"interval_steps": 10 * args.steps},
            }
        )
        plain, job = [plain_subprocess(run, dataset, args.steps, args.warmup, args.threads)], []
        ctx = ray.init(
            address="local", num_cpus=args.workers * args.threads + 1, include_dashboard=False, log_to_driver=False
        )
        try:
            for i in range(args.rounds):  # interleaved, so drifting machine load hits both sides
                job.append(
                    job_run(run, dataset, work / f"r{i}", args.steps, args.warmup, ctx.address_info["gcs_address"])
                )
                plain.append(plain_subprocess(run, dataset, args.steps, args.warmup, args.threads))
        finally:
            ray.shutdown()
    base, mine = statistics.median(plain), statistics.median(job)
    # Each job run against the plain runs just before and after it: drift cancels pair by pair.
    pairs = [j / ((plain[i] + plain[i + 1]) / 2) for i, j in enumerate(job)]
    layout = f"zero_stage {args.zero_stage}, {args.workers} worker(s)"
    print(f"model {args.preset}, seq_len {args.seq_len}, batch {args.batch}, {args.threads} thread(s), {layout}")
    print(f"plain torch loop : {base:10.1f} tokens/s  (median of {[round(x) for x in plain]})")
    print(f"job on Ray       : {mine:10.1f} tokens/s  (median of {[round(x) for x in job]})")
    print(f"ratio job/plain  : {mine / base:.3f}  (goal >= 0.95)")
    print(f"paired ratios    : {', '.join(f'{r:.3f}' for r in pairs)}  (median {statistics.median(pairs):.3f})")


if __name__ == "__main__":
    main()
