"""The Ray Serve applications: one per model version, and one router per service.

    service "chat"                    HTTP route /chat  (Ray Serve proxy)
      app "chat"          Router      auth, weighted split, metrics, /v1/completions,
                                      /v1/chat/completions (streamed or not), /v1/models, /health
      app "chat--<ver>"   Model x N   one vLLM AsyncLLM per replica (num_gpus: 1, or num_cpus on CPU hosts)

Versions live in applications of their own, so a candidate is added and removed without
touching the stable one; the router sends each request to a version drawn by weight and
measures what the client sees. The control plane changes weights and reads windows over
HTTP (`<prefix>/admin/...`, an admin token whose digest the router holds), so it needs no
Ray driver of its own; a weight change applies atomically to all new requests.

Every replica hands each request to its engine as it arrives (no lock, no thread pool), so
vLLM batches the requests of all clients continuously; `max_ongoing_requests` bounds what a
replica accepts at once. Its Serve health check asks the engine (`AsyncLLM.check_health`),
so a dead engine core gets the replica replaced. The drill switch is in jobs/serve/responder.py.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from jobs.serve.engine import engine_options, load_engine
from jobs.serve.metrics import ServeMetrics
from jobs.serve.openai import BadRequest, authorized, endpoint_kind, error_body, parse_request, sse_events
from jobs.serve.responder import DrillError, Responder

VERSION_HEADER = "x-llmctl-version"
__all__ = ["DrillError", "ModelServer", "Router", "router_app", "version_app"]


@serve.deployment(name="Model", max_ongoing_requests=64, health_check_period_s=5.0, graceful_shutdown_timeout_s=20.0)
class ModelServer:
    async def __init__(self, cfg: dict[str, Any]):
        self.version = cfg["version"]
        engine = cfg.get("engine", "auto")
        opts = engine_options(cfg) if engine != "transformers" else {}
        self.engine = load_engine(cfg["model_dir"], engine, cfg.get("device", "auto"), **opts)
        self.responder = Responder(self.engine, self.version, cfg.get("drill"))
        self.replica = serve.get_replica_context().replica_id.unique_id
        logging.getLogger("ray.serve").info(f"{self.version}: engine {self.engine.name} on {self.engine.device}")

    async def complete(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        out = await self.responder.complete(kind, body)
        out["meta"]["replica"] = self.replica
        return out

    async def stream(self, kind: str, body: dict[str, Any]):
        async for item in self.responder.stream(kind, body):
            if "meta" in item:
                item["meta"]["replica"] = self.replica
            yield item

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def describe(self) -> dict[str, Any]:
        return {**self.responder.describe(), "replica": self.replica}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.deployment(name="Router", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Router:
    """The service's ingress. One replica: it holds the weights and the metrics endpoint."""

    def __init__(self, cfg: dict[str, Any]):
        self.service = cfg["service"]
        self.token_digest = cfg.get("token_sha256")
        self.admin_digest = cfg.get("admin_token_sha256")
        self.metrics = ServeMetrics(cfg.get("cluster") or "local")
        m = cfg.get("metrics") or {}
        self.metrics_port = self.metrics.serve(m.get("host", "127.0.0.1"), int(m.get("port", 0)))
        self.routes: dict[str, dict[str, Any]] = {}
        self.handles: dict[str, Any] = {}
        self.inflight: Counter[str] = Counter()
        self.rollout_id = cfg.get("rollout_id") or "none"
        self.rng = random.Random()
        self._apply(cfg.get("routes") or {}, self.rollout_id)

    def __del__(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()

    # ------------------------------------------------------------ control

    def _apply(self, routes: dict[str, dict[str, Any]], rollout_id: str) -> None:
        for version, route in routes.items():
            if version not in self.handles:
                self.handles[version] = serve.get_deployment_handle("Model", app_name=route["app"])
        total = sum(max(0.0, float(r["weight"])) for r in routes.values()) or 1.0
        ratios = {v: max(0.0, float(r["weight"])) / total for v, r in routes.items()}
        previous = {v: float(r["weight"]) for v, r in self.routes.items()}
        self.metrics.set_traffic(rollout_id, ratios, previous)
        self.routes = {v: {"app": r["app"], "weight": ratios[v]} for v, r in routes.items()}
        self.rollout_id = rollout_id

    async def set_weights(self, routes: dict[str, dict[str, Any]], rollout_id: str | None = None) -> float:
        """Replace the routing table; returns the router's clock, the start of the next window."""
        self._apply(routes, rollout_id or self.rollout_id)
        for version in [v for v in self.handles if v not in routes]:
            del self.handles[version]
            self.metrics.forget(version)
        return time.time()

    async def stats(self, version: str, since: float) -> dict[str, Any]:
        out = self.metrics.window(version, since)
        out["inflight"] = self.inflight[version]
        out["now"] = time.time()
        return out

    async def info(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "metrics_port": self.metrics_port,
            "routes": self.routes,
            "inflight": dict(self.inflight),
            "rollout_id": self.rollout_id,
            "now": time.time(),
        }

    # ------------------------------------------------------------ data path

    def _pick(self) -> str | None:
        live = [(v, r["weight"]) for v, r in self.routes.items() if r["weight"] > 0]
        if not live:
            return None
        return self.rng.choices([v for v, _ in live], weights=[w for _, w in live])[0]

    async def _admin(self, request: Request, path: str) -> JSONResponse:
        """The control plane's API: /admin/info, /admin/stats?version=&since=, POST /admin/weights."""
        if not self.admin_digest or not authorized(request.headers.get("authorization"), self.admin_digest):
            return JSONResponse(error_body("missing or invalid admin token", "unauthorized", 401), 401)
        action = path.rsplit("/admin/", 1)[1]
        try:
            if action == "info":
                return JSONResponse(await self.info())
            if action == "stats":
                q = request.query_params
                return JSONResponse(await self.stats(q["version"], float(q.get("since", 0))))
            if action == "weights" and request.method == "POST":
                body = await request.json()
                return JSONResponse({"since": await self.set_weights(body["routes"], body.get("rollout_id"))})
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse(error_body(f"bad admin request: {exc}", "invalid_request_error", 400), 400)
        return JSONResponse(error_body(f"no admin route {action}", "not_found", 404), 404)

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/")
        if "/admin/" in path:
            return await self._admin(request, path)
        if path.endswith("/health") or path == "":
            ok = any(r["weight"] > 0 for r in self.routes.values())
            return JSONResponse({"status": "ok" if ok else "no-routes", "service": self.service}, 200 if ok else 503)
        if not authorized(request.headers.get("authorization"), self.token_digest):
            self.metrics.observe("none", 401, 0.0)
            return JSONResponse(error_body("missing or invalid bearer token", "unauthorized", 401), 401)
        if path.endswith("/v1/models"):
            data = [{"id": v, "object": "model", "owned_by": "llmctl"} for v in self.routes]
            return JSONResponse({"object": "list", "data": data})
        kind = endpoint_kind(path)
        if kind is None:
            return JSONResponse(error_body(f"no route {path}", "not_found", 404), 404)
        if request.method != "POST":
            return JSONResponse(error_body("use POST", "method_not_allowed", 405), 405)
        try:
            body = await request.json()
            req = parse_request(kind, body)
        except BadRequest as exc:
            self.metrics.observe("none", 400, 0.0)
            return JSONResponse(error_body(str(exc), "invalid_request_error", 400), 400)
        except ValueError:
            self.metrics.observe("none", 400, 0.0)
            return JSONResponse(error_body("body is not valid JSON", "invalid_request_error", 400), 400)
        version = self._pick()
        if version is None:
            self.metrics.observe("none", 503, 0.0)
            return JSONResponse(error_body("no version is receiving traffic", "unavailable", 503), 503)
        if req.stream:
            return await self._stream(version, kind, body)
        start = time.perf_counter()
        self.inflight[version] += 1
        try:
            out = await self.handles[version].complete.remote(kind, body)
        except Exception as exc:  # the replica failed this request: a server error of this version
            return self._failed(version, start, exc)
        finally:
            self.inflight[version] -= 1
        self._done(version, start, out["meta"])
        return JSONResponse(out["response"], headers={VERSION_HEADER: version})

    def _failed(self, version: str, start: float, exc: Exception) -> JSONResponse:
        self.metrics.observe(version, 500, time.perf_counter() - start)
        return JSONResponse(error_body(type(exc).__name__, "server_error", 500), 500, headers={VERSION_HEADER: version})

    def _done(self, version: str, start: float, meta: dict[str, Any]) -> None:
        self.metrics.observe(version, 200, time.perf_counter() - start, int(meta.get("completion_tokens") or 0))
        self.metrics.observe_tokens(version, meta, str(meta.get("replica", "0")))

    async def _stream(self, version: str, kind: str, body: dict[str, Any]):
        """Server-sent events. A replica that fails before its first chunk gets a plain 500."""
        start = time.perf_counter()
        self.inflight[version] += 1
        gen = self.handles[version].options(stream=True).stream.remote(kind, body)
        try:
            first = await gen.__anext__()
        except Exception as exc:
            self.inflight[version] -= 1
            return self._failed(version, start, exc)

        finished = False

        def done(meta: dict[str, Any]) -> None:
            nonlocal finished
            finished = True
            self._done(version, start, meta)

        async def events():
            try:
                async for chunk in sse_events(first, gen, done, lambda _: self._failed(version, start, _)):
                    yield chunk
            finally:
                self.inflight[version] -= 1
                if not finished:  # the client went away (or the replica failed): stop generating
                    gen.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={VERSION_HEADER: version})


def version_app(cfg: dict[str, Any], num_replicas: int, num_cpus: float, num_gpus: float):
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    return ModelServer.options(num_replicas=num_replicas, ray_actor_options=opts).bind(cfg)


def router_app(cfg: dict[str, Any]):
    return Router.bind(cfg)
