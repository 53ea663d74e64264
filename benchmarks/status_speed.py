"""`llmctl run status` on a long run: reading the recent events vs the whole events.jsonl.

A run's events.jsonl grows with its age: every rank's heartbeat each second, and a step event
each step. This writes the events of a run (default: 6 h of 64 ranks, heartbeats at 1 Hz and a
step every 2 s, about 200 MiB; a month of 928 ranks would be ~1,700 times more) into a
temporary run directory, then times the status summary both ways in the same process:

- baseline: `summarize(run_dir.events())`, what the command did before (the whole file);
- llmctl: `status_summary(...)`, the last 4 MiB plus the ledger and the file's head.

Prints both times, the ratio, and checks that the progress they report is the same.

    python benchmarks/status_speed.py [--hours 6] [--ranks 64] [--repeat 3]
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

from controlplane.context import Context  # noqa: E402
from controlplane.rundir import RunDir  # noqa: E402
from controlplane.runs import status_summary, summarize  # noqa: E402
from controlplane.spec import RunSpec, dump_spec  # noqa: E402


def write_events(rd: RunDir, hours: float, ranks: int, step_s: float) -> int:
    """Heartbeats of every rank each second and a step event every `step_s`; returns the last step."""
    t0, step = 1.8e9, 0
    with open(rd.events_file, "w") as f:
        f.write(json.dumps({"ts": t0, "type": "start", "attempt": 1, "resume_step": 0}) + "\n")
        for sec in range(int(hours * 3600)):
            ts = t0 + sec
            lines = [
                f'{{"ts":{ts},"type":"heartbeat","attempt":1,"rank":{r},"step":{step},"pid":{1000 + r},'
                f'"node_id":"{r // 8:056x}"}}\n'
                for r in range(ranks)
            ]
            if sec % step_s == 0:
                step += 1
                lines.append(
                    json.dumps({"ts": ts, "type": "step", "attempt": 1, "step": step, "loss": 10.0 / step,
                                "tokens": step * 4_000_000, "tokens_per_s": 2e6, "step_time_s": float(step_s)})
                    + "\n"
                )  # fmt: skip
            f.write("".join(lines))
    return step


def timed(fn, repeat: int) -> tuple[float, dict]:
    times, out = [], {}
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=6.0)
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--step-s", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmctl-bench-status-"))
    try:
        os.environ["LLMCTL_HOME"] = str(work)
        ctx = Context.load()
        rd = RunDir.of(ctx.storage, "bench-run").create()
        run = ctx.ledger.create_run("bench-run", "bench", dump_spec(RunSpec()), {}, str(rd.path))
        t = time.perf_counter()
        last = write_events(rd, args.hours, args.ranks, args.step_s)
        size = rd.events_file.stat().st_size
        print(f"# wrote {size / 2**20:,.0f} MiB of events ({args.hours:g} h, {args.ranks} ranks) in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr)  # fmt: skip
        run = ctx.ledger.get_run("bench-run")
        base_s, base = timed(lambda: summarize(rd.events(), None), args.repeat)
        ours_s, ours = timed(lambda: status_summary(ctx, run, rd, None), args.repeat)
        same = all(base[k] == ours[k] == v for k, v in (("step", last),)) and base["loss"] == ours["loss"]
        same = same and base["first_loss"] == ours["first_loss"] and base["tokens_per_s"] == ours["tokens_per_s"]
        print(f"run status on a {size / 2**20:,.0f} MiB events.jsonl (median of {args.repeat}):")
        print(f"  whole file (baseline)       {base_s:9.3f} s")
        print(f"  recent 4 MiB + ledger       {ours_s:9.3f} s")
        print(f"  ratio recent / whole        {ours_s / base_s:9.4f}")
        print(f"  same step, loss, first loss and tokens/s: {'yes' if same else 'NO'}")
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
