"""The Ray Serve applications: one per model version, and one router per service.

    service "chat"                    HTTP route /chat  (Ray Serve proxy)
      app "chat"          Router      auth, weighted split, metrics, /v1/completions, /health
      app "chat--<ver>"   Model x N   one replica per GPU (num_gpus: 1), or num_cpus on CPU hosts

Versions live in applications of their own, so a candidate is added and removed without
touching the stable one; the router sends each request to a version drawn by weight and
measures what the client sees. The control plane changes weights and reads windows over
HTTP (`<prefix>/admin/...`, an admin token whose digest the router holds), so it needs no
Ray driver of its own; a weight change applies atomically to all new requests.

Drill switch (documented fault injection for canary drills and tests): a version's
`drill: {"error_rate": 0.3, "delay_s": 1.5, "seed": 0}` makes its replicas raise on that
fraction of requests and/or sleep that long before generating. The model is real; so is the
fault. Leave it empty in production.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from jobs.serve.engine import load_engine, vllm_status
from jobs.serve.metrics import ServeMetrics
from jobs.serve.openai import BadRequest, authorized, completion_response, error_body, parse_completion_request

VERSION_HEADER = "x-llmctl-version"


class DrillError(RuntimeError):
    """A failure injected on purpose by the drill switch."""


@serve.deployment(name="Model", max_ongoing_requests=8, health_check_period_s=2.0, graceful_shutdown_timeout_s=20.0)
class ModelServer:
    def __init__(self, cfg: dict[str, Any]):
        self.version = cfg["version"]
        self.engine = load_engine(cfg["model_dir"], cfg.get("engine", "auto"), cfg.get("device", "auto"))
        vllm_ok, why = vllm_status()
        note = "" if vllm_ok or self.engine.name == "vllm" else f" ({why})"
        logging.getLogger("ray.serve").info(f"{self.version}: engine {self.engine.name} on {self.engine.device}{note}")
        drill = cfg.get("drill") or {}
        self.error_rate = float(drill.get("error_rate", 0.0))
        self.delay_s = float(drill.get("delay_s", 0.0))
        self.rng = random.Random(drill.get("seed", 0))
        self.pool = ThreadPoolExecutor(max_workers=int(cfg.get("threads", 2)))

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        req = parse_completion_request(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error_rate and self.rng.random() < self.error_rate:
            raise DrillError(f"drill: injected failure in {self.version}")
        results = await asyncio.get_running_loop().run_in_executor(self.pool, self.engine.complete, req)
        return completion_response(self.version, results)

    async def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "engine": self.engine.name,
            "device": self.engine.device,
            "vllm": vllm_status()[1],
        }


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

    async def __call__(self, request: Request) -> JSONResponse:
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
        if not path.endswith("/v1/completions"):
            return JSONResponse(error_body(f"no route {path}", "not_found", 404), 404)
        if request.method != "POST":
            return JSONResponse(error_body("use POST", "method_not_allowed", 405), 405)
        try:
            body = await request.json()
            parse_completion_request(body)
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
        start = time.perf_counter()
        self.inflight[version] += 1
        try:
            result = await self.handles[version].complete.remote(body)
        except Exception as exc:  # the replica failed this request: a server error of this version
            seconds = time.perf_counter() - start
            self.metrics.observe(version, 500, seconds)
            body = error_body(f"{type(exc).__name__}", "server_error", 500)
            return JSONResponse(body, 500, headers={VERSION_HEADER: version})
        finally:
            self.inflight[version] -= 1
        self.metrics.observe(version, 200, time.perf_counter() - start, result["usage"]["completion_tokens"])
        return JSONResponse(result, headers={VERSION_HEADER: version})


def version_app(cfg: dict[str, Any], num_replicas: int, num_cpus: float, num_gpus: float):
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    return ModelServer.options(num_replicas=num_replicas, ray_actor_options=opts).bind(cfg)


def router_app(cfg: dict[str, Any]):
    return Router.bind(cfg)
