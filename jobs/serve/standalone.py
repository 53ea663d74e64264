"""One model on one GPU without Ray: the server a Kubernetes serving pod runs.

Routes: POST /v1/completions and /v1/chat/completions (streamed with `stream: true`),
GET /v1/models, GET /health (readiness: the engine answers; no token), GET /metrics (the
llmctl_serve_* series). Beyond loopback a bearer token is required; it is read from
$LLMCTL_SERVE_TOKEN and never logged. The drill switch comes from $LLMCTL_DRILL, e.g.
'{"error_rate": 0.3, "delay_s": 1.5}' (see jobs/serve/responder.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from jobs.serve.openai import (
    LOOPBACK,
    BadRequest,
    authorized,
    endpoint_kind,
    error_body,
    parse_request,
    sse_events,
    token_digest,
)


def build_app(engine, version: str, token: str | None, cluster: str = "local"):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from jobs.serve.metrics import ServeMetrics
    from jobs.serve.responder import Responder

    metrics = ServeMetrics(cluster)
    metrics.set_traffic("none", {version: 1.0}, {})
    digest = token_digest(token) if token else None
    responder = Responder(engine, version, json.loads(os.environ.get("LLMCTL_DRILL") or "{}"))

    async def health(_: Request) -> JSONResponse:
        try:
            await engine.check_health()
        except Exception as exc:
            return JSONResponse({"status": "engine-dead", "version": version, "error": type(exc).__name__}, 503)
        return JSONResponse({"status": "ok", "version": version})

    async def metrics_route(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(request: Request) -> JSONResponse:
        if not authorized(request.headers.get("authorization"), digest):
            return JSONResponse(error_body("missing or invalid bearer token", "unauthorized", 401), 401)
        return JSONResponse({"object": "list", "data": [{"id": version, "object": "model", "owned_by": "llmctl"}]})

    def failed(start: float, exc: Exception) -> JSONResponse:
        metrics.observe(version, 500, time.perf_counter() - start)
        return JSONResponse(error_body(type(exc).__name__, "server_error", 500), 500)

    def done(start: float, meta: dict) -> None:
        metrics.observe(version, 200, time.perf_counter() - start, int(meta.get("completion_tokens") or 0))
        metrics.observe_tokens(version, meta)

    async def completions(request: Request):
        if not authorized(request.headers.get("authorization"), digest):
            metrics.observe("none", 401, 0.0)
            return JSONResponse(error_body("missing or invalid bearer token", "unauthorized", 401), 401)
        kind = endpoint_kind(request.url.path) or "completions"
        try:
            body = await request.json()
            req = parse_request(kind, body)
        except (BadRequest, ValueError) as exc:
            metrics.observe("none", 400, 0.0)
            return JSONResponse(error_body(str(exc), "invalid_request_error", 400), 400)
        start = time.perf_counter()
        if not req.stream:
            try:
                out = await responder.complete(kind, body)
            except Exception as exc:
                return failed(start, exc)
            done(start, out["meta"])
            return JSONResponse(out["response"])
        gen = responder.stream(kind, body)
        try:
            first = await gen.__anext__()
        except Exception as exc:
            return failed(start, exc)

        async def events():
            try:
                async for chunk in sse_events(first, gen, lambda meta: done(start, meta), lambda e: failed(start, e)):
                    yield chunk
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        try:
            yield
        finally:
            # Here, not after uvicorn.run returns: on SIGTERM uvicorn shuts the app down and then
            # raises the signal again, so this process dies before any code after run().
            engine.shutdown()

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/health", health),
            Route("/metrics", metrics_route),
            Route("/v1/models", models),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", completions, methods=["POST"]),
        ],
    )


def run_standalone(
    model_dir: str,
    version: str,
    host: str,
    port: int,
    engine_name: str = "auto",
    cluster: str = "local",
    engine_opts: dict | None = None,
) -> int:
    import uvicorn

    from jobs.serve.engine import EngineUnavailable, load_engine

    token = os.environ.get("LLMCTL_SERVE_TOKEN")
    if host not in LOOPBACK and not token:
        print(f"error: serving on {host} (beyond loopback) requires $LLMCTL_SERVE_TOKEN", file=sys.stderr)
        return 2
    try:
        engine = load_engine(model_dir, engine_name, **(engine_opts if engine_name != "transformers" else {}))
    except EngineUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"serving {version} with {engine.name} on {engine.device} at http://{host}:{port}", file=sys.stderr)
    try:
        uvicorn.run(
            build_app(engine, version, token, cluster), host=host, port=port, log_level="warning", access_log=False
        )
    finally:
        engine.shutdown()
    return 0
