"""Overhead of the pretraining job: tokens/s on ONE Ray worker vs a plain torch loop.

Both sides train the same model (built by the job's own code, same seed) on the same
batches with the same optimizer, clipping and LR schedule, with the same number of torch
threads. The job runs through its real entrypoint (`python -m jobs.pretrain`) on a local
Ray instance, with its heartbeats, events, metrics endpoint and (async) checkpoints; its
throughput is read from its own `step` events. The baseline is measured before and after
the job and averaged, so a noisy machine hurts both sides alike. Goal: ratio >= 0.95.

    python benchmarks/train_overhead.py [--preset tiny] [--seq-len 128] [--batch 16] [--steps 120] [--rounds 3]
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


def plain_subprocess(run, dataset: Path, steps: int, warmup: int, threads: int) -> float:
    """The plain loop in a fresh process with the thread settings a Ray worker gets (OMP_NUM_THREADS)."""
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
                "workers": {"num_workers": 1, "cpus_per_worker": args.threads},
                "checkpoint": {"interval_steps": 10 * args.steps},
            }
        )
        plain, job = [plain_subprocess(run, dataset, args.steps, args.warmup, args.threads)], []
        ctx = ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
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
    print(f"model {args.preset}, seq_len {args.seq_len}, batch {args.batch}, {args.threads} thread(s)")
    print(f"plain torch loop : {base:10.1f} tokens/s  (median of {[round(x) for x in plain]})")
    print(f"job, 1 Ray worker: {mine:10.1f} tokens/s  (median of {[round(x) for x in job]})")
    print(f"ratio job/plain  : {mine / base:.3f}  (goal >= 0.95)")
    print(f"paired ratios    : {', '.join(f'{r:.3f}' for r in pairs)}  (median {statistics.median(pairs):.3f})")


if __name__ == "__main__":
    main()
