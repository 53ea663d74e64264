"""One model on one GPU without Ray: the server a Kubernetes serving pod runs.

Routes: POST /v1/completions, GET /v1/models, GET /health (readiness; no token),
GET /metrics (the llmctl_serve_* series). Beyond loopback a bearer token is required; it is
read from $LLMCTL_SERVE_TOKEN and never logged. The drill switch comes from $LLMCTL_DRILL,
e.g. '{"error_rate": 0.3, "delay_s": 1.5}' (see jobs/serve/app.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from jobs.serve.openai import LOOPBACK, BadRequest, authorized, completion_response, error_body, token_digest


def build_app(engine, version: str, token: str | None, cluster: str = "local"):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from jobs.serve.metrics import ServeMetrics
    from jobs.serve.openai import parse_completion_request

    metrics = ServeMetrics(cluster)
    metrics.set_traffic("none", {version: 1.0}, {})
    digest = token_digest(token) if token else None
    pool = ThreadPoolExecutor(max_workers=2)
    drill = json.loads(os.environ.get("LLMCTL_DRILL") or "{}")
    error_rate, delay_s = float(drill.get("error_rate", 0)), float(drill.get("delay_s", 0))
    rng = random.Random(drill.get("seed", 0))

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": version})

    async def metrics_route(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(request: Request) -> JSONResponse:
        if not authorized(request.headers.get("authorization"), digest):
            return JSONResponse(error_body("missing or invalid bearer token", "unauthorized", 401), 401)
        return JSONResponse({"object": "list", "data": [{"id": version, "object": "model", "owned_by": "llmctl"}]})

    async def completions(request: Request) -> JSONResponse:
        if not authorized(request.headers.get("authorization"), digest):
            metrics.observe("none", 401, 0.0)
            return JSONResponse(error_body("missing or invalid bearer token", "unauthorized", 401), 401)
        try:
            req = parse_completion_request(await request.json())
        except (BadRequest, ValueError) as exc:
            metrics.observe("none", 400, 0.0)
            return JSONResponse(error_body(str(exc), "invalid_request_error", 400), 400)
        start = time.perf_counter()
        try:
            if delay_s:
                await asyncio.sleep(delay_s)
            if error_rate and rng.random() < error_rate:
                raise RuntimeError("drill: injected failure")
            results = await asyncio.get_running_loop().run_in_executor(pool, engine.complete, req)
        except Exception as exc:
            metrics.observe(version, 500, time.perf_counter() - start)
            return JSONResponse(error_body(type(exc).__name__, "server_error", 500), 500)
        body = completion_response(version, results)
        metrics.observe(version, 200, time.perf_counter() - start, body["usage"]["completion_tokens"])
        return JSONResponse(body)

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics_route),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


def run_standalone(
    model_dir: str, version: str, host: str, port: int, engine_name: str = "auto", cluster: str = "local"
) -> int:
    import uvicorn

    from jobs.serve.engine import load_engine

    token = os.environ.get("LLMCTL_SERVE_TOKEN")
    if host not in LOOPBACK and not token:
        print(f"error: serving on {host} (beyond loopback) requires $LLMCTL_SERVE_TOKEN", file=sys.stderr)
        return 2
    engine = load_engine(model_dir, engine_name)
    print(f"serving {version} with {engine.name} on {engine.device} at http://{host}:{port}", file=sys.stderr)
    uvicorn.run(build_app(engine, version, token, cluster), host=host, port=port, log_level="warning", access_log=False)
    return 0
