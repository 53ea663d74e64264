"""Start, query and stop a real Prometheus server on 127.0.0.1 (tests, dashboards checks, demos).

    with PrometheusServer(targets={"llmctl-gpu": ["127.0.0.1:9835"]}, workdir=tmp) as prom:
        prom.wait_for('llmctl_telemetry_up == 1', timeout_s=30)
        rows = prom.query('llmctl_gpu_power_watts')

Uses the `prometheus` binary (Debian's package; `$PROMETHEUS_BIN` overrides), a config and a
TSDB under `workdir`, and a free loopback port. Every wait is bounded; `stop()` terminates the
process by its PID (then kills it after `stop_timeout_s`). Alert-rule files can be passed as
`rule_files` (they are checked by Prometheus at start; a bad file fails `start()`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from controlplane.errors import MissingDependencyError
from controlplane.procs import free_port


class PrometheusError(RuntimeError):
    pass


def prometheus_binary() -> str:
    path = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).is_file():
        raise MissingDependencyError("prometheus is not installed (Debian: apt-get install prometheus)")
    return path


class PrometheusServer:
    def __init__(
        self,
        targets: dict[str, list[str]],
        workdir: str | Path,
        scrape_interval_s: float = 1.0,
        evaluation_interval_s: float = 1.0,
        rule_files: list[str | Path] | None = None,
        port: int | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ):
        self.targets = targets
        self.workdir = Path(workdir)
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s
        self.rule_files = [str(Path(r).resolve()) for r in rule_files or []]
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {
                "scrape_interval": f"{self.scrape_interval_s:g}s",
                "scrape_timeout": f"{min(self.scrape_interval_s, 10):g}s",
                "evaluation_interval": f"{self.evaluation_interval_s:g}s",
            },
            "rule_files": self.rule_files,
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(addrs)}]} for job, addrs in self.targets.items()
            ],
        }

    def start(self) -> PrometheusServer:
        binary = prometheus_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(json.dumps(self.config(), indent=1))  # JSON is YAML
        self.port = self.port or free_port()
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready within {self.start_timeout_s:g}s: {self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=self.stop_timeout_s)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ------------------------------------------------------------ HTTP API
    def api(self, path: str, params: dict[str, Any] | None = None, timeout_s: float = 5.0) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=timeout_s)
        body = r.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; returns the vector's [{"metric": {...}, "value": [ts, "v"]}]."""
        data = self.api("query", {"query": expr})
        return data["result"] if data.get("resultType") == "vector" else [{"metric": {}, "value": data["result"]}]

    def targets_health(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout_s: float = 30.0,
        poll_s: float = 0.5,
    ) -> list[dict[str, Any]]:
        """Poll `expr` until `predicate(result)` holds; PrometheusError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                last = self.query(expr)
                if predicate(last):
                    return last
            except (httpx.HTTPError, PrometheusError):
                pass
            time.sleep(poll_s)
        raise PrometheusError(f"{expr!r}: condition not met within {timeout_s:g}s (last result {last})")
