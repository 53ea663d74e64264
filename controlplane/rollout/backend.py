"""The port the rollout controller drives: a serving backend (Ray Serve or Kubernetes).

Adapters are thin and idempotent: removing a version that is already gone is success.
"""

from __future__ import annotations

from typing import Any, Protocol

from controlplane.errors import RetryableError
from controlplane.spec import RolloutSpec


class DeployError(RetryableError):
    """A version did not become ready (bad model, no capacity, timeout)."""


class ServingBackend(Protocol):
    kind: str

    def ensure_service(self, spec: RolloutSpec, stable: str | None, rollout_id: str) -> dict[str, Any]:
        """Make the service's ingress exist (routing all traffic to `stable`); returns endpoint info."""
        ...

    def has_version(self, spec: RolloutSpec, version: str) -> bool: ...

    def deploy_version(self, spec: RolloutSpec, version: str, model_dir: str, replicas: int, drill: Any) -> None:
        """Start `replicas` replicas of a version and return once they are ready (or raise DeployError)."""
        ...

    def set_traffic(self, spec: RolloutSpec, ratios: dict[str, float], rollout_id: str) -> float:
        """Route the given share of new requests to each version; returns the window start (backend clock)."""
        ...

    def window(self, spec: RolloutSpec, version: str, since: float) -> dict[str, Any]:
        """requests, errors, p50_s, p99_s, inflight of `version` since `since`."""
        ...

    def wait_idle(self, spec: RolloutSpec, version: str, min_s: float, max_s: float = 30.0) -> None:
        """Return once a version that receives no new traffic has no request in flight (bounded)."""
        ...

    def remove_version(self, spec: RolloutSpec, version: str) -> None: ...

    def teardown(self, spec: RolloutSpec) -> None:
        """Remove the ingress and every version of the service."""
        ...


def version_app_name(service: str, version: str) -> str:
    return f"{service}--{version}"
