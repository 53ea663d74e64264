"""`llmctl quickstart`: the whole life of a model on the embedded default, as a list of steps.

Each step takes the shared `Quickstart` state, does one thing with the same code the CLI
commands use, and adds lines to the closing summary. A feature joins the quickstart by
adding a step to `STEPS`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controlplane.context import Context
from controlplane.spec import FaultInjection, RunSpec


def default_run_spec(steps: int, inject_fault: bool) -> RunSpec:
    """Tiny Llama, 2 CPU workers, checkpoints every 20 steps; optionally one real worker kill."""
    faults = [FaultInjection(kind="kill_worker", at_step=max(2, int(steps * 0.45)), rank=1)] if inject_fault else []
    return RunSpec(
        name="quickstart",
        model={"preset": "tiny"},
        train={
            "max_steps": steps,
            "global_batch_size": 16,
            "seq_len": 128,
            "schedule": {"lr": 3e-3, "warmup_steps": 20},
            "log_every": 1,
        },
        workers={"num_workers": 2, "cpus_per_worker": 1, "spare_workers": 1},
        checkpoint={"interval_steps": 20, "keep_last": 3},
        faults=faults,
        seed=0,
    )


@dataclass
class Quickstart:
    ctx: Context
    steps: int = 300
    inject_fault: bool = True
    keep_cluster: bool = False
    serve: bool = True
    run_id: str | None = None
    started_cluster: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    failed: bool = False


@dataclass(frozen=True)
class Step:
    title: str
    run: Callable[[Quickstart], None]
    needs_run: bool = False  # skipped when training did not produce a run


def step_cluster(q: Quickstart) -> None:
    from controlplane import ray_cluster

    was_up = ray_cluster.status(q.ctx.cluster)["up"]
    w = default_run_spec(q.steps, q.inject_fault).workers
    needed = math.ceil(w.cpus_per_worker * (w.num_workers + w.spare_workers))  # the spare idles: logical CPUs
    state = ray_cluster.up(q.ctx.cluster, num_cpus=max(os.cpu_count() or 2, needed))
    q.started_cluster = not was_up
    q.summary.append(f"cluster      local Ray, dashboard {state.dashboard_url} (127.0.0.1, token auth on)")


def step_data(q: Quickstart) -> None:
    from controlplane.data import prepare, read_meta

    spec = default_run_spec(q.steps, q.inject_fault)
    out = q.ctx.dataset_dir(spec.data.path)
    if (out / "meta.json").exists():
        meta = read_meta(out)
    else:
        from controlplane.data.ray_engine import choose_engine

        engine, address, ray_env = choose_engine(q.ctx.cluster, "auto")  # the cluster step started it
        meta = prepare(
            spec.data.source,
            out,
            vocab_size=spec.data.vocab_size,
            heldout_fraction=spec.data.heldout_fraction,
            engine=engine,
            ray_address=address,
            ray_env=ray_env,
            min_ray_units=2,  # manpages-ja is one unit: tokenizing it here beats starting Ray Data workers
        )
    q.data = meta
    q.summary.append(
        f"data         {meta['train_tokens']:,} train / {meta['heldout_tokens']:,} held-out tokens, "
        f"vocab {meta['vocab_size']}, from {meta['source']} ({out})"
    )


def step_train(q: Quickstart) -> None:
    from controlplane.cli.watch import watch_run
    from controlplane.runs import create_run, start_run, summarize

    spec = default_run_spec(q.steps, q.inject_fault)
    run_dir = create_run(q.ctx, spec)
    q.run_id = run_dir.run_id
    start_run(q.ctx, q.run_id)
    code = watch_run(q.ctx, q.run_id)
    s = summarize(run_dir.events(), spec.train.steps)
    q.failed = code != 0
    loss = f"{s['first_loss']:.3f} -> {s['loss']:.3f}" if s["loss"] is not None and s["first_loss"] is not None else "-"
    tps = f"{s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "-"
    q.summary.append(f"training     {q.run_id}: {s['step']}/{spec.train.steps} steps, loss {loss}, {tps} tokens/s")
    q.summary.append(f"             checkpoints {run_dir.checkpoints}  events {run_dir.events_file}")
    for r in s["replacements"]:
        q.summary.append(
            f"recovery     worker rank {r.get('rank')} killed (injected SIGKILL), replaced in "
            f"{r.get('recovery_s', 0):.2f}s from a {r.get('from', '?')} worker, training went on"
        )


def step_goodput(q: Quickstart) -> None:
    from controlplane.supervisor.metrics import run_goodput

    g = run_goodput(q.ctx, q.ctx.ledger.get_run(q.run_id))
    lost = ", ".join(
        f"{k.replace('_', ' ')} {v:.1f}s"
        for k, v in sorted(g.seconds.items(), key=lambda kv: -kv[1])
        if k != "productive" and v >= 0.05
    )
    q.summary.append(f"goodput      {g.ratio:.1%} of {g.wall_s:.0f}s wall time" + (f"; lost: {lost}" if lost else ""))


def step_energy(q: Quickstart) -> None:
    from controlplane.telemetry.energy import run_energy_summary

    q.summary.append(f"energy       {run_energy_summary(q.ctx, q.run_id)}")


PROMPTS = ["ファイルを", "このコマンドは", "オプション"]


def step_serve(q: Quickstart) -> None:
    from controlplane.rollout.quickstart import serve_and_sample

    report: dict[str, Any] = {}
    texts = serve_and_sample(q.ctx, q.run_id, PROMPTS, max_tokens=16, report=report)
    scores = report.get("scores", {})
    shown = ", ".join(f"{k} {v:.3g}" for k, v in scores.items() if isinstance(v, (int, float)))
    q.summary.append(f"evaluation   {shown}")
    q.summary.append(
        f"serving      rollout {report.get('rollout_id')} promoted to {report.get('engine', 'vLLM')} at {report.get('endpoint')}"
    )
    for prompt, text in zip(PROMPTS, texts, strict=True):
        q.summary.append(f"             {prompt!r} -> {(prompt + text).strip()!r}")


STEPS: list[Step] = [
    Step("Bringing up the local Ray cluster", step_cluster),
    Step("Preparing the Japanese corpus (manpages-ja)", step_data),
    Step("Pretraining the tiny Llama on 2 CPU workers", step_train),
    Step("Accounting where the time went", step_goodput, needs_run=True),
    Step("Accounting the energy", step_energy, needs_run=True),
    Step("Export, evaluate, roll out on vLLM, and ask for completions", step_serve, needs_run=True),
]


def run(q: Quickstart, echo: Callable[[str], None]) -> int:
    from controlplane import ray_cluster

    t0 = time.monotonic()
    try:
        for i, step in enumerate(STEPS, 1):
            if step.needs_run and (q.run_id is None or q.failed):
                continue
            echo(f"[{i}/{len(STEPS)}] {step.title}")
            step.run(q)
    finally:
        if q.started_cluster and not q.keep_cluster:
            ray_cluster.down(q.ctx.cluster)
            q.summary.append("cluster      stopped (it was started by the quickstart; --keep-cluster keeps it)")
    echo("")
    echo(f"quickstart {'FAILED' if q.failed else 'done'} in {time.monotonic() - t0:.0f}s")
    for line in q.summary:
        echo("  " + line)
    if q.run_id:
        echo(f"  next         llmctl run status {q.run_id}   ·   llmctl run events {q.run_id} -t failure")
    return 1 if q.failed else 0
