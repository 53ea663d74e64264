"""Ray Serve backend: versions and the router as Serve applications.

The control plane runs no Ray driver of its own. Applications are created, listed and
deleted by entrypoint (`python -m jobs.serve deploy|status|delete`, short-lived drivers;
Serve keeps the applications running), so `controlplane/` never imports `jobs/` and the
cluster's token auth is set up in a fresh process each time. Weights and analysis windows
go over HTTP to the router's admin routes (`/<service>/admin/...`), guarded by an admin
token kept in `<storage>/serving/<service>.admin_token` (0600); the router holds only its
digest.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from controlplane.errors import RetryableError, UserError
from controlplane.rollout.backend import DeployError, version_app_name
from controlplane.rollout.evaluation import job_env
from controlplane.spec import ClusterSpec, RolloutSpec

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ADMIN_TOKEN_ENV = "LLMCTL_SERVE_ADMIN_TOKEN"


def resolve_address(cluster: ClusterSpec | None = None, address: str | None = None) -> tuple[str, dict[str, str]]:
    """The GCS address to deploy to and the environment its clients need.

    From the argument; else the running local cluster of `cluster` (token auth); else the
    Ray this process is already connected to; else $RAY_ADDRESS. Never "auto": on a shared
    host it could join someone else's cluster.
    """
    if address:
        return address, {}
    if cluster is not None and cluster.kind == "local":
        from controlplane import ray_cluster

        if ray_cluster.status(cluster)["up"]:
            state = ray_cluster.read_state(cluster)
            return state.gcs_address, ray_cluster.ray_env(Path(state.token_file), only_ray=True)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().gcs_address, {}
    if cluster is not None and cluster.kind == "ray" and cluster.address:
        return cluster.address, {}
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], {}
    raise UserError("not connected to a Ray cluster: start one (llmctl cluster up) or set $RAY_ADDRESS")


class RayServeBackend:
    kind = "ray"

    def __init__(
        self,
        cluster: ClusterSpec | None = None,
        address: str | None = None,
        storage_root: str | Path | None = None,
    ):
        if cluster is None:
            from controlplane.context import load_cluster

            cluster = load_cluster()
        self.address, self.env = resolve_address(cluster, address)
        root = Path(storage_root).expanduser() if storage_root else cluster.storage_root()
        self.secrets_dir = root / "serving"
        self.cluster_name = cluster.name

    # ------------------------------------------------------------ plumbing

    def _job(self, args: list[str], timeout_s: float, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "jobs.serve", *args, "--address", self.address],
                env=job_env({**self.env, **(extra_env or {})}),
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise DeployError(f"jobs.serve {args[0]}: no answer after {timeout_s:.0f}s") from None
        if proc.returncode == 2:
            raise UserError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")] or [proc.stderr[-500:]]
            raise DeployError(lines[-1].removeprefix("error: ")[:1000])
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def _deploy(self, cfg: dict[str, Any], timeout_s: float, extra_env: dict[str, str] | None = None) -> None:
        with tempfile.TemporaryDirectory(prefix="llmctl-serve-") as tmp:
            path = Path(tmp) / "app.json"
            path.write_text(json.dumps(cfg))
            self._job(["deploy", "--config", str(path)], timeout_s, extra_env)

    def _status(self) -> dict[str, Any]:
        return self._job(["status"], 120)

    def _apps(self) -> dict[str, str]:
        return self._status()["apps"]

    def _admin_token(self, spec: RolloutSpec, create: bool) -> str:
        path = self.secrets_dir / f"{spec.name}.admin_token"
        if path.is_file():
            return path.read_text().strip()
        if not create:
            raise UserError(f"service {spec.name}: admin token {path} is missing (tear the service down and redeploy)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return path.read_text().strip()

    def _base(self, spec: RolloutSpec) -> str:
        host = "127.0.0.1" if spec.serve.host in ("0.0.0.0", "::") else spec.serve.host
        return f"http://{host}:{spec.serve.port}/{spec.name}"

    def _admin(self, spec: RolloutSpec, action: str, params: dict | None = None, body: dict | None = None) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self._admin_token(spec, create=False)}"}
        url = f"{self._base(spec)}/admin/{action}"
        try:
            with httpx.Client(timeout=30) as c:
                r = (
                    c.post(url, json=body, headers=headers)
                    if body is not None
                    else c.get(url, params=params, headers=headers)
                )
        except httpx.HTTPError as exc:
            raise RetryableError(
                f"router of {spec.name} unreachable at {self._base(spec)}: {type(exc).__name__}"
            ) from None
        if r.status_code != 200:
            raise RetryableError(f"router of {spec.name}: /admin/{action} answered {r.status_code}: {r.text[:200]}")
        return r.json()

    def _routes(self, spec: RolloutSpec, ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
        return {v: {"app": version_app_name(spec.name, v), "weight": w} for v, w in ratios.items()}

    # ------------------------------------------------------------ the port

    def ensure_service(self, spec: RolloutSpec, stable: str | None, rollout_id: str) -> dict[str, Any]:
        opts = spec.serve
        if opts.host not in LOOPBACK and not os.environ.get(opts.token_env):
            raise UserError(f"serve.host {opts.host} is beyond loopback: set a bearer token in ${opts.token_env}")
        if self._apps().get(spec.name) != "RUNNING":
            cfg = {
                "kind": "router",
                "app_name": spec.name,
                "route_prefix": f"/{spec.name}",
                "http": {"host": opts.host, "port": opts.port},
                "token_env": opts.token_env,
                "deployment": {
                    "service": spec.name,
                    "cluster": self.cluster_name,
                    "rollout_id": rollout_id,
                    "routes": self._routes(spec, {stable: 1.0} if stable else {}),
                    "metrics": {"host": opts.metrics_host, "port": opts.metrics_port},
                },
            }
            token = self._admin_token(spec, create=True)
            self._deploy(cfg, spec.deploy_timeout_s, {ADMIN_TOKEN_ENV: token})
        info = self._admin(spec, "info")
        return {
            "url": f"{self._base(spec)}/v1",
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
                "kv_cache_gib": spec.serve.kv_cache_gib,
                "max_num_seqs": spec.serve.max_num_seqs,
                "enforce_eager": spec.serve.enforce_eager,
                "drill": drill.model_dump() if drill is not None else None,
            },
            "num_replicas": replicas,
            "num_cpus": spec.serve.cpus_per_replica if spec.gpus_per_replica == 0 else 1,
            "num_gpus": spec.gpus_per_replica,
        }
        if spec.gpus_per_replica:
            gpus = self._status().get("gpus", 0)
            if gpus < replicas * spec.gpus_per_replica:
                raise DeployError(
                    f"{replicas} replicas need {replicas * spec.gpus_per_replica} GPUs; the cluster has {gpus:g} "
                    "(on CPU-only hosts set gpus_per_replica: 0)"
                )
        try:
            self._deploy(cfg, spec.deploy_timeout_s)
        except DeployError:
            self.remove_version(spec, version)
            raise

    def set_traffic(self, spec: RolloutSpec, ratios: dict[str, float], rollout_id: str) -> float:
        body = {"routes": self._routes(spec, ratios), "rollout_id": rollout_id}
        return float(self._admin(spec, "weights", body=body)["since"])

    def window(self, spec: RolloutSpec, version: str, since: float) -> dict[str, Any]:
        return self._admin(spec, "stats", params={"version": version, "since": since})

    def remove_version(self, spec: RolloutSpec, version: str) -> None:
        self._job(["delete", "--app", version_app_name(spec.name, version)], 180)

    def teardown(self, spec: RolloutSpec) -> None:
        self._job(["delete", "--prefix", spec.name], 180)
        (self.secrets_dir / f"{spec.name}.admin_token").unlink(missing_ok=True)

    def wait_idle(self, spec: RolloutSpec, version: str, min_s: float, max_s: float = 30.0) -> None:
        """Let in-flight requests of a version that gets no new traffic finish."""
        start = time.monotonic()
        time.sleep(min_s)
        while time.monotonic() - start < max_s:
            if self.window(spec, version, time.time()).get("inflight", 0) <= 0:
                return
            time.sleep(0.2)
