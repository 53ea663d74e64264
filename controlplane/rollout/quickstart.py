"""The quickstart's serving leg: export -> evaluate -> serve on vLLM -> sample -> tear down.

One replica: its vLLM engine (the CPU build without a GPU) batches every request itself, and
a second engine on a 2-core laptop would only halve each one's cores.
"""

from __future__ import annotations

import os
from typing import Any

from controlplane.errors import RetryableError, UserError
from controlplane.procs import free_port
from controlplane.rollout import store
from controlplane.rollout.controller import RolloutController
from controlplane.rollout.evaluation import EvalRequest, evaluate
from controlplane.rollout.export import resolve_model
from controlplane.spec import RolloutSpec, ServeOptions


def serve_and_sample(
    ctx: Any,
    run_id: str,
    prompts: list[str],
    *,
    max_tokens: int = 24,
    replicas: int = 1,
    service: str = "quickstart",
    eval_limit: int | None = 8,
    report: dict[str, Any] | None = None,
) -> list[str]:
    """Export the run's newest verified checkpoint, evaluate it, serve it and return completions.

    Uses the Ray cluster this process is connected to, or starts a local one for the
    duration of the call. Serving is torn down before returning; `report` (if given) receives
    the evaluation scores, the rollout id and the endpoint that was used.
    """
    import httpx
    import ray

    from controlplane.rollout.ray_backend import RayServeBackend

    exported = resolve_model(ctx, run_id)
    evaluation = evaluate(ctx, str(exported.model_dir), exported.run_id, EvalRequest(limit=eval_limit))
    started_ray = False
    try:
        backend = RayServeBackend(ctx.cluster)  # the project's running cluster, if any
    except UserError:  # none: a private local Ray for the duration of the call
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="ERROR")
        started_ray = True
        backend = RayServeBackend(ctx.cluster)
    spec = RolloutSpec(
        name=service,
        model=str(exported.model_dir),
        replicas=replicas,
        gpus_per_replica=0,
        deploy_timeout_s=600,
        # eager: a few prompts are not worth vLLM's graph compilation at start-up
        serve=ServeOptions(port=free_port(), cpus_per_replica=0.5, enforce_eager=True),
    )
    try:
        row = RolloutController(ctx, backend).start(spec)
        if row["state"] != store.PROMOTED:
            raise RetryableError(f"quickstart serving did not start: {row['state']} ({row['reason']})")
        info = store.get_service(ctx.ledger, service)["info"]
        texts = []
        with httpx.Client(timeout=120) as client:
            for prompt in prompts:
                r = client.post(f"{info['url']}/completions", json={"prompt": prompt, "max_tokens": max_tokens})
                r.raise_for_status()
                texts.append(r.json()["choices"][0]["text"])
        if report is not None:
            engine = f"{replicas} vLLM replica{'s' if replicas > 1 else ''}"
            report.update(
                {
                    "scores": evaluation["scores"],
                    "rollout_id": row["rollout_id"],
                    "endpoint": info["url"],
                    "engine": engine,
                }
            )
        return texts
    finally:
        backend.teardown(spec)
        store.delete_service(ctx.ledger, service)
        if started_ray:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
