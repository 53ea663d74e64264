"""A scripted training job for supervisor tests: the job contract without Ray or torch.

    python scripted_job.py --run-dir D --attempt N [--max-resume-step S] [--skip-steps A:B ...]

It keeps to the contract in every way the supervisor can see: fence checks before every
write, start/heartbeat/step/checkpoint/failure/end events, real checkpoints committed with
controlplane.checkpoint (and resumed from the newest verified one), exit codes 0/3/75/1.
What it does per attempt comes from `<run dir>/script.json`:

    {"steps": 30, "interval": 5, "step_s": 0.05,
     "faults": {"1": {"crash_at": 12}, "2": {"nan_at": 9}, "3": {"hang_at": 4, "hang_ranks": [1]}}}

(also `replace_at`: a worker replaced inside the attempt; `die_at`: the driver killed silently;
`start_after_s`: the start event comes that late)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from controlplane import checkpoint as ckpt
from controlplane.rundir import FencedError, RunDir

NODES = ["node-a", "node-b"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--attempt", type=int, required=True)
    ap.add_argument("--max-resume-step", type=int)
    ap.add_argument("--skip-steps", action="append", default=[])
    args = ap.parse_args()
    rd = RunDir(Path(args.run_dir))
    script = json.loads((rd.path / "script.json").read_text())
    fault = script.get("faults", {}).get(str(args.attempt), {})
    n, total, step_s = args.attempt, int(script["steps"]), float(script.get("step_s", 0.05))
    excluded = [x for x in os.environ.get("LLMCTL_EXCLUDE_NODES", "").split(",") if x]
    nodes = [x for x in NODES if x not in excluded] or ["node-spare"]

    def emit(type_: str, **fields) -> None:
        rd.check_fence(n)
        rd.append_event(type_, n, **fields)

    time.sleep(float(fault.get("start_after_s", 0)))  # its workers wait to be placed
    info, skipped = ckpt.newest_verified(rd.checkpoints, max_step=args.max_resume_step)
    step = info.step if info else 0
    workers = [
        {"rank": r, "pid": os.getpid(), "node_id": nodes[r % len(nodes)], "node_ip": "127.0.0.1"} for r in (0, 1)
    ]
    emit(
        "start",
        resume_step=step,
        world_size=2,
        workers=workers,
        skipped_checkpoints=[list(s) for s in skipped],
        driver_pid=os.getpid(),
        metrics_url=None,
        skip_steps=args.skip_steps,
    )
    if fault.get("crash_at") == step:
        return 1
    while step < total:
        interval = rd.checkpoint_interval() or int(script.get("interval", 5))
        t0 = time.time()
        time.sleep(step_s)
        step += 1
        while fault.get("hang_at") == step:  # the hung ranks go silent; the others keep heartbeating
            for r in (0, 1):
                if r not in fault.get("hang_ranks", []):
                    emit("heartbeat", rank=r, step=step, pid=os.getpid(), node_id=workers[r]["node_id"])
            time.sleep(0.2)
        if fault.get("crash_at") == step:
            emit("failure", kind="worker_died", rank=1, step=step, detail="SIGKILL")
            return 1
        if fault.get("replace_at") == step:  # a worker dies and is replaced inside the attempt
            emit("failure", kind="worker_died", rank=1, step=step, node_id=workers[1]["node_id"], detail="SIGKILL")
            emit("worker_replaced", rank=1, old_pid=os.getpid(), new_pid=os.getpid(), recovery_s=0.1, step=step,
                 **{"from": "new"})  # fmt: skip
        if fault.get("die_at") == step:  # the driver is SIGKILLed: no failure event, no end
            os._exit(137)
        loss = float("nan") if fault.get("nan_at") == step else 5.0 / (1 + 0.1 * step)
        if loss != loss:
            emit("failure", kind="nan_loss", rank=0, step=step, detail="loss is NaN")
            return 3
        for r in (0, 1):
            emit("heartbeat", rank=r, step=step, pid=os.getpid(), node_id=workers[r]["node_id"])
        emit("step", step=step, loss=loss, lr=1e-3, grad_norm=1.0, tokens=step * 512, tokens_per_s=1e4,
             step_time_s=time.time() - t0, rank_step_times=[step_s, step_s])  # fmt: skip
        if step % interval == 0 or step == total:
            t1 = time.time()
            staging = ckpt.staging_dir(rd.checkpoints, step)
            (staging / "state.json").write_text(json.dumps({"step": step}))
            rd.check_fence(n)
            c = ckpt.commit(staging, rd.checkpoints, step, {"attempt": n})
            emit("checkpoint", step=step, path=str(c.path), bytes=c.bytes, blocking_s=0.01, persist_s=time.time() - t1,
                 async_=False)  # fmt: skip
    emit("end", status="succeeded", step=step, loss=loss)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FencedError:
        sys.exit(75)
