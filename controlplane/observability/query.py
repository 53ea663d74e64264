"""A small Prometheus HTTP API client (instant and range queries) on httpx."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.errors import RetryableError, UserError


class PromQueryError(UserError):
    """Prometheus rejected a query (bad PromQL) or the URL is not a Prometheus."""


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    points: list[tuple[float, float]]  # (unix seconds, value)


class PromClient:
    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        import httpx

        try:
            resp = httpx.get(f"{self.url}{path}", params=params, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise RetryableError(f"prometheus at {self.url}: {type(exc).__name__}") from None
        try:
            body = resp.json()
        except ValueError:
            raise PromQueryError(f"{self.url}: not a Prometheus API (HTTP {resp.status_code})") from None
        if body.get("status") != "success":
            raise PromQueryError(f"prometheus: {body.get('errorType', 'error')}: {body.get('error', resp.status_code)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Series]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._get("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [Series({}, [(float(data["result"][0]), float(data["result"][1]))])]
        return [Series(r.get("metric", {}), [(float(r["value"][0]), float(r["value"][1]))]) for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        data = self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})
        return [Series(r.get("metric", {}), [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]]

    def targets_up(self) -> dict[str, list[dict[str, Any]]]:
        """Active scrape targets by job."""
        data = self._get("/api/v1/targets", {"state": "active"})
        jobs: dict[str, list[dict[str, Any]]] = {}
        for t in data["activeTargets"]:
            jobs.setdefault(t["labels"].get("job", ""), []).append(t)
        return jobs
