"""Simulated GPU-days per wall-clock second: the event-driven simulator vs per-second time stepping.

Both simulate the same world (the reference 928-GPU cluster at Llama 3 failure rates, the same
checkpoint interval, detection and restart costs) and both ask the supervisor's real policy what
to do after each failure. The baseline advances a clock one second at a time and draws a failure
with probability 1/MTBF each second; the simulator jumps from failure to failure and counts the
checkpoints in between in closed form. Prints both rates, their ratio, and both goodputs (they
must agree: the speed-up is worthless if the answer changes).

    python benchmarks/simulate_speed.py [--days 30] [--seeds 100] [--baseline-days 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from controlplane.planning.failures import LLAMA3
from controlplane.planning.policy_driver import PolicyDriver
from controlplane.planning.simulate import SimConfig, run_seeds
from controlplane.spec import FaultToleranceSpec


def stepped(cfg: SimConfig, ft: FaultToleranceSpec, mtbf_s: float, seed: int) -> tuple[float, float]:
    """Per-second time stepping of the same model (crashes only, persist == stall). Returns
    (simulated seconds, goodput)."""
    rng = random.Random(seed)
    driver = PolicyDriver(ft, cfg.final_step, cfg.step_s)
    p_fail = 1.0 / mtbf_s
    tau, stall = int(cfg.interval_s), int(cfg.stall_s)
    work, horizon = int(cfg.work_s), int(cfg.horizon_s)
    phase, left = "run", 0
    compute = durable = high = since = 0
    started, submitted = 0.0, 0.0
    t = 0
    while t < horizon and durable < work and compute < work:
        t += 1
        if rng.random() < p_fail:
            running = phase in ("run", "stall")
            progressed = compute > high
            high = max(high, compute)
            verdict = driver.on_failure(
                now=float(t + cfg.detect_s),
                kind="crash",
                cause="x",
                node=None,
                started_at=started if running else None,
                submitted_at=submitted,
                last_step=int(compute / cfg.step_s),
                last_step_at=float(t) if running else None,
                verified_steps=(int(durable / cfg.step_s),),
                progressed=progressed,
            )
            if verdict.give_up:
                break
            compute, since = durable, 0
            phase, left = "restart", int(cfg.detect_s + verdict.delay_s + cfg.restart_s)
            submitted = t + cfg.detect_s + verdict.delay_s
            continue
        if phase == "restart":
            left -= 1
            if left <= 0:
                phase, started = "run", float(t)
        elif phase == "stall":
            left -= 1
            if left <= 0:
                durable, phase = compute, "run"
        else:
            compute += 1
            since += 1
            if since >= tau and compute < work:
                phase, left, since = "stall", stall, 0
    return float(t), compute / t  # work in progress at the horizon counts, as in the simulator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--baseline-days", type=float, default=3.0)
    ap.add_argument("--baseline-seeds", type=int, default=40)
    args = ap.parse_args()

    gpus = 928
    mtbf_s = LLAMA3.cluster_mtbf_hours(gpus) * 3600
    ft = FaultToleranceSpec(max_restarts=100_000)
    base = dict(
        step_s=1.0,
        interval_steps=600,
        stall_s=2.0,
        persist_s=2.0,
        detect_s=30.0,
        restart_s=600.0,
        node_replace_s=0.0,
        gpus=gpus,
        nodes=gpus // 8,
    )
    crash_only = LLAMA3.model_copy(update={"causes": [c.model_copy(update={"kind": "crash"}) for c in LLAMA3.causes]})

    # event-driven: the full month, many seeds
    cfg = SimConfig(work_s=10 * args.days * 86400, horizon_s=args.days * 86400, **base)
    t0 = time.perf_counter()
    summary, _ = run_seeds(cfg, crash_only, ft, mtbf_s, args.seeds)
    fast_wall = time.perf_counter() - t0
    fast_gpu_days = args.seeds * args.days * gpus
    fast_rate = fast_gpu_days / fast_wall

    # baseline: per-second stepping, a few seeds over a shorter window (it is that slow)
    bcfg = SimConfig(work_s=10 * args.baseline_days * 86400, horizon_s=args.baseline_days * 86400, **base)
    t0 = time.perf_counter()
    goodputs, sim_s = [], 0.0
    for seed in range(args.baseline_seeds):
        secs, g = stepped(bcfg, ft, mtbf_s, seed)
        sim_s += secs
        goodputs.append(g)
    slow_wall = time.perf_counter() - t0
    slow_rate = sim_s / 86400 * gpus / slow_wall

    # the same window with the event-driven simulator, many seeds, to compare the answers
    check, _ = run_seeds(bcfg, crash_only, ft, mtbf_s, 2000)
    print(f"event-driven: {fast_gpu_days:,.0f} GPU-days in {fast_wall:.2f} s = {fast_rate:,.0f} GPU-days/s")
    print(
        f"per-second baseline: {sim_s / 86400 * gpus:,.0f} GPU-days in {slow_wall:.2f} s = {slow_rate:,.0f} GPU-days/s"
    )
    print(f"speed-up: {fast_rate / slow_rate:,.0f}x")
    print(
        f"goodput over {args.baseline_days:g} days: baseline {statistics.mean(goodputs):.4f} "
        f"± {statistics.stdev(goodputs) / len(goodputs) ** 0.5:.4f} ({args.baseline_seeds} seeds), event-driven {check.goodput_mean:.4f} ± {check.goodput_sem:.4f} (2000 seeds); "
        f"month goodput {summary.goodput_mean:.4f}"
    )


if __name__ == "__main__":
    main()
