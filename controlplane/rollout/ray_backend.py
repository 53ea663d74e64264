"""Ray Serve backend: versions and the router as Serve applications.

Applications are created by entrypoint (`python -m jobs.serve deploy`, a short-lived Ray
driver that exits once the application is healthy; Serve keeps it running), so the control
plane never imports `jobs/`. Weights, windows and removal go through Serve's public API
(application handles, `serve.delete`), which needs no job code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from controlplane.errors import UserError
from controlplane.rollout.backend import DeployError, version_app_name
from controlplane.rollout.evaluation import job_env
from controlplane.spec import RolloutSpec

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def connect(address: str | None = None) -> str:
    """Connect this process to Ray (if not already); returns the GCS address."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            # Never "auto": on a shared host it could join someone else's cluster.
            raise UserError("not connected to a Ray cluster: give the cluster's address (cluster spec or $RAY_ADDRESS)")
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return ray.get_runtime_context().gcs_address


class RayServeBackend:
    kind = "ray"

    def __init__(self, address: str | None = None):
        self.gcs_address = connect(address)

    # ------------------------------------------------------------ plumbing

    def _deploy(self, cfg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="llmctl-serve-") as tmp:
            path = Path(tmp) / "app.json"
            path.write_text(json.dumps(cfg))
            try:
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "jobs.serve",
                        "deploy",
                        "--address",
                        self.gcs_address,
                        "--config",
                        str(path),
                    ],
                    env=job_env(),
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                )
            except subprocess.TimeoutExpired:
                raise DeployError(f"{cfg['app_name']}: not ready after {timeout_s:.0f}s") from None
        if proc.returncode == 2:
            raise UserError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")] or [proc.stderr[-500:]]
            raise DeployError(lines[-1].removeprefix("error: ")[:1000])
        return json.loads(proc.stdout.strip().splitlines()[-1])

    @staticmethod
    def _apps() -> dict[str, Any]:
        from ray import serve

        return dict(serve.status().applications)

    @staticmethod
    def _router(spec: RolloutSpec):
        from ray import serve

        return serve.get_app_handle(spec.name)

    def _routes(self, spec: RolloutSpec, ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
        return {v: {"app": version_app_name(spec.name, v), "weight": w} for v, w in ratios.items()}

    # ------------------------------------------------------------ the port

    def ensure_service(self, spec: RolloutSpec, stable: str | None, rollout_id: str) -> dict[str, Any]:
        opts = spec.serve
        if opts.host not in LOOPBACK and not os.environ.get(opts.token_env):
            raise UserError(f"serve.host {opts.host} is beyond loopback: set a bearer token in ${opts.token_env}")
        app = self._apps().get(spec.name)
        if app is None or str(getattr(app, "status", "")) not in ("RUNNING", "ApplicationStatus.RUNNING"):
            cfg = {
                "kind": "router",
                "app_name": spec.name,
                "route_prefix": f"/{spec.name}",
                "http": {"host": opts.host, "port": opts.port},
                "token_env": opts.token_env,
                "deployment": {
                    "service": spec.name,
                    "rollout_id": rollout_id,
                    "routes": self._routes(spec, {stable: 1.0} if stable else {}),
                    "metrics": {"host": opts.metrics_host, "port": opts.metrics_port},
                },
            }
            self._deploy(cfg, spec.deploy_timeout_s)
        info = self._router(spec).info.remote().result(timeout_s=30)
        host = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
        return {
            "url": f"http://{host}:{opts.port}/{spec.name}/v1",
            "metrics_url": f"http://{opts.metrics_host}:{info['metrics_port']}/metrics",
            "routes": info["routes"],
        }

    def has_version(self, spec: RolloutSpec, version: str) -> bool:
        return version_app_name(spec.name, version) in self._apps()

    def deploy_version(self, spec: RolloutSpec, version: str, model_dir: str, replicas: int, drill: Any) -> None:
        cfg = {
            "kind": "version",
            "app_name": version_app_name(spec.name, version),
            "route_prefix": None,
            "http": {"host": spec.serve.host, "port": spec.serve.port},
            "deployment": {
                "version": version,
                "model_dir": model_dir,
                "engine": spec.serve.engine,
                "drill": drill.model_dump() if drill is not None else None,
            },
            "num_replicas": replicas,
            "num_cpus": spec.serve.cpus_per_replica if spec.gpus_per_replica == 0 else 1,
            "num_gpus": spec.gpus_per_replica,
        }
        try:
            self._deploy(cfg, spec.deploy_timeout_s)
        except DeployError:
            self.remove_version(spec, version)
            raise

    def set_traffic(self, spec: RolloutSpec, ratios: dict[str, float], rollout_id: str) -> float:
        return float(self._router(spec).set_weights.remote(self._routes(spec, ratios), rollout_id).result(timeout_s=30))

    def window(self, spec: RolloutSpec, version: str, since: float) -> dict[str, Any]:
        return self._router(spec).stats.remote(version, since).result(timeout_s=30)

    def remove_version(self, spec: RolloutSpec, version: str) -> None:
        from ray import serve

        name = version_app_name(spec.name, version)
        if name in self._apps():
            serve.delete(name, _blocking=True)

    def teardown(self, spec: RolloutSpec) -> None:
        from ray import serve

        for name in list(self._apps()):
            if name == spec.name or name.startswith(f"{spec.name}--"):
                serve.delete(name, _blocking=True)

    def wait_idle(self, spec: RolloutSpec, version: str, min_s: float, max_s: float = 30.0) -> None:
        """Let in-flight requests of a version that gets no new traffic finish."""
        start = time.monotonic()
        time.sleep(min_s)
        while time.monotonic() - start < max_s:
            if self.window(spec, version, time.time()).get("inflight", 0) <= 0:
                return
            time.sleep(0.2)
