"""Recovery: crash-to-first-step time of llmctl next to Ray Train's default restart.

    python benchmarks/recovery.py [--steps 24] [--kill-at 10] [--interval 8] [--spares 1]

The llmctl runs are repeated with `zero_stage: 3` (FSDP2, sharded DCP checkpoints): tier 1
there reloads the newest verified checkpoint in place (the dead rank's shards are in no
survivor's memory), and the sharded saves give the DCP async vs sync blocking ratio.

Everything runs in this invocation, on one local Ray cluster (token auth on), with the same
tiny Llama model (`jobs/pretrain/llama.py`, `tiny` preset), 2 CPU workers, the same
global batch and sequence length:

- llmctl, tier 1: a worker is SIGKILLed at step K (the job's `kill_worker` drill); the job
  replaces it in-attempt from a survivor's memory. Crash = the drill's `fault_injected` event;
  first step = the first `step` event after the job saw the failure (steps already in flight
  may still complete between the two).
- llmctl, tier 2: the job driver exits at step K (`exit_driver` drill); the supervisor
  submits attempt 2, which resumes from the newest verified checkpoint.
- Ray Train (baseline): `ray.train.torch.TorchTrainer` with `FailureConfig(max_failures=2)`,
  rank 1 SIGKILLs itself at step K; Ray Train restarts the worker group and restores the
  last reported checkpoint (the kill waits 3 s so that checkpoint is registered). Crash = the
  moment before the kill; first step = the first step completed after the restart.

It also prints the checkpoint blocking ratio, from the two llmctl runs' `checkpoint` events
(same model, same state): the time training was blocked per save with `async_save` (staging
at the step boundary plus the optimizer step's wait for the host copy) over a synchronous
save (the whole write, from the live tensors), and the step time of the steps that ran
while an async save was being written over the other steps (what the background write cost
the training it overlapped; on these shared CPU cores it competes for them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controlplane import ray_cluster  # noqa: E402
from controlplane.context import Context  # noqa: E402
from controlplane.runs import create_run  # noqa: E402
from controlplane.spec import ClusterSpec, RunSpec, StorageSpec  # noqa: E402
from controlplane.supervisor.loop import Supervisor  # noqa: E402


def run_spec(
    name: str, args: argparse.Namespace, *, async_save: bool, fault: dict, spares: int = 0, stage: int = 0
) -> RunSpec:
    return RunSpec.model_validate(
        {
            "name": name,
            "model": {"preset": "tiny"},
            "train": {"max_steps": args.steps, "global_batch_size": 8, "seq_len": 64, "schedule": {"warmup_steps": 4}},
            "workers": {"num_workers": 2, "spare_workers": spares},
            "checkpoint": {"interval_steps": args.interval, "keep_last": 3, "async_save": async_save},
            "fault_tolerance": {"backoff_initial_s": 0.0, "hang_timeout_min_s": 60},
            "faults": [fault],
            "parallelism": {"zero_stage": stage},
            "seed": 5,
        }
    )


def supervise(ctx: Context, run_id: str, timeout_s: float = 600) -> str:
    sup = Supervisor(ctx)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            sup.reconcile_run(run_id)
            state = ctx.ledger.get_run(run_id)["state"]
            if state in ("succeeded", "failed", "stopped"):
                return state
            time.sleep(0.2)
    finally:
        sup.close()
    raise SystemExit(f"run {run_id} did not end within {timeout_s:.0f}s")


def first_step_after(events: list[dict], t: float, attempt: int | None = None) -> float:
    return min(
        e["ts"] for e in events if e["type"] == "step" and e["ts"] > t and (attempt is None or e["attempt"] == attempt)
    )


def llmctl_tier1(ctx: Context, args: argparse.Namespace, stage: int = 0) -> tuple[float, list[dict]]:
    fault = {"kind": "kill_worker", "at_step": args.kill_at, "rank": 1, "attempt": 1}
    spec = run_spec(f"bench-tier1-z{stage}", args, async_save=True, fault=fault, spares=args.spares, stage=stage)
    rd = create_run(ctx, spec)
    state = supervise(ctx, rd.run_id)
    events = rd.events()
    if state != "succeeded":
        raise SystemExit(f"llmctl tier-1 run {state}")
    t_kill = next(e["ts"] for e in events if e["type"] == "fault_injected")
    # steps already in flight may still complete after the kill: count from the detection
    t_seen = min(e["ts"] for e in events if e["type"] == "failure" and e["ts"] >= t_kill)
    return first_step_after(events, t_seen) - t_kill, events


def llmctl_tier2(ctx: Context, args: argparse.Namespace, stage: int = 0) -> tuple[float, list[dict]]:
    fault = {"kind": "exit_driver", "at_step": args.kill_at, "attempt": 1}
    rd = create_run(ctx, run_spec(f"bench-tier2-z{stage}", args, async_save=False, fault=fault, stage=stage))
    state = supervise(ctx, rd.run_id)
    events = rd.events()
    if state != "succeeded":
        raise SystemExit(f"llmctl tier-2 run {state}")
    t_crash = max(e["ts"] for e in events if e["attempt"] == 1 and e["type"] != "heartbeat")
    return first_step_after(events, t_crash, attempt=2) - t_crash, events


def ray_train_loop(cfg: dict) -> None:
    import signal
    import tempfile as tf

    import torch
    import torch.nn.functional as F
    from ray import train
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    from controlplane.spec import LlamaDims
    from jobs.pretrain.state import build_model, llama_config

    rank = train.get_context().get_world_rank()
    world = train.get_context().get_world_size()
    torch.set_num_threads(1)
    dims = LlamaDims(**cfg["dims"])
    model = prepare_model(build_model(llama_config(dims), cfg["seed"], torch.device("cpu")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, restored = 0, train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        model.module.load_state_dict(state["model"]) if hasattr(model, "module") else model.load_state_dict(
            state["model"]
        )
        opt.load_state_dict(state["opt"])
        start = state["step"]
    marker, first = Path(cfg["marker"]), Path(cfg["first"])
    after_crash = marker.exists()  # this is the restarted worker group
    per_rank = cfg["global_batch"] // world
    gen = torch.Generator().manual_seed(cfg["seed"] + rank)
    for step in range(start + 1, cfg["steps"] + 1):
        if rank == 1 and step == cfg["kill_at"] and not marker.exists():
            time.sleep(3.0)  # let Ray Train register the last reported checkpoint before the crash
            marker.write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        batch = torch.randint(0, dims.vocab_size, (per_rank, cfg["seq_len"] + 1), generator=gen)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_crash and rank == 0 and not first.exists():
            first.write_text(json.dumps({"ts": time.time(), "resumed_from": start}))
        metrics = {"step": step, "loss": float(loss)}
        if step % cfg["interval"] == 0 and rank == 0:
            with tf.TemporaryDirectory() as d:
                inner = model.module if hasattr(model, "module") else model
                torch.save({"model": inner.state_dict(), "opt": opt.state_dict(), "step": step}, Path(d) / "state.pt")
                train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            train.report(metrics)


def ray_train_baseline(cluster: ClusterSpec, args: argparse.Namespace, work: Path) -> float:
    """Run the baseline as a Ray job on the same cluster (as llmctl's job runs) and read its figure."""
    client = ray_cluster.job_client(cluster)
    out = work / "raytrain-result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-out", str(out), "--work", str(work)]
    cmd += ["--steps", str(args.steps), "--kill-at", str(args.kill_at), "--interval", str(args.interval)]
    sid = client.submit_job(
        entrypoint=" ".join(cmd), runtime_env=ray_cluster.runtime_env(cluster), entrypoint_num_cpus=0
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = str(client.get_job_status(sid).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1.0)
    if not out.exists():
        raise SystemExit(f"Ray Train baseline job {status}:\n{client.get_job_logs(sid)[-3000:]}")
    result = json.loads(out.read_text())
    print(f"# Ray Train: {result}", file=sys.stderr)
    return result["recovery_s"]


def ray_train_job(args: argparse.Namespace) -> int:
    """Inside the Ray job: TorchTrainer with FailureConfig; rank 1 SIGKILLs itself at --kill-at."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    work = Path(args.work)
    ray.init(log_to_driver=False)
    spec = run_spec("bench-raytrain", args, async_save=False, fault={"kind": "kill_worker", "at_step": 1})
    dims = spec.model.resolve(vocab_size=512, max_seq_len=spec.train.seq_len)
    cfg = {
        "dims": dims.model_dump(),
        "seed": spec.seed,
        "steps": args.steps,
        "kill_at": args.kill_at,
        "interval": args.interval,
        "global_batch": spec.train.global_batch_size,
        "seq_len": spec.train.seq_len,
        "marker": str(work / "raytrain-kill"),
        "first": str(work / "raytrain-first-step"),
    }
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name="recovery-baseline",
            storage_path=str(work / "raytrain"),
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    first = json.loads((work / "raytrain-first-step").read_text())
    recovery = first["ts"] - float((work / "raytrain-kill").read_text())
    Path(args.baseline_out).write_text(json.dumps({"recovery_s": recovery, "resumed_from": first["resumed_from"]}))
    return 0


def blocking(events: list[dict], field: str = "blocking_s") -> float:
    """Median seconds training was blocked per checkpoint (or another of the events' timings)."""
    cks = [e for e in events if e["type"] == "checkpoint"]
    if not cks:
        raise SystemExit("no checkpoint events")
    return statistics.median(e[field] for e in cks)


def overlap_slowdown(events: list[dict]) -> float:
    """Median step time of the step right after each save over that of the other steps (attempt 1)."""
    saved = {e["step"] for e in events if e["type"] == "checkpoint" and e["attempt"] == 1}
    steps = {e["step"]: e["step_time_s"] for e in events if e["type"] == "step" and e["attempt"] == 1}
    after = [t for s, t in steps.items() if s - 1 in saved]
    others = [t for s, t in steps.items() if s - 1 not in saved and s > 2]
    if not after or not others:
        raise SystemExit("not enough step events to compare")
    return statistics.median(after) / statistics.median(others)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--kill-at", type=int, default=10)
    ap.add_argument("--interval", type=int, default=8)
    ap.add_argument("--spares", type=int, default=1, help="warm spare workers in the tier-1 run (0: a new actor)")
    ap.add_argument("--baseline-out", help=argparse.SUPPRESS)  # set when running as the baseline's Ray job
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_out:
        return ray_train_job(args)
    work = Path(tempfile.mkdtemp(prefix="llmctl-bench-recovery-"))
    os.environ["LLMCTL_HOME"] = str(work)
    cluster = ClusterSpec(storage=StorageSpec(root=str(work)))
    ctx = Context(cluster)
    print(f"# local Ray cluster under {work}", file=sys.stderr)
    ray_cluster.up(cluster, num_cpus=4, worker_nodes=0)
    try:
        from controlplane.data import prepare

        prepare("manpages-ja", work / "datasets" / "manpages-ja", vocab_size=512, seed=0)
        tier1, ev1 = llmctl_tier1(ctx, args)
        print(f"# llmctl tier 1: {tier1:.2f} s", file=sys.stderr)
        tier2, ev2 = llmctl_tier2(ctx, args)
        print(f"# llmctl tier 2: {tier2:.2f} s", file=sys.stderr)
        z3_tier1, z3_ev1 = llmctl_tier1(ctx, args, stage=3)
        print(f"# llmctl tier 1, zero_stage 3: {z3_tier1:.2f} s", file=sys.stderr)
        z3_tier2, z3_ev2 = llmctl_tier2(ctx, args, stage=3)
        print(f"# llmctl tier 2, zero_stage 3: {z3_tier2:.2f} s", file=sys.stderr)
        base = ray_train_baseline(cluster, args, work)
    finally:
        ray_cluster.down(cluster)
    b_async, b_sync = blocking(ev1), blocking(ev2)
    print(f"crash-to-first-step, worker SIGKILLed at step {args.kill_at} (tiny Llama, 2 CPU workers):")
    print(f"  llmctl tier 1 (in-attempt, {args.spares} warm spare(s))    {tier1:8.2f} s")
    print(f"  llmctl tier 2 (driver died, supervisor resub) {tier2:8.2f} s")
    print(f"  Ray Train TorchTrainer + FailureConfig        {base:8.2f} s   (baseline)")
    print(f"  ratio llmctl tier 1 / Ray Train               {tier1 / base:8.3f}")
    print(f"  ratio llmctl tier 2 / Ray Train               {tier2 / base:8.3f}")
    print(f"  llmctl tier 1, zero_stage 3 (in-place reload)  {z3_tier1:8.2f} s   ratio {z3_tier1 / base:.3f}")
    print(f"  llmctl tier 2, zero_stage 3 (resubmitted)      {z3_tier2:8.2f} s   ratio {z3_tier2 / base:.3f}")
    print("checkpoint: time training is blocked per save (median)")
    print(f"  async (stage, copy overlapped, write behind)  {b_async:8.5f} s")
    print(f"    of which the optimizer step's wait for the copy {blocking(ev1, 'copy_wait_s'):8.5f} s")
    print(f"  synchronous (write from the live state)       {b_sync:8.5f} s   (baseline)")
    print(f"  ratio async / synchronous                     {b_async / b_sync:8.3f}")
    print(f"  step time while an async save is written, vs other steps {overlap_slowdown(ev1):6.3f}")
    z_async, z_sync = blocking(z3_ev1), blocking(z3_ev2)
    print("sharded checkpoint (zero_stage 3, DCP, every rank its shards): blocked per save (median)")
    print(f"  dcp.async_save (copy to host, write behind)   {z_async:8.5f} s")
    print(f"  synchronous DCP save + commit                 {z_sync:8.5f} s   (baseline)")
    print(f"  ratio async / synchronous                     {z_async / z_sync:8.3f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
