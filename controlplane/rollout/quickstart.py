"""The quickstart's serving leg: export -> evaluate -> serve on vLLM -> sample -> tear down.

One replica: its vLLM engine (the CPU build without a GPU) batches every request itself, and
a second engine on a 2-core laptop would only halve each one's cores.
"""

from __future__ import annotations

from typing import Any

from controlplane.errors import RetryableError
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

    Serves on the project's running cluster (the quickstart starts one; without it this is a
    UserError). Serving is torn down before returning; `report` (if given) receives the
    evaluation scores, the rollout id and the endpoint that was used.
    """
    import httpx

    from controlplane.rollout.ray_backend import RayServeBackend

    backend = RayServeBackend(ctx.cluster)  # refuses at once when the cluster is down
    exported = resolve_model(ctx, run_id)
    evaluation = evaluate(ctx, str(exported.model_dir), exported.run_id, EvalRequest(limit=eval_limit))
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
