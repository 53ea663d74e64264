"""The environment every Ray process of an llmctl cluster runs with, local or on Kubernetes
(`ray_cluster.ray_env` adds the local token file; `infra.manifests.ray_env` the token Secret).

Nothing here imports Ray: the infra renderer and the CLI read it cheaply.
"""

from __future__ import annotations

# Ray Serve's controller kills an HTTP proxy that misses three readiness (5 s) or health (10 s)
# checks in a row. On a busy host (a head that also runs an engine or a training rank) a proxy
# can take longer than that to answer, and a killed proxy fails the deploy or drops every
# request in flight; these bounds give it 30 s a check.
SERVE_PROXY_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}

# Token authentication on, no usage reports, the proxies' bounds.
RAY_PROCESS_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", **SERVE_PROXY_ENV}
